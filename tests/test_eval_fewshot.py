"""Few-shot classifiers, the confidence interval, meta_test and the complexity counter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from eval_lib.fewshot.meta_test import (
    CLASSIFIERS,
    FewShotSettings,
    get_classifier,
    l2_normalize,
    mean_confidence_interval,
    meta_test,
)
from eval_lib.rfs_models.complexity import model_complexity
from search_lib.core.errors import UsageError


def _separated(n_ways=5, n_support=5, n_query=15, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ways, dim)) * 10.0
    sy = np.repeat(np.arange(n_ways), n_support)
    qy = np.repeat(np.arange(n_ways), n_query)
    sx = centres[sy] + rng.normal(scale=0.1, size=(sy.size, dim))
    qx = centres[qy] + rng.normal(scale=0.1, size=(qy.size, dim))
    return l2_normalize(sx), sy, l2_normalize(qx), qy


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_classifiers_perfect_on_separated_features(name):
    sx, sy, qx, qy = _separated()
    pred = get_classifier(name)(sx, sy, qx)
    assert (pred == qy).mean() == 1.0


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_classifiers_one_shot(name):
    sx, sy, qx, qy = _separated(n_support=1, seed=3)
    assert (get_classifier(name)(sx, sy, qx) == qy).mean() == 1.0


def test_unknown_classifier_raises_usage_error():
    with pytest.raises(UsageError, match="unknown classifier 'KNN'.*LR"):
        get_classifier("KNN")
    assert get_classifier("lr") is CLASSIFIERS["LR"]


def test_confidence_interval_matches_scipy():
    accs = np.random.default_rng(1).uniform(40, 80, size=37)
    mean, half = mean_confidence_interval(accs)
    lo, hi = stats.t.interval(0.95, len(accs) - 1, loc=np.mean(accs), scale=stats.sem(accs))
    assert mean == pytest.approx(np.mean(accs))
    assert half == pytest.approx((hi - lo) / 2)
    _, half99 = mean_confidence_interval(accs, confidence=0.99)
    assert half99 > half
    assert np.isnan(mean_confidence_interval([50.0])[1])
    with pytest.raises(UsageError):
        mean_confidence_interval([])


class _Episodes(torch.utils.data.Dataset):
    """Stand-in episode dataset: images are class templates plus noise, fixed by (seed, index)."""

    def __init__(self, n_ways=5, n_shots=1, n_queries=4, n_aug=2, n_test_runs=6, noise=0.1, seed=0):
        self.n_ways, self.n_shots, self.n_queries, self.n_aug = n_ways, n_shots, n_queries, n_aug
        self.n_test_runs, self.noise, self.seed = n_test_runs, noise, seed
        self.templates = torch.randn(20, 3, 8, 8, generator=torch.Generator().manual_seed(99))

    def __len__(self):
        return self.n_test_runs

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        classes = torch.randperm(20, generator=g)[: self.n_ways]
        sy = torch.arange(self.n_ways).repeat_interleave(self.n_shots * self.n_aug)
        qy = torch.arange(self.n_ways).repeat_interleave(self.n_queries)
        sx = self.templates[classes[sy]] + self.noise * torch.randn(sy.numel(), 3, 8, 8, generator=g)
        qx = self.templates[classes[qy]] + self.noise * torch.randn(qy.numel(), 3, 8, 8, generator=g)
        return sx, sy, qx, qy


class _Net(nn.Module):
    def __init__(self, num_classes=7):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, num_classes)

    def forward(self, x, return_features=False):
        feat = nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 4).flatten(1)
        logits = self.fc(feat)
        return (feat, logits) if return_features else logits


@pytest.mark.parametrize("classifier", ["LR", "Proto"])
def test_meta_test_perfect_and_reproducible(classifier):
    torch.manual_seed(0)
    net = _Net().train()
    res = meta_test(net, _Episodes(), FewShotSettings(classifier), device="cpu", progress=False)
    assert net.training  # mode restored
    assert res["episodes"] == 6 and res["queries"] == 4 and res["ways"] == 5 and res["shots"] == 1
    assert res["classifier"] == classifier
    assert res["mean"] == pytest.approx(100.0)
    again = meta_test(net, _Episodes(), FewShotSettings(classifier), device="cpu", progress=False)
    assert again["accuracies"] == res["accuracies"]


def test_meta_test_noisy_same_seed_same_accuracies():
    torch.manual_seed(0)
    net = _Net()
    a = meta_test(net, _Episodes(noise=3.0, seed=5), FewShotSettings("NN"), progress=False)
    b = meta_test(net, _Episodes(noise=3.0, seed=5), FewShotSettings("NN"), progress=False)
    c = meta_test(net, _Episodes(noise=3.0, seed=6), FewShotSettings("NN"), progress=False)
    assert a["accuracies"] == b["accuracies"]
    assert a["accuracies"] != c["accuracies"]
    assert 0 <= a["mean"] <= 100 and a["ci95"] > 0


def test_meta_test_logits_and_unknown_classifier():
    net = _Net()
    res = meta_test(net, _Episodes(n_test_runs=2), FewShotSettings("Cosine", use_logits=True), progress=False)
    assert res["features"] == "logits" and res["episodes"] == 2
    with pytest.raises(UsageError):
        meta_test(net, _Episodes(n_test_runs=2), FewShotSettings("bogus"), progress=False)


def test_model_complexity_counts_params_and_macs():
    net = _Net(num_classes=5).train()
    info = model_complexity(net, (3, 8, 8))
    assert info["params"] == sum(p.numel() for p in net.parameters())
    conv_macs = 8 * 8 * 8 * 3 * 3 * 3
    assert info["macs"] >= conv_macs + 8 * 4 * 4 * 5
    assert net.training
    aten = model_complexity(net, (3, 8, 8), backend="aten")
    assert aten["macs"] >= conv_macs
    with pytest.raises(UsageError):
        model_complexity(net, (3, 8, 8), backend="fvcore")


def test_meta_test_on_rfs_episodes_is_seeded(synthetic_mini):
    from search_lib.data import EpisodeDataset

    def episodes(seed):
        return EpisodeDataset("MiniImageNet", synthetic_mini, partition="test", n_ways=5, n_shots=1, n_queries=4,
                              n_aug_support_samples=2, n_test_runs=4, image_size=16, seed=seed)

    torch.manual_seed(0)
    net = _Net()
    a = meta_test(net, episodes(0), FewShotSettings("LR"), progress=False)
    b = meta_test(net, episodes(0), FewShotSettings("LR"), progress=False)
    assert a["accuracies"] == b["accuracies"] and a["episodes"] == 4 and a["queries"] == 4
    assert [episodes(0).episode_indices(i)[0] for i in range(4)] != [episodes(1).episode_indices(i)[0]
                                                                     for i in range(4)]
