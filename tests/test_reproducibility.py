"""Numbers a researcher can trust (issue 24): the same command gives the same numbers whatever the machine's
load (the training's thread count is fixed at the start), --deterministic, and provenance.json."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from histories import training_numbers

import eval_searched_arch
import prune_metantknas
from search_lib.core import determinism, openmp_env, provenance, session
from search_lib.core.session import run_session

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--genotype", "mini-5cell-1", "--dataset", "Digits", "--init_channels", "4", "--layers", "2", "--epochs", "2",
         "--image_size", "16", "--batch_size", "64", "--n_shots", "1", "--n_queries", "5", "--n_test_runs", "4",
         "--n_aug_support_samples", "1", "--eval_splits", "test", "--num_workers", "0", "--device", "cpu",
         "--no-progress", "--seed", "1"]
SEARCH = ["--dataset", "MetaDigits", "--ntk_channels", "4", "--ntk_layers", "2", "--image_size", "8", "--batch_size",
          "2", "--n_ways", "3", "--repeat", "1", "--prune_number", "3", "--lr_batch_size", "40", "--lr_batches", "1",
          "--device", "cpu", "--rand_seed", "4"]



def _train_subprocess(save_dir: Path) -> None:  # one epoch, two test episodes: the least that shows a change
    # the count the run chooses itself (the affinity's CPUs): no thread settings inherited from the tests
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "METANTKNAS_THREADS")}
    subprocess.run([sys.executable, str(REPO / "eval_searched_arch.py"), *TRAIN, "--epochs", "1", "--n_test_runs", "2",
                    "--save_dir", str(save_dir)],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=600)


def test_a_training_gives_the_same_numbers_alone_and_beside_busy_processes(tmp_path):
    _train_subprocess(tmp_path / "alone")
    spin = "import time\nend = time.time() + 600\nwhile time.time() < end: pass\n"
    busy = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(max(2, os.cpu_count() or 1))]
    try:
        _train_subprocess(tmp_path / "busy")
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    assert training_numbers(tmp_path / "alone") == training_numbers(tmp_path / "busy")
    results = json.loads((tmp_path / "busy" / "results.json").read_text())
    assert results["train"]["thread_mode"] == "fixed" and results["train"]["numbers_depend_on_load"] is False
    record = json.loads((tmp_path / "busy" / "provenance.json").read_text())
    assert record["threads"]["mode"] == "fixed" and record["threads"]["GOMP_SPINCOUNT"] == openmp_env.SPIN_COUNT


def test_openmp_spinning_is_bounded_unless_the_user_chose():
    env = {}
    assert openmp_env.bound_spinning(env) and env == {"GOMP_SPINCOUNT": openmp_env.SPIN_COUNT}
    for mine in ({"GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "PASSIVE"}):
        env = dict(mine)
        assert not openmp_env.bound_spinning(env) and env == mine
    # the packages set it before torch loads: a fresh interpreter importing the toolkit first
    out = subprocess.run([sys.executable, "-c", "import eval_lib, os; print(os.environ.get('GOMP_SPINCOUNT'))"],
                         cwd=REPO, env={k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == openmp_env.SPIN_COUNT


# ---- --deterministic ----

def test_cuda_settings_are_made_before_the_first_cuda_call(monkeypatch):
    """CUDA mocked: the first call that could start CUDA (the device's resolution) already sees cuBLAS's
    workspace setting and cuDNN's deterministic mode; after the session torch's settings come back."""
    monkeypatch.delenv(determinism.CUBLAS_ENV, raising=False)
    seen = []

    def is_available():
        seen.append((os.environ.get(determinism.CUBLAS_ENV), torch.backends.cudnn.deterministic,
                     torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()))
        return False

    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    before = torch.are_deterministic_algorithms_enabled()
    with run_session("auto", 1) as s:
        assert s.deterministic and torch.is_deterministic_algorithms_warn_only_enabled()
    assert seen[0] == (determinism.CUBLAS_WORKSPACE, True, False, True)
    assert torch.are_deterministic_algorithms_enabled() == before
    monkeypatch.setenv(determinism.CUBLAS_ENV, ":16:8")  # the user's own setting is kept
    with run_session("auto", 1, deterministic=False):
        assert not torch.are_deterministic_algorithms_enabled()
    with run_session("auto", 1):
        assert os.environ[determinism.CUBLAS_ENV] == ":16:8"


def test_cuda_started_too_early_is_said_once(monkeypatch, caplog):
    monkeypatch.delenv(determinism.CUBLAS_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with caplog.at_level(logging.WARNING, logger="metantknas"), determinism.deterministic_mode(True):
        pass
    assert [r.message for r in caplog.records if determinism.CUBLAS_ENV in r.message]


def _history(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "measured"}
            for line in (run / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def searches(tmp_path_factory):
    """A tiny search with --deterministic (the default) and one with --no-deterministic, each observed:
    whether torch's deterministic mode was on while it ran."""
    root = tmp_path_factory.mktemp("det")
    modes = []
    from search_lib.search import search_run
    real = search_run.PruningSearch.run

    def spy(self, state):
        modes.append(torch.are_deterministic_algorithms_enabled())
        return real(self, state)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(search_run.PruningSearch, "run", spy)
        for name, extra in (("det", []), ("fast", ["--no-deterministic"])):
            assert prune_metantknas.main([*SEARCH, "--save_dir", str(root / name), *extra]) == 0
    return root, modes


def test_deterministic_mode_is_on_during_a_search_and_changes_no_cpu_number(searches):
    root, modes = searches
    assert modes == [True, False]  # --deterministic, then --no-deterministic
    assert _history(root / "det") == _history(root / "fast")
    assert (root / "det" / "genotype.json").read_text() == (root / "fast" / "genotype.json").read_text()
    record = json.loads((root / "det" / "provenance.json").read_text())
    settings = {k: v for k, v in record["deterministic"].items() if k != determinism.CUBLAS_ENV}
    assert settings == {"enabled": True, "algorithms": True, "warn_only": True, "cudnn_deterministic": True,
                        "cudnn_benchmark": False}
    assert json.loads((root / "fast" / "provenance.json").read_text())["deterministic"]["enabled"] is False


def test_deterministic_mode_is_on_during_a_training(tmp_path, monkeypatch):
    from eval_lib.train import training_run
    seen = []
    real = training_run.train_one_epoch

    def spy(*args, **kw):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(*args, **kw)

    monkeypatch.setattr(training_run, "train_one_epoch", spy)
    assert eval_searched_arch.main([*TRAIN, "--epochs", "1", "--save_dir", str(tmp_path / "t")]) == 0
    assert seen == [True]


# ---- provenance.json ----

def test_the_provenance_record_has_every_field_and_the_running_versions(searches):
    root, _ = searches
    record = json.loads((root / "det" / "provenance.json").read_text())
    assert set(record) >= {"argv", "environment", "toolkit", "threads", "deterministic", "seeds", "started"}
    assert record["argv"][1:] == [*SEARCH, "--save_dir", str(root / "det")]
    versions = record["environment"]["versions"]
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    for name in provenance.PACKAGES:
        try:
            assert versions[name] == metadata.version(name)
        except metadata.PackageNotFoundError:
            assert versions[name] is None
    device = record["environment"]["device"]
    assert device["type"] == "cpu" and device["cpu"]
    assert set(record["toolkit"]) == {"path", "commit", "dirty"}
    if (REPO / ".git").exists() and record["toolkit"]["commit"] is not None:
        assert len(record["toolkit"]["commit"]) == 40 and isinstance(record["toolkit"]["dirty"], bool)
    assert record["threads"]["intra_op"] >= 1 and record["threads"]["mode"] in ("fixed", "tuned")
    assert record["seeds"] == {"rand_seed": 4}


def test_without_a_checkout_git_is_null(monkeypatch, tmp_path):
    monkeypatch.setattr(provenance, "_CHECKOUT", tmp_path)
    assert provenance.toolkit() == {"path": str(tmp_path), "commit": None, "dirty": None}


def test_a_resume_in_another_environment_says_so_once_and_goes_on(tmp_path, caplog):
    run = tmp_path / "t"
    assert eval_searched_arch.main([*TRAIN, "--stop_after_epoch", "1", "--save_dir", str(run)]) == 0
    path = run / "provenance.json"
    record = json.loads(path.read_text())
    record["environment"]["versions"]["torch"] = "0.0.1"
    path.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="metantknas"):
        assert eval_searched_arch.main([*TRAIN, "--save_dir", str(run)]) == 0
    lines = [r.message for r in caplog.records if "another environment" in r.message]
    assert len(lines) == 1 and f"torch 0.0.1 -> {metadata.version('torch')}" in lines[0]
    assert json.loads(path.read_text())["environment"]["versions"]["torch"] == "0.0.1"  # the original is kept
    assert json.loads((run / "results.json").read_text())["fewshot"]


