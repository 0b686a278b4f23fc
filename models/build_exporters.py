"""Corpus models from exporters other than PyTorch: tf2onnx (Keras) and paddle2onnx (Paddle).

Each framework is heavy and lives in its own throw-away virtual environment, so this script has three steps:

    python -m venv /tmp/exp-tf && /tmp/exp-tf/bin/pip install tensorflow-cpu tf2onnx tf-keras onnx
    /tmp/exp-tf/bin/python models/build_exporters.py keras /tmp/raw       # Keras apps, LSTMs, transformer, If
    python -m venv /tmp/exp-pd && /tmp/exp-pd/bin/pip install paddlepaddle paddle2onnx onnx packaging
    /tmp/exp-pd/bin/python models/build_exporters.py paddle /tmp/raw      # CRNN/SVTR-style recognizers, SE net
    python models/build_exporters.py ingest /tmp/raw                       # (project venv) strip, add to corpus

Every model is randomly initialised from a fixed seed (nothing is downloaded); `ingest` strips float weights
like the rest of the corpus and appends manifest entries (inputs with their symbolic dims and value ranges).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = Path(os.environ.get("GRAPHPRUNE_CORPUS_DIR", HERE / "corpus"))


def _write_spec(out: Path, name: str, family: str, exporter: str, source: str, inputs: list[dict],
                outputs: list[str]) -> None:
    (out / f"{name}.json").write_text(json.dumps({
        "name": name, "family": family, "exporter": exporter, "source": source, "inputs": inputs,
        "outputs": outputs}, indent=1))


# ---- Keras via tf2onnx --------------------------------------------------------------------------------------
def keras(out: Path) -> None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tf2onnx converts tf.keras (Keras 2) models
    import numpy as np
    import tensorflow as tf
    import tf2onnx
    tf.random.set_seed(0)
    np.random.seed(0)
    k = tf.keras
    apps = {
        "keras_mobilenet_v2": lambda: k.applications.MobileNetV2(input_shape=(64, 64, 3), weights=None, classes=10),
        "keras_mobilenet_v3_small": lambda: k.applications.MobileNetV3Small(
            input_shape=(64, 64, 3), weights=None, classes=10, include_preprocessing=False),
        "keras_efficientnet_b0": lambda: k.applications.EfficientNetB0(input_shape=(64, 64, 3), weights=None,
                                                                       classes=10),
        "keras_resnet50": lambda: k.applications.ResNet50(input_shape=(64, 64, 3), weights=None, classes=10),
    }
    only = os.environ.get("GRAPHPRUNE_ONLY")
    for name, build in apps.items():
        if only and name != only:
            continue
        model = build()
        spec = (tf.TensorSpec((None, 64, 64, 3), tf.float32, name="input"),)
        onnx_model, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
        _save(out, name, onnx_model, "keras", "tf2onnx", f"tf.keras.applications {name[6:]} weights=None, "
              "64x64 NHWC", [{"name": "input", "shape": ["batch", 64, 64, 3], "dtype": "float32", "low": -1.0,
                              "high": 1.0, "example_shape": [1, 64, 64, 3]}])
    for name, build in (("keras_lstm_classifier", _keras_lstm), ("keras_transformer_block", _keras_transformer),
                        ("keras_loop_lstm", _keras_loop_lstm), ("keras_cond_mlp", _keras_cond_mlp)):
        if not only or name == only:
            build(out, k, tf, tf2onnx)


def _keras_lstm(out, k, tf, tf2onnx):
    # an LSTM text classifier (tf2onnx writes the recurrence as an LSTM node or a Loop, depending on the cell)
    inp = k.Input((None,), dtype="int32", name="tokens")
    h = k.layers.Embedding(1000, 64)(inp)
    h = k.layers.LSTM(96, return_sequences=True)(h)
    h = k.layers.LSTM(48)(h)
    h = k.layers.Dense(32, activation="relu")(h)
    lstm = k.Model(inp, k.layers.Dense(5)(h))
    spec = (tf.TensorSpec((None, None), tf.int32, name="tokens"),)
    onnx_model, _ = tf2onnx.convert.from_keras(lstm, input_signature=spec, opset=17)
    _save(out, "keras_lstm_classifier", onnx_model, "keras", "tf2onnx", "Embedding + 2 LSTM + 2 Dense",
          [{"name": "tokens", "shape": ["batch", "sequence"], "dtype": "int32", "low": 0, "high": 999,
            "example_shape": [2, 12]}])


def _keras_transformer(out, k, tf, tf2onnx):
    # a transformer encoder block: MultiHeadAttention, LayerNormalization, GELU MLP, residuals
    x_in = k.Input((None, 64), name="x")
    a = k.layers.MultiHeadAttention(num_heads=4, key_dim=16)(x_in, x_in)
    h = k.layers.LayerNormalization()(x_in + a)
    # tanh-approximate GELU: tf2onnx writes the exact one with Erfc, which is not an ONNX op
    m = k.layers.Dense(128, activation=lambda t: tf.nn.gelu(t, approximate=True))(h)
    m = k.layers.Dense(64)(m)
    h = k.layers.LayerNormalization()(h + m)
    block = k.Model(x_in, k.layers.Dense(10)(h))
    spec = (tf.TensorSpec((None, None, 64), tf.float32, name="x"),)
    onnx_model, _ = tf2onnx.convert.from_keras(block, input_signature=spec, opset=17)
    _save(out, "keras_transformer_block", onnx_model, "keras", "tf2onnx",
          "MultiHeadAttention(4x16) + LayerNorm + GELU MLP, residuals",
          [{"name": "x", "shape": ["batch", "sequence", 64], "dtype": "float32", "low": -1.0, "high": 1.0,
            "example_shape": [2, 10, 64]}])


def _keras_loop_lstm(out, k, tf, tf2onnx):
    """Two LSTM layers with a custom cell (softsign instead of tanh on the cell state): no native ONNX op
    matches it, so tf2onnx writes each as a Loop whose body does the gate MatMuls, carrying h, c and the
    weights."""
    class SoftsignLSTMCell(k.layers.Layer):
        def __init__(self, units, **kw):
            super().__init__(**kw)
            self.units = units
            self.state_size = [units, units]
            self.output_size = units

        def build(self, input_shape):
            self.kernel = self.add_weight(name="kernel", shape=(input_shape[-1], 4 * self.units))
            self.recurrent_kernel = self.add_weight(name="recurrent_kernel", shape=(self.units, 4 * self.units))
            self.bias = self.add_weight(name="bias", shape=(4 * self.units,), initializer="zeros")

        def call(self, x, states):
            h, c = states
            z = tf.matmul(x, self.kernel) + tf.matmul(h, self.recurrent_kernel) + self.bias
            i, f, g, o = tf.split(z, 4, axis=-1)
            c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
            h = tf.sigmoid(o) * tf.nn.softsign(c)
            return h, [h, c]

    inp = k.Input((None,), dtype="int32", name="tokens")
    h = k.layers.Embedding(1000, 32)(inp)
    h = k.layers.RNN(SoftsignLSTMCell(48), return_sequences=True)(h)
    h = k.layers.RNN(SoftsignLSTMCell(24))(h)
    h = k.layers.Dense(16, activation="relu")(h)
    model = k.Model(inp, k.layers.Dense(5)(h))
    spec = (tf.TensorSpec((None, None), tf.int32, name="tokens"),)
    onnx_model, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    _save(out, "keras_loop_lstm", onnx_model, "keras", "tf2onnx",
          "Embedding + 2 custom-cell LSTM (tf2onnx: Loop bodies) + 2 Dense",
          [{"name": "tokens", "shape": ["batch", "sequence"], "dtype": "int32", "low": 0, "high": 999,
            "example_shape": [2, 12]}])


def _keras_cond_mlp(out, k, tf, tf2onnx):
    """An MLP whose middle layer is chosen at run time by tf.cond on the input's mean: tf2onnx writes an If
    whose branches read their Dense weights from the outer scope."""
    class CondDense(k.layers.Layer):
        def build(self, input_shape):
            d = input_shape[0][-1]
            self.wa = self.add_weight(name="wa", shape=(d, 64))
            self.ba = self.add_weight(name="ba", shape=(64,), initializer="zeros")
            self.wb = self.add_weight(name="wb", shape=(d, 64))

        def call(self, inputs):
            x, flag = inputs
            return tf.cond(flag, lambda: tf.nn.relu(tf.matmul(x, self.wa) + self.ba),
                           lambda: tf.sigmoid(tf.matmul(x, self.wb)))

    inp = k.Input((32,), name="x")
    flag = k.layers.Lambda(lambda t: tf.reduce_mean(t) > 0.0)(inp)
    h = k.layers.Dense(48, activation="relu")(inp)
    h = CondDense()([h, flag])
    model = k.Model(inp, k.layers.Dense(10)(h))
    spec = (tf.TensorSpec((None, 32), tf.float32, name="x"),)
    onnx_model, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    _save(out, "keras_cond_mlp", onnx_model, "keras", "tf2onnx",
          "Dense + tf.cond(mean(x) > 0, two Dense branches) + Dense",
          [{"name": "x", "shape": ["batch", 32], "dtype": "float32", "low": -1.0, "high": 1.0,
            "example_shape": [2, 32]}])


def _save(out, name, onnx_model, family, exporter, source, inputs):
    import onnx
    onnx.save(onnx_model, out / f"{name}.onnx")
    _write_spec(out, name, family, exporter, source, inputs, [o.name for o in onnx_model.graph.output])
    print(f"{name}: {len(onnx_model.graph.node)} nodes")


# ---- Paddle via paddle2onnx ----------------------------------------------------------------------------------
def paddle(out: Path) -> None:
    import paddle
    import paddle.nn as nn
    import paddle.nn.functional as F
    paddle.seed(0)

    class ConvBN(nn.Layer):
        def __init__(self, cin, cout, k=3, s=1, g=1):
            super().__init__()
            self.conv = nn.Conv2D(cin, cout, k, s, k // 2, groups=g, bias_attr=False)
            self.bn = nn.BatchNorm2D(cout)

        def forward(self, x):
            return F.hardswish(self.bn(self.conv(x)))

    class SE(nn.Layer):
        def __init__(self, c, r=4):
            super().__init__()
            self.fc1 = nn.Conv2D(c, c // r, 1)
            self.fc2 = nn.Conv2D(c // r, c, 1)

        def forward(self, x):
            # a mean, not AdaptiveAvgPool2D: paddle2onnx converts adaptive pools only at static sizes
            s = F.hardsigmoid(self.fc2(F.relu(self.fc1(x.mean(axis=[2, 3], keepdim=True)))))
            return x * s

    class Backbone(nn.Layer):
        """A MobileNetV3-like recognizer backbone: strides (2,1) in height keep the width for the sequence."""
        def __init__(self):
            super().__init__()
            self.stem = ConvBN(3, 16, 3, 2)
            self.b1 = nn.Sequential(ConvBN(16, 16, 3, 1, 16), SE(16), ConvBN(16, 24, 1))
            self.b2 = nn.Sequential(ConvBN(24, 48, 1), ConvBN(48, 48, 3, (2, 1), 48), SE(48), ConvBN(48, 40, 1))
            self.b3 = nn.Sequential(ConvBN(40, 96, 1), ConvBN(96, 96, 3, (2, 1), 96), ConvBN(96, 64, 1))

        def forward(self, x):
            return self.b3(self.b2(self.b1(self.stem(x)))).mean(axis=2, keepdim=True)   # [N, 64, 1, W']

    class CRNN(nn.Layer):
        """Backbone -> squeeze height -> BiLSTM -> CTC logits, with dynamic height and width."""
        def __init__(self, classes=37):
            super().__init__()
            self.backbone = Backbone()
            self.rnn = nn.LSTM(64, 48, direction="bidirect", num_layers=1)
            self.head = nn.Linear(96, classes)

        def forward(self, x):
            f = self.backbone(x).squeeze(2).transpose([0, 2, 1])        # [N, W', 64]
            h, _ = self.rnn(f)
            return self.head(h)

    class Mixer(nn.Layer):
        """SVTR-style global mixing: tokens from the feature map, attention + MLP with LayerNorm, back to a map."""
        def __init__(self, dim=64, heads=4):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim)
            self.qkv = nn.Linear(dim, dim * 3)
            self.proj = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))
            self.heads = heads

        def forward(self, x):
            n, c, h, w = x.shape
            t = x.flatten(2).transpose([0, 2, 1])                       # [N, HW, C]
            q, k_, v = self.qkv(self.norm1(t)).reshape([0, -1, 3, self.heads, c // self.heads]) \
                .transpose([2, 0, 3, 1, 4])
            att = F.softmax(q.matmul(k_.transpose([0, 1, 3, 2])) * (c // self.heads) ** -0.5, axis=-1)
            t = t + self.proj(att.matmul(v).transpose([0, 2, 1, 3]).reshape([0, -1, c]))
            t = t + self.mlp(self.norm2(t))
            return t.transpose([0, 2, 1]).reshape([0, c, h, w])

    class SVTRish(nn.Layer):
        def __init__(self, classes=37):
            super().__init__()
            self.backbone = Backbone()
            self.neck = ConvBN(64, 64, 1)
            self.mixer = Mixer(64)
            self.head = nn.Linear(64, classes)

        def forward(self, x):
            f = self.mixer(self.neck(self.backbone(x)))                 # [N, 64, 1, W']
            return self.head(f.squeeze(2).transpose([0, 2, 1]))

    class SENet(nn.Layer):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(ConvBN(3, 16, 3, 2), ConvBN(16, 16, 3, 1, 16), SE(16), ConvBN(16, 32, 1),
                                      ConvBN(32, 32, 3, 2, 32), SE(32), ConvBN(32, 64, 1))
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(F.adaptive_avg_pool2d(self.body(x), 1).flatten(1))

    models = [
        ("paddle_crnn_bilstm", CRNN(), [None, 3, 32, None], [1, 3, 32, 100], ["batch", 3, 32, "width"],
         "MobileNetV3-like backbone with SE, BiLSTM, CTC head; dynamic width"),
        ("paddle_svtr_mixer", SVTRish(), [None, 3, None, None], [1, 3, 32, 100], ["batch", 3, "height", "width"],
         "backbone + SVTR-style attention mixer with LayerNorm; dynamic height and width"),
        ("paddle_se_net", SENet(), [None, 3, 64, 64], [1, 3, 64, 64], ["batch", 3, 64, 64],
         "depthwise convs with SE blocks (hardsigmoid gates)"),
    ]
    for name, net, shape, example, dims, source in models:
        net.eval()
        path = str(out / name)
        spec = [paddle.static.InputSpec(shape=shape, dtype="float32", name="x")]
        paddle.onnx.export(net, path, input_spec=spec, opset_version=13)
        import onnx
        m = onnx.load(path + ".onnx")
        _write_spec(out, name, "paddle", "paddle2onnx", source,
                    [{"name": "x", "shape": dims, "dtype": "float32", "low": -1.0, "high": 1.0,
                      "example_shape": example}], [o.name for o in m.graph.output])
        print(f"{name}: {len(m.graph.node)} nodes")


# ---- ingest into the corpus (project venv) -------------------------------------------------------------------
def ingest(raw: Path) -> None:
    import onnx

    from corpus_tools import strip_weights  # models/corpus_tools.py, beside this script
    manifest_path = CORPUS / "manifest.json"
    data = json.loads(manifest_path.read_text())
    entries = data["models"] if isinstance(data, dict) else data
    added = []
    for spec_path in sorted(raw.glob("*.json")):
        spec = json.loads(spec_path.read_text())
        model = onnx.load(raw / f"{spec['name']}.onnx")
        path = CORPUS / f"{spec['name']}.{spec['exporter']}.onnx"
        onnx.save(strip_weights(model), path)
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        added.append(dict(spec, file=path.name, opset=opset, nodes=len(model.graph.node),
                          size_bytes=path.stat().st_size))
        print(f"{path.name}: {len(model.graph.node)} nodes, {path.stat().st_size / 1024:.0f} kB")
    files = {e["file"] for e in added}
    entries = [e for e in entries if e["file"] not in files] + added
    if isinstance(data, dict):
        data["models"] = entries
    else:
        data = entries
    manifest_path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    step, folder = sys.argv[1], Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    {"keras": keras, "paddle": paddle, "ingest": ingest}[step](folder)
