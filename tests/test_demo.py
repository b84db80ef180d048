"""The demo's training on the built-in digits data really learns something transferable (slow)."""

from __future__ import annotations

import pytest
import torch

from eval_lib.train.evaluation import fewshot_evaluate
from eval_lib.train.network import build_network
from eval_lib.train.train_config import TrainConfig
from eval_lib.train.training_run import train_and_evaluate
from search_lib.core.utils import set_seed
from search_lib.models.genotypes import PRESETS


@pytest.mark.slow
def test_training_beats_the_untrained_network_on_novel_digits(tmp_path, capsys):
    # The demo's training settings (Makefile `demo`), on a published genotype.
    cfg = TrainConfig(genotype="mini-5cell-1", dataset="Digits", init_channels=8, layers=5, epochs=10,
                      batch_size=64, learning_rate=0.05, lr_decay_epochs=[7], drop_path_prob=0.1, n_shots=[5],
                      n_queries=15, n_test_runs=100, eval_splits=["test"], num_workers=0, device="cpu",
                      save_dir=str(tmp_path / "run"), progress=False)
    trained = train_and_evaluate(cfg)["fewshot"]["test"]["5"]["mean"]

    # The same network at its initialisation (training seeds the global RNG the same way before building
    # it), tested on the same fixed-seed episodes.
    set_seed(cfg.seed)
    model = build_network(PRESETS["mini-5cell-1"], dict(C=8, layers=5, num_classes=10, stem_multiplier=1, fsr=2,
                                                        in_channels=3))
    untrained = fewshot_evaluate(model, cfg, "Digits", None, "A", None, torch.device("cpu"))["test"]["5"]["mean"]
    with capsys.disabled():
        print(f"\ndigits novel 5-way 5-shot: untrained {untrained:.2f}%, trained {trained:.2f}%")
    assert trained > untrained + 2.0
