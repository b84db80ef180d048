"""A PIL transform pipeline applied to a whole stack of images at once, bit for bit.

The few-shot test transforms every support image of every episode several times with the *training*
transform (RFS's transform A: zero-padded random crop, colour jitter, horizontal flip): 30,000 images for
the demo's 4 x 100 episodes. Through PIL one image costs about 0.3 ms, almost all of it Python and object
overhead around a few thousand pixels, which made the transforms a third of the test on 2 CPU cores.

`BatchedPIL.build(transform)` reads a torchvision ``Compose`` made of steps it knows (`_STEPS`) and returns
an object that gives exactly what ``torch.stack([transform(img) for img in images])`` gives:

* the random choices are drawn image after image, step after step, with each step's own ``get_params`` /
  ``torch.rand`` calls, in the order the ``Compose`` would make them, so the torch generator is left in the
  same state and every image gets the same crop, jitter factors and order, and flip;
* the steps then run on the whole stack as uint8 arithmetic that reproduces Pillow's: ``Image.blend``
  computes ``in1 + alpha * (in2 - in1)`` in float32 and truncates (clipping when extrapolating); grey
  levels are ``(299 R + 587 G + 114 B) / 1000`` in Pillow's 16-bit fixed point, rounded; the contrast
  reference is the mean grey level rounded to an integer (``ImageEnhance.Contrast``); ``ToTensor`` and
  ``Normalize`` are the same float32 operations torchvision applies.

The per-image PIL pipeline stays the reference (tests/test_pil_batch.py compares the two on random images,
sizes and seeds). Because Pillow's arithmetic is not a documented interface, the first call of every
`BatchedPIL` also checks its first images against the reference; on any difference it warns once and
falls back to PIL for good. A pipeline with a step not listed here (RandomResizedCrop, a hue jitter,
another padding mode, ...) is not batched: `build` returns None and the caller transforms image by image.
"""

from __future__ import annotations

import logging
import weakref
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

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
# the steps: each draws its per-image choices (``draw``) and applies them to the stack (``apply``)
# ----------------------------------------------------------------------------------------------------------

class _Step:
    random = False

    def draw(self, shape: tuple[int, int]) -> tuple:  # shape (H, W) of the image entering the step
        return ()

    def out_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        return shape

    def apply(self, x: torch.Tensor, params: list[tuple]) -> torch.Tensor:
        """x: uint8 (N, H, W, 3) or, once a step needed arithmetic, float32 (N, 3, H, W) (`_as_float`)."""
        raise NotImplementedError


class _ToPILStep(_Step):
    def apply(self, x, params):
        return x


class _ResizeStep(_Step):
    """`transforms._ResizeIfNeeded`: deterministic, so it runs per image through PIL itself, and remembers what
    it made of each image (by its bytes): the few-shot test resizes every support image once per copy and
    episode (the digits' 4 x 100 episodes: 30,000 resizes of a few hundred distinct images)."""

    CACHE_BYTES = 64 << 20  # of resized images kept; beyond that new images are resized every time

    def __init__(self, size: int):
        self.size = int(size)
        self._made: dict[bytes, np.ndarray] = {}
        self._held = 0

    def out_shape(self, shape):
        return (self.size, self.size)

    def _resized(self, a: np.ndarray) -> np.ndarray:
        key = a.tobytes() + bytes(str(a.shape), "ascii")
        out = self._made.get(key)
        if out is None:
            out = np.asarray(Image.fromarray(a).resize((self.size, self.size), Image.BILINEAR))
            if self._held + out.nbytes <= self.CACHE_BYTES:
                self._made[key] = out
                self._held += out.nbytes
        return out

    def apply(self, x, params):
        if x.dtype != torch.uint8:  # after a colour operation: integers 0..255, so uint8 holds them exactly
            x = x.permute(0, 2, 3, 1).to(torch.uint8)
        if tuple(x.shape[1:3]) == (self.size, self.size):
            return x
        return torch.from_numpy(np.stack([self._resized(a) for a in x.numpy()]))


class _CropStep(_Step):
    """``T.RandomCrop(size, padding=int)`` with zero fill: pad, then ``get_params`` on the padded image."""

    random = True

    def __init__(self, t: T.RandomCrop):
        self.size, self.pad = tuple(t.size), int(t.padding or 0)
        self._dummies: dict[tuple[int, int], torch.Tensor] = {}

    def draw(self, shape):
        padded = (shape[0] + 2 * self.pad, shape[1] + 2 * self.pad)
        dummy = self._dummies.get(padded)
        if dummy is None:  # get_params only reads the size of its image
            dummy = self._dummies[padded] = torch.empty(1, 1, 1).expand(3, *padded)
        i, j, _, _ = T.RandomCrop.get_params(dummy, self.size)
        return (i, j)

    def out_shape(self, shape):
        return self.size

    def apply(self, x, params):
        hw = (1, 2) if x.dtype == torch.uint8 else (2, 3)
        p, (h, w) = self.pad, self.size
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
        for k, (i, j) in enumerate(params):  # one strided copy per image: faster than a gather
            out[k] = x[k].narrow(hw[0] - 1, i, h).narrow(hw[1] - 1, j, w)
        return out


