"""study.png of a proxy study (`eval_lib.study.study_run`, docs/method.md §9).

Top: one panel per proxy, the proxy against the test accuracy at the chosen shots (with its 95% interval).
Bottom: per number of shots a bar chart of Kendall τ and of the partial τ given #params (with their 95%
intervals) per proxy, the seed-to-seed ceiling (how well one training ranks the architectures against
another, with several trainings per architecture) a dashed line across the bars with its interval shaded,
and a heatmap of the proxies' rank correlations with each other (Kendall τ); with --search_objectives a last
panel: each search's mean accuracy (with its 95% interval) against the search's seconds, beside the random
architectures' accuracy (their range shaded, their median dashed).
"""

from __future__ import annotations

import io
import math

import numpy as np

from eval_lib.study.proxies import PROXIES
from eval_lib.study.study_stats import accuracy, signed_values

SCATTER_COLUMNS = 7


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.2f}"


def _label(summary: dict, p: str) -> str:
    entry = summary["proxies"][p]
    return f"{'−' if entry['sign'] < 0 else ''}{entry['label']}"


def _scatter(ax, records: list[dict], summary: dict, p: str, values: list, shots: str) -> None:
    label, sign = PROXIES[p]
    pts = [(v * sign, r["accuracy"]["test"][shots]) for v, r in zip(values, records)
           if v is not None and accuracy(r, shots) is not None]  # back to the proxy's own scale
    if pts:
        x = np.array([v for v, _ in pts])
        y = np.array([res["mean"] for _, res in pts])
        if all("min" in res for _, res in pts):  # several trainings: the bar spans them (their min to max)
            err = np.array([[m - res["min"] for m, (_, res) in zip(y, pts)],
                            [res["max"] - m for m, (_, res) in zip(y, pts)]])
        else:  # one training: the 95% interval of its test episodes
            err = np.array([res.get("ci95") or 0.0 for _, res in pts])
        ax.errorbar(x, y, yerr=err, fmt="o", ms=3, capsize=1.5, alpha=0.75, elinewidth=0.8)
        if x.min() > 0 and x.max() / x.min() > 10:
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks collide on short ranges
    row = summary["proxies"][p]["shots"].get(shots, {})
    good = "low" if sign < 0 else "high"
    ax.set_title(f"{label} ({good} is good)\nτ {_num(row.get('kendall_tau'))}, partial τ "
                 f"{_num(row.get('partial_kendall_tau'))}", fontsize=8.5)
    ax.tick_params(labelsize=6.5)
    ax.xaxis.get_offset_text().set_fontsize(6.5)


def _bars(ax, summary: dict, shots: str, names: list[str]) -> None:
    y = np.arange(len(names))
    for offset, stat, colour, text in ((-0.2, "kendall_tau", "tab:blue", "Kendall τ"),
                                       (0.2, "partial_kendall_tau", "tab:orange", "partial τ | #params")):
        rows = [summary["proxies"][p]["shots"].get(shots, {}) for p in names]
        vals = [np.nan if r.get(stat) is None else r[stat] for r in rows]
        ax.barh(y + offset, vals, height=0.4, color=colour, label=text)
        # the 95% interval as a line of its own: a percentile interval need not hold the estimate
        cis = [(i, r.get(stat + "_ci95") or {}) for i, r in enumerate(rows)]
        cis = [(i, ci) for i, ci in cis if ci.get("low") is not None]
        if cis:
            ax.hlines([y[i] + offset for i, _ in cis], [ci["low"] for _, ci in cis], [ci["high"] for _, ci in cis],
                      color="0.25", lw=0.9)
    ax.axvline(0, color="0.2", lw=0.8)
    ceiling = (summary.get("ceiling") or {}).get(shots)
    if ceiling and ceiling.get("kendall_tau") is not None:
        ci = ceiling["kendall_tau_ci95"]
        if ci.get("low") is not None:
            ax.axvspan(ci["low"], ci["high"], color="tab:red", alpha=0.08, lw=0)
        ax.axvline(ceiling["kendall_tau"], color="tab:red", ls="--", lw=1.2,
                   label=f"seed-to-seed ceiling τ {_num(ceiling['kendall_tau'])}")
    ax.set_yticks(y, [_label(summary, p) for p in names], fontsize=7.5)
    ax.invert_yaxis()
    ax.set_xlim(-1, 1)
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(f"{shots}-shot test accuracy: τ and partial τ given #params (lines: 95% intervals)"
                 + ("\ndashed: seed-to-seed ceiling, shaded: its 95% interval" if ceiling else ""), fontsize=9)
    ax.legend(fontsize=7, loc="lower right")


