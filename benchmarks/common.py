"""Timing helpers shared by the benchmarks: device synchronisation and peak memory."""

from __future__ import annotations

import resource

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock interval measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the allocator's peak; CPU: the process's maximum resident set size (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
