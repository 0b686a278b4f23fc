"""Per-rule equivalence tests for the layout ops (graphprune/ops/shape.py).

Every case is a small hand-built graph with real, random weights on both sides of the layout op, pruned at
0.5 with verification on (the pruned model must equal the masked original under ORT). On top of that each
test checks what could silently go wrong: resulting weight shapes, rewritten shape constants, the group
structure, and that what must stay frozen stays frozen.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.plan import GroupPlan, RewritePlan, member_key

from helpers import group_sizes, make_model, prune_checked, rand, wshape

INT64 = TensorProto.INT64


# ---- a tiny graph builder ------------------------------------------------------------------------------------------
class G:
    def __init__(self, opset=17, seed=0):
        self.opset = opset
        self.nodes = []
        self.inits = {}
        self.k = 0
        self.rng = np.random.default_rng(seed)

    def _name(self, base):
        self.k += 1
        return f"{base}_{self.k}"

    def add(self, op, inputs, name=None, outputs=1, **attrs):
        name = name or self._name(op.lower())
        outs = [f"{name}_y{i}" for i in range(outputs)] if outputs > 1 else [f"{name}_y"]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs if outputs > 1 else outs[0]

    def const(self, value, name=None):
        name = name or self._name("c")
        self.inits[name] = np.asarray(value)
        return name

    def ints(self, values, name=None):
        return self.const(np.asarray(values, dtype=np.int64), name)

    def w(self, *shape, name, **kw):
        return self.const(rand(*shape, seed=int(self.rng.integers(1 << 30)), **kw), name)

    def conv(self, x, cin, cout, name, k=1, bias=True, **attrs):
        ins = [x, self.w(cout, cin, k, k, name=f"{name}.w")]
        if bias:
            ins.append(self.w(cout, name=f"{name}.b", scale=0.5))
        return self.add("Conv", ins, name=name, pads=[k // 2] * 4, **attrs)

    def matmul(self, x, cin, cout, name):
        return self.add("MatMul", [x, self.w(cin, cout, name=f"{name}.w")], name=name)

    def gemm(self, x, cin, cout, name):
        return self.add("Gemm", [x, self.w(cout, cin, name=f"{name}.w"), self.w(cout, name=f"{name}.b", scale=0.5)],
                        name=name, transB=1)

    def model(self, inputs, outputs):
        """Graph outputs get their inferred shapes (pass (name, shape) to pin one)."""
        probe = helper.make_model(helper.make_graph(
            self.nodes, "probe", [helper.make_tensor_value_info(i[0], i[2] if len(i) > 2 else TensorProto.FLOAT,
                                                                i[1]) for i in inputs],
            [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs
             if not isinstance(o, tuple)],
            [numpy_helper.from_array(v, k) for k, v in self.inits.items()]),
            opset_imports=[helper.make_opsetid("", self.opset)])
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=True)
        known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
        outs = []
        for o in outputs:
            if isinstance(o, tuple):
                outs.append(o)
                continue
            tt = known[o].type.tensor_type
            assert tt.HasField("shape") and len(tt.shape.dim), f"pin the shape of output {o}"
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
            assert not any(str(d).startswith("unk__") for d in dims), f"pin the shape of output {o}"
            outs.append((o, dims, tt.elem_type))
        return make_model(self.nodes, inputs, outs, self.inits, opset=self.opset)


def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def const_input(model, node_name, index):
    """The constant at input `index` of node `node_name` (rewritten constants get fresh names)."""
    return inits(model)[node(model, node_name).input[index]]


def attr(model, node_name, key):
    return helper.get_attribute_value(next(a for a in node(model, node_name).attribute if a.name == key))


def frozen_reasons(model):
    return [g.reason for g in graphprune.analyze_model(model).frozen_groups]


def io_shapes(model):
    def dims(v):
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
    return [dims(v) for v in model.graph.input], [dims(v) for v in model.graph.output]


def plan_removing(model, counts):
    """A hand-made plan: remove the first `counts[tensor]` units of the group that has `tensor` as a member,
    nothing elsewhere. Lets a test force uneven removals across coupled parts."""
    analysis = graphprune.analyze_model(model)
    groups = []
    for g in analysis.groups:
        n = sum(counts.get(m[0], 0) for m in g.members)
        removed = {}
        for u in g.units[:n]:
            for member, idx in u.elements.items():
                removed.setdefault(member_key(member), []).extend(int(i) for i in idx)
        groups.append(GroupPlan(g.name, g.channels, len(g.units), n, {k: sorted(v) for k, v in removed.items()}))
    return RewritePlan("hand", {}, groups)


# ---- Concat --------------------------------------------------------------------------------------------------------
def test_concat_channels_of_two_convs():
    g = G()
    a = g.conv("x", 3, 8, "convA", k=3)
    b = g.conv("x", 3, 6, "convB", k=3)
    cat = g.add("Concat", [a, b], name="cat", axis=1)
    y = g.conv(g.add("Relu", [cat]), 14, 5, "convC", k=3)
    m = g.model([("x", [1, 3, 8, 8])], [y])
    assert group_sizes(m) == [(6, 6), (8, 8)]      # two separate widths, not merged by the concat
    p, _ = prune_checked(m)
    assert wshape(p, "convA.w") == (4, 3, 3, 3)
    assert wshape(p, "convB.w") == (3, 3, 3, 3)
    assert wshape(p, "convC.w") == (5, 7, 3, 3)
    assert wshape(p, "convC.b") == (5,)            # reaches the graph output: never pruned


def test_concat_same_tensor_twice():
    g = G()
    a = g.conv("x", 3, 8, "convA")
    cat = g.add("Concat", [a, a], name="cat", axis=1)
    y = g.conv(cat, 16, 5, "convC")
    m = g.model([("x", [1, 3, 4, 4])], [y])
    assert group_sizes(m) == [(8, 8)]              # one unit = channel i in both halves
    p, _ = prune_checked(m)
    assert wshape(p, "convA.w") == (4, 3, 1, 1)
    assert wshape(p, "convC.w") == (5, 8, 1, 1)


def test_nested_concat_with_a_repeated_input():
    g = G()
    a = g.conv("x", 3, 8, "convA")
    b = g.conv("x", 3, 4, "convB")
    d = g.conv("x", 3, 6, "convD")
    inner = g.add("Concat", [a, b], name="cat1", axis=1)
    outer = g.add("Concat", [d, inner, a], name="cat2", axis=1)   # 6 + 12 + 8
    y = g.conv(outer, 26, 5, "convC")
    m = g.model([("x", [1, 3, 4, 4])], [y])
    assert group_sizes(m) == [(4, 4), (6, 6), (8, 8)]
    p, _ = prune_checked(m)
    assert wshape(p, "convA.w")[0] == 4 and wshape(p, "convB.w")[0] == 2 and wshape(p, "convD.w")[0] == 3
    assert wshape(p, "convC.w") == (5, 3 + 4 + 2 + 4, 1, 1)


@pytest.mark.parametrize("kind", ["matmul", "gemm"])
def test_concat_last_axis_of_linear_outputs(kind):
    g = G()
    if kind == "matmul":
        shape = [2, 5, 16]
        a, b = g.matmul("x", 16, 8, "linA"), g.matmul("x", 16, 12, "linB")
        cat = g.add("Concat", [a, b], name="cat", axis=-1)
        y = g.matmul(g.add("Relu", [cat]), 20, 6, "linC")
    else:
        shape = [5, 16]
        a, b = g.gemm("x", 16, 8, "linA"), g.gemm("x", 16, 12, "linB")
        cat = g.add("Concat", [a, b], name="cat", axis=-1)
        y = g.gemm(g.add("Relu", [cat]), 20, 6, "linC")
    m = g.model([("x", shape)], [y])
    assert group_sizes(m) == [(8, 8), (12, 12)]    # the two Linear widths stay separate groups
    p, _ = prune_checked(m)
    if kind == "matmul":
        assert wshape(p, "linA.w") == (16, 4) and wshape(p, "linB.w") == (16, 6) and wshape(p, "linC.w") == (10, 6)
    else:
        assert wshape(p, "linA.w") == (4, 16) and wshape(p, "linB.w") == (6, 16) and wshape(p, "linC.w") == (6, 10)
        assert wshape(p, "linA.b") == (4,)


def test_concat_on_token_axis_merges_the_channel_groups():
    g = G()
    a = g.matmul("x", 16, 8, "linA")
    b = g.matmul("x", 16, 8, "linB")
    cat = g.add("Concat", [a, b], name="cat", axis=1)   # [1, 5+5, 8]: tokens, channels shared
    y = g.matmul(g.add("Relu", [cat]), 8, 4, "linC")
    m = g.model([("x", [1, 5, 16])], [y])
    assert group_sizes(m) == [(8, 8)]
    p, _ = prune_checked(m)
    assert wshape(p, "linA.w") == (16, 4) and wshape(p, "linB.w") == (16, 4) and wshape(p, "linC.w") == (4, 4)
    # the same channels must go from both branches
    before, after = inits(m), inits(p)
    kept_a = [j for j in range(8) if any(np.array_equal(before["linA.w"][:, j], after["linA.w"][:, k])
                                         for k in range(4))]
    kept_b = [j for j in range(8) if any(np.array_equal(before["linB.w"][:, j], after["linB.w"][:, k])
                                         for k in range(4))]
    assert kept_a == kept_b


# ---- Split ---------------------------------------------------------------------------------------------------------
def _split(g, x, sizes, axis, name, opset):
    """Split with explicit sizes in the form each opset wants."""
    if opset < 13:
        return g.add("Split", [x], name=name, outputs=len(sizes), axis=axis, split=sizes)
    return g.add("Split", [x, g.ints(sizes, f"{name}.sizes")], name=name, outputs=len(sizes), axis=axis)


def _split_sizes(model, name):
    n = node(model, name)
    if len(n.input) > 1 and n.input[1]:
        return [int(v) for v in inits(model)[n.input[1]]]
    return list(attr(model, name, "split"))


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_concat_cascade_c2f(opset):
    """YOLOv8 C2f: cv1 -> chunk (here uneven) -> bottleneck on the last chunk -> concat all -> cv2."""
    g = G(opset)
    y1 = g.conv("x", 3, 12, "cv1")
    a, b = _split(g, y1, [4, 8], 1, "split", opset)
    mb = g.add("Relu", [g.conv(b, 8, 6, "m", k=3)])
    cat = g.add("Concat", [a, b, mb], name="cat", axis=1)
    y = g.conv(cat, 18, 5, "cv2")
    m = g.model([("x", [1, 3, 6, 6])], [y])
    assert group_sizes(m) == [(4, 4), (6, 6), (8, 8)]
    p, _ = prune_checked(m)
    assert wshape(p, "cv1.w")[0] == 6
    assert _split_sizes(p, "split") == [2, 4]
    assert wshape(p, "m.w") == (3, 4, 3, 3)
    assert wshape(p, "cv2.w") == (5, 2 + 4 + 3, 1, 1)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_equal_split_becomes_unequal(opset):
    """Split into equal parts (no sizes; opset 18: num_outputs). Removing more from one part than from the
    other must spell the sizes out."""
    g = G(opset)
    y1 = g.conv("x", 3, 8, "cv1")
    attrs = {"num_outputs": 2} if opset >= 18 else {}
    a, b = g.add("Split", [y1], name="split", outputs=2, axis=1, **attrs)
    y = g.add("Add", [g.conv(a, 4, 5, "ca"), g.conv(b, 4, 5, "cb")])
    m = g.model([("x", [1, 3, 4, 4])], [y])
    assert group_sizes(m) == [(4, 4), (4, 4)]
    p, _ = prune_checked(m, plan=plan_removing(m, {"split_y0": 3}))
    assert _split_sizes(p, "split") == [1, 4]
    assert wshape(p, "ca.w")[1] == 1 and wshape(p, "cb.w")[1] == 4
    assert "num_outputs" not in [a.name for a in node(p, "split").attribute]


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_glu_split_sigmoid_mul(opset):
    g = G(opset)
    y1 = g.conv("x", 3, 16, "cv1")
    attrs = {"num_outputs": 2} if opset >= 18 else {}
    a, b = g.add("Split", [y1], name="split", outputs=2, axis=1, **attrs)
    glu = g.add("Mul", [a, g.add("Sigmoid", [b])])
    y = g.conv(glu, 8, 5, "cv2")
    m = g.model([("x", [1, 3, 4, 4])], [y])
    assert group_sizes(m) == [(8, 16)]             # value channel i and gate channel i go together
    assert [len(u.elements[("cv1.w", 0)]) for u in graphprune.analyze_model(m).groups[0].units] == [2] * 8
    p, _ = prune_checked(m)
    assert wshape(p, "cv1.w")[0] == 8
    assert wshape(p, "cv2.w") == (5, 4, 1, 1)
    if opset >= 13 and len(node(p, "split").input) > 1 and node(p, "split").input[1]:
        assert _split_sizes(p, "split") == [4, 4]


# ---- Slice / Gather ------------------------------------------------------------------------------------------------
def _slice(g, x, starts, ends, axes, steps=None, name=None, opset=13):
    if opset < 10:
        assert steps is None
        return g.add("Slice", [x], name=name, starts=starts, ends=ends, axes=axes)
    ins = [x, g.ints(starts), g.ints(ends), g.ints(axes)]
    if steps is not None:
        ins.append(g.ints(steps))
    return g.add("Slice", ins, name=name)


def _slice_bounds(model, name):
    n = node(model, name)
    if len(n.input) == 1:
        return list(attr(model, name, "starts")), list(attr(model, name, "ends"))
    return [int(v) for v in const_input(model, name, 1)], [int(v) for v in const_input(model, name, 2)]


@pytest.mark.parametrize("opset", [9, 13])
def test_slice_channel_range(opset):
    g = G(opset)
    y1 = g.conv("x", 3, 12, "cv1")
    s = _slice(g, y1, [2], [10], [1], name="slice", opset=opset)
    y = g.conv(s, 8, 5, "cv2")
    m = g.model([("x", [1, 3, 4, 4])], [y])
    # the 8 sliced channels reach cv2; the 4 dropped ones are a group of their own (only cv1 rows)
    assert group_sizes(m) == [(4, 4), (8, 8)]
    p, _ = prune_checked(m)
    assert wshape(p, "cv1.w")[0] == 6 and wshape(p, "cv2.w") == (5, 4, 1, 1)
    starts, ends = _slice_bounds(p, "slice")
    assert ends[0] - starts[0] == 4 and starts[0] in (0, 1, 2)


@pytest.mark.parametrize("bounds", [(9, 1), (-1, np.iinfo(np.int64).min)], ids=["partial", "full_reverse"])
def test_slice_reverse_step(bounds):
    g = G(13)
    y1 = g.conv("x", 3, 12, "cv1")
    s = _slice(g, y1, [bounds[0]], [bounds[1]], [1], steps=[-1], name="slice")
    n = 8 if bounds == (9, 1) else 12
    y = g.conv(s, n, 5, "cv2")
    m = g.model([("x", [1, 3, 4, 4])], [y])
    p, _ = prune_checked(m)
    assert wshape(p, "cv2.w") == (5, n // 2, 1, 1)
    starts, ends = _slice_bounds(p, "slice")
    assert const_input(p, "slice", 4).tolist() == [-1]
    if n == 12:   # the whole axis reversed: the end must stay "before index 0"
        assert starts == [5] and ends[0] < -6


def test_focus_stem_strided_spatial_slices():
    """YOLOv5 Focus: x[..., ::2, ::2], x[..., 1::2, ::2], ... concatenated on channels."""
    g = G(13)
    y0 = g.add("Relu", [g.conv("x", 3, 6, "cv0", k=3)])
    parts = [_slice(g, y0, [i, j], [8, 8], [2, 3], steps=[2, 2], name=f"s{i}{j}") for i, j in
             [(0, 0), (1, 0), (0, 1), (1, 1)]]
    cat = g.add("Concat", parts, name="cat", axis=1)
    y1 = g.add("Relu", [g.conv(cat, 24, 8, "cv1", k=3)])
    y = g.conv(y1, 8, 5, "cv2")
    m = g.model([("x", [1, 3, 8, 8])], [y])
    assert group_sizes(m) == [(6, 6), (8, 8)]
    units = next(gr for gr in graphprune.analyze_model(m).groups if gr.name == "cv0").units
    assert all(sorted(u.elements[("cv1.w", 1)] % 6) == [u.elements[("cv0.w", 0)][0]] * 4 for u in units)
    p, _ = prune_checked(m)
    assert wshape(p, "cv0.w")[0] == 3 and wshape(p, "cv1.w") == (4, 12, 3, 3)
    assert const_input(p, "s11", 1).tolist() == [1, 1]  # spatial bounds untouched


@pytest.mark.parametrize("opset", [11, 13])
def test_gather_channel_indices(opset):
    g = G(opset)
    y1 = g.conv("x", 3, 8, "cv1")
    idx = g.ints([5, 0, -1, 2, 2, 3], "idx")      # a repeat and a negative index; channels 1, 4, 6 unused
    sel = g.add("Gather", [y1, idx], name="gather", axis=1)
    y = g.conv(sel, 6, 5, "cv2")
    m = g.model([("x", [1, 3, 4, 4])], [y])
    p, _ = prune_checked(m)
    new_idx = const_input(p, "gather", 1)
    kept = wshape(p, "cv1.w")[0]
    assert len(new_idx) == wshape(p, "cv2.w")[1] and new_idx.min() >= 0 and new_idx.max() < kept
    # the repeated index is one unit: both copies stay or go together
    assert new_idx.tolist().count(new_idx.tolist()[0]) == 1


@pytest.mark.parametrize("opset", [11, 13])
def test_gather_single_index_freezes_that_channel(opset):
    g = G(opset)
    y1 = g.conv("x", 3, 8, "cv1")
    one = g.add("Gather", [y1, g.ints(3, "idx")], name="gather", axis=1)            # [1, 4, 4]
    if opset < 13:
        u = g.add("Unsqueeze", [one], axes=[1])
    else:
        u = g.add("Unsqueeze", [one, g.ints([1])])
    y = g.add("Add", [g.conv(y1, 8, 5, "cv2"), u])
    m = g.model([("x", [1, 3, 4, 4])], [y])
    assert group_sizes(m) == [(7, 7)]
    assert any("single index" in r for r in frozen_reasons(m))
    p, _ = prune_checked(m)
    before, after = inits(m), inits(p)
    new = int(const_input(p, "gather", 1))
    np.testing.assert_array_equal(after["cv1.w"][new], before["cv1.w"][3])   # still reads channel 3
    assert wshape(p, "cv1.w")[0] == 4


# ---- Reshape / Flatten ---------------------------------------------------------------------------------------------
def test_conv_flatten_gemm():
    g = G()
    y1 = g.add("Relu", [g.conv("x", 3, 8, "cv1", k=3)])
    f = g.add("Flatten", [y1], axis=1)
    h = g.add("Relu", [g.gemm(f, 128, 10, "fc1")])
    y = g.gemm(h, 10, 3, "fc2")
    m = g.model([("x", [1, 3, 4, 4])], [y])
    assert group_sizes(m) == [(8, 8), (10, 10)]
    p, _ = prune_checked(m)
    assert wshape(p, "cv1.w")[0] == 4 and wshape(p, "fc1.w") == (5, 64) and wshape(p, "fc2.w") == (3, 5)


@pytest.mark.parametrize("opset", [11, 13])
def test_conv_view_batch_minus_one_gemm(opset):
    """x.view(x.size(0), -1) with a dynamic batch: Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    g = G(opset)
    y1 = g.add("Relu", [g.conv("x", 3, 8, "cv1", k=3)])
    n = g.add("Gather", [g.add("Shape", [y1], name="shape"), g.ints(0)], axis=0)
    u = g.add("Unsqueeze", [n], axes=[0]) if opset < 13 else g.add("Unsqueeze", [n, g.ints([0])])
    target = g.add("Concat", [u, g.ints([-1])], axis=0)
    f = g.add("Reshape", [y1, target], name="view")
    y = g.gemm(g.add("Relu", [g.gemm(f, 128, 10, "fc1")]), 10, 3, "fc2")
    m = g.model([("x", ["N", 3, 4, 4])], [(y, ["N", 3])])
    assert group_sizes(m) == [(8, 8), (10, 10)]     # only the batch dim is read by Shape
    p, _ = prune_checked(m)
    assert wshape(p, "cv1.w")[0] == 4 and wshape(p, "fc1.w") == (5, 64)
    assert io_shapes(p)[0] == [["N", 3, 4, 4]]


