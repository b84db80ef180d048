"""Few-shot data, shared by the search and the evaluation.

* Loaders of the RFS releases of miniImageNet (Python-2 pickles) and tieredImageNet (``.npz`` images plus
  ``.pkl`` labels), validated and cached in-process (search and evaluation reload the same splits).
* ``Digits``: a small bundled demo dataset built from ``sklearn.datasets.load_digits`` (no download):
  10 digits x {upright, rotated 90 degrees} = 20 classes, split 10 base / 5 validation / 5 novel.
* The RFS transforms ``A``, ``B``, ``C``, ``D`` and the TE-NAS search transform ``TENAS``.
* ``SupervisedDataset`` (pre-training), ``EpisodeDataset`` (RFS ``MetaImageNet`` episodes) and the
  samplers of the kernel search: ``sample_meta_batch`` (MetaNTK) and ``sample_batch`` (plain NTK).

Every sampler is deterministic given its seed / ``numpy.random.Generator``: the random transforms run
under ``torch.random.fork_rng`` with a torch seed drawn from that generator, so the global torch RNG is
neither used nor disturbed.

The data pickles are read with a restricted unpickler that only resolves the numpy globals needed to
rebuild arrays, so a tampered data file cannot run code.
"""

from __future__ import annotations

import functools
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from .errors import DataError, UsageError

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_IMAGE_SIZE",
    "TRANSFORM_NAMES",
    "PARTITIONS",
    "MINI_MEAN",
    "MINI_STD",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "SplitData",
    "canonical_dataset",
    "is_episodic_name",
    "expected_files",
    "load_split",
    "clear_cache",
    "build_transform",
    "SupervisedDataset",
    "EpisodeDataset",
    "sample_meta_batch",
    "sample_batch",
]

# ----------------------------------------------------------------------------------------------------------
# names
# ----------------------------------------------------------------------------------------------------------

DATASET_NAMES = ("MiniImageNet", "MetaMiniImageNet", "TieredImageNet", "MetaTieredImageNet", "Digits", "MetaDigits")

_CANONICAL = {
    "miniimagenet": "mini",
    "metaminiimagenet": "mini",
    "tieredimagenet": "tiered",
    "metatieredimagenet": "tiered",
    "digits": "digits",
    "metadigits": "digits",
    # the canonical names themselves
    "mini": "mini",
    "tiered": "tiered",
}

DEFAULT_IMAGE_SIZE = {"mini": 84, "tiered": 84, "digits": 32}


def canonical_dataset(name: str) -> str:
    """Map a command-line dataset name (case-insensitive) to ``"mini"``, ``"tiered"`` or ``"digits"``."""
    key = str(name).strip().lower()
    if key not in _CANONICAL:
        raise UsageError(f"unknown dataset {name!r}; use one of {', '.join(DATASET_NAMES)}")
    return _CANONICAL[key]


def is_episodic_name(name: str) -> bool:
    """True for the ``Meta*`` names (episodic evaluation / meta-batches)."""
    canonical_dataset(name)
    return str(name).strip().lower().startswith("meta")


_DISPLAY = {"mini": "miniImageNet", "tiered": "tieredImageNet", "digits": "Digits"}

# partition name -> file stem, per dataset ("trainval" of mini falls back to RFS code's spelling)
_MINI_PREFIX = "miniImageNet_category_split_"
_MINI_FILES = {
    "train_phase_train": ["train_phase_train"],
    "train_phase_val": ["train_phase_val"],
    "train_phase_test": ["train_phase_test"],
    "val": ["val"],
    "test": ["test"],
    "trainval_phase_train": ["trainval_phase_train", "train_phase_trainval"],
    "trainval_phase_val": ["trainval_phase_val"],
    "trainval_phase_test": ["trainval_phase_test"],
}
_TIERED_FILES = {
    "train_phase_train": "train",
    "train_phase_val": "train_phase_val",
    "val": "val",
    "test": "test",
    "trainval_phase_train": "trainval",
}
_DIGITS_PARTS = ("train_phase_train", "train_phase_val", "train_phase_test", "val", "test", "trainval_phase_train")
_ALIASES = {"train": "train_phase_train", "trainval": "trainval_phase_train"}

