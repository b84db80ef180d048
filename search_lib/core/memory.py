"""Memory: sizes with units (``--memory_budget``), the default budget, and the peak memory of a stretch of work.

What is measured
    CUDA: the bytes torch allocates on the device (``torch.cuda.max_memory_allocated``, reset at the
    start of each window). CPU: the process's resident set (RSS), read from ``/proc/self/statm`` by a
    thread every few milliseconds while a window is open, together with the kernel's lifetime high-water
    mark (``getrusage(RUSAGE_SELF).ru_maxrss``): when that mark rises during a window, the window's peak is
    exactly the new mark; when it does not (the window stayed below an earlier peak, such as data loading),
    the sampled maximum is used. The kernel's own high-water mark could be reset per window through
    ``/proc/self/clear_refs``, but that also lowers what ``/usr/bin/time``, a batch system or a parent's
    ``RUSAGE_CHILDREN`` later report as the process's peak; sampling leaves those true. The per-sample
    gradients that dominate a search pass live for the whole backward (tens of milliseconds or more), far
    longer than the sampling interval.

The budget
    ``--memory_budget`` bounds the peak of that measure for the whole process: on the CPU its resident set
    (the interpreter, torch, the data and the networks included), on CUDA the bytes torch allocates on the
    device. Default: on CUDA 80% of the device's memory still free for the process when the run starts
    (free memory and the process's own cached, unused blocks, `cuda_free`) plus what it has allocated already;
    on the CPU the smaller of 4 GiB and half of the available memory (``MemAvailable`` of /proc/meminfo, or
    what the process's memory cgroup still allows when that is less).
"""

from __future__ import annotations

import os
import re
import resource
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from search_lib.core.errors import UsageError

AUTO = "auto"
CPU_DEFAULT_CAP = 4 << 30  # the CPU default never exceeds 4 GiB: a laptop's share, whatever the box has
CUDA_FREE_SHARE = 0.8
CPU_AVAILABLE_SHARE = 0.5
SAMPLE_INTERVAL_S = 0.005

# SI and IEC units; single letters (k, m, g, t) are binary, as in docker and Slurm. Case does not matter.
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]+)\s*")


def parse_size(text: str | None, flag: str = "--memory_budget") -> int | None:
    """Bytes of a size with a unit (``8GB``, ``512MB``, ``1.5GiB``, ``700m``); None for ``auto`` or empty.

    A number without a unit is refused (bytes or gigabytes? the unit says), as is a size of zero.
    """
    if text is None or str(text).strip().lower() in ("", AUTO):
        return None
    match = _SIZE.fullmatch(str(text).lower())
    if not match or match.group(2) not in _UNITS:
        raise UsageError(f"{flag} {text!r} is not a size; give a number with a unit, e.g. 8GB, 512MB or 1.5GiB "
                         f"(or auto)")
    size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size <= 0:
        raise UsageError(f"{flag} {text!r} must be more than zero; give e.g. 512MB, or auto")
    return size


def format_size(size: float | None) -> str:
    """``3.21 GiB`` / ``512.0 MiB`` (binary units, as the budget's default is stated)."""
    if size is None:
        return "n/a"
    if abs(size) >= 1 << 30:
        return f"{size / (1 << 30):.2f} GiB"
    return f"{size / (1 << 20):.1f} MiB"


# ---- what there is -------------------------------------------------------------------------------------

def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text in ("", "max") else int(text) if text.isdigit() else None


