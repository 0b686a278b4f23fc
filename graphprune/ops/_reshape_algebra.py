"""Reshape as exact mixed-radix index algebra.

A reshape reads its input in row-major order, so index e of an axis run with sizes (d0, .., dk) is the
mixed-radix number whose digit i has radix di and stride Π_{j>i} dj. Input and output runs with equal products
(`reshape_segments`) describe the same flat range; the union of both runs' digit boundaries (`_atoms`) cuts it
into *atoms* [lo, hi): a stride lo and a radix hi/lo that both factorisations can express (each boundary must
divide the next, else there is no common factorisation and the run is frozen). An atom owned by one input axis
and one output axis can carry channels: element e of an axis with stride s owns digit (e·s // lo) mod (hi/lo) of
that atom (`_digits`), and the input and output axes are linked through a virtual axis of hi/lo elements.
"""
from __future__ import annotations

import numpy as np

from ._shape_tensors import Dim, follow_dim, freeze_dim


def is_int(d) -> bool:
    """A static dim (symbolic dims are str, unknown ones None)."""
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
        if (i < nx and not is_int(xs[i])) or (j < ny and not is_int(ys[j])):
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
                if i >= nx or not is_int(xs[i]):
                    return segs, (ia + list(range(i, nx)), oa + list(range(j, ny)))
                pi *= xs[i]; ia.append(i); i += 1  # noqa: E702
            else:
                if j >= ny or not is_int(ys[j]):
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
        if isinstance(v, Dim):  # a copy of another dim: it follows only an axis it is coupled with one to one
            return False
        return v is not None and (v != 0 or (oax < len(xs) and xs[oax] == ys[oax]))

    followed = set()
    for k, (ia, oa) in enumerate(segs):
        entry = entries[oa[0]] if entries and len(oa) == 1 and oa[0] < len(entries) else None
        if len(ia) == 1 and len(oa) == 1 and xs[ia[0]] == ys[oa[0]] and isinstance(entry, Dim):
            # the target copies Shape(t)[k] here: y's axis is x's axis unchanged, so coupling t's dim with it
            # (same elements go) keeps the computed size equal to the new size of the axis
            c.link(x, ia[0], y, oa[0])
            follow_dim(c, entry, y, oa[0], reason="its size, read by a Shape op, sizes a reshape axis of another size")
            followed.add(oa[0])
            continue
        if len(ia) == 1 and len(oa) == 1 and xs[ia[0]] == ys[oa[0]]:
            if is_int(ys[oa[0]]) and not rewritable(oa[0]) and not (entries and entries[oa[0]] == -1):
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
    for oax, v in enumerate(entries or []):
        if oax not in followed:
            freeze_dim(c, v, reason="its size, read by a Shape op, sizes a reshape axis that does not keep it")
