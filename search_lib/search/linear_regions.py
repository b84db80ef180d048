"""TE-NAS linear-region counting (docs/method.md §3).

Each input's code is the sign pattern (output > 0) of every ReLU in the network; the count is the
number of distinct codes. The original computed it as sum_i 1 / #{j : code_j = code_i}, which is the
same number; here each code is packed into bytes and the distinct byte strings are counted
(`count_distinct_codes`, tested against `torch.unique(codes, dim=0)`).

`LinearRegionScorer.score` counts one architecture (the reference); `score_many` counts several in one
pass over the crops repeated once per architecture, with BatchNorm statistics taken per architecture
and the ReLUs of ops an architecture does not run left out of its codes, as if they had not run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from search_lib.models.space import SearchSpace
from search_lib.models.supernet import MixedOp, Supernet, init_weights, thin_supernet


@torch.no_grad()
def relu_codes(model: nn.Module, inputs: torch.Tensor,
               mask: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Boolean (n, n_relu_units) matrix: which ReLU outputs are positive for each input.

    ``mask(relu, bits)``, when given, may change each ReLU's (n, units) bits before they are kept.
    """
    codes: list[torch.Tensor] = []

    def hook(module, _inp, out):
        bits = (out > 0).flatten(1)
        codes.append(bits if mask is None else mask(module, bits))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        model(inputs)
    finally:
        for h in handles:
            h.remove()
    if not codes:
        return torch.zeros(inputs.shape[0], 0, dtype=torch.bool, device=inputs.device)
    return torch.cat(codes, dim=1)


def count_distinct_codes(codes: torch.Tensor) -> int:
    """Distinct rows of a boolean (n, units) matrix: each row packed into bytes, the byte strings counted
    with a set (10x faster than ``torch.unique(codes, dim=0)``, which sorts the rows, on the CPU)."""
    if codes.shape[1] == 0:
        return 1 if codes.shape[0] else 0
    packed = np.packbits(codes.cpu().numpy(), axis=1)
    return len({row.tobytes() for row in packed})


def count_linear_regions(model: nn.Module, batches: list[torch.Tensor]) -> int:
    """Distinct ReLU codes over all `batches` together (each batch is forwarded on its own)."""
    return count_distinct_codes(torch.cat([relu_codes(model, b) for b in batches], dim=0))


