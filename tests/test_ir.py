"""Load/save behaviour: metadata survives, external data round trips, unnamed nodes get names, stale
value_info never survives a rewrite."""
from pathlib import Path

from onnx import helper

import graphprune
from graphprune.ir import Graph, load_model, save_model

from helpers import make_model, prune_checked, rand

MODEL = Path(__file__).resolve().parents[1] / "models" / "mnist_cnn.onnx"


def _conv_model():
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "w2"], ["y"], pads=[1, 1, 1, 1])]
    model = make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])],
                       {"w1": rand(16, 3, 3, 3), "w2": rand(4, 16, 3, 3)})
    for n in model.graph.node:
        n.name = ""
    return model


def test_metadata_doc_string_and_version_survive():
    model = _conv_model()
    model.doc_string = "a doc"
    model.model_version = 7
    helper.set_model_props(model, {"author": "me", "task": "test"})
    pruned, _ = prune_checked(model)
    assert pruned.doc_string == "a doc" and pruned.model_version == 7
    assert {p.key: p.value for p in pruned.metadata_props} == {"author": "me", "task": "test"}


def test_unnamed_nodes_get_unique_names_and_value_info_is_fresh():
    pruned, _ = prune_checked(_conv_model())
    names = [n.name for n in pruned.graph.node]
    assert all(names) and len(set(names)) == len(names)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in pruned.graph.value_info}
    assert shapes["a"] == [1, 8, 8, 8]  # 16 channels halved, not the stale 16


def test_external_data_written_and_read_back(tmp_path):
    model, _ = load_model(str(MODEL))
    out = tmp_path / "ext.onnx"
    save_model(model, out, external_data=True)
    assert (tmp_path / "ext.onnx.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]
    again, had_external = load_model(str(out))
    assert had_external
    pruned, report = graphprune.prune(str(out), ratio=0.5, verify_samples=1)
    assert report.params_after < report.params_before


def test_graph_clone_shares_weights_not_nodes():
    g = Graph(_conv_model())
    c = g.clone()
    c.nodes[0].name = "changed"
    assert g.nodes[0].name != "changed"
    assert c.initializers["w1"] is g.initializers["w1"]
