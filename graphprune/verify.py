"""Verification: the pruned model must equal the original with the removed channels masked on the consumer side.

Masking the producer is the wrong oracle (after a BatchNorm the zeros come back as constants), so every node
input that still carries removed channels is wrapped in Where(mask, x, 0) before the node reads it.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from .errors import VerificationError
from .ir import Graph, attr


# element types onnxruntime's CPU Where lacks -> a type it has that holds them exactly
_WHERE_WIDER = {onnx.TensorProto.INT16: onnx.TensorProto.INT32, onnx.TensorProto.UINT16: onnx.TensorProto.INT32,
                onnx.TensorProto.UINT64: onnx.TensorProto.INT64, onnx.TensorProto.BFLOAT16: onnx.TensorProto.FLOAT}


def masked_reference(graph: Graph, removed: dict[tuple[str, int], np.ndarray], oracle_masks=(),
                     weight_updates: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """The original model with removed channels zeroed wherever a node reads them."""
    model = graph.to_model(with_value_info=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    by_tensor: dict[str, dict[int, np.ndarray]] = {}
    for (name, axis), idx in removed.items():
        if len(idx):
            by_tensor.setdefault(name, {})[axis] = idx
    new_nodes = []
    masked_names: dict[str, str] = {}
    counter = [0]

    def mask_for(name):
        if name in masked_names:
            return masked_names[name]
        shape = graph.shape(name)
        mask = np.ones([d if ax in by_tensor[name] else 1 for ax, d in enumerate(shape)], dtype=bool)
        for ax, idx in by_tensor[name].items():
            index = [slice(None)] * len(shape)
            index[ax] = idx
            mask[tuple(index)] = False
        counter[0] += 1
        mname = f"__gp_mask_{counter[0]}"
        zname = f"__gp_zero_{counter[0]}"
        g.initializer.append(numpy_helper.from_array(mask, mname))
        elem = graph.dtypes.get(name, onnx.TensorProto.FLOAT)
        out = f"{name}__gp_masked"
        if elem == onnx.TensorProto.BOOL:  # onnxruntime's CPU Where has no bool kernel: mask with And
            new_nodes.append(helper.make_node("And", [mname, name], [out], name=f"__gp_where_{counter[0]}"))
            masked_names[name] = out
            return out
        if graph.opset("") < 9:  # Where arrived in opset 9: multiply by a 0/1 mask of the tensor's type
            g.initializer[-1].CopyFrom(numpy_helper.from_array(
                mask.astype(helper.tensor_dtype_to_np_dtype(elem)), mname))
            new_nodes.append(helper.make_node("Mul", [name, mname], [out], name=f"__gp_where_{counter[0]}"))
            masked_names[name] = out
            return out
        # nor int16/uint16/uint64/bfloat16 kernels: mask in a wider type (exact) and cast back
        wide = _WHERE_WIDER.get(elem)
        dtype = helper.tensor_dtype_to_np_dtype(wide or elem)
        g.initializer.append(numpy_helper.from_array(np.zeros((), dtype=dtype), zname))
        src = name
        if wide:
            src = f"{name}__gp_wide"
            new_nodes.append(helper.make_node("Cast", [name], [src], to=wide, name=f"__gp_widen_{counter[0]}"))
        where_out = f"{name}__gp_wide_masked" if wide else out
        new_nodes.append(helper.make_node("Where", [mname, src, zname], [where_out],
                                          name=f"__gp_where_{counter[0]}"))
        if wide:
            new_nodes.append(helper.make_node("Cast", [where_out], [out], to=elem, name=f"__gp_narrow_{counter[0]}"))
        masked_names[name] = out
        return out

    for node in list(g.node):
        for i, name in enumerate(node.input):
            if name in by_tensor and name not in inits:
                node.input[i] = mask_for(name)
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    for name, arr in (weight_updates or {}).items():
        _replace_init(g, name, arr)
    for weight, axis, like, like_axis in oracle_masks:
        idx = removed.get((like, like_axis))
        if idx is None or not len(idx):
            continue
        arr = numpy_helper.to_array(inits[weight]).copy() if weight not in (weight_updates or {}) \
            else np.array(weight_updates[weight])
        index = [slice(None)] * arr.ndim
        index[axis] = idx
        arr[tuple(index)] = 0
        _replace_init(g, weight, arr)
    return model


def _replace_init(g, name, arr):
    for k, t in enumerate(g.initializer):
        if t.name == name:
            g.initializer[k].CopyFrom(numpy_helper.from_array(np.asarray(arr), name))
            return


def session(model: onnx.ModelProto, optimize: bool = False) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 4  # errors are reported by graphprune, in one line
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


# A random input never holds more than this many elements: declared dims may be hostile (10⁹).
MAX_FEED_ELEMENTS = 1 << 26
# Default for a dynamic dim nothing fixes: 1 for a leading (batch) axis, 32 elsewhere.
DEFAULT_DIM = 32


# element types numpy holds only through ml_dtypes, which onnxruntime's Python binding does not accept
_UNFEEDABLE = {getattr(onnx.TensorProto, n) for n in ("BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2",
                                                      "FLOAT8E5M2FNUZ", "FLOAT8E8M0", "UINT4", "INT4", "FLOAT4E2M1",
                                                      "UINT2", "INT2") if hasattr(onnx.TensorProto, n)}


class Feeds(list):
    """Random feeds (one dict per sample) that remember the value chosen for every dynamic dim, so a failing
    run can say which `--dim` to pass."""
    dims: dict


_PASSTHROUGH = {"Cast", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Identity", "Dropout", "Clip", "Abs", "Neg",
                "Exp", "Log", "Sqrt", "Softplus", "Elu", "Selu", "HardSigmoid", "HardSwish", "Gelu", "Erf", "Mish",
                "BatchNormalization", "InstanceNormalization", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min",
                "Unsqueeze", "Squeeze", "Reshape", "Pad", "Where", "PRelu"}
_SPATIAL = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "ConvInteger", "QLinearConv"}


def _min_spatial(graph: Graph) -> dict[str, int]:
    """Smallest trailing (spatial) length each tensor may have so every Conv/pool downstream gets at least one
    output position: walked backwards from the outputs, (need - 1) * stride + dilated kernel - pads per layer."""
    need: dict[str, int] = {}
    for node in reversed(graph.nodes):
        out_need = max([need.get(o, 1) for o in node.output if o] or [1])
        if node.op_type in _SPATIAL and node.input and node.op_type != "ConvTranspose":
            kernel = attr(node, "kernel_shape")
            if kernel is None and len(node.input) > 1 and graph.const(node.input[1]) is not None:
                kernel = list(graph.const(node.input[1]).shape[2:])
            kernel = list(kernel or [1])
            strides = list(attr(node, "strides", None) or [1] * len(kernel))
            dilations = list(attr(node, "dilations", None) or [1] * len(kernel))
            pads = list(attr(node, "pads", None) or [0] * (2 * len(kernel)))
            same = attr(node, "auto_pad", b"NOTSET") in (b"SAME_UPPER", b"SAME_LOWER", "SAME_UPPER", "SAME_LOWER")
            want = 1
            for k in range(len(kernel)):
                eff = (int(kernel[k]) - 1) * int(dilations[k] if k < len(dilations) else 1) + 1
                pad = 0 if same else int(pads[k]) + int(pads[k + len(kernel)]) if len(pads) >= 2 * len(kernel) else 0
                stride = int(strides[k] if k < len(strides) else 1)
                want = max(want, (out_need - 1) * stride + (1 if same else eff) - pad)
            need[node.input[0]] = max(need.get(node.input[0], 1), want)
        elif node.op_type in _PASSTHROUGH:
            for name in node.input[:1] if node.op_type in ("Reshape", "Unsqueeze", "Squeeze", "Pad") else node.input:
                if name and not graph.is_const(name):
                    need[name] = max(need.get(name, 1), out_need)
    return need


def _fixed_by_weights(graph: Graph, name: str, rank: int, depth: int = 0) -> dict[int, int]:
    """Axes of input `name` whose size a consumer's weights fix (Conv/Gemm/MatMul/RNN/norm/broadcast const):
    onnx infers shapes forwards only, so a feature axis declared symbolic stays symbolic."""
    fixed: dict[int, int] = {}
    for node, i in graph.uses.get(name, []):
        op = node.op_type
        w = graph.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if i == 0 and w is not None and op in ("Conv", "ConvInteger") and w.ndim >= 2 and rank >= 2:
            fixed[1] = int(w.shape[1]) * int(attr(node, "group", 1))
        elif i == 0 and w is not None and op == "ConvTranspose" and w.ndim >= 2 and rank >= 2:
            fixed[1] = int(w.shape[0])
        elif i == 0 and w is not None and op in ("GRU", "LSTM", "RNN") and w.ndim == 3 and rank == 3:
            fixed[2] = int(w.shape[2])
        elif i == 0 and w is not None and op == "MatMul" and w.ndim >= 2 and rank >= 1:
            fixed[rank - 1] = int(w.shape[-2])
        elif i == 0 and w is not None and op == "Gemm" and w.ndim == 2 and rank == 2:
            fixed[0 if attr(node, "transA", 0) else 1] = int(w.shape[1] if attr(node, "transB", 0) else w.shape[0])
        elif i == 0 and op in ("BatchNormalization", "InstanceNormalization") and w is not None and rank >= 2:
            fixed[1] = int(w.size)
        elif i == 0 and op == "LayerNormalization" and w is not None:
            for k in range(1, w.ndim + 1):
                fixed[rank - k] = int(w.shape[-k])
        elif op in ("Add", "Sub", "Mul", "Div") and len(node.input) == 2:
            other = graph.const(node.input[1 - i])
            if other is not None and other.ndim <= rank:
                for k in range(1, other.ndim + 1):
                    if other.shape[-k] > 1:
                        fixed[rank - k] = int(other.shape[-k])
        if op in ("Cast", "Relu", "Identity", "Dropout", "Sigmoid", "Tanh", "Clip", "LeakyRelu") and i == 0 \
                and depth < 6:
            for axis, size in _fixed_by_weights(graph, node.output[0], rank, depth + 1).items():
                fixed.setdefault(axis, size)
        elif op == "Transpose" and i == 0 and depth < 6:
            perm = attr(node, "perm") or list(range(rank))[::-1]
            if len(perm) == rank:
                for axis, size in _fixed_by_weights(graph, node.output[0], rank, depth + 1).items():
                    fixed.setdefault(int(perm[axis]), size)
    return fixed


def feed_shapes(graph: Graph, dims: dict | None = None) -> tuple[dict[str, list[int]], dict[str, int]]:
    """(input name -> concrete shape, dim name -> value chosen). One value per dim name everywhere; sizes a
    weight fixes win over defaults; spatial dims are at least what the model's kernels need; `dims` (--dim)
    wins over everything. Raises VerificationError naming the `--dim` to pass when a shape stays unusable."""
    oversized = getattr(graph, "oversized", {})
    if oversized:
        name, shape = next(iter(oversized.items()))
        raise VerificationError(f"tensor '{name}' would have shape {list(shape)}: running the model on random inputs "
                                f"would allocate from that dim, so it is not run (pass --no-verify to skip the check)")
    given = dict(dims or {})
    chosen: dict[str, int] = {}
    spatial = _min_spatial(graph)
    plans = []
    for vi in graph.inputs:
        dim_protos = list(vi.type.tensor_type.shape.dim)
        rank = len(dim_protos)
        inferred = graph.shape(vi.name) or ()
        fixed = _fixed_by_weights(graph, vi.name, rank)
        for k, d in enumerate(dim_protos):
            name = d.dim_param if d.HasField("dim_param") and d.dim_param else None
            value = int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None  # -1: Paddle's "any"
            if value is None and k < len(inferred) and isinstance(inferred[k], int) and 0 < inferred[k]:
                value = inferred[k]
            if value is None and k in fixed:
                value = fixed[k]
            if value is not None and name and name not in given:
                chosen.setdefault(name, value)
            plans.append((vi, k, name, value, rank))
    need_min = {vi.name: spatial.get(vi.name, 1) for vi in graph.inputs}
    shapes: dict[str, list[int]] = {vi.name: [] for vi in graph.inputs}
    for vi, k, name, value, rank in plans:
        if name in given:
            size = given[name]
        elif value is not None:
            size = value
        elif name in chosen:
            size = chosen[name]
        else:
            spatial_axis = (k >= 2) if rank >= 3 else (k == rank - 1 and k > 0)
            size = 1 if k == 0 else max(DEFAULT_DIM, need_min[vi.name] if spatial_axis else 1)
            if name:
                chosen[name] = size
        shapes[vi.name].append(int(size))
    for vi in graph.inputs:
        shape = shapes[vi.name]
        if int(np.prod(shape, dtype=np.float64)) > MAX_FEED_ELEMENTS:
            names = [d.dim_param or f"axis {k}" for k, d in enumerate(vi.type.tensor_type.shape.dim)]
            raise VerificationError(f"input '{vi.name}' would need {shape} = {int(np.prod(shape, dtype=np.float64))} "
                                    f"random values (more than {MAX_FEED_ELEMENTS}); its dims are {names}: pass "
                                    f"smaller --dim NAME=VALUE for the dynamic ones, or --no-verify")
    return shapes, {**chosen, **given}


def random_feeds(graph: Graph, n: int, seed: int = 0, dims: dict | None = None) -> list[dict[str, np.ndarray]]:
    """Random inputs matched to each graph input: normal floats, token ids inside the vocabulary, mask ones.
    Shapes come from `feed_shapes` (names, weights, kernel sizes, --dim); the list remembers them (.dims)."""
    rng = np.random.default_rng(seed)
    shapes, chosen = feed_shapes(graph, dims)
    feeds = Feeds()
    feeds.dims = chosen
    for _ in range(n):
        feed = {}
        for vi in graph.inputs:
            tt = vi.type.tensor_type
            shape = shapes[vi.name]
            if tt.elem_type in _UNFEEDABLE:
                raise VerificationError(f"input '{vi.name}' has element type "
                                        f"{onnx.TensorProto.DataType.Name(tt.elem_type)}, which onnxruntime's Python "
                                        f"API cannot be fed: random inputs cannot check this model (pass --no-verify)")
            try:
                dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
            except Exception:
                raise VerificationError(f"input '{vi.name}' has element type {tt.elem_type}, which random inputs "
                                        f"cannot be made of") from None
            if dtype.kind == "f":
                feed[vi.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind == "c":
                feed[vi.name] = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
            elif dtype == np.bool_:
                feed[vi.name] = np.ones(shape, dtype=bool)
            elif dtype.kind in "OUS":
                feed[vi.name] = np.full(shape, "a", dtype=object)
            else:
                high = _index_bound(graph, vi.name)
                if "mask" in vi.name.lower():
                    feed[vi.name] = np.ones(shape, dtype=dtype)
                else:
                    feed[vi.name] = rng.integers(0, high, size=shape).astype(dtype)
        feeds.append(feed)
    return feeds


def _index_bound(graph: Graph, name: str, depth: int = 0) -> int:
    """Largest safe integer value: the smallest table size this input indexes (through casts/reshapes)."""
    bound = None
    for node, i in graph.uses.get(name, []):
        if node.op_type == "Gather" and i == 1:
            shape = graph.shape(node.input[0])
            axis = 0
            for a in node.attribute:
                if a.name == "axis":
                    axis = a.i
            if shape and isinstance(shape[axis], int):
                bound = shape[axis] if bound is None else min(bound, shape[axis])
        elif node.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten") and depth < 4 and i == 0:
            sub = _index_bound(graph, node.output[0], depth + 1)
            bound = sub if bound is None else min(bound, sub)
    return bound if bound is not None else 2


# (rtol, atol) per floating element type: the tolerance follows the precision the model computes in
_TOLERANCE = {onnx.TensorProto.FLOAT: (1e-4, 1e-5), onnx.TensorProto.DOUBLE: (1e-7, 1e-9),
              onnx.TensorProto.FLOAT16: (1e-2, 2e-3), onnx.TensorProto.BFLOAT16: (5e-2, 2e-2)}
_LOW_PRECISION = [onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16]


def compute_tolerance(model: onnx.ModelProto) -> tuple[float, float]:
    """(rtol, atol) for the lowest float precision the model computes in: its float weights, Cast targets and
    float inputs/outputs. A float16 model compared on float32 tolerances fails on rounding alone."""
    seen = {t.data_type for t in model.graph.initializer}
    seen |= {v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    for node in model.graph.node:
        if node.op_type in ("Cast", "CastLike"):
            for a in node.attribute:
                if a.name == "to":
                    seen.add(a.i)
    for low in _LOW_PRECISION:
        if low in seen:
            return _TOLERANCE[low]
    return _TOLERANCE[onnx.TensorProto.FLOAT]


def _degenerate(values: list[np.ndarray]) -> str | None:
    """Why a tensor's values across the random inputs prove nothing (NaN/Inf, all zero, the same for every
    input), or None when they are evidence."""
    a = np.asarray(values[0])
    if a.dtype.kind in "fc" and not all(np.all(np.isfinite(v)) for v in values):
        return "NaN/Inf"
    if a.dtype.kind not in "fciub":
        return None
    if all(not np.any(v) for v in values):
        return "all zero"
    if len(values) > 1 and all(np.shape(v) == a.shape and np.array_equal(v, a) for v in values[1:]):
        return "the same for every random input"
    if len(values) == 1 and a.size > 1 and np.all(a == a.reshape(-1)[0]):
        return "constant"
    return None


def _run(sess, names, feed, feeds):
    try:
        return sess.run(names, feed)
    except Exception as exc:  # onnxruntime's errors carry the node; say which dims the inputs had
        dims = getattr(feeds, "dims", {})
        hint = (f"; the random inputs used {', '.join(f'{k}={v}' for k, v in dims.items())}: pass --dim NAME=VALUE "
                f"with sizes the model accepts") if dims else ""
        message = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
        raise VerificationError(f"the model does not run on random inputs ({message}){hint}") from None


def _check_pair(name, a, b, rtol, atol, worst, what="output"):
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise VerificationError(f"{what} '{name}': shape {b.shape} differs from the original {a.shape}",
                                name, float("inf"))
    if a.dtype.kind not in "fc":
        if not np.array_equal(a, b):
            raise VerificationError(f"{what} '{name}': integer values differ", name, float("inf"))
        return
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a.astype(np.complex128 if a.dtype.kind == "c" else np.float64) - b)
    finite = np.isfinite(a)
    scale = max(1.0, float(np.max(np.abs(a[finite])))) if finite.any() else 1.0
    m = float(np.max(diff[finite])) if finite.any() else 0.0
    if m > worst["max_abs_diff"]:
        worst.update(max_abs_diff=m, output=name)
    worst["max_rel_diff"] = max(worst["max_rel_diff"], m / scale)
    same_nonfinite = np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(a[~finite & ~np.isnan(a)],
                                                                                    b[~finite & ~np.isnan(a)])
    if not same_nonfinite or np.any(diff[finite] > atol * scale + rtol * np.abs(a[finite])):
        raise VerificationError(
            f"{what} '{name}' differs from the masked original: max abs diff {m:.3g} "
            f"(tolerance atol {atol:g} x {scale:.3g}, rtol {rtol:g})", name, m)


def compare(reference: onnx.ModelProto, pruned: onnx.ModelProto, feeds, rtol: float | None = None,
            atol: float | None = None, removed: dict | None = None) -> dict:
    """Run both models on the same feeds; raise VerificationError naming the worst output.

    Tolerances default to the model's compute precision. When the outputs prove nothing (NaN/Inf, all zero,
    or identical for every random input: a zero-initialised head), the tensors feeding them are compared
    instead, nearest first (`removed`: (tensor, axis) -> removed indices maps the original's channels onto the
    pruned tensor). The result says what was compared: 'compared' is empty when nothing was."""
    default_rtol, default_atol = compute_tolerance(reference)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    ref_sess, new_sess = session(reference), session(pruned)
    names = [o.name for o in ref_sess.get_outputs()]
    worst = {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "output": None, "samples": len(feeds), "rtol": rtol,
             "atol": atol, "compared": [], "degenerate": {}}
    ref_values = {n: [] for n in names}
    for feed in feeds:
        want = _run(ref_sess, names, feed, feeds)
        got = _run(new_sess, names, feed, feeds)
        for name, a, b in zip(names, want, got):
            _check_pair(name, a, b, rtol, atol, worst)
            ref_values[name].append(np.asarray(a))
    for name in names:
        why = _degenerate(ref_values[name]) if feeds else "no samples"
        if why:
            worst["degenerate"][name] = why
        else:
            worst["compared"].append(name)
    if feeds and not worst["compared"]:
        _compare_intermediates(reference, pruned, feeds, names, rtol, atol, worst, removed or {})
    return worst


def _cone(model: onnx.ModelProto, outputs, limit: int = 48) -> list[str]:
    """Tensors that feed `outputs`, nearest first (breadth first over producers), node outputs only."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    consts = {t.name for t in model.graph.initializer}
    order, seen, queue = [], set(outputs), list(outputs)
    while queue and len(order) < limit:
        name = queue.pop(0)
        node = producer.get(name)
        if node is None:
            continue
        for i in node.input:
            if i and i not in seen and i not in consts and i in producer:
                seen.add(i)
                order.append(i)
                queue.append(i)
    return order


