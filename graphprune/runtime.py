"""onnxruntime, one way: sessions, intermediate tensors exposed as outputs, batched runs, onnx's checker, and
the tolerance two computations of the same values are compared with.

Sessions run with onnxruntime's graph optimisations OFF unless asked: fusions rewrite the graph we built, and
a graph bug (a wrong mask, a wrong weight slice) can then hide behind the fused kernel. Timing and fidelity
measurements ask for them, as they describe the model as it will be deployed.

Every onnxruntime failure, at load or at run time, becomes a GraphpruneError naming the model and, where
onnxruntime says so, the node and op.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from .errors import GraphpruneError
from .feeds import batches
from .ir import subgraph_outer_names

CPU = ("CPUExecutionProvider",)
# onnx.checker serialises the model: protobuf refuses messages of 2 GiB, so larger models are not checked
# (the 1 MiB margin covers the checker's own wrapping of the message)
CHECK_LIMIT = (1 << 31) - (1 << 20)


class OnnxRuntimeError(GraphpruneError):
    """onnxruntime failed on a model; `model`, `node` and `op` say where (None when onnxruntime did not)."""

    def __init__(self, message, model=None, node=None, op=None):
        super().__init__(message)
        self.model, self.node, self.op = model, node, op


class SessionError(OnnxRuntimeError):
    """onnxruntime refused to load a model."""


class RunError(OnnxRuntimeError):
    """onnxruntime failed while running a model."""


class ExposeError(GraphpruneError):
    """A tensor asked for as an output that the model does not compute, or whose type is unknown."""


# ---- sessions ----------------------------------------------------------------------------------------------
class Session(ort.InferenceSession):
    """An onnxruntime session whose failures are OnnxRuntimeErrors naming the model (and node)."""

    def __init__(self, model_bytes_or_path, options, providers, model_name: str):
        self.model_name = model_name
        try:
            super().__init__(model_bytes_or_path, options, providers=list(providers))
        except Exception as exc:  # onnxruntime's pybind exceptions share no base class below Exception
            raise _translate(exc, SessionError, "load", model_name) from exc

    def run(self, output_names, input_feed, run_options=None):
        try:
            return super().run(output_names, input_feed, run_options)
        except Exception as exc:
            raise _translate(exc, RunError, "run", self.model_name) from exc


def session(model, *, optimize: bool = False, threads: int | None = None, providers=CPU,
            custom_ops: bool = False, log_level: int = 4, name: str | None = None) -> Session:
    """A session for `model` (ModelProto, serialized bytes or a path).
    optimize: onnxruntime's full graph optimisations (off by default, see the module docstring).
    threads: intra-op threads (inter-op then 1); None: onnxruntime's default.
    custom_ops: register graphprune's native kernel library for the ai.graphprune ops when it is built;
      without it those ops run through their function bodies.
    log_level: onnxruntime's log severity threshold (3: errors only, 4: fatal only; default 4: its errors
      reach the caller as exceptions, and the CLI prints each as one line).
    name: what errors call the model (default: its graph name, or the path)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = log_level
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if custom_ops:
        from . import kernels
        if kernels.available():
            kernels.session_options(opts)
    if isinstance(model, onnx.ModelProto):
        return Session(model.SerializeToString(), opts, providers, name or model.graph.name or "model")
    if isinstance(model, (str, Path)):
        return Session(str(model), opts, providers, name or str(model))
    return Session(model, opts, providers, name or "model")


# onnxruntime names the failing node in one of these forms
_NODE_PATTERNS = (
    re.compile(r"running (?P<op>[\w.]+) node\. Name:'(?P<node>[^']*)'"),      # run time
    re.compile(r"Node \((?P<node>[^)]*)\) Op \((?P<op>[\w.]+)\)"),            # load: shape/type inference
    re.compile(r"In Node, \(\"(?P<node>[^\"]*)\", (?P<op>[\w.]+),"),          # load: graph resolution
    re.compile(r"node (?P<node>\S+) of type (?P<op>[\w.]+)", re.IGNORECASE),
)


