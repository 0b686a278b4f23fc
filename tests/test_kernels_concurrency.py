"""The native kernels under reuse and concurrency: one onnxruntime session run from many threads with the
index arrays as graph inputs that change between runs, after a rejected index, and in place.

A kernel's only mutable state is its cache of decoded index arrays (keyed by the full index bytes, guarded
by a lock); these tests would catch a cache keyed by address, a decode left half-done by a rejected array,
and a decode rebuilt under a thread that is still using it. Each result must equal, bit for bit, what the
same session computed for those inputs single-threaded, and that must match numpy.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune.kernels as gk
from graphprune.kernels import ops

pytestmark = pytest.mark.skipif(not gk.available(), reason=gk.status())

K, N = 256, 256                   # both MatMuls: X1 [M, K] @ W [K, N]
CIN, COUT, HW = 16, 16, (12, 12)  # the 3x3 conv (pad 1): X2 [batch, CIN, 12, 12]
CONV_ATTRS = dict(in_channels=CIN, out_channels=COUT, kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1],
                  dilations=[1, 1], clip_min=-math.inf, clip_max=math.inf)
MATMUL_ATTRS = dict(K=K, N=N, clip_min=-math.inf, clip_max=math.inf)
# op -> (node attributes, index space, floats per block)
OPS = {
    "GpBsrMatMul": (MATMUL_ATTRS, K * (N // 16), 16),
    "GpCsrMatMul": (MATMUL_ATTRS, K * N, 1),
    "GpBsrConv": (CONV_ATTRS, (COUT // 4) * CIN * 9, 4),
}
THREADS = 8
# the sanitizer run (test_kernels_sanitize.py) lowers it: instrumented code is ~10x slower
RUNS_PER_THREAD = int(os.environ.get("GRAPHPRUNE_TEST_RUNS_PER_THREAD", "500"))


def sparse_weight(op: str, rng, keep: float, nnz: int | None = None):
    """(values, index) of a random valid weight of `op`: `nnz` (or a `keep` fraction of) block positions."""
    _, space, width = OPS[op]
    nnz = int(space * keep) if nnz is None else nnz
    index = np.sort(rng.choice(space, nnz, replace=False)).astype(np.int32)
    values = rng.standard_normal((nnz, width) if width > 1 else nnz).astype(np.float32)
    return values, index


def model_bytes() -> bytes:
    """Three nodes, one per op; X, values and index of each are graph inputs, the bias an initializer."""
    rng = np.random.default_rng(1)
    nodes, inputs, inits = [], [], []
    for op, (attrs, _, width) in OPS.items():
        x = "x2" if op == "GpBsrConv" else "x1"
        nodes.append(helper.make_node(op, [x, f"{op}_values", f"{op}_index", f"{op}_bias"], [f"{op}_y"],
                                      name=f"{op}_node", domain=ops.DOMAIN, **attrs))
        vshape = ["nnz", width] if width > 1 else ["nnz"]
        inputs += [helper.make_tensor_value_info(f"{op}_values", TensorProto.FLOAT, vshape),
                   helper.make_tensor_value_info(f"{op}_index", TensorProto.INT32, ["nnz"])]
        n_out = COUT if op == "GpBsrConv" else N
        inits.append(numpy_helper.from_array(rng.standard_normal(n_out).astype(np.float32), f"{op}_bias"))
    inputs += [helper.make_tensor_value_info("x1", TensorProto.FLOAT, ["m", K]),
               helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["b", CIN, HW[0], HW[1]])]
    outputs = [helper.make_tensor_value_info(f"{op}_y", TensorProto.FLOAT, None) for op in OPS]
    graph = helper.make_graph(nodes, "concurrency", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(ops.DOMAIN, ops.VERSION)])
    model.ir_version = 8
    return model.SerializeToString(), {i.name: numpy_helper.to_array(i) for i in inits}


def make_session(threads: int = 1):
    blob, biases = model_bytes()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.register_custom_ops_library(gk.library_path())
    return ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"]), biases


def feeds_for(weights: dict, x1, x2) -> dict:
    feeds = {"x1": x1, "x2": x2}
    for op, (values, index) in weights.items():
        feeds[f"{op}_values"], feeds[f"{op}_index"] = values, index
    return feeds


def reference(op: str, feeds: dict, biases: dict):
    attrs = OPS[op][0]
    x = feeds["x2" if op == "GpBsrConv" else "x1"]
    return ops.reference(op, [x, feeds[f"{op}_values"], feeds[f"{op}_index"], biases[f"{op}_bias"]], attrs)


def assert_matches_numpy(outs, feeds, biases):
    for op, out in zip(OPS, outs, strict=True):
        np.testing.assert_allclose(out, reference(op, feeds, biases), rtol=1e-4, atol=1e-3, err_msg=op)


def threaded_runs() -> dict:
    """THREADS threads x RUNS_PER_THREAD runs of one session, alternating two weights per op as graph
    inputs; every output compared bit for bit with the same session's single-threaded result."""
    rng = np.random.default_rng(2)
    sess, biases = make_session()
    x1 = rng.standard_normal((4, K)).astype(np.float32)
    x2 = rng.standard_normal((1, CIN) + HW).astype(np.float32)
    # two weights per op with different sparsity (so different nnz and different decodes)
    configs = [feeds_for({op: sparse_weight(op, rng, keep) for op in OPS}, x1, x2) for keep in (0.5, 0.2)]
    expected = []
    for feeds in configs:
        outs = sess.run(None, feeds)
        assert_matches_numpy(outs, feeds, biases)
        expected.append(outs)

    wrong, done, errors = [], [0] * THREADS, []
    start = threading.Barrier(THREADS)

    def worker(t: int):
        try:
            start.wait()
            for r in range(RUNS_PER_THREAD):
                which = (t + r) % 2
                for op, out, want in zip(OPS, sess.run(None, configs[which]), expected[which], strict=True):
                    if not np.array_equal(out, want):
                        wrong.append((t, r, op, float(np.nanmax(np.abs(out - want)))))
                done[t] += 1
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            errors.append(repr(exc))

    began = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return {"runs": sum(done), "wrong": wrong, "errors": errors, "seconds": time.perf_counter() - began}