class _JitterStep(_Step):
    """``T.ColorJitter(brightness, contrast, saturation)`` (no hue): factors and order per image."""

    random = True

    def __init__(self, t: T.ColorJitter):
        self.t = t

    def draw(self, shape):
        t = self.t
        order, b, c, s, _ = T.ColorJitter.get_params(t.brightness, t.contrast, t.saturation, t.hue)
        return (order, (b, c, s))

    def apply(self, x, params):
        x = _as_float(x)
        orders = torch.stack([p[0] for p in params])  # (N, 4): a permutation of 0..3 per image
        factors = torch.tensor([[np.nan if f is None else f for f in p[1]] for p in params], dtype=torch.float64)
        factors = factors.to(torch.float32)  # as Pillow receives them: C floats rounded from Python floats
        for k in range(orders.shape[1]):
            ops = orders[:, k]
            factor = factors.gather(1, ops.clamp(max=2).view(-1, 1)).view(-1)
            ops = torch.where((ops > 2) | torch.isnan(factor), -1, ops)  # hue, or an operation turned off
            if bool((ops >= 0).any()):
                x = _jitter_(x, ops, factor)
        return x


class _FlipStep(_Step):
    random = True

    def __init__(self, t: T.RandomHorizontalFlip):
        self.p = t.p

    def draw(self, shape):
        return (bool(torch.rand(1) < self.p),)

    def apply(self, x, params):
        flip = torch.tensor([p[0] for p in params], dtype=torch.bool)
        if bool(flip.any()):
            idx = flip.nonzero().squeeze(1)
            x[idx] = x[idx].flip(2 if x.dtype == torch.uint8 else 3)
        return x


class _ToTensorStep(_Step):
    def apply(self, x, params):  # 0..255 -> [0, 1], as ToTensor's ``.div(255)``
        return _as_float(x).div_(255)


class _NormalizeStep(_Step):
    def __init__(self, t: T.Normalize):
        self.mean = torch.as_tensor(t.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(t.std, dtype=torch.float32).view(1, -1, 1, 1)

    def apply(self, x, params):
        return x.sub_(self.mean).div_(self.std)


def _step_for(t) -> _Step | None:
    """The batched step equal to torchvision step ``t``, or None when ``t`` is not one that can be batched."""
    from .transforms import _ResizeIfNeeded, _ToPIL  # the project's own two PIL steps

    if type(t) is _ToPIL:
        return _ToPILStep()
    if type(t) is _ResizeIfNeeded:
        return _ResizeStep(t.size)
    if type(t) is T.RandomCrop:
        if (isinstance(t.padding, int) or t.padding is None) and t.fill == 0 and t.padding_mode == "constant" \
                and not t.pad_if_needed:
            return _CropStep(t)
        return None
    if type(t) is T.ColorJitter:
        return _JitterStep(t) if t.hue is None else None
    if type(t) is T.RandomHorizontalFlip:
        return _FlipStep(t)
    if type(t) is T.ToTensor:
        return _ToTensorStep()
    if type(t) is T.Normalize:
        return _NormalizeStep(t)
    return None


# ----------------------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------------------

class BatchedPIL:
    """``transform`` (a Compose of `_step_for` steps, starting from the uint8 HWC -> PIL step and ending
    with ToTensor, optionally Normalize) applied to a stack of RGB uint8 images; see the module docstring."""

    def __init__(self, transform: Callable, steps: list[_Step]):
        self.transform, self.steps = transform, steps
        self.checked = False
        self.exact = True  # False once the first-call check found a difference: PIL from then on

    @classmethod
    def build(cls, transform) -> "BatchedPIL | None":
        if type(transform) is not T.Compose or not transform.transforms:
            return None
        steps = [_step_for(t) for t in transform.transforms]
        if any(s is None for s in steps) or not isinstance(steps[0], _ToPILStep):
            return None
        kinds = [type(s) for s in steps]
        if _ToTensorStep not in kinds or any(k not in (_ToTensorStep, _NormalizeStep)
                                             for k in kinds[kinds.index(_ToTensorStep):]):
            return None
        return cls(transform, steps)

    @staticmethod
    def accepts(images: np.ndarray) -> bool:
        """A stack of RGB uint8 images, (N, H, W, 3)."""
        return isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 \
            and images.shape[-1] == 3 and images.shape[0] > 0

    def _reference(self, images: np.ndarray) -> torch.Tensor:
        return torch.stack([self.transform(img) for img in images])

    def _batched(self, images: np.ndarray) -> torch.Tensor:
        shapes = []
        shape = tuple(images.shape[1:3])
        for step in self.steps:  # the shape entering each step (all images share it)
            shapes.append(shape)
            shape = step.out_shape(shape)
        randoms = [k for k, s in enumerate(self.steps) if s.random]
        params = {k: [] for k in randoms}
        for _ in range(images.shape[0]):  # the Compose's order: image by image, step by step
            for k in randoms:
                params[k].append(self.steps[k].draw(shapes[k]))
        x = torch.from_numpy(np.array(images, copy=True))  # the steps work in place: never on the caller's
        for k, step in enumerate(self.steps):
            x = step.apply(x, params.get(k, []))
        return x.contiguous()

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


_BATCHED: "weakref.WeakKeyDictionary[object, BatchedPIL | None]" = weakref.WeakKeyDictionary()


def batched(transform) -> BatchedPIL | None:
    """The (cached) `BatchedPIL` of ``transform``, or None when it cannot be batched."""
    try:
        return _BATCHED[transform]
    except KeyError:
        pass
    except TypeError:  # not weak-referenceable: build afresh
        return BatchedPIL.build(transform)
    out = _BATCHED[transform] = BatchedPIL.build(transform)
    return out
