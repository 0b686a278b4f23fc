"""Sparsify pass: SparseGPT block-mask math, emission and fusion, cost model decisions, verification, CLI."""
import numpy as np
import pytest

from graphprune.passes.sparsegpt import apply_block_mask, pruned_per_chunk, sparsegpt


@pytest.fixture(autouse=True)
def _private_timing_cache(tmp_path_factory, monkeypatch):
    """Real timings of these tests go to a throwaway cache, not the user's."""
    monkeypatch.setenv("GRAPHPRUNE_CACHE_DIR", str(tmp_path_factory.mktemp("timing-cache")))


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


# ---- emission and fusion on small hand-built models ------------------------------------------------------
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

from graphprune.feeds import synthetic_feeds  # noqa: E402
from graphprune.ir import Graph  # noqa: E402
from graphprune.kernels import ops  # noqa: E402
from graphprune.passes.canonicalize import canonicalize  # noqa: E402
from graphprune.passes.sparsify import sparsify  # noqa: E402

from helpers import make_model, rand  # noqa: E402


def _graph(model):
    g = Graph(model)
    canonicalize(g)
    return g


def _run_sparsify(model, sparsity=0.75, **kw):
    g = _graph(model)
    kw.setdefault("force", True)
    kw.setdefault("end_to_end", False)
    return sparsify(g, sparsity, synthetic_feeds(g, 32), "synthetic proxy", **kw)


def _dense_weights_of(model):
    """{replaced node name: dense [rows, outputs] weight, emitted bias, op} decoded from the emitted model with
    ops' unpackers (test-side decoding, independent of the pass's own reference)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.domain != ops.DOMAIN:
            continue
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        values, index, bias = (inits[i] for i in n.input[1:4])
        if n.op_type == "GpBsrMatMul":
            w = ops.unpack_bsr_matmul(values, index, a["K"], a["N"])
        elif n.op_type == "GpCsrMatMul":
            w = ops.unpack_csr_matmul(values, index, a["K"], a["N"])
        else:
            w = ops.unpack_bsr_conv(values, index, [a["out_channels"], a["in_channels"], *a["kernel_shape"]])
        out[n.name] = (np.asarray(w), bias, n.op_type, a)
    return out


def _with_weight(model, node_name, array):
    """`model` with node `node_name`'s weight input (index 1) set to `array`."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    node = next(n for n in m.graph.node if n.name == node_name)
    name = node.input[1] + "__test"
    m.graph.initializer.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
    node.input[1] = name
    return m


def _outputs(model, feed, opts=None):
    opts = opts or ort.SessionOptions()
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _block_sparsity(w, width, axis_rows=0):
    """Share of all-zero blocks of `width` consecutive outputs in a [rows, outputs] weight."""
    rows, cols = w.shape
    nb = -(-cols // width)
    padded = np.zeros((rows, nb * width))
    padded[:, :cols] = w
    return float((np.abs(padded.reshape(rows, nb, width)).sum(2) == 0).mean())


def _no_native():
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return opts


def _native():
    from graphprune import kernels
    assert kernels.available(), kernels.status()        # the library is part of the build: its absence fails
    return kernels.session_options(_no_native())


def _both_paths(model, feed):
    """The model's first output through the function fallback and through the native kernels."""
    return _outputs(model, feed, _no_native())[0], _outputs(model, feed, _native())[0]


def test_matmul_add_relu_on_3d_input_fuses_and_matches_masked_dense():
    w, b = rand(64, 48, seed=1), rand(48, seed=2)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
                        helper.make_node("Add", ["b", "h"], ["h2"], name="add"),   # bias first: either order
                        helper.make_node("Relu", ["h2"], ["y"], name="relu")],
                       [("x", ["batch", 7, 64])], [("y", ["batch", 7, 48])], {"W": w, "b": b})
    result = _run_sparsify(model)
    ops_left = [(n.op_type, n.domain) for n in result.model.graph.node]
    assert ops_left == [("GpBsrMatMul", ops.DOMAIN)]          # Add and Relu absorbed
    (w_sp, bias, _, attrs), = _dense_weights_of(result.model).values()
    assert attrs["clip_min"] == 0.0 and attrs["clip_max"] == float("inf")
    np.testing.assert_array_equal(bias, b)
    assert _block_sparsity(w_sp, 16) == 0.75 and result.layers[0].sparsity == 0.75
    feed = {"x": np.random.default_rng(0).standard_normal((2, 7, 64)).astype(np.float32)}
    want = _outputs(_with_weight(model, "mm", w_sp), feed)[0]
    for got in _both_paths(result.model, feed):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert result.summary["verification"]["paths"] == ["native library", "function fallback"]
    onnx.checker.check_model(result.model, full_check=True)


