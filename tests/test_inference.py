"""The few-shot test's rewritten network (eval_lib/fewshot/inference.py) against the network as it is."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eval_lib.fewshot.inference import inference_network, shifted_for_stride2
from eval_lib.rfs_models.augment_cnn import AugmentCNN
from search_lib.core.errors import UsageError
from search_lib.models.genotypes import PRESETS, random_genotype
from search_lib.models.space import SearchSpace


class _Features(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x, return_features=True)[0]


def _network(genotype, seed=0, C=4, layers=5):
    torch.manual_seed(seed)
    net = AugmentCNN(genotype, C=C, layers=layers, num_classes=5)
    for m in net.modules():  # non-trivial running statistics, so that folding them matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return _Features(net).eval()


def _count(gm, pred) -> int:
    return sum(1 for n in gm.graph.nodes if pred(n))


DARTS = SearchSpace("darts", 3)


@pytest.mark.parametrize("size", [16, 15, 9])  # even; odd at the first reduction; odd at the second
@pytest.mark.parametrize("genotype", [PRESETS["mini-5cell-1"], random_genotype(seed=3),
                                      random_genotype(DARTS, seed=1), random_genotype(DARTS, seed=2)],
                         ids=["mini-5cell-1", "fewshot-random", "darts-random-1", "darts-random-2"])
def test_rewritten_network_gives_the_eager_features(genotype, size):
    net = _network(genotype)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast = inference_network(net, "fused")
    x = torch.randn(6, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), net(x),
                                   rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the caller's network untouched
    assert next(net.parameters()).is_contiguous()


def test_the_rewrites_apply():
    """The preset's cells: ReLUs of a shared input, node sums, FactorizedReduce after each reduction."""
    net = _network(PRESETS["mini-5cell-1"])
    traced = torch.fx.symbolic_trace(net)
    fast = inference_network(net, "fused")
    relu = lambda gm: lambda n: n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU)  # noqa: E731
    assert _count(fast, relu(fast)) < _count(traced, relu(traced))
    relu_inputs = [n.args[0] for n in fast.graph.nodes if relu(fast)(n)]
    assert len(relu_inputs) == len(set(relu_inputs))  # one ReLU per tensor
    zero_add = lambda n: n.op == "call_function" and n.target is operator.add and n.args[0] == 0  # noqa: E731
    assert _count(traced, zero_add) > 0 and _count(fast, zero_add) == 0
    pads = lambda n: n.op == "call_function" and n.target is F.pad  # noqa: E731
    assert _count(traced, pads) > 0 and _count(fast, pads) == 0
    assert _count(fast, lambda n: n.target is shifted_for_stride2) == _count(traced, pads)
    bns = lambda m: sum(isinstance(k, nn.BatchNorm2d) for k in m.modules())  # noqa: E731
    assert bns(fast) < bns(net) // 2  # those after a conv are folded (after a pooling or a concat they stay)


@pytest.mark.parametrize("h,w", [(8, 8), (7, 7), (8, 7), (7, 8), (2, 2), (1, 1)])
def test_shift_equals_pad_for_a_stride2_1x1_conv(h, w):
    conv = nn.Conv2d(3, 4, 1, stride=2, bias=False)
    x = torch.randn(2, 3, h, w)
    ref = conv(F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:])
    torch.testing.assert_close(conv(shifted_for_stride2(x)), ref, rtol=0, atol=0)


def test_eager_is_the_network_itself_and_bad_modes_are_refused():
    net = _network(PRESETS["mini-5cell-1"], layers=2)
    assert inference_network(net, "eager") is net
    with pytest.raises(UsageError, match="fused, eager"):
        inference_network(net, "compiled")


def test_untraceable_network_runs_eagerly_with_a_warning(caplog):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x  # data-dependent control flow: fx cannot trace it

    net = Branchy().eval()
    fast = inference_network(net, "fused")
    assert not isinstance(fast, torch.fx.GraphModule) and "could not rewrite" in caplog.text
    x = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), net(x))


def test_tensors_changed_in_place_are_not_shared():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.ReLU(), nn.ReLU()

        def forward(self, x):
            y = self.a(x)
            z = self.b(x)
            z.mul_(2.0)  # would also double y if the two ReLUs were merged
            return y + z

    net = InPlace().eval()
    fast = inference_network(net, "fused")
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fast(x), net(x))
    assert _count(fast, lambda n: n.op == "call_module") == 2


def test_the_test_rewrites_the_network_once_per_state_of_its_weights(monkeypatch):
    """meta_test is called once per split and shot with the same weights: one rewrite serves them all, and a
    change of the weights (training on, loading others) makes a new one."""
    import eval_lib.fewshot.meta_test as fewshot

    made = []
    real = fewshot.inference_network
    monkeypatch.setattr(fewshot, "inference_network", lambda net, mode: made.append(mode) or real(net, mode))
    torch.manual_seed(0)
    net = AugmentCNN(PRESETS["mini-5cell-1"], C=4, layers=5, num_classes=5).eval()
    x = torch.randn(6, 3, 16, 16)
    first = fewshot._Features(net, torch.device("cpu"), False, 64, "fused")(x)
    second = fewshot._Features(net, torch.device("cpu"), False, 64, "fused")(x)
    assert made == ["fused"] and torch.equal(first, second)
    with torch.no_grad():
        net.stem[0].weight.mul_(2.0)  # in place, as an optimiser step
    changed = fewshot._Features(net, torch.device("cpu"), False, 64, "fused")(x)
    assert made == ["fused", "fused"] and not torch.equal(changed, first)
    fewshot._Features(net, torch.device("cpu"), True, 64, "fused")  # logits instead of features: another rewrite
    assert len(made) == 3


def test_the_cpu_feature_batch_follows_the_activation_size():
    """64 images of the demo's network (8 channels after the stem, 32 x 32) is the reference: narrower networks
    and smaller images take more per pass, up to 256."""
    from eval_lib.fewshot.meta_test import _feature_batch

    def batch(C, size):
        return _feature_batch(AugmentCNN(PRESETS["mini-5cell-1"], C=C, layers=2, num_classes=5),
                              torch.zeros(1, 3, size, size))

    assert (batch(8, 32), batch(2, 16), batch(4, 32), batch(48, 84)) == (64, 256, 128, 64)
    assert _feature_batch(nn.Linear(3, 2), torch.zeros(1, 3)) == 64  # no convolution: the reference size
