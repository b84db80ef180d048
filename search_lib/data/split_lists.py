"""The class splits of the four benchmarks: the published lists shipped in ``search_lib/data/splits/`` (where
each comes from: docs/data.md), or lists in the same formats from a folder (``--splits DIR``).

* CIFAR-FS (Bertinetto et al., ICLR 2019): ``CIFAR-FS/{train,val,test}.json``, each a JSON list of
  ``[superclass, class]`` pairs of CIFAR-100 names (64 / 16 / 20 classes). The three lists together name
  every CIFAR-100 class with its superclass: they are also the table of CIFAR-100's 20 superclasses.
* FC100 (Oreshkin et al., NeurIPS 2018): ``FC100/{train,val,test}.json``, JSON lists of CIFAR-100 superclass
  names (12 / 4 / 4); a split holds the five classes of each of its superclasses (60 / 20 / 20).
* miniImageNet (Ravi & Larochelle, ICLR 2017): ``miniImageNet/{train,val,test}.csv`` (or ``.csv.gz``), header
  ``filename,label``, rows such as ``n0153282900000005.jpg,n01532829``: the number before ``.jpg`` is a
  1-based index into the synset's ImageNet training files sorted by the number after the ``_`` of their
  names (64 / 16 / 20 classes x 600 images).
* tieredImageNet (Ren et al., ICLR 2018): ``tieredImageNet/{train,val,test}.csv``, rows ``synset,category``
  without a header (351 / 97 / 160 classes in 20 / 6 / 8 categories); every training image of each synset.

A split's classes keep the order of their list (miniImageNet: the order in which the classes first appear,
each class's images in row order).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from search_lib.core.errors import DataError, UsageError
from search_lib.data.names import DatasetSpec, resolve_dataset

SPLITS_DIR = Path(__file__).resolve().with_name("splits")
SPLIT_NAMES = ("train", "val", "test")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a class name is also a folder name under --source
_MINI_FILE = re.compile(r"^(?P<synset>.+?)(?P<number>\d{8})\.jpg$")


@dataclass(frozen=True)
class Benchmark:
    """What the published benchmark holds: classes per split, images per class (None: every image of each
    class), image side, and categories per split where classes are grouped (FC100, tieredImageNet)."""

    classes: dict[str, int]
    images_per_class: int | None
    image_size: int
    categories: dict[str, int] | None = None

    def describe(self) -> str:
        text = " / ".join(str(self.classes[s]) for s in SPLIT_NAMES) + " classes"
        if self.categories:
            text += " in " + " / ".join(str(self.categories[s]) for s in SPLIT_NAMES) + " categories"
        return text + (f" x {self.images_per_class} images" if self.images_per_class else "")


PUBLISHED = {
    "cifarfs": Benchmark({"train": 64, "val": 16, "test": 20}, 600, 32),
    "fc100": Benchmark({"train": 60, "val": 20, "test": 20}, 600, 32, {"train": 12, "val": 4, "test": 4}),
    "mini": Benchmark({"train": 64, "val": 16, "test": 20}, 600, 84),
    "tiered": Benchmark({"train": 351, "val": 97, "test": 160}, None, 84, {"train": 20, "val": 6, "test": 8}),
}


@dataclass(frozen=True)
class ClassList:
    """One split: its class names in order, each class's category (CIFAR-100 superclass, tieredImageNet
    category synset) and, for miniImageNet, each class's image numbers (1-based) in list order."""

    names: tuple[str, ...]
    category: dict[str, str]
    images: dict[str, tuple[int, ...]] | None = None


@dataclass(frozen=True)
class SplitLists:
    """The train / val / test class lists of one dataset, as read from ``folder``."""

    dataset: str  # the dataset key
    splits: dict[str, ClassList]
    folder: Path
    published: bool

    def fingerprint(self) -> str:
        """A digest of the lists' content (not of where they were read from)."""
        content = {s: [self.splits[s].names, self.splits[s].category, self.splits[s].images] for s in SPLIT_NAMES}
        return hashlib.sha256(json.dumps([self.dataset, content], sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        counts = " / ".join(str(len(self.splits[s].names)) for s in SPLIT_NAMES)
        return f"{'published' if self.published else 'custom'} split lists ({counts} classes, {self.folder})"


def _read_text(folder: Path, stem: str, suffixes: tuple[str, ...]) -> tuple[str, Path]:
    for suffix in suffixes:
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            try:
                raw = gzip.decompress(path.read_bytes()) if suffix.endswith(".gz") else path.read_bytes()
                return raw.decode("utf-8"), path
            except (OSError, EOFError, UnicodeDecodeError) as exc:
                raise DataError(f"cannot read the split list {path} ({exc}); give readable lists with "
                                f"--splits") from exc
    raise DataError(f"split list not found: {folder / (stem + suffixes[0])}; --splits must be a folder holding "
                    f"{', '.join(s + suffixes[0] for s in SPLIT_NAMES)}")


def _json_list(folder: Path, stem: str) -> tuple[list, Path]:
    text, path = _read_text(folder, stem, (".json",))
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"split list {path} is not valid JSON ({exc}); give the published list's format") from exc
    if not isinstance(value, list) or not value:
        raise DataError(f"split list {path} is not a non-empty JSON list; give the published list's format")
    return value, path


def cifar_fs_pairs(folder: Path = SPLITS_DIR / "CIFAR-FS") -> dict[str, list[tuple[str, str]]]:
    """Split -> its (superclass, class) pairs as listed."""
    out = {}
    for split in SPLIT_NAMES:
        value, path = _json_list(folder, split)
        if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in value):
            raise DataError(f"split list {path} must be a JSON list of [superclass, class] pairs")
        out[split] = [(sup, name) for sup, name in value]
    return out


