"""The size of a pass: how many architectures one kernel pass takes (`PassSizer`), what a run learned of it
(`PassRecord`, ``passes.json`` in its folder), and the out-of-memory errors that halve a pass
(`is_out_of_memory`, `OUT_OF_MEMORY`).

Out of memory has several faces. torch's allocators raise ``torch.OutOfMemoryError`` (``CUDA out of memory.
Tried to allocate ...``) or, on the CPU, a RuntimeError (``DefaultCPUAllocator: can't allocate memory``); the
CUDA libraries report the same exhaustion in their own words when they cannot get memory for a handle or a
workspace (cuDNN's ``CUDNN_STATUS_ALLOC_FAILED``, cuBLAS's ``CUBLAS_STATUS_NOT_INITIALIZED`` from
``cublasCreate``, cuSOLVER's ``CUSOLVER_STATUS_ALLOC_FAILED``); `OUT_OF_MEMORY` lists them with a real message
of each (tests/test_memory.py checks every one). On Linux a process that exhausts the CPU's memory usually gets
no error at all: the kernel's OOM killer ends it with SIGKILL. Nothing in the process can react to that, so the
size of a pass is written to the run folder before a pass larger than any this process finished starts
(`PassRecord`); the next run finds it there and caps its passes at half of it instead of being killed again.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from search_lib.core.utils import atomic_write_json

log = logging.getLogger("metantknas.search")

# ---- out of memory -----------------------------------------------------------------------------------------

# (pattern in the lower-cased message, where it comes from, a real message of it)
OUT_OF_MEMORY = (
    ("out of memory", "torch's CUDA caching allocator",
     "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB "
     "is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. Of the allocated memory "
     "76.50 GiB is allocated by PyTorch, and 1.10 GiB is reserved by PyTorch but unallocated. If reserved but "
     "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
     "fragmentation.  See documentation for Memory Management  "
     "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"),
    ("out of memory", "the CUDA runtime (an allocation outside torch's allocator, a context)",
     "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call, so "
     "the stacktrace below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
     "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n"),
    ("out of memory", "the CUDA driver", "CUDA driver error: out of memory"),
    ("_status_alloc_failed", "cuDNN", "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    ("_status_alloc_failed", "cuBLAS", "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    ("cublas_status_not_initialized when calling `cublas", "cuBLAS without the memory to create its handle",
     "CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`"),
    ("_status_alloc_failed", "cuSOLVER (the eigen-solver of the condition numbers)",
     "cusolver error: CUSOLVER_STATUS_ALLOC_FAILED, when calling `cusolverDnCreate(handle)`. If you keep seeing "
     "this error, you may use `torch.backends.cuda.preferred_linalg_library()` to try linear algebra operators "
     "with other supported backends. See https://pytorch.org/docs/stable/backends.html#torch.backends.cuda."
     "preferred_linalg_library"),
    ("cufft_alloc_failed", "cuFFT", "cuFFT error: CUFFT_ALLOC_FAILED"),
    ("can't allocate memory", "torch's CPU allocator",
     "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
     "allocate 123456789 bytes. Error code 12 (Cannot allocate memory)"),
    ("not_enough_memory", "Windows' allocator", "[enforce fail at ..\\c10\\core\\impl\\alloc_cpu.cpp:81] data. "
     "DefaultCPUAllocator: not enough memory: you tried to allocate 123456789 bytes."),
    ("not enough memory", "Windows' allocator", "DefaultCPUAllocator: not enough memory"),
)
# Library messages that say "failed" but are no allocation failure (they stay errors): cuSOLVER or cuDNN failing
# on a bad matrix or kernel, cuBLAS failing inside a call rather than creating its handle.
NOT_OUT_OF_MEMORY = (
    "cusolver error: CUSOLVER_STATUS_EXECUTION_FAILED, when calling `cusolverDnXsyevd( handle, params, jobz, uplo, "
    "n, CUDA_R_64F, ...)`. This error may appear if the input matrix contains NaN.",
    "cuDNN error: CUDNN_STATUS_EXECUTION_FAILED",
    "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, n, k, &alpha, a, "
    "lda, b, ldb, &beta, c, ldc)`",
    "CUDA error: CUBLAS_STATUS_NOT_INITIALIZED",  # without the handle's creation: a broken installation
    "linalg.eigh: The algorithm failed to converge because the input matrix is ill-conditioned or has too many "
    "repeated eigenvalues (error code: 7).",
)
_OUT_OF_MEMORY = re.compile("|".join(re.escape(pattern) for pattern, _, _ in OUT_OF_MEMORY))
_GPU_WORDS = ("cuda", "cudnn", "cublas", "cusolver", "cufft", "gpu", "hip ")


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure in any of its faces (`OUT_OF_MEMORY`), or Python's MemoryError."""
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and _OUT_OF_MEMORY.search(str(exc).lower()) is not None


