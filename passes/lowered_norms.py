"""Fuse exporter-lowered LayerNorms back into LayerNormalization, so the exact LayerNorm rule prunes their width.
The pattern, why it is exact, and the near misses: graphprune/ops/_lowered_norms.py."""
from __future__ import annotations

import numpy as np
from onnx import helper

from graphprune.ir import Graph, subgraphs
from graphprune.ops._lowered_norms import LoweredLayerNorm, match_tf2onnx_layer_norm


def fuse_lowered_layer_norms(graph: Graph) -> int:
    """Replace every exact tf2onnx LayerNorm lowering by LayerNormalization; drop the nodes only it used."""
    fused = []
    for node in list(graph.nodes):
        match = match_tf2onnx_layer_norm(graph, node)
        if not isinstance(match, LoweredLayerNorm):
            continue
        np_dtype = helper.tensor_dtype_to_np_dtype(graph.dtypes[match.x])
        scale = graph.add_initializer(f"{node.name}/ln_scale", np.ones(match.width, np_dtype))
        bias = graph.add_initializer(f"{node.name}/ln_bias", np.zeros(match.width, np_dtype))
        ln = helper.make_node("LayerNormalization", [match.x, scale, bias], [match.y],
                              name=graph.fresh_name(f"{node.name}/LayerNormalization"), axis=-1,
                              epsilon=match.epsilon)
        at = graph.nodes.index(match.nodes[-1])
        graph.nodes[at] = ln
        graph.nodes.remove(match.nodes[0])
        fused.append(match)
    if fused:
        graph.reindex()
        _drop_dead(graph, {i for m in fused for n in m.nodes for i in n.input})
        graph.reindex()
    return len(fused)


def _drop_dead(graph: Graph, seeds: set) -> None:
    """Remove the nodes the fusion orphaned: producers of `seeds` that nothing reads any more, walking up through
    what they read, and readers of those tensors whose outputs nothing reads (a Shape whose Gather canonicalize
    folded already). Nodes with subgraphs stay."""
    outputs = set(graph.output_names)
    alive = {id(n) for n in graph.nodes}
    dead: set = set()

    def unused(node) -> bool:
        return not any(o and (o in outputs or any(id(u) not in dead for u, _ in graph.uses.get(o, [])))
                       for o in node.output)

    todo = [graph.producer.get(t) for t in seeds] + [u for t in seeds for u, _ in graph.uses.get(t, [])]
    while todo:
        node = todo.pop()
        if node is None or id(node) in dead or id(node) not in alive or subgraphs(node) or not unused(node):
            continue
        dead.add(id(node))
        for t in node.input:
            if t:
                todo.append(graph.producer.get(t))
                todo.extend(u for u, _ in graph.uses.get(t, []))
    graph.nodes = [n for n in graph.nodes if id(n) not in dead]
