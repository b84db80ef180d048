"""The training and few-shot test configuration (a typed dataclass, the one source of the flags of
eval_searched_arch.py and of the search's ``--aug_*`` flags; the paper's presets are `eval_lib.commands.presets`)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from eval_lib.fewshot.meta_test import BACKENDS, CLASSIFIERS, INFERENCE_MODES, PROTO_RULES, FewShotSettings
from eval_lib.train.tensorboard_log import require_tensorboard
from search_lib.core import determinism, turns
from search_lib.core.command_line import flag, flag_fields
from search_lib.core.distributed import launched_size
from search_lib.core.errors import UsageError
from search_lib.core.threads import available_cpus, threads_fixed
from search_lib.core.utils import DEVICE_CHOICES, native_bf16, refuse_empty_paths
from search_lib.data import TRANSFORM_NAMES, DatasetSpec, resolve_dataset
from search_lib.models.space import DEFAULT_SPACE, SearchSpace

SCHEDULERS = ("step", "cosine", "exp")
SPLITS = ("test", "val")
DEFAULT_DATASET = "MiniImageNet"
DEFAULT_TRANSFORM = "A"

# Settings that define the trained weights: a checkpoint made with other values cannot be resumed.
TRAINING_KEYS = ("dataset", "init_channels", "layers", "stem_multiplier", "fsr", "drop_path_prob", "epochs",
                 "batch_size", "learning_rate", "lr_decay_epochs", "lr_decay_rate", "scheduler", "exp_gamma",
                 "optimizer", "momentum", "weight_decay", "transform", "image_size", "seed", "use_trainval")
# Settings that define the few-shot test: cached results are reused only when these agree.
EVAL_KEYS = ("n_ways", "n_shots", "n_queries", "n_test_runs", "n_aug_support_samples", "classifier",
             "episode_seed", "eval_splits", "use_logits", "C", "nonorm", "proto_rule")
AMP_CHOICES = ("bf16", "fp16", "none")


# ---- flag value parsers ----

def int_list(text: str) -> list[int]:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,5, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,5, got {text!r}")
    return values


def decay_list(text: str) -> list[int]:
    if str(text).strip() in ("", "none"):
        return []
    return int_list(text)


def split_list(text: str) -> list[str]:
    parts = [p.strip().lower() for p in str(text).split(",") if p.strip()]
    bad = [p for p in parts if p not in SPLITS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"expected test and/or val (e.g. test,val), got {text!r}")
    return parts


_ARCH, _DATA, _RUN = "architecture", "data", "run"
_TRAIN = "training (defaults: the paper's miniImageNet 5-cell settings)"
_TEST = "few-shot test"


def _after_search(help: str, **kw) -> dict:
    """A flag the search forwards as --aug_<name> with --train_after_search."""
    return flag(help, after_search=True, **kw)


@dataclass
class TrainConfig:
    """Settings of one training + few-shot evaluation run; each field is the flag of the same name."""

    # architecture
    genotype: str | None = field(default=None, metadata=flag(
        "preset name (e.g. mini-5cell-1), a Genotype(...) string, or a search's genotype.json; default: none "
        "(then --random_arch or --eval_only)", type=str, group=_ARCH))
    random_arch: bool = field(default=False, metadata=flag(
        "train a seeded random genotype of the same space (baseline)", group=_ARCH))
    arch_seed: int = field(default=0, metadata=flag("seed of --random_arch", group=_ARCH))
    # the space of --random_arch and of a search's genotype (set by the hand-off); config.json keeps its name and
    # node count as arch_space and arch_max_nodes
    arch_space: SearchSpace = DEFAULT_SPACE
    init_channels: int = field(default=48, metadata=_after_search("channels C of the first cells", group=_ARCH))
    layers: int = field(default=5, metadata=_after_search("number of cells", group=_ARCH))
    stem_multiplier: int = field(default=1, metadata=_after_search("stem channel factor", group=_ARCH))
    fsr: int = field(default=2, metadata=_after_search("channel factor at each reduction cell", group=_ARCH))
    # data
    dataset: str | None = field(default=None, metadata=flag(
        "MiniImageNet, TieredImageNet, CIFAR-FS, FC100 or Digits (any case; Meta* names accepted); default "
        "MiniImageNet, or the checkpoint's with --eval_only", type=str, group=_DATA))
    data_path: str | None = field(default=None, metadata=flag(
        "folder of the RFS data files; default: none, which only the built-in Digits allow", type=str,
        group=_DATA))
    use_trainval: bool = field(default=False, metadata=_after_search(
        "train on the base and validation classes (RFS's trainval files: 80 classes for miniImageNet, CIFAR-FS "
        "and FC100, 448 for tieredImageNet); the val split's test is then not held out", group=_DATA))
    transform: str | None = field(default=None, metadata=_after_search(
        f"{', '.join(TRANSFORM_NAMES)}; default: A (D for CIFAR-FS and FC100), or the checkpoint's", type=str,
        group=_DATA))
    image_size: int | None = field(default=None, metadata=_after_search(
        "image size (default: the dataset's)", type=int, group=_DATA))
    num_workers: int | None = field(default=None, metadata=_after_search(
        "data-loading worker processes (default: 0 on the CPU, where workers compete with the training's own "
        "threads; min(4, cores) on CUDA)", type=int, group=_DATA))
    # optimisation (paper, miniImageNet 5 cells)
    drop_path_prob: float = field(default=0.2, metadata=_after_search(
        "maximum, reached linearly at the end", group=_TRAIN))
    epochs: int = field(default=100, metadata=_after_search("training epochs", group=_TRAIN))
    batch_size: int = field(default=64, metadata=_after_search("training batch size", group=_TRAIN))
    learning_rate: float = field(default=0.02, metadata=_after_search("base learning rate", group=_TRAIN))
    lr_decay_epochs: list[int] = field(default_factory=lambda: [60, 80], metadata=_after_search(
        "e.g. 60,80 (step scheduler)", type=decay_list, group=_TRAIN))
    lr_decay_rate: float = field(default=0.1, metadata=_after_search("decay factor", group=_TRAIN))
    scheduler: str = field(default="step", metadata=_after_search("learning-rate schedule", choices=SCHEDULERS,
                                                                  group=_TRAIN))
    exp_gamma: float = field(default=0.97, metadata=_after_search("per-epoch factor of --scheduler exp",
                                                                  group=_TRAIN))
    optimizer: str = field(default="sgd", metadata=_after_search(
        "sgd, adam or a torch_optimizer name (radam, lamb, ...)", group=_TRAIN))
    momentum: float = field(default=0.9, metadata=_after_search("SGD momentum", group=_TRAIN))
    weight_decay: float = field(default=5e-4, metadata=_after_search("weight decay", group=_TRAIN))
    seed: int = field(default=0, metadata=_after_search(
        "seed of the initialisation and data order; -1 (or any negative) draws one, recorded in config.json and "
        "reused when the run folder resumes", group=_TRAIN))
    device: str = field(default="auto", metadata=flag(f"{', '.join(DEVICE_CHOICES)}", group=_TRAIN))
    threads: int | None = field(default=None, metadata=_after_search(
        "torch / BLAS threads, fixed for the whole run (default: the CPUs this process may use, less the loader "
        "workers; the environment variable METANTKNAS_THREADS also sets it): the numbers depend on the count, "
        "never on the machine's load", type=int, group=_TRAIN))
    tune_threads: bool = field(default=False, metadata=_after_search(
        "on the CPU, choose the thread count of the training's steps and the test's forward passes by timing "
        "them (fewer beside other busy processes): faster on a shared box, but the numbers then depend on "
        "its load (results.json says so)", group=_TRAIN))
    take_turns: bool = field(default=True, metadata=_after_search(turns.flag_help("step"), group=_TRAIN))
    deterministic: bool = field(default=True, metadata=_after_search(determinism.FLAG_HELP, group=_TRAIN))
    amp: str | None = field(default=None, metadata=_after_search(
        "mixed precision of the training: bf16, fp16 (with a gradient scaler) or none (float32); default on "
        "CUDA bf16 where the GPU runs it natively (Ampere and later), else fp16; none on the CPU",
        type=str, choices=AMP_CHOICES, group=_TRAIN))
    channels_last: bool = field(default=False, metadata=_after_search(
        "train in the channels_last memory format", group=_TRAIN))
    gpu_augment: bool | None = field(default=None, metadata=_after_search(
        "transform A on the device, per sample in batch, from uint8 images held there (default: on with "
        "CUDA and transform A where the training images take at most a quarter of the free GPU memory, else "
        "off)", type=bool, group=_TRAIN))
    # few-shot test (paper: 5-way, 1000 episodes, 50 queries, 5 augmented support copies, LR)
    n_ways: int = field(default=5, metadata=_after_search("classes per episode", group=_TEST))
    n_shots: list[int] = field(default_factory=lambda: [1, 5], metadata=_after_search(
        "e.g. 1,5", type=int_list, group=_TEST))
    n_queries: int = field(default=50, metadata=_after_search("queries per class (RFS: 15)", group=_TEST))
    n_test_runs: int = field(default=1000, metadata=_after_search("episodes (RFS: 600)", group=_TEST))
    n_aug_support_samples: int = field(default=5, metadata=_after_search(
        "augmented copies of each support image", group=_TEST))
    classifier: str = field(default="LR", metadata=_after_search(f"{', '.join(CLASSIFIERS)}", group=_TEST))
    use_logits: bool = field(default=False, metadata=flag(
        "classify logits instead of the penultimate features", group=_TEST))
    C: float = field(default=1.0, metadata=_after_search(
        "inverse L2 regularisation of the logistic regression (the original's --C)", group=_TEST))
    nonorm: bool = field(default=False, metadata=_after_search(
        "do not L2-normalise the features before classifying (the original's --nonorm)", group=_TEST))
    proto_rule: str = field(default="mean", metadata=_after_search(
        "Proto with several support copies: mean (one prototype per class over all copies) or rfs (query "
        "block b against copy b's prototypes, as the RFS code)", choices=PROTO_RULES, group=_TEST))
    fewshot_backend: str = field(default="torch", metadata=_after_search(
        "torch: batched classifiers, each query's features computed once; sklearn: the reference, one "
        "scikit-learn fit per episode", choices=BACKENDS, group=_TEST))
    inference: str = field(default="fused", metadata=_after_search(
        "few-shot feature extraction: fused (a torch.fx rewrite: BatchNorm folded into the convolutions, "
        "repeated ReLUs and no-op copies removed, channels_last; the same features up to float rounding) "
        "or eager (the network as it is; the reference)",
        choices=INFERENCE_MODES, group=_TEST))
    episode_batch: int = field(default=100, metadata=_after_search(
        "episodes whose supports and classifiers are processed together (torch back end)", group=_TEST))
    episode_seed: int = field(default=0, metadata=_after_search("seed fixing the episodes", group=_TEST))
    eval_splits: list[str] = field(default_factory=lambda: ["test", "val"], metadata=_after_search(
        "test (novel classes) and/or val (meta-validation)", type=split_list, group=_TEST))
    # run control
    save_dir: str | None = field(default=None, metadata=flag(
        "run folder (default output/eval/<dataset>-<arch>-C<C>-L<layers>-seed<seed>; with --eval_only: where "
        "eval_results.json goes, none if unset)", type=str, group=_RUN))
    eval_only: bool = field(default=False, metadata=flag("only test --checkpoint (no training)", group=_RUN))
    checkpoint: str | None = field(default=None, metadata=flag(
        "the checkpoint.pt that --eval_only tests; default: none (required with --eval_only)", type=str, group=_RUN))
    trust_checkpoint: bool = field(default=False, metadata=flag(
        "allow pickled Python objects in --checkpoint (e.g. the original code's); only for trusted files",
        group=_RUN))
    resume: bool = field(default=True, metadata=flag(
        "continue the run found in --save_dir; --resume PATH (the original's): continue the run folder PATH or "
        "the one of its checkpoint.pt", group=_RUN))
    overwrite: bool = field(default=False, metadata=flag("delete the run found in --save_dir and start over",
                                                         group=_RUN))
    break_stale_lock: bool = field(default=False, metadata=flag(
        "take over a run folder whose lease expired (network file systems: its holder died or hangs)", group=_RUN))
    progress: bool = field(default=True, metadata=flag("show progress bars", group=_RUN))
    tensorboard: bool = field(default=False, metadata=_after_search(
        "also log the per-epoch loss, accuracy, learning rate, drop-path and the few-shot means to "
        "--tensorboard_dir (needs the tensorboard package)", group=_RUN))
    tensorboard_dir: str | None = field(default=None, metadata=_after_search(
        "folder of --tensorboard's event files; default: <save_dir>/tensorboard", type=str, group=_RUN))
    stop_after_epoch: int | None = field(default=None, metadata=flag(  # testing hook: stop (resumably) there
        "stop after this many epochs (resumable)", type=int, group=_RUN, hidden=True))
    original_flags: dict = field(default_factory=dict)  # the original code's flags given that change nothing

    def __post_init__(self):
        if self.genotype is not None and not isinstance(self.genotype, str):
            self.genotype = str(self.genotype)  # a Genotype object: keep its paper-style string
        self.lr_decay_epochs = [int(e) for e in self.lr_decay_epochs]
        self.n_shots = [int(s) for s in self.n_shots]
        self.eval_splits = [str(s) for s in self.eval_splits]

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON values; the search space as its name and node count."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "arch_space":
                out["arch_space"], out["arch_max_nodes"] = value.name, value.max_nodes
            else:
                out[f.name] = copy.deepcopy(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if isinstance(values.get("arch_space"), str):
            values["arch_space"] = SearchSpace.resolve(values["arch_space"], data.get("arch_max_nodes", 3))
        return cls(**values)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    # ---- resolved values (names made canonical once, defaults filled in) ----
    @property
    def data(self) -> DatasetSpec:
        return resolve_dataset(self.dataset or DEFAULT_DATASET)

    def tunes_threads(self, device_type: str) -> bool:
        """True when a `ThreadTuner` chooses the thread count by timing (--tune_threads on the CPU, the count not
        fixed by the user): the training's and the test's numbers then depend on the machine's load."""
        return device_type == "cpu" and self.tune_threads and not threads_fixed(self.threads)

    def workers(self, device_type: str) -> int:
        """Loader worker processes: the flag, else 0 on the CPU and min(4, cores) on CUDA."""
        if self.num_workers is not None:
            return int(self.num_workers)
        return min(4, available_cpus()) if device_type == "cuda" else 0

    def amp_dtype(self, device: torch.device | str) -> torch.dtype | None:
        """The autocast dtype of the training (None: float32). Default: on CUDA bf16 where the GPU computes it
        natively (compute capability 8.0 and later); on older GPUs (V100, T4) bf16 is emulated and slow, and
        fp16 with a gradient scaler is what their tensor cores run; none (float32) on the CPU."""
        device = torch.device(device)
        amp = self.amp or ("none" if device.type != "cuda" else "bf16" if native_bf16(device) else "fp16")
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def use_gpu_augment(self, device_type: str) -> bool:
        """Transform A on the device: the flag, else on with CUDA and transform A (and then only where the
        images fit, `eval_lib.train.device_batches.gpu_augment_fits`)."""
        if self.gpu_augment is not None:
            return bool(self.gpu_augment)
        return device_type == "cuda" and self.transform_name == "A"

    @property
    def transform_name(self) -> str:
        """The training transform: --transform, else A (D for CIFAR-FS and FC100, as RFS trains them)."""
        return (self.transform or self.data.rfs_transform).upper()

    def fewshot_settings(self, device_type: str) -> FewShotSettings:
        """How the few-shot test classifies (validated), for a run on ``device_type``."""
        return FewShotSettings(classifier=self.classifier, use_logits=self.use_logits, backend=self.fewshot_backend,
                               C=self.C, normalize=not self.nonorm, proto_rule=self.proto_rule,
                               episode_batch=self.episode_batch, inference=self.inference,
                               num_workers=self.workers(device_type))

    def normalised(self) -> dict[str, Any]:
        """The config dict with the defaults resolved and names canonical (recorded in config.json and
        checkpoints, and compared when a run folder is used again)."""
        d = self.to_dict()
        d["dataset"] = self.data.key
        d["transform"] = self.transform_name
        d["optimizer"] = self.optimizer.lower()
        return d

    def validate(self) -> TrainConfig:
        """Check the values; raise UsageError naming the bad setting and the fix."""
        refuse_empty_paths(save_dir=self.save_dir, data_path=self.data_path, checkpoint=self.checkpoint,
                           tensorboard_dir=self.tensorboard_dir)

        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise UsageError(f"--{name} must be a positive integer, got {value!r}")

        for name in ("init_channels", "layers", "stem_multiplier", "fsr", "batch_size", "n_ways", "n_queries",
                     "n_test_runs", "n_aug_support_samples"):
            positive_int(name)
        processes = launched_size()  # under torchrun the global batch is split over the processes
        if not self.eval_only and self.batch_size % processes:
            raise UsageError(f"--batch_size {self.batch_size} does not split over {processes} processes; use a "
                             f"multiple of {processes} (it is the global batch)")
        if int(self.epochs) != self.epochs or self.epochs < 0:
            raise UsageError(f"--epochs must be a non-negative integer, got {self.epochs!r}")
        if self.num_workers is not None and (int(self.num_workers) != self.num_workers or self.num_workers < 0):
            raise UsageError(f"--num_workers must be >= 0, got {self.num_workers!r}")
        if self.image_size is not None and (int(self.image_size) != self.image_size or self.image_size < 8):
            raise UsageError(f"--image_size must be an integer >= 8, got {self.image_size!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UsageError(f"--learning_rate must be positive, got {self.learning_rate!r}")
        if not 0.0 <= self.drop_path_prob < 1.0:
            raise UsageError(f"--drop_path_prob must be in [0, 1), got {self.drop_path_prob!r}")
        if not 0.0 < self.lr_decay_rate <= 1.0:
            raise UsageError(f"--lr_decay_rate must be in (0, 1], got {self.lr_decay_rate!r}")
        if not 0.0 < self.exp_gamma <= 1.0:
            raise UsageError(f"--exp_gamma must be in (0, 1], got {self.exp_gamma!r}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise UsageError("--momentum and --weight_decay must be >= 0")
        if any(e < 1 for e in self.lr_decay_epochs) or sorted(self.lr_decay_epochs) != self.lr_decay_epochs:
            raise UsageError(f"--lr_decay_epochs must be increasing positive epochs, e.g. 60,80; "
                             f"got {','.join(map(str, self.lr_decay_epochs))}")
        if self.scheduler not in SCHEDULERS:
            raise UsageError(f"unknown --scheduler {self.scheduler!r}; use one of {', '.join(SCHEDULERS)}")
        if self.eval_splits and not self.n_shots:
            raise UsageError("--n_shots is empty; give e.g. 1,5")
        if any(s < 1 for s in self.n_shots):
            raise UsageError(f"--n_shots must be positive integers, e.g. 1,5; got {self.n_shots}")
        bad = [s for s in self.eval_splits if s not in SPLITS]
        if bad:
            raise UsageError(f"unknown evaluation split {bad[0]!r}; use {' and/or '.join(SPLITS)}")
        if self.amp is not None and self.amp not in AMP_CHOICES:
            raise UsageError(f"unknown --amp {self.amp!r}; use one of {', '.join(AMP_CHOICES)}")
        if self.threads is not None:
            positive_int("threads")
        # the command line draws it (eval_lib.commands.eval_command.resolve_seed)
        if not self.eval_only and self.seed < 0:
            raise UsageError(f"--seed {self.seed}: a negative seed is drawn by the command line; give a seed >= 0")
        if self.stop_after_epoch is not None and self.stop_after_epoch < 0:
            raise UsageError("stop_after_epoch must be >= 0")
        self.classifier = self.fewshot_settings("cpu").classifier  # FewShotSettings checks the test's settings
        if self.eval_only:
            if not self.checkpoint:
                raise UsageError("--eval_only needs --checkpoint PATH (a checkpoint.pt of a training run)")
        else:
            if self.tensorboard:
                require_tensorboard()  # a missing package fails here, before the run folder is touched
            if self.random_arch and self.genotype:
                raise UsageError("give either --genotype or --random_arch, not both")
            if not self.random_arch and not self.genotype:
                raise UsageError("no architecture given; pass --genotype (preset name, Genotype(...) string or "
                                 "genotype.json) or --random_arch")
        return self


def eval_settings(config: dict) -> dict:
    """A recorded config with the test and training settings it lacks filled in with their defaults (a run
    recorded before a setting existed, e.g. --use_trainval, ran with its default)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in EVAL_KEYS + TRAINING_KEYS
                and f.default is not dataclasses.MISSING}
    return {**defaults, **config}


# Flags of eval_searched_arch.py that the search forwards as --aug_<name> with --train_after_search.
TRAIN_AFTER_SEARCH_FLAGS = tuple(f.name for f in flag_fields(TrainConfig, after_search=True))
