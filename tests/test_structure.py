"""The project's structure: one run-folder owner, flags generated from the configs, one genotype.json
format, file permissions, scripts that import only libraries, no citation of documents outside the repo."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import os
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest

import eval_searched_arch
import prune_launch
import prune_metantknas
from eval_lib.commands import eval_command as eval_cli
from eval_lib.commands import search_command as search_cli
from eval_lib.train.checkpoints import training_run_dir
from eval_lib.train.train_config import TRAIN_AFTER_SEARCH_FLAGS, TrainConfig
from search_lib.core.command_line import field_default, flag_fields
from search_lib.core.errors import RunFailure, UsageError, one_line
from search_lib.core.run_dir import RunDir, SavedState
from search_lib.core.utils import atomic_torch_save, atomic_write_json, atomic_write_text
from search_lib.models.genotypes import PRESETS, GenotypeRecord, resolve_genotype_record
from search_lib.models.space import SearchSpace
from search_lib.search.search_config import SearchConfig
from search_lib.search.search_run import search_run_dir

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("prune_metantknas.py", "prune_launch.py", "eval_searched_arch.py")


# ---- atomic writes keep the permissions a plain open() gives ----

@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_respect_the_umask(umask, tmp_path):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "b.json", {"a": 1})
        atomic_torch_save(tmp_path / "c.pt", {"a": 1})
        with open(tmp_path / "plain.txt", "w") as fh:
            fh.write("x")
    finally:
        os.umask(old)
    expected = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert expected == 0o666 & ~umask
    for name in ("a.txt", "b.json", "c.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


# ---- the run folder ----

def _run_dir(path) -> RunDir:
    return RunDir(path, SavedState("s.json", "s.prev.json", "test state", restart="starting over"),
                  outputs=("out.jsonl",), log_name="run.log", logger=logging.getLogger("metantknas.test"))


def test_run_dir_rotates_and_falls_back_to_the_previous_copy(tmp_path, caplog):
    run = _run_dir(tmp_path / "r").create()
    read = lambda p: json.loads(p.read_text())  # noqa: E731
    assert run.load_state(read) is None
    for i in range(3):
        run.save_state(lambda p, i=i: atomic_write_json(p, {"i": i}))
    assert run.load_state(read) == {"i": 2}
    assert json.loads((run / "s.prev.json").read_text()) == {"i": 1}
    (run / "s.json").write_text("{truncated")
    with caplog.at_level(logging.WARNING, logger="metantknas.test"):
        assert run.load_state(read) == {"i": 1}
    assert "s.json is unreadable" in caplog.text and (run / "s.json.corrupt").exists()
    (run / "s.prev.json").write_text("")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metantknas.test"):
        assert run.load_state(read) is None
    assert "no readable test state" in caplog.text and "starting over" in caplog.text


def test_run_dir_config_done_and_clear(tmp_path):
    run = _run_dir(tmp_path / "r").create()
    assert run.read_config() is None
    run.write_config({"a": 1, "b": 2})
    assert run.read_config() == {"a": 1, "b": 2}
    run.check_config({"a": 1, "b": 2}, {"a": 1, "b": 2})
    with pytest.raises(UsageError, match=r"other settings.*a: 1 -> 3.*--overwrite"):
        run.check_config({"a": 1, "b": 2}, {"a": 3, "b": 2})
    run.check_config({"a": 1, "b": 2}, {"a": 3, "b": 2}, keys=["b"])  # only the keys that matter
    assert not run.is_done()
    run.mark_done()
    assert run.is_done()
    for name in ("s.json", "s.prev.json", "s.json.corrupt", "out.jsonl", "run.log", "keep.txt"):
        (run / name).write_text("x")
    run.clear()
    assert sorted(p.name for p in run.path.iterdir()) == ["keep.txt"]
    board = training_run_dir(tmp_path / "t").create()  # an output folder (--tensorboard's) goes too
    (board / "tensorboard").mkdir()
    (board / "tensorboard" / "events.out").write_text("x")
    board.clear()
    assert not (board / "tensorboard").exists()
    (run / "config.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="unreadable.*--overwrite"):
        run.read_config()
    with pytest.raises(RunFailure, match="cannot create --save_dir"):
        _run_dir(run / "keep.txt" / "sub").create(verb="create")


def test_search_and_training_use_the_same_run_folder_owner(tmp_path):
    search, train = search_run_dir(tmp_path / "s"), training_run_dir(tmp_path / "t")
    assert type(search) is type(train) is RunDir
    assert (search.state.name, search.state.prev) == ("state.json", "state.prev.json")
    assert (train.state.name, train.state.prev) == ("checkpoint.pt", "checkpoint_prev.pt")


# ---- one source for every command line ----

def test_eval_flags_are_the_train_config_fields():
    parser = eval_searched_arch.build_parser()
    defaults = vars(parser.parse_args([]))
    fields = {f.name: f for f in flag_fields(TrainConfig)}
    assert set(defaults) == set(fields)
    for name, f in fields.items():
        assert defaults[name] == field_default(f), name
    assert TrainConfig.from_dict(defaults) == TrainConfig()  # same defaults in the library and the CLI
    assert defaults["num_workers"] is None and TrainConfig().num_workers is None


def test_search_flags_are_the_search_config_fields_plus_aug_flags():
    parser = prune_metantknas.build_parser()
    values = vars(parser.parse_args([]))
    search = {f.name: f for f in flag_fields(SearchConfig)}
    aug = {k for k in values if k.startswith("aug_")}
    assert set(values) == set(search) | aug
    assert aug == {f"aug_{k}" for k in TRAIN_AFTER_SEARCH_FLAGS}
    for name, f in search.items():
        assert values[name] == field_default(f), name
    assert all(values[k] is None for k in aug)  # unset: the training's own defaults apply
    # an --aug_ flag parses like the eval flag of the same name
    argv = ["--aug_n_shots", "1,5", "--aug_lr_decay_epochs", "none", "--aug_eval_splits", "test",
            "--aug_scheduler", "cosine", "--aug_learning_rate", "0.1"]
    cfg = prune_metantknas.config_from_args(parser.parse_args(argv))
    ev = eval_searched_arch.build_parser().parse_args(
        ["--n_shots", "1,5", "--lr_decay_epochs", "none", "--eval_splits", "test", "--scheduler", "cosine",
         "--learning_rate", "0.1"])
    for k in ("n_shots", "lr_decay_epochs", "eval_splits", "scheduler", "learning_rate"):
        assert cfg.train[k] == getattr(ev, k)
    with pytest.raises(SystemExit):
        parser.parse_args(["--aug_scheduler", "poly"])


def test_launcher_flags_fill_the_training_preset():
    cfg, chosen = prune_launch.launch_config(prune_launch.build_parser().parse_args(
        ["--dataset", "mini", "--cells", "5", "--data_path", "/d", "--rand_seed", "2", "--gpu", "1"]))
    assert cfg.train["epochs"] == 100 and cfg.train["lr_decay_epochs"] == [60, 80] and cfg.train["n_shots"] == [1, 5]
    assert {"algorithm", "ntk_channels", "data_path", "save_dir"} <= chosen
    # the printed command line is rendered from the config and gives the same config back
    argv = search_cli.command_line(cfg, chosen)
    assert "--algorithm=MAML" in argv and "--save_dir=runs/search/MetaMiniImageNet-5cell-seed2" in argv
    assert search_cli.config_from_args(prune_metantknas.build_parser().parse_args(argv)) == cfg


def test_hand_off_passes_the_genotype_object(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cfg, genotype=None):
        seen["cfg"], seen["genotype"] = cfg, genotype
        return 0

    monkeypatch.setattr(eval_cli, "run", fake_run)
    geno = PRESETS["mini-8cell-2"]
    from search_lib.search.search_run import SearchResult

    result = SearchResult(geno, tmp_path, 5, 0, False, SearchSpace("darts_fewshot", 3))
    search_cfg = SearchConfig(dataset="MetaDigits", train={"epochs": 2, "batch_size": None})
    assert search_cli.train_after_search(result, search_cfg) == 0
    assert seen["genotype"] is geno
    cfg = seen["cfg"]
    assert (cfg.dataset, cfg.epochs, cfg.batch_size, cfg.arch_space.name, cfg.arch_space.max_nodes) == \
        ("Digits", 2, 64, "darts_fewshot", 3)
    assert cfg.save_dir == str(tmp_path / "train")


# ---- genotype.json: one format ----

def test_genotype_record_round_trip(tmp_path):
    geno = PRESETS["tiered-5cell-2"]
    record = GenotypeRecord(geno, SearchSpace("darts_fewshot", 3), 17)
    record.write(tmp_path / "genotype.json")
    text = (tmp_path / "genotype.json").read_text()
    data = json.loads(text)
    assert data == {"genotype": geno.to_dict(), "string": str(geno), "search_space": "darts_fewshot",
                    "max_nodes": 3, "rand_seed": 17}
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"
    assert GenotypeRecord.from_json(text) == record
    assert resolve_genotype_record(str(tmp_path / "genotype.json")) == record
    assert resolve_genotype_record(str(geno)) == GenotypeRecord(geno)
    assert GenotypeRecord.from_dict(geno.to_dict()) == GenotypeRecord(geno)


def test_search_space_is_resolved_once():
    space = SearchSpace.resolve("darts", 4)
    assert space.ops[0] == "none" and len(space.keys) == 14 and space.groups[-1] == (9, 14)
    assert SearchSpace.resolve(space) is space
    with pytest.raises(UsageError, match="max_nodes 5"):
        SearchSpace.resolve("darts", 5)
    with pytest.raises(UsageError, match="darts_fewshot"):
        SearchSpace.resolve("nope", 3)
    cfg = SearchConfig(search_space_name="darts", max_nodes=4, dataset="MetaMiniImageNet")
    assert cfg.space == space and cfg.data.key == "mini" and cfg.data.episodic
    assert "space" not in cfg.to_dict() and "data" not in cfg.to_dict()


def test_one_line():
    assert one_line(ValueError("a\n  b\tc")) == "a b c"
    assert one_line(RuntimeError("")) == "RuntimeError"
    assert one_line(RuntimeError("\x1b[1mbold\x1b[0m text")) == "bold text"
    assert one_line("x" * 50, limit=10) == "xxxxxxx..."


# ---- the layout ----

def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_scripts_import_only_libraries():
    scripts = {Path(s).stem for s in SCRIPTS}
    for name in SCRIPTS:
        assert not (_imports(ROOT / name) & scripts), name
    for pkg in ("search_lib", "eval_lib", "benchmarks"):
        for path in (ROOT / pkg).rglob("*.py"):
            assert not (_imports(path) & scripts), path


def test_no_module_is_over_about_400_lines():
    sizes = {p: len(p.read_text().splitlines()) for pkg in ("search_lib", "eval_lib")
             for p in (ROOT / pkg).rglob("*.py")}
    assert max(sizes.values()) <= 420, max(sizes, key=sizes.get)


MAX_FUNCTION_LINES = 80


def _function_sizes(path: Path) -> dict[str, int]:
    """``line:name`` -> lines from ``def`` to the last line (docstring included) of every function and method
    of a file that is not nested in another function (a nested function counts inside its parent)."""
    sizes = {}

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                sizes[f"{child.lineno}:{child.name}"] = child.end_lineno - child.lineno + 1
            else:  # classes (methods are functions), if/try blocks at module level, ...
                visit(child)

    visit(ast.parse(path.read_text()))
    return sizes


def test_no_function_is_over_80_lines():
    long = {f"{p.relative_to(ROOT)}:{name}": n for pkg in ("search_lib", "eval_lib") for p in (ROOT / pkg).rglob("*.py")
            for name, n in _function_sizes(p).items() if n > MAX_FUNCTION_LINES}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named helpers): {long}"


def test_the_function_size_check_counts_nested_functions_and_methods(tmp_path):
    (tmp_path / "m.py").write_text(textwrap.dedent('''\
        def f():
            """Doc."""
            def g():
                return 1

            return g


        class A:
            @staticmethod
            def h():
                x = 1
                return x


        if True:
            def k():
                pass
        '''))
    assert _function_sizes(tmp_path / "m.py") == {"1:f": 6, "11:h": 3, "17:k": 2}


def test_the_project_cites_only_its_own_documents():
    assert (ROOT / "docs" / "method.md").is_file()
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:  # not a git checkout: look at the tree
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts]
    needle = "REFERENCE" + ".md"
    for name in files:
        path = ROOT / name
        if path.suffix in (".py", ".md", ".sh", ".txt", "") and path.is_file():
            assert needle not in path.read_text(errors="ignore"), name


def test_config_dataclasses_are_plain_dicts():
    for cls in (SearchConfig, TrainConfig):
        d = cls().to_dict()
        # the training's search space is written as its name and node count (arch_space, arch_max_nodes)
        extra = {"arch_max_nodes"} if cls is TrainConfig else set()
        assert set(d) == {f.name for f in dataclasses.fields(cls)} | extra
        json.dumps(d)
        assert cls.from_dict(json.loads(json.dumps(d))) == cls()
    cfg = TrainConfig(arch_space=SearchSpace("darts", 4))
    assert cfg.to_dict()["arch_space"] == "darts" and cfg.to_dict()["arch_max_nodes"] == 4
    assert TrainConfig.from_dict(cfg.to_dict()).arch_space == SearchSpace("darts", 4)
