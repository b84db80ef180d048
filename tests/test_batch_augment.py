"""Transform A on tensors in batch (the GPU data path: the device sampler and the fast executor) against the
PIL path (the reference), and the one description both paths read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomCrop
from torchvision.transforms import functional as TF

from eval_lib.train.device_batches import DeviceBatches
from search_lib.core.errors import DataError
from search_lib.data import MINI_MEAN, MINI_STD, build_transform
from search_lib.data.augment import AugmentParams
from search_lib.data.tensor_augment import DeviceAugment

SIZE = 32
PAD = SIZE * 8 // 84  # 3, as build_transform("A") at 32
# Measured bound (in [0, 1] units, before normalisation) between the float tensor ops and PIL's, which
# rounds to uint8 after each colour operation and uses an integer grey formula: at most 3.84/255 per
# pixel and 1.24/255 on average over 8 x 64 random images with all three jitter operations; the test
# allows 5/255 and 1.5/255. Crop and flip alone agree exactly.
JITTER_TOLERANCE = 5.0 / 255.0
JITTER_MEAN_TOLERANCE = 1.5 / 255.0


def _transform():
    return build_transform("A", True, SIZE, "mini")


def _augment() -> DeviceAugment:
    return DeviceAugment(_transform())


def _images(n=16, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, SIZE // 4, SIZE // 4, 3), dtype=np.uint8)
    return np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)  # blocky: realistic local correlation


def _pil_reference(img: np.ndarray, p: AugmentParams, i: int) -> torch.Tensor:
    """The PIL path of transform A with sample i's choices, in [0, 1] (before normalisation)."""
    pil = TF.pad(Image.fromarray(img), PAD)
    pil = TF.crop(pil, int(p.top[i]), int(p.left[i]), SIZE, SIZE)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for op in p.order[i].tolist():
        pil = ops[op](pil, float(p.factors[i, op]))
    if bool(p.flip[i]):
        pil = TF.hflip(pil)
    return TF.to_tensor(pil)


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(MINI_STD).view(1, 3, 1, 1) + torch.tensor(MINI_MEAN).view(1, 3, 1, 1)


def test_crop_and_flip_are_identical_to_pil():
    imgs = _images()
    aug = _augment()
    p = aug.sample(len(imgs), (SIZE, SIZE), torch.Generator().manual_seed(0))
    p.factors = torch.ones_like(p.factors)  # no colour change: crop and flip only
    out = _unnormalise(aug.apply(torch.from_numpy(imgs), p))
    ref = torch.stack([_pil_reference(img, p, i) for i, img in enumerate(imgs)])
    assert p.flip.any() and not p.flip.all() and len(set(p.top.tolist())) > 2
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_colour_jitter_matches_pil_within_the_measured_bound():
    imgs = _images(seed=1)
    aug = _augment()
    p = aug.sample(len(imgs), (SIZE, SIZE), torch.Generator().manual_seed(1))
    out = _unnormalise(aug.apply(torch.from_numpy(imgs), p))
    ref = torch.stack([_pil_reference(img, p, i) for i, img in enumerate(imgs)])
    diff = (out - ref).abs()
    assert float(diff.max()) <= JITTER_TOLERANCE, float(diff.max()) * 255
    assert float(diff.mean()) <= JITTER_MEAN_TOLERANCE


def test_offsets_and_flips_are_uniform_like_the_pil_path():
    n = 20000
    p = _augment().sample(n, (SIZE, SIZE), torch.Generator().manual_seed(2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        pil_tops = [RandomCrop.get_params(torch.zeros(3, SIZE + 2 * PAD, SIZE + 2 * PAD), (SIZE, SIZE))[0]
                    for _ in range(n)]
    expected = n / (2 * PAD + 1)
    for counts in (np.bincount(p.top.numpy(), minlength=2 * PAD + 1),
                   np.bincount(p.left.numpy(), minlength=2 * PAD + 1),
                   np.bincount(pil_tops, minlength=2 * PAD + 1)):
        assert counts.size == 2 * PAD + 1  # the same support, 0..2*pad
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 30.0  # 6 degrees of freedom: p < 1e-4 for a uniform distribution
    assert abs(float(p.flip.float().mean()) - 0.5) < 0.02
    assert float(p.factors.min()) >= 0.6 and float(p.factors.max()) <= 1.4
    assert {tuple(o) for o in p.order.tolist()} == {(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)}


def test_seeded_generator_repeats_and_bad_input_is_refused():
    imgs = torch.from_numpy(_images(4))
    aug = _augment()
    a = aug(imgs, torch.Generator().manual_seed(5))
    b = aug(imgs, torch.Generator().manual_seed(5))
    c = aug(imgs, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (4, 3, SIZE, SIZE)
    with pytest.raises(DataError, match="uint8"):
        aug(imgs.float(), torch.Generator())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_augment_matches_the_cpu_one():
    imgs = torch.from_numpy(_images(8))
    aug = _augment()
    p = aug.sample(8, (SIZE, SIZE), torch.Generator(device="cuda").manual_seed(0))
    gpu = aug.apply(imgs.cuda(), p).cpu()
    cpu = aug.apply(imgs, AugmentParams(*(t.cpu() for t in (p.top, p.left, p.flip, p.factors, p.order))))
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-5)


def test_device_batches_are_a_function_of_the_epoch_seed():
    imgs = _images(10)
    batches = DeviceBatches(imgs, np.arange(10) % 3, torch.device("cpu"), 4, _transform())
    a, b, c = (list(batches.epoch(s)) for s in (7, 7, 8))
    assert len(a) == 2 and all(x.shape == (4, 3, SIZE, SIZE) for x, _ in a)  # last incomplete batch dropped
    assert all(torch.equal(x, y) and torch.equal(t, u) for (x, t), (y, u) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    with pytest.raises(DataError, match="uint8"):
        DeviceBatches(imgs.astype(np.float32), np.zeros(10), torch.device("cpu"), 4, _transform())
