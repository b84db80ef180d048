"""What a prepared benchmark folder holds: its files, the classes of each with their labels, where each class's
images come from, and the folder's record ``prepare.json`` (`Plan.manifest`).

Every split is written class after class in the order of its list; ``trainval`` (what ``--use_trainval``
reads) is the base classes then the validation classes. Labels, as the RFS release numbers them:

* CIFAR-FS / FC100: each image's CIFAR-100 class id (the loaders renumber them by first appearance, as RFS's).
* miniImageNet: 0..63 for the base classes, then 64..79 (val) and 80..99 (test) in list order, so that no
  two splits share an id; ``catname2label`` maps each file's synsets to their ids.
* tieredImageNet: each split numbers its classes from 0 in list order (trainval: base 0..350, then val);
  ``label_specific`` repeats the labels, ``label_general`` numbers the categories of the file in order of first
  appearance, ``label_specific_str`` / ``label_general_str`` name them (synset ids).

miniImageNet's release also has ``train_phase_val`` / ``train_phase_test`` (and tieredImageNet
``train_phase_val``): images of the base classes beyond Ravi & Larochelle's 600, chosen by the authors of the
release with no published list. Nothing here reads them and no list says which images they hold, so they are
not written; the loaders and the folder check treat them as optional.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from search_lib.core.errors import DataError
from search_lib.data.cifar_source import Cifar100
from search_lib.data.imagenet_images import RESAMPLING, SOURCE_FIX, check_synsets, listed_files, synset_files
from search_lib.data.names import DatasetSpec, partition_file_options
from search_lib.data.split_lists import SPLIT_NAMES, SplitLists

MANIFEST = "prepare.json"
FORMAT_VERSION = 1
PARTITION_OF = {"train": "train_phase_train", "val": "val", "test": "test", "trainval": "trainval_phase_train"}


@dataclass(eq=False)
class Unit:
    """One class: its name, number of images and their source (CIFAR: the images; ImageNet: the files)."""

    name: str
    count: int
    source: object = field(repr=False)


@dataclass(eq=False)
class FilePlan:
    """One partition's file(s): its classes in order, the label of each, the pickle's other keys (mini) or the
    content of the labels file (tiered; its per-image lists are filled in by `image_labels`)."""

    split: str
    names: tuple[str, ...]  # the images file first (tiered: then the labels file)
    classes: list[str]
    labels: list[int]
    extras: dict = field(default_factory=dict)
    categories: list[str] | None = None  # tiered: each class's category

    def image_labels(self, counts: dict[str, int]) -> list[int]:
        return [label for name, label in zip(self.classes, self.labels) for _ in range(counts[name])]

    def tiered_labels(self, counts: dict[str, int]) -> dict:
        """The content of a tieredImageNet ``*_labels.pkl``."""
        general = list(dict.fromkeys(self.categories))
        number = {c: i for i, c in enumerate(general)}
        specific = np.asarray(self.image_labels(counts), dtype=np.int64)
        per_class = np.asarray([number[c] for c in self.categories], dtype=np.int64)
        sizes = [counts[n] for n in self.classes]
        return {"labels": specific.tolist(), "label_specific": specific,
                "label_general": np.repeat(per_class, sizes),
                "label_specific_str": list(self.classes), "label_general_str": general}


@dataclass(eq=False)
class Plan:
    """Everything a preparation writes, before a single image is read."""

    spec: DatasetSpec
    lists: SplitLists
    units: list[Unit]
    files: list[FilePlan]
    image_size: int
    source: str
    source_verified: bool | None = None  # CIFAR-100: the release's MD5
    resampling: str | None = None

    @property
    def counts(self) -> dict[str, int]:
        return {u.name: u.count for u in self.units}

    def content(self) -> dict:
        """What determines the files' bytes (and nothing else: not where the source is)."""
        classes = {fp.split: [[c, lab, self.counts[c]] for c, lab in zip(fp.classes, fp.labels)] for fp in self.files}
        return {"format": FORMAT_VERSION, "dataset": self.spec.display, "image_size": self.image_size,
                "resampling": self.resampling, "split_lists": self.lists.fingerprint(), "classes": classes,
                "files": [list(fp.names) for fp in self.files]}

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.content(), sort_keys=True).encode()).hexdigest()[:20]

    def manifest(self, status: str, md5: dict[str, str] | None = None) -> dict:
        """The folder's record: what the check expects of it, and the MD5 of every file once done."""
        counts = {self.counts[u.name] for u in self.units}
        return {"written_by": "python -m search_lib.data.prepare", "status": status, "key": self.key(),
                **self.content(), "published_lists": self.lists.published, "source": self.source,
                "source_verified": self.source_verified, "images_per_class": counts.pop() if len(counts) == 1 else None,
                "md5": md5 or {}}


