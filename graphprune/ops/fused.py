"""onnxruntime's fused transformer ops (com.microsoft): what `onnxruntime.transformers.optimizer` and exporters
targeting onnxruntime leave in BERT / GPT-2 / Llama-style graphs.

Heads. A fused attention op splits its Q, K and V widths into `num_heads` equal heads of `head_size` channels
(channel h·d + j is element j of head h) and the kernel derives head_size = width / num_heads. A removal must
keep every head the same size, so a channel is coupled to a virtual axis and removed from every head at once:
  head_dim (default)   element j of every head (num_heads stays; Q/K/V widths shrink by num_heads each)
  whole_heads          every element of head h (num_heads shrinks; head_size stays)
Q and K channels are contracted against each other (QKᵀ) and so share one virtual axis; V's channels are the
output's. Inside the op the softmax scale is 1/sqrt(head_size): a head_dim removal changes head_size, so the
fixup writes the ORIGINAL scale into the op's `scale` attribute, which keeps the masked original exact (a
removed Q/K element contributes 0 to every score, and the scale is the same number).

The masked original zeroes a removed channel where a node reads it. For ops whose Q/K/V are activations
(MultiHeadAttention, GroupQueryAttention, RotaryEmbedding) that is the op's input; where the op adds a constant
bias (or projects with a constant weight, Attention) inside, the removed bias entries / weight columns are
zeroed in the masked original too (`oracle_mask`), as a standard-op graph would see them.

EmbedLayerNormalization sums three embedding lookups and normalises the sum over the hidden axis: a removed
channel is zeroed in the embedding tables of the masked original (the sum never exists as a tensor) and the
node is rewritten into Gathers plus standard ops whose statistics divide by the original width
(ops/layernorm.py), which is what the masked original computes.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper

from ..rules import Producer, rule
from .layernorm import FLOATS, Emitter, decompose_layer_norm


def _args(node, n):
    return list(node.input) + [""] * (n - len(node.input))


def _outs(node, n):
    return list(node.output) + [""] * (n - len(node.output))


def _freeze_width(c, members, reason):
    """Freeze (tensor, axis) pairs, skipping absent tensors."""
    for name, axis in members:
        if name:
            c.freeze(name, axis, reason=reason)


def _head_map(c, size: int, heads: int, tag: str):
    """A virtual axis for the channels of a width `size` split into `heads` heads, and the map channel ->
    virtual index: element j of every head (head_dim) or head h (whole_heads)."""
    d = size // heads
    cols = np.arange(size)
    if c.whole_heads:
        return c.virtual(heads, f"{tag}_heads"), cols // d
    return c.virtual(d, f"{tag}_head_dim"), cols % d


def _name(node):
    return node.name or node.op_type


# ---- Attention ---------------------------------------------------------------------------------------------
@rule("Attention", domain="com.microsoft")
def attention(node, c):
    """Q/K/V projection and attention in one node. The input's hidden axis is contracted against the weight rows
    (a consumer: removing input channels slices rows); the weight columns and bias hold Q | K | V, each split into
    num_heads heads, and V's channels are the output's. Head channels go uniformly across heads (or whole heads
    with whole_heads); qkv_hidden_sizes, the explicit scale (and num_heads) are rewritten."""
    x, w, bias, mask, past, attn_bias, past_len = _args(node, 7)[:7]
    y, present = _outs(node, 2)[:2]
    weights = c.const(w)
    xs = c.shape(x)
    if weights is None or weights.ndim != 2 or xs is None or len(xs) != 3:
        c.freeze_all("Attention: the weights are not a constant matrix or the input is not [batch, seq, hidden]")
        return
    c.role(w, "weight")
    c.role(bias, "bias")
    c.link(x, 0, y, 0)
    c.not_channel(x, [1])
    c.not_channel(y, [1])
    c.consumer(x, 2, w, 0)
    for extra in (mask, past_len):
        c.not_channel(extra)
    total = weights.shape[1]
    heads = c.attr("num_heads")
    sizes = list(c.attr("qkv_hidden_sizes") or [])
    if not sizes and total % 3 == 0:
        sizes = [total // 3] * 3
    head_side = [(w, 1), (bias, 0), (y, 2), (present, None), (past, None), (attn_bias, None)]
    why = None
    if not isinstance(heads, int) or heads <= 0 or len(sizes) != 3 or sum(sizes) != total \
            or sizes[0] != sizes[1] or any(s % heads for s in sizes):
        why = "num_heads / qkv_hidden_sizes do not split the weight columns into equal heads"
    elif past or present or c.attr("past_present_share_buffer", 0):
        why = "a past/present key-value state holds the heads (head layout not mapped)"
    elif c.attr("do_rotary", 0):
        why = "rotary embedding inside the node pairs head channels (not mapped)"
    elif bias and c.const(bias) is None:
        why = "the bias is not a constant"
    elif c.shape(y) is None or c.shape(y)[-1] != sizes[2]:
        why = "output width unknown"
    if why:
        _freeze_width(c, head_side, f"Attention head channels: {why}")
        return
    dq, dk, dv = sizes
    qk, qk_of = _head_map(c, dq, heads, "qk")
    v, v_of = _head_map(c, dv, heads, "v")
    col = np.arange(total)
    qk_cols, v_cols = col[:dq + dk], col[dq + dk:]
    qk_idx = np.concatenate([qk_of, qk_of])
    for t, ax in ((w, 1), (bias, 0)):
        if t:
            c.link(t, ax, qk, 0, qk_cols, qk_idx)
            c.link(t, ax, v, 0, v_cols, v_of)
            c.oracle_mask(t, ax, t, ax)  # the masked original drops the removed Q/K/V columns inside the node
    c.link(y, 2, v, 0, np.arange(dv), v_of)
    c.producers.append(Producer(node.name, y, 2, w, 1))  # names the output's group after this node
    if attn_bias:  # [batch or 1, heads or 1, seq, total seq]: added per head to the scores
        ab = c.shape(attn_bias)
        if c.whole_heads and ab is not None and len(ab) == 4 and ab[1] == heads and heads > 1:
            hv = c.virtual(heads, "bias_heads")
            c.link(attn_bias, 1, hv, 0)
            c.link(hv, 0, qk, 0)
            c.link(hv, 0, v, 0)
            c.not_channel(attn_bias, [0, 2, 3])
        else:
            c.not_channel(attn_bias)
    whole = c.whole_heads
    scale = float(c.attr("scale", 1.0 / math.sqrt(dq // heads)))

    def fix(rw, node):
        gone = rw.removed(node.input[1], 1)
        new = [dq - int(np.sum(gone < dq)), dk - int(np.sum((gone >= dq) & (gone < dq + dk))),
               dv - int(np.sum(gone >= dq + dk))]
        if new == [dq, dk, dv]:
            return
        rw.set_attr(node, "qkv_hidden_sizes", new)
        rw.set_attr(node, "scale", scale)
        if whole:
            rw.set_attr(node, "num_heads", new[0] // (dq // heads))
    c.fixup(fix)


# ---- EmbedLayerNormalization ---------------------------------------------------------------------------------
@rule("EmbedLayerNormalization", domain="com.microsoft")
def embed_layer_norm(node, c):
    """LayerNorm(word[ids] + position[pos] + segment[seg]) over the hidden axis: the tables' columns, gamma, beta
    and the output's hidden axis go together. The masked original zeroes the removed table columns (the sum is
    internal), and the node is rewritten into Gathers + a LayerNorm whose statistics divide by the original
    width (ops/layernorm.py), so the pruned model equals it exactly."""
    ids, segs, word, pos_table, seg_table, gamma, beta, mask, pos_ids = _args(node, 9)[:9]
    y, mask_index, esum = _outs(node, 3)[:3]
    tables = [t for t in (word, pos_table, seg_table) if t]
    params = [p for p in (gamma, beta) if p]
    ys = c.shape(y)
    why = None
    if any(c.const(t) is None or c.rank(t) != 2 for t in tables) or any(c.const(p) is None for p in params):
        why = "the embedding tables or the norm parameters are not constants"
    elif ys is None or len(ys) != 3 or not isinstance(ys[2], int) or c.dtype(word) not in FLOATS:
        why = "the output width is not static or not a float tensor"
    elif not pos_ids and c.graph.opset("") < 11:
        why = "the position lookup needs opset 11 (Slice with inputs) for the rewrite"
    if why:
        c.freeze_all(f"EmbedLayerNormalization: {why}")
        return
    for t in (ids, segs, mask, pos_ids, mask_index):
        c.not_channel(t)
    c.not_channel(y, [0, 1])
    if esum:
        c.not_channel(esum, [0, 1])
        c.link(esum, 2, y, 2)
    for t in tables:
        c.role(t, "weight")
        c.not_channel(t, [0])
        c.producer(y, 2, t, 1)
        c.oracle_mask(t, 1, t, 1)  # the masked original's internal sum has the removed channels at 0
    for p, role in zip((gamma, beta), ("norm_scale", "norm_bias")):
        if p:
            c.role(p, role)
            c.producer(y, 2, p, 0)
    epsilon = float(c.attr("epsilon", 1e-12))
    c.fixup(lambda rw, node: _decompose_embed_layer_norm(rw, node, epsilon))


class _Standing:
    """The rewriter as decompose_layer_norm sees it for a synthetic LayerNormalization whose input `alias` (a
    new tensor) stands for `like` (the same channels removed); it collects the replacement instead of splicing."""

    def __init__(self, rw, alias: str, like: str):
        self._rw, self._alias, self._like = rw, alias, like
        self.nodes: list[onnx.NodeProto] = []

    def __getattr__(self, name):
        return getattr(self._rw, name)

    def removed(self, name, axis):
        return self._rw.removed(self._like if name == self._alias else name, axis)

    def old_shape(self, name):
        return self._rw.old_shape(self._like if name == self._alias else name)

    def replace_node(self, node, nodes):
        self.nodes = list(nodes)


def _decompose_embed_layer_norm(rw, node, epsilon: float) -> None:
    ids, segs, word, pos_table, seg_table, gamma, beta, mask, pos_ids = _args(node, 9)[:9]
    y, mask_index, esum = _outs(node, 3)[:3]
    if not len(rw.removed(y, 2)):
        return
    elem = rw.graph.dtypes[word]
    e = Emitter(rw, node, elem)
    total = e.op("Gather", [word, ids])
    if pos_ids:
        positions = e.op("Gather", [pos_table, pos_ids])
    else:  # rows 0 .. seq-1 of the position table
        seq = e.op("Gather", [e.op("Shape", [ids]), rw.add_const(f"{e.base}/seq_axis", np.array([1], np.int64))])
        positions = e.op("Slice", [pos_table, rw.add_const(f"{e.base}/zero", np.array([0], np.int64)), seq,
                                   rw.add_const(f"{e.base}/rows", np.array([0], np.int64))])
    total = e.op("Add", [total, positions])
    if seg_table and segs:
        total = e.op("Add", [total, e.op("Gather", [seg_table, segs])])
    if esum:
        e.nodes[-1].output[0] = esum
        total = esum
    if mask_index:
        if mask:  # the number of 1s per row, as int32
            ones = e.op("Equal", [mask, rw.add_const(f"{e.base}/one", np.array(1, np.int32))])
            count = e.op("Cast", [ones], to=onnx.TensorProto.INT32)
            if rw.graph.opset("") >= 13:
                e.op("ReduceSum", [count, rw.add_const(f"{e.base}/axis1", np.array([1], np.int64))], mask_index,
                     keepdims=0)
            else:
                e.op("ReduceSum", [count], mask_index, axes=[1], keepdims=0)
        else:  # zeros, one per batch row
            batch = e.op("Gather", [e.op("Shape", [ids]), rw.add_const(f"{e.base}/batch_axis",
                                                                        np.array([0], np.int64))])
            e.op("ConstantOfShape", [batch], mask_index,
                 value=helper.make_tensor("zero", onnx.TensorProto.INT32, [1], [0]))
    ln = helper.make_node("LayerNormalization", [total, gamma] + ([beta] if beta else []), [y],
                          name=f"{_name(node)}/layer_norm")
    view = _Standing(rw, total, y)
    had = total in rw.graph.dtypes
    rw.graph.dtypes.setdefault(total, elem)
    try:
        decompose_layer_norm(view, ln, epsilon, 1, rms=False, inv_std_output=None, mean_output=None)
    finally:
        if not had:
            del rw.graph.dtypes[total]
    rw.replace_node(node, e.nodes + view.nodes)
