"""Verification: the pruned model must equal the original with the removed channels masked on the consumer side
(masking.py builds that masked original; runtime.py runs both and holds the tolerances)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import GraphpruneError, VerificationError
from .feeds import static_batch
from .ir import Graph, walk_nodes
from .masking import insert_consumer_masks
from .runtime import OnnxRuntimeError, compare_arrays, expose, run, session, tolerance


def masked_reference(graph: Graph, removed: dict[tuple[str, int], np.ndarray], oracle_masks=(),
                     weight_updates: dict[str, np.ndarray] | None = None, mask_fills=()) -> onnx.ModelProto:
    """The original model with removed channels zeroed wherever a node reads them. `mask_fills` ((node, tensor,
    zero point) triples) name quantized inputs whose removed channels read the zero point instead of 0."""
    model = graph.to_model(with_value_info=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    by_tensor: dict[str, dict[int, np.ndarray]] = {}
    for (name, axis), idx in removed.items():
        if len(idx):
            by_tensor.setdefault(name, {})[axis] = idx
    read = {i for _, node in walk_nodes(g.node) for i in node.input}  # subgraph bodies read too
    masks = {}
    for name, axes in by_tensor.items():
        if name in inits or name not in read:
            continue
        shape = graph.shape(name)
        mask = np.ones([d if ax in axes else 1 for ax, d in enumerate(shape)], dtype=bool)
        for ax, idx in axes.items():
            index = [slice(None)] * len(shape)
            index[ax] = idx
            mask[tuple(index)] = False
        masks[name] = [mask]
    insert_consumer_masks(model, masks, graph.dtypes, fills={(f[0], f[1]): f[2] for f in mask_fills})
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


_LOW_PRECISION = (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16)


def compute_tolerance(model: onnx.ModelProto) -> tuple[float, float] | None:
    """(atol, rtol) of the lowest float precision the model computes in (its float weights, Cast targets,
    inputs and outputs) when that is below float32, else None (each output's own dtype decides). A model that
    computes in float16 but returns float32 differs by float16 roundings, not float32 ones."""
    seen = {t.data_type for t in model.graph.initializer}
    seen |= {v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    for node in model.graph.node:
        if node.op_type in ("Cast", "CastLike"):
            seen.update(a.i for a in node.attribute if a.name == "to")
    for low in _LOW_PRECISION:
        if low in seen:
            return tolerance(low)
    return None


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


def _run(sess, feed, names, feeds):
    """runtime.run, with the dims the random inputs used in the error (which --dim to pass)."""
    try:
        return run(sess, feed, names)
    except OnnxRuntimeError as exc:
        dims = getattr(feeds, "dims", {})
        hint = (f"; the random inputs used {', '.join(f'{k}={v}' for k, v in dims.items())}: pass --dim NAME=VALUE "
                f"with sizes the model accepts") if dims else ""
        raise VerificationError(f"the model does not run on random inputs ({exc}){hint}") from None


def _check_pair(name, a, b, atol, rtol, worst, what="output"):
    result = compare_arrays(a, b, atol=atol, rtol=rtol)
    if np.asarray(a).dtype.kind == "f" and np.shape(a) == np.shape(b):
        if result.max_abs_diff > worst["max_abs_diff"]:
            worst.update(max_abs_diff=result.max_abs_diff, output=name)
        worst["max_rel_diff"] = max(worst["max_rel_diff"], result.max_abs_diff / result.scale)
    if result.bad:
        raise VerificationError(f"{what} '{name}' differs from the masked original: {result.reason}", name,
                                result.max_abs_diff)


def compare(reference: onnx.ModelProto, pruned: onnx.ModelProto, feeds, rtol: float | None = None,
            atol: float | None = None, removed: dict | None = None) -> dict:
    """Run both models on the same feeds; raise VerificationError naming the first output that differs.
    Tolerances follow each output's dtype (runtime.tolerance), or the model's compute precision when that is
    lower (float16 inside, float32 out), unless given.

    When the outputs prove nothing (NaN/Inf, all zero, or identical for every random input: a zero-initialised
    head), the tensors feeding them are compared instead, nearest first (`removed`: (tensor, axis) -> removed
    indices maps the original's channels onto the pruned tensor). 'compared' lists what was compared: empty
    when nothing was."""
    if rtol is None and atol is None and compute_tolerance(reference) is not None:
        atol, rtol = compute_tolerance(reference)
    ref_sess = session(reference, name="masked original")
    new_sess = session(pruned, name="pruned model")
    names = [o.name for o in ref_sess.get_outputs()]
    worst = {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "output": None, "samples": len(feeds), "compared": [],
             "degenerate": {}, "atol": atol, "rtol": rtol}  # None: each output's dtype decides
    ref_values = {n: [] for n in names}
    for feed in feeds:
        want = _run(ref_sess, feed, names, feeds)
        got = _run(new_sess, feed, names, feeds)
        for name in names:
            _check_pair(name, want[name], got[name], atol, rtol, worst)
            ref_values[name].append(np.asarray(want[name]))
    for name in names:
        why = _degenerate(ref_values[name]) if feeds else "no samples"
        if why:
            worst["degenerate"][name] = why
        else:
            worst["compared"].append(name)
    if feeds and not worst["compared"]:
        _compare_intermediates(reference, pruned, feeds, names, atol, rtol, worst, removed or {})
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


def _compare_intermediates(reference, pruned, feeds, outputs, atol, rtol, worst, removed) -> None:
    """Compare the nearest non-degenerate tensor feeding the outputs, kept channels only."""
    types = {v.name: v.type.tensor_type.elem_type for v in list(pruned.graph.value_info) + list(pruned.graph.output)}
    pruned_names = {o for n in pruned.graph.node for o in n.output}
    candidates = [n for n in _cone(reference, outputs) if n in pruned_names and n in types and "__gp_" not in n]
    if not candidates:
        return
    try:
        ref_sess = session(expose(reference, candidates, types, only=True), name="masked original")
        new_sess = session(expose(pruned, candidates, types, only=True), name="pruned model")
    except GraphpruneError:
        return
    runs = [(_run(ref_sess, f, candidates, feeds), _run(new_sess, f, candidates, feeds)) for f in feeds]
    by_axis: dict[str, dict[int, np.ndarray]] = {}
    for (tensor, axis), idx in removed.items():
        if len(idx):
            by_axis.setdefault(tensor, {})[axis] = np.asarray(idx)
    for name in candidates:
        ref_vals = []
        for want, got in runs:
            a = np.asarray(want[name])
            for axis, idx in by_axis.get(name, {}).items():  # the pruned tensor lacks the removed channels
                if axis < a.ndim and a.shape[axis] != np.shape(got[name])[axis]:
                    a = np.delete(a, idx, axis=axis)
            ref_vals.append(a)
        if _degenerate(ref_vals) or any(a.shape != np.shape(got[name]) for a, (_, got) in zip(ref_vals, runs)):
            continue
        for a, (_, got) in zip(ref_vals, runs):
            _check_pair(name, a, got[name], atol, rtol, worst, what="intermediate tensor")
        worst["compared"].append(name)
        worst["intermediate"] = True
        return


def fidelity(dense: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict) -> dict:
    """How close the pruned model stays to the dense one on held-out samples, per float output: the mean cosine
    similarity of per-sample outputs and the relative error; where the last axis has several entries, top-1 and
    top-5 agreement (the dense top-1 class is the pruned top-1 / among the pruned top-5); where the output looks
    like logits (last axis ≥ 2, rows not L2-normalised as embeddings are), the mean KL divergence
    KL(softmax(dense) ‖ softmax(pruned)) over the last axis."""
    a_sess = session(dense, optimize=True, name="dense model")
    b_sess = session(pruned, optimize=True, name="pruned model")
    names = [o.name for o in a_sess.get_outputs()]
    size = static_batch(dense.graph.input) or 16
    a_out = list(run(a_sess, feeds, names, batch=size).values())
    b_out = list(run(b_sess, feeds, names, batch=size).values())
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


PROFILE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger", "QLinearConv",
               "QLinearMatMul", "LSTM", "GRU", "RNN")
PROFILE_SAMPLES = 8


def layer_profile(dense: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict, removed: dict,
                  samples: int = PROFILE_SAMPLES) -> list[dict]:
    """Where the error enters: for every weighted layer both models compute (same node output name, dense
    order), the relative error ‖y_pruned − y_dense‖ / ‖y_dense‖ of its output on held-out samples, over the
    output channels the pruned model kept (`removed`: (tensor, axis) -> removed indices, dropped from the dense
    output before comparing). Runs one sample at a time, so memory stays at one sample's activations."""
    pruned_outputs = {o for n in pruned.graph.node for o in n.output}
    names = [n.output[0] for n in dense.graph.node
             if n.op_type in PROFILE_OPS and n.output and n.output[0] in pruned_outputs]
    if not names or not feeds:
        return []
    a_sess = session(expose(dense, names, only=True), optimize=True, name="dense model")
    b_sess = session(expose(pruned, names, only=True), optimize=True, name="pruned model")
    drops: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (name, axis), idx in removed.items():
        if len(idx):
            drops.setdefault(name, []).append((axis, np.asarray(idx, dtype=np.int64)))
    diff = np.zeros(len(names))
    ref = np.zeros(len(names))
    total = len(next(iter(feeds.values())))
    for i in range(min(samples, total)):
        one = {k: v[i:i + 1] for k, v in feeds.items()}
        a_out = run(a_sess, one, names)
        b_out = run(b_sess, one, names)
        for k, name in enumerate(names):
            a = np.asarray(a_out[name], dtype=np.float64)
            b = np.asarray(b_out[name], dtype=np.float64)
            for axis, idx in sorted(drops.get(name, []), key=lambda t: -t[0]):
                a = np.delete(a, idx[idx < a.shape[axis]], axis=axis)
            if a.shape != b.shape:
                diff[k] = ref[k] = np.nan   # a layout the removed indices do not describe: not compared
                continue
            diff[k] += float(np.sum((a - b) ** 2))
            ref[k] += float(np.sum(a ** 2))
    ops = {n.output[0]: (n.name, n.op_type) for n in dense.graph.node if n.output}
    return [{"node": ops[name][0], "op": ops[name][1], "rel_error": float(np.sqrt(d / r)) if r > 0 else 0.0}
            for name, d, r in zip(names, diff, ref) if not np.isnan(d)]
