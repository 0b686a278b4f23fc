"""Normalisations. Per-channel statistics (BatchNorm, InstanceNorm) are exact under removal; group statistics
are exact when whole groups go. Statistics *over* the channels change with every removed channel, except that
LayerNorm / RMSNorm over the last axis are rewritten to divide by the original width, which matches the masked
original exactly (ops/layernorm.py); LRN, LpNorm, MVN and multi-axis normalisation stay frozen."""
from __future__ import annotations

import numpy as np

from ..rules import rule
from ._lowered_norms import LOWERED, match_tf2onnx_layer_norm
from .layernorm import FLOATS, decompose_layer_norm


@rule("BatchNormalization")
def batch_norm(node, c):
    """Per-channel scale, bias, mean, variance go with the channel: exact under removal. (tf2onnx's LayerNorm
    lowering, Reshape -> BatchNormalization -> Reshape, is fused into LayerNormalization by canonicalize; one that
    differs keeps its width, with a reason naming the lowering and the difference.)"""
    x, y = node.input[0], node.output[0]
    c.same(x, y)
    for extra in node.output[1:]:  # training-mode running statistics
        if extra:
            c.link(extra, 0, y, 1)
    for i, p in enumerate(node.input[1:5]):
        c.role(p, ("norm_scale", "norm_bias", "stat", "stat")[i])
        c.producer(y, 1, p, 0) if c.const(p) is not None else c.link(p, 0, y, 1)
    # canonicalize fused every exact tf2onnx LayerNorm lowering; one still here differs: say so on its width
    near_miss = match_tf2onnx_layer_norm(c.graph, node)
    if isinstance(near_miss, str):
        reason = f"{LOWERED}: statistics over the whole width ({near_miss})"
        c.freeze_named(c.graph.producer[x].input[0], -1, reason)
        c.freeze_named(x, 2, reason)
        for user, _ in c.graph.uses.get(y, []):
            if user.op_type == "Reshape":
                c.freeze_named(user.output[0], -1, reason)


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


# where each last-axis norm keeps its inputs and outputs (ops/layernorm.py decompose_layer_norm's arguments)
_LAST_AXIS_NORMS = {
    "LayerNormalization": dict(rms=False, scale_index=1, bias_index=2, mean_output=1, inv_std_output=2),
    "RMSNormalization": dict(rms=True, scale_index=1, bias_index=None, mean_output=None, inv_std_output=None),
    "SimplifiedLayerNormalization": dict(rms=True, scale_index=1, bias_index=None, mean_output=None,
                                         inv_std_output=1),
    # onnxruntime contrib ops: output = norm(input + skip + bias), output 3 is that sum
    "SkipLayerNormalization": dict(rms=False, skip_index=1, scale_index=2, bias_index=3, skip_bias_index=4,
                                   mean_output=1, inv_std_output=2, sum_output=3),
    "SkipSimplifiedLayerNormalization": dict(rms=True, skip_index=1, scale_index=2, bias_index=None,
                                             skip_bias_index=3, mean_output=None, inv_std_output=2,
                                             sum_output=3),
}


