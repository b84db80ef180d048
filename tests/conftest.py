"""Shared pytest fixtures."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from search_lib.data.synthetic import write_synthetic

# The tests use tiny networks, for which thread start-up costs more than it saves; on a busy 2-core
# machine OpenMP threads spinning against each other made single steps 50x slower. Subprocesses
# started by tests inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
# The runs the tests start take turns at the cores among themselves only (search_lib.core.turns), not with the
# user's own runs on this machine: a folder of the test session's own, which subprocesses inherit too.
os.environ["METANTKNAS_TURNS_DIR"] = tempfile.mkdtemp(prefix="metantknas-test-turns-")

# ---- synthetic data in the RFS file formats (session-wide; treat the folders as read-only) ----------------

SYNTH_CLASSES = {"train": 6, "val": 5, "test": 5}
SYNTH_IMAGES_PER_CLASS = 12
SYNTH_IMAGE_SIZE = 20


@pytest.fixture(scope="session")
def synthetic_mini(tmp_path_factory):
    """Folder of a small synthetic miniImageNet (6/5/5 classes, 12 images per class per file, 20x20)."""
    return write_synthetic(tmp_path_factory.mktemp("synthetic_mini"), dataset="mini", classes=SYNTH_CLASSES,
                           images_per_class=SYNTH_IMAGES_PER_CLASS, image_size=SYNTH_IMAGE_SIZE, seed=0)


@pytest.fixture(scope="session")
def synthetic_tiered(tmp_path_factory):
    """Folder of a small synthetic tieredImageNet (same sizes as ``synthetic_mini``)."""
    return write_synthetic(tmp_path_factory.mktemp("synthetic_tiered"), dataset="tiered", classes=SYNTH_CLASSES,
                           images_per_class=SYNTH_IMAGES_PER_CLASS, image_size=SYNTH_IMAGE_SIZE, seed=1)


# ---- a search of few candidates (tests/test_objectives.py, tests/test_proxy_study.py) ---------------------------

TWO_OPS = ("skip_connect", "sep_conv_3x3")


def two_op_search(mp: pytest.MonkeyPatch) -> None:
    """Start every darts_fewshot search with two ops on the first edge of each cell and one on the others: one op
    round of four candidates, then the edge round (a zero-cost objective's search in seconds)."""
    import numpy as np

    from search_lib.models.ops import space_ops
    from search_lib.search.pruning import PruningSearch

    ops = space_ops("darts_fewshot")

    def initial_alive(self):
        alive = np.zeros((2, len(self.keys), len(self.ops)), dtype=bool)
        alive[:, :, ops.index(TWO_OPS[0])] = True
        alive[:, 0, [ops.index(o) for o in TWO_OPS]] = True  # a choice on the first edge of each cell only
        return alive

    mp.setattr(PruningSearch, "initial_alive", initial_alive)


# ---- the original repository's scripts (tests/test_original_flags.py, tests/test_original_runs.py) ----------

_ORIGINAL = ("--gpu 0 --space darts_fewshot --max_nodes 3 --dataset {ds} --dartsbs 3 --seed -1 --only_lrs false "
             "--ntk_type MetaNTK_anl --algorithm {alg} --inner_lr_time {tau} --reg_coef {lam} --ntk_channels 48 "
             "--ntk_layers {cells} --train_after_search true")
# The argument lists of its scripts/script_*.sh for prune_launch.py, as they were.
ORIGINAL_SCRIPT_ARGS = {
    "script_mini_5cell.sh": _ORIGINAL.format(ds="MetaMiniImageNet", alg="MAML", tau="1000", lam="1e-3", cells=5),
    "script_mini_8cell.sh": _ORIGINAL.format(ds="MetaMiniImageNet", alg="ANIL", tau="1", lam="1e-5", cells=8),
    "script_tiered_5cell.sh": _ORIGINAL.format(ds="MetaTieredImageNet", alg="MAML", tau="1000", lam="1e-3", cells=5),
    "script_tiered_8cell.sh": _ORIGINAL.format(ds="MetaTieredImageNet", alg="ANIL", tau="1000", lam="1e-3", cells=8),
}
ORIGINAL_SCRIPT_ARGS = {name: args.split() for name, args in ORIGINAL_SCRIPT_ARGS.items()}
REPO = Path(__file__).resolve().parents[1]


def script_argv(name: str, folder: Path, *extra: str) -> tuple[list[str], str]:
    """What scripts/<name> runs when started from ``folder``: (its arguments after prune_launch.py, its working
    folder), recorded by a stand-in python (only bash runs)."""
    record = folder / f"{name}.argv"
    stub = folder / "python"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$PWD" "$@" > "{record}"\n')
    stub.chmod(0o755)
    subprocess.run(["bash", str(REPO / "scripts" / name), *extra], cwd=folder, check=True,
                   env={**os.environ, "PYTHON": str(stub)})
    cwd, script, *args = record.read_text().splitlines()
    assert script == "prune_launch.py"
    return args, cwd
