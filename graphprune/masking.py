"""Consumer-side channel masks: the masked original that pruning is checked and measured against.

Masking the producer is the wrong oracle (after a BatchNorm the zeros come back as constants), so every node
that reads a masked tensor reads Where(mask, x, 0) instead, inside subgraph bodies too (a Loop body's MatMul
reads its carried state masked); other readers of the producer and graph outputs (a body's too) see the tensor
unchanged, and initializers are never masked here (weights are edited
directly). A mask is either a constant (verification: one fixed set of removed channels) or a bool graph
input (sensitivity: one session, the removed channels change with the feeds); both build the same nodes.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .ir import subgraphs

# element types onnxruntime's CPU Where lacks -> a type it has that holds them exactly
_WHERE_WIDER = {onnx.TensorProto.INT16: onnx.TensorProto.INT32, onnx.TensorProto.UINT16: onnx.TensorProto.INT32,
                onnx.TensorProto.UINT64: onnx.TensorProto.INT64, onnx.TensorProto.BFLOAT16: onnx.TensorProto.FLOAT}


def insert_consumer_masks(model: onnx.ModelProto, masks: dict[str, list[np.ndarray]], elem_types: dict,
                          *, as_inputs: bool = False, prefix: str = "__gp_mask",
                          fills: dict[tuple[str, str], str] | None = None) -> dict[str, list[str]]:
    """Edit `model` in place: every node input reading a tensor of `masks` reads it with its masks applied,
    one after the other (Where(mask, x, 0) each; And for bool tensors).
    masks: tensor name -> bool arrays broadcastable to the tensor (False = removed).
    elem_types: tensor name -> onnx element type (float when missing).
    as_inputs: each mask becomes a bool graph input of the array's shape (fed at run time; the array's values
      are then only a shape) instead of an initializer holding the array.
    fills: (node name, tensor) -> a tensor of the masked one's type (a quantized input's zero point) that
      node reads in the removed places instead of 0.
    Returns tensor name -> names of its masks, for the tensors some node reads (the others get no mask)."""
    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    inits = {t.name for t in g.initializer}
    pending = {name: list(ms) for name, ms in masks.items() if ms and name not in inits}
    fills = fills or {}
    masked: dict[tuple[str, str, int], str] = {}
    mask_of: dict[tuple[str, int], str] = {}  # (tensor, step) -> its mask: one per step, shared by every scope
    mask_names: dict[str, list[str]] = {}
    counter = [0]

    def mask_name(name: str, j: int) -> str:
        if (name, j) not in mask_of:
            counter[0] += 1
            mname = f"{prefix}_{counter[0]}"
            mask = np.asarray(pending[name][j], dtype=bool)
            if as_inputs:
                g.input.append(helper.make_tensor_value_info(mname, onnx.TensorProto.BOOL, list(mask.shape)))
            else:
                g.initializer.append(numpy_helper.from_array(mask, mname))
            mask_of[(name, j)] = mname
            mask_names.setdefault(name, []).append(mname)
        return mask_of[(name, j)]

    def masked_value(name: str, fill: str, scope: int, out_nodes: list) -> str:
        # a subgraph body masks what its own nodes read, in its own scope (the tensor may be local to it);
        # the masks live at the top level, which every body sees
        if (name, fill, scope) in masked:
            return masked[(name, fill, scope)]
        elem = elem_types.get(name) or onnx.TensorProto.FLOAT
        current = name
        steps = pending[name]
        for j in range(len(steps)):
            mname = mask_name(name, j)
            counter[0] += 1
            k = counter[0]
            out = f"{name}__gp_masked" + (f"_{k}" if fill or scope else "") if j == len(steps) - 1 \
                else f"{name}__gp_masked_{k}_{j}"
            out_nodes.extend(_mask_nodes(g, mname, current, out, elem, f"{prefix}_{k}", fill, opset))
            current = out
        masked[(name, fill, scope)] = current
        return current

    def mask_scope(nodes, scope: int) -> None:
        new_nodes: list[onnx.NodeProto] = []
        for node in list(nodes):
            for i, name in enumerate(node.input):
                if name in pending:
                    node.input[i] = masked_value(name, fills.get((node.name, name), ""), scope, new_nodes)
            new_nodes.append(node)
            for body in subgraphs(node):
                mask_scope(body.node, id(body))
        del nodes[:]
        nodes.extend(new_nodes)

    mask_scope(g.node, 0)
    return mask_names


def _mask_nodes(g: onnx.GraphProto, mask: str, x: str, out: str, elem: int, tag: str,
                fill: str = "", opset: int = 0) -> list[onnx.NodeProto]:
    """Nodes computing out = where(mask, x, fill or 0) for a tensor of element type `elem`."""
    if elem == onnx.TensorProto.BOOL:  # onnxruntime's CPU Where has no bool kernel: mask with And
        return [helper.make_node("And", [mask, x], [out], name=f"{tag}_where")]
    if 0 < opset < 9 and not fill:  # Where arrived in opset 9: multiply by the mask cast to the tensor's type
        return [helper.make_node("Cast", [mask], [f"{out}_mask"], to=elem, name=f"{tag}_cast"),
                helper.make_node("Mul", [x, f"{out}_mask"], [out], name=f"{tag}_where")]
    # nor int16/uint16/uint64/bfloat16 kernels: mask in a wider type (exact) and cast back
    wide = _WHERE_WIDER.get(elem)
    nodes = []
    if fill:  # same type as x, broadcast by Where
        other = fill
        if wide:
            other = f"{tag}_fill_wide"
            nodes.append(helper.make_node("Cast", [fill], [other], to=wide, name=f"{tag}_widen_fill"))
    else:
        other = f"{tag}_zero"
        g.initializer.append(numpy_helper.from_array(
            np.zeros((), dtype=helper.tensor_dtype_to_np_dtype(wide or elem)), other))
    if not wide:
        return nodes + [helper.make_node("Where", [mask, x, other], [out], name=f"{tag}_where")]
    return nodes + [helper.make_node("Cast", [x], [f"{out}_wide"], to=wide, name=f"{tag}_widen"),
                    helper.make_node("Where", [mask, f"{out}_wide", other], [f"{out}_wide_masked"],
                                     name=f"{tag}_where"),
                    helper.make_node("Cast", [f"{out}_wide_masked"], [out], to=elem, name=f"{tag}_narrow")]
