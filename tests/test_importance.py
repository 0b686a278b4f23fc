"""Importance criteria, calibration, compensation and budget allocation on hand-computable cases."""
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import graphprune
from graphprune.calibration import CalibrationError, ChannelStats, load_feeds
from graphprune.ir import Graph
from graphprune.passes.importance import CRITERIA, get_criterion
from graphprune.passes.importance.weights_only import lamp_scores
from helpers import make_model, prune_checked, rand

MNIST = Path(__file__).resolve().parents[1] / "models" / "mnist_cnn.onnx"


def conv_bn_model(gamma):
    c = len(gamma)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["a", "g", "b", "m", "v"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])]
    inits = {"w1": rand(c, 3, 3, 3, seed=1), "g": np.asarray(gamma, np.float32), "b": rand(c, seed=2),
             "m": rand(c, seed=3), "v": rand(c, seed=4, positive=True), "w2": rand(4, c, 3, 3, seed=5)}
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])], inits)


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


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_every_criterion_prunes_mnist_to_target_and_verifies(name):
    model = str(MNIST)
    pruned, report = graphprune.prune(model, importance=name, target_macs=0.5, verify=True, verify_samples=1)
    assert abs(report.macs_after / report.macs_before - 0.5) <= 0.01 * 0.5
    onnx.checker.check_model(pruned, full_check=True)


@pytest.mark.parametrize("compensate", ["obs", "bias"])
def test_compensation_is_verified_against_reference_with_same_updates(tmp_path, compensate):
    feeds = {"input": np.random.default_rng(0).standard_normal((48, 1, 28, 28)).astype(np.float32)}
    np.savez(tmp_path / "c.npz", **feeds)
    pruned, report = graphprune.prune(str(MNIST), ratio=0.5, importance="l2", calib=tmp_path / "c.npz",
                                      compensate=compensate, verify=True, verify_samples=1)
    assert report.compensated >= 3 and report.verification["max_rel_diff"] < 1e-4
    assert report.fidelity["samples"] > 0


def test_obspa_data_free_uses_synthetic_proxy_and_compensates():
    pruned, report = graphprune.prune(str(MNIST), importance="obspa", target_macs=0.5, verify=True)
    assert "synthetic proxy" in report.calibration and report.compensated >= 3


def test_global_scope_prunes_layers_unevenly_and_meets_params_target():
    pruned, report = graphprune.prune(str(MNIST), importance="l2", scope="global", target_params=0.4,
                                      verify=True, verify_samples=1)
    assert abs(report.params_after / report.params_before - 0.4) <= 0.01 * 0.4
    kept = [after / before for _, before, after in report.kept_widths]
    assert max(kept) - min(kept) > 0.05


def test_calibration_loading_errors_and_folder(tmp_path):
    graph = Graph(onnx.load(str(MNIST)))
    np.savez(tmp_path / "bad.npz", wrong=np.zeros((4, 1, 28, 28), np.float32))
    with pytest.raises(CalibrationError, match="no array for model input"):
        load_feeds(tmp_path / "bad.npz", graph)
    folder = tmp_path / "arrays"
    folder.mkdir()
    for k in range(5):
        np.save(folder / f"{k}.npy", np.full((1, 28, 28), k, np.float32))
    feeds = load_feeds(folder, graph, samples=3)
    assert feeds["input"].shape == (3, 1, 28, 28) and feeds["input"].dtype == np.float32


