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


def _batch_and_sequence(c, qkv, y, index_inputs):
    """What MultiHeadAttention and GroupQueryAttention share: [B, S, D] inputs pass their batch to the output, the
    sequence axes and the length/position/mask index inputs are not channels. Returns the shapes of q, k, v, y."""
    for t in qkv:
        if t and c.rank(t) == 3:
            c.link(t, 0, y, 0)
            c.not_channel(t, [1])
    c.not_channel(y, [1])
    for t in index_inputs:
        c.not_channel(t)
    return [c.shape(t) for t in (*qkv, y)]


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
    if c.whole_heads:  # a head's scores weigh its values: Q, K and V of a head go together
        c.link(qk, 0, v, 0)
    _per_head_scores(c, attn_bias, heads, qk, v)
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


def _per_head_scores(c, t, heads, qk, v):
    """A [batch or 1, heads or 1, seq, total seq] tensor added to (or read from) the scores per head: its head axis
    goes with whole heads; with head_dim it is not a channel (each head keeps its scores)."""
    if not t:
        return
    shape = c.shape(t)
    if c.whole_heads and shape is not None and len(shape) == 4 and shape[1] == heads and heads > 1:
        c.link(t, 1, qk, 0)
        c.link(t, 1, v, 0)
        c.not_channel(t, [0, 2, 3])
    else:
        c.not_channel(t)