def test_the_session_records_the_thread_count_it_set(tmp_path):
    from search_lib.core.run_dir import RunDir
    run = RunDir(tmp_path / "r", None, (), "x.log", logging.getLogger("metantknas"))
    with session.run_session("cpu", 1, run=run) as s:
        s.claim()
        s.record_provenance({"seed": 3}, {"mode": "fixed"})
    record = json.loads((tmp_path / "r" / "provenance.json").read_text())
    assert record["threads"]["count"] == 1 and record["seeds"] == {"seed": 3}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_two_searches_and_two_trainings_give_identical_numbers(tmp_path):
    """--deterministic on a GPU: two tiny searches write byte-identical histories (apart from the timings of
    `measured`), two short trainings identical metrics and accuracies."""
    for i in range(2):
        assert prune_metantknas.main([*SEARCH[:-4], "--device", "cuda", "--rand_seed", "4",
                                      "--save_dir", str(tmp_path / f"s{i}")]) == 0
        assert eval_searched_arch.main([*TRAIN[:-5], "--device", "cuda", "--no-progress", "--seed", "1",
                                        "--save_dir", str(tmp_path / f"t{i}")]) == 0
    assert _history(tmp_path / "s0") == _history(tmp_path / "s1")
    assert (tmp_path / "s0" / "genotype.json").read_bytes() == (tmp_path / "s1" / "genotype.json").read_bytes()
    assert training_numbers(tmp_path / "t0") == training_numbers(tmp_path / "t1")
    record = json.loads((tmp_path / "t0" / "provenance.json").read_text())
    assert record["environment"]["device"]["gpu"] and record["deterministic"]["cudnn_deterministic"]
