"""Compensation of removed channels (OBS, least squares, bias): updates and their verification."""

import numpy as np
import onnx
import pytest
from onnx import helper

import graphprune
from graphprune.calibration import ChannelStats
from graphprune.ir import Graph

from helpers import MNIST, conv_bn_model, make_model


def test_obs_update_beats_plain_removal_on_correlated_data():
    from graphprune.passes.compensate import obs_updates
    rng = np.random.default_rng(0)
    n, c, o = 2000, 12, 5
    base = rng.standard_normal((n, 4))
    x = base @ rng.standard_normal((4, c)) + 0.1 * rng.standard_normal((n, c))  # correlated channels
    w = rng.standard_normal((c, o))
    nodes = [helper.make_node("MatMul", ["inp", "w0"], ["x"]), helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = make_model(nodes, [("inp", [1, c])], [("y", [1, o])],
                       {"w0": np.eye(c, dtype=np.float32), "w": w.astype(np.float32)})
    analysis = graphprune.analyze_model(model)
    st = ChannelStats(want_gram=True)
    st.add(x, 1)

    class Stats:
        def get(self, name, axis):
            return st if (name, axis) == ("x", 1) else None

    removed_idx = np.array([1, 4, 7, 9])
    updates, _ = obs_updates(analysis, {("x", 1): removed_idx}, Stats())
    keep = np.setdiff1d(np.arange(c), removed_idx)
    target = x @ w
    plain = np.linalg.norm(target - x[:, keep] @ w[keep])
    refit = np.linalg.norm(target - x[:, keep] @ updates["w"][keep].astype(np.float64))
    assert refit < 0.5 * plain


@pytest.mark.slow
@pytest.mark.parametrize("compensate", ["obs", "bias"])
def test_compensation_is_verified_against_reference_with_same_updates(tmp_path, compensate):
    feeds = {"input": np.random.default_rng(0).standard_normal((48, 1, 28, 28)).astype(np.float32)}
    np.savez(tmp_path / "c.npz", **feeds)
    pruned, report = graphprune.prune(str(MNIST), ratio=0.5, importance="l2", calib=tmp_path / "c.npz",
                                      compensate=compensate, verify=True, verify_samples=1)
    assert report.compensated >= 3 and report.verification["max_rel_diff"] < 1e-4
    assert report.fidelity["samples"] > 0


@pytest.mark.slow
def test_obspa_data_free_uses_synthetic_proxy_and_compensates():
    pruned, report = graphprune.prune(str(MNIST), importance="obspa", target_macs=0.5, verify=True)
    assert "synthetic proxy" in report.calibration and report.compensated >= 3


def test_obs_with_intercept_moves_the_removed_mean_into_the_bias():
    from graphprune.passes.compensate import obs_updates
    rng = np.random.default_rng(0)
    n, c, o = 3000, 10, 4
    x = rng.standard_normal((n, c))
    w = rng.standard_normal((c, o))
    nodes = [helper.make_node("MatMul", ["inp", "w0"], ["x"]), helper.make_node("Gemm", ["x", "w", "b"], ["y"])]
    model = make_model(nodes, [("inp", [1, c])], [("y", [1, o])],
                       {"w0": np.eye(c, dtype=np.float32), "w": w.astype(np.float32),
                        "b": np.zeros(o, np.float32)})
    analysis = graphprune.analyze_model(model)
    st = ChannelStats(want_gram=True)
    st.add(x, 1)

    class Stats:
        def get(self, name, axis):
            return st if (name, axis) == ("x", 1) else None

    removed_idx = np.array([0, 3, 5])
    x[:, removed_idx] += 4.0  # the removed channels carry a large mean no kept channel can stand in for
    st = ChannelStats(want_gram=True)
    st.add(x, 1)
    keep = np.setdiff1d(np.arange(c), removed_idx)
    updates, _ = obs_updates(analysis, {("x", 1): removed_idx}, Stats())
    assert "b" in updates and np.abs(updates["b"]).max() > 0.1
    target = x @ w
    with_bias = np.linalg.norm(target - (x[:, keep] @ updates["w"][keep].astype(np.float64) + updates["b"]))
    # the same refit without an intercept (H not augmented): what obs did before biases were used
    h_inv = st.hessian_inv()
    delta = -h_inv[:, removed_idx] @ np.linalg.solve(h_inv[np.ix_(removed_idx, removed_idx)], w[removed_idx])
    no_bias = np.linalg.norm(target - x[:, keep] @ (w + delta)[keep])
    assert with_bias < 0.5 * no_bias


def test_ensure_biases_adds_zero_biases_that_change_nothing():
    from graphprune.passes.compensate import ensure_biases
    from graphprune.runtime import session
    model = conv_bn_model(np.linspace(0.5, 2.0, 8).astype(np.float32))
    graph = Graph(onnx.ModelProto.FromString(model.SerializeToString()))  # Graph edits the nodes it is given
    assert ensure_biases(graph) == 2
    convs = [n for n in graph.nodes if n.op_type == "Conv"]
    assert all(len(n.input) == 3 and not graph.initializers[n.input[2]].any() for n in convs)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    a = session(model).run(None, {"x": x})[0]
    b = session(graph.to_model()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(a, b)
