"""Quantized graphs: int8 weights behind DequantizeLinear (static QDQ) prune with their per-channel scales."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from helpers import make_model, prune_checked


def _int8(shape, seed):
    return np.random.default_rng(seed).integers(-127, 128, size=shape).astype(np.int8)


def _qdq_convs():
    """x -> Q/DQ -> Conv(DQ(int8 w1, per-channel scale), DQ(int32 bias)) -> Relu -> Q/DQ -> Conv(DQ(int8 w2)) -> y;
    no float weight anywhere, as onnxruntime's static quantizer writes it."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s_in", "z_in"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s_in", "z_in"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w1q", "w1s", "w1z"], ["w1"], axis=0),
        helper.make_node("DequantizeLinear", ["b1q", "b1s"], ["b1"], axis=0),
        helper.make_node("Conv", ["xd", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "s_h", "z_h"], ["rq"]),
        helper.make_node("DequantizeLinear", ["rq", "s_h", "z_h"], ["rd"]),
        helper.make_node("DequantizeLinear", ["w2q", "w2s", "w2z"], ["w2"], axis=0),
        helper.make_node("Conv", ["rd", "w2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = {
        "s_in": np.float32(0.02), "z_in": np.int8(0), "s_h": np.float32(0.05), "z_h": np.int8(0),
        # per-tensor weight and bias scales: the int8 weight is the only thing worth removing in the first group
        "w1q": _int8((8, 3, 3, 3), 1), "w1s": np.float32(0.005), "w1z": np.int8(0),
        "b1q": np.arange(-4, 4, dtype=np.int32) * 100, "b1s": np.float32(1e-4),
        "w2q": _int8((4, 8, 3, 3), 4), "w2s": (np.random.default_rng(5).uniform(0.001, 0.01, 4)).astype(np.float32),
        "w2z": np.zeros(4, np.int8),
    }
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])], inits, opset=13)


def test_int8_weights_behind_dequantize_make_a_prunable_group():
    pruned, report = prune_checked(_qdq_convs(), ratio=0.5)
    inits = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert inits["w1q"].shape == (4, 3, 3, 3) and inits["w1q"].dtype == np.int8
    assert inits["w2q"].shape == (4, 4, 3, 3)
    assert inits["b1q"].shape == (4,) and inits["b1q"].dtype == np.int32
    assert report.macs_after < report.macs_before
    assert report.groups_total - report.groups_frozen == 1
    assert report.channels_removed == 4


def test_int64_shape_constants_alone_do_not_make_a_unit():
    """A channel component whose only initializer is an int64 tensor saves nothing: no group is made of it."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "k"], ["y"])]
    model = make_model(nodes, [("x", [1, 4])], [("y", [1, 4])], {"k": np.arange(4, dtype=np.int64)[None]},
                       opset=13)
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.INT64
    import graphprune
    analysis = graphprune.analyze_model(model)
    assert analysis.groups == []
