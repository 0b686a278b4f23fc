"""Stages with contracts, run in order over one context.

A `Stage` declares what it reads from the context (`needs`) and what it leaves there (`provides`); the manager
checks both around every run, so a stage reordered or skipped by mistake fails with a sentence naming the missing
input instead of an AttributeError three stages later. A stage that raises anything but a GraphpruneError is
reported as `PassError` naming the stage and the stages before it, with the cause chained.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import GraphpruneError, PassError


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Any], str | None]          # returns a one-line summary for the stage log, or None
    needs: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    when: Callable[[Any], bool] | None = None  # None: always runs
    doc: str = ""


@dataclass
class StageRecord:
    name: str
    seconds: float
    summary: str = ""
    skipped: bool = False


@dataclass
class PassManager:
    progress: Callable[[str], None] | None = None
    history: list[StageRecord] = field(default_factory=list)

    def run_stages(self, stages: list[Stage], ctx) -> None:
        for stage in stages:
            if stage.when is not None and not stage.when(ctx):
                self.history.append(StageRecord(stage.name, 0.0, skipped=True))
                continue
            self.run_stage(stage, ctx)

    def run_stage(self, stage: Stage, ctx) -> None:
        missing = [n for n in stage.needs if getattr(ctx, n, None) is None]
        if missing:
            raise PassError(f"stage '{stage.name}' needs {', '.join(missing)}, which no stage before it "
                            f"provided (ran: {self._ran()})")
        summary = self.run(stage.name, stage.run, ctx)
        absent = [n for n in stage.provides if getattr(ctx, n, None) is None]
        if absent:
            raise PassError(f"stage '{stage.name}' did not provide {', '.join(absent)}")
        self.history[-1].summary = summary or ""

    def run(self, name: str, fn: Callable, *args, **kwargs):
        """Run one step, timed and with errors named after it (also used inside stages for sub-steps)."""
        if self.progress:
            self.progress(f"{name} ...")
        start = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        except GraphpruneError:
            raise
        except Exception as exc:
            raise PassError(f"stage '{name}' failed after ({self._ran()}): {type(exc).__name__}: {exc}") from exc
        self.history.append(StageRecord(name, time.perf_counter() - start))
        if self.progress:
            self.progress(f"{name} done in {self.history[-1].seconds:.2f} s")
        return result

    def _ran(self) -> str:
        return ", ".join(r.name for r in self.history if not r.skipped) or "nothing"

    def timings(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in self.history:
            if not r.skipped:
                out[r.name] = out.get(r.name, 0.0) + r.seconds
        return out

    def log(self) -> list[str]:
        """One line per stage: time, or 'skipped', and the stage's own summary."""
        lines = []
        for r in self.history:
            if r.skipped:
                lines.append(f"{r.name:<18} skipped")
            else:
                lines.append(f"{r.name:<18} {r.seconds:7.2f} s" + (f"  {r.summary}" if r.summary else ""))
        return lines
