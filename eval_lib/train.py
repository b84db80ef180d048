"""RFS-style training of a searched architecture on the base classes, then few-shot testing.

`train_and_evaluate(cfg)` trains an `AugmentCNN` built from a genotype with cross-entropy on the base
classes (partition ``train``), the drop-path probability rising linearly from 0 to its maximum, and then
tests it on few-shot episodes of the novel classes (``test``) and meta-validates on ``val`` for each
number of shots. Everything a run needs to continue is in ``<save_dir>/checkpoint.pt`` (written
atomically after every epoch; the previous one is kept as ``checkpoint_prev.pt``), so re-running the same
command in the same folder continues where it stopped and, on the CPU with a fixed seed, ends with the same
weights as an uninterrupted run. Files of a run folder:

    config.json       the settings (written at every start)
    checkpoint.pt     self-describing: genotype, network kwargs, model/optimizer/scheduler state, RNG states
    checkpoint_prev.pt  the checkpoint before the last one
    metrics.jsonl     one record per epoch: epoch, loss, acc, lr, drop_path_prob, time
    results.json      genotype, params, MACs, few-shot accuracy per split and shot (mean and 95% CI, percent)
    train.log         the log
    done              written after the final test; a finished run is not recomputed unless overwrite

`evaluate_checkpoint(path, cfg)` is the evaluation-only mode (the original ``fewshot_test.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import pickle
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from search_lib.errors import DataError, GenotypeError, RunFailure, UsageError
from search_lib.utils import (append_jsonl, atomic_torch_save, atomic_write_json, atomic_write_text, config_diff,
                              resolve_device, rng_state, set_rng_state, set_seed)

from .fewshot import canonical_classifier, meta_test

logger = logging.getLogger("metantknas.eval")

CHECKPOINT_FORMAT = "metantknas-eval-checkpoint"
CHECKPOINT_VERSION = 1
SCHEDULERS = ("step", "cosine", "exp")
SPLITS = ("test", "val")
DEFAULT_DATASET = "MiniImageNet"
DEFAULT_TRANSFORM = "A"

# Settings that define the trained weights: a checkpoint made with other values cannot be resumed.
TRAINING_KEYS = ("dataset", "init_channels", "layers", "stem_multiplier", "fsr", "drop_path_prob", "epochs",
                 "batch_size", "learning_rate", "lr_decay_epochs", "lr_decay_rate", "scheduler", "exp_gamma",
                 "optimizer", "momentum", "weight_decay", "transform", "image_size", "seed")
# Settings that define the few-shot test: cached results are reused only when these agree.
EVAL_KEYS = ("n_ways", "n_shots", "n_queries", "n_test_runs", "n_aug_support_samples", "classifier",
             "episode_seed", "eval_splits", "use_logits")


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Settings of one training + few-shot evaluation run (mirrors the flags of eval_searched_arch.py)."""

    # architecture
    genotype: str | None = None  # preset name | paper-style string | path to genotype.json
    random_arch: bool = False  # a seeded random genotype of the same space instead of --genotype
    arch_seed: int = 0
    arch_space: str = "darts_fewshot"
    arch_max_nodes: int = 3
    # data
    dataset: str | None = None  # None: MiniImageNet for training, the checkpoint's for evaluation-only
    data_path: str | None = None
    transform: str | None = None  # None: "A" for training, the checkpoint's for evaluation-only
    image_size: int | None = None
    num_workers: int = 0
    # network
    init_channels: int = 48
    layers: int = 5
    stem_multiplier: int = 1
    fsr: int = 2
    drop_path_prob: float = 0.2
    # optimisation (paper, miniImageNet 5 cells)
    epochs: int = 100
    batch_size: int = 64
    learning_rate: float = 0.02
    lr_decay_epochs: list[int] = field(default_factory=lambda: [60, 80])
    lr_decay_rate: float = 0.1
    scheduler: str = "step"  # step | cosine | exp
    exp_gamma: float = 0.97  # per-epoch factor of the "exp" scheduler
    optimizer: str = "sgd"  # sgd | adam | any torch_optimizer name (radam, lamb, ...)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    device: str = "auto"
    # few-shot test (paper: 5-way, 1000 episodes, 50 queries, 5 augmented support copies, LR)
    n_ways: int = 5
    n_shots: list[int] = field(default_factory=lambda: [1, 5])
    n_queries: int = 50
    n_test_runs: int = 1000
    n_aug_support_samples: int = 5
    classifier: str = "LR"
    use_logits: bool = False
    episode_seed: int = 0
    eval_splits: list[str] = field(default_factory=lambda: ["test", "val"])
    # run control
    save_dir: str | None = None  # None: output/eval/<dataset>-<arch>-C<C>-L<layers>-seed<seed>
    eval_only: bool = False
    checkpoint: str | None = None  # evaluation-only mode: the checkpoint to test
    trust_checkpoint: bool = False  # evaluation-only: allow arbitrary pickled objects in --checkpoint
    resume: bool = True
    overwrite: bool = False
    progress: bool = True
    stop_after_epoch: int | None = None  # testing hook: stop (resumably) once this many epochs are done

    def __post_init__(self):
        if self.genotype is not None and not isinstance(self.genotype, str):
            self.genotype = str(self.genotype)  # a Genotype object: keep its paper-style string
        self.lr_decay_epochs = [int(e) for e in self.lr_decay_epochs]
        self.n_shots = [int(s) for s in self.n_shots]
        self.eval_splits = [str(s) for s in self.eval_splits]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "TrainConfig":
        """Check the values; raise UsageError naming the bad setting and the fix."""
        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise UsageError(f"--{name} must be a positive integer, got {value!r}")

        for name in ("init_channels", "layers", "stem_multiplier", "fsr", "batch_size", "n_ways", "n_queries",
                     "n_test_runs", "n_aug_support_samples"):
            positive_int(name)
        if int(self.epochs) != self.epochs or self.epochs < 0:
            raise UsageError(f"--epochs must be a non-negative integer, got {self.epochs!r}")
        if int(self.num_workers) != self.num_workers or self.num_workers < 0:
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
        if self.stop_after_epoch is not None and self.stop_after_epoch < 0:
            raise UsageError("stop_after_epoch must be >= 0")
        self.classifier = canonical_classifier(self.classifier)
        if self.eval_only:
            if not self.checkpoint:
                raise UsageError("--eval_only needs --checkpoint PATH (a checkpoint.pt of a training run)")
        else:
            if self.random_arch and self.genotype:
                raise UsageError("give either --genotype or --random_arch, not both")
            if not self.random_arch and not self.genotype:
                raise UsageError("no architecture given; pass --genotype (preset name, Genotype(...) string or "
                                 "genotype.json) or --random_arch")
        return self


