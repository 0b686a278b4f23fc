"""strip_weights / refill_weights: stripped models are small, refilled ones are valid, deterministic and tame."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.corpus_tools import (
    STRIPPED_KEY,
    is_stripped,
    refill_weights,
    strip_weights,
    stripped_names,
)


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def small_cnn(opset: int = 17) -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Conv(ConvTranspose) -> GAP -> Reshape(int shape) -> Gemm(transB) -> LayerNorm ->
    MatMul, plus a large float Constant added to the logits."""
    rng = np.random.default_rng(123)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [
        _init("conv1.w", f32(16, 3, 3, 3)), _init("conv1.b", f32(16)),
        _init("bn.scale", f32(16)), _init("bn.bias", f32(16)), _init("bn.mean", f32(16)),
        _init("bn.var", np.abs(f32(16)) + 0.1),
        _init("deconv.w", f32(16, 8, 2, 2)),
        _init("shape", np.array([0, -1], dtype=np.int64)),
        _init("big_int", np.arange(40, dtype=np.int64)),
        _init("fc.w", f32(32, 8)), _init("fc.b", f32(32)),
        _init("ln.scale", f32(32)), _init("ln.bias", f32(32)),
        _init("proj.w", f32(32, 20)),
        _init("tiny", f32(4)),
    ]
    const = helper.make_node("Constant", [], ["bigconst"], value=numpy_helper.from_array(f32(1, 20)))
    nodes = [
        helper.make_node("Conv", ["x", "conv1.w", "conv1.b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b1"]),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("ConvTranspose", ["r1", "deconv.w"], ["d1"], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["d1"], ["g"]),
        helper.make_node("Reshape", ["g", "shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["fc"], transB=1),
        helper.make_node("LayerNormalization", ["fc", "ln.scale", "ln.bias"], ["ln"], axis=-1),
        helper.make_node("MatMul", ["ln", "proj.w"], ["mm"]),
        const,
        helper.make_node("Add", ["mm", "bigconst"], ["sum"]),
        helper.make_node("Mul", ["sum", "tiny_scalar"], ["y"]),
    ]
    inits.append(_init("tiny_scalar", np.array(0.5, dtype=np.float32)))
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 20])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="test")
    model.ir_version = 8
    model.doc_string = "a doc string"
    model.metadata_props.add(key="origin", value="unit-test")
    onnx.checker.check_model(model)
    return model