def test_gemm_transb_alpha_beta_folded():
    b_t, c = rand(40, 96, seed=3), rand(40, seed=4)                # B stored [N, K] (transB = 1)
    model = make_model([helper.make_node("Gemm", ["x", "B", "C"], ["h"], name="gemm", transB=1, alpha=0.5,
                                         beta=2.0),
                        helper.make_node("Relu", ["h"], ["y"], name="relu")],
                       [("x", ["batch", 96])], [("y", ["batch", 40])], {"B": b_t, "C": c})
    result = _run_sparsify(model)
    (w_sp, bias, op, _), = _dense_weights_of(result.model).values()
    assert op == "GpBsrMatMul" and w_sp.shape == (96, 40)
    np.testing.assert_allclose(bias, 2.0 * c, rtol=1e-6)
    feed = {"x": np.random.default_rng(1).standard_normal((3, 96)).astype(np.float32)}
    want = _outputs(_with_weight(model, "gemm", (w_sp / 0.5).T), feed)[0]   # back to Gemm's layout, alpha out
    for got in _both_paths(result.model, feed):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert abs(_block_sparsity(w_sp, 16) - 0.75) < 1e-9


@pytest.mark.parametrize("kernel,stride,auto_pad", [(1, 1, None), (3, 2, None), (3, 2, "SAME_UPPER")])
def test_conv_with_clip_0_6_matches_masked_dense(kernel, stride, auto_pad):
    cin, cout = 8, 10                                               # 10 = 2.5 blocks of 4 output channels
    w, bias = rand(cout, cin, kernel, kernel, seed=5), rand(cout, seed=6)
    attrs = {"kernel_shape": [kernel, kernel], "strides": [stride, stride]}
    attrs.update({"auto_pad": auto_pad} if auto_pad else {"pads": [kernel // 2] * 4})
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["h"], name="conv", **attrs),
             helper.make_node("Clip", ["h", "lo", "hi"], ["y"], name="clip")]
    size = 10
    out = (size + stride - 1) // stride if auto_pad else (size + 2 * (kernel // 2) - kernel) // stride + 1
    model = make_model(nodes, [("x", [1, cin, size, size])], [("y", [1, cout, out, out])],
                       {"W": w, "B": bias, "lo": np.array(0, np.float32), "hi": np.array(6, np.float32)})
    result = _run_sparsify(model)
    (w_sp, b_emit, op, a), = _dense_weights_of(result.model).values()
    assert op == "GpBsrConv" and (a["clip_min"], a["clip_max"]) == (0.0, 6.0)
    assert "auto_pad" not in a and len(a["pads"]) == 4
    np.testing.assert_array_equal(b_emit, bias)
    rows = w_sp.reshape(cout, -1).T                                 # [taps, Cout]
    assert abs(_block_sparsity(rows, 4) - round(0.75 * rows.shape[0] * 3) / (rows.shape[0] * 3)) < 1e-9
    feed = {"x": np.random.default_rng(2).standard_normal((1, cin, size, size)).astype(np.float32) * 3}
    want = _outputs(_with_weight(model, "conv", w_sp), feed)[0]
    assert want.max() == 6.0 and want.min() == 0.0                    # both clip bounds are exercised
    for got in _both_paths(result.model, feed):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_no_fusion_across_a_shared_or_output_tensor():
    w = rand(32, 32, seed=7)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
                        helper.make_node("Relu", ["h"], ["y"], name="relu")],
                       [("x", [1, 32])], [("y", [1, 32]), ("h", [1, 32])], {"W": w})
    result = _run_sparsify(model)
    assert [n.op_type for n in result.model.graph.node] == ["GpBsrMatMul", "Relu"]   # h is a graph output
    assert result.model.graph.node[0].output[0] == "h"


