"""The fidelity stage's per-layer error profile: where the error enters, over the channels each layer kept."""

import numpy as np
from test_loss_allocation import _two_group_model

import graphprune
from graphprune.verify import layer_profile


def test_profile_is_zero_before_the_first_cut_and_grows_after(tmp_path):
    model = _two_group_model()
    rng = np.random.default_rng(3)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((64, 8)).astype(np.float32))
    pruned, report = graphprune.prune(model, ratio=0.5, calib=str(calib), compensate="none", scope="uniform")
    layers = report.fidelity["layers"]
    assert [r["node"] for r in layers] == ["MatMul_0", "MatMul_2", "MatMul_4"]
    # the first layer only lost output channels: the kept ones are exact; the next reads fewer inputs
    assert layers[0]["rel_error"] < 1e-6
    assert layers[1]["rel_error"] > 1e-3 and layers[2]["rel_error"] > 1e-3


def test_profile_compares_kept_channels_only():
    model = _two_group_model()
    pruned, report = graphprune.prune(model, ratio=0.5, importance="l1", compensate="none")
    feeds = {"x": np.random.default_rng(4).standard_normal((4, 8)).astype(np.float32)}
    removed = report.plan.removed_elements()
    good = layer_profile(model, pruned, feeds, removed)
    assert good[0]["rel_error"] < 1e-6
    # the wrong channels dropped from the dense output: the comparison must see it
    wrong = {k: [i for i in range(16) if i not in set(v)][: len(v)] for k, v in removed.items()}
    assert layer_profile(model, pruned, feeds, wrong)[0]["rel_error"] > 0.1
