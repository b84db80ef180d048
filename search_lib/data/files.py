"""Loading the data files: the RFS releases of miniImageNet, tieredImageNet, CIFAR-FS and FC100 (and the folders
`search_lib.data.prepare` writes in the same formats), and the Digits demo set (`search_lib.data.digits`).

Loaded partitions are validated and cached in-process (the search and the evaluation reload the same
splits). The data pickles are read with a restricted unpickler that resolves only the numpy globals needed
to rebuild arrays, so a tampered data file cannot run code. The rules a file must meet, and their one-line
messages, live here only: `read_partition` applies them for `load_split` and for the folder check
(`search_lib.data.folder_check`) alike. File formats: docs/method.md §6.
"""

from __future__ import annotations

import functools
import os
import pickle
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from search_lib.core.errors import DataError, UsageError, one_line
from search_lib.data.digits import digits_partitions
from search_lib.data.names import (
    CIFAR_KEYS,
    REQUIRED_PARTITIONS,
    DatasetSpec,
    expected_files,
    normalise_partition,
    partition_file_options,
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


# The fix of every malformed-file message, from the loaders and the folder check alike.
REPLACE_FILE = ("the file is damaged or not in the RFS format; replace it with the release's file or re-create the "
                "folder with python -m search_lib.data.prepare")
NPZ_CHUNK_BYTES = 64 << 20  # an .npz member is read in pieces of this size (the folder check keeps none of them)


def read_data_pickle(fh, where: str, fix: str = REPLACE_FILE):
    """Unpickle an open data file (``where`` names it in messages) with the restricted unpickler and
    ``encoding="latin1"``; DataError when it is not a readable pickle."""
    try:
        return _DataUnpickler(fh, encoding="latin1").load()
    except (MemoryError, OSError):
        raise
    except Exception as exc:  # any unpickling failure: truncated, garbage, wrong format, disallowed global
        raise DataError(f"{where} is not a readable pickle ({type(exc).__name__}: {one_line(exc, 120)}); "
                        f"{fix}") from exc


def _load_pickle(path: Path, what: str, fix: str):
    try:
        with open(path, "rb") as fh:
            return read_data_pickle(fh, f"{what} file {path}")
    except FileNotFoundError as exc:
        raise DataError(f"{what} file not found: {path}; {fix}") from exc
    except OSError as exc:
        raise DataError(f"cannot read {what} file {path}: {exc.strerror}; check its permissions") from exc


def _check_image_meta(shape: tuple, dtype: np.dtype, where: str, fix: str) -> None:
    """The rules on an image array that need no pixel: (N, H, W, 3), not empty, integer pixels."""
    if len(shape) != 4 or shape[-1] != 3:
        raise DataError(f"images in {where} have shape {tuple(shape)}, expected (N, H, W, 3); {fix}")
    if shape[0] == 0 or shape[1] == 0 or shape[2] == 0:
        raise DataError(f"images in {where} are empty (shape {tuple(shape)}); {fix}")
    if dtype != np.uint8 and not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
        raise DataError(f"images in {where} have dtype {dtype}, expected uint8 pixel values; {fix}")


def _check_pixel_range(lo: int, hi: int, where: str, fix: str) -> None:
    if lo < 0 or hi > 255:
        raise DataError(f"images in {where} hold values {lo}..{hi}, expected 0..255; {fix}")


def _check_labels(labels, n_images: int, where: str, fix: str) -> np.ndarray:
    """The labels as a read-only int64 array: a flat list of integers, one per image."""
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError) as exc:
        raise DataError(f"labels in {where} are not a list of integers ({one_line(exc, 120)}); {fix}") from exc
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise DataError(f"labels in {where} are not a flat list of integers "
                        f"(shape {tuple(labels.shape)}, dtype {labels.dtype}); {fix}")
    if labels.shape[0] != n_images:
        raise DataError(f"{where} holds {n_images} images but {labels.shape[0]} labels; {fix}")
    labels = labels.astype(np.int64)
    labels.flags.writeable = False
    return labels


