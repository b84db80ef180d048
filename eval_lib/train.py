"""A training run: RFS-style training of a searched architecture on the base classes, then few-shot testing.

`train_and_evaluate(cfg)` trains an `AugmentCNN` built from a genotype with cross-entropy on the base
classes (partition ``train``), the drop-path probability rising linearly from 0 to its maximum, and then
tests it on few-shot episodes of the novel classes (``test``) and meta-validates on ``val`` for each
number of shots. Everything a run needs to continue is in ``<save_dir>/checkpoint.pt`` (written
atomically after every epoch; the previous one is kept as ``checkpoint_prev.pt``), so re-running the same
command in the same folder continues where it stopped and, on the CPU with a fixed seed, ends with the same
weights as an uninterrupted run. Files of a run folder (`eval_lib.checkpoints.training_run_dir`):

    config.json       the settings (written at every start)
    checkpoint.pt     self-describing: genotype, network kwargs, model/optimizer/scheduler state, RNG states
    checkpoint_prev.pt  the checkpoint before the last one
    metrics.jsonl     one record per epoch: epoch, loss, acc, lr, drop_path_prob, time
    results.json      genotype, params, MACs, few-shot accuracy per split and shot (mean and 95% CI, percent)
    training.png      loss, accuracy, schedule and few-shot accuracies (`search_lib.report`)
    tensorboard/      the same scalars for TensorBoard, with --tensorboard
    train.log         the log
    done              written after the final test; a finished run is not recomputed unless overwrite

The pieces live in `eval_lib.config` (settings), `eval_lib.trainer` (network, optimiser, one epoch),
`eval_lib.checkpoints` and `eval_lib.evaluation` (few-shot test, `evaluate_checkpoint`); their public names
are importable from here too.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from search_lib import distributed
from search_lib.data import SupervisedDataset
from search_lib.data.batch_augment import DeviceBatches
from search_lib.distributed import World
from search_lib.errors import DataError, RunFailure, UsageError
from search_lib.genotypes import Genotype
from search_lib.report import draw_quietly, draw_training
from search_lib.run_dir import RunDir
from search_lib.tensorboard_log import TrainingBoard
from search_lib.memory import MemoryMeter, peak_memory_record
from search_lib.threads import ThreadTuner, configure_threads, threads_fixed
from search_lib.utils import (append_jsonl, atomic_write_json, config_diff, resolve_device, rng_state, set_rng_state,
                              set_seed)

from .checkpoints import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_latest_checkpoint, pack_rng, read_checkpoint,
                          read_json, save_checkpoint, training_run_dir, unpack_rng)
from .config import EVAL_KEYS, SCHEDULERS, TRAINING_KEYS, TrainConfig, eval_settings, paper_training_preset
from .evaluation import build_episode_sets, evaluate_checkpoint, fewshot_evaluate, format_results_table
from .trainer import (build_network, build_optimizer, build_scheduler, complexity, default_save_dir, epoch_seed,
                      input_shape, lr_factor, resolve_architecture, train_one_epoch, truncate_metrics)

logger = logging.getLogger("metantknas.eval")


def train_and_evaluate(cfg: TrainConfig, genotype: Genotype | None = None) -> dict:
    """Train (or resume) the architecture of ``cfg`` and test it; returns the results dict.

    ``genotype``, when given, is the architecture itself (a search's hand-off; ``cfg.genotype`` then only
    records it); it is checked against ``cfg.arch_space`` / ``cfg.arch_max_nodes``.

    The result has ``status`` "finished" (just computed), "cached" (a finished run found in save_dir) or
    "stopped" (``stop_after_epoch`` reached; re-run to continue).
    """
    cfg.validate()
    if cfg.eval_only:
        return evaluate_checkpoint(cfg.checkpoint, cfg)
    genotype = resolve_architecture(cfg, genotype)
    world, device = distributed.init(resolve_device(cfg.device))
    configure_threads(cfg.workers(device.type), cfg.threads)
    run = training_run_dir(cfg.save_dir or default_save_dir(cfg, genotype))
    run.hold(world, early=True, overwrite=cfg.overwrite)  # a folder another process trains in: exit 2 at once
    try:
        data = TrainingData.load(cfg)  # data errors surface before anything is written
        world.barrier()  # every rank has checked its inputs before rank 0 changes the folder
        if world.is_main:
            run.create(verb="create")
        run.hold(world, overwrite=cfg.overwrite)  # held from the first write to the end (rank 0 for the group)
        if world.is_main and cfg.overwrite:
            run.clear()
        world.barrier()  # ... and reads it only after that
        with run.attach_log("metantknas.eval", level=logging.INFO) if world.is_main else nullcontext():
            with TrainingBoard(run.path, cfg.tensorboard and world.is_main) as board:  # rank 0 alone writes
                return _train_and_evaluate(cfg, genotype, device, run, data, world, board)
    finally:
        run.release()


@dataclass
class TrainingData:
    """The training set, its image shape and the episode sets (loading them checks every episode is feasible)."""

    train_set: SupervisedDataset
    input_shape: tuple[int, ...]
    episode_sets: dict = field(default_factory=dict)

    @classmethod
    def load(cls, cfg: TrainConfig) -> "TrainingData":
        conf = cfg.normalised()
        train_set = SupervisedDataset(cfg.data, cfg.data_path, partition="train", transform=conf["transform"],
                                      train=True, image_size=cfg.image_size)
        if len(train_set) == 0:
            raise DataError(f"the training partition of {cfg.dataset} is empty; check --data_path")
        return cls(train_set, input_shape(train_set),
                   build_episode_sets(cfg, cfg.data, cfg.data_path, conf["transform"], cfg.image_size))


def _train_and_evaluate(cfg: TrainConfig, genotype: Genotype, device: torch.device, run: RunDir,
                        data: TrainingData, world: World, board: TrainingBoard) -> dict:
    started = time.time()
    conf = cfg.normalised() | {"genotype_resolved": str(genotype), "save_dir": str(run.path)}
    keys = TRAINING_KEYS + ("genotype_resolved",)

    ckpt = load_latest_checkpoint(run.path)
    if ckpt is not None:
        run.check_config(dict(ckpt["config"]), conf, keys)
        if not cfg.resume:
            raise UsageError(f"{run.path} already holds a run (epoch {ckpt['epoch']}); re-run with --resume to "
                             f"continue it or --overwrite to start over")
    cached = _finished_results(run, ckpt, cfg, conf, keys)
    if cached is not None:
        return cached
    if world.is_main:
        run.unmark_done()
        run.write_config(conf)
    logger.info("architecture: %s", genotype)
    logger.info("run folder: %s  device: %s%s  precision: %s%s", run.path, device,
                f" x {world.size} processes (DistributedDataParallel, {cfg.batch_size // world.size} images "
                f"per process and step)" if world.active else "",
                "bf16 autocast" if cfg.amp_dtype(device.type) is not None else "float32",
                ", channels_last" if cfg.channels_last else "")

    net_kwargs = dict(C=cfg.init_channels, layers=cfg.layers, num_classes=int(data.train_set.num_classes),
                      stem_multiplier=cfg.stem_multiplier, fsr=cfg.fsr, in_channels=int(data.input_shape[0]))
    set_seed(cfg.seed)
    model = build_network(genotype, net_kwargs)
    cost = complexity(model, data.input_shape)
    logger.info("params %.3f M, MACs %s", cost["params"] / 1e6,
                "n/a" if cost["macs"] is None else f"{cost['macs'] / 1e6:.1f} M")
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    progress = {"epoch": 0, "train_time_s": 0.0, "last": {}}
    if world.active and world.rank > 0:  # rank 0 keeps the single-process stream; the others draw their own
        set_seed(rank_seed(cfg.seed, world.rank))
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(unpack_rng(_own_rng(ckpt, world, cfg.seed)))
        progress = {"epoch": int(ckpt["epoch"]), "train_time_s": float(ckpt.get("train_time_s", 0.0)),
                    "last": dict(ckpt.get("last_metrics", {}))}
        if progress["epoch"] < cfg.epochs:
            logger.info("resuming at epoch %d of %d", progress["epoch"] + 1, cfg.epochs)
    # what every checkpoint of this run records besides the training state
    describe = {"genotype": genotype.to_json(), "genotype_str": str(genotype), "net_kwargs": net_kwargs,
                "input_shape": list(data.input_shape)}
    meter = MemoryMeter(device)  # the peak memory of the training and of the test (this process, this session)
    # the training's thread count, chosen by timing its steps (CPU, unless fixed): fewer beside other busy processes
    tuner = ThreadTuner(enabled=not threads_fixed(cfg.threads)) if device.type == "cpu" else None
    try:
        with meter.window() as train_peak:
            stopped = _train_epochs(cfg, model, optimizer, scheduler, data, device, run, progress, describe, conf,
                                    world, board, tuner)
        if stopped is not None:
            return stopped
        t_eval = time.time()
        with meter.window() as test_peak:
            fewshot = fewshot_evaluate(model, cfg, cfg.data, cfg.data_path, conf["transform"], cfg.image_size,
                                       device, data.episode_sets, world)
    finally:
        meter.close()
        if tuner is not None:
            tuner.close()
            if len(tuner.counts) > 1 and tuner.history:
                logger.info("training on the CPU: %s (chosen by timing them)", tuner.summary())
    board.fewshot(fewshot, cfg.epochs)
    results = {
        "status": "finished",
        "mode": "train",
        "genotype": str(genotype),
        "genotype_json": genotype.to_json(),
        "params": cost["params"],
        "macs": cost["macs"],
        "input_shape": list(data.input_shape),
        "dataset": cfg.data.key,
        "seed": cfg.seed,
        "classifier": cfg.classifier,
        "fewshot": fewshot,
        "train": {"epochs": cfg.epochs, "final": progress["last"], "train_time_s": progress["train_time_s"]},
        "eval_time_s": time.time() - t_eval,
        "wall_time_s": progress["train_time_s"] + (time.time() - t_eval),
        "session_time_s": time.time() - started,
        "processes": world.size,
        "memory": {"train": peak_memory_record(device, train_peak), "test": peak_memory_record(device, test_peak)},
        "save_dir": str(run.path),
        "config": conf,
    }
    if world.is_main:
        atomic_write_json(run / "results.json", results)
        run.mark_done(json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        logger.info("results written to %s", run / "results.json")
        draw_quietly(draw_training, run.path, logger)  # training.png; a failure is a warning, not a failed run
    world.barrier()  # no rank reports the run finished before its files exist
    return results


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random numbers (drop-path, augmentation) in a distributed training."""
    return epoch_seed(seed, -1 - int(rank))


