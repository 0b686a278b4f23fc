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
from .rnn import link_gates


class _Renamed:
    """A view of a node with another input list, so the float rules (Conv, MatMul) can declare the layout."""

    def __init__(self, node, inputs):
        self._node = node
        self.input = inputs
        self.output = node.output

    def __getattr__(self, name):
        return getattr(self._node, name)


def _saturating_pairs(c, weight, axis, reason_node=""):
    """Remove the contracted channels of a u8 x s8 product in aligned pairs (2i, 2i+1) when the int8 weight can
    saturate onnxruntime's kernel.

    On x86 without VNNI, MLAS multiplies uint8 activations by int8 weights with VPMADDUBSW: the products of
    adjacent K entries (2i, 2i+1) are summed into a saturating int16 before the int32 accumulation. |u8·s8| is at
    most 255·|w|, so a pair overflows 32767 only when some |w| >= 65 (2·255·64 = 32640 fits): onnxruntime's
    quantize_dynamic writes such weights for LSTM (full int8 range; its MatMul/Gemm weights use reduce_range,
    7 bits, and never saturate). Which pairs saturate depends on which entries share a pair, so removing an
    unpaired K entry re-pairs every later one and the pruned model saturates elsewhere than the masked original
    (measured: a two-layer DynamicQuantizeLSTM classifier 2-7e-3 off its masked reference on AVX2). Removing
    whole aligned pairs keeps every surviving pair intact, and a removed pair reads (zero point)·0 in the masked
    reference (its weight rows are set to the weight zero point), which cannot saturate. So with such a weight
    K is removed two channels at a time; otherwise nothing is added."""
    arr = c.const(weight)
    shape = c.shape(weight)
    if arr is None or arr.dtype != np.int8 or shape is None or not isinstance(shape[axis], int):
        return False
    if int(np.abs(arr.astype(np.int16)).max(initial=0)) <= 64:
        return False
    k = shape[axis]
    pair = c.virtual((k + 1) // 2, "u8s8_pair")
    c.link(weight, axis, pair, 0, np.arange(k), np.arange(k) // 2)
    return True



def _mask_weight_rows(c, b, b_zp, a):
    """The masked reference sets the removed K rows of b to its zero point, so a removed pair adds 0·(a_zp) and
    cannot saturate either. Only for a per-tensor zero point: a per-column one cannot be told from a per-row one
    when b is square."""
    zp_shape = c.shape(b_zp) if b_zp else ()
    if zp_shape is not None and int(np.prod(zp_shape)) == 1 and c.rank(a):
        c.oracle_mask(b, 0, a, c.rank(a) - 1, fill=b_zp)


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
    a, b, a_zp, b_zp = (list(node.input) + ["", ""])[:4]
    _matmul_rule(_Renamed(node, [a, b]), c)
    if c.const(b) is not None and a_zp:
        c.mask_fill(a, a_zp)
    if c.const(b) is not None and c.rank(b) == 2 and _saturating_pairs(c, b, 0):
        _mask_weight_rows(c, b, b_zp, a)
    bs, y = c.shape(b), node.output[0]
    if bs is not None and len(bs) == 2 and c.rank(y):
        _per_channel(c, b_zp, y, c.rank(y) - 1, bs[1])
    if a_zp:
        c.not_channel(a_zp)


@rule("ConvInteger")
def conv_integer(node, c):
    """Like Conv on uint8/int8 inputs: output channels are weight rows, input channels weight columns; w_zero_point (per output channel) goes with the rows."""
    x, w, x_zp, w_zp = (list(node.input) + ["", ""])[:4]
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
    unit = link_gates(c, w, r, hidden, gates, gate_axis=2, recurrent_axis=1)
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
    # The node multiplies its uint8-quantized input and hidden state by int8 W and R: keep the pairs of both
    # contracted axes (input channels, hidden units) intact, see _saturating_pairs.
    if _saturating_pairs(c, w, 1):
        c.oracle_mask(w, 1, x, 2, fill=w_zp)
    _saturating_pairs(c, r, 1)
    for scale_or_zp in (w_scale, w_zp, r_scale, r_zp):
        shape = c.shape(scale_or_zp) if scale_or_zp else None
        if shape is None:
            continue
        if len(shape) == 2 and shape[1] == gates * hidden:   # per gate column, like W's and R's gate axis
            cols = np.arange(gates * hidden)
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


def _scalar_params(c, *names):
    """Per-tensor scales and zero points (rank 0, or one element): they belong to no channel."""
    for name in names:
        shape = c.shape(name) if name else None
        if shape is not None and all(d == 1 for d in shape):
            c.not_channel(name)
        elif name and shape is not None:
            c.freeze(name, reason="activation scale or zero point is not per tensor")


@rule("QLinearConv")
def qlinear_conv(node, c):
    """Conv on quantized tensors, requantized to y_scale/y_zp: output channels are weight rows (with per-channel
    w_scale, w_zp and the int32 bias), input channels weight columns.

    x is read as (x - x_zp): a removed input channel must be x_zp in the masked reference (`mask_fill`), so it
    adds nothing, exactly as in the pruned conv that no longer has it. A removed output channel is requantized to
    some uint8 value in the masked original; every reader of it masks it on its own side: a quantized consumer
    (QLinearConv, QLinearMatMul, ...) with its own x_zp fill, a DequantizeLinear through the float consumers of
    its output, which are masked with 0."""
    inputs = list(node.input) + [""] * (9 - len(node.input))
    x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias = inputs[:9]
    _conv_rule(_Renamed(node, [x, w, bias] if bias else [x, w]), c)
    _scalar_params(c, x_scale, x_zp, y_scale, y_zp)
    c.mask_fill(x, x_zp)
    ws = c.shape(w)
    if ws is not None:
        for param in (w_scale, w_zp):
            if c.shape(param) is not None and all(d == 1 for d in c.shape(param)):
                c.not_channel(param)
            else:
                _per_channel(c, param, node.output[0], 1, ws[0])


@rule("QLinearMatMul")
def qlinear_matmul(node, c):
    """MatMul on quantized tensors, requantized to y_scale/y_zp: like MatMul (a constant b is a weight whose
    columns are output channels, with their per-column b_scale/b_zp). Both operands are read as (v - zp), so a
    removed K channel reads its zero point in the masked reference and contributes (zp - zp)·w = 0."""
    inputs = list(node.input) + [""] * (8 - len(node.input))
    a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp = inputs[:8]
    _matmul_rule(_Renamed(node, [a, b]), c)
    _scalar_params(c, a_scale, a_zp, y_scale, y_zp)
    c.mask_fill(a, a_zp)
    c.mask_fill(b, b_zp)
    if c.const(b) is not None and c.rank(b) == 2 and _saturating_pairs(c, b, 0):
        _mask_weight_rows(c, b, b_zp, a)
    bs, y = c.shape(b), node.output[0]
    for param in (b_scale, b_zp):
        shape = c.shape(param) if param else None
        if shape is not None and all(d == 1 for d in shape):
            c.not_channel(param)
        elif c.const(b) is not None and bs is not None and len(bs) == 2 and c.rank(y):
            _per_channel(c, param, y, c.rank(y) - 1, bs[1])
        elif param:
            c.freeze(param, reason="per-column quantization of an activation operand")


def _unpack(packed: np.ndarray, bits: int, rows: int, count: int) -> np.ndarray:
    """MatMulNBits' packed zero points: row-major [rows, ceil(count·bits/8)] bytes, value j of a row in byte
    j // (8/bits) at bit offset (j mod (8/bits))·bits (low bits first)."""
    per = 8 // bits
    data = packed.reshape(rows, -1).astype(np.uint8)
    j = np.arange(count)
    return (data[:, j // per] >> ((j % per) * bits).astype(np.uint8)) & np.uint8((1 << bits) - 1)


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    rows, count = values.shape
    out = np.zeros((rows, -(-count // per)), np.uint8)
    for j in range(count):
        out[:, j // per] |= (values[:, j].astype(np.uint8) << np.uint8((j % per) * bits))
    return out


@rule("MatMulNBits", domain="com.microsoft")
def matmul_nbits(node, c):
    """onnxruntime's blockwise-quantized MatMul: Y = A [..., K] · dequant(B)ᵀ with B [N, n_blocks, blob] packed
    `bits`-bit values, one scale (and zero point) per (row n, block) in scales [N·n_blocks] or [N, n_blocks].

    N (output columns) is B's rows: exact, with the bias and each row's scales/zero points. K prunes only in whole
    blocks: A's channel k belongs to block k // block_size, so a group removes the block's every channel or none;
    the masked reference reads those channels as 0, which adds 0·w whatever w dequantizes to, and the pruned
    node no longer reads the block. Scales and zero points are indexed by (row, block) at once, so they are not
    linked (one element in two groups would merge them) but rebuilt by the fixup from the kept rows and blocks."""
    inputs = list(node.input) + [""] * (6 - len(node.input))
    a, b, scales, zp, g_idx, bias = inputs[:6]
    y = node.output[0]
    k_dim, n_dim, bits, block = (c.attr("K"), c.attr("N"), c.attr("bits", 4), c.attr("block_size"))
    bshape, ra, ry = c.shape(b), c.rank(a), c.rank(y)
    if bshape is None or ra is None or ry is None or k_dim is None or n_dim is None or not block \
            or c.const(b) is None or c.const(scales) is None or len(bshape) != 3 or bshape[0] != n_dim:
        c.freeze_all("packed weight or its attributes are not static")
        return
    n_blocks = bshape[1]
    c.role(b, "weight")
    c.producer(y, ry - 1, b, 0)
    c.not_channel(b, [2])
    for ax in range(ra - 1):
        c.link(a, ax, y, ax)
    if bias:
        c.role(bias, "bias")
        c.producer(y, ry - 1, bias, 0)
    for param in (scales, zp):
        c.not_channel(param)  # rebuilt by the fixup
    zp_arr = c.const(zp)
    why = None
    if g_idx:
        why = "g_idx reorders input channels across blocks"
    elif zp and zp_arr is None:
        why = "zero points are not constant"
    elif zp_arr is not None and zp_arr.dtype == np.uint8 and 8 % bits:
        why = f"zero points packed at {bits} bits"
    elif -(-k_dim // block) != n_blocks:
        why = f"K={k_dim} does not fill {n_blocks} blocks of {block}"
    if why:
        c.freeze(a, ra - 1, reason=f"input channels: {why}")
        c.freeze(b, 1, reason=f"input channels: {why}")
    else:
        k = np.arange(k_dim)
        c.link(a, ra - 1, b, 1, k, k // block)

    def fix(rw, node):
        gone_n, gone_blk = rw.removed(b, 0), rw.removed(b, 1)
        new_n = n_dim - len(gone_n)
        new_k = k_dim - len(rw.removed(a, ra - 1))
        rw.set_attr(node, "N", int(new_n))
        rw.set_attr(node, "K", int(new_k))
        for index, param in ((2, scales), (3, zp)):
            arr = rw.graph.const(param) if param else None
            if arr is None:
                continue
            packed = param == zp and arr.dtype == np.uint8  # float zero points come unpacked, like scales
            grid = _unpack(arr, bits, n_dim, n_blocks) if packed else arr.reshape(n_dim, n_blocks)
            grid = np.delete(np.delete(grid, gone_n, axis=0), gone_blk, axis=1)
            out = _pack(grid, bits) if packed else grid
            rw.set_const_input(node, index, out.reshape(-1) if arr.ndim == 1 else out.reshape(new_n, -1))
    c.fixup(fix)
