"""The search configuration (a typed dataclass), its validation, and the paper's presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from .data import canonical_dataset, is_episodic_name
from .errors import UsageError
from .ops import space_ops
from .supernet import NORM_TYPES

NTK_TYPES = ("NTK", "MetaNTK_anl")
ALGORITHMS = ("MAML", "ANIL")
INIT_MODES = {"kaiming_normal": "fan_out", "kaiming_normal_fanout": "fan_out", "kaiming_normal_fanin": "fan_in"}
BN_MODES = ("train", "eval")

# Keys that do not change what a search computes: a save_dir may be resumed with other values.
NON_RESULT_KEYS = {"save_dir", "device", "overwrite", "train_after_search", "train"}


@dataclass
class SearchConfig:
    dataset: str = "MetaDigits"
    data_path: str | None = None
    search_space_name: str = "darts_fewshot"
    max_nodes: int = 3
    batch_size: int | None = None  # tasks per meta-batch (MetaNTK) or images (NTK); None: 3 / 30
    save_dir: str = "runs/search"
    rand_seed: int = -1  # -1: draw one at random (recorded in config.json)
    precision: int = 3
    prune_number: int = 1
    repeat: int = 3
    init: str = "kaiming_normal"
    ntk_type: str = "MetaNTK_anl"
    ntk_channels: int = 48
    ntk_layers: int = 5
    ntk_N: int | None = None  # cells per stage; must agree with ntk_layers = 3 N + 2
    ntk_stemm: int = 1
    ntk_fsr: int = 2
    only_lrs: bool = False
    algorithm: str = "MAML"
    inner_lr_time: float = 1000.0
    reg_coef: float = 1e-3
    bn_mode: str = "train"
    params_types: str = "w"
    norm_type: str = "groupnorm16"
    n_ways: int = 5
    n_shots: int = 1
    n_queries: int = 1
    transform: str = "TENAS"
    image_size: int = 32  # search input size (the TENAS transform resizes to it)
    lr_batches: int = 3  # linear regions: batches of random crops
    lr_batch_size: int = 1000
    lr_crop: int = 3
    device: str = "auto"
    overwrite: bool = False
    train_after_search: bool = False
    train: dict = field(default_factory=dict)  # aug_* settings for --train_after_search

    @property
    def meta(self) -> bool:
        return self.ntk_type == "MetaNTK_anl"

    @property
    def effective_batch_size(self) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return 3 if self.meta else 30

    @property
    def init_mode(self) -> str:
        return INIT_MODES[self.init]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def result_dict(self) -> dict:
        """The keys that determine the search's outcome (compared when resuming a save_dir)."""
        return {k: v for k, v in self.to_dict().items() if k not in NON_RESULT_KEYS}

    @classmethod
    def from_dict(cls, data: dict) -> "SearchConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def validate(self) -> "SearchConfig":
        """Refuse incompatible or out-of-range settings before any work or any write."""
        canonical_dataset(self.dataset)  # raises on unknown names
        space_ops(self.search_space_name)
        _choice("--ntk_type", self.ntk_type, NTK_TYPES)
        _choice("--algorithm", self.algorithm, ALGORITHMS)
        _choice("--init", self.init, tuple(INIT_MODES))
        _choice("--bn_mode", self.bn_mode, BN_MODES)
        _choice("--params_types", self.params_types, ("w", "wb"))
        _choice("--norm_type", self.norm_type, NORM_TYPES)
        if self.max_nodes not in (3, 4):
            raise UsageError(f"--max_nodes {self.max_nodes} is not supported; use 3 (the paper) or 4")
        if self.meta and not is_episodic_name(self.dataset):
            raise UsageError(f"--ntk_type MetaNTK_anl needs an episodic dataset, got --dataset {self.dataset}; use "
                             f"the Meta* name (e.g. MetaMiniImageNet, MetaDigits) or --ntk_type NTK")
        if self.ntk_layers < 2 or (self.ntk_layers - 2) % 3:
            raise UsageError(f"--ntk_layers {self.ntk_layers} does not fit the cell layout; use 3N+2 (5 or 8)")
        if self.ntk_N is not None and 3 * self.ntk_N + 2 != self.ntk_layers:
            raise UsageError(f"--ntk_N {self.ntk_N} disagrees with --ntk_layers {self.ntk_layers} "
                             f"(layers = 3N+2); use --ntk_N {(self.ntk_layers - 2) // 3} or drop --ntk_N")
        if self.norm_type == "batchnorm" and not self.only_lrs:
            raise UsageError("--norm_type batchnorm gives no per-sample gradients; use groupnorm16 (the default), "
                             "groupnorm, instancenorm or nonorm")
        for name in ("precision", "prune_number", "repeat", "ntk_channels", "ntk_stemm", "ntk_fsr", "n_ways",
                     "n_shots", "n_queries", "image_size", "lr_batches", "lr_batch_size", "lr_crop"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 2:
            raise UsageError(f"--batch_size must be at least 2, got {self.batch_size}")
        if self.inner_lr_time <= 0 or self.reg_coef < 0:
            raise UsageError("--inner_lr_time must be > 0 and --reg_coef >= 0")
        if self.rand_seed < -1:
            raise UsageError(f"--rand_seed must be -1 (random) or a non-negative integer, got {self.rand_seed}")
        return self


def _choice(flag: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UsageError(f"{flag} {value!r} is not valid; choose one of {', '.join(valid)}")


# --------------------------------------------------------------------------------------------------
# The paper's four search runs (REFERENCE.md section 5).

PAPER_PRESETS: dict[tuple[str, int], dict] = {
    ("mini", 5): dict(algorithm="MAML", inner_lr_time=1000.0, reg_coef=1e-3),
    ("mini", 8): dict(algorithm="ANIL", inner_lr_time=1.0, reg_coef=1e-5),
    ("tiered", 5): dict(algorithm="MAML", inner_lr_time=1000.0, reg_coef=1e-3),
    ("tiered", 8): dict(algorithm="ANIL", inner_lr_time=1000.0, reg_coef=1e-3),
}

PAPER_COMMON = dict(search_space_name="darts_fewshot", max_nodes=3, batch_size=3, ntk_channels=48,
                    ntk_type="MetaNTK_anl", n_ways=5, n_shots=1, n_queries=1, repeat=3, precision=3,
                    prune_number=1)

DATASET_META_NAMES = {"mini": "MetaMiniImageNet", "tiered": "MetaTieredImageNet", "digits": "MetaDigits"}


def paper_preset(dataset: str, cells: int) -> dict:
    """Search settings of a paper run: dataset in mini / tiered (or any accepted dataset name), cells 5 or 8."""
    key = canonical_dataset(dataset)
    if (key, cells) not in PAPER_PRESETS:
        valid = ", ".join(f"{d}-{c}cell" for d, c in PAPER_PRESETS)
        raise UsageError(f"no paper preset for {dataset} with {cells} cells; valid: {valid}")
    return dict(PAPER_COMMON, **PAPER_PRESETS[(key, cells)], dataset=DATASET_META_NAMES[key], ntk_layers=cells)
