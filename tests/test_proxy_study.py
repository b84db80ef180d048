"""The proxy study (python -m eval_lib.proxy_study): its statistics against scipy, a tiny study end to end,
resuming after a kill between architectures, shards, several trainings per architecture and the seed-to-seed
ceiling, and its user errors."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from eval_lib.commands import study_command
from eval_lib.study import study_trainings
from eval_lib.study.proxies import BASELINES, MEASURED, PROXIES, ZERO_COST_PROXIES, KernelProxies
from eval_lib.study.study_config import LEFT_OUT, PROXY_FLAGS, StudyConfig
from eval_lib.study.study_stats import (
    bootstrap_interval,
    combined_scores,
    fraction_of_ceiling,
    kendall_tau_b,
    partial_kendall_tau,
    partial_spearman_rho,
    seed_ceiling,
    spearman_rho,
    summarize,
    top_k_hit,
)
from eval_lib.study.study_table import format_table
from eval_lib.study.study_trainings import seed_accuracy
from search_lib.core.command_line import field_default, flag_fields
from search_lib.models.genotypes import GenotypeRecord
from search_lib.models.space import SearchSpace
from search_lib.search.ranking import dense_rank
from search_lib.search.search_config import SearchConfig

# A tiny study on the synthetic miniImageNet of conftest (6 base classes of 12 images at 20x20).
TINY = ["--dataset", "MetaMiniImageNet", "--n_archs", "3", "--seed", "1", "--ntk_channels", "4", "--ntk_layers", "2",
        "--image_size", "16", "--batch_size", "2", "--repeat", "1", "--lr_batches", "1", "--lr_batch_size", "40",
        "--device", "cpu", "--bootstrap_resamples", "200",
        "--aug_init_channels", "4", "--aug_layers", "2", "--aug_epochs", "1", "--aug_batch_size", "16",
        "--aug_image_size", "16", "--aug_n_queries", "4", "--aug_n_test_runs", "4",
        "--aug_n_aug_support_samples", "1", "--aug_eval_splits", "test"]


def _argv(data, save_dir, *extra) -> list[str]:
    return [*TINY, "--data_path", str(data), "--save_dir", str(save_dir), *extra]


def _records(save_dir) -> list[dict]:
    """study.jsonl without the timings."""
    lines = (save_dir / "study.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "timings"} for line in lines]


@pytest.fixture(scope="module")
def reference(synthetic_mini, tmp_path_factory):
    """One uninterrupted tiny study (treat its folder as read-only)."""
    save_dir = tmp_path_factory.mktemp("study") / "ref"
    assert study_command.main(_argv(synthetic_mini, save_dir)) == 0
    return save_dir


# ---- statistics ----

def _fake_records(kappa, regions, acc1, acc5) -> list[dict]:
    out = []
    for i, (k, r, a1, a5) in enumerate(zip(kappa, regions, acc1, acc5)):
        proxies = {name: {"mean": k * (j + 1), "std": 0.0} for j, name in enumerate(("kappa_maml", "kappa_anil",
                                                                                     "kappa_ntk"))}
        proxies["regions"] = {"mean": r, "std": 0.0}
        out.append({"id": f"{i:03d}", "proxies": proxies,
                    "baselines": {"params": 100 + r, "macs": 1000 + i, "grad_norm": 1.0 / (i + 1), "synflow": k},
                    "accuracy": {"test": {"1": {"mean": a1, "ci95": 1.0}, "5": {"mean": a5, "ci95": 1.0}}}})
    return out


def test_correlations_are_scipys_with_the_methods_sign():
    rng = np.random.default_rng(0)
    kappa, regions = rng.lognormal(3, 1, 9), rng.integers(10, 14, 9).astype(float)  # regions with ties
    acc1, acc5 = rng.normal(50, 5, 9), rng.normal(70, 5, 9)
    summary = summarize(_fake_records(kappa, regions, acc1, acc5), shots=["1", "5"], top_k=3, seed=0, n_resamples=50)
    for shots, acc in (("1", acc1), ("5", acc5)):
        row = summary["proxies"]["kappa_maml"]["shots"][shots]
        assert row["kendall_tau"] == pytest.approx(scipy.stats.kendalltau(-kappa, acc).statistic, abs=1e-12)
        assert row["kendall_tau"] == pytest.approx(-scipy.stats.kendalltau(kappa, acc).statistic, abs=1e-12)
        assert row["spearman_rho"] == pytest.approx(scipy.stats.spearmanr(-kappa, acc).statistic, abs=1e-12)
        assert row["kendall_p"] == pytest.approx(scipy.stats.kendalltau(kappa, acc).pvalue)
        row = summary["proxies"]["regions"]["shots"][shots]  # high is good: no flip
        assert row["kendall_tau"] == pytest.approx(scipy.stats.kendalltau(regions, acc).statistic, abs=1e-12)
        assert row["spearman_rho"] == pytest.approx(scipy.stats.spearmanr(regions, acc).statistic, abs=1e-12)
        # partial correlations given #params, and the search's rule as a row of its own
        params = 100 + regions
        row = summary["proxies"]["kappa_maml"]["shots"][shots]
        assert row["partial_n"] == 9
        assert row["partial_kendall_tau"] == pytest.approx(float(partial_kendall_tau(-kappa, acc, params)), abs=1e-12)
        assert row["partial_spearman_rho"] == pytest.approx(float(partial_spearman_rho(-kappa, acc, params)),
                                                            abs=1e-12)
        assert row["partial_kendall_tau_ci95"]["low"] <= row["partial_kendall_tau"]
        rule = np.array(dense_rank(-kappa)) + np.array(dense_rank(regions))
        assert summary["proxies"]["search_rule"]["shots"][shots]["kendall_tau"] == pytest.approx(
            scipy.stats.kendalltau(rule, acc).statistic, abs=1e-12)
    assert summary["proxies"]["log_rank"]["shots"] == {}  # its members are not in these records
    assert summary["proxies"]["search_rule"]["cost_s"]["n"] == 0  # no timings in these records
    assert "partial τ | #params" in format_table(summary)
    assert {p: e["sign"] for p, e in summary["proxies"].items()} == {p: s for p, (_, s) in PROXIES.items()}
    assert [e["sign"] for p, e in summary["proxies"].items() if p.startswith("kappa")] == [-1, -1, -1]
    # the bootstrap's vectorised statistics are scipy's, ties and constant inputs (NaN) included
    for _ in range(50):
        n = int(rng.integers(2, 12))
        x, y = rng.integers(0, 4, n).astype(float), np.round(rng.normal(size=n))
        for mine, theirs in ((kendall_tau_b, scipy.stats.kendalltau), (spearman_rho, scipy.stats.spearmanr)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # constant input
                expected = theirs(x, y).statistic
            np.testing.assert_allclose(mine(x, y), expected, atol=1e-12, equal_nan=True)


def test_bootstrap_interval_is_reproducible_and_leaves_out_undefined_resamples():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=10), rng.normal(size=10)
    a = bootstrap_interval(x, y, "kendall_tau", seed=5, n_resamples=300)
    assert a == bootstrap_interval(x, y, "kendall_tau", seed=5, n_resamples=300)
    assert a != bootstrap_interval(x, y, "kendall_tau", seed=6, n_resamples=300)
    assert -1 <= a["low"] <= a["high"] <= 1 and a["nan_resamples"] == 0
    # no undefined resample: scipy's own percentile interval
    ref = scipy.stats.bootstrap((x, y), lambda u, v: scipy.stats.spearmanr(u, v).statistic, paired=True,
                                vectorized=False, method="percentile", n_resamples=300,
                                rng=np.random.default_rng(5)).confidence_interval
    b = bootstrap_interval(x, y, "spearman_rho", seed=5, n_resamples=300)
    assert (b["low"], b["high"]) == pytest.approx((ref.low, ref.high))
    # three architectures: some resamples repeat one architecture (NaN); they are counted and left out
    c = bootstrap_interval([1.0, 2.0, 3.0], [3.0, 1.0, 2.0], "kendall_tau", seed=0, n_resamples=400)
    assert 0 < c["nan_resamples"] < 400 and c["low"] is not None
    assert bootstrap_interval([1.0, 2.0], [2.0, 1.0], "kendall_tau", seed=0, n_resamples=10)["low"] is None


def test_seed_to_seed_ceiling_on_a_hand_made_case():
    # two trainings of 4 architectures that swap the last two: one discordant pair of 6, τ = (5 − 1) / 6 = 2/3;
    # ρ = 1 − 6 Σd² / (n(n² − 1)) = 1 − 6·2 / 60 = 0.8
    two = seed_ceiling([[60.0, 61.0, 62.0, 63.0], [50.0, 51.0, 53.0, 52.0]], seed=0, n_resamples=200)
    assert two["kendall_tau"] == pytest.approx(2 / 3) and two["spearman_rho"] == pytest.approx(0.8)
    assert (two["k"], two["pairs"], two["n_archs"]) == (2, 1, 4)
    ci = two["kendall_tau_ci95"]
    assert ci["low"] <= ci["high"] and ci["resamples"] == 200
    # three trainings: the mean over the three pairs, τ 2/3 (1, 2), 1/3 (1, 3), 2/3 (2, 3) → 5/9
    three = seed_ceiling([[1, 2, 3, 4], [1, 2, 4, 3], [2, 1, 4, 3]], seed=0, n_resamples=200)
    assert three["kendall_tau"] == pytest.approx(5 / 9) and (three["k"], three["pairs"]) == (3, 3)
    # the interval sees the same resamples as a proxy's (the same seed): with K = 2 it is bootstrap_interval's
    assert two["kendall_tau_ci95"] == bootstrap_interval([60.0, 61.0, 62.0, 63.0], [50.0, 51.0, 53.0, 52.0],
                                                         "kendall_tau", seed=0, n_resamples=200)
    assert seed_ceiling([[1.0, 2.0, 3.0]], seed=0, n_resamples=10) is None  # one training: nothing measured
    assert fraction_of_ceiling(0.5, two) == pytest.approx(0.75)
    assert fraction_of_ceiling(0.5, None) is None and fraction_of_ceiling(None, two) is None
    assert fraction_of_ceiling(0.5, {"kendall_tau": -0.1}) is None  # a ceiling that ranks nothing: no fraction


def test_seed_accuracy_and_the_summary_with_two_trainings():
    def training(a1, a5):
        return {"accuracy": {"test": {"1": {"mean": a1, "ci95": 1.0, "episodes": 4},
                                      "5": {"mean": a5, "ci95": 3.0, "episodes": 4}}}}

    one = training(50.0, 70.0)
    assert seed_accuracy([one]) == one["accuracy"]  # one training: its accuracy unchanged
    acc = seed_accuracy([one, training(54.0, 70.0)])["test"]
    assert acc["1"].pop("per_seed") == [50.0, 54.0]
    assert acc["1"] == pytest.approx({"mean": 52.0, "std": np.sqrt(8.0), "min": 50.0, "max": 54.0, "ci95": 1.0,
                                      "episodes": 4})
    assert acc["5"]["std"] == 0.0 and acc["5"]["ci95"] == 3.0
    # four architectures, two trainings each: the proxies against the mean, the ceiling between the trainings
    first, second = [60.0, 61.0, 62.0, 63.0], [50.0, 51.0, 53.0, 52.0]
    records = _fake_records([4.0, 3.0, 2.0, 1.0], [10.0, 11.0, 12.0, 13.0], [0.0] * 4, [0.0] * 4)
    for r, a, b in zip(records, first, second):
        r["accuracy"] = seed_accuracy([training(a, a), training(b, b)])
    summary = summarize(records, shots=["1", "5"], top_k=1, seed=0, n_resamples=100, training_seeds=[0, 7])
    assert summary["trainings"] == {"k": 2, "seeds": [0, 7]}
    assert summary["ceiling"]["1"]["kendall_tau"] == pytest.approx(2 / 3)
    arch = summary["per_architecture"]["002"]["1"]
    assert arch.pop("per_seed") == [62.0, 53.0]
    assert arch == pytest.approx({"mean": 57.5, "std": np.std([62.0, 53.0], ddof=1), "min": 53.0, "max": 62.0})
    row = summary["proxies"]["kappa_maml"]["shots"]["1"]  # −κ ranks 0 < 1 < 2 < 3; the means 55, 56, 57.5, 57.5
    assert row["kendall_tau"] == pytest.approx(scipy.stats.kendalltau([0, 1, 2, 3], [55, 56, 57.5, 57.5]).statistic)
    assert row["fraction_of_ceiling"] == pytest.approx(row["kendall_tau"] / (2 / 3))
    table = format_table(summary)
    assert "seed-to-seed ceiling" in table and "τ/ceiling" in table and "no ceiling" not in table
    assert "  002  1-shot 57.50 ± 6.36 [53.00, 62.00]" in table
    # one training: no ceiling, and the table says so
    single = summarize(_fake_records([4.0, 3.0, 2.0, 1.0], [1.0] * 4, first, first), shots=["1"], top_k=1, seed=0,
                       n_resamples=10)
    assert single["ceiling"] is None and single["proxies"]["kappa_maml"]["shots"]["1"]["fraction_of_ceiling"] is None
    assert "no ceiling measured (--train_seeds 1)" in format_table(single) and "τ/ceiling" not in format_table(single)


def test_training_seeds_are_derived_and_the_first_is_the_training_seed():
    assert StudyConfig().training_seeds() == [0]  # one training: eval_searched_arch.py's default seed, as before
    three = StudyConfig(train_seeds=3, train={"seed": 5}).training_seeds()
    assert three[0] == 5 and len(set(three)) == 3
    assert three[1] == int(np.random.SeedSequence(5).spawn(2)[1].generate_state(1)[0])
    assert StudyConfig(train_seeds=2, train={"seed": 5}).training_seeds() == three[:2]  # a larger K only adds


def test_top_k_hit_rate():
    acc = [50.0, 60.0, 70.0, 80.0]
    assert top_k_hit([1, 2, 3, 4], acc, 1) == 1.0
    assert top_k_hit([4, 3, 2, 1], acc, 3) == 0.0
    assert top_k_hit([1, 1, 4, 4], acc, 1) == 0.5  # tied best: half of them are the best architecture


def test_zero_cost_proxies_on_a_linear_layer():
    """grad_norm and synflow score the Conv/Linear weights only, as their reference does (the study's first
    version summed every parameter, biases and BN included; tests/test_zero_cost.py has the other proxies)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2))
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    net.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    expected = float(net[0].weight.grad.norm())
    assert ZERO_COST_PROXIES["grad_norm"](net, x, y) == pytest.approx(expected)
    # R = Σ_o (Σ_i |W_oi| + |b_o|) for an all-ones input, so W ⊙ ∂R/∂W = |W|: synflow is Σ |W|
    assert ZERO_COST_PROXIES["synflow"](net, x, y) == pytest.approx(float(net[0].weight.detach().abs().sum()))


