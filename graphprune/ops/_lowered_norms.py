"""LayerNorm that an exporter lowered to other ops, recognised and fused back into LayerNormalization.

tf2onnx writes Keras' LayerNormalization over the last axis (width C) as

    r  = Reshape(x, [1, -1, C, 1])                  every row of x becomes one BatchNorm "channel" (axis 1)
    m  = ReduceMean(r, axes=[0, 2, 3], keepdims=1)  the row means
    v  = Div(ReduceSumSquare(Sub(r, m), axes=[0, 2, 3], keepdims=0), C)   the biased row variances
    n  = BatchNormalization(r, ones[rows], zeros[rows], Squeeze(m), v, epsilon)
    y  = Reshape(n, Shape(x))                       back to x's shape; gamma/beta follow as Mul/Add

which is exactly LayerNormalization(x, ones[C], zeros[C], axis=-1, epsilon). As written, the width sits on a
BatchNorm spatial axis that the reshapes keep whole, so the hidden size is frozen; fused (by canonicalize, through
passes/lowered_norms.py), the exact LayerNorm rule (graphprune/ops/norm.py) prunes it with statistics over the
original width. Only the exact form is fused (identity scale/bias, statistics of the BatchNorm's own input over
axes 0, 2, 3, divisor C, a reshape back to x's shape); anything else is a near miss that
`match_tf2onnx_layer_norm` explains, and the BatchNorm rule freezes the width with that reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..ir import FLOAT_TYPES, Graph, attr

LOWERED = "LayerNorm lowered as Reshape+BatchNormalization (tf2onnx)"
_STAT_AXES = {0, 2, 3}


@dataclass
class LoweredLayerNorm:
    x: str                # the tensor normalised over its last axis
    y: str                # the reshape back to x's shape: the LayerNorm's output
    width: int
    epsilon: float
    nodes: list = field(default_factory=list)  # BatchNorm and the reshape back, replaced by the fused node


def _producer(graph: Graph, name: str, op_type: str):
    node = graph.producer.get(name)
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _axes(graph: Graph, node) -> set | None:
    """A Reduce*/Squeeze node's axes (attribute or constant input), normalised to rank 4; None when unknown."""
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = graph.const(node.input[1])
        axes = None if value is None else value.reshape(-1).tolist()
    return None if axes is None else {int(a) % 4 for a in axes}


def _fill_value(graph: Graph, name: str):
    """The one value of a constant that is uniform (or of Expand(uniform constant, shape)); None otherwise."""
    value = graph.const(name)
    node = _producer(graph, name, "Expand")
    if value is None and node is not None:
        value = graph.const(node.input[0])
    if value is None or value.size == 0 or not np.all(value == value.reshape(-1)[0]):
        return None
    return float(value.reshape(-1)[0])


def _is_shape_of(graph: Graph, name: str, x: str) -> bool:
    """`name` is Shape(x) (whole, possibly cast to an integer type) or a constant equal to x's static shape."""
    value, shape = graph.const(name), graph.shape(x)
    if value is not None:
        static = shape is not None and all(isinstance(d, int) for d in shape)
        return static and value.reshape(-1).tolist() == list(shape)
    node = graph.producer.get(name)
    for _ in range(4):
        if node is None:
            return False
        if node.op_type == "Cast" and attr(node, "to") in (onnx.TensorProto.INT32, onnx.TensorProto.INT64):
            node = graph.producer.get(node.input[0])
            continue
        return (node.op_type == "Shape" and node.input[0] == x and attr(node, "start", 0) == 0
                and attr(node, "end") is None)
    return False


def match_tf2onnx_layer_norm(graph: Graph, bn: onnx.NodeProto):
    """None when `bn` is not a BatchNorm over a tensor whose last axis a Reshape moved onto its axis 2 (not this
    lowering at all); a LoweredLayerNorm when it is exactly the LayerNorm lowering; else a string saying what
    differs (a near miss)."""
    if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or len(bn.input) < 5:
        return None
    r = bn.input[0]
    reshape = _producer(graph, r, "Reshape")
    if reshape is None:
        return None
    x = reshape.input[0]
    xs, rs = graph.shape(x), graph.shape(r)
    if not xs or rs is None or len(rs) != 4 or not isinstance(xs[-1], int) or rs[2] != xs[-1] or xs[-1] < 2:
        return None
    width = xs[-1]
    target = graph.const(reshape.input[1])
    if target is None or target.reshape(-1).tolist() not in ([1, -1, width, 1], [1, rs[1], width, 1]):
        return f"reshape target is not [1, -1, {width}, 1]"
    if graph.dtypes.get(x) not in FLOAT_TYPES:
        return "not a float tensor"
    if int(attr(bn, "training_mode", 0)) or any(bn.output[1:]):
        return "BatchNormalization in training mode"
    if _fill_value(graph, bn.input[1]) != 1.0 or _fill_value(graph, bn.input[2]) != 0.0:
        return "BatchNormalization scale/bias are not ones/zeros"
    # mean: Squeeze(ReduceMean(r, axes 0,2,3, keepdims)) of the BatchNorm's own input
    squeeze = _producer(graph, bn.input[3], "Squeeze")
    mean = _producer(graph, squeeze.input[0], "ReduceMean") if squeeze is not None else None
    if (mean is None or mean.input[0] != r or _axes(graph, mean) != _STAT_AXES or not attr(mean, "keepdims", 1)
            or _axes(graph, squeeze) != _STAT_AXES):
        return "BatchNormalization mean is not the row mean of its input"
    # variance: ReduceSumSquare(r - mean, axes 0,2,3) / width
    div = _producer(graph, bn.input[4], "Div")
    ssq = _producer(graph, div.input[0], "ReduceSumSquare") if div is not None else None
    sub = _producer(graph, ssq.input[0], "Sub") if ssq is not None else None
    count = graph.const(div.input[1]) if div is not None else None
    if (sub is None or list(sub.input) != [r, mean.output[0]] or _axes(graph, ssq) != _STAT_AXES
            or attr(ssq, "keepdims", 1) or count is None or count.size != 1 or float(count.reshape(-1)[0]) != width):
        return f"BatchNormalization variance is not the row variance over {width}"
    uses = graph.uses.get(bn.output[0], [])
    back = uses[0][0] if len(uses) == 1 else None
    if (back is None or back.op_type != "Reshape" or back.input[0] != bn.output[0] or bn.output[0] in graph.output_names
            or not _is_shape_of(graph, back.input[1], x)):
        return "the BatchNormalization output is not reshaped back to the input's shape"
    if graph.opset("") < 17:
        return "opset below 17 has no LayerNormalization to fuse into"
    return LoweredLayerNorm(x, back.output[0], width, float(attr(bn, "epsilon", 1e-5)), [bn, back])
