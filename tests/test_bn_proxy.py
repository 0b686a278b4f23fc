"""BatchNorm: data-free statistics proxy and running-statistics recalibration after pruning."""

import numpy as np
import onnx
import pytest

import graphprune

from helpers import conv_bn_model


def test_bn_recalibration_sets_statistics_of_the_pruned_activations(tmp_path):
    model = conv_bn_model(np.linspace(0.5, 2.0, 8).astype(np.float32))
    x = np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    # compensate="none": re-estimation alone (reconstruction would add a conv bias and refit the weights)
    pruned, report = graphprune.prune(model, ratio=0.5, calib=tmp_path / "c.npz", bn_recalibrate=True,
                                      verify=True, verify_samples=1, holdout=10, calib_samples=30, compensate="none")
    # half the channels gone, statistics from the unpruned model: re-estimating them must pass the held-out check
    assert report.bn_recalibrated == 1 and report.verification is not None
    assert not any("left as they were" in d for d in report.diagnostics)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    # the new running mean is the mean of the pruned conv output over the calibration (not held-out) samples
    from graphprune.runtime import session
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
