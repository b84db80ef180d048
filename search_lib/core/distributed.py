"""Several processes through `torch.distributed`, launched by ``torchrun`` (one GPU per process on CUDA).

A plain ``python prune_metantknas.py`` is a world of one process and never touches `torch.distributed`.
Under ``torchrun --nproc_per_node=N`` (or several nodes with a rendezvous endpoint) the environment names
the rank, the world size and the local rank; `init` joins the group: NCCL on CUDA (each process on
``cuda:LOCAL_RANK``), gloo on the CPU. Work is split by rank and the results are gathered on every rank
(`gather`), so every rank takes the same decisions; only rank 0 writes files and prints.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from search_lib.core.errors import UsageError
from search_lib.core.utils import use_device


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def shard(self, n: int) -> range:
        """The indices 0..n-1 this rank works on (every size-th, from its rank: balanced for any n)."""
        return range(self.rank, n, self.size)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def merge(self, n: int, local: list[Any]) -> list[Any]:
        """Reassemble items 0..n-1 computed as ``local`` for `shard(n)` on each rank, on every rank."""
        return self.interleave(n, self.gather(local)) if self.active else list(local)

    def interleave(self, n: int, parts: list[list[Any]]) -> list[Any]:
        """Items 0..n-1 from every rank's part (rank order, as `gather` gives them) of `shard(n)`."""
        merged: list[Any] = [None] * n
        for rank, part in enumerate(parts):
            for i, item in zip(range(rank, n, self.size), part):
                merged[i] = item
        return merged

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums of ``values`` over the ranks (e.g. loss totals and counts of an epoch)."""
        if not self.active:
            return [float(v) for v in values]
        return [float(sum(col)) for col in zip(*self.gather([float(v) for v in values]))]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def launched_size() -> int:
    """The number of processes the launcher started (torchrun's WORLD_SIZE; 1 without a launcher), known
    before `init` joins the group, so that settings can be checked against it first."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return launched_size() > 1


_WORLD = World()


def world() -> World:
    """The current process's world (a world of one unless `init` joined a group)."""
    return _WORLD


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (once per process); returns the world and this rank's device.

    On CUDA each rank takes ``cuda:LOCAL_RANK``; on the CPU the backend is gloo. Outside torchrun this is a
    world of one and ``device`` is returned as it is. Either way the CUDA device is made the current one
    (`search_lib.core.utils.use_device`).
    """
    global _WORLD
    if not launched():
        use_device(device)
        return _WORLD, device
    if not dist.is_initialized():
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise UsageError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s); start torchrun "
                                 f"with --nproc_per_node at most the number of GPUs")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _WORLD = World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", _WORLD.local_rank)
    if not _WORLD.is_main:  # one console: the other ranks only report errors
        logging.getLogger("metantknas").setLevel(logging.ERROR)
    return _WORLD, device
