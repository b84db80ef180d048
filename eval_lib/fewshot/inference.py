"""The network as the few-shot test runs it: eval mode, no gradients, rewritten once for speed.

On the CPU the few-shot test is the network's forward pass over tens of thousands of augmented support
images, and a DARTS cell is many small operations. ``inference_network(net, "fused")`` returns a copy of
``net`` (the caller's network is untouched) traced by torch.fx with four rewrites, each giving the same
features up to float rounding:

1. every BatchNorm folded into the convolution before it (`torch.fx.experimental.optimization.fuse`);
2. one ReLU per tensor: the ops of a cell each start with a ReLU of their input, so a state feeding several
   ops (and a cell output feeding the next two cells' preprocessing) was rectified several times; the
   ReLUs are not in place, so the first result serves them all;
3. no ``0 + x``: a node's sum of its edges starts from Python's ``sum`` start value, a copy of the first
   edge's output;
4. no padding before FactorizedReduce's shifted 1x1 stride-2 convolution when the input's height and width
   are even: that convolution reads only odd rows and columns, never the padded last ones;

and the channels_last memory format, which oneDNN's CPU convolutions prefer. ``eager`` returns the
network as it is (the reference the tests compare with). A network torch.fx cannot trace runs eagerly
(channels_last still applies), with a warning.
"""

from __future__ import annotations

import copy
import logging
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.optimization import fuse as fx_fuse

from search_lib.core.errors import UsageError, one_line

logger = logging.getLogger("metantknas.eval")

INFERENCE_MODES = ("fused", "eager")


def shifted_for_stride2(x: torch.Tensor) -> torch.Tensor:
    """``F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]`` as read by a 1x1 convolution of stride 2: for even height
    and width the padded last row and column are never read, so the unpadded view gives the same output."""
    if x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0:
        return x[:, :, 1:, 1:]
    return F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]


_SHIFT_INDEX = (slice(None), slice(None), slice(1, None), slice(1, None))


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return type(mod) is nn.ReLU and not mod.inplace
    if node.op == "call_function":
        return node.target in (torch.relu, F.relu) and not node.kwargs.get("inplace", False) and len(node.args) == 1
    return False


def _may_be_mutated(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a user of ``node`` may change it in place (a ``*_`` method, an ``inplace`` module or keyword):
    then sharing it with another consumer would be wrong, and it is left alone."""
    for user in node.users:
        if user.op == "call_method" and str(user.target).endswith("_") and not str(user.target).endswith("__"):
            return True
        if user.op == "call_module" and getattr(gm.get_submodule(user.target), "inplace", False):
            return True
        if user.kwargs.get("inplace", False) or (user.op == "call_function"
                                                 and getattr(user.target, "__name__", "").endswith("_")):
            return True
    return False


def _one_relu_per_tensor(gm: fx.GraphModule) -> int:
    first: dict[fx.Node, fx.Node] = {}
    removed = 0
    for node in list(gm.graph.nodes):
        if not _is_relu(gm, node) or not isinstance(node.args[0], fx.Node):
            continue
        if _may_be_mutated(gm, node):
            continue
        seen = first.setdefault(node.args[0], node)
        if seen is not node and not _may_be_mutated(gm, seen):
            node.replace_all_uses_with(seen)
            gm.graph.erase_node(node)
            removed += 1
    return removed


def _no_zero_add(gm: fx.GraphModule) -> int:
    removed = 0
    for node in list(gm.graph.nodes):
        if (node.op == "call_function" and node.target is operator.add and len(node.args) == 2
                and type(node.args[0]) is int and node.args[0] == 0 and isinstance(node.args[1], fx.Node)
                and not _may_be_mutated(gm, node) and not _may_be_mutated(gm, node.args[1])):
            node.replace_all_uses_with(node.args[1])
            gm.graph.erase_node(node)
            removed += 1
    return removed


def _is_stride2_1x1(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    mod = gm.get_submodule(node.target)
    return (isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1) and mod.stride == (2, 2)
            and mod.padding == (0, 0) and mod.dilation == (1, 1))


def _no_pad_before_shifted_conv(gm: fx.GraphModule) -> int:
    rewritten = 0
    for pad in list(gm.graph.nodes):
        if not (pad.op == "call_function" and pad.target is F.pad and len(pad.users) == 1
                and len(pad.args) == 2 and isinstance(pad.args[1], (tuple, list))
                and tuple(pad.args[1]) == (0, 1, 0, 1) and pad.kwargs.get("mode", "constant") == "constant"
                and not pad.kwargs.get("value") and set(pad.kwargs) <= {"mode", "value"}):
            continue
        (view,) = pad.users
        if not (view.op == "call_function" and view.target is operator.getitem and view.args[1] == _SHIFT_INDEX
                and view.users and all(_is_stride2_1x1(gm, user) for user in view.users)):
            continue
        with gm.graph.inserting_before(pad):
            shifted = gm.graph.call_function(shifted_for_stride2, (pad.args[0],))
        view.replace_all_uses_with(shifted)
        gm.graph.erase_node(view)
        gm.graph.erase_node(pad)
        rewritten += 1
    return rewritten


def inference_network(net: nn.Module, mode: str = "fused") -> nn.Module:
    """``net`` (in eval mode) as the few-shot test runs it; see the module docstring."""
    if mode not in INFERENCE_MODES:
        raise UsageError(f"unknown inference mode {mode!r}; use one of {', '.join(INFERENCE_MODES)}")
    if mode == "eager":
        return net
    assert not net.training, "BatchNorm is folded with its running statistics: eval mode only"
    net = copy.deepcopy(net).to(memory_format=torch.channels_last)
    try:
        gm = fx_fuse(net)
    except Exception as exc:  # torch.fx cannot trace every network; eagerly it computes the same features
        logger.warning("could not rewrite the network for the few-shot test (%s); running it eagerly",
                       one_line(exc, 120))
        return net
    counts = (_one_relu_per_tensor(gm), _no_zero_add(gm), _no_pad_before_shifted_conv(gm))
    gm.graph.lint()  # (no dead-code elimination: it would drop in-place method calls whose result is unused)
    gm.recompile()
    logger.debug("inference graph: %d duplicate ReLUs, %d zero additions, %d paddings removed", *counts)
    return gm
