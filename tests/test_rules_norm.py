"""Statistics over pruned channels (graphprune/ops/layernorm.py): LayerNormalization, RMS normalisation, their
hand-written forms and channel means prune the normalised axis, and the rewritten model equals the original with
the removed channels masked to zero (verification on). Every case also checks that the width really shrank and
that the statistics node was replaced by standard ops dividing by the original width."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.ops.layernorm import decompose_layer_norm  # noqa: F401  (the module under test)

from helpers import GraphBuilder, group_sizes, make_model, prune_checked, rand, wshape

F = TensorProto.FLOAT


class Net(GraphBuilder):
    """GraphBuilder at a chosen opset, with the norm patterns exporters write."""

    def __init__(self, opset=17, seed=0):
        super().__init__(seed)
        self.opset = opset

    def reduce(self, op_type, x, axes, keepdims=1):
        """ReduceMean/ReduceSum with axes as an attribute or an input, as the opset wants."""
        takes_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if takes_input:
            return self.op(op_type, [x, self.const(np.asarray(axes, np.int64))], keepdims=keepdims)
        return self.op(op_type, [x], axes=list(axes), keepdims=keepdims)

    def layer_norm_op(self, x, width, name, bias=True, outputs=1):
        ins = [x, self.w(width, name=f"{name}.gamma", positive=True)]
        if bias:
            ins.append(self.w(width, name=f"{name}.beta", scale=0.5))
        return self.op("LayerNormalization", ins, outputs=outputs, axis=-1, epsilon=1e-5)

    def layer_norm_decomposed(self, x, width, name):
        """PyTorch's legacy export: ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add."""
        d = self.op("Sub", [x, self.reduce("ReduceMean", x, [-1])])
        var = self.reduce("ReduceMean", self.op("Pow", [d, self.const(np.float32(2))]), [-1])
        n = self.op("Div", [d, self.op("Sqrt", [self.op("Add", [var, self.const(np.float32(1e-5))])])])
        n = self.op("Mul", [n, self.w(width, name=f"{name}.gamma", positive=True)])
        return self.op("Add", [n, self.w(width, name=f"{name}.beta", scale=0.5)])

    def rms_norm_decomposed(self, x, width, name):
        """Llama/Qwen's export: Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul/Mul."""
        ms = self.reduce("ReduceMean", self.op("Pow", [x, self.const(np.float32(2))]), [-1])
        inv = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [ms, self.const(np.float32(1e-6))])])])
        return self.op("Mul", [self.w(width, name=f"{name}.gamma", positive=True), self.op("Mul", [x, inv])])

    def model(self, inputs, outputs):
        return make_model(self.nodes, inputs, outputs, self.inits, opset=self.opset)

    def ms_model(self, inputs, outputs):
        """With onnxruntime's com.microsoft ops (not checked: onnx.checker does not know them)."""
        return make_model(self.nodes, inputs, outputs, self.inits, opset=self.opset, check=False,
                          domains={"com.microsoft": 1})


def _mask_hidden(model, removed):
    """The masked original of an up.w -> ... -> down.w block by hand: the removed hidden channels zeroed in
    up.w's columns and down.w's rows."""
    masked = onnx.ModelProto()
    masked.CopyFrom(model)
    for t in masked.graph.initializer:
        if t.name in ("up.w", "down.w"):
            arr = numpy_helper.to_array(t).copy()
            if t.name == "up.w":
                arr[:, removed] = 0
            else:
                arr[removed, :] = 0
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return masked


def op_types(model):
    return {n.op_type for n in model.graph.node}


def frozen_reasons(model):
    return [g.reason for g in graphprune.analyze_model(model).frozen_groups]


# ---- LayerNormalization (opset 17+) --------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_op_prunes_its_width(opset, bias):
    """MatMul -> LayerNormalization -> MatMul: the normalised width halves; the node becomes ReduceSum-based ops
    whose statistics divide by the original 12 (a masked channel still counts in the original's denominator)."""
    net = Net(opset)
    h = net.matmul("x", 10, 12, "up")
    n = net.layer_norm_op(h, 12, "ln", bias=bias)
    y = net.matmul(n, 12, 6, "down")
    model = net.model([("x", [2, 5, 10])], [(y, [2, 5, 6])])
    assert group_sizes(model) == [(12, 12)]
    pruned, report = prune_checked(model)
    assert wshape(pruned, "up.w") == (10, 6) and wshape(pruned, "ln.gamma") == (6,)
    assert wshape(pruned, "down.w") == (6, 6)
    if bias:
        assert wshape(pruned, "ln.beta") == (6,)
    assert "LayerNormalization" not in op_types(pruned) and "ReduceSum" in op_types(pruned)
    widths = [numpy_helper.to_array(t) for t in pruned.graph.initializer if "original_width" in t.name]
    assert [float(w) for w in widths] == [12.0]
    assert report.verification["max_abs_diff"] < 1e-4