def test_partial_correlations_are_the_formula_and_the_residual_correlation():
    rng = np.random.default_rng(2)
    z = rng.normal(size=12)
    x, y = z + rng.normal(size=12), z + rng.normal(size=12)
    t = {k: scipy.stats.kendalltau(a, b).statistic for k, (a, b) in {"xy": (x, y), "xz": (x, z), "yz": (y, z)}.items()}
    expected = (t["xy"] - t["xz"] * t["yz"]) / np.sqrt((1 - t["xz"] ** 2) * (1 - t["yz"] ** 2))
    assert float(partial_kendall_tau(x, y, z)) == pytest.approx(expected, abs=1e-12)
    # partial Spearman ρ = the correlation of the residuals of the ranks of x and y regressed on those of z
    rx, ry, rz = (scipy.stats.rankdata(v) for v in (x, y, z))
    design = np.column_stack([np.ones(12), rz])
    res = [r - design @ np.linalg.lstsq(design, r, rcond=None)[0] for r in (rx, ry)]
    assert float(partial_spearman_rho(x, y, z)) == pytest.approx(np.corrcoef(*res)[0, 1], abs=1e-12)
    # a hand case: 4 architectures with τ_xy = 2/3 (one discordant pair of 6), τ_xz = 1/3 (two), τ_yz = 2/3 (one):
    # (2/3 − 1/3 · 2/3) / √((1 − 1/9)(1 − 4/9)) = (4/9) / (√40 / 9) = 4/√40
    x4, y4, z4 = [1, 2, 3, 4], [1, 2, 4, 3], [2, 1, 4, 3]
    assert [float(kendall_tau_b(*p)) for p in ((x4, y4), (x4, z4), (y4, z4))] == pytest.approx([2 / 3, 1 / 3, 2 / 3])
    assert float(partial_kendall_tau(x4, y4, z4)) == pytest.approx(4 / np.sqrt(40))
    # the size itself given the size: undefined
    assert np.isnan(partial_kendall_tau(z, y, z)) and np.isnan(partial_spearman_rho(z, y, z))
    # vectorised over resamples (rows), as the bootstrap calls it
    stacked = np.stack([x, x[::-1]])
    np.testing.assert_allclose(partial_kendall_tau(stacked, np.stack([y, y]), np.stack([z, z])),
                               [partial_kendall_tau(x, y, z), partial_kendall_tau(x[::-1], y, z)])