def test_cli_target_macs_obspa_calib(tmp_path):
    from click.testing import CliRunner
    from graphprune.cli import main
    np.savez(tmp_path / "feeds.npz", input=np.random.default_rng(1).standard_normal((40, 1, 28, 28)).astype(np.float32))
    out = tmp_path / "p.onnx"
    result = CliRunner().invoke(main, [str(MNIST), "--target-macs", "0.5", "--importance", "obspa", "--calib",
                                       str(tmp_path / "feeds.npz"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "held-out calibration samples" in result.output and "compensated" in result.output


def test_bn_recalibration_sets_statistics_of_the_pruned_activations(tmp_path):
    model = conv_bn_model(np.linspace(0.5, 2.0, 8).astype(np.float32))
    x = np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    pruned, report = graphprune.prune(model, ratio=0.5, calib=tmp_path / "c.npz", bn_recalibrate=True,
                                      verify=True, verify_samples=1, holdout=10, calib_samples=30)
    if report.bn_recalibrated == 0:  # kept only when the held-out check improves: then the note says why
        assert any("left as they were" in d for d in report.diagnostics)
        pruned, report = graphprune.prune(model, ratio=0.5, calib=tmp_path / "c.npz", bn_recalibrate=True,
                                          verify=True, verify_samples=1, holdout=0, calib_samples=30)
    assert report.bn_recalibrated == 1 and report.verification is not None
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    # the new running mean is the mean of the pruned conv output over the calibration (not held-out) samples
    from graphprune.verify import session
    conv_only = onnx.helper.make_model(onnx.helper.make_graph(
        [n for n in pruned.graph.node if n.op_type == "Conv"][:1], "c", [pruned.graph.input[0]],
        [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, None)],
        [t for t in pruned.graph.initializer if t.name == "w1"]), opset_imports=pruned.opset_import)
    conv_only.ir_version = 8
    sess = session(conv_only)
    a = np.concatenate([sess.run(None, {"x": x[k:k + 1]})[0] for k in range(30)])  # 40 - 10 held out
    np.testing.assert_allclose(inits["m"], a.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    with pytest.raises(graphprune.GraphpruneError, match="needs calibration"):
        graphprune.prune(model, ratio=0.5, bn_recalibrate=True)


def test_bn_recalibration_is_reverted_when_it_hurts_held_out_agreement(tmp_path):
    # nothing pruned, running statistics unlike the calibration data: re-estimation can only move the
    # model away from itself, so the held-out check must reject it and leave the weights untouched
    model = conv_bn_model(np.linspace(0.5, 2.0, 8).astype(np.float32))
    x = (3 + 5 * np.random.default_rng(0).standard_normal((40, 3, 8, 8))).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    pruned, report = graphprune.prune(model, ratio=0.0, calib=tmp_path / "c.npz", bn_recalibrate=True,
                                      holdout=10, calib_samples=30)
    assert report.bn_recalibrated == 0
    assert any("left as they were" in d for d in report.diagnostics)
    before = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    np.testing.assert_array_equal(before["m"], after["m"])
    assert report.fidelity["outputs"]["y"]["rel_error"] < 1e-6


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
    from graphprune.verify import session
    model = conv_bn_model(np.linspace(0.5, 2.0, 8).astype(np.float32))
    graph = Graph(onnx.ModelProto.FromString(model.SerializeToString()))  # Graph edits the nodes it is given
    assert ensure_biases(graph) == 2
    convs = [n for n in graph.nodes if n.op_type == "Conv"]
    assert all(len(n.input) == 3 and not graph.initializers[n.input[2]].any() for n in convs)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    a = session(model).run(None, {"x": x})[0]
    b = session(graph.to_model()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(a, b)


def test_sensitivity_curve_interpolation_is_hand_computable():
    from graphprune.passes.sensitivity import SensitivityAllocation, ratio_under
    levels = (0.1, 0.2, 0.5)
    curve = np.array([0.01, 0.03, 0.2])
    assert ratio_under(curve, 0.0, levels) == 0.0
    assert ratio_under(curve, 0.005, levels) == pytest.approx(0.05)
    assert ratio_under(curve, 0.02, levels) == pytest.approx(0.15)
    assert ratio_under(curve, 0.2, levels) == pytest.approx(0.5)
    alloc = SensitivityAllocation({0: curve, 1: curve * 10}, levels)
    ratios = alloc.ratios(0.5)
    assert ratios[0] > ratios[1]  # the more sensitive group keeps more
    assert alloc.ratios(0.0) == {0: 0.0, 1: 0.0}


def test_masked_model_measures_zero_error_unpruned_and_growing_error_pruned():
    from graphprune.passes.importance import get_criterion
    from graphprune.passes.sensitivity import MaskedModel, measure, relative_error
    analysis = graphprune.analyze_model(str(MNIST))
    feeds = {"input": np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)}
    masked = MaskedModel(analysis)
    from graphprune.verify import session
    dense = session(onnx.load(str(MNIST))).run(None, feeds)
    assert relative_error(masked.run(feeds), dense) < 1e-10
    crit = get_criterion("l2")
    scores = {g.id: crit.scores(g, analysis) for g in analysis.groups}
    curves = measure(analysis, scores, feeds, levels=(0.25, 0.5, 0.9))
    for curve in curves.values():
        assert curve[-1] > 0 and np.all(np.diff(curve) >= 0)
    assert max(c[0] for c in curves.values()) > 0


def test_sensitivity_scope_meets_macs_target_and_verifies():
    pruned, report = graphprune.prune(str(MNIST), importance="l2", scope="sensitivity", target_macs=0.5,
                                      sensitivity_samples=8, verify=True, verify_samples=1)
    assert abs(report.macs_ratio - 0.5) <= 0.01 * 0.5
    assert report.sensitivity and report.verification["max_rel_diff"] < 1e-4
    with pytest.raises(graphprune.GraphpruneError, match="target"):
        graphprune.prune(str(MNIST), scope="sensitivity", ratio=0.3)


def test_clipped_normal_moments_match_sampling():
    from graphprune.bn_proxy import clipped_normal_moments
    m, s = np.array([0.5, -1.0, 2.0]), np.array([1.0, 2.0, 0.5])
    z = m[:, None] + s[:, None] * np.random.default_rng(0).standard_normal((3, 400_000))
    for lo, hi in ((0.0, np.inf), (0.0, 6.0), (-np.inf, np.inf), (-1.0, 1.0)):
        first, second = clipped_normal_moments(m, s, lo, hi)
        c = np.clip(z, lo, hi)
        np.testing.assert_allclose(first, c.mean(1), atol=0.01)
        np.testing.assert_allclose(second, (c ** 2).mean(1), rtol=0.01, atol=0.01)


def test_data_free_proxy_uses_batchnorm_closed_form_where_a_norm_feeds_the_consumer():
    from graphprune.bn_proxy import bn_moments
    model = conv_bn_model(np.linspace(0.5, 2.0, 8).astype(np.float32))
    analysis = graphprune.analyze_model(model)
    mean, second = bn_moments(analysis.graph, "r")  # Relu(BN): rectified N(beta, gamma^2)
    beta = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b"))
    assert np.all(mean >= np.maximum(beta, 0) - 1e-9) and np.all(second >= mean ** 2)
    _, report = graphprune.prune(model, importance="obspa", ratio=0.5, verify=True, verify_samples=1)
    assert report.calibration.startswith("BatchNorm closed form for 1 consumer")
    _, synthetic = graphprune.prune(model, importance="obspa", ratio=0.5, proxy="synthetic", verify=False)
    assert synthetic.calibration.startswith("synthetic proxy")
    with pytest.raises(graphprune.GraphpruneError, match="proxy"):
        graphprune.prune(model, proxy="nonsense")


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
        from graphprune.calibration import collect, synthetic_feeds
        crit.stats = collect(analysis.graph, crit.wanted(analysis), synthetic_feeds(analysis.graph, 16))
        qk = next(g for g in analysis.groups if ("q", 2) in g.members)
        scores = crit.scores(qk, analysis)
        assert not crit.notes, crit.notes
        assert int(np.argmax(scores)) == 2
    pruned, report = graphprune.prune(model, importance="obspa", ratio=0.5, verify=True, verify_samples=1)
    assert not any("scored with l1" in d for d in report.diagnostics)


def test_hessian_inverse_follows_new_samples_and_damping():
    """The cached H⁻¹ is per damping, and statistics that grow never answer with the inverse of fewer samples."""
    rng = np.random.default_rng(3)
    st = ChannelStats(want_gram=True)
    st.add(rng.standard_normal((200, 6)), 1)
    first = st.hessian_inv().copy()
    np.testing.assert_allclose(first, np.linalg.inv(st.hessian()), rtol=1e-10)
    assert not np.allclose(st.hessian_inv(damp=1.0), first)
    st.add(5.0 * rng.standard_normal((200, 6)), 1)  # much larger activations: H grows, H⁻¹ shrinks
    np.testing.assert_allclose(st.hessian_inv(), np.linalg.inv(st.hessian()), rtol=1e-10)
    assert np.abs(st.hessian_inv()).max() < 0.5 * np.abs(first).max()
