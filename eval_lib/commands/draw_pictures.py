"""The command line that (re)draws the pictures of run folders, finished or not: ``python -m eval_lib.report
RUN_DIR ...`` draws search.png into a search folder, training.png into a training folder, and both into a folder
holding both records."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from eval_lib.train.training_plot import REPORTS as TRAINING
from search_lib.core import figures
from search_lib.search.search_plot import REPORTS as SEARCH

REPORTS: figures.Reports = {**SEARCH, **TRAINING}


def draw_report(run_dir: str | Path) -> list[Path]:
    """Draw every picture that applies to a run folder (search.png and/or training.png); their paths."""
    return figures.draw_report(run_dir, REPORTS)


def build_parser():
    return figures.build_parser(figures.REDRAW, "search.png / training.png into run folders of searches and trainings")


def main(argv: Sequence[str] | None = None) -> int:
    return figures.main(argv, REPORTS, build_parser)


if __name__ == "__main__":
    sys.exit(main())
