"""The search configuration (a typed dataclass, the one source of the search's flags) and its validation (the
paper's presets are `eval_lib.commands.presets`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from functools import cached_property

from search_lib.core import determinism, turns
from search_lib.core.command_line import flag
from search_lib.core.errors import UsageError
from search_lib.core.memory import parse_size
from search_lib.core.utils import DEVICE_CHOICES, refuse_empty_paths
from search_lib.data import DATASET_NAMES, TRANSFORM_NAMES, DatasetSpec, build_transform, resolve_dataset
from search_lib.models.ops import SEARCH_SPACES
from search_lib.models.space import SearchSpace
from search_lib.models.supernet import NORM_TYPES
from search_lib.search.objectives import COMBINE_RULES, DEFAULT_OBJECTIVE, OBJECTIVES, parse_objectives

NTK_TYPES = ("NTK", "MetaNTK_anl")
ALGORITHMS = ("MAML", "ANIL")
INIT_MODES = {"kaiming_normal": "fan_out", "kaiming_normal_fanout": "fan_out", "kaiming_normal_fanin": "fan_in"}
BN_MODES = ("train", "eval")

# This toolkit's earlier names of the linear-region flags (flags and config.json keys).
EARLIER_FIELDS = {"lr_batches": "regions_batches", "lr_batch_size": "regions_batch_size", "lr_crop": "regions_crop"}

# Keys that do not change what a search computes: a save_dir may be resumed with other values.
NON_RESULT_KEYS = {"save_dir", "device", "overwrite", "break_stale_lock", "train_after_search", "train",
                   "candidates_per_pass", "original_flags", "memory_budget", "threads", "tune_threads",
                   "deterministic", "take_turns"}

_DATA, _SPACE, _SEARCH, _KERNEL = "data", "search space", "search", "kernel"


@dataclass
class SearchConfig:
    """Settings of one search; each field is the flag of the same name of prune_metantknas.py."""

    dataset: str = field(default="MetaDigits", metadata=flag(f"one of {', '.join(DATASET_NAMES)}", group=_DATA))
    data_path: str | None = field(default=None, metadata=flag(
        "folder of the RFS data files; default: none, which only the built-in *Digits allow", type=str,
        group=_DATA))
    transform: str = field(default="TENAS", metadata=flag("search-time transform", choices=TRANSFORM_NAMES,
                                                          group=_DATA))
    image_size: int = field(default=32, metadata=flag(
        "search input size (paper: 32; the TENAS transform resizes to it)", group=_DATA))
    n_ways: int = field(default=5, metadata=flag("classes per search task", group=_DATA))
    n_shots: int = field(default=1, metadata=flag("support images per class of a search task", group=_DATA))
    n_queries: int = field(default=1, metadata=flag("query images per class of a search task", group=_DATA))
    batch_size: int | None = field(default=None, metadata=flag(
        "tasks per meta-batch (MetaNTK) or images (NTK); default: 3 tasks / 30 images", type=int, group=_DATA))
    search_space_name: str = field(default="darts_fewshot", metadata=flag(
        "operation set of the cells", choices=tuple(SEARCH_SPACES), group=_SPACE))
    max_nodes: int = field(default=3, metadata=flag("intermediate nodes per cell", group=_SPACE))
    save_dir: str = field(default="runs/search", metadata=flag(
        "run folder (used as given); re-running resumes it", group=_SEARCH))
    rand_seed: int = field(default=-1, metadata=flag(
        "seed; -1 (or any negative) draws one, recorded in config.json and reused when the run resumes",
        group=_SEARCH))
    precision: int = field(default=3, metadata=flag("digits the scores are rounded to", group=_SEARCH))
    prune_number: int = field(default=1, metadata=flag("ops pruned per edge and round", group=_SEARCH))
    repeat: int = field(default=3, metadata=flag("random initialisations per round", group=_SEARCH))
    init: str = field(default="kaiming_normal", metadata=flag("weight initialisation", choices=tuple(INIT_MODES),
                                                              group=_SEARCH))
    only_lrs: bool = field(default=False, metadata=flag(
        "rank by linear regions only (the same as --objective regions)", group=_SEARCH))
    objective: str = field(default=DEFAULT_OBJECTIVE, metadata=flag(
        f"the training-free signals candidates are ranked by, a comma list of: {', '.join(OBJECTIVES)} "
        "(kappa: of the kernel --ntk_type selects; docs/method.md §4b)", group=_SEARCH))
    combine: str = field(default="rank", metadata=flag(
        "how several objectives combine: rank (the ranks summed, the paper's rule) or log_rank (Σ log(rank/m), "
        "AZ-NAS's rule)", choices=COMBINE_RULES, group=_SEARCH))
    device: str = field(default="auto", metadata=flag(f"one of {', '.join(DEVICE_CHOICES)}", group=_SEARCH))
    overwrite: bool = field(default=False, metadata=flag("discard a finished or different run in --save_dir",
                                                         group=_SEARCH))
    break_stale_lock: bool = field(default=False, metadata=flag(
        "take over a run folder whose lease expired (network file systems: its holder died or hangs)",
        group=_SEARCH))
    candidates_per_pass: int = field(default=0, metadata=flag(
        "most architectures scored per pass of the networks: 0 lets the measured memory choose (within "
        "--memory_budget), 1 scores one at a time (the reference path)", group=_SEARCH))
    memory_budget: str = field(default="auto", metadata=flag(
        "peak memory the search may use, with a unit (e.g. 8GB, 512MB); auto: on CUDA 80%% of the GPU memory free "
        "to the process at the start, on the CPU the smaller of 4 GiB and half of the available memory",
        group=_SEARCH))
    threads: int | None = field(default=None, metadata=flag(
        "torch / BLAS threads, fixed (default: one per CPU of the process's affinity, kept for the whole run; "
        "METANTKNAS_THREADS or OMP_NUM_THREADS also fix it)", type=int, group=_SEARCH))
    tune_threads: bool = field(default=False, metadata=flag(
        "on the CPU, choose the thread count of the passes by timing them (fewer beside other busy processes): "
        "faster on a shared box, but on some CPUs the last digits of κ then depend on its load", group=_SEARCH))
    take_turns: bool = field(default=True, metadata=flag(turns.flag_help("pass"), group=_SEARCH))
    deterministic: bool = field(default=True, metadata=flag(
        determinism.FLAG_HELP + " (the CPU's numbers are the same either way)", group=_SEARCH))
    ntk_type: str = field(default="MetaNTK_anl", metadata=flag("kernel to rank by", choices=NTK_TYPES,
                                                               group=_KERNEL))
    ntk_channels: int = field(default=48, metadata=flag("supernet channels C", group=_KERNEL))
    ntk_layers: int = field(default=5, metadata=flag("supernet cells (3N+2)", group=_KERNEL))
    ntk_N: int | None = field(default=None, metadata=flag(
        "cells per stage, must match --ntk_layers; default (or -1): (ntk_layers - 2) / 3", type=int, group=_KERNEL))
    ntk_stemm: int = field(default=1, metadata=flag("stem multiplier", group=_KERNEL))
    ntk_fsr: int = field(default=2, metadata=flag("channel factor at each reduction", group=_KERNEL))
    algorithm: str = field(default="MAML", metadata=flag("MetaNTK of MAML or ANIL", choices=ALGORITHMS,
                                                         group=_KERNEL))
    inner_lr_time: float = field(default=1000.0, metadata=flag("τ; >= 1000 means infinity", group=_KERNEL))
    reg_coef: float = field(default=1e-3, metadata=flag("λ", group=_KERNEL))
    bn_mode: str = field(default="train", metadata=flag("networks in train or eval mode", choices=BN_MODES,
                                                        group=_KERNEL))
    params_types: str = field(default="w", metadata=flag("weights, or weights+biases", choices=("w", "wb"),
                                                         group=_KERNEL))
    norm_type: str = field(default="groupnorm16", metadata=flag("BatchNorm replacement", choices=NORM_TYPES,
                                                                group=_KERNEL))
    # (--lr_batches, --lr_batch_size, --lr_crop: the earlier names, EARLIER_FIELDS)
    regions_batches: int = field(default=3, metadata=flag("linear regions: batches of crops", group=_KERNEL))
    regions_batch_size: int = field(default=1000, metadata=flag("linear regions: crops per batch", group=_KERNEL))
    regions_crop: int = field(default=3, metadata=flag("linear regions: crop size", group=_KERNEL))
    train_after_search: bool = field(default=False, metadata=flag(
        "train and few-shot test the found genotype", group="training after search"))
    train: dict = field(default_factory=dict)  # --aug_* settings for --train_after_search (None: the default)
    original_flags: dict = field(default_factory=dict)  # the original code's flags given that change nothing

    # ---- resolved once: lower layers take these, never the raw names ----
    @cached_property
    def data(self) -> DatasetSpec:
        return resolve_dataset(self.dataset)

    @cached_property
    def space(self) -> SearchSpace:
        return SearchSpace.resolve(self.search_space_name, self.max_nodes)

    def input_transform(self):
        """The pipeline of the search's meta-batches (``--transform`` at ``--image_size``)."""
        return build_transform(self.transform, train=True, image_size=self.image_size, dataset=self.data)

    @property
    def objectives(self) -> tuple[str, ...]:
        """The objectives, in `OBJECTIVES`' order: --objective's, or regions alone with --only_lrs."""
        if self.only_lrs:
            return ("regions",)
        return parse_objectives(self.objective)

    @property
    def needs_kappa(self) -> bool:
        """Whether the search computes κ (per-sample gradients, the kernel)."""
        return "kappa" in self.objectives

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
    def from_dict(cls, data: dict) -> SearchConfig:
        """A config from a dict (config.json), earlier field names included."""
        names = {f.name for f in fields(cls)}
        data = {EARLIER_FIELDS.get(k, k): v for k, v in data.items()}
        return cls(**{k: v for k, v in data.items() if k in names})

    def validate(self) -> SearchConfig:
        """Refuse incompatible or out-of-range settings before any work or any write."""
        refuse_empty_paths(save_dir=self.save_dir, data_path=self.data_path)
        spec = self.data  # raises on unknown names
        _ = self.space  # raises on an unknown space or an unsupported node count
        _choice("--ntk_type", self.ntk_type, NTK_TYPES)
        _choice("--algorithm", self.algorithm, ALGORITHMS)
        _choice("--init", self.init, tuple(INIT_MODES))
        _choice("--bn_mode", self.bn_mode, BN_MODES)
        _choice("--params_types", self.params_types, ("w", "wb"))
        _choice("--norm_type", self.norm_type, NORM_TYPES)
        if self.meta and not spec.episodic:
            raise UsageError(f"--ntk_type MetaNTK_anl needs an episodic dataset, got --dataset {self.dataset}; use "
                             f"the Meta* name (e.g. MetaMiniImageNet, MetaDigits) or --ntk_type NTK")
        if self.ntk_layers < 2 or (self.ntk_layers - 2) % 3:
            raise UsageError(f"--ntk_layers {self.ntk_layers} does not fit the cell layout; use 3N+2 (5 or 8)")
        if self.ntk_N is not None and 3 * self.ntk_N + 2 != self.ntk_layers:
            raise UsageError(f"--ntk_N {self.ntk_N} disagrees with --ntk_layers {self.ntk_layers} "
                             f"(layers = 3N+2); use --ntk_N {(self.ntk_layers - 2) // 3} or drop --ntk_N")
        _choice("--combine", self.combine, COMBINE_RULES)
        chosen = parse_objectives(self.objective)  # a one-line usage error naming the valid objectives
        # --only_lrs keeps its meaning: regions alone; beside the default or regions itself it says the same
        if self.only_lrs and chosen not in (parse_objectives(DEFAULT_OBJECTIVE), ("regions",)):
            raise UsageError(f"--only_lrs ranks by linear regions only, but --objective is {self.objective!r}; drop "
                             f"--only_lrs or --objective")
        if self.norm_type == "batchnorm" and self.needs_kappa:
            raise UsageError("--norm_type batchnorm gives no per-sample gradients; use groupnorm16 (the default), "
                             "groupnorm, instancenorm or nonorm")
        for name in ("precision", "prune_number", "repeat", "ntk_channels", "ntk_stemm", "ntk_fsr", "n_ways",
                     "n_shots", "n_queries", "image_size", "regions_batches", "regions_batch_size", "regions_crop"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 2:
            raise UsageError(f"--batch_size must be at least 2, got {self.batch_size}")
        if self.inner_lr_time <= 0 or self.reg_coef < 0:
            raise UsageError("--inner_lr_time must be > 0 and --reg_coef >= 0")
        if self.candidates_per_pass < 0:
            raise UsageError(f"--candidates_per_pass must be 0 (automatic) or positive, got {self.candidates_per_pass}")
        parse_size(self.memory_budget)  # a one-line usage error for a bad size
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {self.threads}")
        if self.rand_seed < -1:
            raise UsageError(f"--rand_seed must be -1 (random) or a non-negative integer, got {self.rand_seed}")
        return self


def _choice(flag: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UsageError(f"{flag} {value!r} is not valid; choose one of {', '.join(valid)}")
