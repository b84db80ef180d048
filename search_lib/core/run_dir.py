"""One owner of a run folder: the search and the training keep their runs the same way.

A run folder holds

    config.json     the settings of the run (compared when the same folder is used again)
    <saved state>   written atomically after every step, the previous copy kept beside it
                    (the search's ``state.json`` / ``state.prev.json``, the training's
                    ``checkpoint.pt`` / ``checkpoint_prev.pt``)
    <outputs>       append-only records and results (``history.jsonl``, ``metrics.jsonl``, ...)
    <log>           the run's log
    done            written last; a finished run is reported, not recomputed

A saved state that cannot be read back (a kill mid-write on a full disk, a hand edit) is moved aside as
``*.corrupt`` with a warning and the previous copy is used; with neither readable the run starts over.
Nothing here knows what a search or a training is: the callers pass the file names, a reader and the
words of their messages.

One process at a time: a run holds its folder's lock (`FolderLock`, ``.lock``) for its whole life, so
a second process on the same folder (a cron job firing while the last one still runs, a sweep and a
hand-started run) stops at once with exit 2 naming the holder, and ``--overwrite`` cannot delete a
running run's files. The lock is ``flock(2)``: the operating system drops it when the process ends,
however it ends, so a SIGKILL leaves nothing stale and the re-run simply takes it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search_lib.core.distributed import World
from search_lib.core.errors import FolderInUse, RunFailure, ToolkitError, UsageError, one_line
from search_lib.core.utils import atomic_write_json, atomic_write_text, config_diff

CONFIG_FILE = "config.json"
DONE_FILE = "done"
LOCK_FILE = ".lock"


@dataclass(frozen=True)
class SavedState:
    """A file saved with its previous version kept beside it, and the words used for it in messages."""

    name: str  # e.g. "state.json"
    prev: str  # e.g. "state.prev.json"
    what: str  # e.g. "search state"
    bad: str = "unreadable"  # how an unusable copy is described
    restart: str = "starting again"  # what happens when no copy is usable

    def files(self) -> tuple[str, ...]:
        return self.name, self.prev, self.name + ".corrupt", self.prev + ".corrupt"


# ---- the lock --------------------------------------------------------------------------------------------

log = logging.getLogger("metantknas")


def holder_record() -> dict:
    """What a lock holder writes into the lock file: pid, host, start time, command."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": shlex.join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])}


