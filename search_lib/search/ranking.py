"""The numbers of a pruning round (docs/method.md §4): the per-repeat seeds, the rounding of the scores,
the dense ranks and log ranks, and the architecture parameters of a set of alive ops."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import scipy.stats
import torch

from search_lib.models.genotypes import PRUNED_ALPHA


def repeat_seed(base_seed: int, round_idx: int, rep: int) -> int:
    """The seed of one repeat of one round (initialisation and batch), derived, never stateful."""
    return int(np.random.SeedSequence([base_seed, round_idx, rep]).generate_state(1)[0])


def round_sig(x: float, digits: int) -> float:
    """Round to `digits` significant digits."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def dense_rank(values: Iterable[float], descending: bool = False) -> list[int]:
    """Ranks from 0 with ties sharing a rank and no gaps (the original's ranking)."""
    arr = np.asarray(list(values), dtype=np.float64)
    if descending:
        arr = -arr
    return [int(r) - 1 for r in scipy.stats.rankdata(arr, method="dense")]


def log_ranks(values: Iterable[float]) -> np.ndarray:
    """AZ-NAS's log ranks of m values, larger better: log(rank / m), rank the average rank (1 the smallest, m
    the largest), so the best value gives 0 and a low rank costs more than a high one gains. Summed over
    several signals this is their log-rank combination (the search's ``--combine log_rank``, the study's
    ``log_rank`` row)."""
    arr = np.asarray(list(values), dtype=np.float64)
    return np.log(scipy.stats.rankdata(arr) / len(arr))


def alphas_from_alive(alive: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """alive: bool (2, edges, ops) -> architecture parameters (0 alive, PRUNED_ALPHA pruned)."""
    a = torch.where(torch.as_tensor(alive), 0.0, PRUNED_ALPHA).to(torch.float32)
    return a[0].clone(), a[1].clone()
