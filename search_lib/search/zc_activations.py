"""Activation-based zero-cost proxies (docs/method.md §9): naswot, swap, meco.

As in `search_lib.search.zc_gradients`, each function works on the network it is given (it adds hooks and runs it):
call them through `search_lib.search.zero_cost.ZERO_COST_PROXIES`. The network runs in the mode it comes in (the
study's is in train mode, as freshly built), as in the proxies' reference implementations.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from search_lib.search.linear_regions import count_distinct_codes


def _hooked(net: nn.Module, select, hook) -> list:
    return [m.register_forward_hook(hook) for m in net.modules() if select(m)]


def _remove(handles: list) -> None:
    for h in handles:
        h.remove()


def naswot(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """NASWOT (Mellor et al. 2021): log |det K| of the kernel of the batch's binary ReLU codes.

    Every ``nn.ReLU`` module's input is binarised (> 0) per image; each ReLU call adds
    K_ij += c_i·c_j + (1 − c_i)·(1 − c_j), the number of its units where images i and j agree. As in the
    reference, a ReLU counts only if the backward pass of Σ outputs reaches it (a ReLU whose output the
    network does not use, e.g. the preprocessing of a cell input no edge reads, adds nothing). Unlike the
    reference, which hooks every module whose class name contains "ReLU" and so counts containers such as
    ``ReLUConvBN`` a second time with their inner ReLU's code, each ``nn.ReLU`` counts once.
    """
    n = inputs.shape[0]
    kernels: dict[nn.Module, torch.Tensor] = {}
    reached: set[nn.Module] = set()

    def hook(module: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        code = (inp[0].detach() > 0).reshape(n, -1).to(torch.float64)
        k = code @ code.T + (1 - code) @ (1 - code).T
        kernels[module] = k if module not in kernels else kernels[module] + k
        if out.requires_grad:
            out.register_hook(lambda _grad: reached.add(module))

    handles = _hooked(net, lambda m: isinstance(m, nn.ReLU), hook)
    try:
        with torch.enable_grad():  # the input requires a gradient, as in the reference, so every ReLU can be reached
            out = net(inputs.detach().clone().requires_grad_(True))
            out.backward(torch.ones_like(out))
    finally:
        _remove(handles)
    total = np.zeros((n, n))
    for module, k in kernels.items():
        if module in reached:
            total += k.cpu().numpy()
    return float(np.linalg.slogdet(total)[1])


def swap(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """SWAP (Peng et al. 2024), unregularised: the number of distinct sample-wise activation patterns.

    One forward pass of the batch (no gradients); the outputs of every ``nn.ReLU`` call whose input is 4-D
    (a feature map) are flattened per image and concatenated, giving each neuron a pattern of signs over the
    images (active or not); the score is the number of distinct patterns among the neurons. The reference
    averages the score over re-initialisations of the network; here it is one evaluation of the network as
    given. NaN when the network has no such ReLU.
    """
    n = inputs.shape[0]
    outputs: list[torch.Tensor] = []

    def hook(module: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if inp[0].dim() == 4:
            outputs.append((out.detach() > 0).reshape(n, -1))

    handles = _hooked(net, lambda m: isinstance(m, nn.ReLU), hook)
    try:
        with torch.no_grad():
            net(inputs)
    finally:
        _remove(handles)
    if not outputs:
        return float("nan")
    return float(count_distinct_codes(torch.cat(outputs, dim=1).T))  # rows: each neuron's pattern over the images


def _min_eigenvalue_of_correlation(feature: torch.Tensor) -> float | None:
    """λ_min of the correlation matrix of the rows of ``feature`` (one row per channel), NaN/Inf entries set to 0."""
    rows = feature.detach().reshape(feature.shape[0], -1)
    if rows.shape[0] < 2:
        return None
    if rows.shape[1] < 2:  # one value per channel: every correlation undefined, set to 0
        return 0.0
    corr = torch.corrcoef(rows)
    corr[~torch.isfinite(corr)] = 0
    return float(torch.linalg.eigvalsh(corr)[0])


def meco(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """MeCo (Jiang et al. 2023): Σ over module calls of λ_min of the channel correlation of the first image.

    One forward pass of the batch's first image (MeCo's "one data"); every module's output is hooked, the
    network itself and containers included, as in the reference. For a module whose output's first element
    is a C×H×W feature map, the C×C correlation matrix of its channels (each flattened over positions;
    undefined entries, e.g. of a constant channel, set to 0) adds its smallest eigenvalue; other outputs
    (e.g. the logits, one value per channel) add 0 or nothing. Non-finite terms are left out. The matrix is
    symmetric, so ``eigvalsh`` gives its eigenvalues (the reference's general ``eig`` agrees up to rounding).
    """
    terms: list[float] = []

    def hook(module: nn.Module, inp: tuple, out) -> None:
        if isinstance(out, torch.Tensor):
            first = out[0] if out.dim() >= 1 else None
        else:
            first = out[0] if isinstance(out, (tuple, list)) and out else None
        if isinstance(first, torch.Tensor) and first.dim() >= 1:
            value = _min_eigenvalue_of_correlation(first)
            if value is not None:
                terms.append(value)

    handles = _hooked(net, lambda m: True, hook)
    try:
        with torch.no_grad():
            net(inputs[:1])
    finally:
        _remove(handles)
    return float(sum(t for t in terms if np.isfinite(t)))
