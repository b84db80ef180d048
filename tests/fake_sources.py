"""Fake primary sources for the tests of search_lib.data.prepare: CIFAR-100 in torchvision's layout and an
ImageNet training folder of tiny JPEGs, with random pixels and the real names."""

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


def cifar_source_image(folder: Path, name: str, k: int) -> np.ndarray:
    """The k-th image of class ``name`` in the fake folder: its training images in file order, then its test
    images, as 32 x 32 x 3."""
    import pickle

    fine = cifar100_names()[0]
    images = []
    for part in ("train", "test"):
        obj = pickle.loads((folder / part).read_bytes(), encoding="latin1")
        idx = [i for i, v in enumerate(obj["fine_labels"]) if v == fine.index(name)]
        images += [obj["data"][i].reshape(3, 32, 32).transpose(1, 2, 0) for i in idx]
    return images[k]


def write_fake_imagenet(root: Path, counts: dict[str, int], seed: int = 0) -> dict[str, list[Path]]:
    """One folder of ``count`` JPEGs per synset, numbered so that sorting by name differs from sorting by number;
    sizes from 20 to 110 pixels (some enlarged, some shrunk to 84). Returns each synset's files in number order."""
    rng = np.random.default_rng(seed)
    out = {}
    for synset, count in counts.items():
        folder = root / synset
        folder.mkdir(parents=True, exist_ok=True)
        numbers = sorted(rng.choice(np.arange(1, 20000), size=count, replace=False).tolist())
        files = []
        for number in numbers:
            h, w = (int(v) for v in rng.integers(20, 111, size=2))
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            path = folder / f"{synset}_{number}.JPEG"
            Image.fromarray(pixels).save(path, quality=90)
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
