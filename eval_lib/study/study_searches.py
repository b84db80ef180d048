"""The searches of a proxy study's ``--search_objectives`` (docs/proxy_study.md): one pruning search per item, on
the study's data with its seed and the search's flags, each found genotype trained and few-shot tested with the
study's training seeds, and what each found against the study's random architectures.

Files, per item (its slug: the item with ``log_rank:`` spelled ``log_rank-``, e.g. ``kappa+regions``,
``naswot``, ``log_rank-naswot+swap+zico``), under the study folder:

    searches/<slug>/search/       the search: a resumable search run folder (`search_lib.search.search_run`:
                                  history.jsonl, genotype.json, cost.json, ...)
    searches/<slug>/train/        its genotype's training and few-shot test with the first training seed;
    searches/<slug>/train_s<k>/   with the (k+1)-th (`eval_lib.study.study_trainings`)
    searches/<slug>/record.json   written when its trainings are finished: objectives, genotype, the search's
                                  cost.json, trainings and accuracy as an architecture's record holds them

The summary (`summarize_searches`): per item and shots the mean accuracy over the trainings with a 95% interval
(K > 1 trainings: a t-interval over the K training means, mean ± t(0.975, K − 1) · std / √K; one training: the
test episodes' own interval, mean ± ci95), its percentile among the random architectures' mean accuracies
(scipy's ``percentileofscore`` with ``kind="mean"``: the share below plus half the share equal), and the
search's seconds (cost.json's ``seconds``: the rounds', summed over the processes that ran them).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import scipy.stats

from eval_lib.fewshot.meta_test import mean_confidence_interval
from eval_lib.study.study_config import SearchItem, StudyConfig
from eval_lib.study.study_trainings import recorded_trainings, train_with_seeds, with_trainings
from eval_lib.train.checkpoints import read_json
from search_lib.core.errors import UsageError
from search_lib.core.utils import config_diff
from search_lib.models.genotypes import Genotype
from search_lib.search.search_config import SearchConfig
from search_lib.search.search_run import COST_FILE, run_search

log = logging.getLogger("metantknas.study")

SEARCHES_DIR = "searches"
SEARCH_SUBDIR = "search"


def search_config(cfg: StudyConfig, item: SearchItem, folder: Path) -> SearchConfig:
    """The search of ``item``: the study's search flags and seed, the item's objectives, its folder."""
    return dataclasses.replace(cfg.search_config(), objective=item.objective, combine=item.combine, only_lrs=False,
                               save_dir=str(folder / SEARCH_SUBDIR), overwrite=False, train_after_search=False,
                               train={})


def check_search_folder(cfg: StudyConfig, item: SearchItem, folder: Path) -> None:
    """A UsageError (before any work) when ``item``'s search folder holds a search of other settings: the study
    resumes it, so a changed search flag (--prune_number, ...) would otherwise be mixed into its results."""
    old = read_json(folder / SEARCH_SUBDIR / "config.json")
    if old is None:
        return
    new = search_config(cfg, item, folder)
    diff = config_diff(SearchConfig.from_dict(old).result_dict(), new.result_dict())
    if diff:
        raise UsageError(f"{folder} holds the search {item.label} with other settings ({'; '.join(diff)}); remove "
                         f"that folder to search again, give the earlier flags, or use --overwrite to start the "
                         f"study over")


def read_search_record(folder: Path, item: SearchItem) -> dict | None:
    """The record of ``item`` in its folder, None when there is none; UsageError when it is another search's."""
    record = read_json(folder / "record.json")
    if record is not None and (record.get("objectives") != list(item.objectives)
                               or record.get("combine") != item.combine):
        raise UsageError(f"{folder / 'record.json'} holds another search than {item.label}; remove the folder or "
                         f"use --overwrite to start over")
    return record


def study_search(cfg: StudyConfig, item: SearchItem, folder: Path, root: Path, record: dict | None = None) -> dict:
    """Search with ``item``'s objectives (or resume or report its search folder), then train and test the genotype
    once per training seed: the item's record. A ``record`` of fewer trainings than --train_seeds keeps its
    search and trainings and gains the missing ones."""
    if record is None:
        result = run_search(search_config(cfg, item, folder))
        genotype = result.genotype
        cost = read_json(folder / SEARCH_SUBDIR / COST_FILE)
        if cost is None:  # written with genotype.json; a search finished before cost.json existed has none
            raise UsageError(f"{folder / SEARCH_SUBDIR} has no readable {COST_FILE}; remove the folder to search "
                             f"again")
        done: list[dict] = []
    else:
        genotype, cost = Genotype.parse(record["genotype"]), record["cost"]
        done = recorded_trainings(record, cfg)
    trainings = train_with_seeds(cfg, genotype, folder, root=root, done=done, context=item.label)
    base = {"id": item.slug, "index": item.index, "label": item.label, "objectives": list(item.objectives),
            "combine": item.combine, "genotype": str(genotype), "search_dir": str((folder / SEARCH_SUBDIR)
                                                                                   .relative_to(root)),
            "cost": cost, "accuracy": None, "train_dir": None, "timings": {"search_s": cost["seconds"]}}
    return with_trainings(base, trainings)


def accuracy_interval(result: dict, k: int) -> dict:
    """The 95% interval of a mean accuracy over ``k`` trainings (the module's docstring)."""
    mean = float(result["mean"])
    if k > 1:  # the few-shot test's own Student-t interval, over the trainings' means instead of episodes
        half = mean_confidence_interval(result["per_seed"])[1]
        method = f"t-interval over the {k} training means"
    else:
        half = result.get("ci95")
        method = "the test episodes' 95% interval (one training)"
        if half is None:
            return {"low": None, "high": None, "method": method}
    return {"low": mean - half, "high": mean + half, "method": method}


def summarize_searches(search_records: list[dict], arch_records: list[dict], shots: list[str], k: int) -> list[dict]:
    """Per search, in the order of --search_objectives: its label, objectives, genotype, seconds, and per shots the
    mean accuracy over its trainings, their 95% interval, the per-training means and the percentile among the
    random architectures."""
    out = []
    for r in search_records:
        entry = {"label": r["label"], "id": r["id"], "objectives": r["objectives"], "combine": r["combine"],
                 "genotype": r["genotype"],
                 "search_dir": r["search_dir"], "search_s": r["cost"]["seconds"],
                 "objective_seconds": r["cost"].get("objective_seconds", {}), "rounds": r["cost"].get("rounds"),
                 "trainings": k, "shots": {}}
        for s in shots:
            res = r["accuracy"]["test"].get(s)
            if res is None:
                continue
            randoms = [a["accuracy"]["test"][s]["mean"] for a in arch_records
                       if a.get("source") == "random" and s in a["accuracy"].get("test", {})]
            entry["shots"][s] = {
                "mean": float(res["mean"]), "ci95": accuracy_interval(res, k),
                "per_seed": res.get("per_seed", [float(res["mean"])]),
                "percentile": float(scipy.stats.percentileofscore(randoms, res["mean"], kind="mean"))
                if randoms else None,
                "random_archs": len(randoms),
                "random_accuracy": {"min": float(min(randoms)), "median": float(np.median(randoms)),
                                    "max": float(max(randoms))} if randoms else None}
        out.append(entry)
    return out
