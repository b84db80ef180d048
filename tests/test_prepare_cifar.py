"""python -m search_lib.data.prepare on CIFAR-100 (a fake in torchvision's layout: random pixels, 3 + 1 images per
class, the real names): the published lists, CIFAR-FS and FC100 holding the published classes with every image
equal to its source, plain-pickle files, a training, a few-shot test and a search on the result, the archive and
--download sources, and the one-line refusals."""

from __future__ import annotations

import json
import pickle
import urllib.error

import numpy as np
import pytest

import eval_searched_arch
import prune_metantknas
from search_lib.data import prepare as P
from search_lib.data.split_lists import PUBLISHED, SPLIT_NAMES, cifar100_superclasses, read_split_lists
from search_lib.data.synthetic_sources import cifar100_names, write_fake_cifar100

FILES = ("train", "val", "test", "trainval")
CIFAR_FS_TEST = {"whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe", "leopard", "plain",
                 "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman", "bicycle", "pickup_truck", "rocket"}
CIFAR_FS_VAL = {"beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly", "sea", "camel",
                "cattle", "crab", "crocodile", "maple_tree", "motorcycle", "tractor"}
FC100 = {"test": {"aquatic_mammals", "insects", "medium_mammals", "people"},
         "val": {"large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals"}}


