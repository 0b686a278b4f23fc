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

Likewise max/min over C = max/min(extreme of the kept, 0) when some channel was removed.

The fixups here replace a ReduceMean / ReduceMax / ReduceMin / LayerNormalization / RMS-style node by standard
ops that compute exactly that, keeping the node's output names so consumers and graph outputs are untouched.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
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


def extreme_with_zero(rw, node: onnx.NodeProto, axes: list[int]) -> None:
    """ReduceMax / ReduceMin over axes that lost elements: the masked original also sees the zeroed elements, so
    its result is max(max over the kept, 0) / min(min over the kept, 0). The node stays; a Max/Min with 0 follows."""
    x = node.input[0]
    if not any(len(rw.removed(x, ax)) for ax in axes):
        return
    e = Emitter(rw, node, rw.graph.dtypes[x])
    reduced = rw.fresh_name(f"{node.output[0]}_kept")
    kept_node = onnx.NodeProto()
    kept_node.CopyFrom(node)
    kept_node.output[0] = reduced
    e.nodes.append(kept_node)
    e.op("Max" if node.op_type == "ReduceMax" else "Min", [reduced, e.const(0, "zero")], node.output[0])
    rw.replace_node(node, e.nodes)


def _compute_type(rw, node, x: str, stash_type: int) -> int:
    elem = rw.graph.dtypes[x]
    return onnx.TensorProto.FLOAT if elem in _NARROW_FLOATS and stash_type == 1 else elem


