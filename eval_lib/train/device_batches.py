"""Training batches made on the device (``--gpu_augment``): the partition's uint8 images held there, the
training transform applied per sample in batch by `search_lib.data.tensor_augment`."""

from __future__ import annotations

import numpy as np
import torch

from search_lib.core.errors import DataError
from search_lib.data.tensor_augment import DeviceAugment


class DeviceBatches:
    """``epoch(seed)`` gives the batches of one epoch (order and augmentations a function of ``seed``, so a
    resumed run repeats them); the last incomplete batch is dropped when there is more than one batch, as the
    training's DataLoader does. ``transform`` is the training pipeline (e.g. ``build_transform("A", True)``)."""

    def __init__(self, images, targets, device: torch.device, batch_size: int, transform, rank: int = 0,
                 world_size: int = 1):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"--gpu_augment needs uint8 images (N, H, W, 3), got {images.dtype} {images.shape}; "
                            f"use --gpu_augment false")
        self.device = torch.device(device)
        self.images = torch.tensor(images, device=self.device)  # a copy: the partition stays read-only
        self.targets = torch.tensor(np.asarray(targets, dtype=np.int64), device=self.device)
        self.batch_size = int(batch_size)  # the global batch: under torchrun each rank takes every size-th image
        self.rank, self.world_size = int(rank), int(world_size)
        self.augment = DeviceAugment(transform)

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if n > self.batch_size else 1

    def epoch(self, seed: int):
        n = self.images.shape[0]
        shape = tuple(self.images.shape[1:3])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).to(self.device)
        gen = torch.Generator(device=self.device).manual_seed((int(seed) + 1) % 2**63)
        mine = slice(self.rank, None, self.world_size)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            # the choices are drawn for the whole global batch, so a rank's images get exactly the
            # augmentations they get in a single process
            params = self.augment.sample(idx.shape[0], shape, gen)
            if self.world_size > 1:
                idx, params = idx[mine], params.select(mine)
            yield self.augment.apply(self.images[idx], params), self.targets[idx]
