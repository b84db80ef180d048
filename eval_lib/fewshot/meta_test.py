"""Few-shot testing of a trained network (the RFS protocol).

For every episode the network's penultimate features (or its logits) of the support and query images are
extracted in eval mode, L2-normalised, and a simple classifier fitted on the support set labels the
queries. The mean accuracy over the episodes is reported with its 95% Student-t confidence interval.
Accuracies are in percent throughout.

Two back ends give the same numbers (tests/test_fewshot_batched.py checks it against scikit-learn):

* ``torch`` (default): features of every query image are computed once, in large batches, and reused by
  every episode that draws it (the test transform draws no random numbers, which is checked); the support
  copies of each episode are transformed exactly as ``EpisodeDataset.__getitem__`` does (same seeded
  generator, same order) and their features computed many episodes at a time; the classifiers are fitted on
  many episodes at once in float64 (logistic regression: a batched Newton-CG solve of scikit-learn's
  objective; NN / Cosine / Proto: closed form; SVM stays scikit-learn per episode).
* ``sklearn``: the reference classifiers, one scikit-learn fit per episode on the same features.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import weakref
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from eval_lib.fewshot.classifiers import (
    BACKENDS,
    CLASSIFIERS,
    PROTO_RULES,
    Classifier,
    canonical_classifier,
    get_classifier,
    l2_normalize,
    logistic_regression_batched,
    predict_batched,
    predict_episodes,
)
from eval_lib.fewshot.inference import INFERENCE_MODES, inference_network
from search_lib.core import turns
from search_lib.core.errors import DataError, UsageError
from search_lib.core.threads import ThreadTuner
from search_lib.core.utils import resolve_device

logger = logging.getLogger("metantknas.eval")

# --------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------

def mean_confidence_interval(accs: Iterable[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the Student-t confidence interval of the mean.

    The half-width is ``t.ppf((1 + confidence) / 2, n - 1) * std(ddof=1) / sqrt(n)``; it is NaN for a
    single value (the interval is undefined).
    """
    from scipy import stats

    a = np.asarray(list(accs), dtype=np.float64)
    if a.size == 0:
        raise UsageError("no accuracies to summarise; run at least one episode (--n_test_runs >= 1)")
    mean = float(a.mean())
    if a.size < 2:
        return mean, float("nan")
    sem = float(a.std(ddof=1) / math.sqrt(a.size))
    half = float(stats.t.ppf((1.0 + confidence) / 2.0, a.size - 1) * sem)
    return mean, half


# --------------------------------------------------------------------------------------------------
# feature extraction and the test loop
# --------------------------------------------------------------------------------------------------

def _as_images(x) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() < 3:
        raise DataError(f"episode images have shape {tuple(x.shape)}; expected (N, C, H, W)")
    return x.reshape(-1, *x.shape[-3:])


def _as_labels(y) -> np.ndarray:
    return torch.as_tensor(y).reshape(-1).cpu().numpy().astype(np.int64)


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, device: torch.device,
                     use_logits: bool = False, batch_size: int = 256) -> np.ndarray:
    """Penultimate features (or logits) of ``images`` as a float64 numpy array, in chunks of batch_size."""
    outs = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size].to(device, dtype=torch.float32, non_blocking=True)
        if use_logits:
            out = model(chunk)
        else:
            out = model(chunk, return_features=True)
            out = out[0]
        outs.append(out.reshape(out.shape[0], -1).double().cpu())
    return torch.cat(outs).numpy()


def _rng_states() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def draws_no_random_numbers(transform, image) -> bool:
    """True when ``transform(image)`` leaves torch's, Python's and numpy's global generators untouched (so
    its output depends on the image alone and may be computed once per image)."""
    with torch.random.fork_rng(devices=[]):
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            before = _rng_states()
            transform(image)
            after = _rng_states()
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
    return (torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2]))


class _EpisodeSupports(torch.utils.data.Dataset):
    """Item i: the transformed support copies of episode i of an EpisodeDataset (for loader workers)."""

    def __init__(self, episodes, plans):
        self.episodes, self.plans = episodes, plans

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.episodes.support_images(self.plans[i])


class _FeatureNet(nn.Module):
    """The part of the network the test classifies: penultimate features (or logits), flattened."""

    def __init__(self, model: nn.Module, use_logits: bool):
        super().__init__()
        self.model, self.use_logits = model, use_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x) if self.use_logits else self.model(x, return_features=True)[0]
        return out.reshape(out.shape[0], -1)


