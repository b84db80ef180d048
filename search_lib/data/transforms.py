"""The image transforms: RFS's A, B, C, D and the search's TENAS (docs/method.md §6); on CIFAR-FS and FC100,
D is RFS's 32 x 32 CIFAR transform (zero-padded random crop, colour jitter, flip; CIFAR-100 statistics).

Each maps an HWC uint8 numpy image to a normalised C x H x W float tensor; these torchvision pipelines are
the one definition of every step (sizes, padding, jitter factors, normalisation), which `augment` reads for
the batched executors. The random ones draw from torch's global generator; `transform_stack` transforms a
stack of images (batched, bit for bit, when `pil_batch` can) and `apply_seeded` does so under a forked,
seeded generator, as the samplers need.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torchvision import transforms as T

from search_lib.core.errors import DataError, UsageError
from search_lib.data.augment import ResizeIfNeeded as _ResizeIfNeeded
from search_lib.data.augment import ToPIL as _ToPIL
from search_lib.data.names import CIFAR_KEYS, DEFAULT_IMAGE_SIZE, DatasetSpec, resolve_dataset
from search_lib.data.pil_batch import batched

MINI_MEAN = tuple(x / 255.0 for x in (120.39586422, 115.59361427, 104.54012653))
MINI_STD = tuple(x / 255.0 for x in (70.68188272, 68.27635443, 72.54505529))
CIFAR_MEAN = tuple(x / 255.0 for x in (125.3, 123.0, 113.9))
CIFAR_STD = tuple(x / 255.0 for x in (63.0, 62.1, 66.7))
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # RFS's CIFAR-FS / FC100 normalisation
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

TRANSFORM_NAMES = ("A", "B", "C", "D", "TENAS")
_DEFAULT_TRANSFORM_SIZE = {"A": 84, "B": 84, "C": 80, "D": 80, "TENAS": 32}


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



# ---- stacks of images, as the episodes and the search samplers take them ----

def transform_stack(transform, images: np.ndarray, indices: Sequence[int]) -> torch.Tensor:
    """``torch.stack([transform(images[i]) for i in indices])``, drawing from torch's global generator.

    A pipeline `pil_batch` can batch (transform A, TENAS, their test variants) runs on the whole stack at
    once: the same tensor bit for bit and the same draws (docs/benchmarks.md has the speed-ups).
    """
    if len(indices) == 0:
        raise DataError("no images to transform; ask for at least one image")
    fast = batched(transform) if isinstance(images, np.ndarray) else None
    if fast is not None:
        picked = images[np.asarray(indices, dtype=np.int64)]
        if fast.accepts(picked):
            return fast(picked)
    return torch.stack([transform(images[i]) for i in indices])


def apply_seeded(transform, images: np.ndarray, indices: Sequence[int], seed: int | None) -> torch.Tensor:
    """Transform images[indices] and stack (`transform_stack`); under a forked torch RNG seeded with
    ``seed`` when it is given."""
    if seed is None:
        return transform_stack(transform, images, indices)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform_stack(transform, images, indices)
