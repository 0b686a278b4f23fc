"""Sensitivity analysis: curves, masked measurements, the sensitivity scope."""

import numpy as np
import onnx
import pytest

import graphprune

from helpers import MNIST


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
    from graphprune.runtime import session
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
