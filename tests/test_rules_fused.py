"""onnxruntime's fused transformer ops (graphprune/ops/fused.py): each op is built with onnx.helper in the
com.microsoft domain, onnxruntime's CPU provider runs it, and pruning must equal the masked original
(verification on) while the widths really shrink: the input hidden axis, head_dim (num_heads kept, the original
softmax scale written into `scale`) or whole heads, and the embedding LayerNorm's hidden axis."""
from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.ir import attr

from helpers import GraphBuilder, prune_checked, wshape

F = TensorProto.FLOAT
MS = "com.microsoft"


class Net(GraphBuilder):
    """GraphBuilder with com.microsoft ops; models get opset 17 + com.microsoft 1."""

    def ms(self, op_type, inputs, outputs=1, **attrs):
        return self.op(op_type, inputs, outputs, domain=MS, **attrs)

    def model(self, inputs, outputs):
        def vi(spec):
            return helper.make_tensor_value_info(spec[0], spec[2] if len(spec) > 2 else F, spec[1])
        graph = helper.make_graph(self.nodes, "t", [vi(i) for i in inputs], [vi(o) for o in outputs],
                                  [numpy_helper.from_array(v, k) for k, v in self.inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
        model.ir_version = 8
        return model


def node_of(model, op_type):
    return next(n for n in model.graph.node if n.op_type == op_type)


def frozen_reasons(model, **kw):
    return [g.reason for g in graphprune.analyze_model(model, **kw).frozen_groups]


# ---- Attention ----------------------------------------------------------------------------------------------
def attention_model(heads=2, sizes=(8, 8, 8), qkv_attr=True, bias=True, mask=False, scale=None, attn_bias=None,
                    unidirectional=0):
    """x [2,5,10] -> MatMul up (10->12) -> Attention -> MatMul out (v -> 6): the attention's input channels
    (up's outputs) and its head channels can both be pruned."""
    net = Net()
    h = net.matmul("x", 10, 12, "up")
    ins = [h, net.w(12, sum(sizes), name="attn.w"), net.w(sum(sizes), name="attn.b", scale=0.5) if bias else ""]
    attrs = dict(num_heads=heads, unidirectional=unidirectional)
    if qkv_attr:
        attrs["qkv_hidden_sizes"] = list(sizes)
    if scale is not None:
        attrs["scale"] = scale
    inputs = [("x", [2, 5, 10])]
    if mask:
        ins.append("mask")
        inputs.append(("mask", [2, 5], TensorProto.INT32))
    if attn_bias is not None:
        ins += [""] * (5 - len(ins)) + [net.const(attn_bias, "attn.rel_bias")]
    a = net.ms("Attention", ins, **attrs)
    y = net.matmul(a, sizes[2], 6, "out")
    return net.model(inputs, [(y, [2, 5, 6])])


@pytest.mark.parametrize("sizes,heads", [((8, 8, 8), 2), ((8, 8, 12), 4), ((6, 6, 4), 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_attention_prunes_input_and_head_dim(sizes, heads, bias):
    """Input channels slice the weight rows; head_dim goes from every head (Q, K and V columns and bias), so
    num_heads stays, qkv_hidden_sizes shrinks and the original 1/sqrt(head_size) is written into `scale`."""
    model = attention_model(heads, sizes, bias=bias)
    pruned, report = prune_checked(model)
    dq, _, dv = sizes
    rows, cols = wshape(pruned, "attn.w")
    assert rows < 12 and wshape(pruned, "up.w") == (10, rows)
    node = node_of(pruned, "Attention")
    new = attr(node, "qkv_hidden_sizes")
    assert new[0] < dq and new[2] < dv and sum(new) == cols and wshape(pruned, "out.w")[0] == new[2]
    assert new[0] == new[1] and new[0] % heads == 0 and new[2] % heads == 0
    assert attr(node, "num_heads") == heads
    assert attr(node, "scale") == pytest.approx(1 / math.sqrt(dq // heads))
    if bias:
        assert wshape(pruned, "attn.b") == (cols,)
    assert report.verification["max_rel_diff"] < 1e-4


def test_attention_without_qkv_hidden_sizes_and_with_mask():
    """Equal Q/K/V widths need no qkv_hidden_sizes (the fixup writes it); a raw attention mask and the causal
    flag are per position, untouched."""
    model = attention_model(2, (8, 8, 8), qkv_attr=False, mask=True, unidirectional=1)
    pruned, _ = prune_checked(model)
    assert sum(attr(node_of(pruned, "Attention"), "qkv_hidden_sizes")) < 24


def test_attention_keeps_an_explicit_scale():
    model = attention_model(2, (8, 8, 8), scale=0.3)
    pruned, _ = prune_checked(model)
    assert attr(node_of(pruned, "Attention"), "scale") == pytest.approx(0.3)


def test_attention_whole_heads():
    """whole_heads=True removes whole heads: head_size stays, num_heads and the per-head attention bias shrink."""
    rel = np.random.default_rng(3).standard_normal((1, 4, 5, 5)).astype(np.float32)
    model = attention_model(4, (8, 8, 12), attn_bias=rel)
    pruned, _ = prune_checked(model, whole_heads=True)
    node = node_of(pruned, "Attention")
    heads = attr(node, "num_heads")
    assert heads < 4 and attr(node, "qkv_hidden_sizes") == [2 * heads, 2 * heads, 3 * heads]
    assert wshape(pruned, "attn.rel_bias") == (1, heads, 5, 5)


def test_attention_bias_per_head_with_head_dim():
    rel = np.random.default_rng(4).standard_normal((1, 2, 5, 5)).astype(np.float32)
    pruned, _ = prune_checked(attention_model(2, (8, 8, 8), attn_bias=rel))
    assert attr(node_of(pruned, "Attention"), "num_heads") == 2
    assert wshape(pruned, "attn.rel_bias") == (1, 2, 5, 5)


def test_attention_with_past_state_freezes_heads_only():
    """A key/value cache holds the heads: the head side stays whole with the reason, the input side prunes."""
    net = Net()
    h = net.matmul("x", 10, 12, "up")
    a, present = net.ms("Attention", [h, net.w(12, 24, name="attn.w"), net.w(24, name="attn.b"), "", "past"],
                        outputs=2, num_heads=2, unidirectional=1)
    y = net.matmul(a, 8, 6, "out")
    model = net.model([("x", [2, 5, 10]), ("past", [2, 2, 2, 3, 4])], [(y, [2, 5, 6]), (present, [2, 2, 2, 8, 4])])
    assert any("past/present key-value state" in r for r in frozen_reasons(model))
    pruned, _ = prune_checked(model)
    assert wshape(pruned, "attn.w")[0] < 12 and wshape(pruned, "attn.w")[1] == 24


# ---- EmbedLayerNormalization --------------------------------------------------------------------------------------
def embed_model(segment=True, mask=True, position_ids=False, esum=False, mask_out=True):
    """EmbedLayerNormalization -> MatMul: the hidden width (tables' columns, gamma, beta) prunes."""
    net = Net()
    ins = ["ids", "segs" if segment else "", net.w(30, 12, name="word", scale=1.0),
           net.w(8, 12, name="pos", scale=1.0), net.w(2, 12, name="seg", scale=1.0) if segment else "",
           net.w(12, name="ln.gamma", positive=True), net.w(12, name="ln.beta", scale=0.5),
           "mask" if mask else "", "pos_ids" if position_ids else ""]
    while not ins[-1]:
        ins.pop()
    inputs = [("ids", [2, 5], TensorProto.INT32)] + ([("segs", [2, 5], TensorProto.INT32)] if segment else [])
    inputs += ([("mask", [2, 5], TensorProto.INT32)] if mask else []) + \
        ([("pos_ids", [1, 5], TensorProto.INT32)] if position_ids else [])
    y, mask_index, total = net.ms("EmbedLayerNormalization", ins, outputs=3, epsilon=1e-5)
    outputs = [(net.matmul(y, 12, 6, "down"), [2, 5, 6])]
    if mask_out:
        outputs.append((mask_index, [2], TensorProto.INT32))
    if esum:
        outputs.append((net.matmul(total, 12, 6, "sum_proj"), [2, 5, 6]))
    else:
        net.nodes[0].output[2] = ""
    if not mask_out:
        net.nodes[0].output[1] = ""
    return net.model(inputs, outputs)


@pytest.mark.parametrize("segment,mask,position_ids", [(True, True, False), (False, False, False),
                                                      (True, True, True), (False, True, True)])
def test_embed_layer_norm_prunes_hidden(segment, mask, position_ids):
    model = embed_model(segment, mask, position_ids)
    pruned, report = prune_checked(model, verify_samples=3)
    assert wshape(pruned, "word")[1] < 12 and wshape(pruned, "ln.gamma") == (wshape(pruned, "word")[1],)
    assert wshape(pruned, "pos")[1] == wshape(pruned, "word")[1]
    assert "EmbedLayerNormalization" not in {n.op_type for n in pruned.graph.node}
    assert report.verification["max_rel_diff"] < 1e-4


def test_embed_layer_norm_embedding_sum_output():
    pruned, _ = prune_checked(embed_model(esum=True, mask_out=False), verify_samples=3)
    assert wshape(pruned, "sum_proj.w")[0] == wshape(pruned, "word")[1] < 12


def test_embed_layer_norm_mask_index_counts_ones():
    """mask_index (the count of 1s per row) is recomputed with standard ops, for masks with other values too."""
    import onnxruntime as ort

    model = embed_model(segment=False, mask=True)
    pruned, _ = prune_checked(model)
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 2, 1]], np.int32)
    feed = {"ids": np.arange(10, dtype=np.int32).reshape(2, 5), "mask": mask}
    outs = {}
    for tag, m in (("orig", model), ("pruned", pruned)):
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        outs[tag] = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True))
    name = model.graph.output[1].name
    assert outs["pruned"][name].tolist() == outs["orig"][name].tolist() == [3, 3]


def test_embed_layer_norm_with_a_table_fed_at_run_time_stays_frozen():
    net = Net()
    ins = ["ids", "", "word", net.w(8, 12, name="pos"), "", net.w(12, name="g", positive=True), net.w(12, name="b")]
    y = net.ms("EmbedLayerNormalization", ins, outputs=1)
    out = net.matmul(y, 12, 6, "down")
    model = net.model([("ids", [2, 5], TensorProto.INT32), ("word", [30, 12])], [(out, [2, 5, 6])])
    assert any("EmbedLayerNormalization: the embedding tables" in r for r in frozen_reasons(model))


# ---- MultiHeadAttention ---------------------------------------------------------------------------------------
def mha_model(heads=2, d=8, dv=8, bias=True, attn_bias=None, kpm=False, cross=False):
    """Q/K/V projections (MatMul) -> MultiHeadAttention -> out projection; cross: key/value from a second input."""
    net = Net()
    src = "mem" if cross else "x"
    q = net.matmul("x", 10, d, "q")
    k = net.matmul(src, 10, d, "k")
    v = net.matmul(src, 10, dv, "v")
    ins = [q, k, v, net.w(2 * d + dv, name="mha.b", scale=0.5) if bias else ""]
    inputs = [("x", [2, 5, 10])] + ([("mem", [2, 7, 10])] if cross else [])
    if kpm:
        ins += ["kpm"]
        inputs.append(("kpm", [2, 7 if cross else 5], TensorProto.INT32))
    if attn_bias is not None:
        ins += [""] * (5 - len(ins)) + [net.const(attn_bias, "mha.rel_bias")]
    a = net.ms("MultiHeadAttention", ins, num_heads=heads)
    y = net.matmul(a, dv, 6, "out")
    return net.model(inputs, [(y, [2, 5, 6])])


@pytest.mark.parametrize("heads,d,dv", [(2, 8, 8), (4, 8, 12), (2, 6, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_mha_prunes_head_dim(heads, d, dv, bias):
    """q/k channels go together (j of every head), v channels with the output; the scale is made explicit."""
    pruned, report = prune_checked(mha_model(heads, d, dv, bias))
    node = node_of(pruned, "MultiHeadAttention")
    nq, nv = wshape(pruned, "q.w")[1], wshape(pruned, "v.w")[1]
    assert nq < d and wshape(pruned, "k.w")[1] == nq and nq % heads == 0
    assert nv < dv and wshape(pruned, "out.w")[0] == nv and nv % heads == 0
    assert attr(node, "num_heads") == heads and attr(node, "scale") == pytest.approx(1 / math.sqrt(d // heads))
    if bias:
        assert wshape(pruned, "mha.b") == (2 * nq + nv,)
    assert report.verification["max_rel_diff"] < 1e-4


def test_mha_cross_attention_with_padding_mask():
    pruned, _ = prune_checked(mha_model(2, 8, 8, kpm=True, cross=True))
    assert wshape(pruned, "q.w")[1] < 8


def test_mha_whole_heads_with_attention_bias():
    rel = np.random.default_rng(5).standard_normal((1, 4, 5, 5)).astype(np.float32)
    pruned, _ = prune_checked(mha_model(4, 8, 12, attn_bias=rel), whole_heads=True)
    heads = attr(node_of(pruned, "MultiHeadAttention"), "num_heads")
    assert heads < 4 and wshape(pruned, "q.w")[1] == 2 * heads and wshape(pruned, "v.w")[1] == 3 * heads
    assert wshape(pruned, "mha.rel_bias") == (1, heads, 5, 5)


def test_mha_packed_kv_stays_frozen_with_reason():
    net = Net()
    q = net.matmul("x", 10, 8, "q")
    a = net.ms("MultiHeadAttention", [q, "kv"], num_heads=2)
    y = net.matmul(a, 8, 6, "out")
    model = net.model([("x", [2, 5, 10]), ("kv", [2, 5, 2, 2, 4])], [(y, [2, 5, 6])])
    assert any("packed QKV/KV" in r for r in frozen_reasons(model))


@pytest.mark.parametrize("op", ["Attention", "MultiHeadAttention"])
def test_whole_heads_remove_q_k_and_v_of_a_head_together(op):
    """With whole heads, one group holds Q, K and V of each head (a head's scores weigh its values)."""
    model = attention_model(4, (8, 8, 12)) if op == "Attention" else mha_model(4, 8, 12)
    analysis = graphprune.analyze_model(model, whole_heads=True)
    head_groups = [g for g in analysis.groups if len(g.units) == 4]
    assert len(head_groups) == 1


# ---- GroupQueryAttention --------------------------------------------------------------------------------------
def gqa_model(heads=4, kv_heads=2, d=16, rotary=False, interleaved=False, past=False, present_out=False):
    """Q/K/V projections -> GroupQueryAttention (causal, no cache unless `past`) -> out projection. The present
    key/value outputs are left unread unless `present_out` makes them graph outputs."""
    net = Net()
    q = net.matmul("x", 10, heads * d, "q")
    k = net.matmul("x", 10, kv_heads * d, "k")
    v = net.matmul("x", 10, kv_heads * d, "v")
    # constants here: random verification feeds know nothing of sequence lengths
    ins = [q, k, v, "past_k" if past else "", "past_v" if past else "",
           net.const(np.full(2, 4, np.int32), "seqlens_k"), net.const(np.array(5, np.int32), "total_len")]
    inputs = [("x", [2, 5, 10])]
    if past:
        inputs += [("past_k", [2, kv_heads, 0, d]), ("past_v", [2, kv_heads, 0, d])]
    if rotary:
        angles = np.outer(np.arange(16), 1.0 / (100 ** (np.arange(d // 2) / (d // 2))))
        ins += [net.const(np.cos(angles).astype(np.float32), "cos"), net.const(np.sin(angles).astype(np.float32),
                                                                                "sin")]
    a, pk, pv = net.ms("GroupQueryAttention", ins, outputs=3, num_heads=heads, kv_num_heads=kv_heads,
                       do_rotary=int(rotary), rotary_interleaved=int(interleaved))
    y = net.matmul(a, heads * d, 6, "out")
    outputs = [(y, [2, 5, 6])]
    if present_out:
        outputs += [(pk, [2, kv_heads, 5, d]), (pv, [2, kv_heads, 5, d])]
    return net.model(inputs, outputs)


@pytest.mark.parametrize("rotary,interleaved", [(False, False), (True, False), (True, True)])
def test_gqa_prunes_head_dim_in_blocks(rotary, interleaved):
    """Element j of every query and key/value head goes together, in blocks that keep head_size a multiple of 8
    (16 with rotary, whose pairs and cos/sin columns stay together); the heads keep their number."""
    d = 32 if rotary else 16
    model = gqa_model(d=d, rotary=rotary, interleaved=interleaved)
    pruned, report = prune_checked(model)
    node = node_of(pruned, "GroupQueryAttention")
    nd = wshape(pruned, "q.w")[1] // 4
    assert nd < d and nd % (16 if rotary else 8) == 0
    assert wshape(pruned, "k.w")[1] == wshape(pruned, "v.w")[1] == 2 * nd and wshape(pruned, "out.w")[0] == 4 * nd
    assert attr(node, "num_heads") == 4 and attr(node, "kv_num_heads") == 2
    assert attr(node, "scale") == pytest.approx(1 / math.sqrt(d))
    if rotary:
        assert wshape(pruned, "cos") == (16, nd // 2)
    assert report.verification["max_rel_diff"] < 1e-4


def test_gqa_whole_heads_remove_kv_groups():
    pruned, _ = prune_checked(gqa_model(heads=4, kv_heads=2, d=8), whole_heads=True)
    node = node_of(pruned, "GroupQueryAttention")
    assert attr(node, "kv_num_heads") == 1 and attr(node, "num_heads") == 2
    assert wshape(pruned, "q.w") == (10, 16) and wshape(pruned, "k.w") == (10, 8)


def test_gqa_with_past_state_inputs_stays_frozen():
    """The key/value cache is a graph input: its head_size cannot shrink, so neither can the heads."""
    model = gqa_model(past=True, present_out=True)
    analysis = graphprune.analyze_model(model)
    assert any(m[0] == "q.w" and m[1] == 1 for g in analysis.frozen_groups for m in g.members)
    assert not any(("q.w", 1) in g.members for g in analysis.groups)


# ---- RotaryEmbedding ------------------------------------------------------------------------------------------
def rotary_model(heads=2, d=8, rot=None, interleaved=False, num_heads_attr=True):
    """MatMul -> RotaryEmbedding ([batch, seq, heads·d]) -> MatMul; rot < d rotates part of each head."""
    rot = rot or d
    net = Net()
    h = net.matmul("x", 10, heads * d, "up")
    angles = np.outer(np.arange(8), 1.0 / (100 ** (np.arange(rot // 2) / (rot // 2))))
    ins = [h, net.const(np.arange(5, dtype=np.int64)[None].repeat(2, 0), "pos_ids"),
           net.const(np.cos(angles).astype(np.float32), "cos"), net.const(np.sin(angles).astype(np.float32), "sin")]
    attrs = dict(interleaved=int(interleaved))
    if num_heads_attr:
        attrs["num_heads"] = heads
    if rot != d:
        attrs["rotary_embedding_dim"] = rot
    r = net.ms("RotaryEmbedding", ins, **attrs)
    y = net.matmul(r, heads * d, 6, "down")
    return net.model([("x", [2, 5, 10])], [(y, [2, 5, 6])])


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot,num_heads_attr", [(None, True), (None, False), (4, True)])
def test_rotary_embedding_prunes_pairs(interleaved, rot, num_heads_attr):
    """A rotated pair and its cos/sin column go together, from every head; a partial rotation's
    rotary_embedding_dim is rewritten."""
    model = rotary_model(2, 8, rot, interleaved, num_heads_attr)
    pruned, report = prune_checked(model)
    width = wshape(pruned, "up.w")[1]
    assert width < 16 and width % 2 == 0 and wshape(pruned, "down.w")[0] == width
    node = node_of(pruned, "RotaryEmbedding")
    new_rot = 2 * wshape(pruned, "cos")[1]
    if rot:
        assert attr(node, "rotary_embedding_dim") == new_rot
    assert report.verification["max_rel_diff"] < 1e-4


def test_rotary_embedding_whole_heads():
    pruned, _ = prune_checked(rotary_model(4, 4), whole_heads=True)
    node = node_of(pruned, "RotaryEmbedding")
    assert attr(node, "num_heads") * 4 == wshape(pruned, "up.w")[1] < 16 and wshape(pruned, "cos") == (8, 2)


def test_rotary_embedding_on_heads_layout():
    """[batch, heads, seq, head_size] (after Reshape + Transpose): pairs of the last axis go together."""
    net = Net()
    h = net.matmul("x", 10, 16, "up")
    split = net.op("Transpose", [net.op("Reshape", [h, net.const(np.array([2, 5, 2, 8], np.int64), "split")])],
                   perm=[0, 2, 1, 3])
    angles = np.outer(np.arange(8), 1.0 / (100 ** (np.arange(4) / 4)))
    r = net.ms("RotaryEmbedding", [split, net.const(np.arange(5, dtype=np.int64)[None].repeat(2, 0), "pos_ids"),
                                   net.const(np.cos(angles).astype(np.float32), "cos"),
                                   net.const(np.sin(angles).astype(np.float32), "sin")])
    merged = net.op("Reshape", [net.op("Transpose", [r], perm=[0, 2, 1, 3]),
                                net.const(np.array([2, 5, 16], np.int64), "merge")])
    y = net.matmul(merged, 16, 6, "down")
    pruned, _ = prune_checked(net.model([("x", [2, 5, 10])], [(y, [2, 5, 6])]))
    assert wshape(pruned, "up.w")[1] < 16 and wshape(pruned, "cos")[1] < 4


# ---- a BERT layer fused by onnxruntime's transformer optimizer ------------------------------------------------------
def bert_layer(hidden=16, heads=2, ffn=32, vocab=30, seq=5, batch=2, seed=0):
    """One BERT encoder layer in standard ops, in the shapes onnxruntime's BERT fusions match: embeddings + LayerNorm,
    attention with the additive mask, residual LayerNorms, an erf GELU FFN, and a classifier head."""
    rng = np.random.default_rng(seed)
    inits, nodes = {}, []

    def w(name, *shape, scale=None):
        inits[name] = (rng.standard_normal(shape) * (scale or 1 / np.sqrt(shape[0]))).astype(np.float32)
        return name

    def c(name, value):
        inits[name] = np.asarray(value)
        return name

    def node(op, ins, out, **kw):
        nodes.append(helper.make_node(op, ins, [out], name=f"{out}_node", **kw))
        return out

    def proj(name, x, cin, cout):
        return node("Add", [node("MatMul", [x, w(f"{name}.w", cin, cout)], f"{name}_mm"),
                            w(f"{name}.b", cout, scale=0.1)], f"{name}_out")

    def layer_norm(x, name, out):
        return node("LayerNormalization", [x, w(f"{name}.g", hidden, scale=1.0), w(f"{name}.b", hidden, scale=0.1)],
                    out, axis=-1, epsilon=1e-12)

    d = hidden // heads
    emb = node("Add", [node("Add", [node("Gather", [w("word", vocab, hidden, scale=1.0), "input_ids"], "we"),
                                    node("Gather", [w("pos", 16, hidden, scale=1.0),
                                                    c("position_ids", np.arange(seq, dtype=np.int64)[None])], "pe")],
                            "e1"),
                       node("Gather", [w("seg", 2, hidden, scale=1.0), "token_type_ids"], "se")], "e2")
    x = layer_norm(emb, "ln0", "ln0_out")
    mask = node("Unsqueeze", [node("Unsqueeze", ["attention_mask", c("ax1", np.array([1], np.int64))], "m1"),
                              c("ax2", np.array([2], np.int64))], "m2")
    mask = node("Sub", [c("one", np.array(1.0, np.float32)), node("Cast", [mask], "m3", to=1)], "m4")
    mask = node("Mul", [mask, c("neg", np.array(-10000.0, np.float32))], "m5")
    split = c("split", np.array([0, 0, heads, d], np.int64))
    q, k, v = (node("Transpose", [node("Reshape", [proj(n, x, hidden, hidden), split], f"{n}_r")], f"{n}_t",
                    perm=perm) for n, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])))
    scores = node("Add", [node("Div", [node("MatMul", [q, k], "qk"), c("sqrt_d", np.array(np.sqrt(d), np.float32))],
                               "qk_s"), mask], "qk_m")
    ctx = node("MatMul", [node("Softmax", [scores], "probs", axis=3), v], "ctx")
    ctx = node("Reshape", [node("Transpose", [ctx], "ctx_t", perm=[0, 2, 1, 3]),
                           c("merge", np.array([0, 0, hidden], np.int64))], "ctx_r")
    x = layer_norm(node("Add", [proj("o", ctx, hidden, hidden), x], "r1"), "ln1", "ln1_out")
    h = proj("ffn1", x, hidden, ffn)
    gelu = node("Mul", [node("Mul", [h, node("Add", [node("Erf", [node("Div", [h, c("sqrt2", np.array(
        np.sqrt(2.0), np.float32))], "g1")], "g2"), c("one_b", np.array(1.0, np.float32))], "g3")], "g4"),
                        c("half", np.array(0.5, np.float32))], "g5")
    x = layer_norm(node("Add", [proj("ffn2", gelu, ffn, hidden), x], "r2"), "ln2", "ln2_out")
    logits = node("MatMul", [x, w("head.w", hidden, 3)], "logits")
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, [batch, seq])
              for n in ("input_ids", "attention_mask", "token_type_ids")]
    graph = helper.make_graph(nodes, "bert", inputs, [helper.make_tensor_value_info(logits, F, [batch, seq, 3])],
                              [numpy_helper.from_array(a, n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_bert_fused_by_onnxruntime_optimizer_prunes_end_to_end():
    """optimize_model turns the layer into EmbedLayerNormalization, Attention, SkipLayerNormalization and BiasGelu;
    the residual stream, the heads' head_dim and the FFN width all prune, and the result equals the masked
    original."""
    # onnxruntime's transformer optimizer imports sympy, which the test extra installs
    from onnxruntime.transformers.optimizer import optimize_model

    fused = optimize_model(bert_layer(), model_type="bert", num_heads=2, hidden_size=16, opt_level=0).model
    if not any(o.domain == MS for o in fused.opset_import):
        fused.opset_import.append(helper.make_opsetid(MS, 1))
    ops = {n.op_type for n in fused.graph.node}
    assert {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu"} <= ops
    pruned, report = prune_checked(fused, verify_samples=3)
    assert wshape(pruned, "word")[1] < 16 and wshape(pruned, "ffn1.w")[1] < 32
    node = node_of(pruned, "Attention")
    assert sum(attr(node, "qkv_hidden_sizes")) < 48 and attr(node, "num_heads") == 2
    assert report.verification["max_rel_diff"] < 1e-4
