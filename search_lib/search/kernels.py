"""Kernels that score architectures: the empirical NTK, the analytical MetaNTK, condition numbers.

Per-sample gradients come from Opacus 1.x (`GradSampleModule`, with ``loss_reduction="sum"`` on the
summed logits, which yields the raw per-sample gradients; convolutions with a grouped-convolution
sampler, `conv2d_grad_sample`). The NTK is accumulated layer by layer as
sum_l G_l G_l^T in float64 (G_l = per-sample gradients of layer l, flattened), so the full Jacobian is
never materialised.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample

from search_lib.core.pass_sizing import is_out_of_memory

log = logging.getLogger("metantknas.kernels")

KAPPA_SENTINEL = 100000.0  # condition number reported for a singular / non-finite kernel (as the original)
INFINITE_TIME = 1000.0  # inner_lr_time >= this is treated as infinite training time
PARAMS_TYPES = ("w", "wb")


@contextmanager
def full_float32() -> Iterator[None]:
    """Float32 convolutions and matrix products in full float32 on CUDA while inside: TF32 off for cuDNN's
    convolutions and cuBLAS's products, the settings before restored on exit.

    With the defaults of recent PyTorch, cuDNN convolutions of float32 tensors run in TF32 (a 10-bit
    mantissa) on Ampere and later GPUs, the per-sample weight gradients of the kernels included. That moves
    κ by 0.7-2.1% (emulated for a C=8, 5-cell MetaNTK supernet) where neighbouring candidates' Δκ differ in
    the third decimal, so a GPU would rank candidates differently from the CPU and from run to run. The
    flags change nothing on the CPU. Recent PyTorch versions have per-operation precision settings
    (``fp32_precision``; reading the older ``allow_tf32`` flags fails once those differ between operations),
    older ones the ``allow_tf32`` flags only.
    """
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    if cudnn_conv is not None and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        saved = (torch.backends.cuda.matmul.fp32_precision, cudnn_conv.fp32_precision)
        torch.backends.cuda.matmul.fp32_precision = cudnn_conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            torch.backends.cuda.matmul.fp32_precision, cudnn_conv.fp32_precision = saved
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def kernel_parameters(model: nn.Module, params_types: str = "w") -> list[nn.Parameter]:
    """Weights (and with "wb" biases) of every Conv and Linear layer; norm-layer parameters excluded."""
    if params_types not in PARAMS_TYPES:
        raise ValueError(f"params_types must be one of {PARAMS_TYPES}, got {params_types!r}")
    params = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            params.append(m.weight)
            if params_types == "wb" and m.bias is not None:
                params.append(m.bias)
    return params


def conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a Conv2d as the weight gradient of one grouped convolution.

    With sample i's input channels and output gradients as group i (groups = batch x the layer's groups),
    the weight gradient of that convolution is the stack of the per-sample weight gradients: the same
    numbers as Opacus's unfold-and-multiply (tests/test_kernels.py checks it against Opacus's sampler, and
    the kernels built from it against torch.func Jacobians), without
    materialising the unfolded input; 2.5-9x faster for 3x3 kernels on the CPU. 1x1 kernels, where Opacus
    needs no unfolding, and unusual paddings stay with Opacus.
    """
    if layer.kernel_size == (1, 1) or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return compute_conv_grad_sample(layer, activations, backprops)
    x, n = activations[0], backprops.shape[0]
    out = {}
    if layer.weight.requires_grad:
        w = layer.weight.detach()
        _, grad_w, _ = torch.ops.aten.convolution_backward(
            backprops.reshape(1, n * layer.out_channels, *backprops.shape[2:]),
            x.reshape(1, n * layer.in_channels, *x.shape[2:]), w.repeat(n, 1, 1, 1), None, list(layer.stride),
            list(layer.padding), list(layer.dilation), False, [0, 0], n * layer.groups, [False, True, False])
        out[layer.weight] = grad_w.view(n, *w.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=(2, 3))
    return out


