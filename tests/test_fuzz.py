"""Property-based fuzzing: random valid graphs built from registered ops, pruned at a random ratio, either refuse
cleanly (GraphpruneError) or give a checker-valid model that equals the masked original (graphprune's own
verification) and keeps the original's output shapes; at ratio 0 the outputs are unchanged.

CI runs a fixed, derandomized budget. A longer run:
    GRAPHPRUNE_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics
(GRAPHPRUNE_FUZZ_SEED=random drops the fixed seed to explore new graphs.)
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import (  # noqa: E402
    HealthCheck,
    event,
    given,
    settings,
    strategies as st,  # noqa: E402
)

import graphprune  # noqa: E402
from graphprune.errors import GraphpruneError  # noqa: E402
from graphprune.runtime import session  # noqa: E402

EXAMPLES = int(os.environ.get("GRAPHPRUNE_FUZZ_EXAMPLES", "40"))
DERANDOMIZE = os.environ.get("GRAPHPRUNE_FUZZ_SEED", "fixed") != "random"
TRIED: dict[str, int] = {}


class Builder:
    """Grows a graph one op at a time, tracking every tensor's static shape so each op gets valid inputs."""

    def __init__(self, draw, rng):
        self.draw, self.rng = draw, rng
        self.nodes, self.inits, self.shapes = [], {}, {}
        self.count = 0

    def name(self, base):
        self.count += 1
        return f"{base}{self.count}"

    def weight(self, *shape, positive=False):
        a = (self.rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[1:]))))).astype(np.float32)
        if positive:
            a = np.abs(a) + 0.5
        n = self.name("w")
        self.inits[n] = a
        return n

    def const(self, array):
        n = self.name("k")
        self.inits[n] = np.asarray(array)
        return n

    def add(self, op, inputs, out_shapes, **attrs):
        outs = [self.name("t") for _ in out_shapes]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op.lower() + "_"), **attrs))
        for o, s in zip(outs, out_shapes, strict=True):
            self.shapes[o] = tuple(s)
        return outs[0] if len(outs) == 1 else outs

    def step_more(self, op, four):
        """The second batch of ops; False when `op` is not one of them."""
        if op == "LayerNormalization":
            two = self.pick(2)
            if two is None or self.opset < 17:
                return None
            n, f = self.shapes[two]
            return self.add(op, [two, self.weight(f, positive=True), self.weight(f)], [(n, f)], axis=-1)
        if four is None:
            return False
        n, c, h, w = self.shapes[four]
        if op == "GroupConv":
            if c % 2:
                return None
            out = 2 * self.draw(st.integers(1, 6))
            return self.add("Conv", [four, self.weight(out, c // 2, 3, 3)], [(n, out, h, w)], pads=[1] * 4, group=2)
        if op == "ConvTranspose":
            out = self.draw(st.integers(2, 8))
            return self.add(op, [four, self.weight(c, out, 2, 2)], [(n, out, 2 * h, 2 * w)], strides=[2, 2])
        if op == "LeakyRelu":
            return self.add(op, [four], [(n, c, h, w)], alpha=0.1)
        if op == "Clip":
            return self.add(op, [four, self.const(np.float32(-1)), self.const(np.float32(1))], [(n, c, h, w)])
        if op == "Pad":
            return self.add(op, [four, self.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))],
                            [(n, c, h + 2, w + 2)])
        if op == "Resize":
            return self.add(op, [four, "", self.const(np.array([1, 1, 2, 2], np.float32))], [(n, c, 2 * h, 2 * w)],
                            mode="nearest")
        if op == "ReduceMean":
            if self.opset >= 18:
                return self.add(op, [four, self.const(np.array([2, 3], np.int64))], [(n, c, 1, 1)], keepdims=1)
            return self.add(op, [four], [(n, c, 1, 1)], axes=[2, 3], keepdims=1)
        if op == "Softmax":
            return self.add(op, [four], [(n, c, h, w)], axis=1)
        if op == "InstanceNormalization":
            return self.add(op, [four, self.weight(c, positive=True), self.weight(c)], [(n, c, h, w)])
        if op == "PRelu":
            return self.add(op, [four, self.weight(c, 1, 1)], [(n, c, h, w)])
        if op == "ScaleShift":
            scaled = self.add("Mul", [four, self.weight(1, c, 1, 1, positive=True)], [(n, c, h, w)])
            return self.add("Sub", [scaled, self.weight(1, c, 1, 1)], [(n, c, h, w)])
        if op == "SliceChannels":
            if c < 2:
                return None
            return self.add("Slice", [four, self.const(np.array([0], np.int64)), self.const(np.array([c // 2],
                            np.int64)), self.const(np.array([1], np.int64))], [(n, c // 2, h, w)])
        if op == "Concat3":
            others = [self.pick(4, lambda s: s[2:] == (h, w)) for _ in range(2)]
            return self.add("Concat", [four, *others], [(n, c + sum(self.shapes[o][1] for o in others), h, w)],
                            axis=1)
        return False

    def pick(self, rank, pred=lambda s: True):
        choices = [t for t, s in self.shapes.items() if len(s) == rank and pred(s)]
        return self.draw(st.sampled_from(choices)) if choices else None

    opset = 17

    # ---- one random op ---------------------------------------------------------------------------------------
    def step(self):
        four = self.pick(4)
        op = self.draw(st.sampled_from(
            ["Conv", "Conv", "ConvDW", "BatchNormalization", "Relu", "Sigmoid", "Add", "Mul", "Concat", "Split",
             "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Transpose", "Gemm", "MatMul",
             "ReluFC", "GroupConv", "ConvTranspose", "LeakyRelu", "Clip", "Pad", "Resize", "ReduceMean",
             "Softmax", "InstanceNormalization", "PRelu", "ScaleShift", "SliceChannels", "Concat3"]
            if four else ["Gemm", "MatMul", "ReluFC", "Add", "Concat2", "LayerNormalization"]))
        extra = self.step_more(op, four)
        if extra is not False:
            return extra
        if op in ("Conv", "ConvDW") and four:
            n, c, h, w = self.shapes[four]
            k = self.draw(st.sampled_from([1, 3]))
            out = c if op == "ConvDW" else self.draw(st.integers(2, 12))
            group = c if op == "ConvDW" else 1
            ins = [four, self.weight(out, c // group, k, k)]
            if self.draw(st.booleans()):
                ins.append(self.weight(out))
            return self.add("Conv", ins, [(n, out, h, w)], pads=[k // 2] * 4, group=group)
        if op == "BatchNormalization":
            n, c, h, w = self.shapes[four]
            return self.add(op, [four, self.weight(c, positive=True), self.weight(c), self.weight(c),
                                 self.weight(c, positive=True)], [(n, c, h, w)])
        if op in ("Relu", "Sigmoid"):
            return self.add(op, [four], [self.shapes[four]])
        if op in ("Add", "Mul"):
            rank = len(self.shapes[four]) if four else 2
            a = self.pick(rank)
            b = self.pick(rank, lambda s: s == self.shapes[a])
            return self.add(op, [a, b], [self.shapes[a]])
        if op == "Concat":
            n, c, h, w = self.shapes[four]
            b = self.pick(4, lambda s: s[2:] == (h, w))
            return self.add(op, [four, b], [(n, c + self.shapes[b][1], h, w)], axis=1)
        if op == "Concat2":
            a = self.pick(2)
            b = self.pick(2, lambda s: s[0] == self.shapes[a][0])
            return self.add("Concat", [a, b], [(self.shapes[a][0], self.shapes[a][1] + self.shapes[b][1])], axis=1)
        if op == "Split":
            n, c, h, w = self.shapes[four]
            if c < 2 or c % 2:
                return None
            outs = self.add(op, [four, self.const(np.array([c // 2, c // 2], np.int64))],
                            [(n, c // 2, h, w)] * 2, axis=1)
            return outs[self.draw(st.integers(0, 1))]
        if op in ("MaxPool", "AveragePool"):
            n, c, h, w = self.shapes[four]
            if h < 2 or w < 2:
                return None
            return self.add(op, [four], [(n, c, h // 2, w // 2)], kernel_shape=[2, 2], strides=[2, 2])
        if op == "GlobalAveragePool":
            n, c, h, w = self.shapes[four]
            return self.add(op, [four], [(n, c, 1, 1)])
        if op == "Flatten":
            n, c, h, w = self.shapes[four]
            return self.add(op, [four], [(n, c * h * w)], axis=1)
        if op == "Reshape":
            n, c, h, w = self.shapes[four]
            return self.add(op, [four, self.const(np.array([0, -1], np.int64))], [(n, c * h * w)])
        if op == "Transpose":
            n, c, h, w = self.shapes[four]
            return self.add(op, [four], [(n, c, w, h)], perm=[0, 1, 3, 2])
        two = self.pick(2)
        if two is None:
            return None
        n, f = self.shapes[two]
        out = self.draw(st.integers(2, 16))
        if op == "Gemm":
            return self.add(op, [two, self.weight(out, f), self.weight(out)], [(n, out)], transB=1)
        if op == "MatMul":
            return self.add(op, [two, self.weight(f, out)], [(n, out)])
        return self.add("Relu", [two], [(n, f)])


@st.composite
def graphs(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 31)))
    b = Builder(draw, rng)
    b.opset = draw(st.sampled_from([13, 17, 21]))
    c0 = draw(st.integers(2, 6))
    hw = draw(st.sampled_from([4, 6, 8]))
    b.shapes["x"] = (1, c0, hw, hw)
    last = "x"
    for _ in range(draw(st.integers(3, 12))):
        out = b.step()
        if out is not None:
            last = out
    if last == "x" or draw(st.booleans()):  # a fixed-width head, so the layers before it have free channels
        shape = b.shapes[last]
        if len(shape) == 4:
            last = b.add("Conv", [last, b.weight(4, shape[1], 1, 1)], [(shape[0], 4, shape[2], shape[3])])
        else:
            last = b.add("Gemm", [last, b.weight(4, shape[1])], [(shape[0], 4)], transB=1)
    outputs = [last]
    extra = [t for t in b.shapes if t not in ("x", last)]
    if extra and draw(st.booleans()):
        outputs.append(draw(st.sampled_from(extra)))
    batch = "N" if draw(st.booleans()) else 1  # a symbolic batch dim exercises the random-feed shapes
    g = helper.make_graph(b.nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                          (batch, *b.shapes["x"][1:]))],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, (batch, *b.shapes[o][1:]))
                           for o in outputs],
                          [numpy_helper.from_array(v, k) for k, v in b.inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", b.opset)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


@settings(max_examples=EXAMPLES, derandomize=DERANDOMIZE, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(model=graphs(), ratio=st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9]),
       importance=st.sampled_from(["l1", "l2", "bn-scale", "random"]), seed=st.integers(0, 3))
def test_random_graphs_prune_to_equivalent_models(model, ratio, importance, seed):
    TRIED["graphs"] = TRIED.get("graphs", 0) + 1
    try:
        pruned, report = graphprune.prune(model, ratio=ratio, importance=importance, seed=seed, verify_samples=2)
    except GraphpruneError as exc:
        event(f"refused: {type(exc).__name__}: {str(exc)[:160]}")
        TRIED["refused"] = TRIED.get("refused", 0) + 1
        return
    event("pruned" if report.params_after < report.params_before else "unchanged")
    onnx.checker.check_model(pruned, full_check=True)
    v = report.verification
    assert v is not None and (v["compared"] or v["degenerate"]), v
    x = np.random.default_rng(seed + 11).standard_normal(
        [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
    before = session(model).run(None, {"x": x})
    after = session(pruned).run(None, {"x": x})
    assert [a.shape for a in before] == [a.shape for a in after]
    if ratio == 0.0:
        for a, b in zip(before, after, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


_SEED_MODEL = None


def _seed_model_bytes() -> bytes:
    """A small valid model with external-data-free weights, the starting point of the byte mutations."""
    global _SEED_MODEL
    if _SEED_MODEL is None:
        rng = np.random.default_rng(0)
        nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", ["h"], ["r"], name="relu"), helper.make_node("Conv", ["r", "w2"], ["y"],
                                                                                       name="c2")]
        g = helper.make_graph(nodes, "seed", [helper.make_tensor_value_info("x", 1, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", 1, ["N", 4, 6, 6])],
                              [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w1"),
                               numpy_helper.from_array(rng.standard_normal((4, 6, 1, 1)).astype(np.float32), "w2")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 9
        _SEED_MODEL = m.SerializeToString()
    return _SEED_MODEL


@settings(max_examples=EXAMPLES, derandomize=DERANDOMIZE, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 10 ** 6)))
def test_mutated_model_bytes_fail_cleanly(tmp_path_factory, edits, cut):
    """Random byte edits and truncations of a valid model: a GraphpruneError or a checker-valid result."""
    data = bytearray(_seed_model_bytes())
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    path = tmp_path_factory.mktemp("mut") / "m.onnx"
    path.write_bytes(bytes(data))
    TRIED["mutations"] = TRIED.get("mutations", 0) + 1
    try:
        graphprune.analyze_model(str(path))
        pruned, _ = graphprune.prune(str(path), ratio=0.5, verify_samples=1)
    except GraphpruneError as exc:
        event(f"refused: {type(exc).__name__}" + (f": {str(exc).split(': ', 1)[1][:120]}"
                                                    if type(exc).__name__ == "PassError" else ""))
        return
    event("pruned")
    onnx.checker.check_model(pruned, full_check=True)


def test_fuzz_budget_was_spent():
    """Runs after the property (file order): the budget really produced graphs (not all filtered away)."""
    assert TRIED.get("graphs", 0) >= min(EXAMPLES, 20), TRIED
    assert TRIED.get("mutations", 0) >= min(EXAMPLES, 20), TRIED