PARTITIONS = {
    "mini": ("train", "trainval", *_MINI_FILES),
    "tiered": ("train", "trainval", *_TIERED_FILES),
    "digits": ("train", "trainval", *_DIGITS_PARTS),
}


def _normalise_partition(dataset: str, partition: str) -> str:
    key = str(partition).strip().lower()
    key = _ALIASES.get(key, key)
    valid = {"mini": _MINI_FILES, "tiered": _TIERED_FILES, "digits": _DIGITS_PARTS}[dataset]
    if key not in valid:
        raise UsageError(f"unknown {_DISPLAY[dataset]} partition {partition!r}; "
                         f"use one of {', '.join(PARTITIONS[dataset])}")
    return key


def expected_files(dataset: str) -> list[str]:
    """The file names a ``--data_path`` folder of this dataset holds (the RFS release)."""
    ds = canonical_dataset(dataset)
    if ds == "mini":
        return [_MINI_PREFIX + stems[0] + ".pickle" for stems in _MINI_FILES.values()]
    if ds == "tiered":
        return [f"{s}_{kind}" for s in _TIERED_FILES.values() for kind in ("images.npz", "labels.pkl")]
    return []


# ----------------------------------------------------------------------------------------------------------
# split container
# ----------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class SplitData:
    """One loaded partition: ``images`` (N, H, W, 3) uint8 HWC, ``labels`` (N,) int64 raw class ids."""

    images: np.ndarray
    labels: np.ndarray
    name: str
    _index: dict | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def class_ids(self) -> np.ndarray:
        """Sorted unique raw class ids."""
        return np.array(sorted(self.class_index()), dtype=np.int64)

    def class_index(self) -> dict[int, np.ndarray]:
        """Raw class id -> indices of its images (ascending), computed once."""
        if self._index is None:
            order = np.argsort(self.labels, kind="stable")
            ids, starts = np.unique(self.labels[order], return_index=True)
            bounds = list(starts[1:]) + [len(order)]
            self._index = {int(c): order[s:e] for c, s, e in zip(ids, starts, bounds)}
        return self._index

    def targets(self) -> tuple[np.ndarray, int]:
        """Training targets 0..C-1 and C: ``labels - min`` (RFS) when the ids form a contiguous range,
        otherwise the rank of the id among the sorted unique ids."""
        ids = self.class_ids
        if len(ids) == 0:
            return np.zeros(0, dtype=np.int64), 0
        lo, hi = int(ids[0]), int(ids[-1])
        if hi - lo + 1 == len(ids):
            return (self.labels - lo).astype(np.int64), len(ids)
        return np.searchsorted(ids, self.labels).astype(np.int64), len(ids)


# ----------------------------------------------------------------------------------------------------------
# file loading
# ----------------------------------------------------------------------------------------------------------

_NUMPY_MODULES = {
    "numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric",
    "numpy.dtypes", "numpy.core._multiarray_umath", "numpy._core._multiarray_umath",
}
_NUMPY_NAMES = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer", "frombuffer"}
_BUILTIN_MODULES = {"builtins", "__builtin__", "copyreg", "copy_reg", "_codecs"}
_BUILTIN_NAMES = {"set", "frozenset", "list", "dict", "tuple", "int", "float", "complex", "bool", "str",
                  "bytes", "bytearray", "slice", "range", "long", "unicode", "encode", "_reconstructor",
                  "object"}


class _DataUnpickler(pickle.Unpickler):
    """Resolves only what array/label pickles need (numpy arrays, dtypes, scalars, plain containers)."""

    def find_class(self, module, name):
        allowed = (
            (module in _NUMPY_MODULES and (name in _NUMPY_NAMES or name.endswith("DType")))
            or (module in _BUILTIN_MODULES and name in _BUILTIN_NAMES)
        )
        if not allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data file")
        return super().find_class(module, name)


_REDOWNLOAD = "the file is damaged or not from the RFS release; replace it with the release file"


def _load_pickle(path: Path, what: str, fix: str):
    try:
        with open(path, "rb") as fh:
            return _DataUnpickler(fh, encoding="latin1").load()
    except MemoryError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{what} file not found: {path}; {fix}") from exc
    except OSError as exc:
        raise DataError(f"cannot read {what} file {path}: {exc.strerror}; check its permissions") from exc
    except Exception as exc:  # any unpickling failure: truncated, garbage, wrong format, disallowed global
        raise DataError(f"{what} file {path} is not a readable pickle ({type(exc).__name__}: "
                        f"{_short(exc)}); {_REDOWNLOAD}") from exc


