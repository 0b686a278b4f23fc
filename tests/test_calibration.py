"""Calibration data: loading, errors, folders."""

import numpy as np
import onnx
import pytest

from graphprune.calibration import CalibrationError, load_feeds
from graphprune.ir import Graph

from helpers import MNIST


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
