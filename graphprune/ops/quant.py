"""Integer ops of quantized graphs: onnxruntime's dynamic quantization (DynamicQuantizeLinear -> MatMulInteger /
ConvInteger, com.microsoft DynamicQuantizeLSTM) and the QLinear ops of static quantization.

The removed channels of a quantized activation are not zero but equal to its zero point: (q - zp) is what the
integer op multiplies. So the masked reference fills them with the zero point (`c.mask_fill`), and the pruned op,
which no longer sees them, agrees exactly.
"""
from __future__ import annotations

import numpy as np

from ..rules import rule
from .conv import conv as _conv_rule
from .conv import matmul as _matmul_rule


class _Renamed:
    """A view of a node with another input list, so the float rules (Conv, MatMul) can declare the layout."""

    def __init__(self, node, inputs):
        self._node = node
        self.input = inputs
        self.output = node.output

    def __getattr__(self, name):
        return getattr(self._node, name)


@rule("DynamicQuantizeLinear")
def dynamic_quantize_linear(node, c):
    """y keeps x's layout. The scale comes from min(0, min x) and max(0, max x): zeros (masked channels) never move the range, so removing channels leaves the scale exact."""
    x, y = node.input[0], node.output[0]
    c.same(x, y)
    for scalar in node.output[1:]:
        if scalar:
            c.touch(scalar, 0)


def _per_channel(c, param, y, y_axis, size):
    """A per-channel zero point/scale of the weight rides with the output channels; a scalar is left alone."""
    shape = c.shape(param) if param else None
    if not param or shape is None or len(shape) == 0 or (len(shape) == 1 and shape[0] == 1):
        return
    if len(shape) == 1 and shape[0] == size:
        c.producer(y, y_axis, param, 0)
    else:
        c.freeze(param, reason="zero point of unexpected shape")


@rule("MatMulInteger")
def matmul_integer(node, c):
    """Like MatMul with a constant int8 B: K is contracted, N is produced; b_zero_point (per column) goes with N, a_zero_point stays a scalar."""
    a, b = node.input[0], node.input[1]
    a_zp = node.input[2] if len(node.input) > 2 else ""
    b_zp = node.input[3] if len(node.input) > 3 else ""
    _matmul_rule(_Renamed(node, [a, b]), c)
    if c.const(b) is not None and a_zp:
        c.mask_fill(a, a_zp)
    bs, y = c.shape(b), node.output[0]
    if bs is not None and len(bs) == 2 and c.rank(y):
        _per_channel(c, b_zp, y, c.rank(y) - 1, bs[1])
    if a_zp:
        c.not_channel(a_zp)


@rule("ConvInteger")
def conv_integer(node, c):
    """Like Conv on uint8/int8 inputs: output channels are weight rows, input channels weight columns; w_zero_point (per output channel) goes with the rows."""
    x, w = node.input[0], node.input[1]
    x_zp = node.input[2] if len(node.input) > 2 else ""
    w_zp = node.input[3] if len(node.input) > 3 else ""
    _conv_rule(_Renamed(node, [x, w]), c)
    ws = c.shape(w)
    if x_zp:
        c.mask_fill(x, x_zp)
        c.not_channel(x_zp)
    if ws is not None:
        _per_channel(c, w_zp, node.output[0], 1, ws[0])


@rule("DynamicQuantizeLSTM", domain="com.microsoft")
def dynamic_quantize_lstm(node, c):
    """An LSTM whose W [dirs, input, 4H] and R [dirs, H, 4H] are int8 (transposed against ONNX's LSTM), with per-tensor or per-gate-row scales and zero points; hidden unit h owns its gate columns, row h of R and slot h of the states."""
    gates = 4
    hidden = c.attr("hidden_size")
    inputs = list(node.input) + [""] * (12 - len(node.input))
    x, w, r, b, seq_lens, h0, c0, p, w_scale, w_zp, r_scale, r_zp = inputs[:12]
    if c.const(w) is None or c.const(r) is None or hidden is None:
        c.freeze_all("recurrent weights are not constant")
        return
    unit = c.virtual(hidden, "hidden")
    cols = np.arange(gates * hidden)
    c.role(w, "weight")
    c.role(r, "weight")
    c.link(w, 2, unit, 0, cols, cols % hidden)
    c.link(r, 2, unit, 0, cols, cols % hidden)
    c.link(r, 1, unit, 0)                      # the recurrent input: hidden unit h reads row h of R
    # The node quantizes its hidden state with a dynamic range, so a removed unit must be exactly 0 in the masked
    # reference, not merely unread: with its gate columns of W and R at the zero point and its bias rows at 0,
    # every gate pre-activation is 0, so g = tanh(0) = 0 and c_t = f·c_{t-1} + i·g stays 0 from c_0 = 0 (the
    # initial states are masked to 0 as inputs), hence h = o·tanh(c) = 0. Zeros never move a range that
    # includes 0, so the requantization of h is the same with and without the unit.
    c.oracle_mask(r, 1, r, 1, fill=r_zp)
    c.oracle_mask(w, 2, w, 2, fill=w_zp)
    c.oracle_mask(r, 2, r, 2, fill=r_zp)
    c.not_channel(w, [0])
    c.not_channel(r, [0])
    for scale_or_zp in (w_scale, w_zp, r_scale, r_zp):
        shape = c.shape(scale_or_zp) if scale_or_zp else None
        if shape is None:
            continue
        if len(shape) == 2 and shape[1] == gates * hidden:
            c.link(scale_or_zp, 1, unit, 0, cols, cols % hidden)
            c.not_channel(scale_or_zp, [0])
        else:
            c.not_channel(scale_or_zp)
    if b:
        brows = np.arange(2 * gates * hidden)
        c.role(b, "bias")
        c.link(b, 1, unit, 0, brows, brows % hidden)
        c.not_channel(b, [0])
        c.oracle_mask(b, 1, b, 1)
    if p:
        prow = np.arange(3 * hidden)
        c.link(p, 1, unit, 0, prow, prow % hidden)
        c.not_channel(p, [0])
        c.oracle_mask(p, 1, p, 1)
    c.consumer(x, 2, w, 1)
    outs = list(node.output) + [""] * (3 - len(node.output))
    y, y_h, y_c = outs[:3]
    if y:  # Y [seq, dirs, batch, hidden]
        c.link(y, 3, unit, 0)
        c.not_channel(y, [1])
        c.link(x, 0, y, 0)
        c.link(x, 1, y, 2)
    for state in (y_h, y_c, h0, c0):
        if state:
            c.link(state, 2, unit, 0)
            c.not_channel(state, [0])
            c.link(x, 1, state, 1)
    if seq_lens:
        c.not_channel(seq_lens)

    def fix(rw, node):
        rw.set_attr(node, "hidden_size", int(rw.new_shape(node.input[2])[1]))
    c.fixup(fix)
