"""Elementwise ops: unary ops pass channels through; binary ops couple broadcast-aligned axes."""
from __future__ import annotations

from ..rules import rule

UNARY = (
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Sigmoid", "HardSigmoid", "HardSwish",
    "Tanh", "Erf", "Gelu", "Softplus", "Softsign", "Mish", "Swish", "Cast", "Dropout", "Identity", "Abs", "Neg",
    "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Not", "IsNaN", "IsInf",
    "Shrink", "Clip",
)


@rule(*UNARY)
def unary(node, c):
    """y[i] depends on x[i] only. Clip's min/max and Dropout's ratio/training inputs are scalars."""
    x, y = node.input[0], node.output[0]
    c.same(x, y)
    for extra in node.output[1:]:  # Dropout mask
        c.same(x, extra)
    for extra in node.input[1:]:
        if extra and c.rank(extra):
            c.freeze(extra, reason="extra operand of a unary op")


def broadcast(c, inputs, output):
    """Numpy broadcasting: right-aligned equal dims are coupled; a size-1 dim broadcast to n is not a channel."""
    out_shape = c.shape(output)
    if out_shape is None:
        for x in inputs:
            c.freeze(x, reason="output shape unknown")
        return
    r = len(out_shape)
    for x in inputs:
        if not x:
            continue
        xs = c.shape(x)
        if xs is None:
            c.freeze(output, reason=f"shape of operand '{x}' unknown")
            continue
        for ax in range(len(xs)):
            ao = ax + r - len(xs)
            if xs[ax] == out_shape[ao]:
                c.link(x, ax, output, ao)
            elif xs[ax] == 1:
                # A size-1 axis broadcast against a larger one (a constant layer scale [C,1,1], an SE gate's
                # [N,C,1,1] spatial axes, a [N,1,H,W] spatial-attention map over the channels) has no element this
                # op could remove: its one element is the whole operand. It carries no channel here, and the other
                # operand's axis stays free.
                c.not_channel(x, [ax])
            else:
                c.freeze(x, ax, reason=f"cannot align axis {ax} with output axis {ao}")
                c.freeze(output, ao, reason=f"cannot align with axis {ax} of '{x}'")
    for ao in range(r):  # output axes no operand reaches (all size 1) are still declared
        c.touch(output, ao)


BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "Sum", "Mean", "Equal", "Less", "Greater",
          "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "BitShift", "PRelu", "Where")


@rule(*BINARY)
def binary(node, c):
    """Residual adds, SE/CBAM gates, per-channel constants: every right-aligned equal axis is one coupling."""
    broadcast(c, list(node.input), node.output[0])


@rule("CastLike")
def cast_like(node, c):
    """Like Cast; the second operand only gives the type."""
    c.same(node.input[0], node.output[0])
    c.not_channel(node.input[1])  # only its type is read


@rule("DequantizeLinear", "QuantizeLinear")
def quantize(node, c):
    """Per-tensor or per-axis scale/zero point; weight-only int8 weights prune with their scales."""
    x, y = node.input[0], node.output[0]
    c.same(x, y)
    r = c.rank(x)
    axis = c.attr("axis", 1)
    block = c.attr("block_size", 0)
    for p in node.input[1:3]:
        if not p or c.rank(p) is None:
            continue
        if c.rank(p) == 0:
            continue
        if block:
            # Blocked: p has x's rank, one entry per block along `axis`, x's dims elsewhere. Those other axes
            # must shrink with x (they used to be frozen on p only, so x's lost entries p kept: invalid model).
            for ax in range(r):
                if ax == axis % r:
                    c.freeze(p, ax, reason="blocked quantization is not mapped")
                    c.freeze(x, ax, reason="blocked quantization is not mapped")
                else:
                    c.link(p, ax, y, ax)
        elif c.rank(p) == 1 and r:
            c.link(p, 0, y, axis % r)
        else:
            c.freeze(p, reason="unexpected quantization parameter rank")


@rule("FastGelu", "BiasGelu", "Gelu", "QuickGelu", domain="com.microsoft")
def contrib_gelu(node, c):
    """onnxruntime's fused activations gelu(x [+ bias]): elementwise, the optional bias goes with the last axis."""
    x, y = node.input[0], node.output[0]
    c.same(x, y)
    r = c.rank(x)
    for extra in node.input[1:]:
        if not extra:
            continue
        c.role(extra, "bias")
        er = c.rank(extra)
        for k in range(er):  # the bias is right-aligned with x ([H] against [B, S, H])
            if c.shape(extra)[k] == c.shape(x)[r - er + k]:
                c.link(extra, k, y, r - er + k)
            else:
                c.freeze(extra, k, reason="bias does not match the input's trailing axes")
