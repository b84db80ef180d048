"""The augmentation steps of an image pipeline, described once, and the two ways of drawing their choices.

The torchvision ``Compose`` objects that `transforms.build_transform` builds are the source of truth (transform
A: optional resize, RandomCrop with zero padding, ColorJitter, RandomHorizontalFlip, ToTensor, Normalize; the
search's TENAS: Resize, flip, RandomCrop). `Pipeline.read` turns such a ``Compose`` into a tuple of plain step
descriptions (`Resize`, `Crop`, `Jitter`, `Flip`, `ToTensor`, `Normalize`: sizes, padding, jitter ranges,
flip probability, mean and std, read from the torchvision objects), or None for a step it does not know.

The random choices of a stack of N images are one `AugmentParams` (crop offsets, flips, jitter factors and
order), drawn by either sampler:

* `sample_exact`: torch's global generator, image after image and step after step with torchvision's own
  ``get_params`` / ``torch.rand`` calls, so every image gets what ``transform(image)`` would give it and the
  generator ends in the same state (the few-shot test's support copies, the search's batches);
* `sample_device`: a seeded ``torch.Generator`` (on any device), the whole batch at once (the training's
  ``--gpu_augment``), so an epoch's augmentations are a function of its seed.

Two executors apply a pipeline with given choices to a stack: `pil_batch` (uint8 arithmetic bit-identical
to Pillow's) and `tensor_augment` (float tensor operations on the CPU or a GPU, torchvision's tensor
colour formulas). Either sampler's choices suit either executor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

# ----------------------------------------------------------------------------------------------------------
# the project's own two PIL steps (the rest are torchvision's)
# ----------------------------------------------------------------------------------------------------------


class ToPIL:
    """HWC uint8 numpy (or a PIL image) -> RGB PIL image."""

    def __call__(self, img):
        if isinstance(img, Image.Image):
            return img
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            arr = arr.astype(np.uint8)
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        return Image.fromarray(arr)

    def __repr__(self) -> str:
        return "ToPIL()"


class ResizeIfNeeded:
    """Resize to size x size only when the image is not already that size (keeps RFS A exact at 84)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.size == (self.size, self.size):
            return img
        return img.resize((self.size, self.size), Image.BILINEAR)

    def __repr__(self) -> str:
        return f"ResizeIfNeeded({self.size})"


# ----------------------------------------------------------------------------------------------------------
# the step descriptions
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resize:
    """A deterministic bilinear resize to ``size`` (h, w); an image already that size is left as it is (as
    torchvision's ``F.resize`` and `ResizeIfNeeded` do). ``step`` is the PIL step itself."""

    size: tuple[int, int]
    step: Callable


@dataclass(frozen=True)
class Crop:
    """``T.RandomCrop(size, padding=pad)`` with zero fill: pad every side by ``pad``, then a uniform offset."""

    size: tuple[int, int]
    pad: int

    def span(self, shape: tuple[int, int]) -> tuple[int, int]:
        """The number of possible (top, left) offsets in an image of ``shape`` (h, w)."""
        return shape[0] + 2 * self.pad - self.size[0] + 1, shape[1] + 2 * self.pad - self.size[1] + 1


@dataclass(frozen=True)
class Jitter:
    """``T.ColorJitter`` without hue: the (low, high) factor range of brightness, contrast and saturation,
    None for an operation that is off. The operations come in a random order per image."""

    ranges: tuple[tuple[float, float] | None, tuple[float, float] | None, tuple[float, float] | None]


@dataclass(frozen=True)
class Flip:
    """``T.RandomHorizontalFlip(p)``."""

    p: float


@dataclass(frozen=True)
class ToTensor:
    """0..255 -> [0, 1] float32, channels first."""


@dataclass(frozen=True)
class Normalize:
    mean: tuple[float, ...]
    std: tuple[float, ...]


RANDOM_STEPS = (Crop, Jitter, Flip)


