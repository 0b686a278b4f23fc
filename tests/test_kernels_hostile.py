"""Hostile attributes, shapes and index arrays for every native ai.graphprune op.

Every case must give an onnxruntime error naming the op and the node (or, for the legal edge cases such as
empty tensors, the numpy reference result) and never crash the process. The library used to write past its
buffers on some of these (negative pads: heap overflow, SIGSEGV), so all cases run in one child process
(this file run as a script) that reports each result as a JSON line: a crash fails the cases it did not
finish instead of killing pytest. The same cases run under AddressSanitizer in test_kernels_sanitize.py.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest

import graphprune.kernels as gk
from graphprune.kernels import ops

NODE = "hostile0"
ROLES = ("x", "values", "index", "bias")


def raw_model(op: str, attrs: dict, arrays: dict, fed=("x",), name: str = NODE, opset: int = 17,
              with_function: bool = True):
    """One-node model of `op` with exactly `attrs` (nothing filled in) and the four `arrays`; those named in
    `fed` become graph inputs (fed at run time), the rest initializers. By default it carries the op's
    function body, as the sparsify pass emits it."""
    from onnx import helper, numpy_helper

    node = helper.make_node(op, list(ROLES), ["y"], name=name, domain=ops.DOMAIN, **attrs)
    inputs = [helper.make_tensor_value_info(r, helper.np_dtype_to_tensor_dtype(arrays[r].dtype), arrays[r].shape)
              for r in ROLES if r in fed]
    inits = [numpy_helper.from_array(arrays[r], r) for r in ROLES if r not in fed]
    out = helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(np.dtype(np.float32)),
                                        [f"d{i}" for i in range(arrays["x"].ndim)])
    graph = helper.make_graph([node], "g", inputs, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    if with_function:
        ops.attach_functions(model)
    else:
        model.opset_import.append(helper.make_opsetid(ops.DOMAIN, ops.VERSION))
    return model, {r: arrays[r] for r in ROLES if r in fed}


def session(model_bytes: bytes, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 4
    opts.register_custom_ops_library(gk.library_path())
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


# ---- valid baselines the cases perturb ----------------------------------------------------------------------
def _rng():
    return np.random.default_rng(7)


def matmul_base(op: str):
    rng = _rng()
    k, n = 12, 40
    w = rng.standard_normal((k, n)).astype(np.float32)
    if op == "GpBsrMatMul":
        values, index = ops.pack_bsr_matmul(w, rng.random((k, 3)) > 0.4)
    else:
        values, index = ops.pack_csr_matmul(w, rng.random((k, n)) > 0.7)
    arrays = dict(x=rng.standard_normal((3, k)).astype(np.float32), values=values, index=index,
                  bias=rng.standard_normal(n).astype(np.float32))
    return dict(K=k, N=n, clip_min=-math.inf, clip_max=math.inf), arrays


def conv_base():
    rng = _rng()
    cin, cout = 3, 6
    w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    values, index = ops.pack_bsr_conv(w, rng.random((2, cin * 9)) > 0.4)
    arrays = dict(x=rng.standard_normal((2, cin, 7, 8)).astype(np.float32), values=values, index=index,
                  bias=rng.standard_normal(cout).astype(np.float32))
    attrs = dict(in_channels=cin, out_channels=cout, kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1],
                 dilations=[1, 1], clip_min=0.0, clip_max=6.0)
    return attrs, arrays


@dataclass
class Case:
    id: str
    op: str
    attrs: dict = field(default_factory=dict)      # overrides of the base attributes (None: drop it)
    arrays: dict = field(default_factory=dict)     # replacements of base arrays (callables get the base)
    fed: tuple = ("x",)
    expect: str | None = None                      # regex the error must match; None: must run correctly

    def build(self):
        attrs, arrays = conv_base() if self.op == "GpBsrConv" else matmul_base(self.op)
        for key, value in self.attrs.items():
            if value is None:
                attrs.pop(key, None)
            else:
                attrs[key] = value
        for key, value in self.arrays.items():
            arrays[key] = value(arrays[key]) if callable(value) else value
        return attrs, arrays


def _index_cases(op: str, space: int) -> list[Case]:
    """Bad index arrays, each both as a constant initializer (caught at session creation) and as a graph
    input (caught at run time)."""
    bad = {
        "index_past_end": (lambda ix: np.concatenate([ix[:-1], [space]]).astype(np.int32), "out of range"),
        "index_far_past_end": (lambda ix: np.concatenate([ix[:-1], [2**31 - 1]]).astype(np.int32), "out of range"),
        "index_negative": (lambda ix: np.concatenate([[-5], ix[1:]]).astype(np.int32), "out of range"),
        "index_unsorted": (lambda ix: ix[::-1].copy(), "not strictly ascending"),
        "index_duplicate": (lambda ix: np.concatenate([ix[:1], ix[:-1]]).astype(np.int32), "not strictly ascending"),
    }
    cases = []
    for name, (make, expect) in bad.items():
        cases.append(Case(f"{op}-{name}-initializer", op, arrays={"index": make}, expect=expect))
        cases.append(Case(f"{op}-{name}-input", op, arrays={"index": make}, fed=("x", "index"), expect=expect))
    return cases


def _drop_last_block(v):
    return v[:-1].copy()


MATMUL_CASES: list[Case] = []
for _op in ("GpBsrMatMul", "GpCsrMatMul"):
    _width_shape = (lambda v: v.reshape(-1, 8)) if _op == "GpBsrMatMul" else (lambda v: v.reshape(-1, 1))
    _space = 12 * 3 if _op == "GpBsrMatMul" else 12 * 40
    MATMUL_CASES += [
        Case(f"{_op}-K-zero", _op, attrs={"K": 0}, expect="K = 0"),
        Case(f"{_op}-K-negative", _op, attrs={"K": -12}, expect="K = -12"),
        Case(f"{_op}-N-zero", _op, attrs={"N": 0}, expect="N = 0"),
        Case(f"{_op}-N-huge", _op, attrs={"N": 2**40}, expect=r"N = 1099511627776 must be in"),
        Case(f"{_op}-index-space-overflow", _op, attrs={"K": 2**30, "N": 2**12}, expect="index space"),
        Case(f"{_op}-K-missing", _op, attrs={"K": None}, expect="attribute K is missing"),
        Case(f"{_op}-K-float", _op, attrs={"K": 12.0}, expect="attribute K is missing or not an int"),
        Case(f"{_op}-clip-missing", _op, attrs={"clip_max": None}, expect="clip_max is missing"),
        Case(f"{_op}-clip-nan", _op, attrs={"clip_min": math.nan}, expect="clip_min"),
        Case(f"{_op}-clip-inverted", _op, attrs={"clip_min": 1.0, "clip_max": -1.0}, expect="clip_min <= clip_max"),
        Case(f"{_op}-x-last-dim", _op, arrays={"x": np.ones((3, 11), np.float32)}, expect=r"X must be \[\.\.\., 12\]"),
        Case(f"{_op}-x-scalar", _op, arrays={"x": np.array(1.0, np.float32)}, expect=r"X must be \[\.\.\., 12\]"),
        Case(f"{_op}-values-shape", _op, arrays={"values": _width_shape}, expect="values must be"),
        Case(f"{_op}-values-shape-input", _op, arrays={"values": _width_shape}, fed=("x", "values"),
             expect="values must be"),
        Case(f"{_op}-counts-mismatch", _op, arrays={"values": _drop_last_block}, expect="blocks but"),
        Case(f"{_op}-counts-mismatch-input", _op, arrays={"values": _drop_last_block}, fed=("x", "values"),
             expect="blocks but"),
        Case(f"{_op}-index-2d", _op, arrays={"index": lambda ix: ix.reshape(1, -1)}, expect="must be 1-D"),
        Case(f"{_op}-bias-length", _op, arrays={"bias": np.zeros(39, np.float32)}, expect=r"bias B must be \[40\]"),
        Case(f"{_op}-bias-length-input", _op, arrays={"bias": np.zeros(41, np.float32)}, fed=("x", "bias"),
             expect=r"bias B must be \[40\]"),
        Case(f"{_op}-bias-2d", _op, arrays={"bias": np.zeros((1, 40), np.float32)}, expect=r"bias B must be"),
        Case(f"{_op}-index-int64", _op, arrays={"index": lambda ix: ix.astype(np.int64)}, expect="index"),
        # legal edge cases: empty tensors run and match numpy
        Case(f"{_op}-x-no-rows", _op, arrays={"x": np.ones((0, 12), np.float32)}),
        Case(f"{_op}-nothing-kept", _op, fed=("x", "values", "index"),
             arrays={"values": lambda v: v[:0].copy(), "index": np.zeros(0, np.int32)}),
    ] + _index_cases(_op, _space)


CONV_CASES = [
    Case("conv-pads-negative", "GpBsrConv", attrs={"pads": [-3, -3, -3, -3]}, expect="pads"),
    # still a positive output size: the old kernel copied X to before/after its padded buffer (heap overflow)
    Case("conv-pads-negative-output-nonempty", "GpBsrConv", attrs={"pads": [-1, -1, -1, -1]}, expect="pads"),
    Case("conv-pads-negative-left", "GpBsrConv", attrs={"pads": [0, -2, 0, 0], "kernel_shape": [1, 1]},
         arrays={"values": lambda v: v[:0].copy(), "index": np.zeros(0, np.int32)}, expect="pads"),
    Case("conv-pads-one-negative", "GpBsrConv", attrs={"pads": [1, 1, 1, -1]}, expect="pads"),
    Case("conv-pads-huge", "GpBsrConv", attrs={"pads": [2**40, 0, 0, 0]}, expect="pads"),
    Case("conv-pads-large-but-capped", "GpBsrConv", attrs={"pads": [2**20, 2**20, 2**20, 2**20]},
         expect="add more than"),
    # legal for ONNX, but gigabytes of padding around a 7x8 image
    Case("conv-pads-oversized", "GpBsrConv", attrs={"pads": [20000, 20000, 20000, 20000]}, expect="add more than"),
    Case("conv-pads-oversized-one-side", "GpBsrConv", attrs={"pads": [0, 0, 0, 9]}, expect="add more than"),
    Case("conv-pads-largest-allowed", "GpBsrConv", attrs={"pads": [3, 4, 3, 4]}),  # 6 <= 2 x 3, 8 <= W
    Case("conv-pads-count", "GpBsrConv", attrs={"pads": [1, 1]}, expect="pads must have 4 values"),
    Case("conv-pads-missing", "GpBsrConv", attrs={"pads": None}, expect="attribute pads is missing"),
    Case("conv-strides-zero", "GpBsrConv", attrs={"strides": [0, 1]}, expect="strides"),
    Case("conv-strides-negative", "GpBsrConv", attrs={"strides": [1, -2]}, expect="strides"),
    Case("conv-strides-huge", "GpBsrConv", attrs={"strides": [2**62, 1]}, expect="strides"),
    Case("conv-dilations-zero", "GpBsrConv", attrs={"dilations": [1, 0]}, expect="dilations"),
    Case("conv-kernel-zero", "GpBsrConv", attrs={"kernel_shape": [0, 3]}, expect="kernel_shape"),
    Case("conv-kernel-3d", "GpBsrConv", attrs={"kernel_shape": [3, 3, 3]}, expect="kernel_shape must have 2"),
    Case("conv-kernel-larger-than-input", "GpBsrConv", attrs={"pads": [0, 0, 0, 0]},
         arrays={"x": np.ones((2, 3, 2, 8), np.float32)}, expect="does not fit the padded input"),
    # numerator (H - extent) = -1 with stride 2: C division would round it to an output row past the image
    Case("conv-kernel-one-too-large-strided", "GpBsrConv", attrs={"pads": [0, 0, 0, 0], "strides": [2, 2]},
         arrays={"x": np.ones((2, 3, 8, 2), np.float32)}, expect="does not fit the padded input"),
    Case("conv-dilated-kernel-larger-than-input", "GpBsrConv", attrs={"dilations": [4, 1]},
         arrays={"x": np.ones((2, 3, 6, 8), np.float32)}, expect="does not fit the padded input"),
    Case("conv-x-empty-rows", "GpBsrConv", attrs={"pads": [0, 0, 0, 0]},
         arrays={"x": np.ones((2, 3, 0, 8), np.float32)}, expect="does not fit the padded input"),
    Case("conv-group", "GpBsrConv", attrs={"group": 3}, expect="group = 3"),
    Case("conv-auto-pad", "GpBsrConv", attrs={"auto_pad": "SAME_UPPER"}, expect="auto_pad"),
    Case("conv-in-channels-zero", "GpBsrConv", attrs={"in_channels": 0}, expect="in_channels = 0"),
    Case("conv-out-channels-negative", "GpBsrConv", attrs={"out_channels": -6}, expect="out_channels = -6"),
    Case("conv-index-space-overflow", "GpBsrConv", attrs={"in_channels": 2**16, "kernel_shape": [2**8, 2**8]},
         expect="index space"),
    Case("conv-clip-inverted", "GpBsrConv", attrs={"clip_min": 6.0, "clip_max": 0.0}, expect="clip_min <= clip_max"),
    Case("conv-x-rank-3", "GpBsrConv", arrays={"x": np.ones((3, 7, 8), np.float32)}, expect="X must be"),
    Case("conv-x-channels", "GpBsrConv", arrays={"x": np.ones((2, 4, 7, 8), np.float32)}, expect="in_channels"),
    Case("conv-values-width", "GpBsrConv", arrays={"values": lambda v: v.reshape(-1, 2)}, expect="values must be"),
    Case("conv-values-rank-1-input", "GpBsrConv", arrays={"values": lambda v: v.reshape(-1)},
         fed=("x", "values"), expect="values must be"),
    Case("conv-counts-mismatch-input", "GpBsrConv", arrays={"values": _drop_last_block}, fed=("x", "values"),
         expect="blocks but"),
    Case("conv-bias-length", "GpBsrConv", arrays={"bias": np.zeros(4, np.float32)}, expect=r"bias B must be \[6\]"),
    Case("conv-index-int64-input", "GpBsrConv", arrays={"index": lambda ix: ix.astype(np.int64)},
         fed=("x", "index"), expect="index"),
    # legal edge cases
    Case("conv-x-empty-batch", "GpBsrConv", arrays={"x": np.ones((0, 3, 7, 8), np.float32)}),
    Case("conv-x-empty-rows-padded", "GpBsrConv", attrs={"kernel_shape": [1, 1], "pads": [1, 0, 1, 0]},
         arrays={"values": lambda v: v[:0].copy(), "index": np.zeros(0, np.int32),
                 "x": np.ones((1, 3, 0, 8), np.float32)}),
    Case("conv-nothing-kept", "GpBsrConv", fed=("x", "values", "index"),
         arrays={"values": lambda v: v[:0].copy(), "index": np.zeros(0, np.int32)}),
] + _index_cases("GpBsrConv", 2 * 27)

CASES = MATMUL_CASES + CONV_CASES


def run_case(case: Case) -> dict:
    """Session creation and one run; the error text, or how far the output is from numpy."""
    attrs, arrays = case.build()
    model, feeds = raw_model(case.op, attrs, arrays, case.fed)
    try:
        sess = session(model.SerializeToString())
        out = sess.run(None, feeds)[0]
    except Exception as exc:  # noqa: BLE001 - the message is the result
        return {"error": str(exc)}
    try:
        ref = ops.reference(case.op, [arrays[r] for r in ROLES], attrs)
    except Exception as exc:  # noqa: BLE001 - a hostile case numpy cannot evaluate either
        return {"ran_without_error": True, "reference_error": str(exc)}
    same_shape = out.shape == ref.shape
    return {"shape_ok": same_shape, "max_err": float(np.max(np.abs(out - ref), initial=0.0)) if same_shape else None}


def _child(first: int) -> None:
    for case in CASES[first:]:
        print(json.dumps({"case": case.id, "started": True}), flush=True)
        print(json.dumps({"case": case.id, **run_case(case)}), flush=True)


@pytest.fixture(scope="module")
def hostile_results():
    """Runs the cases in a child process; when it dies, records the case it died in and goes on with the
    next one in a fresh child, so every case gets a verdict."""
    if not gk.available():
        pytest.skip(gk.status())
    results, first = {}, 0
    while first < len(CASES):
        proc = subprocess.run([sys.executable, __file__, "--child", str(first)], capture_output=True, text=True,
                              check=False, timeout=300, env=dict(os.environ))
        last = None
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                last = rec["case"]
                if not rec.get("started"):
                    results[last] = rec
        if proc.returncode == 0:
            break
        ids = [c.id for c in CASES]
        crashed = ids.index(last) if last is not None else first
        results.setdefault(ids[crashed], {"crash": proc.returncode, "stderr": proc.stderr[-2000:]})
        first = crashed + 1
    return results


native = pytest.mark.skipif(not gk.available(), reason=gk.status())


def test_every_op_has_hostile_cases():
    assert {c.op for c in CASES} == set(ops.OP_TYPES)
    assert len({c.id for c in CASES}) == len(CASES)


@native
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hostile_case_is_an_error_naming_the_op_never_a_crash(case, hostile_results):
    rec = hostile_results[case.id]
    assert "crash" not in rec, f"{case.id} killed the process (exit {rec.get('crash')}): {rec.get('stderr')}"
    if case.expect is None:
        assert "error" not in rec, rec.get("error")
        assert rec["shape_ok"] and rec["max_err"] <= 1e-4, rec
        return
    assert "error" in rec, f"{case.id}: ran without an error: {rec}"
    msg = rec["error"]
    assert case.op in msg and NODE in msg, msg
    assert re.search(case.expect, msg), f"{case.id}: {msg!r} does not match {case.expect!r}"


def test_negative_pads_model_without_function_body_passes_the_onnx_checker():
    # why the kernel must defend itself: without the function body the checker knows nothing of the op
    import onnx

    case = next(c for c in CASES if c.id == "conv-pads-negative-output-nonempty")
    model, _ = raw_model(case.op, *case.build(), case.fed, with_function=False)
    onnx.checker.check_model(model, full_check=True)


if __name__ == "__main__" and "--child" in sys.argv:
    _child(int(sys.argv[sys.argv.index("--child") + 1]))