def _validate(images, labels, path_desc: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        try:
            images = np.asarray(images)
        except (ValueError, TypeError) as exc:
            raise DataError(f"images in {path_desc} are not an array ({one_line(exc, 120)}); {fix}") from exc
    images = np.asarray(images)
    _check_image_meta(images.shape, images.dtype, path_desc, fix)
    if images.dtype != np.uint8:
        _check_pixel_range(int(images.min()), int(images.max()), path_desc, fix)
        images = images.astype(np.uint8)
    labels = _check_labels(labels, images.shape[0], path_desc, fix)
    images = np.ascontiguousarray(images)
    images.flags.writeable = False
    return images, labels


def read_rfs_pickle(path: Path, display: str, fix: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """The validated images and labels of an RFS pickle, a dict with keys 'data' and 'labels' (miniImageNet,
    CIFAR-FS and FC100 share the format), and its other keys (``catname2label``)."""
    obj = _load_pickle(path, display, fix)
    if not isinstance(obj, dict):
        raise DataError(f"{display} file {path} holds a {type(obj).__name__}, expected a dict with keys 'data' and "
                        f"'labels'; {REPLACE_FILE}")
    for k in ("data", "labels"):
        if k not in obj:
            raise DataError(f"{display} file {path} has no key {k!r} (keys: {', '.join(map(str, obj))}); "
                            f"{REPLACE_FILE}")
    images, labels = _validate(obj["data"], obj["labels"], f"{display} file {path}", REPLACE_FILE)
    return images, labels, {k: v for k, v in obj.items() if k not in ("data", "labels")}


def _read_npy_member(fh, img_path: Path, keep: bool) -> tuple[tuple, np.dtype, np.ndarray | None]:
    version = np.lib.format.read_magic(fh)
    header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in header:
        raise ValueError(f"unsupported .npy version {version}")
    shape, fortran, dtype = header[version](fh)
    where = f"tieredImageNet file {img_path}"
    _check_image_meta(shape, dtype, where, REPLACE_FILE)
    total = int(np.prod(shape)) * dtype.itemsize
    out = np.empty(int(np.prod(shape)), dtype) if keep else None
    lo, hi, done = 0, 0, 0
    while done < total:
        piece = fh.read(min(NPZ_CHUNK_BYTES, total - done))
        if not piece:
            raise ValueError(f"truncated: the array 'images' holds {done} of its {total} bytes")
        values = np.frombuffer(piece, dtype)
        if dtype != np.uint8 and values.size:
            lo, hi = min(lo, int(values.min())), max(hi, int(values.max()))
        if keep:
            out[done // dtype.itemsize:(done + len(piece)) // dtype.itemsize] = values
        done += len(piece)
    if fh.read(1):  # the member's end: the zip's CRC of the array is checked here
        raise ValueError("the array 'images' has trailing bytes")
    _check_pixel_range(lo, hi, where, REPLACE_FILE)
    if keep:
        out = out.reshape(shape[::-1]).transpose() if fortran else out.reshape(shape)
    return tuple(shape), dtype, out


def read_npz_images(img_path: Path, keep: bool = True) -> tuple[tuple, np.dtype, np.ndarray | None]:
    """The array 'images' of a tieredImageNet ``.npz``, read piece by piece: (shape, dtype, array, or None when
    not ``keep``: the folder check reads every byte, so the zip's CRC is checked, but holds one piece at a time)."""
    try:
        with zipfile.ZipFile(img_path) as zf:
            names = zf.namelist()
            if "images.npy" not in names:
                arrays = ", ".join(n[:-4] for n in names if n.endswith(".npy")) or "none"
                raise DataError(f"tieredImageNet file {img_path} has no array 'images' (arrays: {arrays}); "
                                f"{REPLACE_FILE}")
            with zf.open("images.npy") as fh:
                return _read_npy_member(fh, img_path, keep)
    except (DataError, MemoryError):
        raise
    except (zipfile.BadZipFile, ValueError, EOFError, KeyError, zlib.error) as exc:
        raise DataError(f"tieredImageNet file {img_path} is not a readable .npz ({type(exc).__name__}: "
                        f"{one_line(exc, 120)}); {REPLACE_FILE}") from exc
    except OSError as exc:
        raise DataError(f"cannot read tieredImageNet file {img_path} ({one_line(exc, 120)}); check its permissions or "
                        f"{REPLACE_FILE}") from exc


def _read_tiered_labels(lab_path: Path, n_images: int, where: str, fix: str) -> tuple[np.ndarray, dict]:
    obj = _load_pickle(lab_path, "tieredImageNet", fix)
    if not isinstance(obj, dict) or "labels" not in obj:
        keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"tieredImageNet file {lab_path} has no key 'labels' (found: {keys}); {REPLACE_FILE}")
    labels = _check_labels(obj["labels"], n_images, where, REPLACE_FILE)
    return labels, {k: v for k, v in obj.items() if k != "labels"}


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


def missing_file_fix(spec: DatasetSpec) -> str:
    """The fix of a missing data file: the files a ``--data_path`` folder must hold."""
    required = [name for part in REQUIRED_PARTITIONS for name in partition_file_options(spec, part)[0]]
    return (f"--data_path must hold the {spec.display} files ({', '.join(required)}; the others optional), as "
            f"RFS released them or python -m search_lib.data.prepare writes them")


def partition_paths(spec: DatasetSpec, folder: Path, partition: str) -> list[Path]:
    """The existing files of one partition in ``folder``; DataError naming the first missing one."""
    options = [[folder / name for name in names] for names in partition_file_options(spec, partition)]
    found = next((paths for paths in options if all(p.is_file() for p in paths)), None)
    if found is None:
        missing = next(p for p in options[0] if not p.is_file())
        raise DataError(f"{spec.display} file not found: {missing}; {missing_file_fix(spec)}")
    return found


@dataclass(eq=False)
class PartitionFile:
    """One partition's file(s) as read and validated (uncached): ``labels`` as in the file, ``extras`` the
    file's other keys (``catname2label``, tieredImageNet's ``label_specific_str``, ...), ``images`` None when
    not kept."""

    paths: list[Path]
    shape: tuple
    labels: np.ndarray = field(repr=False)
    extras: dict = field(repr=False)
    images: np.ndarray | None = field(default=None, repr=False)


def read_partition(dataset: str | DatasetSpec, folder: Path, partition: str, keep_images: bool = True) -> PartitionFile:
    """Read and validate one partition's file(s) with the rules (and messages) of `load_split`, uncached."""
    spec = resolve_dataset(dataset)
    paths = partition_paths(spec, Path(folder), normalise_partition(spec, partition))
    if spec.key == "tiered":
        shape, _, images = read_npz_images(paths[0], keep=keep_images)
        where = f"tieredImageNet files {paths[0].name}/{paths[1].name} in {paths[0].parent}"
        labels, extras = _read_tiered_labels(paths[1], shape[0], where, missing_file_fix(spec))
        if images is not None:
            images, labels = _validate(images, labels, where, REPLACE_FILE)
    else:
        images, labels, extras = read_rfs_pickle(paths[0], spec.display, missing_file_fix(spec))
        shape = images.shape
    return PartitionFile(paths, tuple(shape), labels, extras, images if keep_images else None)


def first_appearance_labels(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0..n-1 in the order each first appears in the file, as RFS's CIFAR loader does."""
    ids, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(ids), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(ids))
    return rank[inverse.reshape(-1)]


@functools.lru_cache(maxsize=8)
def _load_cached(keys: tuple, spec: DatasetSpec, folder: Path, partition: str) -> SplitData:
    """`read_partition`, cached on the files' (path, mtime, size): a rewritten file is read again."""
    part = read_partition(spec, folder, partition)
    labels = part.labels
    if spec.key in CIFAR_KEYS:
        labels = first_appearance_labels(labels)
        labels.flags.writeable = False
    return SplitData(images=part.images, labels=labels, name=f"{spec.display}:{partition}", dataset=spec.key)


def _load_digits(partition: str) -> SplitData:
    images, labels = digits_partitions()[partition]
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
    folder = _require_folder(spec, data_path, missing_file_fix(spec))
    paths = partition_paths(spec, folder, part)
    # keyed on the dataset, not the name: MiniImageNet and MetaMiniImageNet share one loaded copy
    return _load_cached(tuple(_stat_key(p) for p in paths), DatasetSpec(spec.key), folder, part)


def clear_cache() -> None:
    """Forget every loaded split (frees the memory)."""
    _load_cached.cache_clear()
    _load_digits_cached.cache_clear()