def paper_training_preset(dataset: str, layers: int) -> dict[str, Any]:
    """The paper's training and test settings (REFERENCE section 5) as TrainConfig fields.

    miniImageNet: 100 epochs, lr 0.02 decayed x0.1 at 60 and 80, drop-path 0.2, batch 64 (<= 5 cells) / 40;
    tieredImageNet: 60 epochs, lr 0.01 decayed at 30, 40, 50, drop-path 0.1, batch 64 (<= 5 cells) / 56.
    """
    from search_lib.data import canonical_dataset

    ds = canonical_dataset(dataset)
    layers = int(layers)
    if ds == "mini":
        train = dict(epochs=100, learning_rate=0.02, lr_decay_epochs=[60, 80], drop_path_prob=0.2,
                     batch_size=64 if layers <= 5 else 40)
    elif ds == "tiered":
        train = dict(epochs=60, learning_rate=0.01, lr_decay_epochs=[30, 40, 50], drop_path_prob=0.1,
                     batch_size=64 if layers <= 5 else 56)
    else:
        raise UsageError(f"no paper training preset for {dataset!r}; the paper trained on MiniImageNet and "
                         f"TieredImageNet only, give the training flags explicitly")
    return dict(train, lr_decay_rate=0.1, scheduler="step", optimizer="sgd", momentum=0.9, weight_decay=5e-4,
                init_channels=48, layers=layers, stem_multiplier=1, fsr=2, transform="A", n_ways=5,
                n_shots=[1, 5], n_queries=50, n_test_runs=1000, n_aug_support_samples=5, classifier="LR")


# --------------------------------------------------------------------------------------------------
# architecture, optimiser, schedule
# --------------------------------------------------------------------------------------------------

def resolve_architecture(cfg: TrainConfig):
    """The genotype a config asks for (a seeded random one with random_arch)."""
    from search_lib.genotypes import random_genotype, resolve_genotype

    if cfg.random_arch:
        return random_genotype(space=cfg.arch_space, max_nodes=cfg.arch_max_nodes, seed=cfg.arch_seed)
    if not cfg.genotype:
        raise UsageError("no architecture given; pass --genotype or --random_arch")
    genotype = resolve_genotype(cfg.genotype)
    space, max_nodes = _recorded_space(cfg.genotype)
    if space is not None:  # a search's genotype.json: its genotype must fit the space and nodes it records
        genotype.validate(space, max_nodes)
    genotype.space()  # refuses a genotype that mixes the ops of two search spaces
    return genotype


