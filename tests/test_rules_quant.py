"""Quantized graphs: int8 weights behind DequantizeLinear (static QDQ) prune with their per-channel scales."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from helpers import group_sizes, make_model, prune_checked, rand


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


def _static_qoperator(tmp_path, model, feeds, per_channel):
    """onnxruntime's static quantizer in QOperator format: QuantizeLinear -> QLinear* -> DequantizeLinear."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.left = [dict(f) for f in feeds]

        def get_next(self):
            return self.left.pop() if self.left else None

    src, dst = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    onnx.save(model, src)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QOperator, per_channel=per_channel)
    return onnx.load(dst)


def _float_convs():
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], pads=[1, 1, 1, 1])]
    inits = {"w1": rand(8, 3, 3, 3, seed=1), "b1": rand(8, seed=2), "w2": rand(4, 8, 3, 3, seed=3),
             "b2": rand(4, seed=4)}
    return make_model(nodes, [("x", [1, 3, 6, 6])], [("y", [1, 4, 6, 6])], inits, opset=13)


def _calib(shape, n=4):
    rng = np.random.default_rng(7)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def test_qlinear_conv_chain_from_quantize_static_prunes_exactly(tmp_path):
    """QLinearConv -> QLinearConv (per-channel weights, int32 bias): the hidden channels are the first conv's
    output rows (with w_scale, w_zp, bias) and the second's input columns; the second reads removed channels at
    its x_zp in the masked reference."""
    model = _static_qoperator(tmp_path, _float_convs(), _calib([1, 3, 6, 6]), per_channel=True)
    convs = [n for n in model.graph.node if n.op_type == "QLinearConv"]
    assert len(convs) == 2
    pruned, report = prune_checked(model, ratio=0.5)
    inits = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    first, second = [n for n in pruned.graph.node if n.op_type == "QLinearConv"]
    assert inits[first.input[3]].shape == (4, 3, 3, 3) and inits[first.input[3]].dtype == np.int8
    assert inits[first.input[4]].shape == (4,) and inits[first.input[5]].shape == (4,)
    assert inits[first.input[8]].shape == (4,) and inits[first.input[8]].dtype == np.int32
    assert inits[second.input[3]].shape == (4, 4, 3, 3)
    assert report.channels_removed == 4
    assert report.macs_after < 0.6 * report.macs_before


def _reference_gap(model, feeds):
    """Largest difference between the masked references built with and without the zero-point fills."""
    import graphprune
    from graphprune.analysis import analyze
    from graphprune.api import load_graph
    from graphprune.runtime import session
    from graphprune.verify import masked_reference
    _, report = graphprune.prune(model, ratio=0.5, importance="l1")
    graph, _ = load_graph(model)
    analysis = analyze(graph)
    removed = report.plan.removed_elements()
    assert analysis.mask_fills
    fill = session(masked_reference(graph, removed, analysis.oracle_masks, None, analysis.mask_fills)).run(None, feeds)
    zero = session(masked_reference(graph, removed, analysis.oracle_masks, None)).run(None, feeds)
    return float(np.abs(fill[0].astype(np.float64) - zero[0]).max())


def test_qlinear_conv_consumer_needs_its_zero_point_fill(tmp_path):
    model = _static_qoperator(tmp_path, _float_convs(), _calib([1, 3, 6, 6]), per_channel=False)
    assert _reference_gap(model, _calib([1, 3, 6, 6], 1)[0]) > 1e-3


