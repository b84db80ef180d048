"""Comparing two search histories (history.jsonl without `measured`): exactly, or with κ's last digits free;
and two trainings' numbers (`training_numbers`).

On some CPUs (measured on an AVX-512 AMD EPYC) the number of architectures in a kernel pass and the thread count
choose the kernels' summation order, which moves κ by about 1e-5 relative (float32 gradients, a condition number
that amplifies them); ranks and genotypes did not move in any case measured. Where a test compares runs that differ
in pass size or thread count (an out-of-memory split, a resume at another pass size, a fixture recorded on another
machine), it compares floats to a relative tolerance and everything else exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from search_lib.search.pruning import MEASURED_KEY

KAPPA_DIGITS = 1e-4  # relative: 10x the largest move measured (4.6e-5)


def _records(source) -> list[dict]:
    text = Path(source).read_text() if isinstance(source, Path) else str(source)
    return [{k: v for k, v in json.loads(line).items() if k != MEASURED_KEY} for line in text.splitlines() if line]


def _differences(a, b, where: str, rel: float) -> list[str]:
    if isinstance(a, float) and isinstance(b, float):
        same = math.isclose(a, b, rel_tol=rel) or (math.isnan(a) and math.isnan(b))
        return [] if same else [f"{where}: {a!r} != {b!r}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}.{k}", rel)]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]", rel)]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def assert_same_scores(a, b, rel: float = KAPPA_DIGITS) -> None:
    """Two histories (a Path to a history.jsonl, or its text) agree: every non-float exactly (ranks, pruned ops,
    regions, the rounded Δ's), every float to ``rel``."""
    diffs = _differences(_records(a), _records(b), "history", rel)
    assert not diffs, f"{len(diffs)} differences, first: " + "; ".join(diffs[:3])


def training_numbers(run: Path) -> tuple[list[dict], dict]:
    """A training run's numbers, to compare exactly: metrics.jsonl without its timings, and results.json's
    few-shot accuracies."""
    metrics = [{k: v for k, v in json.loads(line).items() if k != "time"}
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    return metrics, json.loads((run / "results.json").read_text())["fewshot"]
