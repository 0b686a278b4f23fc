"""Ops that select or join ranges of an axis: Concat (offset maps), Split, Slice (offset and selection maps,
bounds rewritten) and Gather (index maps, indices rewritten)."""
from __future__ import annotations

import numpy as np

from ..rules import rule
from ._reshape_algebra import is_int
from ._shape_tensors import write_int64_input

@rule("Concat")
def concat(node, c):
    """Input i's elements map to the output at its offset on the concat axis; other axes pass through."""
    y = node.output[0]
    r = c.rank(y)
    axis = c.attr("axis") % r
    inputs = [x for x in node.input if x]
    sizes = [c.shape(x)[axis] for x in inputs]
    known = all(is_int(s) for s in sizes)
    offset = 0
    for x, n in zip(inputs, sizes):
        for ax in range(r):
            if ax != axis:
                c.link(x, ax, y, ax)
            elif known:
                c.link(x, ax, y, ax, np.arange(n), offset + np.arange(n))
            else:
                c.freeze(x, ax, reason="concatenated along an axis of unknown size")
        offset += n if known else 0
    if not known:
        c.freeze(y, axis, reason="concatenated along an axis of unknown size")


def _split(node, c, given, write_sizes):
    """Split with sizes `given` (attribute or input), or None for an equal split; `write_sizes(rw, node, sizes)`
    spells new sizes out in this opset's form."""
    x = node.input[0]
    r = c.rank(x)
    axis = c.attr("axis", 0) % r
    sizes = given
    if sizes is None:
        sizes = [c.shape(o)[axis] for o in node.output]
        sizes = sizes if all(is_int(s) for s in sizes) else None
    if sizes is None or not is_int(c.shape(x)[axis]):
        c.freeze_all("split sizes unknown")
        return
    offset = 0
    for out, n in zip(node.output, sizes):
        for ax in range(r):
            if ax != axis:
                c.link(x, ax, out, ax)
            else:
                c.link(x, ax, out, ax, offset + np.arange(n), np.arange(n))
        offset += n

    def fix(rw, node, axis=axis, given=given is not None):
        new = [int(rw.new_shape(o)[axis]) for o in node.output]
        if given:
            write_sizes(rw, node, new)
        elif len(set(new)) > 1:  # equal split no longer equal: spell the sizes out
            rw.drop_attr(node, "num_outputs")
            write_sizes(rw, node, new)
    c.fixup(fix)


def _sizes_attribute(rw, node, sizes):
    rw.set_attr(node, "split", sizes)


@rule("Split", until=12)
def split_attr(node, c):
    """Output i maps to its offset range of the input; the `split` attribute is rewritten."""
    given = c.attr("split")
    _split(node, c, None if given is None else list(given), _sizes_attribute)


@rule("Split", since=13)
def split(node, c):
    """Output i maps to its offset range of the input; the split sizes input is rewritten."""
    given = None
    if len(node.input) > 1 and node.input[1]:
        value = c.const(node.input[1])
        c.not_channel(node.input[1])
        if value is None:
            c.freeze_all("split sizes unknown")
            return
        given = [int(v) for v in value.reshape(-1)]
    _split(node, c, given, write_int64_input)


def _length(c, name):
    shape = c.shape(name)
    return int(shape[0]) if shape and is_int(shape[0]) else None


def _slice_attributes(node, c):
    starts, ends = c.attr("starts"), c.attr("ends")
    axes = c.attr("axes", list(range(len(starts))))
    steps = [1] * len(starts)
    return starts, ends, axes, steps, "attr"


def _slice_inputs(node, c):
    vals = []
    for k in range(1, 5):
        name = node.input[k] if len(node.input) > k else ""
        if not name:
            vals.append(None)
            continue
        v = c.const(name)
        c.not_channel(name)
        vals.append(None if v is None else [int(a) for a in v.reshape(-1)])
    starts, ends, axes, steps = vals
    if axes is None and len(node.input) > 3 and node.input[3]:
        return None  # axes computed at run time: any axis may be cut
    if starts is None or ends is None or (steps is None and len(node.input) > 4 and node.input[4]):
        # bounds computed at run time (T5: a Shape of the sequence axis): only the axes they name are unknown
        n = _length(c, node.input[1]) if starts is None else len(starts)
        if axes is None and n is None:
            return None
        return None, None, list(range(n)) if axes is None else axes, None, "computed"
    if axes is None:
        axes = list(range(len(starts)))
    if steps is None:
        steps = [1] * len(starts)
    return starts, ends, axes, steps, "input"


@rule("Slice", until=9)
def slice_attr(node, c):
    """Like Slice-10 with bounds as attributes (step 1)."""
    _slice(node, c, _slice_attributes(node, c))


@rule("Slice", since=10)
def slice_(node, c):
    """Step ±1: selected elements map to the output, the rest are free; bounds are rewritten. Strided: frozen."""
    _slice(node, c, _slice_inputs(node, c))


