"""The registry of the ten zero-cost proxies of the literature (docs/method.md §9, §4b), each with its direction.

The proxies are computed by `search_lib.search.zc_gradients` and `search_lib.search.zc_activations`; this
module hands each one its own deep copy of the network and the caller's random state back afterwards, so a
proxy never changes the network it scores nor the numbers drawn after it. Two users: the proxy study
(`eval_lib.study.proxies`) scores whole networks at initialisation; the search (`search_lib.search.objectives`)
scores the supernet with one candidate operation masked.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from search_lib.core.utils import rng_state, set_rng_state
from search_lib.search import zc_activations, zc_gradients

LARGER, SMALLER = 1, -1  # a signal's direction: larger is better (+1) or smaller is better (-1)


@contextmanager
def preserved_random_state(device: torch.device | None = None):
    """Leaves the global random state of torch (the CPU's and ``device``'s generators), numpy and `random` as
    it was."""
    state = rng_state(device)
    try:
        yield
    finally:
        set_rng_state(state, device)


def isolated(fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], float]):
    """``fn`` on its own deep copy of the network, with gradients enabled and the global random state
    preserved: the network's weights, buffers, gradients, hooks and mode and the caller's random numbers
    stay as they were, whatever order the proxies run in."""

    @functools.wraps(fn)
    def proxy(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        with preserved_random_state(inputs.device), torch.enable_grad():
            return float(fn(copy.deepcopy(net), inputs.detach(), targets.detach()))

    return proxy


# name -> f(net, inputs, targets) -> float (docs/method.md §9 gives each one's formula and source)
ZERO_COST_PROXIES: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], float]] = {
    name: isolated(fn) for name, fn in (
        ("grad_norm", zc_gradients.grad_norm), ("snip", zc_gradients.snip), ("grasp", zc_gradients.grasp),
        ("fisher", zc_gradients.fisher), ("jacob_cov", zc_gradients.jacob_cov), ("synflow", zc_gradients.synflow),
        ("naswot", zc_activations.naswot), ("zico", zc_gradients.zico), ("swap", zc_activations.swap),
        ("meco", zc_activations.meco))}

# How each proxy's paper (and the proxy study) reads it: every one of the ten ranks networks with larger values
# better (jacob_cov and grasp included, in the signs `zc_gradients` gives them).
ZERO_COST_DIRECTIONS: dict[str, int] = dict.fromkeys(ZERO_COST_PROXIES, LARGER)
