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
on those batches, and the output keeps its refit only if its error on them went down (never worse than no
compensation, as far as calibration data can tell).

Efficiency: layers whose inputs do not depend on each other's refits (Q/K/V projections, parallel branches)
are refit together from one run; every run resumes from a cached frontier of the pruned and of the dense model
where it fits in memory (layer_stats.PrefixCache), so a walk costs O(L) node executions, not O(L²).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from graphprune.calibration import GRAM_ROWS
from graphprune.ir import Graph, attr

from .layer_stats import PrefixCache, at_positions, conv_output_size, conv_positions, feed_batches, im2col_at
from .sparse_layers import _resolved_pads

DAMPING = (0.001, 0.01, 0.1, 1.0)  # candidate λ / mean diag(XᵀX/n), chosen per output on held-out batches
ROW_ELEMENTS = 1 << 22          # cap on rows × columns of one batch's im2col (bounds memory for wide layers)
LAYER_ROWS = 8192               # rows per layer over all batches: ≥ 7× the widest EfficientNet/BERT layer input


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


@dataclass
class ReconstructionResult:
    layers: list = field(default_factory=list)       # LayerResult per refit candidate, graph order
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    runs: int = 0                                    # onnxruntime segment sessions built
    waves: int = 0
    source: str = ""

    @property
    def refit(self) -> int:
        return sum(1 for r in self.layers if r.outputs_refit)

    def summary(self) -> dict:
        return {"layers": len(self.layers), "layers_refit": self.refit, "waves": self.waves, "runs": self.runs,
                "seconds": round(self.seconds, 2), "source": self.source, "notes": list(self.notes),
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
    """Σ XᵀX, Σ XᵀY, Σ Y² and the row count, per group."""

    def __init__(self):
        self.xx = self.xy = self.yy = None
        self.n = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """x [G, n, d], y [G, n, m] float32."""
        xt = x.transpose(0, 2, 1)
        xx, xy = (xt @ x).astype(np.float64), (xt @ y).astype(np.float64)
        yy = np.einsum("gnm,gnm->gm", y, y, dtype=np.float64)
        if self.xx is None:
            self.xx, self.xy, self.yy = xx, xy, yy
        else:
            self.xx += xx
            self.xy += xy
            self.yy += yy
        self.n += x.shape[1]


def _token_rows(feed: dict, leading: tuple) -> np.ndarray | None:
    """Rows to use of an activation with leading dims `leading` (batch, sequence): where an attention-mask-
    like feed of exactly those dims is non-zero (padding tokens do not reach a pooled output), else None."""
    for name, v in feed.items():
        if "mask" in name.lower() and v.shape == leading and v.dtype.kind in "iub":
            return np.flatnonzero(v.reshape(-1))
    return None


def _rows(layer: Layer, x: np.ndarray, y: np.ndarray, kept: np.ndarray, feed: dict, seed, limit: int) -> tuple:
    """(X [G, n, d], Y [G, n, m]) of one batch at the same seeded rows (at most `limit`) of the pruned input and
    the dense target."""
    rng = np.random.default_rng(seed)
    g = layer.groups
    if layer.conv is not None:
        out_hw = conv_output_size(x.shape, layer.conv)
        if tuple(out_hw) != tuple(y.shape[2:]):
            raise ValueError(f"output size {out_hw} does not match the dense output {y.shape[2:]}")
        cols = x.shape[1] * int(np.prod(layer.conv["kernel_shape"]))
        n = max(64, min(limit, ROW_ELEMENTS // max(cols, 1)))
        pick = conv_positions(x.shape[0], out_hw, n, rng)
        patches = im2col_at(x, layer.conv, pick).reshape(len(pick), g, -1)          # [n, G, Cin_g·k]
        xs = patches.transpose(1, 0, 2)
        ys = at_positions(y, pick)[:, kept].reshape(len(pick), g, -1).transpose(1, 0, 2)
    else:
        rows_x = x.reshape(-1, x.shape[-1])
        rows_y = np.moveaxis(y, layer.out_axis, -1).reshape(-1, y.shape[layer.out_axis])[:, kept]
        use = _token_rows(feed, tuple(x.shape[:-1])) if x.ndim == 3 else None
        if use is None:
            use = np.arange(len(rows_x))
        if len(use) > limit:
            use = np.sort(rng.choice(use, limit, replace=False))
        xs, ys = rows_x[use][None], rows_y[use][None]
    xs = np.ascontiguousarray(xs, dtype=np.float32)
    if layer.intercept:
        xs = np.concatenate([xs, np.ones(xs.shape[:2] + (1,), np.float32)], axis=2)
    return xs, np.ascontiguousarray(ys, dtype=np.float32)


def _errors(acc: _Accumulator, w: np.ndarray) -> np.ndarray:
    """Σ over rows of (XW − Y)² per group and output: wᵀ(XᵀX)w − 2wᵀXᵀY + ΣY²."""
    quad = np.sum(w * (acc.xx @ w), axis=1)
    cross = np.sum(w * acc.xy, axis=1)
    return np.maximum(quad - 2 * cross + acc.yy, 0.0)


def solve(fit: _Accumulator, w0: np.ndarray, c: float) -> np.ndarray:
    """(XᵀX/n + λI)⁻¹ (XᵀY/n + λW₀) per group, λ = c · mean of the non-intercept diagonal of XᵀX/n.
    Cholesky of the SPD system; least squares if rounding made it indefinite."""
    n = max(fit.n, 1)
    h = fit.xx / n
    r = fit.xy / n
    d = h.shape[1]
    diag = np.diagonal(h, axis1=1, axis2=2)
    scale = np.mean(diag[:, :-1] if d > 1 else diag, axis=1)
    scale = np.where(scale > 0, scale, 1.0)
    lam = (c * scale)[:, None, None]
    m = h + lam * np.eye(d)[None]
    rhs = r + lam * w0
    try:
        low = np.linalg.cholesky(m)
        return np.linalg.solve(low.transpose(0, 2, 1), np.linalg.solve(low, rhs))
    except np.linalg.LinAlgError:
        return np.stack([np.linalg.lstsq(m[g], rhs[g], rcond=None)[0] for g in range(len(m))])


def refit(fit: _Accumulator, val: _Accumulator, w0: np.ndarray) -> tuple[np.ndarray, dict]:
    """The accepted weights and what happened. Outputs are independent least-squares problems (their errors
    add up), so each output gets the damping c ∈ DAMPING with the lowest error on `val`, and keeps its refit
    only where that error is lower than W₀'s."""
    base = _errors(val, w0)
    sols = [solve(fit, w0, c) for c in DAMPING]
    errs = np.stack([_errors(val, w) for w in sols])                      # [c, G, m]
    best = errs.argmin(axis=0)                                            # [G, m]
    w = np.take_along_axis(np.stack(sols), best[None, :, None, :], axis=0)[0]
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


# ---- the pass ---------------------------------------------------------------------------------------------
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


def reconstruct(dense: Graph, pruned: Graph, removed: dict, feeds: dict, source: str = "", seed: int = 0,
                progress=None, budget: int | None = None) -> ReconstructionResult:
    """Refit the layers of `pruned` (changed in place) to reproduce `dense` layer by layer on `feeds`.
    `removed`: {(tensor, axis): removed indices} of the plan (dense tensor names). Node names of the pruned
    graph are those of the dense graph."""
    start = time.perf_counter()
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
    kwargs = {} if budget is None else {"budget": budget}
    pruned_cache = PrefixCache(pruned, feed_list, **kwargs)
    dense_cache = PrefixCache(dense, feed_list, **kwargs)
    dense_pos = {n.name: i for i, n in enumerate(dense.nodes)}
    per_batch = max(64, min(GRAM_ROWS, LAYER_ROWS // len(feed_list)))
    groups = waves(pruned, layers)
    result.waves = len(groups)
    done = 0
    for wave in groups:
        pruned_pos = {n.name: i for i, n in enumerate(pruned.nodes)}
        targets = {layer.name: layer.target for layer in wave}
        kept = {layer.name: _kept(dense, layer, removed) for layer in wave}
        fits = {layer.name: _Accumulator() for layer in wave}
        vals = {layer.name: _Accumulator() for layer in wave}
        failed = {}
        xs = pruned_cache.values([layer.x for layer in wave], min(pruned_pos[layer.name] for layer in wave))
        ys = dense_cache.values(list(targets.values()), min(dense_pos[layer.name] for layer in wave))
        for (b, xv), (_, yv) in zip(xs, ys):
            for k, layer in enumerate(wave):
                if layer.name in failed:
                    continue
                try:
                    x, y = _rows(layer, xv[layer.x], yv[targets[layer.name]], kept[layer.name], feed_list[b],
                                 (seed, done + k, b), per_batch)
                except (ValueError, IndexError) as exc:
                    failed[layer.name] = str(exc)
                    continue
                (vals if _is_validation(b, len(feed_list)) else fits)[layer.name].add(x, y)
        for _ in ys:        # let the dense walk finish (it moves its frontier cache at the end)
            pass
        for layer in wave:
            done += 1
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
            w, info = refit(fit, val, w0)
            if info["outputs_refit"]:
                set_weights(pruned, layer, w)
            result.layers.append(LayerResult(layer.name, layer.op, layer.groups, fit.n, **info))
            say(f"reconstruct {done}/{len(layers)} {layer.name}: relative error "
                f"{info['rel_error_before']:.4f} -> {info['rel_error_after']:.4f}")
    result.runs = pruned_cache.runs + dense_cache.runs
    result.seconds = time.perf_counter() - start
    return result
