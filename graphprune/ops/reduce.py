"""Pooling and reductions. Channels survive pooling; reducing *over* an axis couples all of its elements
unless the result under masking can be had from the kept elements: sums (a zeroed element adds nothing), means
(sum / original count) and max/min (the masked zeros join in), rewritten by fixups in ops/layernorm.py."""
from __future__ import annotations

from ..rules import rule
from .layernorm import FLOATS, extreme_with_zero, mean_as_sum

POOLS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "MaxRoiPool")


@rule(*POOLS)
def pool(node, c):
    """Batch and channels pass through; spatial axes are not channels; MaxPool indices output freezes."""
    x, y = node.input[0], node.output[0]
    if len(node.output) > 1 and node.output[1]:
        c.freeze_all("MaxPool indices encode channel positions")
        return
    r = c.rank(x)
    c.link(x, 0, y, 0)
    c.link(x, 1, y, 1)
    c.not_channel(x, range(2, r))
    c.not_channel(y, range(2, r))


# zero contributes nothing to these, so removing an element equals masking it
# (ReduceLogSum is log(ReduceSum): a zero adds nothing to the sum either)
SUM_LIKE = {"ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum"}
REDUCES = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


def reduced_axes(node, c):
    r = c.rank(node.input[0])
    axes = c.attr("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = c.const(node.input[1])
        if axes is None:
            return None
        axes = [int(a) for a in axes.reshape(-1)]
    if axes is None or len(axes) == 0:
        if c.attr("noop_with_empty_axes", 0):
            return []
        return list(range(r))
    return sorted(a % r for a in axes)


@rule(*REDUCES)
def reduce(node, c):
    """Kept axes pass through; a reduced axis stays free for sums, means and max/min (rewritten), else frozen."""
    x, y = node.input[0], node.output[0]
    axes = reduced_axes(node, c)
    if axes is None:
        c.freeze_all("reduction axes are not constant")
        return
    if len(node.input) > 1 and node.input[1]:
        c.not_channel(node.input[1])
    shape = c.shape(x)
    if node.op_type in SUM_LIKE:
        on_reduced = lambda ax: c.touch(x, ax)  # noqa: E731
    elif (node.op_type == "ReduceMean" and c.dtype(x) in FLOATS
          and all(isinstance(shape[ax], int) for ax in axes)):
        # mean over the original count = sum of the kept elements / that count, exact under masking: the
        # fixup rewrites it so (this is what lets hand-written LayerNorm / RMSNorm and channel means prune)
        on_reduced = lambda ax: c.touch(x, ax)  # noqa: E731
        keepdims = c.attr("keepdims", 1)
        c.fixup(lambda rw, node, axes=tuple(axes): mean_as_sum(rw, node, list(axes), keepdims))
    elif node.op_type in ("ReduceMax", "ReduceMin") and c.dtype(x) in FLOATS:
        # the masked original's extreme also sees the zeros: the fixup takes max/min with 0 (CBAM's channel max)
        on_reduced = lambda ax: c.touch(x, ax)  # noqa: E731
        c.fixup(lambda rw, node, axes=tuple(axes): extreme_with_zero(rw, node, list(axes)))
    else:
        reason = f"{node.op_type} over this axis: removing an element changes the result"
        on_reduced = lambda ax: c.freeze(x, ax, reason=reason)  # noqa: E731
    c.reduce_axes(x, y, axes, c.attr("keepdims", 1), on_reduced)


@rule("Softmax", "LogSoftmax", "Hardmax", until=12)
def softmax_flattened(node, c):
    """The op flattens every axis from `axis` (default 1) on into one and normalises over it: those axes are
    frozen; the rest pass through."""
    x, y = node.input[0], node.output[0]
    r = c.rank(x)
    axis = c.attr("axis", 1) % r
    c.same_except(x, y, set(range(axis, r)), f"{node.op_type} normalises over this axis")


@rule("Softmax", "LogSoftmax", "Hardmax", since=13)
def softmax(node, c):
    """The normalised axis is frozen; the rest pass through."""
    x, y = node.input[0], node.output[0]
    axis = c.attr("axis", -1) % c.rank(x)
    c.same_except(x, y, {axis}, f"{node.op_type} normalises over this axis")


@rule("ArgMax", "ArgMin")
def argmax(node, c):
    """The searched axis is frozen (positions are returned); the rest pass through."""
    x, y = node.input[0], node.output[0]
    r = c.rank(x)
    axis = c.attr("axis", 0) % r
    reason = f"{node.op_type} returns positions along this axis"
    c.reduce_axes(x, y, {axis}, c.attr("keepdims", 1), lambda ax: c.freeze(x, ax, reason=reason))


@rule("TopK")
def topk(node, c):
    """The selection axis is frozen; the rest pass through."""
    x = node.input[0]
    r = c.rank(x)
    axis = c.attr("axis", -1) % r
    c.not_channel(node.input[1])
    for ax in range(r):
        for out in node.output:
            if ax == axis:
                c.freeze(x, ax, reason="TopK selects along this axis")
                c.freeze(out, ax, reason="TopK selects along this axis")
            else:
                c.link(x, ax, out, ax)