def _recorded_space(spec: str) -> tuple[str | None, int | None]:
    """(search_space, max_nodes) recorded in a search's genotype.json (a path or inline JSON), else Nones."""
    text = spec.strip()
    if not text.startswith("{"):
        try:
            text = Path(text).read_text() if Path(text).is_file() else ""
        except (OSError, UnicodeDecodeError):
            return None, None
    try:
        record = json.loads(text) if text.lstrip().startswith("{") else None
    except ValueError:
        return None, None
    if not isinstance(record, dict) or not isinstance(record.get("search_space"), str):
        return None, None
    nodes = record.get("max_nodes")
    return record["search_space"], nodes if isinstance(nodes, int) else None


def arch_label(cfg: TrainConfig, genotype) -> str:
    from search_lib.genotypes import PRESETS

    if cfg.random_arch:
        return f"random{cfg.arch_seed}"
    if cfg.genotype in PRESETS:
        return cfg.genotype
    return "geno-" + hashlib.sha1(str(genotype).encode()).hexdigest()[:8]


def default_save_dir(cfg: TrainConfig, genotype) -> str:
    from search_lib.data import canonical_dataset

    ds = canonical_dataset(cfg.dataset or DEFAULT_DATASET)
    return os.path.join("output", "eval",
                        f"{ds}-{arch_label(cfg, genotype)}-C{cfg.init_channels}-L{cfg.layers}-seed{cfg.seed}")


def build_network(genotype, net_kwargs: dict) -> nn.Module:
    from eval_lib.models import AugmentCNN

    return AugmentCNN(genotype, **net_kwargs)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    name = cfg.optimizer.strip().lower()
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    try:
        import torch_optimizer
    except ImportError as exc:
        raise UsageError(f"--optimizer {cfg.optimizer} needs the torch-optimizer package ({exc}); "
                         f"install it or use sgd/adam") from None
    try:
        cls = torch_optimizer.get(name)
    except ValueError:
        raise UsageError(f"unknown --optimizer {cfg.optimizer!r}; use sgd, adam or a torch_optimizer name "
                         f"such as radam, lamb, adabound") from None
    accepted = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {"lr": cfg.learning_rate}
    if "weight_decay" in accepted:
        kwargs["weight_decay"] = cfg.weight_decay
    if "momentum" in accepted:
        kwargs["momentum"] = cfg.momentum
    return cls(params, **kwargs)


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """Multiplier of the base learning rate during 0-based ``epoch``."""
    if cfg.scheduler == "step":  # RFS: decay once an epoch passes each milestone (1-based epoch > milestone)
        return cfg.lr_decay_rate ** sum(1 for m in cfg.lr_decay_epochs if epoch >= m)
    if cfg.scheduler == "cosine":  # RFS: cosine from lr to lr * decay_rate**3
        floor = cfg.lr_decay_rate ** 3
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * epoch / max(cfg.epochs, 1)))
    return cfg.exp_gamma ** epoch


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    def factor(epoch: int) -> float:
        return lr_factor(cfg, epoch)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the data order of one epoch: a function of (seed, epoch) only, so resuming reproduces it."""
    digest = hashlib.sha256(f"metantknas-eval:{int(seed)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------

def _pack_rng(state: dict) -> dict:
    """rng_state() in a form that torch.load(weights_only=True) accepts (no numpy arrays)."""
    packed = dict(state)
    kind, keys, pos, has_gauss, cached = state["numpy"]
    packed["numpy"] = (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                       float(cached))
    return packed


def _unpack_rng(packed: dict) -> dict:
    state = dict(packed)
    kind, keys, pos, has_gauss, cached = packed["numpy"]
    state["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    return state


def _reason(exc: BaseException, limit: int = 100) -> str:
    text = "".join(ch for ch in str(exc) if ch.isprintable() or ch.isspace())
    text = " ".join(text.replace("[1m", "").replace("[0m", "").split())
    return text[:limit] or type(exc).__name__


_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile, OSError,
                KeyError, TypeError, AttributeError)


def read_checkpoint(path: str | os.PathLike, trusted: bool = False) -> dict:
    """Load one checkpoint file; DataError (one line) when it is missing, truncated or not a checkpoint.

    Files are read with ``weights_only=True`` (tensors and plain values only; this toolkit's checkpoints
    are written that way); ``trusted=True`` allows arbitrary pickled objects (e.g. checkpoints of the
    original code), which can run code: use it only for files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist; pass the checkpoint.pt of a training run")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as exc:
        if not trusted and "unsupported global" in str(exc).lower():
            raise DataError(f"checkpoint {path} holds pickled Python objects besides tensors (not written by "
                            f"this toolkit); if you trust the file, add --trust_checkpoint") from None
        raise DataError(f"checkpoint {path} is unreadable (truncated or not a torch checkpoint: "
                        f"{_reason(exc)}); use checkpoint_prev.pt of the same run or re-train") from None
    except _LOAD_ERRORS as exc:
        raise DataError(f"checkpoint {path} is unreadable (truncated or not a torch checkpoint: "
                        f"{_reason(exc)}); use checkpoint_prev.pt of the same run or re-train") from None
    if not isinstance(obj, dict):
        raise DataError(f"checkpoint {path} holds a {type(obj).__name__}, not a checkpoint dictionary; "
                        f"pass a checkpoint.pt written by eval_searched_arch.py")
    return obj


