"""The training's picture, ``training.png`` (``python -m eval_lib.report RUN_DIR ...`` redraws it).

``training.png`` (`draw_training`): loss and accuracy, learning rate and drop-path per epoch (metrics.jsonl,
`eval_lib.train.metrics`), and the few-shot accuracies with their 95% intervals (results.json). It is drawn on the
figure helpers of `search_lib.core.figures`.
"""

from __future__ import annotations

import math
from pathlib import Path

from eval_lib.train.metrics import CURVE_PAIRS, CURVES, METRICS_FILE, read_metrics
from search_lib.core.errors import DataError, one_line
from search_lib.core.figures import Reports, figure, log_axis, note, optional_json, run_folder, save_png

TRAINING_PNG = "training.png"


def _twin_curves(ax, metrics: list[dict], left: str, right: str, labels: tuple[str, str], colours, title: str):
    """Two per-epoch curves of metrics.jsonl, on the left and right axes (their scales differ)."""
    from matplotlib.ticker import MaxNLocator
    epochs = [m["epoch"] for m in metrics]
    ax.plot(epochs, [m[left] for m in metrics], "o-", color=colours[0])
    ax.set_ylabel(labels[0], color=colours[0])
    twin = ax.twinx()
    twin.plot(epochs, [m.get(right, math.nan) for m in metrics], "s--", color=colours[1])
    twin.set_ylabel(labels[1], color=colours[1])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5 on short runs
    ax.set_xlabel("epoch")
    ax.set_title(title)


def _draw_fewshot(ax, fewshot: dict) -> None:
    """Mean accuracy per split and number of shots, error bars = the 95% interval over the episodes."""
    shots = sorted({int(s) for per_split in fewshot.values() for s in per_split})
    width = 0.8 / max(len(fewshot), 1)
    for k, (split, per_split) in enumerate(sorted(fewshot.items())):
        xs = [shots.index(int(s)) + (k - (len(fewshot) - 1) / 2) * width for s in per_split]
        means = [r["mean"] for r in per_split.values()]
        cis = [r.get("ci95") or 0.0 for r in per_split.values()]
        episodes = sorted({r.get("episodes") for r in per_split.values()} - {None})
        ax.errorbar(xs, means, yerr=cis, fmt="o", capsize=4,
                    label=f"{split} ({', '.join(map(str, episodes))} episodes)")
        for x, m in zip(xs, means):
            ax.annotate(f"{m:.1f}", (x, m), textcoords="offset points", xytext=(6, 0), fontsize=8, va="center")
    ax.set_xticks(range(len(shots)), [f"{s}-shot" for s in shots])
    ax.set_xlim(-0.6, len(shots) - 0.4)
    low, high = ax.get_ylim()  # an interval from few episodes can pass 0 or 100%; accuracies cannot
    ax.set_ylim(max(low, 0.0), min(high, 100.0))
    ax.set_ylabel("few-shot accuracy (%), 95% CI")
    ax.legend(fontsize=8)
    ax.set_title("few-shot test")


def draw_training(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/training.png`` from a training folder (results.json may be absent: still training)."""
    run_dir = run_folder(run_dir)
    metrics = read_metrics(run_dir)
    results, why_not = optional_json(run_dir / "results.json")
    config = optional_json(run_dir / "config.json")[0] or {}
    fig = figure(15, 4.2)
    axes = fig.subplots(1, 3)
    try:
        if metrics:
            styles = ((("tab:red", "tab:green"), "loss and accuracy"),
                      (("tab:purple", "tab:grey"), "schedule (at the start of each epoch)"))
            for ax, (left, right), (colours, title) in zip(axes, CURVE_PAIRS, styles):
                _twin_curves(ax, metrics, left, right, (CURVES[left], CURVES[right]), colours, title)
            lrs = [m["lr"] for m in metrics]
            if min(lrs) > 0 and max(lrs) / min(lrs) > 3:  # step decays read best on a log scale
                log_axis(axes[1], lrs)
        else:
            note(axes[0], "no finished epoch yet")
            note(axes[1], "no finished epoch yet")
        fewshot = (results or {}).get("fewshot")
        if fewshot:
            _draw_fewshot(axes[2], fewshot)
        else:
            note(axes[2], f"no few-shot results yet ({why_not or 'none in results.json'})")
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{run_dir} holds a metrics or results record this version cannot read "
                        f"({one_line(exc, 80)}); check metrics.jsonl and results.json") from None
    epochs = f"{metrics[-1]['epoch']}/{config.get('epochs', '?')} epochs" if metrics else "no epoch yet"
    fig.suptitle(f"training {run_dir.name}: {config.get('dataset', '?')}, {config.get('layers', '?')} cells, "
                 f"C={config.get('init_channels', '?')}, seed {config.get('seed', '?')}, {epochs}")
    return save_png(fig, run_dir / TRAINING_PNG)


# The training's picture, drawn where a folder holds a training's metrics (`search_lib.core.figures.Reports`).
REPORTS: Reports = {METRICS_FILE: ("a training", draw_training)}