class _KernelGradSampleModule(GradSampleModule):
    """Opacus's GradSampleModule with the grouped-convolution per-sample gradient of Conv2d (its own table of
    grad samplers: Opacus's global registry is left as it is)."""

    GRAD_SAMPLERS = {**GradSampleModule.GRAD_SAMPLERS, nn.Conv2d: conv2d_grad_sample}


@contextmanager
def per_sample_gradients(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[GradSampleModule]:
    """Attach Opacus to `model` for the parameters `params` only; detach everything on exit.

    Other parameters (norm layers, unused classifiers) get ``requires_grad=False`` while attached, so
    Opacus neither hooks nor computes them. On exit the hooks, the ``grad_sample`` attributes and the
    ``.grad`` left by backward are removed and ``requires_grad`` is restored: the model can be scored
    again or trained as if nothing happened.
    """
    wanted = {id(p) for p in params}
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    # Opacus records a layer's activations only in training mode; a conv or linear layer computes the same
    # either way, so the layers that own kernel parameters are switched to training mode while attached
    # (normalisation layers keep their mode: that is what --bn_mode chooses).
    owners = [m for m in model.modules() if any(id(p) in wanted for p in m.parameters(recurse=False))]
    modes = [(m, m.training) for m in owners]
    for m in owners:
        m.training = True
    gsm = _KernelGradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    try:
        yield gsm
    finally:
        for m, mode in modes:
            m.training = mode
        gsm._close()  # removes hooks and every attribute Opacus put on the parameters
        for m in model.modules():  # and what its hooks put on the modules (a failed pass leaves both behind)
            for attr in ("activations", "max_batch_len"):
                if hasattr(m, attr):
                    delattr(m, attr)
        for p, req, grad in saved:
            p.requires_grad_(req)
            p.grad = grad


def _logits(out) -> torch.Tensor:
    return out[-1] if isinstance(out, (tuple, list)) else out


def _backward_per_sample(gsm: GradSampleModule, inputs: torch.Tensor) -> None:
    """One forward/backward of sum(logits); leaves each hooked parameter's ``grad_sample``.

    The backward asks autograd for the gradient of the input images only: every layer's output gradient
    (what Opacus's hooks turn into per-sample gradients) is on that path, while the summed weight gradients
    are not, so autograd skips them (about a third of a plain backward's work, never used here).
    """
    _clear_grads(gsm)
    x = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        torch.autograd.grad(_logits(gsm(x)).sum(), x)


def _clear_grads(gsm: GradSampleModule) -> None:
    for p in gsm._module.parameters():
        p.grad = None
        if hasattr(p, "grad_sample"):
            p.grad_sample = None


def gram_by_group(gsm: GradSampleModule, inputs: torch.Tensor,
                  groups: dict[str, Sequence[nn.Parameter]]) -> dict[str, torch.Tensor]:
    """One forward/backward of sum(logits); returns {group: sum over its params of G G^T} (float64, n x n).

    A parameter whose module did not run (a pruned op) contributes nothing. This is the reference path:
    one architecture per pass (`gram_blocks` scores several).
    """
    _backward_per_sample(gsm, inputs)
    n = inputs.shape[0]
    grams = {}
    for name, params in groups.items():
        K = torch.zeros(n, n, dtype=torch.float64, device=inputs.device)
        for p in params:
            g = getattr(p, "grad_sample", None)
            if g is None:
                continue
            K += block_grams(g.reshape(1, n, -1))[0].to(torch.float64)  # in the gradients' dtype, summed in float64
        grams[name] = K
    _clear_grads(gsm)
    return grams


def block_grams(g: torch.Tensor) -> torch.Tensor:
    """G_b G_b^T of every block of ``g`` (B, m, P): (B, m, m) in g's dtype, as one batched product.

    The numbers of a block do not depend on the other blocks, on how many there are or on the thread count
    (measured on the CPU: bit-identical for 2 to 64 blocks and for 1 and 2 threads), so a candidate's κ is the
    same whatever pass it is scored in. A plain matrix product, or a batched one of a single matrix (which
    dispatches to it), rounds differently and splits its sums over the threads: a single block is multiplied
    as two copies instead.
    """
    if g.shape[0] == 1:
        return torch.bmm(g.repeat(2, 1, 1), g.repeat(2, 1, 1).transpose(1, 2))[:1]
    return torch.bmm(g, g.transpose(1, 2))


def gram_blocks(gsm: GradSampleModule, inputs: torch.Tensor, groups: dict[str, Sequence[nn.Parameter]],
                n_blocks: int) -> dict[str, torch.Tensor]:
    """The diagonal blocks of the Gram matrix of a batch made of ``n_blocks`` equal, consecutive groups of
    samples: {group: (n_blocks, m, m) float64}, m = len(inputs) / n_blocks.

    With one architecture per group of samples (`Supernet.set_candidates`) block b is exactly that
    architecture's kernel (the same as `gram_by_group` on its m samples alone, up to rounding); the
    cross-architecture blocks are never formed.
    """
    _backward_per_sample(gsm, inputs)
    m = inputs.shape[0] // n_blocks
    grams = {}
    for name, params in groups.items():
        K = torch.zeros(n_blocks, m, m, dtype=torch.float64, device=inputs.device)
        for p in params:
            g = getattr(p, "grad_sample", None)
            if g is None:
                continue
            K += block_grams(g.reshape(n_blocks, m, -1)).to(torch.float64)
        grams[name] = K
    _clear_grads(gsm)
    return grams


def empirical_ntk(model: nn.Module, inputs: torch.Tensor, params_types: str = "w") -> torch.Tensor:
    """Empirical NTK (n x n, float64): Gram matrix of per-sample gradients of the sum of the logits.

    If the model returns a tuple its last element is taken as the logits. Gradients are over the
    weights ("w") or weights and biases ("wb") of every Conv and Linear layer. The model must not hold
    BatchNorm (replace it first, see `search_lib.models.supernet.replace_norm`).
    """
    params = kernel_parameters(model, params_types)
    with per_sample_gradients(model, params) as gsm:
        return gram_by_group(gsm, inputs, {"all": params})["all"]


def seeded_linear(in_features: int, out_features: int, seed: int) -> nn.Linear:
    """nn.Linear with PyTorch's default init drawn from a private seeded stream (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(in_features, out_features)


class MetaNTKModel(nn.Module):
    """Backbone's pooled features (its first output) followed by a fresh linear head."""

    def __init__(self, backbone: nn.Module, feature_dim: int, n_ways: int, seed: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, n_ways) if seed is None else seeded_linear(feature_dim, n_ways, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone(x)
        return self.head(out[0] if isinstance(out, (tuple, list)) else out)


def metantk_kernel_groups(model: MetaNTKModel, params_types: str = "w") -> dict[str, list[nn.Parameter]]:
    """Parameter groups of the MetaNTK pass: all (backbone's used layers + head) and the head alone.

    The backbone's own classifier is not part of the meta-model's output, so it is left out.
    """
    head = kernel_parameters(model.head, params_types)
    unused = {id(p) for p in getattr(model.backbone, "classifier", nn.Identity()).parameters()}
    backbone = [p for p in kernel_parameters(model.backbone, params_types) if id(p) not in unused]
    return {"theta": backbone + head, "head": head}


def metantk_kernels(model: MetaNTKModel, inputs: torch.Tensor, params_types: str = "w"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Θ (backbone + head NTK) and the head-only kernel from one per-sample-gradient pass."""
    groups = metantk_kernel_groups(model, params_types)
    with per_sample_gradients(model, groups["theta"]) as gsm:
        grams = gram_by_group(gsm, inputs, groups)
    return grams["theta"], grams["head"]


def _t_operator(K_ss: torch.Tensor, inner_lr_time: float, reg_coef: float) -> torch.Tensor:
    """T(K) = (K + λI)^+ (I - exp(-τK)); τ >= 1000 means τ = ∞ (the exponential vanishes)."""
    eye = torch.eye(K_ss.shape[0], dtype=K_ss.dtype, device=K_ss.device)
    inv = torch.linalg.pinv(K_ss + reg_coef * eye, hermitian=True)
    if inner_lr_time >= INFINITE_TIME or math.isinf(inner_lr_time):
        return inv
    return inv @ (eye - torch.linalg.matrix_exp(-inner_lr_time * K_ss))


def analytical_metantk(ntk: torch.Tensor, k: torch.Tensor, n_tasks: int, n_queries: int, n_support: int,
                       inner_lr_time: float = math.inf, reg_coef: float = 1e-3) -> torch.Tensor:
    """The analytical MetaNTK Φ, (n_tasks*n_queries)^2, float64 (docs/method.md §2).

    `ntk` (Θ) and `k` are kernels over samples ordered queries first (task-major), then supports
    (task-major); `n_queries` / `n_support` are per task. `k` is Θ itself for MAML and the head-only
    kernel for ANIL. Φ_ij = Θ(q_i,q_j) - A_i Θ(s_i,q_j) - Θ(q_i,s_j) A_j^T + A_i Θ(s_i,s_j) A_j^T with
    A_i = K(q_i,s_i) T(K(s_i,s_i)).
    """
    ntk = ntk.to(torch.float64)
    k = k.to(torch.float64)
    nq, ns = n_tasks * n_queries, n_tasks * n_support
    if ntk.shape != (nq + ns, nq + ns) or k.shape != ntk.shape:
        raise ValueError(f"kernels must be {(nq + ns, nq + ns)} for {n_tasks} tasks x ({n_queries} queries + "
                         f"{n_support} supports), got {tuple(ntk.shape)} and {tuple(k.shape)}")
    A = torch.zeros(nq, ns, dtype=torch.float64, device=ntk.device)  # block-diagonal over tasks
    for i in range(n_tasks):
        q = slice(i * n_queries, (i + 1) * n_queries)
        s = slice(nq + i * n_support, nq + (i + 1) * n_support)
        A[q, s.start - nq:s.stop - nq] = k[q, s] @ _t_operator(k[s, s], inner_lr_time, reg_coef)
    t_qq, t_qs, t_ss = ntk[:nq, :nq], ntk[:nq, nq:], ntk[nq:, nq:]
    phi = t_qq - A @ t_qs.T - t_qs @ A.T + A @ t_ss @ A.T
    return (phi + phi.T) / 2  # exact symmetry (rounding only)


def condition_number(K: torch.Tensor, context: str = "") -> float:
    """λ_max / λ_min of a symmetric kernel (float64 eigvalsh).

    A kernel with NaN/Inf entries, or whose smallest eigenvalue is not positive and finite, gets
    `KAPPA_SENTINEL` (100000, the original's value) and a logged warning, never an exception.
    """
    K = K.detach().to(torch.float64)
    where = f" ({context})" if context else ""
    if not torch.isfinite(K).all():
        log.warning("kernel has NaN/Inf entries%s; condition number set to %g", where, KAPPA_SENTINEL)
        return KAPPA_SENTINEL
    try:
        eig = torch.linalg.eigvalsh((K + K.T) / 2)
    except RuntimeError as exc:  # the eigen-solver failed to converge
        if is_out_of_memory(exc):  # cuSOLVER without memory for its handle or workspace: not a score, halve the pass
            raise
        log.warning("eigen-solver failed%s (%s); condition number set to %g", where, exc, KAPPA_SENTINEL)
        return KAPPA_SENTINEL
    lo, hi = eig[0].item(), eig[-1].item()
    kappa = hi / lo if lo > 0 else math.nan
    if not math.isfinite(kappa) or lo <= 0:
        log.warning("kernel is singular%s (λ_min=%.3g, λ_max=%.3g); condition number set to %g",
                    where, lo, hi, KAPPA_SENTINEL)
        return KAPPA_SENTINEL
    return kappa


__all__ = ["full_float32", "empirical_ntk", "analytical_metantk", "condition_number", "metantk_kernels", "MetaNTKModel",
           "kernel_parameters", "per_sample_gradients", "gram_by_group", "gram_blocks", "KAPPA_SENTINEL"]
