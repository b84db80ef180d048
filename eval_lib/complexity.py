"""Parameter count and multiply-accumulate count (MACs) of a network, via ptflops."""

from __future__ import annotations

import contextlib
import copy
import io
import logging

import torch
from torch import nn

from search_lib.errors import UsageError

logger = logging.getLogger("metantknas.eval")

BACKENDS = ("pytorch", "aten")


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only))


def model_complexity(model: nn.Module, input_shape: tuple[int, ...], backend: str = "pytorch") -> dict:
    """``{"params": int, "macs": int | None}`` of one forward pass on a single ``input_shape`` (C, H, W) image.

    MACs are counted by ptflops with the chosen backend (``"pytorch"``: module hooks plus patched
    functionals; ``"aten"``: aten-operator counting). The model is copied to the CPU first, so the
    caller's model, its device and its train/eval mode are left untouched. When ptflops cannot count
    the model, ``macs`` is None and a warning is logged.
    """
    if backend not in BACKENDS:
        raise UsageError(f"unknown complexity backend {backend!r}; use one of {', '.join(BACKENDS)}")
    from ptflops import get_model_complexity_info

    params = count_parameters(model)
    probe = copy.deepcopy(model).to("cpu").eval()
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured), torch.no_grad():
        macs, _ = get_model_complexity_info(probe, tuple(int(s) for s in input_shape), as_strings=False,
                                            print_per_layer_stat=False, verbose=False, backend=backend,
                                            ost=captured)
    if macs is None:
        tail = captured.getvalue().strip().splitlines()
        logger.warning("MACs could not be counted (ptflops, backend %s): %s", backend,
                       tail[-1] if tail else "unknown reason")
    return {"params": params, "macs": None if macs is None else int(macs)}


__all__ = ["BACKENDS", "count_parameters", "model_complexity"]
