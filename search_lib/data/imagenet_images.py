"""ImageNet-1k's training folder as the source of miniImageNet and tieredImageNet: its synset folders, their
files in the order the split lists count them, and each image decoded and resized.

The files of a synset are ordered by the number after the ``_`` of their names (``n01532829_123.JPEG``), as
the standard miniImageNet generator counts them. An image is decoded with Pillow (colour, grey or CMYK -> RGB;
the EXIF orientation tag is not applied, as torchvision's ImageNet loaders do not) and resized by exact area
averaging (`area_resize`): each output pixel is the mean of the input pixels its footprint covers, each weighted
by the part of it that is covered, computed in integers and rounded half up. That is OpenCV's ``INTER_AREA``,
the resampling of the standard generator: the same values wherever both sides shrink (or both grow), up to
one grey level where OpenCV's floating point rounds a near-tie the other way. It averages the whole footprint,
so shrinking a photograph five-fold keeps its colours and does not alias. Decoding runs on threads (Pillow and
numpy release the GIL while they decode and compute).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from search_lib.core.errors import DataError, one_line

_NUMBERED = re.compile(r"^(?P<synset>[^_]+)_(?P<number>\d+)\.[A-Za-z]+$")
SOURCE_FIX = ("--source must be ImageNet-1k's training folder, one sub-folder of JPEGs per synset "
              "(ILSVRC2012_img_train.tar extracted, and the synset tars in it)")
RESAMPLING = "exact area averaging (OpenCV INTER_AREA), rounded half up"


def check_synsets(root: Path, synsets: Sequence[str]) -> None:
    """DataError unless ``root`` holds a folder for every synset (naming how many are missing, and the first)."""
    if not root.is_dir():
        raise DataError(f"ImageNet training folder not found: {root}; {SOURCE_FIX}")
    missing = [s for s in synsets if not (root / s).is_dir()]
    if missing:
        raise DataError(f"{len(missing)} of the {len(synsets)} synset folders the split lists name are missing from "
                        f"{root} (first: {', '.join(missing[:3])}); {SOURCE_FIX}")


def synset_files(root: Path, synset: str) -> list[str]:
    """The paths of one synset's images, sorted by the number after the ``_`` of their names (strings: the
    779,165 files of tieredImageNet take a quarter of the memory ``Path`` objects would)."""
    folder = root / synset
    numbered = []
    try:
        names = sorted(e.name for e in os.scandir(folder) if not e.name.startswith("."))
    except OSError as exc:
        raise DataError(f"cannot list {folder}: {exc.strerror}; check its permissions") from exc
    for name in names:
        match = _NUMBERED.match(name)
        if match is None or match["synset"] != synset:
            raise DataError(f"unexpected file {folder / name}: ImageNet's synset folders hold only "
                            f"<synset>_<number>.JPEG files, and the lists count them; move it out of {folder}")
        numbered.append((int(match["number"]), name))
    numbered.sort()
    for (a, first), (b, second) in zip(numbered, numbered[1:]):
        if a == b:
            raise DataError(f"{folder} holds {first} and {second}, the same image number twice; keep one of them")
    return [str(folder / name) for _, name in numbered]


def listed_files(root: Path, synset: str, numbers: Iterable[int]) -> list[str]:
    """The files a miniImageNet list names by number (1-based, in the order of `synset_files`)."""
    files = synset_files(root, synset)
    too_far = next((n for n in numbers if n > len(files)), None)
    if too_far is not None:
        raise DataError(f"the split list asks for image {too_far} of {synset} but {root / synset} holds {len(files)} "
                        f"images; {SOURCE_FIX}")
    return [files[n - 1] for n in numbers]


@functools.lru_cache(maxsize=1024)
def area_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The input pixels each output pixel covers along one axis, (n_out, k) indices, and their overlaps, (n_out, k)
    integers: on a scale where an input pixel is ``n_out`` long and an output pixel ``n_in``, so that each row of
    overlaps sums to ``n_in`` exactly (indices past the edge come with overlap 0)."""
    i = np.arange(n_out, dtype=np.int64)[:, None]
    j = (i * n_in) // n_out + np.arange(-(-n_in // n_out) + 1, dtype=np.int64)[None, :]
    overlap = np.minimum((i + 1) * n_in, (j + 1) * n_out) - np.maximum(i * n_in, j * n_out)
    return np.minimum(j, n_in - 1), np.clip(overlap, 0, None)


def area_resize(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` (H, W, C) uint8 resized to (size, size, C) by exact area averaging (module docstring)."""
    h, w = image.shape[:2]
    dtype = np.int32 if 511 * h * w < 2**31 else np.int64  # 2 * sum + h * w must fit
    rows, row_w = area_taps(h, size)
    cols, col_w = area_taps(w, size)
    pixels = image.astype(dtype)
    tmp = np.zeros((size, w, image.shape[2]), dtype)
    for k in range(rows.shape[1]):
        tmp += row_w[:, k, None, None].astype(dtype) * pixels[rows[:, k]]
    num = np.zeros((size, size, image.shape[2]), dtype)
    for k in range(cols.shape[1]):
        num += col_w[None, :, k, None].astype(dtype) * tmp[:, cols[:, k]]
    return ((2 * num + h * w) // (2 * h * w)).astype(np.uint8)


def load_image(path: str | Path, size: int) -> np.ndarray:
    """One image as (size, size, 3) uint8 RGB (module docstring: decoding and resampling)."""
    try:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path} ({type(exc).__name__}: {one_line(exc, 100)}); the file is damaged: "
                        f"replace it with the one in ImageNet's archive") from exc
    return area_resize(pixels, size)


class ImageDecoder:
    """Decodes the images of a class on ``workers`` threads; `submit` one class ahead of the one being written."""

    def __init__(self, size: int, workers: int, progress=None):
        self.size = int(size)
        self.progress = progress  # a tqdm bar (or None): one step per image
        self._pool = ThreadPoolExecutor(max(1, int(workers)), thread_name_prefix="decode")

    def submit(self, paths: Sequence[str]) -> list[Future]:
        return [self._pool.submit(load_image, p, self.size) for p in paths]

    def result(self, futures: list[Future]) -> np.ndarray:
        out = np.empty((len(futures), self.size, self.size, 3), np.uint8)
        for i, fut in enumerate(futures):
            out[i] = fut.result()
            if self.progress is not None:
                self.progress.update(1)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
