"""Kernels (search_lib/search/kernels.py): empirical NTK, analytical MetaNTK, condition numbers (docs/method.md §2, §8).

Every kernel is compared with an independent computation: per-sample Jacobians from a plain
`torch.autograd.grad` loop (one sample at a time) or `torch.func.vmap(jacrev)`, and the MetaNTK
with Φ = M Mᵀ, M_i = J(Xq_i) − A_i J(Xs_i), with the matrix exponential from scipy.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn

from search_lib.models.genotypes import PRESETS, alphas_from_genotype
from search_lib.models.space import DEFAULT_SPACE
from search_lib.models.supernet import Supernet, init_weights, replace_norm
from search_lib.search.kernels import (
    KAPPA_SENTINEL,
    MetaNTKModel,
    analytical_metantk,
    condition_number,
    empirical_ntk,
    kernel_parameters,
    metantk_kernels,
    per_sample_gradients,
)

# ---------------------------------------------------------------------------------------------------
# Independent per-sample Jacobians


def ref_params(model: nn.Module, params_types: str) -> list[nn.Parameter]:
    """docs/method.md §2: weights (and biases with wb) of every Conv and Linear; no norm parameters."""
    out = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            out.append(m.weight)
            if params_types == "wb" and m.bias is not None:
                out.append(m.bias)
    return out


def logits_of(out):
    return out[-1] if isinstance(out, (tuple, list)) else out


def jacobian_loop(model: nn.Module, x: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    """Rows J_i = d(sum of logits of sample i, run alone) / d params, by a plain autograd loop."""
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    rows = []
    for i in range(x.shape[0]):
        out = logits_of(model(x[i:i + 1])).sum()
        grads = torch.autograd.grad(out, params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(grads, params)]))
    for p, s in zip(params, saved):
        p.requires_grad_(s)
    return torch.stack(rows).to(torch.float64)


def jacobian_vmap(model: nn.Module, x: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    """The same rows with torch.func.vmap(jacrev) over a functional call."""
    from torch.func import functional_call, jacrev, vmap

    names = {id(p): n for n, p in model.named_parameters()}
    wanted = {names[id(p)]: p.detach() for p in params}
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in wanted}
    rest.update(dict(model.named_buffers()))

    def f(w, xi):
        return logits_of(functional_call(model, {**rest, **w}, (xi.unsqueeze(0),))).sum()

    jac = vmap(jacrev(f), in_dims=(None, 0))(wanted, x)
    return torch.cat([jac[names[id(p)]].reshape(x.shape[0], -1) for p in params], dim=1).to(torch.float64)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def small_supernet(seed: int = 0, C: int = 4, pruned: bool = False, num_classes: int = 5) -> Supernet:
    torch.manual_seed(seed)
    net = replace_norm(Supernet(C=C, layers=5, num_classes=num_classes), "groupnorm16").double()
    init_weights(net, "fan_out", seed=seed)
    if pruned:
        net.set_alphas(*alphas_from_genotype(PRESETS["tiered-5cell-1"], DEFAULT_SPACE))
    return net


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------
# Empirical NTK


@pytest.fixture(scope="module")
def base(images):
    """The small supernet, its kernels, and per-parameter Jacobian blocks (conv/linear weights and biases,
    norm parameters) from one independent autograd loop."""
    net = small_supernet()
    norm_params = [p for m in net.modules() if isinstance(m, nn.GroupNorm) for p in m.parameters()]
    params = ref_params(net, "wb") + norm_params
    J = jacobian_loop(net, images, params)
    blocks, start = {}, 0
    for p in params:
        blocks[id(p)] = J[:, start:start + p.numel()]
        start += p.numel()
    K = {pt: empirical_ntk(net, images, pt) for pt in ("w", "wb")}
    return dict(net=net, blocks=blocks, norm_params=norm_params, K=K)


def gram_of(base, params) -> torch.Tensor:
    J = torch.cat([base["blocks"][id(p)] for p in params], dim=1)
    return J @ J.T


def test_network_has_the_layers_the_check_needs(base):
    net = base["net"]
    mods = list(net.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in mods)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in mods)
    assert any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in mods)  # depthwise
    assert any(type(m).__name__ == "FactorizedReduce" for m in mods)
    assert isinstance(net.classifier, nn.Linear)


@pytest.mark.parametrize("params_types", ["w", "wb"])
def test_empirical_ntk_equals_jacobian_gram_loop(base, params_types):
    K = base["K"][params_types]
    assert K.shape == (6, 6) and K.dtype == torch.float64
    assert rel_err(K, gram_of(base, ref_params(base["net"], params_types))) < 1e-4


def test_params_types_and_norm_exclusion_matter(base):
    """The reference Grams with and without biases / norm parameters differ, so the checks above can fail."""
    net = base["net"]
    assert rel_err(base["K"]["wb"], gram_of(base, ref_params(net, "w"))) > 1e-6
    assert rel_err(base["K"]["wb"], gram_of(base, ref_params(net, "wb") + base["norm_params"])) > 1e-6
    assert rel_err(base["K"]["w"], base["K"]["wb"]) > 1e-6
    assert {id(p) for p in kernel_parameters(net, "wb")} == {id(p) for p in ref_params(net, "wb")}
    assert {id(p) for p in kernel_parameters(net, "w")} == {id(p) for p in ref_params(net, "w")}
    with pytest.raises(ValueError):
        kernel_parameters(net, "all")


def test_empirical_ntk_equals_vmap_jacrev_on_pruned_supernet(images):
    """A pruned supernet (ops that do not run contribute nothing), checked with vmap(jacrev)."""
    net = small_supernet(seed=1, pruned=True)
    x = images[:4]
    params = ref_params(net, "w")
    K = empirical_ntk(net, x, "w")
    J = jacobian_vmap(net, x, params)
    assert rel_err(K, J @ J.T) < 1e-4
    assert rel_err(J[:2], jacobian_loop(net, x[:2], params)) < 1e-8  # the two references agree


def test_empirical_ntk_on_plain_model_with_biases():
    """A model returning plain logits (not a tuple), with conv biases."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, groups=3),
                          nn.GroupNorm(3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).double()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    for pt in ("w", "wb"):
        J = jacobian_loop(model, x, ref_params(model, pt))
        assert rel_err(empirical_ntk(model, x, pt), J @ J.T) < 1e-4


