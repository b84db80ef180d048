"""The picture of a search folder, ``search.png`` (`draw_search`), written next to its JSON files: (a) κ and the
linear-region count of the whole supernet per round; (b) per op-pruning round, a heatmap of every candidate's rank
sum on every edge, pruned ones crossed; (c) the two final cells as graphs.

A search draws its picture when it finishes (`search_lib.core.figures.draw_quietly`: a picture that cannot be
drawn is a logged warning, never a failed run); ``python -m eval_lib.report RUN_DIR ...`` (re)draws search and
training folders alike, finished or not. The figure helpers are `search_lib.core.figures`'.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from search_lib.core.errors import DataError, GenotypeError, UsageError, one_line
from search_lib.core.figures import Reports, figure, log_axis, note, optional_json, read_records, run_folder, save_png
from search_lib.models.genotypes import GenotypeRecord
from search_lib.models.ops import space_ops

SEARCH_PNG = "search.png"
HISTORY = "history.jsonl"
HEATMAP_COLUMNS = 4  # op rounds per row of panel (b); the paper's searches have 6
STEP = 2.4  # horizontal distance between the states of a drawn cell (room for the op names)


def _mean(values) -> float:
    """Mean over the repeats, ignoring missing values (κ is None with --only_lrs); NaN when none is left."""
    finite = [float(v) for v in values or [] if v is not None and math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else math.nan


# ---- search -----------------------------------------------------------------------------------------------

def _op_order(history: list[dict], space: str | None) -> tuple[list[str], list[str]]:
    """Rows ("cell edge", in order of first appearance) and columns (the space's op order, when known)."""
    rows, seen = {}, {}
    for record in history:
        for c in record["candidates"]:
            if c.get("op") is not None:
                rows.setdefault(f"{c['cell']} {c['edge']}", None)
                seen.setdefault(c["op"], None)
    try:
        order = list(space_ops(space)) if space else []
    except UsageError:  # a space this version does not know: keep the order of appearance
        order = []
    return list(rows), [o for o in order if o in seen] + [o for o in seen if o not in order]


def _rank_grid(record: dict, rows: list[str], ops: list[str]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Rank sums of one op round as rows x ops (NaN: op already gone) and the (row, op) cells pruned."""
    grid = np.full((len(rows), len(ops)), np.nan)
    row_of, col_of = {r: i for i, r in enumerate(rows)}, {o: j for j, o in enumerate(ops)}
    pruned = []
    for c in record["candidates"]:
        i, j = row_of[f"{c['cell']} {c['edge']}"], col_of[c["op"]]
        grid[i, j] = float(c["rank_sum"])
        if c.get("pruned"):
            pruned.append((i, j))
    return grid, pruned


def _draw_scores(ax, history: list[dict]) -> None:
    """Panel (a): the whole supernet's κ (log scale) and region count at the start of each round."""
    if not history:
        note(ax, "no finished round yet")
        return
    rounds = [int(r["round"]) for r in history]
    kappa = [_mean(r.get("kappa_full")) for r in history]
    regions = [_mean(r.get("regions_full")) for r in history]
    for r, record in zip(rounds, history):  # the edge rounds work on whole edges, not ops: shade them
        if record.get("phase") == "edges":
            ax.axvspan(r - 0.5, r + 0.5, color="grey", alpha=0.15, lw=0)
    if any(k > 0 for k in kappa):
        ax.plot(rounds, kappa, "o-", color="tab:blue", label="κ (mean over repeats)")
        log_axis(ax, kappa)
    else:
        ax.text(0.5, 0.9, "κ not computed (--only_lrs)", ha="center", transform=ax.transAxes, color="grey")
    ax.set_ylabel("κ of the full network", color="tab:blue")
    twin = ax.twinx()
    twin.plot(rounds, regions, "s--", color="tab:orange", label="linear regions (mean over repeats)")
    twin.set_ylabel("linear regions", color="tab:orange")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2,
              frameon=False)  # below the axes: inside, it would hide points of one of the two curves
    ax.set_xticks(rounds)
    ax.set_xlabel("round (shaded: edge rounds)")
    ax.set_title("(a) full network per round")


def _draw_heatmap(fig, ax, record: dict, rows: list[str], ops: list[str], labels: bool) -> None:
    """One panel of (b): colour = rank sum (the lowest are pruned), x = pruned, blank = op already gone."""
    grid, pruned = _rank_grid(record, rows, ops)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    if pruned:
        ax.scatter([j for _, j in pruned], [i for i, _ in pruned], marker="x", color="red", s=30, lw=1.5)
    ax.set_xticks(range(len(ops)), ops, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows if labels else [], fontsize=7)
    ax.set_title(f"(b) round {record['round']}: {len(record['candidates'])} ops, {len(pruned)} pruned",
                 fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8, pad=0.01).set_label("rank sum (lowest pruned)", fontsize=7)


def _draw_cell(ax, nodes, concat, title: str, colours: dict) -> None:
    """Panel (c): one cell as a graph; arrow k of a node bends one way, the other arrow the other way, and
    its op name sits on the curve's midpoint (for arc3 with bend f: the chord's midpoint + f/2 * (dy, -dx))."""
    # inputs on the left, intermediate nodes in a zig-zag (arrows between them do not overlap), output right
    pos = {0: (0.0, 1.2), 1: (0.0, -1.2), "out": (STEP * (len(nodes) + 1), 0.0)}
    pos.update({i + 2: (STEP * (i + 1), 0.7 if i % 2 == 0 else -0.7) for i in range(len(nodes))})
    names = {0: "$c_{k-2}$", 1: "$c_{k-1}$", "out": "output", **{i + 2: str(i) for i in range(len(nodes))}}
    for i, node in enumerate(nodes):
        for k, (op, src) in enumerate(node):
            (x0, y0), (x1, y1) = pos[src], pos[i + 2]
            bend = 0.18 if k == 0 else -0.18
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(
                arrowstyle="-|>", color=colours[op], lw=1.5, shrinkA=14, shrinkB=14,
                connectionstyle=f"arc3,rad={bend}"))
            mx, my = (x0 + x1) / 2 + bend / 2 * (y1 - y0), (y0 + y1) / 2 - bend / 2 * (x1 - x0)
            ax.text(mx, my, op, fontsize=7, ha="center", va="center", color=colours[op],
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))
    for state in concat:  # the cell's output concatenates these states
        ax.annotate("", xy=pos["out"], xytext=pos[state], arrowprops=dict(
            arrowstyle="-|>", color="grey", lw=1, ls="--", shrinkA=14, shrinkB=18))
    for key, (x, y) in pos.items():
        ax.text(x, y, names[key], ha="center", va="center", fontsize=9, zorder=3,
                bbox=dict(boxstyle="round,pad=0.35", fc="lightblue" if key in (0, 1) else
                          "khaki" if key == "out" else "white", ec="black"))
    ax.set_xlim(-0.7, STEP * (len(nodes) + 1) + 0.9)
    ax.set_ylim(-1.6, 1.6)
    ax.set_aspect("equal", adjustable="box")  # arc3 bends in screen space: keep data and screen alike
    ax.axis("off")
    ax.set_title(title)


