"""Few-shot evaluation of a trained network: the episode sets, the per-split test, the results table, and
the evaluation-only mode (the original ``fewshot_test.py``) that tests a checkpoint.

Protocol (docs/method.md §5): for each split (``test``: novel classes, ``val``: meta-validation) and each
number of shots, fixed-seed episodes; the mean accuracy with its 95% confidence interval, in percent.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eval_lib.fewshot.meta_test import FewShotSettings, mean_confidence_interval, meta_test
from eval_lib.train.checkpoints import read_checkpoint, state_dict_of
from eval_lib.train.network import build_network, complexity, network_kwargs, resolve_architecture
from eval_lib.train.train_config import DEFAULT_DATASET, DEFAULT_TRANSFORM, TrainConfig
from search_lib.core import distributed
from search_lib.core.distributed import World
from search_lib.core.errors import DataError, GenotypeError, UsageError
from search_lib.core.memory import MemoryMeter, peak_memory_record
from search_lib.core.session import RunSession, run_session
from search_lib.core.threads import ThreadTuner
from search_lib.core.utils import atomic_write_json
from search_lib.data import DatasetSpec, EpisodeDataset, EpisodeSubset, resolve_dataset
from search_lib.models.genotypes import Genotype, GenotypeRecord, resolve_genotype

logger = logging.getLogger("metantknas.eval")


def build_episode_sets(cfg: TrainConfig, dataset: str, data_path, transform: str,
                       image_size: int | None) -> dict[tuple[str, int], Any]:
    """The fixed-seed episode datasets of every (split, shots) of ``cfg``; fails early when infeasible."""
    return {(split, shots): EpisodeDataset(dataset, data_path, partition=split, n_ways=cfg.n_ways, n_shots=shots,
                                           n_queries=cfg.n_queries, n_aug_support_samples=cfg.n_aug_support_samples,
                                           n_test_runs=cfg.n_test_runs, transform=transform, image_size=image_size,
                                           seed=cfg.episode_seed)
            for split in cfg.eval_splits for shots in cfg.n_shots}


def fewshot_evaluate(model: nn.Module, cfg: TrainConfig, dataset: str, data_path, transform: str,
                     image_size: int | None, device: torch.device, episode_sets: dict | None = None,
                     world: World | None = None) -> dict:
    """Few-shot accuracy per split (cfg.eval_splits) and shot (cfg.n_shots): {split: {str(shot): result}}.

    Under torchrun each rank tests every size-th episode and the per-episode accuracies are gathered in
    episode order, so every rank returns what one process would (the episodes are fixed by their seed).
    """
    world = world or distributed.world()
    if episode_sets is None:
        episode_sets = build_episode_sets(cfg, dataset, data_path, transform, image_size)
    # one tuner for every test: what it learnt about this box's load carries over (CPU, --tune_threads only: the
    # classifiers run at whatever count it left, so the accuracies could depend on the load)
    tuner = ThreadTuner(enabled=cfg.tunes_threads(device.type)) if device.type == "cpu" else None
    try:
        return _fewshot_sets(model, cfg, cfg.fewshot_settings(device.type), episode_sets, device, world, tuner)
    finally:
        if tuner is not None:
            tuner.close()
            if len(tuner.counts) > 1:
                logger.info("few-shot test on the CPU: %s (chosen by timing them)", tuner.summary())


def _fewshot_sets(model: nn.Module, cfg: TrainConfig, settings: FewShotSettings, episode_sets: dict,
                  device: torch.device, world: World, tuner: ThreadTuner | None) -> dict:
    out: dict[str, dict[str, dict]] = {}
    for (split, shots), episodes in episode_sets.items():
        n = len(episodes)
        share = EpisodeSubset(episodes, world.shard(n)) if world.active else episodes
        res = None
        if len(share):  # a rank may have none when there are fewer episodes than ranks
            res = meta_test(model, share, settings, device=device, progress=cfg.progress and world.is_main,
                            desc=f"{split} {cfg.n_ways}-way {shots}-shot", tuner=tuner)
        if world.active:  # one gather: every rank's result; rank 0 always has episodes and describes the test
            parts = world.gather(res)
            accs = world.interleave(n, [[] if part is None else part["accuracies"] for part in parts])
            res = dict(parts[0])
            res["mean"], res["ci95"] = mean_confidence_interval(accs)
            res["accuracies"], res["episodes"] = accs, n
        res["shots"] = shots
        if not math.isfinite(res["ci95"]):
            res["ci95"] = None
        out.setdefault(split, {})[str(shots)] = res
        logger.info("%s %d-way %d-shot (%s, %d episodes%s): %.2f +- %s", split, cfg.n_ways, shots,
                    res["classifier"], res["episodes"], f" on {world.size} processes" if world.active else "",
                    res["mean"], "n/a" if res["ci95"] is None else f"{res['ci95']:.2f}")
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


def results_record(mode: str, genotype: Genotype, cost: dict, cfg: TrainConfig, dataset: DatasetSpec, seed: int,
                   fewshot: dict, memory: dict, wall_time_s: float, config: dict, **extra) -> dict:
    """The one layout of a run's results: ``results.json`` of a training (``mode`` "train") and
    ``eval_results.json`` of ``--eval_only`` ("eval_only"); ``extra`` holds the keys of that mode alone."""
    return {"status": "finished", "mode": mode, "genotype": str(genotype), "genotype_json": genotype.to_json(),
            "params": cost["params"], "macs": cost["macs"], "dataset": dataset.key, "seed": seed,
            "classifier": cfg.classifier, "fewshot": fewshot, "memory": memory, "wall_time_s": wall_time_s,
            "config": config, **extra}


def evaluate_checkpoint(path: str | os.PathLike, cfg: TrainConfig | None = None) -> dict:
    """Few-shot test of a trained checkpoint (the evaluation-only mode).

    The network is rebuilt from the genotype and network settings stored in the checkpoint; for a bare
    state dict, ``cfg.genotype``/``cfg.random_arch`` and the network fields of ``cfg`` describe it. Data
    settings left None in ``cfg`` (dataset, data_path, transform, image_size) come from the checkpoint's
    run. With ``cfg.save_dir`` set, the results are also written to ``<save_dir>/eval_results.json``.
    """
    cfg = (cfg or TrainConfig()).replace(eval_only=True, checkpoint=str(path))
    cfg.validate()
    if not cfg.eval_splits:
        raise UsageError("--eval_splits is empty; give test and/or val")
    with run_session(cfg.device, cfg.threads, workers=cfg.workers, deterministic=cfg.deterministic,
                     take_turns=cfg.take_turns) as session:
        return _evaluate_checkpoint(path, cfg, session)


def _evaluate_checkpoint(path, cfg: TrainConfig, session: RunSession) -> dict:
    world, device = session.world, session.device
    logger.info("device %s, %d compute threads", device, session.threads)
    started = time.time()
    ckpt = read_checkpoint(path, trusted=cfg.trust_checkpoint)
    state = state_dict_of(ckpt)
    old = dict(ckpt.get("config") or {})
    genotype, net_kwargs = _checkpoint_architecture(path, ckpt, state, cfg)
    dataset, data_path, transform, image_size = _checkpoint_data(cfg, old)
    model = _load_network(path, genotype, net_kwargs, state)
    shape = list(ckpt.get("input_shape") or (net_kwargs.get("in_channels", 3), 0, 0))
    if cfg.image_size is not None or not ckpt.get("input_shape"):
        shape[1:] = [image_size or dataset.default_image_size] * 2
    cost = complexity(model, shape)
    model.to(device)
    meter = MemoryMeter(device)
    try:
        with meter.window() as test_peak:
            fewshot = fewshot_evaluate(model, cfg, dataset, data_path, transform, image_size, device, world=world)
    finally:
        meter.close()

    config = cfg.to_dict() | {"dataset": dataset.key, "data_path": data_path, "transform": transform,
                              "image_size": image_size}
    results = results_record("eval_only", genotype, cost, cfg, dataset, old.get("seed", cfg.seed), fewshot,
                             {"test": peak_memory_record(device, test_peak)}, time.time() - started, config,
                             checkpoint=str(path), epoch=ckpt.get("epoch"))
    if cfg.save_dir and world.is_main:
        out = Path(cfg.save_dir) / "eval_results.json"
        atomic_write_json(out, results)
        logger.info("results written to %s", out)
    return results


def _checkpoint_architecture(path, ckpt: dict, state: dict, cfg: TrainConfig) -> tuple[Genotype, dict]:
    """The genotype and network arguments: the checkpoint's own, or (a bare state dict) the flags'."""
    if "genotype" in ckpt and "net_kwargs" in ckpt:
        text = str(ckpt["genotype"])
        try:
            genotype = (GenotypeRecord.from_json(text).genotype if text.lstrip().startswith("{")
                        else resolve_genotype(text))
        except GenotypeError as exc:
            raise DataError(f"checkpoint {path} holds an invalid genotype ({exc}); re-train it") from None
        if cfg.genotype or cfg.random_arch:
            logger.warning("ignoring --genotype/--random_arch: checkpoint %s describes its own architecture", path)
        return genotype, dict(ckpt["net_kwargs"])
    if not (cfg.genotype or cfg.random_arch):
        raise UsageError(f"checkpoint {path} does not record its architecture; pass --genotype and the "
                         f"network flags (--init_channels, --layers, ...) it was trained with")
    genotype = resolve_architecture(cfg)
    weight = state.get("linear.weight")
    if weight is None:
        raise DataError(f"checkpoint {path} has no 'linear.weight'; it is not an AugmentCNN state dict")
    return genotype, network_kwargs(cfg, weight.shape[0], state.get("stem.0.weight", torch.zeros(1, 3)).shape[1])


def _checkpoint_data(cfg: TrainConfig, old: dict) -> tuple[DatasetSpec, Any, str, int | None]:
    """Dataset, data path, transform and image size: the flags', else those of the checkpoint's run."""
    dataset = resolve_dataset(cfg.dataset or old.get("dataset") or DEFAULT_DATASET)
    data_path = cfg.data_path if cfg.data_path is not None else old.get("data_path")
    transform = cfg.transform or old.get("transform") or DEFAULT_TRANSFORM
    image_size = cfg.image_size
    if image_size is None and old.get("image_size") is not None:
        image_size = int(old["image_size"])
    return dataset, data_path, transform, image_size


def _load_network(path, genotype: Genotype, net_kwargs: dict, state: dict) -> nn.Module:
    model = build_network(genotype, net_kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0] if first else ""
        raise DataError(f"checkpoint {path} does not fit the network ({detail[:120]}); "
                        f"check --genotype, --init_channels and --layers") from None
    return model
