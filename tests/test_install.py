"""`pip install .` gives a package that works outside the checkout: the console scripts answer --help and a tiny
search runs from another folder, importing the installed copy (not the checkout)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("metantknas-search", "metantknas-launch", "metantknas-eval", "metantknas-study", "metantknas-sweep",
           "metantknas-report", "metantknas-synthetic")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment with the toolkit installed from a copy of the checkout. Its dependencies are
    this environment's (a .pth file), so nothing is downloaded: the test is about the package, not about pip."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info",
                                                                 "__pycache__", ".pytest_cache"))
    env_dir = tmp / "env"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(env_dir)],
                   check=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(source)],
                   check=True, cwd=tmp, env=_clean_env())
    return env_dir


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    return env


_HELP_OF_EVERY_SCRIPT = """
import contextlib, importlib.metadata, io, json
codes = {}
for ep in importlib.metadata.entry_points(group="console_scripts"):
    if ep.name.startswith("metantknas-"):
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                code = ep.load()(["--help"])
        except SystemExit as exc:
            code = exc.code
        codes[ep.name] = [code or 0, out.getvalue().startswith("usage:")]
print(json.dumps(codes))
"""


def test_every_console_script_answers_help(installed, tmp_path):
    # every entry point in one interpreter (each import of torch costs seconds), then one script file as pip wrote it
    done = subprocess.run([installed / "bin" / "python", "-c", _HELP_OF_EVERY_SCRIPT], cwd=tmp_path,
                          capture_output=True, text=True, env=_clean_env())
    assert done.returncode == 0, done.stderr[-1000:]
    assert json.loads(done.stdout) == {name: [0, True] for name in SCRIPTS}
    for script in SCRIPTS:
        assert (installed / "bin" / script).is_file(), script
    done = subprocess.run([installed / "bin" / "metantknas-eval", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, env=_clean_env())
    assert done.returncode == 0 and done.stdout.startswith("usage: eval_searched_arch.py"), done.stderr[-500:]


def test_the_installed_copy_is_imported_outside_the_checkout(installed, tmp_path):
    where = subprocess.run([installed / "bin" / "python", "-c", "import eval_lib, search_lib; "
                            "print(eval_lib.__file__); print(search_lib.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True, env=_clean_env()).stdout.split()
    assert all(Path(p).is_relative_to(installed) for p in where), where
    # the published split lists travel with the package (package data)
    shipped = installed.glob("lib/python*/site-packages/search_lib/data/splits/*/*")
    assert sorted(p.relative_to(p.parents[1]).as_posix() for p in shipped) == sorted(
        p.relative_to(p.parents[1]).as_posix() for p in (ROOT / "search_lib" / "data" / "splits").glob("*/*"))


def test_a_tiny_search_runs_from_another_folder(installed, tmp_path):
    # linear regions only: the kernels are the same code as in the checkout and cost seconds more here
    argv = [installed / "bin" / "metantknas-search", "--dataset", "MetaDigits", "--save_dir", "run", "--rand_seed",
            "0", "--ntk_channels", "4", "--ntk_layers", "2", "--image_size", "16", "--batch_size", "2", "--repeat",
            "1", "--prune_number", "7", "--regions_batches", "1", "--regions_batch_size", "40", "--only_lrs",
            "--device", "cpu"]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=_clean_env())
    assert done.returncode == 0, done.stderr[-1000:]
    record = json.loads((tmp_path / "run" / "genotype.json").read_text())
    assert record["search_space"] == "darts_fewshot" and (tmp_path / "run" / "done").is_file()