def on_gpu(exc: BaseException) -> bool:
    """Whether an out-of-memory error is the GPU's (its message names CUDA or one of its libraries)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or any(w in str(exc).lower() for w in _GPU_WORDS)


# ---- the size of a pass ----------------------------------------------------------------------------------

GREW_BYTES = 8 << 20  # a pass "raised" the measure when it peaked this much above its start (sampling noise)


class PassSizer:
    """How many items (architectures) a pass takes, so that its measured peak stays within a budget.

    A pass of k items is taken to peak at ``base + fixed + k x per_item``. ``base`` is the measure before
    the first pass (interpreter, libraries, data, networks). The first two passes probe with `PROBES`
    items: ``per_item`` is the difference of their peaks, ``fixed`` what the first pass needed beyond that
    (when noise makes the difference non-positive, the first pass is taken as all per-item cost). A pass
    that peaks above the prediction raises ``per_item`` to fit it; nothing lowers it. Every pass takes the
    most items whose predicted peak fits ``SAFETY x budget``, at most `GROWTH` times the largest pass
    measured so far (so a poor early estimate is corrected before it is trusted with a large pass) and at
    most ``cap``; at least one. An out-of-memory error halves the pass that failed, and caps every later one.
    Only a pass that raised the measure above where it started counts as peaking above the prediction (see
    `record`): on the CPU the resident set keeps what earlier, larger passes needed.
    """

    PROBES = (1, 2)
    SAFETY = 0.9  # room for what the measure misses: allocator slack, a peak between two samples
    GROWTH = 4

    def __init__(self, budget: int, cap: int, base: int):
        self.budget, self.cap, self.base = int(budget), max(1, int(cap)), int(base)
        self.fixed, self.per_item = 0.0, None
        self.largest = 0
        self.probes: list[tuple[int, int]] = []  # (items, peak) of the first passes

    def size(self) -> int:
        if self.per_item is None:
            return min(self.cap, self.PROBES[len(self.probes)])
        room = self.SAFETY * self.budget - self.base - self.fixed
        return int(max(1, min(self.cap, self.GROWTH * self.largest, room // self.per_item)))

    def predicted(self, k: int) -> float:
        return self.base + self.fixed + k * (self.per_item or 0.0)

    def record(self, k: int, peak: int, start: int | None = None) -> None:
        """A pass of ``k`` items peaked at ``peak`` bytes, from ``start`` bytes when it began. A pass that did not
        raise the measure above its start (it fit into memory the process kept from earlier passes: the CPU
        allocator does not return all it frees) says nothing about its own need, and raises nothing."""
        self.largest = max(self.largest, k)
        if self.per_item is None:
            self.probes.append((k, peak))
            if len(self.probes) < len(self.PROBES) and k < self.cap:
                return
            (k0, p0), (k1, p1) = self.probes[0], self.probes[-1]
            slope = (p1 - p0) / (k1 - k0) if k1 > k0 else 0.0
            if slope > 0:
                self.per_item, self.fixed = slope, max(0.0, p0 - self.base - slope * k0)
            else:
                self.per_item, self.fixed = max(1.0, (max(p0, p1) - self.base) / k0), 0.0
        grew = start is None or peak > start + GREW_BYTES
        if peak > self.predicted(k) and grew:
            self.per_item = max(1.0, (peak - self.base - self.fixed) / k)

    def failed(self, k: int) -> int:
        """The size after an out-of-memory error in a pass of ``k``: half of it, which caps every later pass."""
        self.cap = max(1, k // 2)
        return self.cap


    def state(self) -> dict:
        """What this sizer learned (kept by `PassRecord`): the cost of an item, the largest pass, the cap."""
        return {"per_item": self.per_item, "fixed": self.fixed, "largest": self.largest, "cap": self.cap}

    def restore(self, state: dict) -> None:
        """Start from what an earlier process learned (`state`): no probes, its largest pass, at most its cap."""
        try:
            per_item, fixed = state.get("per_item"), float(state.get("fixed") or 0.0)
            largest, cap = int(state.get("largest") or 0), int(state.get("cap") or self.cap)
        except (TypeError, ValueError):
            return
        if per_item is not None and float(per_item) > 0 and largest > 0:
            self.per_item, self.fixed, self.largest = float(per_item), max(0.0, fixed), largest
        self.cap = max(1, min(self.cap, cap))


PASSES_FILE = "passes.json"


class PassRecord:
    """What the kernel passes of a run learned, kept in its folder (``passes.json``) so that the next process
    on the folder starts from it: the sizer's `PassSizer.state` and ``running``, the size of a pass in
    progress. A pass larger than any this process finished is announced before it starts and cleared once it
    finished, so a process killed during it (the OOM killer's SIGKILL) leaves its size behind, and the re-run
    caps its passes at half of it. Passes no larger than one already finished write nothing."""

    def __init__(self, path: str | Path, device: torch.device):
        self.path, self.device = Path(path), device.type
        self.finished_size = 0  # the largest pass this process finished
        self.announced = False

    def restore(self, sizer: PassSizer) -> None:
        """Give ``sizer`` what the folder's earlier processes learned, half the size of a pass one died in."""
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return
        if not isinstance(saved, dict) or saved.get("device") != self.device:
            return  # another device's sizes say nothing here
        sizer.restore(saved.get("learned") or {})
        died = saved.get("running")
        if isinstance(died, int) and died > 0:
            sizer.cap = min(sizer.cap, max(1, died // 2))
            log.warning("the last run in this folder ended during a kernel pass of %d architectures (killed for "
                        "memory?); passes now take at most %d", died, sizer.cap)
            self._write(sizer, None)

    def starting(self, k: int, sizer: PassSizer) -> None:
        if k > self.finished_size:
            self._write(sizer, k)
            self.announced = True

    def finished(self, k: int, sizer: PassSizer) -> None:
        self.finished_size = max(self.finished_size, k)
        if self.announced:
            self._write(sizer, None)
            self.announced = False

    def failed(self, sizer: PassSizer) -> None:
        """A pass ran out of memory (and ``sizer`` halved it): keep the new cap."""
        self._write(sizer, None)
        self.announced = False

    def _write(self, sizer: PassSizer, running: int | None) -> None:
        atomic_write_json(self.path, {"device": self.device, "learned": sizer.state(), "running": running})