# ---- cost model -------------------------------------------------------------------------------------------
def _mlp():
    return make_model([helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
                       helper.make_node("Relu", ["h"], ["r"], name="relu"),
                       helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")],
                      [("x", [1, 64])], [("y", [1, 32])], {"W1": rand(64, 128, seed=8), "W2": rand(128, 32, seed=9)})


def _fake_timing(sparse_factor, csr_factor=None):
    """A measure factory: every sample of sparse takes `sparse_factor` × the dense time (CSR `csr_factor` ×)."""
    calls = []

    def measure(models, feed, threads):
        calls.append(sorted(models))
        t = {"dense": 1e-4, "bsr": 1e-4 * sparse_factor}
        t["csr"] = 1e-4 * (csr_factor if csr_factor is not None else sparse_factor)
        return lambda name: t[name]
    measure.calls = calls
    return measure


def test_cost_model_keeps_slower_layers_dense_with_their_original_weights():
    model = _mlp()
    result = _run_sparsify(model, force=False, measure=_fake_timing(2.0))   # sparse 2× slower
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Relu", "MatMul"]
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    for t in model.graph.initializer:                                       # untouched: no sparsity at all
        np.testing.assert_array_equal(weights[t.name], numpy_helper.to_array(t))
    assert all(r.format == "dense" and r.decision == "dense (measured 0.50× [0.50, 0.50], 12 rounds)"
               and r.how == "measured" for r in result.layers)
    assert [r.dense_us for r in result.layers] == [100.0, 100.0]
    assert result.summary["layers_sparse"] == 0 and result.summary["layers_dense"] == 2


def test_cost_model_emits_only_where_faster_by_the_margin():
    measure = _fake_timing(1 / 1.05)                                        # 1.05× faster: under the 1.1 margin
    result = _run_sparsify(_mlp(), force=False, measure=measure)
    assert all(r.format == "dense" for r in result.layers)
    result = _run_sparsify(_mlp(), force=False, measure=_fake_timing(0.5))
    assert [n.op_type for n in result.model.graph.node] == ["GpBsrMatMul", "GpBsrMatMul"]
    assert [r.decision for r in result.layers] == ["bsr (measured 2.00× [2.00, 2.00], 12 rounds)"] * 2
    assert result.layers[0].sparse_us == 50.0


def test_auto_format_picks_csr_only_at_high_sparsity_when_it_beats_bsr():
    result = _run_sparsify(_mlp(), sparsity=0.9, force=False, measure=_fake_timing(0.5, csr_factor=0.3))
    assert [n.op_type for n in result.model.graph.node] == ["GpCsrMatMul", "GpCsrMatMul"]
    w_sp = _dense_weights_of(result.model)["fc1"][0]
    assert (w_sp == 0).sum() == round(0.9 * w_sp.size)                      # unstructured: element sparsity
    assert _block_sparsity(w_sp, 16) < 0.8                                  # ... not a 1×16 block pattern
    decoded = _dense_weights_of(result.model)
    reference = _with_weight(_with_weight(_mlp(), "fc1", decoded["fc1"][0]), "fc2", decoded["fc2"][0])
    feed = {"x": np.random.default_rng(3).standard_normal((1, 64)).astype(np.float32)}
    for got in _both_paths(result.model, feed):
        np.testing.assert_allclose(got, _outputs(reference, feed)[0], rtol=1e-5, atol=1e-5)
    measure = _fake_timing(0.5, csr_factor=0.3)
    result = _run_sparsify(_mlp(), sparsity=0.75, force=False, measure=measure)
    assert {n.op_type for n in result.model.graph.node} == {"GpBsrMatMul"}
    assert all("csr" not in c for c in measure.calls)                        # CSR not even timed below 85 %


# ---- API and CLI ------------------------------------------------------------------------------------------
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

from click.testing import CliRunner  # noqa: E402

import graphprune  # noqa: E402
from graphprune.cli import main  # noqa: E402

MNIST = Path(__file__).resolve().parents[1] / "models" / "mnist_cnn.onnx"


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.slow
def test_cli_mnist_forced_sparse_model_runs_without_the_library(tmp_path):
    model = tmp_path / "mnist.onnx"
    shutil.copy(MNIST, model)
    out = tmp_path / "sparse.onnx"
    result = _cli(model, "--sparsity", "0.75", "--sparse-force", "-o", out)
    assert result.exit_code == 0, result.output
    assert "5 layers sparse, 0 kept dense" in result.output and "verified: sparse == masked dense" in result.output
    assert "sparse layers" in result.output and "Gemm 1152→256" in result.output
    sparse = onnx.load(str(out))
    onnx.checker.check_model(sparse, full_check=True)
    kinds = [n.op_type for n in sparse.graph.node if n.domain == ops.DOMAIN]
    assert kinds == ["GpBsrConv"] * 3 + ["GpBsrMatMul"] * 2
    assert {f.name for f in sparse.functions} == {"GpBsrConv", "GpBsrMatMul"}
    assert out.stat().st_size < 0.4 * MNIST.stat().st_size          # 75 % of the blocks are gone from the file
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    logits = _outputs(sparse, {"input": x}, _no_native())[0]      # plain onnxruntime: the function fallback
    dense = _outputs(onnx.load(str(MNIST)), {"input": x})[0]
    assert logits.shape == (4, 10) and np.isfinite(logits).all() and not np.allclose(logits, dense)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist.onnx", "sparse.onnx"]


@pytest.mark.slow
def test_cli_verification_failure_names_the_node_and_writes_nothing(tmp_path, monkeypatch):
    real = ops.pack_bsr_matmul

    def corrupt(w, keep=None):
        values, index = real(w, keep)
        return values * 1.5, index                                   # a packing bug, as the verifier sees it
    monkeypatch.setattr(ops, "pack_bsr_matmul", corrupt)
    out = tmp_path / "bad.onnx"
    result = _cli(MNIST, "--sparsity", "0.5", "--sparse-force", "-o", out)
    assert result.exit_code == 2
    assert result.output.startswith("error:") and "'/fc_layers/fc_layers.0/Gemm'" in result.output
    assert "GpBsrMatMul replacing Gemm" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_api_sparsity_alone_and_after_channel_pruning():
    model, report = graphprune.prune(str(MNIST), sparsity=0.5, sparse_force=True, verify_samples=1)
    assert report.channels_removed == 0 and len(report.sparse_layers) == 5      # ratio 0 when only sparsity
    assert report.sparse["layers_sparse"] == 5 and "synthetic" in report.sparse["calibration"]
    model, report = graphprune.prune(str(MNIST), ratio=0.25, sparsity=0.5, sparse_force=True, verify_samples=1)
    assert report.channels_removed > 0 and report.sparse["layers_sparse"] == 5
    conv = next(n for n in model.graph.node if n.op_type == "GpBsrConv")
    assert helper.get_attribute_value(next(a for a in conv.attribute if a.name == "out_channels")) == 24


def test_old_opset_is_refused_with_the_reason():
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [("x", [1, 8])], [("y", [1, 16])],
                       {"W": rand(8, 16)}, opset=11)
    with pytest.raises(graphprune.GraphpruneError, match="need opset ≥ 12; this model imports opset 11"):
        _run_sparsify(model)


def test_bad_sparse_settings_fail_cleanly():
    with pytest.raises(graphprune.GraphpruneError, match="sparsity must be in"):
        graphprune.prune(str(MNIST), sparsity=1.0)
    with pytest.raises(graphprune.GraphpruneError, match="sparse_format must be one of"):
        graphprune.prune(str(MNIST), sparsity=0.5, sparse_format="2:4")
    result = _cli(MNIST, "--sparsity", "0", "--dry-run")
    assert result.exit_code == 2 and "sparsity must be in (0, 1)" in result.output


# ---- sequential fitting to the dense output ---------------------------------------------------------------
from graphprune.passes.sparse_stats import LayerStats  # noqa: E402


@pytest.mark.slow
def test_target_fits_the_dense_output_from_damaged_inputs():
    rng = np.random.default_rng(5)
    d = _correlated(4000, 48, seed=6).astype(np.float64)
    distortion = np.eye(48) + 0.3 * rng.standard_normal((48, 48)) / 7      # what upstream pruning does to X
    s = d @ distortion + 0.05 * rng.standard_normal(d.shape)
    w = rng.standard_normal((48, 20))
    st = LayerStats(s.T @ s / len(s), s.T @ d / len(s), d.T @ d / len(d), len(s))
    w_t = st.target(w)
    assert np.linalg.norm(s @ w_t - d @ w) < 0.5 * np.linalg.norm(s @ w - d @ w)
    assert np.isclose(st.relative_error(w_t, w), np.linalg.norm(s @ w_t - d @ w) / np.linalg.norm(d @ w))
    same = LayerStats(d.T @ d / len(d), d.T @ d / len(d), d.T @ d / len(d), len(d))
    assert np.array_equal(same.target(w), w)                    # nothing upstream changed: W itself


@pytest.mark.slow
def test_sequential_sparsification_stays_closer_to_the_dense_model():
    rng = np.random.default_rng(7)
    mix = rng.standard_normal((32, 32)) / 5
    nodes, inits, x = [], {}, "x"
    for i, (k, n) in enumerate([(32, 64), (64, 64), (64, 64), (64, 16)]):
        inits[f"W{i}"] = rand(k, n, seed=20 + i)
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"], name=f"mm{i}"))
        x = f"h{i}"
        if i < 3:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    model = make_model(nodes, [("x", ["batch", 32])], [(x, ["batch", 16])], inits)
    g = _graph(model)
    feeds = {"x": (rng.standard_normal((512, 32)) @ mix).astype(np.float32)}
    test = {"x": (rng.standard_normal((256, 32)) @ mix).astype(np.float32)}
    dense = _outputs(model, test)[0]
    errors = {}
    for seq in (False, True):
        res = sparsify(g, 0.75, feeds, "calib", force=True, sequential=seq, end_to_end=False)
        errors[seq] = np.linalg.norm(_outputs(res.model, test, _no_native())[0] - dense) / np.linalg.norm(dense)
    assert errors[True] < 0.9 * errors[False], errors


def test_without_the_native_library_nothing_is_emitted_unless_forced(monkeypatch):
    from graphprune import kernels
    monkeypatch.setattr(kernels, "available", lambda: False)
    model = _mlp()
    result = _run_sparsify(model, force=False)
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Relu", "MatMul"]
    assert [r.decision for r in result.layers] == ["dense (no native library)"] * 2
    assert [r.dense_us for r in result.layers] == [None, None]                 # nothing was timed
    said = [n for n in result.summary["notes"] if "native" in n]
    assert len(said) == 1 and "--sparse-force" in said[0]                      # said once, not per layer
    forced = _run_sparsify(model, force=True)
    assert [n.op_type for n in forced.model.graph.node] == ["GpBsrMatMul", "GpBsrMatMul"]
    assert forced.summary["verification"]["paths"] == ["function fallback"]
