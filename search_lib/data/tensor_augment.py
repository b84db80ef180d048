"""The fast executor: an image pipeline on a batch of tensors, on the CPU or a GPU (the training's
``--gpu_augment``).

`run_fast(pipeline, images, params)` takes uint8 images (N, H, W, 3) on any device and returns normalised
float (N, C, h, w): the `augment.Pipeline`'s steps in order, in float32 in [0, 1] from the start: a resize as
``F.interpolate`` (bilinear, antialiased), the zero-padded crop as one gather, the colour jitter with
torchvision's tensor formulas (``rgb_to_grayscale``'s weights; blends ``f * img + (1 - f) * other``
clipped to [0, 1]) and per-image factors and order, the flip, the normalisation.

`DeviceAugment` pairs it with `augment.sample_device` (a seeded ``torch.Generator``: an epoch's augmentations
are a function of its seed). The PIL path stays the reference: with the same choices the crop and the flip
agree exactly, the colour jitter up to PIL's rounding to uint8 after each operation and its integer
grey-level formula (tests/test_batch_augment.py measures the bound); `pil_batch.run_exact` gives PIL's
result bit for bit from the same choices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import rgb_to_grayscale

from search_lib.core.errors import DataError, UsageError
from search_lib.data.augment import (
    AugmentParams,
    Crop,
    Flip,
    Jitter,
    Normalize,
    Pipeline,
    Resize,
    ToTensor,
    sample_device,
)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor[:, None, None, None] * a + (1.0 - factor[:, None, None, None]) * b).clamp_(0.0, 1.0)


def jitter_op(x: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    """One colour operation on float images in [0, 1] (N, 3, H, W), per-sample ``factor`` (N,):
    0 brightness (blend with black), 1 contrast (with the mean grey level), 2 saturation (with the grey image)."""
    if op == 0:
        return _blend(x, torch.zeros_like(x), factor)
    if op == 1:
        return _blend(x, rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), factor)
    return _blend(x, rgb_to_grayscale(x).expand_as(x), factor)


def _resize(x: torch.Tensor, step: Resize, params: AugmentParams) -> torch.Tensor:
    if tuple(x.shape[-2:]) == step.size:
        return x
    return F.interpolate(x, size=step.size, mode="bilinear", antialias=True, align_corners=False).clamp_(0.0, 1.0)


def _crop(x: torch.Tensor, step: Crop, params: AugmentParams) -> torch.Tensor:
    n, c = x.shape[:2]
    (h, w), p = step.size, step.pad
    padded = F.pad(x, (p, p, p, p))
    rows = (params.top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]    # (N, 1, h, 1)
    cols = (params.left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]   # (N, 1, 1, w)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def _jitter(x: torch.Tensor, step: Jitter, params: AugmentParams) -> torch.Tensor:
    factors = params.factors.to(x.dtype)
    for position in range(params.order.shape[1]):
        chosen_op = params.order[:, position]
        for op in range(3):  # torchvision's op 3 (hue) is never on
            chosen = (chosen_op == op) & ~torch.isnan(factors[:, op])
            if bool(chosen.any()):
                x = torch.where(chosen[:, None, None, None], jitter_op(x, op, factors[:, op]), x)
    return x


def _flip(x: torch.Tensor, step: Flip, params: AugmentParams) -> torch.Tensor:
    return torch.where(params.flip[:, None, None, None], x.flip(-1), x)


def _to_tensor(x: torch.Tensor, step: ToTensor, params: AugmentParams) -> torch.Tensor:
    return x  # the images are float in [0, 1] from the start


def _normalize(x: torch.Tensor, step: Normalize, params: AugmentParams) -> torch.Tensor:
    mean = torch.tensor(step.mean).view(1, -1, 1, 1).to(x.device)
    std = torch.tensor(step.std).view(1, -1, 1, 1).to(x.device)
    return (x - mean) / std


_RUN = {Resize: _resize, Crop: _crop, Jitter: _jitter, Flip: _flip, ToTensor: _to_tensor, Normalize: _normalize}


def run_fast(pipeline: Pipeline, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """uint8 (N, H, W, 3) on any device -> normalised float (N, C, h, w) with the given choices (on that
    device)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise DataError(f"batch augmentation expects uint8 images (N, H, W, 3), got {images.dtype} "
                        f"{tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    for step in pipeline.steps:
        x = _RUN[type(step)](x, step, params)
    return x


class DeviceAugment:
    """A training pipeline (e.g. ``build_transform("A", train=True)``) for batches of uint8 images on any
    device: choices from a seeded generator (`sample_device`), applied by `run_fast`."""

    def __init__(self, transform):
        pipeline = Pipeline.read(transform)
        if pipeline is None:
            raise UsageError(f"the transform {transform!r} has a step the tensor augmentation does not implement; "
                             f"use --gpu_augment false")
        self.pipeline = pipeline

    def sample(self, n: int, shape: tuple[int, int], generator: torch.Generator) -> AugmentParams:
        """Choices for n images of ``shape`` (h, w), on the generator's device."""
        return sample_device(self.pipeline, n, shape, generator)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        return run_fast(self.pipeline, images, params)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.sample(images.shape[0], tuple(images.shape[1:3]), generator))


__all__ = ["DeviceAugment", "jitter_op", "run_fast"]
