"""The sparsify pass: replace weight layers by ai.graphprune block-sparse ops where that is measured faster.

    1. find eligible layers and the bias/activation each absorbs            (sparse_layers.py)
    2. decide dense vs sparse per layer configuration on this machine: paired timing until the ratio's
       confidence interval clears the margin, else the roofline; cached per machine (sparse_cost.py,
       graphprune/timing.py) — or replayed from a sparse plan, or the roofline alone (no_measure)
    3. for the layers that win, in graph order: the Hessian H = XᵀX/n of the layer's input rows from
       calibration data (or the data-free synthetic proxy), taken on the model whose earlier layers are already
       sparse, and the weight that best reproduces the dense model's output from them (sparse_stats.py); then
       SparseGPT with a block mask: which blocks go, and compensation of the rest (sparsegpt.py). Conv rows
       are its im2col patches, sampled at random output positions (its exact Hessian, no kron approximation)
    4. emit the sparse nodes with their function bodies (the model runs without the native library too)
    5. verify: every emitted node's output and every graph output equal the dense model whose sparsified
       layers carry the same compensated, masked weights — in onnxruntime with the native library and
       without it (function fallback) — and onnx's full checker passes
A layer that stays dense keeps its original weights: no sparsity, no accuracy loss.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from graphprune.errors import GraphpruneError, VerificationError
from graphprune.feeds import random_feeds, static_batch
from graphprune.ir import Graph
from graphprune.runtime import check_model, compare_arrays, expose, run, session
from graphprune.timing import MARGIN, SessionBench, TimingCache, compare

from .layer_stats import pack
from .sparse_cost import CostModel, candidate_formats
from .sparse_layers import Layer, block_width, find_layers, sparse_node, sparse_op_type
from .sparse_stats import DAMP, collect as collect_stats, probe_shapes, stats_key
from .sparsegpt import apply_block_mask, sparsegpt

FORMATS = ("auto", "bsr", "csr")
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
    decision: str = ""            # e.g. 'bsr (measured 2.10× [1.95, 2.31], 24 rounds)'
    how: str = ""                 # measured | cached | analytic | replayed | forced | no library
    ratio: float | None = None    # measured dense/sparse time ratio of the best format, and its interval
    ratio_lo: float | None = None
    ratio_hi: float | None = None
    rounds: int = 0               # paired timing rounds behind the ratio
    analytic: float | None = None # the roofline's ratio, where it decided
    dense_us: float | None = None
    sparse_us: float | None = None
    rel_error: float | None = None        # ‖S·Ŵ − D·W‖/‖D·W‖ on the calibration rows (sparse_stats.py)
    rel_error_plain: float | None = None  # the same with the same blocks of W just removed

    @property
    def emitted(self) -> bool:
        return self.format != "dense"


@dataclass
class SparsifyResult:
    model: onnx.ModelProto
    layers: list = field(default_factory=list)        # SparseLayerReport per eligible layer
    summary: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)          # the per-layer decisions, as a sparse plan (JSON-able)


def check_settings(sparsity: float, fmt: str) -> None:
    if not 0.0 < sparsity < 1.0:
        raise SparsifyError(f"sparsity must be in (0, 1), got {sparsity}")
    if fmt not in FORMATS:
        raise SparsifyError(f"sparse format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def sparsify_for_prune(graph: Graph, report, feeds: dict, calib, sparsity, fmt, force, threads, seed, input_dims,
                       verify, verify_samples, progress, plan_in=None, plan_out=None,
                       no_measure: bool = False) -> onnx.ModelProto:
    """The API's one call, after channel pruning, with the calibration feeds the channel pruning read (the
    held-out samples left out) or its data-free synthetic proxy. Fills report.sparse_layers and
    report.sparse; returns the sparsified model. plan_in: replay a sparse plan file; plan_out: save the
    decisions as one; no_measure: the analytic model alone."""
    n = len(next(iter(feeds.values())))
    source = (f"{calib} ({n} samples)" if calib is not None
              else f"synthetic proxy: {n} standard-normal input samples (data-free)")
    result = sparsify(graph, sparsity, feeds, source, fmt=fmt, force=force, threads=threads, verify=verify,
                      verify_samples=verify_samples, seed=seed, input_dims=input_dims, progress=progress,
                      plan_in=load_sparse_plan(plan_in) if plan_in is not None else None, no_measure=no_measure)
    if plan_out is not None:
        write_sparse_plan(plan_out, result.plan)
    report.sparse_layers = result.layers
    report.sparse = result.summary
    return result.model


def sparsify(graph: Graph, sparsity: float, feeds: dict, source: str = "", fmt: str = "auto",
             force: bool = False, threads: int | None = None, verify: bool = True, verify_samples: int = 2,
             seed: int = 0, input_dims: dict | None = None, measure=None, end_to_end: bool = True,
             sequential: bool = True, progress=None, plan_in: dict | None = None, no_measure: bool = False,
             cache: TimingCache | None = None) -> SparsifyResult:
    """Sparsify every eligible layer of `graph` (left untouched) at block sparsity `sparsity`.
    feeds: calibration samples {input: array, first axis = samples}; `source` says where they came from.
    fmt: 'auto' (BSR; CSR at ≥ 85 % where measured faster than BSR), 'bsr' or 'csr' (Conv is always BSR).
    force: emit every eligible layer whatever the timing says (also without the native library).
    measure: replaces the timing engine's sample source (tests): measure(models, feed, threads) -> sample(name).
    plan_in: a sparse plan (load_sparse_plan) to replay: its decisions, no timing.
    no_measure: decide by the roofline model alone (cached calibration or the defaults); no timing at all.
    cache: the timing cache (default: timing.cache_dir(), i.e. $GRAPHPRUNE_CACHE_DIR or the user cache;
      none when `measure` is injected, unless given).
    sequential: layer by layer, each fitted on the rows of the model with the earlier layers already sparse to
      the dense output (two calibration runs per distinct layer input, each on the part of the model that
      computes it); False: one run on the dense model for all layers (faster, errors compound)."""
    from graphprune import kernels
    from graphprune.kernels import ops
    check_settings(sparsity, fmt)
    opset = graph.opset("")
    if opset < ops.MIN_OPSET:
        raise SparsifyError(f"the ai.graphprune ops' function bodies need opset ≥ {ops.MIN_OPSET}; this model "
                            f"imports opset {opset} (convert it first, e.g. onnx.version_converter)")
    say = progress or (lambda msg: None)
    graph = graph.clone()
    native = kernels.available()
    summary = {"sparsity": sparsity, "format": fmt, "forced": force, "calibration": source,
               "sequential": sequential,
               "native": native, "native_status": kernels.status(), "threads": threads or "onnxruntime default",
               "decided_by": "replayed sparse plan" if plan_in is not None else
               ("analytic model (no measurement)" if no_measure else "measurement, analytic where inconclusive"),
               "notes": []}
    layers, notes = find_layers(graph)
    summary["notes"] += notes
    if not native and plan_in is None:
        summary["notes"].append(
            f"native sparse-kernel library not available ({kernels.status()}): "
            + ("emitting anyway (--sparse-force); the model runs through the function fallback at dense speed"
               if force else "no layer can be faster, every layer stays dense (--sparse-force emits anyway)"))
    x_shapes = probe_shapes(graph, layers, feeds)
    cost = None
    if plan_in is None and (native or measure):
        if cache is None:       # injected timings (tests) never read or pollute the user's cache
            cache = TimingCache(enabled=measure is None)
        if cache.note:
            summary["notes"].append(cache.note)
        cost = CostModel(graph, threads=threads, measure=measure, cache=cache, no_measure=no_measure)
    replay = _replay_index(plan_in, layers, sparsity) if plan_in is not None else None

    plans, reports = [], []
    for i, layer in enumerate(layers):
        report = SparseLayerReport(layer.name, layer.op, layer.describe(), x_shapes[layer.x])
        formats = candidate_formats(layer, sparsity, fmt)
        if replay is not None:
            entry = replay[layer.name]
            chosen = entry["format"] if entry["sparse"] else None
            report.how = "replayed"
            why = f"replayed: {entry.get('reason') or entry.get('decided_by', '')}".rstrip(": ")
        elif cost is None:
            chosen = formats[0] if force else None
            report.how = "forced" if force else "no library"
            why = "forced; no native library" if force else "no native library"
        else:
            if not no_measure:
                say(f"sparsify: timing layer {i + 1}/{len(layers)} {layer.name} ({layer.describe()})")
            choice = cost.choose(layer, x_shapes[layer.x], sparsity, formats)
            d = choice.decision
            chosen, report.how, why = choice.format, d.how, d.reason()
            if d.how == "cached":
                why = f"cached: {why}"
            if chosen is None and force:
                chosen, report.how, why = choice.best, "forced", f"forced; {why}"
            m = choice.measured
            if m is not None:
                report.ratio, report.ratio_lo, report.ratio_hi, report.rounds = m.ratio, m.lo, m.hi, m.rounds
                report.dense_us, report.sparse_us = m.baseline_s * 1e6, m.candidate_s * 1e6
            report.analytic = d.analytic
        report.decision = f"{chosen or 'dense'} ({why})"
        if chosen:
            report.format = chosen
            plans.append((layer, chosen))
        reports.append(report)
    if cost is not None:
        try:
            cost.cache.save()
        except OSError as exc:
            summary["notes"].append(f"timing cache not saved ({cost.cache.path}: {exc.strerror or exc})")
    plan = sparse_plan(reports, layers, sparsity, fmt, cost.margin if cost else MARGIN)

    before = graph.to_model(with_value_info=False)
    summary["bytes_before"] = before.ByteSize()
    weights, reference = _sparse_weights(graph, plans, feeds, sparsity, reports, say, sequential)
    reference = reference.to_model(with_value_info=False)
    model = _emit(graph, plans, weights)
    say("sparsify: checking the model")
    note = _check(model, before)
    if note:
        summary["notes"].append(note)
    if verify and plans:
        summary["verification"] = verify_sparse(reference, model, plans, graph,
                                                verify_samples, seed, input_dims, say)
    summary["bytes_after"] = model.ByteSize()
    summary["layers_sparse"] = len(plans)
    summary["layers_dense"] = len(layers) - len(plans)
    if end_to_end and plans:
        say("sparsify: timing the whole model, dense vs sparse")
        summary["end_to_end"] = _end_to_end(before, model, graph, threads, input_dims, native)
    return SparsifyResult(model, reports, summary, plan)


# ---- SparseGPT per layer --------------------------------------------------------------------------------
def _memory_groups(layers: list[Layer]) -> list[list[Layer]]:
    """Split layers so that no calibration run holds more than GRAM_BUDGET bytes of Gram matrices."""
    return pack(layers, lambda layer: 8 * layer.rows ** 2, GRAM_BUDGET)


def _sparse_weights(graph, plans, feeds, sparsity, reports, say, sequential: bool = True) -> tuple:
    """(compensated masked weight [rows, outputs] and keep mask per planned layer, the masked dense reference
    as a Graph). Sequential: layer by layer in graph order, each fitted on the rows of the model whose earlier
    layers are already sparse, to the dense model's output (sparse_stats.py). Otherwise one calibration run
    on the dense model serves every layer (faster; errors compound)."""
    reference = graph.clone()
    if not plans:
        return [], reference
    by_name = {r.node: r for r in reports}
    steps = {}                                     # statistics key -> planned layers reading those rows
    for item in plans:
        steps.setdefault(stats_key(item[0]), []).append(item)
    stats = {}
    if not sequential:
        for group in _memory_groups([items[0][0] for items in steps.values()]):
            stats.update(collect_stats(graph, group, feeds, say=lambda m: say(f"sparsify: {m}")))
    results = {}
    for n, (key, items) in enumerate(steps.items()):
        if sequential:
            say(f"sparsify: statistics of layer input {n + 1}/{len(steps)} ('{key[0]}')")
            stats = collect_stats(graph, [items[0][0]], feeds, sparse=reference if results else None)
        st = stats[key]
        h = st.hessian(DAMP)
        for layer, fmt in items:
            say(f"sparsify: SparseGPT {len(results) + 1}/{len(plans)} {layer.name} ({layer.rows}×{layer.outputs})")
            width = block_width(layer, fmt)
            w, keep = sparsegpt(st.target(layer.weight, DAMP), h, sparsity, width)
            w = w.astype(np.float32)
            report = by_name[layer.name]
            report.sparsity = float(1.0 - keep.mean())
            report.rel_error = st.relative_error(w, layer.weight)
            report.rel_error_plain = st.relative_error(apply_block_mask(layer.weight, keep, width), layer.weight)
            results[layer.name] = (w, keep)
            node = reference.nodes[_node_index(graph, layer.node)]
            node.input[1] = reference.add_initializer(f"{node.input[1]}__sparse_ref", layer.original_weight(w))
    return [results[layer.name] for layer, _ in plans], reference


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


def _check(model: onnx.ModelProto, before: onnx.ModelProto) -> str | None:
    """onnx's full check of the output. A failure the input model has as well is the input's, not the
    pass's: returned as a note instead of raised."""
    try:
        check_model(model)
    except onnx.checker.ValidationError as exc:
        try:
            check_model(before)
        except onnx.checker.ValidationError as same:
            return f"onnx's checker rejects the input model already ({str(same).splitlines()[0]}); not re-checked"
        raise SparsifyError(f"the sparsified model fails onnx's checker: {exc}") from exc
    return None