def test_combinations_on_a_hand_made_ranking():
    a = [1.0, 2.0, 3.0, 4.0, 2.0]
    b = [4.0, 3.0, 2.0, 1.0, None]
    # search rule: dense ranks from 0 (ties share one, no gaps) summed; an architecture lacking a member: None
    assert combined_scores([a[:4], b[:4]], "search_rule") == [3.0, 3.0, 3.0, 3.0]
    assert combined_scores([a, b], "search_rule") == [3.0, 3.0, 3.0, 3.0, None]
    assert combined_scores([[1.0, 1.0, 2.0], [3.0, 1.0, 2.0]], "search_rule") == [2.0, 0.0, 2.0]
    # AZ-NAS: Σ log(average rank / m), 1 the worst, m the best
    got = combined_scores([[1.0, 1.0, 2.0], [3.0, 1.0, 2.0]], "log_rank")
    expected = [np.log(1.5 / 3) + np.log(3 / 3), np.log(1.5 / 3) + np.log(1 / 3), np.log(3 / 3) + np.log(2 / 3)]
    assert got == pytest.approx(expected)
    # ranks (1, 3), (2, 2), (3, 1): equal rank sums, but the log-rank rule prefers the architecture without a
    # low rank (a low rank in any member costs more than a high one earns)
    assert combined_scores([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], "search_rule") == [2.0, 2.0, 2.0]
    got = combined_scores([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], "log_rank")
    assert got == pytest.approx([np.log(1 / 3), 2 * np.log(2 / 3), np.log(1 / 3)])


