"""CUDA checks: skipped on machines without a GPU (CI has none)."""

from __future__ import annotations

import pytest
import torch

from search_lib.models.supernet import Supernet, init_weights, replace_norm
from search_lib.search.kernels import empirical_ntk

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_empirical_ntk_on_cuda_matches_cpu():
    net = replace_norm(Supernet(4, 5, 10), "groupnorm16").double()
    init_weights(net, "fan_out", seed=0)
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    cpu = empirical_ntk(net, x)
    gpu = empirical_ntk(net.cuda(), x.cuda())
    assert gpu.device.type == "cuda"
    assert torch.allclose(cpu, gpu.cpu(), rtol=1e-8, atol=1e-10)


def test_tiny_search_runs_on_cuda(tmp_path):
    import prune_metantknas

    code = prune_metantknas.main(["--dataset", "MetaDigits", "--ntk_channels", "4", "--image_size", "8",
                                  "--batch_size", "2", "--repeat", "1", "--prune_number", "6",
                                  "--lr_batch_size", "50", "--lr_batches", "1", "--device", "cuda",
                                  "--rand_seed", "0", "--save_dir", str(tmp_path / "s")])
    assert code == 0 and (tmp_path / "s" / "done").exists()


def test_rewritten_inference_network_on_cuda_matches_eager():
    from eval_lib.fewshot.inference import inference_network
    from eval_lib.rfs_models.augment_cnn import AugmentCNN
    from search_lib.models.genotypes import PRESETS

    torch.manual_seed(0)
    net = AugmentCNN(PRESETS["mini-5cell-1"], C=8, layers=5, num_classes=5).eval().cuda()
    fast = inference_network(net, "fused")
    x = torch.randn(16, 3, 32, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), net(x),
                                   rtol=1e-3, atol=1e-4)