# ---- verification -------------------------------------------------------------------------------------
def verify_sparse(reference: onnx.ModelProto, model: onnx.ModelProto, plans: list, graph: Graph,
                  samples: int = 2, seed: int = 0, input_dims=None, say=None, rtol: float | None = None,
                  atol: float | None = None) -> dict:
    """Every sparse node's output and every graph output equal the masked dense reference, with the native
    library (when present) and through the function fallback, within runtime.tolerance(dtype,
    reordered_sums=True) unless atol/rtol are given. Raises VerificationError naming the first node that
    differs. Sessions run optimised, as the model will be deployed."""
    from graphprune import kernels
    checked = [(layer.output, (layer, fmt)) for layer, fmt in plans]
    checked += [(o.name, None) for o in model.graph.output if o.name not in {c for c, _ in checked}]
    names = [c for c, _ in checked]

    feeds = random_feeds(graph, samples, seed=seed, dims=input_dims)
    ref = session(expose(reference, names, graph.dtypes), optimize=True, name="masked dense reference")
    paths = [("function fallback", False)]
    if kernels.available():
        paths.insert(0, ("native library", True))
    want = [run(ref, feed, names) for feed in feeds]
    exposed = expose(model, names, graph.dtypes)
    result = {"samples": len(feeds), "paths": [], "max_abs_diff": 0.0}
    for label, native in paths:
        if say:
            say(f"sparsify: verifying against the masked dense model ({label})")
        sess = session(exposed, optimize=True, custom_ops=native, name=f"sparsified model ({label})")
        for feed, expected in zip(feeds, want):
            got = run(sess, feed, names)
            for name, plan in checked:
                diff = compare_arrays(expected[name], got[name], reordered_sums=True, atol=atol, rtol=rtol)
                result["max_abs_diff"] = max(result["max_abs_diff"], diff.max_abs_diff)
                if diff.bad:
                    where = (f"sparse node '{plan[0].name}' ({sparse_op_type(*plan)} replacing {plan[0].op})"
                             if plan else f"graph output '{name}'")
                    raise VerificationError(
                        f"{where} differs from the masked dense reference ({label}): {diff.reason}", name,
                        diff.max_abs_diff)
        result["paths"].append(label)
    return result