def cifar100_superclasses() -> dict[str, tuple[str, ...]]:
    """CIFAR-100's superclass -> its five classes (sorted), from the published CIFAR-FS lists."""
    table: dict[str, list[str]] = {}
    for pairs in cifar_fs_pairs().values():
        for sup, name in pairs:
            table.setdefault(sup, []).append(name)
    return {sup: tuple(sorted(names)) for sup, names in sorted(table.items())}


def _cifar_fs(folder: Path) -> dict[str, ClassList]:
    return {s: ClassList(tuple(n for _, n in pairs), {n: sup for sup, n in pairs})
            for s, pairs in cifar_fs_pairs(folder).items()}


def _fc100(folder: Path) -> dict[str, ClassList]:
    table = cifar100_superclasses()
    out = {}
    for split in SPLIT_NAMES:
        value, path = _json_list(folder, split)
        unknown = [v for v in value if v not in table]
        if unknown:
            raise DataError(f"split list {path} names {unknown[0]!r}, not a CIFAR-100 superclass; list superclass "
                            f"names such as {next(iter(table))!r}")
        names = tuple(n for sup in value for n in table[sup])  # a superclass's classes in CIFAR-100 id order
        out[split] = ClassList(names, {n: sup for sup in value for n in table[sup]})
    return out


def _mini_rows(folder: Path, split: str) -> ClassList:
    text, path = _read_text(folder, split, (".csv", ".csv.gz"))
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise DataError(f"split list {path} does not start with the header filename,label; give lists in Ravi & "
                        f"Larochelle's format")
    images: dict[str, list[int]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        match = _MINI_FILE.match(row[0]) if len(row) == 2 else None
        if match is None or match["synset"] != row[1] or not _SAFE_NAME.match(row[1]):
            raise DataError(f"line {line} of {path} is {','.join(row)!r}, expected <synset><8 digits>.jpg,<synset> "
                            f"(e.g. n0153282900000005.jpg,n01532829)")
        number = int(match["number"])
        if number < 1 or number in images.get(row[1], ()):
            raise DataError(f"line {line} of {path}: image number {number} of {row[1]} is "
                            f"{'0' if number < 1 else 'listed twice'}; the numbers are 1-based and distinct")
        images.setdefault(row[1], []).append(number)
    return ClassList(tuple(images), {}, {k: tuple(v) for k, v in images.items()})


def _tiered_rows(folder: Path, split: str) -> ClassList:
    text, path = _read_text(folder, split, (".csv",))
    names, category = [], {}
    for line, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row:
            continue
        if len(row) != 2 or not _SAFE_NAME.match(row[0]) or not row[1] or row[0] in category:
            raise DataError(f"line {line} of {path} is {','.join(row)!r}: expected synset,category (e.g. "
                            f"n01530575,n01524359), each synset once")
        names.append(row[0])
        category[row[0]] = row[1]
    return ClassList(tuple(names), category)


_READERS = {"cifarfs": ("CIFAR-FS", _cifar_fs), "fc100": ("FC100", _fc100),
            "mini": ("miniImageNet", lambda f: {s: _mini_rows(f, s) for s in SPLIT_NAMES}),
            "tiered": ("tieredImageNet", lambda f: {s: _tiered_rows(f, s) for s in SPLIT_NAMES})}


def read_split_lists(dataset: str | DatasetSpec, folder: str | Path | None = None) -> SplitLists:
    """The class lists of ``dataset``: the published ones, or those in ``folder`` (the same formats)."""
    spec = resolve_dataset(dataset)
    if spec.key not in _READERS:
        raise UsageError(f"{spec.display} has no split lists; use CIFAR-FS, FC100, miniImageNet or tieredImageNet")
    sub, reader = _READERS[spec.key]
    path = SPLITS_DIR / sub if folder is None else Path(folder).expanduser()
    if folder is not None and not path.is_dir():
        raise DataError(f"--splits folder not found: {path}; give a folder of train / val / test lists")
    splits = reader(path)
    seen: dict[str, str] = {}
    for split in SPLIT_NAMES:
        if not splits[split].names:
            raise DataError(f"the {split} list in {path} names no class; every split needs at least one")
        for name in splits[split].names:
            if name in seen:
                raise DataError(f"the split lists in {path} put class {name} in both {seen[name]} and {split}; a "
                                f"class belongs to one split")
            seen[name] = split
    return SplitLists(spec.key, splits, path, folder is None)
