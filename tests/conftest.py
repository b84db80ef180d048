"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest
import torch

from search_lib.synthetic import write_synthetic

# The tests use tiny networks, for which thread start-up costs more than it saves; on a busy 2-core
# machine OpenMP threads spinning against each other made single steps 50x slower. Subprocesses
# started by tests inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

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
