"""The training and the few-shot test under torchrun (2 CPU processes, gloo): DistributedDataParallel with
rank 0 writing one run folder, the episodes split across ranks with the single-process result, an exact
resume, the hand-off from a distributed search, and one message for a user error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_searched_arch
from eval_lib.train.device_batches import DeviceBatches
from search_lib.data import build_transform

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--dataset", "Digits", "--random_arch", "--seed", "0", "--init_channels", "4", "--layers", "2",
         "--epochs", "1", "--batch_size", "64", "--n_test_runs", "9", "--n_queries", "5", "--num_workers", "0",
         "--device", "cpu", "--progress", "false", "--eval_splits", "test"]


def _torchrun(script: str, args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def two_process_training(tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp") / "train"
    proc = _torchrun("eval_searched_arch.py", [*TRAIN, "--save_dir", str(run)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, proc


def test_two_process_training_writes_one_run_folder(two_process_training):
    run, proc = two_process_training
    results = json.loads((run / "results.json").read_text())
    assert results["processes"] == 2 and results["status"] == "finished"
    assert (run / "done").exists() and not list(run.glob("*.tmp"))
    assert (run / "training.png").stat().st_size > 0  # drawn by rank 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert len(ckpt["rng_ranks"]) == 2 and ckpt["epoch"] == 1
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the network's own state, not DDP's
    assert proc.stdout.count("accuracy (%)") == 1  # one process reports
    assert results["fewshot"]["test"]["1"]["episodes"] == 9


@pytest.mark.slow  # 18 s on 2 cores
def test_fewshot_test_on_two_processes_equals_one(two_process_training, tmp_path):
    run, _ = two_process_training
    flags = ["--eval_only", "--checkpoint", str(run / "checkpoint.pt"), "--n_test_runs", "9", "--n_queries", "5",
             "--num_workers", "0", "--device", "cpu", "--progress", "false", "--eval_splits", "test,val"]
    proc = _torchrun("eval_searched_arch.py", [*flags, "--save_dir", str(tmp_path / "two")])
    assert eval_searched_arch.main([*flags, "--save_dir", str(tmp_path / "one")]) == 0
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "eval_results.json").read_text())["fewshot"]
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())["fewshot"]
    assert one == two  # same episodes (9 = 5 + 4 per rank), same per-episode accuracies, same mean and interval


def test_batch_size_that_does_not_split_is_one_line(tmp_path, monkeypatch, capsys):
    # checked with the settings, before any process group or file: torchrun's WORLD_SIZE is enough
    monkeypatch.setenv("WORLD_SIZE", "2")
    run = tmp_path / "bad"
    assert eval_searched_arch.main([*TRAIN, "--batch_size", "63", "--save_dir", str(run)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "--batch_size 63" in lines[0] and "2 processes" in lines[0]
    assert not run.exists()


@pytest.mark.slow
def test_distributed_training_resumes_exactly(tmp_path):
    flags = [*TRAIN, "--epochs", "2", "--n_test_runs", "3"]
    stopped = _torchrun("eval_searched_arch.py", [*flags, "--save_dir", str(tmp_path / "r"), "--stop_after_epoch",
                                                  "1"])
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    resumed = _torchrun("eval_searched_arch.py", [*flags, "--save_dir", str(tmp_path / "r"), "--resume"])
    whole = _torchrun("eval_searched_arch.py", [*flags, "--save_dir", str(tmp_path / "u")])
    assert resumed.returncode == 0 and whole.returncode == 0, resumed.stderr[-2000:] + whole.stderr[-2000:]
    a = torch.load(tmp_path / "r" / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(tmp_path / "u" / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.slow
def test_train_after_search_under_torchrun(tmp_path):
    search = ["--dataset", "MetaDigits", "--ntk_channels", "4", "--ntk_layers", "2", "--image_size", "8",
              "--batch_size", "2", "--n_ways", "3", "--repeat", "1", "--prune_number", "3", "--lr_batch_size", "40",
              "--lr_batches", "1", "--device", "cpu", "--rand_seed", "4", "--train_after_search",
              "--aug_init_channels", "4", "--aug_layers", "2", "--aug_epochs", "1", "--aug_batch_size", "64",
              "--aug_n_test_runs", "4", "--aug_n_queries", "5", "--aug_num_workers", "0", "--aug_eval_splits", "test",
              "--save_dir", str(tmp_path / "s")]
    proc = _torchrun("prune_metantknas.py", search)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "s" / "train" / "results.json").read_text())
    genotype = json.loads((tmp_path / "s" / "genotype.json").read_text())
    assert results["processes"] == 2 and results["genotype"] == genotype["string"]
    assert proc.stdout.count("accuracy (%)") == 1


def test_device_batches_of_the_ranks_partition_the_global_batch():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 12, 12, 3), dtype=np.uint8)
    targets = np.arange(20) % 4
    tf = build_transform("A", True, 12, "mini")
    whole = list(DeviceBatches(images, targets, torch.device("cpu"), 8, tf).epoch(5))
    ranks = [list(DeviceBatches(images, targets, torch.device("cpu"), 8, tf, rank, 2).epoch(5)) for rank in (0, 1)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == 2
    for b, (x, y) in enumerate(whole):
        for rank in (0, 1):
            xr, yr = ranks[rank][b]
            assert torch.equal(yr, y[rank::2])
            torch.testing.assert_close(xr, x[rank::2])  # the same image with the same augmentation
