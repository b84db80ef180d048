"""The command line of eval_searched_arch.py.

Every flag is generated from a `TrainConfig` field (its default, type, choices and help), so the flags,
the library's defaults and the search's ``--aug_*`` flags (`eval_lib.aug_flags`) cannot disagree.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from search_lib import distributed
from search_lib.cli import add_config_flags, flag_fields, make_parser, run_cli
from search_lib.genotypes import Genotype

from .config import TrainConfig
from .evaluation import format_results_table
from .train import train_and_evaluate

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
