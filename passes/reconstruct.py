"""Sequential output-matched reconstruction of a channel-pruned model (no gradients, no fine-tuning).

After the channels are physically removed, walk the pruned graph in graph (topological) order and refit every
weighted layer (Conv, grouped/depthwise per group, Gemm, MatMul with a constant weight) whose input changed:

    W' = argmin_W ‖X_p W − Y_d‖² + λ‖W − W₀‖²  =  (X_pᵀX_p + λI)⁻¹ (X_pᵀY_d + λW₀)

X_p: the layer's input rows in the pruned model whose earlier layers are already refit (Conv: im2col patches at
seeded random output positions, one group's channels per group), plus a constant 1 column for the bias.
Y_d: the dense model's output of the same layer at the same rows (bias included; Conv before a BatchNorm: the
pre-BN output, so the BN stays consistent), kept output channels only. W₀: the layer's current weights (plain
slices, or the OBS-compensated ones). Regularising towards W₀ rather than 0 makes the refit exact where nothing
upstream changed (then X_pᵀY_d = X_pᵀX_p W₀) and keeps under-determined layers (a Gemm after Flatten sees few
rows) near weights that already work.

Only X_pᵀX_p and X_pᵀY_d are needed (and ΣY² for errors), streamed batch by batch. Every fourth calibration
batch is held out of the fit. Every output channel is its own least-squares problem (the errors of all outputs
of all groups add up independently), so per output λ = c · mean diag(X_pᵀX_p / n) with c ∈ DAMPING is chosen
on those batches (the candidates solved as one batched system), and the output keeps its refit only if its
error on them went down.

End to end: a layer-locally better refit can still make the model output worse (downstream layers that are not
refit, nonlinearities, a head fitted to few rows). So the walk measures the model output on the held-out batches
before it starts and at CHECKPOINTS states along it (after 1/2, 3/4, ... of the waves and after the last: refits
up to there, the weights as they came after it),
and keeps the state with the lowest relative L2 error of the graph outputs against the dense outputs, among
those that do not lose top-1 agreement on logits-like outputs; the refits after it are reverted and the report
says so (ReconstructionResult.end_to_end, notes). The state without any refit is a candidate, so the result is
never worse than no reconstruction on the held-out calibration batches (data unlike the calibration set can
still disagree).

Rows: a Conv is sampled at P output positions per batch shared by its samples (drawn per batch and layer from
the seed), a Gemm/MatMul at up to that many rows (tokens where an attention mask says so). Per layer
min(LAYER_ROWS, max(MIN_ROWS, ROWS_PER_DIM · unknowns per group)) rows over all batches: a depthwise 5×5 group
has 26 unknowns and needs far fewer rows than a 1×1 conv over 900 channels.

Cost (numbers: benchmarks/results/reconstruct.md): the dense targets of all layers come from
one dense run (chunked when their rows exceed TARGET_BUDGET), each layer's positions gathered inside
onnxruntime (Reshape + Gather appended to the dense graph), so whole activations are not copied out. The pruned
walk resumes every wave from a cached frontier (layer_stats.PrefixCache) at the latest position whose tensors
fit WALK_FRONTIER bytes, so early high-resolution layers re-run one block, not the whole prefix. Layers whose
inputs do not depend on each other's refits (Q/K/V projections, parallel branches) are refit from one run.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from graphprune.ir import Graph, attr

from .layer_stats import PrefixCache, at_positions, conv_columns, conv_output_size, feed_batches, pack
from .sparse_layers import _resolved_pads

DAMPING = (0.001, 0.01, 0.1, 1.0)  # candidate λ / mean diag(XᵀX/n), chosen per output on held-out batches
ROW_ELEMENTS = 1 << 22          # cap on rows × columns of one batch's im2col (bounds memory for wide layers)
LAYER_ROWS = 8192               # rows per layer over all batches: ≥ 7× the widest EfficientNet/BERT layer input
MIN_ROWS = 2048                 # ... and at least this many,
ROWS_PER_DIM = 16               # ... or 16 per unknown of a group's problem (a depthwise 5×5 group has 26)
TARGET_BUDGET = 256 << 20       # bytes of dense target rows held at once (more layers: several dense runs)
WALK_FRONTIER = 512 << 20       # frontier cache of the pruned walk: fits EfficientNet-Lite0's 56² stage at 256
                                # samples, so its layers resume there instead of re-running from the input
CHECKPOINTS = 4                 # end-to-end error checks along the walk (the last one after it)


@dataclass
class Layer:
    name: str                  # node name (the same in the dense and the pruned graph)
    op: str
    x: str                     # activation input
    target: str                # dense tensor to reproduce: the node output, or its bias Add's output
    out_axis: int              # channel axis of the target (normalised to ≥ 0)
    groups: int = 1
    conv: dict | None = None
    weight: str = ""           # weight initializer
    bias: str = ""             # bias initializer ('' = none yet)
    bias_scale: float = 1.0    # Gemm beta: the bias initializer holds b / beta
    intercept: bool = True
    alpha: float = 1.0         # Gemm alpha
    trans_b: bool = False


@dataclass
class LayerResult:
    node: str
    op: str
    groups: int
    rows: int                  # calibration rows the fit used
    rel_error_before: float    # ‖X_p W₀ − Y_d‖/‖Y_d‖ on held-out calibration rows
    rel_error_after: float     # the same with the accepted weights
    outputs_refit: int
    outputs: int
    damping: float
    reverted: bool = False     # refit, then put back by an end-to-end check


@dataclass
class ReconstructionResult:
    layers: list = field(default_factory=list)       # LayerResult per refit candidate, graph order
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    runs: int = 0                                    # onnxruntime segment sessions built
    waves: int = 0
    source: str = ""
    end_to_end: dict = field(default_factory=dict)   # held-out output error before/after, and at checkpoints
    timings: dict = field(default_factory=dict)      # seconds per phase (see reconstruct)
    node_runs: dict = field(default_factory=dict)    # node executions (a node on one batch) per model

    @property
    def refit(self) -> int:
        return sum(1 for r in self.layers if r.outputs_refit and not r.reverted)

    def summary(self) -> dict:
        return {"layers": len(self.layers), "layers_refit": self.refit, "waves": self.waves, "runs": self.runs,
                "seconds": round(self.seconds, 2), "source": self.source, "notes": list(self.notes),
                "end_to_end": self.end_to_end, "timings": {k: round(v, 2) for k, v in self.timings.items()},
                "node_runs": self.node_runs,
                "per_layer": [vars(r) for r in self.layers]}


# ---- layers ----------------------------------------------------------------------------------------------
def _single_reader(graph: Graph, name: str) -> bool:
    return len({id(n) for n, _ in graph.uses.get(name, [])}) == 1


def _float_init(graph: Graph, name: str):
    arr = graph.initializers.get(name) if name else None
    return arr if arr is not None and arr.dtype == np.float32 else None


def find_layers(graph: Graph) -> tuple[list[Layer], list[str]]:
    """Weighted layers of `graph` that reconstruction can refit, in graph order, and notes on the others."""
    layers, notes = [], []
    for node in graph.nodes:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        w = _float_init(graph, node.input[1])
        if w is None:
            continue
        if not _single_reader(graph, node.input[1]):
            notes.append(f"{node.op_type} '{node.name}': weight shared with other nodes; not refit")
            continue
        layer = _describe(graph, node, w)
        if isinstance(layer, str):
            notes.append(f"{node.op_type} '{node.name}': {layer}; not refit")
        elif layer is not None:
            layers.append(layer)
    return layers, notes


def _describe(graph: Graph, node, w) -> Layer | str | None:
    out = node.output[0]
    if node.op_type == "Conv":
        if w.ndim != 4:
            return f"{w.ndim - 2}-D convolution (only 2-D)"
        pads = _resolved_pads(graph, node, w.shape[2:])
        if isinstance(pads, str):
            return pads
        conv = {"kernel_shape": list(w.shape[2:]), "strides": list(attr(node, "strides", [1, 1])),
                "pads": pads, "dilations": list(attr(node, "dilations", [1, 1]))}
        bias = node.input[2] if len(node.input) > 2 else ""
        if bias and (_float_init(graph, bias) is None or not _single_reader(graph, bias)):
            return "bias is not a constant of its own"
        return Layer(node.name, "Conv", node.input[0], out, 1, int(attr(node, "group", 1)), conv, node.input[1],
                     bias)
    rank = len(graph.shape(out) or ())
    if w.ndim != 2 or rank < 1:
        return None
    if node.op_type == "Gemm":
        if attr(node, "transA", 0):
            return "transA = 1"
        alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
        n_out = w.shape[0] if attr(node, "transB", 0) else w.shape[1]
        bias = node.input[2] if len(node.input) > 2 else ""
        if bias:
            c = _float_init(graph, bias)
            if c is None or c.size != n_out or not _single_reader(graph, bias) or beta == 0.0:
                return "its C is not a per-output constant of its own"
        return Layer(node.name, "Gemm", node.input[0], out, rank - 1, weight=node.input[1], bias=bias,
                     bias_scale=beta if bias else 1.0, alpha=alpha, trans_b=bool(attr(node, "transB", 0)))
    # MatMul: a following Add of a per-output constant is its bias
    layer = Layer(node.name, "MatMul", node.input[0], out, rank - 1, weight=node.input[1], intercept=False)
    uses = graph.uses.get(out, [])
    if len(uses) == 1 and uses[0][0].op_type == "Add" and out not in graph.output_names:
        add = uses[0][0]
        other = add.input[1 - uses[0][1]]
        c = _float_init(graph, other)
        if c is not None and c.ndim == 1 and c.size == w.shape[1] and _single_reader(graph, other):
            layer.bias, layer.target, layer.intercept = other, add.output[0], True
    return layer


def get_weights(graph: Graph, layer: Layer) -> np.ndarray:
    """[groups, rows (+1 intercept), outputs per group] float64: the layer as rows → outputs."""
    w = graph.initializers[layer.weight].astype(np.float64)
    if layer.conv is not None:
        cout = w.shape[0]
        per = cout // layer.groups
        mats = w.reshape(layer.groups, per, -1).transpose(0, 2, 1)               # [G, Cin_g·k, per]
        b = graph.initializers[layer.bias].astype(np.float64) if layer.bias else np.zeros(cout)
        bias = b.reshape(layer.groups, 1, per)
    else:
        mats = (w.T if layer.trans_b else w)[None] * layer.alpha
        n = mats.shape[2]
        b = graph.initializers[layer.bias].astype(np.float64).reshape(-1) * layer.bias_scale if layer.bias \
            else np.zeros(n)
        bias = b.reshape(1, 1, n)
    return np.concatenate([mats, bias], axis=1) if layer.intercept else mats


def set_weights(graph: Graph, layer: Layer, mats: np.ndarray) -> None:
    """Write [groups, rows (+1), outputs per group] back into the layer's initializers (adding a bias)."""
    old = graph.initializers[layer.weight]
    core, bias = (mats[:, :-1], mats[:, -1]) if layer.intercept else (mats, None)
    if layer.conv is not None:
        g, rows, per = core.shape
        graph.set_initializer(layer.weight, core.transpose(0, 2, 1).reshape(old.shape).astype(old.dtype))
    else:
        w = core[0] / layer.alpha
        graph.set_initializer(layer.weight, (w.T if layer.trans_b else w).astype(old.dtype))
    if bias is None:
        return
    flat = bias.reshape(-1)
    if not layer.bias:
        node = next(n for n in graph.nodes if n.name == layer.name)
        layer.bias = graph.add_initializer(f"{layer.name}.bias", flat.astype(old.dtype))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = layer.bias
        graph.reindex()
        return
    shape = graph.initializers[layer.bias].shape
    graph.set_initializer(layer.bias, (flat / layer.bias_scale).reshape(shape).astype(old.dtype))