def describe_holder(record: dict | None) -> str:
    """``pid 123 on host box, started 2026-12-02 00:01:02 UTC, command: prune_metantknas.py ...``."""
    if not record or "pid" not in record:
        return "a process that has not written its name yet"
    host = f" on host {record['host']}" if record.get("host") else ""
    return (f"pid {record['pid']}{host}, started {record.get('started', '?')}, command: "
            f"{one_line(str(record.get('command', '?')), 160)}")


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text() or "null")
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class FolderLock:
    """An ``flock`` on ``<folder>/.lock``, taken without waiting and held until `release` or the process's end.

    An exclusive holder writes `holder_record` into the file (emptied again on release), so that a refused
    process can name it. A shared hold (the shards of a proxy study) writes nothing; it only keeps an
    exclusive taker (``--overwrite``) out. The file is never deleted: deleting a lock file while another
    process has it open is how two processes end up holding "the" lock at once.
    """

    def __init__(self, folder: str | os.PathLike, name: str = LOCK_FILE):
        self.path = Path(folder) / name
        self.shared = False
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, shared: bool = False, wait: bool = False) -> dict | None:
        """Take (or convert) the lock; None when this process holds it now, else the holder's record ({} when it
        wrote none). ``wait``: block until it is free (for short sections only). A file system without locks
        gives a warning and no lock."""
        if self._fd is not None and self.shared == shared:
            return None
        fd = self._fd if self._fd is not None else self._open()
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except OSError as exc:
            if self._fd is None:
                os.close(fd)
            if exc.errno in _BUSY:
                return _read_record(self.path) or {}
            if exc.errno in _UNSUPPORTED:
                log.warning("cannot lock %s (%s): running without a lock; make sure no other process uses this "
                            "folder", self.path, exc.strerror)
                return None
            raise RunFailure(f"cannot lock {self.path}: {exc.strerror}") from None
        self._fd, self.shared = fd, shared
        try:
            os.ftruncate(fd, 0)  # a shared hold names nobody; an exclusive one names this process
            if not shared:
                os.pwrite(fd, (json.dumps(holder_record(), sort_keys=True) + "\n").encode(), 0)
        except OSError:  # a lock file this user may only read: held all the same, just unnamed
            pass
        return None

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EROFS) and self.path.exists():
                try:  # flock works on a descriptor open for reading too
                    return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    pass
            raise RunFailure(f"cannot create the lock file {self.path}: {exc.strerror}; choose a writable "
                             f"folder") from None

    def hold(self, what: str, fix: str = "choose another --save_dir") -> FolderLock:
        """`acquire` exclusively, or FolderInUse (exit 2) naming the holder; ``with lock.hold(...):`` releases."""
        record = self.acquire()
        if record is not None:
            raise FolderInUse(in_use_message(what, record, fix=fix))
        return self

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if not self.shared:
                os.ftruncate(fd, 0)
        except OSError:  # the folder became read-only or vanished: the lock goes with the descriptor anyway
            pass
        finally:
            os.close(fd)  # closing the last descriptor of the file releases the flock

    def holder(self) -> dict | None:
        """The record of another process holding the lock exclusively ({} when unnamed); None when it is free
        or only shared (or there is no lock file). A probe: a shared lock for a moment, never written."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            return (_read_record(self.path) or {}) if exc.errno in _BUSY else None
        finally:
            os.close(fd)
        return None


def in_use_message(what: str, record: dict | None, overwrite: bool = False, fix: str = "choose another "
                   "--save_dir") -> str:
    """The one line of a refusal: the folder, its holder, and what to do."""
    refused = "; --overwrite is refused while it runs (nothing was deleted)" if overwrite else ""
    return (f"{what} is in use by another process ({describe_holder(record)}){refused}; wait for it to finish "
            f"(or stop it) and run the command again, or {fix}")


class RunDir:
    """A run folder: config check, rotating atomic saves with fallback, outputs, ``done`` marker, log."""

    def __init__(self, path: str | os.PathLike, state: SavedState | None, outputs: Sequence[str], log_name: str,
                 logger: logging.Logger):
        """``state`` None: a run that keeps no rotating saved state (a proxy study keeps one record per
        architecture instead); `save_state` and `load_state` are then not used."""
        self.path = Path(path)
        self.state = state
        self.outputs = tuple(outputs)
        self.log_name = log_name
        self.logger = logger
        self.lock = FolderLock(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ---- the folder ----
    def create(self, verb: str = "write") -> RunDir:
        """Make the folder (and its parents); RunFailure ("cannot <verb> --save_dir ...") when it cannot be
        written."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not os.access(self.path, os.W_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as exc:
            raise RunFailure(f"cannot {verb} --save_dir {self.path}: {exc.strerror or exc}; choose a writable "
                             f"folder") from None
        return self

    def clear(self) -> None:
        """Remove every file (and output folder) a run writes here (``--overwrite``); other files in the folder
        are left alone."""
        for name in (CONFIG_FILE, DONE_FILE, self.log_name, *(self.state.files() if self.state else ()),
                     *self.outputs):
            target = self.path / name
            try:
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise RunFailure(f"cannot remove {self.path / name} for --overwrite: {exc.strerror}") from None

    # ---- one process at a time ----
    def hold(self, world: World | None = None, *, early: bool = False, shared: bool = False,
             overwrite: bool = False) -> None:
        """Hold the folder's lock for the rest of the run; FolderInUse (exit 2) naming the holder when another
        process has it. Under torchrun rank 0 holds it for the group and every rank gets the refusal (so
        every rank calls this at the same point). ``early``: only when the folder has a lock file already (a
        first look before any work; nothing is created). ``shared``: several cooperating processes (the
        shards of a proxy study) hold it at once, and keep an exclusive taker out."""
        world = world or World()
        problem = None
        if world.is_main and not (early and not self.lock.path.exists()):
            record = self.lock.acquire(shared)
            if record is not None:
                problem = in_use_message(f"--save_dir {self.path}", record, overwrite)
        if world.active:
            problem = world.gather(problem)[0]
        if problem:
            raise FolderInUse(problem)

    def claim(self, world: World | None = None, *, overwrite: bool = False, verb: str = "write") -> None:
        """A run's first write: rank 0 makes the folder, the lock is held from here to the end (`hold`), and with
        ``overwrite`` rank 0 then removes the earlier outputs (only once the lock keeps everyone else out)."""
        world = world or World()
        if world.is_main:
            self.create(verb=verb)
        self.hold(world, overwrite=overwrite)
        if world.is_main and overwrite:
            self.clear()

    def release(self) -> None:
        self.lock.release()

    # ---- configuration ----
    def read_config(self) -> dict | None:
        """The recorded ``config.json`` (None when there is none); UsageError when it is unreadable."""
        path = self.path / CONFIG_FILE
        if not path.exists():
            return None
        try:
            config = json.loads(path.read_text())
            if not isinstance(config, dict):
                raise ValueError(f"a JSON {type(config).__name__}, not an object")
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{path} is unreadable ({one_line(exc, 100)}); use --overwrite or another "
                             f"--save_dir") from None
        return config

    def write_config(self, config: dict) -> None:
        atomic_write_json(self.path / CONFIG_FILE, config)

    def check_config(self, old: dict, new: dict, keys: Sequence[str] | None = None, what: str = "a run") -> None:
        """UsageError naming every differing key when ``new`` does not match the recorded ``old``."""
        diff = config_diff(old, new, keys)
        if diff:
            raise UsageError(f"--save_dir {self.path} holds {what} with other settings (a different config: "
                             f"{'; '.join(diff)}); use --overwrite to replace it or choose another --save_dir")

    # ---- the saved state ----
    def save_state(self, write: Callable[[Path], None]) -> None:
        """Keep the current copy as the previous one, then write the new one atomically via ``write(path)``.

        ``os.replace`` is atomic, so a kill at any moment leaves at least one complete copy.
        """
        cur = self.path / self.state.name
        if cur.exists():
            try:
                os.replace(cur, self.path / self.state.prev)
            except OSError as exc:
                raise RunFailure(f"cannot rotate {cur}: {exc.strerror}; check the permissions of "
                                 f"{self.path}") from None
        write(cur)

    def load_state(self, read: Callable[[Path], Any]) -> Any | None:
        """The newest readable copy (current, else previous) as ``read(path)`` returns it; None when none is.

        ``read`` raises ValueError, OSError, UnicodeDecodeError or a toolkit error for a copy it cannot
        use; that copy is moved aside as ``*.corrupt`` (so it is never rotated over the good previous one).
        """
        for name in (self.state.name, self.state.prev):
            path = self.path / name
            if not path.exists():
                continue
            try:
                value = read(path)
            except (ValueError, OSError, UnicodeDecodeError, ToolkitError) as exc:
                aside = path.with_name(path.name + ".corrupt")
                self.logger.warning("%s %s is %s (%s); moved it to %s and trying the previous one", self.state.what,
                                    path, self.state.bad, one_line(str(exc).split(";")[0], 120), aside.name)
                try:
                    os.replace(path, aside)
                except OSError as move_exc:  # still usable: the next save replaces the bad file
                    self.logger.warning("could not move %s aside (%s)", path, move_exc.strerror)
                continue
            if name != self.state.name:
                self.logger.warning("resuming from %s", path)
            return value
        if any((self.path / f"{n}.corrupt").exists() for n in (self.state.name, self.state.prev)):
            self.logger.warning("no %s %s in %s; %s", "readable" if self.state.bad == "unreadable" else "usable",
                                self.state.what, self.path, self.state.restart)
        return None

    # ---- the done marker ----
    def is_done(self) -> bool:
        return (self.path / DONE_FILE).exists()

    def mark_done(self, text: str = "") -> None:
        atomic_write_text(self.path / DONE_FILE, text)

    def unmark_done(self) -> None:
        (self.path / DONE_FILE).unlink(missing_ok=True)

    # ---- the log ----
    def attach_log(self, logger_name: str = "metantknas", console: bool = False,
                   level: int = logging.DEBUG) -> RunLog:
        """Copy the run's log records to ``<folder>/<log_name>`` (appending) until the returned log is closed."""
        return RunLog(self.path / self.log_name, logger_name, console, level)


