"""The command line of prune_launch.py: one of the paper's four searches (docs/method.md §5) from its
preset, with the paper's training after it as --aug_* flags, run in-process (`eval_lib.search_cli`).

The data folder comes from --data_path or the environment (METANTKNAS_MINI_DATA /
METANTKNAS_TIERED_DATA, else METANTKNAS_DATA). Every other flag of prune_metantknas.py may follow
and wins over the preset (so do --aug_* training flags over the paper's training preset). Returns the
search's exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from search_lib.cli import make_parser, run_cli
from search_lib.config import PAPER_PRESETS, paper_preset
from search_lib.data import resolve_dataset
from search_lib.errors import UsageError

from . import search_cli
from .aug_flags import AUG_PREFIX
from .config import TRAIN_AFTER_SEARCH_FLAGS, paper_training_preset

ENV_VARS = {"mini": "METANTKNAS_MINI_DATA", "tiered": "METANTKNAS_TIERED_DATA"}
GENERIC_ENV = "METANTKNAS_DATA"


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("prune_launch.py", "Run a paper search preset (any prune_metantknas.py flag may follow).")
    p.add_argument("--dataset", required=True, help="mini or tiered (MiniImageNet / TieredImageNet names too)")
    p.add_argument("--cells", type=int, required=True, choices=(5, 8), help="cells of the searched network")
    p.add_argument("--data_path", default=None,
                   help=f"RFS data folder; default ${ENV_VARS['mini']} / ${ENV_VARS['tiered']}, else ${GENERIC_ENV}")
    p.add_argument("--save_dir", default=None, help="default runs/search/<dataset>-<cells>cell")
    p.add_argument("--print_only", action="store_true", help="print the search command line and exit")
    return p


def _format(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _user_flags(extra: Sequence[str]) -> set[str]:
    return {a[2:].split("=", 1)[0] for a in extra if a.startswith("--")}


def search_argv(args: argparse.Namespace, extra: Sequence[str]) -> list[str]:
    """The prune_metantknas.py command line of a preset; the user's own flags come last and win."""
    ds = resolve_dataset(args.dataset).key
    if (ds, args.cells) not in PAPER_PRESETS:
        valid = ", ".join(f"{d} {c}" for d, c in PAPER_PRESETS)
        raise UsageError(f"no paper preset for --dataset {args.dataset} --cells {args.cells}; valid: {valid}")
    data_path = args.data_path or os.environ.get(ENV_VARS[ds]) or os.environ.get(GENERIC_ENV)
    if not data_path:
        raise UsageError(f"no data folder for {args.dataset}: pass --data_path or set {ENV_VARS[ds]}")
    preset = paper_preset(ds, args.cells)
    argv = [f"--{k}={_format(v)}" for k, v in preset.items()]
    argv += [f"--data_path={data_path}", f"--save_dir={args.save_dir or f'runs/search/{ds}-{args.cells}cell'}"]
    user = _user_flags(extra)
    for k, v in paper_training_preset(ds, args.cells).items():
        if k in TRAIN_AFTER_SEARCH_FLAGS and f"{AUG_PREFIX}{k}" not in user:
            argv.append(f"--{AUG_PREFIX}{k}={_format(v)}")
    overridden = sorted(user & ({k for k in preset} | {"data_path"}))
    if overridden:
        print(f"keeping your {', '.join('--' + k for k in overridden)} over the preset", file=sys.stderr)
    return argv + list(extra)


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args, extra = build_parser().parse_known_args(argv)
        cmd = search_argv(args, extra)
        print("prune_metantknas.py " + " ".join(cmd), flush=True)
        if args.print_only:
            return 0
        return search_cli.main(cmd)

    return run_cli(body)