def draw_search(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/search.png`` from a search folder, finished or partial (no genotype.json: no cells)."""
    run_dir = run_folder(run_dir)
    history = read_records(run_dir / HISTORY)
    config = optional_json(run_dir / "config.json")[0] or {}
    genotype, why_not = None, "no genotype.json (search not finished)"
    if (run_dir / "genotype.json").exists():
        try:
            genotype = GenotypeRecord.from_json((run_dir / "genotype.json").read_text()).genotype
        except (OSError, UnicodeDecodeError, GenotypeError) as exc:
            why_not = f"genotype.json unreadable: {one_line(exc, 80)}"
    try:
        fig = _search_figure(history, config, genotype)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{run_dir / HISTORY} has a record this version cannot read ({one_line(exc, 80)}); "
                        f"check the file or re-run the search") from None
    method = config.get("ntk_type", "?")
    method += f" ({config.get('algorithm')})" if method == "MetaNTK_anl" else ""
    title = (f"search {run_dir.name}: {method} on {config.get('dataset', '?')}, seed {config.get('rand_seed', '?')}, "
             f"{len(history)} rounds")
    fig.suptitle(title if genotype is not None else f"{title}; cells not drawn: {why_not}")
    return save_png(fig, run_dir / SEARCH_PNG)


def _search_figure(history: list[dict], config: dict, genotype):
    """Panels (a) and (c) side by side on top, the heatmaps of (b) in a grid below."""
    op_rounds = [r for r in history if r.get("phase") == "ops"]
    rows, ops = _op_order(op_rounds, config.get("search_space_name"))
    columns = min(len(op_rounds), HEATMAP_COLUMNS) or 1
    grid_rows = math.ceil(len(op_rounds) / columns)
    heat_height, top_height = 0.2 * len(rows) + 1.8, 6.0
    fig = figure(max(15.0, 4.2 * columns), top_height + grid_rows * heat_height)
    top, bottom = (fig.subfigures(2, 1, height_ratios=[top_height, grid_rows * heat_height]) if grid_rows
                   else (fig, None))
    if genotype is not None:  # the cells need width more than height: stacked, right of (a)
        axes = top.subplot_mosaic([["a", "normal"], ["a", "reduce"]], width_ratios=[1, 1.6])
        ax_scores, ax_normal, ax_reduce = axes["a"], axes["normal"], axes["reduce"]
        used = sorted({op for cell in (genotype.normal, genotype.reduce) for node in cell for op, _ in node})
        colours = {op: f"C{i % 10}" for i, op in enumerate(used)}  # one colour per op, alike in both cells
        _draw_cell(ax_normal, genotype.normal, genotype.normal_concat, "(c) normal cell", colours)
        _draw_cell(ax_reduce, genotype.reduce, genotype.reduce_concat, "(c) reduction cell", colours)
    else:
        ax_scores = top.subplots(1, 1)
    _draw_scores(ax_scores, history)
    if bottom is not None:
        for k, ax in enumerate(bottom.subplots(grid_rows, columns, squeeze=False).ravel()):
            if k < len(op_rounds):
                _draw_heatmap(bottom, ax, op_rounds[k], rows, ops, labels=k % columns == 0)
            else:
                ax.axis("off")
    return fig


# The search's picture, drawn where a folder holds a search's history (`search_lib.core.figures.Reports`).
REPORTS: Reports = {HISTORY: ("a search", draw_search)}
