"""The exact executor: a PIL transform pipeline applied to a whole stack of images at once, bit for bit.

The few-shot test transforms every support image of every episode several times with the *training*
transform (RFS's transform A: zero-padded random crop, colour jitter, horizontal flip): 30,000 images for
the demo's 4 x 100 episodes. Through PIL one image costs about 0.3 ms, almost all of it Python and object
overhead around a few thousand pixels, which made the transforms a third of the test on 2 CPU cores.

`BatchedPIL.build(transform)` reads a torchvision ``Compose`` as an `augment.Pipeline` and returns an object
that gives exactly what ``torch.stack([transform(img) for img in images])`` gives:

* the random choices are drawn by `augment.sample_exact`: image after image, step after step, with each
  step's own ``get_params`` / ``torch.rand`` calls, in the order the ``Compose`` would make them, so the torch
  generator is left in the same state and every image gets the same crop, jitter factors and order, and flip;
* `run_exact` then applies the steps to the whole stack as uint8 arithmetic that reproduces Pillow's:
  ``Image.blend`` computes ``in1 + alpha * (in2 - in1)`` in float32 and truncates (clipping when
  extrapolating); grey levels are ``(299 R + 587 G + 114 B) / 1000`` in Pillow's 16-bit fixed point, rounded;
  the contrast reference is the mean grey level rounded to an integer (``ImageEnhance.Contrast``); resizes
  run through PIL image by image (the step itself); ``ToTensor`` and ``Normalize`` are the same float32
  operations torchvision applies.

The per-image PIL pipeline stays the reference (tests/test_pil_batch.py compares the two on random images,
sizes and seeds). Because Pillow's arithmetic is not a documented interface, the first call of every
`BatchedPIL` also checks its first images against the reference; on any difference it warns once and
falls back to PIL for good. A pipeline that `augment.Pipeline.read` does not describe (RandomResizedCrop, a
hue jitter, another padding mode, ...) is not batched: `build` returns None and the caller transforms image
by image.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from search_lib.data.augment import (
    AugmentParams,
    Crop,
    Flip,
    Jitter,
    Normalize,
    Pipeline,
    Resize,
    ToTensor,
    sample_exact,
)

logger = logging.getLogger("metantknas.data")

_CHECK_IMAGES = 8  # images compared with the PIL reference on a BatchedPIL's first call


# ----------------------------------------------------------------------------------------------------------
# Pillow's arithmetic on (N, 3, H, W) float32 tensors holding integers 0..255
# ----------------------------------------------------------------------------------------------------------

def _grey(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L, (19595 R + 38470 G + 7471 B + 2^15) >> 16, shape (N, 1, H, W). Every product and
    partial sum is an integer below 2^24, so float32 computes it exactly in any order."""
    r, g, b = x.unbind(1)
    acc = r.mul(19595.0).add_(g, alpha=38470.0).add_(b, alpha=7471.0).add_(32768.0)
    return acc.mul_(1.0 / 65536.0).floor_().unsqueeze(1)


