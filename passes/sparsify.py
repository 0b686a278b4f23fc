"""The sparsify pass: replace weight layers by ai.graphprune block-sparse ops where that is measured faster.

    1. find eligible layers and the bias/activation each absorbs            (sparse_layers.py)
    2. time dense vs sparse per layer configuration on this machine          (sparse_cost.py)
    3. for the layers that win: the layer-input Hessian H = XᵀX/n from calibration data (or the data-free
       synthetic proxy), then SparseGPT with a block mask: which blocks go, and compensation of the rest
       (sparsegpt.py); Conv uses the Hessian of its im2col rows, sampled at random output positions
    4. emit the sparse nodes with their function bodies (the model runs without the native library too)
    5. verify: every emitted node's output and every graph output equal the dense model whose sparsified
       layers carry the same compensated, masked weights — in onnxruntime with the native library and
       without it (function fallback) — and onnx's full checker passes
A layer that stays dense keeps its original weights: no sparsity, no accuracy loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from graphprune.calibration import GRAM_ROWS, ChannelStats, batches, static_batch
from graphprune.errors import GraphpruneError, VerificationError
from graphprune.ir import Graph

from .sparse_cost import CostModel, candidate_formats, choose, session_options, time_interleaved
from .sparse_layers import Layer, block_width, find_layers, sparse_node, sparse_op_type
from .sparsegpt import apply_block_mask, sparsegpt

FORMATS = ("auto", "bsr", "csr")
DAMP = 0.01                       # H + 1 % of its mean diagonal, as SparseGPT
GRAM_BUDGET = 1 << 30             # bytes of float64 Gram matrices held in one calibration run


class SparsifyError(GraphpruneError):
    """Bad sparsity settings, or a model the pass cannot process."""


@dataclass
class SparseLayerReport:
    node: str
    op: str                       # the original op type
    shape: str                    # e.g. 'Gemm 1152→256 +bias Relu'
    x_shape: tuple = ()           # input shape the timings used
    format: str = "dense"         # 'bsr', 'csr' or 'dense'
    sparsity: float = 0.0         # block sparsity actually emitted (0 when dense)
    decision: str = ""            # e.g. 'bsr (2.10× faster)', 'dense (sparse 0.87× of dense)'
    dense_us: float | None = None
    sparse_us: float | None = None
    rel_error: float | None = None        # ‖X(W−Ŵ)‖/‖XW‖ on the calibration Hessian, with compensation
    rel_error_plain: float | None = None  # same mask, blocks just removed

    @property
    def emitted(self) -> bool:
        return self.format != "dense"


@dataclass
class SparsifyResult:
    model: onnx.ModelProto
    layers: list = field(default_factory=list)        # SparseLayerReport per eligible layer
    summary: dict = field(default_factory=dict)


def check_settings(sparsity: float, fmt: str) -> None:
    if not 0.0 < sparsity < 1.0:
        raise SparsifyError(f"sparsity must be in (0, 1), got {sparsity}")
    if fmt not in FORMATS:
        raise SparsifyError(f"sparse format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def sparsify_for_prune(graph: Graph, report, sparsity, fmt, force, threads, calib, calib_samples, holdout, seed,
                       input_dims, verify, verify_samples, progress) -> onnx.ModelProto:
    """The API's one call: calibration feeds as the channel pruning reads them (the same file and sample count,
    the same held-out samples left out; or the same data-free proxy), then the pass. Fills
    report.sparse_layers and report.sparse; returns the sparsified model."""
    from graphprune.calibration import load_feeds, split, synthetic_feeds
    if calib is not None:
        feeds, _ = split(load_feeds(calib, graph, calib_samples + holdout), holdout)
        source = f"{calib} ({len(next(iter(feeds.values())))} samples)"
    else:
        feeds = synthetic_feeds(graph, min(calib_samples, 64), seed=seed, dims=input_dims)
        source = f"synthetic proxy: {len(next(iter(feeds.values())))} standard-normal input samples (data-free)"
    result = sparsify(graph, sparsity, feeds, source, fmt=fmt, force=force, threads=threads, verify=verify,
                      verify_samples=verify_samples, seed=seed, input_dims=input_dims, progress=progress)
    report.sparse_layers = result.layers
    report.sparse = result.summary
    return result.model


def sparsify(graph: Graph, sparsity: float, feeds: dict, source: str = "", fmt: str = "auto",
             force: bool = False, threads: int | None = None, verify: bool = True, verify_samples: int = 2,
             seed: int = 0, input_dims: dict | None = None, measure=None, end_to_end: bool = True,
             progress=None) -> SparsifyResult:
    """Sparsify every eligible layer of `graph` (left untouched) at block sparsity `sparsity`.
    feeds: calibration samples {input: array, first axis = samples}; `source` says where they came from.
    fmt: 'auto' (BSR; CSR at ≥ 85 % where measured faster than BSR), 'bsr' or 'csr' (Conv is always BSR).
    force: emit every eligible layer whatever the timing says (also without the native library).
    measure: replaces the timing function of the cost model (tests)."""
    from graphprune import kernels
    check_settings(sparsity, fmt)
    say = progress or (lambda msg: None)
    graph = graph.clone()
    native = kernels.available()
    summary = {"sparsity": sparsity, "format": fmt, "forced": force, "calibration": source,
               "native": native, "native_status": kernels.status(), "threads": threads or "onnxruntime default",
               "notes": []}
    layers, notes = find_layers(graph)
    summary["notes"] += notes
    if not native:
        summary["notes"].append(
            f"native sparse-kernel library not available ({kernels.status()}): "
            + ("emitting anyway (--sparse-force); the model runs through the function fallback at dense speed"
               if force else "no layer can be faster, every layer stays dense (--sparse-force emits anyway)"))
    x_shapes = _probe_input_shapes(graph, layers, feeds, input_dims)
    cost = CostModel(graph, threads=threads, measure=measure) if (native or measure) else None

    plans, reports = [], []
    for i, layer in enumerate(layers):
        report = SparseLayerReport(layer.name, layer.op, layer.describe(), x_shapes[layer.x])
        formats = candidate_formats(layer, sparsity, fmt)
        m = None
        if cost is not None:
            say(f"sparsify: timing layer {i + 1}/{len(layers)} {layer.name} ({layer.describe()})")
            m = cost.measure(layer, x_shapes[layer.x], sparsity, formats)
            report.dense_us = m.dense_s * 1e6
        chosen, why = choose(m, formats, cost.margin if cost else 1.1)
        if chosen is None and force:
            chosen = min(formats, key=lambda f: m.sparse_s[f]) if m else formats[0]
            why = f"forced; {why}" if m else "forced; no native library"
        elif chosen is None and cost is None:
            why = "no native library"
        report.decision = f"{chosen or 'dense'} ({why})"
        if chosen:
            report.format = chosen
            if m:
                report.sparse_us = m.sparse_s[chosen] * 1e6
            plans.append((layer, chosen))
        elif m:
            best = min(formats, key=lambda f: m.sparse_s[f])
            report.sparse_us = m.sparse_s[best] * 1e6
        reports.append(report)

    before = graph.to_model(with_value_info=False)
    summary["bytes_before"] = before.ByteSize()
    weights = _sparse_weights(graph, plans, feeds, sparsity, reports, say)
    reference = _masked_reference(graph, plans, weights)
    model = _emit(graph, plans, weights)
    say("sparsify: checking the model")
    _check(model)
    if verify and plans:
        summary["verification"] = verify_sparse(reference, model, plans, graph,
                                                verify_samples, seed, input_dims, say)
    summary["bytes_after"] = model.ByteSize()
    summary["layers_sparse"] = len(plans)
    summary["layers_dense"] = len(layers) - len(plans)
    if end_to_end and plans:
        say("sparsify: timing the whole model, dense vs sparse")
        summary["end_to_end"] = _end_to_end(before, model, graph, threads, input_dims, native)
    return SparsifyResult(model, reports, summary)


# ---- shapes and statistics -----------------------------------------------------------------------------
def _session(model: onnx.ModelProto):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _exposing(graph: Graph, names) -> onnx.ModelProto:
    model = graph.to_model(with_value_info=False)
    outputs = {o.name for o in model.graph.output}
    for name in names:
        if name not in outputs:
            model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model


def _probe_input_shapes(graph: Graph, layers: list[Layer], feeds: dict, input_dims) -> dict:
    """Each layer input's shape in one run at the model's static batch (or batch 1): the shapes the
    cost model times and the report shows. Dims the calibration samples fix (sequence length) come from
    them."""
    names = sorted({layer.x for layer in layers})
    if not names:
        return {}
    batch = static_batch(graph.inputs) or 1
    feed = {k: v[:batch] for k, v in feeds.items()}
    values = _session(_exposing(graph, names)).run(names, feed)
    return {name: tuple(int(d) for d in v.shape) for name, v in zip(names, values)}


def _stats_key(layer: Layer):
    conv = layer.conv
    return (layer.x, None if conv is None else (tuple(conv["kernel_shape"]), tuple(conv["strides"]),
                                               tuple(conv["pads"]), tuple(conv["dilations"])))


def im2col_rows(x: np.ndarray, conv: dict, rows: int, rng) -> np.ndarray:
    """[n, Cin·kh·kw] input patches of a Conv at up to `rows` random output positions; the column order is
    the tap order t = (ci·kh + r)·kw + s of the block format."""
    kh, kw = conv["kernel_shape"]
    sh, sw = conv["strides"]
    dh, dw = conv["dilations"]
    top, left, bottom, right = conv["pads"]
    b, c, h, w = x.shape
    ho = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    wo = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    total = b * ho * wo
    pick = rng.choice(total, min(rows, total), replace=False) if total > rows else np.arange(total)
    bi, rest = np.divmod(pick, ho * wo)
    oi, oj = np.divmod(rest, wo)
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    r = oi[:, None] * sh + np.arange(kh)[None, :] * dh                      # [n, kh]
    s = oj[:, None] * sw + np.arange(kw)[None, :] * dw                      # [n, kw]
    patches = xp[bi[:, None, None, None], np.arange(c)[None, :, None, None], r[:, None, :, None],
                 s[:, None, None, :]]                                        # [n, c, kh, kw]
    return patches.reshape(len(pick), c * kh * kw)


def layer_hessians(graph: Graph, layers: list[Layer], feeds: dict, say) -> dict:
    """ChannelStats (with Gram) of each layer's input rows: X[..., K] for MatMul/Gemm, im2col rows for Conv.
    Layers reading the same input share one. Calibration runs are split so no run holds more than
    GRAM_BUDGET bytes of Gram matrices."""
    keys = {}
    for layer in layers:
        keys.setdefault(_stats_key(layer), layer)
    groups, current, size = [], [], 0
    for key, layer in keys.items():
        need = 8 * layer.rows ** 2
        if current and size + need > GRAM_BUDGET:
            groups.append(current)
            current, size = [], 0
        current.append((key, layer))
        size += need
    if current:
        groups.append(current)
    stats = {}
    batch = static_batch(graph.inputs) or 16
    total = len(next(iter(feeds.values())))
    for g, group in enumerate(groups):
        names = sorted({key[0] for key, _ in group})
        sess = _session(_exposing(graph, names))
        part = {key: ChannelStats(want_gram=True) for key, _ in group}
        rng = np.random.default_rng(0)
        done = 0
        for feed in batches(feeds, batch):
            values = dict(zip(names, sess.run(names, feed)))
            for key, layer in group:
                x = values[key[0]]
                if layer.conv is None:
                    part[key].add(x, x.ndim - 1)
                else:
                    part[key].add(im2col_rows(x, layer.conv, GRAM_ROWS, rng), 1)
            done += len(next(iter(feed.values())))
            say(f"sparsify: layer statistics {done}/{total} samples"
                + (f" (run {g + 1}/{len(groups)})" if len(groups) > 1 else ""))
        stats.update(part)
    return stats


def _sparse_weights(graph, plans, feeds, sparsity, reports, say) -> list:
    """(compensated masked weight [rows, outputs], keep mask) per planned layer."""
    if not plans:
        return []
    stats = layer_hessians(graph, [layer for layer, _ in plans], feeds, say)
    by_name = {r.node: r for r in reports}
    out = []
    for i, (layer, fmt) in enumerate(plans):
        say(f"sparsify: SparseGPT {i + 1}/{len(plans)} {layer.name} ({layer.rows}×{layer.outputs})")
        st = stats[_stats_key(layer)]
        width = block_width(layer, fmt)
        w, keep = sparsegpt(layer.weight, st.hessian(DAMP), sparsity, width)
        report = by_name[layer.name]
        report.sparsity = float(1.0 - keep.mean())
        gram = st.gram / max(st.n, 1)
        report.rel_error = _relative_error(layer.weight, w, gram)
        report.rel_error_plain = _relative_error(layer.weight, apply_block_mask(layer.weight, keep, width), gram)
        out.append((w, keep))
    return out


def _relative_error(w, w_hat, gram) -> float:
    """‖X(W−Ŵ)‖_F / ‖XW‖_F through the Gram matrix XᵀX/n."""
    w = w.astype(np.float64)
    d = w - w_hat.astype(np.float64)
    num = float(np.sum(d * (gram @ d)))
    den = float(np.sum(w * (gram @ w)))
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0


# ---- emission -----------------------------------------------------------------------------------------
def _node_index(graph: Graph, node) -> int:
    return next(i for i, n in enumerate(graph.nodes) if n is node)


def _emit(graph: Graph, plans, weights) -> onnx.ModelProto:
    """Replace each planned layer (and the nodes it absorbs) by its sparse node; returns the model."""
    from graphprune.kernels import ops
    if not plans:
        return graph.to_model(with_value_info=True)
    dropped = set()
    for (layer, fmt), (w, keep) in zip(plans, weights):
        node, inits = sparse_node(layer, w, keep, fmt, graph.fresh_name)
        for name, arr in inits.items():
            graph.set_initializer(name, arr)
        graph.nodes[_node_index(graph, layer.node)] = node
        dropped.update(id(n) for n in layer.fused)
    graph.nodes = [n for n in graph.nodes if id(n) not in dropped]
    graph.reindex()
    if not any(i.domain == ops.DOMAIN for i in graph.model.opset_import):
        graph.model.opset_import.append(helper.make_opsetid(ops.DOMAIN, 1))
    graph.model.ir_version = max(graph.model.ir_version, 8)   # model-local functions need IR 8
    model = graph.to_model(with_value_info=True)
    produced = {o for n in model.graph.node for o in n.output}
    kept_info = [v for v in model.graph.value_info if v.name in produced]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept_info)
    ops.attach_functions(model)
    return model


def _masked_reference(graph: Graph, plans, weights) -> onnx.ModelProto:
    """The dense model with each planned layer's weight replaced by its compensated, masked dense weight."""
    ref = graph.clone()
    for (layer, _), (w, _keep) in zip(plans, weights):
        node = ref.nodes[_node_index(graph, layer.node)]
        node.input[1] = ref.add_initializer(f"{node.input[1]}__sparse_ref", layer.original_weight(w))
    return ref.to_model(with_value_info=False)


