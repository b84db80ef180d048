"""The batched few-shot test against the scikit-learn reference: same episodes and images, same predictions.

Parity thresholds (the issue's): the fast classifier predicts the same label as scikit-learn's on at least
99.5% of the queries and the mean accuracy differs by at most 0.1 percentage points, for several seeds,
1- and 5-shot, on random features and on the features of a tiny network.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from eval_lib.fewshot.meta_test import (
    FewShotSettings,
    _episode_features_fast,
    _Features,
    draws_no_random_numbers,
    l2_normalize,
    logistic_regression_batched,
    meta_test,
    predict_episodes,
)
from search_lib.core.errors import UsageError
from search_lib.data import EpisodeDataset, build_transform

PARITY_CLASSIFIERS = ["LR", "NN", "Cosine", "Proto", "SVM"]


def _random_episodes(seed: int, shots: int, n_episodes: int = 30, n_aug: int = 5, ways: int = 5, queries: int = 15,
                     dim: int = 48, noise: float = 1.6):
    """Features of Gaussian classes (hard enough that the classifiers err), L2-normalised, support copies
    tiled as EpisodeDataset tiles them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_episodes, ways, dim))
    sy = np.tile(np.repeat(np.arange(ways), shots), n_aug)
    qy = np.repeat(np.arange(ways), queries)
    sx = centres[:, sy] + noise * rng.normal(size=(n_episodes, sy.size, dim))
    qx = centres[:, qy] + noise * rng.normal(size=(n_episodes, qy.size, dim))
    sx = np.stack([l2_normalize(a) for a in sx])
    qx = np.stack([l2_normalize(a) for a in qx])
    return (torch.from_numpy(sx), torch.from_numpy(np.tile(sy, (n_episodes, 1))), torch.from_numpy(qx),
            np.tile(qy, (n_episodes, 1)))


def _check_parity(name, sx, sy, qx, qy, n_aug, **kw):
    fast = predict_episodes(name, sx, sy, qx, 5, backend="torch", n_aug=n_aug, **kw).numpy()
    ref = predict_episodes(name, sx, sy, qx, 5, backend="sklearn", n_aug=n_aug, **kw).numpy()
    agree = float((fast == ref).mean())
    acc_fast = 100.0 * (fast == qy).mean(1)
    acc_ref = 100.0 * (ref == qy).mean(1)
    assert agree >= 0.995, f"{name}: same labels on only {100 * agree:.2f}% of the queries"
    assert abs(acc_fast.mean() - acc_ref.mean()) <= 0.1, f"{name}: {acc_fast.mean():.3f} vs {acc_ref.mean():.3f}"
    return agree, acc_ref.mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("name", PARITY_CLASSIFIERS)
def test_batched_classifiers_match_sklearn_on_random_features(name, shots, seed):
    sx, sy, qx, qy = _random_episodes(seed, shots, noise=1.6 if shots == 1 else 2.8)
    _, acc = _check_parity(name, sx, sy, qx, qy, n_aug=5)
    assert 25.0 < acc < 99.0  # neither trivial nor chance: the parity means something


@pytest.mark.parametrize("rule", ["mean", "rfs"])
def test_proto_rules_match_the_reference_and_differ(rule):
    sx, sy, qx, qy = _random_episodes(4, 1, noise=2.5)
    _check_parity("Proto", sx, sy, qx, qy, n_aug=5, proto_rule=rule)
    mean = predict_episodes("Proto", sx, sy, qx, 5, n_aug=5, proto_rule="mean")
    rfs = predict_episodes("Proto", sx, sy, qx, 5, n_aug=5, proto_rule="rfs")
    assert not torch.equal(mean, rfs)
    # RFS's rule by hand: query block b (15 of 75) against the prototypes of support copy b
    e, b = 3, 2
    protos = sx[e, b * 5:(b + 1) * 5]  # 1-shot: copy b holds one image per class, in class order
    q = qx[e, b * 15:(b + 1) * 15]
    assert torch.equal(rfs[e, b * 15:(b + 1) * 15], torch.cdist(q, protos).argmin(1))
    with pytest.raises(UsageError, match="proto_rule"):
        predict_episodes("Proto", sx, sy, qx[:, :74], 5, n_aug=5, proto_rule="rfs")


