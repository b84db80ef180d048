"""Few-shot testing of a trained network (the RFS protocol).

For every episode the network's penultimate features (or its logits) of the support and query images are
extracted in eval mode, L2-normalised, and a simple classifier fitted on the support set labels the
queries. The mean accuracy over the episodes is reported with its 95% Student-t confidence interval.
Accuracies are in percent throughout.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from search_lib.errors import DataError, UsageError

logger = logging.getLogger("metantknas.eval")

# A classifier takes (support features, support labels, query features), all numpy, and returns the
# predicted query labels.
Classifier = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------------------
# classifiers
# --------------------------------------------------------------------------------------------------

def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Scale each row of ``x`` to unit Euclidean norm (rows of zeros stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def _logistic_regression(sx: np.ndarray, sy: np.ndarray, qx: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    # No ``multi_class`` argument: it was removed in scikit-learn 1.7 (multinomial is the default).
    clf = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000)
    clf.fit(sx, sy)
    return clf.predict(qx)


def _svm(sx: np.ndarray, sy: np.ndarray, qx: np.ndarray) -> np.ndarray:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    clf = make_pipeline(StandardScaler(), SVC(C=1.0, kernel="linear", decision_function_shape="ovr"))
    clf.fit(sx, sy)
    return clf.predict(qx)


def _nearest_neighbour(sx: np.ndarray, sy: np.ndarray, qx: np.ndarray) -> np.ndarray:
    # squared Euclidean distances, queries x support
    d = (qx ** 2).sum(1)[:, None] - 2.0 * qx @ sx.T + (sx ** 2).sum(1)[None, :]
    return np.asarray(sy)[np.argmin(d, axis=1)]


def _cosine(sx: np.ndarray, sy: np.ndarray, qx: np.ndarray) -> np.ndarray:
    sim = l2_normalize(qx) @ l2_normalize(sx).T
    return np.asarray(sy)[np.argmax(sim, axis=1)]


def _prototype(sx: np.ndarray, sy: np.ndarray, qx: np.ndarray) -> np.ndarray:
    sy = np.asarray(sy)
    classes = np.unique(sy)
    protos = np.stack([sx[sy == c].mean(axis=0) for c in classes])
    d = (qx ** 2).sum(1)[:, None] - 2.0 * qx @ protos.T + (protos ** 2).sum(1)[None, :]
    return classes[np.argmin(d, axis=1)]


CLASSIFIERS: dict[str, Classifier] = {
    "LR": _logistic_regression,
    "SVM": _svm,
    "NN": _nearest_neighbour,
    "Cosine": _cosine,
    "Proto": _prototype,
}


def get_classifier(name: str) -> Classifier:
    """Look a classifier up by name (case-insensitive); unknown names raise UsageError."""
    for key, fn in CLASSIFIERS.items():
        if key.lower() == str(name).lower():
            return fn
    raise UsageError(f"unknown classifier {name!r}; use one of {', '.join(CLASSIFIERS)}")


def canonical_classifier(name: str) -> str:
    """The registry spelling of a classifier name (raises UsageError when unknown)."""
    get_classifier(name)
    return next(key for key in CLASSIFIERS if key.lower() == str(name).lower())


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


def meta_test(model: nn.Module, episode_dataset, classifier: str = "LR",
              device: torch.device | str | None = None, use_logits: bool = False, progress: bool = True,
              batch_size: int = 256, num_workers: int = 0, desc: str = "meta-test") -> dict:
    """Few-shot accuracy of ``model`` over every episode of ``episode_dataset``.

    Each item of the dataset is ``(support_xs, support_ys, query_xs, query_ys)``. Returns a dict with
    ``mean`` and ``ci95`` (percent), ``episodes``, ``queries`` (per class), ``ways``, ``shots``,
    ``classifier`` and the per-episode ``accuracies`` (percent).
    """
    from search_lib.utils import resolve_device

    fit_predict = get_classifier(classifier)
    classifier = canonical_classifier(classifier)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    elif isinstance(device, str):
        device = resolve_device(device)
    n_episodes = len(episode_dataset)
    if n_episodes < 1:
        raise DataError("the episode dataset is empty; use --n_test_runs >= 1")

    loader = torch.utils.data.DataLoader(episode_dataset, batch_size=None, shuffle=False,
                                         num_workers=num_workers,
                                         pin_memory=(torch.device(device).type == "cuda"))
    was_training = model.training
    model.eval()
    accs: list[float] = []
    ways = shots = queries = None
    try:
        bar = tqdm(loader, total=n_episodes, desc=desc, disable=None if progress else True, leave=False, dynamic_ncols=True)
        for support_xs, support_ys, query_xs, query_ys in bar:
            sx_img, qx_img = _as_images(support_xs), _as_images(query_xs)
            sy, qy = _as_labels(support_ys), _as_labels(query_ys)
            if sx_img.shape[0] != sy.shape[0] or qx_img.shape[0] != qy.shape[0]:
                raise DataError("episode images and labels differ in number; check the episode dataset")
            sx = l2_normalize(extract_features(model, sx_img, device, use_logits, batch_size))
            qx = l2_normalize(extract_features(model, qx_img, device, use_logits, batch_size))
            pred = np.asarray(fit_predict(sx, sy, qx))
            accs.append(100.0 * float((pred == qy).mean()))
            if ways is None:
                labels, counts = np.unique(qy, return_counts=True)
                ways = int(labels.size)
                queries = int(counts.min())
                shots = int(getattr(episode_dataset, "n_shots", 0)) or None
            if progress:
                bar.set_postfix(acc=f"{np.mean(accs):.2f}")
    finally:
        model.train(was_training)

    mean, ci95 = mean_confidence_interval(accs)
    return {
        "mean": mean,
        "ci95": ci95,
        "episodes": len(accs),
        "ways": ways,
        "shots": shots,
        "queries": int(getattr(episode_dataset, "n_queries", queries) or queries),
        "classifier": classifier,
        "features": "logits" if use_logits else "penultimate",
        "accuracies": accs,
    }


__all__ = [
    "CLASSIFIERS", "canonical_classifier", "extract_features", "get_classifier", "l2_normalize",
    "mean_confidence_interval", "meta_test",
]
