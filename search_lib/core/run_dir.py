"""One owner of a run folder: the search and the training keep their runs the same way.

A run folder holds

    config.json     the settings of the run (compared when the same folder is used again)
    provenance.json what produced the numbers (command, versions, commit, device, threads, seeds; written
                    once when the run starts; `search_lib.core.provenance`)
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

One process at a time: a run holds its folder's lock (`search_lib.core.folder_lock.FolderLock`) for its
whole life, so a second process on the same folder (a cron job firing while the last one still runs, a sweep
and a hand-started run) stops at once with exit 2 naming the holder, and ``--overwrite`` cannot delete a
running run's files. What a run read of its folder before it could lock it (a folder without a lock file yet)
is checked again once it holds the lock (`RunDir.claim` says when it changed). The claim also removes the
temporary files that atomic writes of a killed run left behind.

The folder's files are the user's own: a file the run would write that is a symbolic link, not a regular
file, or another user's is refused with one line naming it (exit 2), before anything is written
(`search_lib.core.utils.check_own`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search_lib.core.distributed import World
from search_lib.core.errors import FolderInUse, ForeignFile, RunFailure, ToolkitError, UsageError, one_line
from search_lib.core.folder_lock import FolderLock, in_use_message
from search_lib.core.provenance import PROVENANCE_FILE, environment_changes
from search_lib.core.utils import (
    atomic_write_json,
    atomic_write_text,
    check_own,
    config_diff,
    open_own,
    remove_temporaries,
    temporaries,
)

CONFIG_FILE = "config.json"
DONE_FILE = "done"


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
        self._unlocked_look: tuple | None = None  # what an early look saw without holding the lock

    def names(self) -> tuple[str, ...]:
        """Every file (and output folder) a run writes here."""
        return (CONFIG_FILE, PROVENANCE_FILE, DONE_FILE, self.log_name, *(self.state.files() if self.state else ()),
                *self.outputs)

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
        for name in self.names():
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
        problem = None  # (error type, its line)
        if world.is_main:
            try:
                self.check_files()
                if early and not self.lock.exists():
                    self._unlocked_look = self._look()  # read without the lock: checked again by `claim`
                else:
                    record = self.lock.acquire(shared)
                    if record is not None:
                        problem = (FolderInUse, in_use_message(f"--save_dir {self.path}", record, overwrite))
            except ForeignFile as exc:  # a file the run did not create: every rank stops with its line
                problem = (ForeignFile, str(exc))
        if world.active:
            problem = world.gather(problem)[0]
        if problem:
            raise problem[0](problem[1])

    def claim(self, world: World | None = None, *, overwrite: bool = False, verb: str = "write") -> bool:
        """A run's first write: rank 0 makes the folder, the lock is held from here to the end (`hold`), the
        temporary files of a killed run are removed, and with ``overwrite`` rank 0 then removes the earlier
        outputs (only once the lock keeps everyone else out).

        True when another process wrote the run's files between an early look that could not lock the folder
        and now (never with ``overwrite``): what was read then is out of date, so read the folder again (under
        the lock now) and claim again."""
        world = world or World()
        if world.is_main:
            self.create(verb=verb)
        self.hold(world, overwrite=overwrite)
        changed = world.is_main and self._unlocked_look not in (None, self._look()) and not overwrite
        self._unlocked_look = None
        if world.active:
            changed = world.gather(changed)[0]
        if world.is_main:
            removed = remove_temporaries(self.path, self.names())
            if removed:
                self.logger.info("removed %d temporary file(s) of an interrupted run in %s", len(removed), self.path)
            if overwrite:
                self.clear()
        return changed

    def _look(self) -> tuple:
        """What identifies the run's recorded files now: (name, inode, mtime, size) of each present."""
        seen = []
        for name in (CONFIG_FILE, DONE_FILE, *(self.state.files() if self.state else ())):
            try:
                st = os.lstat(self.path / name)
            except OSError:
                continue
            seen.append((name, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(seen)

    def check_files(self) -> None:
        """ForeignFile (exit 2) naming the first of the run's files here (temporaries of its atomic writes included)
        that is not this user's own regular file (or folder, for an output folder): a link or another user's file
        is never written through or replaced."""
        for name in self.names():
            check_own(self.path / name, dirs_ok=name in self.outputs)
        temporaries(self.path, self.names())

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

    def record_provenance(self, record: dict) -> None:
        """Write provenance.json once, when the run starts; a later session (a resume) keeps the record and says
        in one line what of its environment differs from it (`search_lib.core.provenance`)."""
        write_provenance(self.path, record, self.logger)

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
        check_own(cur)
        check_own(self.path / self.state.prev)
        if os.path.lexists(cur):
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
    handler) and prints INFO lines itself, unless a run around this one prints them already (a proxy study's
    searches); without it, records also reach the caller's own handlers.
    """

    def __init__(self, path: Path, logger_name: str, console: bool, level: int):
        self.logger = logging.getLogger(logger_name)
        self.saved = (self.logger.propagate, self.logger.level)
        try:  # appended to only when it is this user's own file (never through a link)
            handler = _LogFileHandler(os.fdopen(open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a"))
        except OSError as exc:
            raise RunFailure(f"cannot write the log {path}: {exc.strerror}; choose a writable --save_dir") from None
        handler.setLevel(level)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handlers: list[logging.Handler] = [handler]
        if console and not any(isinstance(h, _ConsoleHandler) for h in self.logger.handlers):
            stream = _ConsoleHandler()
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


class _ConsoleHandler(logging.StreamHandler):
    """A run log's console handler (one per logger: a run inside another prints through the outer one's)."""


class _LogFileHandler(logging.StreamHandler):
    """A log file's handler on a stream opened by `open_own`; closing the handler closes the file."""

    def close(self) -> None:
        self.acquire()
        try:
            self.flush()
            self.stream.close()
        finally:
            self.release()
            super().close()


def write_provenance(folder: Path, record: dict, logger: logging.Logger) -> None:
    """provenance.json in ``folder`` (`RunDir.record_provenance`); also for a folder that is not a `RunDir` of its
    own (a proxy study's architecture). An unreadable record is replaced with a warning."""
    path = Path(folder) / PROVENANCE_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            logger.warning("%s is unreadable (%s); writing this session's record", path, one_line(exc, 100))
        else:
            changes = environment_changes(old if isinstance(old, dict) else {}, record)
            if changes:
                logger.warning("resumed in another environment than %s records: %s", path, "; ".join(changes))
            return
    atomic_write_json(path, record)