def _hooks(model):
    return [(n, len(getattr(m, a))) for n, m in model.named_modules()
            for a in ("_forward_hooks", "_backward_hooks", "_forward_pre_hooks", "_backward_pre_hooks")
            if len(getattr(m, a, {}))]


def test_empirical_ntk_leaves_nothing_attached(images):
    net = small_supernet()
    sentinel_grad = torch.full_like(net.classifier.weight, 7.0)
    net.classifier.weight.grad = sentinel_grad
    frozen = [m for m in net.modules() if isinstance(m, nn.Conv2d)][3].weight
    frozen.requires_grad_(False)
    gn = [m for m in net.modules() if isinstance(m, nn.GroupNorm)][0]
    req_before = {id(p): p.requires_grad for p in net.parameters()}
    assert not _hooks(net)

    K1 = empirical_ntk(net, images, "w")
    assert type(net) is Supernet and "forward" not in vars(net)
    assert not _hooks(net)
    for p in net.parameters():
        assert not hasattr(p, "grad_sample") and not hasattr(p, "_current_grad_sample")
        assert not hasattr(p, "_forward_counter")
        assert p.requires_grad == req_before[id(p)]
        if p is not net.classifier.weight:
            assert p.grad is None
    assert net.classifier.weight.grad is sentinel_grad and torch.all(sentinel_grad == 7.0)
    for m in net.modules():
        assert not hasattr(m, "activations") and not hasattr(m, "max_batch_len")
    assert not frozen.requires_grad and gn.weight.requires_grad

    K2 = empirical_ntk(net, images, "w")
    torch.testing.assert_close(K1, K2, rtol=1e-12, atol=0)
    # the model still trains normally afterwards
    net.zero_grad(set_to_none=True)
    net(images)[1].sum().backward()
    assert net.classifier.weight.grad is not None and gn.weight.grad is not None
    assert frozen.grad is None


