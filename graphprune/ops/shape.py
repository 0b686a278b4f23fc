"""Layout ops as exact index algebra: Reshape/Flatten (mixed-radix axis split/merge), Squeeze/Unsqueeze,
Transpose, Concat/Split/Slice/Gather (offset and index maps), Expand/Tile (repeat maps), Pad, Resize,
DepthToSpace/SpaceToDepth (channel blocks), and the shape ops whose values depend on channel counts."""
from __future__ import annotations

import numpy as np

from ..analysis import rule

INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min


# ---- shape tensors: which positions are constants we can rewrite ------------------------------------------------
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


# ---- Reshape / Flatten -------------------------------------------------------------------------------------------
def _is_int(d):
    return isinstance(d, (int, np.integer))


def reshape_segments(xs, ys):
    """Split (xs -> ys) into runs of axes with equal products, matching from the left and then, past a
    dynamic run that cannot be matched, from the right ([B, S, 768] -> [-1, 768] keeps 768 mapped).
    Returns (segments, unmapped middle or None)."""
    segs, tail = _segments_left(xs, ys)
    if tail is None:
        return segs, None
    ti, tj = tail
    rx = [xs[k] for k in ti][::-1]
    ry = [ys[k] for k in tj][::-1]
    rsegs, rtail = _segments_left(rx, ry)
    # map reversed positions back to absolute axes
    for ia, oa in rsegs:
        segs.append(([ti[len(ti) - 1 - a] for a in ia][::-1], [tj[len(tj) - 1 - a] for a in oa][::-1]))
    if rtail is None:
        return segs, None
    mid_i = sorted(ti[len(ti) - 1 - a] for a in rtail[0])
    mid_j = sorted(tj[len(tj) - 1 - a] for a in rtail[1])
    return segs, (mid_i, mid_j)


def _segments_left(xs, ys):
    segs = []
    i = j = 0
    nx, ny = len(xs), len(ys)
    while i < nx or j < ny:
        if (i < nx and not _is_int(xs[i])) or (j < ny and not _is_int(ys[j])):
            if i < nx and j < ny and xs[i] == ys[j] and xs[i] is not None:
                segs.append(([i], [j]))
                i += 1
                j += 1
                continue
            return segs, (list(range(i, nx)), list(range(j, ny)))
        ia, oa, pi, pj = [], [], 1, 1
        if i < nx:
            pi *= xs[i]; ia.append(i); i += 1  # noqa: E702
        if j < ny:
            pj *= ys[j]; oa.append(j); j += 1  # noqa: E702
        while pi != pj:
            if pi < pj:
                if i >= nx or not _is_int(xs[i]):
                    return segs, (ia + list(range(i, nx)), oa + list(range(j, ny)))
                pi *= xs[i]; ia.append(i); i += 1  # noqa: E702
            else:
                if j >= ny or not _is_int(ys[j]):
                    return segs, (ia + list(range(i, nx)), oa + list(range(j, ny)))
                pj *= ys[j]; oa.append(j); j += 1  # noqa: E702
        segs.append((ia, oa))
    return segs, None


def _strides(sizes):
    out, s = [], 1
    for d in reversed(sizes):
        out.append(s)
        s *= d
    return list(reversed(out))


def _atoms(in_sizes, out_sizes):
    """Common mixed-radix refinement of two factorisations: list of (low, high) boundaries, or None."""
    bounds = set()
    for sizes in (in_sizes, out_sizes):
        for st, d in zip(_strides(sizes), sizes):
            bounds.add(st)
            bounds.add(st * d)
    b = sorted(bounds)
    for lo, hi in zip(b, b[1:]):
        if hi % lo:
            return None
    return [(lo, hi) for lo, hi in zip(b, b[1:])]


