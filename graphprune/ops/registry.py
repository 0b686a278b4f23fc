"""The channel-rule registry. It lives apart from analysis.py so that the rule modules (this package) never
import analysis: analysis imports the rules, not the other way round."""
from __future__ import annotations

from ..registry import Registry

RULES = Registry("channel rule")
rule = RULES.register
