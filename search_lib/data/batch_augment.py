"""RFS transform A on a batch of tensors, per-sample randomness from a seeded generator (for the GPU).

`BatchTransformA` takes uint8 images (N, H, W, C) already on the device and returns normalised float
(N, C, s, s): random crop of size s after zero padding (offsets uniform in 0..2·pad, as
``T.RandomCrop(s, padding=pad)``), colour jitter (brightness, contrast, saturation factors uniform in
[0.6, 1.4], applied in a random order per sample, as ``T.ColorJitter(0.4, 0.4, 0.4)``), horizontal flip
with probability 1/2, then ``ToTensor`` and the miniImageNet normalisation. The choices come from a
``torch.Generator`` on the device, so an epoch's augmentations are a function of its seed.

The PIL path (`transforms.build_transform("A", train=True)`) stays the reference: for the same crop
offset, flip and jitter factors/order, the outputs agree up to PIL's rounding to uint8 after each colour
operation and its integer grey-level formula (tests/test_batch_augment.py measures the bound); the crop and
the flip alone agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ..errors import DataError
from .transforms import MINI_MEAN, MINI_STD

_JITTER = 0.4
_GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


@dataclass
class AugmentParams:
    """Per-sample choices of transform A: crop offsets (top, left), flips, jitter factors and order."""

    top: torch.Tensor         # (N,) long, 0..2*pad
    left: torch.Tensor        # (N,) long, 0..2*pad
    flip: torch.Tensor        # (N,) bool
    factors: torch.Tensor     # (N, 3) float: brightness, contrast, saturation
    order: torch.Tensor       # (N, 3) long: a permutation of 0, 1, 2 (the jitter operations in order)


def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_GREY[0] * r + _GREY[1] * g + _GREY[2] * b).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor[:, None, None, None] * a + (1.0 - factor[:, None, None, None]) * b).clamp_(0.0, 1.0)


def jitter_op(x: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    """One colour operation on float images in [0, 1] (N, 3, H, W), per-sample ``factor`` (N,):
    0 brightness (blend with black), 1 contrast (with the mean grey level), 2 saturation (with the grey image)."""
    if op == 0:
        return _blend(x, torch.zeros_like(x), factor)
    if op == 1:
        return _blend(x, _grey(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), factor)
    return _blend(x, _grey(x).expand_as(x), factor)


class BatchTransformA:
    """Transform A (training variant) for batches of uint8 images on any device."""

    def __init__(self, size: int, mean=MINI_MEAN, std=MINI_STD):
        self.size = int(size)
        self.pad = self.size * 8 // 84  # as build_transform("A")
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def sample(self, n: int, generator: torch.Generator) -> AugmentParams:
        dev = generator.device
        span = 2 * self.pad + 1
        top = torch.randint(0, span, (n,), generator=generator, device=dev)
        left = torch.randint(0, span, (n,), generator=generator, device=dev)
        flip = torch.rand(n, generator=generator, device=dev) < 0.5
        factors = 1.0 + _JITTER * (2.0 * torch.rand(n, 3, generator=generator, device=dev) - 1.0)
        order = torch.argsort(torch.rand(n, 3, generator=generator, device=dev), dim=1)
        return AugmentParams(top, left, flip, factors, order)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """uint8 (N, H, W, C) -> normalised float (N, C, size, size) with the given choices."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise DataError(f"batch augmentation expects uint8 images (N, H, W, 3), got {images.dtype} "
                            f"{tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False).clamp_(0.0, 1.0)
        n, s, p = x.shape[0], self.size, self.pad
        padded = F.pad(x, (p, p, p, p))
        rows = (params.top[:, None] + torch.arange(s, device=x.device))[:, None, :, None]     # (N, 1, s, 1)
        cols = (params.left[:, None] + torch.arange(s, device=x.device))[:, None, None, :]    # (N, 1, 1, s)
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(3, device=x.device)[None, :, None, None]
        x = padded[batch, chan, rows, cols]
        for position in range(3):
            step = params.order[:, position]
            for op in range(3):
                chosen = step == op
                if bool(chosen.any()):
                    x = torch.where(chosen[:, None, None, None], jitter_op(x, op, params.factors[:, op]), x)
        x = torch.where(params.flip[:, None, None, None], x.flip(-1), x)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.sample(images.shape[0], generator))


class DeviceBatches:
    """Training batches made on the device: the partition's uint8 images held there, transform A applied per
    sample in batch. ``epoch(seed)`` gives the batches of one epoch (order and augmentations a function of
    ``seed``, so a resumed run repeats them); the last incomplete batch is dropped when there is more than
    one batch, as the training's DataLoader does."""

    def __init__(self, images, targets, device: torch.device, batch_size: int, size: int, rank: int = 0,
                 world_size: int = 1):
        import numpy as np

        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"--gpu_augment needs uint8 images (N, H, W, 3), got {images.dtype} {images.shape}; "
                            f"use --gpu_augment false")
        self.device = torch.device(device)
        self.images = torch.tensor(images, device=self.device)  # a copy: the partition stays read-only
        self.targets = torch.tensor(np.asarray(targets, dtype=np.int64), device=self.device)
        self.batch_size = int(batch_size)  # the global batch: under torchrun each rank takes every size-th image
        self.rank, self.world_size = int(rank), int(world_size)
        self.augment = BatchTransformA(size)

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if n > self.batch_size else 1

    def epoch(self, seed: int):
        n = self.images.shape[0]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).to(self.device)
        gen = torch.Generator(device=self.device).manual_seed((int(seed) + 1) % 2**63)
        mine = slice(self.rank, None, self.world_size)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            # the choices are drawn for the whole global batch, so a rank's images get exactly the
            # augmentations they get in a single process
            params = self.augment.sample(idx.shape[0], gen)
            if self.world_size > 1:
                idx, params = idx[mine], AugmentParams(*(getattr(params, f.name)[mine] for f in fields(params)))
            yield self.augment.apply(self.images[idx], params), self.targets[idx]


__all__ = ["AugmentParams", "BatchTransformA", "DeviceBatches", "jitter_op"]