def _slice(node, c, params):
    x, y = node.input[0], node.output[0]
    xs = c.shape(x)
    r = len(xs)
    if params is None:
        c.freeze_all("slice bounds are not constant")
        return
    starts, ends, axes, steps, source = params
    if source == "computed":
        for ax in range(r):
            if ax in {a % r for a in axes}:
                c.freeze(x, ax, reason="slice bounds on this axis are computed at run time")
                c.freeze(y, ax, reason="slice bounds on this axis are computed at run time")
            else:
                c.link(x, ax, y, ax)
        return
    spec = {a % r: (s, e, st) for s, e, a, st in zip(starts, ends, axes, steps)}
    selections = {}
    for ax in range(r):
        if ax not in spec:
            c.link(x, ax, y, ax)
            continue
        dim = xs[ax]
        if not is_int(dim):
            c.touch(x, ax)
            c.touch(y, ax)
            continue
        s, e, st = spec[ax]
        sel = np.arange(*slice(s, e, st).indices(dim), dtype=np.int64)
        if abs(st) != 1:
            c.freeze(x, ax, reason="strided slice keeps this axis whole")
            c.freeze(y, ax, reason="strided slice keeps this axis whole")
            continue
        if len(sel):
            c.link(y, ax, x, ax, np.arange(len(sel)), sel)
        c.touch(x, ax)  # unselected elements are free to go
        selections[ax] = sel

    def fix(rw, node, selections=selections, spec=spec, source=source, axes=axes, starts=starts, ends=ends):
        new_starts, new_ends = list(starts), list(ends)
        # starts/ends/axes/steps share one index type (int32 from jax2tf/tf2onnx): keep the one the model uses
        index_type = rw.graph.const(node.input[1]).dtype if source != "attr" else np.dtype(np.int64)
        for k, a in enumerate(axes):
            ax = a % r
            if ax not in selections or not len(rw.removed(node.input[0], ax)):
                continue
            sel = selections[ax]
            kept = rw.kept(node.input[0], ax)
            pos = np.searchsorted(kept, sel)
            keep = pos < len(kept)
            keep[keep] &= kept[pos[keep]] == sel[keep]
            p = pos[keep]
            step = spec[ax][2]
            if len(p) and not np.array_equal(np.abs(np.diff(p)), np.ones(len(p) - 1, dtype=p.dtype)):
                raise AssertionError(f"slice on axis {ax} is no longer contiguous")
            new_starts[k] = int(p[0])
            new_ends[k] = int(p[-1]) + 1 if step > 0 else (int(p[-1]) - 1 if p[-1] > 0
                                                          else int(np.iinfo(index_type).min))
        if source == "attr":
            rw.set_attr(node, "starts", new_starts)
            rw.set_attr(node, "ends", new_ends)
        else:
            rw.set_const_input(node, 1, np.array(new_starts, dtype=index_type))
            rw.set_const_input(node, 2, np.array(new_ends, dtype=index_type))
    c.fixup(fix)


@rule("Gather")
def gather(node, c):
    """Constant indices map output to input elements (indices rewritten); a lookup table's rows are not channels."""
    data, indices, y = node.input[0], node.input[1], node.output[0]
    r = c.rank(data)
    axis = c.attr("axis", 0) % r
    idx = c.const(indices)
    ri = c.rank(indices)
    # output axes: data[:axis] + indices.shape + data[axis+1:]
    for ax in range(axis):
        c.link(data, ax, y, ax)
    for ax in range(axis + 1, r):
        c.link(data, ax, y, ax - 1 + ri)
    if idx is None:
        # a lookup table indexed at run time (embedding): its rows are not channels
        c.not_channel(data, [axis])
        for k in range(ri):
            c.link(indices, k, y, axis + k)
        if c.const(data) is not None:
            c.role(data, "weight")
        return
    c.not_channel(indices)
    dim = c.shape(data)[axis]
    if ri == 1 and is_int(dim):
        flat = np.where(idx < 0, idx + dim, idx).astype(np.int64)
        c.link(y, axis, data, axis, np.arange(len(flat)), flat)
        c.touch(data, axis)

        def fix(rw, node, axis=axis, flat=flat):
            if not len(rw.removed(node.input[0], axis)) and not len(rw.removed(node.output[0], axis)):
                return
            kept_out = rw.kept(node.output[0], axis)
            kept_in = rw.kept(node.input[0], axis)
            new = np.searchsorted(kept_in, flat[kept_out]).astype(idx.dtype)
            rw.set_const_input(node, 1, new)
        c.fixup(fix)
    elif ri == 0 and is_int(dim):
        i = int(idx) % dim
        c.freeze(data, axis, idx=[i], reason="a single index is gathered from this axis")
        c.touch(data, axis)

        def fix0(rw, node, axis=axis, i=i):
            if len(rw.removed(node.input[0], axis)):
                kept_in = rw.kept(node.input[0], axis)
                rw.set_const_input(node, 1, np.array(int(np.searchsorted(kept_in, i)), dtype=idx.dtype))
        c.fixup(fix0)
    else:
        c.freeze(data, axis, reason="multi-dimensional gather indices")
        for k in range(ri):
            c.not_channel(y, [axis + k])