def _split_order(lists: SplitLists, trainval: bool) -> dict[str, list[str]]:
    """Each file's classes in order: the three splits, and trainval (base then validation classes)."""
    order = {s: list(lists.splits[s].names) for s in SPLIT_NAMES}
    if trainval:
        order["trainval"] = order["train"] + order["val"]
    return order


def _file_plans(spec: DatasetSpec, order: dict[str, list[str]], labels_of, extras=None,
                category: dict[str, str] | None = None) -> list[FilePlan]:
    return [FilePlan(split, partition_file_options(spec, PARTITION_OF[split])[0], classes, labels_of(classes),
                     extras(classes) if extras else {}, [category[c] for c in classes] if category else None)
            for split, classes in order.items()]


def cifar_plan(spec: DatasetSpec, lists: SplitLists, data: Cifar100, trainval: bool) -> Plan:
    """CIFAR-FS / FC100 from CIFAR-100: 32 x 32 images as they are, labelled by CIFAR-100 class id."""
    names = [n for s in SPLIT_NAMES for n in lists.splits[s].names]
    units = [Unit(n, len(data.images[n]), data.images[n]) for n in names]
    files = _file_plans(spec, _split_order(lists, trainval), lambda classes: [data.class_id(c) for c in classes])
    return Plan(spec, lists, units, files, 32, str(data.source), data.verified)


def mini_plan(spec: DatasetSpec, lists: SplitLists, root: Path, trainval: bool, size: int = 84) -> Plan:
    """miniImageNet from ImageNet's training folder: the listed images of each synset."""
    names = [n for s in SPLIT_NAMES for n in lists.splits[s].names]
    check_synsets(root, names)
    numbers = {n: num for s in SPLIT_NAMES for n, num in lists.splits[s].images.items()}
    units = [Unit(n, len(numbers[n]), listed_files(root, n, numbers[n])) for n in names]
    labels = {n: i for i, n in enumerate(names)}
    files = _file_plans(spec, _split_order(lists, trainval), lambda classes: [labels[c] for c in classes],
                        lambda classes: {"catname2label": {c: labels[c] for c in classes}})
    return Plan(spec, lists, units, files, size, str(root), resampling=RESAMPLING)


def tiered_plan(spec: DatasetSpec, lists: SplitLists, root: Path, trainval: bool, size: int = 84) -> Plan:
    """tieredImageNet from ImageNet's training folder: every image of each synset."""
    names = [n for s in SPLIT_NAMES for n in lists.splits[s].names]
    check_synsets(root, names)
    units = [Unit(n, len(files), files) for n in names for files in [synset_files(root, n)]]
    empty = next((u.name for u in units if u.count == 0), None)
    if empty is not None:
        raise DataError(f"the synset folder {root / empty} holds no image; {SOURCE_FIX}")
    category = {n: c for s in SPLIT_NAMES for n, c in lists.splits[s].category.items()}
    files = _file_plans(spec, _split_order(lists, trainval), lambda classes: list(range(len(classes))),
                        category=category)
    return Plan(spec, lists, units, files, size, str(root), resampling=RESAMPLING)
