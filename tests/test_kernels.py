"""ai.graphprune sparse ops: packing, the dense function bodies (no library), and the native kernels, all
against numpy. Native-kernel cases need the library the package build makes (setup.py); they are skipped,
with the build's reason, only where it could not be built."""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune.kernels as gk
from graphprune.kernels import ops

RNG = np.random.default_rng(0)
native = pytest.mark.skipif(not gk.available(), reason=gk.status())


def one_node_model(op, x_shape, weight, keep, opset=17, with_function=True, **attrs):
    if op == "GpBsrConv":
        values, index = ops.pack_bsr_conv(weight, keep)
        n_out = weight.shape[0]
    elif op == "GpBsrMatMul":
        values, index = ops.pack_bsr_matmul(weight, keep)
        n_out = weight.shape[1]
    else:
        values, index = ops.pack_csr_matmul(weight, keep)
        n_out = weight.shape[1]
    bias = RNG.standard_normal(n_out).astype(np.float32)
    node = ops.make_node(op, ["x", "values", "index", "bias"], "y", "sparse0", **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"d{k}" for k in range(len(x_shape))])],
        [numpy_helper.from_array(values, "values"), numpy_helper.from_array(index, "index"),
         numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    if with_function:
        ops.attach_functions(model)
    else:
        model.opset_import.append(helper.make_opsetid(ops.DOMAIN, 1))
    return model, [values, index, bias]


def run(model, x, use_native, threads=1, optimize=True):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if use_native:
        opts.register_custom_ops_library(gk.library_path())
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


MATMUL_CASES = [  # (x shape, K, N, block sparsity)
    ((1, 37), 37, 50, 0.5),      # N not a multiple of 16
    ((8, 64), 64, 33, 0.75),     # batch 8
    ((3, 1), 1, 17, 0.0),        # K = 1
    ((5, 20), 20, 16, 1.0),      # nothing kept: bias only
    ((2, 3, 24), 24, 40, 0.6),   # 3-D input
    ((7,), 7, 5, 0.3),           # 1-D input
]


def _matmul_case(op, x_shape, k, n, s):
    w = RNG.standard_normal((k, n)).astype(np.float32)
    nb = -(-n // 16)
    keep = RNG.random((k, nb)) >= s if op == "GpBsrMatMul" else RNG.random((k, n)) >= s
    attrs = dict(K=k, N=n, clip_min=0.0, clip_max=math.inf)
    model, ins = one_node_model(op, x_shape, w, keep, **attrs)
    x = RNG.standard_normal(x_shape).astype(np.float32)
    return model, x, ops.reference(op, [x] + ins, attrs)


CONV_CASES = [  # (Cin, Cout, kernel, strides, pads, dilations, H x W)
    (5, 9, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), (7, 9)),       # 1x1 fast path, Cout not a multiple of 4
    (8, 16, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), (4, 33)),     # 1x1 with a pixel tail
    (6, 10, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), (11, 13)),    # 3x3 stride 2 pad 1
    (3, 4, (5, 3), (1, 1), (2, 1, 0, 2), (1, 1), (9, 20)),      # 5x3 asymmetric pads
    (4, 7, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), (10, 10)),     # dilation 2
    (2, 3, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), (8, 8)),       # 1x1 with stride: general path
]


