"""The batched PIL pipeline (search_lib/data/pil_batch.py, the exact executor) against the per-image PIL
pipeline it replaces.

The reference is torchvision + Pillow, image by image, under the same seed: the batched output must be
bit-identical and leave torch's generator in the same state, on random, flat, saturated and low-contrast
images, with extrapolating jitter factors, and through the datasets that use it.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torchvision import transforms as T

import search_lib.data.pil_batch as pil_batch
from search_lib.data import EpisodeDataset, build_transform, load_split, sample_meta_batch
from search_lib.data.pil_batch import BatchedPIL, batched
from search_lib.data.transforms import MINI_MEAN, MINI_STD, _ResizeIfNeeded, _ToPIL, apply_seeded


def _images(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    x[0] = 0                                   # black
    x[1] = 255                                 # white: saturates under brightness > 1
    x[2] = 128                                 # flat grey
    x[3] = x[3] // 64 * 64                     # few levels: many values on truncation boundaries
    x[4] = 120 + x[4] % 8                      # low contrast
    x[5, ..., 1:] = x[5, ..., :1]              # grey pixels (saturation is a no-op)
    return x


def _reference(transform, images: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    out = torch.stack([transform(img) for img in images])
    return out, torch.get_rng_state()


def _batched(transform, images: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    fast = BatchedPIL.build(transform)
    assert fast is not None
    torch.manual_seed(seed)
    out = fast(images)
    assert fast.exact, "the first-call check against PIL failed"
    return out, torch.get_rng_state()


@pytest.mark.parametrize("name,train,dataset,image_size,raw", [
    ("A", True, "mini", None, 84),      # the paper's support transform, padding 8
    ("A", True, "digits", None, 32),    # the demo's, padding 3
    ("A", True, "mini", 32, 40),        # resized first (PIL bilinear), then cropped
    ("A", True, "mini", 10, 10),        # padding 0: RandomCrop draws nothing
    ("A", False, "mini", 16, 20),       # the query transform: resize, ToTensor, Normalize
])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_transform_a_is_bit_identical_to_pil(name, train, dataset, image_size, raw, seed):
    tf = build_transform(name, train, image_size, dataset)
    images = _images(40, raw, seed)
    ref, ref_state = _reference(tf, images, seed)
    out, state = _batched(tf, images, seed)
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
    assert torch.equal(out, ref)
    assert torch.equal(state, ref_state)  # the same draws: what the caller draws next is unchanged


@pytest.mark.parametrize("seed", range(4))
def test_extrapolating_jitter_and_any_order(seed):
    """Factors in [0.1, 1.9] (blends that extrapolate and clip), every jitter order, no normalisation."""
    tf = T.Compose([_ToPIL(), T.RandomCrop(12, padding=2), T.ColorJitter(0.9, 0.9, 0.9),
                    T.RandomHorizontalFlip(0.3), T.ToTensor()])
    images = _images(120, 12, 10 + seed)
    ref, ref_state = _reference(tf, images, seed)
    out, state = _batched(tf, images, seed)
    assert torch.equal(out, ref) and torch.equal(state, ref_state)


def test_partial_jitter():
    """A jitter with only some operations (the others off: no factor drawn, never applied)."""
    tf = T.Compose([_ToPIL(), T.ColorJitter(brightness=0.5, saturation=0.7), T.ToTensor(),
                    T.Normalize(MINI_MEAN, MINI_STD)])
    images = _images(50, 9, 3)
    assert torch.equal(_batched(tf, images, 5)[0], _reference(tf, images, 5)[0])


@pytest.mark.parametrize("tf", [
    T.Compose([_ToPIL(), T.ColorJitter(0.4, 0.4, 0.4, hue=0.1), T.ToTensor()]),           # hue
    T.Compose([_ToPIL(), T.RandomCrop(8, padding=2, padding_mode="reflect"), T.ToTensor()]),
    T.Compose([_ToPIL(), T.RandomResizedCrop(8), T.ToTensor()]),
    T.Compose([_ToPIL(), T.ToTensor(), T.RandomHorizontalFlip()]),                     # flip of a tensor
    T.Compose([T.ToTensor()]),                                                           # no PIL step
    lambda img: torch.zeros(3),                                                          # not a Compose
])
def test_pipelines_it_cannot_batch_are_left_to_pil(tf):
    assert BatchedPIL.build(tf) is None


@pytest.mark.parametrize("name", ["B", "C", "D"])
def test_other_rfs_train_transforms_are_not_batched(name):
    assert batched(build_transform(name, True, 16, "mini")) is None


@pytest.mark.parametrize("train,dataset,image_size,raw", [
    (True, "mini", None, 84),     # the search's default: resized to 32 through PIL, flip, crop with padding 4
    (True, "digits", 16, 32),     # the demo's search: 16x16, padding 2
    (True, "mini", 20, 20),       # already the size: the resize leaves the image as it is
    (False, "mini", 32, 40),      # the linear regions' pool transform: resize, ToTensor, Normalize
])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_search_transform_is_bit_identical_to_pil(train, dataset, image_size, raw, seed):
    tf = build_transform("TENAS", train, image_size, dataset)
    assert batched(tf) is not None
    images = _images(30, raw, seed)
    ref, ref_state = _reference(tf, images, seed)
    out, state = _batched(tf, images, seed)
    assert torch.equal(out, ref) and torch.equal(state, ref_state)


def test_other_inputs_go_through_pil():
    tf = build_transform("A", True, 8, "mini")
    fast = BatchedPIL.build(tf)
    grey = np.random.default_rng(0).integers(0, 256, size=(4, 8, 8), dtype=np.uint8)[..., None].repeat(3, -1)
    assert fast.accepts(grey) and not fast.accepts(grey.astype(np.float32)) and not fast.accepts(grey[..., :1])
    floats = grey.astype(np.float32)
    torch.manual_seed(0)
    out = fast(floats)
    assert torch.equal(out, _reference(tf, floats, 0)[0])


def test_a_difference_from_pil_falls_back_to_pil(monkeypatch, caplog):
    """The first call checks its first images against PIL; a difference (a Pillow with other arithmetic)
    means a warning and PIL from then on: the output is still the reference's."""
    tf = build_transform("A", True, 16, "mini")
    images = _images(20, 16, 0)
    monkeypatch.setattr(pil_batch, "_blend_", lambda x, degenerate, alpha: x.add_(1.0).clamp_(0, 255))
    fast = BatchedPIL.build(tf)
    with caplog.at_level(logging.WARNING, logger="metantknas.data"):
        torch.manual_seed(3)
        out = fast(images)
        state = torch.get_rng_state()
    ref, ref_state = _reference(tf, images, 3)
    assert torch.equal(out, ref) and torch.equal(state, ref_state)
    assert not fast.exact and "differs from PIL" in caplog.text
    torch.manual_seed(4)
    assert torch.equal(fast(images), _reference(tf, images, 4)[0])


