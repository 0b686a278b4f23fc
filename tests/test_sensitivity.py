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


@pytest.mark.parametrize("name", ["hand_se.legacy", "hand_cbam.dynamo", "efficientnet_b0.legacy", "bert.legacy",
                                  "hand_lstm_classifier.legacy", "hand_shuffle.legacy", "hand_glu_mlp.dynamo"])
def test_probe_masks_only_where_zero_weight_rows_do_not_remove_the_channels(name):
    """The loss allocation's probes mask only the reads that zeroed consumer rows leave exposed; with every group
    cut at once their outputs equal the oracle that masks every read."""
    from graphprune.feeds import synthetic_feeds
    from graphprune.passes.compensate import _consumers
    from graphprune.passes.sensitivity import MaskedModel, members_needing_masks, zero_removed_rows
    from models.corpus_tools import corpus_dir, refill_weights
    analysis = graphprune.analyze_model(refill_weights(onnx.load(str(corpus_dir() / f"{name}.onnx"))))
    feeds = synthetic_feeds(analysis.graph, samples=2)
    rng = np.random.default_rng(0)
    removed: dict = {}
    for g in analysis.groups:
        if len(g.units) > 1:
            for u in rng.choice(len(g.units), max(1, len(g.units) // 3), replace=False):
                for member, idx in g.units[u].elements.items():
                    removed.setdefault(member, []).extend(int(i) for i in idx)
    weights = {c.weight for c, _ in _consumers(analysis, removed)}
    full = MaskedModel(analysis, weight_inputs=weights)
    need = members_needing_masks(analysis)
    lean = MaskedModel(analysis, weight_inputs=weights, only=need)
    activation_masks = [k for k in lean.masks if k[0] not in lean.weights]
    assert len(activation_masks) < len([k for k in full.masks if k[0] not in full.weights])
    ref = full.run(feeds, removed)
    got = lean.run(feeds, removed, zero_removed_rows(analysis, removed, {}))
    assert any(not np.allclose(r, d) for r, d in zip(ref, full.run(feeds), strict=True))   # the cut changes the outputs
    for r, y in zip(ref, got, strict=True):
        np.testing.assert_allclose(y, r, rtol=1e-4, atol=1e-5 * float(np.abs(r).max()))
