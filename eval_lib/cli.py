"""The command line of eval_searched_arch.py, the search's ``--aug_*`` flags and the hand-off from a search
(``--train_after_search``) or a proxy study (`eval_lib.proxy_study`) to the training.

Every flag is generated from a `TrainConfig` field (its default, type, choices and help), so the flags,
the library's defaults and the search's ``--aug_*`` flags cannot disagree.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from search_lib import distributed
from search_lib.cli import add_config_flags, field_default, flag_fields, make_parser, run_cli
from search_lib.genotypes import Genotype

from .config import TrainConfig
from .evaluation import format_results_table
from .train import train_and_evaluate

AUG_PREFIX = "aug_"  # the search's flags for the training after it: --aug_<eval flag>

DESCRIPTION = ("Train a searched architecture on the base classes (RFS-style) and test it on few-shot episodes of "
               "the novel classes; or test a checkpoint (--eval_only).")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(prog="eval_searched_arch.py", description=DESCRIPTION)
    add_config_flags(p, flag_fields(TrainConfig))
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig.from_dict(vars(args))


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        return run(config_from_args(args))

    return run_cli(body)


def run(cfg: TrainConfig, genotype: Genotype | None = None) -> int:
    """Train and test (or only test) as `cfg` says; print the results table."""
    if not logging.getLogger().handlers:  # console logging unless the caller set up its own
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    results = train_and_evaluate(cfg, genotype)
    if not distributed.world().is_main:  # under torchrun one process reports
        return 0
    if results.get("status") == "stopped":
        print(f"stopped after epoch {results['epoch']}; re-run the same command to resume "
              f"({results['save_dir']})")
        return 0
    if results.get("status") == "cached":
        print(f"run in {results.get('save_dir')} was already finished; showing its results "
              f"(--overwrite recomputes)")
    print(format_results_table(results))
    if results.get("save_dir") and results.get("mode") == "train":
        print(f"results: {results['save_dir']}/results.json")
    sys.stdout.flush()
    return 0


# ---- the search's --aug_* flags and the hand-off ----

def add_aug_flags(parser: argparse.ArgumentParser, group: argparse._ArgumentGroup | None = None) -> None:
    """--aug_<flag> for each training / test flag the search forwards (same type, choices and help).

    They default to None, meaning "eval_searched_arch.py's default", so that prune_launch.py can tell
    the values a user passed from the ones it may fill in from the paper's presets.
    """
    fields = flag_fields(TrainConfig, after_search=True)
    groups = {f.metadata["cli"]["group"]: group for f in fields} if group is not None else None
    add_config_flags(parser, fields, prefix=AUG_PREFIX, groups=groups, unset_default=True,
                     help_suffix=lambda f: f" (eval_searched_arch.py --{f.name}; default {field_default(f)})")


def split_aug_values(values: dict) -> tuple[dict, dict]:
    """Parsed flags split into (the other flags, the --aug_* values keyed by the training flag's name)."""
    aug = {k[len(AUG_PREFIX):]: v for k, v in values.items() if k.startswith(AUG_PREFIX)}
    return {k: v for k, v in values.items() if not k.startswith(AUG_PREFIX)}, aug


def aug_train_config(aug: dict, genotype: Genotype, *, space: str, max_nodes: int, data, data_path: str | None,
                     device: str, save_dir) -> TrainConfig:
    """The `TrainConfig` of a genotype trained after a search or in a proxy study.

    ``aug`` holds the --aug_* values (None: eval_searched_arch.py's default); the architecture, its space
    and node count, the dataset (the supervised name of ``data``, a `DatasetSpec`), the data folder, the
    device and the run folder are the caller's.
    """
    overrides = {k: v for k, v in aug.items() if v is not None}
    return TrainConfig(genotype=str(genotype), arch_space=space, arch_max_nodes=max_nodes, dataset=data.plain_name,
                       data_path=data_path, device=device, save_dir=str(save_dir), **overrides)


def train_after_search(result, search_cfg) -> int:
    """Train and few-shot test a search's genotype in-process (prune_metantknas.py --train_after_search).

    ``result`` is the search's `SearchResult`: its genotype and space are handed over as they are (no
    string round trip). The run folder is <search save_dir>/train; unset aug_* values take the defaults.
    """
    cfg = aug_train_config(search_cfg.train, result.genotype, space=result.search_space,
                           max_nodes=result.max_nodes, data=search_cfg.data, data_path=search_cfg.data_path,
                           device=search_cfg.device, save_dir=result.save_dir / "train")
    return run(cfg, result.genotype)