def sample_crops(images: torch.Tensor, n_batches: int = 3, batch_size: int = 1000, crop: int = 3,
                 seed: int = 0) -> list[torch.Tensor]:
    """Random `crop` x `crop` patches of one random channel of random images: n_batches x (batch_size, 1, crop, crop).

    `images` is an (N, C, H, W) float tensor (already resized / normalised).
    """
    rng = np.random.default_rng(seed)
    n, c, h, w = images.shape
    total = n_batches * batch_size
    idx = rng.integers(0, n, total)
    ch = rng.integers(0, c, total)
    ys = rng.integers(0, h - crop + 1, total)
    xs = rng.integers(0, w - crop + 1, total)
    offs = torch.arange(crop)
    rows = torch.as_tensor(ys)[:, None] + offs[None, :]  # (total, crop)
    cols = torch.as_tensor(xs)[:, None] + offs[None, :]
    planes = images[torch.as_tensor(idx), torch.as_tensor(ch)]  # (total, H, W)
    patches = planes[torch.arange(total)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return list(patches.unsqueeze(1).split(batch_size))


class LinearRegionScorer:
    """Counts linear regions of the thin supernet (C=1, no stem, 2 cells) under given alphas."""

    def __init__(self, crops: list[torch.Tensor], space: SearchSpace, device: torch.device, train_mode: bool = True):
        self.crops = [c.to(device) for c in crops]
        self.net = thin_supernet(space, in_channels=crops[0].shape[1]).to(device)
        self.net.train(train_mode)

    def reinit(self, seed: int) -> None:
        init_weights(self.net, mode="fan_in", seed=seed)

    def score(self, alphas_normal: torch.Tensor, alphas_reduce: torch.Tensor) -> int:
        self.net.set_alphas(alphas_normal, alphas_reduce)
        return count_linear_regions(self.net, self.crops)

    @torch.no_grad()
    def score_many(self, alphas_normal: torch.Tensor, alphas_reduce: torch.Tensor) -> list[int]:
        """Region counts of B architectures, (B, edges, ops) alphas each, in one pass per crop batch."""
        n_arch = alphas_normal.shape[0]
        live = torch.stack([Supernet.edge_probs(alphas_normal) > 0, Supernet.edge_probs(alphas_reduce) > 0], 1)
        codes: list[list[torch.Tensor]] = [[] for _ in range(n_arch)]
        for batch in self.crops:
            m = batch.shape[0]
            self.net.set_candidates(alphas_normal, alphas_reduce, m)
            try:
                with _per_architecture_batchnorm(self.net, n_arch):
                    rows = _masked_relu_codes(self.net, batch.repeat(n_arch, 1, 1, 1), live, m)
            finally:
                self.net.clear_candidates()
            for b in range(n_arch):
                codes[b].append(rows[b * m:(b + 1) * m])
        return [count_distinct_codes(torch.cat(c, dim=0)) for c in codes]


def _relu_owners(net: Supernet) -> dict[nn.Module, tuple[int, int, int]]:
    """(cell type, edge row, op) of every ReLU inside a candidate op of ``net`` (0 normal, 1 reduce)."""
    owners = {}
    for cell in net.cells:
        for row, key in enumerate(cell.edge_keys):
            mixed: MixedOp = cell.edges[key]
            for o, op in enumerate(mixed.ops):
                for m in op.modules():
                    if isinstance(m, nn.ReLU):
                        owners[m] = (int(cell.reduction), row, o)
    return owners


def _masked_relu_codes(net: Supernet, inputs: torch.Tensor, live: torch.Tensor, samples_each: int) -> torch.Tensor:
    """`relu_codes` of a batch of several architectures; a ReLU inside an op that a sample's architecture
    does not run gives that sample a constant code (False), which leaves the count of distinct codes of
    the architecture unchanged, as if the op had not run. ``live`` is (B, 2, edges, ops) bool."""
    owners = _relu_owners(net)

    def mask(module: nn.Module, bits: torch.Tensor) -> torch.Tensor:
        where = owners.get(module)
        if where is None:
            return bits
        keep = live[:, where[0], where[1], where[2]].to(bits.device).repeat_interleave(samples_each)
        return bits & keep[:, None]

    return relu_codes(net, inputs, mask)


@contextmanager
def _per_architecture_batchnorm(net: nn.Module, groups: int) -> Iterator[None]:
    """While active, BatchNorm layers in training mode normalise each of ``groups`` consecutive equal parts of
    the batch with that part's own statistics, exactly as a batch of that architecture alone would be.

    The parts are moved into the channel dimension, (G·m, C, H, W) -> (m, G·C, H, W), so that one
    `F.batch_norm` call takes per-channel statistics over each part's m samples.
    """
    def grouped(bn: nn.BatchNorm2d):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if not bn.training or groups == 1:
                return bn._plain_forward(x)
            n, c, h, w = x.shape
            m = n // groups
            xg = x.reshape(groups, m, c, h, w).transpose(0, 1).reshape(m, groups * c, h, w)
            weight = bn.weight.repeat(groups) if bn.weight is not None else None
            bias = bn.bias.repeat(groups) if bn.bias is not None else None
            y = F.batch_norm(xg, None, None, weight, bias, True, 0.0, bn.eps)
            return y.reshape(m, groups, c, h, w).transpose(0, 1).reshape(n, c, h, w)
        return forward

    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn._plain_forward = bn.forward
        bn.forward = grouped(bn)
    try:
        yield
    finally:
        for bn in bns:
            bn.forward = bn._plain_forward
            del bn._plain_forward


__all__ = ["relu_codes", "count_distinct_codes", "count_linear_regions", "sample_crops", "LinearRegionScorer"]
