"""The zero-cost proxies of the study (eval_lib.study.proxies.ZERO_COST_PROXIES): each against a value computed by hand
or by a few lines of independent numpy on a tiny network, the regression cases of their reference definitions,
and their isolation (order independence; weights, buffers, modes and random states untouched)."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from eval_lib.rfs_models.augment_cnn import AugmentCNN
from eval_lib.rfs_models.complexity import conv_linear_macs
from eval_lib.study.proxies import ZERO_COST_PROXIES
from search_lib.models.genotypes import random_genotype
from search_lib.models.ops import ReLUConvBN

ZC = ZERO_COST_PROXIES
NAMES = ("grad_norm", "snip", "grasp", "fisher", "jacob_cov", "synflow", "naswot", "zico", "swap", "meco")


# ---- a linear layer: every gradient in closed form (numpy, no autograd) ----

@pytest.fixture(scope="module")
def linear_case():
    rng = np.random.default_rng(0)
    W, b = rng.normal(size=(3, 4)), rng.normal(size=3)
    x, y = rng.normal(size=(6, 4)), np.array([0, 1, 2, 2, 1, 0])
    net = nn.Linear(4, 3).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor(W))
        net.bias.copy_(torch.tensor(b))
    z = x @ W.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = (p - np.eye(3)[y]) / len(x)  # ∂(mean cross-entropy)/∂logits
    return {"net": net, "x": torch.tensor(x), "y": torch.tensor(y), "W": W, "b": b, "X": x, "z": z, "p": p, "dz": dz,
            "G": dz.T @ x}


def test_grad_norm_snip_grasp_fisher_of_a_linear_layer(linear_case):
    c = linear_case
    net, x, y, W, G = c["net"], c["x"], c["y"], c["W"], c["G"]
    # the reference scores the weight only: the bias gradient (Σ_n dz_n) is left out
    assert ZC["grad_norm"](net, x, y) == pytest.approx(np.linalg.norm(G), rel=1e-10)
    assert ZC["grad_norm"](net, x, y) < np.linalg.norm(G) + np.linalg.norm(c["dz"].sum(0))
    assert ZC["snip"](net, x, y) == pytest.approx(np.abs(W * G).sum(), rel=1e-10)
    # Hessian of the mean cross-entropy in W: (1/N) Σ_n (diag p_n − p_n p_nᵀ) ⊗ x_n x_nᵀ; GraSP = −Σ W ⊙ (H g)
    hg = sum((np.diag(pn) - np.outer(pn, pn)) @ G @ np.outer(xn, xn) for pn, xn in zip(c["p"], c["X"])) / len(x)
    assert ZC["grasp"](net, x, y) == pytest.approx(-(W * hg).sum(), rel=1e-8)
    # Fisher: ½ mean_n (a_nk ∂L/∂a_nk)² per output unit, spread over its 4 weights
    assert ZC["fisher"](net, x, y) == pytest.approx(4 * (0.5 * (c["z"] * c["dz"]) ** 2).mean(0).sum(), rel=1e-10)


def test_jacob_cov_of_a_linear_layer(linear_case):
    c = linear_case
    # ∂(Σ_k z_k)/∂x = Σ_k W_k for every image: the correlation matrix is all ones, eigenvalues (N, 0, ..., 0)
    n, k = len(c["X"]), 1e-5
    expected = -((math.log(n + k) + 1 / (n + k)) + (n - 1) * (math.log(k) + 1 / k))
    assert ZC["jacob_cov"](c["net"], c["x"], c["y"]) == pytest.approx(expected, rel=1e-6)


def test_zico_of_a_linear_layer(linear_case):
    c = linear_case
    halves = [slice(0, 3), slice(3, 6)]
    grads = []
    for h in halves:  # each half's own mean cross-entropy
        dz = (c["p"][h] - np.eye(3)[c["y"].numpy()[h]]) / 3
        grads.append((dz.T @ c["X"][h]).ravel())
    a, b = grads
    ratio = ((np.abs(a) + np.abs(b)) / 2) / (np.abs(a - b) / 2)  # mean |g| / population std over two values
    assert ZC["zico"](c["net"], c["x"], c["y"]) == pytest.approx(math.log(ratio.sum()), rel=1e-5)


def _conv_bn_net(seed: int, bias: bool):
    """conv -> BatchNorm -> ReLU -> pool -> linear, and a batch of five 2-channel 6x6 images."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=bias), nn.BatchNorm2d(3), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    return net, torch.randn(5, 2, 6, 6), torch.tensor([0, 1, 0, 1, 1])


def test_grad_norm_leaves_out_batchnorm_and_biases():
    net, x, y = _conv_bn_net(2, bias=True)
    work = copy.deepcopy(net)
    nn.functional.cross_entropy(work(x), y).backward()
    weights = float(work[0].weight.grad.norm() + work[5].weight.grad.norm())
    everything = sum(float(p.grad.norm()) for p in work.parameters())
    assert ZC["grad_norm"](net, x, y) == pytest.approx(weights, rel=1e-6)
    assert everything > 1.05 * weights  # the BN and bias gradients the study's first version also summed


