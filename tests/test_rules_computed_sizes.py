"""Computed sizes (ops/_shape_tensors.py, ops/shape.py, canonicalize): reshape targets and Range limits computed
at run time from a channel count, as exporters write them when batch and sequence are dynamic: heads = C /
head_dim, C = heads * head_dim (Div/Mul of Shape(x)[c] by a literal), Range(0, C, 1). A static channel count
read from Shape (also through tf2onnx's int32 Cast + Slice, and inside Loop bodies) folds to a literal,
Div/Mul/Range on it fold too, and the reshape rule rewrites the literal. A Range whose limit is a channel count
that does not fold freezes that count, naming the Range."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from test_rules_shape import G, inits, io_shapes, wshape

import graphprune

from helpers import prune_checked, rand

C, HEADS, HD = 16, 4, 4


def _dim_of(g, x, axis, tf=False):
    """Shape(x)[axis] as a 1-element tensor: Gather + Unsqueeze (torch exporters), or as tf2onnx writes
    tf.shape(x)[axis]: Cast to int32, Slice, Squeeze then Unsqueeze back (Pack)."""
    if not tf:
        return g.add("Unsqueeze", [g.add("Gather", [g.add("Shape", [x]), g.ints(axis)], axis=0), g.ints([0])])
    shape = g.add("Cast", [g.add("Shape", [x])], to=TensorProto.INT32)
    piece = g.add("Slice", [shape, g.ints([axis]), g.ints([axis + 1]), g.ints([0])])
    return g.add("Unsqueeze", [g.add("Squeeze", [piece, g.ints([0])]), g.ints([0])])


def heads_model(op: str, tf: bool = False):
    """q = x·Wq [B, S, C] -> Reshape to [B, S, HEADS, C / HEADS] (op 'Div': the head size computed as Div of
    Shape(q)[2] by HEADS) -> Relu -> Reshape to [B, S, HEADS * head size] (computed as Mul of Shape(h)[3] by
    HEADS) -> x·Wo. op 'Div' computes the split, 'Mul' the merge, 'both' both."""
    g = G(13)
    ints = (lambda v: g.const(np.asarray(v, np.int32))) if tf else g.ints

    def target(pieces, name):
        t = g.add("Concat", pieces, axis=0, name=name)
        return g.add("Cast", [t], to=TensorProto.INT64) if tf else t
    q = g.matmul("x", 8, C, "wq")
    b, s = _dim_of(g, q, 0, tf), _dim_of(g, q, 1, tf)
    if op in ("Div", "both"):
        hd = g.add("Div", [_dim_of(g, q, 2, tf), ints([HEADS])], name="hd")
        split_target = target([b, s, ints([HEADS]), hd], "split.tgt")
    else:
        split_target = target([b, s, ints([HEADS, HD])], "split.tgt")
    h = g.add("Relu", [g.add("Reshape", [q, split_target], name="split")])
    if op in ("Mul", "both"):
        width = g.add("Mul", [_dim_of(g, h, 3, tf), ints([HEADS])], name="width")
        merge_target = target([_dim_of(g, h, 0, tf), _dim_of(g, h, 1, tf), width], "merge.tgt")
    else:
        merge_target = target([_dim_of(g, h, 0, tf), _dim_of(g, h, 1, tf), ints([-1])], "merge.tgt")
    y = g.matmul(g.add("Reshape", [h, merge_target], name="merge"), C, 8, "wo")
    return g.model([("x", ["B", "S", 8])], [(y, ["B", "S", 8])])


def _literal_pieces(model, concat_name):
    """The constant pieces of the Concat `concat_name` (a reshape target), in order."""
    concat = next(n for n in model.graph.node if n.name == concat_name)
    values = inits(model)
    return [int(v) for piece in concat.input if piece in values for v in values[piece].reshape(-1)]


@pytest.mark.parametrize("tf", [False, True], ids=["gather", "tf2onnx"])
@pytest.mark.parametrize("op", ["Div", "Mul", "both"])
@pytest.mark.parametrize("whole_heads", [False, True], ids=["head_dim", "whole_heads"])
def test_div_mul_of_a_channel_count_by_a_literal(op, tf, whole_heads):
    """heads x head size computed from Shape(q)[2] / HEADS (or merged back as Shape(h)[3] * HEADS) with dynamic
    batch and sequence: the static channel count folds to a literal, Div/Mul fold with it, and the literal
    pieces of the target are rewritten to the new widths (head size or head count, whichever the pick
    removes)."""
    m = heads_model(op, tf)
    analysis = graphprune.analyze_model(m, whole_heads=whole_heads)
    assert [(len(g.units), g.channels) for g in analysis.groups] == [(HEADS if whole_heads else HD, C)], \
        [g.reason for g in analysis.frozen_groups]
    p, _ = prune_checked(m, input_dims={"B": 2, "S": 3}, whole_heads=whole_heads)
    kept = wshape(p, "wq.w")[1]
    assert kept < C and wshape(p, "wo.w")[0] == kept
    heads, size = (kept // HD, HD) if whole_heads else (HEADS, kept // HEADS)
    assert not [n.op_type for n in p.graph.node if n.op_type in ("Div", "Mul")]  # folded into the targets
    assert _literal_pieces(p, "split.tgt") == [heads, size]
    merge = _literal_pieces(p, "merge.tgt")
    assert merge == ([kept] if op in ("Mul", "both") else [-1])
    assert io_shapes(p) == io_shapes(m)


def test_range_over_a_channel_count_folds_and_prunes():
    """q * float(Range(0, C)) with C read tf2onnx-style from Shape(q): the range folds to per-channel constants,
    which lose the removed channels' entries like any per-channel operand."""
    g = G(13)
    q = g.matmul("x", 8, C, "wq")
    limit = g.add("Squeeze", [_dim_of(g, q, 1, tf=True), g.ints([0])])
    r = g.add("Range", [g.const(np.int32(0)), limit, g.const(np.int32(1))], name="range")
    scaled = g.add("Mul", [q, g.add("Cast", [r], to=TensorProto.FLOAT)])
    m = g.model([("x", ["B", 8])], [(g.matmul(scaled, C, 4, "wo"), ["B", 4])])
    assert [(len(gr.units), gr.channels) for gr in graphprune.analyze_model(m).groups] == [(C, C)]
    p, _ = prune_checked(m, input_dims={"B": 2})
    assert wshape(p, "wq.w")[1] == wshape(p, "wo.w")[0] < C


