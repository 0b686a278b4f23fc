"""Einsum: every index letter is one axis shared by the operands and the output that carry it."""
from __future__ import annotations

from ..rules import rule


@rule("Einsum")
def einsum(node, c):
    """Letters shared across operands/output are coupled; summed-over letters are contractions (a zero
    contributes nothing), so their elements can go together from every operand that carries them."""
    eq = c.attr("equation")
    eq = (eq.decode() if isinstance(eq, bytes) else eq).replace(" ", "")
    if "..." in eq or "->" not in eq:
        c.freeze_all("Einsum with an ellipsis or an implicit output is not mapped")
        return
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != len([i for i in node.input]) or any(len(set(t)) != len(t) for t in terms + [out]):
        c.freeze_all("Einsum with repeated letters (diagonals) is not mapped")
        return
    first: dict[str, tuple[str, int]] = {}
    for name, term in list(zip(node.input, terms)) + [(node.output[0], out)]:
        for ax, letter in enumerate(term):
            if letter in first:
                c.link(first[letter][0], first[letter][1], name, ax)
            else:
                first[letter] = (name, ax)
                c.touch(name, ax)
