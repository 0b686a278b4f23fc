"""The ai.graphprune sparse ops: packing weights into their formats, building nodes, the dense function
bodies that let a model run without the native library, and numpy reference semantics (SPEC.md).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DOMAIN = "ai.graphprune"
VERSION = 1
BLOCK_MATMUL = 16  # consecutive outputs per block of GpBsrMatMul
BLOCK_CONV = 4     # output channels per block of GpBsrConv
OP_TYPES = ("GpBsrMatMul", "GpCsrMatMul", "GpBsrConv")
MIN_OPSET = 12     # the function bodies read attributes through Constant value_int/value_float (opset 12)

_MATMUL_ATTRS = ("K", "N", "clip_min", "clip_max")
_CONV_ATTRS = ("in_channels", "out_channels", "kernel_shape", "strides", "pads", "dilations", "clip_min",
               "clip_max")


# ---- packing ------------------------------------------------------------------------------------------
def _blocks(n: int, size: int) -> int:
    return -(-n // size)


def pack_bsr_matmul(w: np.ndarray, keep: np.ndarray | None = None):
    """W [K, N] -> (values [nnzb, 16] float32, block_index int32 = j*K + k ascending). `keep` [K, Nb] bool
    chooses the blocks (default: blocks that are not all zero)."""
    k_dim, n_dim = w.shape
    nb = _blocks(n_dim, BLOCK_MATMUL)
    padded = np.zeros((k_dim, nb * BLOCK_MATMUL), np.float32)
    padded[:, :n_dim] = w
    blocks = padded.reshape(k_dim, nb, BLOCK_MATMUL)
    if keep is None:
        keep = np.any(blocks != 0, axis=2)
    if keep.shape != (k_dim, nb):
        raise ValueError(f"block mask must be [{k_dim}, {nb}], got {list(keep.shape)}")
    j, k = np.nonzero(keep.T)  # row-major over (j, k): ascending j*K + k
    return np.ascontiguousarray(blocks[k, j]), (j.astype(np.int64) * k_dim + k).astype(np.int32)


def unpack_bsr_matmul(values, block_index, k_dim: int, n_dim: int) -> np.ndarray:
    nb = _blocks(n_dim, BLOCK_MATMUL)
    out = np.zeros((k_dim, nb, BLOCK_MATMUL), np.float32)
    j, k = np.divmod(np.asarray(block_index, np.int64), k_dim)
    out[k, j] = np.asarray(values).reshape(-1, BLOCK_MATMUL)
    return out.reshape(k_dim, -1)[:, :n_dim]


def pack_csr_matmul(w: np.ndarray, keep: np.ndarray | None = None):
    """W [K, N] -> (values [nnz] float32, index int32 = n*K + k ascending)."""
    k_dim, _ = w.shape
    if keep is None:
        keep = w != 0
    n, k = np.nonzero(keep.T)
    return np.ascontiguousarray(w[k, n], dtype=np.float32), (n.astype(np.int64) * k_dim + k).astype(np.int32)


def unpack_csr_matmul(values, index, k_dim: int, n_dim: int) -> np.ndarray:
    out = np.zeros((n_dim, k_dim), np.float32)
    n, k = np.divmod(np.asarray(index, np.int64), k_dim)
    out[n, k] = values
    return out.T.copy()


def pack_bsr_conv(w: np.ndarray, keep: np.ndarray | None = None):
    """W [Cout, Cin, kh, kw] -> (values [nnzb, 4] float32, block_index int32 = j*T + t ascending), with
    t = (ci*kh + r)*kw + s. `keep` [Cb, T] bool (default: blocks that are not all zero)."""
    cout = w.shape[0]
    taps = int(np.prod(w.shape[1:]))
    cb = _blocks(cout, BLOCK_CONV)
    padded = np.zeros((cb * BLOCK_CONV, taps), np.float32)
    padded[:cout] = w.reshape(cout, taps)
    blocks = padded.reshape(cb, BLOCK_CONV, taps).transpose(0, 2, 1)  # [Cb, T, 4]
    if keep is None:
        keep = np.any(blocks != 0, axis=2)
    if keep.shape != (cb, taps):
        raise ValueError(f"block mask must be [{cb}, {taps}], got {list(keep.shape)}")
    j, t = np.nonzero(keep)
    return np.ascontiguousarray(blocks[j, t]), (j.astype(np.int64) * taps + t).astype(np.int32)


def unpack_bsr_conv(values, block_index, shape) -> np.ndarray:
    cout = shape[0]
    taps = int(np.prod(shape[1:]))
    cb = _blocks(cout, BLOCK_CONV)
    out = np.zeros((cb, taps, BLOCK_CONV), np.float32)
    j, t = np.divmod(np.asarray(block_index, np.int64), taps)
    out[j, t] = np.asarray(values).reshape(-1, BLOCK_CONV)
    return out.transpose(0, 2, 1).reshape(cb * BLOCK_CONV, taps)[:cout].reshape(shape)


# ---- nodes --------------------------------------------------------------------------------------------
def make_node(op_type: str, inputs: list[str], output: str, name: str, **attrs) -> onnx.NodeProto:
    """An ai.graphprune node with every attribute the SPEC requires (the function bodies reference them)."""
    if op_type not in OP_TYPES:
        raise ValueError(f"unknown ai.graphprune op {op_type!r}")
    full = {"clip_min": -math.inf, "clip_max": math.inf}
    if op_type == "GpBsrConv":
        full.update(strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1])
    full.update(attrs)
    need = _CONV_ATTRS if op_type == "GpBsrConv" else _MATMUL_ATTRS
    missing = [a for a in need if a not in full]
    if missing:
        raise ValueError(f"{op_type} '{name}' needs attributes {missing}")
    full["clip_min"], full["clip_max"] = float(full["clip_min"]), float(full["clip_max"])
    return helper.make_node(op_type, inputs, [output], name=name, domain=DOMAIN,
                            **{k: full[k] for k in need})


# ---- function bodies ----------------------------------------------------------------------------------
def _ref_constant(out: str, attr: str, kind: str) -> onnx.NodeProto:
    """Constant whose value is the calling node's attribute `attr` (kind: value_int/value_float/value_ints)."""
    node = helper.make_node("Constant", [], [out])
    a = onnx.AttributeProto()
    a.name, a.ref_attr_name = kind, attr
    a.type = {"value_int": onnx.AttributeProto.INT, "value_float": onnx.AttributeProto.FLOAT,
              "value_ints": onnx.AttributeProto.INTS}[kind]
    node.attribute.append(a)
    return node


