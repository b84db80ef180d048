"""Candidate operations (search_lib/models/ops.py) against docs/method.md §1."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from search_lib.core.errors import UsageError
from search_lib.models.ops import OPS, SEARCH_SPACES, FactorizedReduce, Registry, build_op, space_ops

ALL_OPS = sorted(set(SEARCH_SPACES["darts_fewshot"]) | set(SEARCH_SPACES["darts"]))


def convs(m: nn.Module) -> list[nn.Conv2d]:
    return [x for x in m.modules() if isinstance(x, nn.Conv2d)]


def bns(m: nn.Module) -> list[nn.BatchNorm2d]:
    return [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]


def randomise_bn(op: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters, so eval-mode BN is not the identity."""
    with torch.no_grad():
        for bn in bns(op):
            C = bn.num_features
            bn.running_mean.copy_(torch.randn(C, generator=gen, dtype=bn.running_mean.dtype))
            bn.running_var.copy_(torch.rand(C, generator=gen, dtype=bn.running_var.dtype) + 0.5)
            bn.weight.copy_(torch.randn(C, generator=gen, dtype=bn.weight.dtype))
            bn.bias.copy_(torch.randn(C, generator=gen, dtype=bn.bias.dtype))


def bn_eval(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)


# ---------------------------------------------------------------------------------------------------
# Search spaces


def test_space_op_lists_in_reference_order():
    assert space_ops("darts_fewshot") == ("none", "skip_connect", "sep_conv_3x3", "dil_conv_3x3", "avg_pool_3x3BN",
                                          "max_pool_3x3BN", "conv_1x5_5x1", "conv_3x3")
    assert space_ops("darts") == ("none", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
                                  "dil_conv_5x5", "avg_pool_3x3", "max_pool_3x3")
    for name in ALL_OPS:
        assert name in OPS


def test_unknown_space_raises_usage_error():
    with pytest.raises(UsageError, match="darts_fewshot"):
        space_ops("nas-bench")


