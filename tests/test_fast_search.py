"""Whole tiny searches end with the same genotype and ranking on the fast path (several candidates per
pass) as on the one-by-one reference path (`--candidates_per_pass 1`), for several seeds.

(In a file of its own so that the test workers can run it beside the parity tests of test_fast_scoring.py.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import prune_metantknas


@pytest.fixture
def three_ops(monkeypatch):
    """Start the search with three ops per edge: two op rounds and the edge round, cheap enough for several
    seeds on the one-by-one path."""
    import search_lib.search.pruning as pruning
    from search_lib.models.ops import space_ops

    ops = space_ops("darts_fewshot")

    def initial_alive(self):
        alive = np.zeros((2, len(self.keys), len(self.ops)), dtype=bool)
        alive[:, :, [ops.index(o) for o in ("skip_connect", "sep_conv_3x3", "max_pool_3x3BN")]] = True
        return alive

    monkeypatch.setattr(pruning.PruningSearch, "initial_alive", initial_alive)


@pytest.mark.slow  # 28 s on 2 cores; the per-architecture κ and regions are checked by test_fast_scoring
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_searches_end_with_the_same_genotype(seed, three_ops, tmp_path):
    argv = ["--dataset", "MetaDigits", "--ntk_channels", "4", "--ntk_layers", "2", "--image_size", "8",
            "--batch_size", "2", "--n_ways", "3", "--repeat", "2", "--prune_number", "1", "--lr_batch_size", "40",
            "--lr_batches", "1", "--device", "cpu", "--rand_seed", str(seed)]
    assert prune_metantknas.main([*argv, "--save_dir", str(tmp_path / "ref"), "--candidates_per_pass", "1"]) == 0
    assert prune_metantknas.main([*argv, "--save_dir", str(tmp_path / "fast")]) == 0
    ref, fast = (json.loads((tmp_path / d / "genotype.json").read_text()) for d in ("ref", "fast"))
    assert fast["string"] == ref["string"]
    hist = [[json.loads(line) for line in (tmp_path / d / "history.jsonl").read_text().splitlines()]
            for d in ("ref", "fast")]
    for a, b in zip(*hist):  # the same ranking, round by round
        assert [c["rank_sum"] for c in a["candidates"]] == [c["rank_sum"] for c in b["candidates"]]
        assert [c["regions"] for c in a["candidates"]] == [c["regions"] for c in b["candidates"]]
