"""The optimiser, its learning-rate schedule and one epoch of training.

RFS-style supervised pre-training on the base classes (docs/method.md §5): cross-entropy, SGD with
momentum, a step / cosine / exponential learning-rate schedule, and a per-epoch data order that depends
only on (seed, epoch), so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
from contextlib import closing, nullcontext
from typing import Any

import torch
import torch_optimizer
from torch import nn
from tqdm.auto import tqdm

from eval_lib.train.train_config import TrainConfig
from search_lib.core import turns
from search_lib.core.distributed import World
from search_lib.core.errors import DataError, UsageError
from search_lib.core.threads import ThreadTuner

logger = logging.getLogger("metantknas.eval")


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


def grad_scaler(device: torch.device, amp_dtype: torch.dtype | None):
    """The gradient scaler of an fp16 training (None for bf16 and float32, whose range needs none): fp16's
    small range makes small gradients underflow to zero unless the loss is scaled up first."""
    if amp_dtype != torch.float16:
        return None
    if hasattr(torch.amp, "GradScaler"):  # torch 2.3 and later, on every device
        return torch.amp.GradScaler(device.type)
    if device.type != "cuda":
        raise UsageError("--amp fp16 on the CPU needs torch 2.3 or later; use --amp bf16 or none")
    return torch.cuda.amp.GradScaler()


def train_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, optimizer, criterion,
               amp_dtype: torch.dtype | None = None, scaler=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on a batch: the forward under autocast in ``amp_dtype`` (None: float32), the loss in
    float32; with a ``scaler`` (fp16, `grad_scaler`) the loss is scaled for the backward and the step skipped
    when the scaled gradients overflowed. Returns (logits, loss)."""
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(images)
    loss = criterion(logits.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return logits, loss


def train_one_epoch(model: nn.Module, loader, optimizer, device: torch.device, desc: str = "train",
                    progress: bool = True, amp_dtype: torch.dtype | None = None,
                    channels_last: bool = False, world: World | None = None,
                    tuner: ThreadTuner | None = None, scaler=None) -> tuple[float, float]:
    """One pass over ``loader``; returns (mean loss, accuracy in percent).

    ``amp_dtype`` (e.g. torch.bfloat16): the forward pass under autocast in that dtype (the loss in
    float32); None trains in float32; ``scaler``: fp16's gradient scaler (`grad_scaler`). ``channels_last``: feed
    the images in that memory format.
    ``world``: under torchrun the loss and accuracy are those of the images of every rank. ``tuner``: on
    the CPU, a `search_lib.core.threads.ThreadTuner` that times the steps and chooses the thread count.
    """
    model.train()
    criterion = nn.CrossEntropyLoss()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, disable=None if progress else True, leave=False, dynamic_ncols=True)
    # each step with the fetching of its batch (an in-process loader's augmentation is CPU work too) holds the run's
    # turn at the cores (search_lib.core.turns); closing() gives the turn back at once when a step raises
    with closing(turns.over(bar)) as batches:
        for batch in batches:
            images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with tuner.step(targets.shape[0]) if tuner is not None else nullcontext():
                logits, loss = train_step(model, images, targets, optimizer, criterion, amp_dtype, scaler)
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
