"""A training run: RFS-style training of a searched architecture on the base classes, then few-shot testing.

`train_and_evaluate(cfg)` trains an `AugmentCNN` built from a genotype with cross-entropy on the base
classes (partition ``train``), the drop-path probability rising linearly from 0 to its maximum, and then
tests it on few-shot episodes of the novel classes (``test``) and meta-validates on ``val`` for each
number of shots. Everything a run needs to continue is in ``<save_dir>/checkpoint.pt`` (written
atomically after every epoch; the previous one is kept as ``checkpoint_prev.pt``), so re-running the same
command in the same folder continues where it stopped and, on the CPU with a fixed seed, ends with the same
weights as an uninterrupted run. Files of a run folder (`eval_lib.train.checkpoints.training_run_dir`):

    config.json       the settings (written at every start)
    checkpoint.pt     self-describing: genotype, network kwargs, model/optimizer/scheduler state, RNG states
    checkpoint_prev.pt  the checkpoint before the last one
    metrics.jsonl     one record per epoch: epoch, loss, acc, lr, drop_path_prob, time
    results.json      genotype, params, MACs, few-shot accuracy per split and shot (mean and 95% CI, percent)
    training.png      loss, accuracy, schedule and few-shot accuracies (`eval_lib.train.training_plot`)
    tensorboard/      the same scalars for TensorBoard, with --tensorboard
    train.log         the log
    done              written after the final test; a finished run is not recomputed unless overwrite

`train_and_evaluate` prepares a run (device, threads, data, run folder, log); `TrainingRun` is the run
itself: `execute` resumes or returns the cached results, `train` runs the epochs (`_EpochBatches` gives
each epoch's seeded batches), `finish` tests the network and writes the results.

The pieces live in `eval_lib.train.train_config` (settings), `eval_lib.train.network` (architecture, network),
`eval_lib.train.epoch` (optimiser, schedule, one epoch), `eval_lib.train.metrics` (metrics.jsonl),
`eval_lib.train.checkpoints` and `eval_lib.train.evaluation` (few-shot test, `evaluate_checkpoint`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from eval_lib.train.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    load_latest_checkpoint,
    pack_rng,
    read_json,
    save_checkpoint,
    training_run_dir,
    unpack_rng,
)
from eval_lib.train.device_batches import DeviceBatches, use_gpu_augment
from eval_lib.train.epoch import build_optimizer, build_scheduler, epoch_seed, grad_scaler, train_one_epoch
from eval_lib.train.evaluation import build_episode_sets, evaluate_checkpoint, fewshot_evaluate, results_record
from eval_lib.train.metrics import append_epoch, epoch_record, truncate_metrics
from eval_lib.train.network import (
    build_network,
    complexity,
    default_save_dir,
    input_shape,
    network_kwargs,
    resolve_architecture,
)
from eval_lib.train.tensorboard_log import TrainingBoard
from eval_lib.train.train_config import (
    EVAL_KEYS,
    TRAINING_KEYS,
    TrainConfig,
    eval_settings,
)
from eval_lib.train.training_plot import draw_training
from search_lib.core.distributed import World
from search_lib.core.errors import DataError, RunFailure, UsageError
from search_lib.core.figures import draw_quietly
from search_lib.core.memory import MemoryMeter, peak_memory_record
from search_lib.core.run_dir import RunDir
from search_lib.core.session import RunSession, run_session
from search_lib.core.threads import ThreadTuner
from search_lib.core.utils import atomic_write_json, config_diff, rng_state, set_rng_state, set_seed
from search_lib.data import SupervisedDataset
from search_lib.models.genotypes import Genotype

logger = logging.getLogger("metantknas.eval")
_PRECISION = {None: "float32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast, gradient scaler"}


def train_and_evaluate(cfg: TrainConfig, genotype: Genotype | None = None) -> dict:
    """Train (or resume) the architecture of ``cfg`` and test it; returns the results dict.

    ``genotype``, when given, is the architecture itself (a search's hand-off; ``cfg.genotype`` then only
    records it); it is checked against ``cfg.arch_space``.

    The result has ``status`` "finished" (just computed), "cached" (a finished run found in save_dir) or
    "stopped" (``stop_after_epoch`` reached; re-run to continue).
    """
    cfg.validate()
    if cfg.eval_only:
        return evaluate_checkpoint(cfg.checkpoint, cfg)
    genotype = resolve_architecture(cfg, genotype)
    run = training_run_dir(cfg.save_dir or default_save_dir(cfg, genotype))
    # a folder another process trains in: exit 2 at once
    with run_session(cfg.device, cfg.threads, workers=cfg.workers, run=run, overwrite=cfg.overwrite,
                     break_stale=cfg.break_stale_lock, deterministic=cfg.deterministic,
                     take_turns=cfg.take_turns) as session:
        data = TrainingData.load(cfg)  # data errors surface before anything is written
        # the lock held from here to the end
        session.claim(overwrite=cfg.overwrite, verb="create", log="metantknas.eval", level=logging.INFO)
        main = session.world.is_main
        with TrainingBoard(run.path, cfg.tensorboard and main, cfg.tensorboard_dir) as board:
            return TrainingRun(cfg, genotype, session.device, run, data, session.world, board,
                               session=session).execute()


@dataclass
class TrainingData:
    """The training set, its image shape and the episode sets (loading them checks every episode is feasible)."""

    train_set: SupervisedDataset
    input_shape: tuple[int, ...]
    episode_sets: dict = field(default_factory=dict)

    @classmethod
    def load(cls, cfg: TrainConfig) -> TrainingData:
        conf = cfg.normalised()
        train_set = SupervisedDataset(cfg.data, cfg.data_path, partition="trainval" if cfg.use_trainval else "train",
                                      transform=conf["transform"], train=True, image_size=cfg.image_size)
        if len(train_set) == 0:
            raise DataError(f"the training partition of {cfg.dataset} is empty; check --data_path")
        return cls(train_set, input_shape(train_set),
                   build_episode_sets(cfg, cfg.data, cfg.data_path, conf["transform"], cfg.image_size))


class TrainingRun:
    """One training in its run folder: `execute` resumes from the folder's checkpoint (or returns the cached
    results of a finished run), trains the remaining epochs with a checkpoint after each, then tests the
    network and writes ``results.json``.

    The progress of the run is its state: ``epoch`` (epochs done), ``train_time_s`` (summed over the
    sessions) and ``last`` (the last epoch's metrics record).
    """

    def __init__(self, cfg: TrainConfig, genotype: Genotype, device: torch.device, run: RunDir, data: TrainingData,
                 world: World, board: TrainingBoard, session: RunSession | None = None):
        self.cfg, self.genotype, self.device, self.run, self.data = cfg, genotype, device, run, data
        self.session = session  # writes provenance.json (None: a caller that records none)
        self.world, self.board = world, board
        self.started = time.time()
        self.conf = cfg.normalised() | {"genotype_resolved": str(genotype), "save_dir": str(run.path)}
        self.keys = TRAINING_KEYS + ("genotype_resolved",)  # the settings a checkpoint must share
        self.net_kwargs = network_kwargs(cfg, data.train_set.num_classes, data.input_shape[0])
        self.epoch, self.train_time_s, self.last = 0, 0.0, {}
        self.model = self.optimizer = self.scheduler = self.scaler = None
        self.amp_dtype = cfg.amp_dtype(device)
        self.device_images_bytes = 0  # the training images --gpu_augment holds on the device
        self.cost: dict = {}
        self.train_peak = self.test_peak = None  # memory windows (search_lib.core.memory.Window)
        self.thread_steps: dict[str, int] = {}  # this session's training steps per thread count

    def execute(self) -> dict:
        """The results dict: status "finished", "cached" or "stopped" (see `train_and_evaluate`)."""
        ckpt = load_latest_checkpoint(self.run.path)
        if ckpt is not None:
            self.run.check_config(eval_settings(dict(ckpt["config"])), self.conf, self.keys)
            if not self.cfg.resume:
                raise UsageError(f"{self.run.path} already holds a run (epoch {ckpt['epoch']}); re-run with "
                                 f"--resume to continue it or --overwrite to start over")
        cached = _finished_results(self.run, ckpt, self.cfg, self.conf, self.keys)
        if cached is not None:
            return cached
        if self.world.is_main:
            self.run.unmark_done()
            self.run.write_config(self.conf)
        if self.session is not None:
            tuned = self.cfg.tunes_threads(self.device.type)
            self.session.record_provenance({"seed": self.cfg.seed, "episode_seed": self.cfg.episode_seed},
                                           {"mode": "tuned" if tuned else "fixed", "load_dependent": tuned})
        self._log_start()
        self._build(ckpt)
        meter = MemoryMeter(self.device)  # the peaks of the training and of the test (this process and session)
        try:
            with meter.window() as self.train_peak:
                stopped = self.train()
            if stopped is not None:
                return stopped
            return self.finish(meter)
        finally:
            meter.close()

    def _log_start(self) -> None:
        cfg, world = self.cfg, self.world
        logger.info("architecture: %s", self.genotype)
        logger.info("run folder: %s  device: %s%s  precision: %s%s", self.run.path, self.device,
                    f" x {world.size} processes (DistributedDataParallel, {cfg.batch_size // world.size} images "
                    f"per process and step)" if world.active else "",
                    _PRECISION[self.amp_dtype],
                    ", channels_last" if cfg.channels_last else "")

    def _build(self, ckpt: dict | None) -> None:
        """The network, optimiser and schedule, and the random-number state: fresh, or the checkpoint's."""
        cfg, world = self.cfg, self.world
        set_seed(cfg.seed)
        self.model = model = build_network(self.genotype, self.net_kwargs)
        self.cost = complexity(model, self.data.input_shape)
        logger.info("params %.3f M, MACs %s", self.cost["params"] / 1e6,
                    "n/a" if self.cost["macs"] is None else f"{self.cost['macs'] / 1e6:.1f} M")
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.scaler = grad_scaler(self.device, self.amp_dtype)
        if world.active and world.rank > 0:  # rank 0 keeps the single-process stream; the others draw their own
            set_seed(rank_seed(cfg.seed, world.rank))
        if ckpt is None:
            return
        model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):  # fp16: the loss scale reached, not the initial one
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(unpack_rng(_own_rng(ckpt, world, cfg.seed, self.device)), self.device)
        self.epoch, self.train_time_s = int(ckpt["epoch"]), float(ckpt.get("train_time_s", 0.0))
        self.last = dict(ckpt.get("last_metrics", {}))
        if self.epoch < cfg.epochs:
            logger.info("resuming at epoch %d of %d", self.epoch + 1, cfg.epochs)

    # ---- the epochs ----

    def train(self) -> dict | None:
        """Train from ``self.epoch`` to ``cfg.epochs``, checkpointing every epoch.

        Under torchrun the network is wrapped in DistributedDataParallel: each rank trains on its shard of
        every global batch of ``cfg.batch_size`` images (a seeded `DistributedSampler`, or every size-th image
        of the device batches) and the gradients are averaged, so the step is that of the global batch with
        the same learning rate; rank 0 alone writes checkpoints and metrics.
        Returns the "stopped" result when ``cfg.stop_after_epoch`` is reached, else None.
        """
        cfg, world = self.cfg, self.world
        if world.is_main:
            truncate_metrics(self.run.path, self.epoch, self.last)
        batches = _EpochBatches(cfg, self.data, self.device, world)
        self.device_images_bytes = batches.device_batches.nbytes if batches.device_batches is not None else 0
        trained = self.model
        if world.active:
            trained = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                              if self.device.type == "cuda" else None)
        # on the CPU the count stays the one the run started with (the weights' float rounding depends on it);
        # --tune_threads chooses it by timing the steps: fewer beside other busy processes, load-dependent numbers
        tuner = ThreadTuner(enabled=cfg.tunes_threads(self.device.type)) if self.device.type == "cpu" else None
        epoch_bar = tqdm(range(self.epoch, cfg.epochs), initial=self.epoch, total=cfg.epochs, desc="epochs",
                         disable=None if cfg.progress and world.is_main else True, dynamic_ncols=True)
        try:
            for epoch in epoch_bar:
                if cfg.stop_after_epoch is not None and epoch >= cfg.stop_after_epoch:
                    logger.info("stopping after epoch %d as asked; re-run to resume", epoch)
                    return {"status": "stopped", "epoch": epoch, "save_dir": str(self.run.path)}
                loss, acc = self._train_epoch(epoch, trained, batches, tuner)
                epoch_bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.1f}")
        finally:
            epoch_bar.close()
            if tuner is not None:
                tuner.close()
                self.thread_steps = {str(c): n for c, n in tuner.step_counts().items()}
                if len(tuner.counts) > 1 and tuner.history:
                    logger.info("training on the CPU: %s (chosen by timing them)", tuner.summary())
        return None

    def _train_epoch(self, epoch: int, trained: nn.Module, batches: _EpochBatches,
                     tuner: ThreadTuner | None) -> tuple[float, float]:
        """One epoch, then its checkpoint and metrics record; returns its loss and accuracy."""
        cfg, model = self.cfg, self.model
        t0 = time.time()
        model.drop_path_prob = cfg.drop_path_prob * epoch / cfg.epochs
        lr = self.optimizer.param_groups[0]["lr"]
        loss, acc = train_one_epoch(trained, batches.epoch(epoch), self.optimizer, self.device,
                                    desc=f"epoch {epoch + 1}", progress=cfg.progress and self.world.is_main,
                                    amp_dtype=self.amp_dtype, channels_last=cfg.channels_last,
                                    world=self.world, tuner=tuner, scaler=self.scaler)
        if not math.isfinite(loss):
            raise RunFailure(f"training diverged (loss {loss} in epoch {epoch + 1}); lower --learning_rate")
        self.scheduler.step()
        elapsed = time.time() - t0
        self.epoch = epoch + 1
        self.train_time_s += elapsed
        self.last = epoch_record(epoch + 1, loss, acc, lr, model.drop_path_prob, elapsed)
        self._save()
        logger.info("epoch %d/%d loss %.4f acc %.2f lr %.5g drop-path %.3f (%.1f s)", epoch + 1, cfg.epochs,
                    loss, acc, lr, model.drop_path_prob, elapsed)
        return loss, acc

    def _save(self) -> None:
        """The checkpoint of the epochs done (self-describing: genotype, network, shapes) and the epoch's
        metrics record; every rank's random-number stream is kept, for an exact resume."""
        rng = pack_rng(rng_state(self.device))
        rng_ranks = self.world.gather(rng) if self.world.active else None
        if not self.world.is_main:
            return
        save_checkpoint(self.run.path, {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": self.epoch,
            "genotype": self.genotype.to_json(), "genotype_str": str(self.genotype), "net_kwargs": self.net_kwargs,
            "input_shape": list(self.data.input_shape),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "config": self.conf, "rng": rng,
            "train_time_s": self.train_time_s, "last_metrics": self.last,
            **({"rng_ranks": rng_ranks} if rng_ranks else {}),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        })
        append_epoch(self.run.path, self.last)
        self.board.epoch(self.last)  # --tensorboard (does nothing without it)

    # ---- the test and the results ----

    def finish(self, meter: MemoryMeter) -> dict:
        """Test the trained network on the few-shot episodes, write results.json, done and training.png."""
        cfg, world = self.cfg, self.world
        t_eval = time.time()
        with meter.window() as self.test_peak:
            fewshot = fewshot_evaluate(self.model, cfg, cfg.data, cfg.data_path, self.conf["transform"],
                                       cfg.image_size, self.device, self.data.episode_sets, world)
        self.board.fewshot(fewshot, cfg.epochs)
        results = self._results(fewshot, time.time() - t_eval)
        if world.is_main:
            atomic_write_json(self.run / "results.json", results)
            self.run.mark_done(json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
            logger.info("results written to %s", self.run / "results.json")
            draw_quietly(draw_training, self.run.path, logger)  # a failed picture is a warning only
        world.barrier()  # no rank reports the run finished before its files exist
        return results

    def _thread_mode(self) -> dict:
        """How the thread count was chosen: ``fixed`` at the start, or ``tuned`` by timing (--tune_threads), which
        makes the numbers depend on the machine's load; and the turns at the cores the run took (its steps that
        waited for another run's, `search_lib.core.turns`)."""
        tuned = self.cfg.tunes_threads(self.device.type)
        turns = self.session.turns.record() if self.session is not None else None
        return {"thread_mode": "tuned" if tuned else "fixed", "numbers_depend_on_load": tuned, "turns": turns}

    def _results(self, fewshot: dict, eval_time_s: float) -> dict:
        cfg = self.cfg
        # --gpu_augment's images are part of the training's peak; how much of it they are is said apart
        memory = {"train": peak_memory_record(self.device, self.train_peak)
                  | ({"gpu_augment_bytes": self.device_images_bytes} if self.device_images_bytes else {}),
                  "test": peak_memory_record(self.device, self.test_peak)}
        return results_record(
            "train", self.genotype, self.cost, cfg, cfg.data, cfg.seed, fewshot, memory,
            self.train_time_s + eval_time_s, self.conf, input_shape=list(self.data.input_shape),
            train={"epochs": cfg.epochs, "final": self.last, "train_time_s": self.train_time_s,
                   "threads": self.thread_steps,  # float rounding, hence the weights, depends on them
                   **self._thread_mode()},
            eval_time_s=eval_time_s, session_time_s=time.time() - self.started, processes=self.world.size,
            save_dir=str(self.run.path))


class _EpochBatches:
    """The training batches of each epoch: a DataLoader over the training set (under torchrun a seeded
    `DistributedSampler` shard), or with --gpu_augment the device's batches; both seeded by the epoch."""

    def __init__(self, cfg: TrainConfig, data: TrainingData, device: torch.device, world: World):
        self.cfg, self.world = cfg, world
        train_set = data.train_set
        self.generator = torch.Generator()
        self.device_batches = self.sampler = None
        if use_gpu_augment(cfg, train_set.split.images, device, world):
            self.device_batches = DeviceBatches(train_set.split.images, train_set.targets, device, cfg.batch_size,
                                                train_set.transform, world.rank, world.size)
        if world.active:  # each rank a seeded shard of the same permutation (padded to equal lengths)
            self.sampler = DistributedSampler(train_set, world.size, world.rank, shuffle=True, seed=cfg.seed)
        self.loader = torch.utils.data.DataLoader(
            train_set, batch_size=cfg.batch_size // world.size, shuffle=self.sampler is None, sampler=self.sampler,
            drop_last=len(train_set) > cfg.batch_size, num_workers=cfg.workers(device.type),
            generator=self.generator, pin_memory=device.type == "cuda")

    def epoch(self, epoch: int):
        data_seed = epoch_seed(self.cfg.seed, epoch)
        rank = self.world.rank
        self.generator.manual_seed(data_seed if rank == 0 else rank_seed(data_seed, rank))
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        return self.loader if self.device_batches is None else self.device_batches.epoch(data_seed)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random numbers (drop-path, augmentation) in a distributed training."""
    return epoch_seed(seed, -1 - int(rank))


def _own_rng(ckpt: dict, world: World, seed: int, device: torch.device):
    """This rank's saved random-number state; a run resumed with another number of processes reseeds."""
    states = ckpt.get("rng_ranks")
    if not world.active and not states:
        return ckpt["rng"]
    if states and len(states) == world.size:
        return states[world.rank]
    logger.warning("the checkpoint was written by %d process(es), this run has %d: reseeding the random numbers "
                   "(the data order stays the same)", len(states) if states else 1, world.size)
    set_seed(rank_seed(seed + int(ckpt["epoch"]), world.rank))
    return pack_rng(rng_state(device))


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

