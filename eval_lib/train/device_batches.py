"""Training batches made on the device (``--gpu_augment``): the partition's uint8 images held there, the
training transform applied per sample in batch by `search_lib.data.tensor_augment`.

By default (CUDA, transform A) the images go to the GPU only where they take at most `GPU_AUGMENT_SHARE` of
the memory free to the process (`gpu_augment_fits`): tieredImageNet's 448,695 training images at 84x84 are
about 9.5 GB, more than a 16 GB card can add to a training; miniImageNet's 38,400 are 0.8 GB. Every process
of a torchrun training holds its own copy on its own GPU, so they all decide together.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from eval_lib.train.train_config import TrainConfig
from search_lib.core.distributed import World
from search_lib.core.errors import DataError, RunFailure, UsageError
from search_lib.core.memory import cuda_free, format_size
from search_lib.core.pass_sizing import is_out_of_memory
from search_lib.data.tensor_augment import DeviceAugment

logger = logging.getLogger("metantknas.eval")

GPU_AUGMENT_SHARE = 0.25  # of the GPU memory free to the process: the rest is the training's


def gpu_augment_fits(nbytes: int, device: torch.device) -> bool:
    """True when ``nbytes`` of images take at most `GPU_AUGMENT_SHARE` of the memory free to the process on
    ``device`` (`search_lib.core.memory.cuda_free`: the process's own cached blocks count as free)."""
    return nbytes <= GPU_AUGMENT_SHARE * cuda_free(device)


def use_gpu_augment(cfg: TrainConfig, images, device: torch.device, world: World) -> bool:
    """Whether the training's batches are made on the device: ``--gpu_augment`` when given (transform A only);
    by default on CUDA with transform A where every process's GPU has room for the images
    (`gpu_augment_fits`), else off with one log line."""
    if not cfg.use_gpu_augment(device.type):
        return False
    if cfg.normalised()["transform"] != "A":
        raise UsageError("--gpu_augment implements transform A only; use --gpu_augment false or --transform A")
    if cfg.gpu_augment is not None or device.type != "cuda":
        return True
    nbytes = int(np.asarray(images).nbytes)
    fits = all(world.gather(gpu_augment_fits(nbytes, device)))  # one decision: the batches of every rank agree
    if not fits:
        logger.info("--gpu_augment off: the %s of training images would take more than %d%% of the free GPU "
                    "memory (%s); the loader augments them (--gpu_augment true forces it)", format_size(nbytes),
                    round(100 * GPU_AUGMENT_SHARE), format_size(cuda_free(device)))
    return fits


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
        try:
            self.images = torch.tensor(images, device=self.device)  # a copy: the partition stays read-only
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            raise RunFailure(f"the {format_size(images.nbytes)} of training images do not fit on {self.device} "
                             f"for --gpu_augment; use --gpu_augment false") from exc
        self.targets = torch.tensor(np.asarray(targets, dtype=np.int64), device=self.device)
        self.nbytes = int(self.images.nbytes + self.targets.nbytes)
        if self.device.type == "cuda":
            logger.info("--gpu_augment: the training images (%s) are held on %s", format_size(self.nbytes),
                        self.device)
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
