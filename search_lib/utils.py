"""Small shared helpers: device selection, seeding, atomic writes, JSONL appends."""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import RunFailure, UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")


def resolve_device(name: str = "auto") -> torch.device:
    """Map ``--device auto|cpu|cuda|cuda:N`` to a torch.device; refuse CUDA when absent.

    Under torchrun every process takes ``cuda:LOCAL_RANK`` whatever N says (`search_lib.distributed.init`).
    """
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2]
        if index and not index.isdigit():
            raise UsageError(f"unknown device {name!r}; use cuda or cuda:N with a GPU number N such as cuda:0")
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} was asked for but CUDA is not available; use --device cpu or auto")
        if index and int(index) >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
        return torch.device(name)
    raise UsageError(f"unknown device {name!r}; use one of {', '.join(DEVICE_CHOICES)}")


def draw_seed() -> int:
    """A fresh random seed (for a seed of -1), from the operating system: independent of every seeded
    generator of the run."""
    return int.from_bytes(os.urandom(4), "little") % (2**31 - 1)


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all CUDA devices too when present)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict[str, Any]:
    """Snapshot of every random-number generator the toolkit uses (for resumable runs)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_diff(old: dict, new: dict, keys=None) -> list[str]:
    """"key: old -> new" for each key (default: all keys of both, sorted) whose values differ."""
    if keys is None:
        keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _file_mode() -> int:
    """The permissions ``open()`` gives a new file under the process's umask (0644 under umask 022)."""
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(path: Path, write_fn, mode: str) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise RunFailure(f"cannot write to {path.parent}: {exc.strerror}; choose a writable output folder") from exc
    try:
        # mkstemp creates the file 0600 and os.replace keeps that mode: give it a plain file's permissions,
        # so that others in the group can read results on a shared machine when the umask allows it.
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, mode) as fh:
            write_fn(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise RunFailure(f"cannot write {path}: {exc.strerror}; check the disk space and permissions") from exc
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to ``path`` via a temp file in the same folder and ``os.replace``."""
    _atomic_write(Path(path), lambda fh: fh.write(text), "w")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes (e.g. a rendered PNG) to ``path`` atomically, like `atomic_write_text`."""
    _atomic_write(Path(path), lambda fh: fh.write(data), "wb")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` atomically, so a kill mid-write never leaves a truncated checkpoint in place."""
    _atomic_write(Path(path), lambda fh: torch.save(obj, fh), "wb")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON record as a line (results are append-only)."""
    try:
        with open(path, "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise RunFailure(f"cannot append to {path}: {exc.strerror}; check the disk space and permissions") from exc


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file, ignoring a truncated last line (a run killed mid-append)."""
    records = []
    with open(path) as fh:
        lines = fh.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # only the final line may be torn
                break
            raise
    return records


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
    """

    def __init__(self, enabled: bool = True, period: int = 16, max_period: int = 256, probe_steps: int = 2,
                 min_share: float = 0.85, timer=None, cpu_timer=None):
        self.min_share = float(min_share)
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

    def summary(self) -> str:
        """How many steps ran at each count, e.g. ``2 threads: 518 steps, 1 thread: 12 steps``."""
        counts = {c: self.history.count(c) for c in sorted(set(self.history), reverse=True)}
        return ", ".join(f"{c} thread{'s' * (c > 1)}: {n} steps" for c, n in counts.items()) or "no steps"

    def close(self) -> None:
        self._set(self.start)