def _short(exc: BaseException, limit: int = 120) -> str:
    text = " ".join(str(exc).split()) or "no details"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _validate(images, labels, path_desc: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        try:
            images = np.asarray(images)
        except (ValueError, TypeError) as exc:
            raise DataError(f"images in {path_desc} are not an array ({_short(exc)}); {fix}") from exc
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"images in {path_desc} have shape {tuple(images.shape)}, expected (N, H, W, 3); {fix}")
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise DataError(f"images in {path_desc} are empty (shape {tuple(images.shape)}); {fix}")
    if images.dtype != np.uint8:
        if not (np.issubdtype(images.dtype, np.integer) or images.dtype == np.bool_):
            raise DataError(f"images in {path_desc} have dtype {images.dtype}, expected uint8 pixel values; {fix}")
        lo, hi = int(images.min()), int(images.max())
        if lo < 0 or hi > 255:
            raise DataError(f"images in {path_desc} hold values {lo}..{hi}, expected 0..255; {fix}")
        images = images.astype(np.uint8)
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError) as exc:
        raise DataError(f"labels in {path_desc} are not a list of integers ({_short(exc)}); {fix}") from exc
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise DataError(f"labels in {path_desc} are not a flat list of integers "
                        f"(shape {tuple(labels.shape)}, dtype {labels.dtype}); {fix}")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{path_desc} holds {images.shape[0]} images but {labels.shape[0]} labels; {fix}")
    labels = labels.astype(np.int64)
    images = np.ascontiguousarray(images)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _require_folder(dataset: str, data_path, fix: str) -> Path:
    if data_path is None or str(data_path) == "":
        raise UsageError(f"{_DISPLAY[dataset]} needs --data_path, the folder of the RFS release files "
                         f"({', '.join(expected_files(dataset)[:2])}, ...)")
    folder = Path(data_path).expanduser()
    if not folder.is_dir():
        raise DataError(f"{_DISPLAY[dataset]} data folder not found: {folder}; {fix}")
    return folder


