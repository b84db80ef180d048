"""The statistics and the picture of a proxy study (`eval_lib.proxy_study`, docs/method.md §9).

For each proxy and each number of shots: Kendall τ and Spearman ρ (scipy) between the proxy, signed as
the method uses it (+1 high is good, -1 low is good), and the test accuracy over the architectures; their
95% intervals from a paired bootstrap over architectures (scipy.stats.bootstrap, percentile method, a
seeded generator); and the top-k hit rate (the share of the proxy's best architectures that are among the
k most accurate). The bootstrap evaluates τ-b and ρ vectorised over the resamples (`kendall_tau_b`,
`spearman_rho`; equal to scipy's statistics, which the tests check).

A bootstrap resample draws architectures with replacement, so with few architectures some resamples hold
one architecture many times and a constant proxy or accuracy, where τ and ρ are undefined (NaN). Such
resamples are left out and counted (``nan_resamples``); the interval is the percentile interval of the rest
(scipy would return NaN for the whole interval).
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import scipy.stats

from .proxies import PROXIES, REPEATED

STATS = {"kendall_tau": scipy.stats.kendalltau, "spearman_rho": scipy.stats.spearmanr}


def proxy_value(record: dict, name: str) -> float | None:
    """The value of a proxy in an architecture's record (the mean over the repeats for κ and regions)."""
    value = record["proxies"][name]["mean"] if name in REPEATED else record["baselines"][name]
    return None if value is None else float(value)


def accuracy(record: dict, shots: str, split: str = "test") -> float | None:
    res = record.get("accuracy", {}).get(split, {}).get(str(shots))
    return None if res is None else float(res["mean"])


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def kendall_tau_b(x, y, axis: int = -1) -> np.ndarray:
    """Kendall's τ-b along ``axis``, vectorised over the other axes (scipy.stats.kendalltau's statistic, which
    it equals; NaN where x or y is constant). The bootstrap evaluates it on thousands of resamples at once."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    y = np.moveaxis(np.asarray(y, dtype=np.float64), axis, -1)
    n = x.shape[-1]
    dx = np.sign(x[..., :, None] - x[..., None, :])
    dy = np.sign(y[..., :, None] - y[..., None, :])
    pairs = n * (n - 1) / 2
    untied_x = pairs - ((dx == 0).sum(axis=(-2, -1)) - n) / 2
    untied_y = pairs - ((dy == 0).sum(axis=(-2, -1)) - n) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return (dx * dy).sum(axis=(-2, -1)) / 2 / np.sqrt(untied_x * untied_y)


def spearman_rho(x, y, axis: int = -1) -> np.ndarray:
    """Spearman's ρ along ``axis`` (the Pearson correlation of the average ranks, as scipy.stats.spearmanr),
    vectorised over the other axes; NaN where x or y is constant."""
    rx = scipy.stats.rankdata(x, axis=axis)
    ry = scipy.stats.rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (rx * ry).sum(axis=axis) / np.sqrt((rx * rx).sum(axis=axis) * (ry * ry).sum(axis=axis))


VECTORISED = {"kendall_tau": kendall_tau_b, "spearman_rho": spearman_rho}


def correlation(score, acc) -> dict:
    """Kendall τ (τ-b) and Spearman ρ with their p-values (None where undefined, e.g. a constant proxy)."""
    out = {}
    for name, fn in STATS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fn(np.asarray(score, dtype=np.float64), np.asarray(acc, dtype=np.float64))
        out[name], out[name.split("_")[0] + "_p"] = _finite(res.statistic), _finite(res.pvalue)
    return out


def bootstrap_interval(score, acc, stat: str, seed: int, n_resamples: int, confidence: float = 0.95) -> dict:
    """Paired percentile bootstrap interval of ``stat`` ("kendall_tau" or "spearman_rho") over architectures.

    Resamples whose statistic is NaN are left out (``nan_resamples`` counts them); ``low``/``high`` are None
    when fewer than 3 architectures or no finite resample remain.
    """
    x, y = np.asarray(score, dtype=np.float64), np.asarray(acc, dtype=np.float64)
    out = {"low": None, "high": None, "resamples": int(n_resamples), "nan_resamples": 0}
    if len(x) < 3:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns (about BCa) when some resamples are NaN
        res = scipy.stats.bootstrap((x, y), VECTORISED[stat], paired=True, vectorized=True, method="percentile",
                                    n_resamples=n_resamples, confidence_level=confidence,
                                    rng=np.random.default_rng(seed))
    dist = np.asarray(res.bootstrap_distribution, dtype=np.float64)
    finite = dist[np.isfinite(dist)]
    out["nan_resamples"] = int(dist.size - finite.size)
    if finite.size:
        alpha = (1.0 - confidence) / 2
        out["low"], out["high"] = (float(v) for v in np.percentile(finite, [100 * alpha, 100 * (1 - alpha)]))
    return out


def top_k_hit(score, acc, k: int) -> float:
    """Share of the architectures with the best signed score that are among the k most accurate (ties at the
    k-th accuracy count as among them)."""
    score, acc = np.asarray(score, dtype=np.float64), np.asarray(acc, dtype=np.float64)
    best = np.flatnonzero(score == score.max())
    kth = np.sort(acc)[::-1][min(k, len(acc)) - 1]
    return float(np.mean(acc[best] >= kth))


def summarize(records: list[dict], *, shots: list[str], top_k: int, seed: int, n_resamples: int,
              expected: int | None = None) -> dict:
    """The study's summary: per proxy and shots the correlations, their intervals and the top-k hit rate."""
    summary = {"architectures": len(records), "expected": len(records) if expected is None else expected,
               "top_k": top_k, "bootstrap": {"resamples": n_resamples, "seed": seed, "confidence": 0.95,
                                             "method": "percentile, paired over architectures"},
               "accuracy": {}, "proxies": {}}
    for s in shots:
        accs = [(r["id"], accuracy(r, s)) for r in records if accuracy(r, s) is not None]
        if accs:
            best = max(accs, key=lambda t: t[1])
            summary["accuracy"][s] = {"min": min(a for _, a in accs), "max": best[1], "best": best[0],
                                      "chance_top_k": min(top_k, len(accs)) / len(accs)}
    for p, (label, sign) in PROXIES.items():
        entry = {"label": label, "sign": sign, "shots": {}}
        for s in shots:
            pairs = [(proxy_value(r, p), accuracy(r, s)) for r in records]
            pairs = [(v, a) for v, a in pairs if v is not None and a is not None and math.isfinite(v)]
            if not pairs:
                continue
            score = np.array([sign * v for v, _ in pairs])
            acc = np.array([a for _, a in pairs])
            row = {"n": len(pairs), **correlation(score, acc), "top_k_hit": top_k_hit(score, acc, top_k)}
            for stat in STATS:  # the same seed: every interval sees the same resamples of the architectures
                row[stat + "_ci95"] = bootstrap_interval(score, acc, stat, seed, n_resamples)
            entry["shots"][s] = row
        summary["proxies"][p] = entry
    return summary


