"""The training's per-epoch record, ``metrics.jsonl``: its one owner.

One JSON line per finished epoch: ``epoch`` (1-based), ``loss`` and ``acc`` (%, over the epoch's batches),
``lr`` and ``drop_path_prob`` (the values the epoch trained with) and ``time`` (seconds). The training
writes it (`epoch_record`, `append_epoch`, `truncate_metrics` on resume), the checkpoint keeps the last
record, and `eval_lib.train.training_plot` (`read_metrics`, `CURVES`) and `eval_lib.train.tensorboard_log`
(`EPOCH_CURVES`) draw the curves listed here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from search_lib.core.errors import one_line
from search_lib.core.figures import read_records
from search_lib.core.utils import append_jsonl, atomic_write_text

METRICS_FILE = "metrics.jsonl"
# The per-epoch curves with their labels, in the pairs the picture draws on twin axes (their scales differ).
CURVES = {"loss": "training loss", "acc": "training accuracy (%)", "lr": "learning rate",
          "drop_path_prob": "drop-path probability"}
CURVE_PAIRS = (("loss", "acc"), ("lr", "drop_path_prob"))
EPOCH_CURVES = tuple(CURVES)  # TensorBoard's scalars

logger = logging.getLogger("metantknas")


def epoch_record(epoch: int, loss: float, acc: float, lr: float, drop_path_prob: float, time: float) -> dict:
    """The record of finished epoch ``epoch`` (1-based)."""
    return {"epoch": epoch, "loss": loss, "acc": acc, "lr": lr, "drop_path_prob": drop_path_prob, "time": time}


def append_epoch(run_dir: str | Path, record: dict) -> None:
    append_jsonl(Path(run_dir) / METRICS_FILE, record)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a training folder's metrics.jsonl (DataError on an unreadable file)."""
    return read_records(Path(run_dir) / METRICS_FILE)


def _parse(lines: list[str], path: Path) -> list[dict]:
    """The epoch records of ``lines``; unreadable lines dropped (a warning unless it is the last, torn by a kill)."""
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            record = None
            if i < len(lines) - 1:
                logger.warning("metrics %s: line %d is unreadable; dropped", path, i + 1)
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


def truncate_metrics(run_dir: str | Path, epochs_done: int, last: dict | None = None) -> None:
    """Make metrics.jsonl hold exactly the epochs of the resumed checkpoint.

    Records of later epochs (they will be redone) and a line torn by a kill are dropped; the record of the
    checkpoint's own epoch is restored from the checkpoint when the run was killed between writing the
    checkpoint and appending its line. Unreadable lines are dropped with a warning, never a traceback.
    """
    path = Path(run_dir) / METRICS_FILE
    original, records = None, []
    if path.exists():
        try:
            original = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning("metrics %s are unreadable (%s); rewriting them", path, one_line(exc, 100))
        records = _parse((original or "").splitlines(), path)
    kept = [r for r in records if r["epoch"] <= epochs_done]
    if last and last.get("epoch") == epochs_done > 0 and all(r["epoch"] != epochs_done for r in kept):
        kept.append(dict(last))
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
    if (original != text) if path.exists() else bool(text):
        atomic_write_text(path, text)
