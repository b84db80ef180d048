"""CUDA checks: skipped on machines without a GPU (CI has none). `make gpu-check` runs them, then the timed runs
of benchmarks/gpu_check.py. The device-independent logic of these paths is also checked on the CPU with CUDA
mocked (tests/test_cuda_paths.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from search_lib.models.supernet import Supernet, init_weights, replace_norm
from search_lib.search.kernels import empirical_ntk

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ROOT = Path(__file__).resolve().parents[1]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
TINY_SEARCH = ["--dataset", "MetaDigits", "--ntk_channels", "4", "--image_size", "8", "--batch_size", "2",
               "--repeat", "1", "--prune_number", "6", "--lr_batch_size", "50", "--lr_batches", "1",
               "--rand_seed", "0"]


def test_empirical_ntk_on_cuda_matches_cpu():
    net = replace_norm(Supernet(4, 5, 10), "groupnorm16").double()
    init_weights(net, "fan_out", seed=0)
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    cpu = empirical_ntk(net, x)
    gpu = empirical_ntk(net.cuda(), x.cuda())
    assert gpu.device.type == "cuda"
    assert torch.allclose(cpu, gpu.cpu(), rtol=1e-8, atol=1e-10)


def test_tiny_search_on_cuda_finds_the_cpus_genotype(tmp_path):
    import prune_metantknas

    for device in ("cpu", "cuda"):
        code = prune_metantknas.main([*TINY_SEARCH, "--device", device, "--save_dir", str(tmp_path / device)])
        assert code == 0 and (tmp_path / device / "done").exists()
    genotypes = [json.loads((tmp_path / d / "genotype.json").read_text())["genotype"] for d in ("cpu", "cuda")]
    assert genotypes[0] == genotypes[1]


def test_the_kernels_of_a_pass_reach_the_host_and_match_the_cpus(monkeypatch):
    from search_lib.data import load_split
    from search_lib.search import scoring
    from search_lib.search.pruning import PruningSearch
    from search_lib.search.search_config import SearchConfig

    devices, real = [], scoring.condition_number
    monkeypatch.setattr(scoring, "condition_number", lambda K, c="": devices.append(K.device.type) or real(K, c))
    cfg = SearchConfig(dataset="MetaDigits", ntk_channels=4, ntk_layers=2, image_size=8, batch_size=2, n_ways=3,
                       repeat=1, regions_batches=1, regions_batch_size=50, rand_seed=0, device="cuda").validate()
    split = load_split(cfg.data, None, "train")
    kappas = {}
    for device in ("cpu", "cuda"):
        scorer = scoring.CandidateScorer(cfg, split, torch.device(device), len(split.class_ids))
        alive = PruningSearch(cfg).initial_alive()
        scorer.begin_repeat(0)
        kappas[device] = scorer.kappas_many([alive, alive], ["a", "b"])
        scorer.end_repeat()
        scorer.close()
    assert devices == ["cpu"] * 4
    # float32 on both, rounded differently; TF32 moved κ by 0.7-2.1% (docs/method.md §4)
    assert np.allclose(kappas["cuda"], kappas["cpu"], rtol=1e-3)


def test_fused_inference_on_cuda_is_really_fused_and_matches_eager():
    from eval_lib.fewshot.inference import inference_network
    from eval_lib.rfs_models.augment_cnn import AugmentCNN
    from search_lib.models.genotypes import PRESETS

    class Features(nn.Module):  # what the few-shot test rewrites: the features, not AugmentCNN's own forward
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x, return_features=True)[0]

    torch.manual_seed(0)
    net = Features(AugmentCNN(PRESETS["mini-5cell-1"], C=8, layers=5, num_classes=5)).eval().cuda()
    fast = inference_network(net, "fused")
    assert isinstance(fast, torch.fx.GraphModule)
    x = torch.randn(16, 3, 32, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), net(x),
                                   rtol=1e-3, atol=1e-3)


def _train_cfg(data_path, save_dir, **kw):
    from eval_lib.train.train_config import TrainConfig

    base = dict(genotype="mini-5cell-1", dataset="MiniImageNet", data_path=str(data_path), image_size=16,
                init_channels=4, layers=2, epochs=1, batch_size=16, learning_rate=0.05, lr_decay_epochs=[],
                n_shots=[1], n_queries=4, n_test_runs=5, n_aug_support_samples=2, eval_splits=["test"],
                save_dir=None if save_dir is None else str(save_dir), progress=False, seed=3, device="cuda",
                num_workers=0)
    return TrainConfig(**{**base, **kw})


def test_a_bf16_training_epoch_with_gpu_augment_and_its_fewshot_test(synthetic_mini, tmp_path):
    from eval_lib.train.training_run import train_and_evaluate

    res = train_and_evaluate(_train_cfg(synthetic_mini, tmp_path, amp="bf16"))
    log = (tmp_path / "train.log").read_text()
    assert res["status"] == "finished" and np.isfinite(res["train"]["final"]["loss"])
    assert "bf16 autocast" in log and "--gpu_augment: the training images" in log
    assert res["memory"]["train"]["measure"] == "cuda_max_memory_allocated"
    assert res["memory"]["train"]["gpu_augment_bytes"] > 0 and res["fewshot"]["test"]["1"]["episodes"] == 5


def test_an_fp16_training_resumes_on_cuda_with_its_scaler_and_the_gpus_generator(synthetic_mini, tmp_path):
    from eval_lib.train.training_run import train_and_evaluate

    cfg = _train_cfg(synthetic_mini, tmp_path, amp="fp16", epochs=2, gpu_augment=False)
    assert train_and_evaluate(cfg.replace(stop_after_epoch=1))["status"] == "stopped"
    ckpt = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert isinstance(ckpt["rng"]["cuda"], torch.Tensor) and ckpt["scaler"]["scale"] > 0
    res = train_and_evaluate(cfg)
    assert res["status"] == "finished" and res["train"]["epochs"] == 2 and np.isfinite(res["train"]["final"]["loss"])


def test_device_batches_on_cuda_are_a_function_of_the_seed():
    from eval_lib.train.device_batches import DeviceBatches
    from search_lib.data import build_transform

    images = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    batches = DeviceBatches(images, np.arange(40) % 5, torch.device("cuda"), 16, build_transform("A", True,
                                                                                                 image_size=16))
    assert batches.nbytes == images.nbytes + 40 * 8
    first, again, other = (list(batches.epoch(s)) for s in (1, 1, 2))
    assert len(first) == 2 and first[0][0].device.type == "cuda" and first[0][0].dtype == torch.float32
    assert first[0][0].shape == (16, 3, 16, 16)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again)) and not torch.equal(first[0][0], other[0][0])


def test_the_memory_meter_and_the_budget_on_cuda():
    from search_lib.core.memory import MemoryMeter, cuda_free, default_budget

    device = torch.device("cuda", torch.cuda.current_device())
    meter = MemoryMeter(device)
    with meter.window() as win:
        block = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    assert win.peak - win.start >= 64 << 20
    del block  # its block stays cached by the allocator: free to this process, not to the device
    free, _ = torch.cuda.mem_get_info(device)
    assert cuda_free(device) >= free + (64 << 20)
    assert default_budget(device) > 0.79 * cuda_free(device)


def test_the_fewshot_test_on_cuda_matches_the_cpu(synthetic_mini, tmp_path):
    from eval_lib.fewshot.meta_test import FewShotSettings, meta_test
    from eval_lib.train.evaluation import evaluate_checkpoint
    from eval_lib.train.training_run import train_and_evaluate

    train_and_evaluate(_train_cfg(synthetic_mini, tmp_path / "run", device="cpu", n_test_runs=1))
    results = {d: evaluate_checkpoint(tmp_path / "run" / "checkpoint.pt", _train_cfg(
        synthetic_mini, None, device=d, n_test_runs=20, n_queries=5, genotype=None))["fewshot"]["test"]["1"]
        for d in ("cpu", "cuda")}
    same = np.mean(np.array(results["cpu"]["accuracies"]) == np.array(results["cuda"]["accuracies"]))
    assert same >= 0.9, results
    # any dataset of episodes (the loader pins them; the copies to the GPU are asynchronous)
    from eval_lib.rfs_models.augment_cnn import AugmentCNN
    from search_lib.models.genotypes import PRESETS

    torch.manual_seed(0)
    net = AugmentCNN(PRESETS["mini-5cell-1"], C=4, layers=2, num_classes=5).eval()
    g = torch.Generator().manual_seed(0)
    episodes = [(torch.randn(5, 3, 16, 16, generator=g), torch.arange(5), torch.randn(10, 3, 16, 16, generator=g),
                 torch.arange(5).repeat(2)) for _ in range(4)]
    settings = FewShotSettings(classifier="NN", num_workers=1)
    cpu = meta_test(net, episodes, settings, device="cpu", progress=False)
    gpu = meta_test(net.cuda(), episodes, settings, device="cuda", progress=False)
    assert sum(a == b for a, b in zip(cpu["accuracies"], gpu["accuracies"])) >= 3  # float rounding may flip one


@two_gpus
def test_an_explicit_second_gpu_becomes_the_current_device():
    from search_lib.core.session import run_session

    try:
        with run_session("cuda:1", 1) as session:
            assert session.device == torch.device("cuda", 1) and torch.cuda.current_device() == 1
    finally:
        torch.cuda.set_device(0)


@two_gpus
def test_two_processes_train_over_nccl(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "eval_searched_arch.py"), "--dataset", "Digits", "--random_arch", "--seed", "0",
           "--init_channels", "4", "--layers", "2", "--epochs", "1", "--batch_size", "64", "--n_test_runs", "9",
           "--n_queries", "5", "--num_workers", "0", "--device", "cuda", "--progress", "false",
           "--eval_splits", "test", "--save_dir", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert results["processes"] == 2 and results["fewshot"]["test"]["1"]["episodes"] == 9
