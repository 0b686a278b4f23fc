"""Cost model of the sparsify pass: is a layer's sparse op faster than its dense form, on this machine?

Each distinct layer configuration is compared as one-node onnxruntime models fed the same input: the dense
layer as the graph has it (with its fused bias/activation nodes, so onnxruntime applies its usual fusions)
against the ai.graphprune op at the target sparsity (every candidate format) with the native library
registered. The timing engine (graphprune/timing.py) runs them interleaved in paired rounds until the
confidence interval of the speed ratio clears the margin; where it does not (or with no_measure) the
roofline model decides, from the bytes and multiply-adds computed here. Measurements, the roofline
calibration and therefore every decision are cached per machine (timing.TimingCache). The sparse model's
mask is random at the exact target block count: speed depends on how many blocks are kept, not on which.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune import timing
from graphprune.timing import (DEFAULT_ROOFLINE, MARGIN, Decision, RatioEstimate, Roofline, SessionBench, Work,
                               compare, decide, estimate_from_json, estimate_to_json, machine_key, median_times)

from .sparse_layers import Layer, block_width, find_layers, sparse_node

ENGINE = 1            # bump when what a cached entry means changes (keys of older entries then miss)
ROOFLINE_VERSION = 1
CALIBRATION_ROUNDS = 21
CALIBRATION_QUANTILE = 0.2

__all__ = ["MARGIN", "CostModel", "LayerChoice", "candidate_formats", "signature", "layer_work", "dense_model",
           "sparse_model", "time_interleaved", "calibrate_roofline", "random_keep"]


def candidate_formats(layer: Layer, sparsity: float, requested: str) -> list[str]:
    """Formats worth measuring: BSR; CSR only for MatMul/Gemm at ≥ 85 % (it loses below, see
    shared/docs/sparse-kernels.md) or when asked for. Conv has only the block format."""
    if layer.conv:
        return ["bsr"]
    if requested in ("bsr", "csr"):
        return [requested]
    return ["bsr", "csr"] if sparsity >= 0.85 else ["bsr"]


def signature(layer: Layer) -> list:
    """The layer configuration as JSON-able data: op, shape, conv geometry, fused activation and nodes."""
    conv = [[k, list(v) if isinstance(v, (list, tuple)) else v] for k, v in sorted((layer.conv or {}).items())]
    lo, hi = layer.clip
    return [layer.op, layer.rows, layer.outputs, conv, [_finite(lo), _finite(hi)],
            [n.op_type for n in layer.fused], bool(np.any(layer.bias))]


def _finite(v: float):
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def random_keep(rows: int, blocks: int, sparsity: float, seed: int = 0) -> np.ndarray:
    total = rows * blocks
    keep = np.ones(total, dtype=bool)
    drop = int(round(sparsity * total))
    keep[np.random.default_rng(seed).choice(total, drop, replace=False)] = False
    return keep.reshape(rows, blocks)


# ---- the analytic side: what a layer moves and computes ---------------------------------------------------------
def layer_work(layer: Layer, x_shape, sparsity: float, fmt: str) -> Work:
    """Bytes and multiply-adds of one call, dense and sparse (float32 values, int32 indices).
    MatMul/Gemm: M = product of X's leading dims, MACs = M·K·N. Conv: MACs = B·Ho·Wo·(Cin·kh·kw)·Cout.
    Sparse values kept: (1 − s) of the weights (exact block count); index: one int32 per block (BSR 1×16 or 4
    output channels) or per value (CSR)."""
    dims = [int(d) if isinstance(d, (int, np.integer)) and d > 0 else 1 for d in x_shape]
    kept = 1.0 - sparsity
    weights = layer.rows * layer.outputs
    if layer.conv:
        c = layer.conv
        batch, h, w = dims[0], dims[2], dims[3]
        (kh, kw), (sh, sw), (dh, dw), p = c["kernel_shape"], c["strides"], c["dilations"], c["pads"]
        ho = (h + p[0] + p[2] - dh * (kh - 1) - 1) // sh + 1
        wo = (w + p[1] + p[3] - dw * (kw - 1) - 1) // sw + 1
        positions = batch * max(ho, 1) * max(wo, 1)
        act = 4.0 * (batch * c["in_channels"] * h * w + positions * layer.outputs)
        pointwise = (kh, kw) == (1, 1) and (sh, sw) == (1, 1) and not any(p)
        kind = "conv1x1" if pointwise else "convkxk"
    else:
        positions = int(np.prod(dims[:-1])) if len(dims) > 1 else 1
        act = 4.0 * positions * (layer.rows + layer.outputs)
        kind = "csr_matmul" if fmt == "csr" else "bsr_matmul"
    width = block_width(layer, fmt)
    index_per_value = 1.0 / width
    macs = float(positions) * weights
    return Work(kind, macs, macs * kept, 4.0 * weights + act + 4.0 * layer.outputs,
                4.0 * weights * kept * (1.0 + index_per_value) + act + 4.0 * layer.outputs)


# ---- one-layer models -------------------------------------------------------------------------------------------
def _opsets(graph) -> list:
    return [helper.make_opsetid(i.domain, i.version) for i in graph.model.opset_import if i.domain in ("", "ai.onnx")]


def _one_layer_model(graph, nodes, inits: dict, layer: Layer, x_shape, extra_opsets=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, f"bench_{layer.name}",
                          [helper.make_tensor_value_info(layer.x, onnx.TensorProto.FLOAT, list(x_shape))],
                          [helper.make_tensor_value_info(layer.output, onnx.TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=_opsets(graph) + list(extra_opsets))
    model.ir_version = max(8, min(graph.model.ir_version, onnx.IR_VERSION))
    return model


def dense_model(graph, layer: Layer, x_shape) -> onnx.ModelProto:
    """The layer and its fused nodes exactly as in the graph, with their constants."""
    nodes = [layer.node] + list(layer.fused)
    inits = {name: graph.initializers[name] for n in nodes for name in n.input if name in graph.initializers}
    return _one_layer_model(graph, nodes, inits, layer, x_shape)


def sparse_model(graph, layer: Layer, x_shape, sparsity: float, fmt: str) -> onnx.ModelProto:
    from graphprune.kernels import ops
    width = block_width(layer, fmt)
    keep = random_keep(layer.rows, -(-layer.outputs // width), sparsity)
    counter = iter(range(1 << 30))
    node, inits = sparse_node(layer, layer.weight, keep, fmt, lambda base: f"{base}_{next(counter)}")
    model = _one_layer_model(graph, [node], inits, layer, x_shape, [helper.make_opsetid(ops.DOMAIN, 1)])
    ops.attach_functions(model)
    return model


def time_interleaved(models: dict, feed: dict, threads: int | None, native: bool = True,
                     rounds: int = CALIBRATION_ROUNDS) -> dict:
    """Median seconds per call of each model on `feed` (the timing engine's interleaved rounds)."""
    return median_times(SessionBench(models, feed, threads, native), list(models), rounds)


# ---- roofline calibration ---------------------------------------------------------------------------------------
def _probe_layer(kind: str, shape):
    """(graph, layer, x shape) of one small layer used to calibrate the roofline."""
    from graphprune.ir import Graph

    from .canonicalize import canonicalize
    rng = np.random.default_rng(0)
    if kind in ("gemv", "tiny", "bsr_matmul", "csr_matmul"):
        m, k, n = shape
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name=f"probe_{kind}")]
        inits = [numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), "W")]
        x_shape, y_shape = [m, k], [m, n]
    else:
        cin, cout, ksize, size = shape
        nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name=f"probe_{kind}", kernel_shape=[ksize, ksize],
                                  pads=[ksize // 2] * 4)]
        inits = [numpy_helper.from_array(
            (rng.standard_normal((cout, cin, ksize, ksize)) / np.sqrt(cin * ksize * ksize)).astype(np.float32), "W")]
        x_shape, y_shape = [1, cin, size, size], [1, cout, size, size]
    g = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    graph = Graph(model)
    canonicalize(graph)
    return graph, find_layers(graph)[0][0], x_shape


# (kind, probe shape, sparsity, format): MatMul (M, K, N); Conv (Cin, Cout, k, H=W)
PROBES = (("tiny", (1, 16, 16), None, None),
          ("gemv", (1, 2048, 2048), None, None),               # 16 MB of weights: streams from memory
          ("bsr_matmul", (8, 1024, 1024), 0.75, "bsr"),
          ("csr_matmul", (8, 1024, 1024), 0.9, "csr"),
          ("conv1x1", (128, 128, 1, 14), 0.75, "bsr"),
          ("convkxk", (64, 64, 3, 14), 0.75, "bsr"))


def calibrate_roofline(measure, threads: int | None) -> Roofline:
    """Measure the roofline's constants once: per-call overhead (a 16×16 MatMul), bandwidth (a dense GEMV over
    16 MB of weights, past any cache) and, per kernel class, dense and sparse multiply-add throughput on a
    compute-bound shape. The 20th percentile of interleaved rounds (timing.median_times says why); the cache
    keeps the result per machine."""
    overhead, bandwidth, dense, sparse = 0.0, DEFAULT_ROOFLINE.bandwidth, {}, {}
    for kind, shape, sparsity, fmt in PROBES:
        graph, layer, x_shape = _probe_layer(kind, shape)
        models = {"dense": dense_model(graph, layer, x_shape)}
        if fmt:
            models[fmt] = sparse_model(graph, layer, x_shape, sparsity, fmt)
        feed = {layer.x: np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)}
        t = median_times(measure(models, feed, threads), list(models), CALIBRATION_ROUNDS,
                         quantile=CALIBRATION_QUANTILE)
        work = layer_work(layer, x_shape, sparsity or 0.0, fmt or "bsr")
        if kind == "tiny":
            overhead = t["dense"]
        elif kind == "gemv":
            bandwidth = work.dense_bytes / max(t["dense"] - overhead, 1e-9)
        else:
            dense[kind] = work.macs / max(t["dense"] - overhead, 1e-9)
            sparse[kind] = work.kept_macs / max(t[fmt] - overhead, 1e-9)
    return Roofline(bandwidth, overhead, dense, sparse, "calibrated")


