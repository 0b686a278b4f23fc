"""Cost model of the sparsify pass: is a layer's sparse op faster than its dense form, on this machine?

Each distinct layer configuration is timed once per process as two (or three) one-node onnxruntime models
fed the same input: the dense layer as the graph has it (with its fused bias/activation nodes, so onnxruntime
applies its usual fusions) and the ai.graphprune op at the target sparsity with the native library registered.
Sessions run interleaved, and the median per call of each is compared. The sparse model's mask is random at
the exact target block count: speed depends on how many blocks are kept, not on which.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .sparse_layers import Layer, block_width, sparse_node

MARGIN = 1.1            # sparse must be at least this much faster than dense to be emitted
ROUND_SECONDS = 0.002   # each timing sample repeats the call for at least this long
ROUNDS = 15

_CACHE: dict = {}       # (layer signature, x shape, sparsity, formats, threads) -> Measurement


@dataclass
class Measurement:
    dense_s: float
    sparse_s: dict = field(default_factory=dict)   # format -> seconds per call
    x_shape: tuple = ()

    def speedup(self, fmt: str) -> float:
        return self.dense_s / self.sparse_s[fmt] if self.sparse_s.get(fmt) else 0.0


def candidate_formats(layer: Layer, sparsity: float, requested: str) -> list[str]:
    """Formats worth measuring: BSR; CSR only for MatMul/Gemm at ≥ 85 % (it loses below, see
    shared/docs/sparse-kernels.md) or when asked for. Conv has only the block format."""
    if layer.conv:
        return ["bsr"]
    if requested in ("bsr", "csr"):
        return [requested]
    return ["bsr", "csr"] if sparsity >= 0.85 else ["bsr"]


def choose(m: Measurement | None, formats: list[str], margin: float = MARGIN) -> tuple[str | None, str]:
    """(format to emit or None for dense, the reason in words)."""
    if m is None:
        return None, "not measured"
    best = min(formats, key=lambda f: m.sparse_s.get(f, float("inf")))
    speed = m.speedup(best)
    if speed >= margin:
        return best, f"{speed:.2f}× faster"
    return None, f"sparse {speed:.2f}× of dense"


def signature(layer: Layer) -> tuple:
    conv = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted((layer.conv or {}).items()))
    return (layer.op, layer.rows, layer.outputs, conv, layer.clip,
            tuple(n.op_type for n in layer.fused))


def random_keep(rows: int, blocks: int, sparsity: float, seed: int = 0) -> np.ndarray:
    total = rows * blocks
    keep = np.ones(total, dtype=bool)
    drop = int(round(sparsity * total))
    keep[np.random.default_rng(seed).choice(total, drop, replace=False)] = False
    return keep.reshape(rows, blocks)


class CostModel:
    """Measures and caches dense vs sparse time per layer configuration. `measure(models, feed, threads)`
    can be replaced (tests inject fake timings); by default it is `time_interleaved`."""

    def __init__(self, graph, threads: int | None = None, measure=None, margin: float = MARGIN):
        self.graph = graph
        self.threads = threads
        self.margin = margin
        self.measure_fn = measure or time_interleaved
        self.cache = _CACHE if measure is None else {}

    def measure(self, layer: Layer, x_shape: tuple, sparsity: float, formats: list[str]) -> Measurement:
        key = (signature(layer), tuple(x_shape), round(sparsity, 4), tuple(formats), self.threads or 0)
        if key not in self.cache:
            models = {"dense": dense_model(self.graph, layer, x_shape)}
            for fmt in formats:
                models[fmt] = sparse_model(self.graph, layer, x_shape, sparsity, fmt)
            feed = {layer.x: np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)}
            times = self.measure_fn(models, feed, self.threads)
            self.cache[key] = Measurement(times["dense"], {f: times[f] for f in formats}, tuple(x_shape))
        return self.cache[key]


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


def time_interleaved(models: dict, feed: dict, threads: int | None, native: bool = True) -> dict:
    """Median seconds per call of each model on `feed`, the models taking turns round by round so that
    machine noise hits all of them alike."""
    from graphprune.runtime import session
    sessions = {k: session(m, optimize=True, threads=threads, custom_ops=native) for k, m in models.items()}
    reps = {}
    for k, s in sessions.items():
        for _ in range(2):
            s.run(None, feed)
        t0 = time.perf_counter()
        s.run(None, feed)
        reps[k] = max(1, int(ROUND_SECONDS / max(time.perf_counter() - t0, 1e-7)))
    samples = {k: [] for k in sessions}
    order = list(sessions)
    for r in range(ROUNDS):
        for k in order[r % len(order):] + order[: r % len(order)]:
            s, n = sessions[k], reps[k]
            t0 = time.perf_counter()
            for _ in range(n):
                s.run(None, feed)
            samples[k].append((time.perf_counter() - t0) / n)
    return {k: float(np.median(v)) for k, v in samples.items()}
