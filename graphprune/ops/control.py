"""Control flow: Loop, Scan and If. Their bodies are analysed by the same rules as the main graph (the driver in
graphprune.rules runs them; canonicalize gave every body name a name of its own); these rules only tie each
body's formal inputs and outputs to the node's actual ones, axis for axis:

- a Loop/Scan carried state is one tensor seen four times: initial value, body input, body output, final
  output. Removing a channel from one removes it from all, or the next iteration would read a wrong width.
- a Loop scan output stacks the body's per-iteration value along a new leading axis; a Scan output along
  `scan_output_axes`; a Scan input is sliced along `scan_input_axes`. The stacking axis is never a channel.
- an If output is whichever branch ran: both branches' outputs carry the same channels.

Outer tensors a body reads are the same tensors as outside: their channels group with the body's uses.
"""
from __future__ import annotations

from ..ir import attr, subgraphs
from ..rules import rule

CONTROL_FLOW = ("Loop", "Scan", "If")


def _same_tensor(c, names, what):
    """Link every axis of every name in `names` (all views of one value) one to one; ranks must agree."""
    names = [n for n in names if n]
    ranks = {c.rank(n) for n in names}
    if None in ranks or len(ranks) > 1:
        for n in names:
            c.freeze(n, reason=f"{what}: rank differs or is unknown between the views of one value")
        return
    for n in names[1:]:
        for ax in range(c.rank(names[0])):
            c.link(names[0], ax, n, ax)


def _stacked(c, elem, full, axis, what):
    """`full` stacks (or slices into) `elem` along `axis`: elem axis a is full axis a (a < axis) or a + 1."""
    r = c.rank(full)
    if r is None or c.rank(elem) is None or c.rank(elem) + 1 != r:
        c.freeze(full, reason=f"{what}: rank of the stacked value is unknown or does not match")
        c.freeze(elem, reason=f"{what}: rank of the stacked value is unknown or does not match")
        return
    axis %= r
    c.not_channel(full, [axis])  # the iteration axis
    for a in range(r - 1):
        c.link(elem, a, full, a if a < axis else a + 1)


@rule("Loop")
def loop(node, c):
    """Carried state k: initial value, body input 2+k, body output 1+k and output k are one value; scan output
    j: body output 1+N+j is output N+j without its new leading (iteration) axis. Trip count and conditions are
    scalars."""
    body = subgraphs(node)[0]
    ins, outs = [v.name for v in body.input], [v.name for v in body.output]
    carried = list(node.input[2:])
    for name in list(node.input[:2]) + ins[:2] + outs[:1]:
        c.not_channel(name)
    for k, init in enumerate(carried):
        final = node.output[k] if k < len(node.output) else ""
        _same_tensor(c, [init, ins[2 + k], outs[1 + k], final], f"carried value {k}")
    for j, scanned in enumerate(outs[1 + len(carried):]):
        k = len(carried) + j
        if k < len(node.output) and node.output[k]:
            _stacked(c, scanned, node.output[k], 0, f"scan output {j}")


@rule("Scan", since=9)
def scan(node, c):
    """N states as in Loop; scan input i is sliced along scan_input_axes[i] (the body sees one slice), scan
    output j stacks the body's value along scan_output_axes[j]. Directions only reverse the iteration axis."""
    body = subgraphs(node)[0]
    ins, outs = [v.name for v in body.input], [v.name for v in body.output]
    m = c.attr("num_scan_inputs")
    n = len(node.input) - m
    in_axes = list(c.attr("scan_input_axes", [0] * m))
    out_axes = list(c.attr("scan_output_axes", [0] * (len(outs) - n)))
    for k in range(n):
        _same_tensor(c, [node.input[k], ins[k], outs[k], node.output[k] if k < len(node.output) else ""],
                     f"state {k}")
    for i in range(m):
        _stacked(c, ins[n + i], node.input[n + i], in_axes[i], f"scan input {i}")
    for j in range(len(outs) - n):
        if n + j < len(node.output) and node.output[n + j]:
            _stacked(c, outs[n + j], node.output[n + j], out_axes[j], f"scan output {j}")


@rule("If")
def if_(node, c):
    """Output k is then_branch's output k or else_branch's: the three carry the same channels."""
    c.not_channel(node.input[0])
    branches = [attr(node, "then_branch"), attr(node, "else_branch")]
    for k, y in enumerate(node.output):
        _same_tensor(c, [y] + [b.output[k].name for b in branches], f"output {k} of the two branches")
