"""The command line of prune_metantknas.py: the search's flags (from
`search_lib.search.search_config.SearchConfig`), the ``--aug_*`` flags of the training after it
(`eval_lib.train.after_search`), the original code's spellings of both (`eval_lib.commands.original_flags`), and
running both in-process.

It lives here, above both packages, because it composes them: `search_lib` knows nothing of the training.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence

from eval_lib.commands import eval_command as eval_cli
from eval_lib.commands import original_flags
from eval_lib.train.after_search import TRAINING_FLAG_PREFIX, add_training_flags, split_training_values, training_config
from search_lib.core.command_line import (
    add_config_flags,
    field_default,
    flag_fields,
    format_value,
    make_parser,
    run_cli,
)
from search_lib.models.genotypes import random_genotype
from search_lib.search.search_config import SearchConfig
from search_lib.search.search_run import SearchResult, run_search

DESCRIPTION = "Pruning-based training-free NAS with NTK / MetaNTK and linear regions."
TRAIN_GROUP = "training after search"


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("prune_metantknas.py", DESCRIPTION)
    groups: dict = {}
    add_config_flags(p, flag_fields(SearchConfig), groups=groups)
    add_training_flags(p, groups[TRAIN_GROUP])
    original_flags.add_spellings(p, original_flags.SEARCH)
    return p


def config_from_args(args: argparse.Namespace, notes: bool = True) -> SearchConfig:
    # one note per original flag without effect (notes=False: a caller that only reads the settings)
    original_flags.apply_spellings(args, original_flags.SEARCH, notes)
    fields, train = split_training_values(vars(args))
    return SearchConfig(**fields, train=train)


def command_line(cfg: SearchConfig, always: Iterable[str] = ()) -> list[str]:
    """The prune_metantknas.py arguments that give ``cfg`` (the settings of `config_from_args`): every flag whose
    value differs from its default or is named in ``always``, the --aug_* values set, and the original code's
    recorded flags. Parsing them back gives ``cfg`` again."""
    always = set(always)
    argv = [f"--{f.name}={format_value(getattr(cfg, f.name))}" for f in flag_fields(SearchConfig)
            if f.name in always or getattr(cfg, f.name) != field_default(f)]
    argv += [f"--{TRAINING_FLAG_PREFIX}{k}={format_value(v)}" for k, v in cfg.train.items() if v is not None]
    return argv + [f"{flag}={value}" for flag, value in cfg.original_flags.items()]


def check(cfg: SearchConfig) -> SearchConfig:
    """Validate the search and, with --train_after_search, the training after it (on a stand-in genotype),
    so that a bad --aug_* value fails before the search, not after it."""
    cfg.validate()
    if cfg.train_after_search:
        stand_in = random_genotype(cfg.space, 0)
        train = training_config(cfg.train, stand_in, space=cfg.space,
                                 data=cfg.data, data_path=cfg.data_path, device=cfg.device, save_dir="unused")
        train.replace(seed=max(train.seed, 0)).validate()  # a negative seed is drawn when the training starts
    return cfg


def train_after_search(result: SearchResult, search_cfg: SearchConfig) -> int:
    """Train and few-shot test a search's genotype in-process (prune_metantknas.py --train_after_search).

    ``result`` is the search's `SearchResult`: its genotype and space are handed over as they are (no
    string round trip). The run folder is <search save_dir>/train; unset aug_* values take the defaults.
    """
    cfg = training_config(search_cfg.train, result.genotype, space=result.space, data=search_cfg.data,
                           data_path=search_cfg.data_path, device=search_cfg.device, save_dir=result.save_dir / "train",
                           break_stale_lock=search_cfg.break_stale_lock)
    return eval_cli.run(cfg, result.genotype)


def run(cfg: SearchConfig) -> int:
    check(cfg)  # the training's settings too (e.g. --aug_tensorboard without its package) before the search
    result = run_search(cfg)  # logs the genotype and where the outputs are
    if cfg.train_after_search:
        return train_after_search(result, cfg)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        return run(config_from_args(args))

    return run_cli(body, argv)


if __name__ == "__main__":  # the entry points are the top-level script and the console script
    sys.exit(main())