def _check(model: onnx.ModelProto) -> None:
    if model.ByteSize() < (1 << 31) - (1 << 20):
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise SparsifyError(f"the sparsified model fails onnx's checker: {exc}") from exc


# ---- verification -------------------------------------------------------------------------------------
def verify_sparse(reference: onnx.ModelProto, model: onnx.ModelProto, plans: list, graph: Graph,
                  samples: int = 2, seed: int = 0, input_dims=None, say=None, rtol: float = 1e-4,
                  atol: float = 1e-4) -> dict:
    """Every sparse node's output and every graph output equal the masked dense reference, with the native
    library (when present) and through the function fallback. Raises VerificationError naming the first
    node that differs."""
    import onnxruntime as ort
    from graphprune import kernels
    from graphprune.verify import random_feeds
    checked = [(layer.output, (layer, fmt)) for layer, fmt in plans]
    checked += [(o.name, None) for o in model.graph.output if o.name not in {c for c, _ in checked}]
    names = [c for c, _ in checked]

    def with_outputs(m):
        m2 = onnx.ModelProto()
        m2.CopyFrom(m)
        have = {o.name for o in m2.graph.output}
        m2.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                               for n in names if n not in have)
        return m2.SerializeToString()

    feeds = random_feeds(graph, samples, seed=seed, dims=input_dims)
    ref = ort.InferenceSession(with_outputs(reference), session_options(None, native=False),
                               providers=["CPUExecutionProvider"])
    runs = [("function fallback", session_options(None, native=False))]
    if kernels.available():
        runs.insert(0, ("native library", session_options(None, native=True)))
    want = [ref.run(names, feed) for feed in feeds]
    result = {"samples": len(feeds), "paths": [], "max_abs_diff": 0.0}
    for label, opts in runs:
        if say:
            say(f"sparsify: verifying against the masked dense model ({label})")
        sess = ort.InferenceSession(with_outputs(model), opts, providers=["CPUExecutionProvider"])
        for feed, expected in zip(feeds, want):
            got = sess.run(names, feed)
            for (name, plan), a, b in zip(checked, expected, got):
                diff = _mismatch(np.asarray(a), np.asarray(b), rtol, atol)
                result["max_abs_diff"] = max(result["max_abs_diff"], diff[1])
                if diff[0]:
                    where = (f"sparse node '{plan[0].name}' ({sparse_op_type(*plan)} replacing {plan[0].op})"
                             if plan else f"graph output '{name}'")
                    raise VerificationError(
                        f"{where} differs from the masked dense reference ({label}): {diff[2]}", name, diff[1])
        result["paths"].append(label)
    return result


