"""Einsum: attention-style and linear-layer equations prune and verify; diagonals freeze."""
from onnx import helper

import graphprune

from helpers import group_sizes, make_model, prune_checked, rand


def test_einsum_linear_layers():
    nodes = [
        helper.make_node("Einsum", ["x", "w1"], ["h"], equation="bsi,oi->bso"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Einsum", ["r", "w2"], ["y"], equation="bso,po->bsp"),
    ]
    model = make_model(nodes, [("x", [2, 5, 8])], [("y", [2, 5, 6])], {"w1": rand(16, 8), "w2": rand(6, 16)},
                       opset=13)
    pruned, report = prune_checked(model)
    w1 = {t.name: t for t in pruned.graph.initializer}["w1"]
    assert list(w1.dims) == [8, 8]
    assert (16, 16) in group_sizes(model)


def test_einsum_attention_scores_over_heads():
    # q, k: [b, h, s, d] made by a MatMul so the head dim is prunable through Reshape
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q2"]),
        helper.make_node("MatMul", ["x", "wk"], ["k2"]),
        helper.make_node("Einsum", ["q2", "k2"], ["s"], equation="bsc,btc->bst"),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "x"], ["y"]),
    ]
    model = make_model(nodes, [("x", [1, 4, 8])], [("y", [1, 4, 8])], {"wq": rand(8, 12), "wk": rand(8, 12)},
                       opset=13)
    pruned, report = prune_checked(model)
    shapes = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert shapes["wq"] == [8, 6] and shapes["wk"] == [8, 6]


def test_einsum_diagonal_is_frozen():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Einsum", ["h"], ["d"], equation="ii->i"),
        helper.make_node("MatMul", ["d", "w2"], ["y"]),
    ]
    model = make_model(nodes, [("x", [6, 6])], [("y", [4])], {"w": rand(6, 6), "w2": rand(6, 4)}, opset=13)
    analysis = graphprune.analyze_model(model)
    reasons = {member: g.reason for g in analysis.frozen_groups for member in g.members}
    # both channel axes around the diagonal are frozen by the Einsum, not by anything else
    assert "repeated letters" in reasons[("w", 1)]
    assert "repeated letters" in reasons[("w2", 0)]
    assert analysis.groups == []
    pruned, _ = prune_checked(model, expect_smaller=False)
    assert {t.name: list(t.dims) for t in pruned.graph.initializer} == {"w": [6, 6], "w2": [6, 4]}