def _stat_key(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return (str(path), None, None)
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def _load_mini(folder: Path, partition: str) -> SplitData:
    fix = (f"--data_path must hold the RFS release files ({', '.join(expected_files('mini')[:5])}; "
           f"trainval variants optional)")
    candidates = [folder / f"{_MINI_PREFIX}{stem}.pickle" for stem in _MINI_FILES[partition]]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DataError(f"miniImageNet file not found: {candidates[0]}; {fix}")
    return _load_mini_file(_stat_key(path), partition, fix)


@functools.lru_cache(maxsize=8)
def _load_mini_file(key: tuple, partition: str, fix: str) -> SplitData:
    path = Path(key[0])
    obj = _load_pickle(path, "miniImageNet", fix)
    if not isinstance(obj, dict):
        raise DataError(f"miniImageNet file {path} holds a {type(obj).__name__}, expected a dict with keys "
                        f"'data' and 'labels'; {_REDOWNLOAD}")
    for k in ("data", "labels"):
        if k not in obj:
            raise DataError(f"miniImageNet file {path} has no key {k!r} (keys: {', '.join(map(str, obj))}); "
                            f"{_REDOWNLOAD}")
    images, labels = _validate(obj["data"], obj["labels"], f"miniImageNet file {path}", _REDOWNLOAD)
    return SplitData(images=images, labels=labels, name=f"miniImageNet:{partition}")


def _load_tiered(folder: Path, partition: str) -> SplitData:
    fix = f"--data_path must hold the RFS release files ({', '.join(expected_files('tiered')[:4])}, ...)"
    stem = _TIERED_FILES[partition]
    img_path, lab_path = folder / f"{stem}_images.npz", folder / f"{stem}_labels.pkl"
    for p in (img_path, lab_path):
        if not p.is_file():
            raise DataError(f"tieredImageNet file not found: {p}; {fix}")
    return _load_tiered_files(_stat_key(img_path), _stat_key(lab_path), partition, fix)


@functools.lru_cache(maxsize=8)
def _load_tiered_files(img_key: tuple, lab_key: tuple, partition: str, fix: str) -> SplitData:
    img_path, lab_path = Path(img_key[0]), Path(lab_key[0])
    try:
        npz = np.load(img_path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DataError(f"tieredImageNet file {img_path} is a single array, not an .npz archive with an "
                            f"array 'images'; {_REDOWNLOAD}")
        with npz:
            if "images" not in npz.files:
                raise DataError(f"tieredImageNet file {img_path} has no array 'images' "
                                f"(arrays: {', '.join(npz.files) or 'none'}); {_REDOWNLOAD}")
            images = npz["images"]
    except (DataError, MemoryError):
        raise
    except (zipfile.BadZipFile, ValueError, EOFError, KeyError, pickle.UnpicklingError) as exc:
        raise DataError(f"tieredImageNet file {img_path} is not a readable .npz ({type(exc).__name__}: "
                        f"{_short(exc)}); {_REDOWNLOAD}") from exc
    except OSError as exc:
        raise DataError(f"cannot read tieredImageNet file {img_path} ({_short(exc)}); check its permissions or "
                        f"{_REDOWNLOAD}") from exc
    obj = _load_pickle(lab_path, "tieredImageNet", fix)
    if not isinstance(obj, dict) or "labels" not in obj:
        keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"tieredImageNet file {lab_path} has no key 'labels' (found: {keys}); {_REDOWNLOAD}")
    images, labels = _validate(images, obj["labels"], f"tieredImageNet files {img_path.name}/{lab_path.name} "
                                                      f"in {img_path.parent}", _REDOWNLOAD)
    return SplitData(images=images, labels=labels, name=f"tieredImageNet:{partition}")


# ----------------------------------------------------------------------------------------------------------
# digits demo dataset
# ----------------------------------------------------------------------------------------------------------

DIGITS_SEED = 0
DIGITS_SIZE = 32


@functools.lru_cache(maxsize=1)
def _digits_all() -> dict[str, tuple[np.ndarray, np.ndarray]]:
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


def _load_digits(partition: str) -> SplitData:
    images, labels = _digits_all()[partition]
    images, labels = _validate(images, labels, "the Digits dataset", "this is a bug, please report it")
    return SplitData(images=images, labels=labels, name=f"Digits:{partition}")


@functools.lru_cache(maxsize=8)
def _load_digits_cached(partition: str) -> SplitData:
    return _load_digits(partition)


# ----------------------------------------------------------------------------------------------------------
# public loader
# ----------------------------------------------------------------------------------------------------------


def load_split(dataset: str, data_path: str | os.PathLike | None, partition: str) -> SplitData:
    """Load (or fetch from the in-process cache) one partition of a dataset.

    ``dataset`` is a command-line name or ``mini``/``tiered``/``digits``; ``data_path`` the folder of the RFS
    release files (ignored for Digits). The returned arrays are read-only and shared between callers.
    """
    ds = canonical_dataset(dataset)
    part = _normalise_partition(ds, partition)
    if ds == "digits":
        return _load_digits_cached(part)
    fix = (f"--data_path must be the folder of the RFS {_DISPLAY[ds]} release files "
           f"({', '.join(expected_files(ds)[:2])}, ...)")
    folder = _require_folder(ds, data_path, fix)
    return _load_mini(folder, part) if ds == "mini" else _load_tiered(folder, part)


def clear_cache() -> None:
    """Forget every loaded split (frees the memory)."""
    _load_mini_file.cache_clear()
    _load_tiered_files.cache_clear()
    _load_digits_cached.cache_clear()


# ----------------------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------------------

MINI_MEAN = tuple(x / 255.0 for x in (120.39586422, 115.59361427, 104.54012653))
MINI_STD = tuple(x / 255.0 for x in (70.68188272, 68.27635443, 72.54505529))
CIFAR_MEAN = tuple(x / 255.0 for x in (125.3, 123.0, 113.9))
CIFAR_STD = tuple(x / 255.0 for x in (63.0, 62.1, 66.7))

TRANSFORM_NAMES = ("A", "B", "C", "D", "TENAS")
_DEFAULT_TRANSFORM_SIZE = {"A": 84, "B": 84, "C": 80, "D": 80, "TENAS": 32}


class _ToPIL:
    """HWC uint8 numpy (or a PIL image) -> RGB PIL image."""

    def __call__(self, img):
        if isinstance(img, Image.Image):
            return img
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            arr = arr.astype(np.uint8)
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        return Image.fromarray(arr)

    def __repr__(self) -> str:
        return "ToPIL()"


class _ResizeIfNeeded:
    """Resize to size x size only when the image is not already that size (keeps RFS A exact at 84)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.size == (self.size, self.size):
            return img
        return img.resize((self.size, self.size), Image.BILINEAR)

    def __repr__(self) -> str:
        return f"ResizeIfNeeded({self.size})"


def build_transform(name: str, train: bool, image_size: int | None = None,
                    dataset: str = "mini") -> Callable[[np.ndarray], torch.Tensor]:
    """An RFS transform (HWC uint8 numpy -> normalised C x H x W float tensor).

    ``image_size`` defaults to the transform's own size (A/B 84, C/D 80, TENAS 32), or 32 for Digits;
    other sizes scale the crop, padding and resize sizes proportionally.
    """
    key = str(name).strip()
    key = key.upper() if key.upper() in TRANSFORM_NAMES else key
    if key not in TRANSFORM_NAMES:
        raise UsageError(f"unknown transform {name!r}; use one of {', '.join(TRANSFORM_NAMES)}")
    ds = canonical_dataset(dataset)
    if image_size is None:
        s = DEFAULT_IMAGE_SIZE["digits"] if ds == "digits" else _DEFAULT_TRANSFORM_SIZE[key]
    else:
        s = int(image_size)
        if s < 1 or s != image_size:
            raise UsageError(f"image size must be a positive integer, got {image_size!r}; pass e.g. 84")
    to_tensor = [T.ToTensor()]
    norm_mini = T.Normalize(MINI_MEAN, MINI_STD)
    norm_cifar = T.Normalize(CIFAR_MEAN, CIFAR_STD)
    if key == "A":
        pad = s * 8 // 84
        if train:
            steps = [_ResizeIfNeeded(s), T.RandomCrop(s, padding=pad),
                     T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4), T.RandomHorizontalFlip()]
        else:
            steps = [_ResizeIfNeeded(s)]
        return T.Compose([_ToPIL(), *steps, *to_tensor, norm_mini])
    if key == "B":
        if train:
            steps = [T.RandomResizedCrop(s, scale=(0.2, 1.0)), T.RandomHorizontalFlip()]
        else:
            steps = [T.Resize(int(round(s * 92 / 84))), T.CenterCrop(s)]
        return T.Compose([_ToPIL(), *steps, *to_tensor, norm_cifar])
    if key in ("C", "D"):
        if train:
            steps = [T.RandomResizedCrop(s), T.RandomHorizontalFlip()]
        else:
            steps = [T.Resize(int(round(s * 92 / 80))), T.CenterCrop(s)]
        return T.Compose([_ToPIL(), *steps, *to_tensor, norm_cifar])
    # TENAS
    if train:
        steps = [T.Resize((s, s)), T.RandomHorizontalFlip(), T.RandomCrop(s, padding=s * 4 // 32)]
    else:
        steps = [T.Resize((s, s))]
    return T.Compose([_ToPIL(), *steps, *to_tensor, norm_cifar])


def _resolve_transform(transform, train: bool, image_size, dataset: str):
    if isinstance(transform, str):
        return build_transform(transform, train=train, image_size=image_size, dataset=dataset)
    if callable(transform):
        return transform
    raise UsageError(f"transform must be one of {', '.join(TRANSFORM_NAMES)} or a callable, got {transform!r}")


def _dataset_of(split: SplitData) -> str:
    prefix = split.name.split(":", 1)[0].lower()
    return {"miniimagenet": "mini", "tieredimagenet": "tiered", "digits": "digits"}.get(prefix, "mini")


def _apply(transform, images: np.ndarray, indices: Sequence[int], torch_seed: int | None) -> torch.Tensor:
    """Transform images[indices] and stack; under a forked, seeded torch RNG when torch_seed is given."""
    if len(indices) == 0:
        raise DataError("no images to transform; ask for at least one image")
    if torch_seed is None:
        return torch.stack([transform(images[i]) for i in indices])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed)
        return torch.stack([transform(images[i]) for i in indices])


def _torch_seed(generator: np.random.Generator) -> int:
    return int(generator.integers(0, 2**63 - 1))


# ----------------------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------------------


class SupervisedDataset(torch.utils.data.Dataset):
    """Whole-image classification over one partition: items are ``(image, target, index)``."""

    def __init__(self, dataset: str, data_path, partition: str = "train", transform="A", train: bool = True,
                 image_size: int | None = None):
        self.dataset = canonical_dataset(dataset)
        self.partition = _normalise_partition(self.dataset, partition)
        self.split = load_split(self.dataset, data_path, self.partition)
        self.transform = _resolve_transform(transform, train, image_size, self.dataset)
        targets, self.num_classes = self.split.targets()
        targets.flags.writeable = False
        self.targets = targets

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        index = int(index)
        return self.transform(self.split.images[index]), int(self.targets[index]), index


def _check_positive(**values) -> None:
    for name, value in values.items():
        if int(value) != value or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")


def _check_episode_feasible(split: SplitData, n_ways: int, need: int, what: str) -> None:
    index = split.class_index()
    if len(index) < n_ways:
        raise DataError(f"{split.name} has {len(index)} classes but {what} needs n_ways={n_ways}; "
                        f"lower --n_ways or use a partition with more classes")
    for cls, idx in index.items():
        if len(idx) < need:
            raise DataError(f"{split.name}: class {cls} has {len(idx)} images but {what} needs {need} per class "
                            f"(n_shots + n_queries); lower --n_shots/--n_queries")


def _pick_task(split: SplitData, classes: np.ndarray, n_ways: int, n_shots: int, n_queries: int,
               rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Choose n_ways distinct classes; per class n_shots support + n_queries query indices, disjoint."""
    index = split.class_index()
    chosen = rng.choice(classes, size=n_ways, replace=False)
    support, query = [], []
    for cls in chosen:
        pool = index[int(cls)]
        pick = rng.choice(len(pool), size=n_shots + n_queries, replace=False)
        support.append(pool[pick[:n_shots]])
        query.append(pool[pick[n_shots:]])
    return support, query


class EpisodeDataset(torch.utils.data.Dataset):
    """RFS ``MetaImageNet`` episodes: ``__len__`` is ``n_test_runs``; item i is always the same episode.

    Item: ``(support_xs, support_ys, query_xs, query_ys)``; the support set (class-major, then shot) is tiled
    ``n_aug_support_samples`` times as in RFS (``[s_1..s_K, s_1..s_K, ...]``), each copy transformed with the
    *train* transform when ``train_transform`` is True (else the test transform); queries use the test
    transform. Labels are 0..n_ways-1 in the order the classes were drawn.
    """

    def __init__(self, dataset: str, data_path, partition: str = "test", n_ways: int = 5, n_shots: int = 1,
                 n_queries: int = 15, n_aug_support_samples: int = 5, n_test_runs: int = 600, transform="A",
                 image_size: int | None = None, seed: int = 0, train_transform: bool = True):
        _check_positive(n_ways=n_ways, n_shots=n_shots, n_queries=n_queries,
                        n_aug_support_samples=n_aug_support_samples, n_test_runs=n_test_runs)
        self.dataset = canonical_dataset(dataset)
        self.partition = _normalise_partition(self.dataset, partition)
        self.split = load_split(self.dataset, data_path, self.partition)
        self.n_ways, self.n_shots, self.n_queries = int(n_ways), int(n_shots), int(n_queries)
        self.n_aug_support_samples = int(n_aug_support_samples)
        self.n_test_runs = int(n_test_runs)
        self.seed = int(seed)
        if isinstance(transform, (tuple, list)) and len(transform) == 2:
            self.support_transform, self.query_transform = transform
        else:
            test_tf = _resolve_transform(transform, False, image_size, self.dataset)
            self.support_transform = (_resolve_transform(transform, True, image_size, self.dataset)
                                      if train_transform else test_tf)
            self.query_transform = test_tf
        _check_episode_feasible(self.split, self.n_ways, self.n_shots + self.n_queries,
                                f"{self.n_ways}-way {self.n_shots}-shot episodes with {self.n_queries} queries")
        self.classes = self.split.class_ids

    def __len__(self) -> int:
        return self.n_test_runs

    def episode_indices(self, item: int) -> tuple[list[int], list[int], np.ndarray]:
        """(support indices, query indices, chosen class ids) of episode ``item``, without transforming."""
        rng = self._rng(item)
        support, query = _pick_task(self.split, self.classes, self.n_ways, self.n_shots, self.n_queries, rng)
        chosen = np.array([int(self.split.labels[s[0]]) for s in support], dtype=np.int64)
        return [int(i) for s in support for i in s], [int(i) for q in query for i in q], chosen

    def _rng(self, item: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed & (2**64 - 1), int(item)]))

    def __getitem__(self, item: int):
        item = int(item)
        if not 0 <= item < self.n_test_runs:
            raise IndexError(f"episode {item} out of range 0..{self.n_test_runs - 1}")
        rng = self._rng(item)
        support, query = _pick_task(self.split, self.classes, self.n_ways, self.n_shots, self.n_queries, rng)
        torch_seed = _torch_seed(rng)
        s_idx = np.concatenate(support)
        q_idx = np.concatenate(query)
        s_lab = np.repeat(np.arange(self.n_ways), self.n_shots)
        q_lab = np.repeat(np.arange(self.n_ways), self.n_queries)
        s_idx = np.tile(s_idx, self.n_aug_support_samples)
        s_lab = np.tile(s_lab, self.n_aug_support_samples)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)
            support_xs = torch.stack([self.support_transform(self.split.images[i]) for i in s_idx])
            query_xs = torch.stack([self.query_transform(self.split.images[i]) for i in q_idx])
        return (support_xs, torch.from_numpy(s_lab.astype(np.int64)),
                query_xs, torch.from_numpy(q_lab.astype(np.int64)))


