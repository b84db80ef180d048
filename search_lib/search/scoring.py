"""Scoring architectures of the supernet: κ of the NTK / MetaNTK and the linear-region count (docs/method.md §4).

`CandidateScorer` holds the kernel network (Opacus per-sample gradients) and the thin linear-region network
of a search and scores alive-op masks for one repeat at a time (one initialisation, one batch). Two paths
give the same scores: one architecture per pass (`kappa`, `regions`: the obviously correct reference) and
several per pass (`kappas_many`, `regions_many`: the batch repeated once per architecture,
each copy with its own op weights). Scoring is a pure function of (alphas, repeat seed, batch).

How many architectures a pass takes is measured, not estimated (`search_lib.core.pass_sizing.PassSizer`): the
first passes probe with one and two, their peak memory gives the cost of one more, and each later pass
takes the most that fit the memory budget (``--memory_budget``); an out-of-memory error (any of its faces,
`search_lib.core.pass_sizing.OUT_OF_MEMORY`) halves the pass and retries it. A search keeps what its passes
learned in its folder (`search_lib.core.pass_sizing.PassRecord`), also the size of a pass the process died in.
With --tune_threads each CPU pass runs through a `search_lib.core.threads.ThreadTuner`, which drops threads when
the run shares its cores with other busy processes. Neither changes a rank in the cases measured, but on some CPUs
(AVX-512) both move κ's last digits (relative 1e-5): how many architectures share a pass and how many threads
run it choose the kernels' summation order. While the budget leaves room, passes grow the same way in every run
(1, 2, 8, 32, ...); a budget that binds sizes them from measured peaks.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from search_lib.core import turns
from search_lib.core.errors import RunFailure, one_line
from search_lib.core.memory import MemoryMeter, format_size, resolve_budget
from search_lib.core.pass_sizing import PassRecord, PassSizer, is_out_of_memory
from search_lib.core.threads import ThreadTuner, threads_fixed
from search_lib.data import SplitData, build_transform, sample_batch, sample_meta_batch
from search_lib.models.supernet import Supernet, init_weights, replace_norm
from search_lib.search.kernels import (
    KAPPA_SENTINEL,
    MetaNTKModel,
    analytical_metantk,
    condition_number,
    full_float32,
    gram_blocks,
    gram_by_group,
    kernel_parameters,
    metantk_kernel_groups,
    per_sample_gradients,
    seeded_linear,
)
from search_lib.search.linear_regions import LinearRegionScorer, sample_crops
from search_lib.search.ranking import alphas_from_alive
from search_lib.search.search_config import SearchConfig
from search_lib.search.zero_cost import ZERO_COST_PROXIES

log = logging.getLogger("metantknas.search")

# Above this per architecture a CPU pass is compute-bound (C=16, 32x32: 2 per pass took 1.14x one at a time);
# below it (the demo's C=4) Python and hook overhead dominate and passes of many are 5-6x faster.
CPU_BATCHING_LIMIT = 64 << 20
MAX_PER_PASS = 64  # architectures per pass at most (beyond this the per-pass overhead is already amortised)
# Linear regions of this many architectures per pass of the thin network, whatever the kernel's pass holds: its
# activations are tiny, so one architecture per pass is all overhead (C=16 on 2 CPU cores: 196 ms per
# architecture alone, 88 ms at 8, 84 ms at 16, 85 ms at 32).
REGIONS_PER_PASS = 16


class CandidateScorer:
    """Holds the kernel and linear-region networks; scores alphas for one repeat at a time.

    ``budget``: bytes the process may peak at (``--memory_budget``; None: from the config, its default when
    auto). ``record``: where the pass size is kept between processes (the search's ``passes.json``; None: not
    kept). `close()` stops the memory sampler and restores the thread count.
    """

    def __init__(self, cfg: SearchConfig, split: SplitData, device: torch.device, num_classes: int,
                 budget: int | None = None, record: PassRecord | None = None):
        self.cfg, self.split, self.device, self.record = cfg, split, device, record
        self.budget = resolve_budget(cfg.memory_budget, device) if budget is None else int(budget)
        self.transform = cfg.input_transform()
        net = Supernet(cfg.ntk_channels, cfg.ntk_layers, num_classes, cfg.space, cfg.ntk_stemm, cfg.ntk_fsr)
        replace_norm(net, cfg.norm_type)
        self.supernet = net
        self.model = MetaNTKModel(net, net.feature_dim, cfg.n_ways) if cfg.meta else net
        self.model.to(device).train(cfg.bn_mode == "train")
        if cfg.meta:
            self.groups = metantk_kernel_groups(self.model, cfg.params_types)
        else:
            self.groups = {"theta": kernel_parameters(self.model, cfg.params_types)}
        # Linear regions: a pool of resized training images, cropped anew in every repeat.
        pool_rng = np.random.default_rng([cfg.rand_seed, 7])
        n_pool = min(len(split), 1000)
        pool_idx = np.sort(pool_rng.choice(len(split), size=n_pool, replace=False))
        regions_tf = build_transform("TENAS", train=False, dataset=cfg.data)
        self.regions_pool = torch.stack([regions_tf(split.images[i]) for i in pool_idx])
        self.regions_scorer = LinearRegionScorer(sample_crops(self.regions_pool, 1, 1, cfg.regions_crop),
                                                 cfg.space, device,
                                                 train_mode=cfg.bn_mode == "train")
        self._stack: ExitStack | None = None
        self._inputs: torch.Tensor | None = None
        self._targets: torch.Tensor | None = None
        # the zero-cost proxies' network: the kernel network's twin without Opacus's hooks (made when an objective
        # needs it; initialised like the kernel network in every repeat)
        self._proxy_net: LogitsOf | None = None
        if any(name in ZERO_COST_PROXIES for name in cfg.objectives):
            twin = Supernet(cfg.ntk_channels, cfg.ntk_layers, num_classes, cfg.space, cfg.ntk_stemm, cfg.ntk_fsr)
            replace_norm(twin, cfg.norm_type)
            self._proxy_net = LogitsOf(twin).to(device).train(cfg.bn_mode == "train")
        self.meter = MemoryMeter(device)
        self.sizer: PassSizer | None = None  # made at the first batched pass, when the networks and data are in memory
        self.passes = PassCount()
        # one tuner per kind of pass (their times per architecture differ); CPU and --tune_threads only, and not
        # when the user fixed the thread count: on some CPUs (AVX-512 ones, measured) κ's last digits depend on it
        tune = device.type == "cpu" and cfg.tune_threads and not threads_fixed(cfg.threads)
        self.tuners = {kind: ThreadTuner(enabled=tune, period=8, probe_steps=1, trust_fair=True)
                       for kind in ("kernel", "regions", "proxy")}
        self._steps_seen = {kind: 0 for kind in self.tuners}  # each tuner's steps already reported by `measured`

    def close(self) -> None:
        self.meter.close()
        for tuner in self.tuners.values():
            tuner.close()

    @contextmanager
    def _step(self, kind: str, work: int) -> Iterator[None]:
        """One pass of ``kind`` in full float32 (`full_float32`: no TF32 on a GPU, so that a GPU finds the CPU's
        scores) through its thread tuner (which only counts it when nothing is tuned). Passes of every size are
        timed, the first ones too: under load the choice must come before the large passes, and it rests on
        the share of its cores a pass got, which its size does not change (with ``trust_fair`` the times of two
        counts are compared only on a box of more than two cores). The pass holds the run's turn at the cores
        (`search_lib.core.turns`)."""
        with full_float32(), turns.step(), self.tuners[kind].step(work):
            yield

    # ---- one repeat ----
    def begin_repeat(self, seed: int) -> None:
        cfg = self.cfg
        gen = np.random.default_rng(seed)
        if cfg.meta:
            x, y = sample_meta_batch(self.split, cfg.effective_batch_size, cfg.n_ways, cfg.n_shots, cfg.n_queries,
                                     self.transform, gen)
        else:
            x, y = sample_batch(self.split, cfg.effective_batch_size, self.transform, gen)
        self._inputs = x.to(self.device)
        self._targets = y.to(self.device)  # the zero-cost proxies' labels (a meta-batch's are its tasks' ways)
        self.regions_scorer.crops = [c.to(self.device) for c in sample_crops(
            self.regions_pool, cfg.regions_batches, cfg.regions_batch_size, cfg.regions_crop, seed)]
        init_weights(self.supernet, mode=cfg.init_mode, seed=seed)
        if cfg.meta:  # a fresh head, PyTorch's default init, seeded by the repeat
            fresh = seeded_linear(self.supernet.feature_dim, cfg.n_ways, seed)
            self.model.head.load_state_dict(fresh.state_dict())
        self.regions_scorer.reinit(seed)
        if self._proxy_net is not None:
            init_weights(self._proxy_net.net, mode=cfg.init_mode, seed=seed)
        self._stack = ExitStack()
        if cfg.needs_kappa:
            self._gsm = self._stack.enter_context(per_sample_gradients(self.model, self.groups["theta"]))

    def end_repeat(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack = None

    def kappa(self, alive: np.ndarray, context: str) -> float:
        """κ of one architecture: one per-sample-gradient pass of its own (the reference path)."""
        if not self.cfg.needs_kappa:
            return float("nan")
        self.supernet.set_alphas(*alphas_from_alive(alive))
        with self._step("kernel", 1):
            grams = on_host(gram_by_group(self._gsm, self._inputs, self.groups))
        return self._kappa_of(grams["theta"], grams.get("head"), context)

    def _kappa_of(self, theta: torch.Tensor, head: torch.Tensor | None, context: str) -> float:
        """κ of the NTK Θ, or of the analytical MetaNTK built from Θ (and the head kernel for ANIL); the kernels
        are on the host (`on_host`)."""
        cfg = self.cfg
        if cfg.meta:
            per_task = cfg.n_ways
            k = theta if cfg.algorithm == "MAML" else head
            if not (torch.isfinite(theta).all() and torch.isfinite(k).all()):
                return condition_number(theta, context)  # NaN/Inf: the sentinel, logged (the solvers would fail)
            try:
                theta = analytical_metantk(theta, k, cfg.effective_batch_size, per_task * cfg.n_queries,
                                           per_task * cfg.n_shots, cfg.inner_lr_time, cfg.reg_coef)
            except RuntimeError as exc:  # torch.linalg failed to converge (a singular, ill-conditioned kernel)
                if is_out_of_memory(exc):  # cuSOLVER without memory: the pass is halved, no sentinel
                    raise
                log.warning("MetaNTK failed (%s): %s; condition number set to %g", context, one_line(exc, 100),
                            KAPPA_SENTINEL)
                return KAPPA_SENTINEL
        return condition_number(theta, context)

    def proxy(self, name: str, alive: np.ndarray) -> float:
        """Zero-cost proxy ``name`` of one architecture: its function (`ZERO_COST_PROXIES`, on a deep copy) on the
        supernet with only ``alive``'s ops run (a masked op is not computed at all), initialised with this repeat's
        seed, on this repeat's batch and its labels. One architecture per call: each proxy reduces over the
        batch, so the architectures of a pass could not share one."""
        assert self._proxy_net is not None, "the proxy network is made for the proxy objectives"
        self._proxy_net.net.set_alphas(*alphas_from_alive(alive))
        with self._step("proxy", 1):  # through its own thread tuner (--tune_threads), as the kernel passes
            return ZERO_COST_PROXIES[name](self._proxy_net, self._inputs, self._targets)

    def proxies(self, names: list[str], alive: np.ndarray, bar=None) -> dict[str, tuple[float, float]]:
        """{proxy: (value, seconds)} of one architecture in this repeat (``bar``: a progress bar to advance)."""
        out = {}
        for name in names:
            t0 = time.perf_counter()
            out[name] = (self.proxy(name, alive), time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
        return out

    def regions(self, alive: np.ndarray) -> int:
        with self._step("regions", 1):
            return self.regions_scorer.score(*alphas_from_alive(alive))

    @staticmethod
    def _stacked_alphas(alives: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        normal, reduce = (torch.stack(a) for a in zip(*(alphas_from_alive(a) for a in alives)))
        return normal, reduce

    def regions_many(self, alives: list[np.ndarray]) -> list[int]:
        """Region counts of several architectures, `REGIONS_PER_PASS` per pass of the thin network."""
        out: list[int] = []
        for start in range(0, len(alives), REGIONS_PER_PASS):
            chunk = alives[start:start + REGIONS_PER_PASS]
            with self._step("regions", len(chunk)):
                out += self.regions_scorer.score_many(*self._stacked_alphas(chunk))
        return out

    def kappas_many(self, alives: list[np.ndarray], contexts: list[str]) -> list[float]:
        """κ of several architectures from one per-sample-gradient pass over the batch repeated per architecture."""
        if not self.cfg.needs_kappa:
            return [float("nan")] * len(alives)
        normal, reduce = self._stacked_alphas(alives)
        n_arch, n = len(alives), self._inputs.shape[0]
        self.supernet.set_candidates(normal, reduce, n)
        try:
            with self._step("kernel", n_arch):
                grams = on_host(gram_blocks(self._gsm, self._inputs.repeat(n_arch, 1, 1, 1), self.groups, n_arch))
        finally:
            self.supernet.clear_candidates()
        head = grams.get("head")
        return [self._kappa_of(grams["theta"][b], None if head is None else head[b], contexts[b])
                for b in range(n_arch)]

    def candidates_per_pass(self) -> int:
        """The most architectures one kernel pass may take: ``--candidates_per_pass`` when given; 1 on the CPU
        when one architecture's per-sample gradients exceed `CPU_BATCHING_LIMIT` (a compute-bound pass, where
        batching only adds memory traffic); else `MAX_PER_PASS`. Below that the measured memory decides
        (`kappas_measured`)."""
        if self.cfg.candidates_per_pass > 0:
            return self.cfg.candidates_per_pass
        n_params = sum(p.numel() for p in self.groups["theta"]) if self.cfg.needs_kappa else 0
        per_arch = max(1, self._inputs.shape[0]) * max(n_params, 1) * 4  # one architecture's per-sample gradients
        if self.device.type == "cpu" and per_arch > CPU_BATCHING_LIMIT:
            return 1
        return MAX_PER_PASS

    def kappas_measured(self, alives: list[np.ndarray], contexts: list[str],
                        progress: Callable[[int], None] | None = None) -> list[float]:
        """κ of every architecture, in passes sized by the measured memory (see `search_lib.core.memory.PassSizer`).

        With a cap of one (`candidates_per_pass`) every architecture gets the reference path's pass of its own.
        Otherwise every pass, even one of a single architecture, is a `kappas_many` pass (the same numbers
        whatever the pass holds), its peak measured; an out-of-memory error inside a pass halves it and
        retries, down to one architecture, then stops the search with the one-line exit 4.
        """
        cap = self.candidates_per_pass()
        out: list[float] = []
        if cap == 1:
            for alive, ctx in zip(alives, contexts):
                try:
                    out += self._one_pass(lambda a=alive, c=ctx: [self.kappa(a, c)], 1)
                except _PassOutOfMemory as exc:
                    raise self._out_of_memory(str(exc)) from None
                if progress is not None:
                    progress(1)
            return out
        if self.sizer is None:
            self.sizer = PassSizer(self.budget, cap, base=self.meter.now())
            if self.record is not None:  # what earlier processes on this folder learned, or died of
                self.record.restore(self.sizer)
        while len(out) < len(alives):
            k = min(self.sizer.size(), len(alives) - len(out))
            chunk, ctx = alives[len(out):len(out) + k], contexts[len(out):len(out) + k]
            if self.record is not None:
                self.record.starting(k, self.sizer)
            try:
                kappas = self._one_pass(lambda a=chunk, c=ctx: self.kappas_many(a, c), k)
            except _PassOutOfMemory as exc:
                if k == 1:
                    raise self._out_of_memory(str(exc)) from None
                self.passes.oom_splits += 1
                log.warning("out of memory in a pass of %d architectures (%s); retrying with %d per pass",
                            k, one_line(str(exc), 80), self.sizer.failed(k))
                if self.record is not None:
                    self.record.failed(self.sizer)
                continue
            if self.record is not None:
                self.record.finished(k, self.sizer)
            out += kappas
            if progress is not None:
                progress(k)
        return out

    def _one_pass(self, run: Callable[[], list[float]], k: int) -> list[float]:
        """Run one kernel pass of ``k`` architectures, measuring its peak; an out-of-memory error becomes
        `_PassOutOfMemory` (its message) once the failed pass's memory is freed and Opacus re-attached (a pass that
        failed half-way leaves its hooks' state)."""
        failed = None
        try:
            with self.meter.window() as win:
                result = run()
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            failed = one_line(exc, 300)
        if failed is not None:
            # outside the except block: the error's traceback, which holds the failed pass's frames and tensors,
            # is gone, so their memory can be freed (inside it, emptying the cache would keep them)
            self._reattach()
            raise _PassOutOfMemory(failed)
        self.passes.record(k)
        if self.sizer is not None:
            self.sizer.record(k, win.peak, win.start)
        return result

    def _reattach(self) -> None:
        if self._stack is not None:
            self._stack.close()  # Opacus's hooks drop what they kept of the pass
        gc.collect()  # reference cycles of the failed pass (autograd graphs, hooks) before the cache is emptied
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._stack = ExitStack()
        self._gsm = self._stack.enter_context(per_sample_gradients(self.model, self.groups["theta"]))

    def _out_of_memory(self, exc: BaseException | str) -> RunFailure:
        where = "GPU" if self.device.type == "cuda" else "CPU"
        return RunFailure(f"out of memory on the {where} scoring a single architecture (budget "
                          f"{format_size(self.budget)}; {one_line(exc, 80)}); lower --batch_size or --ntk_channels, "
                          f"or free memory; re-running the same command resumes")

    def measured(self) -> dict:
        """What the kernel passes since the last call measured (then reset; history.jsonl's ``measured``): the
        largest pass, the number of passes and of out-of-memory splits, the budget, and the thread count of
        every pass, kernel and regions ({"2": passes, "1": passes})."""
        stats, self.passes = self.passes, PassCount()
        threads: dict[str, int] = {}
        for kind, tuner in self.tuners.items():
            for count, n in tuner.step_counts(self._steps_seen[kind]).items():
                threads[str(count)] = threads.get(str(count), 0) + n
            self._steps_seen[kind] = len(tuner.history)
        return {"pass_size": stats.largest, "passes": stats.passes, "oom_splits": stats.oom_splits,
                "budget_bytes": self.budget, "threads": threads}


