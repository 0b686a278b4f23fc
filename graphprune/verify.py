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
from .ir import Graph


# element types onnxruntime's CPU Where lacks -> a type it has that holds them exactly
_WHERE_WIDER = {onnx.TensorProto.INT16: onnx.TensorProto.INT32, onnx.TensorProto.UINT16: onnx.TensorProto.INT32,
                onnx.TensorProto.UINT64: onnx.TensorProto.INT64, onnx.TensorProto.BFLOAT16: onnx.TensorProto.FLOAT}


def masked_reference(graph: Graph, removed: dict[tuple[str, int], np.ndarray], oracle_masks=(),
                     weight_updates: dict[str, np.ndarray] | None = None, mask_fills=()) -> onnx.ModelProto:
    """The original model with removed channels zeroed wherever a node reads them. `mask_fills` ((node, tensor,
    zero point) triples) name quantized inputs whose removed channels read the zero point instead of 0."""
    fills = {(f[0], f[1]): f[2] for f in mask_fills}
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

    def mask_for(name, fill=""):
        key = (name, fill)
        if key in masked_names:
            return masked_names[key]
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
        out = f"{name}__gp_masked" + (f"_{counter[0]}" if fill else "")
        if elem == onnx.TensorProto.BOOL:  # onnxruntime's CPU Where has no bool kernel: mask with And
            new_nodes.append(helper.make_node("And", [mname, name], [out], name=f"__gp_where_{counter[0]}"))
            masked_names[key] = out
            return out
        # nor int16/uint16/uint64/bfloat16 kernels: mask in a wider type (exact) and cast back
        wide = _WHERE_WIDER.get(elem)
        dtype = helper.tensor_dtype_to_np_dtype(wide or elem)
        if fill:  # the zero point (same type as the quantized tensor), broadcast by Where
            zname = fill
        else:
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
        masked_names[key] = out
        return out

    for node in list(g.node):
        for i, name in enumerate(node.input):
            if name in by_tensor and name not in inits:
                node.input[i] = mask_for(name, fills.get((node.name, name), ""))
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    for name, arr in (weight_updates or {}).items():
        _replace_init(g, name, arr)
    for weight, axis, like, like_axis, *rest in oracle_masks:
        idx = removed.get((like, like_axis))
        if idx is None or not len(idx):
            continue
        arr = numpy_helper.to_array(inits[weight]).copy() if weight not in (weight_updates or {}) \
            else np.array(weight_updates[weight])
        index = [slice(None)] * arr.ndim
        index[axis] = idx
        fill = rest[0] if rest and rest[0] else ""
        arr[tuple(index)] = _fill_value(numpy_helper.to_array(inits[fill]), arr, axis, idx) if fill else 0
        _replace_init(g, weight, arr)
    return model


def _fill_value(fill: np.ndarray, arr: np.ndarray, axis: int, idx: np.ndarray) -> np.ndarray:
    """The zero point for arr's entries at `idx` along `axis`, shaped to broadcast into them. A zero point is a
    scalar, one value per leading index (per direction), or arr's shape without one axis (DynamicQuantizeLSTM's
    [directions, 4·hidden] for W [directions, input, 4·hidden])."""
    if fill.size == 1:
        return fill.reshape(())
    if fill.ndim == 1 and fill.shape[0] == arr.shape[0]:
        full = fill.reshape((-1,) + (1,) * (arr.ndim - 1))
    else:
        missing = next((m for m in range(arr.ndim) if arr.shape[:m] + arr.shape[m + 1:] == fill.shape), None)
        if missing is None:
            raise VerificationError(f"zero point of shape {fill.shape} does not fit a weight of shape {arr.shape}")
        full = np.expand_dims(fill, missing)
    return full if full.shape[axis] == 1 else np.take(full, idx, axis=axis)


def _replace_init(g, name, arr):
    for k, t in enumerate(g.initializer):
        if t.name == name:
            g.initializer[k].CopyFrom(numpy_helper.from_array(np.asarray(arr), name))
            return