def range_in_body_model(read: str):
    """A Loop whose body adds sum(Range(0, width of h)) to its state h [N, C] before h·R. read 'static': N is
    static, so Shape(h) folds and the Range with it; 'dynamic': N is dynamic and the width is read through a
    Reshape of the shape (Gather(Reshape(Shape(h), [-1]), 1)), which nothing folds."""
    vi = helper.make_tensor_value_info
    mk = helper.make_node
    n = 2 if read == "static" else "N"
    width = [mk("Shape", ["h"], ["hs"], name="body_shape")]
    if read == "dynamic":
        width.append(mk("Reshape", ["hs", "flat"], ["hs_flat"], name="body_flat"))
    width.append(mk("Gather", ["hs" if read == "static" else "hs_flat", "one"], ["width"], axis=0,
                    name="body_width"))
    body = helper.make_graph(
        width + [mk("Range", ["zero", "width", "step"], ["idx"], name="body_range"),
                 mk("Cast", ["idx"], ["idx_f"], to=TensorProto.FLOAT, name="body_cast"),
                 mk("ReduceSum", ["idx_f"], ["total"], keepdims=0, name="body_sum"),
                 mk("Add", ["h", "total"], ["h_pos"], name="body_add"),
                 mk("MatMul", ["h_pos", "R"], ["h_mm"], name="body_mm"),
                 mk("Tanh", ["h_mm"], ["h_next"], name="body_tanh"),
                 mk("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "body", [vi("i", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, []),
                 vi("h", TensorProto.FLOAT, [n, C])],
        [vi("cond_out", TensorProto.BOOL, []), vi("h_next", TensorProto.FLOAT, [n, C])])
    g = G(13)
    g.inits.update({"one": np.array(1, np.int64), "zero": np.array(0, np.int64), "step": np.array(1, np.int64),
                    "flat": np.array([-1], np.int64), "M": np.array(3, np.int64), "cond": np.array(True),
                    "R": rand(C, C, seed=3)})
    h0 = g.matmul("x", 8, C, "w0")
    g.nodes.append(helper.make_node("Loop", ["M", "cond", h0], ["h_T"], body=body, name="loop"))
    return g.model([("x", [n, 8])], [(g.matmul("h_T", C, 4, "wo"), [n, 4])])


def test_range_over_a_static_channel_count_inside_a_loop_body_folds_and_prunes():
    m = range_in_body_model("static")
    assert [(len(gr.units), gr.channels) for gr in graphprune.analyze_model(m).groups] == [(C, C)]
    p, _ = prune_checked(m)
    assert wshape(p, "R")[0] == wshape(p, "w0.w")[1] < C


def test_range_over_a_channel_count_that_does_not_fold_freezes_it_naming_the_range():
    m = range_in_body_model("dynamic")
    analysis = graphprune.analyze_model(m)
    assert not analysis.groups
    reasons = [gr.reason for gr in analysis.frozen_groups]
    assert any("limit of Range node 'body_range'" in r for r in reasons), reasons
    prune_checked(m, expect_smaller=False, input_dims={"N": 2})


def test_reshape_target_computed_inside_a_loop_body_folds_and_prunes():
    """A body that splits its state into heads with a target computed from Shape(h) and Div (as tf2onnx writes
    tf.reshape(h, [tf.shape(h)[0], HEADS, tf.shape(h)[1] // HEADS])) and merges them back with Shape(h): the
    static reads fold inside the body like outside, and the literals are rewritten."""
    vi = helper.make_tensor_value_info
    mk = helper.make_node
    body = helper.make_graph(
        [mk("Shape", ["h"], ["hs"], name="b_shape"),
         mk("Gather", ["hs", "i0"], ["n"], axis=0, name="b_n"),
         mk("Gather", ["hs", "i1"], ["c"], axis=0, name="b_c"),
         mk("Div", ["c", "heads"], ["hd"], name="b_hd"),
         mk("Concat", ["n", "heads", "hd"], ["tgt"], axis=0, name="b_tgt"),
         mk("Reshape", ["h", "tgt"], ["h3"], name="b_split"),
         mk("Relu", ["h3"], ["r3"], name="b_relu"),
         mk("Reshape", ["r3", "hs"], ["r"], name="b_merge"),
         mk("MatMul", ["r", "R"], ["hm"], name="b_mm"),
         mk("Tanh", ["hm"], ["h_next"], name="b_tanh"),
         mk("Identity", ["cond_in"], ["cond_out"], name="b_cond")],
        "body", [vi("i", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, []),
                 vi("h", TensorProto.FLOAT, [2, C])],
        [vi("cond_out", TensorProto.BOOL, []), vi("h_next", TensorProto.FLOAT, [2, C])])
    g = G(13)
    g.inits.update({"i0": np.array([0], np.int64), "i1": np.array([1], np.int64),
                    "heads": np.array([HEADS], np.int64), "M": np.array(3, np.int64), "cond": np.array(True),
                    "R": rand(C, C, seed=3)})
    h0 = g.matmul("x", 8, C, "w0")
    g.nodes.append(helper.make_node("Loop", ["M", "cond", h0], ["h_T"], body=body, name="loop"))
    m = g.model([("x", [2, 8])], [(g.matmul("h_T", C, 4, "wo"), [2, 4])])
    analysis = graphprune.analyze_model(m)
    assert [(len(gr.units), gr.channels) for gr in analysis.groups] == [(HD, C)], \
        [gr.reason for gr in analysis.frozen_groups]
    p, _ = prune_checked(m)
    kept = wshape(p, "w0.w")[1]
    assert kept < C and wshape(p, "R") == (kept, kept) and wshape(p, "wo.w")[0] == kept
    loop = next(n for n in p.graph.node if n.op_type == "Loop")
    body = next(a.g for a in loop.attribute if a.name == "body")
    split = next(n for n in body.node if n.name == "b_split")
    assert inits(p)[split.input[1]].tolist() == [2, HEADS, kept // HEADS]
