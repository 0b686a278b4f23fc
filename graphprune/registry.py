"""A decorator registry keyed by (domain, op_type) and an opset range: one function per op and opset version,
overlapping ranges refused.

An op whose semantics changed at some opset (Split's sizes moved from an attribute to an input at 13) gets one
function per version range instead of a branch on the opset inside one function:

    @rule("Split", until=12)
    def split_attr(node, c): ...

    @rule("Split", since=13)
    def split_input(node, c): ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import RuleError


@dataclass(frozen=True)
class Entry:
    """One registration: `fn` handles `op_type` of `domain` for opset versions since..until (inclusive)."""
    domain: str
    op_type: str
    since: int
    until: int | None
    fn: Callable

    def covers(self, version: int) -> bool:
        return self.since <= version and (self.until is None or version <= self.until)

    @property
    def versions(self) -> str:
        """'', '13+', '≤12' or '7-12': the opset range as the README table shows it."""
        if self.until is None:
            return "" if self.since <= 1 else f"{self.since}+"
        return f"≤{self.until}" if self.since <= 1 else f"{self.since}-{self.until}"


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[tuple[str, str], list[Entry]] = {}

    def register(self, *op_types: str, domain: str = "", since: int = 1, until: int | None = None) -> Callable:
        if until is not None and until < since:
            raise RuleError(f"{self.kind} for {op_types}: opset range {since}..{until} is empty")

        def decorate(fn: Callable) -> Callable:
            for op in op_types:
                entry = Entry(_norm_domain(domain), op, since, until, fn)
                entries = self._entries.setdefault((entry.domain, op), [])
                for other in entries:
                    if other.fn is fn:
                        continue
                    if _overlap(other, entry):
                        raise RuleError(f"{self.kind} for {op!r} (domain {domain!r}) registered twice for opset "
                                        f"{max(other.since, since)}: {other.fn.__module__}.{other.fn.__name__} "
                                        f"and {fn.__module__}.{fn.__name__}")
                if all(other.fn is not fn for other in entries):
                    entries.append(entry)
                    entries.sort(key=lambda e: e.since)
            return fn
        return decorate

    def lookup(self, op_type: str, domain: str = "", version: int | None = None) -> Callable | None:
        """The function for `op_type` at opset `version` of its domain. `version` None or < 1 (a model that
        imports no opset for the domain) takes the newest registration."""
        entries = self._entries.get((_norm_domain(domain), op_type))
        if not entries:
            return None
        if version is None or version < 1:
            return entries[-1].fn
        return next((e.fn for e in entries if e.covers(version)), None)

    def registered(self, op_type: str, domain: str = "") -> bool:
        """Whether any opset version of `op_type` has a function."""
        return bool(self._entries.get((_norm_domain(domain), op_type)))

    def op_types(self) -> list[tuple[str, str]]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        """Every registration, by (domain, op_type, since)."""
        return [e for key in sorted(self._entries) for e in self._entries[key]]

    def __contains__(self, key) -> bool:
        return key in self._entries


def _overlap(a: Entry, b: Entry) -> bool:
    a_end = a.until if a.until is not None else float("inf")
    b_end = b.until if b.until is not None else float("inf")
    return a.since <= b_end and b.since <= a_end


def _norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain
