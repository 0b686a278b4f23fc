"""Sparsify pass: SparseGPT block-mask math, emission and fusion, cost model decisions, verification, CLI."""
import numpy as np
import pytest

from graphprune.passes.sparsegpt import apply_block_mask, pruned_per_chunk, sparsegpt


def _correlated(n, k, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    return (rng.standard_normal((n, k)) @ mix + 0.2 * rng.standard_normal((n, k))).astype(np.float32)


def _hessian(x):
    h = x.T.astype(np.float64) @ x / len(x)
    return h + 0.01 * np.mean(np.diag(h)) * np.eye(len(h))


# ---- SparseGPT with a block mask -------------------------------------------------------------------------
@pytest.mark.parametrize("width", [16, 4, 1])
@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_compensation_beats_plain_removal_and_sparsity_is_exact(width, sparsity):
    x = _correlated(1500, 300)          # 300 rows: two full chunks of 128 and a partial one
    w = np.random.default_rng(1).standard_normal((300, 40)).astype(np.float32)  # 40 = 2.5 blocks of 16
    w_hat, keep = sparsegpt(w, _hessian(x), sparsity, width)
    blocks = -(-40 // width)
    assert keep.shape == (300, blocks)
    assert (~keep).sum() == round(sparsity * 300 * blocks)          # exact, to block granularity
    assert np.array_equal(apply_block_mask(w_hat, keep, width), w_hat)  # dropped blocks are exactly zero
    plain = apply_block_mask(w, keep, width)
    err_comp = np.linalg.norm(x @ w - x @ w_hat)
    err_plain = np.linalg.norm(x @ w - x @ plain)
    assert err_comp < 0.99 * err_plain


def test_single_block_update_equals_obs_on_the_remaining_rows():
    """Pruning one block of row k: SparseGPT's update must be the OBS optimum over rows k.. (rows before k are
    already final), column by column: ΔW[k:, n] = −W[k, n] · G[:, 0] / G[0, 0] with G = (H[k:, k:])⁻¹."""
    x = _correlated(800, 40, seed=3)
    h = _hessian(x)
    w = np.random.default_rng(4).standard_normal((40, 32))
    w_hat, keep = sparsegpt(w, h, 1 / (40 * 2), width=16)    # exactly one of the 80 blocks goes
    (k,), (j,) = np.nonzero(~keep)
    cols = slice(16 * j, 16 * j + 16)
    g = np.linalg.inv(h[k:, k:])
    expected = w.copy()
    expected[k:, cols] -= np.outer(g[:, 0] / g[0, 0], w[k, cols])
    np.testing.assert_allclose(w_hat, expected, rtol=1e-8, atol=1e-10)
    assert np.all(w_hat[k, cols] == 0)


def test_blocks_per_chunk_add_up_exactly():
    for rows, blocks, s in [(300, 3, 0.75), (128, 1, 0.5), (1000, 7, 0.9), (5, 2, 0.33)]:
        counts = pruned_per_chunk(rows, blocks, s)
        assert sum(counts) == round(s * rows * blocks) and min(counts) >= 0
        assert len(counts) == -(-rows // 128)
