"""Layers the sparsify pass can replace, each with the epilogue it absorbs.

Eligible: MatMul with a constant 2-D float weight (any leading dims on X); Gemm with constant B and transA = 0
(alpha, transB folded into the weight, beta·C into the bias); 2-D Conv with group = 1 and a constant weight
(auto_pad resolved into explicit pads). A following constant bias Add and a Relu / constant Clip are fused when
the tensor between them has exactly one reader and is not a graph output.

Every layer is described in one layout: W[rows, outputs] (rows = MatMul/Gemm K, or the Conv im2col taps
t = (ci·kh + r)·kw + s), a bias [outputs] and a clip range — the contract of graphprune/kernels/SPEC.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from graphprune.ir import Graph, attr

INF = float("inf")


@dataclass
class Layer:
    node: onnx.NodeProto               # the MatMul / Gemm / Conv
    x: str                             # activation input
    weight: np.ndarray                 # [rows, outputs] float32, alpha/transB folded
    bias: np.ndarray                   # [outputs] float32: Gemm beta·C plus a fused Add (zeros if none)
    clip: tuple[float, float] = (-INF, INF)
    fused: list = field(default_factory=list)   # Add / Relu / Clip nodes the emitted node replaces
    output: str = ""                   # the tensor the emitted node produces (last fused node's output)
    conv: dict | None = None           # kernel_shape, strides, pads, dilations, in/out channels

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    @property
    def outputs(self) -> int:
        return self.weight.shape[1]

    @property
    def activation(self) -> str:
        lo, hi = self.clip
        if (lo, hi) == (-INF, INF):
            return ""
        if (lo, hi) == (0.0, INF):
            return "Relu"
        return f"Clip({lo:g},{hi:g})"

    def describe(self) -> str:
        """e.g. 'Gemm 1152→256 +bias Relu' or 'Conv 64→128 3×3/s2'."""
        extra = " +bias" if np.any(self.bias) else ""
        extra += f" {self.activation}" if self.activation else ""
        if self.conv:
            kh, kw = self.conv["kernel_shape"]
            s = self.conv["strides"]
            stride = f"/s{s[0]}" if s[0] == s[1] and s[0] != 1 else ("" if s == [1, 1] else f"/s{s[0]}x{s[1]}")
            return f"Conv {self.conv['in_channels']}→{self.conv['out_channels']} {kh}×{kw}{stride}{extra}"
        return f"{self.op} {self.rows}→{self.outputs}{extra}"

    def original_weight(self, w: np.ndarray) -> np.ndarray:
        """A [rows, outputs] weight back in the node's own layout (to build the dense reference)."""
        if self.conv:
            kh, kw = self.conv["kernel_shape"]
            return np.ascontiguousarray(w.T.reshape(self.outputs, self.conv["in_channels"], kh, kw))
        if self.op == "Gemm":
            alpha = attr(self.node, "alpha", 1.0)
            b = w / np.float32(alpha)
            return np.ascontiguousarray(b.T if attr(self.node, "transB", 0) else b)
        return w


def find_layers(graph: Graph) -> tuple[list[Layer], list[str]]:
    """(eligible layers in graph order, notes on near-misses worth telling the user)."""
    layers, notes = [], []
    for node in graph.nodes:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        found = _layer(graph, node)
        if isinstance(found, str):
            if found:
                notes.append(f"{node.op_type} '{node.name}' stays dense: {found}")
            continue
        _fuse_epilogue(graph, found)
        layers.append(found)
    return layers, notes


def _float_const(graph: Graph, name: str):
    arr = graph.const(name) if name else None
    return arr if arr is not None and arr.dtype == np.float32 else None