class RunLog:
    """A file handler (and optionally a console handler) on a logger, removed again by ``close()``.

    With ``console`` the logger stops propagating while attached (no duplicate lines through a root
    handler) and prints INFO lines itself; without it, records also reach the caller's own handlers.
    """

    def __init__(self, path: Path, logger_name: str, console: bool, level: int):
        self.logger = logging.getLogger(logger_name)
        self.saved = (self.logger.propagate, self.logger.level)
        try:
            handler = logging.FileHandler(path)
        except OSError as exc:
            raise RunFailure(f"cannot write the log {path}: {exc.strerror}; choose a writable --save_dir") from None
        handler.setLevel(level)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handlers: list[logging.Handler] = [handler]
        if console:
            stream = logging.StreamHandler()
            stream.setLevel(logging.INFO)
            stream.setFormatter(logging.Formatter("%(message)s"))
            self.handlers.append(stream)
            self.logger.propagate = False
        if self.logger.level == logging.NOTSET or self.logger.level > level:
            self.logger.setLevel(level)
        for h in self.handlers:
            self.logger.addHandler(h)

    def close(self) -> None:
        for h in self.handlers:
            self.logger.removeHandler(h)
            h.close()
        self.handlers = []
        self.logger.propagate, self.logger.level = self.saved

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False
