"""Linear-region counting (search_lib/search/linear_regions.py, docs/method.md §3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from search_lib.models.genotypes import PRESETS, Genotype, alphas_from_genotype
from search_lib.models.space import DEFAULT_SPACE
from search_lib.search.linear_regions import (
    LinearRegionScorer,
    count_distinct_codes,
    count_linear_regions,
    relu_codes,
    sample_crops,
)


def breakpoint_net(breakpoints):
    """1-D input, one ReLU unit per breakpoint b_i: relu(x - b_i) (weights 1, biases -b_i)."""
    lin = nn.Linear(1, len(breakpoints))
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.copy_(-torch.tensor(breakpoints))
    return nn.Sequential(lin, nn.ReLU())


def points(*xs):
    return torch.tensor(xs, dtype=torch.float32).reshape(-1, 1)


# ---------------------------------------------------------------------------------------------------
# Known counts


def test_relu_codes_of_breakpoint_net():
    net = breakpoint_net([-1.0, 0.0, 1.0])
    codes = relu_codes(net, points(-2.0, -0.5, 0.5, 2.0))
    assert codes.dtype == torch.bool and codes.shape == (4, 3)
    assert codes.tolist() == [[False, False, False], [True, False, False], [True, True, False], [True, True, True]]


def test_count_four_regions():
    net = breakpoint_net([-1.0, 0.0, 1.0])  # 3 breakpoints on a line: 4 regions
    x = points(-3.0, -2.0, -0.7, -0.2, 0.3, 0.9, 1.5, 4.0)  # two points in each region
    assert count_linear_regions(net, [x]) == 4


def test_count_two_regions():
    net = breakpoint_net([-1.0, 0.0, 1.0])
    x = points(0.1, 0.2, 0.5, 0.9, 1.1, 3.0)  # regions (0, 1) and (1, inf) only
    assert count_linear_regions(net, [x]) == 2
    assert count_linear_regions(net, [points(-5.0, -4.0)]) == 1


def test_count_across_batches_is_global():
    net = breakpoint_net([-1.0, 0.0, 1.0])
    b1 = points(-2.0, -0.5)  # regions 0, 1
    b2 = points(-0.4, 0.5)  # regions 1, 2
    assert count_linear_regions(net, [b1, b2]) == 3  # not 2 + 2: shared region counted once
    assert count_linear_regions(net, [b1, b2, points(5.0)]) == 4


def test_two_layer_net_counts_all_relus():
    """Codes include every ReLU of the network, not only the first."""
    lin1 = nn.Linear(1, 1)
    lin2 = nn.Linear(1, 1)
    with torch.no_grad():
        lin1.weight.fill_(1.0)
        lin1.bias.fill_(0.0)  # first ReLU on for x > 0
        lin2.weight.fill_(1.0)
        lin2.bias.fill_(-1.0)  # second ReLU on for relu(x) > 1, i.e. x > 1
    net = nn.Sequential(lin1, nn.ReLU(), lin2, nn.ReLU())
    assert relu_codes(net, points(0.5)).shape == (1, 2)
    assert count_linear_regions(net, [points(-1.0, 0.5, 2.0)]) == 3
    assert count_linear_regions(net, [points(0.2, 0.5)]) == 1


def test_no_relu_network_has_one_region():
    assert count_linear_regions(nn.Linear(1, 2), [points(-1.0, 1.0)]) == 1


def test_hooks_removed_after_counting():
    net = breakpoint_net([0.0])
    relu_codes(net, points(1.0))
    assert all(not m._forward_hooks for m in net.modules())


# ---------------------------------------------------------------------------------------------------
# count_distinct_codes vs the original formula


def original_formula(codes: torch.Tensor) -> float:
    """sum_i 1 / #{j : code_j = code_i}, as the original TE-NAS code computed it (loop, no dedup)."""
    rows = [tuple(r) for r in codes.tolist()]
    total = 0.0
    for r in rows:
        total += 1.0 / sum(1 for s in rows if s == r)
    return total


