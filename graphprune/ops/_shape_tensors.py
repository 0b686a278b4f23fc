"""Shape tensors (a Reshape target, an Expand shape, ...): which positions are constants a fixup can rewrite,
and rewriting them without touching constants other nodes share."""
from __future__ import annotations

import numpy as np


def shape_entries(c, name, length=None):
    """Per position of a 1-D shape tensor: its constant int value, or None where it is computed at run time."""
    if not name:
        return None
    value = c.const(name)
    if value is not None:
        return [int(v) for v in value.reshape(-1)]
    node = c.graph.producer.get(name)
    if node is not None and node.op_type == "Concat":
        out = []
        for piece in node.input:
            sub = shape_entries(c, piece)
            if sub is None:
                return None if length is None else [None] * length
            out.extend(sub)
        return out
    if node is not None and node.op_type in ("Unsqueeze", "Cast", "Identity"):
        sub = shape_entries(c, node.input[0])
        if sub is not None:
            return sub
    shape = c.shape(name)
    if shape and isinstance(shape[0], int):
        return [None] * shape[0]
    return None if length is None else [None] * length


def rewrite_shape_entries(rw, node, index, new_values):
    """Write new values (None = keep) into the shape tensor at node.input[index]: a constant, or the constant
    pieces of a Concat. Shared constants are never changed in place."""
    name = node.input[index]
    if rw.graph.const(name) is not None:
        old = rw.graph.const(name).reshape(-1)
        new = old.copy()
        for k, v in enumerate(new_values):
            if v is not None:
                new[k] = v
        if not np.array_equal(new, old):
            rw.set_const_input(node, index, new.reshape(rw.graph.const(name).shape))
        return
    producer = rw.graph.producer[name]
    if producer.op_type in ("Unsqueeze", "Cast", "Identity"):
        rewrite_shape_entries(rw, producer, 0, new_values)
        return
    assert producer.op_type == "Concat", f"cannot rewrite shape tensor '{name}' made by {producer.op_type}"
    pos = 0
    for i, piece in enumerate(producer.input):
        shape = rw.graph.shape(piece)
        n = int(np.prod(shape)) if shape else 1
        part = new_values[pos:pos + n]
        if any(v is not None for v in part):
            rewrite_shape_entries(rw, producer, i, part)
        pos += n
