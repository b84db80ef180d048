"""CIFAR-FS and FC100 (RFS's files): Python-2 pickles, labels numbered by first appearance, transform D with
CIFAR-100 statistics, errors naming the path and the expected files, a training + few-shot test on each,
and a MetaNTK search on MetaCIFAR-FS that reads only the base classes."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from torchvision import transforms as T

import eval_searched_arch
import prune_metantknas
import search_lib.data as D
from search_lib.core.errors import DataError, UsageError
from search_lib.data.synthetic import main as synthetic_main
from search_lib.data.synthetic import python2_pickle, write_synthetic
from search_lib.models.genotypes import GenotypeRecord
from search_lib.models.space import DEFAULT_SPACE

CLASSES = {"train": 6, "val": 5, "test": 5}


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """Synthetic CIFAR-FS and FC100 folders (6 / 5 / 5 classes, 8 images per class, 32 x 32)."""
    root = tmp_path_factory.mktemp("cifar")
    return {name: write_synthetic(root / name, dataset=name, classes=CLASSES, images_per_class=8, seed=seed)
            for seed, name in enumerate(("CIFAR-FS", "FC100"))}


def _write(path, obj):
    path.write_bytes(python2_pickle(obj))


def test_rfs_files_load_with_labels_numbered_by_first_appearance(tmp_path):
    images = np.arange(5 * 32 * 32 * 3, dtype=np.int64).reshape(5, 32, 32, 3).astype(np.uint8)
    for stem in ("train", "val", "test"):
        _write(tmp_path / f"{stem}.pickle", {"data": images, "labels": [57, 3, 57, 90, 3]})
    with pytest.raises(UnicodeDecodeError):  # a Python-2 pickle: readable only with encoding="latin1"
        pickle.loads((tmp_path / "train.pickle").read_bytes())
    split = D.load_split("CIFAR-FS", tmp_path, "train")
    assert split.labels.tolist() == [0, 1, 0, 2, 1]  # 57 -> 0, 3 -> 1, 90 -> 2, as RFS's loader
    assert np.array_equal(split.images, images) and split.dataset == "cifarfs"
    assert D.SupervisedDataset("FC100", tmp_path, "train", transform="D").num_classes == 3
    assert D.load_split("MetaFC100", tmp_path, "test").name == "FC100:test"


def test_base_and_trainval_classes(cifar):
    for name in ("CIFAR-FS", "FC100"):
        assert len(D.load_split(name, cifar[name], "train").class_ids) == 6
        assert len(D.load_split(name, cifar[name], "trainval").class_ids) == 11  # base + validation
        assert len(D.load_split(name, cifar[name], "val").class_ids) == 5
        assert D.resolve_dataset(name).rfs_transform == "D" and D.resolve_dataset(name).default_image_size == 32
    labels = pickle.loads((cifar["CIFAR-FS"] / "train.pickle").read_bytes(), encoding="latin1")["labels"]
    assert sorted(set(labels)) != list(dict.fromkeys(labels))  # the synthetic files exercise the renumbering


def test_missing_and_malformed_files_name_the_path_and_the_expected_names(tmp_path):
    with pytest.raises(UsageError, match="CIFAR-FS needs --data_path"):
        D.load_split("CIFAR-FS", None, "train")
    with pytest.raises(DataError, match=r"train\.pickle.*val\.pickle, test\.pickle"):
        D.load_split("CIFAR-FS", tmp_path, "train")
    _write(tmp_path / "train.pickle", [1, 2])
    with pytest.raises(DataError, match=r"train\.pickle holds a list, expected a dict"):
        D.load_split("FC100", tmp_path, "train")
    _write(tmp_path / "val.pickle", {"data": np.zeros((2, 32, 32, 3), np.uint8)})
    with pytest.raises(DataError, match="no key 'labels'"):
        D.load_split("FC100", tmp_path, "val")
    _write(tmp_path / "test.pickle", {"data": np.zeros((2, 32, 32), np.uint8), "labels": [0, 1]})
    with pytest.raises(DataError, match=r"\(N, H, W, 3\)"):
        D.load_split("FC100", tmp_path, "test")
    (tmp_path / "trainval.pickle").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="trainval.pickle is not a readable pickle"):
        D.load_split("FC100", tmp_path, "trainval")


def test_transform_d_is_rfs_transform_d():
    """RFS's transform D, written out with torchvision: the same tensors from the same seed."""
    normalize = T.Normalize((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
    rfs_train = T.Compose([T.ToPILImage(), T.RandomCrop(32, padding=4),
                           T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4), T.RandomHorizontalFlip(),
                           T.ToTensor(), normalize])
    rfs_test = T.Compose([T.ToPILImage(), T.ToTensor(), normalize])
    images = np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    ours_train = D.build_transform("D", train=True, dataset="CIFAR-FS")
    ours_test = D.build_transform("D", train=False, dataset="FC100")
    for i, img in enumerate(images):
        torch.manual_seed(i)
        want = rfs_train(img)
        torch.manual_seed(i)
        assert torch.equal(ours_train(img), want)
        assert torch.equal(ours_test(img), rfs_test(img))
    assert D.build_transform("D", train=False, dataset="CIFAR-FS")(images[0]).shape == (3, 32, 32)


def test_synthetic_cli_writes_the_rfs_files(tmp_path, capsys):
    assert synthetic_main(["--out", str(tmp_path / "fc"), "--dataset", "FC100", "--train-classes", "3",
                           "--val-classes", "2", "--test-classes", "2", "--images-per-class", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "fc").iterdir()) == sorted(D.expected_files("FC100"))
    obj = pickle.loads((tmp_path / "fc" / "trainval.pickle").read_bytes(), encoding="latin1")
    assert set(obj) == {"data", "labels"} and obj["data"].shape == (10, 32, 32, 3) and obj["data"].dtype == np.uint8


TINY = ["--genotype", "mini-5cell-1", "--init_channels", "4", "--layers", "2", "--epochs", "1", "--batch_size", "16",
        "--n_shots", "1", "--n_queries", "3", "--n_test_runs", "2", "--n_aug_support_samples", "2",
        "--eval_splits", "test,val", "--num_workers", "0", "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("name, trainval", [("CIFAR-FS", False), ("FC100", True)])
def test_training_and_test(name, trainval, cifar, tmp_path, capsys):
    run = tmp_path / name
    argv = [*TINY, "--dataset", name, "--data_path", str(cifar[name]), "--save_dir", str(run)]
    assert eval_searched_arch.main(argv + (["--use_trainval"] if trainval else [])) == 0
    config = json.loads((run / "config.json").read_text())
    results = json.loads((run / "results.json").read_text())
    assert (config["dataset"], config["transform"], config["use_trainval"]) == (D.resolve_dataset(name).key, "D",
                                                                                 trainval)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["net_kwargs"]["num_classes"] == (11 if trainval else 6)
    assert set(results["fewshot"]) == {"test", "val"}
    assert ("not held out" in capsys.readouterr().err) is trainval


def test_metantk_search_on_meta_cifar_fs_reads_only_the_base_classes(cifar, tmp_path):
    base_only = tmp_path / "base_only"
    base_only.mkdir()
    shutil.copy(cifar["CIFAR-FS"] / "train.pickle", base_only)
    run = tmp_path / "search"
    assert prune_metantknas.main(["--dataset", "MetaCIFAR-FS", "--data_path", str(base_only), "--save_dir", str(run),
                                  "--ntk_channels", "4", "--ntk_layers", "2", "--image_size", "8", "--batch_size", "2",
                                  "--n_ways", "2", "--repeat", "1", "--prune_number", "6", "--regions_batches", "1",
                                  "--regions_batch_size", "50", "--device", "cpu", "--rand_seed", "0"]) == 0
    GenotypeRecord.from_json((run / "genotype.json").read_text()).genotype.validate(DEFAULT_SPACE)
    assert json.loads((run / "config.json").read_text())["dataset"] == "MetaCIFAR-FS"
