"""Statistics over pruned channels, rewritten exactly.

The verification oracle is the original model with removed channels masked to zero where a node reads them, so
a masked channel still counts in the denominator of a mean over the original width C. A statistic over the
channel axis therefore stays exact after removal if it divides the kept channels' sum by the ORIGINAL C:

    mean over C      = sum_kept(x) / C                       (a zeroed channel adds 0 to the sum)
    mean square      = sum_kept(x^2) / C                     (RMSNorm)
    variance (LN)    = (sum_kept (x - mean)^2 + n_removed * mean^2) / C
                       (each zeroed channel contributes (0 - mean)^2 inside a fused LayerNormalization; an
                        equivalent form is sum_kept(x^2)/C - mean^2, but subtracting two close numbers loses
                        precision, so the centred sum is used)

The fixups here replace a ReduceMean / LayerNormalization / RMS-style node by standard ops that compute exactly
that, keeping the node's output names so consumers and graph outputs are untouched.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

# stash_type=1: LayerNormalization computes in float32 whatever the input type; these inputs are widened for it
_NARROW_FLOATS = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


class Emitter:
    """Builds the standard-op nodes that replace one node; names derive from it and never collide."""

    def __init__(self, rw, node: onnx.NodeProto, elem_type: int):
        self.rw = rw
        self.base = node.name or node.op_type
        self.nodes: list[onnx.NodeProto] = []
        self.opset = rw.graph.opset("")
        self.elem_type = elem_type
        self.np_dtype = helper.tensor_dtype_to_np_dtype(elem_type)

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        out = output or self.rw.fresh_name(f"{self.base}/{op_type}_out")
        name = self.rw.fresh_name(f"{self.base}/{op_type}")
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def const(self, value, tag: str) -> str:
        return self.rw.add_const(f"{self.base}/{tag}", np.asarray(value, dtype=self.np_dtype))

    def reduce_sum(self, x: str, axes: list[int], keepdims: int = 1, output: str | None = None) -> str:
        """ReduceSum takes its axes as an input from opset 13, as an attribute before."""
        if self.opset >= 13:
            axes_name = self.rw.add_const(f"{self.base}/axes", np.asarray(axes, dtype=np.int64))
            return self.op("ReduceSum", [x, axes_name], output, keepdims=keepdims)
        return self.op("ReduceSum", [x], output, axes=list(axes), keepdims=keepdims)

    def cast(self, x: str, to: int, output: str | None = None) -> str:
        return self.op("Cast", [x], output, to=to)


def mean_as_sum(rw, node: onnx.NodeProto, axes: list[int], keepdims: int) -> None:
    """ReduceMean over axes that lost elements -> ReduceSum / (original element count over those axes)."""
    x = node.input[0]
    if not any(len(rw.removed(x, ax)) for ax in axes):
        return
    count = int(np.prod([rw.old_shape(x)[ax] for ax in axes]))
    e = Emitter(rw, node, rw.graph.dtypes[x])
    total = e.reduce_sum(x, axes, keepdims)
    e.op("Div", [total, e.const(count, "original_count")], node.output[0])
    rw.replace_node(node, e.nodes)


def _compute_type(rw, node, x: str, stash_type: int) -> int:
    elem = rw.graph.dtypes[x]
    return onnx.TensorProto.FLOAT if elem in _NARROW_FLOATS and stash_type == 1 else elem


def decompose_layer_norm(rw, node: onnx.NodeProto, epsilon: float, stash_type: int, rms: bool,
                         inv_std_output: int | None) -> None:
    """LayerNormalization (rms=False) or RMS normalisation (rms=True) over the last axis, with that axis pruned:
    standard ops whose statistics divide by the original width (see the module docstring).

    Inputs: X, scale[, bias]. Outputs: Y[, Mean (LayerNormalization only)][, InvStdDev at `inv_std_output`]."""
    x = node.input[0]
    removed = len(rw.removed(x, -1))
    if not removed:
        return
    width = rw.old_shape(x)[-1]
    elem = rw.graph.dtypes[x]
    compute = _compute_type(rw, node, x, stash_type)
    e = Emitter(rw, node, compute)
    widen = compute != elem
    src = e.cast(x, compute) if widen else x
    scale = node.input[1]
    bias = node.input[2] if not rms and len(node.input) > 2 and node.input[2] else None
    if widen:
        scale = e.cast(scale, compute)
        bias = e.cast(bias, compute) if bias else None
    outputs = list(node.output) + [""] * 3
    c_orig = e.const(width, "original_width")
    if rms:
        # mean square over C: each zeroed channel adds 0^2
        centred = src
        mean_sq = e.op("Div", [e.reduce_sum(e.op("Mul", [src, src]), [-1]), c_orig])
        variance = mean_sq
    else:
        mean = e.op("Div", [e.reduce_sum(src, [-1]), c_orig], outputs[1] or None)
        centred = e.op("Sub", [src, mean])
        kept_sq = e.reduce_sum(e.op("Mul", [centred, centred]), [-1])
        # the n_removed zeroed channels each contribute (0 - mean)^2 = mean^2 to the sum of squares
        removed_sq = e.op("Mul", [e.op("Mul", [mean, mean]), e.const(removed, "removed_count")])
        variance = e.op("Div", [e.op("Add", [kept_sq, removed_sq]), c_orig])
    inv_name = outputs[inv_std_output] if inv_std_output is not None else ""
    inv_std = e.op("Reciprocal", [e.op("Sqrt", [e.op("Add", [variance, e.const(epsilon, "epsilon")])])],
                   inv_name or None)
    y = e.op("Mul", [e.op("Mul", [centred, inv_std]), scale])
    if bias:
        y = e.op("Add", [y, bias])
    if widen:
        e.cast(y, elem, outputs[0])
    else:  # rename the last node's output to the original Y
        e.nodes[-1].output[0] = outputs[0]
    rw.replace_node(node, e.nodes)
