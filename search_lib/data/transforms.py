"""The image transforms: RFS's A, B, C, D and the search's TENAS (docs/method.md §6); on CIFAR-FS and FC100,
D is RFS's 32 x 32 CIFAR transform (zero-padded random crop, colour jitter, flip; CIFAR-100 statistics).

Each maps an HWC uint8 numpy image to a normalised C x H x W float tensor. The random ones draw from
torch's global generator; the samplers run them under a forked, seeded generator (`apply_seeded`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from ..errors import UsageError
from .names import CIFAR_KEYS, DEFAULT_IMAGE_SIZE, DatasetSpec, resolve_dataset

MINI_MEAN = tuple(x / 255.0 for x in (120.39586422, 115.59361427, 104.54012653))
MINI_STD = tuple(x / 255.0 for x in (70.68188272, 68.27635443, 72.54505529))
CIFAR_MEAN = tuple(x / 255.0 for x in (125.3, 123.0, 113.9))
CIFAR_STD = tuple(x / 255.0 for x in (63.0, 62.1, 66.7))
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # RFS's CIFAR-FS / FC100 normalisation
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

TRANSFORM_NAMES = ("A", "B", "C", "D", "TENAS")
_DEFAULT_TRANSFORM_SIZE = {"A": 84, "B": 84, "C": 80, "D": 80, "TENAS": 32}


class _ToPIL:
    """HWC uint8 numpy (or a PIL image) -> RGB PIL image."""

    def __call__(self, img):
        if isinstance(img, Image.Image):
            return img
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            arr = arr.astype(np.uint8)
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        return Image.fromarray(arr)

    def __repr__(self) -> str:
        return "ToPIL()"


class _ResizeIfNeeded:
    """Resize to size x size only when the image is not already that size (keeps RFS A exact at 84)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.size == (self.size, self.size):
            return img
        return img.resize((self.size, self.size), Image.BILINEAR)

    def __repr__(self) -> str:
        return f"ResizeIfNeeded({self.size})"


def build_transform(name: str, train: bool, image_size: int | None = None,
                    dataset: str | DatasetSpec = "mini") -> Callable[[np.ndarray], torch.Tensor]:
    """An RFS transform (HWC uint8 numpy -> normalised C x H x W float tensor).

    ``image_size`` defaults to the transform's own size (A/B 84, C/D 80, TENAS 32), or the images' 32 for
    Digits, CIFAR-FS and FC100; other sizes scale the crop, padding and resize sizes proportionally.
    """
    key = str(name).strip()
    key = key.upper() if key.upper() in TRANSFORM_NAMES else key
    if key not in TRANSFORM_NAMES:
        raise UsageError(f"unknown transform {name!r}; use one of {', '.join(TRANSFORM_NAMES)}")
    ds = resolve_dataset(dataset).key
    if image_size is None:
        s = DEFAULT_IMAGE_SIZE[ds] if ds == "digits" or ds in CIFAR_KEYS else _DEFAULT_TRANSFORM_SIZE[key]
    else:
        s = int(image_size)
        if s < 1 or s != image_size:
            raise UsageError(f"image size must be a positive integer, got {image_size!r}; pass e.g. 84")
    to_tensor = [T.ToTensor()]
    norm_mini = T.Normalize(MINI_MEAN, MINI_STD)
    norm_cifar = T.Normalize(CIFAR_MEAN, CIFAR_STD)
    if key == "A":
        pad = s * 8 // 84
        if train:
            steps = [_ResizeIfNeeded(s), T.RandomCrop(s, padding=pad),
                     T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4), T.RandomHorizontalFlip()]
        else:
            steps = [_ResizeIfNeeded(s)]
        return T.Compose([_ToPIL(), *steps, *to_tensor, norm_mini])
    if key == "B":
        if train:
            steps = [T.RandomResizedCrop(s, scale=(0.2, 1.0)), T.RandomHorizontalFlip()]
        else:
            steps = [T.Resize(int(round(s * 92 / 84))), T.CenterCrop(s)]
        return T.Compose([_ToPIL(), *steps, *to_tensor, norm_cifar])
    if key == "D" and ds in CIFAR_KEYS:  # RFS's transform D (test: normalisation only)
        steps = [_ResizeIfNeeded(s)]
        if train:
            steps += [T.RandomCrop(s, padding=s * 4 // 32),
                      T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4), T.RandomHorizontalFlip()]
        return T.Compose([_ToPIL(), *steps, *to_tensor, T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])
    if key in ("C", "D"):
        if train:
            steps = [T.RandomResizedCrop(s), T.RandomHorizontalFlip()]
        else:
            steps = [T.Resize(int(round(s * 92 / 80))), T.CenterCrop(s)]
        return T.Compose([_ToPIL(), *steps, *to_tensor, norm_cifar])
    # TENAS
    if train:
        steps = [T.Resize((s, s)), T.RandomHorizontalFlip(), T.RandomCrop(s, padding=s * 4 // 32)]
    else:
        steps = [T.Resize((s, s))]
    return T.Compose([_ToPIL(), *steps, *to_tensor, norm_cifar])


def resolve_transform(transform, train: bool, image_size, dataset: str | DatasetSpec):
    """A transform name (built for ``dataset``) or a callable, returned as a callable."""
    if isinstance(transform, str):
        return build_transform(transform, train=train, image_size=image_size, dataset=dataset)
    if callable(transform):
        return transform
    raise UsageError(f"transform must be one of {', '.join(TRANSFORM_NAMES)} or a callable, got {transform!r}")


def torch_seed(generator: np.random.Generator) -> int:
    """A torch seed drawn from a numpy generator (the samplers' one source of randomness)."""
    return int(generator.integers(0, 2**63 - 1))