def _compare_intermediates(reference, pruned, feeds, outputs, rtol, atol, worst, removed) -> None:
    """Compare the nearest non-degenerate tensors feeding the outputs, kept channels only."""
    types = {v.name: v.type.tensor_type.elem_type for v in list(pruned.graph.value_info) + list(pruned.graph.output)}
    pruned_names = {o for n in pruned.graph.node for o in n.output}
    candidates = [n for n in _cone(reference, outputs) if n in pruned_names and n in types and
                  not n.startswith("__gp_") and "__gp_" not in n]
    if not candidates:
        return

    def exposed(model):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        del m.graph.output[:]
        for name in candidates:
            m.graph.output.append(helper.make_tensor_value_info(name, types[name], None))
        return session(m)

    try:
        ref_sess, new_sess = exposed(reference), exposed(pruned)
    except Exception:
        return
    runs = [(_run(ref_sess, candidates, f, feeds), _run(new_sess, candidates, f, feeds)) for f in feeds]
    by_axis: dict[str, dict[int, np.ndarray]] = {}
    for (tensor, axis), idx in removed.items():
        if len(idx):
            by_axis.setdefault(tensor, {})[axis] = np.asarray(idx)
    for k, name in enumerate(candidates):
        ref_vals = []
        for want, got in runs:
            a = np.asarray(want[k])
            for axis, idx in by_axis.get(name, {}).items():  # the pruned tensor lacks the removed channels
                if axis < a.ndim and a.shape[axis] != np.shape(got[k])[axis]:
                    a = np.delete(a, idx, axis=axis)
            ref_vals.append(a)
        if _degenerate(ref_vals) or any(a.shape != np.shape(got[k]) for a, (_, got) in zip(ref_vals, runs)):
            continue
        for a, (_, got) in zip(ref_vals, runs):
            _check_pair(name, a, got[k], rtol, atol, worst, what="intermediate tensor")
        worst["compared"].append(name)
        worst["intermediate"] = True
        return


