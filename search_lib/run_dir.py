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
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import RunFailure, ToolkitError, UsageError, one_line
from .utils import atomic_write_json, atomic_write_text, config_diff

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

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ---- the folder ----
    def create(self, verb: str = "write") -> "RunDir":
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
                   level: int = logging.DEBUG) -> "RunLog":
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

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False
