"""The analysis as plain data, the opset-aware rule registry, the group graph, the cycle check, params counting."""
from __future__ import annotations

from pathlib import Path

import networkx as nx
import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import graphprune
import graphprune.cli
import graphprune.ops  # noqa: F401  (registers every rule)
from graphprune.analysis import Analysis
from graphprune.docs import summary
from graphprune.errors import ModelLoadError, RuleError
from graphprune.ir import Graph
from graphprune.metrics import count
from graphprune.registry import Registry
from graphprune.rules import RULES, Coupler

from helpers import make_model, rand

MNIST = Path(__file__).resolve().parents[1] / "models" / "mnist_cnn.onnx"


def _mlp_with_softmax(opset: int):
    """x[1,4,6] -> MatMul -> h[1,4,8] -> Softmax(axis=1) -> MatMul -> y: the channel axis of h is axis 2."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Softmax", ["h"], ["s"], name="softmax", axis=1),
             helper.make_node("MatMul", ["s", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [("x", [1, 4, 6])], [("y", [1, 4, 3])],
                      {"w1": rand(6, 8), "w2": rand(8, 3)}, opset=opset)


def test_registry_picks_the_rule_for_the_models_opset():
    reg = Registry("test rule")

    @reg.register("Op", until=12)
    def old(node, c):
        """Old."""

    @reg.register("Op", since=13)
    def new(node, c):
        """New."""

    assert reg.lookup("Op", "", 11) is old and reg.lookup("Op", "", 12) is old
    assert reg.lookup("Op", "", 13) is new and reg.lookup("Op", "", 21) is new
    assert reg.lookup("Op", "ai.onnx", 13) is new
    assert reg.lookup("Op", "", 0) is new  # a model that imports no opset for the domain: the newest rule
    assert reg.lookup("Other", "", 13) is None
    with pytest.raises(RuleError, match="registered twice for opset 12"):
        @reg.register("Op", since=12, until=14)
        def overlapping(node, c):
            pass
    with pytest.raises(RuleError, match="empty"):
        reg.register("Op2", since=13, until=12)


def test_registry_gap_freezes_with_the_opset_in_the_reason(monkeypatch):
    """An op whose rules cover some opsets but not the model's is frozen, and the reason says which opset."""
    reg = Registry("channel rule")
    reg._entries = {key: list(entries) for key, entries in RULES._entries.items() if key != ("", "Softmax")}

    @reg.register("Softmax", since=99)
    def future(node, c):
        c.same(node.input[0], node.output[0])

    monkeypatch.setattr("graphprune.rules.RULES", reg)
    analysis = graphprune.analyze_model(_mlp_with_softmax(13))
    (group,) = [g for g in analysis.frozen_groups if ("h", 2) in g.members]
    assert group.reason == "Softmax node 'softmax': no channel rule for op Softmax at opset 13"


@pytest.mark.parametrize("opset, prunable", [(11, False), (13, True)])
def test_softmax_rule_follows_the_opset(opset, prunable):
    """Before opset 13 Softmax(axis=1) normalises over every axis from 1 on (the channel axis too); from 13
    over axis 1 only, so the channels on axis 2 can go."""
    analysis = graphprune.analyze_model(_mlp_with_softmax(opset))
    assert any(("h", 2) in g.members for g in analysis.groups) == prunable
    if not prunable:
        (group,) = [g for g in analysis.frozen_groups if ("h", 2) in g.members]
        assert "Softmax normalises over this axis" in group.reason
    else:
        graphprune.prune(_mlp_with_softmax(opset), ratio=0.5, verify=True, verify_samples=2)


def test_analysis_is_plain_data():
    analysis = graphprune.analyze_model(str(MNIST))
    assert isinstance(analysis, Analysis)
    assert not any(isinstance(v, Coupler) for v in vars(analysis).values())
    assert not hasattr(analysis, "coupler")
    # every unit of every group is in `units`, and its elements map back to it through the element space
    units = [u for g in analysis.groups + analysis.frozen_groups for u in g.units]
    assert len(units) == len(analysis.units)
    for g in analysis.groups:
        for u in g.units:
            assert analysis.units[u.root] is u
            for member, idx in u.elements.items():
                off, size = analysis.slots[member]
                assert np.all(analysis.element_unit[off + idx] == u.root)
                assert not analysis.element_frozen[off + idx].any()
    for g in analysis.frozen_groups:
        member, idx = next(iter(g.units[0].elements.items()))
        assert analysis.element_frozen[analysis.slots[member][0] + idx].all()
    conv_weights = {c.weight for c in analysis.consumers}
    assert conv_weights and all(analysis.roles.get(w) == "weight" for w in conv_weights)
    assert any(p.weight in conv_weights for p in analysis.producers)
    assert analysis.fixups and all(callable(fn) for _, fn in analysis.fixups)


def test_virtual_axes_stay_out_of_the_graph():
    """Meeting points rules create (a reshape's atoms) live in the Coupler, not in the graph's shapes."""
    analysis = graphprune.analyze_model(str(MNIST))
    assert any(name.startswith("#") for name, _ in analysis.slots)
    assert not any(name.startswith("#") for name in analysis.graph.shapes)


