"""Consumer-side channel masks: the masked original that pruning is checked and measured against.

Masking the producer is the wrong oracle (after a BatchNorm the zeros come back as constants), so every node
that reads a masked tensor reads Where(mask, x, 0) instead; other readers of the producer, graph outputs and
subgraph bodies see the tensor unchanged, and initializers are never masked here (weights are edited
directly). A mask is either a constant (verification: one fixed set of removed channels) or a bool graph
input (sensitivity: one session, the removed channels change with the feeds); both build the same nodes.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

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
    masked: dict[tuple[str, str], str] = {}
    mask_names: dict[str, list[str]] = {}
    new_nodes: list[onnx.NodeProto] = []
    counter = [0]

    def masked_value(name: str, fill: str) -> str:
        if (name, fill) in masked:
            return masked[(name, fill)]
        elem = elem_types.get(name) or onnx.TensorProto.FLOAT
        current = name
        steps = pending[name]
        for j, mask in enumerate(steps):
            counter[0] += 1
            k = counter[0]
            mname = f"{prefix}_{k}"
            mask = np.asarray(mask, dtype=bool)
            if as_inputs:
                g.input.append(helper.make_tensor_value_info(mname, onnx.TensorProto.BOOL, list(mask.shape)))
            else:
                g.initializer.append(numpy_helper.from_array(mask, mname))
            out = f"{name}__gp_masked" + (f"_{k}" if fill else "") if j == len(steps) - 1 \
                else f"{name}__gp_masked_{k}_{j}"
            new_nodes.extend(_mask_nodes(g, mname, current, out, elem, f"{prefix}_{k}", fill, opset))
            mask_names.setdefault(name, []).append(mname)
            current = out
        masked[(name, fill)] = current
        return current

    for node in list(g.node):
        for i, name in enumerate(node.input):
            if name in pending:
                node.input[i] = masked_value(name, fills.get((node.name, name), ""))
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
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
