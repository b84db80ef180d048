"""The proxy study's command line, ``python -m eval_lib.proxy_study`` (the study itself: `eval_lib.study.study_run`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from eval_lib.commands.original_flags import add_earlier_names
from eval_lib.study.study_config import PROXY_FLAGS, StudyConfig
from eval_lib.study.study_run import run_study
from eval_lib.train.after_search import add_training_flags
from search_lib.core.command_line import add_config_flags, flag_fields, make_parser, run_cli
from search_lib.search.search_config import SearchConfig

DESCRIPTION = ("Does the search's proxy predict few-shot accuracy? Proxies at initialisation (κ of the MetaNTK of "
               "MAML and ANIL and of the NTK, linear regions, #params, MACs, and the zero-cost proxies grad_norm, "
               "snip, grasp, fisher, jacob_cov, synflow, NASWOT, ZiCo, SWAP, MeCo; two combined rankings) against "
               "the few-shot test accuracy of trained architectures: Kendall τ, Spearman ρ, partial τ and ρ given "
               "#params, bootstrap intervals, top-k hit rates, cost per architecture.")



def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m eval_lib.proxy_study", DESCRIPTION)
    groups = {"search": p.add_argument_group("proxy repeats, initialisation and device")}
    add_config_flags(p, flag_fields(StudyConfig), groups=groups)
    add_config_flags(p, [f for f in flag_fields(SearchConfig) if f.name in PROXY_FLAGS], groups=groups)
    add_training_flags(p, p.add_argument_group("training and few-shot test (eval_searched_arch.py's flags)"))
    add_earlier_names(p)  # --lr_batches, --lr_batch_size, --lr_crop
    return p


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    return StudyConfig.from_flags(vars(args))


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        return run_study(config_from_args(build_parser().parse_args(argv)))

    return run_cli(body, argv)


if __name__ == "__main__":
    sys.exit(main())
