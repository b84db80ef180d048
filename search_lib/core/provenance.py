"""provenance.json: what produced a run folder's numbers, recorded once beside config.json.

config.json holds the flags; this record holds the rest of what decides the numbers: the command line as
typed, the versions of Python and of the libraries that compute (torch, torchvision, opacus, numpy, scipy,
scikit-learn), the toolkit's git commit and whether its checkout had changes (null when it does not run from
a checkout or git is missing), the device (CPU model; GPU name, CUDA and cuDNN versions on CUDA), the thread
counts and OpenMP's spinning, the deterministic settings and the seeds the run used. `RunDir` writes it when
the run starts and never rewrites it; a resume compares its own ``environment`` with the recorded one and
says in one line what changed (another torch, another device), then goes on.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import torch

from search_lib.core import determinism, openmp_env

PROVENANCE_FILE = "provenance.json"
PROVENANCE_FORMAT = 1
PACKAGES = ("torch", "torchvision", "opacus", "numpy", "scipy", "scikit-learn")
_CHECKOUT = Path(__file__).resolve().parents[2]  # the repository root when run from a checkout
_GIT_TIMEOUT_S = 10

_entry_argv: list[str] | None = None  # the argv an in-process entry point received (`set_command_line`)


def set_command_line(argv: Sequence[str] | None) -> None:
    """Record the arguments an entry point's ``main(argv)`` received (None: ``sys.argv``), for the runs it starts
    in this process (a launcher or a study calling the search and the training)."""
    global _entry_argv
    _entry_argv = None if argv is None else [sys.argv[0], *map(str, argv)]


def command_line() -> list[str]:
    return list(_entry_argv) if _entry_argv is not None else list(sys.argv)


def versions() -> dict[str, str | None]:
    """Python's version and each package's installed version (None when it is not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _git(*args: str) -> str | None:
    """git's output in the checkout, None when there is no checkout, no git or it fails (never an error)."""
    if not (_CHECKOUT / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(_CHECKOUT), *args], capture_output=True, text=True,
                              timeout=_GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def toolkit() -> dict:
    """The checkout's commit and whether its tracked files differ from it (null and null when not a checkout)."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"path": str(_CHECKOUT), "commit": commit.strip() if commit else None,
            "dirty": None if status is None else bool(status.strip())}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what the platform module says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_record(device: torch.device) -> dict:
    """The device the run computes on; on CUDA the GPU's name and the CUDA and cuDNN versions."""
    record = {"type": device.type, "cpu": cpu_model(), "platform": platform.platform()}
    if device.type == "cuda":
        record |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                   "cudnn": torch.backends.cudnn.version()}
    return record


def build_record(device: torch.device, threads: dict, seeds: dict, deterministic: bool) -> dict:
    """The record (see the module's text); ``threads``: the run's thread mode and counts; ``seeds``: the seeds
    the run used, by name."""
    return {"format": PROVENANCE_FORMAT, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": command_line(),
            "environment": {"versions": versions(), "device": device_record(device)},
            "toolkit": toolkit(),
            "threads": {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads(),
                        **threads, **openmp_env.spinning()},
            "deterministic": {"enabled": bool(deterministic), **determinism.settings()},
            "seeds": dict(seeds)}


def environment_changes(old: dict, new: dict) -> list[str]:
    """What of the environment differs between a recorded provenance and this run's, e.g.
    ``torch 2.3.0 -> 2.4.1``; the CPU's platform string and the started time are not compared."""
    changes = []
    old_env, new_env = old.get("environment") or {}, new.get("environment") or {}
    for part in ("versions", "device"):
        before, now = old_env.get(part) or {}, new_env.get(part) or {}
        for key in sorted((set(before) | set(now)) - {"platform"}):
            if before.get(key) != now.get(key):
                changes.append(f"{key} {before.get(key)} -> {now.get(key)}")
    return changes