# ---------------------------------------------------------------------------------------------------
# Generic behaviour of every op: shape, finiteness, gradients


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", ALL_OPS)
@pytest.mark.parametrize("hw", [8, 7])
def test_every_op_shape_finite_and_gradients(name, stride, hw):
    C = 4
    torch.manual_seed(0)
    op = build_op(name, C, C, stride)
    op.train()
    x = torch.randn(2, C, hw, hw, dtype=torch.float64, requires_grad=True)
    op.double()
    y = op(x)
    expected = -(-hw // stride)  # ceil(hw / stride)
    assert y.shape == (2, C, expected, expected)
    assert torch.isfinite(y).all()
    if name == "none":
        assert (y == 0).all()
        assert not list(op.parameters())
        return
    r = torch.randn_like(y)
    (y * r).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in op.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reached {pname}"
        assert torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient at {pname}"


# (none, skip_connect and the BN pools are only built with C_in == C_out inside cells)
@pytest.mark.parametrize("name", [n for n in ALL_OPS
                                  if n not in ("none", "skip_connect", "avg_pool_3x3BN", "max_pool_3x3BN")])
def test_op_with_different_channel_counts(name):
    """C_in != C_out (the darts pool adapter; conv ops map C_in to C_out)."""
    for stride in (1, 2):
        op = build_op(name, 3, 6, stride)
        y = op(torch.randn(2, 3, 8, 8))
        assert y.shape == (2, 6, 8 // stride, 8 // stride)


@pytest.mark.parametrize("name", ALL_OPS)
def test_no_conv_bias_and_no_inplace_relu(name):
    for stride in (1, 2):
        op = build_op(name, 4, 4, stride)
        for m in op.modules():
            if isinstance(m, nn.Conv2d):
                assert m.bias is None, f"{name} has a conv bias"
            if isinstance(m, nn.ReLU):
                assert m.inplace is False, f"{name} has an in-place ReLU"
            assert not isinstance(m, (nn.ReLU6, nn.LeakyReLU))


def test_none_op_output_shape_and_zero():
    op = build_op("none", 4, 4, 2)
    y = op(torch.randn(3, 4, 9, 9))
    assert y.shape == (3, 4, 5, 5) and (y == 0).all()


def test_skip_connect_identity_and_reduction():
    assert isinstance(build_op("skip_connect", 4, 4, 1), nn.Identity)
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(build_op("skip_connect", 4, 4, 1)(x), x)
    assert isinstance(build_op("skip_connect", 4, 4, 2), FactorizedReduce)


# ---------------------------------------------------------------------------------------------------
# Structures, checked both by module attributes and against a manual functional computation


def check_sepconv_modules(mods, C_in, C_out, k, stride, pad, dil):
    relu, dw, pw, bn = mods
    assert isinstance(relu, nn.ReLU)
    assert isinstance(dw, nn.Conv2d) and dw.groups == C_in and dw.in_channels == C_in and dw.out_channels == C_in
    assert dw.kernel_size == (k, k) and dw.stride == (stride, stride)
    assert dw.padding == (pad, pad) and dw.dilation == (dil, dil)
    assert isinstance(pw, nn.Conv2d) and pw.kernel_size == (1, 1) and pw.groups == 1
    assert pw.in_channels == C_in and pw.out_channels == C_out and pw.stride == (1, 1)
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == C_out


def sepconv_manual(x, dw, pw, bn, stride, pad, dil):
    C = x.shape[1]
    y = F.conv2d(F.relu(x), dw.weight, stride=stride, padding=pad, dilation=dil, groups=C)
    y = F.conv2d(y, pw.weight)
    return bn_eval(y, bn)


def leaves(m: nn.Module) -> list[nn.Module]:
    return [x for x in m.modules() if not list(x.children())]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name,k,pad", [("sep_conv_3x3", 3, 1), ("sep_conv_5x5", 5, 2)])
def test_sep_conv_is_two_sepconvs_stride_on_first(name, k, pad, stride):
    C, C_out = 3, 5
    gen = torch.Generator().manual_seed(1)
    op = build_op(name, C, C_out, stride).double()
    mods = leaves(op)
    assert len(mods) == 8
    check_sepconv_modules(mods[:4], C, C, k, stride, pad, 1)
    check_sepconv_modules(mods[4:], C, C_out, k, 1, pad, 1)
    randomise_bn(op, gen)
    op.eval()
    x = torch.randn(2, C, 9, 9, generator=gen, dtype=torch.float64)
    y = sepconv_manual(x, mods[1], mods[2], mods[3], stride, pad, 1)
    y = sepconv_manual(y, mods[5], mods[6], mods[7], 1, pad, 1)
    torch.testing.assert_close(op(x), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name,k,pad,dil", [("dil_conv_3x3", 3, 2, 2), ("dil_conv_5x5", 5, 4, 2),
                                             ("conv_3x3", 3, 1, 1)])
def test_single_sepconv_ops(name, k, pad, dil, stride):
    """dil_conv_*: one SepConv with dilation 2; conv_3x3 is ONE separable 3x3 conv (not a full conv)."""
    C, C_out = 3, 5
    gen = torch.Generator().manual_seed(2)
    op = build_op(name, C, C_out, stride).double()
    mods = leaves(op)
    assert len(mods) == 4
    check_sepconv_modules(mods, C, C_out, k, stride, pad, dil)
    randomise_bn(op, gen)
    op.eval()
    x = torch.randn(2, C, 9, 9, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(op(x), sepconv_manual(x, mods[1], mods[2], mods[3], stride, pad, dil),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_1x5_5x1_structure(stride):
    C, C_out = 3, 4
    gen = torch.Generator().manual_seed(3)
    op = build_op("conv_1x5_5x1", C, C_out, stride).double()
    relu, c1, c2, bn = leaves(op)
    assert isinstance(relu, nn.ReLU) and isinstance(bn, nn.BatchNorm2d) and bn.num_features == C_out
    assert c1.kernel_size == (1, 5) and c1.padding == (0, 2) and c1.stride == (stride, stride)
    assert c1.in_channels == C and c1.out_channels == C_out and c1.groups == 1
    assert c2.kernel_size == (5, 1) and c2.padding == (2, 0) and c2.stride == (1, 1)
    assert c2.in_channels == C_out and c2.out_channels == C_out and c2.groups == 1
    randomise_bn(op, gen)
    op.eval()
    x = torch.randn(2, C, 8, 8, generator=gen, dtype=torch.float64)
    y = F.conv2d(F.relu(x), c1.weight, stride=stride, padding=(0, 2))
    y = bn_eval(F.conv2d(y, c2.weight, padding=(2, 0)), bn)
    torch.testing.assert_close(op(x), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kind", ["avg", "max"])
def test_pool_bn(kind, stride):
    C = 3
    gen = torch.Generator().manual_seed(4)
    op = build_op(f"{kind}_pool_3x3BN", C, C, stride).double()
    pool, bn = leaves(op)
    assert isinstance(bn, nn.BatchNorm2d) and not convs(op)
    randomise_bn(op, gen)
    op.eval()
    x = torch.randn(2, C, 7, 7, generator=gen, dtype=torch.float64)
    if kind == "avg":
        ref = F.avg_pool2d(x, 3, stride=stride, padding=1, count_include_pad=False)
    else:
        ref = F.max_pool2d(x, 3, stride=stride, padding=1)
    torch.testing.assert_close(op(x), bn_eval(ref, bn), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["avg_pool_3x3BN", "avg_pool_3x3"])
def test_avg_pool_excludes_padding(name):
    """On a constant image the average excluding padding is that constant everywhere (corners too)."""
    op = build_op(name, 2, 2, 1).double().eval()  # eval BN with default stats: x / sqrt(1 + eps)
    x = torch.full((1, 2, 5, 5), 3.0, dtype=torch.float64)
    y = op(x)
    scale = 1.0 / (1.0 + 1e-5) ** 0.5 if bns(op) else 1.0
    torch.testing.assert_close(y, torch.full_like(y, 3.0 * scale), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_darts_pool_only_and_adapter(kind):
    op = build_op(f"{kind}_pool_3x3", 3, 3, 2)
    assert not convs(op) and not bns(op) and not list(op.parameters())
    x = torch.randn(2, 3, 8, 8)
    ref = (F.avg_pool2d(x, 3, 2, 1, count_include_pad=False) if kind == "avg" else F.max_pool2d(x, 3, 2, 1))
    torch.testing.assert_close(op(x), ref)
    # C_in != C_out: a ReLU-conv1x1-BN adapter first
    op = build_op(f"{kind}_pool_3x3", 3, 5, 1)
    types = [type(m) for m in leaves(op)]
    assert types[:3] == [nn.ReLU, nn.Conv2d, nn.BatchNorm2d]
    (c,) = convs(op)
    assert c.kernel_size == (1, 1) and c.in_channels == 3 and c.out_channels == 5


@pytest.mark.parametrize("hw", [8, 7])
@pytest.mark.parametrize("C_in,C_out", [(4, 4), (3, 5), (6, 7)])
def test_factorized_reduce_against_manual(C_in, C_out, hw):
    gen = torch.Generator().manual_seed(5)
    fr = FactorizedReduce(C_in, C_out).double()
    c1, c2 = convs(fr)
    assert c1.out_channels == C_out // 2 and c2.out_channels == C_out - C_out // 2
    for c in (c1, c2):
        assert c.kernel_size == (1, 1) and c.stride == (2, 2) and c.in_channels == C_in and c.bias is None
    assert [m.inplace for m in fr.modules() if isinstance(m, nn.ReLU)] == [False]
    (bn,) = bns(fr)
    assert bn.num_features == C_out
    randomise_bn(fr, gen)
    fr.eval()
    x = torch.randn(2, C_in, hw, hw, generator=gen, dtype=torch.float64)
    r = torch.relu(x)
    # first path: pixels (0, 0), (0, 2), ... ; second path: pixels (1, 1), (1, 3), ... (zero beyond the border)
    padded = torch.zeros(2, C_in, hw + 1, hw + 1, dtype=torch.float64)
    padded[:, :, :hw, :hw] = r
    a = torch.einsum("oc,nchw->nohw", c1.weight[:, :, 0, 0], r[:, :, 0::2, 0::2])
    b = torch.einsum("oc,nchw->nohw", c2.weight[:, :, 0, 0], padded[:, :, 1::2, 1::2])
    assert a.shape[-1] == b.shape[-1] == -(-hw // 2)
    ref = bn_eval(torch.cat([a, b], dim=1), bn)
    torch.testing.assert_close(fr(x), ref, rtol=1e-12, atol=1e-12)


def test_factorized_reduce_second_path_is_shifted():
    """The second conv sees only odd pixels: changing an even pixel leaves its channels unchanged."""
    fr = FactorizedReduce(2, 4).double().eval()
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64) + 0.1
    y = fr(x)
    x2 = x.clone()
    x2[:, :, 0, 0] += 5.0  # an even pixel: only the first path
    y2 = fr(x2)
    assert not torch.allclose(y[:, :2], y2[:, :2])
    torch.testing.assert_close(y[:, 2:], y2[:, 2:])
    x3 = x.clone()
    x3[:, :, 1, 1] += 5.0  # an odd pixel: only the second path
    y3 = fr(x3)
    torch.testing.assert_close(y[:, :2], y3[:, :2])
    assert not torch.allclose(y[:, 2:], y3[:, 2:])


# ---------------------------------------------------------------------------------------------------
# Registry


def test_unknown_op_raises_usage_error_listing_valid_names():
    with pytest.raises(UsageError) as info:
        build_op("conv_7x7", 4, 4, 1)
    msg = str(info.value)
    assert "conv_7x7" in msg
    for name in ALL_OPS:
        assert name in msg
    with pytest.raises(UsageError):
        OPS["sep_conv_9x9"]


def test_duplicate_registration_raises_and_keeps_original():
    before = OPS["sep_conv_3x3"]
    with pytest.raises(ValueError, match="sep_conv_3x3"):
        OPS.register("sep_conv_3x3")(lambda C_in, C_out, stride, affine=True: nn.Identity())
    assert OPS["sep_conv_3x3"] is before
    reg = Registry("thing")
    reg.register("a")(int)
    with pytest.raises(ValueError):
        reg.register("a")(float)
    assert reg["a"] is int and reg.names() == ["a"]