def _digits(size, stride, lo, hi):
    """Digit of atom [lo, hi) for every index of an axis with this size and stride."""
    e = np.arange(size, dtype=np.int64)
    return (e * stride // lo) % (hi // lo)


def map_reshape(c, x, y, entries=None):
    """Couple x and y through a reshape. `entries` are the shape constants per output axis (None = computed),
    used to refuse removals on output axes whose size we could not rewrite."""
    xs, ys = c.shape(x), c.shape(y)
    segs, tail = reshape_segments(xs, ys)
    if tail is not None:
        for ax in tail[0]:
            c.freeze(x, ax, reason="reshape mixes this axis with an axis of unknown size")
        for ax in tail[1]:
            c.freeze(y, ax, reason="reshape mixes this axis with an axis of unknown size")

    def rewritable(oax):
        if entries is None:
            return True
        v = entries[oax] if oax < len(entries) else None
        return v is not None and (v != 0 or (oax < len(xs) and xs[oax] == ys[oax]))

    for k, (ia, oa) in enumerate(segs):
        if len(ia) == 1 and len(oa) == 1 and xs[ia[0]] == ys[oa[0]]:
            if _is_int(ys[oa[0]]) and not rewritable(oa[0]) and not (entries and entries[oa[0]] == -1):
                c.freeze(x, ia[0], reason="reshape target for this axis is computed at run time")
                c.freeze(y, oa[0], reason="reshape target for this axis is computed at run time")
            else:
                c.link(x, ia[0], y, oa[0])
            continue
        in_sizes = [int(xs[a]) for a in ia]
        out_sizes = [int(ys[a]) for a in oa]
        atoms = _atoms(in_sizes, out_sizes)
        reason = "reshape mixes axes without a common factorisation"
        if atoms is None:
            for a in ia:
                c.freeze(x, a, reason=reason)
            for a in oa:
                c.freeze(y, a, reason=reason)
            continue
        in_strides, out_strides = _strides(in_sizes), _strides(out_sizes)

        def owner(strides, sizes, lo, hi):
            for pos, (st, d) in enumerate(zip(strides, sizes)):
                if st <= lo and hi <= st * d:
                    return pos
            return None

        candidates = []
        for t, (lo, hi) in enumerate(atoms):
            pi, po = owner(in_strides, in_sizes, lo, hi), owner(out_strides, out_sizes, lo, hi)
            if pi is None or po is None or c.axis_dead(x, ia[pi]):
                continue
            if not rewritable(oa[po]) and not (entries and entries[oa[po]] == -1):
                continue
            candidates.append((hi // lo, t, pi, po))
        # Default: the largest atom, i.e. the finest removal units (head_dim over heads, channels over groups);
        # with whole_heads, the outermost atom (whole heads, whole groups).
        if c.whole_heads:
            candidates.sort(key=lambda cand: -cand[1])
        else:
            candidates.sort(key=lambda cand: (-cand[0], cand[1]))
        keys = [(cand[1],) for cand in candidates]
        pick = c.choose(("reshape", k), keys) if keys else None
        if pick is None:
            for a in ia:
                c.freeze(x, a, reason="reshape keeps these axes whole")
            for a in oa:
                c.freeze(y, a, reason="reshape keeps these axes whole")
            continue
        size, t, pi, po = next(cand for cand in candidates if (cand[1],) == pick)
        lo, hi = atoms[t]
        v = c.virtual(size, "atom")
        c.bind_choice(v)
        c.link(x, ia[pi], v, 0, np.arange(in_sizes[pi]), _digits(in_sizes[pi], in_strides[pi], lo, hi))
        c.link(y, oa[po], v, 0, np.arange(out_sizes[po]), _digits(out_sizes[po], out_strides[po], lo, hi))
        for pos, a in enumerate(ia):
            if pos != pi:
                c.freeze(x, a, reason="reshape keeps this axis whole") if in_sizes[pos] > 1 else c.not_channel(x, [a])
        for pos, a in enumerate(oa):
            if pos != po:
                c.freeze(y, a, reason="reshape keeps this axis whole") if out_sizes[pos] > 1 else c.not_channel(y, [a])


@rule("Reshape")
def reshape(node, c):
    """Exact mixed-radix index algebra: split/merged axes couple through one factor; the target constant is rewritten."""
    x, y = node.input[0], node.output[0]
    if c.shape(x) is None or c.shape(y) is None:
        c.freeze_all("shapes unknown")
        return
    entries = shape_entries(c, node.input[1], c.rank(y))
    if c.attr("allowzero", 0) and entries and 0 in entries:
        c.freeze_all("allowzero reshape")
        return
    c.not_channel(node.input[1])
    map_reshape(c, x, y, entries)

    def fix(rw, node):
        old = entries
        new_shape = rw.new_shape(node.output[0])
        values = [None if (v is None or v in (0, -1)) else int(new_shape[k]) for k, v in enumerate(old)]
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


@rule("Squeeze")
def squeeze(node, c):
    """Remaining axes pass through; squeezed size-1 axes are not channels."""
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
        def fix(rw, node, axes=sorted(axes)):
            if rw.graph.opset("") >= 13:
                while len(node.input) < 2:
                    node.input.append("")
                rw.set_const_input(node, 1, np.array(axes, dtype=np.int64))
            else:
                rw.set_attr(node, "axes", axes)
        c.fixup(fix)


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


# ---- Concat / Split / Slice / Gather ------------------------------------------------------------------------------
@rule("Concat")
def concat(node, c):
    """Input i's elements map to the output at its offset on the concat axis; other axes pass through."""
    y = node.output[0]
    r = c.rank(y)
    axis = c.attr("axis") % r
    inputs = [x for x in node.input if x]
    sizes = [c.shape(x)[axis] for x in inputs]
    known = all(_is_int(s) for s in sizes)
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


def _split_sizes(node, c, x, axis):
    if len(node.input) > 1 and node.input[1]:
        value = c.const(node.input[1])
        c.not_channel(node.input[1])
        return None if value is None else [int(v) for v in value.reshape(-1)], "input"
    if c.attr("split") is not None:
        return list(c.attr("split")), "attr"
    sizes = [c.shape(o)[axis] for o in node.output]
    return (sizes if all(_is_int(s) for s in sizes) else None), "equal"


@rule("Split")
def split(node, c):
    """Output i maps to its offset range of the input; split sizes are rewritten."""
    x = node.input[0]
    r = c.rank(x)
    axis = c.attr("axis", 0) % r
    sizes, source = _split_sizes(node, c, x, axis)
    if sizes is None or not _is_int(c.shape(x)[axis]):
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

    def fix(rw, node, axis=axis, source=source):
        new = [int(rw.new_shape(o)[axis]) for o in node.output]
        if source == "input":
            rw.set_const_input(node, 1, np.array(new, dtype=np.int64))
        elif source == "attr":
            rw.set_attr(node, "split", new)
        elif len(set(new)) > 1:  # equal split no longer equal: spell the sizes out
            rw.drop_attr(node, "num_outputs")
            if rw.graph.opset("") >= 13:
                while len(node.input) < 2:
                    node.input.append("")
                rw.set_const_input(node, 1, np.array(new, dtype=np.int64))
            else:
                rw.set_attr(node, "split", new)
    c.fixup(fix)


def _slice_params(node, c, r):
    if c.opset < 10 or len(node.input) == 1:
        starts, ends = c.attr("starts"), c.attr("ends")
        axes = c.attr("axes", list(range(len(starts))))
        steps = [1] * len(starts)
        return starts, ends, axes, steps, "attr"
    vals = []
    for k in range(1, 5):
        name = node.input[k] if len(node.input) > k else ""
        if not name:
            vals.append(None)
            continue
        v = c.const(name)
        if v is None:
            return None
        c.not_channel(name)
        vals.append([int(a) for a in v.reshape(-1)])
    starts, ends, axes, steps = vals
    if axes is None:
        axes = list(range(len(starts)))
    if steps is None:
        steps = [1] * len(starts)
    return starts, ends, axes, steps, "input"


@rule("Slice")
def slice_(node, c):
    """Step ±1: selected elements map to the output, the rest are free; bounds are rewritten. Strided: frozen."""
    x, y = node.input[0], node.output[0]
    xs = c.shape(x)
    r = len(xs)
    params = _slice_params(node, c, r)
    if params is None:
        c.freeze_all("slice bounds are not constant")
        return
    starts, ends, axes, steps, source = params
    spec = {a % r: (s, e, st) for s, e, a, st in zip(starts, ends, axes, steps)}
    selections = {}
    for ax in range(r):
        if ax not in spec:
            c.link(x, ax, y, ax)
            continue
        dim = xs[ax]
        if not _is_int(dim):
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
    if ri == 1 and _is_int(dim):
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
    elif ri == 0 and _is_int(dim):
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


# ---- repeats: Expand / Tile ---------------------------------------------------------------------------------------
@rule("Expand")
def expand(node, c):
    """Equal axes pass through; broadcast copies can go alone when the target size is a constant to rewrite."""
    x, y = node.input[0], node.output[0]
    xs, ys = c.shape(x), c.shape(y)
    entries = shape_entries(c, node.input[1])
    c.not_channel(node.input[1])
    r = len(ys)
    for ao in range(r):
        ax = ao - (r - len(xs))
        entry = entries[ao - (r - len(entries))] if entries and ao - (r - len(entries)) >= 0 else None
        # a shape tensor shorter than the output leaves the leading axes to x: nothing there to rewrite
        uncovered = entries is not None and ao < r - len(entries)
        if ax >= 0 and xs[ax] == ys[ao]:
            if entry is None and _is_int(ys[ao]) and not uncovered:
                c.freeze(x, ax, reason="expand target computed at run time")
                c.freeze(y, ao, reason="expand target computed at run time")
            else:
                c.link(x, ax, y, ao)
        else:
            if ax >= 0:
                c.not_channel(x, [ax])
            # broadcast copies: each can go alone, as long as the target size can be rewritten
            if entry is not None and entry == ys[ao]:
                c.touch(y, ao)
            else:
                c.freeze(y, ao, reason="expand target computed at run time")

    def fix(rw, node, entries=entries):
        if entries is None:
            return
        new_y = rw.new_shape(node.output[0])
        old_y = rw.old_shape(node.output[0])
        off = len(new_y) - len(entries)
        values = [int(new_y[k + off]) if (v is not None and v != 1 and new_y[k + off] != old_y[k + off]) else None
                  for k, v in enumerate(entries)]
        rewrite_shape_entries(rw, node, 1, values)
    c.fixup(fix)


@rule("Tile")
def tile(node, c):
    """Every repeat of an element goes with it (repeat map); repeats unchanged."""
    x, y = node.input[0], node.output[0]
    reps = c.const(node.input[1])
    c.not_channel(node.input[1])
    if reps is None:
        c.freeze_all("tile repeats are not constant")
        return
    xs = c.shape(x)
    for ax, rep in enumerate(reps.reshape(-1)):
        n = xs[ax]
        if not _is_int(n):
            c.touch(x, ax)
            c.touch(y, ax)
            continue
        total = n * int(rep)
        c.link(x, ax, y, ax, np.arange(total) % n, np.arange(total))


# ---- Pad / Resize ---------------------------------------------------------------------------------------------------
@rule("Pad")
def pad(node, c):
    """Unpadded axes pass through; zero-padded axes map with an offset; pad elements stay."""
    x, y = node.input[0], node.output[0]
    r = c.rank(x)
    pads = c.attr("pads") if c.opset < 11 else c.const(node.input[1]) if len(node.input) > 1 else None
    axes = list(range(r))
    if len(node.input) > 3 and node.input[3]:
        a = c.const(node.input[3])
        if a is None:
            c.freeze_all("pad axes are not constant")
            return
        axes = [int(v) % r for v in a.reshape(-1)]
    for extra in node.input[1:]:
        c.not_channel(extra)
    if pads is None:
        c.freeze_all("pads are not constant")
        return
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    n = len(axes)
    per_axis = {ax: (pads[k], pads[k + n]) for k, ax in enumerate(axes)}
    mode = c.attr("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    for ax in range(r):
        before, after = per_axis.get(ax, (0, 0))
        if before == 0 and after == 0:
            c.link(x, ax, y, ax)
        elif mode != "constant":
            # reflect/edge/wrap pads copy elements of x: removing one changes what the padding holds
            c.freeze(x, ax, reason=f"{mode} padding copies elements of this axis")
            c.freeze(y, ax, reason=f"{mode} padding copies elements of this axis")
        elif before >= 0 and after >= 0 and _is_int(c.shape(x)[ax]):
            size = c.shape(x)[ax]
            c.link(x, ax, y, ax, np.arange(size), before + np.arange(size))
            c.freeze(y, ax, idx=list(range(before)) + list(range(before + size, before + size + after)),
                     reason="padding")
        else:
            c.freeze(x, ax, reason="cropping pad")
            c.freeze(y, ax, reason="cropping pad")


@rule("Resize", "Upsample")
def resize(node, c):
    """Unchanged axes pass through; resampled spatial axes are not channels; a sizes input is rewritten."""
    x, y = node.input[0], node.output[0]
    xs, ys = c.shape(x), c.shape(y)
    for extra in node.input[1:]:
        c.not_channel(extra)
    sizes_input = node.input[3] if node.op_type == "Resize" and len(node.input) > 3 and node.input[3] else ""
    sized_axes = c.attr("axes")  # opset 18: scales/sizes list only these axes
    sized_axes = None if sized_axes is None else [a % len(xs) for a in sized_axes]
    ctm = c.attr("coordinate_transformation_mode", "half_pixel")
    ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
    roi = c.const(node.input[1]) if node.op_type == "Resize" and len(node.input) > 1 and node.input[1] else None
    for ax in range(len(xs)):
        # An axis whose size does not change is copied as it is (scale 1 is exact for every mode), wherever it
        # sits: channels-last (NHWC) resizes keep their channels on the last axis. A cropping roi is not.
        same = _is_int(xs[ax]) and xs[ax] == ys[ax]
        if same and ctm == "tf_crop_and_resize":
            k = ax if sized_axes is None else (sized_axes.index(ax) if ax in sized_axes else None)
            n = len(xs) if sized_axes is None else len(sized_axes)
            same = k is None or (roi is not None and roi.size == 2 * n and roi[k] == 0 and roi[k + n] == 1)
        if same and sizes_input and c.const(sizes_input) is None:
            c.freeze(x, ax, reason="resize sizes computed at run time")
            c.freeze(y, ax, reason="resize sizes computed at run time")
        elif same:
            c.link(x, ax, y, ax)
        elif ax >= 2:  # spatial axes are resampled: never channels
            c.not_channel(x, [ax])
            c.not_channel(y, [ax])
        else:
            c.freeze(x, ax, reason=f"{node.op_type} rescales this axis")
            c.freeze(y, ax, reason=f"{node.op_type} rescales this axis")
    if sizes_input:
        def fix(rw, node, sized_axes=sized_axes):
            new = rw.new_shape(node.output[0])
            values = new if sized_axes is None else [new[a] for a in sized_axes]  # opset 18 `axes`
            rw.set_const_input(node, 3, np.array(values, dtype=np.int64))
        c.fixup(fix)


# ---- channel blocks: DepthToSpace / SpaceToDepth ---------------------------------------------------------------------
@rule("DepthToSpace")
def depth_to_space(node, c):
    """Output channel c gathers its blocksize² input channels (DCR: strided, CRD: contiguous)."""
    x, y = node.input[0], node.output[0]
    b = c.attr("blocksize")
    mode = c.attr("mode", "DCR")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    c.link(x, 0, y, 0)
    c.not_channel(x, [2, 3])
    c.not_channel(y, [2, 3])
    cin = c.shape(x)[1]
    cout = cin // (b * b)
    k = np.arange(cin)
    # DCR: input channel (i*b + j)*C' + c ; CRD: c*b*b + (i*b + j)
    out_of_in = k % cout if mode == "DCR" else k // (b * b)
    c.link(x, 1, y, 1, k, out_of_in)


@rule("SpaceToDepth")
def space_to_depth(node, c):
    """Input channel c owns the blocksize² output channels made from it."""
    x, y = node.input[0], node.output[0]
    b = c.attr("blocksize")
    c.link(x, 0, y, 0)
    c.not_channel(x, [2, 3])
    c.not_channel(y, [2, 3])
    cin = c.shape(x)[1]
    k = np.arange(cin * b * b)
    c.link(y, 1, x, 1, k, k % cin)


# ---- ops that read sizes -------------------------------------------------------------------------------------------
@rule("Shape")
def shape(node, c):
    """Shape values change when channels go: freeze the dims whose value is read (usually only dynamic
    batch/sequence dims are left after constant folding)."""
    x, y = node.input[0], node.output[0]
    r = c.rank(x)
    # negative start/end count from the back (r + v, not v mod r + 1), then clamp to [0, r]
    start, end = c.attr("start", 0), c.attr("end", r)
    start = min(max(start + r if start < 0 else start, 0), r)
    end = min(max(end + r if end < 0 else end, 0), r)
    # a shape that is itself a graph output is read in full (it has no uses inside the graph)
    read = set(range(end - start)) if y in c.graph.output_names else set()
    for use, _ in c.graph.uses.get(y, []):
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


@rule("Size")
def size(node, c):
    """Reads the element count: the input stays whole."""
    c.freeze(node.input[0], reason="its size is read by a Size op")
    c.not_channel(node.output[0])


@rule("ConstantOfShape", "Range", "RandomNormalLike", "RandomUniformLike", "EyeLike", "NonZero")
def new_tensor(node, c):
    """The output is a new tensor whose size comes from values: frozen."""
    for name in node.input:
        c.not_channel(name) if node.op_type in ("ConstantOfShape", "Range") else c.freeze(name, reason="shape read")
    for name in node.output:
        c.freeze(name, reason=f"tensor created by {node.op_type}")
