"""Synthetic primary sources for `search_lib.data.prepare`, for its tests and benchmarks: CIFAR-100's python
version in torchvision's layout (random pixels, the real class and superclass names) and an ImageNet training
folder of JPEGs (``<synset>/<synset>_<number>.JPEG``), with split lists in the published formats."""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from search_lib.data.split_lists import cifar100_superclasses
from search_lib.data.streamed_files import python2_pickle


def cifar100_names() -> tuple[list[str], list[str]]:
    """CIFAR-100's class and superclass names, in id order (alphabetical, as in its meta file)."""
    table = cifar100_superclasses()
    return sorted(n for names in table.values() for n in names), sorted(table)


def write_fake_cifar100(root: Path, train_per_class: int = 3, test_per_class: int = 1, seed: int = 0,
                        archive: bool = False) -> Path:
    """``root/cifar-100-python/{train,test,meta}`` (or ``root/cifar-100-python.tar.gz``) as Python 2 pickled them:
    random pixels, the classes of each part interleaved. Returns the folder (or the archive)."""
    rng = np.random.default_rng(seed)
    fine, coarse = cifar100_names()
    table = cifar100_superclasses()
    coarse_of = [coarse.index(next(s for s, names in table.items() if n in names)) for n in fine]
    parts = {}
    for part, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(100), per_class))
        parts[part] = {"batch_label": f"{part} batch", "fine_labels": [int(v) for v in labels],
                       "coarse_labels": [coarse_of[v] for v in labels],
                       "data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
                       "filenames": [f"img_{i}.png" for i in range(len(labels))]}
    parts["meta"] = {"fine_label_names": fine, "coarse_label_names": coarse}
    raw = {name: python2_pickle(obj) for name, obj in parts.items()}
    if archive:
        path = root / "cifar-100-python.tar.gz"
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w:gz") as tar:
            for name, data in raw.items():
                info = tarfile.TarInfo(f"cifar-100-python/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in raw.items():
        (folder / name).write_bytes(data)
    return folder


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth shapes and mild noise: JPEG sizes and decoding times of photographs, unlike random pixels."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    freq = rng.uniform(4.0, 40.0, size=2)
    base = 128 + 60 * np.sin(xx / freq[0]) + 60 * np.cos(yy / freq[1])
    tint = rng.uniform(0.5, 1.0, size=3).astype(np.float32)
    img = base[..., None] * tint + rng.normal(0.0, 16.0, size=(h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_fake_imagenet(root: Path, counts: dict[str, int], seed: int = 0, sizes: tuple[int, int] = (20, 110),
                        photo: bool = False) -> dict[str, list[Path]]:
    """``count`` JPEGs per synset folder, numbered so that sorting by name differs from sorting by number, of
    random heights and widths in ``sizes`` (the default: some enlarged, some shrunk to 84); random pixels, or
    photograph-like ones with ``photo``. Returns each synset's files in number order."""
    rng = np.random.default_rng(seed)
    out = {}
    for synset, count in counts.items():
        folder = root / synset
        folder.mkdir(parents=True, exist_ok=True)
        numbers = sorted(rng.choice(np.arange(1, 20000), size=count, replace=False).tolist())
        files = []
        for number in numbers:
            h, w = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
            pixels = _photo(rng, h, w) if photo else rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            path = folder / f"{synset}_{number}.JPEG"
            Image.fromarray(pixels).save(path, quality=95 if photo else 90)
            files.append(path)
        out[synset] = files
    return out


def write_mini_lists(folder: Path, picks: dict[str, dict[str, list[int]]]) -> Path:
    """Ravi & Larochelle's CSVs: ``picks[split][synset]`` are 1-based image numbers in list order."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, classes in picks.items():
        rows = [[f"{syn}{n:08d}.jpg", syn] for syn, numbers in classes.items() for n in numbers]
        with open(folder / f"{split}.csv", "w", newline="") as fh:
            csv.writer(fh, lineterminator="\n").writerows([["filename", "label"], *rows])
    return folder


def write_tiered_lists(folder: Path, classes: dict[str, list[tuple[str, str]]]) -> Path:
    """Ren et al.'s CSVs: ``classes[split]`` are (synset, category) rows, no header."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in classes.items():
        (folder / f"{split}.csv").write_text("".join(f"{s},{c}\n" for s, c in rows))
    return folder