# ---- whole-model timing -------------------------------------------------------------------------------
def _end_to_end(dense: onnx.ModelProto, sparse: onnx.ModelProto, graph: Graph, threads, input_dims,
                native: bool) -> dict:
    """Whole model, dense vs sparse, paired interleaved rounds of the timing engine: median speed-up and its
    sign-test interval."""
    feed = random_feeds(graph, 1, seed=0, dims=input_dims)[0]
    bench = SessionBench({"dense": dense, "sparse": sparse}, feed, threads, native=native)
    r = compare(bench, "dense", ["sparse"], margin=1.0, looks=(12, 24, 48))["sparse"]
    return {"dense_ms": r.baseline_s * 1e3, "sparse_ms": r.candidate_s * 1e3, "speedup": r.ratio,
            "speedup_lo": r.lo, "speedup_hi": r.hi, "rounds": r.rounds, "native": native,
            "batch": static_batch(graph.inputs) or 1}


# ---- sparse plans -------------------------------------------------------------------------------------------
PLAN_FORMAT = 1


def _block(layer: Layer, fmt: str | None) -> list | None:
    """[rows, outputs] of one block of the emitted format (Conv: 1 tap × 4 output channels)."""
    return None if fmt is None else [1, block_width(layer, fmt)]


def sparse_plan(reports: list, layers: list, sparsity: float, fmt: str, margin: float) -> dict:
    """The per-layer decisions as JSON-able data: replayable with plan_in / --sparse-plan-in."""
    entries = []
    for r, layer in zip(reports, layers):
        fmt_out = r.format if r.emitted else None
        entries.append({"layer": r.node, "op": r.op, "shape": r.shape, "sparse": r.emitted,
                        "format": fmt_out or "dense", "block": _block(layer, fmt_out), "decided_by": r.how,
                        "reason": r.decision[r.decision.find("(") + 1:-1] if "(" in r.decision else "",
                        "ratio": r.ratio, "interval": [r.ratio_lo, r.ratio_hi] if r.ratio is not None else None,
                        "analytic": r.analytic})
    return {"graphprune_sparse_plan": PLAN_FORMAT, "sparsity": sparsity, "format": fmt, "margin": margin,
            "layers": entries}


