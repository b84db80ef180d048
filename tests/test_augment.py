"""The one description of the augmentation steps (search_lib/data/augment.py), its two samplers and the two
executors that read it, in every combination, against torchvision + Pillow image by image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from search_lib.data import CIFAR_MEAN, CIFAR_STD, MINI_MEAN, MINI_STD, build_transform
from search_lib.data.augment import (
    Crop,
    Flip,
    Jitter,
    Normalize,
    Pipeline,
    Resize,
    ToPIL,
    ToTensor,
    sample_device,
    sample_exact,
)
from search_lib.data.pil_batch import run_exact
from search_lib.data.tensor_augment import DeviceAugment, run_fast


def _images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _kinds(pipeline: Pipeline) -> list:
    return [type(s) for s in pipeline.steps]


def test_the_description_is_read_from_the_torchvision_pipeline():
    a = Pipeline.read(build_transform("A", True, None, "mini"))
    assert _kinds(a) == [Resize, Crop, Jitter, Flip, ToTensor, Normalize]
    assert a.steps[0].size == (84, 84)
    assert a.steps[1:] == (Crop((84, 84), 8), Jitter(((0.6, 1.4),) * 3), Flip(0.5), ToTensor(),
                           Normalize(MINI_MEAN, MINI_STD))
    assert Pipeline.read(build_transform("A", True, 32, "mini")).step(Crop) == Crop((32, 32), 3)
    tenas = Pipeline.read(build_transform("TENAS", True, None, "mini"))
    assert _kinds(tenas) == [Resize, Flip, Crop, ToTensor, Normalize]
    assert tenas.step(Crop) == Crop((32, 32), 4) and tenas.step(Normalize) == Normalize(CIFAR_MEAN, CIFAR_STD)
    assert tenas.shapes((84, 84)) == [(84, 84), (32, 32), (32, 32), (32, 32), (32, 32)]
    # another jitter strength is read from its ColorJitter: the device sampler draws in its range
    tf = T.Compose([ToPIL(), T.ColorJitter(brightness=0.1, saturation=0.3), T.ToTensor()])
    jitter = Pipeline.read(tf).step(Jitter)
    assert jitter.ranges[1] is None and jitter.ranges[0] == pytest.approx((0.9, 1.1))
    f = DeviceAugment(tf).sample(4000, (8, 8), torch.Generator().manual_seed(0)).factors
    assert torch.isnan(f[:, 1]).all()
    assert 0.9 <= float(f[:, 0].min()) < 0.91 and 1.09 < float(f[:, 0].max()) <= 1.1
    assert 0.7 <= float(f[:, 2].min()) < 0.71 and 1.29 < float(f[:, 2].max()) <= 1.3


@pytest.mark.parametrize("tf", [
    T.Compose([ToPIL(), T.RandomHorizontalFlip(), T.RandomHorizontalFlip(), T.ToTensor()]),  # a random step twice
    T.Compose([ToPIL(), T.Resize(16), T.ToTensor()]),                                     # resize of the short side
    T.Compose([ToPIL(), T.Resize((16, 16), interpolation=T.InterpolationMode.NEAREST), T.ToTensor()]),
    T.Compose([ToPIL(), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3), T.ToTensor()]),
])
def test_pipelines_it_does_not_describe(tf):
    assert Pipeline.read(tf) is None


@pytest.mark.parametrize("seed", [0, 3])
def test_the_device_sampler_keeps_its_rule(seed):
    """--gpu_augment's choices for transform A: crop tops, lefts, flips, factors 1 + 0.4 (2u - 1), the order
    as the argsort of uniforms, in this order from the generator (the rule of earlier versions)."""
    pipeline = Pipeline.read(build_transform("A", True, 32, "mini"))
    p = sample_device(pipeline, 50, (40, 40), torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    assert torch.equal(p.top, torch.randint(0, 7, (50,), generator=g))
    assert torch.equal(p.left, torch.randint(0, 7, (50,), generator=g))
    assert torch.equal(p.flip, torch.rand(50, generator=g) < 0.5)
    assert torch.equal(p.factors, 1.0 + 0.4 * (2.0 * torch.rand(50, 3, generator=g) - 1.0))
    assert torch.equal(p.order, torch.argsort(torch.rand(50, 3, generator=g), dim=1))


def _pil(img: np.ndarray, pipeline: Pipeline, p, i: int) -> torch.Tensor:
    """Sample i of a pipeline through PIL's own functions, with the given choices."""
    pil = Image.fromarray(img)
    for step in pipeline.steps:
        if isinstance(step, Resize):
            pil = step.step(pil)
        elif isinstance(step, Crop):
            pil = TF.crop(TF.pad(pil, step.pad), int(p.top[i]), int(p.left[i]), *step.size)
        elif isinstance(step, Jitter):
            ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
            for op in p.order[i].tolist():
                if op < 3 and not np.isnan(float(p.factors[i, op])):
                    pil = ops[op](pil, float(p.factors[i, op]))
        elif isinstance(step, Flip):
            pil = TF.hflip(pil) if bool(p.flip[i]) else pil
        elif isinstance(step, ToTensor):
            x = TF.to_tensor(pil)
        else:
            x = TF.normalize(x, step.mean, step.std)
    return x