def fidelity(dense: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict) -> dict:
    """How close the pruned model stays to the dense one on held-out samples: per float output, the mean
    cosine similarity of per-sample outputs, the relative error, and top-1 agreement of the last axis."""
    from .calibration import batches, static_batch
    a_sess, b_sess = session(dense, optimize=True), session(pruned, optimize=True)
    names = [o.name for o in a_sess.get_outputs()]
    size = static_batch(dense.graph.input) or 16
    runs_a, runs_b = [], []
    for feed in batches(feeds, size):
        runs_a.append(a_sess.run(names, feed))
        runs_b.append(b_sess.run(names, feed))
    a_out = [np.concatenate([r[k] for r in runs_a]) for k in range(len(names))]
    b_out = [np.concatenate([r[k] for r in runs_b]) for k in range(len(names))]
    result = {"samples": len(next(iter(feeds.values()))), "outputs": {}}
    for name, a, b in zip(names, a_out, b_out):
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if a.dtype.kind != "f" or a.ndim == 0:
            continue
        fa, fb = a.reshape(len(a), -1), b.reshape(len(b), -1)
        cos = (fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1) + 1e-12)
        entry = {"cosine": float(cos.mean()),
                 "rel_error": float(np.linalg.norm(fa - fb) / (np.linalg.norm(fa) + 1e-12))}
        if a.shape[-1] > 1:
            entry["top1_agreement"] = float((a.argmax(-1) == b.argmax(-1)).mean())
        result["outputs"][name] = entry
    return result
