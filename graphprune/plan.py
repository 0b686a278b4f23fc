"""The rewrite plan: plain data between scoring and rewriting, so it can be printed, saved, edited, replayed."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import PlanError

PLAN_VERSION = 1


@dataclass
class GroupPlan:
    group: str                       # human name (first producing weight)
    channels: int                    # width before
    units: int                       # removal units before
    removed_units: int
    removed: dict[str, list[int]]    # "tensor::axis" -> removed indices along that axis
    kept_channels: int = 0
    scores: list[float] | None = None


@dataclass
class RewritePlan:
    model: str = ""
    settings: dict = field(default_factory=dict)
    groups: list[GroupPlan] = field(default_factory=list)

    def removed_elements(self) -> dict[tuple[str, int], np.ndarray]:
        out: dict[tuple[str, int], list] = {}
        for g in self.groups:
            for key, idx in g.removed.items():
                name, axis = key.rsplit("::", 1)
                out.setdefault((name, int(axis)), []).extend(idx)
        return {k: np.unique(np.asarray(v, dtype=np.int64)) for k, v in out.items()}

    @property
    def removed_channels(self) -> int:
        return sum(g.channels - g.kept_channels for g in self.groups)

    def to_json(self) -> str:
        data = {"version": PLAN_VERSION, "model": self.model, "settings": self.settings,
                "groups": [asdict(g) for g in self.groups]}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "RewritePlan":
        try:
            data = json.loads(text)
            if data.get("version") != PLAN_VERSION:
                raise PlanError(f"plan version {data.get('version')} is not {PLAN_VERSION}")
            return cls(data.get("model", ""), data.get("settings", {}),
                       [GroupPlan(**g) for g in data["groups"]])
        except PlanError:
            raise
        except Exception as exc:
            raise PlanError(f"not a graphprune plan: {exc}") from exc


def member_key(member: tuple[str, int]) -> str:
    return f"{member[0]}::{member[1]}"


def check_plan(plan: RewritePlan, analysis) -> None:
    """A replayed plan must remove whole units of this model's analysis, and nothing frozen."""
    removed = plan.removed_elements()
    touched_units = set()
    for (name, axis), idx in removed.items():
        slot = analysis.slots.get((name, axis))
        if slot is None:
            raise PlanError(f"plan removes channels of '{name}' axis {axis}, which this model does not have")
        off, size = slot
        if len(idx) and (idx.min() < 0 or idx.max() >= size):
            raise PlanError(f"plan removes index {int(idx.max())} of '{name}' axis {axis} (size {size})")
        if analysis.element_frozen[off + idx].any():
            raise PlanError(f"plan removes frozen channels of '{name}' axis {axis}")
        touched_units.update(int(u) for u in np.unique(analysis.element_unit[off + idx]))
    # every element of every touched unit must be in the plan
    for g in analysis.groups:
        for u in g.units:
            if u.root in touched_units:
                for member, idx in u.elements.items():
                    have = removed.get(member)
                    if have is None or not np.isin(idx, have).all():
                        raise PlanError(f"plan removes part of a coupled unit but not '{member[0]}' axis {member[1]}")