def _is_run_checkpoint(ckpt: dict) -> bool:
    return ckpt.get("format") == CHECKPOINT_FORMAT and all(
        k in ckpt for k in ("epoch", "model", "optimizer", "scheduler", "rng", "config", "genotype", "net_kwargs"))


def load_latest_checkpoint(save_dir: Path) -> dict | None:
    """The newest usable checkpoint of a run folder, falling back to checkpoint_prev.pt; None when there is none.

    An unreadable checkpoint is moved aside (``*.corrupt``) with a warning naming it, so it is never
    rotated into checkpoint_prev.pt.
    """
    for name in ("checkpoint.pt", "checkpoint_prev.pt"):
        path = save_dir / name
        if not path.exists():
            continue
        try:
            ckpt = read_checkpoint(path)
            if not _is_run_checkpoint(ckpt):
                raise DataError(f"{path} is not a checkpoint of this training script")
        except DataError as exc:
            aside = path.with_name(path.name + ".corrupt")
            logger.warning("checkpoint %s is unusable (%s); moved it to %s and trying the previous one",
                           path, " ".join(str(exc).split(";")[0].split()), aside.name)
            try:
                os.replace(path, aside)
            except OSError as move_exc:  # still usable: the next save replaces the bad file
                logger.warning("could not move %s aside (%s)", path, move_exc.strerror)
            continue
        if name != "checkpoint.pt":
            logger.warning("resuming from %s (epoch %d)", path, int(ckpt["epoch"]))
        return ckpt
    if any((save_dir / f"{n}.corrupt").exists() for n in ("checkpoint.pt", "checkpoint_prev.pt")):
        logger.warning("no usable checkpoint in %s; training starts again from epoch 1", save_dir)
    return None


def save_checkpoint(save_dir: Path, payload: dict) -> None:
    """Write checkpoint.pt atomically, first moving the current one to checkpoint_prev.pt."""
    cur = save_dir / "checkpoint.pt"
    if cur.exists():
        try:
            os.replace(cur, save_dir / "checkpoint_prev.pt")
        except OSError as exc:
            raise RunFailure(f"cannot rotate {cur}: {exc.strerror}; check the permissions of {save_dir}") from None
    atomic_torch_save(cur, payload)


# --------------------------------------------------------------------------------------------------
# training and testing
# --------------------------------------------------------------------------------------------------

