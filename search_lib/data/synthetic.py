"""Synthetic data written in the exact RFS file formats, so tests and demos exercise the real loaders.

miniImageNet: ``miniImageNet_category_split_{train_phase_train,train_phase_val,train_phase_test,val,test,
trainval_phase_train,trainval_phase_val,trainval_phase_test}.pickle``, each a protocol-2 pickle of
``dict(data=uint8 N x H x W x 3, labels=list of int, catname2label=dict)``. The three ``train_phase_*`` files
share the base classes (disjoint images); ``val``/``test`` hold novel classes whose ids follow the base ids;
the ``trainval_phase_*`` files hold the base and validation classes.

tieredImageNet: ``{split}_images.npz`` (array ``images``) and ``{split}_labels.pkl`` (dict with ``labels``,
``label_specific``, ``label_general``, ``label_specific_str``) for train, train_phase_val, val, test,
trainval. As in the release, each split numbers its classes from 0 (trainval: base then val classes).

CIFAR-FS / FC100 (RFS): ``{train,val,test,trainval}.pickle``, each a dict ``data`` (uint8 N x 32 x 32 x 3) and
``labels`` (a list of CIFAR-100 class ids, images of several classes interleaved, so that numbering the
classes in order of first appearance, as RFS does, differs from sorting them), pickled as Python 2 wrote
them: the strings and the array bytes as Python-2 ``str`` (read back with ``encoding="latin1"``), numpy's
``numpy.core.multiarray`` names. ``trainval`` holds the base and the validation classes.

Each class has its own mean colour and stripe pattern plus noise, so a tiny network can separate them.

    python -m search_lib.synthetic --out DIR --dataset mini --train-classes 8 --val-classes 5 \\
        --test-classes 5 --images-per-class 20 --image-size 84 --seed 0
    python -m search_lib.synthetic --out DIR/CIFAR-FS --dataset CIFAR-FS --train-classes 64 --val-classes 16 \\
        --test-classes 20
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path

import numpy as np

from search_lib.core.command_line import make_parser, run_cli
from search_lib.core.errors import RunFailure, UsageError
from search_lib.data.names import resolve_dataset
from search_lib.data.streamed_files import python2_pickle

__all__ = ["write_synthetic", "class_images", "python2_pickle", "build_parser", "main"]

_DEFAULT_CLASSES = {"train": 8, "val": 5, "test": 5}
_MINI_PREFIX = "miniImageNet_category_split_"
FORMATS = ("mini", "tiered", "CIFAR-FS", "FC100")
_DEFAULT_SIZE = {"mini": 84, "tiered": 84, "CIFAR-FS": 32, "FC100": 32}
_FORMAT_OF_KEY = {"mini": "mini", "tiered": "tiered", "cifarfs": "CIFAR-FS", "fc100": "FC100"}


def file_format(dataset: str) -> str:
    """The format to write for a dataset name (mini, MiniImageNet, cifar-fs, MetaFC100, ...)."""
    try:
        key = resolve_dataset(dataset).key
    except UsageError:
        key = None
    if key not in _FORMAT_OF_KEY:
        raise UsageError(f"unknown synthetic dataset {dataset!r}; use one of {', '.join(FORMATS)}")
    return _FORMAT_OF_KEY[key]


def class_images(class_id: int, n: int, image_size: int, rng: np.random.Generator, seed: int = 0) -> np.ndarray:
    """``n`` images (n, S, S, 3) uint8 of one synthetic class: a class colour + class stripes + noise.

    The class look depends only on ``(seed, class_id)``; ``rng`` draws the per-image noise and phase.
    """
    look = np.random.default_rng(np.random.SeedSequence([int(seed) & (2**64 - 1), 7919, int(class_id)]))
    colour = look.uniform(40.0, 215.0, size=3)
    angle = look.uniform(0.0, np.pi)
    freq = look.uniform(1.0, 4.0)  # stripes per image
    contrast = look.uniform(25.0, 50.0)
    tint = look.uniform(-1.0, 1.0, size=3)
    s = int(image_size)
    yy, xx = np.meshgrid(np.arange(s) / s, np.arange(s) / s, indexing="ij")
    proj = np.cos(angle) * xx + np.sin(angle) * yy
    phase = rng.uniform(0.0, 0.5, size=(n, 1, 1))
    wave = np.sin(2 * np.pi * (freq * proj[None] + phase))  # (n, s, s)
    img = colour[None, None, None, :] + contrast * wave[..., None] * tint[None, None, None, :]
    img = img + rng.normal(0.0, 12.0, size=(n, s, s, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _check_args(classes: dict, images_per_class: int, image_size: int) -> dict:
    merged = dict(_DEFAULT_CLASSES)
    if classes:
        unknown = set(classes) - set(merged)
        if unknown:
            raise UsageError(f"unknown class split(s) {', '.join(sorted(unknown))}; use train, val, test")
        merged.update(classes)
    for split, count in merged.items():
        if int(count) != count or count < 1:
            raise UsageError(f"--{split}-classes must be a positive integer, got {count!r}")
    if int(images_per_class) != images_per_class or images_per_class < 1:
        raise UsageError(f"--images-per-class must be a positive integer, got {images_per_class!r}")
    if int(image_size) != image_size or image_size < 4:
        raise UsageError(f"--image-size must be an integer of at least 4, got {image_size!r}")
    return {k: int(v) for k, v in merged.items()}


def _write_bytes(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except OSError as exc:
        raise RunFailure(f"cannot write {path}: {exc.strerror}; choose a writable --out folder") from exc


def _pickle(path: Path, obj) -> None:
    _write_bytes(path, pickle.dumps(obj, protocol=2))


def _npz(path: Path, images: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npz")
    try:
        np.savez(tmp, images=images)
        os.replace(tmp, path)
    except OSError as exc:
        raise RunFailure(f"cannot write {path}: {exc.strerror}; choose a writable --out folder") from exc


def _write_cifar(out: Path, counts: dict, ipc: int, s: int, seed: int, rng: np.random.Generator) -> Path:
    n_tr, n_va, n_te = counts["train"], counts["val"], counts["test"]
    ids = [int(c) for c in rng.permutation(max(100, n_tr + n_va + n_te))[:n_tr + n_va + n_te]]  # CIFAR-100 ids
    base, val, test = ids[:n_tr], ids[n_tr:n_tr + n_va], ids[n_tr + n_va:]
    pools = {c: class_images(c, ipc, s, rng, seed) for c in ids}

    def shuffled(classes: list[int]) -> dict:
        images = np.concatenate([pools[c] for c in classes])
        labels = np.repeat(classes, ipc)
        order = rng.permutation(len(labels))
        return {"data": np.ascontiguousarray(images[order]), "labels": [int(v) for v in labels[order]]}

    for stem, classes in (("train", base), ("val", val), ("test", test), ("trainval", base + val)):
        _write_bytes(out / f"{stem}.pickle", python2_pickle(shuffled(classes)))
    return out


def _stack(parts: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, list[int]]:
    images = np.concatenate([imgs for imgs, _ in parts])
    labels = [int(lab) for imgs, lab in parts for _ in range(len(imgs))]
    return images, labels


def write_synthetic(out_dir: str | os.PathLike, dataset: str = "mini", classes: dict | None = None,
                    images_per_class: int = 20, image_size: int | None = None, seed: int = 0) -> Path:
    """Write a synthetic dataset in the RFS format of ``dataset`` (mini, tiered, CIFAR-FS or FC100) into
    ``out_dir``; ``image_size`` defaults to 84 (32 for CIFAR-FS and FC100).

    ``classes`` gives the number of base (``train``), validation (``val``) and novel (``test``) classes
    (default 8/5/5); every class gets ``images_per_class`` images in each file it appears in. The
    ``*_phase_train`` / ``*_phase_val`` / ``*_phase_test`` files of a class never share images; ``val`` and
    ``trainval_phase_train`` share the validation-class images, as in the release. Returns ``out_dir``.
    """
    dataset = file_format(dataset)
    if image_size is None:
        image_size = _DEFAULT_SIZE[dataset]
    counts = _check_args(classes or {}, images_per_class, image_size)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFailure(f"cannot create {out}: {exc.strerror}; choose a writable --out folder") from exc
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & (2**64 - 1), 104729]))
    if dataset in ("CIFAR-FS", "FC100"):
        return _write_cifar(out, counts, int(images_per_class), int(image_size), seed, rng)
    n_tr, n_va, n_te = counts["train"], counts["val"], counts["test"]
    ipc, s = int(images_per_class), int(image_size)
    base_ids = list(range(n_tr))
    val_ids = list(range(n_tr, n_tr + n_va))
    test_ids = list(range(n_tr + n_va, n_tr + n_va + n_te))

    # three disjoint pools of images per base and validation class, one pool per novel class
    pools = {c: [class_images(c, ipc, s, rng, seed) for _ in range(3)] for c in base_ids + val_ids}
    pools.update({c: [class_images(c, ipc, s, rng, seed)] for c in test_ids})

    def catname(c: int) -> str:
        return f"n{90000000 + c:08d}"

    if dataset == "mini":
        files = {
            "train_phase_train": [(pools[c][0], c) for c in base_ids],
            "train_phase_val": [(pools[c][1], c) for c in base_ids],
            "train_phase_test": [(pools[c][2], c) for c in base_ids],
            "val": [(pools[c][0], c) for c in val_ids],
            "test": [(pools[c][0], c) for c in test_ids],
            "trainval_phase_train": [(pools[c][0], c) for c in base_ids + val_ids],
            "trainval_phase_val": [(pools[c][1], c) for c in base_ids + val_ids],
            "trainval_phase_test": [(pools[c][2], c) for c in base_ids + val_ids],
        }
        for stem, parts in files.items():
            images, labels = _stack(parts)
            names = {catname(c): c for _, c in parts}
            _pickle(out / f"{_MINI_PREFIX}{stem}.pickle", {"data": images, "labels": labels,
                                                           "catname2label": names})
        return out

    # tieredImageNet: each split numbers its classes from 0
    splits = {
        "train": [(pools[c][0], i) for i, c in enumerate(base_ids)],
        "train_phase_val": [(pools[c][1], i) for i, c in enumerate(base_ids)],
        "val": [(pools[c][0], i) for i, c in enumerate(val_ids)],
        "test": [(pools[c][0], i) for i, c in enumerate(test_ids)],
        "trainval": [(pools[c][0], i) for i, c in enumerate(base_ids + val_ids)],
    }
    for split, parts in splits.items():
        images, labels = _stack(parts)
        _npz(out / f"{split}_images.npz", images)
        specific = np.asarray(labels, dtype=np.int64)
        _pickle(out / f"{split}_labels.pkl", {
            "labels": labels,
            "label_specific": specific,
            "label_general": specific // 4,
            "label_specific_str": [catname(int(c)) for c in sorted(set(labels))],
            "label_general_str": [f"group{g}" for g in sorted(set(int(c) // 4 for c in labels))],
        })
    return out


def _format_flag(text: str) -> str:
    try:
        return file_format(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser():
    parser = make_parser(prog="python -m search_lib.synthetic",
                         description="Write a synthetic miniImageNet, tieredImageNet, CIFAR-FS or FC100 in the RFS "
                                     "file formats.")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--dataset", default="mini", type=_format_flag,
                        help=f"file format to write: {', '.join(FORMATS)} (any dataset name of them)")
    parser.add_argument("--train-classes", type=int, default=_DEFAULT_CLASSES["train"], help="base classes")
    parser.add_argument("--val-classes", type=int, default=_DEFAULT_CLASSES["val"], help="validation classes")
    parser.add_argument("--test-classes", type=int, default=_DEFAULT_CLASSES["test"], help="novel (test) classes")
    parser.add_argument("--images-per-class", type=int, default=20, help="images per class in each file")
    parser.add_argument("--image-size", type=int, default=None,
                        help="height = width of the images; default: 84 (32 for CIFAR-FS and FC100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        out = write_synthetic(args.out, dataset=args.dataset,
                              classes={"train": args.train_classes, "val": args.val_classes,
                                       "test": args.test_classes},
                              images_per_class=args.images_per_class, image_size=args.image_size, seed=args.seed)
        print(f"wrote synthetic {args.dataset} data to {out}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
