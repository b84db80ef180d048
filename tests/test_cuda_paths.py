"""What a CUDA machine does differently, checked on the CPU with torch.cuda's answers mocked where the logic does
not depend on the device: the random-number state of the run's GPU only, `torch.cuda.set_device` for an
explicit index, the bf16 / fp16 choice, --gpu_augment's decision from the free memory, the memory budget with
the process's cached blocks, full float32 while the search scores, and the alphas never read back from the
device. The same paths on a real GPU: tests/test_gpu.py (``-m gpu``)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from eval_lib.train.device_batches import GPU_AUGMENT_SHARE, use_gpu_augment
from eval_lib.train.epoch import grad_scaler
from eval_lib.train.train_config import TrainConfig
from eval_lib.train.training_run import train_and_evaluate
from search_lib.core.distributed import World
from search_lib.core.errors import UsageError
from search_lib.core.memory import cuda_free, default_budget
from search_lib.core.session import run_session
from search_lib.core.utils import rng_state, set_rng_state
from search_lib.models.supernet import Supernet

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.fixture
def gpus(monkeypatch):
    """Two mocked GPUs: their generators' states, and the calls that set them or the current device."""
    states = {0: torch.tensor([0, 0], dtype=torch.uint8), 1: torch.tensor([1, 1], dtype=torch.uint8)}
    calls = {"set_rng_state": [], "set_device": []}

    def index(device):
        return 0 if device in (None, "cuda") else torch.device(device).index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[index(device)].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": calls["set_rng_state"].append((torch.device(device), state)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls["set_device"].append(device))
    for name in ("get_rng_state_all", "set_rng_state_all"):  # every visible GPU: what broke a narrowed resume
        monkeypatch.setattr(torch.cuda, name, lambda *a, _name=name: pytest.fail(f"torch.cuda.{_name} called"))
    return states, calls


def test_the_rng_state_holds_the_runs_gpu_and_restores_with_fewer_gpus_visible(gpus, caplog):
    states, calls = gpus
    saved = rng_state(CUDA1)  # a run on the second of two GPUs ...
    assert torch.equal(saved["cuda"], states[1])
    set_rng_state(saved, CUDA0)  # ... resumed where only that GPU is visible, now numbered 0
    assert [(d, s.tolist()) for d, s in calls["set_rng_state"]] == [(CUDA0, [1, 1])]
    calls["set_rng_state"].clear()
    set_rng_state(saved, torch.device("cpu"))  # resumed on the CPU: the GPU's state is not used
    assert calls["set_rng_state"] == [] and "cuda" not in rng_state(torch.device("cpu"))
    # an earlier version's snapshot: every visible GPU's state; the run's own index, or none at all
    old = {**saved, "cuda": [states[0], states[1]]}
    set_rng_state(old, CUDA1)
    assert [(d, s.tolist()) for d, s in calls["set_rng_state"]] == [(CUDA1, [1, 1])]
    calls["set_rng_state"].clear()
    with caplog.at_level(logging.WARNING, logger="metantknas"):
        set_rng_state({**saved, "cuda": [states[0]]}, CUDA1)
    assert calls["set_rng_state"] == [] and "no generator for cuda:1" in caplog.text


def test_an_explicit_gpu_index_becomes_the_current_device(gpus):
    _, calls = gpus
    before = torch.get_num_threads()
    try:
        with run_session("cuda:1", 1) as session:
            assert session.device == CUDA1
        assert calls["set_device"] == [CUDA1]
        with run_session("cuda", 1):  # no index: the current device, whatever it is, stays
            pass
        assert calls["set_device"] == [CUDA1]
    finally:
        torch.set_num_threads(before)


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available")
@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float16)],
                         ids=["ampere-or-later", "v100-t4"])
def test_bf16_by_default_only_where_the_gpu_runs_it_natively(monkeypatch, native, expected):
    def is_bf16_supported(including_emulation: bool = True):
        return native or including_emulation  # pre-Ampere cards emulate it

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    cfg = TrainConfig()
    assert cfg.amp_dtype("cuda") is expected and cfg.amp_dtype("cpu") is None
    assert cfg.replace(amp="none").amp_dtype("cuda") is None
    assert cfg.replace(amp="bf16").amp_dtype("cuda") is torch.bfloat16
    assert cfg.replace(amp="fp16").amp_dtype("cpu") is torch.float16
    assert isinstance(grad_scaler(CUDA0, torch.float16), torch.amp.GradScaler)
    assert grad_scaler(CUDA0, torch.bfloat16) is None and grad_scaler(CUDA0, None) is None
    with pytest.raises(UsageError, match="--amp"):
        cfg.replace(amp="fp8", genotype="mini-5cell-1").validate()


def test_fp16_trains_with_a_gradient_scaler_that_the_checkpoint_keeps(synthetic_mini, tmp_path):
    cfg = TrainConfig(genotype="mini-5cell-1", dataset="MiniImageNet", data_path=str(synthetic_mini), image_size=16,
                      init_channels=4, layers=2, epochs=2, batch_size=16, learning_rate=0.05, lr_decay_epochs=[],
                      n_shots=[1], n_queries=2, n_test_runs=2, n_aug_support_samples=1, eval_splits=["test"],
                      save_dir=str(tmp_path), progress=False, seed=1, threads=1, amp="fp16")
    assert train_and_evaluate(cfg.replace(stop_after_epoch=1))["status"] == "stopped"
    ckpt = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["scaler"]["scale"] > 0 and "fp16 autocast, gradient scaler" in (tmp_path / "train.log").read_text()
    res = train_and_evaluate(cfg)
    assert res["status"] == "finished" and math.isfinite(res["train"]["final"]["loss"])
    assert "scaler" in torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)


