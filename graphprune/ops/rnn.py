"""Recurrent layers: a hidden unit owns one row per gate in W, R and B, one column of R (its recurrent
input to every gate), and one slot of Y / Y_h / Y_c and the initial states."""
from __future__ import annotations

import numpy as np

from ..rules import rule

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def link_gates(c, w, r, hidden: int, gates: int, gate_axis: int, recurrent_axis: int):
    """The hidden units of a recurrent layer as one virtual axis: hidden unit h owns entry h of every gate block
    (gate-axis entry j belongs to unit j mod hidden) in W and R, and is the recurrent input R reads on
    `recurrent_axis`. ONNX's LSTM/GRU/RNN lay gates on axis 1 and read the state on axis 2; onnxruntime's
    DynamicQuantizeLSTM stores both transposed. Returns the virtual axis."""
    unit = c.virtual(hidden, "hidden")
    entries = np.arange(gates * hidden)
    c.role(w, "weight")
    c.role(r, "weight")
    c.link(w, gate_axis, unit, 0, entries, entries % hidden)
    c.link(r, gate_axis, unit, 0, entries, entries % hidden)
    c.link(r, recurrent_axis, unit, 0)
    return unit


@rule("LSTM", "GRU", "RNN")
def recurrent(node, c):
    """Hidden unit h owns its gate rows in W/R/B/P, column h of R, and slot h of Y, Y_h, Y_c and initial states; hidden_size is rewritten."""
    gates = GATES[node.op_type]
    hidden = c.attr("hidden_size")
    layout = c.attr("layout", 0)
    inputs = list(node.input) + [""] * (8 - len(node.input))
    x, w, r, b, seq_lens, h0 = inputs[:6]
    c0 = inputs[6] if node.op_type == "LSTM" else ""
    p = inputs[7] if node.op_type == "LSTM" else ""
    if c.const(w) is None or c.const(r) is None or hidden is None:
        c.freeze_all("recurrent weights are not constant")
        return
    unit = link_gates(c, w, r, hidden, gates, gate_axis=1, recurrent_axis=2)
    c.oracle_mask(r, 2, r, 2)
    c.not_channel(w, [0])
    c.not_channel(r, [0])
    if b:
        c.role(b, "bias")
        brows = np.arange(2 * gates * hidden)
        c.link(b, 1, unit, 0, brows, brows % hidden)
        c.not_channel(b, [0])
    if p:
        prow = np.arange(3 * hidden)
        c.link(p, 1, unit, 0, prow, prow % hidden)
        c.not_channel(p, [0])
    c.consumer(x, 2, w, 2)
    # sequence and batch axes pass through to the outputs
    seq_ax, batch_ax = (0, 1) if layout == 0 else (1, 0)
    outs = list(node.output) + [""] * (3 - len(node.output))
    y, y_h, y_c = outs[:3]
    if y:
        c.link(y, 3, unit, 0)
        # layout 0: Y [seq, dirs, batch, hidden]; layout 1: Y [batch, seq, dirs, hidden]
        c.not_channel(y, [1 if layout == 0 else 2])
        c.link(x, seq_ax, y, 0 if layout == 0 else 1)
        c.link(x, batch_ax, y, 2 if layout == 0 else 0)
    for state in (y_h, y_c, h0, c0):
        if state:
            c.link(state, 2, unit, 0)
            c.not_channel(state, [0 if layout == 0 else 1])
            c.link(x, batch_ax, state, 1 if layout == 0 else 0)
    c.touch(x, seq_ax)
    c.touch(x, batch_ax)
    if seq_lens:
        c.not_channel(seq_lens)

    def fix(rw, node):
        rw.set_attr(node, "hidden_size", int(rw.new_shape(node.input[2])[2]))
    c.fixup(fix)
