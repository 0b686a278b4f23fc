"""Channel rules, one function per op type, registered in graphprune.rules.RULES.

Importing this package registers every rule. Each module groups ops of one family.
"""
from . import control, conv, einsum, elementwise, fused, indexing, layout, norm, quant, reduce, resize, rnn, shape  # noqa: F401