def _const(out: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [out], value=numpy_helper.from_array(np.asarray(value), out))


def _ref_attr(node: onnx.NodeProto, name: str) -> onnx.NodeProto:
    a = onnx.AttributeProto()
    a.name, a.ref_attr_name, a.type = name, name, onnx.AttributeProto.INTS
    node.attribute.append(a)
    return node


def function_proto(op_type: str, opset: int) -> onnx.FunctionProto:
    """Dense standard-op body: scatter the kept blocks into zeros, lay them out as the dense weight, then
    MatMul/Conv + bias + Clip. onnxruntime constant-folds the densification once the body is inlined."""
    if opset < MIN_OPSET:
        raise ValueError(f"ai.graphprune function bodies need default-domain opset >= {MIN_OPSET}, got {opset}")
    mk = helper.make_node
    zero = numpy_helper.from_array(np.zeros(1, np.float32))
    nodes = [_ref_constant("lo", "clip_min", "value_float"), _ref_constant("hi", "clip_max", "value_float"),
             _const("one_d", np.array([1], np.int64)), _const("zero_d", np.array([0], np.int64)),
             _const("minus_one", np.array([-1], np.int64)), _const("col", np.array([-1, 1], np.int64)),
             mk("Cast", ["block_index"], ["idx64"], to=TensorProto.INT64),
             mk("Reshape", ["idx64", "col"], ["scatter_idx"])]
    if op_type in ("GpBsrMatMul", "GpCsrMatMul"):
        nodes += [_ref_constant("K", "K", "value_int"), _ref_constant("N", "N", "value_int"),
                  mk("Reshape", ["K", "one_d"], ["K1"]), mk("Reshape", ["N", "one_d"], ["N1"])]
        if op_type == "GpBsrMatMul":
            nodes += [_const("b16", np.array([BLOCK_MATMUL], np.int64)),
                      _const("b15", np.array(BLOCK_MATMUL - 1, np.int64)),
                      _const("b16s", np.array(BLOCK_MATMUL, np.int64)),
                      mk("Add", ["N", "b15"], ["n15"]), mk("Div", ["n15", "b16s"], ["Nb"]),
                      mk("Reshape", ["Nb", "one_d"], ["Nb1"]),
                      mk("Concat", ["Nb1", "K1", "b16"], ["grid"], axis=0),       # [Nb, K, 16]
                      mk("ConstantOfShape", ["grid"], ["zeros3"], value=zero),
                      mk("Concat", ["minus_one", "b16"], ["rows16"], axis=0),
                      mk("Reshape", ["zeros3", "rows16"], ["zeros"]),              # [Nb*K, 16]: row j*K + k
                      mk("ScatterND", ["zeros", "scatter_idx", "values"], ["dense"]),
                      mk("Reshape", ["dense", "grid"], ["dense3"]),
                      mk("Transpose", ["dense3"], ["by_row"], perm=[1, 0, 2]),      # [K, Nb, 16]
                      mk("Concat", ["K1", "minus_one"], ["k_by"], axis=0),
                      mk("Reshape", ["by_row", "k_by"], ["padded"]),
                      mk("Slice", ["padded", "zero_d", "N1", "one_d"], ["W"])]       # [K, N]
        else:
            nodes += [mk("Concat", ["N1", "K1"], ["grid"], axis=0),
                      mk("ConstantOfShape", ["grid"], ["zeros2"], value=zero),
                      mk("Reshape", ["zeros2", "minus_one"], ["zeros"]),            # [N*K]: entry n*K + k
                      mk("ScatterND", ["zeros", "scatter_idx", "values"], ["dense"]),
                      mk("Reshape", ["dense", "grid"], ["dense_nk"]),
                      mk("Transpose", ["dense_nk"], ["W"], perm=[1, 0])]
        nodes += [mk("MatMul", ["X", "W"], ["XW"]), mk("Add", ["XW", "B"], ["Z"])]
        attrs = list(_MATMUL_ATTRS)
    elif op_type == "GpBsrConv":
        nodes += [_ref_constant("Ci", "in_channels", "value_int"), _ref_constant("Co", "out_channels", "value_int"),
                  _ref_constant("ks", "kernel_shape", "value_ints"),
                  _const("b4", np.array([BLOCK_CONV], np.int64)), _const("b3s", np.array(BLOCK_CONV - 1, np.int64)),
                  _const("b4s", np.array(BLOCK_CONV, np.int64)), _const("bias_shape", np.array([-1, 1, 1], np.int64)),
                  mk("Add", ["Co", "b3s"], ["co3"]), mk("Div", ["co3", "b4s"], ["Cb"]),
                  mk("Reshape", ["Cb", "one_d"], ["Cb1"]), mk("Reshape", ["Ci", "one_d"], ["Ci1"]),
                  mk("Reshape", ["Co", "one_d"], ["Co1"]),
                  mk("Concat", ["Cb1", "Ci1", "ks", "b4"], ["grid"], axis=0),    # [Cb, Ci, kh, kw, 4]
                  mk("ConstantOfShape", ["grid"], ["zeros5"], value=zero),
                  mk("Concat", ["minus_one", "b4"], ["rows4"], axis=0),
                  mk("Reshape", ["zeros5", "rows4"], ["zeros"]),                 # [Cb*T, 4]: row j*T + t
                  mk("ScatterND", ["zeros", "scatter_idx", "values"], ["dense"]),
                  mk("Concat", ["Cb1", "minus_one", "b4"], ["blocked"], axis=0),
                  mk("Reshape", ["dense", "blocked"], ["dense3"]),               # [Cb, T, 4]
                  mk("Transpose", ["dense3"], ["by_out"], perm=[0, 2, 1]),       # [Cb, 4, T]
                  mk("Concat", ["minus_one", "Ci1", "ks"], ["w_shape"], axis=0),
                  mk("Reshape", ["by_out", "w_shape"], ["padded"]),              # [Cb*4, Ci, kh, kw]
                  mk("Slice", ["padded", "zero_d", "Co1", "zero_d"], ["W"]),
                  _ref_attr(_ref_attr(_ref_attr(_ref_attr(mk("Conv", ["X", "W"], ["XW"]), "kernel_shape"),
                                                "strides"), "pads"), "dilations"),
                  mk("Reshape", ["B", "bias_shape"], ["B3"]), mk("Add", ["XW", "B3"], ["Z"])]
        attrs = list(_CONV_ATTRS)
    else:
        raise ValueError(f"unknown ai.graphprune op {op_type!r}")
    nodes.append(mk("Clip", ["Z", "lo", "hi"], ["Y"]))
    return helper.make_function(DOMAIN, op_type, ["X", "values", "block_index", "B"], ["Y"], nodes,
                                [helper.make_opsetid("", opset)], attrs)


