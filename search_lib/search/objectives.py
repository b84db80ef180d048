"""The search's objectives (docs/method.md §4b): which training-free signals rank the candidates, each one's
direction, a candidate's change of a signal, and the two ways of combining several signals.

Objectives: ``kappa`` (the condition number of the kernel ``--ntk_type`` selects: smaller is better),
``regions`` (the linear-region count: larger is better) and the ten zero-cost proxies of
`search_lib.search.zero_cost` (each larger is better, as its paper reads it). κ and regions are measured by
`search_lib.search.scoring.CandidateScorer`'s kernel and region networks, a proxy by its function on the
supernet with the candidate masked (`CandidateScorer.proxy`).

A candidate's change of a signal v is d = (v_full − v_without) / |v_full|, the relative loss when the
candidate is removed (for κ the gain in trainability when it is positive), so its *importance* is d for a
signal where larger is better and −d where smaller is better. Per objective the candidates are ranked by
importance, 0 the least important; ``--combine rank`` sums the dense ranks (the paper's rule) and
``--combine log_rank`` sums log(rank / m) of the average ranks (AZ-NAS's rule, `ranking.log_ranks`). The
candidate with the lowest combined score is pruned: its removal hurts the objectives least.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import numpy as np

from search_lib.core.errors import UsageError
from search_lib.search.ranking import dense_rank, log_ranks
from search_lib.search.zero_cost import LARGER, SMALLER, ZERO_COST_DIRECTIONS

# name -> direction, in the order every per-objective sum runs (so the order of --objective never matters)
OBJECTIVES: dict[str, int] = {"kappa": SMALLER, "regions": LARGER, **ZERO_COST_DIRECTIONS}
KERNEL_OBJECTIVES = ("kappa", "regions")  # measured by the kernel and region networks, recorded as before
DEFAULT_OBJECTIVE = "kappa,regions"  # the paper's rule
COMBINE_RULES = ("rank", "log_rank")
LOG_RANK_KEY = "log_rank_sum"  # a candidate's combined score with --combine log_rank (history.jsonl)
# The change recorded for a candidate whose signal is not finite (e.g. NASWOT of a singular kernel, jacob_cov of a
# constant Jacobian): the worst there is, so the candidate counts as the most important one (it is kept).
WORST_CHANGE = 1e9


def parse_objectives(text: str, flag: str = "--objective", sep: str = ",") -> tuple[str, ...]:
    """``--objective``'s comma list as objective names in `OBJECTIVES`' order; a UsageError names an unknown,
    repeated or missing one and lists the valid names. ``flag`` and ``sep`` serve another flag's spelling of the
    same list (the proxy study's ``--search_objectives`` joins the objectives of one search with ``+``)."""
    names = [n.strip() for n in text.split(sep)]
    if not text.strip() or any(not n for n in names):
        kind = "comma" if sep == "," else repr(sep)
        raise UsageError(f"{flag} {text!r} names no objective (or an empty one); give a {kind} list of: "
                         f"{', '.join(OBJECTIVES)}")
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise UsageError(f"{flag}: unknown objective {unknown[0]!r}; valid: {', '.join(OBJECTIVES)}")
    if len(set(names)) != len(names):
        raise UsageError(f"{flag} {text!r} names an objective twice; name each once")
    return tuple(n for n in OBJECTIVES if n in names)


def direction_word(name: str) -> str:
    return "larger is better" if OBJECTIVES[name] == LARGER else "smaller is better"


def relative_change(full: float, without: float, precision: int, direction: int) -> float:
    """d = (full − without) / |full| rounded to ``precision`` decimals: 0 when ``full`` is 0 or not finite (no
    information); `WORST_CHANGE` in the harmful direction when ``without`` is not finite."""
    if not math.isfinite(full) or full == 0:
        return 0.0
    if not math.isfinite(without):
        return WORST_CHANGE * direction
    return round((full - without) / abs(full), precision)


def importance_ranks(changes: list[float], direction: int) -> list[int]:
    """Dense ranks of the candidates' importance (0 the least important) from their mean changes ``d``."""
    return dense_rank(changes, descending=direction == SMALLER)


def log_rank_sum(changes: dict[str, list[float]]) -> list[float]:
    """AZ-NAS's combination of the objectives' importance (``changes``: name -> mean change per candidate):
    Σ log(rank / m), summed in `OBJECTIVES`' order; the lowest is the least important candidate."""
    total = None
    for name in OBJECTIVES:
        if name in changes:
            part = log_ranks(np.asarray(changes[name], dtype=np.float64) * OBJECTIVES[name])
            total = part if total is None else total + part
    return [float(v) for v in total]


def prune_key(combine: str) -> str:
    """The key of a candidate's record that orders the pruning: the lowest goes first."""
    return LOG_RANK_KEY if combine == "log_rank" else "rank_sum"


def finite_or_none(value: float) -> float | None:
    """A proxy's value as history.jsonl holds it: null when not finite (JSON has no NaN or infinity)."""
    return float(value) if math.isfinite(value) else None


class ObjectiveClock:
    """``with clock(name):`` adds the seconds of the block to ``totals[name]`` when ``name`` is a key of it (the
    objectives of the search: κ and regions are measured together, only those asked for are timed)."""

    def __init__(self, totals: dict):
        self.totals = totals

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if name in self.totals:
                self.totals[name] += time.perf_counter() - t0