def test_qlinear_conv_into_dequantize_and_float_conv():
    """QLinearConv's removed output channels read by DequantizeLinear: the float Conv after it masks them to 0,
    so no fill is needed there (y_zp = 37 would otherwise dequantize to a nonzero value)."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("QLinearConv", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["yq"],
                         pads=[1, 1, 1, 1]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["yd"]),
        helper.make_node("Conv", ["yd", "w2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    rng = np.random.default_rng(3)
    inits = {"xs": np.float32(0.03), "xz": np.uint8(120), "w": _int8((8, 3, 3, 3), 9),
             "ws": rng.uniform(0.002, 0.01, 8).astype(np.float32), "wz": np.zeros(8, np.int8),
             "ys": np.float32(0.05), "yz": np.uint8(37), "b": rng.integers(-500, 500, 8).astype(np.int32),
             "w2": rand(4, 8, 3, 3, seed=5)}
    model = make_model(nodes, [("x", [1, 3, 6, 6])], [("y", [1, 4, 6, 6])], inits, opset=13)
    pruned, report = prune_checked(model, ratio=0.5)
    inits = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert inits["w"].shape == (4, 3, 3, 3) and inits["ws"].shape == (4,) and inits["b"].shape == (4,)
    assert inits["w2"].shape == (4, 4, 3, 3)
    assert report.channels_removed == 4


def _float_mlp():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    inits = {"w1": rand(16, 12, seed=1), "w2": rand(12, 6, seed=2)}
    return make_model(nodes, [("x", [2, 16])], [("y", [2, 6])], inits, opset=13)


def test_qlinear_matmul_from_quantize_static_prunes_exactly(tmp_path):
    model = _static_qoperator(tmp_path, _float_mlp(), _calib([2, 16]), per_channel=False)
    assert sum(n.op_type == "QLinearMatMul" for n in model.graph.node) == 2
    pruned, report = prune_checked(model, ratio=0.5)
    first, second = [n for n in pruned.graph.node if n.op_type == "QLinearMatMul"]
    inits = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert inits[first.input[3]].shape == (16, 6) and inits[second.input[3]].shape == (6, 6)
    assert report.macs_after < report.macs_before
    # the static quantizer's int8 weights reach ±127, so the hidden channels go in aligned pairs (6 units of 2)
    assert (6, 12) in group_sizes(model)


def test_qlinear_matmul_with_per_column_weight_scales():
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("QLinearMatMul", ["xq", "xs", "xz", "w", "ws", "wz", "hs", "hz"], ["hq"]),
        helper.make_node("QLinearMatMul", ["hq", "hs", "hz", "w2", "ws2", "wz2", "ys", "yz"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"]),
    ]
    rng = np.random.default_rng(4)
    inits = {"xs": np.float32(0.02), "xz": np.uint8(128), "w": _int8((16, 12), 1),
             "ws": rng.uniform(0.001, 0.01, 12).astype(np.float32), "wz": np.zeros(12, np.int8),
             "hs": np.float32(0.05), "hz": np.uint8(90), "w2": _int8((12, 6), 2), "ws2": np.float32(0.004),
             "wz2": np.int8(0), "ys": np.float32(0.1), "yz": np.uint8(128)}
    model = make_model(nodes, [("x", [2, 16])], [("y", [2, 6])], inits, opset=13)
    pruned, _ = prune_checked(model, ratio=0.5)
    inits = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert inits["w"].shape == (16, 6) and inits["ws"].shape == (6,) and inits["wz"].shape == (6,)
    assert inits["w2"].shape == (6, 6)


def _nbits(a, y, k, n, block, seed, bias=None, zero_points=True):
    """A 4-bit MatMulNBits with random packed weights, per-(row, block) scales and packed zero points."""
    rng = np.random.default_rng(seed)
    n_blocks = -(-k // block)
    inits = {f"B{seed}": rng.integers(0, 256, (n, n_blocks, block // 2)).astype(np.uint8),
             f"S{seed}": rng.uniform(0.01, 0.05, n * n_blocks).astype(np.float32)}
    names = [a, f"B{seed}", f"S{seed}"]
    if zero_points:
        inits[f"Z{seed}"] = rng.integers(0, 256, n * (-(-n_blocks // 2))).astype(np.uint8)
        names.append(f"Z{seed}")
    if bias is not None:
        names += [""] * (5 - len(names)) + [bias]
        inits[bias] = rand(n, seed=seed + 100)
    node = helper.make_node("MatMulNBits", names, [y], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block)
    return node, inits


def _nbits_model(k_block=16, g_idx=False):
    first, i1 = _nbits("x", "h", 32, 64, k_block, 1, bias="bias1")
    second, i2 = _nbits("r", "y", 64, 8, k_block, 2)
    inits = {**i1, **i2}
    if g_idx:
        inits["g"] = (np.arange(64) // k_block).astype(np.int32)
        second.input.extend(["g"] if len(second.input) == 4 else ["", "g"])  # g_idx is input 4
    nodes = [first, helper.make_node("Relu", ["h"], ["r"]), second]
    model = make_model(nodes, [("x", [3, 32])], [("y", [3, 8])], inits, opset=13, check=False)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def test_matmul_nbits_prunes_rows_and_whole_blocks():
    """The hidden channels are the first node's rows (with their scales, packed zero points and bias) and the
    second node's input channels, which go a whole block of 16 at a time: the groups are blocks."""
    import graphprune
    model = _nbits_model()
    analysis = graphprune.analyze_model(model)
    assert [(len(g.units), g.channels) for g in analysis.groups] == [(4, 64)]  # 64 channels, 4 blocks of 16
    pruned, report = prune_checked(model, ratio=0.5)
    first, second = [n for n in pruned.graph.node if n.op_type == "MatMulNBits"]
    inits = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    attrs = {n.name or id(n): {a.name: a.i for a in n.attribute} for n in (first, second)}
    a1, a2 = attrs[first.name or id(first)], attrs[second.name or id(second)]
    assert (a1["N"], a1["K"], a2["N"], a2["K"]) == (32, 32, 8, 32)
    assert inits[first.input[1]].shape == (32, 2, 8) and inits[first.input[2]].shape == (64,)
    assert inits[first.input[3]].shape == (32,) and inits[first.input[5]].shape == (32,)
    assert inits[second.input[1]].shape == (8, 2, 8) and inits[second.input[2]].shape == (16,)
    assert inits[second.input[3]].shape == (8,)
    assert report.macs_after == report.macs_before // 2


