"""Calibration data: loading, errors, folders."""

import numpy as np
import onnx
import pytest

from graphprune.calibration import ChannelStats
from graphprune.feeds import CalibrationError, load_feeds
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