def _stat_value(path: Path, *keys: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name in keys and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def cgroup_available(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What the process's memory cgroup still allows (limit - usage + reclaimable file cache); None without a
    limit. cgroup v2 (``memory.max``) and v1 (``memory.limit_in_bytes``), at the process's own cgroup path or,
    inside a container, at the mount's root."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2
            files = ("memory.max", "memory.current", ("inactive_file",))
            roots = [Path(root) / path.lstrip("/"), Path(root)]
        elif "memory" in controllers.split(","):  # v1
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", ("total_inactive_file", "inactive_file"))
            roots = [Path(root) / "memory" / path.lstrip("/"), Path(root) / "memory"]
        else:
            continue
        for root in roots:
            limit, usage = _read_int(root / files[0]), _read_int(root / files[1])
            if limit is None or usage is None:
                continue
            if limit >= 1 << 60:  # "no limit" in v1
                break
            free = max(0, limit - usage + _stat_value(root / "memory.stat", *files[2]))
            best = free if best is None else min(best, free)
            break
    return best


def available_memory() -> int | None:
    """Bytes this process could still get: MemAvailable, or the cgroup's remaining allowance when lower."""
    values = [v for v in (_meminfo_available(), cgroup_available()) if v is not None]
    return min(values) if values else None


def cuda_free(device: torch.device) -> int:
    """Bytes this process can still allocate on a CUDA device: the device's free memory plus the blocks
    torch's caching allocator holds for the process without using them. ``mem_get_info`` counts those
    cached blocks as used, so a process that has worked on the device before (the proxy study's second and
    third scorers, a training after its search) would otherwise see too little."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free) + max(0, int(torch.cuda.memory_reserved(device)) - int(torch.cuda.memory_allocated(device)))


def default_budget(device: torch.device) -> int:
    """The budget when ``--memory_budget`` is auto: see the module's docstring."""
    if device.type == "cuda":
        return int(CUDA_FREE_SHARE * cuda_free(device)) + torch.cuda.memory_allocated(device)
    available = available_memory()
    if available is None:
        return CPU_DEFAULT_CAP
    return int(min(CPU_DEFAULT_CAP, CPU_AVAILABLE_SHARE * available))


def resolve_budget(text: str | None, device: torch.device) -> int:
    """``--memory_budget`` in bytes (its default when auto)."""
    size = parse_size(text)
    return default_budget(device) if size is None else size


# ---- measuring -----------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int | None:
    """The process's resident set now, in bytes (None where /proc is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def lifetime_peak_rss() -> int:
    """The process's resident high-water mark (``ru_maxrss``: kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class Window:
    """The peak of one stretch of work (`MemoryMeter.window`): ``start`` and ``peak`` in bytes."""

    def __init__(self, start: int):
        self.start = self.peak = int(start)

    def seen(self, value: int | None) -> None:
        if value is not None and value > self.peak:
            self.peak = int(value)

    @property
    def increment(self) -> int:
        return self.peak - self.start


class MemoryMeter:
    """Peak memory of windows of work on one device (see the module's docstring for what is measured).

    ``with meter.window() as w: ...`` then ``w.peak``; windows may nest (a round around its passes). On the
    CPU a sampling thread runs while any window is open; `close()` stops it.
    """

    def __init__(self, device: torch.device, interval: float = SAMPLE_INTERVAL_S):
        self.device = device
        self.cuda = device.type == "cuda"
        self.interval = float(interval)
        self._open: list[Window] = []
        self._lock = threading.Lock()
        self._active = threading.Event()  # set while a window is open: the sampler sleeps otherwise
        self._thread: threading.Thread | None = None
        self._stop = False

    def now(self) -> int:
        """The measure now: allocated bytes (CUDA) or the resident set (CPU, 0 without /proc)."""
        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        return current_rss() or 0

    @contextmanager
    def window(self) -> Iterator[Window]:
        if self.cuda:
            # a reset would lose the outer windows' peak so far: hand it to them first
            self._see_all(int(torch.cuda.max_memory_allocated(self.device)))
            torch.cuda.reset_peak_memory_stats(self.device)
        win = Window(self.now())
        mark = None if self.cuda else lifetime_peak_rss()
        with self._lock:
            self._open.append(win)
            self._active.set()
        self._ensure_sampler()
        try:
            yield win
        finally:
            if self.cuda:
                self._see_all(int(torch.cuda.max_memory_allocated(self.device)))
            else:
                self._see_all(current_rss())
                final = lifetime_peak_rss()
                if final > mark:  # the lifetime mark rose inside this window: that is its exact peak
                    win.seen(final)
            with self._lock:
                self._open.remove(win)
                if not self._open:
                    self._active.clear()

    def _see_all(self, value: int | None) -> None:
        with self._lock:
            for win in self._open:
                win.seen(value)

    def _ensure_sampler(self) -> None:
        if self.cuda or self._thread is not None or current_rss() is None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._sample, name="metantknas-memory", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while True:
            self._active.wait()
            if self._stop:
                return
            self._see_all(current_rss())
            time.sleep(self.interval)

    def close(self) -> None:
        self._stop = True
        self._active.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None


def peak_memory_record(device: torch.device, window: Window | None = None) -> dict:
    """What results.json reports of a phase: the peak in bytes and what it measures."""
    if device.type == "cuda":
        peak = window.peak if window is not None else int(torch.cuda.max_memory_allocated(device))
        return {"peak_bytes": peak, "measure": "cuda_max_memory_allocated"}
    peak = window.peak if window is not None else lifetime_peak_rss()
    return {"peak_bytes": peak, "measure": "process_rss"}
