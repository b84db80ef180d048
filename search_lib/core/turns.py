"""Turn-taking at the cores: the toolkit's CPU runs on one machine share its cores a step at a time.

Two runs that each use every core, side by side, make the scheduler interleave their OpenMP threads: at every
barrier of a small operation a thread waits for a partner that the scheduler has just given to the other run,
and a training of small networks slows far more than twofold. Fewer threads per run would avoid that but change
the float rounding of the training (its numbers would then depend on the load). Instead each step (a training
step with the fetching of its batch, a search pass, a forward pass of the few-shot test) holds one of the
machine's *slots* while it runs; a machine has ``cpus // threads`` of them. Alone, a run finds its slot free
every time (a few uncontended ``flock`` calls per step); two runs on a machine of one slot alternate steps, each
at full speed on all the cores. A *door* lock taken before the slots makes the alternation fair: the run that
just released its slot queues behind the one already waiting. Waiting never changes a number.

The locks are ``flock`` on files in a private folder (``METANTKNAS_TURNS_DIR``, default
``<tmp>/metantknas-turns-<uid>``): the kernel releases them when a process dies, so a killed run never blocks
the others. Runs of one user take turns; a folder in ``METANTKNAS_TURNS_DIR`` that several users can write
makes theirs take turns too. Runs on a GPU and ranks of one torchrun job do not take turns (a rank waiting for
a slot while another waits for it in a collective would never finish); neither do runs with
``--no-take_turns``. `taking_turns` makes a run's `Turns` current for the session (`run_session`); `step` and
`over` are where the loops take them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

from search_lib.core.errors import one_line

TURNS_ENV = "METANTKNAS_TURNS_DIR"
log = logging.getLogger("metantknas.turns")


class TurnsUnavailable(OSError):
    """The turn-taking folder cannot be used safely (a link, not a folder, another owner, writable by others)."""


def default_folder() -> Path:
    return Path(tempfile.gettempdir()) / f"metantknas-turns-{os.getuid()}"


def private_folder(path: Path) -> Path:
    """``path`` as a folder this user owns and nobody else may write to (created when missing): another user
    could otherwise hold the slots of a folder they planted, or swap its files for links."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise TurnsUnavailable(f"{path} is not a folder (a link or a file)")
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise TurnsUnavailable(f"{path} belongs to another user or others may write to it")
    return path


class Turns:
    """Holds one of ``slots`` machine-wide slots around each step (``with turns.step(): ...``).

    ``folder``: where the lock files live: a folder chosen by the user (``METANTKNAS_TURNS_DIR``), used as it
    is, else `default_folder`, which must be private (`private_folder`). ``enabled=False``: every step runs at
    once (a GPU run, a torchrun rank, --no-take_turns). ``waits`` counts the steps that found every slot taken.
    """

    def __init__(self, slots: int = 1, folder: str | Path | None = None, enabled: bool = True):
        self.slots = max(1, int(slots))
        self.enabled = bool(enabled)
        self.folder: Path | None = None
        self.waits = 0
        self._fds: list[int] | None = None
        self._depth = 0  # a step inside a step (a test's forward pass inside its episode) holds the same slot
        if not self.enabled:
            return
        if folder is None:
            named = os.environ.get(TURNS_ENV, "").strip()
            folder = Path(named) if named else private_folder(default_folder())
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise TurnsUnavailable(f"{self.folder} is not a folder")
        # a loader worker forked from this process must not keep its parent's slot locked after the parent died
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (t := ref()) is not None and t._forget())

    def open(self) -> list[int]:
        """The lock files' descriptors (opened once; `open_turns` opens them at the start, so that a folder
        that cannot be used is found then and not in the middle of a run). Read-only: ``flock`` needs no more,
        and another user's lock files in a shared folder open as well as one's own."""
        if self._fds is None:
            flags = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            names = ["door"] + [f"slot{i}" for i in range(self.slots)]
            fds: list[int] = []
            try:
                for name in names:
                    fds.append(os.open(self.folder / name, flags, 0o644))
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            self._fds = fds
        return self._fds

    def _forget(self) -> None:
        fds, self._fds = self._fds, None
        for fd in fds or ():
            with contextlib.suppress(OSError):  # a descriptor the child already closed: nothing left to release
                os.close(fd)

    def _acquire(self) -> int:
        door, *slots = self.open()
        fcntl.flock(door, fcntl.LOCK_EX)
        try:
            for fd in slots:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    continue
            self.waits += 1
            fd = slots[os.getpid() % len(slots)]
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fd
        finally:
            fcntl.flock(door, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One step, run while this process holds a slot (at once when turns are off; a step inside a step
        runs in the outer one's turn)."""
        if not self.enabled or self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        fd = self._acquire()
        self._depth = 1
        try:
            yield
        finally:
            self._depth = 0
            fcntl.flock(fd, fcntl.LOCK_UN)

    def over(self, iterable: Iterable) -> Iterator:
        """``iterable``'s items, each fetched and used (the loop's body) while this process holds a slot: an
        in-process loader's work is part of the step."""
        items = iter(iterable)
        while True:
            with self.step():
                try:
                    item = next(items)
                except StopIteration:
                    return
                yield item

    def settings(self) -> dict:
        """What provenance.json says of it (at the start of a run)."""
        return {"enabled": self.enabled, "slots": self.slots if self.enabled else None}

    def record(self) -> dict:
        """What results.json and cost.json say of it: the settings and the steps that waited for a slot."""
        return self.settings() | {"waited_steps": self.waits}

    def close(self) -> None:
        self._forget()


_current = Turns(enabled=False)


def flag_help(unit: str) -> str:
    """--take_turns's help, one text for the search (``unit`` "pass") and the training ("step")."""
    return (f"on the CPU, take turns {unit} by {unit} with the toolkit's other CPU runs on this machine instead of "
            "interleaving threads with them (search_lib.core.turns; waiting changes no number)")


def open_turns(enabled: bool, *, device_type: str, distributed: bool, threads: int, cpus: int) -> Turns:
    """The session's `Turns`: off on a GPU, for a torchrun rank and with --no-take_turns; a folder that cannot
    be used safely, or whose lock files cannot be opened, turns them off with a warning (the run goes on: only
    its speed beside other runs changes)."""
    if not enabled or device_type != "cpu" or distributed:
        return Turns(enabled=False)
    try:
        turns = Turns(slots=cpus // max(1, threads))
        turns.open()
        return turns
    except OSError as exc:
        log.warning("runs on this machine will not take turns at the cores (%s); set %s to a private folder",
                    one_line(exc, 160), TURNS_ENV)
        return Turns(enabled=False)


@contextlib.contextmanager
def taking_turns(turns: Turns) -> Iterator[Turns]:
    """Make ``turns`` the current one (what `step` and `over` use) for the block, then close it."""
    global _current
    previous, _current = _current, turns
    try:
        yield turns
    finally:
        _current = previous
        turns.close()


def current() -> Turns:
    return _current


def step():
    """A step under the current session's turns (`Turns.step`)."""
    return _current.step()


def over(iterable: Iterable) -> Iterator:
    """A loop under the current session's turns (`Turns.over`)."""
    return _current.over(iterable)