def _mismatch(a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> tuple[bool, float, str]:
    if a.shape != b.shape:
        return True, float("inf"), f"shape {b.shape} instead of {a.shape}"
    if a.dtype.kind != "f":
        same = np.array_equal(a, b)
        return (not same), 0.0 if same else float("inf"), "integer values differ"
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    m = float(d.max()) if d.size else 0.0
    scale = max(1.0, float(np.abs(a).max())) if a.size else 1.0
    bad = not np.all(np.isfinite(a) == np.isfinite(b)) or bool(np.any(d > atol * scale + rtol * np.abs(a)))
    return bad, m, f"max abs diff {m:.3g} (tolerance {atol:g} × {scale:.3g} + {rtol:g} × |ref|)"


# ---- whole-model timing -------------------------------------------------------------------------------
def _end_to_end(dense: onnx.ModelProto, sparse: onnx.ModelProto, graph: Graph, threads, input_dims,
                native: bool) -> dict:
    from graphprune.verify import random_feeds
    feed = random_feeds(graph, 1, seed=0, dims=input_dims)[0]
    times = time_interleaved({"dense": dense, "sparse": sparse}, feed, threads, native=native)
    return {"dense_ms": times["dense"] * 1e3, "sparse_ms": times["sparse"] * 1e3,
            "speedup": times["dense"] / times["sparse"], "native": native,
            "batch": static_batch(graph.inputs) or 1}