def describe_step(t):
    """The description of torchvision (or project) step ``t``, `ToPIL` for the first step, or None when ``t`` is
    not a step the executors reproduce (another padding mode, a hue jitter, RandomResizedCrop, ...)."""
    kind = type(t)
    if kind is ToPIL:
        return t
    if kind is ResizeIfNeeded:
        return Resize((t.size, t.size), t)
    if kind is T.Resize:
        if isinstance(t.size, (list, tuple)) and len(t.size) == 2 and t.max_size is None \
                and t.interpolation == InterpolationMode.BILINEAR:
            return Resize((int(t.size[0]), int(t.size[1])), t)
        return None
    if kind is T.RandomCrop:
        if (isinstance(t.padding, int) or t.padding is None) and t.fill == 0 and t.padding_mode == "constant" \
                and not t.pad_if_needed:
            return Crop((int(t.size[0]), int(t.size[1])), int(t.padding or 0))
        return None
    if kind is T.ColorJitter:
        if t.hue is not None:
            return None
        return Jitter(tuple(None if r is None else (float(r[0]), float(r[1]))
                            for r in (t.brightness, t.contrast, t.saturation)))
    if kind is T.RandomHorizontalFlip:
        return Flip(float(t.p))
    if kind is T.ToTensor:
        return ToTensor()
    if kind is T.Normalize:
        if t.inplace:
            return None
        return Normalize(tuple(float(m) for m in t.mean), tuple(float(s) for s in t.std))
    return None


@dataclass(frozen=True)
class Pipeline:
    """A ``Compose`` read as step descriptions: ``ToPIL`` first, image steps, ``ToTensor``, optionally
    ``Normalize``; each random step at most once. ``transform`` is the ``Compose`` (the reference)."""

    steps: tuple
    transform: Callable

    @classmethod
    def read(cls, transform) -> Pipeline | None:
        if type(transform) is not T.Compose or not transform.transforms:
            return None
        steps = [describe_step(t) for t in transform.transforms]
        if any(s is None for s in steps) or not isinstance(steps[0], ToPIL) or ToTensor() not in steps:
            return None
        steps = steps[1:]
        kinds = [type(s) for s in steps]
        tail = kinds[kinds.index(ToTensor):]
        if tail not in ([ToTensor], [ToTensor, Normalize]) or any(kinds.count(k) > 1 for k in RANDOM_STEPS):
            return None
        return cls(tuple(steps), transform)

    def step(self, kind):
        """The step of type ``kind`` (`Crop`, `Jitter`, `Flip`, `Normalize`), or None."""
        return next((s for s in self.steps if type(s) is kind), None)

    def shapes(self, shape: tuple[int, int]) -> list[tuple[int, int]]:
        """The (h, w) entering each step, for images of ``shape``."""
        out = []
        for s in self.steps:
            out.append(shape)
            if isinstance(s, (Resize, Crop)):
                shape = s.size
        return out

    def out_size(self, shape: tuple[int, int]) -> tuple[int, int]:
        sizes = [s.size for s in self.steps if isinstance(s, (Resize, Crop))]
        return sizes[-1] if sizes else tuple(shape)


# ----------------------------------------------------------------------------------------------------------
# the random choices and their two samplers
# ----------------------------------------------------------------------------------------------------------

@dataclass
class AugmentParams:
    """The random choices of N images; a field is None when the pipeline has no such step.

    ``order`` holds, per image, the jitter operations in the order applied (0 brightness, 1 contrast,
    2 saturation; torchvision's 3, hue, is never applied); ``factors`` (N, 3) their factors, NaN where an
    operation is off.
    """

    top: torch.Tensor | None = None       # (N,) long: crop offsets, in the padded image
    left: torch.Tensor | None = None      # (N,) long
    flip: torch.Tensor | None = None      # (N,) bool
    factors: torch.Tensor | None = None   # (N, 3) float: brightness, contrast, saturation
    order: torch.Tensor | None = None     # (N, 3) or (N, 4) long: a permutation per image

    def _map(self, fn) -> AugmentParams:
        return AugmentParams(*(None if v is None else fn(v) for v in (getattr(self, f.name) for f in fields(self))))

    def select(self, index) -> AugmentParams:
        """The choices of images ``index`` (a slice or an index tensor)."""
        return self._map(lambda v: v[index])

    def to(self, device) -> AugmentParams:
        return self._map(lambda v: v.to(device))


