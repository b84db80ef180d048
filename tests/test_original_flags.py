"""The paper repository's command lines (eval_lib.commands.original_flags): its scripts' argument lists, every
original spelling of the three command lines (cases taken from the table), the flags whose names collide
with ours, no prefix matching anywhere, one default per flag in every --help, and the README's table."""

from __future__ import annotations

import importlib
import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import ORIGINAL_SCRIPT_ARGS, script_argv

import eval_searched_arch
import prune_launch
import prune_metantknas
from eval_lib.commands import original_flags as O
from eval_lib.commands import search_command as search_cli
from search_lib.core.command_line import ALIAS, NO_EFFECT, SAME, make_parser

REPO = Path(__file__).resolve().parents[1]
ORIGINAL_ARGS = {name: " ".join(args) for name, args in ORIGINAL_SCRIPT_ARGS.items()}

# The paper's search (algorithm, tau, lambda) and training (epochs, lr, decay epochs, drop-path, batch) per script.
PAPER = {
    "script_mini_5cell.sh": (("MAML", 1000.0, 1e-3), (100, 0.02, [60, 80], 0.2, 64)),
    "script_mini_8cell.sh": (("ANIL", 1.0, 1e-5), (100, 0.02, [60, 80], 0.2, 40)),
    "script_tiered_5cell.sh": (("MAML", 1000.0, 1e-3), (60, 0.01, [30, 40, 50], 0.1, 64)),
    "script_tiered_8cell.sh": (("ANIL", 1000.0, 1e-3), (60, 0.01, [30, 40, 50], 0.1, 56)),
}


def _launched_command(capsys) -> list[str]:
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("prune_metantknas.py ")
    return shlex.split(line)[1:]


# ---- the scripts ----

@pytest.mark.parametrize("name", sorted(ORIGINAL_ARGS))
def test_each_script_runs_the_original_argument_list(name, tmp_path, monkeypatch, capsys):
    args, cwd = script_argv(name, tmp_path, "--print_only")
    assert args == ORIGINAL_ARGS[name].split() + ["--print_only"]  # verbatim, extra arguments appended
    assert Path(cwd).resolve() == REPO  # runs from any folder
    monkeypatch.setenv("METANTKNAS_MINI_DATA", "/data/mini")
    monkeypatch.setenv("METANTKNAS_TIERED_DATA", "/data/tiered")
    assert prune_launch.main(args) == 0  # also without CUDA: --print_only
    cmd = _launched_command(capsys)
    search = prune_metantknas.build_parser().parse_args(cmd)
    (alg, tau, lam), (epochs, lr, decay, dp, batch) = PAPER[name]
    cells = int(name.split("_")[2][0])
    assert (search.algorithm, search.inner_lr_time, search.reg_coef, search.ntk_layers) == (alg, tau, lam, cells)
    assert (search.batch_size, search.ntk_channels, search.search_space_name, search.max_nodes) == (3, 48,
                                                                                                     "darts_fewshot", 3)
    assert search.dataset == ORIGINAL_ARGS[name].split()[7] and search.train_after_search is True
    assert search.device == "cuda:0" and search.only_lrs is False
    assert (search.aug_epochs, search.aug_learning_rate, search.aug_lr_decay_epochs, search.aug_drop_path_prob,
            search.aug_batch_size) == (epochs, lr, decay, dp, batch)
    assert (search.aug_init_channels, search.aug_layers, search.aug_n_shots) == (48, cells, [1, 5])
    assert search.rand_seed >= 0
    assert search.save_dir == f"runs/search/{search.dataset}-{cells}cell-seed{search.rand_seed}"


