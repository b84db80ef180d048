"""TE-NAS linear-region counting (docs/method.md §3).

Each input's code is the sign pattern (output > 0) of every ReLU in the network; the count is the
number of distinct codes. The original computed it as sum_i 1 / #{j : code_j = code_i}, which is the
same number; here the codes are deduplicated with `torch.unique`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .supernet import Supernet, init_weights, thin_supernet


@torch.no_grad()
def relu_codes(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Boolean (n, n_relu_units) matrix: which ReLU outputs are positive for each input."""
    codes: list[torch.Tensor] = []

    def hook(_module, _inp, out):
        codes.append((out > 0).flatten(1))

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
    if codes.shape[1] == 0:
        return 1 if codes.shape[0] else 0
    return int(torch.unique(codes, dim=0).shape[0])


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

    def __init__(self, crops: list[torch.Tensor], space: str, max_nodes: int, device: torch.device,
                 train_mode: bool = True):
        self.crops = [c.to(device) for c in crops]
        self.net = thin_supernet(space, max_nodes, in_channels=crops[0].shape[1]).to(device)
        self.net.train(train_mode)

    def reinit(self, seed: int) -> None:
        init_weights(self.net, mode="fan_in", seed=seed)

    def score(self, alphas_normal: torch.Tensor, alphas_reduce: torch.Tensor) -> int:
        self.net.set_alphas(alphas_normal, alphas_reduce)
        return count_linear_regions(self.net, self.crops)


__all__ = ["relu_codes", "count_distinct_codes", "count_linear_regions", "sample_crops", "LinearRegionScorer",
           "Supernet"]