def test_gemm_reshape_conv_transpose_unflatten():
    g = G()
    h = g.add("Relu", [g.gemm("x", 16, 32, "fc")])
    r = g.add("Reshape", [h, g.ints([1, 8, 2, 2], "target")], name="unflatten")
    w = g.w(8, 5, 3, 3, name="up.w")
    y = g.add("ConvTranspose", [r, w, g.w(5, name="up.b", scale=0.5)], name="up", strides=[2, 2])
    m = g.model([("x", [1, 16])], [y])
    assert group_sizes(m) == [(8, 32)]              # a unit is one ConvTranspose channel = 4 Gemm rows
    p, _ = prune_checked(m)
    assert wshape(p, "fc.w") == (16, 16) and wshape(p, "up.w") == (4, 5, 3, 3)
    assert const_input(p, "unflatten", 1).tolist() == [1, 4, 2, 2]


def _heads(g, x, w, cin, heads, dim, perm, name, shape=(0, 0)):
    """x @ W -> Reshape [B, S, heads, dim] -> Transpose(perm)."""
    h = g.matmul(x, cin, heads * dim, w)
    r = g.add("Reshape", [h, g.ints(list(shape) + [heads, dim], f"{name}.shape")], name=f"{name}.split")
    return g.add("Transpose", [r], perm=perm)