def test_per_sample_gradients_context_restores_on_error(images):
    net = small_supernet()
    req_before = [p.requires_grad for p in net.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        with per_sample_gradients(net, ref_params(net, "w")):
            raise RuntimeError("boom")
    assert [p.requires_grad for p in net.parameters()] == req_before
    assert not _hooks(net)


# ---------------------------------------------------------------------------------------------------
# MetaNTK model and its kernels


def test_metantk_head_seeded():
    a = MetaNTKModel(nn.Identity(), 12, 5, seed=3)
    b = MetaNTKModel(nn.Identity(), 12, 5, seed=3)
    c = MetaNTKModel(nn.Identity(), 12, 5, seed=4)
    assert torch.equal(a.head.weight, b.head.weight) and torch.equal(a.head.bias, b.head.bias)
    assert not torch.equal(a.head.weight, c.head.weight)
    # default PyTorch init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert a.head.weight.abs().max() <= 1 / math.sqrt(12) and a.head.weight.std() > 0.05
    # the seed alone fixes the head, whatever the global RNG state
    torch.manual_seed(123)
    d = MetaNTKModel(nn.Identity(), 12, 5, seed=3)
    assert torch.equal(a.head.weight, d.head.weight) and torch.equal(a.head.bias, d.head.bias)


def meta_setup(params_types: str, n: int = 8) -> dict:
    """A MetaNTKModel on a Supernet, n images, its kernels and independent Jacobians."""
    backbone = small_supernet(seed=2, num_classes=7)
    model = MetaNTKModel(backbone, backbone.feature_dim, n_ways=3, seed=0).double()
    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    theta, head = metantk_kernels(model, x, params_types)
    head_params = ref_params(model.head, params_types)
    classifier = {id(p) for p in backbone.classifier.parameters()}
    bb_params = [p for p in ref_params(backbone, params_types) if id(p) not in classifier]
    assert len(bb_params) < len(ref_params(backbone, params_types))
    J = jacobian_loop(model, x, bb_params + head_params)
    Jh = J[:, -sum(p.numel() for p in head_params):]  # the head-parameter columns
    return dict(model=model, theta=theta, head=head, J=J, Jh=Jh, n=n)


@pytest.fixture(scope="module")
def meta_w():
    return meta_setup("w")


def _check_meta(d):
    n = d["n"]
    assert d["theta"].shape == d["head"].shape == (n, n)
    assert rel_err(d["theta"], d["J"] @ d["J"].T) < 1e-4
    assert rel_err(d["head"], d["Jh"] @ d["Jh"].T) < 1e-4
    assert rel_err(d["head"], d["theta"]) > 1e-3  # ANIL's K really differs from MAML's
    assert not _hooks(d["model"])


def test_metantk_kernels_match_jacobians_w(meta_w):
    _check_meta(meta_w)


def test_metantk_kernels_match_jacobians_wb():
    _check_meta(meta_setup("wb", n=4))


# ---------------------------------------------------------------------------------------------------
# Analytical MetaNTK vs M Mᵀ


def t_op(K: np.ndarray, tau: float, lam: float) -> np.ndarray:
    n = K.shape[0]
    inv = np.linalg.pinv(K + lam * np.eye(n))
    if math.isinf(tau) or tau >= 1000:
        return inv
    return inv @ (np.eye(n) - scipy.linalg.expm(-tau * K))


def metantk_by_m(J: np.ndarray, Jk: np.ndarray, n_tasks: int, nq: int, ns: int, tau: float, lam: float,
                 exact_tau: bool = False) -> np.ndarray:
    """Φ = M Mᵀ; rows ordered queries (task-major) then supports (task-major); K = Jk Jkᵀ."""
    Q = n_tasks * nq
    blocks = []
    for i in range(n_tasks):
        q = slice(i * nq, (i + 1) * nq)
        s = slice(Q + i * ns, Q + (i + 1) * ns)
        K_qs = Jk[q] @ Jk[s].T
        K_ss = Jk[s] @ Jk[s].T
        if exact_tau:  # use the matrix exponential even for large tau
            T = np.linalg.pinv(K_ss + lam * np.eye(ns)) @ (np.eye(ns) - scipy.linalg.expm(-tau * K_ss))
        else:
            T = t_op(K_ss, tau, lam)
        A = K_qs @ T
        blocks.append(J[q] - A @ J[s])
    M = np.concatenate(blocks, axis=0)
    return M @ M.T


@pytest.mark.parametrize("tau", [math.inf, 1000.0, 1.0, 0.3])
@pytest.mark.parametrize("algo", ["maml", "anil"])
def test_analytical_metantk_equals_mmt_random_jacobians(algo, tau):
    rng = np.random.default_rng(0)
    n_tasks, nq, ns, P, P_head = 3, 2, 3, 40, 10
    n = n_tasks * (nq + ns)
    J = rng.standard_normal((n, P)) / math.sqrt(P) * 2.0
    Jk = J if algo == "maml" else J[:, -P_head:]  # ANIL: head-only columns
    theta = torch.from_numpy(J @ J.T)
    k = torch.from_numpy(Jk @ Jk.T)
    lam = 1e-3
    phi = analytical_metantk(theta, k, n_tasks, nq, ns, inner_lr_time=tau, reg_coef=lam)
    ref = metantk_by_m(J, Jk, n_tasks, nq, ns, tau, lam)
    assert phi.shape == (n_tasks * nq, n_tasks * nq) and phi.dtype == torch.float64
    np.testing.assert_allclose(phi.numpy(), ref, rtol=1e-8, atol=1e-10)
    assert torch.equal(phi, phi.T)
    eig = np.linalg.eigvalsh(phi.numpy())
    assert eig.min() >= -1e-8 * eig.max()


def test_tau_1000_is_infinity_and_differs_from_small_tau():
    rng = np.random.default_rng(1)
    J = rng.standard_normal((10, 30)) / 10.0  # kernel eigenvalues ~0.3: exp(-K) matters, exp(-1000 K) does not
    theta = torch.from_numpy(J @ J.T)
    inf = analytical_metantk(theta, theta, 2, 2, 3, inner_lr_time=math.inf, reg_coef=1e-3)
    t1000 = analytical_metantk(theta, theta, 2, 2, 3, inner_lr_time=1000.0, reg_coef=1e-3)
    t1 = analytical_metantk(theta, theta, 2, 2, 3, inner_lr_time=1.0, reg_coef=1e-3)
    torch.testing.assert_close(t1000, inf, rtol=0, atol=0)
    assert not torch.allclose(t1, inf)
    # with kernels of eigenvalues >> 1/1000, exp(-1000 K) vanishes, so the exact formula agrees too
    exact = metantk_by_m(J, J, 2, 2, 3, 1000.0, 1e-3, exact_tau=True)
    np.testing.assert_allclose(t1000.numpy(), exact, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("algo,tau", [("maml", math.inf), ("anil", 1.0), ("maml", 1.0), ("anil", 1000.0)])
def test_analytical_metantk_on_network_jacobians(meta_w, algo, tau):
    """Real Jacobian rows of a MetaNTKModel on a Supernet: 2 tasks x (2 queries + 2 supports)."""
    theta, J = meta_w["theta"], meta_w["J"].numpy()
    Jk = J if algo == "maml" else meta_w["Jh"].numpy()
    k = theta if algo == "maml" else meta_w["head"]
    lam = 1e-3 if tau > 100 else 1e-5
    phi = analytical_metantk(theta, k, 2, 2, 2, inner_lr_time=tau, reg_coef=lam)
    ref = metantk_by_m(J, Jk, 2, 2, 2, tau, lam)
    assert np.linalg.norm(phi.numpy() - ref) / np.linalg.norm(ref) < 1e-4
    eig = np.linalg.eigvalsh(phi.numpy())
    assert eig.min() >= -1e-8 * eig.max()


@pytest.mark.parametrize("tau", [math.inf, 0.7])
def test_one_task_closed_form(tau):
    """1 query + 1 support, scalar kernels Θ = [[a, b], [b, c]] (MAML, K = Θ):
    A = b (1 - e^{-τc}) / (c + λ)   (e^{-τc} = 0 for τ = ∞)
    Φ = a - 2 A b + A² c            (= a - 2 b²/(c+λ) + c b²/(c+λ)² for τ = ∞)
    """
    a, b, c, lam = 2.0, 0.8, 1.5, 0.1
    theta = torch.tensor([[a, b], [b, c]], dtype=torch.float64)
    phi = analytical_metantk(theta, theta, 1, 1, 1, inner_lr_time=tau, reg_coef=lam)
    if math.isinf(tau):
        expected = a - 2 * b ** 2 / (c + lam) + c * b ** 2 / (c + lam) ** 2
    else:
        A = b * (1 - math.exp(-tau * c)) / (c + lam)
        expected = a - 2 * A * b + A ** 2 * c
    assert phi.shape == (1, 1)
    assert phi.item() == pytest.approx(expected, rel=1e-12)


def test_one_task_closed_form_anil():
    """ANIL: A uses the head kernel k = [[p, q], [q, r]], Φ uses Θ: Φ = a - 2 A b + A² c, A = q/(r+λ)."""
    a, b, c = 2.0, 0.8, 1.5
    p, q, r = 0.5, 0.3, 0.9
    lam = 0.01
    theta = torch.tensor([[a, b], [b, c]], dtype=torch.float64)
    k = torch.tensor([[p, q], [q, r]], dtype=torch.float64)
    A = q / (r + lam)
    phi = analytical_metantk(theta, k, 1, 1, 1, inner_lr_time=math.inf, reg_coef=lam)
    assert phi.item() == pytest.approx(a - 2 * A * b + A ** 2 * c, rel=1e-12)


def test_analytical_metantk_bad_shapes():
    with pytest.raises(ValueError):
        analytical_metantk(torch.eye(10, dtype=torch.float64), torch.eye(10, dtype=torch.float64), 3, 2, 2)
    with pytest.raises(ValueError):
        analytical_metantk(torch.eye(12, dtype=torch.float64), torch.eye(10, dtype=torch.float64), 3, 2, 2)


# ---------------------------------------------------------------------------------------------------
# Condition number


def test_condition_number_diagonal():
    assert condition_number(torch.diag(torch.tensor([2.0, 0.5, 8.0], dtype=torch.float64))) == pytest.approx(16.0)
    assert condition_number(torch.eye(4)) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    K = Q @ np.diag([1.0, 2.0, 3.0, 4.0, 10.0]) @ Q.T
    assert condition_number(torch.from_numpy(K)) == pytest.approx(10.0, rel=1e-9)


@pytest.mark.parametrize("K", [
    torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]], dtype=torch.float64),
    torch.tensor([[float("inf"), 0.0], [0.0, 1.0]], dtype=torch.float64),
    torch.diag(torch.tensor([3.0, 0.0], dtype=torch.float64)),  # singular
    torch.zeros(3, 3, dtype=torch.float64),
    torch.diag(torch.tensor([3.0, -1.0], dtype=torch.float64)),  # negative eigenvalue
    torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64),  # eigenvalues 3, -1
], ids=["nan", "inf", "singular", "zero", "negative", "indefinite"])
def test_condition_number_sentinel_with_warning(K, caplog):
    with caplog.at_level(logging.WARNING):
        kappa = condition_number(K, context="test-kernel")
    assert kappa == KAPPA_SENTINEL
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings and "test-kernel" in warnings[-1].getMessage()