# ---- the command line ----

def test_flags_are_the_study_search_and_aug_fields():
    values = vars(study_command.build_parser().parse_args([]))
    search = {f.name: f for f in flag_fields(SearchConfig)}
    assert set(PROXY_FLAGS) == set(search) - set(LEFT_OUT)
    for name in PROXY_FLAGS:
        assert values[name] == field_default(search[name]), name
    own = {f.name for f in flag_fields(StudyConfig)}  # the study's own --save_dir and --overwrite among them
    assert own <= set(values) and not (set(LEFT_OUT) - own) & set(values)
    cfg = study_command.config_from_args(study_command.build_parser().parse_args(
        ["--genotype_files", "a.json", "b.json", "--aug_epochs", "2", "--ntk_channels", "8"]))
    assert cfg.genotype_files == ["a.json", "b.json"] and cfg.train["epochs"] == 2 and cfg.proxy.ntk_channels == 8
    assert StudyConfig.from_flags(json.loads(json.dumps(cfg.flags()))) == cfg


@pytest.mark.parametrize("flags, named", [
    (["--zero_cost_proxies", "synflow", "nasw0t"], "--zero_cost_proxies"),
    (["--log_rank_members", "naswot", "kappa"], "--log_rank_members"),
    (["--log_rank_members", "naswot", "search_rule"], "--log_rank_members")])
