"""The evaluation network (eval_lib/rfs_models/augment_cnn.py, AugmentCNN) against docs/method.md §1."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from eval_lib.rfs_models.augment_cnn import AugmentCNN, DropPath
from search_lib.models.genotypes import PRESETS, Genotype
from search_lib.models.ops import FactorizedReduce

# A small genotype with every kind of op, hand-checkable.
TINY = Genotype(
    normal=[[("sep_conv_3x3", 0), ("skip_connect", 1)], [("conv_3x3", 0), ("dil_conv_3x3", 2)],
            [("conv_1x5_5x1", 1), ("max_pool_3x3BN", 3)]],
    normal_concat=[2, 3, 4],
    reduce=[[("skip_connect", 0), ("avg_pool_3x3BN", 1)], [("sep_conv_3x3", 0), ("skip_connect", 2)],
            [("conv_1x5_5x1", 2), ("conv_3x3", 3)]],
    reduce_concat=[2, 3, 4],
)


def unwrap(edge: nn.Module) -> nn.Module:
    return edge[0] if isinstance(edge, nn.Sequential) and isinstance(edge[-1], DropPath) else edge


@pytest.mark.parametrize("layers,expected", [(5, [1, 3]), (8, [2, 5]), (6, [2, 4]), (11, [3, 7])])
def test_reduction_positions(layers, expected):
    net = AugmentCNN(TINY, C=2, layers=layers, num_classes=3)
    assert [i for i, c in enumerate(net.cells) if c.reduction] == expected
    assert [i for i, c in enumerate(net.cells) if isinstance(c.preproc0, FactorizedReduce)] == [e + 1 for e in expected
                                                                                                if e + 1 < layers]


def test_no_final_bn_relu_before_pool():
    torch.manual_seed(0)
    net = AugmentCNN(TINY, C=4, layers=5, num_classes=3)
    kinds = [type(m) for m in net.children()]
    assert kinds == [nn.Sequential, nn.ModuleList, nn.AdaptiveAvgPool2d, nn.Linear]
    captured = {}
    net.cells[-1].register_forward_hook(lambda m, i, o: captured.update(last=o))
    net.gap.register_forward_hook(lambda m, i, o: captured.update(gap_in=i[0]))
    feats, logits = net(torch.randn(3, 3, 16, 16), return_features=True)
    assert captured["gap_in"] is captured["last"]  # nothing in between
    torch.testing.assert_close(feats, captured["last"].mean(dim=(2, 3)))
    assert (feats < 0).any()  # a final ReLU would make every feature >= 0
    torch.testing.assert_close(logits, net.linear(feats))
    assert feats.shape == (3, net.feature_dim) and net.feature_dim == 3 * 16


def test_return_features_default_is_logits():
    torch.manual_seed(0)
    net = AugmentCNN(TINY, C=2, layers=5, num_classes=4).eval()
    x = torch.randn(2, 3, 8, 8)
    logits = net(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 4)
    feats, logits2 = net(x, return_features=True)
    torch.testing.assert_close(logits, logits2)


def test_drop_path_on_every_non_identity_op_only():
    net = AugmentCNN(TINY, C=2, layers=5, num_classes=3)
    n_identity = n_dropped = 0
    for cell in net.cells:
        nodes = TINY.reduce if cell.reduction else TINY.normal
        for node, edges in zip(nodes, cell.dag):
            for (op_name, src), edge in zip(node, edges):
                identity = op_name == "skip_connect" and not (cell.reduction and src < 2)
                if identity:
                    assert isinstance(edge, nn.Identity)
                    assert not any(isinstance(m, DropPath) for m in edge.modules())
                    n_identity += 1
                else:
                    assert isinstance(edge, nn.Sequential) and isinstance(edge[-1], DropPath)
                    assert sum(isinstance(m, DropPath) for m in edge.modules()) == 1
                    n_dropped += 1
    # normal cells: 1 identity of 6 edges; reduce cells: skip from 2 is identity, skip from 0 is FactorizedReduce
    assert n_identity == 3 * 1 + 2 * 1 and n_dropped == 5 * 6 - n_identity
    # the reduction skip_connect from input 0 is a FactorizedReduce with drop-path
    assert isinstance(unwrap(net.cells[1].dag[0][0]), FactorizedReduce)


def test_drop_path_prob_setter_propagates():
    net = AugmentCNN(TINY, C=2, layers=5, num_classes=3, drop_path_prob=0.1)
    dps = [m for m in net.modules() if isinstance(m, DropPath)]
    assert dps and all(m.p == 0.1 for m in dps)
    net.drop_path_prob = 0.35
    assert net.drop_path_prob == 0.35
    assert all(m.p == 0.35 for m in dps)


def test_drop_path_module():
    torch.manual_seed(0)
    dp = DropPath(0.5)
    x = torch.ones(2000, 2, 3, 3)
    y = dp.train()(x)
    per_sample = y.flatten(1)
    # whole samples are dropped or rescaled by 1/(1-p)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)
    frac = (per_sample[:, 0] == 0).float().mean().item()
    assert 0.45 < frac < 0.55
    assert torch.equal(dp.eval()(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)


def test_drop_path_only_in_train_mode():
    torch.manual_seed(0)
    net = AugmentCNN(TINY, C=2, layers=5, num_classes=3)
    x = torch.randn(4, 3, 8, 8)
    net.eval()
    net.drop_path_prob = 0.0
    ref = net(x)
    net.drop_path_prob = 0.9
    torch.testing.assert_close(net(x), ref)  # eval: drop path inactive
    net.train()
    net.drop_path_prob = 0.0
    torch.manual_seed(1)
    train_ref = net(x)
    net.drop_path_prob = 0.9
    torch.manual_seed(1)
    assert not torch.allclose(net(x), train_ref)


def test_stem_and_channels():
    net = AugmentCNN(TINY, C=4, layers=5, num_classes=3, stem_multiplier=3, fsr=2)
    conv, bn = net.stem
    assert conv.in_channels == 3 and conv.out_channels == 12 and conv.kernel_size == (3, 3)
    assert conv.bias is None and isinstance(bn, nn.BatchNorm2d)
    assert net.feature_dim == 3 * 4 * 2 ** 2
    for m in net.modules():
        if isinstance(m, nn.ReLU):
            assert not m.inplace
        if isinstance(m, nn.Conv2d):
            assert m.bias is None


# ---------------------------------------------------------------------------------------------------
# Parameter count by hand (docs/method.md §1 structures, affine BN = 2 parameters per channel)


def test_parameter_count_by_hand():
    def bn(c):
        return 2 * c

    def sepconv(c):  # depthwise 3x3 + pointwise 1x1 + BN
        return 9 * c + c * c + bn(c)

    def sep_conv_3x3(c):  # two SepConvs
        return 2 * sepconv(c)

    def conv_1x5_5x1(c):
        return 5 * c * c + 5 * c * c + bn(c)

    def fr(c_in, c):  # two 1x1 convs with c//2 and c - c//2 outputs, then BN
        return c_in * (c // 2) + c_in * (c - c // 2) + bn(c)

    def rcb(c_in, c):  # ReLU-conv1x1-BN
        return c_in * c + bn(c)

    def normal_ops(c):  # sep_conv_3x3, skip(identity), conv_3x3, dil_conv_3x3, conv_1x5_5x1, max_pool_3x3BN
        return sep_conv_3x3(c) + 0 + sepconv(c) + sepconv(c) + conv_1x5_5x1(c) + bn(c)

    def reduce_ops(c):  # skip(stride 2: FR), avg_pool_3x3BN, sep_conv_3x3, skip(identity), conv_1x5_5x1, conv_3x3
        return fr(c, c) + bn(c) + sep_conv_3x3(c) + 0 + conv_1x5_5x1(c) + sepconv(c)

    # C = 4, 5 layers, 3 input channels, 5 classes: cells at C = 4, 8(R), 8, 16(R), 16; cell outputs 3C
    stem = 3 * 4 * 9 + bn(4)  # 116
    cell0 = rcb(4, 4) + rcb(4, 4) + normal_ops(4)  # 24 + 24 + 416 = 464
    cell1 = rcb(4, 8) + rcb(12, 8) + reduce_ops(8)  # 48 + 112 + 1208 = 1368
    cell2 = fr(12, 8) + rcb(24, 8) + normal_ops(8)  # 112 + 208 + 1280 = 1600
    cell3 = rcb(24, 16) + rcb(24, 16) + reduce_ops(16)  # 416 + 416 + 4208 = 5040
    cell4 = fr(24, 16) + rcb(48, 16) + normal_ops(16)  # 416 + 800 + 4352 = 5568
    linear = 48 * 5 + 5  # 245
    assert (normal_ops(4), reduce_ops(8), normal_ops(8), reduce_ops(16), normal_ops(16)) == (416, 1208, 1280, 4208,
                                                                                          4352)
    total = stem + cell0 + cell1 + cell2 + cell3 + cell4 + linear
    assert total == 14401

    net = AugmentCNN(TINY, C=4, layers=5, num_classes=5)
    assert sum(p.numel() for p in net.parameters()) == total
    per_cell = [sum(p.numel() for p in c.parameters()) for c in net.cells]
    assert per_cell == [cell0, cell1, cell2, cell3, cell4]


def test_preset_parameter_count_scales_with_channels():
    """Sanity on a preset: halving C roughly quarters the count (dominated by C^2 pointwise terms)."""
    a = sum(p.numel() for p in AugmentCNN(PRESETS["mini-5cell-1"], C=16, layers=5, num_classes=5).parameters())
    b = sum(p.numel() for p in AugmentCNN(PRESETS["mini-5cell-1"], C=8, layers=5, num_classes=5).parameters())
    assert 3.0 < a / b < 4.0
