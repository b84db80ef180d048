"""python -m search_lib.data.prepare --check: the screen of a good folder, and exit 3 with one line on a truncated
pickle (the very line the search and the training print), a class in two splits, a wrong image shape, a missing
file, a file changed since it was prepared, a folder that is not the published benchmark, an unfinished one."""

from __future__ import annotations

import json
import pickle
import re
import shutil

import numpy as np
import pytest

import eval_searched_arch
import prune_metantknas
from search_lib.data import prepare as P
from search_lib.data.streamed_files import python2_pickle
from search_lib.data.synthetic_sources import write_fake_cifar100


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    source = write_fake_cifar100(root / "src", train_per_class=2, test_per_class=1, seed=1)
    assert P.main(["--dataset", "CIFAR-FS", "--source", str(source), "--out", str(root / "CIFAR-FS"),
                   "--no-progress"]) == 0
    return root / "CIFAR-FS"


def _check(capsys, folder, dataset="CIFAR-FS"):
    capsys.readouterr()
    code = P.main(["--check", str(folder), "--dataset", dataset, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def test_a_good_folder_passes_with_one_screen(good, capsys):
    code, out, err = _check(capsys, good)
    assert code == 0 and err == []
    lines = out.splitlines()
    assert lines[0] == f"CIFAR-FS in {good}: ok" and "published split lists: 64 / 16 / 20 classes" in lines[1]
    md5 = json.loads((good / "prepare.json").read_text())["md5"]
    rows = {line.split()[0]: line.split() for line in lines[3:7]}
    assert [rows[s][1] for s in ("train", "val", "test", "trainval")] == ["64", "16", "20", "80"]
    assert all(rows[s][-2] == md5[f"{s}.pickle"] and rows[s][4] == "32x32x3" for s in rows)
    assert lines[-1] == ("no class in two splits; trainval = train + val; classes and images per class as expected; "
                         "MD5s as recorded")


def _rewrite(path, **changes):
    obj = pickle.loads(path.read_bytes(), encoding="latin1")
    obj.update({k: v(obj) for k, v in changes.items()})
    path.write_bytes(python2_pickle(obj))


def _truncate(folder):
    raw = (folder / "train.pickle").read_bytes()
    (folder / "train.pickle").write_bytes(raw[:len(raw) // 2])


def _second_split(folder):
    train_id = pickle.loads((folder / "train.pickle").read_bytes(), encoding="latin1")["labels"][0]
    _rewrite(folder / "val.pickle", labels=lambda o: [train_id if v == o["labels"][0] else v for v in o["labels"]])


def _flip_byte(folder):
    raw = bytearray((folder / "test.pickle").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a pixel: the file still reads
    (folder / "test.pickle").write_bytes(bytes(raw))


def _unfinished(folder):
    record = json.loads((folder / "prepare.json").read_text())
    (folder / "prepare.json").write_text(json.dumps({**record, "status": "in progress"}))


BREAKAGES = {
    "truncated pickle": (_truncate, r"train\.pickle is not a readable pickle \(.*\); the file is damaged"),
    "class in two splits": (_second_split, r"class \d+ is in both train \(train\.pickle\) and val \(val\.pickle\)"),
    "wrong image shape": (lambda f: _rewrite(f / "test.pickle", data=lambda o: o["data"][:, :28, :28]),
                          r"images in .*test\.pickle are 28 x 28, its prepare\.json .* has 32 x 32"),
    "missing file": (lambda f: (f / "val.pickle").unlink(), r"CIFAR-FS file not found: .*val\.pickle; --data_path"),
    "changed file": (_flip_byte, r"test\.pickle changed since it was prepared \(MD5 [0-9a-f]{32}, recorded"),
    "not the published benchmark": (lambda f: (f / "prepare.json").unlink(),
                                    r"class \d+ of train \(train\.pickle\) holds 3 images, the published CIFAR-FS "
                                    r"\(64 / 16 / 20 classes x 600 images\) has 600"),
    "unfinished preparation": (_unfinished, "did not finish; re-run the prepare command"),
    "another dataset": (lambda f: None, r"holds CIFAR-FS \(prepare\.json\), not FC100"),
    "unreadable record": (lambda f: (f / "prepare.json").write_text('{"dataset": "CIFAR-FS"}'),
                          r"prepare\.json is unreadable \(its classes are not .*\); re-create the folder"),
}


@pytest.mark.parametrize("what", list(BREAKAGES))
def test_a_broken_folder_stops_with_exit_3_and_one_line(good, tmp_path, capsys, what):
    folder = tmp_path / "broken"
    shutil.copytree(good, folder)
    breakage, pattern = BREAKAGES[what]
    breakage(folder)
    code, out, err = _check(capsys, folder, "FC100" if what == "another dataset" else "CIFAR-FS")
    assert code == 3 and out == "" and len(err) == 1, (code, out, err)
    assert err[0].startswith("error: ")
    assert re.search(pattern, err[0]), err[0]


def test_the_search_and_the_training_say_the_check_line(good, tmp_path, capsys):
    folder = tmp_path / "truncated"
    shutil.copytree(good, folder)
    _truncate(folder)
    line = _check(capsys, folder)[2][0]
    search = ["--dataset", "MetaCIFAR-FS", "--data_path", str(folder), "--save_dir", str(tmp_path / "s"), "--device",
              "cpu", "--rand_seed", "0"]
    train = ["--genotype", "mini-5cell-1", "--dataset", "CIFAR-FS", "--data_path", str(folder), "--save_dir",
             str(tmp_path / "t"), "--device", "cpu", "--num_workers", "0", "--no-progress"]
    for entry, argv in ((prune_metantknas.main, search), (eval_searched_arch.main, train)):
        capsys.readouterr()
        assert entry(argv) == 3
        assert line in capsys.readouterr().err.splitlines()


def test_the_check_reads_what_the_loaders_read(good):
    """The prepared files through the loaders: labels renumbered by first appearance, the published order."""
    from search_lib.data import load_split
    from search_lib.data.split_lists import read_split_lists

    split = load_split("CIFAR-FS", good, "val")
    assert split.images.shape == (48, 32, 32, 3) and np.array_equal(np.unique(split.labels), np.arange(16))
    assert len(read_split_lists("CIFAR-FS").splits["val"].names) == 16
