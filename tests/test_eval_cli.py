"""eval_searched_arch.py: flags, error paths (one line + exit code), a tiny run, resume and eval-only."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

import eval_searched_arch as cli
from eval_lib.train.train_config import TrainConfig

TINY = ["--init_channels", "4", "--layers", "3", "--image_size", "16", "--epochs", "2", "--batch_size", "16",
        "--learning_rate", "0.05", "--lr_decay_epochs", "1", "--n_shots", "1", "--n_queries", "3",
        "--n_test_runs", "2", "--n_aug_support_samples", "1", "--eval_splits", "test", "--num_workers", "0",
        "--device", "cpu", "--no-progress"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def test_every_flag_is_a_config_field():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    dests = {a.dest for a in cli.build_parser()._actions if a.dest != "help"}
    assert dests <= fields, dests - fields
    args = cli.build_parser().parse_args(["--genotype", "mini-5cell-1", "--n_shots", "1,5", "--no-resume",
                                          "--overwrite", "true", "--lr_decay_epochs", "30,40,50"])
    cfg = cli.config_from_args(args)
    assert cfg.n_shots == [1, 5] and cfg.resume is False and cfg.overwrite is True
    assert cfg.lr_decay_epochs == [30, 40, 50] and cfg.init_channels == 48 and cfg.layers == 5


@pytest.mark.parametrize("argv, code, words", [
    (["--genotype", "no-such-arch"], 2, "presets"),
    (["--genotype", "Genotype(normal=[[('bogus_op', 0)]])"], 2, ""),
    (["--n_shots", "1,x"], 2, "1,5"),
    (["--classifier", "KNN"], 2, "LR"),
    (["--scheduler", "poly"], 2, "invalid choice"),
    (["--eval_only"], 2, "--checkpoint"),
    ([], 2, "--genotype"),
    (["--random_arch", "--genotype", "mini-5cell-1"], 2, "not both"),
])
def test_usage_errors(argv, code, words, capsys, tmp_path):
    full = argv + ["--dataset", "Digits", "--save_dir", str(tmp_path / "run")] + TINY
    assert cli.main(full) == code
    assert words in _error_line(capsys)


def test_missing_data_exit_3(capsys, tmp_path):
    argv = ["--genotype", "mini-5cell-1", "--dataset", "MiniImageNet", "--data_path", str(tmp_path / "nowhere"),
            "--save_dir", str(tmp_path / "run")] + TINY
    assert cli.main(argv) == 3
    assert "--data_path" in _error_line(capsys)
    assert not (tmp_path / "run").exists()  # nothing written before the data were checked


def test_missing_checkpoint_exit_3(capsys, tmp_path):
    assert cli.main(["--eval_only", "--checkpoint", str(tmp_path / "nope.pt"), "--no-progress"]) == 3
    assert "does not exist" in _error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_exit_2(capsys, tmp_path):
    argv = ["--genotype", "mini-5cell-1", "--dataset", "Digits", "--save_dir", str(tmp_path / "run")] + TINY
    argv[argv.index("--device") + 1] = "cuda"
    assert cli.main(argv) == 2
    assert "CUDA" in _error_line(capsys)


def test_tiny_run_resume_cache_and_eval_only(synthetic_mini, capsys, tmp_path):
    run = tmp_path / "run"
    argv = ["--genotype", "mini-5cell-2", "--dataset", "MiniImageNet", "--data_path", str(synthetic_mini),
            "--save_dir", str(run)] + TINY
    assert cli.main(argv + ["--stop_after_epoch", "1"]) == 0
    assert "re-run" in capsys.readouterr().out
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "accuracy (%)" in out and "test" in out and "+-" in out
    assert cli.main(argv) == 0
    assert "already finished" in capsys.readouterr().out
    # a different learning rate in the same folder: refused, one line, exit 2
    changed = list(argv)
    changed[changed.index("--learning_rate") + 1] = "0.1"
    assert cli.main(changed) == 2
    assert "--overwrite" in _error_line(capsys)
    # evaluation-only from the checkpoint: data settings come from the checkpoint's run
    assert cli.main(["--eval_only", "--checkpoint", str(run / "checkpoint.pt"), "--n_shots", "1",
                     "--n_queries", "3", "--n_test_runs", "2", "--n_aug_support_samples", "1",
                     "--eval_splits", "test", "--num_workers", "0", "--no-progress",
                     "--save_dir", str(tmp_path / "ev")]) == 0
    assert "accuracy (%)" in capsys.readouterr().out
    assert (tmp_path / "ev" / "eval_results.json").exists()


def test_infeasible_episodes_fail_before_training(capsys, tmp_path):
    argv = ["--genotype", "mini-5cell-1", "--dataset", "Digits", "--save_dir", str(tmp_path / "run")] + TINY
    argv[argv.index("--n_queries") + 1] = "500"
    argv[argv.index("--epochs") + 1] = "50"
    assert cli.main(argv) == 3
    assert "--n_queries" in _error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_untrusted_pickle_checkpoint_needs_flag(capsys, tmp_path):
    path = tmp_path / "original.pt"
    torch.save({"opt": argparse.Namespace(lr=0.1), "model": {}}, path)  # as RFS saved its options
    assert cli.main(["--eval_only", "--checkpoint", str(path), "--no-progress"]) == 3
    assert "--trust_checkpoint" in _error_line(capsys)
