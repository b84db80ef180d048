"""The search supernet (search_lib/models/supernet.py) against docs/method.md §1 (macro layout, MixedOp, norms)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from search_lib.core.errors import UsageError
from search_lib.models.genotypes import PRESETS, PRUNED_ALPHA, alphas_from_genotype
from search_lib.models.ops import FactorizedReduce, space_ops
from search_lib.models.space import DEFAULT_SPACE, SearchSpace, edge_keys
from search_lib.models.supernet import MixedOp, Supernet, cell_layout, init_weights, replace_norm, thin_supernet

# ---------------------------------------------------------------------------------------------------
# Layout and shapes


def test_cell_layout():
    assert cell_layout(5) == [False, True, False, True, False]
    assert [i for i, r in enumerate(cell_layout(8)) if r] == [2, 5]
    assert cell_layout(8) == [False, False, True, False, False, True, False, False]
    assert cell_layout(2) == [True, True]
    assert [i for i, r in enumerate(cell_layout(11)) if r] == [3, 7]


@pytest.mark.parametrize("layers", [3, 4, 6, 1])
def test_bad_layer_count_is_usage_error(layers):
    with pytest.raises(UsageError):
        Supernet(C=2, layers=layers, num_classes=3)


@pytest.mark.parametrize("space", ["darts_fewshot", "darts"])
@pytest.mark.parametrize("max_nodes", [3, 4])
@pytest.mark.parametrize("layers", [2, 5, 8])
def test_forward_shapes(space, max_nodes, layers):
    torch.manual_seed(0)
    C, n_cls = 2, 7
    net = Supernet(C=C, layers=layers, num_classes=n_cls, space=SearchSpace(space, max_nodes))
    assert [c.reduction for c in net.cells] == cell_layout(layers)
    feats, logits = net(torch.randn(2, 3, 8, 8))
    expected_dim = max_nodes * C * 2 ** 2  # two reductions, fsr 2, concat of max_nodes states
    assert net.feature_dim == expected_dim
    assert feats.shape == (2, expected_dim) and logits.shape == (2, n_cls)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("max_nodes,n_edges", [(3, 9), (4, 14)])
def test_edges_and_arch_buffers(max_nodes, n_edges):
    net = Supernet(C=2, layers=5, num_classes=3, space=SearchSpace("darts_fewshot", max_nodes))
    n_ops = len(space_ops("darts_fewshot"))
    for cell in net.cells:
        assert list(cell.edges.keys()) == edge_keys(max_nodes)
        assert len(cell.edges) == n_edges
        for key, mixed in cell.edges.items():
            node, src = map(int, key.split("<-"))
            assert len(mixed.ops) == n_ops
            # reduction edges from the two cell inputs stride: skip_connect becomes FactorizedReduce
            is_fr = isinstance(mixed.ops[1], FactorizedReduce)
            assert is_fr == (cell.reduction and src < 2)
    buffers = dict(net.named_buffers())
    assert buffers["alphas_normal"].shape == (n_edges, n_ops)
    assert buffers["alphas_reduce"].shape == (n_edges, n_ops)
    param_ids = {id(p) for p in net.parameters()}
    assert id(net.alphas_normal) not in param_ids and id(net.alphas_reduce) not in param_ids
    assert not any("alpha" in name for name, _ in net.named_parameters())
    assert not net.alphas_normal.requires_grad


@pytest.mark.parametrize("fsr", [2, 3])
def test_channels_multiply_by_fsr_at_reductions(fsr):
    C, max_nodes = 2, 3
    net = Supernet(C=C, layers=8, num_classes=3, fsr=fsr, stem_multiplier=2)
    stem_conv = net.stem[0]
    assert stem_conv.in_channels == 3 and stem_conv.out_channels == 2 * C and stem_conv.bias is None
    assert stem_conv.kernel_size == (3, 3)
    C_curr = C
    for cell, red in zip(net.cells, cell_layout(8)):
        if red:
            C_curr *= fsr
        conv = [m for m in cell.preprocess1.modules() if isinstance(m, nn.Conv2d)][0]
        assert conv.out_channels == C_curr
    assert net.feature_dim == max_nodes * C * fsr ** 2
    assert net.classifier.in_features == net.feature_dim
    feats, _ = net(torch.randn(2, 3, 8, 8))
    assert feats.shape[1] == max_nodes * C * fsr ** 2


def test_preprocessing_after_reduction_is_factorized_reduce():
    net = Supernet(C=2, layers=5, num_classes=3)
    for i, cell in enumerate(net.cells):
        prev_red = i > 0 and net.cells[i - 1].reduction
        assert isinstance(cell.preprocess0, FactorizedReduce) == prev_red


def test_supernet_ends_with_bn_relu_pool_linear():
    net = Supernet(C=2, layers=5, num_classes=3)
    bn, relu = net.lastact
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU) and not relu.inplace
    assert isinstance(net.global_pooling, nn.AdaptiveAvgPool2d)
    torch.manual_seed(1)
    x = torch.randn(3, 3, 8, 8)
    captured = {}
    net.cells[-1].register_forward_hook(lambda m, i, o: captured.update(s=o))
    feats, logits = net(x)
    ref = torch.relu(net.lastact[0](captured["s"])).mean(dim=(2, 3))
    torch.testing.assert_close(feats, ref)
    torch.testing.assert_close(logits, net.classifier(feats))


def test_no_conv_bias_and_no_inplace_relu_in_cells():
    for space in ("darts_fewshot", "darts"):
        net = Supernet(C=2, layers=5, num_classes=3, space=SearchSpace(space, 3))
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                assert m.bias is None
            if isinstance(m, nn.ReLU):
                assert not m.inplace


# ---------------------------------------------------------------------------------------------------
# MixedOp and pruning


def test_mixed_op_weighted_sum_and_skip():
    torch.manual_seed(0)
    mixed = MixedOp(space_ops("darts_fewshot"), 2, 2, 1).double().eval()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    w = [0.1, 0.2, 0.3, 0.005, 0.1, 0.1, 0.15, 0.05]
    ref = sum(wi * op(x) for wi, op in zip(w, mixed.ops) if wi > 0.01)
    torch.testing.assert_close(mixed(x, w), ref)
    # op 3 (weight 0.005 <= 0.01) is skipped, i.e. not the full weighted sum
    full = sum(wi * op(x) for wi, op in zip(w, mixed.ops))
    assert not torch.allclose(mixed(x, w), full)


def _count_op_calls(net: Supernet) -> tuple[dict, list]:
    calls: dict = {}
    handles = []
    for ci, cell in enumerate(net.cells):
        for key, mixed in cell.edges.items():
            for oi, op in enumerate(mixed.ops):
                def hook(m, i, o, k=(ci, key, oi)):
                    calls[k] = calls.get(k, 0) + 1
                handles.append(op.register_forward_hook(hook))
    return calls, handles


def test_pruned_ops_are_not_run():
    torch.manual_seed(0)
    net = Supernet(C=2, layers=5, num_classes=3)
    an, ar = alphas_from_genotype(PRESETS["mini-5cell-1"], DEFAULT_SPACE)
    net.set_alphas(an, ar)
    calls, handles = _count_op_calls(net)
    net(torch.randn(2, 3, 8, 8))
    for h in handles:
        h.remove()
    ops = space_ops("darts_fewshot")
    keys = edge_keys(3)
    expected = set()
    for ci, cell in enumerate(net.cells):
        alphas = ar if cell.reduction else an
        for r, c in (alphas > PRUNED_ALPHA / 2).nonzero().tolist():
            expected.add((ci, keys[r], c))
    assert set(calls) == expected
    assert all(v == 1 for v in calls.values())
    assert len(expected) == 5 * 6  # 6 alive (edge, op) pairs per cell
    # sanity: the ops that ran are the genotype's
    assert {ops[c] for (_, _, c) in expected} <= {"sep_conv_3x3", "conv_3x3", "conv_1x5_5x1", "dil_conv_3x3"}


def test_pruned_op_weights_do_not_affect_output():
    torch.manual_seed(0)
    net = Supernet(C=2, layers=5, num_classes=3).double().eval()
    an = torch.zeros(9, 8)
    ar = torch.zeros(9, 8)
    ops = space_ops("darts_fewshot")
    i_sep = ops.index("sep_conv_3x3")
    an[:, i_sep] = PRUNED_ALPHA
    ar[:, i_sep] = PRUNED_ALPHA
    net.set_alphas(an, ar)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    before = net(x)[1]
    with torch.no_grad():
        for cell in net.cells:
            for mixed in cell.edges.values():
                for p in mixed.ops[i_sep].parameters():
                    p.add_(torch.randn_like(p))
    torch.testing.assert_close(net(x)[1], before, rtol=0, atol=0)
    # control: perturbing an op that runs does change the output
    with torch.no_grad():
        for p in net.cells[0].edges["2<-0"].ops[ops.index("conv_3x3")].parameters():
            p.add_(torch.randn_like(p))
    assert not torch.allclose(net(x)[1], before)


def test_fully_pruned_edges_give_zero_nodes():
    """A node whose every edge is pruned is zero; the network still runs (shape kept)."""
    net = Supernet(C=2, layers=5, num_classes=3)
    an = torch.full((9, 8), PRUNED_ALPHA)
    ar = torch.full((9, 8), PRUNED_ALPHA)
    net.set_alphas(an, ar)
    feats, logits = net(torch.randn(2, 3, 8, 8))
    assert feats.shape == (2, net.feature_dim)
    assert torch.all(feats == 0)  # every cell output is zero -> BN(0)=0 (bias 0) -> ReLU -> 0


def test_edge_weights_are_softmax():
    a = torch.tensor([[0.0, 1.0, 2.0], [PRUNED_ALPHA, 0.0, PRUNED_ALPHA], [PRUNED_ALPHA] * 3])
    w = Supernet.edge_weights(a)
    ref = torch.softmax(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), 0).tolist()
    assert w[0] == pytest.approx(ref)
    assert w[1] == pytest.approx([0.0, 1.0, 0.0])
    assert w[2] == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------------
# Normalisation replacement


def _norms(net):
    return [m for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d))]


def test_replace_norm_groupnorm16():
    net = Supernet(C=8, layers=5, num_classes=3)
    bn_channels = sorted(m.num_features for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    replace_norm(net, "groupnorm16")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    gns = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert sorted(m.num_channels for m in gns) == bn_channels
    for m in gns:
        assert m.num_groups == min(16, m.num_channels) and m.affine
    assert {m.num_groups for m in gns} == {8, 16}  # both branches of min(16, C) occur
    out = net(torch.randn(2, 3, 8, 8))[1]
    assert torch.isfinite(out).all()


def test_replace_norm_other_types():
    net = replace_norm(Supernet(C=4, layers=5, num_classes=3), "instancenorm")
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in net.modules())
    assert all(m.affine for m in net.modules() if isinstance(m, nn.InstanceNorm2d))
    assert len([m for m in net.modules() if isinstance(m, nn.InstanceNorm2d)]) > 10
    net(torch.randn(2, 3, 8, 8))
    net = replace_norm(Supernet(C=4, layers=5, num_classes=3), "nonorm")
    assert not _norms(net)
    net(torch.randn(2, 3, 8, 8))
    net = Supernet(C=4, layers=5, num_classes=3)
    n_bn = len(_norms(net))
    assert replace_norm(net, "batchnorm") is net and len(_norms(net)) == n_bn
    gn32 = replace_norm(Supernet(C=32, layers=2, num_classes=3), "groupnorm")
    assert {m.num_groups for m in gn32.modules() if isinstance(m, nn.GroupNorm)} == {32}


def test_replace_norm_indivisible_channels_usage_error():
    with pytest.raises(UsageError, match="groupnorm16"):
        replace_norm(Supernet(C=5, layers=5, num_classes=3), "groupnorm16")  # 20 channels, 16 groups
    with pytest.raises(UsageError):
        replace_norm(Supernet(C=4, layers=5, num_classes=3), "layernorm")


# ---------------------------------------------------------------------------------------------------
# Initialisation


def _conv_linear_weights(net):
    return [m.weight.detach().clone() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_init_weights_reinitialises_and_is_seeded():
    net = Supernet(C=4, layers=5, num_classes=3)
    with torch.no_grad():  # make norm parameters and biases non-default
        for m in _norms(net):
            m.weight.fill_(3.0)
            m.bias.fill_(-2.0)
        net.classifier.bias.fill_(5.0)
    before = _conv_linear_weights(net)
    init_weights(net, "fan_out", seed=0)
    a = _conv_linear_weights(net)
    assert all(not torch.equal(x, y) for x, y in zip(before, a))
    for m in _norms(net):
        assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.all(net.classifier.bias == 0)
    init_weights(net, "fan_out", seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a, _conv_linear_weights(net)))
    init_weights(net, "fan_out", seed=1)
    assert all(not torch.equal(x, y) for x, y in zip(a, _conv_linear_weights(net)))
    # same seed on a fresh network gives the same weights; fan_in differs from fan_out
    other = init_weights(Supernet(C=4, layers=5, num_classes=3), "fan_out", seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a, _conv_linear_weights(other)))
    init_weights(other, "fan_in", seed=0)
    assert not all(torch.equal(x, y) for x, y in zip(a, _conv_linear_weights(other)))


def test_init_weights_does_not_touch_global_rng():
    net = Supernet(C=2, layers=2, num_classes=3)  # construction itself uses the global RNG
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    init_weights(net, seed=3)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
def test_init_weights_kaiming_std(mode):
    conv = nn.Conv2d(64, 256, 3, bias=False)
    lin = nn.Linear(300, 700)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), lin)
    init_weights(model, mode, seed=0)
    fan = {"fan_in": 64 * 9, "fan_out": 256 * 9}[mode]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan), rel=0.03)
    assert conv.weight.mean().item() == pytest.approx(0.0, abs=0.003)
    lin_fan = {"fan_in": 300, "fan_out": 700}[mode]
    assert lin.weight.std().item() == pytest.approx(math.sqrt(2.0 / lin_fan), rel=0.03)


def test_init_weights_bad_mode():
    with pytest.raises(UsageError):
        init_weights(nn.Linear(2, 2), "xavier")


# ---------------------------------------------------------------------------------------------------
# Thin network for linear regions


def test_thin_supernet():
    net = thin_supernet(DEFAULT_SPACE)
    assert isinstance(net.stem, nn.Identity)
    assert [c.reduction for c in net.cells] == [False, True]
    convs = [m for m in net.cells[0].modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].in_channels == 1
    assert net.cells[0].preprocess1[1].out_channels == 1  # C = 1
    assert net.cells[1].preprocess1[1].out_channels == 2  # doubled at the reduction
    feats, logits = net(torch.randn(5, 1, 3, 3))
    assert feats.shape == (5, 3 * 2) and logits.shape == (5, 1)
    for space, nodes in (("darts", 4), ("darts_fewshot", 4)):
        t = thin_supernet(SearchSpace(space, nodes))
        assert len(t.cells) == 2
        assert t(torch.randn(4, 1, 3, 3))[0].shape == (4, nodes * 2)
