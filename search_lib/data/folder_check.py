"""The check of a benchmark folder, downloaded or prepared (``python -m search_lib.data.prepare --check DIR
--dataset NAME``): one screen when it is right, else one line naming the first problem and its fix (DataError,
exit 3).

Each file is read by `search_lib.data.files.read_partition`, the loaders' own reader, so a malformed file
gets the very line the search and the training print. Then the folder as a whole: the image size, the labels
(mini's ``catname2label``, tiered's ``label_specific`` / ``label_specific_str``), no class in two of train /
val / test, trainval = train + val, and the classes and images per class of each split against what the
folder should hold: what its ``prepare.json`` records when `search_lib.data.prepare` wrote it (and the MD5 of
every file), else the published benchmark (`search_lib.data.split_lists.PUBLISHED`, and for miniImageNet and
tieredImageNet the published synsets). Classes are told apart across files by their ids (CIFAR-FS, FC100,
miniImageNet: ids shared by all files) or names (tieredImageNet: each file numbers its classes from 0).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from search_lib.core.errors import DataError
from search_lib.data.benchmark_plan import MANIFEST, PARTITION_OF
from search_lib.data.files import REPLACE_FILE, PartitionFile, partition_paths, read_partition
from search_lib.data.names import REQUIRED_PARTITIONS, DatasetSpec, release_partitions, resolve_dataset
from search_lib.data.split_lists import PUBLISHED, SPLIT_NAMES, read_split_lists

SPLIT_OF = {partition: split for split, partition in PARTITION_OF.items()}  # train_phase_train -> train, ...
_SYNSET = re.compile(r"^n\d{8}$")
_REMAKE = "re-create the folder with python -m search_lib.data.prepare"


@dataclass
class Expectation:
    """What the folder should hold: from its prepare.json or the published benchmark."""

    what: str
    classes: dict[str, int]
    image_size: int
    per_class: dict[str, dict[int, int]] | int | None  # split -> {label: images}, one count for all, or None
    names: dict[str, list[str]] | None = None
    md5: dict[str, str] = field(default_factory=dict)
    from_manifest: bool = False


@dataclass
class Row:
    """One partition as found: its files, images, classes (ids or names) and MD5s."""

    partition: str
    part: PartitionFile
    ids: list = field(default_factory=list)
    names: list[str] | None = None
    md5: dict[str, str] = field(default_factory=dict)

    @property
    def split(self) -> str:
        return SPLIT_OF.get(self.partition, self.partition)

    def per_class(self) -> tuple[int, int]:
        counts = np.unique(self.part.labels, return_counts=True)[1]
        return int(counts.min()), int(counts.max())


def _check_record(record) -> None:
    """ValueError unless ``record`` has the form `search_lib.data.benchmark_plan.Plan.manifest` gives it."""
    if not isinstance(record, dict) or not isinstance(record.get("dataset"), str):
        raise ValueError("not a record of search_lib.data.prepare")
    classes = record.get("classes")
    if not isinstance(classes, dict) or not all(isinstance(rows, list) and all(
            isinstance(r, list) and len(r) == 3 and isinstance(r[1], int) and isinstance(r[2], int) for r in rows)
            for rows in classes.values()) or not set(SPLIT_NAMES) <= set(classes):
        raise ValueError("its classes are not [name, label, images] rows per split")
    if not isinstance(record.get("image_size"), int) or not isinstance(record.get("md5", {}), dict):
        raise ValueError("no image_size, or md5 not a table")


def read_manifest(folder: Path) -> dict | None:
    """The folder's prepare.json, None when there is none; DataError when it is unreadable."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        _check_record(record)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is unreadable ({exc}); {_REMAKE} --overwrite, or delete it to check the folder "
                        f"against the published benchmark") from exc
    return record


def expectation(spec: DatasetSpec, manifest: dict | None) -> Expectation:
    """What the folder should hold: the manifest's plan, else the published benchmark."""
    if manifest is not None:
        classes = manifest["classes"]
        kind = "published" if manifest.get("published_lists") else "custom"
        counts = " / ".join(str(len(classes[s])) for s in SPLIT_NAMES)
        return Expectation(
            f"its {MANIFEST} ({kind} split lists: {counts} classes)",
            {s: len(v) for s, v in classes.items()}, int(manifest["image_size"]),
            {s: {int(label): int(n) for _, label, n in v} for s, v in classes.items()},
            {s: [str(name) for name, _, _ in v] for s, v in classes.items()}, dict(manifest.get("md5") or {}), True)
    bench = PUBLISHED[spec.key]
    names = None
    if spec.key in ("mini", "tiered"):
        lists = read_split_lists(spec)
        names = {s: list(lists.splits[s].names) for s in SPLIT_NAMES}
    return Expectation(f"the published {spec.display} ({bench.describe()})", dict(bench.classes), bench.image_size,
                       bench.images_per_class, names)