def test_layer_norm_mean_and_inv_std_outputs_stay_exact():
    """LayerNormalization's optional Mean and InvStdDev outputs are graph outputs: they must equal the masked
    original's statistics over the original width too."""
    net = Net(17)
    h = net.matmul("x", 10, 12, "up")
    n, mean, inv = net.layer_norm_op(h, 12, "ln", outputs=3)
    y = net.matmul(n, 12, 6, "down")
    model = net.model([("x", [2, 5, 10])], [(y, [2, 5, 6]), (mean, [2, 5, 1]), (inv, [2, 5, 1])])
    pruned, _ = prune_checked(model)
    assert wshape(pruned, "ln.gamma") == (6,)
    assert [o.name for o in pruned.graph.output] == [y, mean, inv]


def test_layer_norm_with_large_offset_matches_masked_original():
    """A mean far from zero makes sum(x^2)/C - mean^2 cancel badly; the centred sum used instead stays exact."""
    net = Net(17)
    h = net.op("Add", [net.matmul("x", 10, 12, "up"), net.const(np.full(12, 30.0, np.float32), "offset")])
    y = net.matmul(net.layer_norm_op(h, 12, "ln"), 12, 6, "down")
    model = net.model([("x", [2, 5, 10])], [(y, [2, 5, 6])])
    pruned, report = prune_checked(model, verify_samples=3)
    assert wshape(pruned, "ln.gamma") == (6,)
    assert report.verification["max_rel_diff"] < 1e-5


def test_layer_norm_float16_computes_in_float32():
    """stash_type=1 (default): a float16 LayerNormalization computes its statistics in float32; the rewrite widens
    before and narrows after the same way. Verification's tolerance is for float32, so the masked original is
    built here by hand (removed columns of up.w and rows of down.w zeroed) and compared at float16 precision."""
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["x16", "up.w"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "ln.gamma", "ln.beta"], ["n"], axis=-1),
             helper.make_node("MatMul", ["n", "down.w"], ["y16"]),
             helper.make_node("Cast", ["y16"], ["y"], to=F)]
    init = {"up.w": rand(10, 12).astype(np.float16), "ln.gamma": rand(12, positive=True).astype(np.float16),
            "ln.beta": rand(12).astype(np.float16), "down.w": rand(12, 6).astype(np.float16)}
    model = make_model(nodes, [("x", [2, 5, 10])], [("y", [2, 5, 6])], init, opset=17)
    pruned, _ = graphprune.prune(model, ratio=0.5, verify=False, importance="l1")
    assert wshape(pruned, "ln.gamma") == (6,)
    kept_gamma = next(numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name == "ln.gamma")
    kept = [int(np.flatnonzero(init["ln.gamma"] == g)[0]) for g in kept_gamma]
    removed = sorted(set(range(12)) - set(kept))
    masked = _mask_hidden(model, removed)
    from graphprune.runtime import session
    x = np.random.default_rng(0).standard_normal((2, 5, 10)).astype(np.float32)
    want = session(masked).run(None, {"x": x})[0]
    got = session(pruned).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
    casts = {a.i for n in pruned.graph.node if n.op_type == "Cast" for a in n.attribute}
    assert {TensorProto.FLOAT, TensorProto.FLOAT16} <= casts


def test_layer_norm_over_several_axes_stays_frozen():
    net = Net(17)
    h = net.matmul("x", 10, 12, "up")
    n = net.op("LayerNormalization", [h, net.w(5, 12, name="ln.gamma", positive=True)], axis=-2)
    y = net.matmul(n, 12, 6, "down")
    model = net.model([("x", [2, 5, 10])], [(y, [2, 5, 6])])
    assert any("LayerNormalization" in r and "several axes" in r for r in frozen_reasons(model))
    assert group_sizes(model) == []