def test_threads_share_one_session_with_alternating_index_arrays():
    # in a child process: a kernel racing on shared state can crash instead of giving wrong numbers
    proc = subprocess.run([sys.executable, __file__, "--threaded"], capture_output=True, text=True, check=False,
                          timeout=120)
    assert proc.returncode == 0, f"child died (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["errors"], result["errors"][:3]
    assert result["runs"] == THREADS * RUNS_PER_THREAD
    wrong = result["wrong"]
    assert not wrong, f"{len(wrong)} wrong results in {result['runs']} runs ({result['seconds']:.1f} s): {wrong[:5]}"


def test_valid_then_rejected_then_valid_index_gives_the_valid_result():
    rng = np.random.default_rng(3)
    sess, biases = make_session()
    x1 = rng.standard_normal((3, K)).astype(np.float32)
    x2 = rng.standard_normal((2, CIN) + HW).astype(np.float32)
    good = feeds_for({op: sparse_weight(op, rng, 0.4) for op in OPS}, x1, x2)
    first = sess.run(None, good)
    assert_matches_numpy(first, good, biases)
    for op in OPS:
        # valid up to the last entry, so a decode that stops there has already rewritten most of its state
        bad = dict(good)
        bad_index = good[f"{op}_index"].copy()
        bad_index[-1] = bad_index[-2]
        bad[f"{op}_index"] = bad_index
        with pytest.raises(Exception, match=f"{op}.*'{op}_node'.*not strictly ascending"):
            sess.run(None, bad)
        again = sess.run(None, good)  # the very same arrays as the first run
        for name, a, b in zip(OPS, first, again, strict=True):
            assert np.array_equal(a, b), f"{name} after a rejected {op} index: max error {np.max(np.abs(a - b))}"


def test_index_changed_in_place_is_decoded_again():
    rng = np.random.default_rng(4)
    sess, biases = make_session()
    x1 = rng.standard_normal((2, K)).astype(np.float32)
    x2 = rng.standard_normal((1, CIN) + HW).astype(np.float32)
    weights = {op: sparse_weight(op, rng, 0.3) for op in OPS}
    feeds = feeds_for(weights, x1, x2)
    assert_matches_numpy(sess.run(None, feeds), feeds, biases)
    for op, (values, index) in weights.items():
        new_values, new_index = sparse_weight(op, rng, 0.0, nnz=len(index))  # same size, other positions
        assert not np.array_equal(new_index, index)
        values[...] = new_values  # the arrays the feeds dict holds, changed in place
        index[...] = new_index
    assert_matches_numpy(sess.run(None, feeds), feeds, biases)


def test_constant_index_session_shared_by_threads_with_intra_op_pool():
    # the usual deployment: weights are initializers, the session has its own pool too
    rng = np.random.default_rng(5)
    w = rng.standard_normal((K, N)).astype(np.float32)
    values, index = ops.pack_bsr_matmul(w, rng.random((K, N // 16)) > 0.5)
    bias = rng.standard_normal(N).astype(np.float32)
    node = ops.make_node("GpBsrMatMul", ["x", "v", "i", "b"], "y", "bsr_const", K=K, N=N)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", N])],
        [numpy_helper.from_array(values, "v"), numpy_helper.from_array(index, "i"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(ops.DOMAIN, ops.VERSION)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    opts.register_custom_ops_library(gk.library_path())
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    xs = [rng.standard_normal((m, K)).astype(np.float32) for m in (1, 16)]
    want = [sess.run(None, {"x": x})[0] for x in xs]
    for x, y in zip(xs, want, strict=True):
        np.testing.assert_allclose(y, ops.reference("GpBsrMatMul", [x, values, index, bias], {"K": K, "N": N}),
                                   rtol=1e-4, atol=1e-3)
    wrong = []

    def worker(t):
        for r in range(40):
            got = sess.run(None, {"x": xs[(t + r) % 2]})[0]
            if not np.array_equal(got, want[(t + r) % 2]):
                wrong.append((t, r))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not wrong


if __name__ == "__main__" and "--threaded" in sys.argv:
    print(json.dumps(threaded_runs()), flush=True)