# ---- which layers, in which order -------------------------------------------------------------------------
def changed_inputs(dense: Graph, removed: dict) -> set[str]:
    """Tensors whose values may differ after pruning: everything downstream of a tensor that lost channels."""
    dirty = {name for (name, _), idx in removed.items() if len(idx)}
    for node in dense.nodes:
        if any(i in dirty for i in node.input):
            dirty.update(o for o in node.output if o)
    return dirty


def _ancestor_nodes(graph: Graph, name: str, memo: dict) -> frozenset:
    """Names of the nodes `name` depends on."""
    if name in memo:
        return memo[name]
    out = set()
    stack = [name]
    seen = set()
    while stack:
        t = stack.pop()
        node = graph.producer.get(t)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        out.add(node.name)
        stack.extend(i for i in node.input if i)
    memo[name] = frozenset(out)
    return memo[name]


def waves(graph: Graph, layers: list[Layer]) -> list[list[Layer]]:
    """Consecutive layers whose inputs do not depend on one another's outputs, refit from one run."""
    memo: dict = {}
    out, current = [], []
    for layer in layers:
        deps = _ancestor_nodes(graph, layer.x, memo)
        if current and any(other.name in deps for other in current):
            out.append(current)
            current = []
        current.append(layer)
    return out + ([current] if current else [])


