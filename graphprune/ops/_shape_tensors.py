"""Shape tensors (a Reshape target, an Expand shape, ...): which positions are constants a fixup can rewrite,
which are copies of another tensor's dim (they follow that dim by themselves), and rewriting the constants
without touching constants other nodes share."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

# ops that pass the values of a shape tensor through unchanged (a Reshape only regroups them: to a scalar or [1])
_PASS = ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape")


@dataclass(frozen=True)
class Dim:
    """A shape entry computed at run time as exactly `Shape(tensor)[axis]`: it follows that dim's new size."""
    tensor: str
    axis: int


def shape_entries(c, name, length=None):
    """Per position of a 1-D shape tensor: its constant int value, a Dim where it copies a dim read by a Shape
    op, or None where it is computed at run time in another way."""
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
                # a computed piece of known length leaves the literal pieces around it rewritable
                n = _length(c, piece)
                if n is None:
                    return None if length is None else [None] * length
                sub = [None] * n
            out.extend(sub)
        return out
    if node is not None and node.op_type in _PASS:
        sub = shape_entries(c, node.input[0])
        if sub is not None:
            return sub
    dims = shape_dims(c, name)
    if dims is not None:
        return dims
    n = _length(c, name)
    if n is not None:
        return [None] * n
    return None if length is None else [None] * length


def _length(c, name):
    shape = c.shape(name)
    if shape is None:
        return None
    if len(shape) == 0:
        return 1
    return int(np.prod(shape)) if all(isinstance(d, int) for d in shape) else None


def shape_dims(c, name, depth=0):
    """Where `name` is (a piece of) `Shape(t)` selected with constant indices, the Dim of each position;
    else None."""
    node = c.graph.producer.get(name)
    if node is None or depth > 8:
        return None
    if node.op_type == "Shape":
        shape = c.shape(node.input[0])
        if shape is None:
            return None
        r = len(shape)
        start, end = _shape_range(node, r)
        return [Dim(node.input[0], a) for a in range(start, end)]
    if node.op_type in _PASS:
        return shape_dims(c, node.input[0], depth + 1)
    if node.op_type == "Gather" and c.const(node.input[1]) is not None:
        sub = shape_dims(c, node.input[0], depth + 1)
        if sub is None:
            return None
        return [sub[int(i) % len(sub)] for i in c.const(node.input[1]).reshape(-1)]
    if node.op_type == "Slice":
        sub = shape_dims(c, node.input[0], depth + 1)
        bounds = [c.const(n) if n else None for n in list(node.input[1:5]) + [""] * (5 - len(node.input))]
        if sub is None or bounds[0] is None or bounds[1] is None:
            return None
        if bounds[2] is not None and [int(a) for a in bounds[2].reshape(-1)] not in ([0], [-1]):
            return None
        step = int(bounds[3].reshape(-1)[0]) if bounds[3] is not None else 1
        s, e = int(bounds[0].reshape(-1)[0]), int(bounds[1].reshape(-1)[0])
        return [sub[k] for k in range(*slice(s, e, step).indices(len(sub)))]
    return None


def _shape_range(node, r):
    """[start, end) of the dims a Shape op returns (opset 15 start/end: negative counts from the back, clamped)."""
    start, end = 0, r
    for a in node.attribute:
        if a.name == "start":
            start = a.i
        elif a.name == "end":
            end = a.i
    start = min(max(start + r if start < 0 else start, 0), r)
    end = min(max(end + r if end < 0 else end, 0), r)
    return start, end


def write_int64_input(rw, node, values, index: int = 1) -> None:
    """Set input `index` (Split's sizes, Squeeze/Unsqueeze's axes from opset 13) to an int64 constant, adding
    the empty inputs before it if the node left them out."""
    while len(node.input) < index + 1:
        node.input.append("")
    rw.set_const_input(node, index, np.array(values, dtype=np.int64))


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
    if len({id(n) for n, _ in rw.graph.uses.get(name, [])}) > 1 or name in rw.graph.output_names:
        # a shape tensor other nodes read too (the dynamo exporter shares one Concat between the Reshapes of
        # every layer): writing into it would resize the others, which may lose a different count; this
        # reader gets its own copy of the producer
        producer = _own_copy(rw, producer, name)
        node.input[index] = producer.output[0]
    if producer.op_type in _PASS:  # values keep their order through these
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


def _own_copy(rw, producer, name):
    """A copy of the single-output node `producer` with a fresh output name, spliced in right after it (its
    inputs are already computed there), for one reader to rewrite alone."""
    clone = onnx.NodeProto()
    clone.CopyFrom(producer)
    clone.name = rw.fresh_name(f"{producer.name or name}_own")
    del clone.output[:]
    clone.output.append(rw.fresh_name(f"{name}_own"))
    rw.replacements[id(producer)] = rw.replacements.get(id(producer), [producer]) + [clone]
    rw.graph.producer[clone.output[0]] = clone
    return clone


# where a value derived from Shape() may end up and still be followed: (op, input index) of the rules that read
# Dim entries and either couple the dim with the axis it sizes or freeze it
SINKS = {("Reshape", 1), ("Expand", 1), ("ConstantOfShape", 0)}


def dims_followed(c, name, depth=0):
    """True when every value use of `name` (a piece of a Shape output) ends, through ops shape_dims sees
    through, in a SINKS input that resolves every position (literal or Dim): then the sink's rule, not the
    Shape rule, decides whether the dims it copies stay free."""
    if depth > 12 or name in c.graph.output_names:
        return False
    uses = c.graph.uses.get(name, [])
    if not uses:
        return False
    for use, slot in uses:
        if (use.op_type, slot) in SINKS:
            entries = shape_entries(c, use.input[slot])
            if entries is None or any(v is None for v in entries):
                return False
            continue
        if slot != 0 and use.op_type != "Concat":
            return False
        if use.op_type == "Gather" and c.const(use.input[1]) is None:
            return False
        if use.op_type == "Slice" and shape_dims(c, use.output[0]) is None:
            return False
        if use.op_type not in _PASS + ("Gather", "Slice", "Concat"):
            return False
        if not dims_followed(c, use.output[0], depth + 1):
            return False
    return True


def follow_dim(c, entry, y, ao, reason):
    """A Dim entry sizing axis `ao` of y: after pruning it reads the new size of its dim, so the two must lose
    the same elements (identity coupling); where sizes differ or are unknown, the dim is frozen instead."""
    if not isinstance(entry, Dim):
        return
    size, own = c.shape(entry.tensor)[entry.axis], c.shape(y)[ao]
    if isinstance(size, int) and size == own:
        c.link(entry.tensor, entry.axis, y, ao)
    else:
        c.freeze(entry.tensor, entry.axis, reason=reason)


def freeze_dim(c, entry, reason):
    if isinstance(entry, Dim):
        c.freeze(entry.tensor, entry.axis, reason=reason)
