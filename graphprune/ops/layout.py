"""Ops that move axes around without changing values: Reshape/Flatten (mixed-radix split/merge, see
_reshape_algebra), Squeeze/Unsqueeze and Transpose."""
from __future__ import annotations


from ..rules import rule
from ._reshape_algebra import map_reshape
from ._shape_tensors import freeze_dim, rewrite_shape_entries, shape_entries, write_int64_input


@rule("Reshape")
def reshape(node, c):
    """Exact mixed-radix index algebra: split/merged axes couple through one factor; the target constant is rewritten."""
    x, y = node.input[0], node.output[0]
    entries = shape_entries(c, node.input[1], c.rank(y))
    # the Shape rule leaves dims copied into this target (Dim entries) to this rule: freeze them when giving up
    if c.shape(x) is None or c.shape(y) is None:
        c.freeze_all("shapes unknown")
        for v in entries or []:
            freeze_dim(c, v, reason="its size, read by a Shape op, sizes a reshape of unknown shapes")
        return
    if c.attr("allowzero", 0) and entries and 0 in entries:
        c.freeze_all("allowzero reshape")
        for v in entries:
            freeze_dim(c, v, reason="its size, read by a Shape op, sizes an allowzero reshape")
        return
    c.not_channel(node.input[1])
    map_reshape(c, x, y, entries)

    def fix(rw, node):
        old = entries
        new_shape = rw.new_shape(node.output[0])
        # computed entries (None) and copies of a dim (Dim) follow by themselves; 0 and -1 need no rewrite
        values = [None if (not isinstance(v, int) or v in (0, -1)) else int(new_shape[k]) for k, v in enumerate(old)]
        rewrite_shape_entries(rw, node, 1, values)
    c.fixup(fix)


@rule("Flatten")
def flatten(node, c):
    """Exact mixed-radix map like Reshape (channel c owns a block of the flattened axis)."""
    x, y = node.input[0], node.output[0]
    if c.shape(x) is None or c.shape(y) is None:
        c.freeze_all("shapes unknown")
        return
    map_reshape(c, x, y)


def _axes_arg(node, c, default=None):
    axes = c.attr("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = c.const(node.input[1])
        if value is None:
            return None
        c.not_channel(node.input[1])
        axes = [int(a) for a in value.reshape(-1)]
    return default if axes is None else list(axes)


def _squeeze(node, c, write_axes):
    x, y = node.input[0], node.output[0]
    xs = c.shape(x)
    if len(node.input) > 1 and node.input[1] and c.const(node.input[1]) is None:
        c.freeze_all("squeeze axes are not constant")
        return
    axes = _axes_arg(node, c)
    implicit = axes is None
    if implicit:
        axes = [k for k, d in enumerate(xs) if d == 1]
    axes = {a % len(xs) for a in axes}
    kept = [k for k in range(len(xs)) if k not in axes]
    c.not_channel(x, sorted(axes))
    for out_ax, in_ax in enumerate(kept):
        c.link(x, in_ax, y, out_ax)
    if implicit:
        # Squeeze with no axes drops every size-1 dim: a channel axis pruned down to 1 would vanish too and
        # change the rank. Spell the axes out once channels are removed.
        kept_axes = sorted(axes)
        c.fixup(lambda rw, node: write_axes(rw, node, kept_axes))


def _axes_attribute(rw, node, axes):
    rw.set_attr(node, "axes", axes)


@rule("Squeeze", until=12)
def squeeze_attr(node, c):
    """Remaining axes pass through; squeezed size-1 axes are not channels (axes as an attribute)."""
    _squeeze(node, c, _axes_attribute)


@rule("Squeeze", since=13)
def squeeze(node, c):
    """Remaining axes pass through; squeezed size-1 axes are not channels (axes as an input)."""
    _squeeze(node, c, write_int64_input)


@rule("Unsqueeze")
def unsqueeze(node, c):
    """Existing axes pass through; inserted size-1 axes are not channels."""
    x, y = node.input[0], node.output[0]
    ry = c.rank(y)
    axes = _axes_arg(node, c)
    if axes is None:
        c.freeze_all("unsqueeze axes are not constant")
        return
    axes = {a % ry for a in axes}
    kept = [k for k in range(ry) if k not in axes]
    c.not_channel(y, sorted(axes))
    for in_ax, out_ax in enumerate(kept):
        c.link(x, in_ax, y, out_ax)


@rule("Transpose")
def transpose(node, c):
    """Axis perm[i] of the input is axis i of the output."""
    x, y = node.input[0], node.output[0]
    r = c.rank(x)
    perm = c.attr("perm", list(range(r))[::-1])
    for out_ax, in_ax in enumerate(perm):
        c.link(x, in_ax, y, out_ax)