# ---- statistics -------------------------------------------------------------------------------------------
class _Accumulator:
    """Σ XᵀX, Σ XᵀY, Σ Y² and the row count, per group, from rows given as columns."""

    def __init__(self):
        self.xx = self.xy = self.yy = None
        self.n = 0

    def add(self, a: np.ndarray, yt: np.ndarray) -> None:
        """a [G, d, n] = Xᵀ, yt [G, m, n] = Yᵀ, float32 (products in float32, sums in float64)."""
        xx = np.matmul(a, a.transpose(0, 2, 1)).astype(np.float64)
        xy = np.matmul(a, yt.transpose(0, 2, 1)).astype(np.float64)
        yy = np.einsum("gmn,gmn->gm", yt, yt, dtype=np.float64)
        if self.xx is None:
            self.xx, self.xy, self.yy = xx, xy, yy
        else:
            self.xx += xx
            self.xy += xy
            self.yy += yy
        self.n += a.shape[2]


def _token_rows(feed: dict, leading: tuple) -> np.ndarray | None:
    """Rows to use of an activation with leading dims `leading` (batch, sequence): where an attention-mask-
    like feed of exactly those dims is non-zero (padding tokens do not reach a pooled output), else None."""
    for name, v in feed.items():
        if "mask" in name.lower() and v.shape == leading and v.dtype.kind in "iub":
            return np.flatnonzero(v.reshape(-1))
    return None


