"""The training benchmark runs end to end (tiny settings) and prints its JSON line."""

from __future__ import annotations

import json

from benchmarks import bench_train


def test_bench_train_json(capsys):
    assert bench_train.main(["--init_channels", "4", "--layers", "3", "--batch_size", "8", "--train_steps", "1",
                             "--episodes", "2", "--shots", "1", "--threads", "1", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["train_images_per_s_fp32"] > 0 and out["peak_memory_mb"] > 0
    assert set(out["fewshot"]) == {"fast_fused", "fast", "fast_features_sklearn", "per_episode_sklearn"}
    assert out["fewshot"]["per_episode_sklearn"]["speedup"] == 1.0


def test_bench_transforms_json(capsys):
    from benchmarks import bench_transforms

    assert bench_transforms.main(["--repeats", "1", "--scale", "0.05", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["cases"]) == len(bench_transforms.CASES)
    assert all(c["equal"] and c["speedup"] > 0 for c in out["cases"])
