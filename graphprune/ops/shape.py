"""Ops that read sizes (Shape, Size) or make new tensors from values (ConstantOfShape, Range, ...): the sizes
they read stay as they are."""
from __future__ import annotations

from ..rules import rule
from ._shape_tensors import Dim, dims_followed, follow_dim, freeze_dim, rewrite_shape_entries, shape_dims, shape_entries


@rule("Shape")
def shape(node, c):
    """Shape values change when channels go: freeze the dims whose value is read (usually only dynamic
    batch/sequence dims are left after constant folding), except exact copies that only size a
    Reshape/Expand/ConstantOfShape, whose rule couples them with the axis they size."""
    x, y = node.input[0], node.output[0]
    r = c.rank(x)
    # negative start/end count from the back (r + v, not v mod r + 1), then clamp to [0, r]
    start, end = c.attr("start", 0), c.attr("end", r)
    start = min(max(start + r if start < 0 else start, 0), r)
    end = min(max(end + r if end < 0 else end, 0), r)
    # a shape that is itself a graph output is read in full (it has no uses inside the graph)
    read = set(range(end - start)) if y in c.graph.output_names else set()
    for use in _value_uses(c.graph, y):
        if (use.op_type in ("Gather", "Slice") and shape_dims(c, use.output[0]) is not None
                and dims_followed(c, use.output[0])):
            # the dims picked here only size a Reshape/Expand/ConstantOfShape output (possibly via
            # Concat/Unsqueeze/Cast): that rule couples each with the axis it sizes, or freezes it
            continue
        if use.op_type == "Gather" and c.const(use.input[1]) is not None:
            read.update(int(i) % (end - start) for i in c.const(use.input[1]).reshape(-1))
        elif use.op_type == "Slice" and len(use.input) >= 3 and all(c.const(n) is not None for n in use.input[1:3]):
            s, e = int(c.const(use.input[1]).reshape(-1)[0]), int(c.const(use.input[2]).reshape(-1)[0])
            st = int(c.const(use.input[4]).reshape(-1)[0]) if len(use.input) > 4 and use.input[4] else 1
            read.update(range(*slice(s, e, st).indices(end - start)))
        else:
            read.update(range(end - start))
    for ax in range(r):
        if ax - start in read:
            c.freeze(x, ax, reason="its size is read by a Shape op")
        else:
            c.touch(x, ax)
    c.not_channel(y)


def _value_uses(graph, name, depth=0):
    """The nodes that read the values of `name`, looking through Cast (tf2onnx casts shapes to int32 and back)."""
    for use, _ in graph.uses.get(name, []):
        if use.op_type == "Cast" and depth < 4:
            if use.output[0] in graph.output_names:
                yield use
            yield from _value_uses(graph, use.output[0], depth + 1)
        else:
            yield use


@rule("Size")
def size(node, c):
    """Reads the element count: the input stays whole."""
    c.freeze(node.input[0], reason="its size is read by a Size op")
    c.not_channel(node.output[0])


@rule("ConstantOfShape")
def constant_of_shape(node, c):
    """All elements equal: an axis sized by a literal (rewritten, also inside a Concat) or by a copy Shape(t)[k]
    (coupled with t's dim) can lose any of them; sizes computed otherwise are frozen."""
    y = node.output[0]
    c.not_channel(node.input[0])
    entries = shape_entries(c, node.input[0], c.rank(y))
    if c.rank(y) is None:
        c.freeze(y, reason="tensor created by ConstantOfShape of unknown rank")
        for v in entries or []:
            freeze_dim(c, v, reason="its size, read by a Shape op, sizes a ConstantOfShape of unknown rank")
        return
    for ax in range(c.rank(y)):
        entry = entries[ax] if entries is not None and ax < len(entries) else None
        if isinstance(entry, Dim):
            follow_dim(c, entry, y, ax, reason="its size, read by a Shape op, sizes a ConstantOfShape of another size")
        elif isinstance(entry, int):
            c.touch(y, ax)
        else:
            c.freeze(y, ax, reason="tensor created by ConstantOfShape with a size computed at run time")

    def fix(rw, node, entries=entries):
        new_y, old_y = rw.new_shape(node.output[0]), rw.old_shape(node.output[0])
        values = [int(new_y[k]) if isinstance(v, int) and new_y[k] != old_y[k] else None
                  for k, v in enumerate(entries or [])]
        if any(v is not None for v in values):
            rewrite_shape_entries(rw, node, 0, values)
    c.fixup(fix)


@rule("Range")
def range_(node, c):
    """The output is a new tensor of values start, start + delta, ... < limit: frozen. A start/limit/delta read
    from a dim (Shape(t)[k] where canonicalize could not fold it: static reads fold to literals) keeps that dim
    whole: removing an element would change the values made."""
    for k, name in enumerate(node.input):
        c.not_channel(name)
        for entry in shape_entries(c, name) or []:
            freeze_dim(c, entry, reason=f"its size is the {('start', 'limit', 'delta')[k]} of Range node "
                                        f"'{node.name}': the values it makes would change")
    c.freeze(node.output[0], reason="tensor created by Range")


@rule("RandomNormalLike", "RandomUniformLike", "EyeLike", "NonZero")
def new_tensor(node, c):
    """The output is a new tensor whose size comes from values: frozen."""
    for name in node.input:
        c.freeze(name, reason="shape read")
    for name in node.output:
        c.freeze(name, reason=f"tensor created by {node.op_type}")