def test_the_callers_images_are_not_modified():
    tf = T.Compose([_ToPIL(), T.RandomHorizontalFlip(1.0), T.ToTensor()])  # in-place flip, no copy step
    images = _images(6, 8, 0)
    keep = images.copy()
    torch.manual_seed(0)
    BatchedPIL.build(tf)(images)
    assert np.array_equal(images, keep)


def test_resize_step_matches_pil_for_other_sizes():
    tf = T.Compose([_ToPIL(), _ResizeIfNeeded(12), T.RandomCrop(12, padding=1), T.ToTensor()])
    images = _images(10, 17, 1)
    assert torch.equal(_batched(tf, images, 0)[0], _reference(tf, images, 0)[0])


# ---- through the datasets ----------------------------------------------------------------------------------

def test_episode_supports_and_search_batches_equal_the_per_image_pipeline(synthetic_mini):
    ds = EpisodeDataset("MiniImageNet", synthetic_mini, partition="test", n_ways=5, n_shots=2, n_queries=3,
                        n_aug_support_samples=4, n_test_runs=3, transform="A", image_size=16, seed=7)
    assert batched(ds.support_transform) is not None
    for i in range(len(ds)):
        plan = ds.episode_plan(i)
        ref, _ = _reference(ds.support_transform, ds.split.images[plan.support_idx], plan.seed)
        assert torch.equal(ds.support_images(plan), ref)
        assert torch.equal(ds[i][0], ref)
    split = load_split("mini", synthetic_mini, "train")
    x, _ = sample_meta_batch(split, 2, 3, 1, 2, "A", np.random.default_rng(0))
    gen = np.random.default_rng(0)  # the same draws, by hand: the tasks, then the torch seed
    from search_lib.data.episodes import _pick_task
    from search_lib.data.transforms import torch_seed
    q, s = [], []
    for _ in range(2):
        support, query = _pick_task(split, split.class_ids, 3, 1, 2, gen)
        q += [int(i) for part in query for i in part]
        s += [int(i) for part in support for i in part]
    tf = build_transform("A", True, None, "mini")
    ref, _ = _reference(tf, split.images[q + s], torch_seed(gen))
    assert torch.equal(x, ref)
    assert torch.equal(apply_seeded(tf, split.images, q + s, 11), _reference(tf, split.images[q + s], 11)[0])


def test_resize_after_the_colour_jitter_matches_pil():
    """The steps may come in another order than transform A's: a resize after the jitter (whose values
    are still integers 0..255) runs through PIL as well."""
    tf = T.Compose([_ToPIL(), T.ColorJitter(0.4, 0.4, 0.4), _ResizeIfNeeded(9), T.RandomHorizontalFlip(),
                    T.ToTensor()])
    images = _images(12, 14, 2)
    assert torch.equal(_batched(tf, images, 1)[0], _reference(tf, images, 1)[0])


def test_resizes_are_made_once_per_distinct_image(monkeypatch):
    """The few-shot test resizes each support image once per copy and episode: the step remembers its output."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)[rng.integers(0, 4, 40)]  # 4 distinct images
    tf = T.Compose([_ToPIL(), _ResizeIfNeeded(16), T.ToTensor()])
    resizes = []
    real = pil_batch.Image.Image.resize
    monkeypatch.setattr(pil_batch.Image.Image, "resize", lambda self, *a, **k: resizes.append(1) or real(self, *a, **k))
    fast = BatchedPIL.build(tf)
    out, again = fast._batched(images), fast._batched(images[:7])
    assert len(resizes) == 4  # the 40 images, then 7 of them again
    assert torch.equal(out, torch.stack([tf(img) for img in images])) and torch.equal(again, out[:7])