def _scale_fixup(c, q_name: str, q_width: int, heads: int, extra=None):
    """After Q channels went: keep the original softmax scale explicit; with whole heads, rewrite num_heads."""
    head = q_width // heads
    scale = float(c.attr("scale", 1.0 / math.sqrt(head)))
    whole = c.whole_heads

    def fix(rw, node):
        gone = len(rw.removed(q_name, -1))
        if not gone:
            return
        rw.set_attr(node, "scale", scale)
        if whole:
            rw.set_attr(node, "num_heads", (q_width - gone) // head)
        if extra is not None:
            extra(rw, node)
    c.fixup(fix)


# ---- MultiHeadAttention --------------------------------------------------------------------------------------
@rule("MultiHeadAttention", domain="com.microsoft")
def multi_head_attention(node, c):
    """Attention over projected query [B, S, D], key [B, L, D] and value [B, L, Dv]: query and key channels are
    contracted (QKᵀ) and go together, value channels are the output's; both uniformly across heads (or whole
    heads). An optional bias [D | D | Dv] is added inside: its removed entries are zeroed in the masked original."""
    q, k, v, bias, kpm, attn_bias, past_k, past_v, past_len, cache_ind = _args(node, 10)[:10]
    y, present_k, present_v, qk_out = _outs(node, 4)[:4]
    heads = c.attr("num_heads")
    shapes = _batch_and_sequence(c, (q, k, v), y, (kpm, past_len, cache_ind))
    why = None
    if not k or not v or any(s is None or len(s) != 3 for s in shapes):
        why = "packed QKV/KV or [batch, heads, seq, head_size] key/value layouts are not mapped"
    elif past_k or past_v or present_k or present_v:
        why = "a past/present key-value state holds the heads (head layout not mapped)"
    elif not isinstance(heads, int) or heads <= 0 or shapes[0][2] != shapes[1][2] \
            or not all(isinstance(s[2], int) and s[2] % heads == 0 for s in shapes[:3]) or shapes[3][2] != shapes[2][2]:
        why = "num_heads does not split the query/key/value widths into equal heads"
    elif bias and (c.const(bias) is None or c.shape(bias)[0] != 2 * shapes[0][2] + shapes[2][2]):
        why = "the bias is not a constant [hidden + hidden + v_hidden] vector"
    if why:
        _freeze_width(c, [(q, 2), (k, 2), (v, 2), (y, 2), (bias, 0), (past_k, None), (past_v, None),
                          (present_k, None), (present_v, None), (attn_bias, None), (qk_out, None)],
                      f"MultiHeadAttention head channels: {why}")
        return
    dq, dv = shapes[0][2], shapes[2][2]
    qk, qk_of = _head_map(c, dq, heads, "qk")
    vv, v_of = _head_map(c, dv, heads, "v")
    c.contraction(q, 2, k, 2)
    c.link(q, 2, qk, 0, np.arange(dq), qk_of)
    c.link(v, 2, y, 2)
    c.link(v, 2, vv, 0, np.arange(dv), v_of)
    if bias:
        c.role(bias, "bias")
        c.link(bias, 0, qk, 0, np.arange(2 * dq), np.concatenate([qk_of, qk_of]))
        c.link(bias, 0, vv, 0, np.arange(2 * dq, 2 * dq + dv), v_of)
        c.oracle_mask(bias, 0, bias, 0)
    if c.whole_heads:  # the scores of a head go with it
        c.link(qk, 0, vv, 0)
    _per_head_scores(c, attn_bias, heads, qk, vv)
    _per_head_scores(c, qk_out, heads, qk, vv)
    _scale_fixup(c, q, dq, heads)


# ---- GroupQueryAttention ---------------------------------------------------------------------------------------
_GQA_QUANTUM = 8  # onnxruntime's GroupQueryAttention wants head_size % 8 == 0 (% 16 with rotary)


@rule("GroupQueryAttention", domain="com.microsoft")
def group_query_attention(node, c):
    """num_heads query heads share kv_num_heads key/value heads of one head_size. head_dim: element j of every
    q/k/v head and of the KV state goes together, in blocks that keep head_size a multiple of 8 (16 with rotary,
    whose pairs (j, j + d/2) or (2i, 2i + 1) and cos/sin columns stay together). whole_heads: a key/value head
    goes with the query heads that read it; num_heads and kv_num_heads are rewritten."""
    args = _args(node, 17)
    q, k, v, past_k, past_v, seqlens, total_len, cos, sin, pos_ids, attn_bias, sink = args[:12]
    k_scale, v_scale, q_norm, k_norm, query_lens = args[12:17]
    y, present_k, present_v, qk_out = _outs(node, 4)[:4]
    heads, kv_heads = c.attr("num_heads"), c.attr("kv_num_heads")
    rotary = bool(c.attr("do_rotary", 0))
    shapes = _batch_and_sequence(c, (q, k, v), y, (seqlens, total_len, pos_ids, query_lens))
    for t in (cos, sin):
        c.not_channel(t, [0])
    for t in (past_k, past_v, present_k, present_v):
        if t and c.rank(t) == 4:
            c.link(t, 0, y, 0)
            c.not_channel(t, [2])
    why = None
    whole = c.whole_heads
    if not k or not v or any(s is None or len(s) != 3 or not isinstance(s[2], int) for s in shapes):
        why = "a packed QKV input or unknown widths are not mapped"
    elif not isinstance(heads, int) or not isinstance(kv_heads, int) or heads <= 0 or kv_heads <= 0 \
            or heads % kv_heads or shapes[0][2] % heads:
        why = "num_heads / kv_num_heads do not split the widths into equal heads"
    elif k_scale or v_scale or c.attr("kv_cache_bit_width", 0):
        why = "a quantized key-value cache is not mapped"
    d = shapes[0][2] // heads if why is None else 0
    if why is None and (shapes[1][2] != kv_heads * d or shapes[2][2] != kv_heads * d or shapes[3][2] != heads * d):
        why = "query, key, value and output heads differ in size"
    if why is None and not whole:
        rot = c.shape(cos)[1] * 2 if rotary and cos and c.shape(cos) is not None else None
        if q_norm or k_norm:
            why = "a per-head RMS norm of Q and K runs over head_size (statistics would change)"
        elif rotary and rot != d:
            why = "rotary embedding over part of head_size is not mapped"
    if why:
        _freeze_width(c, [(q, 2), (k, 2), (v, 2), (y, 2), (past_k, None), (past_v, None), (present_k, None),
                          (present_v, None), (cos, 1), (sin, 1), (attn_bias, None), (sink, None), (qk_out, None),
                          (q_norm, None), (k_norm, None)],
                      f"GroupQueryAttention head channels: {why}")
        return
    ratio = heads // kv_heads
    j = np.arange(d)
    if whole:
        unit = c.virtual(kv_heads, "kv_heads")
        q_of = np.arange(heads * d) // d // ratio
        kv_of = np.arange(kv_heads * d) // d
        for t in (past_k, past_v, present_k, present_v):
            if t:
                c.link(t, 1, unit, 0)
                c.not_channel(t, [3])
        for t in (cos, sin):
            c.not_channel(t, [1])
        for t in (q_norm, k_norm):
            c.not_channel(t)
        for t in (attn_bias, qk_out):  # [batch or 1, num_heads or 1, seq, total seq]
            if t and c.rank(t) == 4 and c.shape(t)[1] == heads and heads > 1:
                c.link(t, 1, unit, 0, np.arange(heads), np.arange(heads) // ratio)
                c.not_channel(t, [0, 2, 3])
            else:
                c.not_channel(t)
        if sink:
            c.link(sink, 0, unit, 0, np.arange(heads), np.arange(heads) // ratio)
    else:
        # blocks of channels whose removal keeps head_size a multiple of the kernel's quantum
        if rotary and c.attr("rotary_interleaved", 0):
            block = j // (2 * _GQA_QUANTUM)  # pairs (2i, 2i+1), 8 pairs a block
        elif rotary:
            block = (j % (d // 2)) // _GQA_QUANTUM  # pairs (j, j + d/2), 8 pairs a block
        else:
            block = j // _GQA_QUANTUM
        unit = c.virtual(int(block.max()) + 1, "head_dim_blocks")
        q_of, kv_of = np.tile(block, heads), np.tile(block, kv_heads)
        for t in (past_k, past_v, present_k, present_v):
            if t:
                c.link(t, 3, unit, 0, j, block)
                c.not_channel(t, [1])
        for t in (cos, sin):  # column i rotates pair i
            if t:
                half = np.arange(d // 2)
                c.link(t, 1, unit, 0, half, block[2 * half] if c.attr("rotary_interleaved", 0) else block[half])
        for t in (attn_bias, qk_out, sink):
            c.not_channel(t)
    c.link(q, 2, unit, 0, np.arange(heads * d), q_of)
    c.link(y, 2, unit, 0, np.arange(heads * d), q_of)
    c.link(k, 2, unit, 0, np.arange(kv_heads * d), kv_of)
    c.link(v, 2, unit, 0, np.arange(kv_heads * d), kv_of)

    def fix_heads(rw, node):
        rw.set_attr(node, "kv_num_heads", rw.new_shape(node.input[1])[2] // d)
    _scale_fixup(c, q, heads * d, heads, fix_heads if whole else None)


# ---- RotaryEmbedding -------------------------------------------------------------------------------------------
def _rotary_partner(rot: int, interleaved: bool) -> np.ndarray:
    """For the first `rot` channels of a head: the channel each is rotated with."""
    j = np.arange(rot)
    return j ^ 1 if interleaved else (j + rot // 2) % rot


@rule("RotaryEmbedding", domain="com.microsoft")
def rotary_embedding(node, c):
    """Rotates channel pairs of each head: (j, j + rot/2) or (2i, 2i + 1) by the angle in cos/sin column i;
    channels past rotary_embedding_dim pass through. A pair and its cos/sin column go together, the same element
    of every head of a [batch, seq, heads·head_size] input (whole heads with whole_heads)."""
    x, pos_ids, cos, sin = _args(node, 4)[:4]
    y = node.output[0]
    xs, cs = c.shape(x), c.shape(cos)
    heads_attr = c.attr("num_heads", 0)
    interleaved = bool(c.attr("interleaved", 0))
    c.not_channel(pos_ids)
    for t in (cos, sin):
        c.not_channel(t, [0])
    why = None
    if xs is None or len(xs) not in (3, 4) or cs is None or len(cs) != 2 or not isinstance(xs[-1], int) \
            or not isinstance(cs[1], int) or c.attr("is_packed_batching", 0):
        why = "the input is not [batch, seq, hidden] or [batch, heads, seq, head_size] with a static width"
    else:
        rot = 2 * cs[1]
        d = xs[3] if len(xs) == 4 else (xs[2] // heads_attr if heads_attr else rot)
        if not d or xs[-1] % d or rot > d:
            why = "num_heads / the cos cache do not split the width into heads"
        elif len(xs) == 3 and not heads_attr and rot != xs[2] and c.attr("rotary_embedding_dim", 0):
            why = "partial rotation without num_heads"
    for ax in range(c.rank(x) or 0):
        if ax != c.rank(x) - 1:
            c.link(x, ax, y, ax)
    c.not_channel(x, [1 if len(xs or ()) == 3 else 2])
    if why:
        _freeze_width(c, [(x, -1), (y, -1), (cos, 1), (sin, 1)], f"RotaryEmbedding head channels: {why}")
        return
    c.link(x, -1, y, -1)
    width = xs[-1]
    heads = width // d
    partner = _rotary_partner(rot, interleaved)
    whole = c.whole_heads and len(xs) == 3
    if whole:
        unit = c.virtual(heads, "heads")
        c.link(x, 2, unit, 0, np.arange(width), np.arange(width) // d)
        for t in (cos, sin):
            c.not_channel(t, [1])
    else:
        unit = c.virtual(d, "head_dim")
        c.link(x, -1, unit, 0, np.arange(width), np.arange(width) % d)
        c.link(unit, 0, unit, 0, np.arange(rot), partner)  # a pair goes together
        column = np.arange(rot // 2)
        for t in (cos, sin):
            if t:
                c.link(t, 1, unit, 0, column, 2 * column if interleaved else column)

    rot_attr = c.attr("rotary_embedding_dim", 0)

    def fix(rw, node):
        if rot_attr:
            rw.set_attr(node, "rotary_embedding_dim", 2 * rw.new_shape(node.input[2])[1])
        if whole and heads_attr:
            rw.set_attr(node, "num_heads", rw.new_shape(node.input[0])[2] // d)
    c.fixup(fix)
