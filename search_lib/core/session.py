"""The set-up every run shares: the search, the training and the few-shot test of a checkpoint.

`run_session` applies --deterministic (`search_lib.core.determinism`: before anything touches CUDA), resolves the
device and joins the torchrun process group, sets the thread count, makes the run take turns at the cores with
the toolkit's other CPU runs on the machine (`search_lib.core.turns`, --take_turns), and, for a run
that writes a folder, takes the folder's lock at the first look (when the folder has one already: a second
process is refused before any work) and releases it at the end. `RunSession.claim` is the run's first write:
every rank has checked its inputs, rank 0 creates (or, with --overwrite, clears) the folder under the lock, and
the run's log is attached until the session ends; a run that read the folder before it could lock it learns
there whether another process wrote it meanwhile (``reread``). One owner, so that the three runs cannot set up
differently. `RunSession.record_provenance` writes the folder's provenance.json (`search_lib.core.provenance`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from search_lib.core import distributed
from search_lib.core.determinism import deterministic_mode
from search_lib.core.distributed import World
from search_lib.core.provenance import build_record
from search_lib.core.run_dir import RunDir, RunLog
from search_lib.core.threads import available_cpus, configure_threads
from search_lib.core.turns import Turns, open_turns, taking_turns
from search_lib.core.utils import resolve_device


@dataclass
class RunSession:
    """A run's world of processes, its device and thread count, and its folder (None: a run writing none)."""

    world: World
    device: torch.device
    threads: int
    run: RunDir | None = None
    log: RunLog | None = None
    deterministic: bool = True
    turns: Turns = field(default_factory=lambda: Turns(enabled=False))
    _closing: ExitStack = field(default_factory=ExitStack, repr=False)

    def record_provenance(self, seeds: dict, threads: dict) -> None:
        """provenance.json in the run folder (rank 0; once: a resume only compares its environment);
        ``seeds``: the seeds the run used, by name; ``threads``: its thread mode (``{"mode": "fixed"}``, ...)."""
        if self.run is not None and self.world.is_main:
            self.run.record_provenance(self.provenance(seeds, threads))

    def provenance(self, seeds: dict, threads: dict) -> dict:
        return build_record(self.device, {"count": self.threads, **threads, "turns": self.turns.settings()}, seeds,
                            self.deterministic)

    def claim(self, *, overwrite: bool = False, verb: str = "write", log: str | None = None, console: bool = False,
              level: int = logging.DEBUG, reread: bool = False) -> bool:
        """The run's first write (`RunDir.claim`), once every rank has checked its inputs; then the log named
        ``log`` is copied to the folder's log file (rank 0) until the session ends. ``reread``: a run that read
        the folder before this; True (nothing claimed yet, the lock held) when another process wrote the folder
        since a first look that could not lock it, so that the run reads it again and claims again."""
        self.world.barrier()  # every rank has read the folder and its inputs before rank 0 changes it
        if self.run.claim(self.world, overwrite=overwrite, verb=verb) and reread:
            return True
        self.world.barrier()  # ... and reads it again only after that
        if log is not None and self.world.is_main:
            self.log = self.run.attach_log(log, console=console, level=level)
        return False

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None
        if self.run is not None:
            self.run.release()
        self._closing.close()


@contextmanager
def run_session(device: str, threads: int | None, *, workers: Callable[[str], int] | int = 0,
                run: RunDir | None = None, overwrite: bool = False,
                break_stale: bool = False, deterministic: bool = True,
                take_turns: bool = True) -> Iterator[RunSession]:
    """Set up a run (see the module's text); ``workers``: the data-loader processes, or a function of the device
    type giving them (they get no compute threads). A folder another process holds: FolderInUse (exit 2) at
    once; ``break_stale`` (--break_stale_lock) takes over a lease that expired (network file systems);
    ``deterministic``: --deterministic, for the session's life; ``take_turns``: --take_turns (a CPU run outside
    torchrun takes turns at the cores with the toolkit's other runs on the machine, `search_lib.core.turns`)."""
    closing = ExitStack()
    closing.enter_context(deterministic_mode(deterministic))  # first: cuBLAS reads its setting when CUDA starts
    try:
        world, dev = distributed.init(resolve_device(device))
        loaders = workers(dev.type) if callable(workers) else workers
        count = configure_threads(loaders, threads)
        session = RunSession(world, dev, count, run, deterministic=deterministic, _closing=closing,
                             turns=closing.enter_context(taking_turns(open_turns(
                                 take_turns, device_type=dev.type, distributed=world.active, threads=count,
                                 cpus=available_cpus()))))
    except BaseException:
        closing.close()
        raise
    try:
        if run is not None:
            run.lock.break_stale = break_stale
            run.hold(world, early=True, overwrite=overwrite)
        yield session
    finally:
        session.close()