@pytest.fixture
def gpu_memory(monkeypatch):
    """A mocked GPU: ``memory["free"]`` free bytes, ``memory["reserved"]`` held by this process's allocator, of
    which ``memory["allocated"]`` in use."""
    memory = {"free": 0, "reserved": 0, "allocated": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (memory["free"], 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: memory["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: memory["allocated"])
    return memory


def test_the_gpu_budget_counts_the_processs_cached_blocks_as_free(gpu_memory):
    gpu_memory.update(free=2 << 30, reserved=6 << 30, allocated=1 << 30)  # a scorer before this one cached 5 GiB
    assert cuda_free(CUDA0) == 7 << 30
    assert default_budget(CUDA0) == int(0.8 * (7 << 30)) + (1 << 30)


def test_gpu_augment_by_default_only_where_the_images_fit_well(gpu_memory, caplog):
    images = np.zeros((64, 8, 8, 3), np.uint8)  # 12 KiB
    cfg = TrainConfig(genotype="mini-5cell-1")
    gpu_memory.update(free=int(images.nbytes / GPU_AUGMENT_SHARE))
    assert use_gpu_augment(cfg, images, CUDA0, World())
    gpu_memory.update(free=int(images.nbytes / GPU_AUGMENT_SHARE) - 1)
    with caplog.at_level(logging.INFO, logger="metantknas.eval"):
        assert not use_gpu_augment(cfg, images, CUDA0, World())
    assert "--gpu_augment off" in caplog.text
    gpu_memory.update(reserved=1 << 20)  # the process's own cached blocks are room too
    assert use_gpu_augment(cfg, images, CUDA0, World())
    gpu_memory.update(free=0, reserved=0)
    assert use_gpu_augment(cfg.replace(gpu_augment=True), images, CUDA0, World())  # asked for: on
    assert not use_gpu_augment(cfg.replace(transform="B"), images, CUDA0, World())
    assert not use_gpu_augment(cfg, images, torch.device("cpu"), World())
    with pytest.raises(UsageError, match="transform A only"):
        use_gpu_augment(cfg.replace(gpu_augment=True, transform="B"), images, CUDA0, World())


def test_scoring_runs_in_full_float32_and_restores_the_flags(monkeypatch):
    from search_lib.data import load_split
    from search_lib.search import scoring
    from search_lib.search.pruning import PruningSearch
    from search_lib.search.search_config import SearchConfig

    flags = lambda: (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)  # noqa: E731
    seen = []
    for name in ("gram_blocks", "gram_by_group"):
        real = getattr(scoring, name)
        monkeypatch.setattr(scoring, name, lambda *a, _real=real, **k: seen.append(flags()) or _real(*a, **k))
    cfg = SearchConfig(dataset="MetaDigits", ntk_channels=4, ntk_layers=2, image_size=8, batch_size=2, n_ways=3,
                       repeat=1, regions_batches=1, regions_batch_size=50, rand_seed=0, device="cpu").validate()
    split = load_split(cfg.data, None, "train")
    scorer = scoring.CandidateScorer(cfg, split, torch.device("cpu"), len(split.class_ids))
    alive = PruningSearch(cfg).initial_alive()
    before = flags()
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"  # e.g. the user's
    try:
        scorer.begin_repeat(0)
        kappas = [scorer.kappa(alive, "one")] + scorer.kappas_many([alive, alive], ["a", "b"])
        scorer.end_repeat()
        assert flags() == ("tf32", "tf32")
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before
        scorer.close()
    # one κ, from passes of one and of two (its last digits may differ between them on some CPUs: tests/histories.py)
    assert seen == [("ieee", "ieee")] * 2 and np.allclose(kappas, kappas[0], rtol=1e-4, atol=0)


def test_the_supernet_reads_its_alphas_from_the_host_unless_they_changed_on_the_device(monkeypatch):
    net = Supernet(2, 5, 3)
    x = torch.randn(2, 3, 8, 8)
    normal, reduce = torch.randn(9, 8), torch.randn(9, 8)
    net.set_alphas(normal, reduce)
    expected = net(x)[1]
    reads = []
    real = Supernet.edge_weights
    monkeypatch.setattr(Supernet, "edge_weights", staticmethod(lambda a: reads.append(a) or real(a)))
    assert torch.equal(net(x)[1], expected) and reads == []  # the weights kept by set_alphas
    net.alphas_normal.fill_(0.0)  # changed in place (load_state_dict too): read again, once
    changed = net(x)[1]
    assert len(reads) == 2 and not torch.equal(changed, expected) and torch.equal(net(x)[1], changed)
    assert len(reads) == 2
    net.load_state_dict({**net.state_dict(), "alphas_normal": normal})
    assert torch.equal(net(x)[1], expected)
