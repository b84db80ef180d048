"""Training checkpoints: the self-describing ``checkpoint.pt`` of a run, reading it safely, and the run folder.

A checkpoint holds everything a run needs to continue: the genotype and network settings, the model,
optimizer and scheduler states, every RNG state, the config and the last metrics. It is written with plain
tensors and values only, so it is read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from search_lib.core.errors import DataError, one_line
from search_lib.core.run_dir import RunDir, SavedState
from search_lib.core.utils import atomic_torch_save

logger = logging.getLogger("metantknas.eval")

CHECKPOINT_FORMAT = "metantknas-eval-checkpoint"
CHECKPOINT_VERSION = 1
TRAIN_LOG = "train.log"
TRAIN_OUTPUTS = ("metrics.jsonl", "results.json", "training.png", "tensorboard")  # --tensorboard's event folder


def training_run_dir(path: str | os.PathLike) -> RunDir:
    """The run folder of a training: checkpoint.pt (+ checkpoint_prev.pt), metrics.jsonl, results.json, train.log."""
    return RunDir(path, SavedState("checkpoint.pt", "checkpoint_prev.pt", "checkpoint", bad="unusable",
                                   restart="training starts again from epoch 1"),
                  outputs=TRAIN_OUTPUTS, log_name=TRAIN_LOG, logger=logger)


def pack_rng(state: dict) -> dict:
    """rng_state() in a form that torch.load(weights_only=True) accepts (no numpy arrays)."""
    packed = dict(state)
    kind, keys, pos, has_gauss, cached = state["numpy"]
    packed["numpy"] = (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                       float(cached))
    return packed


def unpack_rng(packed: dict) -> dict:
    state = dict(packed)
    kind, keys, pos, has_gauss, cached = packed["numpy"]
    state["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    return state


_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile, OSError,
                KeyError, TypeError, AttributeError)


def read_checkpoint(path: str | os.PathLike, trusted: bool = False) -> dict:
    """Load one checkpoint file; DataError (one line) when it is missing, truncated or not a checkpoint.

    Files are read with ``weights_only=True`` (tensors and plain values only; this toolkit's checkpoints
    are written that way); ``trusted=True`` allows arbitrary pickled objects (e.g. checkpoints of the
    original code), which can run code: use it only for files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist; pass the checkpoint.pt of a training run")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as exc:
        if not trusted and "unsupported global" in str(exc).lower():
            raise DataError(f"checkpoint {path} holds pickled Python objects besides tensors (not written by "
                            f"this toolkit); if you trust the file, add --trust_checkpoint") from None
        raise DataError(f"checkpoint {path} is unreadable (truncated or not a torch checkpoint: "
                        f"{one_line(exc, 100)}); use checkpoint_prev.pt of the same run or re-train") from None
    except _LOAD_ERRORS as exc:
        raise DataError(f"checkpoint {path} is unreadable (truncated or not a torch checkpoint: "
                        f"{one_line(exc, 100)}); use checkpoint_prev.pt of the same run or re-train") from None
    if not isinstance(obj, dict):
        raise DataError(f"checkpoint {path} holds a {type(obj).__name__}, not a checkpoint dictionary; "
                        f"pass a checkpoint.pt written by eval_searched_arch.py")
    return obj


def _is_run_checkpoint(ckpt: dict) -> bool:
    return ckpt.get("format") == CHECKPOINT_FORMAT and all(
        k in ckpt for k in ("epoch", "model", "optimizer", "scheduler", "rng", "config", "genotype", "net_kwargs"))


def load_latest_checkpoint(save_dir: str | os.PathLike) -> dict | None:
    """The newest usable checkpoint of a run folder, falling back to checkpoint_prev.pt; None when there is none.

    An unreadable checkpoint is moved aside (``*.corrupt``) with a warning naming it, so it is never
    rotated into checkpoint_prev.pt.
    """
    return training_run_dir(save_dir).load_state(_read_run_checkpoint)


def _read_run_checkpoint(path: Path) -> dict:
    ckpt = read_checkpoint(path)
    if not _is_run_checkpoint(ckpt):
        raise DataError(f"{path} is not a checkpoint of this training script")
    return ckpt


def save_checkpoint(save_dir: str | os.PathLike, payload: dict) -> None:
    """Write checkpoint.pt atomically, first moving the current one to checkpoint_prev.pt."""
    training_run_dir(save_dir).save_state(lambda path: atomic_torch_save(path, payload))


def state_dict_of(ckpt: dict) -> dict:
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    raise DataError("the checkpoint holds no model weights (no 'model' entry); pass a checkpoint.pt of a "
                    "training run")


def read_json(path: Path) -> dict | None:
    """A JSON object from a file, None when it is missing or unreadable."""
    try:
        with open(path) as fh:
            obj = json.load(fh)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None
