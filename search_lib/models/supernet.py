"""The DARTS-style cell supernet used by the search (docs/method.md §1).

Architecture parameters (one row per edge, one column per op of the space) are buffers, not
`nn.Parameter`s: the search is training-free, and keeping them out of `parameters()` keeps them out of
Opacus' per-sample-gradient pass (docs/method.md §8). `weights()` and `arch_parameters()` are
the two separate accessors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from search_lib.core.errors import UsageError
from search_lib.models.genotypes import PRUNED_ALPHA
from search_lib.models.ops import FactorizedReduce, ReLUConvBN, build_op
from search_lib.models.space import DEFAULT_SPACE, SearchSpace

SKIP_WEIGHT = 0.01  # ops whose softmax weight is <= this are not run (this is how pruning removes them)
NORM_TYPES = ("batchnorm", "groupnorm16", "groupnorm", "instancenorm", "nonorm")


@dataclass
class SampleWeights:
    """Per-sample op weights of one edge, for scoring several architectures in one pass.

    ``columns[o]`` is an (N, 1, 1, 1) tensor of op o's weight for every sample (0 where the sample's
    architecture does not run the op), or None when no sample runs it (then the op is not computed).
    """

    columns: list[torch.Tensor | None]


class MixedOp(nn.Module):
    """All candidate ops of one edge; forward is the weighted sum of the ops still alive."""

    def __init__(self, ops: Sequence[str], C_in: int, C_out: int, stride: int, affine: bool = True):
        super().__init__()
        self.ops = nn.ModuleList(build_op(name, C_in, C_out, stride, affine) for name in ops)

    def forward(self, x: torch.Tensor, weights: list[float] | SampleWeights) -> torch.Tensor | None:
        if isinstance(weights, SampleWeights):  # several architectures, one per group of samples
            pairs = [(w, op) for w, op in zip(weights.columns, self.ops) if w is not None]
        else:  # python floats: deciding which ops run never synchronises with the device
            pairs = [(w, op) for w, op in zip(weights, self.ops) if w > SKIP_WEIGHT]
        out = None
        for w, op in pairs:
            y = op(x) * w
            out = y if out is None else out + y
        return out


class SearchCell(nn.Module):
    """A normal or reduction cell with a MixedOp on every edge "i<-j"."""

    def __init__(self, space: SearchSpace, C_prev_prev: int, C_prev: int, C: int, reduction: bool,
                 reduction_prev: bool, affine: bool = True):
        super().__init__()
        # the output concatenates every intermediate state: multiplier = steps
        self.reduction, self.steps, self.multiplier = reduction, space.max_nodes, space.max_nodes
        self.preprocess0 = (FactorizedReduce(C_prev_prev, C, affine) if reduction_prev
                            else ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine))
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine)
        self.edge_keys = space.keys
        self.edges = nn.ModuleDict()
        for key in self.edge_keys:
            src = int(key.split("<-")[1])
            stride = 2 if reduction and src < 2 else 1
            self.edges[key] = MixedOp(space.ops, C, C, stride, affine)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: list[list[float]]) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        row = 0
        for i in range(2, self.steps + 2):
            total = None
            for j in range(i):
                y = self.edges[self.edge_keys[row]](states[j], weights[row])
                row += 1
                if y is not None:
                    total = y if total is None else total + y
            if total is None:  # every edge into this node pruned: the node is zero
                ref = states[0] if not self.reduction else states[0][:, :, ::2, ::2]
                total = torch.zeros_like(ref)
            states.append(total)
        return torch.cat(states[-self.multiplier:], dim=1)


def cell_layout(layers: int) -> list[bool]:
    """Reduction flags of the macro layout: N normal, 1 reduction, N normal, 1 reduction, N normal."""
    n = (layers - 2) // 3
    return [False] * n + [True] + [False] * n + [True] + [False] * n


class Supernet(nn.Module):
    """Stem, `layers` search cells, BN + ReLU, global average pool, linear classifier.

    forward(x) returns (features, logits); features are the pooled penultimate activations.
    `depth` keeps only the first `depth` cells (used by the thin linear-region network);
    `use_stem=False` feeds the input straight into the first cell.
    """

    def __init__(self, C: int, layers: int, num_classes: int, space: SearchSpace = DEFAULT_SPACE,
                 stem_multiplier: int = 1, fsr: int = 2, in_channels: int = 3, affine: bool = True,
                 use_stem: bool = True, depth: int | None = None):
        super().__init__()
        if layers < 2 or (layers - 2) % 3:
            raise UsageError(f"layers={layers} does not fit the N-normal/reduction/N/reduction/N layout; "
                             "use 5 or 8 (3N+2 cells)")
        self.space, self.steps, self.num_classes = space, space.max_nodes, num_classes
        self.n_ops = len(space.ops)
        self.config = dict(C=C, layers=layers, num_classes=num_classes, space=space,
                           stem_multiplier=stem_multiplier, fsr=fsr, in_channels=in_channels, affine=affine,
                           use_stem=use_stem, depth=depth)
        if use_stem:
            C_stem = C * stem_multiplier
            self.stem = nn.Sequential(nn.Conv2d(in_channels, C_stem, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(C_stem, affine=affine))
        else:
            C_stem = in_channels
            self.stem = nn.Identity()
        reductions = cell_layout(layers)[: depth if depth is not None else layers]
        C_prev_prev, C_prev, C_curr, reduction_prev = C_stem, C_stem, C, False
        self.cells = nn.ModuleList()
        for reduction in reductions:
            if reduction:
                C_curr *= fsr
            cell = SearchCell(space, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, affine)
            self.cells.append(cell)
            C_prev_prev, C_prev, reduction_prev = C_prev, cell.multiplier * C_curr, reduction
        self.feature_dim = C_prev
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev, affine=affine), nn.ReLU(inplace=False))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        n_edges = len(space.keys)
        self.register_buffer("alphas_normal", torch.zeros(n_edges, self.n_ops))
        self.register_buffer("alphas_reduce", torch.zeros(n_edges, self.n_ops))

    # ---- architecture parameters ----
    def arch_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.alphas_normal, self.alphas_reduce

    def set_alphas(self, normal: torch.Tensor, reduce: torch.Tensor) -> None:
        """Copy the alphas into the buffers and keep their op weights as Python floats, computed from the
        values given (on the host), so that `forward` never reads the buffers back from the device."""
        self.alphas_normal.copy_(normal)
        self.alphas_reduce.copy_(reduce)
        dtype = self.alphas_normal.dtype  # the buffers' rounding, so the weights are those of the buffers
        self._host_weights = (self._versions(), self.edge_weights(normal.detach().to("cpu", dtype)),
                              self.edge_weights(reduce.detach().to("cpu", dtype)))

    def _versions(self) -> tuple:
        """The buffers themselves and their version counters (an in-place change, load_state_dict included,
        raises a counter; ``.to(device)`` makes new buffers): the op weights kept by `set_alphas` are those of
        the buffers exactly while this is unchanged."""
        return self.alphas_normal, self.alphas_normal._version, self.alphas_reduce, self.alphas_reduce._version

    def _edge_weights_now(self) -> tuple[list[list[float]], list[list[float]]]:
        kept = getattr(self, "_host_weights", None)
        if kept is not None and all(a is b if isinstance(a, torch.Tensor) else a == b
                                    for a, b in zip(kept[0], self._versions())):
            return kept[1], kept[2]
        # alphas changed by other means than set_alphas (or moved, copied): read them once (a device-to-host
        # copy on a GPU) and keep what was read
        self._host_weights = (self._versions(), self.edge_weights(self.alphas_normal),
                              self.edge_weights(self.alphas_reduce))
        return self._host_weights[1], self._host_weights[2]

    def weights(self) -> Iterator[nn.Parameter]:
        """The network weights (everything but the architecture parameters)."""
        return self.parameters()

    @staticmethod
    def edge_weights(alphas: torch.Tensor) -> list[list[float]]:
        """`edge_probs` as python floats (deciding which ops run then never synchronises with the device)."""
        return Supernet.edge_probs(alphas).tolist()

    @staticmethod
    def edge_probs(alphas: torch.Tensor) -> torch.Tensor:
        """Softmax weights per edge (float64, CPU), zero for ops that are not run (weight <= SKIP_WEIGHT) and
        on edges whose ops are all pruned; ``alphas`` is (..., edges, ops)."""
        alphas = alphas.detach().to("cpu", torch.float64)
        probs = torch.softmax(alphas, dim=-1)
        dead = (alphas <= PRUNED_ALPHA / 2).all(dim=-1, keepdim=True)
        return probs.masked_fill(dead | (probs <= SKIP_WEIGHT), 0.0)

    def set_candidates(self, normal: torch.Tensor, reduce: torch.Tensor, samples_each: int) -> None:
        """Run B architectures in one pass: ``normal`` / ``reduce`` are (B, edges, ops) alphas, and the batch
        holds ``samples_each`` samples of architecture 0, then of architecture 1, and so on.

        Every sample sees exactly the weights its own architecture gives (zero for ops it does not run), so
        each sample's output and per-sample gradients are those of its architecture alone; ops no
        architecture runs are not computed. `clear_candidates` returns to the alphas.
        """
        ref = next(self.parameters())
        self._candidates = tuple(self._sample_weights(a, samples_each, ref) for a in (normal, reduce))

    def clear_candidates(self) -> None:
        self._candidates = None

    def _sample_weights(self, alphas: torch.Tensor, samples_each: int, ref: torch.Tensor) -> list[SampleWeights]:
        probs = self.edge_probs(alphas)  # (B, E, O)
        runs = (probs > 0).any(dim=0).tolist()
        # non_blocking: a copy from ordinary host memory returns once its source is staged, without waiting
        # for the device to finish its queue (as a blocking copy does)
        per_sample = probs.to(ref.device, ref.dtype, non_blocking=True).repeat_interleave(samples_each, dim=0)
        return [SampleWeights([per_sample[:, e, o].reshape(-1, 1, 1, 1).contiguous() if run else None
                               for o, run in enumerate(row)]) for e, row in enumerate(runs)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if getattr(self, "_candidates", None) is not None:
            w_normal, w_reduce = self._candidates
        else:
            w_normal, w_reduce = self._edge_weights_now()
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, w_reduce if cell.reduction else w_normal)
        features = self.global_pooling(self.lastact(s1)).flatten(1)
        return features, self.classifier(features)


def thin_supernet(space: SearchSpace = DEFAULT_SPACE, in_channels: int = 1) -> Supernet:
    """The linear-region network: C = 1, no stem, two cells (a normal then a reduction cell)."""
    return Supernet(C=1, layers=5, num_classes=1, space=space, in_channels=in_channels, use_stem=False, depth=2)


# --------------------------------------------------------------------------------------------------
# Normalisation replacement (for per-sample gradients) and initialisation


def _make_norm(bn: nn.BatchNorm2d, norm_type: str, where: str) -> nn.Module:
    C = bn.num_features
    if norm_type in ("groupnorm16", "groupnorm"):
        groups = min(16 if norm_type == "groupnorm16" else 32, C)
        if C % groups:
            raise UsageError(f"--norm_type {norm_type} makes {groups} groups, which do not divide the {C} channels "
                             f"of {where}; choose channels that are multiples of {groups} or --norm_type instancenorm")
        return nn.GroupNorm(groups, C, affine=True)
    if norm_type == "instancenorm":
        return nn.InstanceNorm2d(C, affine=True)
    if norm_type == "nonorm":
        return nn.Identity()
    raise UsageError(f"unknown norm type {norm_type!r}; valid: {', '.join(NORM_TYPES)}")


def replace_norm(model: nn.Module, norm_type: str) -> nn.Module:
    """Replace every BatchNorm2d in place (`batchnorm` keeps them); returns the model.

    Opacus' own fixer (ModuleValidator.fix) applies one group count to every layer and skips
    BatchNorms without affine parameters, so the per-layer min(16, C) rule is applied here.
    """
    if norm_type == "batchnorm":
        return model
    if norm_type not in NORM_TYPES:
        raise UsageError(f"unknown norm type {norm_type!r}; valid: {', '.join(NORM_TYPES)}")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                where = f"{name}.{child_name}" if name else child_name
                new = _make_norm(child, norm_type, where)
                ref = next(iter(child.buffers()), None)
                if ref is not None:
                    new.to(ref.device)
                setattr(module, child_name, new)
    return model


NORM_LAYERS = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)


def init_weights(model: nn.Module, mode: str = "fan_out", seed: int | None = None) -> nn.Module:
    """Kaiming-normal conv/linear weights (``mode`` fan_in or fan_out), zero biases, norm weights 1 / biases 0.

    Seeded with a private generator when `seed` is given, so it neither depends on nor disturbs the
    global random state. Every conv and linear layer is re-drawn; the returned model is the input.
    """
    if mode not in ("fan_in", "fan_out"):
        raise UsageError(f"unknown init mode {mode!r}; use fan_in or fan_out")
    gen = None
    if seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                # Draw on the CPU with the private generator, then copy: identical across devices.
                w = torch.empty(m.weight.shape, dtype=m.weight.dtype)
                nn.init.kaiming_normal_(w, mode=mode, nonlinearity="relu", generator=gen)
                m.weight.copy_(w)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, NORM_LAYERS) and getattr(m, "weight", None) is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
    return model
