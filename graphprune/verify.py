"""Verification: the pruned model must equal the original with the removed channels masked on the consumer side
(masking.py builds that masked original; runtime.py runs both and holds the tolerances)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import VerificationError
from .feeds import static_batch
from .ir import Graph
from .masking import insert_consumer_masks
from .runtime import compare_arrays, run, session


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
    read = {i for node in g.node for i in node.input}
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


def compare(reference: onnx.ModelProto, pruned: onnx.ModelProto, feeds, rtol: float | None = None,
            atol: float | None = None) -> dict:
    """Run both models on the same feeds; raise VerificationError naming the first output that differs.
    Tolerances follow each output's dtype (runtime.tolerance) unless given."""
    ref_sess = session(reference, name="masked original")
    new_sess = session(pruned, name="pruned model")
    names = [o.name for o in ref_sess.get_outputs()]
    worst = {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "output": None, "samples": len(feeds)}
    for feed in feeds:
        want = run(ref_sess, feed, names)
        got = run(new_sess, feed, names)
        for name in names:
            result = compare_arrays(want[name], got[name], atol=atol, rtol=rtol)
            if np.asarray(want[name]).dtype.kind == "f" and np.shape(want[name]) == np.shape(got[name]):
                if result.max_abs_diff > worst["max_abs_diff"]:
                    worst.update(max_abs_diff=result.max_abs_diff, output=name)
                worst["max_rel_diff"] = max(worst["max_rel_diff"], result.max_abs_diff / result.scale)
            if result.bad:
                raise VerificationError(f"output '{name}' differs from the masked original: {result.reason}",
                                        name, result.max_abs_diff)
    return worst


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