# ----------------------------------------------------------------------------------------------------------
# search samplers
# ----------------------------------------------------------------------------------------------------------


def sample_meta_batch(split: SplitData, n_tasks: int, n_ways: int, n_shots: int, n_queries: int, transform,
                      generator: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A MetaNTK meta-batch of ``n_tasks`` tasks (distinct classes within a task, disjoint support/query).

    Returns ``(x, y)`` of ``n_tasks * n_ways * (n_queries + n_shots)`` items ordered: all queries (task 1,
    task 2, ...; class-major within a task), then all supports (task-major likewise); ``y`` holds the
    per-task labels 0..n_ways-1. ``transform`` is a callable or a transform name (its train variant).
    """
    _check_positive(n_tasks=n_tasks, n_ways=n_ways, n_shots=n_shots, n_queries=n_queries)
    if not isinstance(generator, np.random.Generator):
        raise UsageError("generator must be a numpy.random.Generator, e.g. numpy.random.default_rng(seed)")
    tf = _resolve_transform(transform, True, None, _dataset_of(split))
    _check_episode_feasible(split, n_ways, n_shots + n_queries,
                            f"meta-batches of {n_ways}-way {n_shots}-shot tasks with {n_queries} queries")
    classes = split.class_ids
    q_idx, q_lab, s_idx, s_lab = [], [], [], []
    for _ in range(int(n_tasks)):
        support, query = _pick_task(split, classes, n_ways, n_shots, n_queries, generator)
        for way, (s, q) in enumerate(zip(support, query)):
            q_idx.extend(int(i) for i in q)
            q_lab.extend([way] * len(q))
            s_idx.extend(int(i) for i in s)
            s_lab.extend([way] * len(s))
    x = _apply(tf, split.images, q_idx + s_idx, _torch_seed(generator))
    y = torch.tensor(q_lab + s_lab, dtype=torch.long)
    return x, y


def sample_batch(split: SplitData, batch_size: int, transform,
                 generator: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` distinct random images with their training targets (as ``SupervisedDataset``)."""
    _check_positive(batch_size=batch_size)
    if not isinstance(generator, np.random.Generator):
        raise UsageError("generator must be a numpy.random.Generator, e.g. numpy.random.default_rng(seed)")
    if batch_size > len(split):
        raise DataError(f"{split.name} has {len(split)} images, fewer than the batch size {batch_size}; "
                        f"lower --batch_size")
    tf = _resolve_transform(transform, True, None, _dataset_of(split))
    idx = generator.choice(len(split), size=int(batch_size), replace=False)
    x = _apply(tf, split.images, [int(i) for i in idx], _torch_seed(generator))
    targets, _ = split.targets()
    return x, torch.from_numpy(targets[idx].astype(np.int64))