# ---- the cost model ---------------------------------------------------------------------------------------------
@dataclass
class LayerChoice:
    """The cost model's answer for one layer: format to emit (None: dense) and how that was decided."""
    format: str | None
    best: str                                   # the fastest candidate format (sparse_us refers to it)
    decision: Decision
    estimates: dict                             # format -> RatioEstimate (empty when not measured)

    @property
    def measured(self) -> RatioEstimate | None:
        return self.estimates.get(self.best)


class CostModel:
    """Decides dense vs sparse per layer configuration. `measure(models, feed, threads)` returns a sample
    function `sample(name) -> seconds per call` (default timing.SessionBench; tests inject fake timings).
    no_measure: the roofline alone (cached calibration, else DEFAULT_ROOFLINE), no timing at all."""

    def __init__(self, graph, threads: int | None = None, measure=None, margin: float = MARGIN,
                 cache: timing.TimingCache | None = None, no_measure: bool = False):
        self.graph = graph
        self.threads = threads
        self.margin = margin
        self.measure_fn = measure or SessionBench
        self.cache = cache if cache is not None else timing.TimingCache(enabled=False)
        self.no_measure = no_measure
        self._roofline = None
        self._machine = machine_key(threads)

    # the roofline: from the cache, else calibrated now (measuring allowed) or the defaults (no_measure)
    def roofline(self) -> Roofline:
        if self._roofline is None:
            key = dict(self._machine, roofline=ROOFLINE_VERSION)
            cached = self.cache.get(key)
            if cached is not None:
                self._roofline = Roofline.from_json(cached)
            elif self.no_measure:
                self._roofline = DEFAULT_ROOFLINE
            else:
                self._roofline = calibrate_roofline(self.measure_fn, self.threads)
                self.cache.put(key, self._roofline.to_json())
        return self._roofline

    def analytic(self, layer: Layer, x_shape, sparsity: float, fmt: str) -> float:
        return self.roofline().ratio(layer_work(layer, x_shape, sparsity, fmt))

    def key(self, layer: Layer, x_shape, sparsity: float, formats: list[str]) -> dict:
        return dict(self._machine, engine=ENGINE, layer=signature(layer), x=[int(d) for d in x_shape],
                    sparsity=round(float(sparsity), 4), formats=list(formats), margin=self.margin)

    def choose(self, layer: Layer, x_shape, sparsity: float, formats: list[str]) -> LayerChoice:
        if self.no_measure:
            ratios = {f: self.analytic(layer, x_shape, sparsity, f) for f in formats}
            best = max(formats, key=lambda f: ratios[f])
            d = decide(None, ratios[best], self.margin)
            return LayerChoice(best if d.sparse else None, best, d, {})
        key = self.key(layer, x_shape, sparsity, formats)
        cached = self.cache.get(key)
        if cached is not None:
            estimates = {f: estimate_from_json(e) for f, e in cached["estimates"].items()}
        else:
            estimates = self._measure(layer, x_shape, sparsity, formats)
            self.cache.put(key, {"estimates": {f: estimate_to_json(e) for f, e in estimates.items()}})
        best = max(formats, key=lambda f: (estimates[f].ratio, -formats.index(f)))
        d = decide(estimates[best], lambda: self.analytic(layer, x_shape, sparsity, best), self.margin)
        if cached is not None:
            d.how = "cached"
        return LayerChoice(best if d.sparse else None, best, d, estimates)

    def _measure(self, layer: Layer, x_shape, sparsity: float, formats: list[str]) -> dict:
        models = {"dense": dense_model(self.graph, layer, x_shape)}
        for fmt in formats:
            models[fmt] = sparse_model(self.graph, layer, x_shape, sparsity, fmt)
        feed = {layer.x: np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)}
        return compare(self.measure_fn(models, feed, self.threads), "dense", formats, self.margin)
