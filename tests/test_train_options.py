"""Training and test options of the evaluation-speed issue: bf16 autocast / channels_last on the CPU, the
thread helper, --C / --nonorm / --proto_rule as test settings (cached results re-tested when they change,
results of earlier versions still cached), and their flags."""

from __future__ import annotations

import json
import math

import pytest
import torch

import eval_searched_arch
from eval_lib.config import EVAL_KEYS, TrainConfig, eval_settings
from eval_lib.train import train_and_evaluate
from search_lib.errors import UsageError
from search_lib.threads import THREADS_ENV, available_cpus, configure_threads


def _cfg(data_path, save_dir, **kw) -> TrainConfig:
    base = dict(genotype="mini-5cell-1", dataset="MiniImageNet", data_path=str(data_path), image_size=16,
                init_channels=4, layers=3, epochs=1, batch_size=16, learning_rate=0.05, lr_decay_epochs=[],
                drop_path_prob=0.1, n_shots=[1], n_queries=4, n_test_runs=3, n_aug_support_samples=2,
                eval_splits=["test"], save_dir=str(save_dir), progress=False, seed=3, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def test_bf16_autocast_and_channels_last_train_on_the_cpu(synthetic_mini, tmp_path):
    res = train_and_evaluate(_cfg(synthetic_mini, tmp_path, amp="bf16", channels_last=True))
    assert res["status"] == "finished" and math.isfinite(res["train"]["final"]["loss"])
    assert 0.0 <= res["fewshot"]["test"]["1"]["mean"] <= 100.0
    assert "bf16 autocast, channels_last" in (tmp_path / "train.log").read_text()


def test_amp_defaults_bf16_on_cuda_only():
    cfg = TrainConfig()
    assert cfg.amp_dtype("cuda") is torch.bfloat16 and cfg.amp_dtype("cpu") is None
    assert cfg.replace(amp="none").amp_dtype("cuda") is None
    assert cfg.replace(amp="bf16").amp_dtype("cpu") is torch.bfloat16
    with pytest.raises(UsageError, match="--amp"):
        cfg.replace(amp="fp8", genotype="mini-5cell-1").validate()


def test_new_flags_parse_and_are_forwarded_after_search():
    args = eval_searched_arch.build_parser().parse_args(
        ["--C", "0.5", "--nonorm", "--proto_rule", "rfs", "--fewshot_backend", "sklearn", "--amp", "none",
         "--channels_last", "--threads", "3"])
    assert (args.C, args.nonorm, args.proto_rule, args.fewshot_backend, args.amp, args.channels_last,
            args.threads) == (0.5, True, "rfs", "sklearn", "none", True, 3)
    from eval_lib.config import TRAIN_AFTER_SEARCH_FLAGS
    assert {"C", "nonorm", "proto_rule", "fewshot_backend", "amp", "channels_last"} <= set(TRAIN_AFTER_SEARCH_FLAGS)
    assert {"C", "nonorm", "proto_rule"} <= set(EVAL_KEYS)
    for bad in ({"C": 0.0}, {"C": float("nan")}, {"episode_batch": 0}, {"threads": 0}):
        with pytest.raises(UsageError):
            TrainConfig(genotype="mini-5cell-1", **bad).validate()


def test_changed_test_settings_retest_and_old_results_stay_cached(synthetic_mini, tmp_path):
    cfg = _cfg(synthetic_mini, tmp_path)
    first = train_and_evaluate(cfg)
    assert train_and_evaluate(cfg)["status"] == "cached"
    for change in ({"C": 0.1}, {"nonorm": True}, {"classifier": "Proto", "proto_rule": "rfs"}):
        assert train_and_evaluate(cfg.replace(**change))["status"] == "finished", change
    # results written before --C / --nonorm / --proto_rule existed: computed with the defaults, still cached
    train_and_evaluate(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    for key in ("C", "nonorm", "proto_rule"):
        results["config"].pop(key)
    (tmp_path / "results.json").write_text(json.dumps(results))
    again = train_and_evaluate(cfg)
    assert again["status"] == "cached" and again["fewshot"]["test"]["1"]["accuracies"] == \
        first["fewshot"]["test"]["1"]["accuracies"]
    assert eval_settings({})["C"] == 1.0 and eval_settings({"C": 2.0})["C"] == 2.0


def test_thread_helper_uses_the_override_the_environment_and_the_affinity(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert configure_threads(threads=1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv(THREADS_ENV, "2")
        assert configure_threads() == 2
        monkeypatch.setenv(THREADS_ENV, "many")
        with pytest.raises(UsageError, match=THREADS_ENV):
            configure_threads()
        monkeypatch.delenv(THREADS_ENV)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert configure_threads(workers=0) == available_cpus()
        assert configure_threads(workers=available_cpus() + 3) == 1  # never below one
    finally:
        torch.set_num_threads(before)


def test_device_augmentation_trains_on_the_cpu_and_is_off_by_default_there(synthetic_mini, tmp_path):
    assert not TrainConfig().use_gpu_augment("cpu") and TrainConfig().use_gpu_augment("cuda")
    assert not TrainConfig(transform="B").use_gpu_augment("cuda")
    res = train_and_evaluate(_cfg(synthetic_mini, tmp_path, gpu_augment=True))
    assert res["status"] == "finished" and math.isfinite(res["train"]["final"]["loss"])
    with pytest.raises(UsageError, match="transform A only"):
        train_and_evaluate(_cfg(synthetic_mini, tmp_path / "b", gpu_augment=True, transform="B"))