@pytest.mark.parametrize("tf,raw", [
    (build_transform("A", True, 24, "mini"), 24),
    (build_transform("A", True, 16, "mini"), 20),
    (build_transform("TENAS", True, 16, "digits"), 32),
    (T.Compose([ToPIL(), T.RandomCrop(10, padding=3), T.ColorJitter(brightness=0.9, contrast=0.5), T.ToTensor()]), 12),
])
def test_the_exact_executor_gives_pil_for_the_device_choices(tf, raw):
    pipeline = Pipeline.read(tf)
    images = _images(24, raw, 1)
    p = sample_device(pipeline, len(images), (raw, raw), torch.Generator().manual_seed(4))
    ref = torch.stack([_pil(img, pipeline, p, i) for i, img in enumerate(images)])
    assert torch.equal(run_exact(pipeline, images, p), ref)


@pytest.mark.parametrize("tf", [
    build_transform("TENAS", True, 16, "mini"),  # flip, then a crop with padding 2
    T.Compose([ToPIL(), T.RandomCrop(12, padding=2), T.RandomHorizontalFlip(0.3), T.ToTensor(),
               T.Normalize(MINI_MEAN, MINI_STD)]),
])
def test_the_fast_executor_with_the_exact_choices_is_the_pil_pipeline(tf):
    """Without a colour operation or a resize the tensor executor is exact: with the exact sampler it gives
    what the PIL pipeline gives image by image under the same seed, and leaves the generator as that does."""
    pipeline = Pipeline.read(tf)
    images = _images(40, pipeline.out_size((0, 0))[0], 2)
    torch.manual_seed(5)
    ref = torch.stack([tf(img) for img in images])
    ref_state = torch.get_rng_state()
    torch.manual_seed(5)
    p = sample_exact(pipeline, len(images), images.shape[1:3])
    assert torch.equal(torch.get_rng_state(), ref_state)
    assert torch.equal(run_fast(pipeline, torch.from_numpy(images), p), ref)
    assert p.flip.any() and not p.flip.all()


def test_the_fast_executor_with_the_exact_choices_stays_within_the_jitter_bound():
    tf = build_transform("A", True, 16, "mini")
    pipeline = Pipeline.read(tf)
    images = _images(30, 16, 3)
    torch.manual_seed(6)
    ref = torch.stack([tf(img) for img in images])
    torch.manual_seed(6)
    out = run_fast(pipeline, torch.from_numpy(images), sample_exact(pipeline, len(images), (16, 16)))
    std = torch.tensor(MINI_STD).view(1, 3, 1, 1)
    assert float(((out - ref) * std).abs().max()) <= 5.0 / 255.0