def load_sparse_plan(path) -> dict:
    from graphprune.fileio import read_regular
    try:  # a regular file of bounded size (a FIFO or device is refused unread)
        data = json.loads(read_regular(path, 256 << 20, SparsifyError, "sparse plan").decode("utf-8"))
    except RecursionError:
        raise SparsifyError(f"{path}: not a sparse plan (JSON nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise SparsifyError(f"{path}: not a sparse plan (invalid JSON: {exc})") from exc
    if not isinstance(data, dict) or data.get("graphprune_sparse_plan") != PLAN_FORMAT \
            or not isinstance(data.get("layers"), list):
        raise SparsifyError(f"{path}: not a graphprune sparse plan (format {PLAN_FORMAT})")
    return data


def write_sparse_plan(path, plan: dict) -> None:
    """Atomically, through graphprune.fileio (O_EXCL temp file, rename, open()'s mode, SIGTERM cleanup)."""
    from graphprune.fileio import write_text
    write_text(path, json.dumps(plan, indent=1) + "\n")


def _replay_index(plan: dict, layers: list, sparsity: float) -> dict:
    """{layer name: plan entry}, after checking that the plan was made for this model and sparsity."""
    if abs(float(plan.get("sparsity", -1)) - sparsity) > 1e-9:
        raise SparsifyError(f"the sparse plan was made at sparsity {plan.get('sparsity')}, not {sparsity}")
    entries = {}
    for e in plan["layers"]:
        if not isinstance(e, dict) or not {"layer", "sparse", "format"} <= set(e):
            raise SparsifyError(f"sparse plan entry {e!r} lacks layer/sparse/format")
        entries[e["layer"]] = e
    names = {layer.name for layer in layers}
    missing = [layer.name for layer in layers if layer.name not in entries]
    extra = [n for n in entries if n not in names]
    if missing or extra:
        raise SparsifyError("the sparse plan does not fit this model: "
                            + (f"no entry for layer(s) {', '.join(missing[:5])}" if missing else "")
                            + ("; " if missing and extra else "")
                            + (f"layer(s) {', '.join(extra[:5])} not in the model" if extra else ""))
    for layer in layers:
        e = entries[layer.name]
        if e.get("shape") not in (None, layer.describe()):
            raise SparsifyError(f"sparse plan entry for '{layer.name}' is a {e['shape']}, the model has "
                                f"{layer.describe()}")
        if e["sparse"] and e["format"] not in (["bsr"] if layer.conv else ["bsr", "csr"]):
            raise SparsifyError(f"sparse plan: format {e['format']!r} is not available for '{layer.name}' "
                                f"({layer.op})")
    return entries
