"""Tests of search_lib.data (loaders, transforms, episodes, samplers) and search_lib.data.synthetic."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch

from search_lib import data as D
from search_lib.core.errors import DataError, UsageError
from search_lib.data.synthetic import main as synthetic_main
from search_lib.data.synthetic import write_synthetic

MINI_PARTS = ["train", "train_phase_train", "train_phase_val", "train_phase_test", "val", "test", "trainval",
              "trainval_phase_val", "trainval_phase_test"]
TIERED_PARTS = ["train", "train_phase_val", "val", "test", "trainval"]
S = 20  # conftest's synthetic_mini / synthetic_tiered: 20x20 images, 6/5/5 classes, 12 images per class
SYNTH_IMAGES_PER_CLASS = 12


def _small(tmp_path, dataset="mini", **kw):
    args = dict(classes={"train": 3, "val": 2, "test": 2}, images_per_class=4, image_size=8, seed=3)
    args.update(kw)
    return write_synthetic(tmp_path / dataset, dataset=dataset, **args)


def _mini_file(folder, stem):
    return folder / f"miniImageNet_category_split_{stem}.pickle"


def _identify(split, transform):
    """Map each deterministic (test-transformed) image tensor to its index."""
    table = {}
    for i in range(len(split)):
        table.setdefault(transform(split.images[i]).numpy().tobytes(), i)
    assert len(table) == len(split)  # synthetic images are all distinct
    return lambda t: table[t.numpy().tobytes()]


# ---------------------------------------------------------------------------------------------------- names


def test_dataset_names():
    assert [D.canonical_dataset(n) for n in D.DATASET_NAMES] == ["mini", "mini", "tiered", "tiered", "digits",
                                                                  "digits", "cifarfs", "cifarfs", "fc100", "fc100"]
    assert D.canonical_dataset("metaminiimagenet") == "mini"
    assert [D.is_episodic_name(n) for n in D.DATASET_NAMES] == [False, True] * 5
    assert D.DEFAULT_IMAGE_SIZE == {"mini": 84, "tiered": 84, "digits": 32, "cifarfs": 32, "fc100": 32}
    with pytest.raises(UsageError, match="MiniImageNet"):
        D.canonical_dataset("CIFAR100")
    with pytest.raises(UsageError, match="partition"):
        D.load_split("Digits", None, "bogus")
    with pytest.raises(UsageError, match="TENAS"):
        D.build_transform("E", train=True)
    with pytest.raises(UsageError):
        D.SupervisedDataset("ImageNet1k", None)


# ---------------------------------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("partition", MINI_PARTS)
def test_mini_partitions(synthetic_mini, partition):
    split = D.load_split("MiniImageNet", synthetic_mini, partition)
    assert split.images.dtype == np.uint8 and split.images.shape[1:] == (S, S, 3)
    assert split.labels.dtype == np.int64 and split.labels.shape == (split.images.shape[0],)
    n_classes = {"val": 5, "test": 5}.get(partition, 11 if partition.startswith("trainval") else 6)
    assert len(split.class_ids) == n_classes
    assert np.all(np.bincount(split.labels)[split.class_ids] == SYNTH_IMAGES_PER_CLASS)
    assert D.load_split("mini", str(synthetic_mini), partition) is split  # cached


def test_mini_label_ids_and_disjoint_phases(synthetic_mini):
    ids = {p: set(D.load_split("mini", synthetic_mini, p).class_ids.tolist()) for p in ("train", "val", "test")}
    assert ids["train"] == set(range(6)) and ids["val"] == set(range(6, 11)) and ids["test"] == set(range(11, 16))
    phases = [D.load_split("mini", synthetic_mini, p).images for p in ("train", "train_phase_val",
                                                                        "train_phase_test")]
    flat = [{im.tobytes() for im in imgs} for imgs in phases]
    assert not (flat[0] & flat[1]) and not (flat[0] & flat[2]) and not (flat[1] & flat[2])


@pytest.mark.parametrize("partition", TIERED_PARTS)
def test_tiered_partitions(synthetic_tiered, partition):
    split = D.load_split("TieredImageNet", synthetic_tiered, partition)
    assert split.images.dtype == np.uint8 and split.images.shape[1:] == (S, S, 3)
    assert len(split.labels) == len(split.images)
    n_classes = {"val": 5, "test": 5, "trainval": 11}.get(partition, 6)
    assert split.class_ids.tolist() == list(range(n_classes))
    assert D.load_split("MetaTieredImageNet", synthetic_tiered, partition) is split


def test_arrays_are_read_only(synthetic_mini):
    split = D.load_split("mini", synthetic_mini, "val")
    with pytest.raises(ValueError):
        split.images[0, 0, 0, 0] = 1


def test_trainval_falls_back_to_rfs_code_name(tmp_path):
    folder = _small(tmp_path)
    _mini_file(folder, "trainval_phase_train").rename(_mini_file(folder, "train_phase_trainval"))
    assert len(D.load_split("mini", folder, "trainval").class_ids) == 5


def test_numpy_1_global_names_load(tmp_path):
    """Pickles made by numpy 1.x (and Python 2) name numpy.core.multiarray, not numpy._core."""
    folder = _small(tmp_path)
    path = _mini_file(folder, "val")
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    split = D.load_split("mini", folder, "val")
    assert split.images.shape == (8, 8, 8, 3)


# ---------------------------------------------------------------------------------------------------- errors


def test_missing_folder_and_path(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        D.load_split("MiniImageNet", tmp_path / "nowhere", "train")
    with pytest.raises(UsageError, match="--data_path"):
        D.load_split("TieredImageNet", None, "train")


def test_missing_files(tmp_path):
    mini = _small(tmp_path, "mini")
    _mini_file(mini, "test").unlink()
    with pytest.raises(DataError, match="miniImageNet_category_split_test.pickle.*--data_path must hold"):
        D.load_split("mini", mini, "test")
    tiered = _small(tmp_path, "tiered")
    (tiered / "val_labels.pkl").unlink()
    with pytest.raises(DataError, match="val_labels.pkl"):
        D.load_split("tiered", tiered, "val")


def test_missing_keys(tmp_path):
    mini = _small(tmp_path, "mini")
    path = _mini_file(mini, "val")
    with open(path, "rb") as fh:
        obj = pickle.load(fh)
    del obj["labels"]
    path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(DataError, match="no key 'labels'"):
        D.load_split("mini", mini, "val")

    tiered = _small(tmp_path, "tiered")
    images = np.load(tiered / "test_images.npz")["images"]
    np.savez(tiered / "test_images.npz", pixels=images)
    with pytest.raises(DataError, match="no array 'images'"):
        D.load_split("tiered", tiered, "test")
    (tiered / "val_labels.pkl").write_bytes(pickle.dumps({"label_specific": [0]}, protocol=2))
    with pytest.raises(DataError, match="no key 'labels'"):
        D.load_split("tiered", tiered, "val")


@pytest.mark.parametrize("payload", [b"\x00garbage bytes\xff" * 10, b"", b"\x80\x02}q\x00(X"])
def test_malformed_pickle(tmp_path, payload):
    mini = _small(tmp_path, "mini")
    _mini_file(mini, "test").write_bytes(payload)
    with pytest.raises(DataError, match="not a readable pickle"):
        D.load_split("mini", mini, "test")


def test_malformed_npz(tmp_path):
    tiered = _small(tmp_path, "tiered")
    (tiered / "train_images.npz").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(DataError, match="train_images.npz"):
        D.load_split("tiered", tiered, "train")
    (tiered / "val_images.npz").write_bytes(b"definitely not numpy")
    with pytest.raises(DataError, match="val_images.npz"):
        D.load_split("tiered", tiered, "val")


def test_pickle_with_code_is_refused(tmp_path):
    mini = _small(tmp_path, "mini")
    _mini_file(mini, "val").write_bytes(b"cos\nsystem\n(S'echo hacked'\ntR.")
    with pytest.raises(DataError, match="not allowed"):
        D.load_split("mini", mini, "val")


@pytest.mark.parametrize("bad, match", [
    ({"data": np.zeros((4, 8, 8), np.uint8), "labels": [0] * 4}, r"expected \(N, H, W, 3\)"),
    ({"data": np.zeros((4, 8, 8, 3), np.uint8), "labels": [0] * 3}, "4 images but 3 labels"),
    ({"data": np.zeros((4, 8, 8, 3), np.float32), "labels": [0] * 4}, "dtype float32"),
    ({"data": np.full((4, 8, 8, 3), 300, np.int32), "labels": [0] * 4}, "0..255"),
    ([1, 2, 3], "expected a dict"),
])
def test_malformed_contents(tmp_path, bad, match):
    mini = _small(tmp_path, "mini")
    _mini_file(mini, "val").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match=match):
        D.load_split("mini", mini, "val")


def test_integer_pixels_are_converted(tmp_path):
    mini = _small(tmp_path, "mini")
    _mini_file(mini, "val").write_bytes(pickle.dumps(
        {"data": np.full((4, 8, 8, 3), 200, np.int64), "labels": [5, 5, 6, 6]}, protocol=2))
    split = D.load_split("mini", mini, "val")
    assert split.images.dtype == np.uint8 and int(split.images.max()) == 200


def test_too_few_images_or_classes(synthetic_mini):
    with pytest.raises(DataError, match=r"class \d+ has 12 images but .* needs 13"):
        D.EpisodeDataset("MetaMiniImageNet", synthetic_mini, "test", n_ways=5, n_shots=3, n_queries=10)
    with pytest.raises(DataError, match="has 5 classes but .* n_ways=6"):
        D.EpisodeDataset("MetaMiniImageNet", synthetic_mini, "test", n_ways=6)
    split = D.load_split("mini", synthetic_mini, "train")
    with pytest.raises(DataError, match="needs 14 per class"):
        D.sample_meta_batch(split, 1, 5, 4, 10, "TENAS", np.random.default_rng(0))
    with pytest.raises(DataError, match="batch size"):
        D.sample_batch(split, len(split) + 1, "TENAS", np.random.default_rng(0))
    with pytest.raises(UsageError, match="n_ways"):
        D.EpisodeDataset("MetaMiniImageNet", synthetic_mini, "test", n_ways=0)


# ---------------------------------------------------------------------------------------------------- digits


def test_digits_splits():
    parts = {p: D.load_split("Digits", None, p) for p in ("train", "train_phase_val", "train_phase_test",
                                                           "val", "test")}
    for split in parts.values():
        assert split.images.shape[1:] == (32, 32, 3) and split.images.dtype == np.uint8
        assert np.array_equal(split.images[..., 0], split.images[..., 2])
    base, val, novel = (set(parts[p].class_ids.tolist()) for p in ("train", "val", "test"))
    assert (len(base), len(val), len(novel)) == (10, 5, 5)
    assert base | val | novel == set(range(20)) and not (base & val or base & novel or val & novel)
    assert set(parts["train_phase_val"].class_ids.tolist()) == base
    assert set(parts["train_phase_test"].class_ids.tolist()) == base
    total_base = sum(len(parts[p]) for p in ("train", "train_phase_val", "train_phase_test"))
    assert 0.75 < len(parts["train"]) / total_base < 0.85
    assert len(parts["train"]) + len(parts["val"]) + len(parts["test"]) > 2800
    assert len(parts["train_phase_val"]) == len(parts["train_phase_test"]) > 150
    assert D.load_split("MetaDigits", "/ignored", "train") is parts["train"]
    ds = D.SupervisedDataset("Digits", None, "train", transform="TENAS", train=False)
    assert ds.num_classes == 10 and sorted(set(ds.targets.tolist())) == list(range(10))
    assert ds[0][0].shape == (3, 32, 32)
    ds_val = D.SupervisedDataset("Digits", None, "train_phase_val", transform="TENAS", train=False)
    lab = parts["train_phase_val"].labels
    # the same raw class maps to the same target in every base partition
    for raw in base:
        assert len(set(ds_val.targets[lab == raw].tolist())) == 1
        assert ds_val.targets[lab == raw][0] == ds.targets[parts["train"].labels == raw][0]


# ---------------------------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("name", D.TRANSFORM_NAMES)
def test_transform_sizes(name):
    image = np.random.default_rng(0).integers(0, 256, size=(84, 84, 3), dtype=np.uint8)
    default = {"A": 84, "B": 84, "C": 80, "D": 80, "TENAS": 32}[name]
    for train in (True, False):
        out = D.build_transform(name, train)(image)
        assert out.dtype == torch.float32 and out.shape == (3, default, default)
        for size in (16, 40):
            assert D.build_transform(name, train, image_size=size)(image).shape == (3, size, size)
            small = image[:24, :24]
            assert D.build_transform(name, train, image_size=size)(small).shape == (3, size, size)
        assert D.build_transform(name.lower(), train, dataset="Digits")(image[:32, :32]).shape == (3, 32, 32)


def test_transform_normalisation():
    image = np.full((84, 84, 3), 128, np.uint8)
    a = D.build_transform("A", train=False)(image)
    assert torch.allclose(a[:, 0, 0], (128 / 255 - torch.tensor(D.MINI_MEAN)) / torch.tensor(D.MINI_STD))
    b = D.build_transform("B", train=False)(image)
    assert torch.allclose(b[:, 0, 0], (128 / 255 - torch.tensor(D.CIFAR_MEAN)) / torch.tensor(D.CIFAR_STD),
                          atol=1e-5)
    assert D.build_transform("A", train=False)(image[..., :]).shape == (3, 84, 84)


# ---------------------------------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("dataset, partition, lo", [("MiniImageNet", "train", 0), ("MiniImageNet", "val", 6),
                                                     ("TieredImageNet", "trainval", 0)])
def test_supervised_dataset(synthetic_mini, synthetic_tiered, dataset, partition, lo):
    folder = synthetic_mini if dataset == "MiniImageNet" else synthetic_tiered
    ds = D.SupervisedDataset(dataset, folder, partition, transform="A", train=True, image_size=S)
    assert len(ds) == len(ds.split) and ds.num_classes == len(ds.split.class_ids)
    assert ds.targets.min() == 0 and ds.targets.max() == ds.num_classes - 1
    assert np.array_equal(ds.targets, ds.split.labels - lo)
    image, target, index = ds[3]
    assert image.shape == (3, S, S) and isinstance(target, int) and index == 3 and target == ds.targets[3]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 3, S, S) and batch[1].dtype == torch.long


def _episode_ds(folder, dataset="MetaMiniImageNet", seed=0, **kw):
    args = dict(partition="test", n_ways=3, n_shots=2, n_queries=4, n_aug_support_samples=2, n_test_runs=5,
                transform="A", image_size=S, seed=seed)
    args.update(kw)
    return D.EpisodeDataset(dataset, folder, **args)


@pytest.mark.parametrize("dataset", ["MetaMiniImageNet", "MetaTieredImageNet"])
def test_episodes(synthetic_mini, synthetic_tiered, dataset):
    folder = synthetic_mini if dataset == "MetaMiniImageNet" else synthetic_tiered
    ds = _episode_ds(folder, dataset)
    assert len(ds) == 5
    sx, sy, qx, qy = ds[1]
    assert sx.shape == (3 * 2 * 2, 3, S, S) and qx.shape == (3 * 4, 3, S, S)
    assert sy.dtype == torch.long and qy.dtype == torch.long
    assert sy.tolist() == [0, 0, 1, 1, 2, 2] * 2 and qy.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    s_idx, q_idx, chosen = ds.episode_indices(1)
    assert len(set(chosen.tolist())) == 3 and not (set(s_idx) & set(q_idx))
    labels = ds.split.labels
    assert [int(labels[i]) for i in s_idx] == [int(c) for c in chosen for _ in range(2)]
    assert [int(labels[i]) for i in q_idx] == [int(c) for c in chosen for _ in range(4)]
    # queries are the test transform of exactly those images, in that order
    ident = _identify(ds.split, ds.query_transform)
    assert [ident(x) for x in qx] == q_idx


def test_episode_determinism(synthetic_mini):
    torch.manual_seed(123)
    before = torch.rand(3)
    a, b, c = _episode_ds(synthetic_mini), _episode_ds(synthetic_mini), _episode_ds(synthetic_mini, seed=1)
    ea, eb, ec = a[2], b[2], c[2]
    assert all(torch.equal(x, y) for x, y in zip(ea, eb))  # support augmentation included
    assert not torch.equal(ea[2], ec[2])
    assert not torch.equal(a[0][2], a[1][2])  # different episodes
    assert a.episode_indices(2)[1] != c.episode_indices(2)[1]
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), before)  # global RNG untouched by the fork
    # augmented support copies differ from one another (train transform A)
    sx = ea[0]
    assert not torch.equal(sx[0], sx[6])


def test_episode_support_without_augmentation(synthetic_mini):
    ds = _episode_ds(synthetic_mini, train_transform=False, n_aug_support_samples=1)
    sx, sy, _, _ = ds[0]
    ident = _identify(ds.split, ds.query_transform)
    assert [ident(x) for x in sx] == ds.episode_indices(0)[0]


# ---------------------------------------------------------------------------------------------------- samplers


def test_meta_batch_queries_first(synthetic_mini):
    split = D.load_split("mini", synthetic_mini, "train")
    tf = D.build_transform("TENAS", train=False, image_size=16)
    n_tasks, n_ways, n_shots, n_queries = 3, 4, 2, 3
    x, y = D.sample_meta_batch(split, n_tasks, n_ways, n_shots, n_queries, tf, np.random.default_rng(5))
    nq, ns = n_tasks * n_ways * n_queries, n_tasks * n_ways * n_shots
    assert x.shape == (nq + ns, 3, 16, 16) and y.dtype == torch.long
    q_lab = [w for _ in range(n_tasks) for w in range(n_ways) for _ in range(n_queries)]
    s_lab = [w for _ in range(n_tasks) for w in range(n_ways) for _ in range(n_shots)]
    assert y.tolist() == q_lab + s_lab
    ident = _identify(split, tf)
    idx = [ident(t) for t in x]
    q_idx, s_idx = idx[:nq], idx[nq:]
    for t in range(n_tasks):
        tq = q_idx[t * n_ways * n_queries:(t + 1) * n_ways * n_queries]
        ts = s_idx[t * n_ways * n_shots:(t + 1) * n_ways * n_shots]
        assert not (set(tq) & set(ts)) and len(set(tq)) == len(tq) and len(set(ts)) == len(ts)
        q_cls = [int(split.labels[i]) for i in tq[::n_queries]]
        s_cls = [int(split.labels[i]) for i in ts[::n_shots]]
        assert q_cls == s_cls and len(set(q_cls)) == n_ways
        for w in range(n_ways):  # every image of a way belongs to that way's class
            assert {int(split.labels[i]) for i in tq[w * n_queries:(w + 1) * n_queries]} == {q_cls[w]}
            assert {int(split.labels[i]) for i in ts[w * n_shots:(w + 1) * n_shots]} == {q_cls[w]}


def test_meta_batch_determinism(synthetic_tiered):
    split = D.load_split("tiered", synthetic_tiered, "train")
    tf = D.build_transform("TENAS", train=True, image_size=16)
    x1, y1 = D.sample_meta_batch(split, 2, 3, 1, 2, tf, np.random.default_rng(7))
    x2, y2 = D.sample_meta_batch(split, 2, 3, 1, 2, tf, np.random.default_rng(7))
    x3, _ = D.sample_meta_batch(split, 2, 3, 1, 2, tf, np.random.default_rng(8))
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    x4, _ = D.sample_meta_batch(split, 2, 3, 1, 2, "TENAS", np.random.default_rng(7))
    assert x4.shape == (2 * 3 * 3, 3, 32, 32)


def test_sample_batch(synthetic_mini):
    split = D.load_split("mini", synthetic_mini, "val")
    tf = D.build_transform("A", train=False, image_size=S)
    x, y = D.sample_batch(split, 20, tf, np.random.default_rng(0))
    assert x.shape == (20, 3, S, S) and y.dtype == torch.long
    ident = _identify(split, tf)
    idx = [ident(t) for t in x]
    assert len(set(idx)) == 20
    assert y.tolist() == [int(split.labels[i]) - 6 for i in idx]
    x2, y2 = D.sample_batch(split, 20, "A", np.random.default_rng(0))
    x3, y3 = D.sample_batch(split, 20, "A", np.random.default_rng(0))
    assert torch.equal(x2, x3) and torch.equal(y2, y3) and torch.equal(y, y2)
    with pytest.raises(UsageError, match="Generator"):
        D.sample_batch(split, 2, tf, 0)


# ---------------------------------------------------------------------------------------------------- synthetic


def test_synthetic_cli(tmp_path, capsys):
    out = tmp_path / "cli_mini"
    assert synthetic_main(["--out", str(out), "--dataset", "mini", "--train-classes", "3", "--val-classes", "2",
                           "--test-classes", "2", "--images-per-class", "3", "--image-size", "8",
                           "--seed", "1"]) == 0
    assert str(out) in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(D.expected_files("mini"))
    with open(_mini_file(out, "train_phase_train"), "rb") as fh:
        obj = pickle.load(fh, encoding="latin1")
    assert set(obj) == {"data", "labels", "catname2label"} and obj["data"].shape == (9, 8, 8, 3)
    assert isinstance(obj["labels"], list) and sorted(obj["catname2label"].values()) == [0, 1, 2]

    out_t = tmp_path / "cli_tiered"
    assert synthetic_main(["--out", str(out_t), "--dataset", "tiered", "--images-per-class", "2",
                           "--image-size", "8"]) == 0
    assert sorted(p.name for p in out_t.iterdir()) == sorted(D.expected_files("tiered"))
    assert D.load_split("tiered", out_t, "trainval").images.shape == (13 * 2, 8, 8, 3)

    assert synthetic_main(["--out", str(tmp_path / "bad"), "--images-per-class", "0"]) == 2
    assert "images-per-class" in capsys.readouterr().err


def test_synthetic_is_reproducible_and_separable(tmp_path):
    a = _small(tmp_path / "a", image_size=12)
    b = _small(tmp_path / "b", image_size=12)
    for stem in ("train_phase_train", "test"):
        assert _mini_file(a, stem).read_bytes() == _mini_file(b, stem).read_bytes()
    # nearest class mean on raw pixels separates the synthetic classes
    tr = D.load_split("mini", a, "train")
    te = D.load_split("mini", a, "train_phase_test")
    means = np.stack([tr.images[tr.labels == c].astype(float).mean(0).reshape(-1) for c in tr.class_ids])
    dist = ((te.images.reshape(len(te), 1, -1).astype(float) - means[None]) ** 2).sum(-1)
    assert (tr.class_ids[dist.argmin(1)] == te.labels).mean() > 0.9


def test_cached_copy_is_refreshed_after_rewrite(tmp_path):
    folder = _small(tmp_path)
    first = D.load_split("mini", folder, "test")
    shutil.rmtree(folder)
    _small(tmp_path, images_per_class=5)
    assert len(D.load_split("mini", folder, "test")) == 10 and len(first) == 8