def _attention_tail(g, q, kt, v, heads, dim, out, shape=(0, 0)):
    s = g.add("Mul", [g.add("MatMul", [q, kt]), g.const(np.float32(dim ** -0.5))])
    o = g.add("MatMul", [g.add("Softmax", [s], axis=-1), v])
    o = g.add("Transpose", [o], perm=[0, 2, 1, 3])
    o = g.add("Reshape", [o, g.ints(list(shape) + [heads * dim], "merge.shape")], name="merge")
    return g.matmul(o, heads * dim, out, "wo")


def test_attention_head_split_and_merge():
    g = G()
    q = _heads(g, "x", "wq", 16, 4, 4, [0, 2, 1, 3], "q")
    kt = _heads(g, "x", "wk", 16, 4, 4, [0, 2, 3, 1], "k")
    v = _heads(g, "x", "wv", 16, 4, 4, [0, 2, 1, 3], "v")
    y = _attention_tail(g, q, kt, v, 4, 4, 16)
    m = g.model([("x", [2, 5, 16])], [y])
    # Q/K share head_dim (contracted together), V/O share theirs; heads stay whole in the default mode
    assert group_sizes(m) == [(4, 16), (4, 16)]
    p, _ = prune_checked(m)
    assert wshape(p, "wq.w") == (16, 8) and wshape(p, "wk.w") == (16, 8)
    assert wshape(p, "wv.w") == (16, 8) and wshape(p, "wo.w") == (8, 16)
    for name in ("q.split", "k.split", "v.split"):
        assert const_input(p, name, 1).tolist() == [0, 0, 4, 2]      # 4 heads of dim 2
    assert const_input(p, "merge", 1).tolist() == [0, 0, 8]


def test_attention_whole_heads():
    """whole_heads=True removes whole heads instead of head_dim slices: the Reshape targets count heads."""
    g = G()
    q = _heads(g, "x", "wq", 16, 4, 4, [0, 2, 1, 3], "q")
    kt = _heads(g, "x", "wk", 16, 4, 4, [0, 2, 3, 1], "k")
    v = _heads(g, "x", "wv", 16, 4, 4, [0, 2, 1, 3], "v")
    m = g.model([("x", [2, 5, 16])], [_attention_tail(g, q, kt, v, 4, 4, 16)])
    analysis = graphprune.analyze_model(m, whole_heads=True)
    assert sorted((len(gr.units), gr.channels) for gr in analysis.groups) == [(4, 16)]   # one group: heads
    p, _ = prune_checked(m, whole_heads=True)
    for name in ("q.split", "k.split", "v.split"):
        assert const_input(p, name, 1).tolist() == [0, 0, 2, 4]      # 2 heads of dim 4
    assert const_input(p, "merge", 1).tolist() == [0, 0, 8]
    assert wshape(p, "wq.w") == (16, 8) and wshape(p, "wo.w") == (8, 16)


def test_heads_auto_takes_whole_heads_at_attention_and_inner_channels_in_a_channel_shuffle():
    """The default head mode ('auto'): the split/merge reshapes around Q·Kᵀ and A·V give whole-head units, a
    channel shuffle between convolutions keeps its finest units, in one model."""
    g = G()
    q = _heads(g, "x", "wq", 16, 4, 4, [0, 2, 1, 3], "q")
    kt = _heads(g, "x", "wk", 16, 4, 4, [0, 2, 3, 1], "k")
    v = _heads(g, "x", "wv", 16, 4, 4, [0, 2, 1, 3], "v")
    att = g.model([("x", [2, 5, 16])], [_attention_tail(g, q, kt, v, 4, 4, 16)])
    auto = graphprune.analyze_model(att, whole_heads="auto")
    # one group of 4 whole heads (Q, K and V of a head together) ...
    assert sorted((len(gr.units), gr.channels) for gr in auto.groups) == [(4, 16)]
    assert {tuple(u.elements[("wq.w", 1)]) for u in auto.groups[0].units} == {tuple(range(4 * h, 4 * h + 4))
                                                                               for h in range(4)}
    # ... where 'inner' has Q·K's and V's head_dim apart: element j of every head
    inner = graphprune.analyze_model(att, whole_heads="inner")
    assert sorted((len(gr.units), gr.channels) for gr in inner.groups) == [(4, 16), (4, 16)]
    qk = next(gr for gr in inner.groups if ("wq.w", 1) in gr.members)
    assert {tuple(u.elements[("wq.w", 1)]) for u in qk.units} == {tuple(range(j, 16, 4)) for j in range(4)}
    p, _ = prune_checked(att, heads="auto")
    for name in ("q.split", "k.split", "v.split"):
        assert const_input(p, name, 1).tolist() == [0, 0, 2, 4]      # 2 heads of dim 4
    g = G()
    y1 = g.add("Relu", [g.conv("x", 3, 8, "cv1")])
    r = g.add("Reshape", [y1, g.ints([1, 2, 4, 4, 4])], name="r1")
    r2 = g.add("Reshape", [g.add("Transpose", [r], perm=[0, 2, 1, 3, 4]), g.ints([1, 8, 4, 4])], name="r2")
    shuffle = g.model([("x", [1, 3, 4, 4])], [g.conv(r2, 8, 5, "cv2")])
    units = graphprune.analyze_model(shuffle, whole_heads="auto").groups[0].units
    assert sorted(tuple(u.elements[("cv1.w", 0)]) for u in units) == [(j, 4 + j) for j in range(4)]