# ---- synflow: BN as the identity, float64, one all-ones image, Conv/Linear weights only ----

def test_synflow_is_the_sum_of_the_weights_of_a_linear_layer():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    # R = Σ_o (Σ_i |W_oi| + |b_o|) for an all-ones input, so |W ⊙ ∂R/∂W| = |W|; the bias is not scored
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    assert ZC["synflow"](net, x, y) == pytest.approx(float(net.weight.detach().double().abs().sum()), rel=1e-12)


def test_synflow_treats_batchnorm_as_the_identity_whatever_its_statistics():
    net, x, y = _conv_bn_net(1, bias=False)
    without_bn = copy.deepcopy(net)
    without_bn[1] = nn.Identity()
    expected = ZC["synflow"](without_bn, x, y)
    assert ZC["synflow"](net, x, y) == pytest.approx(expected, rel=1e-12)
    # BN statistics moved by train-mode passes (e.g. another proxy's, or a training step) change nothing,
    # nor do its affine parameters or eval mode: the order-dependence bug of the earlier study
    with torch.no_grad():
        for _ in range(3):
            net(3 * x + 1)
        net[1].weight.fill_(5.0)
        net[1].bias.fill_(-2.0)
        net[1].running_mean.fill_(1.0)
        net[1].running_var.fill_(4.0)
    assert ZC["synflow"](net, x, y) == pytest.approx(expected, rel=1e-12)
    assert ZC["synflow"](net.eval(), x, y) == pytest.approx(expected, rel=1e-12)
    # data-free: one all-ones image whatever the batch holds
    assert ZC["synflow"](net.train(), torch.zeros(2, 2, 6, 6), y[:2]) == pytest.approx(expected, rel=1e-12)


def test_synflow_runs_in_float64():
    net = nn.Sequential(*(nn.Linear(1, 1, bias=False) for _ in range(3)))
    with torch.no_grad():
        for layer in net:
            layer.weight.fill_(-2.0 ** 70)  # the signs go too
    # R = Π |w| = 2^210 ≈ 1.6e63 (past float32's 3.4e38); each |w ∂R/∂w| = R
    value = ZC["synflow"](net, torch.ones(2, 1), torch.zeros(2, dtype=torch.long))
    assert value == 3 * 2.0 ** 210
    assert net[0].weight.dtype == torch.float32  # the network is untouched
    assert torch.equal(net[0].weight, torch.full((1, 1), -2.0 ** 70))


# ---- NASWOT: binary codes of the nn.ReLU inputs, each nn.ReLU once ----

class ReLUBlock(nn.Sequential):
    """A container whose class name holds "ReLU" (like ReLUConvBN): its input is its inner ReLU's input."""


def _identity_linear(n: int) -> nn.Linear:
    layer = nn.Linear(n, n, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(n))
    return layer


def test_naswot_counts_each_relu_once():
    x = torch.tensor([[1.0, 1.0, -1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, 1.0]])
    # codes 110, 100, 011: K_ij = units where images i and j agree = [[3, 2, 1], [2, 3, 0], [1, 0, 3]], det 12
    plain = nn.Sequential(_identity_linear(3), nn.ReLU(), _identity_linear(3))
    assert ZC["naswot"](plain, x, torch.zeros(3, dtype=torch.long)) == pytest.approx(math.log(12))
    # the same code inside a "ReLU" container: still counted once (the reference's name match counts it twice,
    # log det 2K = log 96)
    boxed = nn.Sequential(_identity_linear(3), ReLUBlock(nn.ReLU(), _identity_linear(3)))
    assert ZC["naswot"](boxed, x, torch.zeros(3, dtype=torch.long)) == pytest.approx(math.log(12))
    # the study's ops: ReLUConvBN holds one ReLU
    torch.manual_seed(0)
    conv = ReLUConvBN(2, 2, 1, 1, 0)
    codes = (torch.randn(4, 2, 3, 3) > 0).float()
    assert sum(isinstance(m, nn.ReLU) for m in conv.modules()) == 1
    k = codes.reshape(4, -1) @ codes.reshape(4, -1).T + (1 - codes.reshape(4, -1)) @ (1 - codes.reshape(4, -1)).T
    expected = float(torch.linalg.slogdet(k.double())[1])
    assert ZC["naswot"](conv, codes * 2 - 1, torch.zeros(4, dtype=torch.long)) == pytest.approx(expected)


class UnusedBranch(nn.Module):
    """Runs a ReLU whose output the network does not use (as a cell's unread input preprocessing)."""

    def __init__(self):
        super().__init__()
        self.dead, self.live, self.out = nn.ReLU(), nn.ReLU(), _identity_linear(3)

    def forward(self, x):
        self.dead(-x)
        return self.out(self.live(x))


def test_naswot_leaves_out_relus_the_output_does_not_use():
    x = torch.tensor([[1.0, 1.0, -1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, 1.0]])
    assert ZC["naswot"](UnusedBranch(), x, torch.zeros(3, dtype=torch.long)) == pytest.approx(math.log(12))


