"""Normalisations. Per-channel statistics (BatchNorm, InstanceNorm) are exact under removal; group statistics
are exact when whole groups go; statistics *over* the channels (LayerNorm, RMSNorm, LRN) change with every
removed channel, so those axes are frozen."""
from __future__ import annotations

import numpy as np

from ..rules import rule


@rule("BatchNormalization")
def batch_norm(node, c):
    """Per-channel scale, bias, mean, variance go with the channel: exact under removal."""
    x, y = node.input[0], node.output[0]
    c.same(x, y)
    for extra in node.output[1:]:  # training-mode running statistics
        if extra:
            c.link(extra, 0, y, 1)
    for i, p in enumerate(node.input[1:5]):
        c.role(p, ("norm_scale", "norm_bias", "stat", "stat")[i])
        c.producer(y, 1, p, 0) if c.const(p) is not None else c.link(p, 0, y, 1)


@rule("InstanceNormalization")
def instance_norm(node, c):
    """Statistics per (sample, channel) over axes 2+: channels are independent, axes 2+ stay whole."""
    x, y = node.input[0], node.output[0]
    c.same_except(x, y, range(2, c.rank(x)), "InstanceNormalization statistics run over this axis")
    for i, p in enumerate(node.input[1:3]):
        c.role(p, ("norm_scale", "norm_bias")[i])
        c.producer(y, 1, p, 0) if c.const(p) is not None else c.link(p, 0, y, 1)


@rule("GroupNormalization")
def group_norm(node, c):
    """Whole groups go together: the other groups' statistics stay exact; num_groups is rewritten."""
    x, y = node.input[0], node.output[0]
    c.same(x, y)
    groups = c.attr("num_groups")
    channels = c.shape(x)[1]
    if not isinstance(channels, int):
        c.freeze(x, 1, reason="channel count unknown")
        return
    per = channels // groups
    g = c.virtual(groups, "groups")
    c.link(x, 1, g, 0, np.arange(channels), np.arange(channels) // per)
    for i, p in enumerate(node.input[1:3]):
        c.role(p, ("norm_scale", "norm_bias")[i])
        size = c.shape(p)[0]
        if size == channels:
            c.link(p, 0, y, 1)
        else:  # opset 18 form: one parameter per group
            c.link(p, 0, g, 0)
    c.not_channel(x, range(2, c.rank(x)))  # spatial, statistics run over them

    def fix(rw, node, per=per):
        rw.set_attr(node, "num_groups", rw.new_shape(node.input[0])[1] // per)
    c.fixup(fix)


@rule("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
def layer_norm(node, c):
    """Axes before `axis` pass through; the normalised axes are frozen (their statistics would change)."""
    x, y = node.input[0], node.output[0]
    r = c.rank(x)
    axis = c.attr("axis", -1) % r
    reason = f"normalised by {node.op_type}: removing a channel changes the statistics of the rest"
    for ax in range(r):
        if ax < axis:
            c.link(x, ax, y, ax)
            for extra in node.output[1:]:
                if extra:
                    c.link(extra, ax, y, ax)
        else:
            c.freeze(x, ax, reason=reason)
            c.freeze(y, ax, reason=reason)
            for extra in node.output[1:]:
                if extra:
                    c.not_channel(extra, [ax])
    for p in node.input[1:3]:
        if p:
            c.role(p, "norm_scale" if p == node.input[1] else "norm_bias")
            pr = c.rank(p)
            for k in range(pr):
                # compare with x's shape (y has the same; onnx may have inferred none for y)
                c.link(p, k, y, r - pr + k) if c.shape(p)[k] == c.shape(x)[r - pr + k] else c.freeze(p, k)


@rule("LpNormalization", "MeanVarianceNormalization", "LRN")
def other_norm(node, c):
    """The normalised axis (LpNorm axis, LRN channels, MVN axes) is frozen; the rest pass through."""
    x, y = node.input[0], node.output[0]
    r = c.rank(x)
    if node.op_type == "LpNormalization":
        reduced = {c.attr("axis", -1) % r}
    elif node.op_type == "LRN":
        reduced = {1}
    else:
        reduced = {a % r for a in c.attr("axes", [0, 2, 3])}
    c.same_except(x, y, reduced, f"statistics of {node.op_type} run over this axis")