def test_matmul_nbits_unpack_pack_round_trip():
    from graphprune.ops.quant import _pack, _unpack
    values = np.random.default_rng(0).integers(0, 16, (5, 7)).astype(np.uint8)
    packed = _pack(values, 4)
    assert packed.shape == (5, 4)
    assert packed[0, 0] == values[0, 0] | (values[0, 1] << 4)
    assert np.array_equal(_unpack(packed.reshape(-1), 4, 5, 7), values)


def test_matmul_nbits_with_g_idx_freezes_its_input_channels():
    import graphprune
    analysis = graphprune.analyze_model(_nbits_model(g_idx=True))
    assert analysis.groups == []
    assert any("g_idx" in g.reason and "MatMulNBits" in g.reason for g in analysis.frozen_groups)


def _two_layer_lstm_classifier(vocab=40, emb=16, hidden=32, seq=12, classes=5):
    """Embedding -> LSTM -> LSTM -> last step -> Gemm, as PyTorch exports a classifier (batch 1). Uniform
    weights fill the int8 range, so onnxruntime's u8s8 kernel saturates some of its int16 pair sums."""
    rng = np.random.default_rng(0)

    def uni(*shape):
        return (rng.uniform(-1, 1, shape) / np.sqrt(shape[-1])).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb", "tok"], ["e"]),
             helper.make_node("Transpose", ["e"], ["et"], perm=[1, 0, 2]),
             helper.make_node("LSTM", ["et", "W1", "R1", "B1"], ["y1"], hidden_size=hidden),
             helper.make_node("Squeeze", ["y1", "ax1"], ["s1"]),
             helper.make_node("LSTM", ["s1", "W2", "R2", "B2"], ["y2"], hidden_size=hidden),
             helper.make_node("Squeeze", ["y2", "ax1"], ["s2"]),
             helper.make_node("Gather", ["s2", "last"], ["h"], axis=0),
             helper.make_node("Gemm", ["h", "Wf", "bf"], ["out"], transB=1)]
    inits = {"emb": rng.standard_normal((vocab, emb)).astype(np.float32),
             "W1": uni(1, 4 * hidden, emb), "R1": uni(1, 4 * hidden, hidden), "B1": uni(1, 8 * hidden),
             "W2": uni(1, 4 * hidden, hidden), "R2": uni(1, 4 * hidden, hidden), "B2": uni(1, 8 * hidden),
             "ax1": np.array([1], np.int64), "last": np.array(seq - 1, np.int64),
             "Wf": uni(classes, hidden), "bf": uni(classes)}
    return make_model(nodes, [("tok", [1, seq], TensorProto.INT64)], [("out", [1, classes])], inits, opset=13)


def test_two_layer_dynamic_quantize_lstm_prunes_exactly_in_saturation_safe_pairs(tmp_path):
    """Embedding -> DynamicQuantizeLSTM -> DynamicQuantizeLSTM -> MatMulInteger: with full-range int8 W and R,
    onnxruntime's u8s8 kernel saturates adjacent-pair int16 sums, so removing single channels made the pruned
    model 2e-4..7e-3 off its masked reference. Input channels and hidden units now go in aligned pairs, and the
    pruned model is exact."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    src, dst = tmp_path / "cls.onnx", tmp_path / "cls.int8.onnx"
    onnx.save(_two_layer_lstm_classifier(), src)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["LSTM", "MatMul", "Gemm"])
    model = onnx.load(dst)
    assert sum(n.op_type == "DynamicQuantizeLSTM" for n in model.graph.node) == 2
    # embedding width 16 and both hidden widths 32, each in pairs
    assert group_sizes(model) == [(8, 16), (16, 32), (16, 32)]
    pruned, report = prune_checked(model, ratio=0.5)
    assert report.verification["max_abs_diff"] == 0.0
    first = next(n for n in pruned.graph.node if n.op_type == "DynamicQuantizeLSTM")
    assert next(a.i for a in first.attribute if a.name == "hidden_size") == 16


def test_matmul_integer_with_small_weights_keeps_single_channels():
    """Weights within ±64 cannot saturate a pair (2·255·64 < 32768): no pairing, channels stay single."""
    assert (12, 12) in group_sizes(_dynamic_int8_mlp_small())


def _dynamic_int8_mlp_small():
    model = _dynamic_int8_mlp()
    for t in model.graph.initializer:
        if t.name in ("w0", "w1"):
            t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) // 2).astype(np.int8), t.name))
    return model
