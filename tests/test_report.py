"""Pictures of run folders (search_lib.search.search_plot, eval_lib.train.training_plot): drawn by the hooks at the
end of a real tiny search and training, redrawn by ``python -m eval_lib.report``, drawn from partial folders; bad
folders give one error line; a picture that fails is a warning, not a failed run; the training's optional
TensorBoard log."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import eval_searched_arch
import prune_metantknas
from eval_lib.commands import draw_pictures
from eval_lib.train import training_plot
from eval_lib.train.tensorboard_log import MISSING, TrainingBoard
from search_lib.core import figures as core_figures
from search_lib.core.errors import DataError, UsageError
from search_lib.search import search_plot as search_report
from search_lib.search import search_run

ROOT = Path(__file__).resolve().parents[1]
SEARCH_ARGV = ["--dataset", "Digits", "--ntk_type", "NTK", "--batch_size", "6", "--prune_number", "6",
               "--ntk_layers", "2", "--ntk_channels", "4", "--image_size", "8", "--repeat", "1",
               "--lr_batch_size", "50", "--lr_batches", "1", "--device", "cpu", "--rand_seed", "0"]
TRAIN_ARGV = ["--dataset", "Digits", "--init_channels", "2", "--layers", "3", "--epochs", "2", "--batch_size",
              "128", "--image_size", "8", "--n_test_runs", "2", "--n_queries", "2", "--n_shots", "1",
              "--eval_splits", "test", "--n_aug_support_samples", "1", "--device", "cpu", "--no-progress"]


def _check_png(path: Path) -> tuple[int, int]:
    """A whole, valid PNG, written atomically (no temp file left beside it); its size in pixels."""
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0
        size = image.size
    assert not list(path.parent.glob(".*.tmp"))
    return size


def _error_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in text, text
    return lines[0]


@pytest.fixture(scope="module")
def search_dir(tmp_path_factory) -> Path:
    """A finished tiny search (NTK on digits, 2 rounds); read-only for the tests (copy it to change it)."""
    save = tmp_path_factory.mktemp("report") / "search"
    assert prune_metantknas.main([*SEARCH_ARGV, "--save_dir", str(save)]) == 0
    return save


@pytest.fixture(scope="module")
def training_dir(search_dir) -> Path:
    """A finished tiny training of that search's genotype; read-only as well."""
    save = search_dir.parent / "train"
    argv = [*TRAIN_ARGV, "--genotype", str(search_dir / "genotype.json"), "--save_dir", str(save)]
    assert eval_searched_arch.main(argv) == 0
    return save


def _captured(monkeypatch) -> list:
    """Record the figures `report` saves (to read their titles) while still writing them."""
    figures, save = [], search_report.save_png
    for module in (search_report, training_plot):
        monkeypatch.setattr(module, "save_png", lambda fig, path: figures.append(fig) or save(fig, path))
    return figures


# ---- the hooks ------------------------------------------------------------------------------------------

def test_a_finished_search_draws_search_png(search_dir):
    width, height = _check_png(search_dir / "search.png")
    assert width >= 1000 and height >= 600  # panels (a), (b) and (c)
    assert f"picture: {search_dir / 'search.png'}" in (search_dir / "search.log").read_text()


def test_a_finished_training_draws_training_png(training_dir):
    _check_png(training_dir / "training.png")
    assert f"picture: {training_dir / 'training.png'}" in (training_dir / "train.log").read_text()


def test_a_picture_that_fails_is_a_warning_and_the_search_still_finishes(search_dir, monkeypatch, tmp_path):
    def broken(run_dir):
        raise RuntimeError("no fonts\nleft")

    monkeypatch.setattr(search_run, "draw_search", broken)
    save = shutil.copytree(search_dir, tmp_path / "search")
    for name in ("done", "genotype.json", "search.png"):  # killed after its last round: finishing is quick
        (save / name).unlink()
    assert prune_metantknas.main([*SEARCH_ARGV, "--save_dir", str(save)]) == 0
    assert (save / "done").exists() and (save / "genotype.json").exists() and not (save / "search.png").exists()
    warnings = [ln for ln in (save / "search.log").read_text().splitlines() if "could not draw" in ln]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "(no fonts left)" in warnings[0]


def test_draw_quietly_logs_the_reason_on_one_line(caplog, tmp_path):
    def broken(run_dir):
        raise DataError("history.jsonl\nis torn")

    with caplog.at_level(logging.WARNING, logger="metantknas.test"):
        assert core_figures.draw_quietly(broken, tmp_path, logging.getLogger("metantknas.test")) is None
    (record,) = caplog.records
    assert "history.jsonl is torn" in record.getMessage() and "\n" not in record.getMessage()


# ---- the command line -----------------------------------------------------------------------------------

def test_cli_redraws_finished_folders(search_dir, training_dir, tmp_path, capsys):
    search, train = (shutil.copytree(d, tmp_path / d.name) for d in (search_dir, training_dir))
    (search / "search.png").unlink()
    (train / "training.png").unlink()
    shutil.copy(train / "metrics.jsonl", search)  # a folder holding both kinds gets both pictures
    assert draw_pictures.main([str(search), str(train)]) == 0
    pictures = [search / "search.png", search / "training.png", train / "training.png"]
    assert capsys.readouterr().out.split() == [str(p) for p in pictures]
    for picture in pictures:
        _check_png(picture)


