"""The fast path of the search (several architectures per pass) against the reference (one per pass).

`CandidateScorer.kappas_many` / `regions_many` repeat the batch once per architecture and give every copy its own op
weights; `kappa` / `regions` score one architecture with its own pass, the obviously correct path that
the search used before. Both must give the same κ (float64: relative difference < 1e-5; float32: < 1e-3)
and exactly the same region counts, on both spaces, 3 and 4 nodes, MAML, ANIL and the plain NTK; and
whole tiny searches must end with the same genotype.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import prune_metantknas
from search_lib.data import load_split
from search_lib.search.kernels import KAPPA_SENTINEL
from search_lib.search.pruning import Candidate, PruningSearch, repeat_seed
from search_lib.search.scoring import CandidateScorer
from search_lib.search.search_config import SearchConfig

BASE = dict(dataset="MetaDigits", ntk_channels=4, ntk_layers=5, image_size=8, batch_size=2, n_ways=3, repeat=1,
            regions_batches=2, regions_batch_size=200, rand_seed=0, device="cpu")
CASES = {  # 5 cells for one case (normal and reduction cells); 2 (two reduction cells) keep the others cheap
    "maml-darts_fewshot-3": dict(),
    "anil-tau1-darts-4": dict(algorithm="ANIL", inner_lr_time=1.0, reg_coef=1e-5, search_space_name="darts",
                              max_nodes=4, ntk_layers=2),
    "ntk-darts_fewshot-4": dict(dataset="Digits", ntk_type="NTK", batch_size=6, max_nodes=4, ntk_layers=2),
    "ntk-darts-3-wb-eval": dict(dataset="Digits", ntk_type="NTK", batch_size=6, search_space_name="darts",
                                params_types="wb", bn_mode="eval", ntk_layers=2),
}


N_SEARCHED = 8  # the first archs of `_archs`: what a search scores (full network, op and edge candidates)


def _archs(search: PruningSearch, alive: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """The full network, six op candidates and a whole dead edge, then random partial prunings (networks a
    search never scores: some have dead nodes and badly conditioned kernels)."""
    cands = search.op_candidates(alive)
    picks = [cands[i] for i in rng.choice(len(cands), size=N_SEARCHED - 2, replace=False)]
    archs = [alive] + [c.without(alive) for c in picks] + [Candidate(1, 2, None).without(alive)]
    for _ in range(3):
        a = alive & (rng.random(alive.shape) > 0.5)
        archs.append(a)
    return archs


# the 4-node cases have the most expensive reference scoring (18-23 s each on 2 cores): `make test-slow`
SLOW_CASES = {"anil-tau1-darts-4", "ntk-darts_fewshot-4"}


@pytest.fixture(scope="module", params=[pytest.param(k, marks=pytest.mark.slow) if k in SLOW_CASES else k
                                        for k in sorted(CASES)])
def scored(request):
    """Reference and fast scores of the same architectures, with the same weights and batch."""
    cfg = SearchConfig(**{**BASE, **CASES[request.param]}).validate()
    split = load_split(cfg.data, None, "train")
    scorer = CandidateScorer(cfg, split, torch.device("cpu"), len(split.class_ids))
    search = PruningSearch(cfg)
    archs = _archs(search, search.initial_alive(), np.random.default_rng(1))
    out = {}
    for dtype in (torch.float32, torch.float64):
        scorer.model.to(dtype)
        scorer.begin_repeat(repeat_seed(cfg.rand_seed, 0, 0))
        scorer._inputs = scorer._inputs.to(dtype)
        try:
            ref = [(scorer.kappa(a, "ref"), scorer.regions(a)) for a in archs]
            fast = list(zip(scorer.kappas_many(archs, ["fast"] * len(archs)), scorer.regions_many(archs)))
        finally:
            scorer.end_repeat()
        out[dtype] = (ref, fast)
    scorer.model.float()
    return request.param, out


def test_fast_kappa_matches_the_reference(scored):
    name, out = scored
    # float64: every architecture; float32: those a search scores. The forward passes are bit-identical
    # (checked), but the float32 Gram products come from another matrix-product kernel (bmm, not mm) and
    # round differently: measured up to 2.5e-4 on searched candidates and 1.2e-3 on one random half-pruned
    # network that no search would score.
    for dtype, tol, n in ((torch.float64, 1e-5, None), (torch.float32, 1e-3, N_SEARCHED)):
        ref, fast = out[dtype]
        k_ref = np.array([k for k, _ in ref][:n])
        k_fast = np.array([k for k, _ in fast][:n])
        assert np.all(np.isfinite(k_ref)) and not np.any(k_ref == KAPPA_SENTINEL), name
        rel = np.abs(k_fast - k_ref) / np.abs(k_ref)
        assert rel.max() < tol, (name, dtype, rel.max())


def test_fast_regions_equal_the_reference(scored):
    name, out = scored
    for ref, fast in out.values():
        assert [r for _, r in fast] == [r for _, r in ref], name
        assert len({r for _, r in ref}) > 1  # the architectures really differ in their counts


def test_candidates_per_pass_is_chosen_from_memory_and_can_be_forced():
    cfg = SearchConfig(**BASE).validate()
    split = load_split(cfg.data, None, "train")
    scorer = CandidateScorer(cfg, split, torch.device("cpu"), len(split.class_ids))
    scorer.begin_repeat(0)
    try:
        assert 1 < scorer.candidates_per_pass() <= 64
        cfg.candidates_per_pass = 5
        assert scorer.candidates_per_pass() == 5
    finally:
        scorer.end_repeat()


def test_default_path_with_one_kernel_per_pass_still_batches_the_regions(monkeypatch):
    """A large supernet on the CPU (one kernel per pass): the kernels go one by one, the regions
    `REGIONS_PER_PASS` at a time, and the scores equal the reference path's exactly."""
    import search_lib.search.scoring as scoring

    cfg = SearchConfig(**{**BASE, "ntk_layers": 2}).validate()  # "large" is CPU_BATCHING_LIMIT 0 below
    split = load_split(cfg.data, None, "train")
    scorer = CandidateScorer(cfg, split, torch.device("cpu"), len(split.class_ids))
    search = PruningSearch(cfg)
    archs = _archs(search, search.initial_alive(), np.random.default_rng(2))
    monkeypatch.setattr(scoring, "CPU_BATCHING_LIMIT", 0)
    monkeypatch.setattr(scoring, "REGIONS_PER_PASS", 4)  # several passes, the last one partial
    passes = []
    score_many = scorer.regions_scorer.score_many
    monkeypatch.setattr(scorer.regions_scorer, "score_many", lambda n, r: passes.append(len(n)) or score_many(n, r))
    scorer.begin_repeat(repeat_seed(cfg.rand_seed, 0, 0))
    try:
        assert scorer.candidates_per_pass() == 1
        fast = search.score_archs(scorer, archs, ["fast"] * len(archs))
        ref = [(scorer.kappa(a, "ref"), scorer.regions(a)) for a in archs]
    finally:
        scorer.end_repeat()
    assert passes == [4, 4, 3]
    assert fast == ref


