"""Layers with weights: Conv, ConvTranspose, Gemm, MatMul.

Output channels are rows of the weight (producers), input channels are its columns (consumers): a plain
conv couples nothing across itself, so the channels before and after it are separate groups.
"""
from __future__ import annotations

import numpy as np

from ..rules import rule
from .elementwise import broadcast


def _conv_common(node, c):
    """What Conv and ConvTranspose share: batch passes through, spatial axes and kernel taps are not channels.
    Returns (x, w, b, y, x shape, w shape, group), or None when shapes are unknown (all frozen)."""
    x, w = node.input[0], node.input[1]
    b = node.input[2] if len(node.input) > 2 else ""
    y = node.output[0]
    ws, xs = c.shape(w), c.shape(x)
    if ws is None or xs is None:
        c.freeze_all("weight or input shape unknown")
        return None
    c.not_channel(x, range(2, len(xs)))
    c.not_channel(y, range(2, len(xs)))
    c.not_channel(w, range(2, len(ws)))
    c.link(x, 0, y, 0)
    c.role(w, "weight")
    c.role(b, "bias")
    return x, w, b, y, xs, ws, c.attr("group", 1)


@rule("Conv")
def conv(node, c):
    """Output channels are weight rows, input channels weight columns; depthwise couples in and out; group conv removes the same local channel from every group."""
    layout = _conv_common(node, c)
    if layout is None:
        return
    x, w, b, y, xs, ws, group = layout
    c_in, c_out, per_group_in = xs[1], ws[0], ws[1]
    c.producer(y, 1, w, 0)
    if b:
        c.producer(y, 1, b, 0)
    if group == 1:
        c.consumer(x, 1, w, 1)
        return
    if not isinstance(c_in, int):
        c.freeze_all("grouped conv with unknown input channels")
        return
    if per_group_in == 1:
        # Depthwise (channel multiplier m): input channel k feeds output channels [k*m, (k+1)*m).
        m = c_out // group
        c.link(x, 1, y, 1, np.repeat(np.arange(c_in), m), np.arange(c_out))
        c.not_channel(w, [1])
        c.fixup(_fix_depthwise_group)
        return
    # General group conv: remove the same local index from every group, so `group` stays and every
    # group keeps an equal share (input local l -> weight column l; output local p -> rows p, p+m, ...).
    m_out = c_out // group
    c.link(x, 1, w, 1, np.arange(c_in), np.arange(c_in) % per_group_in)
    local = c.virtual(m_out, "out_local")
    c.link(y, 1, local, 0, np.arange(c_out), np.arange(c_out) % m_out)


def _fix_depthwise_group(rw, node):
    rw.set_attr(node, "group", rw.new_shape(node.input[0])[1])


@rule("ConvTranspose")
def conv_transpose(node, c):
    """Input channels are weight rows, output channels weight columns (bias too); depthwise transpose couples in and out."""
    layout = _conv_common(node, c)
    if layout is None:
        return
    x, w, b, y, xs, ws, group = layout
    if b:
        c.producer(y, 1, b, 0)
    if group == 1:
        c.consumer(x, 1, w, 0)
        c.producer(y, 1, w, 1)
    elif ws[1] == 1 and xs[1] == group:
        # depthwise transpose: input channel k makes output channel k
        c.link(x, 1, w, 0)
        c.link(x, 1, y, 1)
        c.not_channel(w, [1])
        c.fixup(_fix_depthwise_group)
    else:
        c.freeze_all("grouped ConvTranspose with more than one channel per group is not mapped")


@rule("Gemm")
def gemm(node, c):
    """A's K axis is contracted against B (transA/transB honoured); N is produced by B and the bias."""
    a, b = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 else ""
    y = node.output[0]
    ka = 0 if c.attr("transA", 0) else 1
    kb = 1 if c.attr("transB", 0) else 0
    c.link(a, 1 - ka, y, 0)
    if c.const(b) is not None:
        c.role(b, "weight")
        c.consumer(a, ka, b, kb)
        c.producer(y, 1, b, 1 - kb)
    else:
        c.contraction(a, ka, b, kb)
        c.link(b, 1 - kb, y, 1)
    if bias:
        c.role(bias, "bias")
        ys, bs = c.shape(y), c.shape(bias)
        if c.const(bias) is not None and bs is not None and len(bs) == 1 and ys and bs[0] == ys[1] != 1:
            c.producer(y, 1, bias, 0)
        else:
            broadcast(c, [bias], y)


@rule("MatMul")
def matmul(node, c):
    """K contracted across both operands, M and N pass to the output, batch axes broadcast; a constant B is a weight."""
    a, b = node.input[0], node.input[1]
    y = node.output[0]
    ra, rb, ry = c.rank(a), c.rank(b), c.rank(y)
    if ra is None or rb is None or ry is None:
        c.freeze_all("operand rank unknown")
        return
    ka = ra - 1
    kb = rb - 2 if rb >= 2 else 0
    b_const = c.const(b) is not None and rb == 2
    if b_const:
        c.role(b, "weight")
        c.consumer(a, ka, b, kb)
        c.producer(y, ry - 1, b, 1)
    else:
        c.contraction(a, ka, b, kb)
        if rb >= 2:
            c.link(b, rb - 1, y, ry - 1)
    if ra >= 2:
        c.link(a, ra - 2, y, ry - 2 if rb >= 2 else ry - 1)
    # batch dims broadcast right-aligned against the output's leading dims
    nb = ry - (1 if ra == 1 or rb == 1 else 2)
    ys = c.shape(y)
    for x, rx in ((a, ra), (b, rb)):
        xs = c.shape(x)
        for ax in range(rx - 2):
            ao = nb - (rx - 2) + ax
            if xs[ax] == ys[ao]:
                c.link(x, ax, y, ao)
            else:
                c.freeze(x, ax, reason="broadcast batch axis of MatMul")