def _blend_(x: torch.Tensor, degenerate: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``Image.blend(degenerate, x, alpha)`` in place on ``x``: float32 ``degenerate + alpha * (x -
    degenerate)``, clipped to 0..255, truncated (Pillow's C loop for 8-bit images).

    The difference of two integers is exact; the product and the sum are separate operations, each rounded
    to float32 as in Pillow (one fused multiply-add would round once and could differ in the last bit,
    hence in the truncated value). Values are non-negative after the clip, so floor is the truncation.
    """
    return x.sub_(degenerate).mul_(alpha).add_(degenerate).clamp_(0.0, 255.0).floor_()


def _jitter_(x: torch.Tensor, ops: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """One position of the colour jitter, in place: sample n gets ``ImageEnhance`` op ``ops[n]`` (0
    brightness: blend with black; 1 contrast: with its mean grey level rounded to an integer; 2 saturation:
    with its grey image) with factor ``factors[n]``; op -1 leaves it unchanged (a blend with factor 1 gives
    the image back exactly: the difference and the sum of integers are exact)."""
    op = ops.view(-1, 1, 1, 1)
    grey = _grey(x)
    pixels = grey.shape[2] * grey.shape[3]
    # the sum of the grey levels is an integer: exact in float32 below 2^24 (images up to 256 x 256)
    level = grey.sum(dim=(1, 2, 3), keepdim=True, dtype=torch.float32 if 255 * pixels < 2**24 else torch.float64)
    level = torch.floor(level.double() / pixels + 0.5).to(torch.float32)  # int(mean + 0.5), mean in double
    degenerate = torch.where(op == 2, grey, torch.where(op == 1, level, 0.0))  # (N, 1, H, W)
    alpha = torch.where(ops < 0, 1.0, factors).view(-1, 1, 1, 1)
    return _blend_(x, degenerate, alpha)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """The stack as float32 (N, 3, H, W); steps before the colour jitter keep uint8 (N, H, W, 3)."""
    if x.dtype == torch.uint8:
        return x.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    return x


# ----------------------------------------------------------------------------------------------------------
# the steps on the stack: uint8 (N, H, W, 3) until a step needs arithmetic, then float32 (N, 3, H, W)
# ----------------------------------------------------------------------------------------------------------

class ResizeMemo:
    """What a resize made of each image, by the image's bytes. The few-shot test resizes every support image
    once per copy and episode (the digits' 4 x 100 episodes: 30,000 resizes of a few hundred distinct
    images); a resize is deterministic, so each distinct image needs it once."""

    LIMIT_BYTES = 64 << 20  # of resized images kept; beyond that new images are resized every time

    def __init__(self):
        self._made: dict[bytes, np.ndarray] = {}
        self._held = 0

    def __call__(self, step: Resize, a: np.ndarray) -> np.ndarray:
        key = a.tobytes() + bytes(f"{a.shape}{step.size}", "ascii")
        out = self._made.get(key)
        if out is None:
            out = np.asarray(step.step(Image.fromarray(a)))
            if self._held + out.nbytes <= self.LIMIT_BYTES:
                self._made[key] = out
                self._held += out.nbytes
        return out


def _resize(x: torch.Tensor, step: Resize, params: AugmentParams, memo: ResizeMemo | None = None) -> torch.Tensor:
    """Through PIL, image by image (deterministic: the step itself), each distinct image once with a memo."""
    if x.dtype != torch.uint8:  # after a colour operation: integers 0..255, so uint8 holds them exactly
        x = x.permute(0, 2, 3, 1).to(torch.uint8)
    if tuple(x.shape[1:3]) == step.size:  # the step returns such an image unchanged
        return x
    if memo is None:
        out = [np.asarray(step.step(Image.fromarray(a))) for a in x.numpy()]
    else:
        out = [memo(step, a) for a in x.numpy()]
    return torch.from_numpy(np.stack(out))


def _crop(x: torch.Tensor, step: Crop, params: AugmentParams) -> torch.Tensor:
    """Zero padding, then one strided copy per image (faster than a gather)."""
    hw = (1, 2) if x.dtype == torch.uint8 else (2, 3)
    p, (h, w) = step.pad, step.size
    if p:
        shape = list(x.shape)
        shape[hw[0]] += 2 * p
        shape[hw[1]] += 2 * p
        padded = x.new_zeros(shape)
        padded.narrow(hw[0], p, x.shape[hw[0]]).narrow(hw[1], p, x.shape[hw[1]]).copy_(x)
        x = padded
    shape = list(x.shape)
    shape[hw[0]], shape[hw[1]] = h, w
    out = x.new_empty(shape)
    for k, (i, j) in enumerate(zip(params.top.tolist(), params.left.tolist())):
        out[k] = x[k].narrow(hw[0] - 1, i, h).narrow(hw[1] - 1, j, w)
    return out


def _jitter(x: torch.Tensor, step: Jitter, params: AugmentParams) -> torch.Tensor:
    """The operations in each image's order, one position at a time; factors as Pillow receives them (C
    floats rounded from Python floats); hue (3) and operations turned off (NaN) are skipped."""
    x = _as_float(x)
    orders = params.order
    factors = params.factors.to(torch.float32)
    for k in range(orders.shape[1]):
        ops = orders[:, k]
        factor = factors.gather(1, ops.clamp(max=2).view(-1, 1)).view(-1)
        ops = torch.where((ops > 2) | torch.isnan(factor), -1, ops)
        if bool((ops >= 0).any()):
            x = _jitter_(x, ops, factor)
    return x


def _flip(x: torch.Tensor, step: Flip, params: AugmentParams) -> torch.Tensor:
    if bool(params.flip.any()):
        idx = params.flip.nonzero().squeeze(1)
        x[idx] = x[idx].flip(2 if x.dtype == torch.uint8 else 3)
    return x


def _to_tensor(x: torch.Tensor, step: ToTensor, params: AugmentParams) -> torch.Tensor:
    return _as_float(x).div_(255)  # as ToTensor's ``.div(255)``


def _normalize(x: torch.Tensor, step: Normalize, params: AugmentParams) -> torch.Tensor:
    mean = torch.as_tensor(step.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(step.std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)


_RUN = {Resize: _resize, Crop: _crop, Jitter: _jitter, Flip: _flip, ToTensor: _to_tensor, Normalize: _normalize}


def run_exact(pipeline: Pipeline, images: np.ndarray, params: AugmentParams,
              memo: ResizeMemo | None = None) -> torch.Tensor:
    """The pipeline on a stack of RGB uint8 images (N, H, W, 3) with the given choices, as Pillow computes it;
    returns the normalised float32 (N, C, h, w). The caller's images are not modified. ``memo`` keeps the
    resizes for later calls."""
    x = torch.from_numpy(np.array(images, copy=True))  # the steps work in place
    for step in pipeline.steps:
        x = _resize(x, step, params, memo) if type(step) is Resize else _RUN[type(step)](x, step, params)
    return x.contiguous()


# ----------------------------------------------------------------------------------------------------------
# the batched pipeline, checked against PIL on its first call
# ----------------------------------------------------------------------------------------------------------

class BatchedPIL:
    """``transform`` (a ``Compose`` that `Pipeline.read` describes) applied to a stack of RGB uint8 images;
    see the module docstring."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline, self.transform = pipeline, pipeline.transform
        self.resized = ResizeMemo()
        self.checked = False
        self.exact = True  # False once the first-call check found a difference: PIL from then on

    @classmethod
    def build(cls, transform) -> BatchedPIL | None:
        pipeline = Pipeline.read(transform)
        return None if pipeline is None else cls(pipeline)

    @staticmethod
    def accepts(images: np.ndarray) -> bool:
        """A stack of RGB uint8 images, (N, H, W, 3)."""
        return isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 \
            and images.shape[-1] == 3 and images.shape[0] > 0

    def _reference(self, images: np.ndarray) -> torch.Tensor:
        return torch.stack([self.transform(img) for img in images])

    def _batched(self, images: np.ndarray) -> torch.Tensor:
        params = sample_exact(self.pipeline, images.shape[0], tuple(images.shape[1:3]))
        return run_exact(self.pipeline, images, params, self.resized)

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        """What ``torch.stack([transform(img) for img in images])`` returns, drawing from torch's global
        generator exactly as that would."""
        if not (self.exact and self.accepts(images)):
            return self._reference(images)
        if self.checked:
            return self._batched(images)
        before = torch.get_rng_state()
        out = self._batched(images)
        after = torch.get_rng_state()
        k = min(_CHECK_IMAGES, images.shape[0])
        torch.set_rng_state(before)
        ref = self._reference(images[:k])
        torch.set_rng_state(after)
        self.checked = True
        if not torch.equal(out[:k], ref):
            self.exact = False
            logger.warning("the batched image transform differs from PIL's in this environment (Pillow "
                           "version?); transforming image by image instead (slower, same results)")
            torch.set_rng_state(before)
            return self._reference(images)
        return out


_BATCHED: weakref.WeakKeyDictionary[object, BatchedPIL | None] = weakref.WeakKeyDictionary()


def batched(transform: Callable) -> BatchedPIL | None:
    """The (cached) `BatchedPIL` of ``transform``, or None when it cannot be batched."""
    try:
        return _BATCHED[transform]
    except KeyError:
        pass
    except TypeError:  # not weak-referenceable: build afresh
        return BatchedPIL.build(transform)
    out = _BATCHED[transform] = BatchedPIL.build(transform)
    return out