def test_drawn_seeds_make_two_runs_and_a_fixed_seed_resumes_its_folder(monkeypatch, capsys):
    monkeypatch.setenv("METANTKNAS_MINI_DATA", "/data/mini")
    folders = []
    for seed in ("-1", "-1", "3", "3"):
        assert prune_launch.main(["--dataset", "mini", "--cells", "5", "--seed", seed, "--print_only"]) == 0
        folders.append(prune_metantknas.build_parser().parse_args(_launched_command(capsys)).save_dir)
    assert folders[0] != folders[1]
    assert folders[2] == folders[3] == "runs/search/MetaMiniImageNet-5cell-seed3"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_the_scripts_gpu_without_cuda_is_a_one_line_error(synthetic_mini, tmp_path, capsys):
    args = ORIGINAL_ARGS["script_mini_5cell.sh"].split()
    assert prune_launch.main([*args, "--data_path", str(synthetic_mini), "--save_dir", str(tmp_path / "r")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "CUDA is not available" in err[0] and "--device cuda:0" in err[0]
    assert not (tmp_path / "r").exists()


def test_the_old_script_names_are_gone():
    assert sorted(p.name for p in (REPO / "scripts").glob("script_*.sh")) == sorted(ORIGINAL_ARGS)
    assert not list((REPO / "scripts").glob("search_*.sh"))
    for path in [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "search_lib").glob("*.py")]:
        assert "scripts/search_" not in path.read_text(), path


# ---- every spelling of the table ----

def _value(cfg, key: str):
    if key.startswith("train."):
        return cfg.train[key[len("train."):]]
    return getattr(cfg, key)


def _search_config(argv):
    return search_cli.config_from_args(prune_metantknas.build_parser().parse_args(argv))


def _launch_config(argv, capsys):
    base = ["--dataset", "mini", "--ntk_layers", "5", "--data_path", "/d", "--save_dir", "/x", "--print_only"]
    assert prune_launch.main(base + argv) == 0, capsys.readouterr().err
    return _search_config(_launched_command(capsys))


def _eval_config(argv):
    return eval_searched_arch.config_from_args(eval_searched_arch.build_parser().parse_args(argv))


def _cases(command):
    return [pytest.param(s, id=s.flag) for s in O.SPELLINGS[command] if s.expect]


@pytest.mark.parametrize("spelling", _cases(O.SEARCH))
def test_search_spellings(spelling, capsys):
    cfg = _search_config([spelling.flag, *spelling.example])
    for key, value in spelling.expect.items():
        assert _value(cfg, key) == value, key
    if spelling.kind == NO_EFFECT:
        assert f"{spelling.flag} {spelling.example[0]}: no effect here" in capsys.readouterr().err


@pytest.mark.parametrize("spelling", _cases(O.LAUNCH))
def test_launcher_spellings(spelling, capsys):
    cfg = _launch_config([spelling.flag, *spelling.example], capsys)
    for key, value in spelling.expect.items():
        assert _value(cfg, key) == value, key


@pytest.mark.parametrize("spelling", _cases(O.EVAL))
def test_eval_spellings(spelling, capsys):
    for flag in spelling.flags:  # -t and --trial alike
        cfg = _eval_config([flag, *spelling.example])
        for key, value in spelling.expect.items():
            assert _value(cfg, key) == value, key
        if spelling.kind == NO_EFFECT:
            assert f"{spelling.flag} {spelling.example[0]}: no effect here" in capsys.readouterr().err


def test_the_table_names_flags_of_each_command_line():
    parsers = {O.SEARCH: prune_metantknas.build_parser(), O.EVAL: eval_searched_arch.build_parser(),
               O.LAUNCH: prune_launch.build_parser()}
    for command, parser in parsers.items():
        options = {o for a in parser._actions for o in a.option_strings}
        flags = [f for s in O.SPELLINGS[command] for f in s.flags]
        assert len(flags) == len(set(flags)), command  # no spelling twice
        assert set(flags) <= options
        for s in O.SPELLINGS[command]:
            assert s.kind in (SAME, ALIAS, O.RECORDED, NO_EFFECT)
            if s.kind in (SAME, ALIAS):
                assert s.target in options
            assert s.expect or s.flag == "--resume", s.flag  # every row is tested (--resume below)


# ---- names that collide with ours ----

def test_gpu_is_not_gpu_augment_and_the_last_device_flag_wins():
    assert _eval_config(["--gpu", "1"]).device == "cuda:1" and _eval_config(["--gpu", "1"]).gpu_augment is None
    assert _eval_config(["--gpu_augment", "false"]).gpu_augment is False
    assert _eval_config(["--gpu", "2", "--device", "cpu"]).device == "cpu"
    assert _eval_config(["--device", "cpu", "--gpu", "2"]).device == "cuda:2"
    with pytest.raises(SystemExit):
        eval_searched_arch.build_parser().parse_args(["--gpu", "x"])


def test_aug_lr_and_aug_channels_are_not_prefixes():
    cfg = _search_config(["--aug_lr", "0.1", "--aug_lr_decay_epochs", "30", "--aug_channels", "8",
                          "--aug_channels_last", "--aug_batchsize", "12", "--aug_lr_decay_rate", "0.5"])
    assert (cfg.train["learning_rate"], cfg.train["lr_decay_epochs"], cfg.train["lr_decay_rate"]) == (0.1, [30], 0.5)
    assert (cfg.train["init_channels"], cfg.train["channels_last"], cfg.train["batch_size"]) == (8, True, 12)
    assert _search_config(["--aug_learning_rate", "0.3", "--aug_lr", "0.2"]).train["learning_rate"] == 0.2


def test_resume_takes_true_false_or_the_originals_checkpoint_path(tmp_path, capsys):
    assert _eval_config([]).resume is True
    assert _eval_config(["--resume", "false"]).resume is False and _eval_config(["--no-resume"]).resume is False
    assert _eval_config(["--resume"]).resume is True
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    for path in (run, run / "checkpoint.pt"):
        cfg = _eval_config(["--resume", str(path)])
        assert (cfg.resume, cfg.save_dir) == (True, str(run))
    assert _eval_config(["--resume", str(run), "--model_path", str(run)]).save_dir == str(run)
    (tmp_path / "ckpt_last.pth").write_bytes(b"")
    for argv, code, words in ((["--resume", str(tmp_path / "ckpt_last.pth")], 2, "--eval_only --checkpoint"),
                              (["--resume", str(tmp_path / "nope")], 3, "no such checkpoint"),
                              (["--resume", str(run), "--save_dir", str(tmp_path / "other")], 2, "drop one")):
        assert eval_searched_arch.main(argv + ["--genotype", "mini-5cell-1", "--dataset", "Digits"]) == code
        assert words in capsys.readouterr().err


def test_scheduler_and_init_take_the_originals_values(capsys):
    assert [_eval_config(["--scheduler", s]).scheduler for s in ("default", "cosine", "steplr", "step", "exp")] == \
        ["step", "cosine", "exp", "step", "exp"]
    assert eval_searched_arch.main(["--scheduler", "reducelronplateau"]) == 2
    assert "crashed after the first epoch" in capsys.readouterr().err
    inits = ("kaiming_uniform", "kaiming_normal", "kaiming_norm")  # kaiming_norm: the one that re-initialised there
    assert [_search_config(["--init", i]).init for i in inits] == ["kaiming_normal"] * 3
    assert eval_searched_arch.main(["--model", "resnet12"]) == 2
    assert "only augmentcnn" in capsys.readouterr().err


def test_data_root_and_tb_path(monkeypatch, capsys):
    for ds, folder in (("tieredImageNet", "tieredImageNet"), ("CIFAR-FS", "CIFAR-FS"), ("FC100", "FC100"),
                       ("miniImageNet", "miniImageNet")):
        assert _eval_config(["--dataset", ds, "--data_root", "/r"]).data_path == os.path.join("/r", folder)
    with pytest.raises(Exception, match="not both"):
        _eval_config(["--data_root", "/r", "--data_path", "/p"])
    monkeypatch.setattr(O.importlib.util, "find_spec", lambda name: None)
    cfg = _eval_config(["--tb_path", "/tmp/tb"])
    assert cfg.tensorboard is False and "tensorboard package is not installed" in capsys.readouterr().err
    monkeypatch.setattr(O.importlib.util, "find_spec", lambda name: object())
    cfg = _eval_config(["--tb_path", "/tmp/tb"])
    assert (cfg.tensorboard, cfg.tensorboard_dir) == (True, "/tmp/tb")


def test_launcher_cells_from_ntk_layers(monkeypatch, capsys):
    monkeypatch.setenv("METANTKNAS_MINI_DATA", "/d")
    for argv, words in ((["--cells", "5", "--ntk_layers", "8"], "disagree"), ([], "--cells 5|8"),
                        (["--ntk_layers", "11"], "no paper preset"),
                        (["--dataset", "MiniImageNet", "--cells", "5"], "episodic")):
        assert prune_launch.main(["--dataset", "mini", *argv, "--print_only"]) == 2
        assert words in capsys.readouterr().err
    cfg = _launch_config(["--dataset", "MiniImageNet", "--ntk_type", "NTK", "--dartsbs", "30"], capsys)
    assert (cfg.dataset, cfg.ntk_type, cfg.batch_size) == ("MiniImageNet", "NTK", 30)
    assert prune_launch.main(["--dataset", "mini", "--cells", "8", "--algorithm", "MAML", "--aug_lr", "0.1",
                              "--ntk_channels", "48", "--print_only"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "over the preset" in line]
    assert len(notes) == 1 and "--algorithm MAML (preset: ANIL)" in notes[0] and "ntk_channels" not in notes[0]


def _launched(argv, capsys):
    """The search config of a launcher command line (printed, parsed back)."""
    assert prune_launch.main([*argv, "--data_path", "/d", "--save_dir", "/x", "--print_only"]) == 0, \
        capsys.readouterr().err
    return _search_config(_launched_command(capsys))


@pytest.mark.parametrize("dataset", ["MetaMiniImageNet", "MetaTieredImageNet", "mini"])
def test_the_originals_ntk_layers_keeps_its_launchers_search_and_trains_with_the_preset(dataset, capsys):
    """The original launcher searched with its own defaults whatever --ntk_layers said (MAML, tau 1000, lambda 1e-3)
    and took the paper's preset for the training after the search only; this project's --cells takes the paper's
    whole preset."""
    bare = _launched(["--dataset", dataset, "--ntk_layers", "8"], capsys)
    assert (bare.algorithm, bare.inner_lr_time, bare.reg_coef, bare.ntk_layers) == ("MAML", 1000.0, 1e-3, 8)
    trained = _launched(["--dataset", dataset, "--ntk_layers", "8", "--train_after_search", "true"], capsys)
    assert (trained.algorithm, trained.inner_lr_time, trained.reg_coef) == ("MAML", 1000.0, 1e-3)
    tiered = "tiered" in dataset.lower()
    assert trained.train_after_search and trained.train["layers"] == 8 and trained.train["init_channels"] == 48
    assert (trained.train["batch_size"], trained.train["epochs"]) == ((56, 60) if tiered else (40, 100))
    preset = _launched(["--dataset", dataset, "--cells", "8"], capsys)
    assert (preset.algorithm, preset.inner_lr_time, preset.reg_coef) == \
        (("ANIL", 1000.0, 1e-3) if tiered else ("ANIL", 1.0, 1e-5))
    given = _launched(["--dataset", dataset, "--ntk_layers", "8", "--algorithm", "ANIL"], capsys)
    assert given.algorithm == "ANIL" and given.inner_lr_time == 1000.0  # the user's value wins


def test_empty_paths_are_usage_errors_and_resume_empty_is_no_resume(tmp_path, monkeypatch, capsys):
    """The original's default --resume '' (or a script's empty variable) means no resume; an empty --save_dir,
    --data_path or --checkpoint is refused, never taken for the current folder."""
    monkeypatch.chdir(tmp_path)
    cfg = _eval_config(["--genotype", "mini-5cell-2", "--resume", ""])
    assert cfg.resume is False and cfg.save_dir is None
    assert _eval_config(["--resume", " "]).resume is False
    cases = [(eval_searched_arch, ["--genotype", "mini-5cell-2", "--dataset", "Digits", "--save_dir", ""],
              "--save_dir"),
             (eval_searched_arch, ["--genotype", "mini-5cell-2", "--dataset", "Digits", "--model_path", ""],
              "--save_dir"),
             (eval_searched_arch, ["--genotype", "mini-5cell-2", "--data_path", ""], "--data_path"),
             (eval_searched_arch, ["--eval_only", "--checkpoint", ""], "--checkpoint"),
             (prune_metantknas, ["--save_dir", ""], "--save_dir"),
             (prune_metantknas, ["--data_path", "", "--save_dir", "s"], "--data_path"),
             (prune_launch, ["--dataset", "mini", "--cells", "5", "--data_path", "/d", "--save_dir", ""], "--save_dir"),
             (prune_launch, ["--dataset", "mini", "--cells", "5", "--data_path", ""], "--data_path")]
    for module, argv, flag in cases:
        assert module.main(argv) == 2, argv
        line = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")][-1]
        assert f"{flag} is empty" in line and "for the current folder: ." in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written into the working folder


def test_print_only_checks_the_whole_command(monkeypatch, capsys):
    monkeypatch.setenv("METANTKNAS_MINI_DATA", "/d")
    for bad, words in ((["--ntk_N", "3"], "--ntk_N 3"), (["--aug_scheduler", "poly"], "invalid choice"),
                       (["--train_after_search", "--aug_batchsize", "0"], "--batch_size"),
                       (["--workers"], "expected one argument")):
        assert prune_launch.main(["--dataset", "mini", "--cells", "5", "--print_only", *bad]) == 2
        assert words in capsys.readouterr().err


# ---- every parser: no prefix matching, one default per flag ----

ENTRY_POINTS = {
    "prune_metantknas.py": prune_metantknas.build_parser, "prune_launch.py": prune_launch.build_parser,
    "eval_searched_arch.py": eval_searched_arch.build_parser,
    **{m: (lambda m=m: importlib.import_module(m).build_parser()) for m in (
        "eval_lib.commands.sweep", "eval_lib.commands.study_command", "search_lib.data.synthetic",
        "eval_lib.commands.draw_pictures",
        "benchmarks.bench_search", "benchmarks.bench_train")},
}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_no_parser_accepts_an_abbreviation(name):
    parser = ENTRY_POINTS[name]()
    assert parser.allow_abbrev is False
    options = {o for a in parser._actions for o in a.option_strings}
    base = _required_arguments(parser)
    tried = 0
    for option in sorted(o for o in options if o.startswith("--") and len(o) > 4):
        prefix = option[:-1]
        if prefix in options:
            continue
        _, unknown = parser.parse_known_args(base + [prefix])
        assert prefix in unknown, f"{name} took {prefix} for a flag"
        tried += 1
    assert tried >= 1


def _required_arguments(parser) -> list[str]:
    """Stand-in values for what a parser requires (positionals, required flags and groups): the parse gets as far
    as the flag under test."""
    out = []
    for a in parser._actions:
        if not a.option_strings and a.nargs != "*" and a.nargs != "?":
            out += ["x"] * (a.nargs if isinstance(a.nargs, int) else 1)
        elif a.required:
            out += [a.option_strings[0], "1"]
    for group in parser._mutually_exclusive_groups:
        if group.required:
            out += [group._group_actions[0].option_strings[0], "1"]
    return out


def _in_required_group(parser, action) -> bool:
    return any(g.required and action in g._group_actions for g in parser._mutually_exclusive_groups)


def _help_lines(parser) -> dict[str, str]:
    formatter = parser._get_formatter()
    return {"/".join(a.option_strings): formatter._expand_help(a) for a in parser._actions
            if a.option_strings and a.help is not None and a.help != "==SUPPRESS==" and a.dest != "help"}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_help_shows_one_default_per_flag(name):
    parser = ENTRY_POINTS[name]()
    text = parser.format_help()
    assert "default: None" not in text and not re.search(r"\[\d+(, \d+)+\]", text)
    actions = {"/".join(a.option_strings): a for a in parser._actions}
    for flag, help_text in _help_lines(parser).items():
        count = len(re.findall(r"\bdefault\b", help_text, flags=re.I))
        action = actions[flag]
        if action.required or _in_required_group(parser, action):
            assert count == 0, (flag, help_text)
        elif action.nargs == 0:
            assert count <= 1, (flag, help_text)
        else:
            assert count == 1, (flag, help_text)


def test_the_launcher_help_lists_the_flags_it_forwards():
    text = prune_launch.build_parser().format_help()
    for flag in ("--ntk_channels", "--algorithm", "--regions_batch_size", "--aug_epochs", "--aug_n_shots",
                 "--device", "--rand_seed", "--aug_dp", "--gpu"):
        assert flag in text
    assert "--aug_lr_decay_epochs" in text and "60,80" not in text.split("--aug_lr_decay_epochs")[0][-10:]


def test_help_formatter_writes_values_as_typed():
    p = make_parser("x")
    p.add_argument("--a", default=[60, 80], help="list")
    p.add_argument("--b", default=None, help="unset: none")
    p.add_argument("--c", default=True, help="says its default: on")
    lines = _help_lines(p)
    assert lines["--a"] == "list (default: 60,80)" and lines["--b"] == "unset: none"
    assert lines["--c"] == "says its default: on"


# ---- the README's table ----

def test_the_readme_table_is_the_generated_one():
    text = (REPO / "README.md").read_text()
    start, end = text.index(O.README_BEGIN), text.index(O.README_END)
    assert text[start + len(O.README_BEGIN):end].strip() == O.readme_table().strip()
    assert len(text.splitlines()) <= 300
