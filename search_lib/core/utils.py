"""Small shared helpers: device selection, seeding, atomic writes, JSONL appends, and the rule for files the
toolkit writes: only this user's own regular files (`open_own`, `check_own`)."""

from __future__ import annotations

import errno
import inspect
import json
import logging
import os
import random
import re
import stat
import tempfile
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from search_lib.core.errors import ForeignFile, RunFailure, UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")


def resolve_device(name: str = "auto") -> torch.device:
    """Map ``--device auto|cpu|cuda|cuda:N`` to a torch.device; refuse CUDA when absent.

    Under torchrun every process takes ``cuda:LOCAL_RANK`` whatever N says (`search_lib.core.distributed.init`).
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


def refuse_empty_paths(**paths: str | None) -> None:
    """UsageError for a path flag given as an empty string (``--save_dir ""``, a script's unset variable): as a
    path it would be the current folder, which nobody meant; None (not given) is fine."""
    for name, value in paths.items():
        if value is not None and not str(value).strip():
            raise UsageError(f"--{name} is empty (an unset variable in a script?); give a path (for the current "
                             f"folder: .)")


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


def use_device(device: torch.device) -> None:
    """Make ``device`` the current CUDA device when it names one by index (``--device cuda:N``, ``--gpu N``).

    Pinned host memory, cuBLAS handles and ``torch.cuda.current_device()`` follow the current device, not
    the device of the tensors: without this a run on cuda:1 also opens a CUDA context (about 0.5 GB) on
    GPU 0, someone else's GPU on a shared machine, and fails where GPU 0 is full or exclusive to a process.
    """
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def native_bf16(device: torch.device) -> bool:
    """True when the CUDA device computes bfloat16 natively (compute capability 8.0 and later).

    ``torch.cuda.is_bf16_supported()`` alone also says True where bf16 is only emulated (a V100 or a T4),
    and slow; ``including_emulation=False`` asks for the hardware. PyTorch versions without that argument
    are asked for the compute capability itself.
    """
    if device.type != "cuda":
        return False
    if "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters:
        # it answers for the current device: the run's (`use_device`), or the one named here
        with torch.cuda.device(device.index) if device.index is not None else nullcontext():
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return torch.cuda.get_device_capability(device)[0] >= 8


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Snapshot of every random-number generator the toolkit uses (for resumable runs): Python's, numpy's,
    torch's CPU generator and, when ``device`` is a CUDA device, that device's generator alone (a run
    resumed with fewer GPUs visible has no generator for the others; see `set_rng_state`)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore a `rng_state` snapshot; its CUDA generator goes to ``device`` (the device this run uses, which
    may have another index than the saving run's, e.g. after ``CUDA_VISIBLE_DEVICES`` changed). A snapshot
    of an earlier version holds every visible GPU's generator: the one at ``device``'s index is restored when
    there is one, else the device keeps its seeded generator. Without a CUDA ``device`` the CUDA state is
    not used (a run resumed on the CPU)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    saved = state.get("cuda")
    if saved is None or device is None or device.type != "cuda":
        return
    if isinstance(saved, (list, tuple)):  # get_rng_state_all() of every GPU the saving run could see
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= len(saved):
            logging.getLogger("metantknas").warning(
                "the saved random-number state has no generator for %s (it holds %d GPU(s)); that GPU's random "
                "numbers start from the seed", device, len(saved))
            return
        saved = saved[index]
    torch.cuda.set_rng_state(saved, device)


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


# ---- files written in place or replaced: this user's own regular files only -----------------------------------
#
# In a shared or group-writable folder anyone may leave a symbolic link (or a hard link, a FIFO, a file of their
# own) under a name the toolkit writes: following it would let the next run empty or append to a file it was never
# meant to touch (``ln -s ~/thesis.tex runs/x/.lock``). So a file is written in place only when it is opened
# without following links and turns out to be a regular file of this user with no other name; a file replaced
# atomically must be one too. Anything else is refused with one line naming it.

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_LINK_ERRORS = (errno.ELOOP, errno.EMLINK)  # O_NOFOLLOW on a link: ELOOP (Linux, macOS), EMLINK (FreeBSD)


def _foreign(st: os.stat_result, in_place: bool = False, dirs_ok: bool = False) -> str | None:
    """Why a file with status ``st`` is not one the toolkit may write (None: it may)."""
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if not (stat.S_ISREG(st.st_mode) or (dirs_ok and stat.S_ISDIR(st.st_mode))):
        return "not a regular file"
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return f"owned by another user (uid {st.st_uid})"
    if in_place and st.st_nlink > 1:  # appending to it would change its other names too
        return f"a file with {st.st_nlink} hard links"
    return None


def foreign_file(path: str | os.PathLike, why: str) -> ForeignFile:
    """The one-line refusal of a file the toolkit did not create (exit 2)."""
    return ForeignFile(f"{path} is {why}, not a file this toolkit wrote; it writes only this user's own regular "
                       f"files (nothing was written): remove it, or choose another folder")


def check_own(path: str | os.PathLike, dirs_ok: bool = False) -> None:
    """ForeignFile unless ``path`` is absent or this user's regular file (a folder too with ``dirs_ok``); never
    follows a link. Checked before a file is replaced or rotated (a replace itself never writes through a link,
    but a file the run did not create is not its to replace)."""
    try:
        st = os.lstat(path)
    except OSError:
        return  # absent (or unreadable: the write that follows reports it)
    why = _foreign(st, dirs_ok=dirs_ok)
    if why:
        raise foreign_file(path, why)


def open_own(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """``os.open`` of a file written in place (a lock, a log, an append-only record): without following a link
    and without blocking on a FIFO, then checked to be this user's regular file with one name (a file created
    now is). ForeignFile otherwise; other OSErrors go to the caller."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno in _LINK_ERRORS:
            raise foreign_file(path, "a symbolic link") from None
        if exc.errno == errno.ENXIO:  # a FIFO with no reader
            raise foreign_file(path, "not a regular file") from None
        raise
    try:
        why = _foreign(os.fstat(fd), in_place=True)
    except OSError:
        os.close(fd)
        raise
    if why:
        os.close(fd)
        raise foreign_file(path, why)
    return fd


_TEMPORARY = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")  # tempfile.mkstemp(prefix=".<name>.", suffix=".tmp")


def temporaries(folder: str | os.PathLike, names: Sequence[str]) -> list[str]:
    """The paths of the temporary files of atomic writes of ``names`` in ``folder`` (a killed run's, or a running
    one's); ForeignFile for one that is not this user's regular file."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    found = []
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if not match or match.group(1) not in names:
            continue
        try:
            why = _foreign(entry.stat(follow_symlinks=False))
        except FileNotFoundError:
            continue
        if why:
            raise foreign_file(entry.path, why)
        found.append(entry.path)
    return found


def remove_temporaries(folder: str | os.PathLike, names: Sequence[str]) -> list[str]:
    """Delete the temporary files that atomic writes of ``names`` in ``folder`` left behind when their process was
    killed (only by the folder's exclusive holder: nobody else writes there); ForeignFile for one that is not this
    user's regular file. Returns the names removed."""
    removed = []
    for path in temporaries(folder, names):
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed.append(os.path.basename(path))
    return removed


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
        check_own(path)
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
    """Append one JSON record as a line (results are append-only), to this user's own file only (`open_own`)."""
    try:
        with os.fdopen(open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a") as fh:
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
