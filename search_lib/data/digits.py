"""Digits: the small demo dataset built into the toolkit, from ``sklearn.datasets.load_digits`` (no download).

10 digits x {upright, rotated 90 degrees} = 20 classes, split with a fixed seed into 10 base, 5 validation and 5
novel classes, upsampled to 32 x 32 RGB; the base-class images are split 80/10/10 into ``train_phase_train``,
``train_phase_val`` and ``train_phase_test``. `search_lib.data.files.load_split` validates and caches them.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

DIGITS_SEED = 0
DIGITS_SIZE = 32


@functools.lru_cache(maxsize=1)
def digits_partitions() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Partition name -> (images (N, 32, 32, 3) uint8, labels), computed once."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    bunch = load_digits()
    raw = np.clip(np.asarray(bunch.images, dtype=np.float64), 0, 16)  # (1797, 8, 8), 0..16
    raw = np.round(raw * (255.0 / 16.0)).astype(np.uint8)
    digit = np.asarray(bunch.target, dtype=np.int64)

    def upsample(img8: np.ndarray) -> np.ndarray:
        big = Image.fromarray(img8, mode="L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.BILINEAR)
        return np.repeat(np.asarray(big, dtype=np.uint8)[:, :, None], 3, axis=2)

    up = np.stack([upsample(im) for im in raw])
    rot = np.stack([upsample(np.ascontiguousarray(np.rot90(im))) for im in raw])
    images = np.concatenate([up, rot])  # class id: digit (upright) or 10 + digit (rotated)
    labels = np.concatenate([digit, digit + 10])

    rng = np.random.default_rng(DIGITS_SEED)
    perm = rng.permutation(20)
    base, val, novel = np.sort(perm[:10]), np.sort(perm[10:15]), np.sort(perm[15:])
    parts: dict[str, list[np.ndarray]] = {p: [] for p in ("train_phase_train", "train_phase_val",
                                                          "train_phase_test")}
    for c in base:
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_hold = int(round(0.1 * len(idx)))
        parts["train_phase_val"].append(idx[:n_hold])
        parts["train_phase_test"].append(idx[n_hold:2 * n_hold])
        parts["train_phase_train"].append(idx[2 * n_hold:])
    sel = {p: np.sort(np.concatenate(v)) for p, v in parts.items()}
    sel["val"] = np.flatnonzero(np.isin(labels, val))
    sel["test"] = np.flatnonzero(np.isin(labels, novel))
    sel["trainval_phase_train"] = np.sort(np.concatenate([sel["train_phase_train"], sel["val"]]))
    return {p: (images[i], labels[i]) for p, i in sel.items()}