def _conv_case(cin, cout, kernel, strides, pads, dilations, hw, sparsity=0.6):
    w = RNG.standard_normal((cout, cin) + kernel).astype(np.float32)
    keep = RNG.random((-(-cout // 4), cin * kernel[0] * kernel[1])) >= sparsity
    attrs = dict(in_channels=cin, out_channels=cout, kernel_shape=list(kernel), strides=list(strides),
                 pads=list(pads), dilations=list(dilations), clip_min=0.0, clip_max=6.0)
    model, ins = one_node_model("GpBsrConv", (2, cin) + hw, w, keep, **attrs)
    x = RNG.standard_normal((2, cin) + hw).astype(np.float32)
    return model, x, ops.reference("GpBsrConv", [x] + ins, attrs)


def test_packing_round_trips_and_orders_blocks():
    w = RNG.standard_normal((9, 35)).astype(np.float32)
    keep = RNG.random((9, 3)) > 0.5
    values, index = ops.pack_bsr_matmul(w, keep)
    assert np.all(np.diff(index) > 0) and values.shape == (keep.sum(), 16) and index.dtype == np.int32
    dense = ops.unpack_bsr_matmul(values, index, 9, 35)
    mask = np.repeat(keep, 16, axis=1)[:, :35]
    np.testing.assert_array_equal(dense, np.where(mask, w, 0))
    cw = RNG.standard_normal((6, 3, 3, 3)).astype(np.float32)
    values, index = ops.pack_bsr_conv(cw)
    np.testing.assert_array_equal(ops.unpack_bsr_conv(values, index, cw.shape), cw)
    assert values.shape == (2 * 27, 4)  # 6 outputs -> 2 blocks of 4, every tap kept, padded with zeros
    values, index = ops.pack_csr_matmul(np.where(mask, w, 0))
    np.testing.assert_array_equal(ops.unpack_csr_matmul(values, index, 9, 35), np.where(mask, w, 0))


@pytest.mark.parametrize("op", ["GpBsrMatMul", "GpCsrMatMul"])
@pytest.mark.parametrize("case", MATMUL_CASES)
def test_matmul_function_body_matches_numpy(op, case):
    model, x, ref = _matmul_case(op, *case)
    onnx.checker.check_model(model, full_check=True)
    out = run(model, x, use_native=False)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("op", ["GpBsrMatMul", "GpCsrMatMul"])
@pytest.mark.parametrize("case", MATMUL_CASES)
def test_matmul_native_kernel_matches_numpy(op, case, threads):
    model, x, ref = _matmul_case(op, *case)
    out = run(model, x, use_native=True, threads=threads)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_function_body_matches_numpy(case):
    model, x, ref = _conv_case(*case)
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_allclose(run(model, x, use_native=False), ref, rtol=1e-4, atol=1e-4)


@native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_native_kernel_matches_numpy(case, threads):
    model, x, ref = _conv_case(*case)
    out = run(model, x, use_native=True, threads=threads)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@native
def test_native_large_batch_takes_the_parallel_path():
    # big enough that the kernel splits the columns over onnxruntime's pool
    model, x, ref = _matmul_case("GpBsrMatMul", (33, 256), 256, 520, 0.5)
    np.testing.assert_allclose(run(model, x, use_native=True, threads=2), ref, rtol=1e-4, atol=1e-3)
    model, x, ref = _conv_case(32, 36, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (30, 30))
    np.testing.assert_allclose(run(model, x, use_native=True, threads=2), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("opset", [12, 13, 17, 21])
def test_function_bodies_run_on_every_supported_opset(opset):
    w = RNG.standard_normal((12, 20)).astype(np.float32)
    model, ins = one_node_model("GpBsrMatMul", (2, 12), w, RNG.random((12, 2)) > 0.3, opset=opset, K=12, N=20)
    x = RNG.standard_normal((2, 12)).astype(np.float32)
    ref = ops.reference("GpBsrMatMul", [x] + ins, {"K": 12, "N": 20})
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_allclose(run(model, x, use_native=False), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run(model, x, use_native=False, optimize=False), ref, rtol=1e-4, atol=1e-4)
    cw = RNG.standard_normal((5, 3, 3, 3)).astype(np.float32)
    attrs = dict(in_channels=3, out_channels=5, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    model, ins = one_node_model("GpBsrConv", (1, 3, 6, 6), cw, None, opset=opset, **attrs)
    x = RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run(model, x, use_native=False), ops.reference("GpBsrConv", [x] + ins, attrs),
                               rtol=1e-4, atol=1e-4)


def test_function_body_needs_opset_12():
    with pytest.raises(ValueError, match="opset >= 12"):
        ops.function_proto("GpBsrMatMul", 11)


def test_without_library_onnxruntime_folds_the_body_into_one_dense_matmul(tmp_path):
    w = RNG.standard_normal((32, 48)).astype(np.float32)
    model, _ = one_node_model("GpBsrMatMul", (1, 32), w, RNG.random((32, 3)) > 0.5, K=32, N=48)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "opt.onnx"))
    kinds = {n.op_type for n in optimized.graph.node}
    assert "ScatterND" not in kinds and kinds & {"MatMul", "Gemm", "FusedMatMul", "MatMulNBits"}


@native
def test_library_takes_over_from_the_function_body():
    # without a function body the node only runs where the library is registered
    w = RNG.standard_normal((16, 16)).astype(np.float32)
    model, ins = one_node_model("GpBsrMatMul", (1, 16), w, None, with_function=False, K=16, N=16)
    x = RNG.standard_normal((1, 16)).astype(np.float32)
    with pytest.raises(Exception, match="not a registered function/op"):  # onnxruntime Fail
        run(model, x, use_native=False)
    np.testing.assert_allclose(run(model, x, use_native=True),
                               ops.reference("GpBsrMatMul", [x] + ins, {"K": 16, "N": 16}), rtol=1e-4, atol=1e-4)
    assert gk.isa() in ("avx2", "portable")


@native
def test_native_kernel_rejects_bad_indices_naming_the_op():
    w = RNG.standard_normal((8, 16)).astype(np.float32)
    model, _ = one_node_model("GpBsrMatMul", (1, 8), w, None, K=8, N=16)
    for t in model.graph.initializer:
        if t.name == "index":
            t.CopyFrom(numpy_helper.from_array(np.array([3, 2, 1, 0, 4, 5, 6, 7], np.int32), "index"))
    with pytest.raises(Exception, match="GpBsrMatMul.*not strictly ascending"):
        run(model, RNG.standard_normal((1, 8)).astype(np.float32), use_native=True)


def test_disable_switch_and_session_options_fallback(monkeypatch):
    monkeypatch.setenv(gk.DISABLE_ENV, "1")
    assert gk.library_path() is None and not gk.available()
    assert "disabled" in gk.status()
    monkeypatch.setattr(gk, "_WARNED", False)
    with pytest.warns(RuntimeWarning, match="function-body fallback"):
        opts = gk.session_options()
    assert isinstance(opts, ort.SessionOptions)


@native
def test_session_options_registers_the_library():
    w = RNG.standard_normal((16, 16)).astype(np.float32)
    model, _ = one_node_model("GpBsrMatMul", (1, 16), w, None, with_function=False, K=16, N=16)
    sess = ort.InferenceSession(model.SerializeToString(), gk.session_options(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.ones((1, 16), np.float32)})[0].shape == (1, 16)