def test_a_quantised_weight_is_not_an_activation_for_the_attention_test():
    """MatMul(x, DequantizeLinear(W)) is a weighted layer, not Q·Kᵀ: a reshape beside it is no head split;
    MatMul of two reshaped activations is."""
    from graphprune.ir import Graph
    from graphprune.rules import splits_attention
    w = numpy_helper.from_array(np.ones((8, 8), np.int8), "w_q")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "w_scale")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="split"),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="dq"),
             helper.make_node("MatMul", ["r", "w"], ["y"], name="linear"),
             helper.make_node("Reshape", ["x", "shape"], ["a"], name="split_a"),
             helper.make_node("Transpose", ["a"], ["at"], perm=[0, 1, 3, 2], name="t"),
             helper.make_node("MatMul", ["a", "at"], ["scores"], name="qk")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)],
                          [w, scale, numpy_helper.from_array(np.array([2, 4, 2, 8], np.int64), "shape")])
    graph = Graph(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    node = {n.name: n for n in graph.nodes}
    # the walk follows a node's readers and its inputs' producers, never siblings: 'split' sees only 'linear'
    assert not splits_attention(graph, node["split"])
    assert splits_attention(graph, node["split_a"])


def test_attention_with_static_targets_and_minus_one():
    """Targets spelled [B, S, H, -1] / [B, S, -1] (common in exports): only the channel entries may change."""
    g = G()
    q = g.add("Transpose", [g.add("Reshape", [g.matmul("x", 12, 12, "wq"), g.ints([2, 5, 3, -1])], name="q.split")],
              perm=[0, 2, 1, 3])
    kt = g.add("Transpose", [g.add("Reshape", [g.matmul("x", 12, 12, "wk"), g.ints([2, 5, 3, 4])], name="k.split")],
               perm=[0, 2, 3, 1])
    v = g.add("Transpose", [g.add("Reshape", [g.matmul("x", 12, 12, "wv"), g.ints([2, 5, 3, 4])], name="v.split")],
              perm=[0, 2, 1, 3])
    y = _attention_tail(g, q, kt, v, 3, 4, 12, shape=(2, 5))
    m = g.model([("x", [2, 5, 12])], [y])
    p, _ = prune_checked(m)
    assert const_input(p, "q.split", 1).tolist() == [2, 5, 3, -1]
    assert const_input(p, "k.split", 1).tolist() == [2, 5, 3, 2]
    assert const_input(p, "merge", 1).tolist() == [2, 5, 6]


def test_grouped_query_attention_repeat_kv():
    """Llama repeat_kv: K/V [B, Hkv, S, D] -> Unsqueeze(2) -> Expand [B, Hkv, rep, S, D] -> Reshape [B, H, S, D]."""
    g = G(13)
    b, s, hq, hkv, d = 1, 5, 4, 2, 4
    q = _heads(g, "x", "wq", 16, hq, d, [0, 2, 1, 3], "q")

    def kv(w, name):
        t = _heads(g, "x", w, 16, hkv, d, [0, 2, 1, 3], name)
        u = g.add("Unsqueeze", [t, g.ints([2])])
        e = g.add("Expand", [u, g.ints([b, hkv, hq // hkv, s, d], f"{name}.expand")], name=f"{name}.expand")
        return g.add("Reshape", [e, g.ints([b, hq, s, d], f"{name}.rep")], name=f"{name}.rep")
    k, v = kv("wk", "k"), kv("wv", "v")
    kt = g.add("Transpose", [k], perm=[0, 1, 3, 2])
    y = _attention_tail(g, q, kt, v, hq, d, 16)
    m = g.model([("x", [b, s, 16])], [y])
    assert group_sizes(m) == [(4, 8), (4, 8)]      # 4 head_dim units each; named after the K / V projection
    p, _ = prune_checked(m)
    assert wshape(p, "wq.w") == (16, 8) and wshape(p, "wk.w") == (16, 4) and wshape(p, "wv.w") == (16, 4)
    assert wshape(p, "wo.w") == (8, 16)
    assert const_input(p, "k.expand", 1).tolist() == [1, 2, 2, 5, 2]
    assert const_input(p, "k.rep", 1).tolist() == [1, 4, 5, 2]
    assert const_input(p, "k.split", 1).tolist() == [0, 0, 2, 2]


def test_channel_shuffle_between_convs():
    g = G()
    y1 = g.add("Relu", [g.conv("x", 3, 8, "cv1")])
    r = g.add("Reshape", [y1, g.ints([1, 2, 4, 4, 4])], name="r1")
    t = g.add("Transpose", [r], perm=[0, 2, 1, 3, 4])
    r2 = g.add("Reshape", [t, g.ints([1, 8, 4, 4])], name="r2")
    y = g.conv(r2, 8, 5, "cv2")
    m = g.model([("x", [1, 3, 4, 4])], [y])
    units = graphprune.analyze_model(m).groups[0].units
    # a unit is the same local index j in both shuffle groups: cv1 rows {j, 4+j}, cv2 columns {2j, 2j+1}
    assert sorted(tuple(u.elements[("cv1.w", 0)]) for u in units) == [(j, 4 + j) for j in range(4)]
    assert sorted(tuple(u.elements[("cv2.w", 1)]) for u in units) == [(2 * j, 2 * j + 1) for j in range(4)]
    p, _ = prune_checked(m)
    assert const_input(p, "r1", 1).tolist() == [1, 2, 2, 4, 4]
    assert const_input(p, "r2", 1).tolist() == [1, 4, 4, 4]
    assert wshape(p, "cv2.w") == (5, 4, 1, 1)


def test_window_partition_channels_last():
    """Swin: NHWC -> windows [nW, ws*ws, C] -> MLP -> window reverse -> NCHW."""
    g = G()
    y1 = g.add("Transpose", [g.conv("x", 3, 16, "cv1")], perm=[0, 2, 3, 1])            # [1, 8, 8, 16]
    w = g.add("Reshape", [y1, g.ints([1, 2, 4, 2, 4, 16])], name="part1")
    w = g.add("Transpose", [w], perm=[0, 1, 3, 2, 4, 5])
    w = g.add("Reshape", [w, g.ints([-1, 16, 16])], name="part2")                       # [4, 16, 16]
    h = g.add("Relu", [g.matmul(w, 16, 12, "fc1")])
    h = g.matmul(h, 12, 16, "fc2")
    h = g.add("Reshape", [h, g.ints([1, 2, 2, 4, 4, 16])], name="rev1")
    h = g.add("Transpose", [h], perm=[0, 1, 3, 2, 4, 5])
    h = g.add("Reshape", [h, g.ints([1, 8, 8, 16])], name="rev2")
    y = g.conv(g.add("Transpose", [h], perm=[0, 3, 1, 2]), 16, 5, "cv2")
    m = g.model([("x", [1, 3, 8, 8])], [y])
    assert group_sizes(m) == [(12, 12), (16, 16), (16, 16)]
    p, _ = prune_checked(m)
    assert const_input(p, "part1", 1).tolist() == [1, 2, 4, 2, 4, 8]
    assert const_input(p, "part2", 1).tolist() == [-1, 16, 8]
    assert const_input(p, "rev1", 1).tolist() == [1, 2, 2, 4, 4, 8]
    assert const_input(p, "rev2", 1).tolist() == [1, 8, 8, 8]
    assert wshape(p, "fc1.w") == (8, 6) and wshape(p, "fc2.w") == (6, 8) and wshape(p, "cv2.w") == (5, 8, 1, 1)


def _group_norm_decomposed(g, x, c, groups, kind):
    r = g.add("Reshape", [x, g.ints([0, groups, -1])], name="gn.in")
    if kind == "instancenorm":      # PyTorch's GroupNorm export before opset 18
        n = g.add("InstanceNormalization", [r, g.const(np.ones(groups, np.float32)),
                                            g.const(np.zeros(groups, np.float32))], name="gn.norm", epsilon=1e-5)
    else:
        mean = g.add("ReduceMean", [r], axes=[2])
        d = g.add("Sub", [r, mean])
        var = g.add("ReduceMean", [g.add("Pow", [d, g.const(np.float32(2))])], axes=[2])
        n = g.add("Div", [d, g.add("Sqrt", [g.add("Add", [var, g.const(np.float32(1e-5))])])])
    back = g.add("Reshape", [n, g.add("Shape", [x])], name="gn.out")
    back = g.add("Mul", [back, g.w(c, 1, 1, name="gn.gamma", positive=True)])
    return g.add("Add", [back, g.w(c, 1, 1, name="gn.beta", scale=0.5)])


@pytest.mark.parametrize("kind", ["instancenorm", "reducemean"])
def test_decomposed_group_norm_removes_whole_groups(kind):
    g = G(13)
    y1 = g.conv("x", 3, 8, "cv1", k=3)
    h = g.add("Relu", [_group_norm_decomposed(g, y1, 8, 2, kind)])
    y = g.conv(h, 8, 5, "cv2")
    m = g.model([("x", [1, 3, 4, 4])], [(y, [1, 5, 4, 4])])
    assert group_sizes(m) == [(2, 8)]              # removal units are the 2 groups of 4 channels
    p, _ = prune_checked(m)
    assert wshape(p, "cv1.w")[0] == 4 and wshape(p, "gn.gamma") == (4, 1, 1) and wshape(p, "cv2.w")[1] == 4
    assert const_input(p, "gn.in", 1).tolist() == [0, 1, -1]


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_decomposed_norm_over_channels_last_prunes(kind):
    """Pre-norm MLP block: ReduceMean over the residual width becomes ReduceSum / original width (exact under
    masking), so the residual width prunes along with the MLP hidden width."""
    g = G(13)
    h = g.matmul("x", 8, 16, "proj")                                   # the residual stream [1, 5, 16]
    if kind == "layernorm":
        d = g.add("Sub", [h, g.add("ReduceMean", [h], axes=[-1])])
        var = g.add("ReduceMean", [g.add("Pow", [d, g.const(np.float32(2))])], axes=[-1])
    else:
        d = h
        var = g.add("ReduceMean", [g.add("Mul", [h, h])], axes=[-1])
    n = g.add("Div", [d, g.add("Sqrt", [g.add("Add", [var, g.const(np.float32(1e-5))])])])
    n = g.add("Mul", [n, g.w(16, name="ln.gamma", positive=True)])
    if kind == "layernorm":
        n = g.add("Add", [n, g.w(16, name="ln.beta", scale=0.5)])
    mlp = g.matmul(g.add("Relu", [g.matmul(n, 16, 32, "up")]), 32, 16, "down")
    y = g.matmul(g.add("Add", [h, mlp]), 16, 4, "head")
    m = g.model([("x", [1, 5, 8])], [y])
    assert group_sizes(m) == [(16, 16), (32, 32)]
    assert not any(r.startswith("ReduceMean") for r in frozen_reasons(m))
    p, _ = prune_checked(m)
    assert wshape(p, "up.w") == (8, 16) and wshape(p, "down.w") == (16, 8)
    assert wshape(p, "proj.w") == (8, 8) and wshape(p, "ln.gamma") == (8,)
    assert "ReduceMean" not in {n.op_type for n in p.graph.node}


# ---- Squeeze / Unsqueeze / Transpose -------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_unsqueeze_se_block(opset):
    g = G(opset)
    y1 = g.add("Relu", [g.conv("x", 3, 8, "cv1", k=3)])
    p_ = g.add("GlobalAveragePool", [y1])
    if opset < 13:
        s = g.add("Squeeze", [p_], name="sq", axes=[2, 3])
    else:
        s = g.add("Squeeze", [p_, g.ints([2, 3])], name="sq")
    s = g.add("Sigmoid", [g.gemm(g.add("Relu", [g.gemm(s, 8, 4, "se1")]), 4, 8, "se2")])
    u = g.add("Unsqueeze", [s], name="unsq", axes=[2, 3]) if opset < 13 else \
        g.add("Unsqueeze", [s, g.ints([2, 3])], name="unsq")
    y = g.conv(g.add("Mul", [y1, u]), 8, 5, "cv2")
    m = g.model([("x", [1, 3, 4, 4])], [y])
    assert group_sizes(m) == [(4, 4), (8, 8)]
    p, _ = prune_checked(m)
    assert wshape(p, "se1.w") == (2, 4) and wshape(p, "se2.w") == (4, 2) and wshape(p, "cv2.w") == (5, 4, 1, 1)


def test_transpose_nhwc_tf2onnx_idiom():
    """tf2onnx: NHWC input -> Transpose -> Conv -> Transpose back, a channels-last Dense, NHWC output."""
    g = G()
    t = g.add("Transpose", ["x"], perm=[0, 3, 1, 2])
    y1 = g.add("Relu", [g.conv(t, 3, 8, "cv1", k=3)])
    t2 = g.add("Transpose", [y1], perm=[0, 2, 3, 1])
    d = g.add("Relu", [g.matmul(t2, 8, 12, "dense")])                 # [1, 6, 6, 12]
    t3 = g.add("Transpose", [d], perm=[0, 3, 1, 2])
    y = g.add("Transpose", [g.conv(t3, 12, 6, "cv2", k=3)], perm=[0, 2, 3, 1])
    m = g.model([("x", [1, 6, 6, 3])], [y])
    assert group_sizes(m) == [(8, 8), (12, 12)]
    p, _ = prune_checked(m)
    assert wshape(p, "cv1.w") == (4, 3, 3, 3)                          # graph input channels stay
    assert wshape(p, "dense.w") == (4, 6) and wshape(p, "cv2.w") == (6, 6, 3, 3)
    assert io_shapes(p) == io_shapes(m)


# ---- Expand / Tile / Pad -------------------------------------------------------------------------------------------
def test_expand_constant_shape():
    g = G(13)
    y1 = g.add("Relu", [g.conv("x", 3, 8, "cv1")])
    pooled = g.add("GlobalAveragePool", [y1])                           # [1, 8, 1, 1]
    e = g.add("Expand", [pooled, g.ints([1, 8, 4, 4], "target")], name="expand")
    y = g.conv(g.add("Concat", [y1, e], axis=1), 16, 5, "cv2")
    m = g.model([("x", [1, 3, 4, 4])], [y])
    assert group_sizes(m) == [(8, 8)]
    p, _ = prune_checked(m)
    assert const_input(p, "expand", 1).tolist() == [1, 4, 4, 4]
    assert wshape(p, "cv2.w") == (5, 8, 1, 1)


def test_expand_broadcast_copies_on_channel_axis():
    """A one-channel map expanded to C channels: each copy is its own removable element."""
    g = G(13)
    one = g.conv("x", 3, 1, "cv0")                                      # [1, 1, 4, 4]
    e = g.add("Expand", [one, g.ints([1, 8, 1, 1], "target")], name="expand")
    y1 = g.add("Mul", [g.conv("x", 3, 8, "cv1"), e])
    y = g.conv(y1, 8, 5, "cv2")
    m = g.model([("x", [1, 3, 4, 4])], [y])
    assert group_sizes(m) == [(8, 8)]
    p, _ = prune_checked(m)
    assert const_input(p, "expand", 1).tolist() == [1, 4, 1, 1]
    assert wshape(p, "cv0.w")[0] == 1


def test_tile_channel_axis():
    g = G(13)
    y1 = g.add("Relu", [g.conv("x", 3, 4, "cv1")])
    t = g.add("Tile", [y1, g.ints([1, 2, 1, 1], "reps")], name="tile")
    y = g.conv(t, 8, 5, "cv2")
    m = g.model([("x", [1, 3, 4, 4])], [y])
    units = graphprune.analyze_model(m).groups[0].units
    assert sorted(tuple(u.elements[("cv2.w", 1)]) for u in units) == [(c, c + 4) for c in range(4)]
    p, _ = prune_checked(m)
    assert wshape(p, "cv1.w")[0] == 2 and wshape(p, "cv2.w") == (5, 4, 1, 1)
    assert const_input(p, "tile", 1).tolist() == [1, 2, 1, 1]


@pytest.mark.parametrize("opset", [10, 11, 18])
@pytest.mark.parametrize("channel_pads", [(0, 0), (1, 2)], ids=["spatial_only", "channels_too"])
def test_pad(opset, channel_pads):
    g = G(opset)
    y1 = g.add("Relu", [g.conv("x", 3, 8, "cv1")])
    before, after = channel_pads
    pads = [0, before, 1, 2, 0, after, 1, 0]
    if opset < 11:                                                        # Pad-2: pads is an attribute
        pad = g.add("Pad", [y1], name="pad", pads=pads, value=0.5)
    elif opset < 18:
        pad = g.add("Pad", [y1, g.ints(pads), g.const(np.float32(0.5))], name="pad")
    else:  # opset 18: only the padded axes are listed
        pad = g.add("Pad", [y1, g.ints([before, 1, 2, after, 1, 0]), g.const(np.float32(0.5)), g.ints([1, 2, 3])],
                    name="pad")
    y = g.conv(pad, 8 + before + after, 5, "cv2", k=3)
    m = g.model([("x", [1, 3, 4, 4])], [y])
    assert group_sizes(m) == [(8, 8)]
    if before + after:
        assert any("padding" in r for r in frozen_reasons(m))
    p, _ = prune_checked(m)
    assert wshape(p, "cv1.w")[0] == 4 and wshape(p, "cv2.w") == (5, 4 + before + after, 3, 3)


# ---- Resize / Upsample ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [11, 13, 18])
@pytest.mark.parametrize("by", ["scales", "sizes"])
def test_resize(opset, by):
    g = G(opset)
    y1 = g.add("Relu", [g.conv("x", 3, 8, "cv1")])
    roi = g.const(np.zeros(0, np.float32)) if opset < 13 else ""
    if by == "scales":
        ins = [y1, roi, g.const(np.array([1, 1, 2, 2], np.float32))]
    else:
        ins = [y1, roi, g.const(np.zeros(0, np.float32)) if opset < 13 else "", g.ints([1, 8, 8, 8], "sizes")]
    up = g.add("Resize", ins, name="resize", mode="nearest")
    y = g.conv(up, 8, 5, "cv2", k=3)
    m = g.model([("x", [1, 3, 4, 4])], [y])
    assert group_sizes(m) == [(8, 8)]
    p, _ = prune_checked(m)
    assert wshape(p, "cv2.w") == (5, 4, 3, 3)
    if by == "sizes":
        assert const_input(p, "resize", 3).tolist() == [1, 4, 8, 8]        # the channel entry is rewritten


def test_upsample_opset9():
    # Upsample is deprecated since opset 10 but onnxruntime still runs the opset-9 form.
    g = G(9)
    y1 = g.add("Relu", [g.conv("x", 3, 8, "cv1")])
    up = g.add("Upsample", [y1, g.const(np.array([1, 1, 2, 2], np.float32))], name="up", mode="nearest")
    y = g.conv(up, 8, 5, "cv2", k=3)
    m = g.model([("x", [1, 3, 4, 4])], [y])
    p, _ = prune_checked(m)
    assert wshape(p, "cv2.w") == (5, 4, 3, 3)


# ---- DepthToSpace / SpaceToDepth -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space(mode):
    g = G(13)
    y1 = g.add("Relu", [g.conv("x", 3, 16, "cv1", k=3)])
    d = g.add("DepthToSpace", [y1], name="d2s", blocksize=2, mode=mode)   # [1, 4, 8, 8]
    y = g.conv(d, 4, 5, "cv2", k=3)
    m = g.model([("x", [1, 3, 4, 4])], [y])
    units = graphprune.analyze_model(m).groups[0].units
    rows = sorted(tuple(u.elements[("cv1.w", 0)]) for u in units)
    if mode == "DCR":   # input channel (i*b + j)*C' + c feeds output channel c
        assert rows == [(c, c + 4, c + 8, c + 12) for c in range(4)]
    else:               # CRD (PixelShuffle): c*b*b + (i*b + j)
        assert rows == [tuple(range(4 * c, 4 * c + 4)) for c in range(4)]
    p, _ = prune_checked(m)
    assert wshape(p, "cv1.w")[0] == 8 and wshape(p, "cv2.w") == (5, 2, 3, 3)


def test_space_to_depth():
    g = G(13)
    y1 = g.add("Relu", [g.conv("x", 3, 4, "cv1", k=3)])
    s = g.add("SpaceToDepth", [y1], name="s2d", blocksize=2)             # [1, 16, 2, 2]
    y = g.conv(s, 16, 5, "cv2", k=3)
    m = g.model([("x", [1, 3, 4, 4])], [y])
    units = graphprune.analyze_model(m).groups[0].units
    assert sorted(tuple(u.elements[("cv2.w", 1)]) for u in units) == [(c, c + 4, c + 8, c + 12) for c in range(4)]
    p, _ = prune_checked(m)
    assert wshape(p, "cv1.w")[0] == 2 and wshape(p, "cv2.w") == (5, 8, 3, 3)


# ---- ops that read sizes -------------------------------------------------------------------------------------------
def _dynamic_block(g, read):
    """cv1 (dynamic batch) -> an op that reads y1's size -> combined with y1 -> cv2 (channels must freeze)."""
    y1 = g.add("Relu", [g.conv("x", 3, 8, "cv1")])
    if read == "ConstantOfShape":
        ones = g.add("ConstantOfShape", [g.add("Shape", [y1], name="shape")], name="cos",
                     value=numpy_helper.from_array(np.array([0.5], np.float32)))
        mixed = g.add("Add", [y1, ones])
    else:
        size = g.add("Cast", [g.add("Size", [y1], name="size")], to=TensorProto.FLOAT)
        mixed = g.add("Div", [y1, size])
    return g.conv(g.add("Relu", [g.conv(mixed, 8, 6, "cv2")]), 6, 5, "cv3")


@pytest.mark.parametrize("read", ["ConstantOfShape", "Size"])
def test_size_reading_ops_freeze_channels(read):
    g = G(13)
    y = _dynamic_block(g, read)
    m = g.model([("x", ["N", 3, 4, 4])], [(y, ["N", 5, 4, 4])])
    assert group_sizes(m) == [(6, 6)]                                   # cv1's channels are frozen
    reasons = frozen_reasons(m)
    assert any(read in r or "Shape op" in r for r in reasons), reasons
    p, _ = prune_checked(m)
    assert wshape(p, "cv1.w")[0] == 8 and wshape(p, "cv2.w") == (3, 8, 1, 1)


def test_static_shape_reads_fold_and_do_not_freeze():
    """With a static input the Shape folds to a constant during canonicalisation: nothing reads sizes at
    run time, and the ConstantOfShape output becomes a constant operand that prunes with the channels."""
    g = G(13)
    y = _dynamic_block(g, "ConstantOfShape")
    m = g.model([("x", [1, 3, 4, 4])], [(y, [1, 5, 4, 4])])
    assert group_sizes(m) == [(6, 6), (8, 8)]
    p, _ = prune_checked(m)
    assert wshape(p, "cv1.w")[0] == 4


# ---- embeddings ----------------------------------------------------------------------------------------------------
def test_embedding_lookup_then_matmul():
    g = G(13)
    e = g.add("Gather", [g.w(10, 16, name="emb", scale=1.0), "ids"], name="lookup")   # [1, 5, 16]
    h = g.add("Relu", [g.matmul(e, 16, 12, "fc1")])
    y = g.matmul(h, 12, 4, "fc2")
    m = g.model([("ids", [1, 5], INT64)], [y])
    assert group_sizes(m) == [(12, 12), (16, 16)]
    p, _ = prune_checked(m)
    assert wshape(p, "emb") == (10, 8)                                  # vocabulary rows never go
    assert wshape(p, "fc1.w") == (8, 6) and wshape(p, "fc2.w") == (6, 4)


@pytest.mark.parametrize("head", ["transpose_matmul", "gemm_transB"])
def test_tied_embedding_and_lm_head(head):
    """The same table embeds tokens and produces the logits: its hidden axis prunes once, consistently.
    (The table is above canonicalize's 4096-element untie limit: small shared constants are copied apart.)"""
    g = G(13)
    table = g.w(300, 16, name="emb", scale=1.0)
    e = g.add("Gather", [table, "ids"], name="lookup")                 # [5, 16]
    h = g.matmul(g.add("Relu", [g.matmul(e, 16, 12, "fc1")]), 12, 16, "fc2")
    if head == "transpose_matmul":
        y = g.add("MatMul", [h, g.add("Transpose", [table], perm=[1, 0])], name="lm_head")
    else:
        y = g.add("Gemm", [h, table], name="lm_head", transB=1)
    m = g.model([("ids", [5], INT64)], [y])
    p, _ = prune_checked(m)
    emb = [t.name for t in p.graph.initializer if 300 in t.dims]
    # one table, not two copies; its hidden axis (tied to fc1's input and fc2's output) is pruned once
    assert emb == ["emb"] and wshape(p, "emb") == (300, 8)
    assert wshape(p, "fc1.w") == (8, 6) and wshape(p, "fc2.w") == (6, 8)


# ---- graph inputs and outputs --------------------------------------------------------------------------------------
def test_graph_input_and_output_channels_are_never_removed():
    g = G(13)
    y1 = g.add("Relu", [g.conv("x", 3, 8, "cv1")])
    cat = g.add("Concat", ["x", y1], name="cat", axis=1)                # the input's channels ride along
    y3 = g.conv(cat, 11, 8, "cv3")                                      # both a graph output and read on
    y4 = g.conv(g.add("Relu", [y3]), 8, 5, "cv4")
    m = g.model([("x", [1, 3, 4, 4])], [y3, y4])
    assert group_sizes(m) == [(8, 8)]
    assert any("graph input" in r for r in frozen_reasons(m))
    assert any("reaches graph output" in r for r in frozen_reasons(m))
    p, _ = prune_checked(m)
    assert io_shapes(p) == io_shapes(m)
    assert wshape(p, "cv3.w") == (8, 3 + 4, 1, 1) and wshape(p, "cv4.w") == (5, 8, 1, 1)
    np.testing.assert_array_equal(inits(p)["cv3.w"][:, :3], inits(m)["cv3.w"][:, :3])   # input columns intact


# ---- exporter idioms and edge cases (several were bugs) ------------------------------------------------------------
def test_vit_patch_embedding_flatten_transpose():
    """conv stem -> x.flatten(2).transpose(1, 2), a class token concatenated on the token axis, a position
    embedding added: Reshape [0, 0, -1] keeps copying the (pruned) channel dim; the learned token and
    position embedding lose the same channels."""
    g = G(13)
    pe = g.conv("x", 3, 16, "patch")                                       # [1, 16, 4, 4]
    t = g.add("Transpose", [g.add("Reshape", [pe, g.ints([0, 0, -1])], name="flat")], perm=[0, 2, 1])
    t = g.add("Concat", [g.w(1, 1, 16, name="cls", scale=1.0), t], axis=1)        # [1, 17, 16]
    t = g.add("Add", [t, g.w(1, 17, 16, name="pos", scale=1.0)])
    h = g.matmul(g.add("Relu", [g.matmul(t, 16, 24, "fc1")]), 24, 16, "fc2")
    y = g.matmul(g.add("Add", [t, h]), 16, 4, "head")
    m = g.model([("x", [1, 3, 4, 4])], [y])
    assert group_sizes(m) == [(16, 16), (24, 24)]
    p, _ = prune_checked(m)
    assert const_input(p, "flat", 1).tolist() == [0, 0, -1]
    assert wshape(p, "patch.w")[0] == 8 and wshape(p, "fc1.w") == (8, 12) and wshape(p, "head.w") == (8, 4)
    assert wshape(p, "cls") == (1, 1, 8) and wshape(p, "pos") == (1, 17, 8)


def test_attention_with_dynamic_batch_and_sequence():
    """Targets built at run time as Concat(Shape[0], Shape[1], H, D): only the constant pieces are rewritten."""
    g = G(13)

    def target(x, tail, name):
        sh = g.add("Shape", [x])
        dims = [g.add("Unsqueeze", [g.add("Gather", [sh, g.ints(i)], axis=0), g.ints([0])]) for i in (0, 1)]
        return g.add("Concat", dims + [g.ints([v]) for v in tail], axis=0, name=name)

    def heads(w, perm, name):
        h = g.matmul("x", 16, 16, w)
        return g.add("Transpose", [g.add("Reshape", [h, target(h, [4, 4], f"{name}.tgt")], name=name)], perm=perm)
    q, kt, v = heads("wq", [0, 2, 1, 3], "q"), heads("wk", [0, 2, 3, 1], "k"), heads("wv", [0, 2, 1, 3], "v")
    s = g.add("Mul", [g.add("MatMul", [q, kt]), g.const(np.float32(0.5))])
    o = g.add("Transpose", [g.add("MatMul", [g.add("Softmax", [s], axis=-1), v])], perm=[0, 2, 1, 3])
    y = g.matmul(g.add("Reshape", [o, target("x", [-1], "merge.tgt")], name="merge"), 16, 16, "wo")
    m = g.model([("x", ["B", "S", 16])], [(y, ["B", "S", 16])])
    assert group_sizes(m) == [(4, 16), (4, 16)]
    p, _ = prune_checked(m, input_dims={"B": 2, "S": 3})
    for name in ("q.tgt", "k.tgt", "v.tgt"):
        assert [int(const_input(p, name, i)[0]) for i in (2, 3)] == [4, 2]
    assert const_input(p, "merge.tgt", 2).tolist() == [-1]
    assert io_shapes(p) == io_shapes(m)


def test_slice_to_int64_max():
    """x[:, 4:] exports as ends = INT64_MAX."""
    g = G(13)
    s = _slice(g, g.conv("x", 3, 12, "cv1"), [4], [np.iinfo(np.int64).max], [1], name="slice")
    m = g.model([("x", [1, 3, 4, 4])], [g.conv(s, 8, 5, "cv2")])
    p, _ = prune_checked(m)
    starts, ends = _slice_bounds(p, "slice")
    assert ends[0] - starts[0] == 4 and wshape(p, "cv1.w")[0] == 6


def test_strided_channel_slice_is_frozen():
    """Limitation: x[:, ::2] cannot stay one Slice once arbitrary channels go, so the axis is frozen."""
    g = G(13)
    s = _slice(g, g.conv("x", 3, 12, "cv1"), [0], [12], [1], steps=[2], name="slice")
    m = g.model([("x", [1, 3, 4, 4])], [g.conv(s, 6, 5, "cv2")])
    assert group_sizes(m) == []
    assert any("Slice node 'slice': strided slice" in r for r in frozen_reasons(m))
    prune_checked(m, expect_smaller=False)


def test_expand_with_a_shorter_shape_tensor():
    """Expand([1, C, 1, 1], [4, 4]): the shape tensor does not reach the channel axis, which keeps x's size.
    (Was frozen as 'expand target computed at run time'.)"""
    g = G(13)
    y1 = g.add("Relu", [g.conv("x", 3, 8, "cv1")])
    e = g.add("Expand", [g.add("GlobalAveragePool", [y1]), g.ints([4, 4], "target")], name="expand")
    y = g.conv(g.add("Concat", [y1, e], axis=1), 16, 5, "cv2")
    m = g.model([("x", [1, 3, 4, 4])], [y])
    assert group_sizes(m) == [(8, 8)]
    p, _ = prune_checked(m)
    assert const_input(p, "expand", 1).tolist() == [4, 4] and wshape(p, "cv2.w") == (5, 8, 1, 1)


@pytest.mark.parametrize("mode", ["reflect", "edge"])
def test_copying_pad_on_channels_freezes_them(mode):
    """reflect/edge padding on the channel axis copies channels into the pad: removing one changes the copy.
    (Was linked like zero padding and failed verification.) Spatial reflect padding still prunes."""
    g = G(13)
    y1 = g.add("Relu", [g.conv("x", 3, 8, "cv1")])
    pad = g.add("Pad", [y1, g.ints([0, 1, 1, 1, 0, 2, 1, 1])], name="pad", mode=mode)
    m = g.model([("x", [1, 3, 4, 4])], [g.conv(pad, 11, 5, "cv2", k=3)])
    assert group_sizes(m) == []
    assert any(f"{mode} padding copies" in r for r in frozen_reasons(m))
    prune_checked(m, expect_smaller=False)

    g = G(13)
    y1 = g.add("Relu", [g.conv("x", 3, 8, "cv1")])
    pad = g.add("Pad", [y1, g.ints([0, 0, 1, 1, 0, 0, 1, 1])], name="pad", mode=mode)
    m = g.model([("x", [1, 3, 4, 4])], [g.conv(pad, 8, 5, "cv2", k=3)])
    p, _ = prune_checked(m)
    assert wshape(p, "cv2.w") == (5, 4, 3, 3)


@pytest.mark.parametrize("by", ["scales", "sizes"])
def test_resize_opset18_axes(by):
    """Resize-18 with `axes`: sizes list only the resized axes and must keep that length.
    (The rewrite used to write the full output shape: an invalid model.)"""
    g = G(18)
    y1 = g.add("Relu", [g.conv("x", 3, 8, "cv1")])
    ins = [y1, "", g.const(np.array([2, 2], np.float32))] if by == "scales" else [y1, "", "", g.ints([8, 8])]
    up = g.add("Resize", ins, name="resize", mode="nearest", axes=[2, 3])
    m = g.model([("x", [1, 3, 4, 4])], [g.conv(up, 8, 5, "cv2", k=3)])
    p, _ = prune_checked(m)
    assert wshape(p, "cv2.w") == (5, 4, 3, 3)
    if by == "sizes":
        assert const_input(p, "resize", 3).tolist() == [8, 8]


@pytest.mark.parametrize("by", ["scales", "sizes"])
def test_resize_channels_last(by):
    """Keras/tf2onnx NHWC resize (scales [1, 2, 2, 1]): the unchanged last axis carries channels.
    (It was marked 'not a channel' because it sits at position >= 2: silently unprunable.)"""
    g = G(13)
    y1 = g.add("Relu", [g.matmul("x", 3, 8, "fc1")])                      # [1, 4, 4, 8]
    ins = [y1, "", g.const(np.array([1, 2, 2, 1], np.float32))] if by == "scales" else \
        [y1, "", "", g.ints([1, 8, 8, 8])]
    up = g.add("Resize", ins, name="resize", mode="linear")
    m = g.model([("x", [1, 4, 4, 3])], [g.matmul(up, 8, 5, "fc2")])
    assert group_sizes(m) == [(8, 8)]
    p, _ = prune_checked(m)
    assert wshape(p, "fc2.w") == (4, 5)
    if by == "sizes":
        assert const_input(p, "resize", 3).tolist() == [1, 8, 8, 4]


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_without_axes_keeps_a_single_remaining_channel(opset):
    """x.squeeze() exports Squeeze with no axes: once a width is pruned to 1 it would squeeze the channel axis
    away too. (The rank changed and the model was invalid; the axes are now spelled out.)"""
    g = G(opset)
    y1 = g.add("Relu", [g.conv("x", 3, 2, "cv1")])
    s = g.add("Squeeze", [g.add("GlobalAveragePool", [y1])], name="sq")   # [2]
    m = g.model([("x", [1, 3, 4, 4])], [g.matmul(s, 2, 4, "fc")])
    p, _ = prune_checked(m)
    assert wshape(p, "fc.w") == (1, 4)
    axes = list(attr(p, "sq", "axes")) if opset < 13 else const_input(p, "sq", 1).tolist()
    assert axes == [0, 2, 3]


def test_shape_with_negative_start_as_graph_output():
    """Shape(start=-2) of [1, C, L]: reads C. (A negative start was taken modulo r + 1, reading nothing, and
    a Shape whose result is a graph output counted as unread; the model reported a different shape.)"""
    g = G(15)
    y1 = g.add("Relu", [g.add("Conv", ["x", g.w(8, 3, 1, name="cv1.w")], name="cv1")])
    sh = g.add("Shape", [y1], name="shape", start=-2)
    y = g.add("Conv", [y1, g.w(5, 8, 1, name="cv2.w")], name="cv2")
    m = g.model([("x", [1, 3, "L"])], [(y, [1, 5, "L"]), (sh, [2], INT64)])
    assert group_sizes(m) == []
    assert any("read by a Shape op" in r for r in frozen_reasons(m))
    prune_checked(m, expect_smaller=False)


def test_rotary_embedding_rotate_half():
    """Llama RoPE: q*cos + cat(-q[..., D/2:], q[..., :D/2])*sin couples head_dim d with d + D/2; the two
    half-slices and the cos/sin tables follow."""
    g = G(13)
    s, d, h = 5, 8, 2

    def rope(t, name):
        x1 = _slice(g, t, [0], [d // 2], [-1], name=f"{name}.x1")
        x2 = _slice(g, t, [d // 2], [d], [-1], name=f"{name}.x2")
        rot = g.add("Concat", [g.add("Neg", [x2]), x1], axis=-1)
        return g.add("Add", [g.add("Mul", [t, "cos"]), g.add("Mul", [rot, "sin"])])
    angle = np.arange(s)[:, None] / 10000 ** (np.arange(d // 2) * 2 / d)[None]
    g.const(np.cos(np.concatenate([angle, angle], -1)).astype(np.float32), "cos")
    g.const(np.sin(np.concatenate([angle, angle], -1)).astype(np.float32), "sin")
    q = rope(_heads(g, "x", "wq", 16, h, d, [0, 2, 1, 3], "q"), "q")
    kt = g.add("Transpose", [rope(_heads(g, "x", "wk", 16, h, d, [0, 2, 1, 3], "k"), "k")], perm=[0, 1, 3, 2])
    v = _heads(g, "x", "wv", 16, h, d, [0, 2, 1, 3], "v")
    m = g.model([("x", [1, s, 16])], [_attention_tail(g, q, kt, v, h, d, 16)])
    qk = next(gr for gr in graphprune.analyze_model(m).groups if ("wq.w", 1) in gr.members)
    assert sorted(u.elements[("wq.w", 1)].tolist() for u in qk.units) == [[j, j + 4, j + 8, j + 12] for j in range(4)]
    p, _ = prune_checked(m)
    assert wshape(p, "wq.w") == (16, 8) and wshape(p, "wk.w") == (16, 8) and wshape(p, "wv.w") == (16, 8)
    assert _slice_bounds(p, "q.x1") == ([0], [2]) and _slice_bounds(p, "q.x2") == ([2], [4])
    assert const_input(p, "q.split", 1).tolist() == [0, 0, 2, 4]


@pytest.mark.parametrize("op", ["EyeLike", "RandomNormalLike", "RandomUniformLike", "NonZero"])
def test_tensor_creating_ops_freeze_what_they_read(op):
    """Ops whose output shape (or values) come from their input's shape: that input's channels freeze, with
    the op named; the MLP width after them still prunes."""
    g = G(13)
    h = g.matmul("x", 8, 8, "fc1")                                         # [8, 8]
    if op == "NonZero":
        made = g.add("ReduceSum", [g.add("Cast", [g.add("NonZero", [g.add("Relu", [h])], name="made")],
                                         to=TensorProto.FLOAT)], keepdims=0)
    else:
        made = g.add(op, [h], name="made", **({"seed": 1.0} if op.startswith("Random") else {}))
    mixed = g.add("Add", [h, made])
    y = g.matmul(g.add("Relu", [g.matmul(mixed, 8, 12, "fc2")]), 12, 4, "fc3")
    m = g.model([("x", [8, 8])], [y])
    assert group_sizes(m) == [(12, 12)]
    assert any(f"{op} node 'made'" in r for r in frozen_reasons(m)), frozen_reasons(m)
    p, _ = prune_checked(m)
    assert wshape(p, "fc1.w") == (8, 8) and wshape(p, "fc2.w") == (8, 6)


def test_range_over_a_dynamic_length_does_not_freeze_channels():
    """Position ids from Range(0, seq_len): the created axis is the sequence, never a channel."""
    g = G(13)
    h = g.add("Relu", [g.matmul("x", 8, 16, "fc1")])                     # [1, S, 16]
    n = g.add("Gather", [g.add("Shape", ["x"]), g.ints(1)], axis=0)
    pos = g.add("Range", [g.const(np.float32(0)), g.add("Cast", [n], to=TensorProto.FLOAT),
                          g.const(np.float32(1))], name="range")
    pos = g.add("Unsqueeze", [pos, g.ints([0, 2])])                      # [1, S, 1]
    y = g.matmul(g.add("Mul", [h, pos]), 16, 4, "fc2")
    m = g.model([("x", [1, "S", 8])], [(y, [1, "S", 4])])
    assert group_sizes(m) == [(16, 16)]
    p, _ = prune_checked(m)
    assert wshape(p, "fc1.w") == (8, 8)


def test_shape_read_through_cast_freezes_only_the_dims_it_reads():
    """tf2onnx casts shapes to int32 before slicing them: Shape(x) -> Cast -> Slice[0:1] reads the batch dim
    only, so x's channel axis stays prunable (an LSTM zero state sized from the batch, say)."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Shape", ["r"], ["s"]),
             helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.INT32),
             helper.make_node("Slice", ["s32", "zero", "one", "zero"], ["batch"]),
             helper.make_node("Cast", ["batch"], ["batch64"], to=TensorProto.INT64),
             helper.make_node("Concat", ["batch64", "four"], ["zshape"], axis=0),
             helper.make_node("ConstantOfShape", ["zshape"], ["z"]),
             helper.make_node("MatMul", ["r", "w2"], ["m"]),
             helper.make_node("Add", ["m", "z"], ["y"])]
    inits = {"w1": rand(6, 8, seed=1), "w2": rand(8, 4, seed=2), "zero": np.array([0], np.int32),
             "one": np.array([1], np.int32), "four": np.array([4], np.int64)}
    model = make_model(nodes, [("x", ["batch", 6])], [("y", ["batch", 4])], inits, opset=13)
    pruned, report = prune_checked(model, ratio=0.5)
    assert not any("Shape" in r for r in report.frozen_reasons)
    weights = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert weights["w1"].shape == (6, 4) and weights["w2"].shape == (4, 4)


# ---- shape arithmetic: targets computed from Shape() (issue 11, item 7) ---------------------------------------------
def _batch(g, t):
    """[N] of t, as exporters compute it: Unsqueeze(Gather(Shape(t), 0))."""
    n = g.add("Gather", [g.add("Shape", [t]), g.ints(0)], axis=0)
    return g.add("Unsqueeze", [n, g.ints([0])])


def _flatten_then_linear(g, target):
    """cv1 (8 channels, dynamic batch) -> Reshape to [N, 8, 16] by `target(y1)` -> [N, 16, 8] -> MatMul 8->5."""
    y1 = g.add("Relu", [g.conv("x", 3, 8, "cv1", k=3)])
    r = g.add("Reshape", [y1, target(y1)], name="flat")
    t = g.add("Transpose", [r], perm=[0, 2, 1])
    return g.matmul(t, 8, 5, "fc")


def test_reshape_target_literal_next_to_a_computed_length_is_rewritten():
    """paddle2onnx: Reshape [1, 8, H, 4] -> Concat([8], Unsqueeze(Gather(Shape(y), 2)), [4]) with H dynamic. The
    computed piece has a known length, so the literal 8 next to it is rewritten inside its Concat piece (this
    already worked before item 7: a regression test for the shape_entries rewrite)."""
    g = G(13)
    y1 = g.add("Relu", [g.conv("x", 3, 8, "cv1", k=3)])
    h = g.add("Unsqueeze", [g.add("Gather", [g.add("Shape", [y1]), g.ints(2)], axis=0), g.ints([0])])
    r = g.add("Reshape", [y1, g.add("Concat", [g.ints([8]), h, g.ints([4])], axis=0)], name="flat")
    y = g.matmul(g.add("Transpose", [r], perm=[1, 2, 0]), 8, 5, "fc")     # [H, 4, 8] @ [8, 5]
    m = g.model([("x", [1, 3, "H", 4])], [(y, ["H", 4, 5])])
    assert group_sizes(m) == [(8, 8)]
    assert not any("computed at run time" in r for r in frozen_reasons(m)), frozen_reasons(m)
    p, _ = prune_checked(m)
    assert wshape(p, "cv1.w") == (4, 3, 3, 3) and wshape(p, "fc.w") == (4, 5)
    cat = next(n for n in p.graph.node if n.op_type == "Concat")
    assert inits(p)[cat.input[0]].tolist() == [4]                      # the literal piece follows the width


def test_reshape_target_copying_the_channel_dim_follows_it():
    """paddle2onnx flatten: Concat(Slice(Shape(y), 0, 2), [-1]) copies y's channel dim into the target. After
    pruning Shape(y)[1] reads the new width, exactly the size of the output axis it is coupled with one to one,
    so neither the Shape nor the Reshape freezes the channels any more."""
    g = G(13)

    def target(y1):
        head = g.add("Slice", [g.add("Shape", [y1]), g.ints([0]), g.ints([2])])
        return g.add("Concat", [head, g.ints([-1])], axis=0)
    y = _flatten_then_linear(g, target)
    m = g.model([("x", ["N", 3, 4, 4])], [(y, ["N", 16, 5])])
    assert group_sizes(m) == [(8, 8)]
    assert frozen_reasons(m) == [] or not any("Shape" in r or "run time" in r for r in frozen_reasons(m))
    p, _ = prune_checked(m)
    assert wshape(p, "cv1.w") == (4, 3, 3, 3) and wshape(p, "fc.w") == (4, 5)
    assert any(n.op_type == "Shape" for n in p.graph.node)             # still computed at run time


def test_reshape_target_c_over_heads_from_a_static_channel_dim_prunes():
    """paddle2onnx heads split: [N, 2, Shape(y)[1] // 2, -1]. The channel dim is static, so canonicalisation
    folds Shape(y)[1] // 2 to the literal 4 (only the batch stays computed); the literals 2 and 4 are rewritten
    to the surviving factorisation, so the channels prune (a regression test: the fold already did this)."""
    g = G(13)

    def target(y1):
        c = g.add("Gather", [g.add("Shape", [y1]), g.ints([1])], axis=0)
        half = g.add("Div", [c, g.ints([2])])
        return g.add("Concat", [_batch(g, y1), g.ints([2]), half, g.ints([-1])], axis=0)
    y1 = g.add("Relu", [g.conv("x", 3, 8, "cv1", k=3)])
    r = g.add("Reshape", [y1, target(y1)], name="split")             # [N, 2, 4, 16]
    y = g.conv(g.add("Relu", [r]), 2, 5, "cv2")
    m = g.model([("x", ["N", 3, 4, 4])], [(y, ["N", 5, 4, 16])])
    assert group_sizes(m) == [(2, 8)]                                 # whole 4-channel blocks (the conv sees 2)
    assert not any("Shape op" in r or "run time" in r for r in frozen_reasons(m)), frozen_reasons(m)
    p, _ = prune_checked(m)
    assert wshape(p, "cv1.w") == (4, 3, 3, 3) and wshape(p, "cv2.w") == (5, 1, 1, 1)


def test_constant_of_shape_zero_state_width_prunes():
    """Unrolled RNN zero state: s = ConstantOfShape(Concat(Gather(Shape(x), [0]), [16])) feeds s @ Wh. The
    literal 16 used to freeze the recurrent width; it is now rewritten with it."""
    g = G(13)
    n = g.add("Gather", [g.add("Shape", ["x"]), g.ints([0])], axis=0)
    s = g.add("ConstantOfShape", [g.add("Concat", [n, g.ints([16])], axis=0)], name="zero",
              value=numpy_helper.from_array(np.array([0.5], np.float32)))
    h = g.add("Tanh", [g.add("Add", [g.matmul("x", 6, 16, "wx"), g.matmul(s, 16, 16, "wh")])])
    y = g.matmul(h, 16, 4, "out")
    m = g.model([("x", ["N", 6])], [(y, ["N", 4])])
    assert (16, 16) in group_sizes(m) and len(group_sizes(m)) == 2   # the state width and the hidden width
    assert not any("ConstantOfShape" in r for r in frozen_reasons(m)), frozen_reasons(m)
    p, _ = prune_checked(m)
    assert wshape(p, "wh.w") == (8, 8) and wshape(p, "out.w") == (8, 4)
    cat = next(n for n in p.graph.node if n.op_type == "Concat")
    assert inits(p)[cat.input[1]].tolist() == [8]


def test_expand_target_literal_next_to_a_computed_length_is_rewritten():
    """tf2onnx: a learned [1, 1, 8] token expanded to Concat([1], Shape(x)[1:2], [8]) (T dynamic) and added to
    the features: the literal 8 is rewritten, so the 8 channels prune (already worked: regression test)."""
    g = G(13)
    h = g.add("Relu", [g.matmul("x", 6, 8, "fc1")])                  # [1, T, 8]
    t = g.add("Slice", [g.add("Shape", ["x"]), g.ints([1]), g.ints([2])])
    tok = g.add("Expand", [g.w(1, 1, 8, name="tok"), g.add("Concat", [g.ints([1]), t, g.ints([8])], axis=0)],
                name="expand")
    y = g.matmul(g.add("Add", [h, tok]), 8, 4, "fc2")
    m = g.model([("x", [1, "T", 6])], [(y, [1, "T", 4])])
    assert group_sizes(m) == [(8, 8)]
    assert not any("computed at run time" in r for r in frozen_reasons(m)), frozen_reasons(m)
    p, _ = prune_checked(m)
    assert wshape(p, "fc1.w") == (6, 4) and wshape(p, "tok") == (1, 1, 4)


def test_slice_with_bounds_computed_from_the_sequence_length_keeps_channels_free():
    """T5 relative bias: Slice(h, 0, Shape(h)[1] - 1, axes=[1]) cuts the sequence axis at run time. It used to
    freeze every axis of h; now only the sliced (sequence) axis is frozen and the channels prune."""
    g = G(13)
    h = g.add("Relu", [g.matmul("x", 6, 8, "fc1")])                  # [1, T, 8]
    t = g.add("Gather", [g.add("Shape", [h]), g.ints([1])], axis=0)
    end = g.add("Sub", [t, g.ints([1])])
    s = g.add("Slice", [h, g.ints([0]), end, g.ints([1])], name="cut")
    y = g.matmul(s, 8, 4, "fc2")
    m = g.model([("x", [1, "T", 6])], [(y, [1, "T'", 4])])
    assert group_sizes(m) == [(8, 8)]
    p, _ = prune_checked(m)
    assert wshape(p, "fc1.w") == (6, 4) and wshape(p, "fc2.w") == (4, 4)


def test_tile_with_a_computed_repeat_keeps_channels_free():
    """A learned [1, 1, 8] token tiled T times along the sequence, repeats Concat([1], Shape(x)[1:2], [1]): the
    computed repeat used to freeze every axis; now only the sequence axis is, and the channel repeat (a literal
    1, unchanged by pruning) lets the 8 channels prune."""
    g = G(13)
    h = g.add("Relu", [g.matmul("x", 6, 8, "fc1")])                  # [1, T, 8]
    t = g.add("Slice", [g.add("Shape", ["x"]), g.ints([1]), g.ints([2])])
    tok = g.add("Tile", [g.w(1, 1, 8, name="tok"), g.add("Concat", [g.ints([1]), t, g.ints([1])], axis=0)],
                name="tile")
    y = g.matmul(g.add("Add", [h, tok]), 8, 4, "fc2")
    m = g.model([("x", [1, "T", 6])], [(y, [1, "T", 4])])
    assert group_sizes(m) == [(8, 8)]
    assert not any("not constant" in r for r in frozen_reasons(m)), frozen_reasons(m)   # only the T axis is
    p, _ = prune_checked(m)
    assert wshape(p, "fc1.w") == (6, 4) and wshape(p, "tok") == (1, 1, 4)


def test_constant_of_shape_copying_the_channel_dim_follows_it():
    """A constant like y: ConstantOfShape(Concat(Shape(y)[0:2], [4, 4])) with a dynamic batch. Shape(y)[1] used to
    freeze y's channels; now the created tensor's axis 1 is coupled with y's, so the size it reads after
    pruning is exactly the width it must have to be added to y."""
    g = G(13)
    y1 = g.add("Relu", [g.conv("x", 3, 8, "cv1", k=3)])
    head = g.add("Slice", [g.add("Shape", [y1]), g.ints([0]), g.ints([2])])
    z = g.add("ConstantOfShape", [g.add("Concat", [head, g.ints([4, 4])], axis=0)], name="like",
              value=numpy_helper.from_array(np.array([0.5], np.float32)))
    y = g.conv(g.add("Add", [y1, z]), 8, 5, "cv2")
    m = g.model([("x", ["N", 3, 4, 4])], [(y, ["N", 5, 4, 4])])
    assert group_sizes(m) == [(8, 8)]
    assert not any("Shape op" in r for r in frozen_reasons(m)), frozen_reasons(m)
    p, _ = prune_checked(m)
    assert wshape(p, "cv1.w") == (4, 3, 3, 3) and wshape(p, "cv2.w") == (5, 4, 1, 1)


def test_reshape_shape_tensor_shared_by_two_groups_is_rewritten_per_reader():
    """The dynamo exporter computes one Concat(Shape(x)[:2], [C]) and hands it to the Reshape of every layer.
    When the layers lose different counts, each Reshape must get its own target (GPT-2 dynamo under a global
    allocation: 'cannot reshape {32,380} to {1,32,368}')."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((8, 12)).astype(np.float32),
             "w2": rng.standard_normal((8, 12)).astype(np.float32),
             "v1": rng.standard_normal((12, 8)).astype(np.float32),
             "v2": rng.standard_normal((12, 8)).astype(np.float32),
             "c": np.array([12], dtype=np.int64), "s": np.array([0], dtype=np.int64),
             "e": np.array([2], dtype=np.int64)}
    nodes = [helper.make_node("Shape", ["x"], ["sh"], name="shape"),
             helper.make_node("Slice", ["sh", "s", "e"], ["lead"], name="lead"),
             helper.make_node("Concat", ["lead", "c"], ["target"], axis=0, name="target"),
             helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["x", "w2"], ["b"], name="mm2"),
             helper.make_node("Reshape", ["a", "target"], ["ra"], name="reshape_a"),
             helper.make_node("Reshape", ["b", "target"], ["rb"], name="reshape_b"),
             helper.make_node("MatMul", ["ra", "v1"], ["ya"], name="out1"),
             helper.make_node("MatMul", ["rb", "v2"], ["yb"], name="out2"),
             helper.make_node("Add", ["ya", "yb"], ["y"], name="sum")]
    # dynamic batch and sequence, so Shape(x) cannot fold and the target stays a computed, shared tensor
    model = make_model(nodes, [("x", ["batch", "seq", 8])], [("y", ["batch", "seq", 8])], inits)
    pruned, report = graphprune.prune(model, ratio=0.5, importance="l1", exclude=("mm2",), verify_samples=2)
    widths = sorted(kept for _g, _c, kept in report.kept_widths)
    assert widths == [6], widths            # only the first layer's group pruned, the excluded one stays 12
    assert report.verification["max_rel_diff"] < 1e-5
