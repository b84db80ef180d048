"""Training and test options of the evaluation-speed issue: bf16 autocast / channels_last on the CPU, the
thread helper, --C / --nonorm / --proto_rule as test settings (cached results re-tested when they change,
results of earlier versions still cached), and their flags."""

from __future__ import annotations

import json
import math

import pytest
import torch

import eval_searched_arch
from eval_lib.train.train_config import EVAL_KEYS, TrainConfig, eval_settings
from eval_lib.train.training_run import train_and_evaluate
from search_lib.core.errors import UsageError
from search_lib.core.threads import THREADS_ENV, available_cpus, configure_threads


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


def test_new_flags_parse_and_are_forwarded_after_search():
    args = eval_searched_arch.build_parser().parse_args(
        ["--C", "0.5", "--nonorm", "--proto_rule", "rfs", "--fewshot_backend", "sklearn", "--amp", "none",
         "--channels_last", "--threads", "3"])
    assert (args.C, args.nonorm, args.proto_rule, args.fewshot_backend, args.amp, args.channels_last,
            args.threads) == (0.5, True, "rfs", "sklearn", "none", True, 3)
    from eval_lib.train.train_config import TRAIN_AFTER_SEARCH_FLAGS
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


# ---- the few-shot test's settings: one object, built and checked by the config ----

def test_the_config_builds_the_fewshot_settings_and_checks_them_once():
    from eval_lib.fewshot.meta_test import FewShotSettings

    cfg = TrainConfig(genotype="mini-5cell-1", classifier="proto", use_logits=True, fewshot_backend="sklearn", C=0.5,
                      nonorm=True, proto_rule="rfs", episode_batch=7, inference="eager", num_workers=2).validate()
    assert cfg.fewshot_settings("cpu") == FewShotSettings("Proto", use_logits=True, backend="sklearn", C=0.5,
                                                          normalize=False, proto_rule="rfs", episode_batch=7,
                                                          inference="eager", num_workers=2)
    default = TrainConfig().fewshot_settings("cuda")
    assert (default.classifier, default.inference, default.normalize) == ("LR", "fused", True)
    assert default.num_workers == min(4, available_cpus()) and TrainConfig().fewshot_settings("cpu").num_workers == 0
    for bad, flag in ((dict(C=0.0), "--C"), (dict(proto_rule="median"), "--proto_rule"),
                      (dict(fewshot_backend="numpy"), "--fewshot_backend"), (dict(inference="jit"), "--inference"),
                      (dict(episode_batch=0), "--episode_batch"), (dict(classifier="KNN"), "classifier")):
        with pytest.raises(UsageError, match=flag):
            TrainConfig(genotype="mini-5cell-1", **bad).validate()
        with pytest.raises(UsageError, match=flag):
            TrainConfig(**bad).fewshot_settings("cpu")


def test_the_fewshot_test_runs_with_the_configs_settings(synthetic_mini, tmp_path, monkeypatch):
    from eval_lib.train import evaluation

    seen, real = [], evaluation.meta_test
    monkeypatch.setattr(evaluation, "meta_test", lambda *a, **kw: seen.append(a[2]) or real(*a, **kw))
    cfg = _cfg(synthetic_mini, tmp_path, classifier="NN", inference="eager", episode_batch=2)
    train_and_evaluate(cfg)
    assert seen == [cfg.fewshot_settings("cpu")]


def test_each_epochs_batches_are_a_function_of_the_seed_and_the_epoch(synthetic_mini):
    """The loader's order (its augmentations draw from torch's global generator, which a checkpoint restores),
    and with --gpu_augment the images themselves."""
    from eval_lib.train.training_run import TrainingData, _EpochBatches
    from search_lib.core.distributed import World

    cfg = _cfg(synthetic_mini, "unused", batch_size=8)
    data = TrainingData.load(cfg)
    for gpu_augment in (False, True):
        batches = _EpochBatches(cfg.replace(gpu_augment=gpu_augment), data, torch.device("cpu"), World())
        assert (batches.device_batches is not None) == gpu_augment
        first = [next(iter(batches.epoch(e))) for e in (0, 1, 0)]
        key = 0 if gpu_augment else 2  # the images, or the indices
        assert torch.equal(first[0][key], first[2][key]) and not torch.equal(first[0][key], first[1][key])