def session(model: onnx.ModelProto, optimize: bool = False) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def random_feeds(graph: Graph, n: int, seed: int = 0, dims: dict | None = None) -> list[dict[str, np.ndarray]]:
    """Random inputs matched to each graph input: normal floats, token ids inside the vocabulary, mask ones."""
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    feeds = []
    for _ in range(n):
        feed = {}
        for vi in graph.inputs:
            tt = vi.type.tensor_type
            shape = []
            for k, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value"):
                    shape.append(d.dim_value)
                else:
                    shape.append(dims.get(d.dim_param, 1 if k == 0 else 32))
            dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
            if dtype.kind == "f":
                feed[vi.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype == np.bool_:
                feed[vi.name] = np.ones(shape, dtype=bool)
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


def compare(reference: onnx.ModelProto, pruned: onnx.ModelProto, feeds, rtol: float = 1e-4,
            atol: float = 1e-5) -> dict:
    """Run both models on the same feeds; raise VerificationError naming the worst output."""
    ref_sess, new_sess = session(reference), session(pruned)
    names = [o.name for o in ref_sess.get_outputs()]
    worst = {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "output": None, "samples": len(feeds)}
    for feed in feeds:
        want = ref_sess.run(names, feed)
        got = new_sess.run(names, feed)
        for name, a, b in zip(names, want, got):
            a = np.asarray(a)
            b = np.asarray(b)
            if a.shape != b.shape:
                raise VerificationError(f"output '{name}': shape {b.shape} differs from the original {a.shape}",
                                        name, float("inf"))
            if a.dtype.kind != "f":
                if not np.array_equal(a, b):
                    raise VerificationError(f"output '{name}': integer values differ", name, float("inf"))
                continue
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            scale = max(1.0, float(np.max(np.abs(a)))) if a.size else 1.0
            m = float(diff.max()) if diff.size else 0.0
            if m > worst["max_abs_diff"]:
                worst.update(max_abs_diff=m, output=name)
            worst["max_rel_diff"] = max(worst["max_rel_diff"], m / scale)
            if not np.all(np.isfinite(b) == np.isfinite(a)) or np.any(diff > atol * scale + rtol * np.abs(a)):
                raise VerificationError(
                    f"output '{name}' differs from the masked original: max abs diff {m:.3g} "
                    f"(tolerance atol {atol:g} x {scale:.3g}, rtol {rtol:g})", name, m)
    return worst


def fidelity(dense: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict) -> dict:
    """How close the pruned model stays to the dense one on held-out samples, per float output: the mean cosine
    similarity of per-sample outputs and the relative error; where the last axis has several entries, top-1 and
    top-5 agreement (the dense top-1 class is the pruned top-1 / among the pruned top-5); where the output looks
    like logits (last axis ≥ 2, rows not L2-normalised as embeddings are), the mean KL divergence
    KL(softmax(dense) ‖ softmax(pruned)) over the last axis."""
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
        if np.asarray(a).dtype.kind != "f" or np.ndim(a) == 0:
            continue
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        fa, fb = a.reshape(len(a), -1), b.reshape(len(b), -1)
        cos = (fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1) + 1e-12)
        entry = {"cosine": float(cos.mean()),
                 "rel_error": float(np.linalg.norm(fa - fb) / (np.linalg.norm(fa) + 1e-12))}
        classes = a.shape[-1]
        if classes > 1:
            la, lb = a.reshape(-1, classes), b.reshape(-1, classes)
            target = la.argmax(1)
            entry["top1_agreement"] = float((lb.argmax(1) == target).mean())
            k = min(5, classes)
            top = np.argpartition(-lb, k - 1, axis=1)[:, :k]
            entry["top5_agreement"] = float((top == target[:, None]).any(1).mean())
            if not np.allclose(np.linalg.norm(la, axis=1), 1.0, atol=1e-3):
                entry["kl"] = _mean_kl(la, lb)
        result["outputs"][name] = entry
    return result


def _mean_kl(logits_p: np.ndarray, logits_q: np.ndarray) -> float:
    """Mean over rows of KL(softmax(p) ‖ softmax(q)), computed with log-softmax (no overflow)."""
    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    lp, lq = log_softmax(logits_p), log_softmax(logits_q)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))
