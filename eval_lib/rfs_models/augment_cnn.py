"""The evaluation network built from a genotype (MetaNAS-style "AugmentCNN", docs/method.md §1).

Same macro layout and operations as the search supernet (`search_lib.models.ops` builds every op), but each
edge holds only the genotype's op, non-identity ops are followed by drop-path, and the network ends
with global average pooling and a linear classifier (no final BN / ReLU).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from search_lib.models.genotypes import Genotype
from search_lib.models.ops import FactorizedReduce, ReLUConvBN, build_op


class DropPath(nn.Module):
    """Zeroes a whole sample's branch with probability `p` in training, rescaling survivors by 1/(1-p)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty(x.size(0), 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
        return x / keep * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class AugmentCell(nn.Module):
    def __init__(self, genotype: Genotype, C_pp: int, C_p: int, C: int, reduction: bool, reduction_p: bool):
        super().__init__()
        self.reduction = reduction
        self.preproc0 = FactorizedReduce(C_pp, C) if reduction_p else ReLUConvBN(C_pp, C, 1, 1, 0)
        self.preproc1 = ReLUConvBN(C_p, C, 1, 1, 0)
        nodes = genotype.reduce if reduction else genotype.normal
        self.concat = list(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.inputs: list[list[int]] = []
        self.dag = nn.ModuleList()
        for node in nodes:
            edges = nn.ModuleList()
            for op_name, src in node:
                op = build_op(op_name, C, C, 2 if reduction and src < 2 else 1)
                if not isinstance(op, nn.Identity):
                    op = nn.Sequential(op, DropPath())
                edges.append(op)
            self.dag.append(edges)
            self.inputs.append([src for _, src in node])
        self.out_channels = C * len(self.concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preproc0(s0), self.preproc1(s1)]
        for edges, srcs in zip(self.dag, self.inputs):
            states.append(sum(op(states[s]) for op, s in zip(edges, srcs)))
        return torch.cat([states[i] for i in self.concat], dim=1)


class AugmentCNN(nn.Module):
    """Stem conv + BN, `layers` cells (reductions at layers//3 and 2*layers//3), GAP, linear classifier."""

    def __init__(self, genotype: Genotype, C: int, layers: int, num_classes: int, stem_multiplier: int = 1,
                 fsr: int = 2, in_channels: int = 3, drop_path_prob: float = 0.0):
        super().__init__()
        genotype.validate(None)
        self.genotype = genotype
        C_cur = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_cur, 3, 1, 1, bias=False), nn.BatchNorm2d(C_cur))
        C_pp, C_p, C_cur = C_cur, C_cur, C
        self.cells = nn.ModuleList()
        reduction_p = False
        reduction_layers = {layers // 3, 2 * layers // 3}
        for i in range(layers):
            reduction = i in reduction_layers
            if reduction:
                C_cur *= fsr
            cell = AugmentCell(genotype, C_pp, C_p, C_cur, reduction, reduction_p)
            self.cells.append(cell)
            C_pp, C_p, reduction_p = C_p, cell.out_channels, reduction
        self.feature_dim = C_p
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(C_p, num_classes)
        self.drop_path_prob = drop_path_prob

    @property
    def drop_path_prob(self) -> float:
        return self._drop_path_prob

    @drop_path_prob.setter
    def drop_path_prob(self, p: float) -> None:
        self._drop_path_prob = float(p)
        for m in self.modules():
            if isinstance(m, DropPath):
                m.p = float(p)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        features = self.gap(s1).flatten(1)
        logits = self.linear(features)
        return (features, logits) if return_features else logits
