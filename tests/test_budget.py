"""Budgets: MACs at representative dims, image-folder calibration with declared preprocessing, --min-fidelity."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import graphprune
from graphprune.ir import Graph
from graphprune.metrics import count, representative_dims, set_dims

from helpers import make_model

D = 32


def _attention(seed=0):
    """x [1, seq, D] -> q, k, v projections -> softmax(q kᵀ) v -> output projection."""
    rng = np.random.default_rng(seed)
    w = {n: (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32) for n in ("wq", "wk", "wv", "wo")}
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
             helper.make_node("MatMul", ["x", "wv"], ["v"], name="v"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
             helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["p", "v"], ["o"], name="mix"),
             helper.make_node("MatMul", ["o", "wo"], ["y"], name="out")]
    return make_model(nodes, [("x", [1, "seq", D])], [("y", [1, "seq", D])], w)


def _counted(model, **dims):
    graph = Graph(model)
    graph.infer_shapes()
    set_dims(graph, representative_dims(graph, dims))
    return count(graph)


def test_attention_macs_scale_with_seq_squared():
    model = _attention()
    small, large = _counted(model, seq=16), _counted(model, seq=64)
    # q kᵀ: seq x seq outputs, each a dot product of length D
    assert small["per_node"]["scores"] == 16 * 16 * D
    assert large["per_node"]["scores"] == 64 * 64 * D
    assert large["per_node"]["scores"] / small["per_node"]["scores"] == 16  # seq² (4x seq)
    assert large["per_node"]["q"] / small["per_node"]["q"] == 4              # projections: linear in seq
    assert large["macs"] == 4 * 64 * D * D + 2 * 64 * 64 * D


def test_default_dims_come_from_the_random_feed_defaults():
    from graphprune.feeds import DEFAULT_DIM
    graph = Graph(_attention())
    graph.infer_shapes()
    dims = representative_dims(graph)
    assert dims == {"seq": (DEFAULT_DIM, "default")}
    assert representative_dims(graph, {"seq": 7}) == {"seq": (7, "dim")}
    feeds = {"x": np.zeros((5, 9, D), np.float32)}  # 5 samples of 9 tokens: the sample axis is not a dim
    assert representative_dims(graph, feeds=feeds) == {"seq": (9, "calibration")}


def _true_macs(model, seq):
    """MACs of the (pruned) attention model at `seq`, from its weight shapes alone."""
    w = {t.name: tuple(t.dims) for t in model.graph.initializer}
    proj = seq * (w["wq"][0] * w["wq"][1] + w["wk"][0] * w["wk"][1] + w["wv"][0] * w["wv"][1]
                  + w["wo"][0] * w["wo"][1])
    return proj + seq * seq * w["wq"][1] + seq * seq * w["wv"][1]


@pytest.mark.parametrize("seq", [8, 256])
def test_target_macs_accounts_for_attention(seq):
    model = _attention()
    pruned, report = graphprune.prune(model, target_macs=0.7, importance="l1", input_dims={"seq": seq},
                                      verify_samples=1)
    assert report.assumed_dims == {"seq": {"value": seq, "source": "dim"}}
    assert report.macs_before == _true_macs(model, seq)
    assert report.macs_after == _true_macs(pruned, seq)
    assert report.macs_ratio == pytest.approx(0.7, abs=0.02)
    # the written model keeps its dynamic dim
    assert pruned.graph.input[0].type.tensor_type.shape.dim[1].dim_param == "seq"


# ---- image folders with declared preprocessing ---------------------------------------------------------------
def _image_graph(shape):
    return Graph(make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", shape)], [("y", shape)]))


def _images(folder, size, n=3, seed=0):
    from PIL import Image
    folder.mkdir()
    rng = np.random.default_rng(seed)
    pixels = []
    for k in range(n):
        a = rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)
        Image.fromarray(a, "RGB").save(folder / f"{k}.png")
        pixels.append(a)
    return pixels


def test_image_folder_crop_mean_std_bgr_nchw(tmp_path):
    from graphprune.feeds import load_feeds
    from graphprune.options import PruneOptions
    pixels = _images(tmp_path / "imgs", (8, 12))  # 8 high, 12 wide: covers 8x8 unscaled, 2 columns cut each side
    o = PruneOptions(image_size="8x8", image_mean="0.485,0.456,0.406", image_std="0.229,0.224,0.225",
                     channel_order="BGR").validate()
    feeds = load_feeds(tmp_path / "imgs", _image_graph([1, 3, "h", "w"]), samples=3,
                       preprocess=o.image_preprocessing)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    ref = np.stack([((p[:, 2:10, ::-1] / 255.0 - mean) / std).transpose(2, 0, 1) for p in pixels])
    assert feeds["x"].shape == (3, 3, 8, 8)
    np.testing.assert_allclose(feeds["x"], ref, rtol=1e-5, atol=1e-5)


def test_image_folder_defaults_from_the_model_shape_nhwc_resize(tmp_path):
    from PIL import Image

    from graphprune.feeds import load_feeds
    pixels = _images(tmp_path / "imgs", (16, 24), n=2)
    # [1, 8, 8, 3]: last dim 3, second not -> NHWC; size 8x8 from the model; 24x16 -> 12x8, crop columns 2..10
    feeds = load_feeds(tmp_path / "imgs", _image_graph([1, 8, 8, 3]), samples=2)
    ref = np.stack([np.asarray(Image.fromarray(p).resize((12, 8), Image.BICUBIC))[:, 2:10] / 255.0 for p in pixels])
    assert feeds["x"].shape == (2, 8, 8, 3)
    np.testing.assert_allclose(feeds["x"], ref, atol=1e-6)


@pytest.mark.parametrize("field,value,match", [
    ("image_size", "0x4", "image_size"), ("image_size", "ax4", "image_size"), ("image_size", "99999", "image_size"),
    ("image_mean", "0.4,0.5", "image_mean"), ("image_mean", "nope", "image_mean"),
    ("image_std", "0.2,0,0.2", "image_std"),
    ("channel_order", "RGBA", "channel_order"), ("image_layout", "CHW", "image_layout"),
    ("min_fidelity", 1.5, "min_fidelity"), ("fidelity_metric", "top5", "fidelity_metric")])
def test_preprocessing_options_are_validated(field, value, match):
    from graphprune.options import OptionError, PruneOptions
    with pytest.raises(OptionError, match=match):
        PruneOptions.from_kwargs(**{field: value})


def test_mean_length_must_match_the_channels(tmp_path):
    from graphprune.feeds import CalibrationError, load_feeds
    from graphprune.options import PruneOptions
    _images(tmp_path / "imgs", (8, 8), n=1)
    o = PruneOptions(image_mean="0.1,0.2,0.3").validate()
    with pytest.raises(CalibrationError, match="--image-mean has 3 values"):
        load_feeds(tmp_path / "imgs", _image_graph([1, 1, 8, 8]), preprocess=o.image_preprocessing)


# ---- --min-fidelity ---------------------------------------------------------------------------------------------
def _classifier(seed=0):
    """x [N, 16] -> Gemm 48 -> Relu -> Gemm 10 logits: random weights, which is enough for the classes to depend
    on every hidden unit a little."""
    rng = np.random.default_rng(seed)
    inits = {"w1": rng.standard_normal((16, 48)).astype(np.float32) / 4, "b1": np.zeros(48, np.float32),
             "w2": rng.standard_normal((48, 10)).astype(np.float32) / 7, "b2": np.zeros(10, np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2")]
    return make_model(nodes, [("x", ["N", 16])], [("y", ["N", 10])], inits)


def test_min_fidelity_finds_the_last_target_that_keeps_agreement(tmp_path):
    from graphprune.pipeline import FIDELITY_STEPS, agreement
    model = _classifier()
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((256, 16)).astype(np.float32))
    floor = 0.85
    pruned, report = graphprune.prune(model, calib=str(calib), holdout=64, min_fidelity=floor, importance="l1",
                                      compensate="none", verify_samples=1)
    curve, chosen = report.fidelity_search, report.fidelity_target
    assert len(curve) == FIDELITY_STEPS
    # the written model is the chosen plan, and its held-out agreement (top-1: the output is [N, classes]) holds
    graph = Graph(model)
    graph.infer_shapes()
    kept = agreement(report.fidelity, "auto", graph)
    assert kept == report.fidelity["outputs"]["y"]["top1_agreement"] >= floor
    assert 0 < chosen < 1 and report.macs_ratio < 0.9 and report.verification is not None
    assert tuple(t.dims for t in pruned.graph.initializer if t.name == "w1")[0][1] < 48
    # bisection's neighbour below the chosen target failed the floor
    below = max((c for c in curve if c[0] < chosen), key=lambda c: c[0])
    assert below[2] < floor
    assert chosen - below[0] == pytest.approx(2.0 ** -FIDELITY_STEPS)
    assert [c for c in curve if c[0] == chosen][0][2] >= floor


def test_min_fidelity_needs_calibration():
    from graphprune.options import OptionError
    with pytest.raises(OptionError, match="min_fidelity needs calibration"):
        graphprune.prune(_classifier(), min_fidelity=0.9)


def test_cli_prints_assumed_dims_and_the_search(tmp_path):
    from click.testing import CliRunner

    from graphprune.cli import main
    onnx.save(_classifier(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).standard_normal((128, 16)).astype(np.float32))
    result = CliRunner().invoke(main, [str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npz"),
                                       "--min-fidelity", "0.8", "--fidelity-metric", "cosine", "--importance", "l1",
                                       "--dim", "N=4", "-o", str(tmp_path / "out.onnx")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "MACs counted at N=4 (dim)" in result.output
    assert "--min-fidelity: MACs target" in result.output
    bad = CliRunner().invoke(main, [str(tmp_path / "m.onnx"), "--image-size", "0x3"])
    assert bad.exit_code == 2 and "image_size" in bad.output


def test_probed_token_dim_of_a_flatten_is_resolved():
    """x [batch, seq, D] -> Reshape [-1, D] -> Gemm: probing names the flattened axis dyn_X_Y (batch x seq in
    its two runs); it is counted at batch x seq, so the Gemm's MACs grow with seq."""
    rng = np.random.default_rng(0)
    inits = {"shape": np.array([-1, D], np.int64), "w": rng.standard_normal((D, 8)).astype(np.float32),
             "b": np.zeros(8, np.float32)}
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w", "b"], ["y"], name="fc")]
    model = make_model(nodes, [("x", ["batch", "seq", D])], [("y", [None, 8])], inits)
    counts = {}
    for seq in (16, 64):
        _, report = graphprune.prune(model, dry_run=True, importance="l1", input_dims={"seq": seq, "batch": 2})
        counts[seq] = report.macs_before
    assert counts[16] == 2 * 16 * D * 8 and counts[64] == 2 * 64 * D * 8


