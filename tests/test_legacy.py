"""Run folders written by the version before the run-folder / config refactor still load.

`fixtures/legacy_v1/` holds a tiny search (MetaNTK, digits) and a one-epoch training of its genotype,
both written by that version with the commands below. The current code must report them as finished,
resume them, and test the old checkpoint with the same numbers the old code recorded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import eval_searched_arch
import prune_metantknas
from search_lib.models.genotypes import GenotypeRecord
from search_lib.models.space import SearchSpace

LEGACY = Path(__file__).parent / "fixtures" / "legacy_v1"
SEARCH_ARGV = ["--dataset", "MetaDigits", "--rand_seed", "1", "--ntk_channels", "4", "--image_size", "8",
               "--batch_size", "2", "--repeat", "1", "--prune_number", "7", "--lr_batches", "1",
               "--lr_batch_size", "50", "--device", "cpu"]
TEST_ARGV = ["--n_test_runs", "4", "--n_queries", "3", "--n_shots", "1", "--eval_splits", "test",
             "--n_aug_support_samples", "1", "--num_workers", "0", "--device", "cpu", "--no-progress"]
TRAIN_ARGV = ["--dataset", "Digits", "--init_channels", "2", "--layers", "5", "--epochs", "1", "--batch_size",
              "128", "--image_size", "16", *TEST_ARGV]


@pytest.fixture
def legacy(tmp_path) -> Path:
    shutil.copytree(LEGACY, tmp_path / "legacy")
    return tmp_path / "legacy"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix != ".log"}


def _mean(results: dict) -> float:
    return results["fewshot"]["test"]["1"]["mean"]


def test_finished_legacy_search_is_reported_not_recomputed(legacy, capsys):
    run = legacy / "search"
    before = _files(run)
    assert prune_metantknas.main([*SEARCH_ARGV, "--save_dir", str(run)]) == 0
    out = capsys.readouterr().out
    record = GenotypeRecord.from_json((run / "genotype.json").read_text())
    assert "already finished" in out and str(record.genotype) in out
    assert (record.space, record.rand_seed) == (SearchSpace("darts_fewshot", 3), 1)
    assert _files(run) == before


def test_legacy_search_state_resumes_to_the_same_outputs(legacy):
    run = legacy / "search"
    genotype, history = (run / "genotype.json").read_bytes(), (run / "history.jsonl").read_bytes()
    (run / "done").unlink()
    (run / "genotype.json").unlink()
    assert prune_metantknas.main([*SEARCH_ARGV, "--save_dir", str(run)]) == 0
    assert (run / "genotype.json").read_bytes() == genotype  # byte-identical, from the old state.json
    assert (run / "history.jsonl").read_bytes() == history
    assert (run / "done").exists()


def test_legacy_checkpoint_is_tested_with_the_recorded_numbers(legacy, tmp_path):
    old = json.loads((legacy / "train" / "results.json").read_text())
    argv = ["--eval_only", "--checkpoint", str(legacy / "train" / "checkpoint.pt"), "--save_dir",
            str(tmp_path / "eval"), *TEST_ARGV]
    assert eval_searched_arch.main(argv) == 0
    new = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert new["genotype"] == old["genotype"] and new["params"] == old["params"]
    assert _mean(new) == pytest.approx(_mean(old), abs=1e-9)
    assert new["memory"]["test"]["measure"] == "process_rss" and new["memory"]["test"]["peak_bytes"] > 100 << 20


def test_legacy_training_run_is_cached_then_resumes(legacy):
    run = legacy / "train"
    argv = [*TRAIN_ARGV, "--genotype", str(legacy / "search" / "genotype.json"), "--save_dir", str(run)]
    old_results = (run / "results.json").read_bytes()
    assert eval_searched_arch.main(argv) == 0  # finished: reported from results.json
    assert (run / "results.json").read_bytes() == old_results
    checkpoint = (run / "checkpoint.pt").read_bytes()
    (run / "done").unlink()
    (run / "results.json").unlink()
    assert eval_searched_arch.main(argv) == 0  # resumes after the last epoch: tests the old weights again
    new = json.loads((run / "results.json").read_text())
    assert _mean(new) == pytest.approx(_mean(json.loads(old_results)), abs=1e-9)
    assert (run / "checkpoint.pt").read_bytes() == checkpoint  # no epoch was redone