class LogitsOf(nn.Module):
    """The supernet as the zero-cost proxies take a network: ``forward(x)`` gives its logits alone."""

    def __init__(self, net: Supernet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[1]


def on_host(grams: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The kernels of a pass on the host, in one device-to-host copy.

    What follows is small float64 linear algebra per task and candidate (``pinv``, ``matrix_exp``, ``eigvalsh``
    of 5x5 to 30x30 blocks, finiteness checks): on a GPU each would be a launch and a host synchronisation.
    The CPU's kernels are returned as they are (the same tensors: the CPU's scores do not change).
    """
    if all(g.device.type == "cpu" for g in grams.values()):
        return grams
    names = list(grams)
    flat = torch.cat([grams[k].reshape(-1) for k in names]).cpu()
    parts = flat.split([grams[k].numel() for k in names])
    return {k: part.view(grams[k].shape) for k, part in zip(names, parts)}


class _PassOutOfMemory(Exception):
    """A kernel pass ran out of memory (the original error's message; the error itself, with the pass's frames in
    its traceback, is not kept)."""


@dataclass
class PassCount:
    """The kernel passes of a round: how many, the largest, the out-of-memory splits."""

    passes: int = 0
    largest: int = 0
    oom_splits: int = 0

    def record(self, k: int) -> None:
        self.passes += 1
        self.largest = max(self.largest, k)
