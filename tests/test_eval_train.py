"""RFS-style training: loss goes down, exact resume, checkpoint fallback, caching, evaluation-only mode."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from eval_lib.commands.presets import paper_training_preset
from eval_lib.train.checkpoints import read_checkpoint
from eval_lib.train.epoch import build_optimizer, lr_factor
from eval_lib.train.evaluation import evaluate_checkpoint, format_results_table
from eval_lib.train.train_config import TrainConfig
from eval_lib.train.training_run import train_and_evaluate
from search_lib.core.errors import DataError, UsageError
from search_lib.core.utils import read_jsonl


def _cfg(data_path, save_dir, **kw) -> TrainConfig:
    base = dict(genotype="mini-5cell-1", dataset="MiniImageNet", data_path=str(data_path), image_size=16,
                init_channels=4, layers=3, epochs=3, batch_size=16, learning_rate=0.05, lr_decay_epochs=[2],
                drop_path_prob=0.2, n_shots=[1], n_queries=4, n_test_runs=3, n_aug_support_samples=2,
                eval_splits=["test"], save_dir=str(save_dir), progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _weights(save_dir):
    return read_checkpoint(save_dir / "checkpoint.pt")["model"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference_run(synthetic_mini, tmp_path_factory):
    """One uninterrupted 3-epoch run (shared by several tests; treat its folder as read-only)."""
    save_dir = tmp_path_factory.mktemp("reference")
    results = train_and_evaluate(_cfg(synthetic_mini, save_dir))
    return save_dir, results


def test_training_lowers_loss_and_writes_run_files(reference_run):
    save_dir, results = reference_run
    assert results["status"] == "finished"
    metrics = read_jsonl(save_dir / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    # drop-path rises linearly from 0; the step schedule decays at epoch 2 (0-based) -> third epoch
    assert [m["drop_path_prob"] for m in metrics] == pytest.approx([0.0, 0.2 / 3, 0.4 / 3])
    assert [m["lr"] for m in metrics] == pytest.approx([0.05, 0.05, 0.005])
    for name in ("config.json", "checkpoint.pt", "checkpoint_prev.pt", "results.json", "done", "train.log"):
        assert (save_dir / name).exists(), name
    on_disk = json.loads((save_dir / "results.json").read_text())
    res = on_disk["fewshot"]["test"]["1"]
    assert res["episodes"] == 3 and res["queries"] == 4 and res["classifier"] == "LR"
    assert 0 <= res["mean"] <= 100
    assert on_disk["params"] > 0 and on_disk["macs"] > 0 and on_disk["seed"] == 3
    assert on_disk["genotype"].startswith("Genotype(") and json.loads(on_disk["genotype_json"])
    ckpt = read_checkpoint(save_dir / "checkpoint.pt")
    assert ckpt["epoch"] == 3 and ckpt["net_kwargs"]["num_classes"] == 6
    assert "test" in format_results_table(on_disk)


def test_resume_gives_identical_weights(reference_run, synthetic_mini, tmp_path):
    ref_dir, ref = reference_run
    cfg = _cfg(synthetic_mini, tmp_path)
    stopped = train_and_evaluate(cfg.replace(stop_after_epoch=1))
    assert stopped["status"] == "stopped" and not (tmp_path / "done").exists()
    assert read_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    resumed = train_and_evaluate(cfg)
    assert resumed["status"] == "finished"
    assert _same(_weights(tmp_path), _weights(ref_dir))
    assert [m["epoch"] for m in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert resumed["fewshot"]["test"]["1"]["accuracies"] == ref["fewshot"]["test"]["1"]["accuracies"]


def test_finished_run_is_cached_and_overwrite_recomputes(reference_run, synthetic_mini, tmp_path):
    cfg = _cfg(synthetic_mini, tmp_path, epochs=1)
    first = train_and_evaluate(cfg)
    mtime = (tmp_path / "checkpoint.pt").stat().st_mtime_ns
    again = train_and_evaluate(cfg)
    assert again["status"] == "cached" and again["fewshot"] == first["fewshot"]
    assert (tmp_path / "checkpoint.pt").stat().st_mtime_ns == mtime
    # other test settings: the trained network is re-tested, not re-trained
    retested = train_and_evaluate(cfg.replace(classifier="Proto"))
    assert retested["status"] == "finished" and retested["classifier"] == "Proto"
    assert (tmp_path / "checkpoint.pt").stat().st_mtime_ns == mtime
    redone = train_and_evaluate(cfg.replace(overwrite=True))
    assert redone["status"] == "finished"
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 1


def test_corrupt_checkpoint_falls_back_to_previous(reference_run, synthetic_mini, tmp_path, caplog):
    ref_dir, _ = reference_run
    cfg = _cfg(synthetic_mini, tmp_path)
    train_and_evaluate(cfg.replace(stop_after_epoch=2))
    ckpt = tmp_path / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 3])  # truncated, as after a crash of a non-atomic writer
    with caplog.at_level(logging.WARNING, logger="metantknas.eval"):
        result = train_and_evaluate(cfg)
    assert result["status"] == "finished"
    assert any("checkpoint.pt" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert (tmp_path / "checkpoint.pt.corrupt").exists()
    assert _same(_weights(tmp_path), _weights(ref_dir))  # epoch 2 redone from epoch 1 -> same result


def test_settings_mismatch_and_no_resume_are_refused(synthetic_mini, tmp_path):
    cfg = _cfg(synthetic_mini, tmp_path)
    train_and_evaluate(cfg.replace(stop_after_epoch=1))
    with pytest.raises(UsageError, match="other settings.*learning_rate.*--overwrite"):
        train_and_evaluate(cfg.replace(learning_rate=0.1))
    with pytest.raises(UsageError, match="--resume"):
        train_and_evaluate(cfg.replace(resume=False))


def test_eval_only_reproduces_training_results(reference_run, tmp_path):
    ref_dir, ref = reference_run
    cfg = TrainConfig(n_shots=[1], n_queries=4, n_test_runs=3, n_aug_support_samples=2, eval_splits=["test"],
                      progress=False, save_dir=str(tmp_path))
    res = evaluate_checkpoint(ref_dir / "checkpoint.pt", cfg)
    assert res["mode"] == "eval_only" and res["epoch"] == 3
    assert res["fewshot"]["test"]["1"]["accuracies"] == ref["fewshot"]["test"]["1"]["accuracies"]
    assert res["params"] == ref["params"]
    assert (tmp_path / "eval_results.json").exists()


def test_eval_only_bad_checkpoints(tmp_path):
    cfg = TrainConfig(progress=False)
    with pytest.raises(DataError, match="does not exist"):
        evaluate_checkpoint(tmp_path / "missing.pt", cfg)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(DataError, match="unreadable"):
        evaluate_checkpoint(bad, cfg)
    bare = tmp_path / "bare.pt"
    torch.save({"model": {"linear.weight": torch.zeros(5, 8)}}, bare)
    with pytest.raises(UsageError, match="--genotype"):
        evaluate_checkpoint(bare, cfg)


def test_schedules_and_optimizers():
    step = TrainConfig(epochs=100, lr_decay_epochs=[60, 80], lr_decay_rate=0.1)
    assert [lr_factor(step, e) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx([1, 1, .1, .1, .01, .01])
    cos = step.replace(scheduler="cosine")
    assert lr_factor(cos, 0) == pytest.approx(1.0) and lr_factor(cos, 100) == pytest.approx(1e-3)
    exp = step.replace(scheduler="exp", exp_gamma=0.5)
    assert lr_factor(exp, 3) == pytest.approx(0.125)
    net = torch.nn.Linear(3, 2)
    sgd = build_optimizer(net, step)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    assert sgd.defaults["weight_decay"] == 5e-4
    assert type(build_optimizer(net, step.replace(optimizer="radam"))).__name__ == "RAdam"
    assert isinstance(build_optimizer(net, step.replace(optimizer="adam")), torch.optim.Adam)
    with pytest.raises(UsageError, match="unknown --optimizer"):
        build_optimizer(net, step.replace(optimizer="nonsense"))


def test_config_validation():
    with pytest.raises(UsageError, match="--genotype"):
        TrainConfig().validate()
    with pytest.raises(UsageError, match="not both"):
        TrainConfig(genotype="mini-5cell-1", random_arch=True).validate()
    with pytest.raises(UsageError, match="scheduler"):
        TrainConfig(genotype="mini-5cell-1", scheduler="poly").validate()
    with pytest.raises(UsageError, match="classifier"):
        TrainConfig(genotype="mini-5cell-1", classifier="KNN").validate()
    with pytest.raises(UsageError, match="--checkpoint"):
        TrainConfig(eval_only=True).validate()
    assert TrainConfig(genotype="mini-5cell-1", classifier="proto").validate().classifier == "Proto"


def test_paper_presets():
    mini5 = paper_training_preset("MiniImageNet", 5)
    assert (mini5["epochs"], mini5["learning_rate"], mini5["lr_decay_epochs"], mini5["drop_path_prob"],
            mini5["batch_size"]) == (100, 0.02, [60, 80], 0.2, 64)
    assert paper_training_preset("mini", 8)["batch_size"] == 40
    tiered8 = paper_training_preset("MetaTieredImageNet", 8)
    assert (tiered8["epochs"], tiered8["learning_rate"], tiered8["lr_decay_epochs"], tiered8["drop_path_prob"],
            tiered8["batch_size"]) == (60, 0.01, [30, 40, 50], 0.1, 56)
    assert paper_training_preset("TieredImageNet", 5)["batch_size"] == 64
    TrainConfig(genotype="mini-5cell-1", **mini5).validate()
    with pytest.raises(UsageError):
        paper_training_preset("Digits", 5)


def test_random_arch_on_digits(tmp_path):
    cfg = TrainConfig(random_arch=True, arch_seed=1, dataset="Digits", image_size=8, init_channels=4, layers=2,
                      epochs=1, batch_size=64, learning_rate=0.05, n_shots=[1], n_queries=3, n_test_runs=2,
                      n_aug_support_samples=1, eval_splits=["val"], save_dir=str(tmp_path), progress=False)
    res = train_and_evaluate(cfg)
    assert res["status"] == "finished" and res["fewshot"]["val"]["1"]["episodes"] == 2
    assert math.isfinite(res["train"]["final"]["loss"])
    assert read_checkpoint(tmp_path / "checkpoint.pt")["net_kwargs"]["num_classes"] == 10


def test_eval_only_from_bare_state_dict(reference_run, synthetic_mini, tmp_path):
    ref_dir, ref = reference_run
    bare = tmp_path / "weights.pt"
    torch.save(read_checkpoint(ref_dir / "checkpoint.pt")["model"], bare)
    cfg = _cfg(synthetic_mini, tmp_path / "ev")
    res = evaluate_checkpoint(bare, cfg)
    assert res["fewshot"]["test"]["1"]["accuracies"] == ref["fewshot"]["test"]["1"]["accuracies"]
    with pytest.raises(DataError, match="does not fit"):
        evaluate_checkpoint(bare, cfg.replace(init_channels=8))
