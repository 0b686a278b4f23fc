"""Importance criteria: hand-computable scores, every criterion end to end on MNIST."""

import numpy as np
import onnx
import pytest
from onnx import helper

import graphprune
from graphprune.passes.importance import CRITERIA, get_criterion
from graphprune.passes.importance.weights_only import lamp_scores

from helpers import MNIST, conv_bn_model, make_model, rand


def scores_of(model, name, **kw):
    analysis = graphprune.analyze_model(model)
    crit = get_criterion(name, **kw)
    (group,) = analysis.groups
    return crit.scores(group, analysis), group


def test_bn_scale_is_abs_gamma():
    gamma = np.array([0.5, -2.0, 1.0, -0.1, 3.0, 0.2, -0.7, 1.5], np.float32)
    s, group = scores_of(conv_bn_model(gamma), "bn-scale")
    order = [int(u.elements[group.main][0]) for u in group.units]
    np.testing.assert_allclose(s, np.abs(gamma)[order], rtol=1e-6)


def test_bn_scale_without_norm_falls_back_visibly():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])]
    model = make_model(nodes, [("x", [2, 8])], [("y", [2, 3])], {"w1": rand(8, 6), "w2": rand(6, 3)})
    analysis = graphprune.analyze_model(model)
    crit = get_criterion("bn-scale")
    crit.scores(analysis.groups[0], analysis)
    assert crit.notes and "no norm scale" in crit.notes[0]


def test_lamp_scores_invariant_to_layer_rescaling():
    w = rand(16, 8, seed=7)
    np.testing.assert_allclose(lamp_scores(w), lamp_scores(37.5 * w), rtol=1e-5)
    assert np.isclose(lamp_scores(w).max(), 1.0)
    model_a = conv_bn_model(np.ones(8))
    model_b = onnx.ModelProto()
    model_b.CopyFrom(model_a)
    for t in model_b.graph.initializer:
        if t.name == "w2":
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * 100, "w2"))
    sa, _ = scores_of(model_a, "lamp")
    sb, _ = scores_of(model_b, "lamp")
    np.testing.assert_allclose(sa, sb, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_every_criterion_prunes_mnist_to_target_and_verifies(name):
    model = str(MNIST)
    pruned, report = graphprune.prune(model, importance=name, target_macs=0.5, verify=True, verify_samples=1)
    assert abs(report.macs_after / report.macs_before - 0.5) <= 0.01 * 0.5
    onnx.checker.check_model(pruned, full_check=True)


def test_attention_query_key_dims_are_scored_by_their_share_of_the_product():
    # Q·Kᵀ contracts two activations: no weight reads those channels, yet data-aware criteria must score them
    d, h = 8, 6
    wq, wk = rand(d, h, seed=1), rand(d, h, seed=2)
    wq[:, 2] *= 20  # channel 2 dominates the product q_c·k_c
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["x", "wk"], ["k"]),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "x"], ["y"])]
    model = make_model(nodes, [("x", [1, 4, d])], [("y", [1, 4, d])], {"wq": wq, "wk": wk})
    for name in ("obspa", "hessian", "activation", "fluctuation"):
        analysis = graphprune.analyze_model(model)
        crit = get_criterion(name)
        from graphprune.calibration import collect
        from graphprune.feeds import synthetic_feeds
        crit.stats = collect(analysis.graph, crit.wanted(analysis), synthetic_feeds(analysis.graph, 16))
        qk = next(g for g in analysis.groups if ("q", 2) in g.members)
        scores = crit.scores(qk, analysis)
        assert not crit.notes, crit.notes
        assert int(np.argmax(scores)) == 2
    pruned, report = graphprune.prune(model, importance="obspa", ratio=0.5, verify=True, verify_samples=1)
    assert not any("scored with l1" in d for d in report.diagnostics)