def test_macs_of_a_dynamic_width_conv_stack_count_at_the_representative_width():
    """onnx names each strided conv's output width itself ('unk__N'); those widths must follow the input's."""
    import onnx as _onnx
    from onnx import helper as _h

    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((8, 1, 3, 3)).astype(np.float32),
             "w2": rng.standard_normal((16, 8, 3, 3)).astype(np.float32)}
    nodes = [_h.make_node("Conv", ["x", "w1"], ["a"], name="c1", strides=[2, 2], pads=[1, 1, 1, 1]),
             _h.make_node("Relu", ["a"], ["r"], name="relu"),
             _h.make_node("Conv", ["r", "w2"], ["y"], name="c2", strides=[2, 2], pads=[1, 1, 1, 1])]

    def model(width):
        g = _h.make_graph(nodes, "g", [_h.make_tensor_value_info("x", 1, [1, 1, 32, width])],
                          [_h.make_tensor_value_info("y", 1, None)],
                          [_onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
        return _h.make_model(g, opset_imports=[_h.make_opsetid("", 17)])

    def macs(m, dims):
        return graphprune.prune(m, ratio=0.0, importance="l1", verify=False, dry_run=True,
                                input_dims=dims)[1].macs_before

    expected = 8 * 9 * 16 * 80 + 16 * 8 * 9 * 8 * 40
    assert macs(model(160), {}) == expected
    assert macs(model("width"), {"width": 160}) == expected
