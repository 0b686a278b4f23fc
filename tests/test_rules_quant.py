"""Quantized graphs: int8 weights behind DequantizeLinear (static QDQ) prune with their per-channel scales."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from helpers import make_model, prune_checked, rand


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


def _dynamic_int8_mlp():
    """onnxruntime's dynamic quantization pattern, twice: DynamicQuantizeLinear -> MatMulInteger (int8 weight,
    per-column zero point) -> Cast -> Mul(x_scale * w_scale) -> Tanh. The uint8 activation's zero point is
    computed at run time and is not 0, so a removed channel must read the zero point in the masked reference."""
    nodes = []
    for k, (x, y) in enumerate((("x", "h"), ("r", "y"))):
        nodes += [
            helper.make_node("DynamicQuantizeLinear", [x], [f"q{k}", f"s{k}", f"z{k}"]),
            helper.make_node("MatMulInteger", [f"q{k}", f"w{k}", f"z{k}", f"wz{k}"], [f"i{k}"]),
            helper.make_node("Cast", [f"i{k}"], [f"f{k}"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"s{k}", f"ws{k}"], [f"sc{k}"]),
            helper.make_node("Mul", [f"f{k}", f"sc{k}"], [y if k else "m"]),
        ]
        if k == 0:
            nodes.append(helper.make_node("Tanh", ["m"], ["r"]))  # signed: r's uint8 zero point is not 0
    inits = {"w0": _int8((16, 12), 1), "wz0": np.random.default_rng(2).integers(-3, 4, 12).astype(np.int8),
             "ws0": np.float32(0.01), "w1": _int8((12, 6), 3), "wz1": np.zeros(6, np.int8), "ws1": np.float32(0.02)}
    return make_model(nodes, [("x", [2, 16])], [("y", [2, 6])], inits, opset=13)


def test_matmul_integer_prunes_with_zero_point_fill():
    pruned, report = prune_checked(_dynamic_int8_mlp(), ratio=0.5)
    inits = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert inits["w0"].shape == (16, 6) and inits["w0"].dtype == np.int8
    assert inits["wz0"].shape == (6,)
    assert inits["w1"].shape == (6, 6)
    assert report.macs_after < report.macs_before  # integer MACs are counted


def test_zero_point_fill_is_what_makes_the_oracle_exact():
    """Masking the uint8 activation with 0 instead of its zero point gives a different (wrong) reference."""
    import graphprune
    from graphprune.analysis import analyze
    from graphprune.api import load_graph
    from graphprune.runtime import session
    from graphprune.verify import masked_reference
    model = _dynamic_int8_mlp()
    _, report = graphprune.prune(model, ratio=0.5)
    graph, _ = load_graph(model)
    analysis = analyze(graph)
    removed = report.plan.removed_elements()
    assert analysis.mask_fills, "MatMulInteger declared no zero-point fill"
    x = {"x": np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32) + 0.5}
    with_fill = session(masked_reference(graph, removed, analysis.oracle_masks, None, analysis.mask_fills)).run(None, x)
    without = session(masked_reference(graph, removed, analysis.oracle_masks, None)).run(None, x)
    assert np.abs(with_fill[0] - without[0]).max() > 1e-3


def _dynamic_int8_convs():
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
        helper.make_node("ConvInteger", ["q", "w", "z"], ["i"], pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["s", "ws"], ["sc"]),
        helper.make_node("Mul", ["f", "sc"], ["m"]),
        helper.make_node("Relu", ["m"], ["r"]),
        helper.make_node("DynamicQuantizeLinear", ["r"], ["q2", "s2", "z2"]),
        helper.make_node("ConvInteger", ["q2", "w2", "z2"], ["i2"], pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["i2"], ["f2"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["s2", "ws2"], ["sc2"]),
        helper.make_node("Mul", ["f2", "sc2"], ["y"]),
    ]
    inits = {"w": np.random.default_rng(1).integers(0, 255, (8, 3, 3, 3)).astype(np.uint8), "ws": np.float32(0.01),
             "w2": np.random.default_rng(2).integers(0, 255, (4, 8, 3, 3)).astype(np.uint8), "ws2": np.float32(0.01)}
    return make_model(nodes, [("x", [1, 3, 6, 6])], [("y", [1, 4, 6, 6])], inits, opset=13)


def test_conv_integer_prunes_with_zero_point_fill():
    pruned, report = prune_checked(_dynamic_int8_convs(), ratio=0.5)
    inits = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert inits["w"].shape == (4, 3, 3, 3) and inits["w2"].shape == (4, 4, 3, 3)
    assert report.macs_after < 0.6 * report.macs_before


def _float_lstm():
    hidden, inp = 8, 6
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["y", "yh"], hidden_size=hidden),
             helper.make_node("Squeeze", ["yh", "ax0"], ["h"]),
             helper.make_node("MatMul", ["h", "head"], ["out"])]
    inits = {"W": rand(1, 4 * hidden, inp, seed=11), "R": rand(1, 4 * hidden, hidden, seed=12),
             "B": rand(1, 8 * hidden, seed=13), "ax0": np.array([0], np.int64), "head": rand(hidden, 3, seed=14)}
    return make_model(nodes, [("x", [5, 2, inp])], [("out", [2, 3])], inits, opset=13)


def test_dynamic_quantize_lstm_from_onnxruntime_prunes_its_hidden_units(tmp_path):
    """onnxruntime's quantize_dynamic turns the LSTM into com.microsoft DynamicQuantizeLSTM (int8 W and R,
    transposed); its hidden units prune, and the masked reference (gate columns at the zero point) is exact even
    though the node requantizes its hidden state with a dynamic range."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    src, dst = tmp_path / "lstm.onnx", tmp_path / "lstm.int8.onnx"
    onnx.save(_float_lstm(), src)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["LSTM"])
    model = onnx.load(dst)
    assert any(n.op_type == "DynamicQuantizeLSTM" for n in model.graph.node)
    pruned, report = prune_checked(model, ratio=0.5)
    lstm = next(n for n in pruned.graph.node if n.op_type == "DynamicQuantizeLSTM")
    assert next(a.i for a in lstm.attribute if a.name == "hidden_size") == 4
    inits = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert inits[lstm.input[1]].shape == (1, 6, 16) and inits[lstm.input[2]].shape == (1, 4, 16)