def _feature_batch(model: nn.Module, images: torch.Tensor) -> int:
    """Images per forward pass on the CPU: as many as keep the activations about as large as 64 images of the
    demo's network (8 channels after the stem, 32 x 32), the size that stays in cache (64 was ~20% faster than
    256 there), between 64 and 256. A narrower network or smaller images take more per pass, where the
    per-call overhead dominates: the digits fixture's (2 channels, 16 x 16) forward took 16% less time per
    image at 256 than at 64."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None or images.dim() != 4:
        return 64
    per_image = conv.out_channels * images.shape[-2] * images.shape[-1]
    return int(min(256, max(64, 64 * (8 * 32 * 32) // max(1, per_image))))


def _weights_key(model: nn.Module) -> tuple:
    """Where every parameter and buffer lives and its version counter (in-place updates raise it): a network
    trained further, or given other weights, gets another key."""
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


_REWRITTEN: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


class _Features:
    """The network's features (float32, on the device) of image batches, ``batch_size`` images at a time.

    ``inference``: ``eager`` runs the network as it is (the reference); ``fused`` runs the rewritten copy
    of `eval_lib.fewshot.inference` (BatchNorm folded into the convolutions, repeated ReLUs and copies removed,
    channels_last): the same features up to float rounding (about 1e-6) and 1.6x as fast on the demo's
    test on the CPU, where the forward pass over the augmented support copies dominates the test.
    """

    def __init__(self, model: nn.Module, device: torch.device, use_logits: bool, batch_size: int | None,
                 inference: str = "eager", tuner: ThreadTuner | None = None):
        self.device, self.inference = device, inference
        self.batch_size = None if batch_size is None else int(batch_size)  # None: `_feature_batch`
        self.model = model
        self.tuner = tuner if device.type == "cpu" else None
        # the rewrite (a deep copy, traced and fused) is made once per network state: the test of a run calls
        # meta_test once per split and shot with the same weights
        key = (use_logits, inference, model.training, _weights_key(model))
        made = _REWRITTEN.get(model)
        if made is not None and made[0] == key:
            self.net = made[1]
        else:
            net = _FeatureNet(model, use_logits)
            net.training = model.training
            self.net = inference_network(net, inference)
            _REWRITTEN[model] = (key, self.net)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        outs = []
        step = self.batch_size or _feature_batch(self.model, images)
        for start in range(0, images.shape[0], step):
            chunk = images[start:start + step].to(self.device, dtype=torch.float32, non_blocking=True)
            if self.inference == "fused":
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            with turns.step(), self.tuner.step(chunk.shape[0]) if self.tuner is not None else nullcontext():
                outs.append(self.net(chunk).float())
        return torch.cat(outs)


def _fast_path_ok(episode_dataset) -> bool:
    """EpisodeDataset-like (episode_plan / support_images) with a query transform that draws no random numbers."""
    needed = ("episode_plan", "support_images", "query_transform", "split")
    if not all(hasattr(episode_dataset, a) for a in needed):
        return False
    plan = episode_dataset.episode_plan(0)
    return draws_no_random_numbers(episode_dataset.query_transform, episode_dataset.split.images[plan.query_idx[0]])


def _episode_features_fast(episode_dataset, feats: _Features, num_workers: int,
                           episode_batch: int) -> Iterator[tuple]:
    """(support features, support labels, query features, query labels) per group of up to episode_batch
    episodes, stacked: (e, n, D), (e, n), (e, m, D), (e, m). Queries: each image's features computed once.
    The episodes' images are concatenated into ordinary (pageable) memory, from which a copy to a GPU is
    synchronous whatever ``non_blocking`` says: pinning them first would only add a copy."""
    n = len(episode_dataset)
    plans = [episode_dataset.episode_plan(i) for i in range(n)]
    uniq, inverse = np.unique(np.concatenate([p.query_idx for p in plans]), return_inverse=True)
    m = plans[0].query_idx.size
    qpos = torch.from_numpy(inverse.reshape(n, m))
    images = episode_dataset.split.images
    tf = episode_dataset.query_transform
    qfeat = torch.cat([feats(torch.stack([tf(images[i]) for i in uniq[s:s + 1024]]))
                       for s in range(0, uniq.size, 1024)])
    loader = torch.utils.data.DataLoader(_EpisodeSupports(episode_dataset, plans), batch_size=None, shuffle=False,
                                         num_workers=num_workers)
    group: list[torch.Tensor] = []
    start = 0
    for sx_img in loader:
        group.append(sx_img)
        if len(group) == episode_batch or start + len(group) == n:
            e = len(group)
            sfeat = feats(torch.cat(group)).reshape(e, group[0].shape[0], -1)
            idx = range(start, start + e)
            sy = torch.from_numpy(np.stack([plans[i].support_labels for i in idx]).astype(np.int64))
            qy = torch.from_numpy(np.stack([plans[i].query_labels for i in idx]).astype(np.int64))
            yield sfeat, sy, qfeat[qpos[start:start + e].to(qfeat.device)], qy
            start += e
            group = []


def _episode_features_generic(episode_dataset, feats: _Features, num_workers: int, pin: bool) -> Iterator[tuple]:
    """The same groups (of one episode) from any dataset of (support_xs, support_ys, query_xs, query_ys); on
    CUDA the loader pins each episode, whose images then go to the GPU without a host copy in between."""
    loader = torch.utils.data.DataLoader(episode_dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                                         pin_memory=pin)
    for support_xs, support_ys, query_xs, query_ys in loader:
        sx_img, qx_img = _as_images(support_xs), _as_images(query_xs)
        sy, qy = _as_labels(support_ys), _as_labels(query_ys)
        if sx_img.shape[0] != sy.shape[0] or qx_img.shape[0] != qy.shape[0]:
            raise DataError("episode images and labels differ in number; check the episode dataset")
        yield (feats(sx_img)[None], torch.from_numpy(sy)[None], feats(qx_img)[None], torch.from_numpy(qy)[None])


def _l2_normalize_t(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


@dataclass(frozen=True)
class FewShotSettings:
    """How `meta_test` tests: one object, validated when it is made (`TrainConfig.fewshot_settings` makes it
    from the flags of the same names; the defaults here are the reference's).

    ``classifier``: LR, SVM, NN, Cosine or Proto (any case); ``use_logits``: classify the logits instead of
    the penultimate features; ``backend``: ``torch`` (batched classifiers) or ``sklearn`` (the reference);
    ``C``: the logistic regression's inverse regularisation; ``normalize``: L2-normalise the features;
    ``proto_rule``: ``mean`` or ``rfs`` (see `classifiers._prototype`); ``episode_batch``: episodes whose
    supports and classifiers are processed together; ``inference``: ``eager`` or ``fused`` (see `_Features`);
    ``batch_size``: images per forward pass (None: on the CPU from the activation size, `_feature_batch`;
    256 elsewhere); ``num_workers``: loader worker processes.
    """

    classifier: str = "LR"
    use_logits: bool = False
    backend: str = "torch"
    C: float = 1.0
    normalize: bool = True
    proto_rule: str = "mean"
    episode_batch: int = 100
    inference: str = "eager"
    batch_size: int | None = None
    num_workers: int = 0

    def __post_init__(self):
        object.__setattr__(self, "classifier", canonical_classifier(self.classifier))
        if self.backend not in BACKENDS:
            raise UsageError(f"unknown --fewshot_backend {self.backend!r} (the few-shot back end); use one of "
                             f"{', '.join(BACKENDS)}")
        if self.proto_rule not in PROTO_RULES:
            raise UsageError(f"unknown --proto_rule {self.proto_rule!r} (the prototype rule); use one of "
                             f"{', '.join(PROTO_RULES)}")
        if not (isinstance(self.C, (int, float)) and not isinstance(self.C, bool) and math.isfinite(self.C)
                and self.C > 0):
            raise UsageError(f"--C must be a positive number, got {self.C!r} (the logistic regression's C must be "
                             f"positive, e.g. 1)")
        if self.inference not in INFERENCE_MODES:
            raise UsageError(f"unknown --inference {self.inference!r}; use one of {', '.join(INFERENCE_MODES)}")
        for name in ("episode_batch", "batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise UsageError(f"--{name} must be a positive integer, got {value!r}")
        if isinstance(self.num_workers, bool) or int(self.num_workers) != self.num_workers or self.num_workers < 0:
            raise UsageError(f"--num_workers must be >= 0, got {self.num_workers!r}")

    def replace(self, **changes) -> FewShotSettings:
        return dataclasses.replace(self, **changes)


def meta_test(model: nn.Module, episode_dataset, settings: FewShotSettings | None = None, *,
              device: torch.device | str | None = None, progress: bool = True, desc: str = "meta-test",
              tuner: ThreadTuner | None = None) -> dict:
    """Few-shot accuracy of ``model`` over every episode of ``episode_dataset``, tested as ``settings`` says
    (default: `FewShotSettings()`).

    Each item of the dataset is ``(support_xs, support_ys, query_xs, query_ys)``. For an `EpisodeDataset`
    whose query transform draws no random numbers, each query image's features are computed once and the
    support copies of ``episode_batch`` episodes at a time (the same images ``__getitem__`` gives); other
    datasets are read item by item. ``device``: default the model's; ``tuner``: on the CPU, a
    `search_lib.core.threads.ThreadTuner` that chooses torch's thread count by timing the forward passes (the
    caller closes it). Returns a dict with ``mean`` and ``ci95`` (percent), ``episodes``, ``queries`` (per
    class), ``ways``, ``shots``, ``classifier`` and the per-episode ``accuracies`` (percent).
    """
    settings = FewShotSettings() if settings is None else settings
    device = _test_device(model, device)
    if len(episode_dataset) < 1:
        raise DataError("the episode dataset is empty; use --n_test_runs >= 1")
    was_training = model.training
    model.eval()
    try:
        accs, ways, queries = _test_episodes(model, episode_dataset, settings, device, progress, desc, tuner)
    finally:
        model.train(was_training)
    mean, ci95 = mean_confidence_interval(accs)
    return {
        "mean": mean,
        "ci95": ci95,
        "episodes": len(accs),
        "ways": ways,
        "shots": int(getattr(episode_dataset, "n_shots", 0)) or None,
        "queries": int(getattr(episode_dataset, "n_queries", queries) or queries),
        "classifier": settings.classifier,
        "features": "logits" if settings.use_logits else "penultimate",
        "backend": settings.backend,
        "accuracies": accs,
    }


def _test_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is None:
        return next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.device(resolve_device(device) if isinstance(device, str) else device)


def _test_episodes(model: nn.Module, episode_dataset, settings: FewShotSettings, device: torch.device,
                   progress: bool, desc: str, tuner: ThreadTuner | None) -> tuple[list[float], int, int]:
    """The per-episode accuracies (percent), the ways and the queries per class of the first episode."""
    n_aug = int(getattr(episode_dataset, "n_aug_support_samples", 1) or 1)
    batch_size = settings.batch_size or (None if device.type == "cpu" else 256)  # CPU: `_feature_batch`
    feats = _Features(model, device, settings.use_logits, batch_size, settings.inference, tuner)
    pin = device.type == "cuda"
    if _fast_path_ok(episode_dataset):
        groups = _episode_features_fast(episode_dataset, feats, settings.num_workers, int(settings.episode_batch))
    else:
        groups = _episode_features_generic(episode_dataset, feats, settings.num_workers, pin)
    accs: list[float] = []
    ways = queries = None
    bar = tqdm(total=len(episode_dataset), desc=desc, disable=None if progress else True, leave=False,
               dynamic_ncols=True)
    for sx, sy, qx, qy in turns.over(groups):  # an episode's features and classifier in one turn at the cores
        sx, qx = sx.to(torch.float64), qx.to(torch.float64)
        if settings.normalize:
            sx, qx = _l2_normalize_t(sx), _l2_normalize_t(qx)
        if sy.shape[0] == 1:  # one episode of any labels: index them 0..K-1
            classes, inv = np.unique(sy[0].numpy(), return_inverse=True)
            classes, sy_idx = torch.from_numpy(classes), torch.from_numpy(inv.reshape(1, -1).astype(np.int64))
        else:  # EpisodeDataset groups: labels are already 0..n_ways-1
            classes, sy_idx = torch.arange(int(episode_dataset.n_ways)), sy
        pred_idx = predict_episodes(settings.classifier, sx, sy_idx.to(sx.device), qx, int(classes.numel()),
                                    backend=settings.backend, C=settings.C, proto_rule=settings.proto_rule,
                                    n_aug=n_aug)
        pred = classes.to(pred_idx.device)[pred_idx].cpu()
        accs.extend((100.0 * (pred == qy).double().mean(1)).tolist())
        if ways is None:
            labels, counts = np.unique(qy[0].numpy(), return_counts=True)
            ways, queries = int(labels.size), int(counts.min())
        bar.update(sx.shape[0])
        if progress:
            bar.set_postfix(acc=f"{np.mean(accs):.2f}")
    bar.close()
    return accs, ways, queries


__all__ = [
    "Classifier", "BACKENDS", "CLASSIFIERS", "INFERENCE_MODES", "PROTO_RULES", "FewShotSettings",
    "canonical_classifier", "draws_no_random_numbers", "extract_features", "get_classifier", "l2_normalize",
    "logistic_regression_batched", "mean_confidence_interval", "meta_test", "predict_batched", "predict_episodes",
]
