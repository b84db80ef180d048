"""The pruning search end to end on tiny settings, and its ranking / pruning rules on hand-made scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import prune_launch
import prune_metantknas
from eval_lib.commands import search_command as search_cli
from search_lib.core.errors import UsageError
from search_lib.models.genotypes import Genotype
from search_lib.models.space import SearchSpace
from search_lib.search.pruning import (
    Candidate,
    PruningSearch,
    alphas_from_alive,
    repeat_seed,
    round_sig,
    scores_text,
)
from search_lib.search.ranking import dense_rank
from search_lib.search.search_config import SearchConfig

TINY = ["--ntk_channels", "4", "--ntk_layers", "5", "--image_size", "8", "--batch_size", "2", "--repeat", "1",
        "--prune_number", "3", "--lr_batch_size", "50", "--lr_batches", "1", "--device", "cpu", "--rand_seed", "0"]


def _search(tmp_path: Path, name: str, *extra: str) -> tuple[Genotype, dict]:
    save = tmp_path / name
    assert prune_metantknas.main([*TINY, "--save_dir", str(save), *extra]) == 0
    record = json.loads((save / "genotype.json").read_text())
    return Genotype.from_dict(record), record


def _check_valid(geno: Genotype, space="darts_fewshot", nodes=3):
    geno.validate(SearchSpace(space, nodes))  # every op in the space, indices valid, two inputs per node
    for cell in (geno.normal, geno.reduce):
        assert len(cell) == nodes
        for node in cell:
            assert len(node) == 2 and node[0][1] != node[1][1]


@pytest.mark.slow  # 23 s; test_cifar and test_original_runs run MetaNTK searches on RFS files by default
def test_metantk_search_on_synthetic_rfs_files(tmp_path, synthetic_mini):
    geno, record = _search(tmp_path, "mini", "--dataset", "MetaMiniImageNet", "--data_path", str(synthetic_mini))
    _check_valid(geno)
    assert record["string"] == str(geno)
    save = tmp_path / "mini"
    for name in ("config.json", "history.jsonl", "genotype.json", "search.log", "done"):
        assert (save / name).exists(), name
    history = [json.loads(line) for line in (save / "history.jsonl").read_text().splitlines()]
    # prune_number 3: 7 ops -> 4 -> 1 per edge, then one edge-group round
    assert [h["phase"] for h in history] == ["ops", "ops", "edges"]
    assert len(history[0]["candidates"]) == 2 * 9 * 7
    assert history[0]["ops_left"] == 2 * 9 * 4 and history[1]["ops_left"] == 2 * 9
    assert history[2]["ops_left"] == 2 * (2 + 2 + 2)
    first = history[0]["candidates"][0]
    assert {"cell", "edge", "op", "kappa", "regions", "d_kappa", "d_regions", "rank_sum"} <= set(first)
    config = json.loads((save / "config.json").read_text())
    assert config["rand_seed"] == 0 and config["ntk_type"] == "MetaNTK_anl"


@pytest.mark.slow  # 11 s; test_batch_runs checks a kernel search's determinism by default
def test_ntk_search_on_digits_and_same_seed_same_genotype(tmp_path):
    fast = ["--dataset", "Digits", "--ntk_type", "NTK", "--batch_size", "6", "--prune_number", "6", "--ntk_layers", "2"]
    a, _ = _search(tmp_path, "a", *fast)
    b, _ = _search(tmp_path, "b", *fast)
    _check_valid(a)
    assert a == b
    assert scores_text(tmp_path / "a" / "history.jsonl") == scores_text(tmp_path / "b" / "history.jsonl")


def test_anil_finite_time_and_only_lrs_and_darts_space(tmp_path):
    geno, _ = _search(tmp_path, "anil", "--dataset", "MetaDigits", "--algorithm", "ANIL", "--inner_lr_time", "1",
                      "--prune_number", "6", "--ntk_layers", "2")
    _check_valid(geno)
    geno, _ = _search(tmp_path, "lrs", "--dataset", "MetaDigits", "--only_lrs", "true", "--prune_number", "6",
                      "--search_space_name", "darts", "--max_nodes", "4")
    _check_valid(geno, "darts", 4)
    history = [json.loads(x) for x in (tmp_path / "lrs" / "history.jsonl").read_text().splitlines()]
    assert all(c["kappa"] == [None] for c in history[0]["candidates"])


def test_rounding_and_dense_ranks():
    assert round_sig(0.0123456, 3) == 0.0123
    assert round_sig(-123.456, 3) == -123.0
    assert dense_rank([0.5, 0.1, 0.5, 0.3]) == [2, 0, 2, 1]
    assert dense_rank([0.5, 0.1, 0.5, 0.3], descending=True) == [0, 2, 0, 1]
    assert repeat_seed(0, 1, 2) == repeat_seed(0, 1, 2) != repeat_seed(0, 1, 3)


def _search_obj(**kw) -> PruningSearch:
    return PruningSearch(SearchConfig(device="cpu", **kw))


def test_prune_ops_removes_smallest_rank_sum_per_edge():
    s = _search_obj(prune_number=1)
    alive = s.initial_alive()
    cands = s.op_candidates(alive)
    # every candidate gets rank_sum 5 except op 3 on edge 0 of the normal cell and op 6 on edge 4 of reduce
    record = {"candidates": [{"rank_sum": 5} for _ in cands]}
    for i, c in enumerate(cands):
        if (c.cell, c.edge, c.op) in {(0, 0, 3), (1, 4, 6)}:
            record["candidates"][i]["rank_sum"] = 1
    after = s.prune_ops(alive, cands, record)
    assert not after[0, 0, 3] and not after[1, 4, 6]
    # ties everywhere else: the first op in space order goes (deterministic)
    assert not after[0, 1, 1] and after[0, 1, 2]
    assert after.sum() == alive.sum() - 18
    assert len(record["pruned"]) == 18


def test_prune_edges_keeps_two_largest_rank_sums_per_group():
    s = _search_obj()
    alive = np.zeros((2, 9, 8), dtype=bool)
    alive[:, :, 2] = True  # one op left on every edge
    cands = s.edge_candidates(alive)
    assert [(c.cell, c.edge) for c in cands] == [(c, e) for c in range(2) for e in range(2, 9)]
    sums = {2: 3, 3: 1, 4: 2, 5: 0, 6: 4, 7: 4, 8: 1}
    record = {"candidates": [{"rank_sum": sums[c.edge]} for c in cands]}
    after = s.prune_edges(alive, cands, record)
    for cell in range(2):
        kept = [e for e in range(9) if after[cell, e].any()]
        assert kept == [0, 1, 2, 4, 6, 7]


def test_candidate_without_and_alphas():
    s = _search_obj()
    alive = s.initial_alive()
    assert not alive[:, :, 0].any()  # `none` removed at the start
    out = Candidate(1, 3, 2).without(alive)
    assert not out[1, 3, 2] and alive[1, 3, 2]
    a_n, a_r = alphas_from_alive(out)
    assert a_r[3, 2] == -1000 and a_r[3, 1] == 0 and a_n[3, 2] == 0


def test_config_validation_errors():
    with pytest.raises(UsageError, match="episodic"):
        SearchConfig(dataset="MiniImageNet", ntk_type="MetaNTK_anl").validate()
    with pytest.raises(UsageError, match="ntk_N"):
        SearchConfig(ntk_layers=8, ntk_N=1).validate()
    with pytest.raises(UsageError, match="batchnorm"):
        SearchConfig(norm_type="batchnorm").validate()
    SearchConfig(ntk_layers=8, ntk_N=2).validate()


def test_boolean_flags_accept_both_styles():
    p = prune_metantknas.build_parser()
    assert p.parse_args(["--only_lrs"]).only_lrs is True
    assert p.parse_args(["--only_lrs", "false"]).only_lrs is False
    assert p.parse_args(["--only_lrs", "True"]).only_lrs is True
    assert p.parse_args(["--no-only_lrs"]).only_lrs is False
    assert p.parse_args([]).only_lrs is False


def test_launcher_builds_the_paper_command(monkeypatch, capsys):
    monkeypatch.setenv("METANTKNAS_MINI_DATA", "/data/mini")
    assert prune_launch.main(["--dataset", "mini", "--cells", "8", "--print_only", "--aug_epochs", "3"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    args = prune_metantknas.build_parser().parse_args(line.split()[1:])
    assert (args.algorithm, args.inner_lr_time, args.reg_coef, args.ntk_layers) == ("ANIL", 1.0, 1e-5, 8)
    assert args.dataset == "MetaMiniImageNet" and args.data_path == "/data/mini" and args.ntk_channels == 48
    assert args.aug_epochs == 3  # the user's value wins over the paper's 100
    assert args.aug_batch_size == 40 and args.aug_learning_rate == 0.02
    monkeypatch.delenv("METANTKNAS_MINI_DATA")
    monkeypatch.delenv("METANTKNAS_DATA", raising=False)
    assert prune_launch.main(["--dataset", "tiered", "--cells", "5", "--print_only"]) == 2
    assert "--data_path" in capsys.readouterr().err


def test_launcher_runs_the_search_in_process(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cfg):
        seen["cfg"] = cfg
        return 3

    monkeypatch.setattr(search_cli, "run", fake_run)  # the search (then the training), as prune_metantknas.py runs it
    code = prune_launch.main(["--dataset", "tiered", "--cells", "5", "--data_path", str(tmp_path)])
    assert code == 3  # the search's exit code is returned
    assert seen["cfg"].algorithm == "MAML" and seen["cfg"].train["epochs"] == 60