def test_failing_rule_freezes_and_leaves_a_diagnostic(monkeypatch):
    def broken(node, c):
        raise IndexError("no such axis")

    real_lookup = RULES.lookup
    def lookup(op, domain="", version=None):
        return broken if op == "Softmax" else real_lookup(op, domain, version)
    monkeypatch.setattr(RULES, "lookup", lookup)
    analysis = graphprune.analyze_model(_mlp_with_softmax(13))
    assert not any(("h", 2) in g.members for g in analysis.groups)
    assert any("Softmax node 'softmax' failed (IndexError: no such axis)" in d for d in analysis.diagnostics)


def test_group_graph_links_groups_to_tensors_and_nodes():
    analysis = graphprune.analyze_model(_mlp_with_softmax(13))
    gg = analysis.group_graph()
    (group,) = [g for g in analysis.groups if ("h", 2) in g.members]
    gid = f"group/{group.id}"
    assert gg.nodes[gid]["kind"] == "group" and gg.nodes[gid]["channels"] == 8
    assert gg.edges[gid, "tensor/w1"]["axes"] == "1" and gg.edges[gid, "tensor/w2"]["axes"] == "0"
    assert gg.nodes["tensor/w1"]["role"] == "weight" and gg.nodes["tensor/w1"]["initializer"]
    assert gg.has_edge("node/fc1", "tensor/h") and gg.edges["tensor/h", "node/softmax"]["index"] == 0
    assert gg.nodes["node/softmax"]["op_type"] == "Softmax"
    # the group's weights are two hops apart through the nodes that read and write them
    assert nx.has_path(gg, "tensor/w1", "tensor/h")


def test_cli_analyze_writes_graphml(tmp_path):
    out = tmp_path / "groups.graphml"
    result = CliRunner().invoke(graphprune.cli.main, ["analyze", str(MNIST), "--graph", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    back = nx.read_graphml(out)
    analysis = graphprune.analyze_model(str(MNIST))
    groups = [n for n, d in back.nodes(data=True) if d["kind"] == "group"]
    assert len(groups) == len(analysis.groups) + len(analysis.frozen_groups)
    named = {back.nodes[n]["name"] for n in groups}
    assert {g.name for g in analysis.groups} <= named


def test_cyclic_graph_is_a_clear_error():
    nodes = [helper.make_node("Add", ["x", "c"], ["a"], name="first"),
             helper.make_node("Relu", ["a"], ["b"], name="second"),
             helper.make_node("Mul", ["b", "x"], ["c"], name="third"),
             helper.make_node("Relu", ["b"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelLoadError, match=r"cycle: \w+ node '(first|second|third)'"):
        graphprune.analyze_model(model)


def test_params_leave_out_shape_constants():
    """A Reshape target (int64) and a Gather index list are not parameters; weights and biases are."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Add", ["h", "b"], ["hb"]),
             helper.make_node("Reshape", ["hb", "target"], ["r"]),
             helper.make_node("Gather", ["r", "idx"], ["y"], axis=1)]
    model = make_model(nodes, [("x", [2, 6])], [("y", [2, 2, 2])],
                       {"w": rand(6, 8), "b": rand(8), "target": np.array([2, 4, 2], np.int64),
                        "idx": np.array([0, 3], np.int64)})
    assert count(Graph(model))["params"] == 6 * 8 + 8


def test_params_count_quantised_weights_and_int32_bias():
    nodes = [helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "bias"], ["y"])]
    inits = {"xs": np.float32(0.1), "xz": np.uint8(128), "w": np.ones((4, 3, 1, 1), np.int8),
             "ws": np.float32(0.1), "wz": np.int8(0), "ys": np.float32(0.1), "yz": np.uint8(128),
             "bias": np.zeros(4, np.int32)}
    model = make_model(nodes, [("x", [1, 3, 5, 5], TensorProto.UINT8)], [("y", [1, 4, 5, 5], TensorProto.UINT8)],
                       inits)
    assert count(Graph(model))["params"] == 4 * 3 + 4


def test_docs_summary_keeps_whole_sentences():
    def rule_fn():
        """First sentence runs
        over two lines | with a pipe.

        Details the table leaves out."""
    assert summary(rule_fn.__doc__) == "First sentence runs over two lines \\| with a pipe."
    assert summary(None) == "-"


def test_a_unit_frozen_by_a_graph_input_names_the_input_not_the_rule_that_also_froze_it():
    """x (a graph input) is averaged over all its elements, dynamic batch included (as in tf.cond(mean(x) > 0)),
    and also feeds a MatMul: both freeze x's channels, and the report names the input (no pruning could free
    them), not the ReduceMean that ran last."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0, name="mean"),  # over every axis
             helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Mul", ["h", "m"], ["hm"], name="scale"),
             helper.make_node("MatMul", ["hm", "w2"], ["y"], name="fc2")]
    model = make_model(nodes, [("x", ["B", 6])], [("y", ["B", 3])], {"w1": rand(6, 8), "w2": rand(8, 3)}, opset=13)
    analysis = graphprune.analyze_model(model)
    by_name = {g.name: g.reason for g in analysis.frozen_groups}
    x_group = next(g for g in analysis.frozen_groups if ("x", 1) in g.members)
    assert x_group.reason == "graph: graph input 'x'", by_name
    assert [g.channels for g in analysis.groups] == [8]