def test_an_unknown_proxy_name_is_one_line_listing_the_valid_ones(flags, named, capsys, tmp_path):
    assert study_command.main(["--save_dir", str(tmp_path / "s"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "valid: " in err and "synflow" in err
    assert not (tmp_path / "s").exists()


def test_log_rank_members_must_be_computed(capsys, tmp_path):
    assert study_command.main(["--save_dir", str(tmp_path / "s"), "--zero_cost_proxies", "synflow", "naswot"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--log_rank_members" in err and "zico" in err and "--zero_cost_proxies" in err


@pytest.mark.parametrize("shard", ["2/2", "1", "a/b", "-1/2"])
def test_bad_shard_is_one_line(shard, capsys, tmp_path):
    assert study_command.main(["--save_dir", str(tmp_path / "s"), f"--shard={shard}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--shard" in err and "i/n" in err
    assert not (tmp_path / "s").exists()


# ---- a tiny study ----

def test_tiny_study_writes_its_outputs(reference):
    records = [json.loads(line) for line in (reference / "study.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["000-random0", "001-random1", "002-random2"]
    for name in ("config.json", "summary.json", "summary.txt", "study.png", "done", "study.log"):
        assert (reference / name).is_file(), name
    assert (reference / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = records[0]
    assert set(r["proxies"]) == {"kappa_maml", "kappa_anil", "kappa_ntk", "regions"}
    assert r["proxies"]["kappa_maml"]["mean"] > 1 and r["proxies"]["regions"]["mean"] >= 1
    assert r["baselines"]["params"] > 0 and r["baselines"]["macs"] > 0 and r["baselines"]["synflow"] > 0
    assert set(r["accuracy"]["test"]) == {"1", "5"} and r["accuracy"]["test"]["5"]["ci95"] is not None
    assert (reference / r["train_dir"] / "done").is_file()
    assert set(r["timings"]) == {"proxies_s", "baselines_s", "train_s", "test_s", "proxy_s"}
    assert json.loads((reference / "archs" / r["id"] / "record.json").read_text()) == r
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["architectures"] == 3 and set(summary["proxies"]) == set(PROXIES)
    assert set(summary["proxies"]["kappa_maml"]["shots"]) == {"1", "5"}
    # the printed table (summary.json's keys come back sorted, so its rows come in another order)
    assert sorted((reference / "summary.txt").read_text().splitlines()) == sorted(format_table(summary).splitlines())
    # every proxy is recorded with its cost; every row has the partial correlations given #params
    for r in records:
        assert set(r["baselines"]) == set(BASELINES) and set(r["timings"]["proxy_s"]) == set(MEASURED)
        assert all(isinstance(r["baselines"][p], (int, float)) for p in BASELINES), r["baselines"]
        assert all(t >= 0 for t in r["timings"]["proxy_s"].values())
    assert summary["partial_given"] == "params" and summary["combinations"]["search_rule"] == ["kappa_maml", "regions"]
    for p, entry in summary["proxies"].items():
        assert set(entry["shots"]) == {"1", "5"}, p
        row = entry["shots"]["5"]
        assert {"partial_kendall_tau", "partial_kendall_tau_ci95", "partial_spearman_rho", "top_k_hit"} <= set(row)
        assert entry["cost_s"]["n"] == 3 and entry["cost_s"]["mean"] >= 0
    assert summary["proxies"]["params"]["shots"]["5"]["partial_kendall_tau"] is None
    assert summary["proxies"]["log_rank"]["members"] == ["naswot", "synflow", "zico", "swap", "meco"]
    corr = summary["proxy_correlation"]
    assert corr["names"] == list(PROXIES) and corr["matrix"][0][0] == pytest.approx(1.0)
    from PIL import Image
    with Image.open(reference / "study.png") as png:
        assert png.size[0] > 1500 and png.size[1] > 1000


def test_resume_after_a_kill_between_architectures(reference, synthetic_mini, tmp_path, monkeypatch, capsys):
    trained, scored = [], []
    real_train, real_score = study_trainings.train_and_evaluate, KernelProxies.score

    def train(cfg, genotype):
        trained.append(cfg.save_dir)
        if len(trained) == 2 and kill:
            raise KeyboardInterrupt  # killed during the second architecture's training
        return real_train(cfg, genotype)

    def score(self, alive, label):
        scored.append(label)
        return real_score(self, alive, label)

    monkeypatch.setattr(study_trainings, "train_and_evaluate", train)
    monkeypatch.setattr(KernelProxies, "score", score)
    save_dir = tmp_path / "study"
    kill = True
    assert study_command.main(_argv(synthetic_mini, save_dir)) == 130
    assert scored == ["000-random0", "001-random1"]
    assert (save_dir / "archs/000-random0/record.json").is_file() and not (save_dir / "done").exists()
    assert not (save_dir / "archs/001-random1/record.json").exists()
    trained.clear()
    scored.clear()
    kill = False
    assert study_command.main(_argv(synthetic_mini, save_dir)) == 0
    assert scored == ["002-random2"]  # the first is not redone; the second's proxies were kept
    assert [p.split("/")[-2] for p in trained] == ["001-random1", "002-random2"]
    assert (save_dir / "done").is_file()
    assert _records(save_dir) == _records(reference)
    # the same folder with other settings: refused on one line, nothing overwritten
    config = (save_dir / "config.json").read_text()
    capsys.readouterr()
    assert study_command.main(_argv(synthetic_mini, save_dir, "--n_archs", "4", "--aug_epochs", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "n_archs: 3 -> 4" in err and "aug_epochs" in err and "--overwrite" in err
    assert (save_dir / "config.json").read_text() == config
    # --overwrite starts over with the new settings (one architecture: no bootstrap interval)
    assert study_command.main(_argv(synthetic_mini, save_dir, "--n_archs", "1", "--overwrite")) == 0
    assert [p.name for p in (save_dir / "archs").iterdir()] == ["000-random0"] and (save_dir / "done").is_file()
    assert len((save_dir / "study.jsonl").read_text().splitlines()) == 1
    summary = json.loads((save_dir / "summary.json").read_text())
    assert summary["proxies"]["kappa_maml"]["shots"]["5"]["kendall_tau_ci95"]["low"] is None


@pytest.mark.slow
def test_shards_give_the_records_of_one_process(reference, synthetic_mini, tmp_path):
    save_dir = tmp_path / "sharded"
    assert study_command.main(_argv(synthetic_mini, save_dir, "--shard", "1/2")) == 0
    assert sorted(p.parent.name for p in (save_dir / "archs").glob("*/record.json")) == ["001-random1"]
    assert not (save_dir / "done").exists() and not (save_dir / "summary.json").exists()
    assert study_command.main(_argv(synthetic_mini, save_dir, "--shard", "0/2")) == 0
    assert (save_dir / "done").is_file()
    assert _records(save_dir) == _records(reference)
    # --summarize rebuilds the summary from the records (the recorded settings, this command's --top_k)
    (save_dir / "summary.json").unlink()
    assert study_command.main(["--save_dir", str(save_dir), "--summarize", "--top_k", "2"]) == 0
    assert json.loads((save_dir / "summary.json").read_text())["top_k"] == 2


# ---- several trainings per architecture: the seed-to-seed ceiling ----

@pytest.fixture(scope="module")
def two_trainings(synthetic_mini, tmp_path_factory):
    """A tiny study of 4 architectures with one training each (its summary.json, summary.txt and records kept),
    then the same folder with --train_seeds 2 (the second trainings added; treat the folder as read-only)."""
    save_dir = tmp_path_factory.mktemp("study") / "seeds"
    argv = _argv(synthetic_mini, save_dir, "--n_archs", "4")
    assert study_command.main(argv) == 0
    one = {"summary": json.loads((save_dir / "summary.json").read_text()),
           "table": (save_dir / "summary.txt").read_text(), "records": _records(save_dir)}
    assert study_command.main([*argv, "--train_seeds", "2"]) == 0
    return save_dir, argv, one


def test_one_training_measures_no_ceiling(two_trainings):
    _, _, one = two_trainings
    assert one["summary"]["ceiling"] is None and one["summary"]["trainings"] == {"k": 1, "seeds": [0]}
    assert "no ceiling measured (--train_seeds 1)" in one["table"] and "τ/ceiling" not in one["table"]
    assert all("trainings" not in r and r["train_dir"].endswith("/train") for r in one["records"])


def test_two_trainings_per_architecture_and_the_ceiling(two_trainings):
    save_dir, _, one = two_trainings
    seeds = StudyConfig(train_seeds=2).training_seeds()
    records = [json.loads(line) for line in (save_dir / "study.jsonl").read_text().splitlines()]
    assert len(records) == 4 and seeds[0] == 0 and seeds[1] != 0
    differ = 0
    for r, before in zip(records, one["records"]):
        assert [t["seed"] for t in r["trainings"]] == seeds
        assert [t["train_dir"] for t in r["trainings"]] == [f"archs/{r['id']}/train", f"archs/{r['id']}/train_s1"]
        for t, seed in zip(r["trainings"], seeds):  # each its own finished run folder with its own seed
            assert (save_dir / t["train_dir"] / "done").is_file()
            assert json.loads((save_dir / t["train_dir"] / "config.json").read_text())["seed"] == seed
        assert r["trainings"][0]["accuracy"] == before["accuracy"]  # the first training was kept, not redone
        assert r["proxies"] == before["proxies"]
        acc = r["accuracy"]["test"]["5"]
        per_seed = [t["accuracy"]["test"]["5"]["mean"] for t in r["trainings"]]
        assert acc["per_seed"] == per_seed and acc["mean"] == pytest.approx(np.mean(per_seed))
        assert acc["min"] == min(per_seed) and acc["std"] == pytest.approx(np.std(per_seed, ddof=1))
        differ += per_seed[0] != per_seed[1]
    assert differ > 0  # the seeds give other trainings
    summary = json.loads((save_dir / "summary.json").read_text())
    assert summary["trainings"] == {"k": 2, "seeds": seeds}
    for shots in ("1", "5"):
        ceiling = summary["ceiling"][shots]
        assert (ceiling["k"], ceiling["n_archs"]) == (2, 4)
        runs = [[r["accuracy"]["test"][shots]["per_seed"][k] for r in records] for k in range(2)]
        assert ceiling["kendall_tau"] == pytest.approx(scipy.stats.kendalltau(*runs).statistic)
        assert {"low", "high"} <= set(ceiling["kendall_tau_ci95"]) and "spearman_rho_ci95" in ceiling
        assert set(summary["per_architecture"]) == {r["id"] for r in records}
        row = summary["proxies"]["kappa_maml"]["shots"][shots]
        assert "fraction_of_ceiling" in row
    table = (save_dir / "summary.txt").read_text()
    assert "seed-to-seed ceiling" in table and "τ/ceiling" in table and "no ceiling" not in table
    assert sorted(table.splitlines()) == sorted(format_table(summary).splitlines())
    assert (save_dir / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (save_dir / "done").is_file()


def test_fewer_train_seeds_summarise_the_first_trainings(two_trainings, tmp_path, monkeypatch):
    """--train_seeds 1 on a folder of two trainings trains nothing and gives the one-training study back."""
    import shutil

    save_dir, argv, one = two_trainings
    copy = tmp_path / "copy"
    shutil.copytree(save_dir, copy)
    monkeypatch.setattr(study_trainings, "train_and_evaluate", lambda *a: pytest.fail("nothing to train"))
    argv = [*argv, "--save_dir", str(copy)]
    assert study_command.main([*argv, "--train_seeds", "1"]) == 0
    assert _records(copy) == one["records"]
    assert json.loads((copy / "summary.json").read_text())["ceiling"] is None
    assert study_command.main([*argv, "--train_seeds", "2"]) == 0  # and back: nothing trained either
    assert json.loads((copy / "summary.json").read_text())["ceiling"] is not None
    assert study_command.main([*argv, "--train_seeds", "0"]) == 2


# ---- --search_objectives: one search per objective beside the random architectures ----

SEARCHED = ("kappa", "regions", "naswot")


@pytest.fixture(scope="module")
def searched(reference, synthetic_mini, tmp_path_factory):
    """The tiny study's folder (copied) run again with --search_objectives kappa,regions,naswot (searches of few
    candidates, `two_op_search`), killed during the second search's training and resumed; the calls of each run."""
    import shutil

    from conftest import two_op_search

    from eval_lib.study import study_searches
    from search_lib.search.pruning import PruningSearch

    save_dir = tmp_path_factory.mktemp("study") / "searched"
    shutil.copytree(reference, save_dir)
    argv = _argv(synthetic_mini, save_dir, "--search_objectives", ",".join(SEARCHED))
    calls: dict[str, list] = {"search": [], "train": []}
    real_run, real_train = PruningSearch.run, study_searches.train_with_seeds
    kill = [True]

    def run(self, state):
        calls["search"].append(self.cfg.objective)
        return real_run(self, state)

    def train(cfg, genotype, folder, **kw):
        calls["train"].append(folder.name)
        if len(calls["train"]) == 2 and kill[0]:
            raise KeyboardInterrupt  # killed during the second search's training
        return real_train(cfg, genotype, folder, **kw)

    with pytest.MonkeyPatch.context() as mp:
        two_op_search(mp)
        mp.setattr(PruningSearch, "run", run)
        mp.setattr(study_searches, "train_with_seeds", train)
        assert study_command.main(argv) == 130
        first = {k: list(v) for k, v in calls.items()}
        kill[0] = False
        for v in calls.values():
            v.clear()
        assert study_command.main(argv) == 0
        second = {k: list(v) for k, v in calls.items()}
        for v in calls.values():
            v.clear()
        assert study_command.main(argv) == 0  # finished: nothing searched or trained again
        third = {k: list(v) for k, v in calls.items()}
    return save_dir, argv, (first, second, third)


def test_search_objectives_are_items_of_plus_joined_objectives(capsys, tmp_path):
    items = StudyConfig(search_objectives="regions+kappa, naswot,log_rank:zico+naswot").search_items()
    assert [(i.label, i.slug, i.objective, i.combine) for i in items] == [
        ("kappa+regions", "kappa+regions", "kappa,regions", "rank"), ("naswot", "naswot", "naswot", "rank"),
        ("log_rank:naswot+zico", "log_rank-naswot+zico", "naswot,zico", "log_rank")]
    assert StudyConfig().search_items() == []
    for bad, said in (("kappa,nasw0t", "valid: kappa, regions, grad_norm"), ("kappa,,naswot", "names no objective"),
                      ("kappa+regions,regions+kappa", "twice"), ("log_rank:naswot", "several")):
        assert study_command.main(["--save_dir", str(tmp_path / "s"), "--search_objectives", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--search_objectives" in err and said in err, err
    assert not (tmp_path / "s").exists()


def test_search_objectives_give_one_row_per_objective(searched, reference):
    save_dir, _, (first, second, third) = searched
    # killed in the second search's training; the re-run searched only the third objective (the second's search
    # was finished), trained the second and third; a third run did nothing
    assert first["search"] == ["kappa", "regions"] and first["train"] == ["kappa", "regions"]
    assert second["search"] == ["naswot"] and second["train"] == ["regions", "naswot"]
    assert third == {"search": [], "train": []}
    assert _records(save_dir) == _records(reference)  # the architectures were not studied again
    summary = json.loads((save_dir / "summary.json").read_text())
    assert [e["label"] for e in summary["searches"]] == list(SEARCHED) and (save_dir / "done").is_file()
    randoms = [r["accuracy"]["test"] for r in _records(reference)]
    for label, entry in zip(SEARCHED, summary["searches"]):
        folder = save_dir / "searches" / label
        geno = GenotypeRecord.from_json((folder / "search" / "genotype.json").read_text()).genotype
        assert entry["genotype"] == str(geno.validate(SearchSpace("darts_fewshot", 3)))
        cost = json.loads((folder / "search" / "cost.json").read_text())
        assert entry["search_s"] == cost["seconds"] > 0 and cost["objectives"] == [label]
        assert entry["objectives"] == [label] and entry["combine"] == "rank" and entry["trainings"] == 1
        assert (folder / "train" / "done").is_file()
        for s in ("1", "5"):
            row = entry["shots"][s]
            assert 0 <= row["percentile"] <= 100 and row["random_archs"] == 3
            below = sum(r[s]["mean"] < row["mean"] for r in randoms) + 0.5 * sum(r[s]["mean"] == row["mean"]
                                                                                  for r in randoms)
            assert row["percentile"] == pytest.approx(100 * below / 3)
            ci = row["ci95"]  # one training: the test episodes' interval
            assert ci["low"] <= row["mean"] <= ci["high"] and "one training" in ci["method"]
    table = (save_dir / "summary.txt").read_text()
    assert "search objective" in table and all(f"  {label}: Genotype(" in table for label in SEARCHED)
    assert sorted(table.splitlines()) == sorted(format_table(summary).splitlines())
    assert (save_dir / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_search_of_other_settings_is_refused(searched, capsys):
    save_dir, argv, _ = searched
    config = (save_dir / "searches" / "naswot" / "search" / "config.json").read_text()
    capsys.readouterr()
    assert study_command.main([*argv, "--prune_number", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "prune_number: 1 -> 2" in err and "kappa" in err
    assert (save_dir / "searches" / "naswot" / "search" / "config.json").read_text() == config


def test_an_interval_over_several_trainings_is_a_t_interval():
    from eval_lib.study.study_searches import accuracy_interval

    per_seed = [60.0, 64.0, 65.0]
    res = seed_accuracy([{"accuracy": {"test": {"5": {"mean": m, "ci95": 2.0}}}} for m in per_seed])["test"]["5"]
    ci = accuracy_interval(res, 3)
    half = scipy.stats.t.ppf(0.975, 2) * np.std(per_seed, ddof=1) / np.sqrt(3)
    assert (ci["low"], ci["high"]) == pytest.approx((np.mean(per_seed) - half, np.mean(per_seed) + half))
    assert accuracy_interval({"mean": 60.0, "ci95": 2.0}, 1)["low"] == 58.0