def default_opset(model: onnx.ModelProto) -> int:
    return next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)


def attach_functions(model: onnx.ModelProto) -> None:
    """Add the function body of every ai.graphprune op the graph uses, and the domain's opset import."""
    used = sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN})
    have = {(f.domain, f.name) for f in model.functions}
    opset = default_opset(model)
    for op in used:
        if (DOMAIN, op) not in have:
            model.functions.append(function_proto(op, opset))
    if used and not any(i.domain == DOMAIN for i in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))


# ---- numpy semantics ----------------------------------------------------------------------------------
def _attrs(node_or_dict) -> dict:
    if isinstance(node_or_dict, dict):
        return node_or_dict
    return {a.name: helper.get_attribute_value(a) for a in node_or_dict.attribute}


def reference(op_type: str, inputs: list[np.ndarray], attrs) -> np.ndarray:
    """What the op computes, in numpy (float64 accumulation), for tests."""
    attrs = _attrs(attrs)
    x, values, index, bias = inputs
    lo, hi = attrs.get("clip_min", -math.inf), attrs.get("clip_max", math.inf)
    if op_type in ("GpBsrMatMul", "GpCsrMatMul"):
        unpack = unpack_bsr_matmul if op_type == "GpBsrMatMul" else unpack_csr_matmul
        w = unpack(values, index, attrs["K"], attrs["N"]).astype(np.float64)
        z = x.astype(np.float64) @ w + bias
    elif op_type == "GpBsrConv":
        kh, kw = attrs["kernel_shape"]
        shape = (attrs["out_channels"], attrs["in_channels"], kh, kw)
        w = unpack_bsr_conv(values, index, shape).astype(np.float64)
        z = _conv2d(x.astype(np.float64), w, attrs.get("strides", [1, 1]), attrs.get("pads", [0, 0, 0, 0]),
                    attrs.get("dilations", [1, 1])) + bias[None, :, None, None]
    else:
        raise ValueError(f"unknown ai.graphprune op {op_type!r}")
    return np.clip(z, lo, hi).astype(np.float32)


def _conv2d(x, w, strides, pads, dilations):
    n, c, h, wd = x.shape
    cout, _, kh, kw = w.shape
    sh, sw = strides
    dh, dw = dilations
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ho = (h + pads[0] + pads[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + pads[1] + pads[3] - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, cout, ho, wo))
    for r in range(kh):
        for s in range(kw):
            patch = xp[:, :, r * dh: r * dh + sh * (ho - 1) + 1: sh, s * dw: s * dw + sw * (wo - 1) + 1: sw]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, r, s])
    return out