def _errors(acc: _Accumulator, w: np.ndarray) -> np.ndarray:
    """Σ over rows of (XW − Y)² per group and output: wᵀ(XᵀX)w − 2wᵀXᵀY + ΣY² (w [..., G, d, m])."""
    quad = np.sum(w * (acc.xx @ w), axis=-2)
    cross = np.sum(w * acc.xy, axis=-2)
    return np.maximum(quad - 2 * cross + acc.yy, 0.0)


def solve(fit: _Accumulator, w0: np.ndarray, c) -> np.ndarray:
    """(XᵀX/n + λI)⁻¹ (XᵀY/n + λW₀) per group, λ = c · mean of the non-intercept diagonal of XᵀX/n; `c` a
    scalar ([G, d, m]) or a sequence of candidates, solved as one batched system ([len(c), G, d, m]).
    λ > 0 makes the system positive definite; least squares where rounding made it singular anyway."""
    n = max(fit.n, 1)
    h = fit.xx / n
    r = fit.xy / n
    d = h.shape[1]
    diag = np.diagonal(h, axis1=1, axis2=2)
    scale = np.mean(diag[:, :-1] if d > 1 else diag, axis=1)
    scale = np.where(scale > 0, scale, 1.0)
    cs = np.atleast_1d(np.asarray(c, dtype=np.float64))
    lam = cs[:, None, None, None] * scale[None, :, None, None]               # [C, G, 1, 1]
    m = h[None] + lam * np.eye(d)
    rhs = r[None] + lam * w0[None]
    try:
        out = np.linalg.solve(m, rhs)
    except np.linalg.LinAlgError:
        out = np.stack([np.stack([np.linalg.lstsq(m[k, g], rhs[k, g], rcond=None)[0] for g in range(m.shape[1])])
                        for k in range(len(cs))])
    return out if np.ndim(c) else out[0]


def _one_blas_thread():
    """LAPACK on one thread where threadpoolctl is installed (optional). Its factorizations synchronise their
    threads at every panel; on 2 cores shared with onnxruntime's spinning workers and other jobs a 385-wide
    solve measured 1.7 s on two threads and 0.16 s on one. Without threadpoolctl: the BLAS default."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def refit(fit: _Accumulator, val: _Accumulator, w0: np.ndarray) -> tuple[np.ndarray, dict]:
    """The accepted weights and what happened. Outputs are independent least-squares problems (their errors
    add up), so each output gets the damping c ∈ DAMPING with the lowest error on `val`, and keeps its refit
    only where that error is lower than W₀'s."""
    base = _errors(val, w0)
    with _one_blas_thread():
        sols = solve(fit, w0, DAMPING)                                    # [c, G, d, m]
    errs = _errors(val, sols)                                             # [c, G, m]
    best = errs.argmin(axis=0)                                            # [G, m]
    w = np.take_along_axis(sols, best[None, :, None, :], axis=0)[0]
    err = np.take_along_axis(errs, best[None], axis=0)[0]
    # a decrease must clear the rounding floor of errors evaluated from float32-accumulated Grams
    # (‖e‖² = wᵀXᵀXw − 2wᵀXᵀY + ΣY² cancels): 1e-6 of the output's energy
    accept = err < base - np.maximum(1e-9 * base, 1e-6 * val.yy)
    final = np.where(accept[:, None, :], w, w0)
    after = np.where(accept, err, base)
    ref = float(val.yy.sum()) or 1.0
    chosen = np.asarray(DAMPING)[best[accept]]
    return final, {"damping": float(np.median(chosen)) if len(chosen) else 0.0,
                   "outputs_refit": int(accept.sum()), "outputs": int(accept.size),
                   "rel_error_before": float(np.sqrt(base.sum() / ref)),
                   "rel_error_after": float(np.sqrt(after.sum() / ref))}


# ---- rows: where each layer is sampled, the dense targets there ------------------------------------------
def _kept(dense: Graph, layer: Layer, removed: dict) -> np.ndarray:
    """Output channels of the dense layer the pruned one still has."""
    node = next(n for n in dense.nodes if n.name == layer.name)
    w = dense.initializers[node.input[1]]
    width = w.shape[0] if layer.conv is not None or layer.trans_b else w.shape[1]
    for name in (layer.target, node.output[0]):
        idx = removed.get((name, layer.out_axis))
        if idx is not None and len(idx):
            return np.setdiff1d(np.arange(width), np.asarray(idx))
    return np.arange(width)


def _is_validation(batch: int, count: int) -> bool:
    if count >= 4:
        return batch % 4 == 3
    return count >= 2 and batch == count - 1