# ---- RMS normalisation ops ------------------------------------------------------------------------------------------
def test_rms_normalization_op_opset23():
    net = Net(23)
    h = net.matmul("x", 10, 12, "up")
    n = net.op("RMSNormalization", [h, net.w(12, name="rms.gamma", positive=True)], axis=-1, epsilon=1e-6)
    y = net.matmul(n, 12, 6, "down")
    model = net.model([("x", [2, 5, 10])], [(y, [2, 5, 6])])
    pruned, _ = prune_checked(model)
    assert wshape(pruned, "rms.gamma") == (6,) and "RMSNormalization" not in op_types(pruned)


def test_simplified_layer_norm_becomes_standard_ops():
    """onnxruntime's SimplifiedLayerNormalization (ONNX domain, rejected by onnx.checker): the rewrite leaves
    only standard ops, so the pruned model passes the full check."""
    nodes = [helper.make_node("MatMul", ["x", "up.w"], ["h"]),
             helper.make_node("SimplifiedLayerNormalization", ["h", "g"], ["n"], axis=-1, epsilon=1e-6),
             helper.make_node("MatMul", ["n", "down.w"], ["y"])]
    init = {"up.w": rand(10, 12), "g": rand(12, positive=True), "down.w": rand(12, 6)}
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", F, [2, 5, 10])],
                              [helper.make_tensor_value_info("y", F, [2, 5, 6])],
                              [numpy_helper.from_array(v, k) for k, v in init.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    pruned, _ = prune_checked(model)
    assert wshape(pruned, "g") == (6,) and "SimplifiedLayerNormalization" not in op_types(pruned)


# ---- hand-written forms: ReduceMean over the channel axis ----------------------------------------------------------
@pytest.mark.parametrize("opset", [11, 13, 18])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_decomposed_norm_prunes_its_width(kind, opset):
    """ReduceMean over the pruned axis -> ReduceSum / original width. Opset 11: axes attributes everywhere;
    13: ReduceSum takes axes as an input, ReduceMean still as an attribute; 18: both as inputs."""
    net = Net(opset)
    h = net.matmul("x", 10, 12, "up")
    norm = net.layer_norm_decomposed if kind == "layernorm" else net.rms_norm_decomposed
    y = net.matmul(norm(h, 12, "ln"), 12, 6, "down")
    model = net.model([("x", [2, 5, 10])], [(y, [2, 5, 6])])
    assert group_sizes(model) == [(12, 12)]
    pruned, _ = prune_checked(model)
    assert wshape(pruned, "up.w") == (10, 6) and wshape(pruned, "ln.gamma") == (6,)
    assert "ReduceMean" not in op_types(pruned)
    sums = [n for n in pruned.graph.node if n.op_type == "ReduceSum"]
    assert len(sums) == (2 if kind == "layernorm" else 1)
    assert all((len(n.input) == 2) == (opset >= 13) for n in sums)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_channel_mean_gate_cbam_style(opset):
    """A spatial gate from the mean over channels ([N,1,H,W], CBAM): the channel axis stays prunable and the mean
    still divides by the original channel count."""
    net = Net(opset)
    w1 = net.w(8, 3, 3, 3, name="c1.w")
    h = net.op("Conv", ["x", w1, net.w(8, name="c1.b")], pads=[1, 1, 1, 1])
    mean = net.reduce("ReduceMean", h, [1])
    gate = net.op("Sigmoid", [net.op("Conv", [mean, net.w(1, 1, 3, 3, name="sp.w")], pads=[1, 1, 1, 1])])
    y = net.op("Conv", [net.op("Mul", [h, gate]), net.w(4, 8, 1, 1, name="c2.w")])
    model = net.model([("x", [1, 3, 6, 6])], [(y, [1, 4, 6, 6])])
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    assert wshape(pruned, "c1.w") == (4, 3, 3, 3) and wshape(pruned, "c2.w") == (4, 4, 1, 1)
    assert "ReduceMean" not in op_types(pruned)


def test_spatial_mean_is_left_alone():
    """ReduceMean over spatial axes (global pooling written by hand): no channel of those axes is removed, so the
    node stays a ReduceMean."""
    net = Net(13)
    h = net.op("Conv", ["x", net.w(8, 3, 3, 3, name="c1.w")], pads=[1, 1, 1, 1])
    y = net.matmul(net.reduce("ReduceMean", h, [2, 3], keepdims=0), 8, 4, "fc")
    model = net.model([("x", [1, 3, 6, 6])], [(y, [1, 4])])
    pruned, _ = prune_checked(model)
    assert wshape(pruned, "c1.w") == (4, 3, 3, 3) and "ReduceMean" in op_types(pruned)


# ---- a 2-layer pre-norm transformer encoder -------------------------------------------------------------------------
def _encoder(opset, decomposed_second_layer):
    """Embedding -> 2 x [x + Attn(LN(x)); x + FFN(LN(x))] -> LN -> head; 2 heads of 8, hidden 16, sequence 5."""
    net = Net(opset, seed=3)
    d, heads, seq = 16, 2, 5
    x = net.matmul("tokens", 10, d, "emb")
    for layer in range(2):
        norm = (net.layer_norm_decomposed if decomposed_second_layer and layer == 1 else net.layer_norm_op)
        n = norm(x, d, f"l{layer}.ln1")

        def heads_of(t, perm):
            split = net.op("Reshape", [t, net.const(np.array([1, seq, heads, d // heads], np.int64))])
            return net.op("Transpose", [split], perm=perm)
        q = heads_of(net.matmul(n, d, d, f"l{layer}.q"), [0, 2, 1, 3])
        k = heads_of(net.matmul(n, d, d, f"l{layer}.k"), [0, 2, 3, 1])
        v = heads_of(net.matmul(n, d, d, f"l{layer}.v"), [0, 2, 1, 3])
        scores = net.op("Mul", [net.op("MatMul", [q, k]), net.const(np.float32(1 / np.sqrt(d // heads)))])
        ctx = net.op("MatMul", [net.op("Softmax", [scores], axis=-1), v])
        ctx = net.op("Reshape", [net.op("Transpose", [ctx], perm=[0, 2, 1, 3]),
                                 net.const(np.array([1, seq, d], np.int64))])
        x = net.op("Add", [x, net.matmul(ctx, d, d, f"l{layer}.o")])
        n = norm(x, d, f"l{layer}.ln2")
        ffn = net.matmul(net.op("Relu", [net.matmul(n, d, 32, f"l{layer}.up")]), 32, d, f"l{layer}.down")
        x = net.op("Add", [x, ffn])
    y = net.matmul(net.layer_norm_op(x, d, "final.ln"), d, 4, "head")
    return net.model([("tokens", [1, seq, 10])], [(y, [1, seq, 4])])


@pytest.mark.parametrize("opset,decomposed", [(17, False), (17, True), (18, True)])
def test_transformer_encoder_residual_stream_prunes(opset, decomposed):
    model = _encoder(opset, decomposed)
    assert not [r for r in frozen_reasons(model) if "Normalization" in r or "ReduceMean" in r]
    pruned, report = prune_checked(model)
    assert wshape(pruned, "emb.w") == (10, 8)                          # the residual width halved
    for name in ("l0.ln1.gamma", "l1.ln2.gamma", "final.ln.gamma"):
        assert wshape(pruned, name) == (8,)
    assert wshape(pruned, "head.w") == (8, 4)
    assert report.macs_after < 0.35 * report.macs_before
    assert not op_types(pruned) & {"LayerNormalization", "ReduceMean"}


# ---- issue 11 quick wins: int32 Slice bounds, size-1 broadcast operands -------------------------------------------
@pytest.mark.parametrize("index_type", [np.int32, np.int64])
def test_slice_bounds_keep_their_integer_type(index_type):
    """jax2tf / tf2onnx write Slice starts/ends/axes as int32; the rewritten bounds must keep that type, or the
    model is invalid ("axes has inconsistent type tensor(int32)")."""
    net = Net(13)
    h = net.matmul("x", 10, 12, "up")
    bounds = [net.const(np.array(v, index_type)) for v in ([2], [10], [-1])]
    y = net.matmul(net.op("Slice", [h] + bounds), 8, 6, "down")
    model = net.model([("x", [2, 5, 10])], [(y, [2, 5, 6])])
    pruned, _ = prune_checked(model)
    node = next(n for n in pruned.graph.node if n.op_type == "Slice")
    inits = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert {inits[name].dtype for name in node.input[1:]} == {np.dtype(index_type)}
    assert wshape(pruned, "up.w")[1] < 12


def test_size1_broadcast_operands_leave_channels_free():
    """SE gate [N,C,1,1] (through a [N,C] MLP) and a [N,1,H,W] spatial-attention map times [N,C,H,W]: the
    size-1 side is broadcast, so nothing is frozen for it and the channels prune."""
    net = Net(13)
    h = net.op("Relu", [net.op("Conv", ["x", net.w(8, 3, 3, 3, name="c1.w")], pads=[1, 1, 1, 1])])
    pooled = net.op("Reshape", [net.op("GlobalAveragePool", [h]), net.const(np.array([1, 8], np.int64))])
    squeeze = net.op("Relu", [net.matmul(pooled, 8, 2, "se1")])
    gate = net.op("Reshape", [net.op("Sigmoid", [net.matmul(squeeze, 2, 8, "se2")]),
                              net.const(np.array([1, 8, 1, 1], np.int64))])
    g = net.op("Mul", [h, gate])
    attention = net.op("Sigmoid", [net.op("Conv", [g, net.w(1, 8, 3, 3, name="sa.w")], pads=[1, 1, 1, 1])])
    y = net.op("Conv", [net.op("Mul", [attention, g]), net.w(4, 8, 1, 1, name="c2.w")])
    model = net.model([("x", [1, 3, 6, 6])], [(y, [1, 4, 6, 6])])
    assert not [r for r in frozen_reasons(model) if "size-1" in r]
    assert group_sizes(model) == [(2, 2), (8, 8)]
    pruned, _ = prune_checked(model)
    assert wshape(pruned, "c1.w") == (4, 3, 3, 3) and wshape(pruned, "sa.w") == (1, 4, 3, 3)
    assert wshape(pruned, "se2.w") == (1, 4)


# ---- onnxruntime's fused residual norms (com.microsoft) -------------------------------------------------------------
@pytest.mark.parametrize("qualified", ["com.microsoft::SkipLayerNormalization",
                                       "com.microsoft::SkipSimplifiedLayerNormalization"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_skip_layer_norm(qualified, with_bias):
    """norm(input + skip + bias): the bias is a constant, so in the masked original a removed channel of the sum
    holds b_j, not 0, and still enters the statistics; all four outputs stay exact (graph outputs here)."""
    domain, op = qualified.split("::")
    simplified = op.startswith("SkipSimplified")
    net = Net(17)
    a = net.matmul("x", 10, 12, "a")
    b = net.matmul("x", 10, 12, "b")
    ins = [a, b, net.w(12, name="ln.gamma", positive=True)]
    ins.append("" if simplified else net.w(12, name="ln.beta", scale=0.5))
    if with_bias:
        ins.append(net.const(np.linspace(-2, 3, 12).astype(np.float32), "skip.bias"))
    if simplified:
        del ins[3]
    while ins and not ins[-1]:
        ins.pop()
    n, mean, inv, total = net.op(op, ins, outputs=4, domain=domain, epsilon=1e-5)
    if simplified:
        net.nodes[-1].output[1] = ""  # onnxruntime does not compute the mean of the simplified form
    y = net.matmul(n, 12, 6, "down")
    z = net.matmul(total, 12, 6, "sum_proj")
    outputs = [(y, [2, 5, 6]), (z, [2, 5, 6]), (inv, [2, 5, 1])] + ([] if simplified else [(mean, [2, 5, 1])])
    model = net.ms_model([("x", [2, 5, 10])], outputs)
    assert group_sizes(model) == [(12, 12)]
    pruned, report = prune_checked(model, verify_samples=3)
    assert wshape(pruned, "a.w") == (10, 6) and wshape(pruned, "ln.gamma") == (6,)
    if with_bias:
        assert wshape(pruned, "skip.bias") == (6,)
    assert op not in op_types(pruned)
    assert report.verification["max_rel_diff"] < 1e-5


def test_skip_layer_norm_with_constant_skip_stays_frozen():
    net = Net(17)
    a = net.matmul("x", 10, 12, "a")
    n = net.op("SkipLayerNormalization", [a, net.w(5, 12, name="pos"), net.w(12, name="ln.gamma", positive=True)],
               domain="com.microsoft")
    y = net.matmul(n, 12, 6, "down")
    model = net.ms_model([("x", [2, 5, 10])], [(y, [2, 5, 6])])
    assert any("constant skip input" in r for r in frozen_reasons(model))


@pytest.mark.parametrize("op", ["SkipLayerNormalization", "SkipSimplifiedLayerNormalization"])
def test_skip_layer_norm_between_frozen_streams(op):
    """onnxruntime-fused post-norm block from a graph input to a graph output: the middle stream prunes apart from
    both. Norm 2 loses input channels that its output (a graph output) keeps: in the masked original those hold
    the constant skip bias b_j, so the rewrite fills them with (b_j - mean) * inv_std (b_j * inv_std for RMS)."""
    simplified = op.startswith("SkipSimplified")
    net = Net(17)

    def skip_norm(a, b, name):
        ins = [a, b, net.w(12, name=f"{name}.gamma", positive=True)]
        if not simplified:
            ins.append(net.w(12, name=f"{name}.beta", scale=0.5))
        ins.append(net.const(np.linspace(-2, 3, 12).astype(np.float32), f"{name}.skip_bias"))
        return net.op(op, ins, domain="com.microsoft", epsilon=1e-5)

    h1 = skip_norm("x", net.matmul("x", 12, 12, "attn"), "n1")
    out = skip_norm(h1, net.matmul(net.op("Relu", [net.matmul(h1, 12, 16, "up")]), 16, 12, "down"), "n2")
    model = net.ms_model([("x", [2, 5, 12])], [(out, [2, 5, 12])])
    assert group_sizes(model) == [(12, 12), (16, 16)]
    pruned, report = prune_checked(model, verify_samples=3)
    assert wshape(pruned, "n1.gamma") == (6,) and wshape(pruned, "n1.skip_bias") == (12,)
    assert wshape(pruned, "n2.gamma") == (12,) and wshape(pruned, "n2.skip_bias") == (6,)
    assert wshape(pruned, "down.w") == (8, 6) and "Concat" in op_types(pruned)
    assert report.verification["max_rel_diff"] < 1e-5


@pytest.mark.parametrize("op,shift", [("ReduceMax", -10.0), ("ReduceMin", 10.0)])
@pytest.mark.parametrize("opset", [13, 18])
def test_channel_max_min_see_the_masked_zeros(op, shift, opset):
    """Max over channels that are all negative (min over all positive): in the masked original the zeroed channels
    win, so the rewrite must take max/min with 0 after reducing the kept ones."""
    net = Net(opset)
    h = net.op("Conv", ["x", net.w(8, 3, 3, 3, name="c1.w")], pads=[1, 1, 1, 1])
    shifted = net.op("Add", [h, net.const(np.float32(shift))])
    if opset >= 18:
        stat = net.op(op, [shifted, net.const(np.array([1], np.int64))], keepdims=1)
    else:
        stat = net.op(op, [shifted], axes=[1], keepdims=1)
    gate = net.op("Sigmoid", [net.op("Conv", [stat, net.w(1, 1, 3, 3, name="sp.w")], pads=[1, 1, 1, 1])])
    y = net.op("Conv", [net.op("Mul", [shifted, gate]), net.w(4, 8, 1, 1, name="c2.w")])
    model = net.model([("x", [1, 3, 6, 6])], [(y, [1, 4, 6, 6]), (stat, [1, 1, 6, 6])])
    pruned, _ = prune_checked(model)
    assert wshape(pruned, "c1.w") == (4, 3, 3, 3)
    assert op in op_types(pruned) and ("Max" if op == "ReduceMax" else "Min") in op_types(pruned)


@pytest.mark.parametrize("qualified,bias", [("com.microsoft::FastGelu", True), ("com.microsoft::FastGelu", False),
                                            ("com.microsoft::BiasGelu", True), ("com.microsoft::Gelu", False),
                                            ("com.microsoft::QuickGelu", False)])
def test_contrib_gelu_activations(qualified, bias):
    """onnxruntime's fused GELUs (what its transformer optimizer leaves in GPT-2/BERT FFNs) pass channels through,
    with the bias going along: the FFN hidden width prunes."""
    domain, op = qualified.split("::")
    net = Net(17)
    h = net.matmul("x", 10, 16, "up")
    ins = [h, net.w(16, name="act.bias", scale=0.5)] if bias else [h]
    y = net.matmul(net.op(op, ins, domain=domain), 16, 6, "down")
    model = net.ms_model([("x", [2, 5, 10])], [(y, [2, 5, 6])])
    assert group_sizes(model) == [(16, 16)]
    pruned, _ = prune_checked(model)
    assert wshape(pruned, "up.w") == (10, 8) and wshape(pruned, "down.w") == (8, 6)
    if bias:
        assert wshape(pruned, "act.bias") == (8,)


# ---- a norm's output width pruned apart from its input's -----------------------------------------------------------
def _norm(net, kind, x, width, name):
    if kind == "layernorm":
        return net.layer_norm_op(x, width, name)
    return net.op("RMSNormalization", [x, net.w(width, name=f"{name}.gamma", positive=True)], axis=-1, epsilon=1e-6)


@pytest.mark.parametrize("kind", ["layernorm", "rms"])
def test_norm_between_frozen_streams_prunes_its_middle(kind):
    """A post-norm block whose residual stream starts at a graph input and ends at a graph output: coupled, the
    norms' widths would all be frozen with the stream. Retried apart, the stream between the norms prunes: norm 1
    keeps its input whole and gathers its kept outputs; norm 2 loses input channels while its output (a graph
    output) keeps all 12, the removed ones normalised from the zeros the masked original reads."""
    net = Net(23 if kind == "rms" else 17)
    h1 = _norm(net, kind, net.op("Add", ["x", net.matmul("x", 12, 12, "attn")]), 12, "n1")
    ffn = net.matmul(net.op("Relu", [net.matmul(h1, 12, 16, "up")]), 16, 12, "down")
    out = _norm(net, kind, net.op("Add", [h1, ffn]), 12, "n2")
    model = net.model([("x", [2, 5, 12])], [(out, [2, 5, 12])])
    assert group_sizes(model) == [(12, 12), (16, 16)]
    pruned, report = prune_checked(model, verify_samples=3)
    assert wshape(pruned, "n1.gamma") == (6,) and wshape(pruned, "up.w") == (6, 8)
    assert wshape(pruned, "down.w") == (8, 6)
    assert wshape(pruned, "n2.gamma") == (12,) and wshape(pruned, "attn.w") == (12, 12)
    gathers = [n for n in pruned.graph.node if n.op_type == "Gather"]
    assert len(gathers) == 2 and "Concat" in op_types(pruned)  # n2 appends the removed inputs' column
    assert report.verification["max_abs_diff"] < 1e-4


def test_norm_read_by_a_quantizer_keeps_its_width_coupled():
    """The same block with the norm's output quantized (QuantizeLinear -> DequantizeLinear -> MatMul): the rewritten
    statistics differ from the fused op's by float rounding, which can move a value across a quantization level,
    so the output width is not pruned apart: it stays with the stream from the graph input."""
    net = Net(17)
    h1 = net.layer_norm_op(net.op("Add", ["x", net.matmul("x", 12, 12, "attn")]), 12, "n1")
    q = net.op("QuantizeLinear", [h1, net.const(np.float32(0.02)), net.const(np.uint8(128))])
    dq = net.op("DequantizeLinear", [q, net.const(np.float32(0.02)), net.const(np.uint8(128))])
    y = net.matmul(dq, 12, 6, "down")
    model = net.model([("x", [2, 5, 12])], [(y, [2, 5, 6])])
    assert group_sizes(model) == []
    assert "graph: graph input 'x'" in frozen_reasons(model)


# ---- tf2onnx's LayerNorm lowering: Reshape -> BatchNormalization -> Reshape -----------------------------------------
def _tf2onnx_layer_norm(net, x, width, name, divisor=None, scale_value=1.0):
    """What tf2onnx writes for keras.layers.LayerNormalization over the last axis of x [batch, seq, width]: rows
    become BatchNorm channels of a [1, rows, width, 1] tensor, identity scale/bias sized from Shape(x), the row
    statistics computed beside, a reshape back to Shape(x), then gamma/beta as Mul/Add."""
    i64 = np.int64
    r = net.op("Reshape", [x, net.const(np.array([1, -1, width, 1], i64))])
    shape = net.op("Cast", [net.op("Shape", [x])], to=TensorProto.INT32)
    rows = net.op("ReduceProd", [net.op("Slice", [shape, net.const(np.array([0], i64)), net.const(np.array([2], i64)),
                                                  net.const(np.array([0], i64))])], axes=[0], keepdims=0)
    rows = net.op("Cast", [net.op("Unsqueeze", [rows, net.const(np.array([0], i64))])], to=TensorProto.INT64)
    ones = net.op("Expand", [net.const(np.float32(scale_value)), rows])
    zeros = net.op("Expand", [net.const(np.float32(0.0)), rows])
    mean = net.op("ReduceMean", [r], axes=[0, 2, 3], keepdims=1)
    ssq = net.op("ReduceSumSquare", [net.op("Sub", [r, mean])], axes=[0, 2, 3], keepdims=0)
    if divisor is None:  # tf2onnx counts the width from the reshaped tensor's shape
        count = net.op("ReduceProd", [net.op("Gather", [net.op("Shape", [r]), net.const(np.array([0, 2, 3], i64))])],
                       axes=[0], keepdims=0)
        divisor = net.op("Cast", [count], to=F)
    var = net.op("Div", [ssq, divisor])
    n = net.op("BatchNormalization", [r, ones, zeros, net.op("Squeeze", [mean, net.const(np.array([0, 2, 3], i64))]),
                                      var], epsilon=1e-3)
    back = net.op("Reshape", [n, net.op("Cast", [shape], to=TensorProto.INT64)])
    scaled = net.op("Mul", [back, net.w(width, name=f"{name}.gamma", positive=True)])
    return net.op("Add", [scaled, net.w(width, name=f"{name}.beta", scale=0.5)])


def test_tf2onnx_layer_norm_lowering_prunes_its_width():
    """canonicalize fuses the exact lowering into LayerNormalization, whose rule prunes the hidden width; the pruned
    model equals the original (lowered form, masked) on dynamic batch and sequence."""
    net = Net(17)
    h = net.matmul("x", 10, 12, "up")
    y = net.matmul(_tf2onnx_layer_norm(net, h, 12, "ln"), 12, 6, "down")
    model = net.model([("x", ["batch", "seq", 10])], [(y, ["batch", "seq", 6])])
    assert group_sizes(model) == [(12, 12)]
    pruned, report = prune_checked(model, verify_samples=3)
    assert wshape(pruned, "up.w") == (10, 6) and wshape(pruned, "down.w") == (6, 6)
    assert wshape(pruned, "ln.gamma") == (6,) and wshape(pruned, "ln.beta") == (6,)
    assert "BatchNormalization" not in op_types(pruned) and "Shape" not in op_types(pruned)
    assert report.verification["max_abs_diff"] < 1e-4
    # the pruned model also equals the unfused original with the removed channels masked (up.w columns zeroed,
    # down.w rows zeroed, gamma/beta removed entries zeroed), run as exported
    kept = np.flatnonzero(np.isin(net.inits["ln.gamma"], numpy_helper.to_array(
        next(t for t in pruned.graph.initializer if t.name == "ln.gamma"))))
    masked = _mask_hidden(model, np.setdiff1d(np.arange(12), kept))
    from graphprune.runtime import session
    x = np.random.default_rng(1).standard_normal((3, 7, 10)).astype(np.float32)
    np.testing.assert_allclose(session(pruned).run(None, {"x": x})[0], session(masked).run(None, {"x": x})[0],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant, why", [("unbiased", "variance is not the row variance over 12"),
                                           ("scaled", "scale/bias are not ones/zeros")])
def test_tf2onnx_layer_norm_near_miss_stays_frozen_with_its_reason(variant, why):
    """A lowering that differs (variance over width - 1, a BatchNorm scale of 2) is not a LayerNorm: it stays as
    written, and the frozen width says it is a lowered LayerNorm and what differs, not just 'reshape'."""
    net = Net(17)
    h = net.matmul("x", 10, 12, "up")
    kw = {"divisor": net.const(np.float32(11.0))} if variant == "unbiased" else {"scale_value": 2.0}
    y = net.matmul(_tf2onnx_layer_norm(net, h, 12, "ln", **kw), 12, 6, "down")
    model = net.model([("x", ["batch", "seq", 10])], [(y, ["batch", "seq", 6])])
    reasons = frozen_reasons(model)
    assert group_sizes(model) == []
    lowered = [r for r in reasons if "LayerNorm lowered as Reshape+BatchNormalization (tf2onnx)" in r]
    assert len(lowered) == 2 and all(why in r and "BatchNormalization node" in r for r in lowered), reasons
