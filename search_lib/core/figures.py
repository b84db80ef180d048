"""The figure helpers every run picture shares (search.png, training.png, study.png), and the drawing of run
folders: the end-of-run hook (`draw_quietly`) and the command line that redraws pictures (`main`, given the
pictures each kind of record calls for).

matplotlib is imported only when drawing, so the search and the training pay nothing for importing this
module, and only `Figure` objects are used: no pyplot state and no backend switch that would change a
caller's own matplotlib set-up (a notebook). Figure.savefig renders PNG with Agg whatever the backend.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from search_lib.core.command_line import make_parser, run_cli
from search_lib.core.errors import DataError, RunFailure, UsageError, one_line
from search_lib.core.utils import atomic_write_bytes, read_jsonl

DPI = 100
REDRAW = "python -m eval_lib.report"  # the command that redraws any run folder's pictures


# ---- reading ----------------------------------------------------------------------------------------------

def read_records(path: Path) -> list[dict]:
    try:
        records = read_jsonl(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"cannot read {path} ({one_line(exc, 120)}); check the file or re-run the run") from None
    if not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path} holds a line that is not a JSON object; check the file or re-run the run")
    return records


def optional_json(path: Path) -> tuple[dict | None, str]:
    """(content, "") or (None, why): a picture of a partial run is still worth drawing, so a missing or
    unreadable optional file only removes the panel it feeds."""
    if not path.exists():
        return None, f"no {path.name}"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"{path.name} unreadable: {one_line(exc, 80)}"
    return (data, "") if isinstance(data, dict) else (None, f"{path.name} is not a JSON object")


# ---- figures ----------------------------------------------------------------------------------------------

def figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RunFailure("drawing run pictures needs matplotlib: pip install matplotlib") from None
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_png(fig, path: Path) -> Path:
    """Render to memory first, so that a reader never sees a half-written PNG (atomic replace)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def log_axis(ax, values) -> None:
    """A log y axis labelled 5, 6, 0.02 rather than 5x10^0, 2x10^-2; within a factor 4 the minor ticks get labels
    too, else a narrow range (κ often moves by a few percent) would show one label or none."""
    from matplotlib.ticker import FuncFormatter, NullFormatter
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    positive = [v for v in values if v > 0]
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if max(positive) / min(positive) < 4 else NullFormatter())


def note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey", wrap=True)
    ax.axis("off")


# ---- folders, the hooks and the command line --------------------------------------------------------------

def run_folder(run_dir: str | Path) -> Path:
    path = Path(run_dir)
    if not path.is_dir():
        raise UsageError(f"run folder {path} does not exist; give the --save_dir of a search or a training")
    return path


# The pictures a folder may call for: the record it holds -> (the kind of run, its drawing function).
Reports = dict[str, tuple[str, Callable[[Path], Path]]]


def report_kinds(run_dir: str | Path, reports: Reports) -> list[Callable[[Path], Path]]:
    """The drawing functions of ``reports`` that apply to a folder; UsageError when none does."""
    path = run_folder(run_dir)
    kinds = [draw for name, (_, draw) in reports.items() if (path / name).exists()]
    if not kinds:
        held = " nor ".join(f"{name} ({kind})" for name, (kind, _) in reports.items())
        runs = " or ".join(kind for kind, _ in reports.values())
        raise UsageError(f"{path} holds {'neither ' if len(reports) > 1 else 'no '}{held}; give the --save_dir of "
                         f"{runs} that has finished at least one round or epoch")
    return kinds


def draw_report(run_dir: str | Path, reports: Reports) -> list[Path]:
    """Draw every picture of ``reports`` that applies to a run folder; their paths."""
    return [draw(Path(run_dir)) for draw in report_kinds(run_dir, reports)]


def draw_quietly(draw: Callable[[Path], Path], run_dir: str | Path, logger: logging.Logger,
                 redraw: str = REDRAW) -> Path | None:
    """The end-of-run hook: draw, and on any failure log one warning line instead of failing a run whose
    results are already written (the picture can be redrawn from them)."""
    try:
        path = draw(Path(run_dir))
    except Exception as exc:  # noqa: BLE001 - deliberately broad: the run's results matter, the picture does not
        logger.warning("could not draw the picture of %s (%s); redraw with: %s %s",
                       run_dir, one_line(exc, 200), redraw, run_dir)
        return None
    logger.info("picture: %s", path)
    return path


def build_parser(prog: str = REDRAW, what: str = "the pictures of run folders"):
    p = make_parser(prog, f"Draw {what} (finished or not).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="the --save_dir of a run")
    return p


def main(argv: Sequence[str] | None, reports: Reports, parser: Callable[[], object] = build_parser) -> int:
    """Draw the pictures ``reports`` calls for into each folder of the command line (every folder is checked
    before any is drawn)."""
    def body() -> int:
        args = parser().parse_args(argv)
        jobs = [(Path(d), report_kinds(d, reports)) for d in args.run_dirs]  # every folder checked before drawing
        for run_dir, kinds in jobs:
            for draw in kinds:
                print(draw(run_dir))
        return 0

    return run_cli(body)
