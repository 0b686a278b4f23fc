"""Per-rule equivalence tests for the layer rules: conv.py, norm.py, elementwise.py, reduce.py, rnn.py.

Every case is a small hand-built graph with random, non-degenerate weights. `prune_checked` prunes at ratio 0.5
and verifies the pruned model against the original with the removed channels masked on the consumer side, so
a wrong coupling fails verification. On top of that each test asserts what must have gone (weight shapes,
rewritten attributes), the group structure, and what must have stayed (frozen axes, with their reasons).

Graph outputs are always reached through a contraction (a final Conv/MatMul): an output's channels are frozen,
so a pruned channel must be consumed inside the graph for verification to see it.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.ops import elementwise, reduce as reduce_rules

from helpers import group_sizes, make_model, prune_checked, rand

F = TensorProto.FLOAT
mk = helper.make_node


# ---- helpers ---------------------------------------------------------------------------------------------------
def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def shape_of(model, name):
    return tuple(inits(model)[name].shape)


def node_attr(model, op_type, name, default=None):
    """Attribute `name` of the only node of `op_type` in `model`."""
    nodes = [n for n in model.graph.node if n.op_type == op_type]
    assert len(nodes) == 1, f"expected one {op_type} node, found {len(nodes)}"
    for a in nodes[0].attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def status(model, tensor, axis):
    """('group', units) when (tensor, axis) is in a prunable group, ('frozen', reason) when in a frozen one,
    ('none', '') when it is in no reported group (not a channel axis, or nothing with weights reaches it)."""
    analysis = graphprune.analyze_model(model)
    for g in analysis.groups:
        if (tensor, axis) in g.members:
            return "group", len(g.units)
    for g in analysis.frozen_groups:
        if (tensor, axis) in g.members:
            return "frozen", g.reason
    return "none", ""


def assert_frozen(model, tensor, axis, *words):
    kind, reason = status(model, tensor, axis)
    assert kind == "frozen", f"({tensor}, {axis}) should be frozen, is {kind}"
    for w in words:
        assert w in reason, f"reason {reason!r} does not mention {w!r}"


def assert_prunable(model, tensor, axis, units=None):
    kind, n = status(model, tensor, axis)
    assert kind == "group", f"({tensor}, {axis}) should be prunable, is {kind}: {n}"
    if units is not None:
        assert n == units


def build(nodes, inputs, outputs, initializers=None, opset=17):
    """helpers.make_model, with graph output shapes given as None filled in (onnx shape inference, or a run in
    onnxruntime where that gives up, e.g. GroupNormalization and MeanVarianceNormalization in onnx 1.23)."""
    if any(o[1] is None for o in outputs):
        vi = [helper.make_tensor_value_info(i[0], i[2] if len(i) > 2 else F, i[1]) for i in inputs]
        init = [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()]
        graph = helper.make_graph(nodes, "probe", vi, [helper.make_tensor_value_info(o[0], F, None) for o in outputs],
                                  init)
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        try:
            inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=True).graph.output
            shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred}
        except onnx.shape_inference.InferenceError:
            import onnxruntime as ort
            probe.ir_version = 8
            sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
            feeds = {i[0]: np.zeros(i[1], np.float32) for i in inputs}
            shapes = {o.name: list(v.shape) for o, v in zip(sess.get_outputs(), sess.run(None, feeds), strict=True)}
        outputs = [(o[0], shapes[o[0]]) if o[1] is None else o for o in outputs]
    return make_model(nodes, inputs, outputs, initializers, opset=opset)


def kept_indices(old, new, axis):
    """Indices along `axis` of `old` whose slices survive in `new` (in order); asserts each is found once."""
    old_m, new_m = np.moveaxis(old, axis, 0), np.moveaxis(new, axis, 0)
    out = []
    for sl in new_m:
        match = [k for k in range(old_m.shape[0]) if np.array_equal(old_m[k], sl)]
        assert len(match) == 1, "kept slice not found exactly once in the original"
        out.append(match[0])
    assert out == sorted(out)
    return out


def conv(name, x, y, w, b=None, **attrs):
    return mk("Conv", [x, w] + ([b] if b else []), [y], name=name, **attrs)


def sandwich(middle, c_mid=8, c_in=3, hw=(5, 5), c_out=4, mid_in="h", mid_out="m", extra_inits=None, opset=17,
             c_last=None, bias=True):
    """X -> Conv c1 (c_in->c_mid, 3x3) -> h -> middle nodes -> m -> Conv c2 (c_last->c_out, 1x1) -> Y."""
    c_last = c_mid if c_last is None else c_last
    k = (3,) * len(hw)
    nodes = [conv("c1", "X", mid_in, "w1", "b1" if bias else None, kernel_shape=list(k), pads=[1] * 2 * len(hw))]
    nodes += middle
    nodes.append(conv("c2", mid_out, "Y", "w2", kernel_shape=[1] * len(hw)))
    init = {"w1": rand(c_mid, c_in, *k), "w2": rand(c_out, c_last, *(1,) * len(hw))}
    if bias:
        init["b1"] = rand(c_mid, scale=0.5)
    init.update(extra_inits or {})
    return build(nodes, [("X", [1, c_in, *hw])], [("Y", None)], init, opset=opset)


# ---- Conv --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("hw", [(6,), (5, 5)], ids=["1d", "2d"])
def test_conv_group1(bias, hw):
    model = sandwich([mk("Relu", ["h"], ["m"])], hw=hw, bias=bias)
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    k = (3,) * len(hw)
    assert shape_of(pruned, "w1") == (4, 3, *k)
    assert shape_of(pruned, "w2") == (4, 4, *(1,) * len(hw))
    if bias:
        assert shape_of(pruned, "b1") == (4,)
    # the input feeds from the graph and the output reaches it: both stay
    assert_frozen(model, "w1", 1, "graph input")
    assert_frozen(model, "w2", 0, "graph output")


def test_conv_strided_dilated_keeps_attributes():
    nodes = [conv("c1", "X", "h", "w1", "b1", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             mk("Relu", ["h"], ["r"]),
             conv("c2", "r", "Y", "w2", kernel_shape=[3, 3], dilations=[2, 2], pads=[2, 2, 2, 2])]
    model = build(nodes, [("X", [1, 3, 9, 9])], [("Y", None)],
                  {"w1": rand(6, 3, 3, 3), "b1": rand(6), "w2": rand(5, 6, 3, 3)})
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w1") == (3, 3, 3, 3)
    assert shape_of(pruned, "w2") == (5, 3, 3, 3)
    attrs = {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in pruned.graph.node}
    assert attrs["c1"]["strides"] == [2, 2] and attrs["c2"]["dilations"] == [2, 2]


def test_channels_read_by_a_graph_output_stay():
    """h feeds the next conv and is also a graph output: its channels are never removed."""
    nodes = [conv("c1", "X", "h", "w1", "b1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             mk("Relu", ["h"], ["r"]),
             conv("c2", "r", "u", "w2", "b2", kernel_shape=[1, 1]), mk("Relu", ["u"], ["ur"]),
             conv("c3", "ur", "Y", "w3", kernel_shape=[1, 1])]
    model = build(nodes, [("X", [1, 3, 5, 5])], [("Y", None), ("h", None)],
                  {"w1": rand(8, 3, 3, 3), "b1": rand(8), "w2": rand(6, 8, 1, 1), "b2": rand(6),
                   "w3": rand(4, 6, 1, 1)})
    assert_frozen(model, "w1", 0, "graph output 'h'")
    assert group_sizes(model) == [(6, 6)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w1") == (8, 3, 3, 3)
    assert shape_of(pruned, "w2") == (3, 8, 1, 1)
    assert [tuple(d.dim_value for d in o.type.tensor_type.shape.dim) for o in pruned.graph.output] == \
        [(1, 4, 5, 5), (1, 8, 5, 5)]


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_conv(mult):
    c = 6
    dw = conv("dw", "h", "d", "wd", "bd", group=c, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    model = sandwich([dw, mk("Relu", ["d"], ["m"])], c_mid=c, c_last=c * mult,
                     extra_inits={"wd": rand(c * mult, 1, 3, 3), "bd": rand(c * mult)})
    # one unit = one input channel plus its `mult` output channels
    assert group_sizes(model) == [(c, c * mult)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w1") == (3, 3, 3, 3)
    assert shape_of(pruned, "wd") == (3 * mult, 1, 3, 3)
    assert shape_of(pruned, "bd") == (3 * mult,)
    assert shape_of(pruned, "w2") == (4, 3 * mult, 1, 1)
    groups = [helper.get_attribute_value(a) for n in pruned.graph.node if n.name == "dw"
              for a in n.attribute if a.name == "group"]
    assert groups == [3]


@pytest.mark.parametrize("g,c_in,c_out", [(2, 8, 8), (4, 8, 12)])
def test_group_conv(g, c_in, c_out):
    gc = conv("gc", "h", "gout", "wg", "bg", group=g, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    model = sandwich([gc, mk("Relu", ["gout"], ["m"])], c_mid=c_in, c_last=c_out,
                     extra_inits={"wg": rand(c_out, c_in // g, 3, 3), "bg": rand(c_out)})
    # the same local index goes from every group: units of g channels, per_group_in / m_out units
    assert group_sizes(model) == sorted([(c_in // g, c_in), (c_out // g, c_out)])
    pruned, _ = prune_checked(model)
    keep_out = c_out // g - int(np.floor(c_out // g * 0.5 + 0.5))
    keep_in = c_in // g - int(np.floor(c_in // g * 0.5 + 0.5))
    assert shape_of(pruned, "w1")[0] == keep_in * g
    assert shape_of(pruned, "wg") == (keep_out * g, keep_in, 3, 3)
    assert shape_of(pruned, "bg") == (keep_out * g,)
    assert shape_of(pruned, "w2") == (4, keep_out * g, 1, 1)
    groups = [helper.get_attribute_value(a) for n in pruned.graph.node if n.name == "gc"
              for a in n.attribute if a.name == "group"]
    assert groups == [g]  # every group keeps an equal share, so `group` stays


def test_conv_transpose_group1():
    ct = mk("ConvTranspose", ["h", "wt", "bt"], ["t"], name="ct", kernel_shape=[2, 2], strides=[2, 2])
    model = sandwich([mk("Relu", ["h"], ["r"]), ct, mk("Relu", ["t"], ["m"])], c_mid=8, c_last=6,
                     extra_inits={"wt": rand(8, 6, 2, 2), "bt": rand(6)})
    assert group_sizes(model) == [(6, 6), (8, 8)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "wt") == (4, 3, 2, 2)   # input channels are rows, output channels columns
    assert shape_of(pruned, "bt") == (3,)
    assert shape_of(pruned, "w2") == (4, 3, 1, 1)


def test_conv_transpose_depthwise():
    ct = mk("ConvTranspose", ["h", "wt", "bt"], ["t"], name="ct", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=8)
    model = sandwich([ct, mk("Relu", ["t"], ["m"])], extra_inits={"wt": rand(8, 1, 3, 3), "bt": rand(8)})
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "wt") == (4, 1, 3, 3)
    assert shape_of(pruned, "bt") == (4,)
    assert node_attr(pruned, "ConvTranspose", "group") == 4


def test_conv_transpose_grouped_is_frozen_with_reason():
    """Documented limitation: grouped ConvTranspose with several channels per group is not mapped."""
    ct = mk("ConvTranspose", ["h", "wt"], ["t"], name="ct", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=2)
    model = sandwich([ct, mk("Relu", ["t"], ["m"])], extra_inits={"wt": rand(8, 4, 3, 3)})
    assert_frozen(model, "h", 1, "grouped ConvTranspose")
    assert_frozen(model, "t", 1, "grouped ConvTranspose")
    assert group_sizes(model) == []


# ---- Gemm / MatMul -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [(8,), (1, 8), ()], ids=["N", "1xN", "scalar"])
def test_gemm(trans_a, trans_b, bias_shape):
    w1 = rand(8, 10) if trans_b else rand(10, 8)
    nodes = [mk("Gemm", ["X", "w1", "b1"], ["h"], transA=trans_a, transB=trans_b, alpha=0.7, beta=1.3),
             mk("Relu", ["h"], ["r"]),
             mk("Gemm", ["r", "w2", "b2"], ["Y"], transB=trans_b)]
    w2 = rand(5, 8) if trans_b else rand(8, 5)
    b1 = rand(*bias_shape, scale=0.5) if bias_shape else np.float32(0.3)
    x_shape = [10, 3] if trans_a else [3, 10]
    model = build(nodes, [("X", x_shape)], [("Y", None)], {"w1": w1, "b1": b1, "w2": w2, "b2": rand(5)})
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w1") == ((4, 10) if trans_b else (10, 4))
    assert shape_of(pruned, "w2") == ((5, 4) if trans_b else (4, 5))
    assert shape_of(pruned, "b1") == tuple(4 if d == 8 else d for d in bias_shape)
    assert shape_of(pruned, "b2") == (5,)


def test_gemm_activation_b():
    """Gemm of two activations: the contracted axis couples A and B."""
    nodes = [mk("Gemm", ["X", "wa"], ["a"]),                      # [3, 8]
             mk("Gemm", ["X", "wb"], ["bt"], transB=1),           # [3, 8]
             mk("Transpose", ["bt"], ["b"], perm=[1, 0]),         # [8, 3]
             mk("Gemm", ["a", "b"], ["s"]),                       # [3, 3]
             mk("MatMul", ["s", "X"], ["Y"])]
    model = build(nodes, [("X", [3, 10])], [("Y", None)], {"wa": rand(10, 8), "wb": rand(8, 10)})
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "wa") == (10, 4)
    assert shape_of(pruned, "wb") == (4, 10)


@pytest.mark.parametrize("x_shape", [[10], [3, 10], [2, 3, 10], [2, 2, 3, 10]], ids=["1d", "2d", "3d", "4d"])
def test_matmul_const_weight(x_shape):
    nodes = [mk("MatMul", ["X", "w1"], ["h"]), mk("Add", ["h", "b1"], ["hb"]), mk("Relu", ["hb"], ["r"]),
             mk("MatMul", ["r", "w2"], ["Y"])]
    model = build(nodes, [("X", x_shape)], [("Y", None)], {"w1": rand(10, 8), "b1": rand(8), "w2": rand(8, 5)})
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w1") == (10, 4)
    assert shape_of(pruned, "b1") == (4,)
    assert shape_of(pruned, "w2") == (4, 5)
    assert_frozen(model, "w1", 0, "graph input")


def test_matmul_attention_qk():
    """Q.K^T contracts the head dim of two activations: Wq and Wk columns go together; V's width is its own group."""
    nodes = [mk("MatMul", ["X", "wq"], ["q"]), mk("MatMul", ["X", "wk"], ["k"]),
             mk("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             mk("MatMul", ["q", "kt"], ["s"]),
             mk("Softmax", ["s"], ["a"], axis=-1),
             mk("MatMul", ["X", "wv"], ["v"]),
             mk("MatMul", ["a", "v"], ["o"]),
             mk("MatMul", ["o", "wo"], ["Y"])]
    model = build(nodes, [("X", [2, 6, 8])], [("Y", None)],
                       {"wq": rand(8, 12), "wk": rand(8, 12), "wv": rand(8, 10), "wo": rand(10, 8)})
    assert group_sizes(model) == [(10, 10), (12, 12)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "wq") == (8, 6)
    assert shape_of(pruned, "wk") == (8, 6)
    assert shape_of(pruned, "wv") == (8, 5)
    assert shape_of(pruned, "wo") == (5, 8)


def test_matmul_batch_broadcast_is_frozen():
    """A size-1 batch axis broadcast against a larger one is frozen (it is not a channel anyway)."""
    nodes = [mk("MatMul", ["X", "w1"], ["h"]),            # [2, 3, 8]
             mk("MatMul", ["p", "h"], ["s"]),             # p [1, 4, 3] (const) x h [2, 3, 8] -> [2, 4, 8]
             mk("MatMul", ["s", "w2"], ["Y"])]
    model = build(nodes, [("X", [2, 3, 10])], [("Y", None)],
                       {"w1": rand(10, 8), "p": rand(1, 4, 3), "w2": rand(8, 5)})
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w1") == (10, 4)
    assert shape_of(pruned, "p") == (1, 4, 3)


# ---- normalisations ----------------------------------------------------------------------------------------------
def test_batch_norm():
    bn = mk("BatchNormalization", ["h", "s", "bb", "mean", "var"], ["n"], epsilon=1e-3)
    model = sandwich([bn, mk("Relu", ["n"], ["m"])],
                     extra_inits={"s": rand(8, positive=True), "bb": rand(8), "mean": rand(8),
                                  "var": rand(8, positive=True)})
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    for p in ("s", "bb", "mean", "var"):
        assert shape_of(pruned, p) == (4,)
    assert shape_of(pruned, "w1") == (4, 3, 3, 3)


def test_instance_norm():
    norm = mk("InstanceNormalization", ["h", "s", "bb"], ["n"], epsilon=1e-5)
    model = sandwich([norm, mk("Relu", ["n"], ["m"])], extra_inits={"s": rand(8, positive=True), "bb": rand(8)})
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "s") == (4,)
    assert shape_of(pruned, "bb") == (4,)


