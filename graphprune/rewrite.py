"""Physically remove planned channels: slice initializers, let rules fix attributes and shape constants."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .ir import Graph, set_attr, subgraphs, walk_nodes


class Rewriter:
    """What a rule's fixup sees: removed/kept indices per tensor axis, old and new shapes, safe setters."""

    def __init__(self, graph: Graph, removed: dict[tuple[str, int], np.ndarray]):
        self.graph = graph
        self._removed = {k: np.unique(np.asarray(v, dtype=np.int64)) for k, v in removed.items() if len(v)}
        self._old_shapes = dict(graph.shapes)
        self.changed_tensors = {k[0] for k in self._removed}
        self.replacements: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> nodes spliced in its place

    def removed(self, name: str, axis: int) -> np.ndarray:
        shape = self._old_shapes.get(name)
        if shape is None:
            return np.zeros(0, np.int64)
        return self._removed.get((name, axis % len(shape)), np.zeros(0, np.int64))

    def kept(self, name: str, axis: int) -> np.ndarray:
        shape = self._old_shapes[name]
        dim = shape[axis % len(shape)]
        return np.setdiff1d(np.arange(dim, dtype=np.int64), self.removed(name, axis))

    def old_shape(self, name: str) -> tuple:
        return self._old_shapes[name]

    def new_shape(self, name: str) -> tuple:
        shape = self._old_shapes[name]
        return tuple(d - len(self.removed(name, ax)) if isinstance(d, int) else d for ax, d in enumerate(shape))

    def set_const_input(self, node: onnx.NodeProto, index: int, array: np.ndarray) -> None:
        """Give node.input[index] a new constant; never changes a constant other nodes may share."""
        base = node.input[index] if index < len(node.input) and node.input[index] else f"{node.name}_input{index}"
        name = self.graph.add_initializer(base.split("__")[0], np.asarray(array))
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name

    def set_attr(self, node: onnx.NodeProto, name: str, value) -> None:
        set_attr(node, name, value)

    def fresh_name(self, base: str) -> str:
        """A tensor or node name no other tensor, initializer or node uses."""
        return self.graph.fresh_name(base)

    def add_const(self, base: str, array: np.ndarray) -> str:
        """A new initializer (never shared with an existing one); returns its name."""
        return self.graph.add_initializer(base, np.asarray(array))

    def replace_node(self, node: onnx.NodeProto, new_nodes: list[onnx.NodeProto]) -> None:
        """Splice `new_nodes` in place of `node` (so topological order holds); they must produce node's outputs
        under the same names, which keeps every consumer and graph output pointing at the right tensor."""
        produced = {o for n in new_nodes for o in n.output}
        missing = [o for o in node.output if o and o not in produced]
        if missing:
            raise ValueError(f"replacement of '{node.name}' does not produce {missing}")
        self.replacements[id(node)] = list(new_nodes)

    def drop_attr(self, node: onnx.NodeProto, name: str) -> None:
        for i, a in enumerate(node.attribute):
            if a.name == name:
                del node.attribute[i]
                return


def node_touches(node: onnx.NodeProto, changed: set[str]) -> bool:
    return any(n in changed for n in node.input) or any(n in changed for n in node.output)


def apply_removal(graph: Graph, fixups, removed: dict[tuple[str, int], np.ndarray],
                  weight_updates: dict[str, np.ndarray] | None = None) -> Rewriter:
    """Rewrite `graph` in place so that the `removed` elements no longer exist."""
    rw = Rewriter(graph, removed)
    for node, fn in fixups:
        if node_touches(node, rw.changed_tensors):
            fn(rw, node)
    if rw.replacements:
        graph.nodes = [n for node in graph.nodes for n in rw.replacements.get(id(node), [node])]
        for body in _bodies(graph.nodes):  # a fixup may replace a node inside a Loop/Scan/If body too
            nodes = [n for node in body.node for n in rw.replacements.get(id(node), [node])]
            del body.node[:]
            body.node.extend(nodes)
    for body in _bodies(graph.nodes):
        _resize_body(rw, body)
    for name, arr in (weight_updates or {}).items():
        graph.set_initializer(name, arr)
    for name in list(graph.initializers):
        if name not in rw.changed_tensors:
            continue
        arr = graph.initializers[name]
        for ax in range(arr.ndim):
            gone = rw.removed(name, ax)
            if len(gone):
                arr = np.delete(arr, gone, axis=ax)
        graph.set_initializer(name, arr)
    graph.reindex()
    # hints describe the old widths: carry them over with the removed channels subtracted
    graph.shape_hints = {name: rw.new_shape(name) for name in graph.shape_hints if name in rw._old_shapes}
    graph.infer_shapes()
    return rw


def _bodies(nodes):
    return [body for _, node in walk_nodes(nodes) for body in subgraphs(node)]


def _resize_body(rw: Rewriter, body: onnx.GraphProto) -> None:
    """A body declares its formal inputs' and outputs' shapes: write the new widths there, slice the initializers
    it still holds itself, and drop its value_info (shape inference fills it again)."""
    del body.value_info[:]
    for v in list(body.input) + list(body.output):
        if v.name not in rw.changed_tensors or not v.type.tensor_type.HasField("shape"):
            continue
        dims = v.type.tensor_type.shape.dim
        for ax, d in enumerate(dims):
            gone = rw.removed(v.name, ax)
            if len(gone) and d.HasField("dim_value"):
                d.dim_value -= len(gone)
    for k, t in enumerate(body.initializer):
        if t.name in rw.changed_tensors:
            arr = numpy_helper.to_array(t)
            for ax in range(arr.ndim):
                if len(rw.removed(t.name, ax)):
                    arr = np.delete(arr, rw.removed(t.name, ax), axis=ax)
            body.initializer[k].CopyFrom(numpy_helper.from_array(arr, t.name))
