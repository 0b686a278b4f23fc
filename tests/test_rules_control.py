"""Per-rule equivalence tests for control flow (ops/control.py): Loop, Scan and If, with bodies the same rules
analyse. Each model is built as tf2onnx writes it (a Keras recurrent layer as a Loop whose body reads its weights
from outside or carries them unchanged); `prune_checked` verifies the pruned model against the original with
the removed channels masked where every node reads them, inside the bodies too."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.ir import Graph, subgraphs
from graphprune.passes.canonicalize import canonicalize

from helpers import make_model, prune_checked, rand

F = TensorProto.FLOAT
mk = helper.make_node
SEQ, BATCH, D, IN, H = 5, 2, 6, 16, 12  # x [SEQ, BATCH, D] -> x1 [.., IN] -> hidden H


def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def only_io_frozen(analysis) -> bool:
    """Only the batch axes and the channels of graph inputs/outputs stay whole."""
    return all("graph input" in g.reason or "graph output" in g.reason for g in analysis.frozen_groups)


def body_of(model, op_type, attr_name="body"):
    node = next(n for n in model.graph.node if n.op_type == op_type)
    return next(a.g for a in node.attribute if a.name == attr_name)


def loop_lstm_model(gates: str = "split"):
    """A Keras-style LSTM as a Loop: h and c carried, x_t = Gather(x1, i), z = x_t·W + h·R + B split in 4
    gates, scan output h. W is read from the outer scope, R carried unchanged (tf2onnx does both); the body
    holds its own Split sizes as a Constant and defines a tensor 'z' that also exists outside (shadowing)."""
    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        [mk("Gather", ["x1", "i"], ["x_t"], axis=0),
         mk("MatMul", ["x_t", "W"], ["zx"]),
         mk("MatMul", ["h", "R_in"], ["zh"]),
         mk("Add", ["zx", "zh"], ["zs"]),
         mk("Add", ["zs", "B"], ["z"]),
         *_gate_nodes(gates),
         mk("Sigmoid", ["gi"], ["si"]), mk("Sigmoid", ["gf"], ["sf"]), mk("Tanh", ["gg"], ["tg"]),
         mk("Sigmoid", ["go"], ["so"]),
         mk("Mul", ["sf", "c"], ["fc"]), mk("Mul", ["si", "tg"], ["ig"]), mk("Add", ["fc", "ig"], ["c_out"]),
         mk("Tanh", ["c_out"], ["tc"]), mk("Mul", ["so", "tc"], ["h_out"]),
         mk("Identity", ["h_out"], ["h_scan"]), mk("Identity", ["cond_in"], ["cond_out"])],
        "lstm_body",
        [vi("i", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, []), vi("h", F, [BATCH, H]),
         vi("c", F, [BATCH, H]), vi("R_in", F, [H, 4 * H])],
        [vi("cond_out", TensorProto.BOOL, []), vi("h_out", F, [BATCH, H]), vi("c_out", F, [BATCH, H]),
         vi("R_in", F, [H, 4 * H]), vi("h_scan", F, [BATCH, H])])
    nodes = [mk("MatMul", ["x", "W0"], ["x1"]),
             mk("Loop", ["M", "cond", "h0", "c0", "R"], ["h_T", "c_T", "R_T", "hs"], body=body),
             mk("MatMul", ["hs", "Wy"], ["z"]),       # 'z' again, outside: the body's 'z' must not shadow it
             mk("Relu", ["z"], ["y"]),
             mk("MatMul", ["h_T", "Wh"], ["y_h"])]
    init = {"W0": rand(D, IN, seed=1), "W": rand(IN, 4 * H, seed=2), "R": rand(H, 4 * H, seed=3),
            "B": rand(4 * H, seed=4, scale=0.3), "M": np.array(SEQ, np.int64), "cond": np.array(True),
            "h0": rand(BATCH, H, seed=5, scale=0.5), "c0": rand(BATCH, H, seed=6, scale=0.5),
            "Wy": rand(H, 3, seed=7), "Wh": rand(H, 3, seed=8)}
    return make_model(nodes, [("x", [SEQ, BATCH, D])], [("y", [SEQ, BATCH, 3]), ("y_h", [BATCH, 3])], init)


def _gate_nodes(gates):
    """z [BATCH, 4H] into four [BATCH, H] gates: Split with sizes held by a body Constant, or a body Reshape to
    [BATCH, 4, H] (its target a body Constant) and one Gather per gate."""
    const = lambda name, v: mk("Constant", [], [name], value=numpy_helper.from_array(np.asarray(v)))  # noqa: E731
    if gates == "split":
        return [const("sizes", np.full(4, H, np.int64)), mk("Split", ["z", "sizes"], ["gi", "gf", "gg", "go"], axis=1)]
    nodes = [const("target", np.array([BATCH, 4, H], np.int64)), mk("Reshape", ["z", "target"], ["zr"])]
    for k, gate in enumerate(["gi", "gf", "gg", "go"]):
        nodes += [const(f"k{k}", np.array(k, np.int64)), mk("Gather", ["zr", f"k{k}"], [gate], axis=1)]
    return nodes


@pytest.mark.parametrize("gates", ["split", "reshape"])
def test_loop_lstm_prunes_hidden_units_through_carried_state_scan_output_and_outer_weights(gates):
    model = loop_lstm_model(gates)
    analysis = graphprune.analyze_model(model)
    widths = sorted((len(g.units), g.channels) for g in analysis.groups)
    # the x1 channels (IN) and the hidden units, each hidden unit owning one row of every gate (4H rows)
    assert widths == [(H, 4 * H), (IN, IN)], widths
    assert only_io_frozen(analysis)

    pruned, _ = prune_checked(model)
    w = inits(pruned)
    h = w["Wy"].shape[0]
    assert h < H and w["Wh"].shape[0] == h
    assert w["W"].shape[1] == w["R"].shape[1] == w["B"].shape[0] == 4 * h and w["R"].shape[0] == h
    assert w["h0"].shape == w["c0"].shape == (BATCH, h)
    assert w["W0"].shape[1] == w["W"].shape[0] < IN  # outer-scope weight read in the body lost its rows too
    # the body's Split sizes / Reshape target (hoisted Constants) were rewritten, and its declared state shapes
    body = body_of(pruned, "Loop")
    if gates == "split":
        split = next(n for n in body.node if n.op_type == "Split")
        assert list(w[split.input[1]]) == [h] * 4
    else:
        reshape = next(n for n in body.node if n.op_type == "Reshape")
        assert list(w[reshape.input[1]]) == [BATCH, 4, h]
    assert [d.dim_value for d in body.input[2].type.tensor_type.shape.dim] == [BATCH, h]

def test_loop_with_a_body_op_no_rule_follows_freezes_with_the_body_node_named():
    model = loop_lstm_model()
    body = body_of(model, "Loop")
    for n in body.node:  # an op without a channel rule on the hidden state inside the body
        if n.op_type == "Tanh" and n.input[0] == "c_out":
            n.op_type, n.domain = "MysteryTanh", "custom.domain"
    model.opset_import.append(helper.make_opsetid("custom.domain", 1))
    analysis = graphprune.analyze_model(model)
    reasons = [g.reason for g in analysis.frozen_groups]
    assert any("MysteryTanh" in r and "no channel rule" in r for r in reasons), reasons
    assert sorted(g.channels for g in analysis.groups) == [IN]  # x1's channels stay prunable


def scan_rnn_model():
    """A tanh RNN as a Scan over axis 1 of x1 [BATCH, SEQ, IN] (batch-major, as Keras lays it out), its state
    h [BATCH, H] and its scan output stacked back on axis 1."""
    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        [mk("MatMul", ["x_t", "Wx"], ["a"]), mk("MatMul", ["h", "Rh"], ["b"]), mk("Add", ["a", "b"], ["s"]),
         mk("Add", ["s", "Bh"], ["s2"]), mk("Tanh", ["s2"], ["h_next"]), mk("Relu", ["h_next"], ["y_t"])],
        "rnn_body", [vi("h", F, [BATCH, H]), vi("x_t", F, [BATCH, IN])],
        [vi("h_next", F, [BATCH, H]), vi("y_t", F, [BATCH, H])])
    nodes = [mk("MatMul", ["x", "W0"], ["x1"]),
             mk("Scan", ["h0", "x1"], ["h_T", "ys"], body=body, num_scan_inputs=1, scan_input_axes=[1],
                scan_output_axes=[1]),
             mk("MatMul", ["ys", "Wy"], ["y"]), mk("MatMul", ["h_T", "Wh"], ["y_h"])]
    init = {"W0": rand(D, IN, seed=1), "Wx": rand(IN, H, seed=2), "Rh": rand(H, H, seed=3),
            "Bh": rand(H, seed=4, scale=0.3), "h0": rand(BATCH, H, seed=5, scale=0.5), "Wy": rand(H, 3, seed=7),
            "Wh": rand(H, 3, seed=8)}
    return make_model(nodes, [("x", [BATCH, SEQ, D])], [("y", [BATCH, SEQ, 3]), ("y_h", [BATCH, 3])], init)


def test_scan_couples_state_scan_input_and_output_axes():
    model = scan_rnn_model()
    widths = sorted((len(g.units), g.channels) for g in graphprune.analyze_model(model).groups)
    assert widths == [(H, H), (IN, IN)], widths
    assert only_io_frozen(graphprune.analyze_model(model))
    pruned, _ = prune_checked(model)
    w = inits(pruned)
    h = w["Rh"].shape[0]
    assert h < H and w["Rh"].shape == (h, h) and w["Wx"].shape[1] == w["Bh"].shape[0] == h
    assert w["Wy"].shape[0] == w["Wh"].shape[0] == w["h0"].shape[1] == h
    assert w["W0"].shape[1] == w["Wx"].shape[0] < IN


def if_model(negate: bool):
    """An If whose branches read weights from the outer scope: then relu(x1·Wa + ba), else sigmoid(x1·Wb).
    `negate` flips the condition, so verification (which feeds True) runs the else branch."""
    vi = helper.make_tensor_value_info
    then_g = helper.make_graph([mk("MatMul", ["x1", "Wa"], ["ta"]), mk("Add", ["ta", "ba"], ["tb"]),
                                mk("Relu", ["tb"], ["t_out"])], "then", [], [vi("t_out", F, [BATCH, H])])
    else_g = helper.make_graph([mk("MatMul", ["x1", "Wb"], ["ea"]), mk("Sigmoid", ["ea"], ["e_out"])],
                               "else", [], [vi("e_out", F, [BATCH, H])])
    nodes = [mk("MatMul", ["x", "W0"], ["x1"])]
    cond = "flag"
    if negate:
        nodes.append(mk("Not", ["flag"], ["not_flag"]))
        cond = "not_flag"
    nodes += [mk("If", [cond], ["branch"], then_branch=then_g, else_branch=else_g),
              mk("MatMul", ["branch", "Wy"], ["y"])]
    init = {"W0": rand(D, IN, seed=1), "Wa": rand(IN, H, seed=2), "ba": rand(H, seed=3, scale=0.3),
            "Wb": rand(IN, H, seed=4), "Wy": rand(H, 3, seed=5)}
    return make_model(nodes, [("x", [BATCH, D]), ("flag", [], TensorProto.BOOL)], [("y", [BATCH, 3])], init)


@pytest.mark.parametrize("negate", [False, True], ids=["then", "else"])
def test_if_couples_both_branches_with_the_output(negate):
    model = if_model(negate)
    widths = sorted((len(g.units), g.channels) for g in graphprune.analyze_model(model).groups)
    assert widths == [(H, H), (IN, IN)], widths
    pruned, _ = prune_checked(model)
    w = inits(pruned)
    h = w["Wy"].shape[0]
    assert h < H and w["Wa"].shape[1] == w["Wb"].shape[1] == w["ba"].shape[0] == h
    assert w["W0"].shape[1] == w["Wa"].shape[0] == w["Wb"].shape[0] < IN


def test_body_names_that_shadow_outer_names_are_renamed_apart():
    graph = Graph(loop_lstm_model())
    canonicalize(graph)
    loop = next(n for n in graph.nodes if n.op_type == "Loop")
    body = subgraphs(loop)[0]
    local = {o for n in body.node for o in n.output} | {v.name for v in body.input}
    outer = {o for n in graph.nodes for o in n.output} | set(graph.initializers) | set(graph.input_names)
    assert not local & outer, local & outer
    # the body's Constant moved to the top level, and the carried R is read from outside
    assert not any(n.op_type == "Constant" for n in body.node)
    assert any(n.op_type == "MatMul" and "R" in n.input for n in body.node)
    assert graph.shape("z") == (SEQ, BATCH, 3)


def test_masked_reference_masks_reads_inside_bodies():
    """The oracle itself: a body MatMul that reads a removed hidden unit must read it as zero."""
    from graphprune.masking import insert_consumer_masks
    model = loop_lstm_model()
    mask = np.ones((1, H), bool)
    mask[0, 3] = False
    made = insert_consumer_masks(model, {"h": [mask]}, {"h": F})
    body = body_of(model, "Loop")
    where = [n for n in body.node if n.op_type == "Where"]
    assert len(where) == 1 and where[0].input[1] == "h" and made == {"h": [where[0].input[0]]}
    matmul = next(n for n in body.node if n.op_type == "MatMul" and n.input[1] == "R_in")
    assert matmul.input[0] == where[0].output[0]
    onnx.checker.check_model(model)


def test_data_aware_scoring_and_sensitivity_skip_tensors_inside_bodies():
    """Calibration exposes consumer inputs as graph outputs; a body's tensors have one value per iteration and
    cannot be: they get no statistics, and the data-aware criterion, compensation and the sensitivity scope
    still prune the Scan model and verify."""
    model = scan_rnn_model()
    _, report = prune_checked(model, importance="obspa", scope="sensitivity", target_params=0.7,
                              sensitivity_samples=2, calib_samples=8)
    assert report.params_after <= 0.75 * report.params_before


def test_loop_and_scan_macs_count_their_bodies_once_per_iteration():
    from graphprune.metrics import count
    graph = Graph(loop_lstm_model())
    canonicalize(graph)
    body = SEQ * (BATCH * 4 * H * IN + BATCH * 4 * H * H)        # x_t·W and h·R, SEQ iterations
    outside = SEQ * BATCH * IN * D + SEQ * BATCH * 3 * H + BATCH * 3 * H
    assert count(graph)["macs"] == body + outside
    graph = Graph(scan_rnn_model())
    canonicalize(graph)
    body = SEQ * (BATCH * H * IN + BATCH * H * H)                 # the Scan iterates over x1's axis 1 (SEQ)
    outside = BATCH * SEQ * IN * D + BATCH * SEQ * 3 * H + BATCH * 3 * H
    assert count(graph)["macs"] == body + outside


def test_excluding_the_loop_keeps_its_body_weights_whole():
    analysis = graphprune.analyze_model(loop_lstm_model(), exclude=["Loop*"])
    assert sorted(g.channels for g in analysis.groups) == []  # x1 is read by the body's x_t·W: W is the Loop's
    assert any("excluded by pattern" in g.reason for g in analysis.frozen_groups)
