"""The command line of prune_metantknas.py: the search's flags (from `SearchConfig`), the ``--aug_*``
flags of the training after it (from `eval_lib.config.TrainConfig`), and running both in-process."""

from __future__ import annotations

import argparse
from typing import Sequence

from eval_lib.cli import add_aug_flags, split_aug_values, train_after_search

from .cli import add_config_flags, flag_fields, make_parser, run_cli
from .config import SearchConfig
from .search_run import run_search

DESCRIPTION = "Pruning-based training-free NAS with NTK / MetaNTK and linear regions."
TRAIN_GROUP = "training after search"


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("prune_metantknas.py", DESCRIPTION)
    groups: dict = {}
    add_config_flags(p, flag_fields(SearchConfig), groups=groups)
    add_aug_flags(p, groups[TRAIN_GROUP])
    return p


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    fields, train = split_aug_values(vars(args))
    return SearchConfig(**fields, train=train)


def run(cfg: SearchConfig) -> int:
    result = run_search(cfg)  # logs the genotype and where the outputs are
    if cfg.train_after_search:
        return train_after_search(result, cfg)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        return run(config_from_args(args))

    return run_cli(body)
