"""Data-free statistics in closed form from BatchNorm parameters (algorithms.md, proxy 3).

A BatchNormalization output channel is, by construction, ≈ N(β_c, γ_c²) on the data the model was trained
on. Where a consumer reads such a channel directly, or through Relu / Clip (ReLU6), its moments follow from
the (clipped) Gaussian in closed form; through a following Max/AveragePool or Flatten they are estimated by
Monte-Carlo draws (pool taps taken as independent). Channels are taken as independent:
E[x] = μ, H = E[xxᵀ] = diag(Var) + μμᵀ. This reflects the real data the model saw, which a
synthetic standard-normal input does not; consumers not fed by a norm keep the synthetic proxy.
"""
from __future__ import annotations

import math

import numpy as np

from .calibration import ChannelStats
from .ir import Graph, attr

_SQRT2 = math.sqrt(2.0)


def _phi(t):
    return np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)


def _cdf(t):
    return 0.5 * (1.0 + np.vectorize(math.erf)(t / _SQRT2))


def clipped_normal_moments(m: np.ndarray, s: np.ndarray, lo: float, hi: float):
    """E[clip(z, lo, hi)] and E[clip(z, lo, hi)²] for z ~ N(m, s²), elementwise (lo/hi may be ±inf)."""
    m = np.asarray(m, np.float64)
    s = np.maximum(np.asarray(s, np.float64), 1e-12)
    a = np.full_like(m, lo) if np.isfinite(lo) else None
    b = np.full_like(m, hi) if np.isfinite(hi) else None
    alpha = (lo - m) / s if a is not None else np.full_like(m, -np.inf)
    beta = (hi - m) / s if b is not None else np.full_like(m, np.inf)
    ca, cb = _cdf(alpha), _cdf(beta)
    pa = np.where(np.isfinite(alpha), _phi(np.where(np.isfinite(alpha), alpha, 0)), 0.0)
    pb = np.where(np.isfinite(beta), _phi(np.where(np.isfinite(beta), beta, 0)), 0.0)
    mid = cb - ca
    first = m * mid + s * (pa - pb)
    a_pa = np.where(np.isfinite(alpha), np.where(np.isfinite(alpha), alpha, 0) * pa, 0.0)
    b_pb = np.where(np.isfinite(beta), np.where(np.isfinite(beta), beta, 0) * pb, 0.0)
    second = (m * m + s * s) * mid + 2 * m * s * (pa - pb) + s * s * (a_pa - b_pb)
    if a is not None:
        first = first + lo * ca
        second = second + lo * lo * ca
    if b is not None:
        first = first + hi * (1 - cb)
        second = second + hi * hi * (1 - cb)
    return first, second


def _clip_range(graph: Graph, node):
    """(lo, hi) of a rectifier node, or None when the node is not one."""
    if node.op_type == "Relu":
        return 0.0, math.inf
    if node.op_type == "Clip":
        lo, hi = attr(node, "min", -math.inf), attr(node, "max", math.inf)
        for k in (1, 2):
            if len(node.input) > k and node.input[k]:
                v = graph.initializers.get(node.input[k])
                if v is None:
                    return None
                lo, hi = (float(v), hi) if k == 1 else (lo, float(v))
        return float(lo), float(hi)
    return None


_SAMPLES = 4096  # Monte-Carlo draws per channel where pooling follows the rectifier


def _walk(graph: Graph, name: str, depth: int = 0):
    """The per-channel distribution of tensor `name` (axis 1) if it derives from a BatchNorm output through
    rectifiers, pools and Flatten: ('gauss', mean, std) while still Gaussian, ('moments', mean, second) after
    an exact rectifier, ('samples', draws[C, S]) after a pool; None when no norm is reached."""
    node = graph.producer.get(name)
    if node is None or depth > 8:
        return None
    op = node.op_type
    if op == "BatchNormalization" and len(node.input) >= 5:
        gamma, beta = graph.initializers.get(node.input[1]), graph.initializers.get(node.input[2])
        if gamma is None or beta is None or gamma.ndim != 1:
            return None
        return ("gauss", beta.astype(np.float64), np.abs(gamma).astype(np.float64))
    if op in ("Relu", "Clip"):
        rng = _clip_range(graph, node)
        src = _walk(graph, node.input[0], depth + 1) if rng is not None else None
        if src is None:
            return None
        if src[0] == "gauss":
            return ("moments",) + clipped_normal_moments(src[1], src[2], *rng)
        return ("samples", np.clip(_draws(src), *rng))
    if op in ("MaxPool", "AveragePool"):
        src = _walk(graph, node.input[0], depth + 1)
        kernel = attr(node, "kernel_shape")
        if src is None or not kernel:
            return None
        k = int(np.prod(kernel))
        draws = _draws(src)
        rng = np.random.default_rng(depth)
        picks = draws[np.arange(len(draws))[:, None, None], rng.integers(0, draws.shape[1], (1, draws.shape[1], k))]
        return ("samples", picks.max(axis=2) if op == "MaxPool" else picks.mean(axis=2))
    if op == "Flatten" and attr(node, "axis", 1) == 1:
        shape = graph.shape(node.input[0])
        src = _walk(graph, node.input[0], depth + 1)
        if src is None or shape is None or not all(isinstance(d, int) for d in shape[2:]):
            return None
        spatial = int(np.prod(shape[2:])) if len(shape) > 2 else 1
        return (src[0],) + tuple(np.repeat(a, spatial, axis=0) for a in src[1:])  # channel-major, as Flatten
    return None


def _draws(src) -> np.ndarray:
    """Samples [C, S] of a distribution from _walk (moments are matched by a Gaussian when no samples exist)."""
    if src[0] == "samples":
        return src[1]
    rng = np.random.default_rng(0)
    if src[0] == "gauss":
        mean, std = src[1], src[2]
    else:
        mean, std = src[1], np.sqrt(np.maximum(src[2] - src[1] ** 2, 0))
    return mean[:, None] + std[:, None] * rng.standard_normal((len(mean), _SAMPLES))


def bn_moments(graph: Graph, name: str):
    """(mean, second moment) per channel of tensor `name` if a BatchNorm feeds it (through rectifiers, pools,
    Flatten); else None."""
    src = _walk(graph, name)
    if src is None:
        return None
    if src[0] == "gauss":
        return src[1], src[1] ** 2 + src[2] ** 2
    if src[0] == "moments":
        return src[1], src[2]
    return src[1].mean(axis=1), (src[1] ** 2).mean(axis=1)


def closed_form_stats(graph: Graph, wanted: dict[tuple[str, int], bool]) -> dict[tuple[str, int], ChannelStats]:
    """ChannelStats in closed form for the wanted (tensor, channel axis 1) pairs that a BatchNorm feeds."""
    out = {}
    for (name, axis), _gram in wanted.items():
        if axis != 1:
            continue
        moments = bn_moments(graph, name)
        if moments is None:
            continue
        mean, second = moments
        st = ChannelStats(want_gram=True)
        st.n = 1
        st.sum, st.sumsq = mean, second
        st.gram = np.diag(second - mean * mean) + np.outer(mean, mean)
        out[(name, axis)] = st
    return out
