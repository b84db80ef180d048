"""The command line of prune_launch.py: one of the paper's four searches (docs/method.md §5) from its
preset, with the paper's training after it as --aug_* flags, run in-process (`eval_lib.commands.search_command`).

It takes every flag of prune_metantknas.py (forwarded; the ones given win over the preset, with one line
saying which differ) and the original launcher's flags (`eval_lib.commands.original_flags`: ``--gpu``, ``--space``,
``--seed``, ``--dartsbs``, ``--ntk_layers``, ...). ``--cells 5|8`` (this project's) takes the paper's whole preset,
search and training; the original's ``--ntk_layers 5|8`` means what it meant there: the search keeps the original
launcher's settings (MAML, τ 1000, λ 1e-3, `original_launcher_preset`) unless given, and the paper's preset sets
only the training after the search. The data folder comes from
--data_path or the environment (METANTKNAS_MINI_DATA / METANTKNAS_TIERED_DATA, else METANTKNAS_DATA). The
default run folder is runs/search/<dataset>-<cells>cell-seed<seed>, with the seed actually used: a drawn
seed (``--seed -1``) starts a new run, a fixed one resumes. Returns the search's exit code.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

from eval_lib.commands import original_flags, search_command
from eval_lib.commands.presets import (
    SEARCH_PRESET_KEYS,
    TRAINING_PRESET_KEYS,
    original_launcher_preset,
    paper_search_preset,
    paper_training_preset,
)
from eval_lib.train.after_search import (
    TRAINING_FLAG_PREFIX,
    add_training_flags,
    eval_flag_default,
    split_training_values,
)
from eval_lib.train.train_config import TRAIN_AFTER_SEARCH_FLAGS
from search_lib.core.command_line import (
    RECORDED_DEST,
    add_config_flags,
    field_default,
    flag_fields,
    format_value,
    make_parser,
    note,
    run_cli,
)
from search_lib.core.distributed import launched
from search_lib.core.errors import UsageError
from search_lib.core.utils import draw_seed, refuse_empty_paths
from search_lib.data import resolve_dataset
from search_lib.search.search_config import SearchConfig

ENV_VARS = {"mini": "METANTKNAS_MINI_DATA", "tiered": "METANTKNAS_TIERED_DATA"}
GENERIC_ENV = "METANTKNAS_DATA"
OWN = ("dataset", "cells", "data_path", "save_dir", "print_only")  # the launcher's flags; the rest is forwarded


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("prune_launch.py", "Run one of the paper's searches from its preset, then (with "
                    "--train_after_search) the paper's training of its genotype. Every prune_metantknas.py flag "
                    "is forwarded and wins over the preset.")
    p.add_argument("--dataset", required=True,
                   help="mini or tiered (the name the kernel needs), or the original's MiniImageNet / TieredImageNet "
                        "(--ntk_type NTK) and MetaMiniImageNet / MetaTieredImageNet (MetaNTK)")
    p.add_argument("--cells", type=int, choices=(5, 8),
                   help="cells of the searched network, with the paper's whole preset (search and training); "
                        "default: the original's --ntk_layers, which gives the cells and the paper's training only, "
                        "the search keeping the original launcher's MAML, tau 1000, lambda 1e-3 (one of the two is "
                        "needed)")
    p.add_argument("--data_path", default=None, help=f"RFS data folder; default: ${ENV_VARS['mini']} / "
                                                     f"${ENV_VARS['tiered']}, else ${GENERIC_ENV}")
    p.add_argument("--save_dir", default=None, help="the run folder; default: runs/search/<dataset>-<cells>cell-seed"
                                                    "<seed>, named after the seed actually used")
    p.add_argument("--print_only", action="store_true",
                   help="check the search command line (its flags and settings) and print it, without running it")
    groups = {None: p.add_argument_group("forwarded to prune_metantknas.py (default: the preset's value, else "
                                         "prune_metantknas.py's)")}
    forwarded = [f for f in flag_fields(SearchConfig) if f.name not in OWN]
    add_config_flags(p, forwarded, groups={f.metadata["cli"]["group"]: groups[None] for f in forwarded},
                     unset_default=True, help_text=_search_help)
    add_training_flags(p, groups[None], help_suffix=_train_default)
    original_flags.add_spellings(p, original_flags.LAUNCH)
    return p


def _search_help(f, text: str) -> str:
    """The search flag's help with the launcher's default: the preset's value, else the search's default."""
    if f.name in SEARCH_PRESET_KEYS:
        return text.split("; default")[0] + "; default: the preset's (--cells), or the original launcher's"
    return text if field_default(f) is None else f"{text}; default: {format_value(field_default(f))}"


def _train_default(f) -> str:
    if f.name in TRAINING_PRESET_KEYS:
        return f" (eval_searched_arch.py --{f.name}; default: the paper's training of the preset)"
    return eval_flag_default(f)


def _cells(args: argparse.Namespace) -> int:
    """--cells, else the original's --ntk_layers; they must agree."""
    layers = args.ntk_layers
    if args.cells is not None and layers is not None and layers != args.cells:
        raise UsageError(f"--cells {args.cells} and --ntk_layers {layers} disagree; give one of them (5 or 8)")
    cells = args.cells if args.cells is not None else layers
    if cells is None:
        raise UsageError("give --cells 5|8 (or the original's --ntk_layers 5|8) to choose the paper's preset")
    if cells not in (5, 8):
        raise UsageError(f"--ntk_layers {cells} has no paper preset; use 5 or 8 (or prune_metantknas.py directly)")
    return cells