def test_cli_on_a_folder_with_nothing_exits_2_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    done = subprocess.run([sys.executable, "-m", "eval_lib.report", str(tmp_path / "empty")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert "neither history.jsonl" in _error_line(done.stderr)


@pytest.mark.parametrize("make, code, words", [
    (lambda d: None, 2, "does not exist"),
    (lambda d: d.mkdir(), 2, "neither history.jsonl"),
    (lambda d: (d.mkdir(), (d / "history.jsonl").write_text('{"round": 0}\n{torn\n{"round": 2}\n')), 3,
     "cannot read"),
    (lambda d: (d.mkdir(), (d / "history.jsonl").write_text('{"round": 0, "phase": "ops"}\n')), 3,
     "cannot read"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text('{"epoch": 1}\n')), 3, "cannot read"),
])
def test_cli_errors_are_one_line(make, code, words, tmp_path, capsys):
    run = tmp_path / "run"
    make(run)
    assert draw_pictures.main([str(run)]) == code
    assert words in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "run" / "search.png").exists()


def test_every_folder_is_checked_before_any_picture(search_dir, tmp_path, capsys):
    run = shutil.copytree(search_dir, tmp_path / "search")
    (run / "search.png").unlink()
    assert draw_pictures.main([str(run), str(tmp_path / "typo")]) == 2
    assert "typo does not exist" in _error_line(capsys.readouterr().err)
    assert not (run / "search.png").exists()


# ---- partial runs ---------------------------------------------------------------------------------------

def test_a_partial_search_is_drawn_without_its_cells(search_dir, tmp_path, monkeypatch):
    run = shutil.copytree(search_dir, tmp_path / "partial")
    for name in ("genotype.json", "done", "search.png"):
        (run / name).unlink()
    lines = (run / "history.jsonl").read_text().splitlines()
    (run / "history.jsonl").write_text(lines[0] + "\n")  # only the first (ops) round finished
    figures = _captured(monkeypatch)
    assert draw_pictures.draw_report(run) == [run / "search.png"]
    _check_png(run / "search.png")
    assert "cells not drawn: no genotype.json" in figures[0].get_suptitle()


def test_a_training_without_results_is_drawn(training_dir, tmp_path, monkeypatch):
    run = shutil.copytree(training_dir, tmp_path / "running")
    (run / "results.json").unlink()
    figures = _captured(monkeypatch)
    assert training_plot.draw_training(run) == run / "training.png"
    _check_png(run / "training.png")
    texts = [t.get_text() for ax in figures[0].axes for t in ax.texts]
    assert any("no few-shot results yet (no results.json)" in t for t in texts)


def test_an_empty_training_log_is_drawn(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    _check_png(training_plot.draw_training(tmp_path))


# ---- TensorBoard ----------------------------------------------------------------------------------------

@pytest.fixture
def no_tensorboard(monkeypatch):
    """As if the tensorboard package were not installed (whether or not it is)."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def test_tensorboard_without_the_package_fails_before_writing(no_tensorboard, tmp_path, capsys):
    save = tmp_path / "train"
    argv = [*TRAIN_ARGV, "--genotype", "mini-5cell-1", "--tensorboard", "--save_dir", str(save)]
    assert eval_searched_arch.main(argv) == 2
    assert _error_line(capsys.readouterr().err) == f"error: {MISSING}"
    assert not save.exists()
    save = tmp_path / "search"  # the search's hand-off fails before the search, not after it
    argv = [*SEARCH_ARGV, "--train_after_search", "--aug_tensorboard", "--save_dir", str(save)]
    assert prune_metantknas.main(argv) == 2
    assert _error_line(capsys.readouterr().err) == f"error: {MISSING}"
    assert not save.exists()
    with pytest.raises(UsageError, match="pip install tensorboard"):
        TrainingBoard(tmp_path, enabled=True)


def test_tensorboard_off_writes_nothing(no_tensorboard, tmp_path):
    with TrainingBoard(tmp_path, enabled=False) as board:  # does not even need the package
        board.epoch({"epoch": 1, "loss": 2.0, "acc": 10.0, "lr": 0.1, "drop_path_prob": 0.0})
        board.fewshot({"test": {"1": {"mean": 40.0}}}, 1)
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_writes_the_scalars(tmp_path):
    pytest.importorskip("torch.utils.tensorboard", reason="the tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with TrainingBoard(tmp_path, enabled=True) as board:
        for epoch in (1, 2):
            board.epoch({"epoch": epoch, "loss": 3.0 - epoch, "acc": 10.0 * epoch, "lr": 0.1, "drop_path_prob": 0.0})
        board.fewshot({"test": {"1": {"mean": 40.0}, "5": {"mean": 60.0}}}, 2)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([2.0, 1.0])
    assert [e.step for e in events.Scalars("train/acc")] == [1, 2]
    assert events.Scalars("fewshot/test/5-shot")[0].value == pytest.approx(60.0)


def test_tensorboard_flag_defaults_off_and_is_forwarded_by_the_search():
    from eval_lib.train.train_config import TRAIN_AFTER_SEARCH_FLAGS, TrainConfig

    assert TrainConfig().tensorboard is False and "tensorboard" in TRAIN_AFTER_SEARCH_FLAGS
    assert json.loads(json.dumps(TrainConfig().to_dict()))["tensorboard"] is False