def _translate(exc: Exception, cls, stage: str, model_name: str) -> OnnxRuntimeError:
    text = str(exc).strip()
    detail = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    node = op = None
    for pattern in _NODE_PATTERNS:
        m = pattern.search(text)
        if m:
            node, op = m.group("node"), m.group("op")
            break
    where = f" at node '{node}' ({op})" if node is not None else ""
    return cls(f"onnxruntime could not {stage} model '{model_name}'{where}: {detail}", model_name, node, op)


# ---- exposing intermediate tensors ---------------------------------------------------------------------------
def expose(model: onnx.ModelProto, names, elem_types: dict | None = None, *, only: bool = False) -> onnx.ModelProto:
    """A copy of `model` whose outputs include the tensors `names` (intermediates, inputs or initializers).
    Element types come from `elem_types` (name -> onnx elem type), else from the model's inputs, outputs,
    initializers and value_info, else from onnx's shape inference.
    only: the outputs are exactly `names`, and only the nodes, initializers and inputs that compute them are
      kept (a partial model: running it costs only what the exposed tensors need)."""
    names = list(dict.fromkeys(names))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    types = _declared_types(model.graph)
    types.update({k: v for k, v in (elem_types or {}).items() if v})
    computed = set(types) | {o for n in g.node for o in n.output}
    absent = [n for n in names if n not in computed]
    if absent:
        raise ExposeError(f"model '{g.name}' computes no tensor named {absent}")
    untyped = [n for n in names if n not in types]
    if untyped:
        types.update(_inferred_types(model, untyped))
        still = [n for n in untyped if n not in types]
        if still:
            producers = {o: f"{n.name or '?'} ({n.op_type})" for n in g.node for o in n.output}
            raise ExposeError(f"model '{g.name}': no element type known for tensor(s) "
                              + ", ".join(f"'{n}' (output of node {producers.get(n, '?')})" for n in still))
    if only:
        _keep_ancestors(g, names)
        del g.output[:]
    have = {o.name for o in g.output}
    g.output.extend(helper.make_tensor_value_info(n, types[n], None) for n in names if n not in have)
    return out


def _declared_types(g: onnx.GraphProto) -> dict[str, int]:
    types = {t.name: t.data_type for t in g.initializer}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _inferred_types(model: onnx.ModelProto, names) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is a best effort here: the caller names what stays unknown
        return {}
    types = _declared_types(inferred.graph)
    return {n: types[n] for n in names if n in types}


def _keep_ancestors(g: onnx.GraphProto, names) -> None:
    """Drop the nodes, initializers and inputs that `names` do not depend on (nodes stay in graph order)."""
    need = set(names)
    keep = []
    for node in reversed(g.node):
        if any(o in need for o in node.output):
            keep.append(node)
            need.update(i for i in node.input if i)
            need.update(subgraph_outer_names(node))
    nodes = list(reversed(keep))
    inits = [t for t in g.initializer if t.name in need]
    inputs = [i for i in g.input if i.name in need]
    del g.node[:], g.initializer[:], g.input[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    g.input.extend(inputs)


# ---- running ---------------------------------------------------------------------------------------------------
def run(session_or_model, feeds: dict, outputs=None, batch: int | None = None,
        unbatched: dict | None = None) -> dict[str, np.ndarray]:
    """Run on `feeds`; returns {output name: array} for `outputs` (None: every model output), in order.
    A ModelProto (or bytes/path) gets a default `session()`. Feeds the model has no input for are ignored.
    batch: run `batch` samples (first axis) at a time and concatenate the results along that axis.
    unbatched: feeds given whole to every batch (mask inputs and other per-run constants)."""
    sess = session_or_model if isinstance(session_or_model, ort.InferenceSession) else session(session_or_model)
    names = list(outputs) if outputs is not None else [o.name for o in sess.get_outputs()]
    inputs = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in inputs}
    extra = {k: v for k, v in (unbatched or {}).items() if k in inputs}
    parts = [feeds] if batch is None or not feeds else batches(feeds, batch)
    results = [sess.run(names, {**part, **extra}) for part in parts]
    if len(results) == 1:
        return dict(zip(names, results[0]))
    return {name: np.concatenate([r[k] for r in results]) for k, name in enumerate(names)}


