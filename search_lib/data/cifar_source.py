"""CIFAR-100, python version, as the source of CIFAR-FS and FC100: the ``cifar-100-python`` folder that
torchvision downloads (``train``, ``test``, ``meta``: Python-2 pickles), its ``.tar.gz``, or a download through
torchvision (which checks the archive's MD5).

The parts are read with the data loaders' restricted unpickler (`search_lib.data.files.read_data_pickle`) and
checked against CIFAR-100 itself: the 100 class and 20 superclass names of the published lists, each image's
superclass the one its class belongs to, 3072 bytes per image. Each class's images come out in the order of
the files: its training images, then its test images (500 + 100 in the real data set).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from search_lib.core.errors import DataError, RunFailure, one_line
from search_lib.data.files import read_data_pickle
from search_lib.data.split_lists import cifar100_superclasses

FOLDER = "cifar-100-python"
ARCHIVE = "cifar-100-python.tar.gz"
PARTS = ("train", "test", "meta")
_FIX = (f"--source must be CIFAR-100's python version: the {FOLDER} folder (train, test, meta), the folder holding "
        f"it, or {ARCHIVE}; or add --download")


@dataclass(eq=False)
class Cifar100:
    """The images of each class, (n, 32, 32, 3) uint8 HWC, and the names: ``fine_names`` by class id."""

    images: dict[str, np.ndarray]
    fine_names: list[str]
    source: Path
    verified: bool  # every part (or the archive) has the MD5 of the release, as torchvision lists it

    def class_id(self, name: str) -> int:
        return self.fine_names.index(name)


def _release_md5() -> dict[str, str]:
    from torchvision.datasets import CIFAR100  # the release's checksums, as torchvision checks them

    parts = {name: md5 for name, md5 in CIFAR100.train_list + CIFAR100.test_list}
    return {**parts, CIFAR100.meta["filename"]: CIFAR100.meta["md5"], ARCHIVE: CIFAR100.tgz_md5}


def _read_parts(source: Path) -> tuple[dict[str, bytes], Path, bool]:
    """The three parts' bytes, where they were read from, and whether they are the release's."""
    source = source.expanduser()
    folder = source if (source / "meta").is_file() else source / FOLDER
    archive = source if source.is_file() else source / ARCHIVE
    known = _release_md5()
    if folder.is_dir() and all((folder / p).is_file() for p in PARTS):
        try:
            raw = {p: (folder / p).read_bytes() for p in PARTS}
        except OSError as exc:
            raise DataError(f"cannot read CIFAR-100 in {folder}: {exc.strerror}; check its permissions") from exc
        return raw, folder, all(hashlib.md5(raw[p]).hexdigest() == known[p] for p in PARTS)
    if archive.is_file():
        return _read_archive(archive, known)
    if not source.exists():
        raise DataError(f"CIFAR-100 not found: {source}; {_FIX}")
    raise DataError(f"{source} is not CIFAR-100 (no {FOLDER} folder with train, test and meta, no {ARCHIVE}); {_FIX}")


def _read_archive(archive: Path, known: dict[str, str]) -> tuple[dict[str, bytes], Path, bool]:
    try:
        with tarfile.open(archive, "r:*") as tar:  # the three members are read, nothing is extracted
            raw = {}
            for part in PARTS:
                member = tar.extractfile(f"{FOLDER}/{part}")
                if member is None:
                    raise KeyError(f"{FOLDER}/{part} is not a file")
                raw[part] = member.read()
        digest = hashlib.md5(archive.read_bytes()).hexdigest()
    except (tarfile.TarError, KeyError, EOFError, OSError) as exc:
        raise DataError(f"{archive} is not a readable CIFAR-100 archive ({type(exc).__name__}: "
                        f"{one_line(exc, 100)}); {_FIX}") from exc
    return raw, archive, digest == known[ARCHIVE]


def _unpickle(raw: bytes, where: Path, keys: tuple[str, ...]) -> dict:
    obj = read_data_pickle(io.BytesIO(raw), f"CIFAR-100 part {where}", _FIX)
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise DataError(f"CIFAR-100 part {where} has no key {missing[0]!r}; {_FIX}")
    return obj


def _check_names(meta: dict, where: Path) -> tuple[list[str], list[str]]:
    table = cifar100_superclasses()
    fine, coarse = list(meta["fine_label_names"]), list(meta["coarse_label_names"])
    expected_fine = sorted(n for names in table.values() for n in names)
    if sorted(map(str, fine)) != expected_fine or len(fine) != 100:
        odd = next((n for n in fine if n not in expected_fine), f"{len(fine)} names")
        raise DataError(f"{where} does not name CIFAR-100's 100 classes (e.g. {odd!r}); {_FIX}")
    if sorted(map(str, coarse)) != sorted(table) or len(coarse) != 20:
        odd = next((n for n in coarse if n not in table), f"{len(coarse)} names")
        raise DataError(f"{where} does not name CIFAR-100's 20 superclasses (e.g. {odd!r}); {_FIX}")
    return [str(n) for n in fine], [str(n) for n in coarse]


def _part_images(obj: dict, where: Path, fine: list[str], coarse: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A part's images as (N, 32, 32, 3) HWC and their class ids, checked against the superclass table."""
    data = obj["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"CIFAR-100 part {where} holds data of shape {shape}, expected N x 3072 uint8; {_FIX}")
    labels = [np.asarray(obj[k]) for k in ("fine_labels", "coarse_labels")]
    for key, values, top in zip(("fine_labels", "coarse_labels"), labels, (100, 20)):
        if values.shape != (len(data),) or not np.issubdtype(values.dtype, np.integer) or (
                len(values) and (values.min() < 0 or values.max() >= top)):
            raise DataError(f"CIFAR-100 part {where} has {key} that are not {len(data)} ids below {top}; {_FIX}")
    table = cifar100_superclasses()
    superclass_of = np.array([coarse.index(next(s for s, names in table.items() if n in names)) for n in fine])
    wrong = np.flatnonzero(superclass_of[labels[0]] != labels[1])
    if len(wrong):
        i = int(wrong[0])
        raise DataError(f"CIFAR-100 part {where}: image {i} of class {fine[labels[0][i]]} has superclass "
                        f"{coarse[labels[1][i]]}; the classes and superclasses are not CIFAR-100's; {_FIX}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels[0].astype(np.int64)


def read_cifar100(source: str | Path) -> Cifar100:
    """CIFAR-100 from ``source`` (folder, parent folder or archive), checked; DataError naming the problem."""
    raw, where, verified = _read_parts(Path(source))
    meta = _unpickle(raw["meta"], where / "meta" if where.is_dir() else where, ("fine_label_names",
                                                                                 "coarse_label_names"))
    fine, coarse = _check_names(meta, where)
    parts = [_part_images(_unpickle(raw[p], where / p if where.is_dir() else where,
                                    ("data", "fine_labels", "coarse_labels")), where / p, fine, coarse)
             for p in ("train", "test")]
    images = {}
    for cid, name in enumerate(fine):
        images[name] = np.ascontiguousarray(np.concatenate([imgs[labels == cid] for imgs, labels in parts]))
    return Cifar100(images, fine, where, verified)


def download_cifar100(root: Path) -> Path:
    """Download CIFAR-100 into ``root`` through torchvision (MD5 checked; nothing is fetched when the archive is
    there already); the folder to read it from."""
    from torchvision.datasets import CIFAR100

    try:
        root.mkdir(parents=True, exist_ok=True)
        CIFAR100(str(root), train=True, download=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; torchvision's bad checksum a RuntimeError
        raise RunFailure(f"cannot download CIFAR-100 into {root} ({type(exc).__name__}: {one_line(exc, 100)}); "
                         f"check the network, or fetch {CIFAR100.url} by hand and give it as --source") from exc
    return root / FOLDER