def _num(v: float | None) -> str:
    return "  n/a" if v is None else f"{v:+.2f}"


def _ci(ci: dict) -> str:
    return "[  n/a,   n/a]" if ci["low"] is None else f"[{ci['low']:+.2f}, {ci['high']:+.2f}]"


def format_table(summary: dict) -> str:
    """The summary as a text table: one line per proxy and number of shots."""
    k = summary["top_k"]
    rows = [("proxy (sign)", "shots", "Kendall τ [95% CI]", "Spearman ρ [95% CI]", f"top-{k} hit")]
    worst_nan = 0
    for entry in summary["proxies"].values():
        for s, row in entry["shots"].items():
            worst_nan = max(worst_nan, *(row[f"{s}_ci95"]["nan_resamples"] for s in STATS))
            rows.append((f"{'-' if entry['sign'] < 0 else '+'}{entry['label']}", s,
                         f"{_num(row['kendall_tau'])} {_ci(row['kendall_tau_ci95'])}",
                         f"{_num(row['spearman_rho'])} {_ci(row['spearman_rho_ci95'])}", f"{row['top_k_hit']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    n, boot = summary["architectures"], summary["bootstrap"]
    acc = "; ".join(f"{s}-shot {a['min']:.2f}–{a['max']:.2f}% (best {a['best']}, top-{k} by chance "
                    f"{a['chance_top_k']:.2f})" for s, a in summary["accuracy"].items())
    lines.append(f"{n} architectures" + (f" of {summary['expected']}" if summary["expected"] != n else "")
                 + f"; test accuracy {acc}")
    lines.append(f"95% intervals: {boot['resamples']} paired bootstrap resamples over architectures (percentile); "
                 f"resamples with an undefined statistic left out (at most {worst_nan} per interval)")
    return "\n".join(lines)


def scatter_png(records: list[dict], summary: dict, shots: str) -> bytes:
    """A PNG: one panel per proxy, the proxy against the test accuracy at ``shots`` (with its 95% interval)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(16, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, (len(PROXIES) + 1) // 2, squeeze=False).ravel()
    for ax, (p, (label, sign)) in zip(axes, PROXIES.items()):
        pts = [(proxy_value(r, p), r["accuracy"]["test"][shots]) for r in records
               if proxy_value(r, p) is not None and accuracy(r, shots) is not None]
        pts = [(v, res) for v, res in pts if math.isfinite(v)]
        if pts:
            x = np.array([v for v, _ in pts])
            y = np.array([res["mean"] for _, res in pts])
            err = np.array([res.get("ci95") or 0.0 for _, res in pts])
            ax.errorbar(x, y, yerr=err, fmt="o", ms=4, capsize=2, alpha=0.8)
            if x.min() > 0 and x.max() / x.min() > 10:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks collide on short ranges
        row = summary["proxies"][p]["shots"].get(shots, {})
        ax.set_title(f"{label} ({'low' if sign < 0 else 'high'} is good)\nτ = {_num(row.get('kendall_tau'))}, "
                     f"ρ = {_num(row.get('spearman_rho'))}", fontsize=9)
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel(f"test {shots}-shot accuracy (%)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(PROXIES):]:
        ax.set_visible(False)
    fig.suptitle(f"Proxies against few-shot accuracy ({len(records)} architectures; τ, ρ of the signed proxy)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()
