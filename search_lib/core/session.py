"""The set-up every run shares: the search, the training and the few-shot test of a checkpoint.

`run_session` resolves the device and joins the torchrun process group, sets the thread count, and, for a run
that writes a folder, takes the folder's lock at the first look (when the folder has one already: a second
process is refused before any work) and releases it at the end. `RunSession.claim` is the run's first write:
every rank has checked its inputs, rank 0 creates (or, with --overwrite, clears) the folder under the lock, and
the run's log is attached until the session ends. One owner, so that the three runs cannot set up differently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from search_lib.core import distributed
from search_lib.core.distributed import World
from search_lib.core.run_dir import RunDir, RunLog
from search_lib.core.threads import configure_threads
from search_lib.core.utils import resolve_device


@dataclass
class RunSession:
    """A run's world of processes, its device and thread count, and its folder (None: a run writing none)."""

    world: World
    device: torch.device
    threads: int
    run: RunDir | None = None
    log: RunLog | None = None

    def claim(self, *, overwrite: bool = False, verb: str = "write", log: str | None = None, console: bool = False,
              level: int = logging.DEBUG) -> None:
        """The run's first write (`RunDir.claim`), once every rank has checked its inputs; then the log named
        ``log`` is copied to the folder's log file (rank 0) until the session ends."""
        self.world.barrier()  # every rank has read the folder and its inputs before rank 0 changes it
        self.run.claim(self.world, overwrite=overwrite, verb=verb)
        self.world.barrier()  # ... and reads it again only after that
        if log is not None and self.world.is_main:
            self.log = self.run.attach_log(log, console=console, level=level)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None
        if self.run is not None:
            self.run.release()


@contextmanager
def run_session(device: str, threads: int | None, *, workers: Callable[[str], int] | int = 0,
                run: RunDir | None = None, overwrite: bool = False) -> Iterator[RunSession]:
    """Set up a run (see the module's text); ``workers``: the data-loader processes, or a function of the device
    type giving them (they get no compute threads). A folder another process holds: FolderInUse (exit 2) at
    once."""
    world, dev = distributed.init(resolve_device(device))
    loaders = workers(dev.type) if callable(workers) else workers
    session = RunSession(world, dev, configure_threads(loaders, threads), run)
    try:
        if run is not None:
            run.hold(world, early=True, overwrite=overwrite)
        yield session
    finally:
        session.close()