def cifar_source_image(folder, name: str, k: int) -> np.ndarray:
    """The k-th image of class ``name`` in the fake CIFAR-100 folder: its training images in file order, then its
    test images, as 32 x 32 x 3 (read here independently of search_lib.data.cifar_source)."""
    fine = cifar100_names()[0]
    images = []
    for part in ("train", "test"):
        obj = pickle.loads((folder / part).read_bytes(), encoding="latin1")
        images += [obj["data"][i].reshape(3, 32, 32).transpose(1, 2, 0)
                   for i, v in enumerate(obj["fine_labels"]) if v == fine.index(name)]
    return images[k]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A fake CIFAR-100 and the CIFAR-FS and FC100 prepared from it."""
    root = tmp_path_factory.mktemp("prepare_cifar")
    source = write_fake_cifar100(root / "src")
    out = {}
    for name in ("CIFAR-FS", "FC100"):
        assert P.main(["--dataset", name, "--source", str(source), "--out", str(root / name), "--no-progress"]) == 0
        out[name] = root / name
    return source, out


def _load(path):
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="latin1")  # a plain pickle.load, as RFS's loader reads its files


def test_the_published_lists_have_the_published_sizes():
    for key, bench in PUBLISHED.items():
        lists = read_split_lists(key)
        assert lists.published and {s: len(lists.splits[s].names) for s in SPLIT_NAMES} == bench.classes, key
        if bench.categories:
            assert {s: len(set(lists.splits[s].category.values())) for s in SPLIT_NAMES} == bench.categories, key
    mini = read_split_lists("miniImageNet")
    assert {len(v) for s in SPLIT_NAMES for v in mini.splits[s].images.values()} == {600}
    cifar = read_split_lists("CIFAR-FS")
    assert set(cifar.splits["test"].names) == CIFAR_FS_TEST and set(cifar.splits["val"].names) == CIFAR_FS_VAL
    fc100 = read_split_lists("FC100")
    for split, superclasses in FC100.items():
        assert set(fc100.splits[split].category.values()) == superclasses
    table = cifar100_superclasses()
    assert len(table) == 20 and {len(v) for v in table.values()} == {5}


@pytest.mark.parametrize("name", ["CIFAR-FS", "FC100"])
def test_each_split_holds_the_published_classes_and_every_image_its_source(prepared, name):
    source, out = prepared
    lists = read_split_lists(name)
    fine = cifar100_names()[0]
    for stem in FILES:
        obj = _load(out[name] / f"{stem}.pickle")
        assert set(obj) == {"data", "labels"} and obj["data"].dtype == np.uint8 and obj["data"].shape[1:] == (32, 32, 3)
        want = (list(lists.splits["train"].names) + list(lists.splits["val"].names) if stem == "trainval"
                else list(lists.splits[stem].names))
        labels = np.asarray(obj["labels"])
        assert [fine[i] for i in dict.fromkeys(labels.tolist())] == want  # the list's order, CIFAR-100 ids
        for cid in np.unique(labels):
            images = obj["data"][labels == cid]
            assert len(images) == 4  # 3 training + 1 test image of the fake
            for k, img in enumerate(images):
                assert np.array_equal(img, cifar_source_image(source, fine[cid], k))
    with pytest.raises(UnicodeDecodeError):  # written as Python 2 did: readable with encoding="latin1"
        pickle.loads((out[name] / "val.pickle").read_bytes())
    record = json.loads((out[name] / "prepare.json").read_text())
    assert record["status"] == "done" and record["published_lists"] and set(record["md5"]) == {
        f"{s}.pickle" for s in FILES}


def test_training_test_and_search_on_the_prepared_cifar_fs(prepared, tmp_path):
    data = str(prepared[1]["CIFAR-FS"])
    assert eval_searched_arch.main(
        ["--genotype", "mini-5cell-1", "--init_channels", "4", "--layers", "2", "--epochs", "1", "--batch_size", "32",
         "--n_ways", "3", "--n_shots", "1", "--n_queries", "3", "--n_test_runs", "2", "--n_aug_support_samples", "1",
         "--eval_splits", "test", "--num_workers", "0", "--device", "cpu", "--no-progress", "--dataset", "CIFAR-FS",
         "--data_path", data, "--save_dir", str(tmp_path / "train")]) == 0
    results = json.loads((tmp_path / "train" / "results.json").read_text())
    assert set(results["fewshot"]) == {"test"}
    assert prune_metantknas.main(
        ["--dataset", "MetaCIFAR-FS", "--data_path", data, "--save_dir", str(tmp_path / "search"), "--ntk_channels",
         "4", "--ntk_layers", "2", "--image_size", "8", "--batch_size", "2", "--n_ways", "2", "--n_shots", "1",
         "--n_queries", "1", "--repeat", "1", "--prune_number", "6", "--regions_batches", "1",
         "--regions_batch_size", "50", "--device", "cpu", "--rand_seed", "0"]) == 0
    assert (tmp_path / "search" / "genotype.json").is_file()


def test_archive_and_download_give_the_same_files(prepared, tmp_path, monkeypatch, capsys):
    _, out = prepared
    archive = write_fake_cifar100(tmp_path / "tgz", archive=True)
    argv = ["--dataset", "CIFAR-FS", "--source", str(archive), "--out", str(tmp_path / "a"), "--no-progress"]
    assert P.main(argv) == 0
    for stem in FILES:
        assert (tmp_path / "a" / f"{stem}.pickle").read_bytes() == (out["CIFAR-FS"] / f"{stem}.pickle").read_bytes()

    import torchvision.datasets

    class FakeDownload(torchvision.datasets.CIFAR100):  # CIFAR100(root, download=True): the folder under root
        def __init__(self, root, train=True, download=False):
            assert download
            write_fake_cifar100(P.Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeDownload)
    argv = ["--dataset", "FC100", "--source", str(tmp_path / "dl"), "--download", "--out", str(tmp_path / "b"),
            "--no-progress"]
    assert P.main(argv) == 0
    assert (tmp_path / "b" / "test.pickle").read_bytes() == (out["FC100"] / "test.pickle").read_bytes()

    class NoNetwork(torchvision.datasets.CIFAR100):
        def __init__(self, root, train=True, download=False):
            raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", NoNetwork)
    capsys.readouterr()
    assert P.main([*argv[:3], str(tmp_path / "none"), *argv[4:5], "--out", str(tmp_path / "c")]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot download CIFAR-100" in err[0] and "by hand" in err[0]


def _error(capsys, argv, code):
    capsys.readouterr()
    assert P.main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_not_cifar100_and_a_folder_of_another_dataset_are_refused(prepared, tmp_path, capsys):
    source, out = prepared
    base = ["--dataset", "CIFAR-FS", "--no-progress"]
    line = _error(capsys, [*base, "--source", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")], 3)
    assert "CIFAR-100 not found" in line and "--download" in line
    other = write_fake_cifar100(tmp_path / "other")
    meta = pickle.loads((other / "meta").read_bytes(), encoding="latin1")
    meta["fine_label_names"][0] = "not_a_cifar_class"
    (other / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    line = _error(capsys, [*base, "--source", str(other), "--out", str(tmp_path / "o")], 3)
    assert "does not name CIFAR-100's 100 classes" in line and "not_a_cifar_class" in line

    # the FC100 folder is refused for CIFAR-FS (exit 2), and replaced with --overwrite
    fc100 = tmp_path / "fc100"
    fc100.mkdir()
    for path in out["FC100"].iterdir():
        (fc100 / path.name).write_bytes(path.read_bytes())
    before = (fc100 / "val.pickle").read_bytes()
    line = _error(capsys, [*base, "--source", str(source), "--out", str(fc100)], 2)
    assert "holds FC100" in line and "--overwrite" in line and (fc100 / "val.pickle").read_bytes() == before
    (fc100 / "prepare.json").unlink()
    line = _error(capsys, [*base, "--source", str(source), "--out", str(fc100)], 2)
    assert "not written by this command" in line
    (fc100 / "notes.txt").write_text("mine")
    assert P.main([*base, "--source", str(source), "--out", str(fc100), "--overwrite"]) == 0
    assert (fc100 / "val.pickle").read_bytes() == (out["CIFAR-FS"] / "val.pickle").read_bytes()
    assert (fc100 / "notes.txt").read_text() == "mine"
    capsys.readouterr()
    assert P.main([*base, "--source", str(source), "--out", str(fc100)]) == 0  # done already: nothing to do
    assert "prepared already" in capsys.readouterr().out