def _heatmap(fig, ax, summary: dict) -> None:
    corr = summary["proxy_correlation"]
    names = corr["names"]
    ax.set_title("proxy vs proxy: Kendall τ of the signed proxies over the architectures", fontsize=9)
    if not names:
        ax.text(0.5, 0.5, "fewer than 3 architectures", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    m = np.array([[np.nan if v is None else v for v in row] for row in corr["matrix"]], dtype=np.float64)
    image = ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            if math.isfinite(m[i, j]) and i != j:
                text = f"{m[i, j]:.1f}"
                text = "0" if text in ("0.0", "-0.0") else text.replace("0.", ".").replace("-", "−")
                ax.text(j, i, text, ha="center", va="center", fontsize=6.5,
                        color="white" if abs(m[i, j]) > 0.6 else "black")
    labels = [_label(summary, p) for p in names]
    ax.set_xticks(range(len(names)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), labels, fontsize=7)
    fig.colorbar(image, ax=ax, shrink=0.7, pad=0.02).ax.tick_params(labelsize=7)


def _searches(ax, searches: list[dict], shots: str) -> None:
    """Accuracy against search cost, one point per search, the random architectures' range behind them."""
    points = [(e["label"], e["search_s"], e["shots"][shots]) for e in searches if shots in e["shots"]]
    ax.set_title(f"each search's genotype: {shots}-shot accuracy against the search's seconds\n(bars: 95% "
                 f"intervals; shaded: the random architectures' range, dashed: their median)", fontsize=9)
    ranged = next((row["random_accuracy"] for _, _, row in points if row.get("random_accuracy")), None)
    if ranged:
        ax.axhspan(ranged["min"], ranged["max"], color="0.5", alpha=0.15, lw=0)
        ax.axhline(ranged["median"], color="0.35", ls="--", lw=1)
    for label, seconds, row in points:
        ci = row["ci95"]
        err = None if ci["low"] is None else [[row["mean"] - ci["low"]], [ci["high"] - row["mean"]]]
        ax.errorbar([seconds], [row["mean"]], yerr=err, fmt="o", ms=5, capsize=2.5)
        ax.annotate(label, (seconds, row["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=7.5)
    times = [t for _, t, _ in points if t and t > 0]
    if times and max(times) / min(times) > 10:
        ax.set_xscale("log")
    ax.set_xlabel("search seconds (cost.json)", fontsize=8)
    ax.set_ylabel(f"test {shots}-shot accuracy (%)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def study_png(records: list[dict], summary: dict, shots: str) -> bytes:
    """The PNG: the scatter panels at ``shots``, the τ bar chart of every number of shots, the heatmap.

    Fixed margins instead of matplotlib's constrained layout, which took most of the drawing time here."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    signed = signed_values(records, summary.get("combinations", {}).get("log_rank", ()))
    names = [p for p in PROXIES if any(v is not None for v in signed.get(p, ()))]
    all_shots = list(summary["accuracy"])
    rows = max(1, math.ceil(len(names) / SCATTER_COLUMNS))
    top_in, bottom_in = 2.75 * rows + 1.0, 9.0
    height = top_in + bottom_in
    fig = Figure(figsize=(24, height))
    FigureCanvasAgg(fig)
    split = bottom_in / height
    grid = fig.add_gridspec(rows, SCATTER_COLUMNS, left=0.035, right=0.99, top=1 - 1.0 / height,
                            bottom=split + 0.5 / height, hspace=0.55, wspace=0.22)
    axes = [fig.add_subplot(grid[k // SCATTER_COLUMNS, k % SCATTER_COLUMNS]) for k in range(len(names))]
    for ax, p in zip(axes, names):
        _scatter(ax, records, summary, p, signed[p], shots)
    k = summary.get("trainings", {}).get("k", 1)
    fig.text(0.008, split + top_in / height / 2, f"test {shots}-shot accuracy (%)" + (
        f", mean of {k} trainings (bars: min–max)" if k > 1 else ""), rotation=90, va="center", fontsize=9)
    fig.suptitle(f"Proxies at initialisation against few-shot accuracy ({len(records)} architectures; τ of the "
                 f"signed proxy, partial τ given #params; combinations on their own scale)", fontsize=11,
                 y=1 - 0.15 / height)
    searches = summary.get("searches") or []
    extra = [1.2] if searches else []
    lower = fig.add_gridspec(1, len(all_shots) + 1 + len(extra), width_ratios=[1] * len(all_shots) + [1.35] + extra,
                             left=0.085, right=0.965, top=split - 0.45 / height, bottom=1.5 / height, wspace=0.42)
    panels = [fig.add_subplot(lower[0, k]) for k in range(len(all_shots) + 1 + len(extra))]
    for ax, s in zip(panels, all_shots):
        _bars(ax, summary, s, [p for p in names if p in summary["proxies"]])
    _heatmap(fig, panels[len(all_shots)], summary)
    if searches:
        _searches(panels[-1], searches, shots)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()