@pytest.mark.parametrize("n,bits,seed", [(200, 5, 0), (300, 7, 1), (50, 12, 2), (64, 1, 3)])
def test_count_distinct_codes_equals_original_formula(n, bits, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.rand(n, bits, generator=g) > 0.5
    expected = original_formula(codes)
    got = count_distinct_codes(codes)
    assert got == round(expected)
    assert abs(expected - round(expected)) < 1e-9
    assert got == len(set(map(tuple, codes.tolist())))


@pytest.mark.parametrize("bits", [8, 9, 15, 1182])  # whole bytes, a padded last byte, a search's code length
def test_packed_count_equals_torch_unique(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.rand(400, bits, generator=g) > 0.5
    codes[200:300] = codes[:100]  # duplicates
    codes[300:, :-1] = codes[:100, :-1]  # rows differing in the last bit only
    assert count_distinct_codes(codes) == torch.unique(codes, dim=0).shape[0]


def test_count_distinct_codes_edge_cases():
    assert count_distinct_codes(torch.zeros(5, 3, dtype=torch.bool)) == 1
    assert count_distinct_codes(torch.eye(4, dtype=torch.bool)) == 4


# ---------------------------------------------------------------------------------------------------
# sample_crops


@pytest.fixture(scope="module")
def small_images():
    return torch.randn(4, 3, 10, 12, generator=torch.Generator().manual_seed(0))


def test_sample_crops_shapes(small_images):
    crops = sample_crops(small_images, n_batches=3, batch_size=40, crop=3, seed=0)
    assert len(crops) == 3
    for c in crops:
        assert c.shape == (40, 1, 3, 3) and c.dtype == small_images.dtype
    crops5 = sample_crops(small_images, n_batches=2, batch_size=7, crop=5, seed=0)
    assert [c.shape for c in crops5] == [(7, 1, 5, 5)] * 2


def test_sample_crops_are_real_crops(small_images):
    crops = torch.cat(sample_crops(small_images, n_batches=2, batch_size=50, crop=3, seed=1))
    # all 3x3 patches of every channel of every image (distinct random values make matches unambiguous)
    patches = small_images.unfold(2, 3, 1).unfold(3, 3, 1)  # (N, C, H-2, W-2, 3, 3)
    cand = patches.reshape(-1, 9)
    N, C, Hp, Wp = patches.shape[:4]
    found = set()
    for crop in crops.reshape(-1, 9):
        d = (cand - crop).abs().max(dim=1).values
        k = int(torch.argmin(d))
        assert d[k] == 0, "a crop is not a slice of any image channel"
        found.add(k)
    # decode one match and check it against plain slicing
    crop0 = crops[0, 0]
    k = int(torch.argmin((cand - crop0.reshape(9)).abs().max(dim=1).values))
    n, rest = divmod(k, C * Hp * Wp)
    c, rest = divmod(rest, Hp * Wp)
    y, x = divmod(rest, Wp)
    assert torch.equal(small_images[n, c, y:y + 3, x:x + 3], crop0)
    # crops come from several images, channels and positions
    decoded = [divmod(divmod(k, Hp * Wp)[0], C) for k in found]
    assert len({n for n, _ in decoded}) > 1 and len({c for _, c in decoded}) > 1
    assert len(found) > 50


def test_sample_crops_seeded(small_images):
    a = sample_crops(small_images, n_batches=2, batch_size=20, seed=5)
    b = sample_crops(small_images, n_batches=2, batch_size=20, seed=5)
    c = sample_crops(small_images, n_batches=2, batch_size=20, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


# ---------------------------------------------------------------------------------------------------
# LinearRegionScorer on the thin supernet


@pytest.fixture(scope="module")
def crops():
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return sample_crops(images, n_batches=2, batch_size=1000, crop=3, seed=0)


# Only pools and skips: the pruned cells hold no ReLU-conv ops at all.
POOLS = [[("skip_connect", 0), ("avg_pool_3x3BN", 1)], [("max_pool_3x3BN", 0), ("skip_connect", 2)],
         [("avg_pool_3x3BN", 1), ("skip_connect", 3)]]
POOL_GENOTYPE = Genotype(normal=POOLS, normal_concat=[2, 3, 4], reduce=POOLS, reduce_concat=[2, 3, 4])


def test_scorer_network_is_thin(crops):
    s = LinearRegionScorer(crops, DEFAULT_SPACE, torch.device("cpu"))
    assert isinstance(s.net.stem, nn.Identity) and len(s.net.cells) == 2
    assert [c.reduction for c in s.net.cells] == [False, True]
    assert s.net.training


def test_scorer_seeded_and_pruning_changes_count(crops):
    an0 = torch.zeros(9, 8)
    ar0 = torch.zeros(9, 8)
    an, ar = alphas_from_genotype(POOL_GENOTYPE, DEFAULT_SPACE)

    s = LinearRegionScorer(crops, DEFAULT_SPACE, torch.device("cpu"))
    s.reinit(0)
    full = s.score(an0, ar0)
    pruned = s.score(an, ar)
    assert 1 < full <= 2000 and 1 <= pruned <= 2000
    # pruning ops changes the code count (measured, seeds 0-3: ~1940 codes full vs ~1905 pruned)
    assert abs(pruned - full) > 10
    assert s.score(an0, ar0) == full  # scoring is repeatable

    other = LinearRegionScorer(crops, DEFAULT_SPACE, torch.device("cpu"))
    other.reinit(0)
    assert other.score(an0, ar0) == full  # same seed, same count
    assert other.score(an, ar) == pruned
    counts = set()
    for seed in (1, 2, 3):
        other.reinit(seed)
        counts.add(other.score(an0, ar0))
    assert counts != {full}  # the initialisation matters


def test_scorer_codes_only_from_running_ops(crops):
    """A pruned op's ReLUs do not run, so they contribute no code bits."""
    s = LinearRegionScorer(crops, DEFAULT_SPACE, torch.device("cpu"))
    s.reinit(0)
    an, ar = alphas_from_genotype(PRESETS["mini-5cell-1"], DEFAULT_SPACE)
    s.net.set_alphas(torch.zeros(9, 8), torch.zeros(9, 8))
    width_full = relu_codes(s.net, crops[0]).shape[1]
    s.net.set_alphas(an, ar)
    width_pruned = relu_codes(s.net, crops[0]).shape[1]
    assert 0 < width_pruned < width_full
