"""The search's objectives (--objective, --combine; docs/method.md §4b): the default gives main's history and
genotype unchanged, each zero-cost proxy drives a tiny search to a valid genotype, a recorded proxy value is the
proxy computed by hand on the masked supernet, the order of --objective does not matter, and a search killed
after a round resumes to the same result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import two_op_search
from histories import assert_same_scores

import prune_metantknas
from search_lib.core.errors import UsageError
from search_lib.data import load_split
from search_lib.models.genotypes import Genotype
from search_lib.models.space import SearchSpace
from search_lib.models.supernet import Supernet, init_weights, replace_norm
from search_lib.search.objectives import OBJECTIVES, log_rank_sum, parse_objectives
from search_lib.search.pruning import PruningSearch, scores_text
from search_lib.search.ranking import alphas_from_alive, repeat_seed, round_sig
from search_lib.search.scoring import CandidateScorer, LogitsOf
from search_lib.search.search_config import SearchConfig
from search_lib.search.zero_cost import ZERO_COST_PROXIES

FIXTURE = Path(__file__).parent / "fixtures" / "default_objective"
# the search whose history.jsonl (without `measured`) and genotype.json main recorded in FIXTURE (one thread:
# κ's last digits depend on the thread count, on main as here)
DEFAULT_ARGV = ["--dataset", "MetaDigits", "--ntk_channels", "4", "--ntk_layers", "2", "--image_size", "8",
                "--batch_size", "2", "--n_ways", "3", "--repeat", "1", "--prune_number", "6", "--lr_batch_size", "40",
                "--lr_batches", "1", "--device", "cpu", "--rand_seed", "0", "--threads", "1"]
# a proxy search small enough for ten: two cells (both reductions), few candidates (`two_ops`)
TINY = ["--dataset", "MetaDigits", "--ntk_channels", "4", "--ntk_layers", "2", "--image_size", "8", "--batch_size",
        "2", "--n_ways", "2", "--repeat", "1", "--prune_number", "1", "--device", "cpu",
        "--rand_seed", "0"]


@pytest.fixture
def two_ops(monkeypatch):
    """Start the search with two ops on the first edge of each cell and one on the others: one op round of four
    candidates, then the edge round."""
    two_op_search(monkeypatch)


def _search(save: Path, *extra: str, argv=TINY) -> tuple[Genotype, list[dict]]:
    assert prune_metantknas.main([*argv, "--save_dir", str(save), *extra]) == 0
    geno = Genotype.from_dict(json.loads((save / "genotype.json").read_text()))
    return geno, [json.loads(x) for x in (save / "history.jsonl").read_text().splitlines()]


def _valid(geno: Genotype) -> None:
    geno.validate(SearchSpace("darts_fewshot", 3))
    for cell in (geno.normal, geno.reduce):
        assert len(cell) == 3 and all(len(node) == 2 and node[0][1] != node[1][1] for node in cell)


def test_the_default_objective_gives_mains_history_and_genotype(tmp_path):
    _search(tmp_path / "default", argv=DEFAULT_ARGV)
    # recorded on another machine: κ's last digits may differ between CPUs (tests/histories.py), nothing else
    assert_same_scores(scores_text(tmp_path / "default" / "history.jsonl"), FIXTURE / "history.jsonl")
    assert (tmp_path / "default" / "genotype.json").read_text() == (FIXTURE / "genotype.json").read_text()
    cost = json.loads((tmp_path / "default" / "cost.json").read_text())
    assert cost["objectives"] == ["kappa", "regions"] and set(cost["objective_seconds"]) == {"kappa", "regions"}


@pytest.mark.parametrize("name", list(ZERO_COST_PROXIES))
def test_each_proxy_objective_finds_a_valid_genotype(name, two_ops, tmp_path):
    geno, history = _search(tmp_path / name, "--objective", name)
    _valid(geno)
    first = history[0]
    assert len(first[f"{name}_full"]) == 1 and "kappa_full" not in first  # κ and regions not computed
    cand = first["candidates"][0]
    assert {name, f"d_{name}", f"rank_{name}", "rank_sum"} <= set(cand) and "kappa" not in cand
    seconds = first["measured"]["candidate_seconds"][name]
    assert len(seconds) == len(first["candidates"]) and all(s > 0 for s in seconds)
    cost = json.loads((tmp_path / name / "cost.json").read_text())
    assert cost["objectives"] == [name] and cost["seconds"] > 0


@pytest.fixture(scope="module")
def naswot_run(tmp_path_factory):
    """A finished tiny naswot,synflow search with --combine log_rank (`two_ops`)."""
    mp = pytest.MonkeyPatch()
    two_op_search(mp)
    try:
        save = tmp_path_factory.mktemp("naswot") / "run"
        geno, history = _search(save, "--objective", "naswot,synflow", "--combine", "log_rank")
    finally:
        mp.undo()
    return save, geno, history


def test_a_recorded_proxy_is_the_proxy_of_the_masked_supernet_by_hand(naswot_run, two_ops):
    save, _, history = naswot_run
    cfg = SearchConfig.from_dict(json.loads((save / "config.json").read_text()))
    search = PruningSearch(cfg)
    alive = search.initial_alive()
    split = load_split(cfg.data, None, "train")
    scorer = CandidateScorer(cfg, split, search.device, len(split.class_ids))  # for the repeat's batch only
    record = history[0]
    candidates = search.op_candidates(alive)
    try:
        for c in (0, len(candidates) - 1):  # a normal-cell and a reduction-cell candidate
            assert record["candidates"][c]["op"] == cfg.space.ops[candidates[c].op]
            changes = {"naswot": [], "synflow": []}
            for rep in range(cfg.repeat):
                seed = repeat_seed(cfg.rand_seed, 0, rep)
                scorer.begin_repeat(seed)  # the repeat's batch and labels
                scorer.end_repeat()
                net = replace_norm(Supernet(cfg.ntk_channels, cfg.ntk_layers, len(split.class_ids), cfg.space,
                                            cfg.ntk_stemm, cfg.ntk_fsr), cfg.norm_type)
                init_weights(net, mode=cfg.init_mode, seed=seed)
                masked = candidates[c].without(alive)
                assert masked.sum() == alive.sum() - 1
                net.set_alphas(*alphas_from_alive(masked))
                for name in changes:
                    by_hand = ZERO_COST_PROXIES[name](LogitsOf(net).train(), scorer._inputs, scorer._targets)
                    assert record["candidates"][c][name][rep] == pytest.approx(by_hand, rel=1e-9)
                    full = record[f"{name}_full"][rep]
                    changes[name].append(round((full - by_hand) / abs(full), cfg.precision))
            for name, d in changes.items():
                assert record["candidates"][c][f"d_{name}"] == pytest.approx(round_sig(float(np.mean(d)), 3))
    finally:
        scorer.close()


def test_the_order_of_the_objectives_does_not_change_the_result(naswot_run, two_ops, tmp_path):
    save, geno, _ = naswot_run
    other, _ = _search(tmp_path / "swapped", "--objective", "synflow,naswot", "--combine", "log_rank")
    assert other == geno
    assert scores_text(tmp_path / "swapped" / "history.jsonl") == scores_text(save / "history.jsonl")


def test_a_killed_proxy_search_resumes_to_the_same_genotype(naswot_run, two_ops, monkeypatch, tmp_path):
    save, geno, _ = naswot_run
    real_save = PruningSearch.save_state

    def dies_after_the_first_round(self, state):
        real_save(self, state)
        if state["round"] == 1 and state["phase"] != "done":
            raise KeyboardInterrupt("killed after round 0")

    monkeypatch.setattr(PruningSearch, "save_state", dies_after_the_first_round)
    argv = [*TINY, "--save_dir", str(tmp_path / "killed"), "--objective", "naswot,synflow", "--combine", "log_rank"]
    assert prune_metantknas.main(argv) != 0  # interrupted (the command line's exit code of an interruption)
    assert not (tmp_path / "killed" / "done").exists()
    monkeypatch.setattr(PruningSearch, "save_state", real_save)
    resumed, _ = _search(tmp_path / "killed", "--objective", "naswot,synflow", "--combine", "log_rank")
    assert resumed == geno
    assert scores_text(tmp_path / "killed" / "history.jsonl") == scores_text(save / "history.jsonl")


def test_objective_names_directions_and_flags():
    assert parse_objectives("regions,kappa") == ("kappa", "regions")
    with pytest.raises(UsageError, match="valid: kappa, regions, grad_norm"):
        parse_objectives("kappa,nope")
    with pytest.raises(UsageError, match="twice"):
        parse_objectives("naswot,naswot")
    with pytest.raises(UsageError, match="--only_lrs"):
        SearchConfig(only_lrs=True, objective="naswot").validate()
    assert SearchConfig(only_lrs=True).validate().objectives == ("regions",)
    assert not SearchConfig(objective="naswot").needs_kappa
    with pytest.raises(UsageError, match="--combine"):
        SearchConfig(combine="mean").validate()
    assert OBJECTIVES["kappa"] == -1 and all(OBJECTIVES[p] == 1 for p in ZERO_COST_PROXIES)
    # log ranks: the least important candidate (smallest loss of regions, largest drop of κ) lowest
    combined = log_rank_sum({"regions": [0.1, 0.5, 0.3], "kappa": [0.2, -0.1, 0.0]})
    assert int(np.argmin(combined)) == 0 and int(np.argmax(combined)) == 1