def _search_dataset(name: str, ntk_type: str) -> tuple[str, str]:
    """(dataset key, the search's dataset name): mini / tiered become the name --ntk_type needs."""
    key = resolve_dataset(name).key
    if key not in ENV_VARS:
        raise UsageError(f"no paper preset for --dataset {name}; use mini or tiered (or MiniImageNet, "
                         f"MetaMiniImageNet, TieredImageNet, MetaTieredImageNet)")
    if name.strip().lower() in ENV_VARS:
        plain = resolve_dataset(key).plain_name
        return key, f"Meta{plain}" if ntk_type == "MetaNTK_anl" else plain
    return key, name


def _given(args: argparse.Namespace) -> dict:
    """The forwarded settings the user gave (search fields, aug_<field> for the training)."""
    return {k: v for k, v in vars(args).items()
            if k not in OWN and k != RECORDED_DEST and v is not None}


def launch_config(args: argparse.Namespace) -> tuple[SearchConfig, set[str]]:
    """The search (and training) settings of a preset, the user's own settings winning (one line names those that
    differ from the preset); and the names of the search settings the launcher chose (the printed command line
    shows them even where they equal a default)."""
    original_flags.apply_spellings(args, original_flags.LAUNCH)  # one note per original flag without effect
    refuse_empty_paths(save_dir=args.save_dir, data_path=args.data_path)
    given = _given(args)
    cells = _cells(args)
    key, dataset = _search_dataset(args.dataset, given.get("ntk_type", "MetaNTK_anl"))
    data_path = args.data_path or os.environ.get(ENV_VARS[key]) or os.environ.get(GENERIC_ENV)
    if not data_path:
        raise UsageError(f"no data folder for {args.dataset}: pass --data_path or set {ENV_VARS[key]}")
    # --cells: the paper's search; the original's --ntk_layers alone: its launcher's search (the preset trains)
    search = paper_search_preset(key, cells) if args.cells is not None else original_launcher_preset(key, cells)
    preset = dict(search, dataset=dataset)
    channels = given.get("ntk_channels", preset["ntk_channels"])  # the training uses the search's network
    training = dict(paper_training_preset(key, cells), init_channels=channels, layers=cells)
    preset.update({TRAINING_FLAG_PREFIX + k: v for k, v in training.items() if k in TRAIN_AFTER_SEARCH_FLAGS})
    differ = [k for k, v in given.items() if k in preset and v != preset[k]]
    if differ:
        note("keeping your " + ", ".join(f"--{k} {format_value(given[k])} (preset: {format_value(preset[k])})"
                                         for k in differ) + " over the preset")
    settings = {**preset, **given, "data_path": data_path}
    settings["save_dir"] = args.save_dir or _default_save_dir(settings, dataset, cells)
    fields, train = split_training_values(settings)
    train = {k: train.get(k) for k in TRAIN_AFTER_SEARCH_FLAGS}  # as the search's parser gives them (None: unset)
    recorded = getattr(args, RECORDED_DEST, None) or {}
    return SearchConfig(**fields, train=train, original_flags=dict(recorded)), set(fields)


def _default_save_dir(settings: dict, dataset: str, cells: int) -> str:
    """The default run folder (`default_run_folder`), drawing the seed here for a negative one (so that the folder
    names it); the drawn seed goes into ``settings``."""
    seed = settings.get("rand_seed", -1)
    if seed < 0:
        if launched():  # every torchrun process would draw another seed, hence another folder
            raise UsageError("under torchrun give --seed N (or --save_dir): every process must use the same run folder")
        seed = settings["rand_seed"] = draw_seed()
        note(f"--seed -1: drew seed {seed}; it names the run folder and is recorded in its config.json")
    return default_run_folder(dataset, cells, seed)


def default_run_folder(dataset: str, cells: int, seed: int) -> str:
    return f"runs/search/{dataset}-{cells}cell-seed{seed}"


def run_folder(args: argparse.Namespace) -> str | None:
    """The run folder a parsed launcher command line uses, without running or printing anything: --save_dir, else
    the default folder of its seed; None when the seed is drawn at the start (the folder is known only then)."""
    original_flags.apply_spellings(args, original_flags.LAUNCH, notes=False)
    if args.save_dir:
        return args.save_dir
    seed = args.rand_seed if args.rand_seed is not None else -1
    if seed < 0:
        return None
    _, dataset = _search_dataset(args.dataset, args.ntk_type or "MetaNTK_anl")
    return default_run_folder(dataset, _cells(args), seed)


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        cfg, chosen = launch_config(args)
        print("prune_metantknas.py " + shlex.join(search_command.command_line(cfg, chosen)), flush=True)
        if args.print_only:
            search_command.check(cfg)
            return 0
        return search_command.run(cfg)

    return run_cli(body, argv)


if __name__ == "__main__":  # the entry points are the top-level script and the console script
    sys.exit(main())
