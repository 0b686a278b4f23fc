"""Channel rules, one function per op type, registered in graphprune.ops.registry.RULES
(graphprune.analysis.RULES is the same object).

Importing this package registers every rule. Each module groups ops of one family.
"""
from . import conv, einsum, elementwise, norm, reduce, rnn, shape  # noqa: F401