def _class_names(spec: DatasetSpec, part: PartitionFile, where: Path) -> list[str] | None:
    """The names of the file's classes in label order, where the file names them; DataError when its labels and
    names disagree."""
    ids = sorted(set(part.labels.tolist()))
    if spec.key == "mini" and "catname2label" in part.extras:
        table = part.extras["catname2label"]
        by_label = {int(v): str(k) for k, v in table.items()} if isinstance(table, dict) else {}
        unnamed = [i for i in ids if i not in by_label]
        if unnamed:
            raise DataError(f"label {unnamed[0]} in {where} has no name in its catname2label; {REPLACE_FILE}")
        return [by_label[i] for i in ids]
    if spec.key == "tiered":
        specific = part.extras.get("label_specific")
        if specific is not None and not np.array_equal(np.asarray(specific).reshape(-1), part.labels):
            raise DataError(f"label_specific in {where} differs from its labels; {REPLACE_FILE}")
        strings = part.extras.get("label_specific_str")
        if strings is not None and ids and (ids[0] < 0 or ids[-1] >= len(strings)):
            raise DataError(f"labels in {where} run to {ids[-1]} but label_specific_str names {len(strings)} "
                            f"classes; {REPLACE_FILE}")
        return None if strings is None else [str(strings[i]) for i in ids]
    return None


def _read_rows(spec: DatasetSpec, folder: Path, expect: Expectation, planned: set[str]) -> list[Row]:
    rows = []
    for partition in release_partitions(spec):
        split = SPLIT_OF.get(partition, partition)
        if partition not in REQUIRED_PARTITIONS and split not in planned:
            try:
                partition_paths(spec, folder, partition)
            except DataError:
                continue  # an optional partition the folder does not have
        part = read_partition(spec, folder, partition, keep_images=False)
        h, w = part.shape[1:3]
        if (h, w) != (expect.image_size, expect.image_size):
            raise DataError(f"images in {part.paths[0]} are {h} x {w}, {expect.what} has {expect.image_size} x "
                            f"{expect.image_size}; {REPLACE_FILE}")
        row = Row(partition, part, sorted(set(part.labels.tolist())))
        row.names = _class_names(spec, part, part.paths[-1])
        rows.append(row)
    return rows


def _identities(spec: DatasetSpec, row: Row) -> list | None:
    return row.names if spec.key == "tiered" else row.ids


def _check_splits(spec: DatasetSpec, rows: dict[str, Row]) -> list[str]:
    """No class in two of train / val / test; trainval = train + val. What was established, in words."""
    if any(_identities(spec, rows[s]) is None for s in SPLIT_NAMES):
        return ["classes not compared across splits (the files do not name them)"]
    seen: dict = {}
    for split in SPLIT_NAMES:
        for cls in _identities(spec, rows[split]) or []:
            if cls in seen:
                raise DataError(f"class {cls} is in both {seen[cls]} ({rows[seen[cls]].part.paths[0].name}) and "
                                f"{split} ({rows[split].part.paths[0].name}); a class belongs to one split: {_REMAKE}")
            seen[cls] = split
    if "trainval" in rows:
        tv, parts = rows["trainval"], [rows["train"], rows["val"]]
        want = [_identities(spec, r) for r in parts]
        have = _identities(spec, tv)
        same = sorted(have) == sorted(want[0] + want[1]) if have is not None and None not in want else \
            len(tv.ids) == len(parts[0].ids) + len(parts[1].ids)
        if not same:
            raise DataError(f"{tv.part.paths[0].name} holds {len(tv.ids)} classes that are not train's and val's "
                            f"({len(parts[0].ids)} + {len(parts[1].ids)}); {_REMAKE}")
    return ["no class in two splits"] + (["trainval = train + val"] if "trainval" in rows else [])


def _images_needed(expect: Expectation, split: str, label: int, where: str) -> int | None:
    if expect.from_manifest:
        if label not in expect.per_class[split]:
            raise DataError(f"{split} ({where}) holds label {label}, not one of the classes {MANIFEST} lists; "
                            f"{_REMAKE} --overwrite")
        return expect.per_class[split][label]
    return None if split == "trainval" else expect.per_class  # the release's trainval: not checked per class


