"""A decorator registry keyed by (domain, op_type): one place per op, duplicates refused."""
from __future__ import annotations

from typing import Callable

from .errors import RuleError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[tuple[str, str], Callable] = {}

    def register(self, *op_types: str, domain: str = "") -> Callable:
        def decorate(fn: Callable) -> Callable:
            for op in op_types:
                key = (_norm_domain(domain), op)
                if key in self._entries and self._entries[key] is not fn:
                    raise RuleError(f"{self.kind} for {op!r} (domain {domain!r}) registered twice: "
                                    f"{self._entries[key].__module__}.{self._entries[key].__name__} and "
                                    f"{fn.__module__}.{fn.__name__}")
                self._entries[key] = fn
            return fn
        return decorate

    def lookup(self, op_type: str, domain: str = "") -> Callable | None:
        return self._entries.get((_norm_domain(domain), op_type))

    def op_types(self) -> list[tuple[str, str]]:
        return sorted(self._entries)

    def items(self):
        return sorted(self._entries.items())

    def __contains__(self, key) -> bool:
        return key in self._entries


def _norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain
