"""Parameter count and multiply-accumulate count (MACs) of a network: via ptflops, and of its Conv/Linear layers
only (the count TE-NAS and NAS-Bench-201's tools report)."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math

import torch
from torch import nn

from search_lib.core.errors import UsageError

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


def conv_linear_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs of the Conv1d/Conv2d and Linear layers in one forward pass (eval mode) on one ``input_shape`` image.

    Per call: a conv's kernel size × in_channels/groups × out_channels per output position, a linear layer's
    in × out features per row, plus one per output value when the layer has a bias. BatchNorm, activations,
    pooling and additions are not counted (ptflops counts them, so `model_complexity`'s MACs are larger).
    The caller's model is left untouched (a CPU copy runs).
    """
    probe = copy.deepcopy(model).to("cpu").eval()
    total = 0

    def count(module: nn.Module, _inp, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            per_output = module.in_features
        else:
            per_output = math.prod(module.kernel_size) * module.in_channels // module.groups
        per_output += module.bias is not None
        total += per_output * out.numel()

    handles = [m.register_forward_hook(count) for m in probe.modules()
               if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        probe(torch.zeros(1, *(int(s) for s in input_shape)))
    for h in handles:
        h.remove()
    return int(total)


__all__ = ["BACKENDS", "conv_linear_macs", "count_parameters", "model_complexity"]
