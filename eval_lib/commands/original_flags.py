"""The paper repository's spellings of the three command lines, and what each means here.

Users come with the original's commands (its README, its ``scripts/``, the command lines its launcher and
its search build). This module is the one place that knows those spellings: for each command line a table
of `Spelling` rows, from which

* the parsers accept them (`add_spellings`, after the project's own flags exist: our names stay primary),
* the parsed values are completed (`apply_spellings`: the spellings whose meaning needs other flags, and
  one note line for each flag that changes nothing here),
* the README's "Coming from the original code" table is written (`readme_table`;
  ``python -m eval_lib.commands.original_flags`` prints it), and
* the tests take their cases (each row's ``example`` and the config values it must give, ``expect``).

Kinds of rows: ``same`` (the flag exists here under the original's name; ``value`` may translate the
original's values), ``alias`` (another name of one of our flags, with ``value`` translating when the
meaning needs it), ``recorded`` (a flag of the original alone: its value is kept in the config's
``original_flags`` and ``apply`` turns it into our settings) and ``no effect`` (accepted and recorded, with
one note saying it changes nothing). Pure data plus helpers: it imports nothing of `eval_lib`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from search_lib.core.command_line import ALIAS, NO_EFFECT, RECORDED, RECORDED_DEST, SAME, Spelling, note, str2bool
from search_lib.core.command_line import add_spellings as cli_add_spellings
from search_lib.core.command_line import apply_spellings as cli_apply_spellings
from search_lib.core.errors import DataError, UsageError
from search_lib.data.names import resolve_dataset
from search_lib.search.search_config import EARLIER_FIELDS

LAUNCH, SEARCH, EVAL = "prune_launch.py", "prune_metantknas.py", "eval_searched_arch.py"


# --------------------------------------------------------------------------------------------------
# value translations (the original's values -> this project's)

def _mapped(mapping: dict[str, str], refused: dict[str, str] | None = None) -> Callable[[str, Callable], Any]:
    """A translation of some of the original's words (the rest parse as they are); ``refused`` words are
    errors with their reason."""
    def value(text: str, parse: Callable) -> Any:
        word = str(text).strip()
        if refused and word in refused:
            raise argparse.ArgumentTypeError(refused[word])
        return parse(mapping.get(word, word))
    return value


def _gpu(text: str, parse: Callable) -> str:
    try:
        index = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a GPU number such as 0, got {text!r}") from None
    if index < 0:
        raise argparse.ArgumentTypeError(f"expected a GPU number >= 0, got {text!r}")
    return f"cuda:{index}"


def _negative_draws(text: str, parse: Callable) -> int:
    """-1 or any negative seed: drawn (as -1)."""
    seed = parse(text)
    return -1 if seed < 0 else seed


def _negative_unset(text: str, parse: Callable) -> int | None:
    """--ntk_N -1 (the original's default): derived from --ntk_layers."""
    n = parse(text)
    return None if n < 0 else n


def _only(*words: str, why: str) -> Callable[[str, Callable], str]:
    def value(text: str, parse: Callable) -> str:
        if str(text) not in words:
            raise argparse.ArgumentTypeError(f"{text!r}: {why}")
        return str(text)
    return value


def _bool_or_path(text: str, parse: Callable) -> Any:
    """--resume true|false (ours) or --resume PATH (the original's: a checkpoint to continue); the original's
    default ``--resume ''`` (a script's unset variable too) means no resume, never the current folder."""
    if not str(text).strip():
        return False
    try:
        return str2bool(text)
    except argparse.ArgumentTypeError:
        return str(text)


# --------------------------------------------------------------------------------------------------
# completions after parsing

def _data_root(ns: argparse.Namespace, raw: str) -> None:
    """RFS's --data_root R: the data of --dataset D are in R/D (folder names as RFS spells them)."""
    if getattr(ns, "data_path", None) is not None:
        raise UsageError("give either --data_path DIR (the data folder) or the original's --data_root ROOT "
                         "(the folder above it), not both")
    ns.data_path = os.path.join(raw, resolve_dataset(ns.dataset or "miniImageNet").display)


def _tb_path(ns: argparse.Namespace, raw: str) -> None:
    """RFS's --tb_path DIR: TensorBoard logs in DIR when the tensorboard package is installed."""
    if importlib.util.find_spec("tensorboard") is None:
        note(f"--tb_path {raw}: the tensorboard package is not installed, so no TensorBoard logs "
             f"(pip install tensorboard); the curves are in metrics.jsonl and training.png of the run folder")
        return
    ns.tensorboard, ns.tensorboard_dir = True, raw


CHECKPOINT_NAMES = ("checkpoint.pt", "checkpoint_prev.pt")


def _resume(ns: argparse.Namespace, raw: Any) -> None:
    """The original's --resume PATH: continue the training whose checkpoint (or run folder) is PATH."""
    if not isinstance(ns.resume, str):
        return
    path = Path(ns.resume).expanduser()
    if path.is_dir():
        folder = path
    elif path.is_file() and path.name in CHECKPOINT_NAMES:
        folder = path.parent
    elif path.is_file():
        raise UsageError(f"--resume {path}: not a checkpoint.pt of this toolkit's run folder; a run folder "
                         f"continues by itself (re-run with its --save_dir), and a checkpoint of the original "
                         f"code can be tested with --eval_only --checkpoint {path} --trust_checkpoint")
    else:
        raise DataError(f"--resume {path}: no such checkpoint or run folder; pass a run folder or its checkpoint.pt")
    if ns.save_dir is not None and Path(ns.save_dir).expanduser().resolve() != folder.resolve():
        raise UsageError(f"--resume {path} continues the run in {folder}, but --save_dir (or --model_path) is "
                         f"{ns.save_dir}; drop one of them")
    ns.save_dir, ns.resume = str(folder), True


# --------------------------------------------------------------------------------------------------
# the tables

def _same(meaning: str, differs: str = "", **flags: tuple[str, Any]) -> list[Spelling]:
    """``same`` rows of one meaning: ``name=(example value, the value it gives)``."""
    return [Spelling((f"--{n}",), SAME, meaning, f"--{n}", differs=differs, example=(text,),
                     expect={_expect_key(n): value}) for n, (text, value) in flags.items()]


def _expect_key(name: str) -> str:
    """The config value a flag sets: ``train.<field>`` for the search's --aug_<field> flags."""
    return f"train.{name[len('aug_'):]}" if name.startswith("aug_") else name


def _no_effect(flag: str, meaning: str, example: str, why: str, value=None, short: str | None = None) -> Spelling:
    flags = (short, f"--{flag}") if short else (f"--{flag}",)
    return Spelling(flags, NO_EFFECT, meaning, here="accepted, no effect", differs=why, value=value,
                    example=(example,), expect={RECORDED_DEST: {f"--{flag}": example}})


# The --aug_* flags of the search's training (the original's launcher and search spell them alike).
AUG = [
    Spelling(("--aug_dp",), ALIAS, "drop-path probability of the training", "--aug_drop_path_prob",
             example=("0.1",), expect={"train.drop_path_prob": 0.1}),
    Spelling(("--aug_channels",), ALIAS, "channels of the trained network", "--aug_init_channels",
             example=("16",), expect={"train.init_channels": 16}),
    Spelling(("--aug_lr",), ALIAS, "learning rate of the training", "--aug_learning_rate",
             example=("0.05",), expect={"train.learning_rate": 0.05}),
    Spelling(("--aug_batchsize",), ALIAS, "batch size of the training", "--aug_batch_size",
             example=("32",), expect={"train.batch_size": 32}),
    Spelling(("--aug_stemm",), ALIAS, "stem multiplier of the trained network", "--aug_stem_multiplier",
             example=("2",), expect={"train.stem_multiplier": 2}),
    *_same("the training setting of that name", aug_layers=("8", 8), aug_epochs=("3", 3),
           aug_lr_decay_epochs=("30,40", [30, 40]), aug_fsr=("1", 1)),
]

# This toolkit's earlier names of the linear-region flags (search_lib.search.search_config.EARLIER_FIELDS).
EARLIER = [Spelling((f"--{old}",), ALIAS, "(this toolkit's earlier name)", f"--{new}", example=("2",),
                    expect={new: 2}) for old, new in EARLIER_FIELDS.items()]

_SEARCH_OWN = [
    *_same("the search setting of that name", data_path=("/d", "/d"),
           dataset=("MetaTieredImageNet", "MetaTieredImageNet"), search_space_name=("darts", "darts"),
           max_nodes=("4", 4), batch_size=("2", 2), precision=("2", 2), prune_number=("2", 2), repeat=("2", 2),
           transform=("A", "A"), n_ways=("3", 3), n_shots=("2", 2), n_queries=("2", 2), ntk_type=("NTK", "NTK"),
           ntk_channels=("16", 16), ntk_layers=("8", 8), ntk_stemm=("2", 2), ntk_fsr=("1", 1),
           only_lrs=("true", True), algorithm=("ANIL", "ANIL"), inner_lr_time=("1.0", 1.0), reg_coef=("0.01", 0.01),
           bn_mode=("eval", "eval"), params_types=("wb", "wb"), norm_type=("groupnorm", "groupnorm"),
           train_after_search=("false", False)),
    Spelling(("--save_dir",), SAME, "where the search's outputs went", "--save_dir",
             differs="used as given (the original added `repeat…/<timestamp>/seed<N>` subfolders)",
             example=("runs/x",), expect={"save_dir": "runs/x"}),
    Spelling(("--rand_seed",), SAME, "seed; -1 (or none): random", "--rand_seed", value=_negative_draws,
             differs="any negative draws a seed, recorded in config.json and logged; re-running the same "
                     "--save_dir reuses it",
             example=("-5",), expect={"rand_seed": -1}),
    Spelling(("--ntk_N",), SAME, "cells per stage; -1: (ntk_layers - 2) / 3", "--ntk_N", value=_negative_unset,
             differs="a value that disagrees with --ntk_layers is an error (the original printed a note)",
             example=("-1",), expect={"ntk_N": None}),
    Spelling(("--init",), SAME, "weight initialisation (default kaiming_uniform; the launcher passed kaiming_normal; "
             "kaiming_norm re-initialised)", "--init",
             value=_mapped({"kaiming_uniform": "kaiming_normal", "kaiming_norm": "kaiming_normal"}),
             here="`--init kaiming_normal`",
             differs="only kaiming_norm matched the original's init function (Kaiming-normal, fan_out for the "
                     "kernel network, fan_in for the linear-region network, every repeat); the other two never "
                     "re-initialised; here all three do what kaiming_norm did",
             example=("kaiming_norm",), expect={"init": "kaiming_normal"}),
    _no_effect("super_type", "supernet type (nasnet-super)", "nasnet-super", "one supernet type here"),
    _no_effect("arch_nas_dataset", "NAS-Bench-201 file (not used for DARTS spaces)", "/x.pth",
               "no NAS-Bench-201 space here"),
    _no_effect("track_running_stats", "BatchNorm running statistics (0/1)", "1",
               "the kernel networks replace BatchNorm (--norm_type)", value=_only("0", "1", why="use 0 or 1")),
    _no_effect("workers", "data-loader workers", "0", "the search samples its batches in-process"),
    _no_effect("timestamp", "name of the run subfolder", "none", "--save_dir is used as given"),
    _no_effect("data_aug", "data augmentation on", "True", "--transform sets the search transform"),
    _no_effect("n_test_runs", "length of the search's episode loader", "1000",
               "the search draws its meta-batches directly"),
    _no_effect("n_aug_support_samples", "support copies in the search's episodes", "1",
               "the search's tasks have no augmented copies"),
    _no_effect("train_method", "training after the search (rfs only)", "rfs", "the training is RFS-style",
               value=_only("rfs", why="the original knew only rfs")),
]

_LAUNCH_OWN = [
    Spelling(("--gpu",), ALIAS, "GPU N (CUDA_VISIBLE_DEVICES)", "--device", value=_gpu, here="`--device cuda:N`",
             differs="default auto (CUDA if present, else the CPU); without CUDA an error, except with "
                     "--print_only; the last of --gpu / --device wins",
             example=("1",), expect={"device": "cuda:1"}),
    Spelling(("--space",), ALIAS, "search space", "--search_space_name", example=("darts",),
             expect={"search_space_name": "darts"}),
    Spelling(("--dataset",), SAME, "MiniImageNet / TieredImageNet (NTK), Meta* (MetaNTK)", "--dataset",
             differs="required here; mini / tiered take the name --ntk_type needs",
             example=("MetaTieredImageNet",), expect={"dataset": "MetaTieredImageNet", "reg_coef": 1e-3}),
    Spelling(("--seed",), ALIAS, "seed; -1: random", "--rand_seed", value=_negative_draws,
             differs="a drawn seed names the default run folder (`runs/search/<dataset>-<cells>cell-seed<seed>`), "
                     "so two -1 runs are two runs; a fixed seed resumes its folder",
             example=("7",), expect={"rand_seed": 7}),
    Spelling(("--dartsbs",), ALIAS, "tasks per meta-batch (images for NTK)", "--batch_size", example=("2",),
             expect={"batch_size": 2}),
    Spelling(("--ntk_layers",), SAME, "cells of the searched (and trained) network; with --train_after_search true "
             "the paper's training of them", "--ntk_layers",
             differs="5 or 8, as there: the search keeps the launcher's own settings (MAML, τ 1000, λ 1e-3) unless "
                     "given, and the paper's preset sets the training after it; this project's `--cells 5|8` takes "
                     "the paper's whole preset (they must agree)",
             example=("8",), expect={"ntk_layers": 8, "algorithm": "MAML", "inner_lr_time": 1000.0,
                                     "reg_coef": 1e-3, "train.layers": 8, "train.batch_size": 40}),
    *_same("the search setting of that name", max_nodes=("4", 4), ntk_type=("MetaNTK_anl", "MetaNTK_anl"),
           ntk_channels=("16", 16), only_lrs=("true", True), algorithm=("ANIL", "ANIL"), inner_lr_time=("1.0", 1.0),
           reg_coef=("0.01", 0.01), train_after_search=("true", True)),
]


SPELLINGS: dict[str, list[Spelling]] = {
    SEARCH: [*_SEARCH_OWN, *AUG, *EARLIER],
    # the launcher forwards every flag of prune_metantknas.py, so it takes the search's spellings too
    LAUNCH: [*_LAUNCH_OWN, *[s for s in _SEARCH_OWN + AUG + EARLIER if s.flag not in
                             {t.flag for t in _LAUNCH_OWN} | {"--data_path", "--save_dir"}]],
    EVAL: [
        *_same("the training setting of that name", batch_size=("32", 32), epochs=("3", 3),
               lr_decay_epochs=("30,40", [30, 40]), lr_decay_rate=("0.5", 0.5), weight_decay=("0.001", 0.001),
               momentum=("0.8", 0.8), layers=("8", 8), init_channels=("16", 16),
               genotype=("mini-5cell-2", "mini-5cell-2"), num_workers=("2", 2), use_trainval=("true", True)),
        Spelling(("--learning_rate",), SAME, "learning rate (default 0.05)", "--learning_rate",
                 differs="default 0.02, the paper's", example=("0.1",), expect={"learning_rate": 0.1}),
        Spelling(("--dataset",), SAME, "miniImageNet, tieredImageNet, CIFAR-FS or FC100", "--dataset",
                 differs="names are case-insensitive; the Meta* names are accepted",
                 example=("CIFAR-FS",), expect={"dataset": "CIFAR-FS"}),
        Spelling(("--transform",), SAME, "A, B, C or D (D forced for CIFAR-FS / FC100)", "--transform",
                 differs="D is the default for CIFAR-FS / FC100; another --transform is honoured",
                 example=("B",), expect={"transform": "B"}),
        *_same("test settings (the final test ignored them: 5-way, 1- and 5-shot, 50 queries, 1000 episodes)",
               differs="here they set the test (defaults: 5-way, 1,5-shot, 50 queries, 1000 episodes, 5 copies)",
               n_ways=("4", 4), n_shots=("1", [1]), n_queries=("10", 10), n_test_runs=("20", 20),
               n_aug_support_samples=("2", 2)),
        Spelling(("--seed",), SAME, "seed; -1 (default): random", "--seed", value=_negative_draws,
                 differs="default 0; a negative seed is drawn and recorded in config.json, and a run folder "
                         "that drew its seed resumes with it",
                 example=("-1",), expect={"seed": -1}),
        Spelling(("--scheduler",), SAME, "default (steps at --lr_decay_epochs), cosine, steplr (x0.97 per epoch), "
                 "reducelronplateau", "--scheduler",
                 value=_mapped({"default": "step", "steplr": "exp"}, refused={
                     "reducelronplateau": "reducelronplateau is not offered: the original stepped it on an "
                                          "undefined variable and crashed after the first epoch; use step, cosine "
                                          "or exp"}),
                 here="`step`, `cosine`, `exp` (`--exp_gamma 0.97`)", differs="reducelronplateau is refused",
                 example=("steplr",), expect={"scheduler": "exp"}),
        Spelling(("--resume",), SAME, "a checkpoint to continue training from ('' (default): none)", "--resume",
                 value=_bool_or_path, apply=_resume,
                 here="`--resume PATH`: continue that run folder (PATH: it or its checkpoint.pt); `''`: no resume",
                 differs="--resume true|false (continue the run found in --save_dir, default true) works too; "
                         "the original's ckpt files are for --eval_only --checkpoint",
                 example=("",), expect={"resume": False}),
        Spelling(("--model_path",), ALIAS, "where the checkpoints went", "--save_dir", here="`--save_dir`",
                 differs="the run folder: checkpoint.pt, results.json, train.log, ...", example=("runs/m",),
                 expect={"save_dir": "runs/m"}),
        Spelling(("--aug_dp",), ALIAS, "maximum drop-path probability", "--drop_path_prob", example=("0.1",),
                 expect={"drop_path_prob": 0.1}),
        Spelling(("--aug_stemm",), ALIAS, "stem multiplier", "--stem_multiplier", example=("2",),
                 expect={"stem_multiplier": 2}),
        Spelling(("--aug_fsr",), ALIAS, "channel factor at reductions", "--fsr", example=("1",), expect={"fsr": 1}),
        Spelling(("--adam",), ALIAS, "Adam instead of SGD", "--optimizer", const="adam", takes_value=False,
                 here="`--optimizer adam`", expect={"optimizer": "adam"}),
        Spelling(("--radam",), ALIAS, "RAdam instead of SGD", "--optimizer", const="radam", takes_value=False,
                 here="`--optimizer radam`", expect={"optimizer": "radam"}),
        Spelling(("--gpu",), ALIAS, "(the launcher's; the original's training had none)", "--device", value=_gpu,
                 here="`--device cuda:N`", example=("0",), expect={"device": "cuda:0"}),
        Spelling(("--data_root",), RECORDED, "data in ROOT/<dataset>", apply=_data_root,
                 here="`--data_path ROOT/<dataset>`", differs="folders miniImageNet, tieredImageNet, CIFAR-FS, FC100",
                 example=("/r",), expect={"data_path": os.path.join("/r", "miniImageNet")}),
        Spelling(("--tb_path",), RECORDED, "TensorBoard / log folder", apply=_tb_path,
                 here="`--tensorboard --tensorboard_dir DIR`",
                 differs="without the tensorboard package a note instead; the log is train.log in the run folder",
                 example=("/tmp/tb",), expect={RECORDED_DEST: {"--tb_path": "/tmp/tb"}}),
        Spelling(("--model",), RECORDED, "network: resnet12 (default), ..., augmentcnn for a genotype",
                 value=_only("augmentcnn", why="only augmentcnn (a searched genotype, --genotype) is trained here"),
                 here="`augmentcnn` only (the network of every genotype)",
                 example=("augmentcnn",), expect={RECORDED_DEST: {"--model": "augmentcnn"}}),
        *[_no_effect(n, m, v, why) for n, m, v, why in (
            ("eval_freq", "meta-evaluation every N epochs (unused)", "10", "the test runs once, after training"),
            ("print_freq", "log every N steps", "100", "one log line per epoch"),
            ("tb_freq", "TensorBoard every N steps (unused)", "500", "per-epoch TensorBoard scalars"),
            ("save_freq", "checkpoint every N epochs (unused)", "5", "a checkpoint after every epoch"),
            ("start_epoch", "first epoch", "1", "a resumed run continues at its checkpoint's epoch"),
            ("test_batch_size", "episodes per test batch", "1", "--episode_batch sets it"))],
        _no_effect("trial", "experiment id", "1", "the run folder names the run", short="-t"),
    ],
}


# --------------------------------------------------------------------------------------------------
# parsers

def add_spellings(parser: argparse.ArgumentParser, command: str) -> None:
    """Accept the original's spellings of ``command`` (prune_launch.py, ...) in its parser (`cli.add_spellings`)."""
    cli_add_spellings(parser, SPELLINGS[command])


def apply_spellings(ns: argparse.Namespace, command: str, notes: bool = True) -> argparse.Namespace:
    """Complete the parsed flags of ``command`` (`cli.apply_spellings`): --data_root, --tb_path, --resume PATH,
    and one note per flag without effect (``notes=False``: silent, for a command that forwards them)."""
    return cli_apply_spellings(ns, SPELLINGS[command], notes)


def add_earlier_names(parser: argparse.ArgumentParser) -> None:
    """Only this toolkit's earlier flag names (for command lines that take some of the search's flags)."""
    cli_add_spellings(parser, EARLIER, epilog=False, missing_ok=True)


# --------------------------------------------------------------------------------------------------
# the README table

_COMMANDS = (LAUNCH, SEARCH, EVAL)


def _code(flags) -> str:
    return ", ".join(f"`{f}`" for f in flags)


def _row(*cells: str) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def readme_table() -> str:
    """The markdown table of the README's "Coming from the original code" section."""
    rows = ["| command | original flag | meaning there | here | differences |", "|---|---|---|---|---|"]
    for command in _COMMANDS:
        own = SPELLINGS[command] if command != LAUNCH else _LAUNCH_OWN
        plain = [s for s in own if s.kind == SAME and not s.differs and s.value is None]
        if plain:
            rows.append(_row(command, _code(s.flag for s in plain), "as here", "same", ""))
        groups: dict[tuple, list[Spelling]] = {}
        for s in own:
            if s not in plain and s.kind != NO_EFFECT:  # same rows of one meaning share a line
                groups.setdefault((s.kind, s.differs, s.meaning) if s.kind == SAME else (id(s),), []).append(s)
        for members in groups.values():
            s = members[0]
            here = s.here or (f"`{s.target}`" if s.kind == ALIAS else "same")
            rows.append(_row(command, _code(m.flag for m in members), s.meaning, here, s.differs))
        no_effect = [s for s in own if s.kind == NO_EFFECT]
        if no_effect:
            rows.append(_row(command, _code("/".join(s.flags) for s in no_effect),
                             "; ".join(s.meaning for s in no_effect), "accepted, one note each", "no effect here"))
        if command == LAUNCH:
            rows.append(_row(command, f"every {SEARCH} flag below", "", "forwarded", ""))
    return "\n".join(rows) + "\n"


README_BEGIN = "<!-- original-flags table: python -m eval_lib.commands.original_flags -->"
README_END = "<!-- end of the original-flags table -->"


def main(argv=None) -> int:
    """Print the README table (between its markers)."""
    sys.stdout.write(f"{README_BEGIN}\n{readme_table()}{README_END}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