def test_fast_path_reports_non_finite_and_failed_kernels(synthetic_mini, monkeypatch, tmp_path):
    """Blocks with NaN/Inf entries and MetaNTK solves that fail get the sentinel, each counted once."""
    import search_lib.search.scoring as scoring

    real_blocks, real_metantk = scoring.gram_blocks, scoring.analytical_metantk
    calls = {"metantk": 0}

    def blocks(*a, **k):  # in every pass, architecture 1 gets NaN and architecture 2 Inf entries
        grams = real_blocks(*a, **k)
        for g in grams.values():
            if g.shape[0] > 2:
                g[1], g[2] = float("nan"), float("inf")
        return grams

    def metantk(*a, **k):  # and every fifth MetaNTK solve fails as on a singular kernel
        calls["metantk"] += 1
        if calls["metantk"] % 5 == 0:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real_metantk(*a, **k)

    monkeypatch.setattr(scoring, "gram_blocks", blocks)
    monkeypatch.setattr(scoring, "analytical_metantk", metantk)
    argv = ["--dataset", "MetaMiniImageNet", "--data_path", str(synthetic_mini), "--ntk_channels", "4",
            "--ntk_layers", "2", "--image_size", "8", "--batch_size", "2", "--n_ways", "2", "--repeat", "1",
            "--prune_number", "3", "--lr_batch_size", "50", "--lr_batches", "1", "--device", "cpu", "--rand_seed", "3",
            "--save_dir", str(tmp_path / "run")]
    assert prune_metantknas.main(argv) == 0
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    events = sum(rec["sentinel_events"] for rec in history)
    sentinels = sum(k == KAPPA_SENTINEL for rec in history for c in rec["candidates"] for k in c["kappa"])
    sentinels += sum(k == KAPPA_SENTINEL for rec in history for k in rec["kappa_full"])
    assert events >= 2 * len(history) and events == sentinels
    assert "singular or non-finite kernel (repeat 0 without " in (tmp_path / "run" / "search.log").read_text()
