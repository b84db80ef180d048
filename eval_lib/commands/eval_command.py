"""The command line of eval_searched_arch.py.

Every flag is generated from a `TrainConfig` field (its default, type, choices and help), so the flags,
the library's defaults and the search's ``--aug_*`` flags (`eval_lib.train.after_search`) cannot disagree; the
original code's (RFS's) spellings come from `eval_lib.commands.original_flags`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from eval_lib.commands import original_flags
from eval_lib.train.checkpoints import training_run_dir
from eval_lib.train.evaluation import format_results_table
from eval_lib.train.train_config import TrainConfig
from eval_lib.train.training_run import train_and_evaluate
from search_lib.core import distributed
from search_lib.core.command_line import add_config_flags, flag_fields, make_parser, note, run_cli
from search_lib.core.errors import UsageError
from search_lib.core.utils import draw_seed
from search_lib.models.genotypes import Genotype

DESCRIPTION = ("Train a searched architecture on the base classes (RFS-style) and test it on few-shot episodes of "
               "the novel classes; or test a checkpoint (--eval_only).")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(prog="eval_searched_arch.py", description=DESCRIPTION)
    add_config_flags(p, flag_fields(TrainConfig))
    original_flags.add_spellings(p, original_flags.EVAL)
    return p


def config_from_args(args: argparse.Namespace, notes: bool = True) -> TrainConfig:
    # --data_root, --tb_path, --resume PATH; one note per flag without effect (notes=False: a caller that only
    # reads the settings)
    original_flags.apply_spellings(args, original_flags.EVAL, notes)
    return TrainConfig.from_dict(vars(args))


def resolve_seed(cfg: TrainConfig) -> TrainConfig:
    """A negative --seed: the seed of the run found in --save_dir (it resumes), else a drawn one (logged and
    recorded in config.json)."""
    if cfg.eval_only or cfg.seed >= 0:
        return cfg
    if distributed.launched():  # every torchrun process would draw another seed
        raise UsageError(f"--seed {cfg.seed} under torchrun: give a seed >= 0 (every process must use the same)")
    recorded = training_run_dir(cfg.save_dir).read_config() if cfg.save_dir else None
    seed = (recorded or {}).get("seed")
    if isinstance(seed, int) and seed >= 0 and not cfg.overwrite:
        note(f"--seed {cfg.seed}: continuing the run in {cfg.save_dir} with its seed {seed}")
        return cfg.replace(seed=seed)
    seed = draw_seed()
    note(f"--seed {cfg.seed}: drew seed {seed} (recorded in config.json)")
    return cfg.replace(seed=seed)


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        return run(config_from_args(args))

    return run_cli(body, argv)


def run(cfg: TrainConfig, genotype: Genotype | None = None) -> int:
    """Train and test (or only test) as `cfg` says; print the results table."""
    if not logging.getLogger().handlers:  # console logging unless the caller set up its own
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = resolve_seed(cfg)
    if cfg.use_trainval and "val" in cfg.eval_splits and not cfg.eval_only:
        note("--use_trainval trains on the validation classes too: the val split's few-shot accuracy is not held out")
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


if __name__ == "__main__":  # the entry points are the top-level script and the console script
    sys.exit(main())
