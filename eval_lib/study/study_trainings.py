"""A genotype trained and few-shot tested once per training seed of a study (``--train_seeds K``), and the
accuracy over those trainings: their mean and spread (docs/proxy_study.md).

Each training is a resumable training run folder of its own under the genotype's folder: ``train/`` for the
first seed (the folder of a study with one training per architecture, so such a study resumes and extends
unchanged), ``train_s1/``, ``train_s2/``, ... for the others. The seeds are `StudyConfig.training_seeds`.

A training is recorded as a dict: ``seed``, ``train_dir`` (the folder, relative to the caller's root),
``accuracy`` (``{split: {shots: {mean, ci95, episodes}}}``, the few-shot test of that training), ``train_s``,
``test_s`` and ``params`` (of the trained network; absent in a record written before the trainings were kept).
`seed_accuracy` combines them: with one training it is that training's accuracy unchanged; with several,
per split and shots ``mean`` (the mean over the trainings: what the proxies are correlated with), ``std``
(sample standard deviation over the trainings), ``min``, ``max``, ``per_seed`` (each training's mean, in
seed order), ``ci95`` (the mean of the trainings' own 95% intervals: the test episodes' noise of one
training) and ``episodes``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from eval_lib.study.study_config import StudyConfig
from eval_lib.train.training_run import train_and_evaluate
from search_lib.core.errors import UsageError
from search_lib.models.genotypes import Genotype

log = logging.getLogger("metantknas.study")


def training_dir(k: int) -> str:
    """The folder name of the k-th training (0-based) of a genotype."""
    return "train" if k == 0 else f"train_s{k}"


def train_with_seeds(cfg: StudyConfig, genotype: Genotype, folder: Path, *, root: Path | None = None,
                     done: Sequence[dict] = (), context: str = "") -> list[dict]:
    """Train and test ``genotype`` once per seed of ``cfg.training_seeds()``, the k-th in ``folder /
    training_dir(k)``; the trainings in ``done`` (recorded earlier, in seed order) are kept as they are. An
    interrupted training resumes at its last epoch; a finished folder without a record is read back. Returns
    one dict per seed (the module's docstring); ``train_dir`` is relative to ``root`` (default ``folder``)."""
    seeds = cfg.training_seeds()
    for k, (old, seed) in enumerate(zip(done, seeds)):
        if old.get("seed") != seed:
            raise UsageError(f"{folder / training_dir(k)} was trained with seed {old.get('seed')}, this study's "
                             f"training {k + 1} uses seed {seed}; use --overwrite to start over")
    out = list(done[:len(seeds)])
    for k in range(len(out), len(seeds)):
        path = folder / training_dir(k)
        if len(seeds) > 1:
            log.info("%s training %d of %d (seed %d): %s", context, k + 1, len(seeds), seeds[k], path.name)
        train_cfg = dataclasses.replace(cfg.train_config(genotype, path), seed=seeds[k])
        results = train_and_evaluate(train_cfg, genotype)
        out.append({"seed": seeds[k], "train_dir": str(path.relative_to(root) if root is not None else
                                                         path.relative_to(folder)),
                    "accuracy": {split: {s: {key: res.get(key) for key in ("mean", "ci95", "episodes")}
                                         for s, res in per.items()} for split, per in results["fewshot"].items()},
                    "train_s": results["train"]["train_time_s"], "test_s": results["eval_time_s"],
                    "params": results.get("params")})
    return out


def seed_accuracy(trainings: Sequence[dict]) -> dict:
    """The accuracy of a genotype over its trainings, ``{split: {shots: ...}}`` (the module's docstring)."""
    assert trainings, "a genotype has at least one training"
    if len(trainings) == 1:
        return trainings[0]["accuracy"]
    out: dict = {}
    for split, per in trainings[0]["accuracy"].items():
        out[split] = {}
        for s in per:
            runs = [t["accuracy"][split][s] for t in trainings]
            means = np.array([r["mean"] for r in runs], dtype=np.float64)
            cis = [r["ci95"] for r in runs if r.get("ci95") is not None]
            out[split][s] = {"mean": float(means.mean()), "std": float(means.std(ddof=1)),
                             "min": float(means.min()), "max": float(means.max()),
                             "per_seed": [float(m) for m in means],
                             "ci95": float(np.mean(cis)) if cis else None, "episodes": runs[0].get("episodes")}
    return out


def recorded_trainings(record: dict, cfg: StudyConfig) -> list[dict]:
    """The trainings of an architecture's record: its ``trainings`` list, or for a record of one training
    (which keeps the format of a study before --train_seeds) that training, with the study's first seed."""
    if "trainings" in record:
        return list(record["trainings"])
    return [{"seed": cfg.training_seeds()[0], "train_dir": record["train_dir"], "accuracy": record["accuracy"],
             "train_s": record["timings"]["train_s"], "test_s": record["timings"]["test_s"]}]


def with_trainings(record: dict, trainings: Sequence[dict]) -> dict:
    """``record`` with these trainings: ``accuracy`` their `seed_accuracy`, ``train_dir`` the first's, the
    timings' ``train_s`` and ``test_s`` their sums, and ``trainings`` the list when there are several (a record
    of one training has exactly the format of a study before --train_seeds, so old folders stay readable)."""
    out = {k: v for k, v in record.items() if k != "trainings"}
    out["accuracy"] = seed_accuracy(trainings)
    out["train_dir"] = trainings[0]["train_dir"]
    out["timings"] = {**record.get("timings", {}), "train_s": sum(t["train_s"] for t in trainings),
                      "test_s": sum(t["test_s"] for t in trainings)}
    if len(trainings) > 1:
        out["trainings"] = list(trainings)
    return out


def first_trainings(record: dict, cfg: StudyConfig) -> dict:
    """The record as a study of ``cfg.train_seeds`` trainings sees it: a record with more trainings (the folder
    was run with a larger --train_seeds) is cut to the first K; one with as many or fewer is returned as is."""
    trainings = recorded_trainings(record, cfg)
    return record if len(trainings) <= cfg.train_seeds else with_trainings(record, trainings[:cfg.train_seeds])


def training_count(record: dict | None) -> int:
    """How many trainings a record holds (0 for no record)."""
    return 0 if record is None else len(record.get("trainings", ())) or 1
