"""Optional TensorBoard logging of a training (``--tensorboard``): the per-epoch scalars and the final few-shot
means in ``<run_dir>/tensorboard/`` (or ``--tensorboard_dir``), beside metrics.jsonl and results.json (which stay
the record of the run).

torch.utils.tensorboard needs the separate ``tensorboard`` package. `require_tensorboard` turns its absence
into a one-line UsageError; the configs call it when they are validated, before a run writes anything.
"""

from __future__ import annotations

from pathlib import Path

from eval_lib.train.metrics import EPOCH_CURVES
from search_lib.core.errors import UsageError

TENSORBOARD_DIR = "tensorboard"
MISSING = "--tensorboard needs the tensorboard package: pip install tensorboard"


def require_tensorboard():
    """torch's SummaryWriter class; UsageError when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard raises it when the tensorboard package is missing
        raise UsageError(MISSING) from None
    return SummaryWriter


class TrainingBoard:
    """A training's scalars to TensorBoard when ``enabled``; otherwise every method does nothing, so the
    training calls them unconditionally (one line per hook).

    The event file is created on the first write: a run found already finished, or one that stops before
    its next epoch, leaves no empty file behind.
    """

    def __init__(self, run_dir: str | Path, enabled: bool, log_dir: str | Path | None = None):
        self.log_dir = Path(log_dir) if log_dir else Path(run_dir) / TENSORBOARD_DIR
        self._writer_class = require_tensorboard() if enabled else None
        self._writer = None

    def _add(self, tag: str, value: float, step: int) -> None:
        if self._writer is None:
            self._writer = self._writer_class(log_dir=str(self.log_dir))
        self._writer.add_scalar(tag, float(value), int(step))

    def epoch(self, record: dict) -> None:
        """One metrics.jsonl record at step = its epoch, so a resumed run continues the same curves."""
        if self._writer_class is None:
            return
        for key in EPOCH_CURVES:
            if record.get(key) is not None:
                self._add(f"train/{key}", record[key], record["epoch"])
        self._writer.flush()  # like metrics.jsonl: a run killed later keeps the epochs it finished

    def fewshot(self, fewshot: dict, step: int) -> None:
        """The few-shot means of results.json: ``fewshot/<split>/<shots>-shot`` at the last epoch."""
        if self._writer_class is None:
            return
        for split, per_shots in fewshot.items():
            for shots, result in per_shots.items():
                self._add(f"fewshot/{split}/{shots}-shot", result["mean"], step)
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TrainingBoard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
