"""The summary of a proxy study as a text table (summary.txt and the printed table; the numbers are
`eval_lib.study.study_stats`'s): one line per proxy and number of shots, then the architectures' accuracy,
the seed-to-seed ceiling or that none was measured, the rules of the combinations and of the intervals,
with several trainings per architecture each architecture's mean and spread, and with --search_objectives one
line per search and shots (`eval_lib.study.study_searches`)."""

from __future__ import annotations

from eval_lib.study.study_stats import STATS


def _num(v: float | None) -> str:
    return "  n/a" if v is None else f"{v:+.2f}"


def _ci(ci: dict) -> str:
    return "[  n/a,   n/a]" if ci["low"] is None else f"[{ci['low']:+.2f}, {ci['high']:+.2f}]"


def _seconds(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _fraction(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def format_table(summary: dict) -> str:
    """The summary as a text table: one line per proxy and number of shots; below it the architectures'
    accuracy, the seed-to-seed ceiling (or that none was measured) and, with several trainings, each
    architecture's mean and spread."""
    k = summary["top_k"]
    ceiling = summary.get("ceiling")
    rows = [("proxy (sign)", "shots", "Kendall τ [95% CI]", "partial τ | #params", "Spearman ρ [95% CI]",
             "partial ρ | #params", f"top-{k}", *(("τ/ceiling",) if ceiling else ()), "s/arch")]
    worst_nan = 0
    for entry in summary["proxies"].values():
        for n, (s, row) in enumerate(entry["shots"].items()):
            cis = [row[f"{stat}_ci95"] for stat in ("kendall_tau", "spearman_rho", "partial_kendall_tau",
                                                    "partial_spearman_rho") if f"{stat}_ci95" in row]
            worst_nan = max(worst_nan, *(ci["nan_resamples"] for ci in cis if ci["low"] is not None), 0)
            partial = [f"{_num(row.get(f'partial_{stat}'))} {_ci(row.get(f'partial_{stat}_ci95', {'low': None}))}"
                       for stat in STATS]
            rows.append((f"{'-' if entry['sign'] < 0 else '+'}{entry['label']}", s,
                         f"{_num(row['kendall_tau'])} {_ci(row['kendall_tau_ci95'])}", partial[0],
                         f"{_num(row['spearman_rho'])} {_ci(row['spearman_rho_ci95'])}", partial[1],
                         f"{row['top_k_hit']:.2f}",
                         *((_fraction(row.get("fraction_of_ceiling")),) if ceiling else ()),
                         _seconds(entry.get("cost_s", {}).get("mean")) if n == 0 else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    n, boot = summary["architectures"], summary["bootstrap"]
    trainings = summary.get("trainings", {"k": 1, "seeds": []})
    acc = "; ".join(f"{s}-shot {a['min']:.2f}–{a['max']:.2f}% (best {a['best']}, top-{k} by chance "
                    f"{a['chance_top_k']:.2f})" for s, a in summary["accuracy"].items())
    mean_of = "" if trainings["k"] == 1 else f" (the mean of {trainings['k']} trainings each)"
    lines.append(f"{n} architectures" + (f" of {summary['expected']}" if summary["expected"] != n else "")
                 + f"; test accuracy{mean_of} {acc}")
    if ceiling:
        per = "; ".join(f"{s}-shot τ {_num(c['kendall_tau'])} {_ci(c['kendall_tau_ci95'])}, ρ "
                        f"{_num(c['spearman_rho'])} {_ci(c['spearman_rho_ci95'])}" for s, c in ceiling.items())
        pairs = "between the two trainings" if trainings["k"] == 2 else \
            f"the mean over the {trainings['k'] * (trainings['k'] - 1) // 2} pairs of trainings"
        spread = ", ".join(f"{s}-shot {a['mean_seed_std']:.2f}" for s, a in summary["accuracy"].items()
                           if "mean_seed_std" in a)
        lines.append(f"seed-to-seed ceiling (τ and ρ of the accuracies {pairs} over the architectures; seeds "
                     f"{', '.join(map(str, trainings['seeds']))}): {per}")
        lines.append(f"proxies ranked against the mean accuracy; τ/ceiling: the proxy's τ over the ceiling's τ; "
                     f"an architecture's accuracy moves between its trainings by a std of {spread} points (mean)")
    else:
        lines.append(f"no ceiling measured (--train_seeds {trainings['k']}): one training per architecture, so the "
                     f"table cannot tell a proxy's ranking from the training's noise; use --train_seeds 2")
    combos = summary.get("combinations", {})
    if combos:
        lines.append(f"rank sum: dense ranks of {' + '.join(combos['search_rule'])} (the search's rule); log-rank: "
                     f"Σ log(rank/m) over {', '.join(combos['log_rank'])} (AZ-NAS's rule)")
    lines.append(f"95% intervals: {boot['resamples']} paired bootstrap resamples over architectures (percentile); "
                 f"resamples with an undefined statistic left out (at most {worst_nan} per interval); s/arch: "
                 f"mean seconds per architecture")
    if ceiling:
        lines.append(f"test accuracy per architecture, mean ± std over its {trainings['k']} trainings [min, max]:")
        for arch, per_shots in summary.get("per_architecture", {}).items():
            lines.append(f"  {arch}  " + "  ".join(
                f"{s}-shot {a['mean']:.2f} ± {a['std']:.2f} [{a['min']:.2f}, {a['max']:.2f}]"
                for s, a in per_shots.items() if a.get("std") is not None))
    if summary.get("searches"):
        lines += search_lines(summary["searches"])
    return "\n".join(lines)


def search_lines(searches: list[dict]) -> list[str]:
    """The searches of --search_objectives: per search and shots the mean accuracy with its 95% interval, its
    percentile among the random architectures and the search's seconds; then each search's genotype."""
    rows = [("search objective", "shots", "accuracy [95% interval]", "percentile", "search s")]
    for entry in searches:
        for n, (s, row) in enumerate(entry["shots"].items()):
            ci = row["ci95"]
            interval = "[n/a]" if ci["low"] is None else f"[{ci['low']:.2f}, {ci['high']:.2f}]"
            rows.append((entry["label"] if n == 0 else "", s, f"{row['mean']:.2f} {interval}",
                         "n/a" if row["percentile"] is None else f"{row['percentile']:.0f}",
                         _seconds(entry["search_s"]) if n == 0 else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    first = searches[0]
    some = next(iter(first["shots"].values()), None)
    method = some["ci95"]["method"] if some else "n/a"
    randoms = some["random_archs"] if some else 0
    lines = ["", f"searches (--search_objectives; the study's data, seed and search flags; each genotype trained "
                 f"{first['trainings']} time(s); interval: {method}; percentile among the {randoms} random "
                 f"architectures' mean accuracies):"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"  {entry['label']}: {entry['genotype']}" for entry in searches]
    return lines