@pytest.mark.parametrize("C", [0.05, 1.0, 20.0])
def test_logistic_regression_reaches_sklearns_optimum(C):
    from sklearn.linear_model import LogisticRegression

    sx, sy, _, _ = _random_episodes(7, 5, n_episodes=3)
    W, b = logistic_regression_batched(sx, sy, 5, C=C)  # the solver alone: no reference refits
    for e in range(3):
        ref = LogisticRegression(C=C, tol=1e-12, max_iter=100000).fit(sx[e].numpy(), sy[e].numpy())
        assert np.abs(ref.coef_ - W[e].numpy()).max() < 1e-5
        # the intercept is defined up to a common shift (unpenalised, softmax)
        db = (ref.intercept_ - ref.intercept_.mean()) - (b[e].numpy() - b[e].numpy().mean())
        assert np.abs(db).max() < 1e-5


def test_near_ties_are_decided_by_the_reference():
    """Degenerate features (all alike, as from an untrained network): scikit-learn stops before the optimum
    and its labels differ from the optimum's; the fast path refits such episodes with scikit-learn."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=24)
    sx = torch.from_numpy(l2_normalize(base + 0.01 * rng.normal(size=(4 * 5, 24)))).reshape(4, 5, 24)
    qx = torch.from_numpy(l2_normalize(base + 0.01 * rng.normal(size=(4 * 15, 24)))).reshape(4, 15, 24)
    sy = torch.arange(5).repeat(4, 1)
    ref = predict_episodes("LR", sx, sy, qx, 5, backend="sklearn")
    optimum = predict_episodes("LR", sx, sy, qx, 5, refit_margin=0.0)
    assert not torch.equal(optimum, ref)  # the reference is not at the optimum here
    assert torch.equal(predict_episodes("LR", sx, sy, qx, 5), ref)


def test_C_and_nonorm_change_the_test():
    sx, sy, qx, qy = _random_episodes(5, 1, noise=2.0)
    strong = predict_episodes("LR", sx, sy, qx, 5, C=1e-3)
    weak = predict_episodes("LR", sx, sy, qx, 5, C=1e3)
    assert not torch.equal(strong, weak)
    _check_parity("LR", sx * 3.0, sy, qx * 3.0, qy, n_aug=5, C=0.3)  # un-normalised features, another C


# ---- the same episodes and images as EpisodeDataset.__getitem__ ----

def _episodes(folder, shots=1, transform="A", n_test_runs=5, seed=0):
    return EpisodeDataset("MiniImageNet", folder, partition="test", n_ways=5, n_shots=shots, n_queries=4,
                          n_aug_support_samples=3, n_test_runs=n_test_runs, transform=transform, image_size=16,
                          seed=seed)


@pytest.mark.parametrize("transform", ["A", "B", "C", "D", "TENAS"])
def test_test_transforms_draw_no_random_numbers(transform):
    image = np.random.default_rng(0).integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
    assert draws_no_random_numbers(build_transform(transform, train=False, image_size=16), image)
    assert not draws_no_random_numbers(build_transform(transform, train=True, image_size=16), image)


def test_support_images_and_plan_are_getitems(synthetic_mini):
    ds = _episodes(synthetic_mini)
    for i in range(len(ds)):
        sx, sy, qx, qy = ds[i]
        plan = ds.episode_plan(i)
        assert torch.equal(ds.support_images(plan), sx)
        assert np.array_equal(plan.support_labels, sy.numpy()) and np.array_equal(plan.query_labels, qy.numpy())
        assert torch.equal(torch.stack([ds.query_transform(ds.split.images[j]) for j in plan.query_idx]), qx)
        assert ds.episode_plan(i).seed == plan.seed


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, 6)

    def forward(self, x, return_features=False):
        feat = nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 4).flatten(1)
        return (feat, self.fc(feat)) if return_features else self.fc(feat)


class _Opaque(torch.utils.data.Dataset):
    """An EpisodeDataset seen only through __getitem__ (forces meta_test's item-by-item path)."""

    def __init__(self, ds):
        self.ds, self.n_shots, self.n_queries, self.n_aug_support_samples = ds, ds.n_shots, ds.n_queries, 3

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def test_fast_features_are_the_per_episode_features(synthetic_mini):
    ds = _episodes(synthetic_mini, shots=2)
    net = _Net().eval()
    feats = _Features(net, torch.device("cpu"), False, 7)  # odd batch size: chunks cross episodes
    groups = list(_episode_features_fast(ds, feats, num_workers=0, episode_batch=2))
    assert [g[0].shape[0] for g in groups] == [2, 2, 1]
    sx = torch.cat([g[0] for g in groups])
    qx = torch.cat([g[2] for g in groups])
    with torch.no_grad():
        for i in range(len(ds)):
            s_img, _, q_img, _ = ds[i]
            torch.testing.assert_close(sx[i], net(s_img, return_features=True)[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(qx[i], net(q_img, return_features=True)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parity_on_tiny_network_features(synthetic_mini, shots, seed):
    ds = EpisodeDataset("MiniImageNet", synthetic_mini, partition="test", n_ways=5, n_shots=shots, n_queries=5,
                        n_aug_support_samples=5, n_test_runs=12, image_size=16, seed=seed)
    feats = _Features(_Net().eval(), torch.device("cpu"), False, 256)
    groups = list(_episode_features_fast(ds, feats, num_workers=0, episode_batch=100))
    sx, sy, qx, qy = (torch.cat([g[k] for g in groups]) for k in range(4))
    sx = torch.from_numpy(np.stack([l2_normalize(a) for a in sx.double().numpy()]))
    qx = torch.from_numpy(np.stack([l2_normalize(a) for a in qx.double().numpy()]))
    for name in PARITY_CLASSIFIERS:
        _check_parity(name, sx, sy, qx, qy.numpy(), n_aug=5)


@pytest.mark.parametrize("classifier", ["LR", "Proto"])
def test_meta_test_fast_path_equals_item_by_item(synthetic_mini, classifier):
    ds = _episodes(synthetic_mini, shots=1, n_test_runs=6)
    net = _Net()
    fast = meta_test(net, ds, FewShotSettings(classifier, episode_batch=4), progress=False)
    slow = meta_test(net, _Opaque(ds), FewShotSettings(classifier), progress=False)
    ref = meta_test(net, ds, FewShotSettings(classifier, backend="sklearn"), progress=False)
    assert fast["accuracies"] == slow["accuracies"] == ref["accuracies"]
    assert fast["backend"] == "torch" and ref["backend"] == "sklearn"
    assert (fast["episodes"], fast["ways"], fast["shots"], fast["queries"]) == (6, 5, 1, 4)


def test_meta_test_rejects_bad_options(synthetic_mini):
    ds = _episodes(synthetic_mini, n_test_runs=1)
    for kw, word in (({"backend": "numpy"}, "back end"), ({"proto_rule": "median"}, "prototype rule"),
                     ({"C": 0.0}, "C must be positive")):
        with pytest.raises(UsageError, match=word):
            meta_test(_Net(), ds, FewShotSettings(**kw), progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", PARITY_CLASSIFIERS)
def test_batched_classifiers_match_sklearn_on_cuda(name):
    for seed, shots in ((0, 1), (1, 5)):
        sx, sy, qx, qy = _random_episodes(seed, shots)
        fast = predict_episodes(name, sx.cuda(), sy.cuda(), qx.cuda(), 5, n_aug=5).cpu().numpy()
        ref = predict_episodes(name, sx, sy, qx, 5, backend="sklearn", n_aug=5).numpy()
        assert (fast == ref).mean() >= 0.995
        assert abs(100 * ((fast == qy).mean() - (ref == qy).mean())) <= 0.1


def test_fused_features_equal_eager_features(synthetic_mini):
    """The fused (BatchNorm folded, channels_last) network gives the eager network's features."""
    from eval_lib.rfs_models.augment_cnn import AugmentCNN
    from search_lib.models.genotypes import PRESETS

    torch.manual_seed(0)
    net = AugmentCNN(C=4, layers=2, num_classes=5, genotype=PRESETS["mini-5cell-1"], in_channels=3)
    for m in net.modules():  # non-trivial running statistics, so that folding them matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    net.eval()
    x = torch.randn(11, 3, 16, 16)
    eager = _Features(net, torch.device("cpu"), False, 4)(x)
    fused = _Features(net, torch.device("cpu"), False, 4, inference="fused")
    out = fused(x)  # chunks of 4, 4 and 3
    assert isinstance(fused.net, torch.fx.GraphModule)
    def bns(module):
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())

    # a BatchNorm right after a convolution is folded into it (those after a pooling or a concatenation stay)
    assert bns(fused.net) < bns(net) // 2
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    assert next(net.parameters()).is_contiguous()  # the caller's network is left as it was
    ds = _episodes(synthetic_mini, shots=1, n_test_runs=6)
    a = meta_test(net, ds, FewShotSettings(inference="eager"), progress=False)
    b = meta_test(net, ds, FewShotSettings(inference="fused"), progress=False)
    assert a["accuracies"] == b["accuracies"]