def _unknowns(graph: Graph, layer: Layer) -> tuple[int, int]:
    """(unknowns per group's least-squares problem, outputs) of the pruned layer."""
    w = graph.initializers[layer.weight]
    if layer.conv is not None:
        d, m = int(np.prod(w.shape[1:])), w.shape[0]
    else:
        d, m = (w.shape[1], w.shape[0]) if layer.trans_b else w.shape
    return d + layer.intercept, m


@dataclass
class _Probe:
    """Where one layer is sampled and what the dense model computes there. Conv rows are P output positions
    shared by the samples of a batch (a fresh seeded draw per batch); where the dense output's spatial size is
    static, the dense model gathers those positions itself (an appended Reshape + Gather with the positions as
    an input), so only [B, C, P] leaves onnxruntime instead of the whole activation. (Reading any intermediate
    tensor still costs onnxruntime a layout conversion of it: a dense run that gathers every layer's rows took
    about twice the CPU of a plain one, the same as copying the tensors out, or gathering the layer inputs and
    computing the conv outputs here, which was tried.)"""
    layer: Layer
    index: int                         # order of the layer in the walk (seeds its draws)
    kept: np.ndarray
    rows: int                          # rows per batch to aim at
    out: str                           # dense tensor the pass reads: the gathered rows or the whole target
    positions_input: str = ""          # graph input carrying the positions (in-graph gather), else ''
    hw: tuple = ()                     # static output size (in-graph gather)
    picks: dict = field(default_factory=dict)     # batch -> flat rows (conv: b·Ho·Wo + p; linear: row index)
    targets: dict = field(default_factory=dict)   # batch -> Yᵀ [G, m, n] float32 (dense, kept outputs)