def _check_names(row: Row, split: str, where: str, expect: Expectation) -> None:
    names = (expect.names or {}).get(split)
    if names is None or row.names is None:
        return
    if not expect.from_manifest and not all(_SYNSET.match(n) for n in row.names):
        return  # names in words (Ren et al.'s tieredImageNet files): not comparable with the synset lists
    if sorted(row.names) != sorted(names):
        odd = sorted(set(row.names) - set(names)) or sorted(set(names) - set(row.names))
        raise DataError(f"{split} ({where}) does not hold the classes of {expect.what} (e.g. {odd[0]}); {_REMAKE}")


def _check_counts(spec: DatasetSpec, rows: dict[str, Row], expect: Expectation) -> None:
    """Classes, images per class and class names of each split against the expectation."""
    for split, row in rows.items():
        if split not in expect.classes:
            continue
        where = row.part.paths[0].name
        if len(row.ids) != expect.classes[split]:
            raise DataError(f"{split} ({where}) holds {len(row.ids)} classes, {expect.what} has "
                            f"{expect.classes[split]}; {_REMAKE} --dataset {spec.display}")
        labels, counts = np.unique(row.part.labels, return_counts=True)
        for label, n in zip(labels.tolist(), counts.tolist()):
            need = _images_needed(expect, split, label, where)
            if need is not None and n != need:
                raise DataError(f"class {label} of {split} ({where}) holds {n} images, {expect.what} has {need}; "
                                f"{_REMAKE}")
        _check_names(row, split, where, expect)


def file_md5(path: Path, bar=None) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return digest.hexdigest()


def _check_md5(rows: list[Row], expect: Expectation, progress: bool) -> None:
    paths = [p for row in rows for p in row.part.paths]
    with tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True, desc="MD5", leave=False,
              disable=None if progress else True) as bar:
        for row in rows:
            row.md5 = {p.name: file_md5(p, bar) for p in row.part.paths}
    for row in rows:
        for name, digest in row.md5.items():
            if name in expect.md5 and expect.md5[name] != digest:
                raise DataError(f"{name} changed since it was prepared (MD5 {digest}, recorded {expect.md5[name]}); "
                                f"{_REMAKE} --overwrite")


@dataclass
class FolderReport:
    spec: DatasetSpec
    folder: Path
    expect: Expectation
    rows: list[Row]
    findings: list[str] = field(default_factory=list)  # what the folder-wide checks established

    def screen(self) -> str:
        lines = [f"{self.spec.display} in {self.folder}: ok", f"checked against {self.expect.what}",
                 f"{'split':<16} {'classes':>7} {'images':>8} {'per class':>9}  {'image':<9} {'MD5':<32}  file"]
        for row in self.rows:
            lo, hi = row.per_class()
            per = str(lo) if lo == hi else f"{lo}-{hi}"
            size = "x".join(map(str, row.part.shape[1:]))
            for i, path in enumerate(row.part.paths):
                head = (f"{row.split:<16} {len(row.ids):>7} {row.part.shape[0]:>8} {per:>9}  {size:<9}" if i == 0
                        else " " * 54)
                lines.append(f"{head} {row.md5.get(path.name, ''):<32}  {path.name}")
        lines.append("; ".join(self.findings))
        return "\n".join(lines)


def check_folder(dataset: str | DatasetSpec, folder: str | Path, manifest: dict | None = None,
                 progress: bool = False) -> FolderReport:
    """Check ``folder`` as ``dataset``: the report, or DataError with the first problem. ``manifest`` (the
    preparation's own plan) replaces the folder's prepare.json."""
    spec = resolve_dataset(dataset)
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{spec.display} folder not found: {folder}; give the folder of its files")
    record = manifest if manifest is not None else read_manifest(folder)
    if record is not None and record.get("dataset") != spec.display:
        raise DataError(f"{folder} holds {record.get('dataset')} ({MANIFEST}), not {spec.display}; give --dataset "
                        f"{record.get('dataset')} or the {spec.display} folder")
    if manifest is None and record is not None and record.get("status") != "done":
        raise DataError(f"{folder} holds a preparation of {spec.display} that did not finish; re-run the prepare "
                        f"command that started it to complete it")
    expect = expectation(spec, record)
    rows = _read_rows(spec, folder, expect, set(expect.classes))
    by_split = {row.split: row for row in rows}
    findings = _check_splits(spec, by_split)
    _check_counts(spec, by_split, expect)
    _check_md5(rows, expect, progress)
    findings += ["classes and images per class as expected", "MD5s as recorded" if expect.md5 else "MD5s computed"]
    return FolderReport(spec, folder, expect, rows, findings)