def test_condition_number_no_warning_on_good_kernel(caplog):
    with caplog.at_level(logging.WARNING):
        condition_number(torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_condition_number_of_network_ntk_is_finite(base):
    K = base["K"]["w"]
    kappa = condition_number(K)
    eig = np.linalg.eigvalsh(K.numpy())
    assert kappa != KAPPA_SENTINEL and kappa == pytest.approx(eig.max() / eig.min(), rel=1e-6)


@pytest.mark.parametrize("kernel,stride,padding,dilation,groups,bias", [
    (3, 1, 1, 1, 1, False), (3, 2, 1, 1, 1, True), (3, 1, 2, 2, 4, False), ((1, 5), 2, (0, 2), 1, 1, False),
    ((5, 1), 1, (2, 0), 1, 4, True), (1, 1, 0, 1, 1, True)])
def test_grouped_conv_grad_sample_equals_opacus(kernel, stride, padding, dilation, groups, bias):
    """The grouped-convolution per-sample gradient of a Conv2d equals Opacus's unfold-based one."""
    from opacus.grad_sample.conv import compute_conv_grad_sample

    from search_lib.search.kernels import conv2d_grad_sample

    torch.manual_seed(0)
    layer = nn.Conv2d(4, 8, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    x = torch.randn(5, 4, 9, 9)
    backprops = torch.randn_like(layer(x))
    fast = conv2d_grad_sample(layer, [x], backprops)
    ref = compute_conv_grad_sample(layer, [x], backprops)
    assert set(fast) == set(ref)
    for p in ref:
        torch.testing.assert_close(fast[p], ref[p], rtol=1e-5, atol=1e-5)
