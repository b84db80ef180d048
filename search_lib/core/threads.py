"""Thread counts: how many compute threads a run uses, and `ThreadTuner`, which chooses them by timing.

A user who fixes the count (``--threads``, METANTKNAS_THREADS or OMP_NUM_THREADS) gets exactly that
count and nothing tunes it. Otherwise a run starts with one thread per CPU of its affinity and keeps that
count: the float rounding of a training step depends on the thread count, and so do the last digits of the
search's κ on some CPUs (measured on an AVX-512 AMD EPYC; not on the Intel machines measured before), so a
count chosen by the machine's load would make the numbers depend on it. With --tune_threads the search's
passes, the training's steps and the few-shot test's forward passes go through a `ThreadTuner`, which drops
threads when the run shares its cores with other busy processes: faster on a shared box, load-dependent
numbers. Fixed-count runs side by side stay fair by taking turns at the cores (`search_lib.core.turns`).
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from search_lib.core.errors import UsageError

THREADS_ENV = "METANTKNAS_THREADS"
_THREAD_ENVS = (THREADS_ENV, "OMP_NUM_THREADS")  # where a user fixes the thread count, in order of precedence


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def threads_fixed(threads: int | None = None) -> bool:
    """True when the user fixed the thread count (``--threads``, METANTKNAS_THREADS or OMP_NUM_THREADS):
    then nothing tunes it (`ThreadTuner`)."""
    return threads is not None or any(os.environ.get(name, "").strip() for name in _THREAD_ENVS)


def configure_threads(workers: int = 0, threads: int | None = None) -> int:
    """Set the compute threads deliberately instead of letting torch, the BLAS under numpy / scipy /
    scikit-learn and the loader workers each assume the whole machine; returns the count chosen.

    The count: ``threads`` when given, else the environment variable METANTKNAS_THREADS, else
    OMP_NUM_THREADS when it is set, else the CPUs of the process's affinity less one per loader worker
    (at least 1). It sets torch's intra-op threads and, when threadpoolctl is installed, the BLAS / OpenMP
    pools of numpy and scipy.
    """
    source = threads
    if source is None:
        for name in _THREAD_ENVS:
            text = os.environ.get(name, "").strip()
            if text:
                try:
                    source = int(text)
                except ValueError:
                    raise UsageError(f"{name}={text!r} is not a whole number of threads") from None
                break
    count = int(source) if source is not None else available_cpus() - max(0, int(workers))
    count = max(1, count)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return count
    threadpool_limits(limits=count)
    return count


class ThreadTuner:
    """Chooses torch's intra-op thread count for a loop of similar steps by timing them.

    Alone on its cores a run is fastest with one thread per core. On a box shared with another busy
    process it is not: OpenMP threads spin at every barrier while their partner core runs someone else's
    work, and a network of many small operations hits thousands of barriers a second (two few-shot tests
    side by side on 2 cores each took 5x the time of one alone). One thread per process has no barriers.
    The tuner times the steps at each candidate count (the current one, half of it, and 1) and uses the
    fastest per unit of work, but several threads only when their steps got (nearly) all of their cores:
    process CPU time at least ``min_share`` of wall time x threads (measured alone: 0.96-1.02; beside
    another test: 0.5-0.75).
    Speed alone is not enough: when both processes run two threads, each one's single-thread probe still
    competes with the other's spinning threads, so both would stay at two. It measures again after
    ``period`` steps, doubling the period while the choice holds (the load may change). ``step(work)``
    wraps one step; ``close()`` restores the count it started from. With a single candidate (one thread,
    or ``enabled=False``: the user fixed the count) it does nothing.
    ``trust_fair``: when the probe of all the threads finds that they got their cores, the smaller counts
    are not tried (for steps large enough that more threads are faster whenever they get their cores: the
    search's passes). Alone on its cores a run then never runs a slow probe; beside other busy processes it
    probes as above.
    """

    def __init__(self, enabled: bool = True, period: int = 16, max_period: int = 256, probe_steps: int = 2,
                 min_share: float = 0.85, timer=None, cpu_timer=None, trust_fair: bool = False):
        self.min_share = float(min_share)
        self.trust_fair = bool(trust_fair)
        self.cpu_timer = cpu_timer or time.process_time
        self.start = torch.get_num_threads()
        # all the threads, half of them (two processes sharing the cores) and one (many sharing them)
        self.counts = sorted({self.start, max(1, self.start // 2), 1}, reverse=True) if enabled else [self.start]
        self.period = self.base_period = int(period)
        self.max_period, self.probe_steps = int(max_period), int(probe_steps)
        self.timer = timer or time.perf_counter
        self.best = self.start
        self._plan: list[int] = self._probe_plan()
        self._times: dict[int, float] = {}
        self._used: dict[int, float] = {}
        self._left = 0
        self.history: list[int] = []  # the count of every step (for tests and logs)

    def _probe_plan(self) -> list[int]:
        return [c for c in self.counts for _ in range(self.probe_steps)] if len(self.counts) > 1 else []

    def _set(self, count: int) -> None:
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)

    def step(self, work: float = 1.0):
        """A context manager around one step of ``work`` units (e.g. images); it yields the thread count."""

        @contextlib.contextmanager
        def timed():
            probing = bool(self._plan)
            count = self._plan[0] if probing else self.best
            self._set(count)
            t0, c0 = self.timer(), self.cpu_timer()
            yield count
            wall = self.timer() - t0
            if probing and work > 0 and wall > 0:
                per = wall / work  # the fastest of the probe's steps, per unit of work
                self._times[count] = min(self._times.get(count, float("inf")), per)
                used = (self.cpu_timer() - c0) / (wall * count)  # the share of its cores the step got
                self._used[count] = max(self._used.get(count, 0.0), used)
                if self.trust_fair and count == self.counts[0] and used >= self.min_share:
                    self._plan = [c for c in self._plan if c == count]  # all its cores: no need to try fewer
            self.history.append(count)
            self._advance(probing)

        return timed()

    def _advance(self, probing: bool) -> None:
        if probing:
            self._plan.pop(0)
            if not self._plan:  # probe done: choose, then exploit for a while
                # several threads only when they got their cores: sharing them, they spin at every barrier
                # while the other process runs, and one thread per process is faster for both
                fair = [c for c in self._times if c == 1 or self._used.get(c, 0.0) >= self.min_share]
                best = min(fair or self._times, key=self._times.get) if self._times else self.best
                if best != self.best:
                    self.period = self.base_period
                elif len(self.history) > len(self.counts) * self.probe_steps:
                    self.period = min(self.max_period, self.period * 2)
                self.best, self._times, self._used, self._left = best, {}, {}, self.period
            return
        if len(self.counts) > 1:
            self._left -= 1
            if self._left <= 0:
                self._plan = self._probe_plan()

    def step_counts(self, since: int = 0) -> dict[int, int]:
        """How many steps ran at each count (the most threads first), counting from step ``since``."""
        steps = self.history[since:]
        return {c: steps.count(c) for c in sorted(set(steps), reverse=True)}

    def summary(self) -> str:
        """How many steps ran at each count, e.g. ``2 threads: 518 steps, 1 thread: 12 steps``."""
        return ", ".join(f"{c} thread{'s' * (c > 1)}: {n} steps" for c, n in self.step_counts().items()) or "no steps"

    def close(self) -> None:
        self._set(self.start)

