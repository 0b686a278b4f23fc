"""Second moments of a layer's input rows, for SparseGPT: from calibration samples run through onnxruntime.

Rows are what the layer contracts: X[..., K] for MatMul/Gemm, im2col patches for Conv (sampled at random
output positions; column order = the block format's tap order t = (ci·kh + r)·kw + s), so a Conv gets its
exact im2col Hessian rather than the per-channel approximation kron(H_c, I_taps).

Sequentially (the default), the rows S come from the model whose earlier layers already carry their sparse
weights and the rows D from the dense model, for the same samples and positions. The layer is then fitted
to the dense model's output: min ‖S·Ŵ − D·W‖², i.e. SparseGPT on the target
    W_t = W + (SᵀS/n + λI)⁻¹ (SᵀD/n − SᵀS/n) W
(regularised towards W, and exactly W while nothing upstream has changed), with H = SᵀS/n + λI. Without
that target correction each layer would preserve W·S, its original response to already-damaged inputs, and
errors would compound (measured: MNIST CNN at 75 % block sparsity 87.7 % → 97.4 % accuracy with it).
The onnxruntime runs and im2col rows come from passes/layer_stats.py, which channel reconstruction
(passes/reconstruct.py) uses too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphprune.calibration import GRAM_ROWS
from graphprune.feeds import batches, static_batch
from graphprune.ir import Graph

from .layer_stats import Runner, exposing, im2col_rows, session  # noqa: F401  (the shared streaming engine)
from .sparse_layers import Layer

DAMP = 0.01          # λ = 1 % of the mean diagonal of SᵀS/n, as SparseGPT


@dataclass
class LayerStats:
    ss: np.ndarray                 # SᵀS / n   (S = rows the layer will see: upstream layers already sparse)
    sd: np.ndarray                 # SᵀD / n   (D = the dense model's rows for the same samples)
    dd: np.ndarray                 # DᵀD / n
    n: int

    def hessian(self, damp: float = DAMP) -> np.ndarray:
        scale = float(np.mean(np.diag(self.ss))) or 1.0
        return self.ss + damp * scale * np.eye(len(self.ss))

    def target(self, w: np.ndarray, damp: float = DAMP) -> np.ndarray:
        """The weight that best reproduces the dense output D·W from the rows S (see the module docstring)."""
        w = w.astype(np.float64)
        correction = self.sd - self.ss
        if not np.any(correction):
            return w
        return w + np.linalg.solve(self.hessian(damp), correction @ w)

    def relative_error(self, w_hat: np.ndarray, w: np.ndarray) -> float:
        """‖S·Ŵ − D·W‖ / ‖D·W‖: the layer's output error against the dense model, upstream damage included."""
        w, w_hat = w.astype(np.float64), w_hat.astype(np.float64)
        ref = float(np.sum(w * (self.dd @ w)))
        err = float(np.sum(w_hat * (self.ss @ w_hat)) - 2 * np.sum(w_hat * (self.sd @ w)) + ref)
        return float(np.sqrt(max(err, 0.0) / ref)) if ref > 0 else 0.0


def stats_key(layer: Layer):
    """Layers with equal keys see the same rows (Q/K/V projections of one input)."""
    conv = layer.conv
    return (layer.x, None if conv is None else (tuple(conv["kernel_shape"]), tuple(conv["strides"]),
                                               tuple(conv["pads"]), tuple(conv["dilations"])))


def layer_rows(layer: Layer, x: np.ndarray, seed: int) -> np.ndarray:
    """float32 rows of one batch; the same `seed` picks the same rows from the dense and the sparse run."""
    rng = np.random.default_rng(seed)
    if layer.conv is not None:
        return np.ascontiguousarray(im2col_rows(x, layer.conv, GRAM_ROWS, rng), dtype=np.float32)
    rows = x.reshape(-1, x.shape[-1])
    if len(rows) > GRAM_ROWS:
        rows = rows[np.sort(rng.choice(len(rows), GRAM_ROWS, replace=False))]
    return np.ascontiguousarray(rows, dtype=np.float32)


def collect(dense: Graph, layers: list[Layer], feeds: dict, sparse: Graph | None = None, say=None) -> dict:
    """LayerStats per statistics key of `layers`. `sparse`: the model with the earlier layers already sparse
    (None: the rows S are the dense rows D, one run). Returns {stats_key: LayerStats}."""
    keys = {}
    for layer in layers:
        keys.setdefault(stats_key(layer), layer)
    names = sorted({key[0] for key in keys})
    dense_run = Runner(dense, names)
    sparse_run = Runner(sparse, names) if sparse is not None else None
    acc = {key: [np.zeros((layer.rows, layer.rows)) for _ in range(3 if sparse_run else 1)] + [0]
           for key, layer in keys.items()}
    batch = static_batch(dense.inputs) or 16
    total = len(next(iter(feeds.values())))
    done = 0
    for b, feed in enumerate(batches(feeds, batch)):
        d_values = dense_run(feed)
        s_values = sparse_run(feed) if sparse_run else None
        for key, layer in keys.items():
            d = layer_rows(layer, d_values[key[0]], b)
            a = acc[key]
            if s_values is None:
                a[0] += d.T @ d                     # float32 products, float64 sums (as calibration.py)
            else:
                s = layer_rows(layer, s_values[key[0]], b)
                a[0] += s.T @ s
                a[1] += s.T @ d
                a[2] += d.T @ d
            a[-1] += len(d)
        done += len(next(iter(feed.values())))
        if say:
            say(f"layer statistics {done}/{total} samples")
    out = {}
    for key, a in acc.items():
        n = max(a[-1], 1)
        if sparse_run is None:
            g = a[0] / n
            out[key] = LayerStats(g, g, g, n)
        else:
            out[key] = LayerStats(a[0] / n, a[1] / n, a[2] / n, n)
    return out


def probe_shapes(graph: Graph, layers: list[Layer], feeds: dict) -> dict:
    """Each layer input's shape in one run at the model's static batch (or batch 1): the shapes the cost model
    times and the report shows (dims the calibration samples fix, like a sequence length, come from them)."""
    names = sorted({layer.x for layer in layers})
    if not names:
        return {}
    batch = static_batch(graph.inputs) or 1
    values = Runner(graph, names)({k: v[:batch] for k, v in feeds.items()})
    return {name: tuple(int(d) for d in v.shape) for name, v in values.items()}
