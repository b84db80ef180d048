"""Dataset names, the partitions of each dataset and the files of its release.

`resolve_dataset` turns a command-line name (``MetaMiniImageNet``, ``digits``, ...) into a `DatasetSpec`
once; everything below the command line takes the spec (or accepts it where a name is allowed) and never
parses the name again.
"""

from __future__ import annotations

from dataclasses import dataclass

from search_lib.core.errors import UsageError

DATASET_NAMES = ("MiniImageNet", "MetaMiniImageNet", "TieredImageNet", "MetaTieredImageNet", "Digits", "MetaDigits",
                 "CIFAR-FS", "MetaCIFAR-FS", "FC100", "MetaFC100")

_CANONICAL = {
    "miniimagenet": "mini",
    "metaminiimagenet": "mini",
    "tieredimagenet": "tiered",
    "metatieredimagenet": "tiered",
    "digits": "digits",
    "metadigits": "digits",
    "cifar-fs": "cifarfs",
    "metacifar-fs": "cifarfs",
    "fc100": "fc100",
    "metafc100": "fc100",
    # the canonical names themselves
    "mini": "mini",
    "tiered": "tiered",
    "cifarfs": "cifarfs",
}

DEFAULT_IMAGE_SIZE = {"mini": 84, "tiered": 84, "digits": 32, "cifarfs": 32, "fc100": 32}
CIFAR_KEYS = ("cifarfs", "fc100")  # RFS's 32 x 32 CIFAR-100 benchmarks: same file format, transform D


@dataclass(frozen=True)
class DatasetSpec:
    """A resolved dataset name: ``key`` is mini, tiered, cifarfs, fc100 or digits; ``episodic`` is True for the
    Meta* names."""

    key: str
    episodic: bool = False

    @property
    def display(self) -> str:
        return _DISPLAY[self.key]

    @property
    def default_image_size(self) -> int:
        return DEFAULT_IMAGE_SIZE[self.key]

    @property
    def rfs_transform(self) -> str:
        """The transform RFS trains this dataset with: D (32 x 32, CIFAR-100 statistics) for CIFAR-FS and FC100,
        else A."""
        return "D" if self.key in CIFAR_KEYS else "A"

    @property
    def plain_name(self) -> str:
        """The supervised (non-episodic) command-line name: MiniImageNet, TieredImageNet, CIFAR-FS, FC100 or
        Digits."""
        return _PLAIN_NAMES[self.key]

    def __str__(self) -> str:
        return self.key


def resolve_dataset(name: str | DatasetSpec) -> DatasetSpec:
    """The spec of a command-line dataset name (case-insensitive); a spec is returned as it is."""
    if isinstance(name, DatasetSpec):
        return name
    key = str(name).strip().lower()
    if key not in _CANONICAL:
        raise UsageError(f"unknown dataset {name!r}; use one of {', '.join(DATASET_NAMES)}")
    return DatasetSpec(_CANONICAL[key], key.startswith("meta"))


def canonical_dataset(name: str | DatasetSpec) -> str:
    """Map a command-line dataset name (case-insensitive) to its key (``"mini"``, ``"tiered"``, ...)."""
    return resolve_dataset(name).key


def is_episodic_name(name: str | DatasetSpec) -> bool:
    """True for the ``Meta*`` names (episodic evaluation / meta-batches)."""
    return resolve_dataset(name).episodic


# display names: as RFS spells the datasets (also its folder names under --data_root)
_DISPLAY = {"mini": "miniImageNet", "tiered": "tieredImageNet", "digits": "Digits", "cifarfs": "CIFAR-FS",
            "fc100": "FC100"}
_PLAIN_NAMES = {"mini": "MiniImageNet", "tiered": "TieredImageNet", "digits": "Digits", "cifarfs": "CIFAR-FS",
                "fc100": "FC100"}

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
# CIFAR-FS / FC100 (RFS): <folder>/{train,val,test,trainval}.pickle; no train_phase_val/test files
_CIFAR_FILES = {"train_phase_train": "train", "val": "val", "test": "test", "trainval_phase_train": "trainval"}
_DIGITS_PARTS = ("train_phase_train", "train_phase_val", "train_phase_test", "val", "test", "trainval_phase_train")
_ALIASES = {"train": "train_phase_train", "trainval": "trainval_phase_train"}

PARTITIONS = {
    "mini": ("train", "trainval", *_MINI_FILES),
    "tiered": ("train", "trainval", *_TIERED_FILES),
    "digits": ("train", "trainval", *_DIGITS_PARTS),
    **{key: ("train", "trainval", *_CIFAR_FILES) for key in CIFAR_KEYS},
}


def normalise_partition(dataset: str | DatasetSpec, partition: str) -> str:
    """The file-level name of a partition (``train`` -> ``train_phase_train``); UsageError when unknown."""
    spec = resolve_dataset(dataset)
    key = str(partition).strip().lower()
    key = _ALIASES.get(key, key)
    valid = {"mini": _MINI_FILES, "tiered": _TIERED_FILES, "digits": _DIGITS_PARTS}.get(spec.key, _CIFAR_FILES)
    if key not in valid:
        raise UsageError(f"unknown {spec.display} partition {partition!r}; "
                         f"use one of {', '.join(PARTITIONS[spec.key])}")
    return key


# the partitions the search and the training read (``train_phase_train``; ``val`` and ``test`` for the few-shot
# test); the others (``trainval`` for --use_trainval, RFS's extra base-class files) are optional in a folder
REQUIRED_PARTITIONS = ("train_phase_train", "val", "test")


def release_partitions(dataset: str | DatasetSpec) -> tuple[str, ...]:
    """The file-level partitions of a dataset's release (`REQUIRED_PARTITIONS` first); none for Digits."""
    key = resolve_dataset(dataset).key
    parts = {"mini": _MINI_FILES, "tiered": _TIERED_FILES}.get(key, _CIFAR_FILES if key in CIFAR_KEYS else {})
    return tuple(sorted(parts, key=lambda p: (p not in REQUIRED_PARTITIONS, list(parts).index(p))))


def partition_file_options(dataset: str | DatasetSpec, partition: str) -> list[tuple[str, ...]]:
    """The file names that hold one partition, as alternatives: the first whose files all exist is read, and a
    missing partition is reported by the first. miniImageNet's trainval has two spellings (the release's and RFS
    code's); a tieredImageNet partition is two files (images, then labels)."""
    spec = resolve_dataset(dataset)
    part = normalise_partition(spec, partition)
    if spec.key == "mini":
        return [(f"{_MINI_PREFIX}{stem}.pickle",) for stem in _MINI_FILES[part]]
    if spec.key == "tiered":
        return [(f"{_TIERED_FILES[part]}_images.npz", f"{_TIERED_FILES[part]}_labels.pkl")]
    if spec.key in CIFAR_KEYS:
        return [(f"{_CIFAR_FILES[part]}.pickle",)]
    return []


def expected_files(dataset: str | DatasetSpec) -> list[str]:
    """The file names a ``--data_path`` folder of this dataset holds (the RFS release)."""
    ds = resolve_dataset(dataset).key
    if ds == "mini":
        return [_MINI_PREFIX + stems[0] + ".pickle" for stems in _MINI_FILES.values()]
    if ds == "tiered":
        return [f"{s}_{kind}" for s in _TIERED_FILES.values() for kind in ("images.npz", "labels.pkl")]
    if ds in CIFAR_KEYS:
        return [f"{stem}.pickle" for stem in _CIFAR_FILES.values()]
    return []

