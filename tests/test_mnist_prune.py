"""The shipped trained MNIST CNN prunes to an equivalent, smaller model."""
from pathlib import Path

from helpers import prune_checked

MODEL = Path(__file__).resolve().parents[1] / "models" / "mnist_cnn.onnx"


def test_mnist_prunes_every_hidden_layer():
    pruned, report = prune_checked(str(MODEL), ratio=0.5)
    assert report.groups_pruned == 4          # three conv widths and the hidden FC
    assert report.macs_after < 0.35 * report.macs_before
    assert report.verification["max_abs_diff"] < 1e-4


def test_ratio_zero_changes_nothing():
    pruned, report = prune_checked(str(MODEL), ratio=0.0, expect_smaller=False)
    assert report.params_after == report.params_before
    assert report.verification["max_abs_diff"] == 0.0