def _group_norm_model(opset, groups=4, c=8):
    size = groups if opset == 18 else c
    norm = mk("GroupNormalization", ["h", "s", "bb"], ["n"], num_groups=groups, epsilon=1e-5)
    nodes = [conv("c1", "X", "h", "w1", "b1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]), norm,
             mk("Relu", ["n"], ["m"]), conv("c2", "m", "Y", "w2", kernel_shape=[1, 1])]
    init = {"w1": rand(c, 3, 3, 3), "b1": rand(c), "s": rand(size, positive=True), "bb": rand(size),
            "w2": rand(4, c, 1, 1)}
    # built without onnx.checker: onnx 1.23 rejects GroupNormalization-18 as deprecated
    return make_model(nodes, [("X", [1, 3, 5, 5])], [("Y", [1, 4, 5, 5])], init, opset=opset, check=False)


@pytest.mark.parametrize("opset", [18, 21])
def test_group_norm(opset, monkeypatch):
    """Whole groups go together. Opset 18: scale/bias per group; opset 21: per channel. onnx infers no shapes
    through GroupNormalization; canonicalisation measures them in onnxruntime."""
    groups, c = 4, 8
    size = groups if opset == 18 else c
    model = _group_norm_model(opset)
    assert group_sizes(model) == [(groups, c)]
    if opset == 18:
        # onnx.checker calls GroupNormalization-18 deprecated (onnxruntime runs it): the input model fails the
        # same check, so prune writes the model with a note instead of blaming the rewrite.
        with pytest.raises(onnx.checker.ValidationError, match="deprecated"):
            onnx.checker.check_model(model, full_check=True)
        pruned, report = graphprune.prune(model, ratio=0.5, verify=True)
        assert any("rejects the input model too" in d for d in report.diagnostics)
        assert report.verification is not None
    else:
        pruned, _ = prune_checked(model)
    assert node_attr(pruned, "GroupNormalization", "num_groups") == 2
    assert shape_of(pruned, "s") == (size // 2,)
    assert shape_of(pruned, "bb") == (size // 2,)
    assert shape_of(pruned, "w1") == (4, 3, 3, 3)
    # removed channels are whole groups: rows 2k, 2k+1 of w1 both stay or both go
    kept = kept_indices(inits(model)["w1"], inits(pruned)["w1"], 0)
    assert [k // 2 for k in kept[::2]] == [k // 2 for k in kept[1::2]] and kept[0] % 2 == 0 and kept[2] % 2 == 0


def _ln_model(op, opset=17, axis=-1):
    ins = ["h", "s"] + (["bb"] if op == "LayerNormalization" else [])
    attrs = {"epsilon": 1e-5, "axis": axis}
    nodes = [mk("MatMul", ["X", "w1"], ["h"]),
             mk(op, ins, ["n"], **attrs),
             mk("MatMul", ["n", "w2"], ["u"]), mk("Relu", ["u"], ["r"]),
             mk("MatMul", ["r", "w3"], ["Y"])]
    init = {"w1": rand(10, 12), "s": rand(12, positive=True), "bb": rand(12), "w2": rand(12, 16),
            "w3": rand(16, 6)}
    init = {k: v for k, v in init.items() if k != "bb" or "bb" in ins}
    return nodes, init


@pytest.mark.parametrize("op,opset", [("LayerNormalization", 17), ("RMSNormalization", 23)])
def test_layer_norm_last_axis_prunes(op, opset):
    """The normalised last axis prunes: the node becomes standard ops dividing by the original width
    (tests/test_rules_norm.py covers the decomposition); the layer after the norm prunes as before."""
    nodes, init = _ln_model(op, opset)
    model = build(nodes, [("X", [2, 5, 10])], [("Y", None)], init, opset=opset)
    assert group_sizes(model) == [(12, 12), (16, 16)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w1") == (10, 6)
    assert shape_of(pruned, "w2") == (6, 8)
    assert shape_of(pruned, "w3") == (8, 6)
    assert op not in {n.op_type for n in pruned.graph.node}


def test_layer_norm_leading_axes_pass_through():
    """LayerNorm over the last axis of [N, C, L] with axis=-1: channel axis 1 passes through; the normalised
    axis L is spatial (not a channel), so the norm stays as it is."""
    nodes = [conv("c1", "X", "h", "w1", "b1", kernel_shape=[3], pads=[1, 1]),
             mk("LayerNormalization", ["h", "s", "bb"], ["n"], axis=-1),
             conv("c2", "n", "Y", "w2", kernel_shape=[1])]
    model = build(nodes, [("X", [2, 3, 7])], [("Y", None)],
                       {"w1": rand(8, 3, 3), "b1": rand(8), "s": rand(7, positive=True), "bb": rand(7),
                        "w2": rand(4, 8, 1)})
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w1") == (4, 3, 3)
    assert shape_of(pruned, "s") == (7,)
    assert "LayerNormalization" in {n.op_type for n in pruned.graph.node}


def test_layer_norm_multi_axis_frozen():
    """Normalised over the last two axes: those stay frozen, with the reason."""
    nodes = [conv("c1", "X", "h", "w1", "b1", kernel_shape=[1]),
             mk("LayerNormalization", ["h", "s", "bb"], ["n"], axis=1),
             conv("c2", "n", "Y", "w2", kernel_shape=[1])]
    model = build(nodes, [("X", [2, 3, 7])], [("Y", None)],
                  {"w1": rand(8, 3, 1), "b1": rand(8), "s": rand(8, 7, positive=True), "bb": rand(8, 7),
                   "w2": rand(4, 8, 1)})
    assert_frozen(model, "h", 1, "LayerNormalization", "several axes")
    assert group_sizes(model) == []


def test_simplified_layer_norm_axis_prunes():
    """SimplifiedLayerNormalization is an onnxruntime op in the ONNX domain that onnx.checker rejects, so only
    the analysis is checked here (tests/test_rules_norm.py prunes it: the rewrite leaves standard ops)."""
    nodes, init = _ln_model("SimplifiedLayerNormalization")
    model = make_model(nodes, [("X", [2, 5, 10])], [("Y", None)], init, check=False)
    assert group_sizes(model) == [(12, 12), (16, 16)]


@pytest.mark.parametrize("op,attrs,prunable", [
    ("LRN", {"size": 3}, False),
    ("LpNormalization", {"axis": 1}, False),
    ("LpNormalization", {"axis": -1}, True),
    ("MeanVarianceNormalization", {}, True),                     # default axes [0, 2, 3]: per-channel stats
    ("MeanVarianceNormalization", {"axes": [1, 2, 3]}, False),
])
def test_other_norms(op, attrs, prunable):
    model = sandwich([mk(op, ["h"], ["n"], **attrs), mk("Relu", ["n"], ["m"])])
    if prunable:
        assert group_sizes(model) == [(8, 8)]
        pruned, _ = prune_checked(model)
        assert shape_of(pruned, "w1") == (4, 3, 3, 3)
    else:
        assert_frozen(model, "h", 1, op)
        assert group_sizes(model) == []


# ---- PRelu / elementwise -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("slope_shape", [(8, 1, 1), (1,), ()], ids=["per-channel", "shape1", "scalar"])
def test_prelu(slope_shape):
    slope = rand(*slope_shape, scale=0.3) if slope_shape else np.float32(0.2)
    model = sandwich([mk("PRelu", ["h", "slope"], ["m"])], extra_inits={"slope": slope})
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "slope") == tuple(4 if d == 8 else d for d in slope_shape)
    assert shape_of(pruned, "w2") == (4, 4, 1, 1)


# op -> (opset, attrs, pre nodes (h -> "p"), post nodes ("u" -> "m")) ; default: h -> op -> m
def _unary_case(op):
    opset, attrs, extra = 17, {}, {}
    pre = post = None
    if op in ("Gelu",):
        opset = 20
    elif op == "Swish":
        opset = 24
    elif op == "Mish":
        opset = 18
    if op == "ThresholdedRelu":
        attrs = {"alpha": 0.1}
    if op == "Shrink":
        attrs = {"lambd": 0.2, "bias": 0.1}
    if op in ("Log", "Sqrt", "Reciprocal"):
        pre = [mk("Abs", ["h"], ["p"])]
    if op == "Not":
        pre = [mk("Greater", ["h", "zero"], ["p"])]
        post = [mk("Cast", ["u"], ["m"], to=F)]
        extra = {"zero": np.float32(0.0)}
    if op == "IsNaN":     # sqrt of negatives gives NaN: half the values are True
        pre = [mk("Sqrt", ["h"], ["p"])]
        post = [mk("Cast", ["u"], ["m"], to=F)]
    if op == "IsInf":     # 1 / floor(h) is inf where floor(h) == 0
        pre = [mk("Floor", ["h"], ["fl"]), mk("Reciprocal", ["fl"], ["p"])]
        post = [mk("Cast", ["u"], ["m"], to=F)]
    if op == "Cast":
        attrs = {"to": TensorProto.DOUBLE}
        post = [mk("Cast", ["u"], ["m"], to=F)]
    if op == "Clip":
        extra = {"lo": np.float32(-0.2), "hi": np.float32(0.3)}
    return opset, attrs, pre, post, extra


UNARY_OPS = ("Relu", "LeakyRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Sigmoid", "HardSigmoid", "HardSwish",
             "Tanh", "Erf", "Gelu", "Softplus", "Softsign", "Mish", "Swish", "Cast", "Dropout", "Identity", "Abs",
             "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Not",
             "IsNaN", "IsInf", "Shrink", "Clip")


def test_unary_list_is_complete():
    assert set(UNARY_OPS) == set(elementwise.UNARY)


@pytest.mark.parametrize("op", UNARY_OPS)
def test_unary(op):
    opset, attrs, pre, post, extra = _unary_case(op)
    x = "p" if pre else "h"
    y = "u" if post else "m"
    ins = [x] + (["lo", "hi"] if op == "Clip" else [])
    middle = (pre or []) + [mk(op, ins, [y], **attrs)] + (post or [])
    model = sandwich(middle, opset=opset, extra_inits=extra)
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w1") == (4, 3, 3, 3)
    assert shape_of(pruned, "w2") == (4, 4, 1, 1)


def test_identity_read_by_a_graph_output_links_its_channels():
    """canonicalize drops every other Identity (test_unary only checks that it disappears); one whose output is
    a graph output stays, and its rule carries the output's freeze back to the conv that produces h."""
    nodes = [conv("c1", "X", "h", "w1", "b1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             mk("Identity", ["h"], ["i"]), mk("Relu", ["i"], ["r"]),
             conv("c2", "r", "u", "w2", "b2", kernel_shape=[1, 1]), mk("Relu", ["u"], ["ur"]),
             conv("c3", "ur", "Y", "w3", kernel_shape=[1, 1])]
    model = build(nodes, [("X", [1, 3, 5, 5])], [("Y", None), ("i", None)],
                  {"w1": rand(8, 3, 3, 3), "b1": rand(8), "w2": rand(6, 8, 1, 1), "b2": rand(6),
                   "w3": rand(4, 6, 1, 1)})
    assert_frozen(model, "w1", 0, "graph output 'i'")
    pruned, _ = prune_checked(model)
    assert "Identity" in [n.op_type for n in pruned.graph.node]
    assert shape_of(pruned, "w1") == (8, 3, 3, 3)
    assert shape_of(pruned, "w2") == (3, 8, 1, 1)


def test_dropout_with_mask_output():
    """Dropout's mask output (kept by canonicalisation) carries the same channels as its data output."""
    middle = [mk("Dropout", ["h"], ["d", "mask"]), mk("Cast", ["mask"], ["mf"], to=F), mk("Mul", ["d", "mf"], ["m"])]
    model = sandwich(middle, opset=17)
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w1") == (4, 3, 3, 3)
    assert any(n.op_type == "Dropout" for n in pruned.graph.node)


def test_cast_like():
    middle = [mk("Cast", ["h"], ["hd"], to=TensorProto.DOUBLE), mk("CastLike", ["hd", "like"], ["m"])]
    model = sandwich(middle, extra_inits={"like": rand(2, 2)})
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w1") == (4, 3, 3, 3)
    assert shape_of(pruned, "like") == (2, 2)


# binary ops: (operand transform from float, post transform to float, constant dtype, attrs, opset)
LOGICAL = ("And", "Or", "Xor")
COMPARE = ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual")
BINARY_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "Sum", "Mean", "Equal", "Less", "Greater",
              "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "BitShift", "PRelu", "Where")


def test_binary_list_is_complete():
    assert set(BINARY_OPS) == set(elementwise.BINARY)


def _operand(op, src, k, nodes):
    """Turn float activation `src` into an operand for `op` (named uniquely by k)."""
    out = f"in{k}"
    if op in ("Div", "Pow", "Mod"):           # bounded away from zero: no inf/NaN in the unmasked channels
        nodes.append(mk("Sigmoid", [src], [out]))
    elif op in LOGICAL:
        nodes.append(mk("Greater", [src, "zero"], [out]))
    elif op == "Equal":                       # rounded values: equal often enough to matter
        nodes.append(mk("Round", [src], [out]))
    elif op == "BitShift":
        nodes += [mk("Abs", [src], [f"ab{k}"]), mk("Mul", [f"ab{k}", "four"], [f"sc{k}"]),
                  mk("Cast", [f"sc{k}"], [out], to=TensorProto.UINT32)]
    else:
        return src
    return out


def _binary_const(op, shape):
    rng = np.random.default_rng(7)
    if op in LOGICAL:
        return rng.random(shape) > 0.5
    if op == "BitShift":
        return rng.integers(0, 3, size=shape).astype(np.uint32)
    if op == "Equal":
        return np.round(rng.standard_normal(shape)).astype(np.float32)
    if op in ("Div", "Pow", "Mod"):
        return (rng.random(shape) + 0.5).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("mode", ["same", "size1", "const"])
@pytest.mark.parametrize("op", BINARY_OPS)
def test_binary(op, mode):
    """same: two coupled conv outputs; size1: a [1,1,H,W] activation broadcast over the channels (its own single
    channel is not a channel of this op, the other operand's stay prunable); const: a per-channel [C,1,1] constant
    that shrinks with them."""
    c = 8
    nodes = [conv("ca", "X", "a", "wa", "ba", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    init = {"wa": rand(c, 3, 3, 3), "ba": rand(c), "zero": np.float32(0.0), "four": np.float32(4.0),
            "w2": rand(4, c, 1, 1)}
    if mode in ("same", "size1"):
        cb = c if mode == "same" else 1
        nodes.append(conv("cb", "X", "b", "wb", "bb", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        init.update(wb=rand(cb, 3, 3, 3), bb=rand(cb))
    a = _operand(op, "a", 0, nodes)
    if mode == "const":
        init["k"] = _binary_const(op, (c, 1, 1)) if op != "Where" else _binary_const("And", (c, 1, 1))
        b = "k"
    else:
        b = _operand(op, "b", 1, nodes)
    if op == "Where":
        if mode == "const":   # a per-channel constant condition
            operands = ["k", a, "zero"]
        else:
            nodes.append(mk("Greater", [b, "zero"], ["cond"]))
            operands = ["cond", a, "a"]
    elif op in ("Sum", "Mean"):
        operands = [a, b, a]
    else:
        operands = [a, b]
    attrs = {"fmod": 1} if op == "Mod" else {"direction": "LEFT"} if op == "BitShift" else {}
    nodes.append(mk(op, operands, ["u"], name="op", **attrs))
    if op in LOGICAL or op in COMPARE or op == "BitShift":
        nodes.append(mk("Cast", ["u"], ["m"], to=F))
        last = "m"
    else:
        last = "u"
    nodes.append(conv("c2", last, "Y", "w2", kernel_shape=[1, 1]))
    used = {i for n in nodes for i in n.input}
    model = build(nodes, [("X", [1, 3, 5, 5])], [("Y", None)], {k: v for k, v in init.items() if k in used})
    assert group_sizes(model) == [(c, c)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "wa") == (4, 3, 3, 3)
    assert shape_of(pruned, "w2") == (4, 4, 1, 1)
    if mode == "same":
        assert shape_of(pruned, "wb") == (4, 3, 3, 3)
    elif mode == "size1":
        assert shape_of(pruned, "wb") == (1, 3, 3, 3)
        # the broadcast size-1 channel carries nothing to remove: neither a group nor reported as frozen
        assert status(model, "b", 1) == ("none", "")
    else:
        assert shape_of(pruned, "k") == (4, 1, 1)


def test_where_condition_from_other_layer():
    """Where couples its condition with both branches."""
    nodes = [conv("ca", "X", "a", "wa", kernel_shape=[1, 1]), conv("cb", "X", "b", "wb", kernel_shape=[1, 1]),
             conv("cc", "X", "cnd", "wc", kernel_shape=[1, 1]),
             mk("Greater", ["cnd", "zero"], ["cond"]),
             mk("Where", ["cond", "a", "b"], ["u"]),
             conv("c2", "u", "Y", "w2", kernel_shape=[1, 1])]
    model = build(nodes, [("X", [1, 3, 4, 4])], [("Y", None)],
                       {"wa": rand(6, 3, 1, 1), "wb": rand(6, 3, 1, 1), "wc": rand(6, 3, 1, 1), "zero": np.float32(0),
                        "w2": rand(4, 6, 1, 1)})
    assert group_sizes(model) == [(6, 6)]
    pruned, _ = prune_checked(model)
    for w in ("wa", "wb", "wc"):
        assert shape_of(pruned, w) == (3, 3, 1, 1)


def test_clip_min_max_inputs():
    model = sandwich([mk("Clip", ["h", "lo", "hi"], ["m"])],
                     extra_inits={"lo": np.float32(-0.1), "hi": np.float32(0.2)})
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w1") == (4, 3, 3, 3)
    assert float(inits(pruned)["lo"]) == pytest.approx(-0.1)
    assert float(inits(pruned)["hi"]) == pytest.approx(0.2)


# ---- composite blocks --------------------------------------------------------------------------------------------
def test_se_block():
    nodes = [conv("c1", "X", "h", "w1", "b1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             mk("Relu", ["h"], ["r"]),
             mk("GlobalAveragePool", ["r"], ["p"]),
             conv("se1", "p", "s1", "ws1", "bs1", kernel_shape=[1, 1]),
             mk("Relu", ["s1"], ["s1r"]),
             conv("se2", "s1r", "s2", "ws2", "bs2", kernel_shape=[1, 1]),
             mk("Sigmoid", ["s2"], ["gate"]),
             mk("Mul", ["r", "gate"], ["g"]),
             conv("c2", "g", "Y", "w2", kernel_shape=[1, 1])]
    model = build(nodes, [("X", [1, 3, 6, 6])], [("Y", None)],
                       {"w1": rand(16, 3, 3, 3), "b1": rand(16), "ws1": rand(4, 16, 1, 1), "bs1": rand(4),
                        "ws2": rand(16, 4, 1, 1), "bs2": rand(16), "w2": rand(5, 16, 1, 1)})
    assert group_sizes(model) == [(4, 4), (16, 16)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w1") == (8, 3, 3, 3)
    assert shape_of(pruned, "ws1") == (2, 8, 1, 1)
    assert shape_of(pruned, "ws2") == (8, 2, 1, 1)
    assert shape_of(pruned, "bs2") == (8,)
    assert shape_of(pruned, "w2") == (5, 8, 1, 1)


@pytest.mark.parametrize("reducers,prunable", [(("ReduceMean", "ReduceMax"), True),
                                               (("ReduceProd", "ReduceMax"), False),
                                               (("ReduceSum", "ReduceL2"), True)])
def test_cbam_spatial_gate(reducers, prunable):
    """Channel statistics feed a spatial gate: sums, means and max leave the channels free (means and max are
    rewritten to see the masked zeros), a product over them freezes them."""
    nodes = [conv("c0", "X", "h0", "w0", "b0", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             mk("Relu", ["h0"], ["r0"]),
             conv("c1", "r0", "h", "w1", "b1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             mk(reducers[0], ["h", "ax1"], ["st0"], keepdims=1),
             mk(reducers[1], ["h", "ax1"], ["st1"], keepdims=1),
             mk("Concat", ["st0", "st1"], ["cat"], axis=1),
             conv("sp", "cat", "sg", "wsp", kernel_shape=[7, 7], pads=[3, 3, 3, 3]),
             mk("Sigmoid", ["sg"], ["gate"]),
             mk("Mul", ["h", "gate"], ["g"]),
             conv("c2", "g", "Y", "w2", kernel_shape=[1, 1])]
    model = build(nodes, [("X", [1, 3, 8, 8])], [("Y", None)],
                       {"w0": rand(6, 3, 3, 3), "b0": rand(6), "w1": rand(8, 6, 3, 3), "b1": rand(8),
                        "ax1": np.array([1], np.int64), "wsp": rand(1, 2, 7, 7), "w2": rand(4, 8, 1, 1)},
                       opset=18)
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w0") == (3, 3, 3, 3)
    assert shape_of(pruned, "wsp") == (1, 2, 7, 7)    # the statistics' own channel axis is not a channel
    if prunable:
        assert group_sizes(model) == [(6, 6), (8, 8)]
        assert shape_of(pruned, "w1") == (4, 3, 3, 3)
        assert shape_of(pruned, "w2") == (4, 4, 1, 1)
    else:
        assert group_sizes(model) == [(6, 6)]
        assert_frozen(model, "h", 1, "over this axis")
        assert shape_of(pruned, "w1") == (8, 3, 3, 3)


def test_residual_add_across_two_convs():
    nodes = [conv("c0", "X", "a", "w0", "b0", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             mk("Relu", ["a"], ["ar"]),
             conv("c1", "ar", "b", "w1", "b1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             mk("Relu", ["b"], ["br"]),
             conv("c2", "br", "c", "wc2", "bc2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             mk("Add", ["ar", "c"], ["s"]),
             mk("Relu", ["s"], ["sr"]),
             conv("c3", "sr", "Y", "w3", kernel_shape=[1, 1])]
    model = build(nodes, [("X", [1, 3, 6, 6])], [("Y", None)],
                       {"w0": rand(8, 3, 3, 3), "b0": rand(8), "w1": rand(6, 8, 3, 3), "b1": rand(6),
                        "wc2": rand(8, 6, 3, 3), "bc2": rand(8), "w3": rand(4, 8, 1, 1)})
    # the residual couples c0's and c2's outputs; the inner width is free
    assert group_sizes(model) == [(6, 6), (8, 8)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w0") == (4, 3, 3, 3)
    assert shape_of(pruned, "w1") == (3, 4, 3, 3)
    assert shape_of(pruned, "wc2") == (4, 3, 3, 3)
    assert shape_of(pruned, "w3") == (4, 4, 1, 1)
    # the same channels went on both sides of the Add, and c2 lost the inner channels c1 lost
    kept0 = kept_indices(inits(model)["w0"], inits(pruned)["w0"], 0)
    kept1 = kept_indices(inits(model)["w1"][:, kept0], inits(pruned)["w1"], 0)
    assert np.array_equal(inits(pruned)["wc2"], inits(model)["wc2"][kept0][:, kept1])
    assert np.array_equal(inits(pruned)["w3"], inits(model)["w3"][:, kept0])


# ---- quantisation ------------------------------------------------------------------------------------------------
def _int8(*shape, seed=3):
    return np.random.default_rng(seed).integers(-127, 128, size=shape).astype(np.int8)


def test_dequantize_weight_only_per_channel():
    """int8 weight -> DequantizeLinear(per-column scale, axis=1) -> MatMul, then a per-row (axis=0) second layer."""
    nodes = [mk("DequantizeLinear", ["q1", "s1", "z1"], ["w1"], axis=1),
             mk("MatMul", ["X", "w1"], ["h"]), mk("Relu", ["h"], ["r"]),
             mk("DequantizeLinear", ["q2", "s2"], ["w2"], axis=0),
             mk("MatMul", ["r", "w2"], ["Y"])]
    model = build(nodes, [("X", [3, 10])], [("Y", None)],
                       {"q1": _int8(10, 8), "s1": rand(8, positive=True) * 0.01, "z1": _int8(8) // 16,
                        "q2": _int8(8, 5, seed=4), "s2": rand(8, positive=True) * 0.01})
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    q = inits(pruned)
    assert q["q1"].shape == (10, 4) and q["q1"].dtype == np.int8
    assert q["s1"].shape == (4,) and q["z1"].shape == (4,)
    assert q["q2"].shape == (4, 5) and q["s2"].shape == (4,)


def test_dequantize_axis0_into_gemm_transb():
    """Weights stored [out, in] with a per-output-channel scale on axis 0, consumed by Gemm(transB=1)."""
    nodes = [mk("DequantizeLinear", ["q1", "s1"], ["w1"], axis=0),
             mk("Gemm", ["X", "w1"], ["h"], transB=1), mk("Relu", ["h"], ["r"]),
             mk("MatMul", ["r", "w2"], ["Y"])]
    model = build(nodes, [("X", [3, 10])], [("Y", None)],
                       {"q1": _int8(8, 10), "s1": rand(8, positive=True) * 0.01, "w2": rand(8, 5)})
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "q1") == (4, 10)
    assert shape_of(pruned, "s1") == (4,)
    assert shape_of(pruned, "w2") == (4, 5)


@pytest.mark.parametrize("scale_shape", [(8,), (1, 8)])
def test_int8_cast_mul_weight(scale_shape):
    nodes = [mk("Cast", ["q1"], ["qf"], to=F), mk("Mul", ["qf", "s1"], ["w1"]),
             mk("MatMul", ["X", "w1"], ["h"]), mk("Relu", ["h"], ["r"]),
             mk("MatMul", ["r", "w2"], ["Y"])]
    model = build(nodes, [("X", [3, 10])], [("Y", None)],
                       {"q1": _int8(10, 8), "s1": rand(*scale_shape, positive=True) * 0.01, "w2": rand(8, 5)})
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    q = inits(pruned)
    assert q["q1"].shape == (10, 4) and q["q1"].dtype == np.int8
    assert q["s1"].shape == tuple(4 if d == 8 else d for d in scale_shape)
    assert q["w2"].shape == (4, 5)


@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_dequantize_activation(per_channel):
    if per_channel:
        extra = {"qs": rand(8, positive=True) * 0.05, "qz": np.full(8, 128, np.uint8)}
        attrs = {"axis": 1}
    else:
        extra = {"qs": np.float32(0.05), "qz": np.uint8(128)}
        attrs = {}
    middle = [mk("QuantizeLinear", ["h", "qs", "qz"], ["q"], **attrs),
              mk("DequantizeLinear", ["q", "qs", "qz"], ["m"], **attrs)]
    model = sandwich(middle, extra_inits=extra)
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w1") == (4, 3, 3, 3)
    assert shape_of(pruned, "qs") == ((4,) if per_channel else ())


@pytest.mark.parametrize("block_axis", [0, 1])
def test_blocked_dequantize(block_axis):
    """Blocked quantisation (opset 21 block_size): the blocked axis is frozen (not mapped); the other axis of the
    scale shrinks with the weight."""
    s_shape = (2, 8) if block_axis == 0 else (10, 2)
    nodes = [mk("DequantizeLinear", ["q1", "s1"], ["w1"], axis=block_axis, block_size=5 if block_axis == 0 else 4),
             mk("MatMul", ["X", "w1"], ["h"]), mk("Relu", ["h"], ["r"]),
             mk("MatMul", ["r", "w2"], ["u"]), mk("Relu", ["u"], ["ur"]), mk("MatMul", ["ur", "w3"], ["Y"])]
    model = build(nodes, [("X", [3, 10])], [("Y", None)],
                  {"q1": _int8(10, 8), "s1": rand(*s_shape, positive=True) * 0.01, "w2": rand(8, 6),
                   "w3": rand(6, 5)}, opset=21)
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w2")[1] == 3
    if block_axis == 0:
        assert group_sizes(model) == [(6, 6), (8, 8)]
        assert shape_of(pruned, "q1") == (10, 4)
        assert shape_of(pruned, "s1") == (2, 4)
    else:
        assert group_sizes(model) == [(6, 6)]
        assert_frozen(model, "h", 1, "blocked quantization")
        assert shape_of(pruned, "q1") == (10, 8)


# ---- pooling and reductions --------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,attrs", [
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 0}),
    ("LpPool", {"kernel_shape": [2, 2], "p": 2}),
    ("GlobalAveragePool", {}), ("GlobalMaxPool", {}), ("GlobalLpPool", {"p": 3}),
])
def test_pools(op, attrs):
    model = sandwich([mk(op, ["h"], ["m"], **attrs)], hw=(6, 6))
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w1") == (4, 3, 3, 3)
    assert shape_of(pruned, "w2") == (4, 4, 1, 1)


def test_max_roi_pool():
    middle = [mk("MaxRoiPool", ["h", "rois"], ["m"], pooled_shape=[2, 2], spatial_scale=1.0)]
    rois = np.array([[0, 0, 0, 3, 3], [0, 1, 2, 5, 5]], np.float32)
    model = sandwich(middle, hw=(6, 6), extra_inits={"rois": rois})
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w1") == (4, 3, 3, 3)
    assert shape_of(pruned, "rois") == (2, 5)


def test_maxpool_indices_freeze_channels():
    middle = [mk("MaxPool", ["h"], ["m", "idx"], kernel_shape=[2, 2])]
    model = sandwich(middle, hw=(6, 6))
    assert_frozen(model, "h", 1, "indices")
    assert group_sizes(model) == []


REDUCE_OPS = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
# zeroed (masked) elements contribute nothing to these, so reducing over the channels leaves them prunable
SUM_LIKE = {"ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum"}
# rewritten by a fixup (ReduceSum / original count; max/min with the masked zeros), so the channels prune too
PRUNABLE_REDUCES = SUM_LIKE | {"ReduceMean", "ReduceMax", "ReduceMin"}


def test_reduce_list_is_complete():
    assert set(REDUCE_OPS) == set(reduce_rules.REDUCES)
    assert SUM_LIKE == set(reduce_rules.SUM_LIKE)


def _reduce_pre(op):
    # log(sum) needs positive sums
    return [mk("Abs", ["h"], ["p"])] if op == "ReduceLogSum" else []


@pytest.mark.parametrize("keepdims", [1, 0])
@pytest.mark.parametrize("op", REDUCE_OPS)
def test_reduce_spatial(op, keepdims):
    x = "p" if op == "ReduceLogSum" else "h"
    nodes = [conv("c1", "X", "h", "w1", "b1", kernel_shape=[3, 3], pads=[1, 1, 1, 1])] + _reduce_pre(op)
    nodes.append(mk(op, [x, "axes"], ["red"], keepdims=keepdims))
    if keepdims:
        nodes.append(conv("c2", "red", "Y", "w2", kernel_shape=[1, 1]))
        w2 = rand(4, 8, 1, 1)
    else:
        nodes.append(mk("MatMul", ["red", "w2"], ["Y"]))
        w2 = rand(8, 4)
    model = build(nodes, [("X", [1, 3, 3, 3])], [("Y", None)],
                       {"w1": rand(8, 3, 3, 3), "b1": rand(8), "axes": np.array([2, 3], np.int64), "w2": w2},
                       opset=18)
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w1") == (4, 3, 3, 3)
    assert shape_of(pruned, "w2") == ((4, 4, 1, 1) if keepdims else (4, 4))


@pytest.mark.parametrize("op", REDUCE_OPS)
def test_reduce_over_channels(op):
    x = "p" if op == "ReduceLogSum" else "h"
    nodes = [conv("c0", "X", "h0", "w0", "b0", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             mk("Relu", ["h0"], ["r0"]),
             conv("c1", "r0", "h", "w1", "b1", kernel_shape=[1, 1])] + _reduce_pre(op)
    nodes += [mk(op, [x, "axes"], ["red"], keepdims=1),
              mk("Mul", ["h", "red"], ["g"]),                        # the statistic gates the channels
              conv("c2", "g", "Y", "w2", kernel_shape=[1, 1])]
    model = build(nodes, [("X", [1, 3, 4, 4])], [("Y", None)],
                       {"w0": rand(6, 3, 3, 3), "b0": rand(6), "w1": rand(8, 6, 1, 1), "b1": rand(8),
                        "axes": np.array([1], np.int64), "w2": rand(4, 8, 1, 1)}, opset=18)
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w0") == (3, 3, 3, 3)
    if op in PRUNABLE_REDUCES:
        assert group_sizes(model) == [(6, 6), (8, 8)]
        assert shape_of(pruned, "w1") == (4, 3, 1, 1)
        assert shape_of(pruned, "w2") == (4, 4, 1, 1)
    else:
        assert group_sizes(model) == [(6, 6)]
        assert_frozen(model, "h", 1, op, "over this axis")
        assert shape_of(pruned, "w1") == (8, 3, 1, 1)


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceMax"])
def test_reduce_axes_attribute_form(op):
    """Before opset 18 most reductions take `axes` as an attribute."""
    nodes = [conv("c1", "X", "h", "w1", "b1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             mk(op, ["h"], ["red"], axes=[2, 3], keepdims=0),
             mk("MatMul", ["red", "w2"], ["Y"])]
    model = build(nodes, [("X", [1, 3, 4, 4])], [("Y", None)],
                       {"w1": rand(8, 3, 3, 3), "b1": rand(8), "w2": rand(8, 4)}, opset=13)
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w2") == (4, 4)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Hardmax"])
def test_softmax_axes(op):
    # over the last (spatial) axis: channels pass through
    model = sandwich([mk(op, ["h"], ["m"], axis=-1)])
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w1") == (4, 3, 3, 3)
    # over the channel axis: frozen
    model = sandwich([mk(op, ["h"], ["m"], axis=1)])
    assert_frozen(model, "h", 1, op, "normalises over this axis")
    assert group_sizes(model) == []


@pytest.mark.parametrize("axis,prunable", [(2, True), (1, False)])
def test_softmax_opset11_flattens_trailing_axes(axis, prunable):
    model = sandwich([mk("Softmax", ["h"], ["m"], axis=axis)], opset=11)
    if prunable:
        pruned, _ = prune_checked(model)
        assert shape_of(pruned, "w1") == (4, 3, 3, 3)
    else:
        assert_frozen(model, "h", 1, "Softmax")


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
@pytest.mark.parametrize("keepdims", [1, 0])
def test_argmax(op, keepdims):
    middle = [mk(op, ["h"], ["idx"], axis=2, keepdims=keepdims), mk("Cast", ["idx"], ["m"], to=F)]
    if keepdims:
        model = sandwich(middle)
    else:  # [1, 8, W]: a 1-D conv reads it
        nodes = [conv("c1", "X", "h", "w1", "b1", kernel_shape=[3, 3], pads=[1, 1, 1, 1])] + middle + [
            conv("c2", "m", "Y", "w2", kernel_shape=[1])]
        model = build(nodes, [("X", [1, 3, 5, 5])], [("Y", None)],
                           {"w1": rand(8, 3, 3, 3), "b1": rand(8), "w2": rand(4, 8, 1)})
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w1") == (4, 3, 3, 3)
    # over the channels: positions along the axis are the result, so it is frozen
    frozen = sandwich([mk(op, ["h"], ["idx"], axis=1, keepdims=1), mk("Cast", ["idx"], ["m"], to=F)], c_last=1)
    assert_frozen(frozen, "h", 1, op, "positions")


def test_topk():
    middle = [mk("TopK", ["h", "k"], ["vals", "idx"], axis=-1),
              mk("Cast", ["idx"], ["fidx"], to=F), mk("Add", ["vals", "fidx"], ["m"])]
    model = sandwich(middle, extra_inits={"k": np.array([3], np.int64)})
    assert group_sizes(model) == [(8, 8)]
    pruned, _ = prune_checked(model)
    assert shape_of(pruned, "w1") == (4, 3, 3, 3)
    assert inits(pruned)["k"].tolist() == [3]
    frozen = sandwich([mk("TopK", ["h", "k"], ["m", "i"], axis=1)], c_last=3,
                      extra_inits={"k": np.array([3], np.int64)})
    assert_frozen(frozen, "h", 1, "TopK")


# ---- recurrent layers --------------------------------------------------------------------------------------------
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _rnn_model(op, direction, states, hidden=6, seq=5, batch=2, feat=6, width=8, layout=0, extra_attrs=None,
               seq_lens=False, h0_input=False):
    g, d = GATES[op], 2 if direction == "bidirectional" else 1
    init = {"wp": rand(feat, width), "W": rand(d, g * hidden, width), "R": rand(d, g * hidden, hidden),
            "B": rand(d, 2 * g * hidden, scale=0.3), "wo": rand(hidden, 3), "wh": rand(hidden, 3)}
    ins = ["xi", "W", "R", "B", "", "", "", ""]
    state_shape = [d, batch, hidden] if layout == 0 else [batch, d, hidden]
    graph_inputs = [("X", [seq, batch, feat] if layout == 0 else [batch, seq, feat])]
    if seq_lens:
        init["lens"] = np.array([seq, seq - 2][:batch], np.int32)
        ins[4] = "lens"
    if states:
        if h0_input:
            graph_inputs.append(("h0", state_shape))
        else:
            init["h0"] = rand(*state_shape, scale=0.5)
        ins[5] = "h0"
        if op == "LSTM":
            init["c0"] = rand(*state_shape, scale=0.5)
            init["P"] = rand(d, 3 * hidden, scale=0.3)
            ins[6], ins[7] = "c0", "P"
    while ins and ins[-1] == "":
        ins.pop()
    outs = ["Yall", "Yh"] + (["Yc"] if op == "LSTM" else [])
    nodes = [mk("MatMul", ["X", "wp"], ["xi"]),
             mk(op, ins, outs, hidden_size=hidden, direction=direction, layout=layout, **(extra_attrs or {})),
             mk("MatMul", ["Yall", "wo"], ["Y"]), mk("MatMul", ["Yh", "wh"], ["Z"])]
    if op == "LSTM":
        init["wc"] = rand(hidden, 3)
        nodes.append(mk("MatMul", ["Yc", "wc"], ["C"]))
    outputs = [("Y", None), ("Z", None)] + ([("C", None)] if op == "LSTM" else [])
    return build(nodes, graph_inputs, outputs, init, opset=17), d, g


@pytest.mark.parametrize("states", [False, True], ids=["no-state", "initial-states"])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_recurrent(op, direction, states):
    model, d, g = _rnn_model(op, direction, states)
    assert group_sizes(model) == [(6, 6), (8, 8)]   # hidden units; the input projection width
    pruned, _ = prune_checked(model)
    q = inits(pruned)
    assert node_attr(pruned, op, "hidden_size") == 3
    assert q["W"].shape == (d, g * 3, 4)
    assert q["R"].shape == (d, g * 3, 3)
    assert q["B"].shape == (d, 2 * g * 3)
    assert q["wp"].shape == (6, 4)
    assert q["wo"].shape == (3, 3) and q["wh"].shape == (3, 3)
    if states:
        assert q["h0"].shape == (d, 2, 3)
        if op == "LSTM":
            assert q["c0"].shape == (d, 2, 3)
            assert q["P"].shape == (d, 9)
    # the same hidden units go from every gate block (and both directions), R loses matching rows and columns
    old = inits(model)
    kept_in = kept_indices(old["wp"], q["wp"], 1)
    kept = kept_indices(old["wo"], q["wo"], 0)
    assert len(kept) == 3 and len(kept_in) == 4
    for k in range(d):
        for gate in range(g):
            rows = gate * 6 + np.array(kept)
            assert np.array_equal(q["W"][k, gate * 3:(gate + 1) * 3], old["W"][k, rows][:, kept_in])
            assert np.array_equal(q["R"][k, gate * 3:(gate + 1) * 3], old["R"][k, rows][:, kept])
        for gate in range(2 * g):
            assert np.array_equal(q["B"][k, gate * 3:(gate + 1) * 3], old["B"][k, gate * 6 + np.array(kept)])
    if states:
        assert np.array_equal(q["h0"], old["h0"][:, :, kept])


def test_gru_linear_before_reset():
    model, d, g = _rnn_model("GRU", "bidirectional", True, extra_attrs={"linear_before_reset": 1})
    pruned, _ = prune_checked(model)
    assert node_attr(pruned, "GRU", "hidden_size") == 3


def test_lstm_sequence_lens():
    model, d, g = _rnn_model("LSTM", "forward", True, seq_lens=True)
    pruned, _ = prune_checked(model)
    assert node_attr(pruned, "LSTM", "hidden_size") == 3
    assert inits(pruned)["lens"].tolist() == [5, 3]


def test_lstm_layout1_analysis():
    """layout=1 (batch first): onnxruntime has no kernel ("Batchwise recurrent operations (layout == 1) are not
    supported"), so only the analysis is checked: the same groups as layout 0, states and outputs included."""
    model, d, g = _rnn_model("LSTM", "forward", True, layout=1)
    analysis = graphprune.analyze_model(model)
    hidden = [grp for grp in analysis.groups if ("R", 2) in grp.members]
    assert len(hidden) == 1 and len(hidden[0].units) == 6
    for member in [("Yall", 3), ("Yh", 2), ("Yc", 2), ("h0", 2), ("c0", 2), ("W", 1), ("B", 1), ("P", 1)]:
        assert member in hidden[0].members
    assert sorted(len(grp.units) for grp in analysis.groups) == [6, 8]


def test_recurrent_initial_state_from_graph_input_freezes_hidden():
    model, d, g = _rnn_model("GRU", "forward", True, h0_input=True)
    assert_frozen(model, "R", 2, "graph input")
    pruned, _ = prune_checked(model)       # the input projection still prunes
    assert node_attr(pruned, "GRU", "hidden_size") == 6
    assert shape_of(pruned, "wp") == (6, 4)


def test_instance_norm_statistics_axis_is_frozen():
    """MatMul -> InstanceNormalization over a [1, 5, 16] tensor: the 16-wide axis carries the statistics."""
    from onnx import helper as h

    import graphprune
    nodes = [
        h.make_node("MatMul", ["x", "w1"], ["a"]),
        h.make_node("InstanceNormalization", ["a", "s", "b"], ["n"]),
        h.make_node("MatMul", ["n", "w2"], ["y"]),
    ]
    model = make_model(nodes, [("x", [1, 5, 8])], [("y", [1, 5, 4])],
                       {"w1": rand(8, 16), "w2": rand(16, 4), "s": rand(5, positive=True), "b": rand(5)})
    analysis = graphprune.analyze_model(model)
    assert any("InstanceNormalization statistics" in g.reason for g in analysis.frozen_groups)
    assert not any(("w1", 1) in g.members for g in analysis.groups)
