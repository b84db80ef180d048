"""The statistics of a proxy study (`eval_lib.study.study_run`, docs/method.md §9); the picture is
`eval_lib.study.study_plot`.

For each proxy and each number of shots: Kendall τ and Spearman ρ (scipy) between the proxy, signed as
the method uses it (+1 high is good, -1 low is good), and the test accuracy over the architectures; the
partial τ and ρ given #params (does the proxy know more than the model's size?); their 95% intervals from
a paired bootstrap over architectures (scipy.stats.bootstrap, percentile method, a seeded generator); the
top-k hit rate (the share of the proxy's best architectures that are among the k most accurate); and its
cost per architecture. The bootstrap evaluates its statistics vectorised over the resamples
(`kendall_tau_b`, `spearman_rho`, equal to scipy's, which the tests check, and the partial ones built on them).

Two combined rankings are rows of their own (`combined_scores`): the search's rule, the sum of the dense
ranks of −κ (MetaNTK-MAML) and of the linear-region count, and AZ-NAS's rule, Σ log(rank/m) over
``--log_rank_members`` (average ranks, 1 the worst, m the best of the m architectures).

With several trainings per architecture (``--train_seeds K``, `eval_lib.study.study_trainings`) the proxies are
correlated with each architecture's mean accuracy over its trainings, and the summary measures the study's own
noise, the **seed-to-seed ceiling** (`seed_ceiling`): Kendall τ and Spearman ρ between the accuracies of two
trainings (seed k and seed l, the same for every architecture) over the architectures, for K > 2 the mean over
the K(K−1)/2 pairs, with a paired bootstrap interval over architectures (the same resamples as the proxies').
It is how well one training ranks the architectures against another: a proxy's τ against one training can
hardly exceed it. A proxy's ``fraction_of_ceiling`` is its τ (against the mean) over the ceiling's τ; the
mean of K trainings is less noisy than one, so the fraction may exceed 1 without the proxy being perfect.

A bootstrap resample draws architectures with replacement, so with few architectures some resamples hold
one architecture many times and a constant proxy or accuracy, where τ and ρ are undefined (NaN). Such
resamples are left out and counted (``nan_resamples``); the interval is the percentile interval of the rest
(scipy would return NaN for the whole interval).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.stats

from eval_lib.study.proxies import COMBINATIONS, DEFAULT_LOG_RANK_MEMBERS, KERNELS, PROXIES, REPEATED, SEARCH_RULE, SIZE
from search_lib.search.ranking import dense_rank, log_ranks

STATS = {"kendall_tau": scipy.stats.kendalltau, "spearman_rho": scipy.stats.spearmanr}
PARTIAL_GIVEN = "params"  # the partial correlations hold the model's size fixed


def proxy_value(record: dict, name: str) -> float | None:
    """The value of a proxy in an architecture's record (the mean over the repeats for κ and regions);
    None when the record has none (not computed, or not finite)."""
    if name in REPEATED:
        entry = record.get("proxies", {}).get(name)
        value = None if entry is None else entry["mean"]
    else:
        value = record.get("baselines", {}).get(name)
    return None if value is None else float(value)


def accuracy(record: dict, shots: str, split: str = "test") -> float | None:
    res = record.get("accuracy", {}).get(split, {}).get(str(shots))
    return None if res is None else float(res["mean"])


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def kind(name: str) -> str:
    if name in KERNELS or name == "regions":
        return "search"
    if name in SIZE:
        return "size"
    return "combination" if name in COMBINATIONS else "zero_cost"


# --------------------------------------------------------------------------------------------------
# Rank correlations, plain and partial, vectorised over bootstrap resamples


def _pair_signs(v, axis: int) -> np.ndarray:
    """sign(v_i − v_j) over the pairs i < j along ``axis`` (moved last), as int8: one row of pairs per resample.
    Compared through dense ranks (the same order and ties), as small integers: faster than the floats."""
    v = np.moveaxis(np.asarray(v, dtype=np.float64), axis, -1)
    n = v.shape[-1]
    ranks = scipy.stats.rankdata(v, axis=-1, method="dense").astype(np.int16 if n < 2 ** 15 else np.int64)
    i, j = np.triu_indices(n, 1)
    return np.sign(np.take(ranks, i, axis=-1) - np.take(ranks, j, axis=-1)).astype(np.int8)


def _tau_from_signs(sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """τ-b = Σ sx·sy / √(untied pairs of x × untied pairs of y)."""
    concordance = np.einsum("...k,...k->...", sx, sy, dtype=np.float64)
    untied_x = np.count_nonzero(sx, axis=-1).astype(np.float64)
    untied_y = np.count_nonzero(sy, axis=-1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return concordance / np.sqrt(untied_x * untied_y)


def kendall_tau_b(x, y, axis: int = -1) -> np.ndarray:
    """Kendall's τ-b along ``axis``, vectorised over the other axes (scipy.stats.kendalltau's statistic, which
    it equals; NaN where x or y is constant). The bootstrap evaluates it on thousands of resamples at once."""
    return _tau_from_signs(_pair_signs(x, axis), _pair_signs(y, axis))


def spearman_rho(x, y, axis: int = -1) -> np.ndarray:
    """Spearman's ρ along ``axis`` (the Pearson correlation of the average ranks, as scipy.stats.spearmanr),
    vectorised over the other axes; NaN where x or y is constant."""
    rx = scipy.stats.rankdata(x, axis=axis)
    ry = scipy.stats.rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (rx * ry).sum(axis=axis) / np.sqrt((rx * rx).sum(axis=axis) * (ry * ry).sum(axis=axis))


def partial_correlation(r_xy, r_xz, r_yz) -> np.ndarray:
    """(r_xy − r_xz·r_yz) / √((1 − r_xz²)(1 − r_yz²)): x and y with z held fixed; NaN where z determines x or y."""
    r_xy, r_xz, r_yz = (np.asarray(r, dtype=np.float64) for r in (r_xy, r_xz, r_yz))
    denom = np.sqrt((1.0 - r_xz ** 2) * (1.0 - r_yz ** 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 1e-12, (r_xy - r_xz * r_yz) / np.where(denom > 1e-12, denom, 1.0), np.nan)


def partial_kendall_tau(x, y, z, axis: int = -1) -> np.ndarray:
    """Kendall's partial τ of x and y given z (Kendall 1942), from the three τ-b's; vectorised like `kendall_tau_b`."""
    sx, sy, sz = (_pair_signs(v, axis) for v in (x, y, z))
    return partial_correlation(_tau_from_signs(sx, sy), _tau_from_signs(sx, sz), _tau_from_signs(sy, sz))


def partial_spearman_rho(x, y, z, axis: int = -1) -> np.ndarray:
    """The partial correlation of the ranks of x and y given those of z (from the three Spearman ρ's)."""
    return partial_correlation(spearman_rho(x, y, axis), spearman_rho(x, z, axis), spearman_rho(y, z, axis))


VECTORISED = {"kendall_tau": kendall_tau_b, "spearman_rho": spearman_rho,
              "partial_kendall_tau": partial_kendall_tau, "partial_spearman_rho": partial_spearman_rho}


def correlation(score, acc) -> dict:
    """Kendall τ (τ-b) and Spearman ρ with their p-values (None where undefined, e.g. a constant proxy)."""
    out = {}
    for name, fn in STATS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fn(np.asarray(score, dtype=np.float64), np.asarray(acc, dtype=np.float64))
        out[name], out[name.split("_")[0] + "_p"] = _finite(res.statistic), _finite(res.pvalue)
    return out


def bootstrap_interval(score, acc, stat: str, seed: int, n_resamples: int, confidence: float = 0.95,
                       given=None) -> dict:
    """Paired percentile bootstrap interval of ``stat`` (a key of `VECTORISED`) over architectures; the partial
    statistics take the variable held fixed as ``given``.

    Resamples whose statistic is NaN are left out (``nan_resamples`` counts them); ``low``/``high`` are None
    when fewer than 3 architectures or no finite resample remain. The resampled indices depend only on the
    seed and the number of architectures, so every interval of the same size sees the same resamples.
    """
    data = (score, acc) if given is None else (score, acc, given)
    return paired_bootstrap(data, VECTORISED[stat], seed, n_resamples, confidence)


def paired_bootstrap(data: Sequence, statistic, seed: int, n_resamples: int, confidence: float = 0.95) -> dict:
    """The percentile interval of ``statistic(*data, axis=-1)`` (vectorised over resamples) when the
    architectures (the positions of every array in ``data``) are drawn with replacement; `bootstrap_interval`'s
    rules for NaN resamples and for fewer than 3 architectures."""
    data = tuple(np.asarray(v, dtype=np.float64) for v in data)
    out = {"low": None, "high": None, "resamples": int(n_resamples), "nan_resamples": 0}
    if len(data[0]) < 3:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns (about BCa) when some resamples are NaN
        res = scipy.stats.bootstrap(data, statistic, paired=True, vectorized=True, method="percentile",
                                    n_resamples=n_resamples, confidence_level=confidence,
                                    rng=np.random.default_rng(seed))
    dist = np.asarray(res.bootstrap_distribution, dtype=np.float64)
    finite = dist[np.isfinite(dist)]
    out["nan_resamples"] = int(dist.size - finite.size)
    if finite.size:
        alpha = (1.0 - confidence) / 2
        out["low"], out["high"] = (float(v) for v in np.percentile(finite, [100 * alpha, 100 * (1 - alpha)]))
    return out


# --------------------------------------------------------------------------------------------------
# The seed-to-seed ceiling


def _mean_over_pairs(stat):
    """The vectorised statistic of K arrays: the mean of ``stat`` over every pair of them (NaN if any is)."""
    def statistic(*runs, axis=-1):
        return np.mean([stat(runs[i], runs[j], axis=axis) for i, j in itertools.combinations(range(len(runs)), 2)],
                       axis=0)
    return statistic


def seed_ceiling(per_seed, seed: int, n_resamples: int, confidence: float = 0.95) -> dict | None:
    """The seed-to-seed ceiling from ``per_seed[k][a]``, the accuracy of architecture a in its training k
    (K ≥ 2 trainings): Kendall τ-b and Spearman ρ between two trainings over the architectures (for K > 2
    the mean over the pairs), each with its paired bootstrap interval over architectures; None for K < 2."""
    runs = np.asarray(per_seed, dtype=np.float64)
    if runs.ndim != 2 or runs.shape[0] < 2:
        return None
    k, n = runs.shape
    out: dict = {"k": int(k), "pairs": k * (k - 1) // 2, "n_archs": int(n)}
    for name, stat in (("kendall_tau", kendall_tau_b), ("spearman_rho", spearman_rho)):
        fn = _mean_over_pairs(stat)
        out[name] = _finite(float(fn(*runs))) if n >= 2 else None
        out[name + "_ci95"] = paired_bootstrap(tuple(runs), fn, seed, n_resamples, confidence)
    return out


def fraction_of_ceiling(tau: float | None, ceiling: dict | None) -> float | None:
    """A proxy's τ over the ceiling's τ; None without a ceiling or where the ceiling's τ is not positive."""
    if tau is None or ceiling is None or ceiling.get("kendall_tau") is None or ceiling["kendall_tau"] <= 0:
        return None
    return float(tau / ceiling["kendall_tau"])


def per_seed_accuracy(record: dict, shots: str, split: str = "test") -> list[float] | None:
    """The accuracy of each training of an architecture (one value for a record of one training)."""
    res = record.get("accuracy", {}).get(split, {}).get(str(shots))
    if res is None:
        return None
    return [float(v) for v in res.get("per_seed", [res["mean"]])]


def per_architecture(records: list[dict], shots: list[str]) -> dict:
    """Per architecture and shots: the mean of its accuracy over its trainings, the sample std (None for one
    training), min, max and each training's value."""
    out = {}
    for r in records:
        entry = {}
        for s in shots:
            runs = per_seed_accuracy(r, s)
            if runs:
                entry[s] = {"mean": float(np.mean(runs)), "std": float(np.std(runs, ddof=1)) if len(runs) > 1 else None,
                            "min": min(runs), "max": max(runs), "per_seed": runs}
        out[r["id"]] = entry
    return out


def top_k_hit(score, acc, k: int) -> float:
    """Share of the architectures with the best signed score that are among the k most accurate (ties at the
    k-th accuracy count as among them)."""
    score, acc = np.asarray(score, dtype=np.float64), np.asarray(acc, dtype=np.float64)
    best = np.flatnonzero(score == score.max())
    kth = np.sort(acc)[::-1][min(k, len(acc)) - 1]
    return float(np.mean(acc[best] >= kth))


# --------------------------------------------------------------------------------------------------
# Combined rankings


def combined_scores(signed: Sequence[Sequence[float | None]], rule: str) -> list[float | None]:
    """One combined score per architecture from its members' signed values (``signed[member][arch]``, higher is
    better); None for an architecture that lacks a member. Over the m architectures that have them all:

    * ``"search_rule"``: Σ over members of the dense rank (ties share a rank, no gaps; 0 the worst), the search's
      ranking of candidates (docs/method.md §4) applied to whole architectures;
    * ``"log_rank"``: Σ over members of log(rank / m), rank the average rank (1 the worst, m the best): AZ-NAS's
      non-linear aggregation, which punishes a low rank in any member more than it rewards a high one.
    """
    n = len(signed[0]) if signed else 0
    complete = [i for i in range(n) if all(v[i] is not None and math.isfinite(v[i]) for v in signed)]
    out: list[float | None] = [None] * n
    if not complete:
        return out
    total = np.zeros(len(complete))
    for values in signed:
        member = [values[i] for i in complete]
        if rule == "search_rule":
            total += np.asarray(dense_rank(member), dtype=np.float64)
        elif rule == "log_rank":
            total += log_ranks(member)
        else:
            raise ValueError(f"unknown combination rule {rule!r}")  # internal: the rules are COMBINATIONS
    for i, v in zip(complete, total):
        out[i] = float(v)
    return out


def combination_members(log_rank_members: Sequence[str]) -> dict[str, list[str]]:
    return {"search_rule": list(SEARCH_RULE), "log_rank": list(log_rank_members)}


def signed_values(records: list[dict], log_rank_members: Sequence[str]) -> dict[str, list[float | None]]:
    """Every proxy's signed value per record (None where it has none), the combinations included."""
    out: dict[str, list[float | None]] = {}
    for p, (_, sign) in PROXIES.items():
        if p not in COMBINATIONS:
            values = [proxy_value(r, p) for r in records]
            out[p] = [None if v is None or not math.isfinite(v) else sign * v for v in values]
    for rule, members in combination_members(log_rank_members).items():
        out[rule] = combined_scores([out[m] for m in members], rule)
    return out


def costs(records: list[dict], log_rank_members: Sequence[str]) -> dict[str, dict]:
    """Seconds per architecture of each proxy (a combination's: the sum of its members'), mean and median."""
    per = {p: [r.get("timings", {}).get("proxy_s", {}).get(p) for r in records] for p in PROXIES}
    for rule, members in combination_members(log_rank_members).items():
        per[rule] = [None if any(per[m][i] is None for m in members) else sum(per[m][i] for m in members)
                     for i in range(len(records))]
    out = {}
    for p, values in per.items():
        known = np.array([v for v in values if v is not None], dtype=np.float64)
        out[p] = ({"mean": float(known.mean()), "median": float(np.median(known)), "n": int(known.size)}
                  if known.size else {"mean": None, "median": None, "n": 0})
    return out


def rank_correlation_matrix(signed: dict[str, list[float | None]]) -> dict:
    """Kendall τ-b between every two proxies over the architectures that have both (None below 3 of them)."""
    names = [p for p, v in signed.items() if sum(x is not None for x in v) >= 3]
    matrix = []
    for a in names:
        row = []
        for b in names:
            both = [(x, y) for x, y in zip(signed[a], signed[b]) if x is not None and y is not None]
            tau = kendall_tau_b(*zip(*both)) if len(both) >= 3 else np.nan
            row.append(_finite(float(tau)))
        matrix.append(row)
    return {"statistic": "kendall_tau", "names": names, "matrix": matrix}


# --------------------------------------------------------------------------------------------------
# The summary


def _row(score, acc, size, top_k: int, seed: int, n_resamples: int) -> dict:
    row = {"n": len(score), **correlation(score, acc), "top_k_hit": top_k_hit(score, acc, top_k)}
    for stat in STATS:  # the same seed: every interval sees the same resamples of the architectures
        row[stat + "_ci95"] = bootstrap_interval(score, acc, stat, seed, n_resamples)
    keep = [i for i, z in enumerate(size) if z is not None]
    x, y, z = score[keep], acc[keep], np.array([size[i] for i in keep], dtype=np.float64)
    row["partial_n"] = len(keep)
    for stat in STATS:
        name = "partial_" + stat
        row[name] = _finite(float(VECTORISED[name](x, y, z))) if len(keep) >= 3 else None
        row[name + "_ci95"] = bootstrap_interval(x, y, name, seed, n_resamples, given=z)
    return row


def summarize(records: list[dict], *, shots: list[str], top_k: int, seed: int, n_resamples: int,
              expected: int | None = None, log_rank_members: Sequence[str] = DEFAULT_LOG_RANK_MEMBERS,
              training_seeds: Sequence[int] = (0,)) -> dict:
    """The study's summary: per proxy and shots the correlations (plain and partial given #params), their
    intervals, the top-k hit rate and the fraction of the seed-to-seed ceiling; per proxy its cost; the
    proxies' rank correlations with each other; per architecture the mean and spread of its accuracy over
    its trainings (``training_seeds``, one per training) and the ceiling per shots (None for one training)."""
    members = combination_members(log_rank_members)
    k = len(training_seeds)
    summary = {"architectures": len(records), "expected": len(records) if expected is None else expected,
               "top_k": top_k, "bootstrap": {"resamples": n_resamples, "seed": seed, "confidence": 0.95,
                                             "method": "percentile, paired over architectures"},
               "partial_given": PARTIAL_GIVEN, "combinations": members,
               "trainings": {"k": k, "seeds": [int(x) for x in training_seeds]}, "accuracy": {},
               "per_architecture": per_architecture(records, shots), "ceiling": None, "proxies": {}}
    ceiling = {}
    for s in shots:
        accs = [(r["id"], accuracy(r, s)) for r in records if accuracy(r, s) is not None]
        if accs:
            best = max(accs, key=lambda t: t[1])
            summary["accuracy"][s] = {"min": min(a for _, a in accs), "max": best[1], "best": best[0],
                                      "chance_top_k": min(top_k, len(accs)) / len(accs)}
        runs = [per_seed_accuracy(r, s) for r in records]
        runs = [v[:k] for v in runs if v is not None and len(v) >= k]
        if k > 1 and runs:
            spreads = [float(np.std(v, ddof=1)) for v in runs]
            summary["accuracy"][s]["mean_seed_std"] = float(np.mean(spreads))
            ceiling[s] = seed_ceiling(np.array(runs).T, seed, n_resamples)
    if ceiling:
        summary["ceiling"] = ceiling
    signed, cost = signed_values(records, log_rank_members), costs(records, log_rank_members)
    size = signed[PARTIAL_GIVEN]
    for p, (label, sign) in PROXIES.items():
        entry = {"label": label, "sign": sign, "kind": kind(p), "cost_s": cost[p], "shots": {}}
        if p in members:
            entry["members"] = members[p]
        for s in shots:
            keep = [i for i, r in enumerate(records) if signed[p][i] is not None and accuracy(r, s) is not None]
            if not keep:
                continue
            score = np.array([signed[p][i] for i in keep])
            acc = np.array([accuracy(records[i], s) for i in keep])
            entry["shots"][s] = row = _row(score, acc, [None if p == PARTIAL_GIVEN else size[i] for i in keep],
                                           top_k, seed, n_resamples)
            row["fraction_of_ceiling"] = fraction_of_ceiling(row["kendall_tau"], ceiling.get(s))
        summary["proxies"][p] = entry
    summary["proxy_correlation"] = rank_correlation_matrix(signed)
    return summary