def _own_rng(ckpt: dict, world: World, seed: int):
    """This rank's saved random-number state; a run resumed with another number of processes reseeds."""
    states = ckpt.get("rng_ranks")
    if not world.active and not states:
        return ckpt["rng"]
    if states and len(states) == world.size:
        return states[world.rank]
    logger.warning("the checkpoint was written by %d process(es), this run has %d: reseeding the random numbers "
                   "(the data order stays the same)", len(states) if states else 1, world.size)
    set_seed(rank_seed(seed + int(ckpt["epoch"]), world.rank))
    return pack_rng(rng_state())


def _finished_results(run: RunDir, ckpt: dict | None, cfg: TrainConfig, conf: dict, keys) -> dict | None:
    """The results of a finished run in this folder with the same training and test settings, else None."""
    cached = read_json(run / "results.json") if run.is_done() else None
    if cached is None or ckpt is None or int(ckpt["epoch"]) < cfg.epochs:
        return None
    if not config_diff(eval_settings(cached.get("config", {})), conf, tuple(keys) + EVAL_KEYS):
        logger.info("run in %s is already finished; returning its results (use --overwrite to recompute)", run.path)
        cached["status"] = "cached"
        return cached
    logger.info("run in %s is finished but its test settings differ; re-testing the trained network", run.path)
    return None


