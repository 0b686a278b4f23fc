"""Passes run in order over one context; a failure names the pass and the passes before it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .errors import GraphpruneError, PassError


@dataclass
class PassRecord:
    name: str
    seconds: float
    summary: str = ""


@dataclass
class PassManager:
    progress: Callable[[str], None] | None = None
    history: list[PassRecord] = field(default_factory=list)

    def run(self, name: str, fn: Callable, *args, **kwargs):
        if self.progress:
            self.progress(f"{name} ...")
        start = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        except GraphpruneError:
            raise
        except Exception as exc:
            before = ", ".join(r.name for r in self.history) or "nothing"
            raise PassError(f"pass '{name}' failed after [{before}]: {type(exc).__name__}: {exc}") from exc
        self.history.append(PassRecord(name, time.perf_counter() - start))
        if self.progress:
            self.progress(f"{name} done in {self.history[-1].seconds:.2f} s")
        return result

    def timings(self) -> dict[str, float]:
        return {r.name: r.seconds for r in self.history}