def sample_exact(pipeline: Pipeline, n: int, shape: tuple[int, int]) -> AugmentParams:
    """The choices ``transform(image)`` makes for n images of ``shape`` (h, w), one after the other: torch's
    global generator, torchvision's own draws in the ``Compose``'s order (so the generator ends where n calls
    of the transform leave it)."""
    shapes = pipeline.shapes(shape)
    randoms = [(s, shapes[k]) for k, s in enumerate(pipeline.steps) if isinstance(s, RANDOM_STEPS)]
    dummies = {}  # RandomCrop.get_params reads only the size of its image
    crops, flips, orders, factors = [], [], [], []
    for _ in range(int(n)):
        for step, (h, w) in randoms:
            if isinstance(step, Crop):
                padded = (h + 2 * step.pad, w + 2 * step.pad)
                if padded not in dummies:
                    dummies[padded] = torch.empty(1, 1, 1).expand(3, *padded)
                crops.append(T.RandomCrop.get_params(dummies[padded], step.size)[:2])
            elif isinstance(step, Jitter):
                order, *f, _ = T.ColorJitter.get_params(*step.ranges, None)
                orders.append(order)
                factors.append([np.nan if v is None else v for v in f])
            else:
                flips.append(bool(torch.rand(1) < step.p))
    params = AugmentParams()
    if crops:
        params.top, params.left = torch.tensor(crops, dtype=torch.long).reshape(-1, 2).unbind(1)
    if flips:
        params.flip = torch.tensor(flips, dtype=torch.bool)
    if orders:
        params.order = torch.stack(orders)
        params.factors = torch.tensor(factors, dtype=torch.float64)  # the Python floats PIL receives
    return params


def sample_device(pipeline: Pipeline, n: int, shape: tuple[int, int], generator: torch.Generator) -> AugmentParams:
    """Choices for a batch of n images of ``shape`` from ``generator``, on its device, all images at once:
    the crop offsets (tops, then lefts), the flips, then the jitter factors and the jitter order. Offsets and
    flips are uniform as torchvision's; each jitter factor is uniform in its range and the three operations
    come in a uniformly random order."""
    dev, n = generator.device, int(n)
    params = AugmentParams()
    crop, flip, jitter = (pipeline.step(k) for k in (Crop, Flip, Jitter))
    if crop is not None:
        span_h, span_w = crop.span(pipeline.shapes(shape)[pipeline.steps.index(crop)])
        params.top = torch.randint(0, span_h, (n,), generator=generator, device=dev)
        params.left = torch.randint(0, span_w, (n,), generator=generator, device=dev)
    if flip is not None:
        params.flip = torch.rand(n, generator=generator, device=dev) < flip.p
    if jitter is not None:
        u = torch.rand(n, 3, generator=generator, device=dev)
        on = [r is not None for r in jitter.ranges]
        ranges = [r if r is not None else (1.0, 1.0) for r in jitter.ranges]
        centre = torch.tensor([(lo + hi) / 2 for lo, hi in ranges], dtype=u.dtype, device=dev)
        half = torch.tensor([(hi - lo) / 2 for lo, hi in ranges], dtype=u.dtype, device=dev)
        factors = centre + half * (2.0 * u - 1.0)
        if not all(on):
            factors[:, [k for k in range(3) if not on[k]]] = float("nan")
        params.factors = factors
        params.order = torch.argsort(torch.rand(n, 3, generator=generator, device=dev), dim=1)
    return params
