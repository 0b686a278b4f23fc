"""SparseGPT with a block mask: which weight blocks to zero, and how to compensate the rest.

A layer's weight is laid out as W[rows, outputs]: rows are the inputs it contracts (MatMul/Gemm K, Conv im2col
taps t = (ci, r, s)), outputs are N (or Cout). A block is one row × `width` consecutive outputs (16 for
GpBsrMatMul, 4 for GpBsrConv, 1 for unstructured CSR). H = XᵀX/n is the damped Hessian of the rows.

Rows are processed in chunks of 128 with U, the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU). In each chunk the
blocks with the lowest OBS saliency Σ_{n∈block} W[k,n]² / U[k,k]² are chosen, then row by row the error of the
pruned entries err = W[k,:] / U[k,k] (zero where kept) is propagated to the rows not yet processed:
W[k+1:, :] -= U[k, k+1:]ᵀ · err — the standard SparseGPT recurrence (Frantar & Alistarh, 2023), transposed to
our [rows, outputs] layout and with the mask shared by the outputs of a block.
"""
from __future__ import annotations

import numpy as np

CHUNK = 128


def block_count(outputs: int, width: int) -> int:
    return -(-outputs // width)


def pruned_per_chunk(rows: int, blocks_per_row: int, sparsity: float, chunk: int = CHUNK) -> list[int]:
    """How many blocks each chunk of rows loses so that the layer as a whole loses exactly
    round(sparsity · rows · blocks_per_row) blocks (cumulative rounding: no chunk drifts)."""
    counts, done = [], 0
    for end in range(chunk, rows + chunk, chunk):
        target = int(round(sparsity * min(end, rows) * blocks_per_row))
        counts.append(target - done)
        done = target
    return counts


def upper_inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """U with H⁻¹ = UᵀU. More damping is added if rounding made H (or H⁻¹) not quite positive definite."""
    h = np.asarray(h, dtype=np.float64)
    extra = 0.0
    scale = float(np.mean(np.diag(h))) or 1.0
    for _ in range(8):
        try:
            damped = h + extra * scale * np.eye(len(h))
            lower = np.linalg.cholesky(damped)
            inv_lower = np.linalg.solve(lower, np.eye(len(h)))
            h_inv = inv_lower.T @ inv_lower
            return np.linalg.cholesky(h_inv).T
        except np.linalg.LinAlgError:
            extra = 0.01 if extra == 0.0 else extra * 10
    raise np.linalg.LinAlgError("Hessian is not positive definite even with 10^6 % damping")


def block_saliency(w: np.ndarray, u_diag: np.ndarray, width: int) -> np.ndarray:
    """[rows, blocks] OBS saliency of removing each block: Σ_{n∈block} W[k,n]² / U[k,k]²."""
    rows, outputs = w.shape
    nb = block_count(outputs, width)
    sq = np.zeros((rows, nb * width))
    sq[:, :outputs] = w ** 2
    return sq.reshape(rows, nb, width).sum(axis=2) / (u_diag[:, None] ** 2)


def sparsegpt(w: np.ndarray, h: np.ndarray, sparsity: float, width: int, chunk: int = CHUNK):
    """Returns (compensated weight with the pruned blocks exactly zero, keep mask [rows, blocks] bool)."""
    rows, outputs = w.shape
    if h.shape != (rows, rows):
        raise ValueError(f"Hessian shape {h.shape} does not match {rows} weight rows")
    nb = block_count(outputs, width)
    weight = np.array(w, dtype=np.float64)
    u = upper_inverse_cholesky(h)
    keep = np.ones((rows, nb), dtype=bool)
    for c, n_prune in enumerate(pruned_per_chunk(rows, nb, sparsity, chunk)):
        i1, i2 = c * chunk, min((c + 1) * chunk, rows)
        w1 = weight[i1:i2]                       # a view: updates land in `weight`
        u1 = u[i1:i2, i1:i2]
        d = np.diag(u1)
        prune = np.zeros((i2 - i1, nb), dtype=bool)
        if n_prune:
            sal = block_saliency(w1, d, width).ravel()
            prune.flat[np.argpartition(sal, n_prune - 1)[:n_prune]] = True
        keep[i1:i2] = ~prune
        pruned = np.repeat(prune, width, axis=1)[:, :outputs]
        err = np.zeros_like(w1)
        for i in range(i2 - i1):
            if not pruned[i].any():
                continue
            e = np.where(pruned[i], w1[i] / d[i], 0.0)
            w1[i:] -= np.outer(u1[i, i:], e)
            w1[i, pruned[i]] = 0.0               # exactly zero, whatever the rounding of d·(w/d)
            err[i] = e
        if i2 < rows:
            weight[i2:] -= u[i1:i2, i2:].T @ err
    return weight.astype(w.dtype), keep


def apply_block_mask(w: np.ndarray, keep: np.ndarray, width: int) -> np.ndarray:
    """W with the dropped blocks zeroed and nothing else changed (plain removal, no compensation)."""
    elem = np.repeat(keep, width, axis=1)[:, : w.shape[1]]
    return np.where(elem, w, 0).astype(w.dtype)
