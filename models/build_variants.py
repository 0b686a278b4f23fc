"""Build the corpus's non-PyTorch variants from committed corpus models, with onnxruntime's own tools only:

* `<name>.qdq.onnx`      static int8 QDQ (QuantizeLinear/DequantizeLinear pairs, per-channel weight scales),
                         `onnxruntime.quantization.quantize_static`, calibrated on random manifest inputs;
* `<name>.dynint8.onnx`  dynamic int8 (`quantize_dynamic`: DynamicQuantizeLinear -> MatMulInteger/ConvInteger,
                         com.microsoft DynamicQuantizeLSTM);
* `<name>.fp16.onnx`     float16 weights and compute (`onnxruntime.transformers.float16`, inputs/outputs too);
* `<name>.ortfused.onnx` what `onnxruntime.transformers.optimizer` emits for BERT/GPT-2 (Attention,
                         SkipLayerNormalization, FastGelu/BiasGelu, EmbedLayerNormalization ...).

Float weights are stripped like the rest of the corpus (refilled from a seed by the tests); int8 weights, their
scales and zero points are kept (the models are small). Entries are appended to corpus/manifest.json with the
source model's inputs.

    python models/build_variants.py            # (re)build every variant
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import onnx

HERE = Path(__file__).resolve().parent
CORPUS = Path(os.environ.get("GRAPHPRUNE_CORPUS_DIR", HERE / "corpus"))

QDQ = ["timm_resnet18.legacy", "mobilenet_v3_small.legacy", "hand_se.legacy", "hand_c2f_yolo.legacy"]
DYNAMIC = ["bert.legacy", "hand_lstm_classifier.legacy", "hand_conv1d_flatten.legacy", "hand_glu_mlp.legacy"]
# (hand_unet is left out: the float16 converter writes its Resize before the Cast it reads, which onnx.checker refuses)
FP16 = ["mobilenet_v2.legacy", "bert.legacy"]
FUSED = [("bert.legacy", "bert"), ("gpt2.legacy", "gpt2")]


def _tools():
    # models/corpus_tools.py: this script's folder is first on sys.path
    from corpus_tools import load_manifest, make_inputs, refill_weights, strip_weights
    return load_manifest, make_inputs, refill_weights, strip_weights


def main() -> None:
    load_manifest, make_inputs, refill_weights, strip_weights = _tools()
    manifest_path = CORPUS / "manifest.json"
    data = json.loads(manifest_path.read_text())
    entries = data["models"] if isinstance(data, dict) else data
    by_stem = {Path(e["file"]).stem: e for e in entries}
    built = []

    def emit(model: onnx.ModelProto, src: dict, kind: str, source: str) -> None:
        stem = Path(src["file"]).stem
        name = f"{stem}.{kind}"
        stripped = strip_weights(model)
        path = CORPUS / f"{name}.onnx"
        onnx.save(stripped, path)
        entry = dict(src)
        entry.update(name=f"{src['name']}_{kind}", file=path.name, exporter=f"{src['exporter']}+{kind}",
                     source=f"{src['source']}; {source}", nodes=len(model.graph.node), size_bytes=path.stat().st_size)
        if kind == "fp16":
            entry["inputs"] = [dict(i, dtype="float16") if i["dtype"] == "float32" else i for i in entry["inputs"]]
        built.append(entry)
        print(f"{path.name}: {len(model.graph.node)} nodes, {path.stat().st_size / 1024:.0f} kB")

    def dense(stem):
        entry = by_stem[stem]
        return refill_weights(onnx.load(CORPUS / entry["file"]), seed=0), entry

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self, entry):
            self.samples = iter([make_inputs(entry, seed=s) for s in range(8)])

        def get_next(self):
            return next(self.samples, None)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for stem in QDQ:
            model, entry = dense(stem)
            src, dst = tmp / "in.onnx", tmp / "out.onnx"
            onnx.save(model, src)
            quantize_static(str(src), str(dst), Reader(entry), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
            emit(onnx.load(dst), entry, "qdq", "onnxruntime.quantization.quantize_static QDQ int8 per-channel")
        for stem in DYNAMIC:
            model, entry = dense(stem)
            src, dst = tmp / "in.onnx", tmp / "out.onnx"
            onnx.save(model, src)
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Conv", "LSTM", "Gemm"])
            emit(onnx.load(dst), entry, "dynint8", "onnxruntime.quantization.quantize_dynamic int8")
        from onnxruntime.transformers.float16 import convert_float_to_float16
        for stem in FP16:
            model, entry = dense(stem)
            emit(convert_float_to_float16(model, keep_io_types=False), entry, "fp16",
                 "onnxruntime.transformers.float16 (inputs and outputs float16)")
        from onnxruntime.transformers.optimizer import optimize_model
        for stem, kind in FUSED:
            model, entry = dense(stem)
            src = tmp / "in.onnx"
            onnx.save(model, src)
            opt = optimize_model(str(src), model_type=kind, num_heads=0, hidden_size=0, opt_level=0,
                                 use_gpu=False, only_onnxruntime=False)
            if not any(o.domain == "com.microsoft" for o in opt.model.opset_import):  # the optimizer omits it
                opt.model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
            emit(opt.model, entry, "ortfused", f"onnxruntime.transformers.optimizer model_type={kind}")
    names = {e["file"] for e in built}
    kept = [e for e in entries if e["file"] not in names]
    if isinstance(data, dict):
        data["models"] = kept + built
    else:
        data = kept + built
    manifest_path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