def _make_probes(dense: Graph, pruned: Graph, layers: list, removed: dict, n_batches: int) -> list:
    probes = []
    for i, layer in enumerate(layers):
        d, _ = _unknowns(pruned, layer)
        total = min(LAYER_ROWS, max(MIN_ROWS, ROWS_PER_DIM * d))
        if layer.conv is not None:
            # one batch's columns are Cin·k × rows: cap them (a wide layer with a big kernel)
            cols = d * layer.groups
            total = min(total, n_batches * max(64, ROW_ELEMENTS // max(cols, 1)))
        probe = _Probe(layer, i, _kept(dense, layer, removed), -(-total // n_batches), layer.target)
        shape = dense.shape(layer.target) if layer.conv is not None else None
        if shape and len(shape) == 4 and all(isinstance(s, int) and s > 0 for s in shape[2:]):
            probe.hw = tuple(shape[2:])
        probes.append(probe)
    return probes


def _gathering_graph(dense: Graph, probes: list) -> Graph:
    """The dense graph with, after each conv target of static spatial size, Reshape [B, C, H·W] + Gather of the
    positions fed as a new graph input."""
    graph = dense.clone()
    shape_const = graph.add_initializer("gp_rows_shape", np.array([0, 0, -1], np.int64))
    extra = {}
    for probe in probes:
        if not probe.hw:
            continue
        t = probe.layer.target
        flat, rows, idx = (graph.fresh_name(f"{t}__gp_{s}") for s in ("flat", "rows", "positions"))
        extra.setdefault(t, []).extend([
            helper.make_node("Reshape", [t, shape_const], [flat], name=graph.fresh_name(f"{t}__gp_reshape")),
            helper.make_node("Gather", [flat, idx], [rows], name=graph.fresh_name(f"{t}__gp_gather"), axis=2)])
        graph.inputs.append(helper.make_tensor_value_info(idx, onnx.TensorProto.INT64, [None]))
        graph.dtypes[idx] = onnx.TensorProto.INT64
        probe.out, probe.positions_input = rows, idx
    nodes = []
    for node in graph.nodes:
        nodes.append(node)
        for o in node.output:
            nodes.extend(extra.pop(o, []))
    graph.nodes = nodes
    graph.reindex()
    return graph


def _draw(probe: _Probe, batch: int, size: int, feed: dict, seed: int, shape=None) -> np.ndarray:
    """The batch's rows of the layer: conv, flat output positions of all samples at P shared spatial
    positions; linear, rows (tokens where a mask says so) of the flattened leading dims."""
    rng = np.random.default_rng((seed, probe.index, batch))
    if probe.layer.conv is not None:
        hw = probe.hw or tuple(shape[2:])
        area = hw[0] * hw[1]
        p = min(area, max(1, -(-probe.rows // size)))
        spots = np.arange(area) if p == area else np.sort(rng.choice(area, p, replace=False))
        return spots, (np.arange(size)[:, None] * area + spots[None]).reshape(-1)
    leading = tuple(shape[:-1])
    use = _token_rows(feed, leading) if len(leading) == 2 else None
    if use is None:
        use = np.arange(int(np.prod(leading)))
    if len(use) > probe.rows:
        use = np.sort(rng.choice(use, probe.rows, replace=False))
    return None, use


def _targets(probe: _Probe, value: np.ndarray, batch: int, size: int, feed: dict, seed: int) -> None:
    """Store the batch's dense target rows (kept outputs) as Yᵀ [G, m, n], drawing the rows if not drawn yet."""
    layer = probe.layer
    if layer.conv is not None:
        if probe.hw:                                   # gathered: [B, C, P]
            rows = value[:, probe.kept].transpose(1, 0, 2).reshape(len(probe.kept), -1)
        else:
            _, probe.picks[batch] = _draw(probe, batch, size, feed, seed, value.shape)
            rows = at_positions(value, probe.picks[batch])[:, probe.kept].T
    else:
        _, probe.picks[batch] = _draw(probe, batch, size, feed, seed, value.shape)
        flat = np.moveaxis(value, layer.out_axis, -1).reshape(-1, value.shape[layer.out_axis])
        rows = flat[probe.picks[batch]][:, probe.kept].T
    probe.targets[batch] = np.ascontiguousarray(rows.reshape(layer.groups, -1, rows.shape[1]), dtype=np.float32)


def _columns(probe: _Probe, x: np.ndarray, batch: int) -> np.ndarray:
    """Xᵀ [G, d (+1 intercept), n] of the pruned layer input at the batch's rows."""
    layer, pick = probe.layer, probe.picks[batch]
    if layer.conv is not None:
        out_hw = conv_output_size(x.shape, layer.conv)
        if probe.hw and tuple(out_hw) != probe.hw:
            raise ValueError(f"output size {out_hw} does not match the dense output {probe.hw}")
        if pick.size and pick.max() >= x.shape[0] * out_hw[0] * out_hw[1]:
            raise IndexError("rows outside the pruned layer's output")
        a = conv_columns(x, layer.conv, layer.groups, pick)
    else:
        a = x.reshape(-1, x.shape[-1])[pick].T[None]
    a = a.astype(np.float32, copy=False)
    if layer.intercept:
        a = np.concatenate([a, np.ones((a.shape[0], 1, a.shape[2]), np.float32)], axis=1)
    return a


# ---- end-to-end check ---------------------------------------------------------------------------------------
def _classifier_like(a: np.ndarray) -> bool:
    """Logits-like output: a last axis of several entries whose rows are not unit vectors (embeddings)."""
    if a.ndim < 2 or a.shape[-1] < 2:
        return False
    rows = a.reshape(-1, a.shape[-1]).astype(np.float64)
    return not np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-3)


def output_error(dense: dict, pruned: dict) -> dict:
    """End-to-end error of a model's outputs against the dense ones over held-out batches ({batch: {name: value}}):
    the mean over float outputs of the relative L2 error (None without any), and the top-1 agreement over the
    logits-like ones (None without any)."""
    rel, hits, count = [], 0, 0
    for name in next(iter(dense.values())):
        a = [dense[b][name] for b in sorted(dense)]
        if a[0].dtype.kind != "f" or a[0].ndim == 0:
            continue
        a = np.concatenate([v.reshape(len(v), -1) if v.ndim > 1 else v[:, None] for v in a]).astype(np.float64)
        p = [pruned[b][name] for b in sorted(dense)]
        p = np.concatenate([v.reshape(len(v), -1) if v.ndim > 1 else v[:, None] for v in p]).astype(np.float64)
        rel.append(float(np.linalg.norm(a - p) / (np.linalg.norm(a) or 1.0)))
        shaped = dense[min(dense)][name]
        if _classifier_like(shaped):
            k = shaped.shape[-1]
            la, lp = a.reshape(-1, k), p.reshape(-1, k)
            hits += int((la.argmax(1) == lp.argmax(1)).sum())
            count += len(la)
    return {"rel_error": float(np.mean(rel)) if rel else None, "top1": hits / count if count else None}


def _acceptable(new: dict, old: dict) -> bool:
    """For logits, no fewer top-1 agreements (a lower L2 error alone may still flip classes)."""
    return new["top1"] is None or old["top1"] is None or new["top1"] >= old["top1"]


class _Undo:
    """The weights (and bias) of layers as they were before their refit, to put back."""

    def __init__(self):
        self.saved = []

    def save(self, graph: Graph, layer: Layer) -> None:
        bias = graph.initializers[layer.bias] if layer.bias else None
        self.saved.append((layer, graph.initializers[layer.weight], layer.bias, bias))

    def restore(self, graph: Graph) -> list[str]:
        names = []
        for layer, weight, bias_name, bias in reversed(self.saved):
            graph.set_initializer(layer.weight, weight)
            if bias_name:
                graph.set_initializer(bias_name, bias)
            elif layer.bias:                                 # the refit added a bias: take it out again
                node = next(n for n in graph.nodes if n.name == layer.name)
                del node.input[2:]
                graph.initializers.pop(layer.bias, None)
                layer.bias = ""
                graph.reindex()
            names.append(layer.name)
        self.saved = []
        return names


# ---- the pass ---------------------------------------------------------------------------------------------
def _chunks(groups: list, probes: dict, n_batches: int) -> list:
    """Consecutive waves whose dense target rows fit TARGET_BUDGET together (at least one wave each)."""
    return pack(groups, lambda wave: sum(4 * probes[layer.name].rows * n_batches * len(probes[layer.name].kept)
                                         for layer in wave), TARGET_BUDGET)


def reconstruct(dense: Graph, pruned: Graph, removed: dict, feeds: dict, source: str = "", seed: int = 0,
                progress=None, budget: int | None = None, checkpoints: int = CHECKPOINTS) -> ReconstructionResult:
    """Refit the layers of `pruned` (changed in place) to reproduce `dense` layer by layer on `feeds`, keeping
    only refits that lower the end-to-end error on the held-out batches (see the module docstring).
    `removed`: {(tensor, axis): removed indices} of the plan (dense tensor names). Node names of the pruned
    graph are those of the dense graph. `checkpoints`: how many times along the walk the end-to-end error is
    measured (the last one after the walk); 0 turns the end-to-end check off."""
    start = time.perf_counter()
    tm = {}
    say = progress or (lambda msg: None)
    result = ReconstructionResult(source=source)
    layers, notes = find_layers(pruned)
    result.notes += notes
    dirty = changed_inputs(dense, removed)
    dense_names = {n.name for n in dense.nodes}
    layers = [layer for layer in layers if layer.x in dirty and layer.name in dense_names]
    if not layers:
        result.seconds = time.perf_counter() - start
        return result
    feed_list = feed_batches(dense, feeds)
    sizes = [len(next(iter(f.values()))) for f in feed_list]
    val_batches = {b for b in range(len(feed_list)) if _is_validation(b, len(feed_list))}
    probes = {p.layer.name: p for p in _make_probes(dense, pruned, layers, removed, len(feed_list))}
    gathering = _gathering_graph(dense, probes.values())
    # positions of the in-graph gathers are drawn now: they are inputs of the dense runs
    dense_feeds = [dict(f) for f in feed_list]
    for probe in probes.values():
        if probe.positions_input:
            for b, f in enumerate(dense_feeds):
                spots, probe.picks[b] = _draw(probe, b, sizes[b], f, seed)
                f[probe.positions_input] = spots.astype(np.int64)
    dense_cache = PrefixCache(gathering, dense_feeds, **({} if budget is None else {"budget": budget}))
    pruned_cache = PrefixCache(pruned, feed_list, budget=WALK_FRONTIER if budget is None else budget)
    gather_pos = {}
    for i, n in enumerate(gathering.nodes):
        for o in n.output:
            gather_pos[o] = i
    outputs = list(dense.output_names)
    checking = checkpoints > 0 and bool(val_batches)
    reference = None
    if checking:
        base = dict(_timed(pruned_cache.values(outputs, len(pruned.nodes), batches=val_batches), tm, "check"))
    groups = waves(pruned, layers)
    result.waves = len(groups)
    chunks = _chunks(groups, probes, len(feed_list))
    # checkpoints after 1/2, 3/4, 7/8, ... of the waves and after the last: each costs a run from there to the
    # outputs on the held-out batches, cheap late in the walk, where a head fitted to few rows can go wrong
    fractions = [1 - 0.5 ** k for k in range(1, checkpoints)] + [1.0]
    marks = {max(0, int(round(f * len(groups))) - 1) for f in fractions} if checking else set()
    undo = _Undo()
    states = []          # (held-out output error, last layer refit before it, _Undo of the refits since the last)
    done = wave_no = 0
    for chunk in chunks:
        chunk_probes = [probes[layer.name] for wave in chunk for layer in wave]
        # the dense outputs on the held-out batches: with the only chunk's run, else once on those batches
        with_outputs = checking and reference is None and len(chunks) == 1
        if checking and reference is None and not with_outputs:
            reference = dict(_timed(dense_cache.values(outputs, len(gathering.nodes), batches=val_batches), tm,
                                    "check"))
        names = [p.out for p in chunk_probes] + (outputs if with_outputs else [])
        position = max(gather_pos[p.out] for p in chunk_probes) + 1
        got = {}
        for b, values in _timed(dense_cache.values(names, position), tm, "dense runs"):
            t = time.perf_counter()
            for p in chunk_probes:
                _targets(p, values[p.out], b, sizes[b], feed_list[b], seed)
            tm["targets"] = tm.get("targets", 0.0) + time.perf_counter() - t
            if with_outputs and b in val_batches:
                got[b] = {o: values[o] for o in outputs}
        if with_outputs:
            reference = got
        if checking and not states:
            first = output_error(reference, base)
            if first["rel_error"] is None:
                checking, marks = False, set()
                result.notes.append("reconstruction end-to-end check skipped: the model has no float output")
            else:
                states.append((first, "", None))
                result.end_to_end["before"] = first
        for wave in chunk:
            pruned_pos = {n.name: i for i, n in enumerate(pruned.nodes)}
            fits = {layer.name: _Accumulator() for layer in wave}
            vals = {layer.name: _Accumulator() for layer in wave}
            failed = {}
            xs = _timed(pruned_cache.values([layer.x for layer in wave],
                                            min(pruned_pos[layer.name] for layer in wave)), tm, "pruned runs")
            for b, xv in xs:
                for layer in wave:
                    if layer.name in failed:
                        continue
                    probe = probes[layer.name]
                    t = time.perf_counter()
                    try:
                        a = _columns(probe, xv[layer.x], b)
                    except (ValueError, IndexError) as exc:
                        failed[layer.name] = str(exc)
                        continue
                    t1 = time.perf_counter()
                    (vals if b in val_batches else fits)[layer.name].add(a, probe.targets.pop(b))
                    tm["rows"] = tm.get("rows", 0.0) + t1 - t
                    tm["grams"] = tm.get("grams", 0.0) + time.perf_counter() - t1
            for layer in wave:
                done += 1
                probes[layer.name].targets.clear()
                if layer.name in failed:
                    result.notes.append(f"{layer.op} '{layer.name}': {failed[layer.name]}; not refit")
                    continue
                fit, val = fits[layer.name], vals[layer.name]
                if val.n == 0:          # a single batch: validate on the fit rows (errors can only be optimistic)
                    val = fit
                w0 = get_weights(pruned, layer)
                if w0.shape[1] != fit.xx.shape[1] or w0.shape[2] != fit.xy.shape[2]:
                    result.notes.append(f"{layer.op} '{layer.name}': weight {w0.shape} does not match the rows "
                                        f"{fit.xx.shape[1:]} / targets {fit.xy.shape[2]}; not refit")
                    continue
                t = time.perf_counter()
                w, info = refit(fit, val, w0)
                tm["solves"] = tm.get("solves", 0.0) + time.perf_counter() - t
                if info["outputs_refit"]:
                    undo.save(pruned, layer)
                    set_weights(pruned, layer, w)
                result.layers.append(LayerResult(layer.name, layer.op, layer.groups, fit.n, **info))
                say(f"reconstruct {done}/{len(layers)} {layer.name}: relative error "
                    f"{info['rel_error_before']:.4f} -> {info['rel_error_after']:.4f}")
            if wave_no in marks and undo.saved:
                now = output_error(reference, dict(_timed(pruned_cache.values(outputs, len(pruned.nodes),
                                                                              batches=val_batches), tm, "check")))
                result.end_to_end.setdefault("checkpoints", []).append({"after": wave[-1].name, **now})
                states.append((now, wave[-1].name, undo))
                undo = _Undo()
            wave_no += 1
    if checking:
        # the walk's states: the refits up to a checkpoint, the weights as they came for the rest; keep the best
        # one (the first state, no refit, always qualifies), revert the refits after it
        chosen = min(range(len(states)), key=lambda k: (not _acceptable(states[k][0], states[0][0]),
                                                        states[k][0]["rel_error"], k))
        result.end_to_end["after"] = states[chosen][0]
        reverted = []
        for _, _, later in reversed(states[chosen + 1:]):
            reverted += later.restore(pruned)
        for r in result.layers:
            r.reverted = r.node in reverted
        if reverted:
            where = (f"kept the refits up to '{states[chosen][1]}'" if chosen else "kept no refit")
            result.notes.append(
                f"reconstruction end-to-end check: held-out output error {_fmt(states[0][0])} without refits, "
                f"{_fmt(states[-1][0])} with all; {where} ({_fmt(states[chosen][0])}) and reverted the "
                f"{len(reverted)} later refits")
    result.runs = pruned_cache.runs + dense_cache.runs
    result.node_runs = {"dense": dense_cache.node_runs, "pruned": pruned_cache.node_runs,
                        "one pass": len(pruned.nodes) * len(feed_list)}
    result.seconds = time.perf_counter() - start
    result.timings = tm
    return result


def _timed(items, timings: dict, key: str):
    """`items` (a generator of onnxruntime runs), adding the time spent producing each item to timings[key]."""
    it = iter(items)
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - t
            return
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t
        yield item


def _fmt(err: dict) -> str:
    top1 = "" if err["top1"] is None else f", top-1 agreement {100 * err['top1']:.1f} %"
    return f"{err['rel_error']:.4f}{top1}"
