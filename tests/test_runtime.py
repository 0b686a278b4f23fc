"""graphprune.runtime (sessions, expose, run, checker, tolerances) and graphprune.masking (the masked original)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphprune
from graphprune import runtime
from graphprune.masking import insert_consumer_masks

from helpers import make_model, rand


# ---- tolerance -------------------------------------------------------------------------------------------------
def test_tolerance_follows_the_dtype():
    assert runtime.tolerance(np.float32) == (1e-5, 1e-4)
    assert runtime.tolerance(np.float64) == runtime.tolerance("float32")
    assert runtime.tolerance(TensorProto.FLOAT) == (1e-5, 1e-4)          # onnx elem types work too
    u16, ubf16 = 2.0 ** -11, 2.0 ** -8
    assert runtime.tolerance(np.float16) == (4 * u16, 20 * u16)
    assert runtime.tolerance(TensorProto.FLOAT16) == runtime.tolerance("float16")
    assert runtime.tolerance(TensorProto.BFLOAT16) == (4 * ubf16, 20 * ubf16)
    f32, f16, bf16 = (runtime.tolerance(t) for t in ("float32", "float16", "bfloat16"))
    assert f32[0] < f16[0] < bf16[0] and f32[1] < f16[1] < bf16[1]
    assert runtime.tolerance(np.int64) == (0.0, 0.0) and runtime.tolerance(np.bool_) == (0.0, 0.0)
    # the block-sparse kernels' reordered sums: the absolute term 10x, as sparsify has always used
    assert runtime.tolerance(np.float32, reordered_sums=True) == (1e-4, 1e-4)


def test_one_float16_ulp_passes_the_float16_tolerance_but_not_float32s():
    a = np.random.default_rng(0).uniform(0.5, 4.0, size=256).astype(np.float16)
    b = np.nextafter(a, np.float16(np.inf))                  # every value off by one unit in the last place
    assert not runtime.compare_arrays(a, b).bad
    atol, rtol = runtime.tolerance(np.float32)
    strict = runtime.compare_arrays(a, b, atol=atol, rtol=rtol)
    assert strict.bad and strict.max_abs_diff == pytest.approx(float(np.max(b.astype(np.float64) - a)))
    # the same error in float32 values is far outside float32's tolerance
    assert runtime.compare_arrays(a.astype(np.float32), b.astype(np.float32)).bad


def test_compare_arrays_shape_integers_and_non_finite():
    assert runtime.compare_arrays(np.zeros(3), np.zeros(4)).bad
    assert runtime.compare_arrays(np.arange(3), np.arange(3)).bad is False
    assert runtime.compare_arrays(np.arange(3), np.arange(3) + 1).bad
    assert runtime.compare_arrays(np.array([1.0, np.inf]), np.array([1.0, 1e30])).bad


# ---- expose ----------------------------------------------------------------------------------------------------
def _two_layer_model():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("ArgMax", ["r"], ["idx"], name="argmax", axis=1, keepdims=0),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    return make_model(nodes, [("x", ["n", 8])], [("y", ["n", 4])], {"w1": rand(8, 6, seed=1), "w2": rand(6, 4, seed=2)})


def test_expose_returns_the_values_of_a_hand_built_model():
    model = _two_layer_model()
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    exposed = runtime.expose(model, ["h", "idx"])
    assert [o.name for o in exposed.graph.output] == ["y", "h", "idx"]
    types = {o.name: o.type.tensor_type.elem_type for o in exposed.graph.output}
    assert types["h"] == TensorProto.FLOAT and types["idx"] == TensorProto.INT64   # inferred, not assumed
    assert [o.name for o in model.graph.output] == ["y"]                          # the input is not edited
    got = runtime.run(exposed, {"x": x})
    by_hand = make_model([helper.make_node("MatMul", ["x", "w1"], ["h"])], [("x", ["n", 8])], [("h", ["n", 6])],
                         {"w1": rand(8, 6, seed=1)})
    want_h = runtime.session(by_hand).run(["h"], {"x": x})[0]
    np.testing.assert_array_equal(got["h"], want_h)
    np.testing.assert_array_equal(got["idx"], np.maximum(want_h, 0).argmax(1))
    np.testing.assert_array_equal(got["y"], runtime.run(model, {"x": x})["y"])


def test_expose_only_keeps_what_the_tensors_need():
    model = _two_layer_model()
    part = runtime.expose(model, ["h"], only=True)
    assert [n.name for n in part.graph.node] == ["mm1"]
    assert [t.name for t in part.graph.initializer] == ["w1"]
    assert [o.name for o in part.graph.output] == ["h"]
    with pytest.raises(runtime.ExposeError, match="no tensor named"):
        runtime.expose(model, ["nope"])


# ---- run, sessions, errors -------------------------------------------------------------------------------------
def test_run_in_batches_equals_one_run_and_keeps_unbatched_feeds_whole():
    model = make_model([helper.make_node("Mul", ["x", "s"], ["y"])], [("x", ["n", 3]), ("s", [1, 3])],
                       [("y", ["n", 3])])
    x = np.random.default_rng(1).standard_normal((10, 3)).astype(np.float32)
    s = np.array([[1.0, 2.0, 3.0]], np.float32)
    sess = runtime.session(model)
    whole = runtime.run(sess, {"x": x, "s": s})["y"]
    batched = runtime.run(sess, {"x": x, "unused": x}, batch=4, unbatched={"s": s})["y"]
    np.testing.assert_array_equal(whole, x * s)
    np.testing.assert_array_equal(batched, whole)


def test_onnxruntime_failures_are_graphprune_errors_naming_model_and_node():
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="the_matmul")], [("x", ["n", "k"])],
                       [("y", ["n", 4])], {"w": rand(8, 4)})
    model.graph.name = "tiny"
    sess = runtime.session(model)
    with pytest.raises(runtime.RunError) as info:
        sess.run(None, {"x": np.zeros((2, 5), np.float32)})       # K = 5 against an 8-row weight
    err = info.value
    assert isinstance(err, graphprune.GraphpruneError)
    assert err.model == "tiny" and err.node == "the_matmul" and err.op == "MatMul"
    assert "'tiny'" in str(err) and "'the_matmul'" in str(err)
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(runtime.SessionError, match="could not load model 'tiny'"):
        runtime.session(broken)


def test_check_model_raises_on_an_invalid_model_and_skips_oversized_ones(monkeypatch):
    model = _two_layer_model()
    assert runtime.check_model(model) is True
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[1].input[0] = "missing"
    with pytest.raises(onnx.checker.ValidationError):
        runtime.check_model(broken)
    monkeypatch.setattr(runtime, "CHECK_LIMIT", model.ByteSize())    # as if the model were at protobuf's limit
    assert runtime.check_model(broken) is False


# ---- the masked original -------------------------------------------------------------------------------------
@pytest.mark.parametrize("elem", [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT16,
                                  TensorProto.INT64, TensorProto.BOOL])
def test_masks_as_constants_and_as_inputs_give_equal_outputs(elem):
    """t is read by two nodes, both see it masked (two masks, applied in turn); t as a graph output does not.
    Covers the Where path (float, int64), the widened path (int16) and And (bool)."""
    np_type = helper.tensor_dtype_to_np_dtype(elem)
    nodes = [helper.make_node("Identity", ["x"], ["t"], name="producer"),
             helper.make_node("Identity", ["t"], ["a"], name="reader_a"),
             helper.make_node("Identity", ["t"], ["b"], name="reader_b")]
    model = make_model(nodes, [("x", [2, 5, 3], elem)], [("a", [2, 5, 3], elem), ("b", [2, 5, 3], elem),
                                                       ("t", [2, 5, 3], elem)])
    channel_mask = np.array([True, False, True, True, False]).reshape(1, 5, 1)
    row_mask = np.array([True, False]).reshape(2, 1, 1)
    types = {"t": elem}

    constant = onnx.ModelProto()
    constant.CopyFrom(model)
    made = insert_consumer_masks(constant, {"t": [channel_mask, row_mask]}, types)
    as_input = onnx.ModelProto()
    as_input.CopyFrom(model)
    names = insert_consumer_masks(as_input, {"t": [np.ones_like(channel_mask), np.ones_like(row_mask)]}, types,
                                  as_inputs=True, prefix="__gp_sens")
    assert len(made["t"]) == len(names["t"]) == 2
    onnx.checker.check_model(constant, full_check=True)
    onnx.checker.check_model(as_input, full_check=True)

    rng = np.random.default_rng(3)
    x = (rng.integers(1, 9, size=(2, 5, 3)) if elem != TensorProto.BOOL else np.ones((2, 5, 3))).astype(np_type)
    got_constant = runtime.run(constant, {"x": x})
    got_input = runtime.run(as_input, {"x": x, names["t"][0]: channel_mask, names["t"][1]: row_mask})
    want = np.where(channel_mask & row_mask, x, np.zeros((), np_type))
    for out in ("a", "b"):
        np.testing.assert_array_equal(got_constant[out], want)
        np.testing.assert_array_equal(got_input[out], got_constant[out])
    np.testing.assert_array_equal(got_input["t"], x)          # a graph output is not a consumer: unmasked
    assert got_constant["a"].dtype == np_type


def test_mask_inputs_change_with_the_feeds_in_one_session():
    w = rand(6, 4, seed=5)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [3, 6])], [("y", [3, 4])], {"w": w})
    names = insert_consumer_masks(model, {"x": [np.ones((1, 6), bool)]}, {"x": TensorProto.FLOAT}, as_inputs=True)
    sess = runtime.session(model)
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    for removed in ([], [0, 4], [1, 2, 3]):
        mask = np.ones((1, 6), bool)
        mask[0, removed] = False
        got = runtime.run(sess, {"x": x, names["x"][0]: mask})["y"]
        np.testing.assert_allclose(got, (x * mask) @ w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("elem", [TensorProto.UINT8, TensorProto.INT16])
def test_a_fill_replaces_zero_for_the_node_that_asks_for_it(elem):
    """A quantized input's removed channels read its zero point, for that consumer only; the widened int16 path
    casts the fill as well."""
    np_type = helper.tensor_dtype_to_np_dtype(elem)
    nodes = [helper.make_node("Identity", ["x"], ["t"], name="producer"),
             helper.make_node("Identity", ["t"], ["a"], name="quantized_reader"),
             helper.make_node("Identity", ["t"], ["b"], name="plain_reader")]
    model = make_model(nodes, [("x", [2, 4], elem)], [("a", [2, 4], elem), ("b", [2, 4], elem)],
                       {"zp": np.array(7, np_type)})
    mask = np.array([[True, False, True, False]])
    x = np.arange(1, 9, dtype=np_type).reshape(2, 4)
    for as_inputs in (False, True):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        names = insert_consumer_masks(m, {"t": [mask]}, {"t": elem}, as_inputs=as_inputs,
                                      fills={("quantized_reader", "t"): "zp"})
        feeds = {"x": x, **({n: mask for n in names["t"]} if as_inputs else {})}
        got = runtime.run(m, feeds)
        np.testing.assert_array_equal(got["a"], np.where(mask, x, np.array(7, np_type)))
        np.testing.assert_array_equal(got["b"], np.where(mask, x, np.array(0, np_type)))
