"""Ops that repeat, pad, resample or regroup elements: Expand/Tile (repeat maps), Pad (offset maps), Resize
(unchanged axes pass through) and DepthToSpace/SpaceToDepth (channel blocks)."""
from __future__ import annotations

import numpy as np

from ..rules import rule
from ._reshape_algebra import is_int
from ._shape_tensors import Dim, follow_dim, freeze_dim, rewrite_shape_entries, shape_entries


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
        if ax >= 0 and xs[ax] == ys[ao] and isinstance(entry, Dim):
            # the target copies Shape(t)[k] here: coupled with this axis it keeps equal to its new size
            c.link(x, ax, y, ao)
            follow_dim(c, entry, y, ao, reason="its size, read by a Shape op, sizes an expand axis of another size")
        elif ax >= 0 and xs[ax] == ys[ao]:
            if entry is None and is_int(ys[ao]) and not uncovered:
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
                freeze_dim(c, entry, reason="its size, read by a Shape op, sizes a broadcast copy of an expand")

    def fix(rw, node, entries=entries):
        if entries is None:
            return
        new_y = rw.new_shape(node.output[0])
        old_y = rw.old_shape(node.output[0])
        off = len(new_y) - len(entries)
        values = [int(new_y[k + off]) if (isinstance(v, int) and v != 1 and new_y[k + off] != old_y[k + off]) else None
                  for k, v in enumerate(entries)]
        rewrite_shape_entries(rw, node, 1, values)
    c.fixup(fix)


@rule("Tile")
def tile(node, c):
    """Every repeat of an element goes with it (repeat map); repeats unchanged; computed repeats freeze their axis."""
    x, y = node.input[0], node.output[0]
    xs = c.shape(x)
    # repeats do not change when channels go (they multiply whatever is left), so literal repeats need no
    # rewrite; one computed at run time (a Concat with a Shape-derived piece) leaves only its own axis unknown
    reps = shape_entries(c, node.input[1], len(xs) if xs is not None else None)
    c.not_channel(node.input[1])
    if reps is None or xs is None or len(reps) != len(xs):
        c.freeze_all("tile repeats are not constant")
        return
    for ax, rep in enumerate(reps):
        n = xs[ax]
        if not isinstance(rep, int):
            c.freeze(x, ax, reason="tile repeats for this axis are computed at run time")
            c.freeze(y, ax, reason="tile repeats for this axis are computed at run time")
            continue
        if not is_int(n):
            c.touch(x, ax)
            c.touch(y, ax)
            continue
        total = n * int(rep)
        c.link(x, ax, y, ax, np.arange(total) % n, np.arange(total))


# ---- Pad / Resize ---------------------------------------------------------------------------------------------------
@rule("Pad", until=10)
def pad_attr(node, c):
    """Like Pad-11 with the pads as an attribute."""
    _pad(node, c, c.attr("pads"))


@rule("Pad", since=11)
def pad(node, c):
    """Unpadded axes pass through; zero-padded axes map with an offset; pad elements stay."""
    _pad(node, c, c.const(node.input[1]) if len(node.input) > 1 else None)


def _pad(node, c, pads):
    x, y = node.input[0], node.output[0]
    r = c.rank(x)
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
        elif before >= 0 and after >= 0 and is_int(c.shape(x)[ax]):
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
        same = is_int(xs[ax]) and xs[ax] == ys[ax]
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