# ---- onnx's checker --------------------------------------------------------------------------------------------
def check_model(model: onnx.ModelProto) -> bool:
    """onnx's full check (strict type and shape inference included); raises onnx.checker.ValidationError.
    Returns False when the model was too large to check (see CHECK_LIMIT), True when it passed."""
    if model.ByteSize() >= CHECK_LIMIT:
        return False
    onnx.checker.check_model(model, full_check=True)
    return True


# ---- tolerances --------------------------------------------------------------------------------------------
# Unit roundoff u (half the gap between 1 and the next value) of the low-precision float types.
_UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
# float32 (and float64, whose values here are float32 computations cast up): the tolerance verification has
# always used; it passes the whole model corpus with its summation-order differences.
_FLOAT32 = (1e-5, 1e-4)
# sparse kernels accumulate in blocks, in another order than the dense kernel: 10x the absolute term
REORDERED_SUMS_FACTOR = 10.0


def tolerance(dtype, *, reordered_sums: bool = False) -> tuple[float, float]:
    """(atol, rtol) for comparing two computations of the same tensor of element type `dtype` (numpy dtype,
    its name, or an onnx TensorProto elem type). A value b passes against the reference a when
        |a − b| ≤ atol · max(1, max|a|) + rtol · |a|
    float32/float64: (1e-5, 1e-4). float16/bfloat16: every stored intermediate is rounded to the type, and
    the two sides round differently, so allow a few roundings of the largest value (atol = 4u) and twenty of
    each value (rtol = 20u), u the type's unit roundoff (2⁻¹¹, 2⁻⁸). atol is 4u, not 2u, because a squashing
    output (tanh, sigmoid) carries the roundings of its larger pre-activation near 0: BERT's fp16 pooler_output
    measured 0.0015 (3u) after pruning whole heads; its hidden states differ by up to 3u of their largest value
    (0.0078) with or without whole heads. Integer and bool tensors compare exactly: (0, 0).
    reordered_sums: one side sums in another order (the block-sparse kernels): atol × 10."""
    name = _dtype_name(dtype)
    if name in _UNIT_ROUNDOFF:
        u = _UNIT_ROUNDOFF[name]
        atol, rtol = 4 * u, 20 * u
    elif name in ("float32", "float64"):
        atol, rtol = _FLOAT32
    else:
        return 0.0, 0.0
    return (atol * REORDERED_SUMS_FACTOR if reordered_sums else atol), rtol


def _dtype_name(dtype) -> str:
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        if dtype == onnx.TensorProto.BFLOAT16:
            return "bfloat16"
        return np.dtype(helper.tensor_dtype_to_np_dtype(int(dtype))).name
    if isinstance(dtype, str):
        return dtype
    return np.dtype(dtype).name


@dataclass
class Mismatch:
    """How a tensor compares with its reference."""
    bad: bool
    max_abs_diff: float
    scale: float        # max(1, max|reference|): what atol is relative to
    reason: str


def compare_arrays(want, got, *, reordered_sums: bool = False, atol: float | None = None,
                   rtol: float | None = None) -> Mismatch:
    """Compare `got` with the reference `want` within `tolerance(want.dtype)` (or the given atol/rtol);
    non-finite values must sit at the same places in both."""
    a, b = np.asarray(want), np.asarray(got)
    if a.shape != b.shape:
        return Mismatch(True, float("inf"), 1.0, f"shape {b.shape} instead of {a.shape}")
    if a.dtype.kind != "f":
        same = bool(np.array_equal(a, b))
        return Mismatch(not same, 0.0 if same else float("inf"), 1.0, "" if same else "values differ")
    default_atol, default_rtol = tolerance(a.dtype, reordered_sums=reordered_sums)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    m = float(np.nanmax(diff)) if diff.size and not np.all(np.isnan(diff)) else 0.0
    scale = max(1.0, float(np.max(np.abs(a)))) if a.size else 1.0
    bad = not np.all(np.isfinite(a) == np.isfinite(b)) or bool(np.any(diff > atol * scale + rtol * np.abs(a)))
    return Mismatch(bad, m, scale, f"max abs diff {m:.3g} (tolerance {atol:g} × {scale:.3g} + {rtol:g} × |ref|)")


__all__ = ["session", "Session", "expose", "run", "check_model", "tolerance", "compare_arrays", "Mismatch",
           "OnnxRuntimeError", "SessionError", "RunError", "ExposeError", "CPU"]