@rule("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
def layer_norm(node, c):
    """Over the last axis: that axis prunes, rewritten to statistics over the original width; where the input and
    output widths coupled would stay frozen (a residual stream from a graph input or to a graph output), the
    output's width prunes apart from the input's (statistics over the input, kept outputs gathered); multi-axis:
    frozen.

    The rewrite into standard ops divides by the original width, which equals the masked original exactly
    (ops/layernorm.py). Normalised over several axes: axes before `axis` pass through, the normalised ones are
    frozen (their statistics would change)."""
    x, y = node.input[0], node.output[0]
    r = c.rank(x)
    axis = c.attr("axis", -1) % r
    shape = c.shape(x)
    if axis == r - 1 and isinstance(shape[-1], int) and c.dtype(x) in FLOATS:
        _last_axis_norm(node, c, x, y, r)
        return
    why = ("normalised over several axes" if axis != r - 1 else
           "width not static" if not isinstance(shape[-1], int) else "not a float tensor")
    reason = f"normalised by {node.op_type} ({why}): removing a channel changes the statistics of the rest"
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
    _norm_params(node, c, x, y, r, node.input[1:3])


@rule("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain="com.microsoft")
def skip_layer_norm(node, c):
    """onnxruntime's fused residual add + norm over the last axis: prunes like LayerNorm (the output's width apart
    from the sum's where coupled they would stay frozen); removed channels of the sum keep their constant bias in
    the masked original, and the rewrite counts it in the statistics."""
    x, y = node.input[0], node.output[0]
    r = c.rank(x)
    if not isinstance(c.shape(x)[-1], int) or c.dtype(x) not in FLOATS:
        c.freeze_all(f"{node.op_type}: width not static or not a float tensor")
        return
    if c.const(node.input[1]) is not None:  # masking never zeroes a constant: the statistics would see it
        c.freeze_all(f"{node.op_type}: constant skip input")
        return
    _last_axis_norm(node, c, x, y, r)


def _norm_params(node, c, x, y, r, params):
    for p in params:
        if p:
            c.role(p, "norm_scale" if p == params[0] else "norm_bias")
            pr = c.rank(p)
            for k in range(pr):
                # compare with x's shape (y has the same; onnx may have inferred none for y)
                if c.shape(p)[k] != c.shape(x)[r - pr + k]:
                    c.freeze(p, k, reason="parameter does not match the normalised shape")
                elif k == pr - 1 and c.const(p) is not None:
                    c.producer(y, r - 1, p, k)
                else:
                    c.link(p, k, y, r - pr + k)


def _last_axis_norm(node, c, x, y, r):
    layout = _LAST_AXIS_NORMS[node.op_type]
    skip = layout.get("skip_index")
    # The output's width couples with the input's ("same") unless that ends wholly frozen (a residual stream from a
    # graph input or to a graph output): then, retried, the output prunes apart ("split"); the rewrite computes the
    # statistics over the input's original width and gathers the kept output channels (ops/layernorm.py). A Skip
    # norm's skip input, skip bias and sum output go with the input's width.
    # Not where a quantizer reads the output: the rewritten statistics differ from the fused op's by float rounding,
    # which a quantizer can turn into a whole level (seen on onnxruntime-quantized BERT: 0.015 off).
    modes = ["same"] if _quantizer_reads(c.graph, y) else ["same", "split"]
    split = c.choose(("norm width",), modes) == "split"
    if split:
        for ax in range(r - 1):
            c.link(x, ax, y, ax)
        c.touch(x, r - 1)
        c.touch(y, r - 1)
    else:
        c.same(x, y)
    width = c.virtual(c.shape(x)[-1], "norm width")
    c.link(y, r - 1, width, 0)
    c.bind_choice(width)
    if skip is not None:
        skip_name = node.input[skip]
        sr = c.rank(skip_name)
        for k in range(sr):  # skip may drop leading axes ([S, H] against [B, S, H])
            c.link(skip_name, k, x, r - sr + k)
        sum_output = layout["sum_output"]
        if len(node.output) > sum_output and node.output[sum_output]:
            c.same(node.output[sum_output], x)
    stats = {layout.get(k) for k in ("mean_output", "inv_std_output")} - {None}
    for i in sorted(stats):  # Mean / InvStdDev: one value per row, the normalised axis kept as size 1
        if len(node.output) > i and node.output[i]:
            for ax in range(r - 1):
                c.link(node.output[i], ax, y, ax)
            c.not_channel(node.output[i], [r - 1])
    params = [node.input[i] if i is not None and len(node.input) > i else ""
              for i in (layout["scale_index"], layout["bias_index"])]
    _norm_params(node, c, x, y, r, params)
    skip_bias = layout.get("skip_bias_index")
    if skip_bias is not None and len(node.input) > skip_bias and node.input[skip_bias]:
        p = node.input[skip_bias]  # added into the sum: it goes with the input's channels
        c.role(p, "bias")
        if c.shape(p)[-1] != c.shape(x)[-1]:
            c.freeze(p, -1, reason="parameter does not match the normalised shape")
        else:
            c.link(p, c.rank(p) - 1, x, r - 1)
        c.not_channel(p, range(c.rank(p) - 1))
    # onnxruntime's Skip* norms default to 1e-12, the ONNX-domain ones to 1e-5
    epsilon = float(c.attr("epsilon", 1e-12 if skip is not None else 1e-5))
    stash_type = int(c.attr("stash_type", 1))

    def fix(rw, node):
        decompose_layer_norm(rw, node, epsilon, stash_type, split=split, **layout)
    c.fixup(fix)


_QUANTIZERS = {"DynamicQuantizeLinear", "QuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM"}
# ops that move values without arithmetic: a rounding difference passes through them unchanged
_MOVES = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast", "Gather", "Slice", "Split",
          "Concat", "Expand", "Tile"}


def _quantizer_reads(graph, name: str, depth: int = 0) -> bool:
    """A quantizing op reads `name`, directly or through ops that only move values."""
    for user, _ in graph.uses.get(name, []):
        if user.op_type in _QUANTIZERS:
            return True
        if user.op_type in _MOVES and depth < 6 and any(
                _quantizer_reads(graph, o, depth + 1) for o in user.output if o):
            return True
    return False


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
