"""Gradient-based zero-cost proxies (docs/method.md §9): grad_norm, snip, grasp, fisher, jacob_cov, synflow, zico.

Each function computes one proxy on the network it is given and may change that network (gradients, BN
statistics, hooks, modes, even its weights for synflow): call them through
`search_lib.search.zero_cost.ZERO_COST_PROXIES`, which hands each one a deep copy and restores the random
state. They follow the conventions of the proxies' reference implementations (zero-cost-nas's measures and
``find_measures``, ZiCo's ``getzico``): the network in the mode it comes in (the study's is in train mode, as
freshly built), the mean cross-entropy over the whole batch, and per-layer scores over the weights of the
``nn.Conv2d`` and ``nn.Linear`` modules only (no biases, no normalisation parameters), summed to one number.
"""

from __future__ import annotations

import math
import types

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def weight_layers(net: nn.Module) -> list[nn.Module]:
    """The Conv2d and Linear modules of ``net`` in ``net.modules()`` order (each once): the scored layers."""
    return [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _backward_loss(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(inputs), targets).backward()


def grad_norm(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Σ over Conv2d/Linear layers of ‖∂L/∂W‖₂ (Frobenius norm of the weight gradient), L the mean cross-entropy."""
    _backward_loss(net, inputs, targets)
    return sum(float(m.weight.grad.norm()) for m in weight_layers(net) if m.weight.grad is not None)


def snip(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """SNIP (Lee et al. 2019): Σ |W ⊙ ∂L/∂W| over Conv2d/Linear weights.

    The reference differentiates L with respect to a multiplicative all-ones mask on each weight; that
    gradient is W ⊙ ∂L/∂W exactly (the masked weight equals W), so the plain weight gradient gives it.
    """
    _backward_loss(net, inputs, targets)
    return _weight_saliency(net)


def _weight_saliency(net: nn.Module) -> float:
    """Σ |W ⊙ ∂/∂W| over the Conv2d/Linear weights, from the gradients the last backward left (snip, synflow)."""
    return sum(float((m.weight.detach() * m.weight.grad).abs().sum()) for m in weight_layers(net)
               if m.weight.grad is not None)


def grasp(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """GraSP (Wang et al. 2020) as zero-cost-nas scores it: Σ −W ⊙ (H g) over Conv2d/Linear weights, signed.

    g = ∂L/∂W from one pass (held fixed), H g = ∂(g · ∂L/∂W)/∂W from a second pass (a Hessian-vector product).
    """
    weights = [m.weight for m in weight_layers(net)]
    net.zero_grad(set_to_none=True)
    g = torch.autograd.grad(F.cross_entropy(net(inputs), targets), weights, allow_unused=True)
    grads = torch.autograd.grad(F.cross_entropy(net(inputs), targets), weights, create_graph=True, allow_unused=True)
    used = [i for i, gi in enumerate(g) if gi is not None]
    if not used:
        return 0.0
    z = sum((g[i].detach() * grads[i]).sum() for i in used)
    hg = torch.autograd.grad(z, [weights[i] for i in used], allow_unused=True)
    return sum(float(-(weights[i].detach() * h).sum()) for i, h in zip(used, hg) if h is not None)


def fisher(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Fisher (Theis et al. 2018; Turner et al. 2020) per output channel, as zero-cost-nas computes and sums it.

    For each Conv2d/Linear output a (train mode) with gradient ∂L/∂a, channel k scores
    F_k = ½ · mean over samples of (Σ over positions of a·∂L/∂a)². The reference spreads each channel's
    score over that channel's weights before summing, so a layer contributes Σ_k F_k × (weights per output
    channel: in_channels/groups × kernel area for a conv, in_features for a linear layer).
    """
    net.train()
    scores: dict[nn.Module, torch.Tensor] = {}

    def on_output(layer: nn.Module, out: torch.Tensor) -> None:
        act = out.detach()

        def on_grad(grad: torch.Tensor) -> None:
            g_nk = act * grad.detach()
            if act.dim() > 2:
                g_nk = g_nk.sum(dim=tuple(range(2, act.dim())))
            value = g_nk.pow(2).mean(0).mul(0.5)
            scores[layer] = value if layer not in scores else scores[layer] + value

        out.register_hook(on_grad)

    layers = weight_layers(net)
    hooks = [m.register_forward_hook(lambda mod, _inp, out: on_output(mod, out)) for m in layers]
    try:
        _backward_loss(net, inputs, targets)
    finally:
        for h in hooks:
            h.remove()
    return sum(float(scores[m].abs().sum()) * math.prod(m.weight.shape[1:]) for m in layers if m in scores)


def jacob_cov(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Jacobian covariance (Mellor et al. 2021, v1), as zero-cost-nas computes it.

    J = ∂(Σ outputs)/∂x per input image; with the eigenvalues λ of the correlation matrix of the rows of J
    (one per image) and k = 1e-5, the score is −Σ (log(λ + k) + 1/(λ + k)). NaN where the correlation is
    undefined (an image with a constant Jacobian). The matrix is symmetric, so its eigenvalues come from
    ``eigvalsh`` (the reference's general ``eig`` returns the same values up to rounding).
    """
    x = inputs.detach().clone().requires_grad_(True)
    net.zero_grad(set_to_none=True)
    y = net(x)
    y.backward(torch.ones_like(y))
    jac = x.grad.detach().reshape(x.shape[0], -1).cpu().numpy()
    with np.errstate(all="ignore"):
        corr = np.corrcoef(jac)
        if not np.all(np.isfinite(corr)):
            return float("nan")
        v = np.linalg.eigvalsh(corr)
        k = 1e-5
        return float(-np.sum(np.log(v + k) + 1.0 / (v + k)))


def _identity_forward(self, x):
    return x


def synflow(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """SynFlow (Tanaka et al. 2020) as zero-cost-nas's ``synflow`` measure computes it.

    Every BatchNorm1d/2d is made the identity (its forward is replaced: the reference's ``bn=False``), every
    parameter and buffer is replaced by its absolute value, the network is cast to float64 and fed one
    all-ones image (``ones(1, *image shape)``); with R = Σ of its outputs the score is Σ |W ⊙ ∂R/∂W| over
    the Conv2d/Linear weights. Data-free: ``inputs`` gives only the image shape and device, ``targets`` is unused.
    """
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.forward = types.MethodType(_identity_forward, m)
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    net.double()
    net.zero_grad(set_to_none=True)
    out = net(torch.ones(1, *inputs.shape[1:], dtype=torch.float64, device=inputs.device))
    out.sum().backward()
    return _weight_saliency(net)


def zico(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """ZiCo (Li et al. 2023): Σ over Conv2d/Linear layers of log Σ_θ mean|g_θ| / std(g_θ).

    g_θ is the gradient of the mean cross-entropy of each half of the batch (the reference's two batches;
    train mode, gradients cleared between them); mean and (population) standard deviation are over the two
    halves, and the inner sum runs over the weights whose deviation is not zero (a layer whose sum is 0 adds
    nothing). The statistics are taken with numpy in the gradients' precision (float32 for the study's
    networks), as the reference does: the ratio is sensitive to rounding where the two halves nearly agree.
    """
    net.train()
    n = inputs.shape[0]
    layers = weight_layers(net)
    grads: list[list[np.ndarray]] = [[] for _ in layers]
    for start, stop in ((0, n // 2), (n // 2, n)):
        _backward_loss(net, inputs[start:stop], targets[start:stop])
        for per_layer, m in zip(grads, layers):
            g = m.weight.grad
            per_layer.append(torch.zeros(m.weight.numel(), dtype=m.weight.dtype).numpy() if g is None
                             else g.detach().cpu().reshape(-1).numpy())
    score = 0.0
    for per_layer in grads:
        g = np.stack(per_layer)
        std = np.std(g, axis=0)
        nonzero = np.nonzero(std)[0]
        total = np.sum(np.mean(np.abs(g), axis=0)[nonzero] / std[nonzero])
        if total != 0:
            score += float(np.log(total))
    return score