def _train_epochs(cfg: TrainConfig, model: nn.Module, optimizer, scheduler, data: TrainingData,
                  device: torch.device, run: RunDir, progress: dict, describe: dict, conf: dict,
                  world: World, board: TrainingBoard, tuner: ThreadTuner | None = None) -> dict | None:
    """Train from ``progress["epoch"]`` to ``cfg.epochs``, checkpointing every epoch; updates ``progress``.

    Under torchrun the network is wrapped in DistributedDataParallel: each rank trains on its shard of
    every global batch of ``cfg.batch_size`` images (a seeded `DistributedSampler`, or every size-th image
    of the device batches) and the gradients are averaged, so the step is that of the global batch with the
    same learning rate; rank 0 alone writes checkpoints and metrics.
    Returns the "stopped" result when ``cfg.stop_after_epoch`` is reached, else None.
    """
    metrics_path = run / "metrics.jsonl"
    if world.is_main:
        truncate_metrics(metrics_path, progress["epoch"], progress["last"])
    generator = torch.Generator()
    train_set = data.train_set
    device_batches = sampler = None
    if cfg.use_gpu_augment(device.type):
        if cfg.normalised()["transform"] != "A":
            raise UsageError("--gpu_augment implements transform A only; use --gpu_augment false or --transform A")
        device_batches = DeviceBatches(train_set.split.images, train_set.targets, device, cfg.batch_size,
                                       int(data.input_shape[-1]), world.rank, world.size)
    if world.active:  # each rank a seeded shard of the same permutation (padded to equal lengths)
        sampler = DistributedSampler(train_set, world.size, world.rank, shuffle=True, seed=cfg.seed)
    local_batch = cfg.batch_size // world.size
    loader = torch.utils.data.DataLoader(train_set, batch_size=local_batch, shuffle=sampler is None,
                                         sampler=sampler, drop_last=len(train_set) > cfg.batch_size,
                                         num_workers=cfg.workers(device.type), generator=generator,
                                         pin_memory=device.type == "cuda")
    trained = model
    if world.active:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    epoch_bar = tqdm(range(progress["epoch"], cfg.epochs), initial=progress["epoch"], total=cfg.epochs,
                     desc="epochs", disable=None if cfg.progress and world.is_main else True, dynamic_ncols=True)
    for epoch in epoch_bar:
        if cfg.stop_after_epoch is not None and epoch >= cfg.stop_after_epoch:
            epoch_bar.close()
            logger.info("stopping after epoch %d as asked; re-run to resume", epoch)
            return {"status": "stopped", "epoch": epoch, "save_dir": str(run.path)}
        t0 = time.time()
        model.drop_path_prob = cfg.drop_path_prob * epoch / cfg.epochs
        lr = optimizer.param_groups[0]["lr"]
        data_seed = epoch_seed(cfg.seed, epoch)
        generator.manual_seed(data_seed if world.rank == 0 else rank_seed(data_seed, world.rank))
        if sampler is not None:
            sampler.set_epoch(epoch)
        batches = loader if device_batches is None else device_batches.epoch(data_seed)
        loss, acc = train_one_epoch(trained, batches, optimizer, device, desc=f"epoch {epoch + 1}",
                                    progress=cfg.progress and world.is_main, amp_dtype=cfg.amp_dtype(device.type),
                                    channels_last=cfg.channels_last, world=world, tuner=tuner)
        if not math.isfinite(loss):
            raise RunFailure(f"training diverged (loss {loss} in epoch {epoch + 1}); lower --learning_rate")
        scheduler.step()
        elapsed = time.time() - t0
        progress["epoch"] = epoch + 1
        progress["train_time_s"] += elapsed
        progress["last"] = last = {"epoch": epoch + 1, "loss": loss, "acc": acc, "lr": lr,
                                   "drop_path_prob": model.drop_path_prob, "time": elapsed}
        rng = pack_rng(rng_state())
        rng_ranks = world.gather(rng) if world.active else None  # every rank's stream, for an exact resume
        if world.is_main:
            save_checkpoint(run.path, {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch + 1, **describe,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "config": conf, "rng": rng, "train_time_s": progress["train_time_s"],
                "last_metrics": last, **({"rng_ranks": rng_ranks} if rng_ranks else {}),
            })
            append_jsonl(metrics_path, last)
            board.epoch(last)  # --tensorboard (does nothing without it)
        logger.info("epoch %d/%d loss %.4f acc %.2f lr %.5g drop-path %.3f (%.1f s)", epoch + 1, cfg.epochs,
                    loss, acc, lr, model.drop_path_prob, elapsed)
        epoch_bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.1f}")
    epoch_bar.close()
    return None


__all__ = [
    "EVAL_KEYS", "SCHEDULERS", "TRAINING_KEYS", "TrainConfig", "TrainingData", "build_episode_sets",
    "build_network", "build_optimizer", "build_scheduler", "default_save_dir", "epoch_seed", "evaluate_checkpoint",
    "fewshot_evaluate", "format_results_table", "load_latest_checkpoint", "lr_factor", "paper_training_preset",
    "read_checkpoint", "resolve_architecture", "save_checkpoint", "train_and_evaluate", "train_one_epoch",
]
