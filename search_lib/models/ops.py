"""Candidate operations of the cell search spaces (docs/method.md §1).

`OPS` is a registry of constructors ``(C_in, C_out, stride, affine) -> nn.Module``; `SEARCH_SPACES` maps
each space name to its ordered operation list (the order fixes the columns of the architecture
parameters). Every ReLU is non-inplace: Opacus' per-sample-gradient hooks fail on in-place
activations right after a hooked module (docs/method.md §8). No conv in a cell has a bias.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from search_lib.core.errors import UsageError


class Registry:
    """Name -> object mapping that refuses duplicates and lists the valid names on a miss."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def deco(fn: Callable) -> Callable:
            if name in self._items:
                raise ValueError(f"duplicate {self.kind} {name!r}")
            self._items[name] = fn
            return fn

        return deco

    def __getitem__(self, name: str) -> Callable:
        try:
            return self._items[name]
        except KeyError:
            raise UsageError(f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self._items))}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        return list(self._items)


OPS = Registry("operation")

SEARCH_SPACES: dict[str, tuple[str, ...]] = {
    "darts_fewshot": ("none", "skip_connect", "sep_conv_3x3", "dil_conv_3x3", "avg_pool_3x3BN",
                      "max_pool_3x3BN", "conv_1x5_5x1", "conv_3x3"),
    "darts": ("none", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
              "avg_pool_3x3", "max_pool_3x3"),
}


def space_ops(space: str) -> tuple[str, ...]:
    """The ordered operation list of a search space; UsageError naming the valid spaces otherwise."""
    try:
        return SEARCH_SPACES[space]
    except KeyError:
        raise UsageError(f"unknown search space {space!r}; valid: {', '.join(SEARCH_SPACES)}") from None


# --------------------------------------------------------------------------------------------------
# Building blocks


class ReLUConvBN(nn.Sequential):
    """ReLU -> conv (no bias) -> BN; the cell preprocessing and the darts-space pool adapter."""

    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """ReLU -> depthwise k x k conv -> pointwise 1x1 conv -> BN (one SepConv of docs/method.md §1)."""

    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int, dilation: int,
                 affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel, stride=stride, padding=padding, dilation=dilation, groups=C_in,
                      bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class DualSepConv(nn.Sequential):
    """Two SepConvs in a row; only the first one strides (sep_conv_3x3 / sep_conv_5x5)."""

    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            SepConv(C_in, C_in, kernel, stride, padding, 1, affine),
            SepConv(C_in, C_out, kernel, 1, padding, 1, affine),
        )


class Conv1x5_5x1(nn.Sequential):
    """ReLU -> 1x5 conv (strided) -> 5x1 conv -> BN."""

    def __init__(self, C_in: int, C_out: int, stride: int, affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, (1, 5), stride=stride, padding=(0, 2), bias=False),
            nn.Conv2d(C_out, C_out, (5, 1), stride=1, padding=(2, 0), bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class PoolBN(nn.Sequential):
    """3x3 pooling (stride, pad 1; average excludes padding) -> BN."""

    def __init__(self, kind: str, C: int, stride: int, affine: bool = True):
        pool = (nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False) if kind == "avg"
                else nn.MaxPool2d(3, stride=stride, padding=1))
        super().__init__(pool, nn.BatchNorm2d(C, affine=affine))


class Pool(nn.Sequential):
    """darts-space pooling: a ReLU-conv1x1-BN adapter first when the channel counts differ."""

    def __init__(self, kind: str, C_in: int, C_out: int, stride: int, affine: bool = True):
        layers: list[nn.Module] = []
        if C_in != C_out:
            layers.append(ReLUConvBN(C_in, C_out, 1, 1, 0, affine))
        layers.append(nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False) if kind == "avg"
                      else nn.MaxPool2d(3, stride=stride, padding=1))
        super().__init__(*layers)


class Zero(nn.Module):
    """The `none` op: zeros of the output shape (spatial size divided by the stride)."""

    def __init__(self, C_in: int, C_out: int, stride: int):
        super().__init__()
        self.C_out, self.stride = C_out, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        s = self.stride
        return x.new_zeros(n, self.C_out, (h + s - 1) // s, (w + s - 1) // s)


class FactorizedReduce(nn.Module):
    """ReLU -> two 1x1 stride-2 convs (the second on the input shifted by one pixel) -> concat -> BN."""

    def __init__(self, C_in: int, C_out: int, affine: bool = True):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out - C_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


# --------------------------------------------------------------------------------------------------
# The registry. Constructors take (C_in, C_out, stride, affine).

OPS.register("none")(lambda C_in, C_out, stride, affine=True: Zero(C_in, C_out, stride))


@OPS.register("skip_connect")
def _skip(C_in: int, C_out: int, stride: int, affine: bool = True) -> nn.Module:
    if stride == 1 and C_in == C_out:
        return nn.Identity()
    return FactorizedReduce(C_in, C_out, affine)


OPS.register("sep_conv_3x3")(lambda C_in, C_out, stride, affine=True: DualSepConv(C_in, C_out, 3, stride, 1, affine))
OPS.register("sep_conv_5x5")(lambda C_in, C_out, stride, affine=True: DualSepConv(C_in, C_out, 5, stride, 2, affine))
OPS.register("dil_conv_3x3")(lambda C_in, C_out, stride, affine=True: SepConv(C_in, C_out, 3, stride, 2, 2, affine))
OPS.register("dil_conv_5x5")(lambda C_in, C_out, stride, affine=True: SepConv(C_in, C_out, 5, stride, 4, 2, affine))
# Despite its name, the few-shot space's conv_3x3 is a single separable 3x3 conv.
OPS.register("conv_3x3")(lambda C_in, C_out, stride, affine=True: SepConv(C_in, C_out, 3, stride, 1, 1, affine))
OPS.register("conv_1x5_5x1")(lambda C_in, C_out, stride, affine=True: Conv1x5_5x1(C_in, C_out, stride, affine))
OPS.register("avg_pool_3x3BN")(lambda C_in, C_out, stride, affine=True: PoolBN("avg", C_out, stride, affine))
OPS.register("max_pool_3x3BN")(lambda C_in, C_out, stride, affine=True: PoolBN("max", C_out, stride, affine))
OPS.register("avg_pool_3x3")(lambda C_in, C_out, stride, affine=True: Pool("avg", C_in, C_out, stride, affine))
OPS.register("max_pool_3x3")(lambda C_in, C_out, stride, affine=True: Pool("max", C_in, C_out, stride, affine))


def build_op(name: str, C_in: int, C_out: int, stride: int, affine: bool = True) -> nn.Module:
    return OPS[name](C_in, C_out, stride, affine)
