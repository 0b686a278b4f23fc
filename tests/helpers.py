"""Shared helpers for tests: build small ONNX graphs with random weights, prune, and check equivalence."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphprune

_rng = np.random.default_rng(1234)


def rand(*shape, seed=None, scale=None, positive=False):
    rng = np.random.default_rng(seed) if seed is not None else _rng
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    s = scale if scale is not None else 1.0 / np.sqrt(max(fan_in, 1))
    a = rng.standard_normal(shape) * s
    if positive:
        a = np.abs(a) + 0.5
    return a.astype(np.float32)


def make_model(nodes, inputs, outputs, initializers=None, opset=17, value_info=None, check=True, domains=None):
    """inputs/outputs: list of (name, shape) or (name, shape, elem_type); initializers: dict name -> array.
    check=False skips onnx.checker, for ops it rejects that onnxruntime runs (GroupNormalization-18, ...).
    domains: extra opset imports, e.g. {"com.microsoft": 1}."""
    def vi(spec):
        name, shape = spec[0], spec[1]
        et = spec[2] if len(spec) > 2 else TensorProto.FLOAT
        return helper.make_tensor_value_info(name, et, shape)
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()]
    graph = helper.make_graph(nodes, "test", [vi(i) for i in inputs], [vi(o) for o in outputs], inits,
                              value_info=value_info or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]
                              + [helper.make_opsetid(d, v) for d, v in (domains or {}).items()])
    model.ir_version = 8
    if check:
        onnx.checker.check_model(model)
    return model


class GraphBuilder:
    """A tiny ONNX graph builder for rule tests: every op gets a fresh output name; weights are seeded random
    arrays. Test files subclass it with their own composite ops and `model()`."""

    def __init__(self, seed=0):
        self.nodes, self.inits, self.k = [], {}, 0
        self.rng = np.random.default_rng(seed)

    def op(self, op_type, inputs, outputs=1, **attrs):
        self.k += 1
        outs = [f"{op_type.lower()}{self.k}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"{op_type}_{self.k}", **attrs))
        return outs if outputs > 1 else outs[0]

    def const(self, value, name=None):
        self.k += 1
        name = name or f"c{self.k}"
        self.inits[name] = np.asarray(value)
        return name

    def w(self, *shape, name, **kw):
        return self.const(rand(*shape, seed=int(self.rng.integers(1 << 30)), **kw), name)

    def matmul(self, x, cin, cout, name):
        return self.op("MatMul", [x, self.w(cin, cout, name=f"{name}.w")])


def wshape(model, name):
    """Dims of initializer `name` of `model`."""
    return next(tuple(t.dims) for t in model.graph.initializer if t.name == name)


def prune_checked(model, ratio=0.5, expect_smaller=True, **kwargs):
    """Prune with verification on (raises if the pruned model differs from the masked original)."""
    kwargs.setdefault("verify_samples", 2)
    # rule tests check the structure (exact slices, shape constants): the magnitude criterion compensates nothing,
    # unlike the default obspa, whose OBS refit moves the kept weights
    kwargs.setdefault("importance", "l1")
    # ... and the finest head units (head_dim), which exercise every slicing rule; the default 'auto' choice (whole
    # heads at attention) has its own tests (test_rules_shape)
    kwargs.setdefault("heads", "inner")
    pruned, report = graphprune.prune(model, ratio=ratio, verify=True, **kwargs)
    onnx.checker.check_model(pruned, full_check=True)
    assert report.verification is not None
    if expect_smaller:
        assert report.params_after < report.params_before, "nothing was pruned"
    return pruned, report


def group_sizes(model):
    """Sorted (units, channels) of the prunable groups of a model."""
    analysis = graphprune.analyze_model(model)
    return sorted((len(g.units), g.channels) for g in analysis.groups)


@contextlib.contextmanager
def recording_rule_lookups():
    """Collect, as ``domain::op`` (plain ``op`` for the default domain), every op whose channel rule the
    analysis looks up and finds inside the block: the op types the rules were actually run on."""
    from graphprune.registry import _norm_domain
    from graphprune.rules import RULES

    seen: set[str] = set()
    original = RULES.lookup

    def lookup(op_type, domain="", version=None):
        fn = original(op_type, domain, version)
        if fn is not None:
            d = _norm_domain(domain)
            seen.add(f"{d}::{op_type}" if d else op_type)
        return fn

    RULES.lookup = lookup  # instance attribute shadows the method for the duration of the block
    try:
        yield seen
    finally:
        del RULES.lookup


MNIST = Path(__file__).resolve().parents[1] / "models" / "mnist_cnn.onnx"


def conv_bn_model(gamma):
    c = len(gamma)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["a", "g", "b", "m", "v"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])]
    inits = {"w1": rand(c, 3, 3, 3, seed=1), "g": np.asarray(gamma, np.float32), "b": rand(c, seed=2),
             "m": rand(c, seed=3), "v": rand(c, seed=4, positive=True), "w2": rand(4, c, 3, 3, seed=5)}
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])], inits)
