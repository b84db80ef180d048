"""python -m search_lib.data.prepare on a fake ImageNet training folder (tiny JPEGs of 20 to 110 pixels) with
--splits lists of a few classes: the resize is exact area averaging, miniImageNet and tieredImageNet hold the
listed classes and images in the lists' order at 84 x 84, the search and the training read them, a killed
preparation resumes to the same files, and a missing synset folder, an unreadable JPEG, an image the folder
lacks and a stray file stop with one line."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import eval_searched_arch
import prune_metantknas
from search_lib.data import prepare as P
from search_lib.data.imagenet_images import area_resize
from search_lib.data.synthetic_sources import write_fake_imagenet, write_mini_lists, write_tiered_lists

REPO = Path(__file__).resolve().parents[1]
SYNSETS = [f"n0{i}00000{i}" for i in range(1, 8)]
MINI_PICKS = {"train": {SYNSETS[0]: [3, 1, 4, 6], SYNSETS[1]: [2, 5, 1, 3], SYNSETS[2]: [6, 5, 4, 3]},
              "val": {SYNSETS[3]: [1, 2, 3, 4], SYNSETS[4]: [6, 4, 2, 1]},
              "test": {SYNSETS[5]: [1, 3, 5, 6], SYNSETS[6]: [2, 3, 4, 5]}}
TIERED_ROWS = {"train": [(SYNSETS[0], "n00000001"), (SYNSETS[1], "n00000002"), (SYNSETS[2], "n00000001")],
               "val": [(SYNSETS[3], "n00000003"), (SYNSETS[4], "n00000003")],
               "test": [(SYNSETS[5], "n00000004"), (SYNSETS[6], "n00000005")]}
MINI_FILE = "miniImageNet_category_split_{}.pickle"
MINI_STEMS = {"train": "train_phase_train", "val": "val", "test": "test", "trainval": "trainval_phase_train"}


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """The fake ImageNet, its lists, and miniImageNet and tieredImageNet prepared from them."""
    root = tmp_path_factory.mktemp("prepare_imagenet")
    files = write_fake_imagenet(root / "train", {s: 6 for s in SYNSETS})
    write_mini_lists(root / "mini_lists", MINI_PICKS)
    write_tiered_lists(root / "tiered_lists", TIERED_ROWS)
    for name in ("miniImageNet", "tieredImageNet"):
        assert P.main(_argv(root, name, root / name)) == 0
    return root, files


def _argv(root, dataset, out, *extra):
    lists = root / ("mini_lists" if dataset == "miniImageNet" else "tiered_lists")
    return ["--dataset", dataset, "--source", str(root / "train"), "--splits", str(lists), "--out", str(out),
            "--workers", "2", "--no-progress", *extra]


def _area_oracle(pixels: np.ndarray, size: int) -> np.ndarray:
    """Exact area averaging, computed another way: along each axis in turn, every input pixel repeated ``size``
    times makes the side a multiple of ``size``, and each output pixel sums its block; the total is divided by
    the blocks' size and rounded half up."""
    h, w, c = pixels.shape
    rows = np.repeat(pixels.astype(np.int64), size, axis=0).reshape(size, h, w, c).sum(axis=1)
    sums = np.repeat(rows, size, axis=1).reshape(size, size, w, c).sum(axis=2)
    return ((2 * sums + h * w) // (2 * h * w)).astype(np.uint8)


def _expected(path) -> np.ndarray:
    with Image.open(path) as img:
        return _area_oracle(np.asarray(img.convert("RGB")), 84)


@pytest.mark.parametrize("shape", [(168, 168), (250, 190), (97, 61), (50, 84), (20, 110), (84, 84), (1, 7)])
def test_area_resize_is_exact_area_averaging(shape):
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    assert np.array_equal(area_resize(pixels, 84), _area_oracle(pixels, 84))
    if shape == (168, 168):  # an integer factor: the rounded mean of each 2 x 2 block
        blocks = pixels.reshape(84, 2, 84, 2, 3).astype(int).sum(axis=(1, 3))
        assert np.array_equal(area_resize(pixels, 84), (blocks + 2) // 4)


def test_mini_holds_the_listed_images_in_list_order(imagenet):
    root, files = imagenet
    order = {"train": [0, 1, 2], "val": [3, 4], "test": [5, 6], "trainval": [0, 1, 2, 3, 4]}
    for split, stem in MINI_STEMS.items():
        with open(root / "miniImageNet" / MINI_FILE.format(stem), "rb") as fh:
            obj = pickle.load(fh, encoding="latin1")
        assert obj["data"].dtype == np.uint8 and obj["data"].shape == (4 * len(order[split]), 84, 84, 3)
        synsets = [SYNSETS[i] for i in order[split]]
        assert obj["labels"] == [i for i in order[split] for _ in range(4)]  # ids shared by all files
        assert obj["catname2label"] == {s: i for s, i in zip(synsets, order[split])}
        picks = {s: n for part in MINI_PICKS.values() for s, n in part.items()}
        want = [_expected(files[s][n - 1]) for s in synsets for n in picks[s]]
        assert np.array_equal(obj["data"], np.stack(want))


def test_tiered_holds_every_image_in_number_order(imagenet):
    root, files = imagenet
    for split, rows in {**TIERED_ROWS, "trainval": TIERED_ROWS["train"] + TIERED_ROWS["val"]}.items():
        images = np.load(root / "tieredImageNet" / f"{split}_images.npz")["images"]
        with open(root / "tieredImageNet" / f"{split}_labels.pkl", "rb") as fh:
            labels = pickle.load(fh, encoding="latin1")
        synsets = [s for s, _ in rows]
        assert images.dtype == np.uint8 and np.array_equal(images, np.stack([_expected(f) for s in synsets
                                                                             for f in files[s]]))
        assert labels["labels"] == [i for i in range(len(rows)) for _ in range(6)]
        assert np.array_equal(labels["label_specific"], labels["labels"])
        assert labels["label_specific_str"] == synsets
        assert labels["label_general_str"] == list(dict.fromkeys(c for _, c in rows))
        assert labels["label_general"].tolist() == [labels["label_general_str"].index(c) for _, c in rows
                                                    for _ in range(6)]


def test_the_check_passes_both(imagenet, capsys):
    root, _ = imagenet
    for name in ("miniImageNet", "tieredImageNet"):
        capsys.readouterr()
        assert P.main(["--check", str(root / name), "--dataset", name, "--no-progress"]) == 0
        assert capsys.readouterr().out.startswith(f"{name} in {root / name}: ok")


def test_the_search_and_the_training_read_them(imagenet, tmp_path):
    """A search (linear regions only: the MetaNTK search runs on the prepared CIFAR-FS in test_prepare_cifar) on
    miniImageNet, a training and few-shot test (at 32 x 32) on tieredImageNet."""
    root, _ = imagenet
    assert prune_metantknas.main(
        ["--dataset", "MetaMiniImageNet", "--data_path", str(root / "miniImageNet"), "--save_dir",
         str(tmp_path / "search"), "--only_lrs", "--ntk_channels", "4", "--ntk_layers", "2", "--image_size", "8",
         "--batch_size", "2", "--n_ways", "2", "--repeat", "1", "--prune_number", "6", "--regions_batches", "1",
         "--regions_batch_size", "50", "--device", "cpu", "--rand_seed", "0"]) == 0
    assert eval_searched_arch.main(
        ["--genotype", "mini-5cell-1", "--init_channels", "4", "--layers", "2", "--epochs", "1", "--batch_size", "16",
         "--n_ways", "2", "--n_shots", "1", "--n_queries", "3", "--n_test_runs", "2", "--n_aug_support_samples", "1",
         "--eval_splits", "test,val", "--num_workers", "0", "--device", "cpu", "--no-progress", "--image_size", "32",
         "--dataset", "TieredImageNet", "--data_path", str(root / "tieredImageNet"), "--save_dir",
         str(tmp_path / "train")]) == 0


# A run killed by SIGKILL half-way through writing the 6th class into a file (the first class of val: train is
# complete by then, val / test / trainval are not); the same command then finishes the job.
_KILLED = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from search_lib.data import prepare, streamed_files
    add, calls = streamed_files.StreamedFile.add, [0]
    def dying_add(self, images):
        calls[0] += 1
        if calls[0] == 6:
            self._fh.write(np.ascontiguousarray(images).tobytes()[: images.nbytes // 2])
            self._fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        add(self, images)
    streamed_files.StreamedFile.add = dying_add
    sys.exit(prepare.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("dataset", ["miniImageNet", "tieredImageNet"])
def test_a_killed_preparation_resumes_to_the_same_files(imagenet, tmp_path, dataset):
    root, _ = imagenet
    out = tmp_path / dataset
    argv = _argv(root, dataset, out)
    killed = subprocess.run([sys.executable, "-c", _KILLED, *argv], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == -9, killed.stderr
    reference = {p.name: p.read_bytes() for p in (root / dataset).iterdir() if not p.name.startswith(".")}
    written = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert any(p.name.endswith(".partial") for p in out.iterdir())
    assert written < set(reference) and written  # the finished files only, complete
    for name in written - {"prepare.json"}:
        assert (out / name).read_bytes() == reference[name], name
    assert P.main(argv) == 0
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == set(reference)
    assert not [p for p in out.iterdir() if ".partial" in p.name]
    for name, data in reference.items():
        assert (out / name).read_bytes() == data, name


def _error(capsys, argv):
    capsys.readouterr()
    assert P.main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_source_problems_stop_with_one_line(imagenet, tmp_path, capsys):
    root, files = imagenet
    source = tmp_path / "train"
    shutil.copytree(root / "train", source)
    lists = write_tiered_lists(tmp_path / "lists", {**TIERED_ROWS, "test": [("n09999990", "x"), ("n09999991", "x")]})
    base = ["--dataset", "tieredImageNet", "--source", str(source), "--out", str(tmp_path / "out"), "--no-progress"]
    line = _error(capsys, [*base, "--splits", str(lists)])
    assert "2 of the 7 synset folders the split lists name are missing" in line and "n09999990, n09999991" in line
    bad = source / SYNSETS[6] / files[SYNSETS[6]][2].name
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")
    line = _error(capsys, [*base, "--splits", str(root / "tiered_lists")])
    assert f"cannot read image {bad}" in line and "replace it" in line
    assert not (tmp_path / "out" / "test_images.npz").exists()
    mini = write_mini_lists(tmp_path / "mini", {**MINI_PICKS, "test": {SYNSETS[5]: [1, 7]}})
    line = _error(capsys, ["--dataset", "miniImageNet", "--source", str(source), "--splits", str(mini), "--out",
                           str(tmp_path / "mini_out")])
    assert f"asks for image 7 of {SYNSETS[5]}" in line and "holds 6 images" in line
    (source / SYNSETS[0] / "notes.txt").write_text("x")
    line = _error(capsys, [*base, "--splits", str(root / "tiered_lists")])
    assert "unexpected file" in line and "notes.txt" in line
