"""Small shared helpers: device selection, seeding, atomic writes, JSONL appends."""

from __future__ import annotations

import inspect
import json
import logging
import os
import random
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from search_lib.core.errors import RunFailure, UsageError

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
