"""Parameter and multiply-accumulate counts from shapes, symbolic dims taken at representative values.

A symbolic dim ("seq", "batch") has no size in the graph. Counting it as 1 makes MACs "per token", so attention's
seq x seq MatMuls weigh nothing next to the projections and a MACs target cannot see them. Instead the counts
substitute representative values (`representative_dims`: --dim, else the calibration data's shapes, else the
defaults random verification inputs use) into the inferred shapes; names onnx made up for dims it could not relate
to an input dim ("unk__3") still count as 1. The graph itself keeps its dynamic dims: only the counting changes.

A parameter is a learned weight: a float initializer, or an integer one of a quantised model (int8/uint8/int16
weights, the int32 bias of a quantised op). Shape constants, axes and indices (Reshape targets, Slice bounds,
Gather indices: int64, or int32 from some exporters) are not parameters, and neither are scalars."""
from __future__ import annotations

import numpy as np
import onnx

from .errors import GraphpruneError
from .ir import Graph, attr, subgraphs


def _prod(dims) -> int:
    return int(np.prod([d if isinstance(d, int) else 1 for d in dims], dtype=np.int64)) if dims else 1


def representative_dims(graph: Graph, given: dict | None = None, feeds: dict | None = None) -> dict[str, tuple]:
    """dim name -> (value, where it came from: 'dim' for --dim, 'calibration', or 'default'), for every symbolic
    dim of the graph's inputs. The sample axis (axis 0) of calibration arrays counts samples, not a model dim, so
    it is never taken from the data: MACs stay per sample, as with random inputs (batch 1)."""
    from .feeds import feed_shapes
    given = dict(given or {})
    out: dict[str, tuple] = {name: (int(v), "dim") for name, v in given.items()}
    for vi in graph.inputs:
        array = (feeds or {}).get(vi.name)
        if array is None:
            continue
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            name = d.dim_param if d.HasField("dim_param") else ""
            if k > 0 and name and name not in out and k < np.ndim(array):
                out[name] = (int(np.shape(array)[k]), "calibration")
    try:
        _shapes, chosen = feed_shapes(graph, {**given, **{n: v for n, (v, _) in out.items()}})
    except GraphpruneError:  # hostile declared dims: no defaults, the remaining names count as 1
        chosen = {}
    for name, value in chosen.items():
        out.setdefault(name, (int(value), "default"))
    return out


def set_dims(graph: Graph, dims: dict) -> None:
    """Make every count on `graph` use these representative dims ({name: value} or representative_dims' result).
    Kept on the graph object, so the allocator's counts (passes/allocate.py reads analysis.graph) use them too."""
    values = {n: (v[0] if isinstance(v, tuple) else int(v)) for n, v in dims.items()}
    values.update(_probed_products(graph, values))
    if values:
        for name, v in _inferred_at(graph, values).items():
            values.setdefault(name, v)
    graph.macs_dims = values