def _layer(graph: Graph, node) -> Layer | str:
    """The layer, or why not ('' when it is plainly not a weight layer: no constant weight)."""
    if graph.dtypes.get(node.input[0], onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
        return ""
    if node.op_type == "MatMul":
        w = _float_const(graph, node.input[1])
        if w is None or w.ndim != 2:
            return ""
        rank = len(graph.shape(node.input[0]) or ())
        return Layer(node, node.input[0], w, np.zeros(w.shape[1], np.float32), output=node.output[0]) \
            if rank >= 1 else "input rank unknown"
    if node.op_type == "Gemm":
        b = _float_const(graph, node.input[1])
        if b is None:
            return ""
        if attr(node, "transA", 0):
            return "transA = 1 is not supported"
        alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
        if alpha == 0.0:
            return "alpha = 0"
        w = (b.T if attr(node, "transB", 0) else b) * np.float32(alpha)
        bias = np.zeros(w.shape[1], np.float32)
        if len(node.input) > 2 and node.input[2]:
            c = _float_const(graph, node.input[2])
            if c is None:
                return "its C input is not a constant"
            if c.ndim == 2 and c.shape[0] != 1:
                return f"C of shape {list(c.shape)} is not one bias per output"
            bias = bias + np.float32(beta) * np.broadcast_to(c.reshape(-1), (w.shape[1],))
        return Layer(node, node.input[0], np.ascontiguousarray(w, dtype=np.float32), bias.astype(np.float32),
                     output=node.output[0])
    # Conv
    w = _float_const(graph, node.input[1])
    if w is None:
        return ""
    if w.ndim != 4:
        return f"{w.ndim - 2}-D convolution (only 2-D)"
    if attr(node, "group", 1) != 1:
        return ""   # depthwise / grouped: no block format for it; not worth a note per layer
    cout, cin, kh, kw = w.shape
    pads = _resolved_pads(graph, node, (kh, kw))
    if isinstance(pads, str):
        return pads
    bias = np.zeros(cout, np.float32)
    if len(node.input) > 2 and node.input[2]:
        b = _float_const(graph, node.input[2])
        if b is None:
            return "its bias is not a constant"
        bias = b.astype(np.float32)
    conv = {"in_channels": cin, "out_channels": cout, "kernel_shape": [kh, kw],
            "strides": list(attr(node, "strides", [1, 1])), "pads": pads,
            "dilations": list(attr(node, "dilations", [1, 1]))}
    weight = np.ascontiguousarray(w.reshape(cout, cin * kh * kw).T)
    return Layer(node, node.input[0], weight, bias, output=node.output[0], conv=conv)


def _resolved_pads(graph: Graph, node, kernel) -> list[int] | str:
    auto = attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        return list(attr(node, "pads", [0, 0, 0, 0]))
    if auto == "VALID":
        return [0, 0, 0, 0]
    shape = graph.shape(node.input[0])
    if not shape or len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
        return f"auto_pad {auto} needs static spatial input dims"
    strides = list(attr(node, "strides", [1, 1]))
    dilations = list(attr(node, "dilations", [1, 1]))
    begin, end = [], []
    for size, k, s, d in zip(shape[2:], kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        first = total // 2 if auto == "SAME_UPPER" else total - total // 2
        begin.append(first)
        end.append(total - first)
    return begin + end


def _sole_reader(graph: Graph, name: str):
    """The one node reading `name`, if exactly one does and it is not a graph output."""
    if name in graph.output_names:
        return None
    readers = {id(n): n for n, _ in graph.uses.get(name, [])}
    return next(iter(readers.values())) if len(readers) == 1 else None


def _fuse_epilogue(graph: Graph, layer: Layer) -> None:
    nxt = _sole_reader(graph, layer.output)
    if nxt is not None and nxt.op_type == "Add":
        bias = _channel_bias(graph, layer, nxt)
        if bias is not None:
            layer.bias = (layer.bias + bias).astype(np.float32)
            layer.fused.append(nxt)
            layer.output = nxt.output[0]
            nxt = _sole_reader(graph, layer.output)
    if nxt is not None:
        clip = _clip_range(graph, nxt)
        if clip is not None:
            layer.clip = clip
            layer.fused.append(nxt)
            layer.output = nxt.output[0]


def _channel_bias(graph: Graph, layer: Layer, add) -> np.ndarray | None:
    """The Add's constant as one value per output channel, or None if it is anything else."""
    other = add.input[1] if add.input[0] == layer.output else add.input[0]
    if add.input[0] == add.input[1]:
        return None
    c = _float_const(graph, other)
    out_rank = len(graph.shape(layer.output) or ())
    if c is None or out_rank == 0 or c.ndim > out_rank:
        return None
    dims = (1,) * (out_rank - c.ndim) + c.shape
    channel_axis = 1 if layer.conv else out_rank - 1
    if any(d != 1 for ax, d in enumerate(dims) if ax != channel_axis):
        return None
    if dims[channel_axis] not in (1, layer.outputs):
        return None
    return np.broadcast_to(c.reshape(-1), (layer.outputs,)).astype(np.float32)


def _clip_range(graph: Graph, node) -> tuple[float, float] | None:
    if node.op_type == "Relu":
        return (0.0, INF)
    if node.op_type != "Clip":
        return None
    if graph.dtypes.get(node.output[0], onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
        return None
    if any(a.name in ("min", "max") for a in node.attribute):   # opset < 11
        return (float(attr(node, "min", -INF)), float(attr(node, "max", INF)))
    bounds = []
    for i, default in ((1, -INF), (2, INF)):
        name = node.input[i] if len(node.input) > i else ""
        if not name:
            bounds.append(default)
            continue
        v = _float_const(graph, name)
        if v is None or v.size != 1:
            return None
        bounds.append(float(v.reshape(())))
    return tuple(bounds)


# ---- the replacing node ------------------------------------------------------------------------------
def block_width(layer: Layer, fmt: str) -> int:
    """Outputs per block: GpBsrConv 4 output channels, GpBsrMatMul 16 outputs, GpCsrMatMul 1."""
    if layer.conv:
        return 4
    return 16 if fmt == "bsr" else 1


def sparse_op_type(layer: Layer, fmt: str) -> str:
    if layer.conv:
        return "GpBsrConv"
    return "GpBsrMatMul" if fmt == "bsr" else "GpCsrMatMul"


def sparse_node(layer: Layer, weight: np.ndarray, keep: np.ndarray, fmt: str, new_name) -> tuple:
    """(node, {initializer name: array}) computing clip(layer(X) + bias) with `weight` [rows, outputs] stored
    sparse; `keep` is the [rows, blocks] mask; `new_name(base)` returns an unused tensor name."""
    from graphprune.kernels import ops
    op_type = sparse_op_type(layer, fmt)
    lo, hi = layer.clip
    if layer.conv:
        kh, kw = layer.conv["kernel_shape"]
        w4 = weight.T.reshape(layer.outputs, layer.conv["in_channels"], kh, kw)
        values, index = ops.pack_bsr_conv(np.ascontiguousarray(w4, np.float32), np.ascontiguousarray(keep.T))
        attrs = dict(layer.conv)
    elif fmt == "bsr":
        values, index = ops.pack_bsr_matmul(np.ascontiguousarray(weight, np.float32), keep)
        attrs = {"K": layer.rows, "N": layer.outputs}
    else:
        values, index = ops.pack_csr_matmul(np.ascontiguousarray(weight, np.float32), keep)
        attrs = {"K": layer.rows, "N": layer.outputs}
    base = layer.node.input[1] or layer.name
    inits = {new_name(f"{base}__{fmt}_values"): values.astype(np.float32),
             new_name(f"{base}__{fmt}_index"): index.astype(np.int32),
             new_name(f"{base}__bias"): layer.bias.astype(np.float32)}
    names = list(inits)
    node = ops.make_node(op_type, [layer.x, names[0], names[1], names[2]], layer.output, layer.name,
                         clip_min=float(lo), clip_max=float(hi), **attrs)
    return node, inits