def train_one_epoch(model: nn.Module, loader, optimizer, device: torch.device, desc: str = "train",
                    progress: bool = True) -> tuple[float, float]:
    """One pass over ``loader``; returns (mean loss, accuracy in percent)."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, disable=None if progress else True, leave=False, dynamic_ncols=True)
    for batch in bar:
        images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        logits = model(images)
        loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = targets.shape[0]
        total_loss += float(loss.detach()) * n
        correct += int((logits.detach().argmax(1) == targets).sum())
        seen += n
        if progress:
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{100.0 * correct / seen:.1f}")
    if seen == 0:
        raise DataError("the training loader yielded no images; lower --batch_size")
    return total_loss / seen, 100.0 * correct / seen


def build_episode_sets(cfg: TrainConfig, dataset: str, data_path, transform: str,
                       image_size: int | None) -> dict[tuple[str, int], Any]:
    """The fixed-seed episode datasets of every (split, shots) of ``cfg``; fails early when infeasible."""
    from search_lib.data import EpisodeDataset

    return {(split, shots): EpisodeDataset(dataset, data_path, partition=split, n_ways=cfg.n_ways, n_shots=shots,
                                           n_queries=cfg.n_queries, n_aug_support_samples=cfg.n_aug_support_samples,
                                           n_test_runs=cfg.n_test_runs, transform=transform, image_size=image_size,
                                           seed=cfg.episode_seed)
            for split in cfg.eval_splits for shots in cfg.n_shots}


def fewshot_evaluate(model: nn.Module, cfg: TrainConfig, dataset: str, data_path, transform: str,
                     image_size: int | None, device: torch.device, episode_sets: dict | None = None) -> dict:
    """Few-shot accuracy per split (cfg.eval_splits) and shot (cfg.n_shots): {split: {str(shot): result}}."""
    if episode_sets is None:
        episode_sets = build_episode_sets(cfg, dataset, data_path, transform, image_size)
    out: dict[str, dict[str, dict]] = {}
    for (split, shots), episodes in episode_sets.items():
        res = meta_test(model, episodes, classifier=cfg.classifier, device=device, use_logits=cfg.use_logits,
                        progress=cfg.progress, num_workers=cfg.num_workers,
                        desc=f"{split} {cfg.n_ways}-way {shots}-shot")
        res["shots"] = shots
        if not math.isfinite(res["ci95"]):
            res["ci95"] = None
        out.setdefault(split, {})[str(shots)] = res
        logger.info("%s %d-way %d-shot (%s, %d episodes): %.2f +- %s", split, cfg.n_ways, shots,
                    res["classifier"], res["episodes"], res["mean"],
                    "n/a" if res["ci95"] is None else f"{res['ci95']:.2f}")
    return out


def format_results_table(results: dict) -> str:
    """A small text table: split, shots, mean +- ci95 (percent)."""
    rows = [("split", "ways", "shots", "episodes", "accuracy (%)")]
    for split, per_shot in results.get("fewshot", {}).items():
        for shots, res in per_shot.items():
            ci = "n/a" if res.get("ci95") is None else f"{res['ci95']:.2f}"
            rows.append((split, str(res.get("ways", "")), str(shots), str(res["episodes"]),
                         f"{res['mean']:.2f} +- {ci}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    head = []
    if results.get("genotype"):
        head.append(f"genotype: {results['genotype']}")
    if results.get("params") is not None:
        macs = results.get("macs")
        head.append(f"params: {results['params'] / 1e6:.3f} M   MACs: "
                    + ("n/a" if macs is None else f"{macs / 1e6:.1f} M"))
    return "\n".join(head + lines)


class _RunLog:
    """Attach a file handler for the run's log to the 'metantknas.eval' logger for the duration of a run."""

    def __init__(self, path: Path):
        self.path = path
        self.handler: logging.Handler | None = None
        self.old_level = logger.level

    def __enter__(self):
        try:
            self.handler = logging.FileHandler(self.path)
        except OSError as exc:
            raise RunFailure(f"cannot write the log {self.path}: {exc.strerror}; choose a writable --save_dir") \
                from None
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.handler.setLevel(logging.INFO)
        logger.addHandler(self.handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        logger.removeHandler(self.handler)
        self.handler.close()
        logger.setLevel(self.old_level)
        return False


def _normalised(cfg: TrainConfig) -> dict:
    """The config dict with the defaults resolved and names canonical (for comparisons and files)."""
    from search_lib.data import canonical_dataset

    d = cfg.to_dict()
    d["dataset"] = canonical_dataset(cfg.dataset or DEFAULT_DATASET)
    d["transform"] = (cfg.transform or DEFAULT_TRANSFORM).upper()
    d["optimizer"] = cfg.optimizer.lower()
    return d


def _read_json(path: Path) -> dict | None:
    try:
        with open(path) as fh:
            obj = json.load(fh)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


_RUN_FILES = ("checkpoint.pt", "checkpoint_prev.pt", "checkpoint.pt.corrupt", "checkpoint_prev.pt.corrupt",
              "metrics.jsonl", "results.json", "done", "config.json", "train.log")


def _clear_run(save_dir: Path) -> None:
    for name in _RUN_FILES:
        try:
            (save_dir / name).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise RunFailure(f"cannot remove {save_dir / name} for --overwrite: {exc.strerror}") from None


def _truncate_metrics(path: Path, epochs_done: int, last: dict | None = None) -> None:
    """Make metrics.jsonl hold exactly the epochs of the resumed checkpoint.

    Records of later epochs (they will be redone) and a line torn by a kill are dropped; the record of the
    checkpoint's own epoch is restored from the checkpoint when the run was killed between writing the
    checkpoint and appending its line. Unreadable lines are dropped with a warning, never a traceback.
    """
    original, records = None, []
    if path.exists():
        try:
            original = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning("metrics %s are unreadable (%s); rewriting them", path, _reason(exc))
        lines = (original or "").splitlines()
        for i, line in enumerate(lines):
            try:
                record = json.loads(line) if line.strip() else None
            except ValueError:
                record = None
                if i < len(lines) - 1:
                    logger.warning("metrics %s: line %d is unreadable; dropped", path, i + 1)
            if isinstance(record, dict) and isinstance(record.get("epoch"), int):
                records.append(record)
    kept = [r for r in records if r["epoch"] <= epochs_done]
    if last and last.get("epoch") == epochs_done > 0 and all(r["epoch"] != epochs_done for r in kept):
        kept.append(dict(last))
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
    if (original != text) if path.exists() else bool(text):
        atomic_write_text(path, text)


def _input_shape(dataset) -> tuple[int, ...]:
    with torch.random.fork_rng(devices=[]):
        return tuple(int(s) for s in dataset[0][0].shape)


def _complexity(model: nn.Module, input_shape) -> dict:
    from .complexity import model_complexity

    with torch.random.fork_rng(devices=[]):
        return model_complexity(model, tuple(input_shape))


def train_and_evaluate(cfg: TrainConfig) -> dict:
    """Train (or resume) the architecture of ``cfg`` and test it; returns the results dict.

    The result has ``status`` "finished" (just computed), "cached" (a finished run found in save_dir) or
    "stopped" (``stop_after_epoch`` reached; re-run to continue).
    """
    cfg.validate()
    if cfg.eval_only:
        return evaluate_checkpoint(cfg.checkpoint, cfg)
    genotype = resolve_architecture(cfg)
    device = resolve_device(cfg.device)
    data = _load_training_data(cfg)  # data errors surface before anything is written
    save_dir = Path(cfg.save_dir or default_save_dir(cfg, genotype))
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFailure(f"cannot create --save_dir {save_dir}: {exc.strerror}; choose a writable folder") from None
    if cfg.overwrite:
        _clear_run(save_dir)
    with _RunLog(save_dir / "train.log"):
        return _train_and_evaluate(cfg, genotype, device, save_dir, data)


def _load_training_data(cfg: TrainConfig) -> dict:
    """The training set, its image shape and the episode sets (checks that every episode is feasible)."""
    from search_lib.data import SupervisedDataset

    conf = _normalised(cfg)
    train_set = SupervisedDataset(conf["dataset"], cfg.data_path, partition="train", transform=conf["transform"],
                                  train=True, image_size=cfg.image_size)
    if len(train_set) == 0:
        raise DataError(f"the training partition of {cfg.dataset} is empty; check --data_path")
    return {"train_set": train_set, "input_shape": _input_shape(train_set),
            "episode_sets": build_episode_sets(cfg, conf["dataset"], cfg.data_path, conf["transform"],
                                               cfg.image_size)}


def _train_and_evaluate(cfg: TrainConfig, genotype, device: torch.device, save_dir: Path, data: dict) -> dict:
    started = time.time()
    conf = _normalised(cfg)
    conf["genotype_resolved"] = str(genotype)
    conf["save_dir"] = str(save_dir)
    keys = TRAINING_KEYS + ("genotype_resolved",)

    ckpt = load_latest_checkpoint(save_dir)
    if ckpt is not None:
        old = dict(ckpt["config"])
        diff = config_diff(old, conf, keys)
        if diff:
            raise UsageError(f"{save_dir} holds a run with other settings ({'; '.join(diff[:3])}); "
                             f"use --overwrite to replace it or choose another --save_dir")
        if not cfg.resume:
            raise UsageError(f"{save_dir} already holds a run (epoch {ckpt['epoch']}); re-run with --resume to "
                             f"continue it or --overwrite to start over")

    done = save_dir / "done"
    cached = _read_json(save_dir / "results.json") if done.exists() else None
    if cached is not None and ckpt is not None and int(ckpt["epoch"]) >= cfg.epochs:
        cached_conf = cached.get("config", {})
        if not config_diff(cached_conf, conf, keys + EVAL_KEYS):
            logger.info("run in %s is already finished; returning its results (use --overwrite to recompute)",
                        save_dir)
            cached["status"] = "cached"
            return cached
        logger.info("run in %s is finished but its test settings differ; re-testing the trained network",
                    save_dir)
    if done.exists():
        done.unlink()

    atomic_write_json(save_dir / "config.json", conf)
    logger.info("architecture: %s", genotype)
    logger.info("run folder: %s  device: %s", save_dir, device)

    dataset = conf["dataset"]
    transform = conf["transform"]
    train_set, input_shape, episode_sets = data["train_set"], data["input_shape"], data["episode_sets"]
    net_kwargs = dict(C=cfg.init_channels, layers=cfg.layers, num_classes=int(train_set.num_classes),
                      stem_multiplier=cfg.stem_multiplier, fsr=cfg.fsr, in_channels=int(input_shape[0]))

    set_seed(cfg.seed)
    model = build_network(genotype, net_kwargs)
    complexity = _complexity(model, input_shape)
    logger.info("params %.3f M, MACs %s", complexity["params"] / 1e6,
                "n/a" if complexity["macs"] is None else f"{complexity['macs'] / 1e6:.1f} M")
    model.to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)

    start_epoch, train_time, last = 0, 0.0, {}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(_unpack_rng(ckpt["rng"]))
        start_epoch = int(ckpt["epoch"])
        train_time = float(ckpt.get("train_time_s", 0.0))
        last = dict(ckpt.get("last_metrics", {}))
        if start_epoch < cfg.epochs:
            logger.info("resuming at epoch %d of %d", start_epoch + 1, cfg.epochs)
    metrics_path = save_dir / "metrics.jsonl"
    _truncate_metrics(metrics_path, start_epoch, last)

    generator = torch.Generator()
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True,
                                         drop_last=len(train_set) > cfg.batch_size, num_workers=cfg.num_workers,
                                         generator=generator, pin_memory=device.type == "cuda")

    epoch_bar = tqdm(range(start_epoch, cfg.epochs), initial=start_epoch, total=cfg.epochs, desc="epochs",
                     disable=None if cfg.progress else True, dynamic_ncols=True)
    for epoch in epoch_bar:
        if cfg.stop_after_epoch is not None and epoch >= cfg.stop_after_epoch:
            epoch_bar.close()
            logger.info("stopping after epoch %d as asked; re-run to resume", epoch)
            return {"status": "stopped", "epoch": epoch, "save_dir": str(save_dir)}
        t0 = time.time()
        model.drop_path_prob = cfg.drop_path_prob * epoch / cfg.epochs
        lr = optimizer.param_groups[0]["lr"]
        generator.manual_seed(epoch_seed(cfg.seed, epoch))
        loss, acc = train_one_epoch(model, loader, optimizer, device, desc=f"epoch {epoch + 1}",
                                    progress=cfg.progress)
        if not math.isfinite(loss):
            raise RunFailure(f"training diverged (loss {loss} in epoch {epoch + 1}); lower --learning_rate")
        scheduler.step()
        elapsed = time.time() - t0
        train_time += elapsed
        last = {"epoch": epoch + 1, "loss": loss, "acc": acc, "lr": lr, "drop_path_prob": model.drop_path_prob,
                "time": elapsed}
        save_checkpoint(save_dir, {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch + 1,
            "genotype": genotype.to_json(), "genotype_str": str(genotype), "net_kwargs": net_kwargs,
            "input_shape": list(input_shape), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "config": conf, "rng": _pack_rng(rng_state()),
            "train_time_s": train_time, "last_metrics": last,
        })
        append_jsonl(metrics_path, last)
        logger.info("epoch %d/%d loss %.4f acc %.2f lr %.5g drop-path %.3f (%.1f s)", epoch + 1, cfg.epochs,
                    loss, acc, lr, model.drop_path_prob, elapsed)
        epoch_bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.1f}")
    epoch_bar.close()

    t_eval = time.time()
    fewshot = fewshot_evaluate(model, cfg, dataset, cfg.data_path, transform, cfg.image_size, device,
                               episode_sets)
    results = {
        "status": "finished",
        "mode": "train",
        "genotype": str(genotype),
        "genotype_json": genotype.to_json(),
        "params": complexity["params"],
        "macs": complexity["macs"],
        "input_shape": list(input_shape),
        "dataset": dataset,
        "seed": cfg.seed,
        "classifier": cfg.classifier,
        "fewshot": fewshot,
        "train": {"epochs": cfg.epochs, "final": last, "train_time_s": train_time},
        "eval_time_s": time.time() - t_eval,
        "wall_time_s": train_time + (time.time() - t_eval),
        "session_time_s": time.time() - started,
        "save_dir": str(save_dir),
        "config": conf,
    }
    atomic_write_json(save_dir / "results.json", results)
    atomic_write_text(done, json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    logger.info("results written to %s", save_dir / "results.json")
    return results


# --------------------------------------------------------------------------------------------------
# evaluation only
# --------------------------------------------------------------------------------------------------

def _state_dict_of(ckpt: dict) -> dict:
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    raise DataError("the checkpoint holds no model weights (no 'model' entry); pass a checkpoint.pt of a "
                    "training run")


def evaluate_checkpoint(path: str | os.PathLike, cfg: TrainConfig | None = None) -> dict:
    """Few-shot test of a trained checkpoint (the evaluation-only mode).

    The network is rebuilt from the genotype and network settings stored in the checkpoint; for a bare
    state dict, ``cfg.genotype``/``cfg.random_arch`` and the network fields of ``cfg`` describe it. Data
    settings left None in ``cfg`` (dataset, data_path, transform, image_size) come from the checkpoint's
    run. With ``cfg.save_dir`` set, the results are also written to ``<save_dir>/eval_results.json``.
    """
    from search_lib.data import DEFAULT_IMAGE_SIZE, canonical_dataset
    from search_lib.genotypes import Genotype, resolve_genotype

    cfg = (cfg or TrainConfig()).replace(eval_only=True, checkpoint=str(path))
    cfg.validate()
    if not cfg.eval_splits:
        raise UsageError("--eval_splits is empty; give test and/or val")
    device = resolve_device(cfg.device)
    started = time.time()
    ckpt = read_checkpoint(path, trusted=cfg.trust_checkpoint)
    state = _state_dict_of(ckpt)
    old = dict(ckpt.get("config") or {})

    if "genotype" in ckpt and "net_kwargs" in ckpt:
        text = str(ckpt["genotype"])
        try:
            genotype = Genotype.from_json(text) if text.lstrip().startswith("{") else resolve_genotype(text)
        except GenotypeError as exc:
            raise DataError(f"checkpoint {path} holds an invalid genotype ({exc}); re-train it") from None
        if cfg.genotype or cfg.random_arch:
            logger.warning("ignoring --genotype/--random_arch: checkpoint %s describes its own architecture", path)
        net_kwargs = dict(ckpt["net_kwargs"])
    else:
        if not (cfg.genotype or cfg.random_arch):
            raise UsageError(f"checkpoint {path} does not record its architecture; pass --genotype and the "
                             f"network flags (--init_channels, --layers, ...) it was trained with")
        genotype = resolve_architecture(cfg)
        weight = state.get("linear.weight")
        if weight is None:
            raise DataError(f"checkpoint {path} has no 'linear.weight'; it is not an AugmentCNN state dict")
        net_kwargs = dict(C=cfg.init_channels, layers=cfg.layers, num_classes=int(weight.shape[0]),
                          stem_multiplier=cfg.stem_multiplier, fsr=cfg.fsr,
                          in_channels=int(state.get("stem.0.weight", torch.zeros(1, 3)).shape[1]))

    dataset = cfg.dataset or old.get("dataset") or DEFAULT_DATASET
    data_path = cfg.data_path if cfg.data_path is not None else old.get("data_path")
    transform = cfg.transform or old.get("transform") or DEFAULT_TRANSFORM
    image_size = cfg.image_size
    if image_size is None and old.get("image_size") is not None:
        image_size = int(old["image_size"])

    model = build_network(genotype, net_kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0] if first else ""
        raise DataError(f"checkpoint {path} does not fit the network ({detail[:120]}); "
                        f"check --genotype, --init_channels and --layers") from None
    shape = list(ckpt.get("input_shape") or (net_kwargs.get("in_channels", 3), 0, 0))
    if cfg.image_size is not None or not ckpt.get("input_shape"):
        shape[1:] = [image_size or DEFAULT_IMAGE_SIZE[canonical_dataset(dataset)]] * 2
    complexity = _complexity(model, shape)
    model.to(device)
    fewshot = fewshot_evaluate(model, cfg, dataset, data_path, transform, image_size, device)

    results = {
        "status": "finished",
        "mode": "eval_only",
        "checkpoint": str(path),
        "epoch": ckpt.get("epoch"),
        "genotype": str(genotype),
        "genotype_json": genotype.to_json(),
        "params": complexity["params"],
        "macs": complexity["macs"],
        "dataset": canonical_dataset(dataset),
        "seed": old.get("seed", cfg.seed),
        "classifier": cfg.classifier,
        "fewshot": fewshot,
        "wall_time_s": time.time() - started,
        "config": cfg.to_dict() | {"dataset": canonical_dataset(dataset), "data_path": data_path,
                                   "transform": transform, "image_size": image_size},
    }
    if cfg.save_dir:
        out = Path(cfg.save_dir) / "eval_results.json"
        atomic_write_json(out, results)
        logger.info("results written to %s", out)
    return results


__all__ = [
    "EVAL_KEYS", "SCHEDULERS", "TRAINING_KEYS", "TrainConfig", "build_episode_sets", "build_optimizer",
    "build_scheduler",
    "default_save_dir", "epoch_seed", "evaluate_checkpoint", "fewshot_evaluate", "format_results_table",
    "load_latest_checkpoint", "lr_factor", "paper_training_preset", "read_checkpoint", "resolve_architecture",
    "save_checkpoint", "train_and_evaluate", "train_one_epoch",
]