def _inferred_at(graph: Graph, values: dict) -> dict[str, int]:
    """Values for the dims onnx's shape inference names itself ('unk__N': a Conv/Pool output width computed
    from a symbolic input width, a Concat of two symbolic lengths, ...): infer shapes again on a copy whose inputs
    are fixed at `values`, and read each such name off the same tensor and axis. Without this an OCR model with a
    dynamic width counts every conv after the first at width 1. A name that comes out with two values is left
    unresolved (it counts as 1)."""
    model = graph.to_model(with_value_info=False)
    for vi in model.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in values:
                d.dim_value = int(values[d.dim_param])
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is a best effort here; unresolved names count as 1
        return {}
    fixed = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            fixed[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    found: dict[str, set] = {}
    for name, dims in graph.shapes.items():
        got = fixed.get(name)
        if dims is None or got is None or len(got) != len(dims):
            continue
        for d, v in zip(dims, got):
            if isinstance(d, str) and d not in values and v:
                found.setdefault(d, set()).add(int(v))
    return {name: next(iter(vs)) for name, vs in found.items() if len(vs) == 1}


def _probed_products(graph: Graph, values: dict) -> dict[str, int]:
    """Values for the names shape probing (passes/canonicalize.probe_shapes) gives a dim that matches no input
    dim: 'dyn_X_Y', sizes X and Y in its two runs. Such a dim is usually a product of input dims (batch x seq
    tokens after a flatten, heads x batch): find c and exponents e_s in {0, 1, 2} with X = c·Π p0[s]^e_s and
    Y = c·Π p1[s]^e_s, where p0, p1 are the values the probe runs gave each input dim, then substitute c·Π v[s]^e_s.
    No fit, or two fits that disagree on the value, leaves the name unresolved (it counts as 1)."""
    import itertools

    from .passes.canonicalize import _symbolic_dims, probe_shapes
    names = {d for dims in graph.shapes.values() for d in dims if isinstance(d, str) and d.startswith("dyn_")}
    symbols = _symbolic_dims(graph)
    if not names or not symbols or len(symbols) > 4:
        return {}
    bases = probe_shapes.__defaults__[0]
    runs = [{name: (1 + r if first else base * (k + 1)) for k, (name, first) in enumerate(symbols)}
            for r, base in enumerate(bases)]
    out = {}
    for name in names:
        parts = name.split("_")
        if len(parts) != 3 or not (parts[1].isdigit() and parts[2].isdigit()):
            continue
        x, y = int(parts[1]), int(parts[2])
        found = set()
        for exps in itertools.product(range(3), repeat=len(symbols)):
            p0 = int(np.prod([runs[0][s] ** e for (s, _), e in zip(symbols, exps)]))
            p1 = int(np.prod([runs[1][s] ** e for (s, _), e in zip(symbols, exps)]))
            if x % p0 == 0 and y % p1 == 0 and x // p0 == y // p1:
                found.add((x // p0) * int(np.prod([values.get(s, 1) ** e for (s, _), e in zip(symbols, exps)])))
        if len(found) == 1:
            out[name] = found.pop()
    return out


def _resolved(graph: Graph, shape):
    """`shape` (a name -> dims function) with the graph's representative dims substituted for symbolic ones."""
    dims = getattr(graph, "macs_dims", None)
    if not dims:
        return shape

    def resolved(name):
        s = shape(name)
        if s is None:
            return None
        return tuple(dims.get(d, d) if isinstance(d, str) else d for d in s)
    return resolved


def _iterations(graph: Graph, node, shape) -> int:
    """How often a Loop/Scan runs its body: a constant trip count, else the length of what it stacks (a scan
    output's leading axis, a scan input's scan axis), with representative values for symbolic dims; 1 if none."""
    if node.op_type == "Loop":
        m = graph.const(node.input[0]) if node.input and node.input[0] else None
        if m is not None:
            return max(int(np.asarray(m).reshape(-1)[0]), 0)
        carried = len(node.input) - 2
        for y in node.output[carried:]:
            s = shape(y) if y else None
            if s and isinstance(s[0], int):
                return s[0]
        return 1
    # Scan (opset 9+): the first scan input's scan axis
    m = attr(node, "num_scan_inputs", 0)
    if not m:
        return 1
    x = node.input[len(node.input) - m]
    s = shape(x)
    axes = attr(node, "scan_input_axes", [0] * m)
    return s[axes[0] % len(s)] if s and isinstance(s[axes[0] % len(s)], int) else 1


def node_macs(graph: Graph, node, shape=None) -> int:
    shape = _resolved(graph, shape or graph.shape)
    op = node.op_type
    if op in ("Loop", "Scan", "If") and node.domain in ("", "ai.onnx"):
        # the bodies' MatMuls are the layer: count them, once per iteration (If: the costlier branch)
        per_body = [sum(node_macs(graph, n, shape) for n in body.node) for body in subgraphs(node)]
        if op == "If":
            return max(per_body, default=0)
        return sum(per_body) * _iterations(graph, node, shape)
    out = shape(node.output[0]) if node.output else None
    if out is None:
        return 0
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = shape(node.input[3 if op == "QLinearConv" else 1])
        return _prod(out) * _prod(w[1:]) if w else 0
    if op == "ConvTranspose":
        w = shape(node.input[1])
        x = shape(node.input[0])
        return _prod(x) * _prod(w[1:]) if w and x else 0
    if op == "Gemm":
        a = shape(node.input[0])
        if not a:
            return 0
        k = a[0] if attr(node, "transA", 0) else a[1]
        return _prod(out) * (k if isinstance(k, int) else 1)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul"):
        a = shape(node.input[0])
        if not a:
            return 0
        k = a[-1]
        return _prod(out) * (k if isinstance(k, int) else 1)
    if op == "MatMulNBits":  # A [..., K] · Bᵀ, B [N, K] packed: K is the attribute, not the packed shape
        k = attr(node, "K", 0)
        return _prod(out) * (k if isinstance(k, int) else 1)
    if op == "DynamicQuantizeLSTM":  # W [dirs, input, 4H], R [dirs, H, 4H]; X [seq, batch, input]
        w, r, x = (shape(node.input[i]) for i in (1, 2, 0))
        return (_prod(w) + _prod(r)) * _prod(x[:2]) if w and r and x else 0
    if op in ("LSTM", "GRU", "RNN"):
        w, r, x = (shape(node.input[i]) for i in (1, 2, 0))
        if not (w and r and x):
            return 0
        steps = x[0] if attr(node, "layout", 0) == 0 else x[1]
        batch = x[1] if attr(node, "layout", 0) == 0 else x[0]
        per_step = _prod(w) + _prod(r)
        return per_step * _prod([steps, batch])
    return 0


def is_parameter(graph: Graph, name: str, array: np.ndarray) -> bool:
    if array.size <= 1:
        return False
    if array.dtype.kind == "f":
        return True
    if array.dtype.kind not in "iu":
        return False
    if array.dtype.itemsize <= 2:  # int8/uint8/int16: quantised weights (no shape tensor is this narrow)
        return True
    # int32/int64: only what a quantised op reads (QLinearConv's bias, MatMulInteger's operands)
    return any(_quantised_op(node) for node, _ in graph.uses.get(name, []))


def _quantised_op(node) -> bool:
    return node.op_type.startswith(("QLinear", "QGemm", "QAttention")) or node.op_type.endswith("Integer")


def count(graph: Graph) -> dict:
    params = int(sum(a.size for name, a in graph.initializers.items() if is_parameter(graph, name, a)))
    per_node = {node.name: node_macs(graph, node) for node in graph.nodes}
    return {"params": params, "macs": int(sum(per_node.values())), "per_node": per_node}


def count_after(graph: Graph, removed: dict) -> dict:
    """MACs and params once `removed` ((tensor, axis) -> indices, or a count) is gone, from shapes alone."""
    cut: dict[str, dict[int, int]] = {}
    for (name, axis), idx in removed.items():
        cut.setdefault(name, {})[axis] = idx if isinstance(idx, (int, np.integer)) else len(idx)

    base = _resolved(graph, graph.shape)

    def shape(name):
        dims = base(name)
        if dims is None or name not in cut:
            return dims
        return tuple(d - cut[name].get(ax, 0) if isinstance(d, int) else d for ax, d in enumerate(dims))

    params = 0
    for name, arr in graph.initializers.items():
        if is_parameter(graph, name, arr):
            params += _prod(shape(name))
    # `shape` already substitutes the dims; node_macs' own substitution then finds nothing symbolic left to map
    return {"params": int(params), "macs": int(sum(node_macs(graph, n, shape) for n in graph.nodes))}
