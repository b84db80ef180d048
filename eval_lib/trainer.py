"""The pieces of a training run: the architecture, the network, the optimiser and schedule, one epoch.

RFS-style supervised pre-training on the base classes (docs/method.md §5): cross-entropy, SGD with
momentum, a step / cosine / exponential learning-rate schedule, and a per-epoch data order that depends
only on (seed, epoch), so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch_optimizer
from torch import nn
from tqdm.auto import tqdm

from search_lib.distributed import World
from search_lib.errors import DataError, UsageError, one_line
from search_lib.genotypes import PRESETS, Genotype, random_genotype, resolve_genotype_record
from search_lib.threads import ThreadTuner
from search_lib.utils import atomic_write_text

from .complexity import model_complexity
from .config import TrainConfig
from .models import AugmentCNN

logger = logging.getLogger("metantknas.eval")


def resolve_architecture(cfg: TrainConfig, genotype: Genotype | None = None) -> Genotype:
    """The genotype a config asks for (a seeded random one with random_arch), or ``genotype`` checked against
    the config's space.

    A search's genotype.json must fit the space and node count it records; any genotype must use the ops
    of one search space.
    """
    if genotype is not None:
        return genotype.validate(cfg.arch_space, cfg.arch_max_nodes)
    if cfg.random_arch:
        return random_genotype(space=cfg.arch_space, max_nodes=cfg.arch_max_nodes, seed=cfg.arch_seed)
    if not cfg.genotype:
        raise UsageError("no architecture given; pass --genotype or --random_arch")
    genotype = resolve_genotype_record(cfg.genotype).genotype
    genotype.space()  # refuses a genotype that mixes the ops of two search spaces
    return genotype


def arch_label(cfg: TrainConfig, genotype) -> str:
    if cfg.random_arch:
        return f"random{cfg.arch_seed}"
    if cfg.genotype in PRESETS:
        return cfg.genotype
    return "geno-" + hashlib.sha1(str(genotype).encode()).hexdigest()[:8]


def default_save_dir(cfg: TrainConfig, genotype) -> str:
    ds = cfg.data.key
    return os.path.join("output", "eval",
                        f"{ds}-{arch_label(cfg, genotype)}-C{cfg.init_channels}-L{cfg.layers}-seed{cfg.seed}")


def build_network(genotype, net_kwargs: dict) -> nn.Module:
    return AugmentCNN(genotype, **net_kwargs)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    name = cfg.optimizer.strip().lower()
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
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


def train_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, optimizer, criterion,
               amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on a batch: the forward under autocast in ``amp_dtype`` (None: float32), the loss in
    float32; returns (logits, loss)."""
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(images)
    loss = criterion(logits.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits, loss


def train_one_epoch(model: nn.Module, loader, optimizer, device: torch.device, desc: str = "train",
                    progress: bool = True, amp_dtype: torch.dtype | None = None,
                    channels_last: bool = False, world: World | None = None,
                    tuner: ThreadTuner | None = None) -> tuple[float, float]:
    """One pass over ``loader``; returns (mean loss, accuracy in percent).

    ``amp_dtype`` (e.g. torch.bfloat16): the forward pass under autocast in that dtype (the loss in
    float32); None trains in float32. ``channels_last``: feed the images in that memory format.
    ``world``: under torchrun the loss and accuracy are those of the images of every rank. ``tuner``: on
    the CPU, a `search_lib.threads.ThreadTuner` that times the steps and chooses the thread count.
    """
    model.train()
    criterion = nn.CrossEntropyLoss()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, disable=None if progress else True, leave=False, dynamic_ncols=True)
    for batch in bar:
        images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with tuner.step(targets.shape[0]) if tuner is not None else nullcontext():
            logits, loss = train_step(model, images, targets, optimizer, criterion, amp_dtype)
        n = targets.shape[0]
        total_loss += float(loss.detach()) * n
        correct += int((logits.detach().argmax(1) == targets).sum())
        seen += n
        if progress:
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{100.0 * correct / seen:.1f}")
    if seen == 0:
        raise DataError("the training loader yielded no images; lower --batch_size")
    if world is not None and world.active:
        total_loss, correct, seen = world.sum([total_loss, correct, seen])
    return total_loss / seen, 100.0 * correct / seen


def truncate_metrics(path: Path, epochs_done: int, last: dict | None = None) -> None:
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
            logger.warning("metrics %s are unreadable (%s); rewriting them", path, one_line(exc, 100))
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


def input_shape(dataset) -> tuple[int, ...]:
    with torch.random.fork_rng(devices=[]):
        return tuple(int(s) for s in dataset[0][0].shape)


def complexity(model: nn.Module, input_shape) -> dict:
    with torch.random.fork_rng(devices=[]):
        return model_complexity(model, tuple(input_shape))