def _arrays(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _run(model, x):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_strip_makes_model_small_and_keeps_structure():
    model = small_cnn()
    stripped = strip_weights(model)
    assert stripped.ByteSize() < model.ByteSize() // 2
    names = stripped_names(stripped)
    assert is_stripped(stripped) and not is_stripped(model)
    assert set(names) == {"conv1.w", "conv1.b", "bn.scale", "bn.bias", "bn.mean", "bn.var", "deconv.w", "fc.w",
                          "fc.b", "ln.scale", "ln.bias", "proj.w", "bigconst"}
    assert json.loads({p.key: p.value for p in stripped.metadata_props}[STRIPPED_KEY]) == names
    # Large float Constant became an initializer; nothing else about the graph changed.
    assert "Constant" not in [n.op_type for n in stripped.graph.node]
    assert len(stripped.graph.node) == len(model.graph.node) - 1
    assert stripped.opset_import == model.opset_import and stripped.doc_string == "a doc string"
    assert {p.key: p.value for p in stripped.metadata_props}["origin"] == "unit-test"
    inits = {t.name: t for t in stripped.graph.initializer}
    for n in names:
        t = inits[n]
        assert not t.raw_data and not t.float_data and len(t.dims) >= 1
    # Original model untouched (strip returns a copy).
    assert _arrays(model)["conv1.w"].shape == (16, 3, 3, 3)


def test_integer_and_small_tensors_untouched():
    model = small_cnn()
    before = _arrays(model)
    after = _arrays(refill_weights(strip_weights(model), seed=3))
    for name in ("shape", "big_int", "tiny", "tiny_scalar"):
        np.testing.assert_array_equal(after[name], before[name])  # < 16 elements or integer
    assert after["big_int"].dtype == np.int64


def test_refill_restores_shapes_and_dtypes():
    model = small_cnn()
    refilled = refill_weights(strip_weights(model), seed=0)
    assert not is_stripped(refilled)
    onnx.checker.check_model(refilled, full_check=True)
    ref = {t.name: (tuple(t.dims), t.data_type) for t in strip_weights(model).graph.initializer}
    for t in refilled.graph.initializer:
        assert (tuple(t.dims), t.data_type) == ref[t.name]
        arr = numpy_helper.to_array(t)
        assert arr.shape == tuple(t.dims)


def test_refill_deterministic_per_seed_and_differs_across_seeds():
    stripped = strip_weights(small_cnn())
    a, b, c = (_arrays(refill_weights(stripped, seed=s)) for s in (0, 0, 1))
    for name in stripped_names(stripped):
        np.testing.assert_array_equal(a[name], b[name])
        assert not np.array_equal(a[name], c[name])
        assert np.all(np.isfinite(a[name])) and np.std(a[name]) > 0  # non-degenerate


def test_refill_independent_of_initializer_order():
    stripped = strip_weights(small_cnn())
    shuffled = onnx.ModelProto()
    shuffled.CopyFrom(stripped)
    inits = list(shuffled.graph.initializer)[::-1]
    del shuffled.graph.initializer[:]
    shuffled.graph.initializer.extend(inits)
    a, b = _arrays(refill_weights(stripped, seed=7)), _arrays(refill_weights(shuffled, seed=7))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_refill_scales_by_consumer():
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    c = 64
    inits = [_init("w", f32(c, 32, 3, 3)), _init("s", f32(c)), _init("b", f32(c)), _init("m", f32(c)),
             _init("v", f32(c)), _init("g", f32(256, 512)), _init("mm", f32(512, 128))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"]),
             helper.make_node("Gemm", ["z", "g"], ["gz"], transB=1),
             helper.make_node("MatMul", ["gz", "mm"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 8, 8]),
                                           helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 512])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    arr = _arrays(refill_weights(strip_weights(model), seed=0))
    assert np.all(arr["v"] >= 0.5) and np.all(arr["v"] <= 1.5)  # BN variance positive
    assert np.all(arr["s"] >= 0.5) and np.all(arr["s"] <= 1.5)  # BN scale
    assert abs(np.std(arr["b"]) - 0.1) < 0.05 and abs(np.std(arr["m"]) - 0.1) < 0.05
    assert abs(np.std(arr["w"]) - 1 / np.sqrt(32 * 9)) < 0.2 / np.sqrt(32 * 9)
    assert abs(np.std(arr["g"]) - 1 / np.sqrt(512)) < 0.1 / np.sqrt(512)   # transB: fan_in = dims[1]
    assert abs(np.std(arr["mm"]) - 1 / np.sqrt(512)) < 0.1 / np.sqrt(512)  # MatMul B: fan_in = dims[0]


def test_non_stripped_model_is_noop_unless_rerandomize():
    model = small_cnn()
    same = refill_weights(model, seed=5)
    assert same.SerializeToString() == model.SerializeToString()
    rer = _arrays(refill_weights(model, seed=5, rerandomize=True))
    orig = _arrays(model)
    assert not np.array_equal(rer["conv1.w"], orig["conv1.w"])
    np.testing.assert_array_equal(rer["tiny"], orig["tiny"])
    np.testing.assert_array_equal(rer["shape"], orig["shape"])


def test_stripped_refilled_model_runs_with_finite_outputs():
    model = small_cnn()
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    y = _run(refill_weights(strip_weights(model), seed=0), x)
    assert y.shape == (2, 20) and np.all(np.isfinite(y)) and np.std(y) > 1e-3


def test_external_data_is_loaded(tmp_path):
    model = small_cnn()
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=0)
    stripped = strip_weights(str(path))
    assert (tmp_path / "ext.data").exists()
    assert not any(t.data_location == TensorProto.EXTERNAL for t in stripped.graph.initializer)
    big_int = next(t for t in stripped.graph.initializer if t.name == "big_int")
    np.testing.assert_array_equal(numpy_helper.to_array(big_int), np.arange(40))
    with pytest.raises(ValueError):
        strip_weights(onnx.load(str(path), load_external_data=False))
    ok = strip_weights(onnx.load(str(path), load_external_data=False), base_dir=tmp_path)
    assert stripped_names(ok) == stripped_names(stripped)


def test_float16_weights():
    model = small_cnn()
    for t in model.graph.initializer:
        if t.name == "proj.w":
            t.CopyFrom(_init("proj.w", numpy_helper.to_array(t).astype(np.float16)))
    refilled = _arrays(refill_weights(strip_weights(model), seed=0))
    assert refilled["proj.w"].dtype == np.float16 and np.all(np.isfinite(refilled["proj.w"]))
