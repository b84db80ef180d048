"""Loading the data files: the RFS releases of miniImageNet, tieredImageNet, CIFAR-FS and FC100, and the Digits
demo set.

Loaded partitions are validated and cached in-process (the search and the evaluation reload the same
splits). The data pickles are read with a restricted unpickler that resolves only the numpy globals needed
to rebuild arrays, so a tampered data file cannot run code. File formats: docs/method.md §6.
"""

from __future__ import annotations

import functools
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from search_lib.core.errors import DataError, UsageError, one_line
from search_lib.data.names import (
    _CIFAR_FILES,
    _MINI_FILES,
    _MINI_PREFIX,
    _TIERED_FILES,
    CIFAR_KEYS,
    DatasetSpec,
    expected_files,
    normalise_partition,
    resolve_dataset,
)


@dataclass(eq=False)
class SplitData:
    """One loaded partition: ``images`` (N, H, W, 3) uint8 HWC, ``labels`` (N,) int64 raw class ids."""

    images: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    name: str
    dataset: str = "mini"  # the dataset key (mini, tiered, digits): picks the transforms' defaults
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
                        f"{one_line(exc, 120)}); {_REDOWNLOAD}") from exc


def _validate(images, labels, path_desc: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        try:
            images = np.asarray(images)
        except (ValueError, TypeError) as exc:
            raise DataError(f"images in {path_desc} are not an array ({one_line(exc, 120)}); {fix}") from exc
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
        raise DataError(f"labels in {path_desc} are not a list of integers ({one_line(exc, 120)}); {fix}") from exc
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


def _require_folder(dataset: DatasetSpec, data_path, fix: str) -> Path:
    if data_path is None or str(data_path) == "":
        raise UsageError(f"{dataset.display} needs --data_path, the folder of the RFS release files "
                         f"({', '.join(expected_files(dataset)[:2])}, ...)")
    folder = Path(data_path).expanduser()
    if not folder.is_dir():
        raise DataError(f"{dataset.display} data folder not found: {folder}; {fix}")
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
    images, labels = _read_rfs_pickle(Path(key[0]), "miniImageNet", fix)
    return SplitData(images=images, labels=labels, name=f"miniImageNet:{partition}", dataset="mini")


def _read_rfs_pickle(path: Path, display: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """The validated images and labels of an RFS pickle: a dict with keys 'data' and 'labels' (miniImageNet,
    CIFAR-FS and FC100 share the format)."""
    obj = _load_pickle(path, display, fix)
    if not isinstance(obj, dict):
        raise DataError(f"{display} file {path} holds a {type(obj).__name__}, expected a dict with keys 'data' and "
                        f"'labels'; {_REDOWNLOAD}")
    for k in ("data", "labels"):
        if k not in obj:
            raise DataError(f"{display} file {path} has no key {k!r} (keys: {', '.join(map(str, obj))}); "
                            f"{_REDOWNLOAD}")
    return _validate(obj["data"], obj["labels"], f"{display} file {path}", _REDOWNLOAD)


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
                        f"{one_line(exc, 120)}); {_REDOWNLOAD}") from exc
    except OSError as exc:
        raise DataError(f"cannot read tieredImageNet file {img_path} ({one_line(exc, 120)}); check its permissions or "
                        f"{_REDOWNLOAD}") from exc
    obj = _load_pickle(lab_path, "tieredImageNet", fix)
    if not isinstance(obj, dict) or "labels" not in obj:
        keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"tieredImageNet file {lab_path} has no key 'labels' (found: {keys}); {_REDOWNLOAD}")
    images, labels = _validate(images, obj["labels"], f"tieredImageNet files {img_path.name}/{lab_path.name} "
                                                      f"in {img_path.parent}", _REDOWNLOAD)
    return SplitData(images=images, labels=labels, name=f"tieredImageNet:{partition}", dataset="tiered")


def _load_cifar(folder: Path, spec: DatasetSpec, partition: str) -> SplitData:
    files = expected_files(spec)
    fix = (f"--data_path must be the {spec.display} folder of RFS's release, holding {', '.join(files[:3])} "
           f"({files[3]} optional)")
    path = folder / f"{_CIFAR_FILES[partition]}.pickle"
    if not path.is_file():
        raise DataError(f"{spec.display} file not found: {path}; {fix}")
    return _load_cifar_file(_stat_key(path), spec.key, spec.display, partition, fix)


def first_appearance_labels(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0..n-1 in the order each first appears in the file, as RFS's CIFAR loader does."""
    ids, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(ids), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(ids))
    return rank[inverse.reshape(-1)]


@functools.lru_cache(maxsize=8)
def _load_cifar_file(key: tuple, dataset: str, display: str, partition: str, fix: str) -> SplitData:
    images, labels = _read_rfs_pickle(Path(key[0]), display, fix)
    labels = first_appearance_labels(labels)
    labels.flags.writeable = False
    return SplitData(images=images, labels=labels, name=f"{display}:{partition}", dataset=dataset)


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
    return SplitData(images=images, labels=labels, name=f"Digits:{partition}", dataset="digits")


@functools.lru_cache(maxsize=8)
def _load_digits_cached(partition: str) -> SplitData:
    return _load_digits(partition)


# ----------------------------------------------------------------------------------------------------------
# public loader
# ----------------------------------------------------------------------------------------------------------


def load_split(dataset: str | DatasetSpec, data_path: str | os.PathLike | None, partition: str) -> SplitData:
    """Load (or fetch from the in-process cache) one partition of a dataset.

    ``dataset`` is a command-line name or a dataset key; ``data_path`` the folder of the RFS release files
    (ignored for Digits). The returned arrays are read-only and shared between callers.
    """
    spec = resolve_dataset(dataset)
    part = normalise_partition(spec, partition)
    if spec.key == "digits":
        return _load_digits_cached(part)
    fix = (f"--data_path must be the folder of the RFS {spec.display} release files "
           f"({', '.join(expected_files(spec)[:2])}, ...)")
    folder = _require_folder(spec, data_path, fix)
    if spec.key in CIFAR_KEYS:
        return _load_cifar(folder, spec, part)
    return _load_mini(folder, part) if spec.key == "mini" else _load_tiered(folder, part)


def clear_cache() -> None:
    """Forget every loaded split (frees the memory)."""
    _load_mini_file.cache_clear()
    _load_tiered_files.cache_clear()
    _load_cifar_file.cache_clear()
    _load_digits_cached.cache_clear()