def decompose_layer_norm(rw, node: onnx.NodeProto, epsilon: float, stash_type: int, rms: bool,
                         inv_std_output: int | None, scale_index: int = 1, bias_index: int | None = 2,
                         mean_output: int | None = 1, skip_index: int | None = None,
                         skip_bias_index: int | None = None, sum_output: int | None = None,
                         split: bool = False) -> None:
    """LayerNormalization (rms=False) or RMS normalisation (rms=True) over the last axis, with that axis pruned:
    standard ops whose statistics run over the original width (see the module docstring).

    Skip variants first add `skip` and a `skip_bias` to the input (their sum is output `sum_output`). In the
    masked original a removed channel of that sum is not zero but the constant skip bias b_j, so with R1 = sum_j
    b_j and R2 = sum_j b_j^2 over the removed channels j (both 0 without a bias):
        mean = (sum_kept s + R1) / C
        var  = (sum_kept (s - mean)^2 + sum_j (b_j - mean)^2) / C,  sum_j (b_j - mean)^2 = R2 - 2 mean R1 + n mean^2
        ms   = (sum_kept s^2 + R2) / C                                                              (RMS)

    split: the output's width was pruned apart from the input's. The statistics still run over the input's
    original width; output channel j is then normalised x_j where x_j was kept, and (0 - mean) * inv_std (0 for
    RMS) where the masked original read x_j as 0: a Gather over [normalised kept x, that column] picks them."""
    x = node.input[0]
    removed_idx = rw.removed(x, -1)
    if not len(removed_idx) and not (split and len(rw.removed(node.output[0], -1))):
        return
    n_removed = len(removed_idx)
    width = rw.old_shape(x)[-1]
    elem = rw.graph.dtypes[x]
    compute = _compute_type(rw, node, x, stash_type)
    e = Emitter(rw, node, compute)
    outputs = list(node.output) + [""] * 4

    def arg(index):
        return node.input[index] if index is not None and len(node.input) > index and node.input[index] else None

    def out(index):
        return outputs[index] if index is not None and outputs[index] else None

    src = x
    skip, skip_bias = arg(skip_index), arg(skip_bias_index)
    removed_values = np.zeros(n_removed)
    bias_const = None
    if skip:
        src = e.op("Add", [src, skip], None if skip_bias else out(sum_output))
    if skip_bias:
        src = e.op("Add", [src, skip_bias], out(sum_output))
        bias_const = rw.graph.const(skip_bias)
        if bias_const is not None:  # a constant is not masked: removed channels of the sum hold b_j
            removed_values = np.asarray(bias_const, np.float64).reshape(-1)[removed_idx]
    r1, r2 = float(removed_values.sum()), float((removed_values ** 2).sum())
    widen = compute != elem
    if widen:
        src = e.cast(src, compute)
    scale, bias = arg(scale_index), None if rms else arg(bias_index)
    if widen:
        scale = e.cast(scale, compute)
        bias = e.cast(bias, compute) if bias else None
    c_orig = e.const(width, "original_width")
    if rms:
        # mean square over C: each zeroed channel adds 0^2 (b_j^2 for a skip bias)
        centred = src
        sq_sum = e.reduce_sum(e.op("Mul", [src, src]), [-1])
        if r2:
            sq_sum = e.op("Add", [sq_sum, e.const(r2, "removed_sq_sum")])
        variance = e.op("Div", [sq_sum, c_orig])
    else:
        total = e.reduce_sum(src, [-1])
        if r1:
            total = e.op("Add", [total, e.const(r1, "removed_sum")])
        mean = e.op("Div", [total, c_orig], out(mean_output))
        centred = e.op("Sub", [src, mean])
        kept_sq = e.reduce_sum(e.op("Mul", [centred, centred]), [-1])
        # the removed channels each contribute (b_j - mean)^2: n mean^2 (- 2 mean R1 + R2 with a skip bias)
        removed_sq = e.op("Mul", [e.op("Mul", [mean, mean]), e.const(n_removed, "removed_count")])
        if r1 or r2:
            cross = e.op("Mul", [mean, e.const(2 * r1, "removed_sum_x2")])
            removed_sq = e.op("Add", [removed_sq, e.op("Sub", [e.const(r2, "removed_sq_sum"), cross])])
        variance = e.op("Div", [e.op("Add", [kept_sq, removed_sq]), c_orig])
    inv_std = e.op("Reciprocal", [e.op("Sqrt", [e.op("Add", [variance, e.const(epsilon, "epsilon")])])],
                   out(inv_std_output))
    normed = e.op("Mul", [centred, inv_std])
    if split:
        normed = _gather_output_channels(rw, e, normed, None if rms else mean, inv_std, x, node.output[0],
                                         bias_const)
    y = e.op("Mul", [normed, scale])
    if bias:
        y = e.op("Add", [y, bias])
    if widen:
        e.cast(y, elem, outputs[0])
    else:  # rename the last node's output to the original Y
        e.nodes[-1].output[0] = outputs[0]
    rw.replace_node(node, e.nodes)


def _gather_output_channels(rw, e: Emitter, normed: str, mean: str | None, inv_std: str, x: str, y: str,
                            skip_bias) -> str:
    """`normed` holds the kept input channels; return the kept output channels. An output channel j whose input
    channel was removed reads 0 in the masked original (b_j with a constant skip bias): its normalised value is
    (b_j - mean) * inv_std (b_j * inv_std for RMS), one column each, appended before the Gather."""
    kept_x, kept_y = rw.kept(x, -1), rw.kept(y, -1)
    if np.array_equal(kept_x, kept_y):
        return normed
    position = {int(j): k for k, j in enumerate(kept_x)}
    lost = [int(j) for j in kept_y if int(j) not in position]
    for j in lost:
        position[j] = len(position)
    if lost:
        values = (np.zeros(len(lost)) if skip_bias is None
                  else np.asarray(skip_bias, np.float64).reshape(-1)[lost])
        fill = e.const(values, "removed_input_values")
        if mean is not None:
            fill = e.op("Sub", [fill, mean])
        normed = e.op("Concat", [normed, e.op("Mul", [fill, inv_std])], axis=-1)
    index = np.asarray([position[int(j)] for j in kept_y], dtype=np.int64)
    return e.op("Gather", [normed, rw.add_const(f"{e.base}/kept_outputs", index)], axis=-1)
