"""`--deterministic`: the same numbers from the same command on a GPU, not only on the CPU.

On by default for the search and the training (`run_session` applies it for the run's life): torch's
deterministic algorithms, warn-only so that an operation without a deterministic CUDA kernel warns once
instead of failing; cuDNN's deterministic kernels without autotuning (the fastest kernel of a benchmark can
differ from run to run); and cuBLAS's fixed workspace (CUBLAS_WORKSPACE_CONFIG), which cuBLAS reads when
CUDA starts, hence set before anything touches CUDA and only when the user has not set it. The CPU's numbers
do not change (the search's history is byte-identical with and without). ``--no-deterministic`` leaves
torch's defaults: faster kernels whose last bits may move from run to run.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"
FLAG_HELP = ("deterministic kernels on CUDA (torch's deterministic algorithms, warn-only; cuDNN without autotuning; "
             "cuBLAS's fixed workspace), recorded in provenance.json; --no-deterministic trades them for speed")
CUBLAS_WORKSPACE = ":4096:8"  # cuBLAS's deterministic workspace setting (its documentation's larger one)

logger = logging.getLogger("metantknas")


def settings() -> dict:
    """What this process runs with now (for the run's provenance record)."""
    return {"algorithms": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            CUBLAS_ENV: os.environ.get(CUBLAS_ENV)}


def _apply(deterministic: bool, algorithms: bool, warn_only: bool, cudnn_benchmark: bool) -> None:
    torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = cudnn_benchmark


@contextmanager
def deterministic_mode(enabled: bool) -> Iterator[dict]:
    """Deterministic settings (``enabled``) or torch's own for the block; the ones before it come back after
    (runs in one process, e.g. the tests, do not leak into each other). Yields `settings()`."""
    before = (bool(torch.backends.cudnn.deterministic), torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(), bool(torch.backends.cudnn.benchmark))
    if enabled:
        if not os.environ.get(CUBLAS_ENV, "").strip():
            if torch.cuda.is_initialized():  # cuBLAS read its workspace setting already: say so, do not fail
                logger.warning("CUDA started before --deterministic could set %s; set it in the environment "
                               "(%s=%s) for deterministic cuBLAS", CUBLAS_ENV, CUBLAS_ENV, CUBLAS_WORKSPACE)
            os.environ[CUBLAS_ENV] = CUBLAS_WORKSPACE
        _apply(True, True, True, False)
    try:
        with warnings.catch_warnings():
            # warn-only operations without a deterministic kernel: each says so once, not at every step
            warnings.filterwarnings("once", message=".*does not have a deterministic implementation.*")
            yield settings()
    finally:
        _apply(*before)
