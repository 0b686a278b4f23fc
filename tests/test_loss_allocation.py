"""scope 'loss': greedy OBS loss curves (exact prefix losses) and the allocation that reads them."""

import numpy as np
from onnx import helper

import graphprune
from graphprune.passes.loss_allocation import _Consumer, allocation_scores

from helpers import make_model


def _structured_obs_loss(rows, h_inv, idx):
    """tr(W_Sᵀ [(H⁻¹)_SS]⁻¹ W_S) from the original matrices, the definition the greedy walk must reproduce."""
    return float(np.sum(rows[idx] * np.linalg.solve(h_inv[np.ix_(idx, idx)], rows[idx])))


def test_sequential_block_removal_adds_up_to_the_joint_obs_loss():
    rng = np.random.default_rng(0)
    c, o, n = 10, 6, 400
    x = rng.standard_normal((n, 4)) @ rng.standard_normal((4, c)) + 0.3 * rng.standard_normal((n, c))
    h = x.T @ x / n + 0.05 * np.eye(c)
    h_inv = np.linalg.inv(h)
    rows = rng.standard_normal((c, o))
    cons = _Consumer(rows, h_inv, energy=1.0, unit_idx=[np.array([k]) for k in range(c)])
    removed, total = [], 0.0
    for block in ([3], [0, 7], [5], [1, 2, 9]):
        total += cons.remove(np.array(block))
        removed += block
        assert np.isclose(total, _structured_obs_loss(rows, h_inv, np.array(removed)), rtol=1e-8)
    # the removed inputs are gone from the refit weights and the remaining inverse Hessian
    assert np.allclose(cons.rows[removed], 0) and np.allclose(cons.h_inv[removed], 0)


def _two_group_model():
    """x(8) -> MatMul a (8->16) -> Relu -> MatMul b (16->16) -> Relu -> MatMul c (16->32). Only 4 of a's 16
    outputs matter downstream (b reads the other 12 with weights 100x smaller); all of b's outputs matter. A unit
    of b holds more parameters (16 + 32) than one of a (8 + 16): by size alone b would go first."""
    rng = np.random.default_rng(1)
    wa = rng.standard_normal((8, 16)).astype(np.float32)
    wb = rng.standard_normal((16, 16)).astype(np.float32) / 4
    wb[4:] *= 0.01
    wc = rng.standard_normal((16, 32)).astype(np.float32) / 4
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"]), helper.make_node("Relu", ["a"], ["ra"]),
             helper.make_node("MatMul", ["ra", "wb"], ["b"]), helper.make_node("Relu", ["b"], ["rb"]),
             helper.make_node("MatMul", ["rb", "wc"], ["y"])]
    return make_model(nodes, [("x", ["n", 8])], [("y", ["n", 32])], {"wa": wa, "wb": wb, "wc": wc})


def _output_error(model, pruned, x):
    from graphprune.runtime import run
    dense = run(model, {"x": x})["y"]
    got = run(pruned, {"x": x})["y"]
    return float(np.linalg.norm(got - dense) / np.linalg.norm(dense))


def test_loss_scope_takes_the_channels_compensation_can_replace(tmp_path):
    model = _two_group_model()
    rng = np.random.default_rng(2)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((256, 8)).astype(np.float32))
    x = rng.standard_normal((64, 8)).astype(np.float32)
    results = {}
    for scope in ("loss", "uniform"):
        # params 896; a's 12 weak units hold 288 of them
        pruned, report = graphprune.prune(model, target_params=(896 - 288) / 896, calib=str(calib), scope=scope,
                                          compensate="obs")
        widths = {g: kept for g, _, kept in report.kept_widths}
        results[scope] = (widths, _output_error(model, pruned, x), report)
    widths, error, report = results["loss"]
    # the budget goes to a's weak units, b stays whole, and the output on held-out inputs stays close to dense,
    # unlike the same budget spent uniformly
    assert widths == {"MatMul_0": 4, "MatMul_2": 16}, widths
    assert error < 0.05 and results["uniform"][1] > 1.5 * error, (error, results["uniform"][1])
    assert report.loss_curves and all(len(v) == 6 for v in report.loss_curves.values())
    assert any(line.startswith("loss curves") and "skipped" not in line for line in report.stage_log)


def test_groups_without_curves_are_never_selected():
    class G:
        def __init__(self, gid, n):
            self.id, self.name, self.units, self.channels = gid, f"g{gid}", [object()] * n, n

    class A:
        groups = [G(0, 4), G(1, 3)]

    class Curve:
        order = np.array([2, 0, 1])
        marginal = np.array([0.0, 0.1, 0.3])

    scores, notes = allocation_scores(A, {0: None, 1: Curve}, {0: 5.0, 1: 2.0})
    assert np.all(np.isinf(scores[0])) and "kept whole" in notes[0]
    s = scores[1]
    assert np.isinf(s[~np.isin(np.arange(3), Curve.order)]).all()
    assert list(np.argsort(s[Curve.order])) == [0, 1, 2]      # the greedy order survives ties (0.0 and up)
    assert np.isclose(s[1], 0.15)                            # marginal 0.3 per 2 MACs saved


def test_curve_points_are_fractions_of_the_groups_units_not_of_the_curve():
    from graphprune.passes.loss_allocation import LossCurve
    # 10 units, the curve stops at 9 (max_ratio 0.9): removing half the group is the first 5 marginals
    curve = LossCurve(np.arange(9), np.arange(1.0, 10.0), consumers=1, units=10)
    assert curve.at(0.5) == 1 + 2 + 3 + 4 + 5
    assert curve.at(1.0) == sum(range(1, 10))          # beyond the curve's end: its end
    assert curve.at(0.0) == 0.0