# ---- SWAP and MeCo ----

def test_swap_counts_distinct_activation_patterns_of_feature_maps():
    conv = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    negate = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        negate.weight.fill_(-1.0)
    # the last ReLU's input is 2-D: its one neuron (inactive on every image, a fifth pattern) is not counted
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), negate, nn.ReLU())
    x = torch.tensor([[[[1.0, 2.0], [-1.0, 3.0]]], [[[1.0, -2.0], [-1.0, 0.5]]], [[[4.0, -2.0], [1.0, 0.0]]]])
    # the four pixels' patterns over the three images: 111, 100, 001, 110 -> 4 distinct; with pixel 2 = pixel 1's: 3
    assert ZC["swap"](net, x, torch.zeros(3, dtype=torch.long)) == 4.0
    x[:, :, 1, 0] = x[:, :, 0, 1]
    assert ZC["swap"](net, x, torch.zeros(3, dtype=torch.long)) == 3.0


def test_meco_is_the_minimum_eigenvalue_of_the_first_images_channel_correlation():
    conv = nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1))
    net = nn.Sequential(conv)  # two hooked module calls (the Sequential and the conv) on the same feature map
    first = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 3.0], [2.0, 4.0]]])
    r = np.corrcoef(first.reshape(2, -1).numpy())[0, 1]  # eigenvalues of [[1, r], [r, 1]]: 1 ± r
    x = torch.stack([first, torch.randn(2, 2, 2), torch.randn(2, 2, 2)])
    y = torch.zeros(3, dtype=torch.long)
    assert ZC["meco"](net, x, y) == pytest.approx(2 * (1 - abs(r)), rel=1e-5)
    x[1:] = torch.randn(2, 2, 2, 2)  # only the first image counts
    assert ZC["meco"](net, x, y) == pytest.approx(2 * (1 - abs(r)), rel=1e-5)


# ---- Conv/Linear MACs ----

def test_conv_linear_macs_count_only_conv_and_linear_layers():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, bias=True), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(4 * 2 * 2, 5))
    expected = 9 * 3 * 4 * 8 * 8 + (9 * 1 + 1) * 4 * 4 * 4 + (16 + 1) * 5
    assert conv_linear_macs(net, (3, 8, 8)) == expected
    assert net.training  # the caller's network is untouched


# ---- the registry: every proxy isolated from the network and from the others ----

class TinyNet(nn.Module):
    """Conv-BN-ReLU, a ReLU container, dropout (random numbers in train mode), a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.block = ReLUConvBN(4, 4, 3, 1, 1)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.head(self.drop(x.mean(dim=(2, 3))))


def _random_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def _same_states(a, b) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


@pytest.mark.parametrize("make", ["tiny", "augment_cnn"])
def test_proxies_do_not_depend_on_their_order_nor_change_the_network(make):
    torch.manual_seed(3)
    if make == "tiny":
        net = TinyNet()
        x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    else:
        net = AugmentCNN(random_genotype(seed=4), C=4, layers=2, num_classes=3, in_channels=1)
        x, y = torch.randn(6, 1, 12, 12), torch.randint(0, 3, (6,))
    assert tuple(ZC) == NAMES
    before = copy.deepcopy(net.state_dict())
    modes = [m.training for m in net.modules()]
    random.seed(5)
    np.random.seed(5)
    states = _random_states()
    forward = {name: ZC[name](net, x, y) for name in NAMES}
    assert _same_states(states, _random_states())
    backward = {name: ZC[name](net, x, y) for name in reversed(NAMES)}
    assert forward == backward
    assert all(isinstance(v, float) for v in forward.values())
    assert all(math.isfinite(v) for k, v in forward.items()), forward
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in net.modules()] == modes and all(p.grad is None for p in net.parameters())
    assert _same_states(states, _random_states())
    # the proxies see the network in train mode: in eval mode the BN-dependent ones change
    assert ZC["grad_norm"](net.eval(), x, y) != forward["grad_norm"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_proxies_on_cuda_match_the_cpu_and_keep_the_cuda_random_state():
    torch.manual_seed(3)
    net = AugmentCNN(random_genotype(seed=4), C=4, layers=2, num_classes=3, in_channels=1)
    x, y = torch.randn(6, 1, 12, 12), torch.randint(0, 3, (6,))
    cpu = {name: ZC[name](net, x, y) for name in NAMES}
    gpu_net, gx, gy = copy.deepcopy(net).cuda(), x.cuda(), y.cuda()
    state = torch.cuda.get_rng_state()
    gpu = {name: ZC[name](gpu_net, gx, gy) for name in NAMES}
    assert torch.equal(state, torch.cuda.get_rng_state())
    for name in NAMES:  # float32 kernels differ in rounding; zico's ratios amplify it
        assert gpu[name] == pytest.approx(cpu[name], rel=1e-3 if name == "zico" else 1e-4), name
