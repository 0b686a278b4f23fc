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
    def from_json(cls, text) -> "RewritePlan":
        """Parse a plan; anything that is not a well-formed plan is a PlanError naming what is wrong."""
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                raise PlanError("not a graphprune plan: not UTF-8 text") from None
        if not isinstance(text, str):
            raise PlanError(f"not a graphprune plan: expected JSON text, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except RecursionError:
            raise PlanError("not a graphprune plan: JSON nested too deeply") from None
        except ValueError as exc:
            raise PlanError(f"not a graphprune plan: invalid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise PlanError(f"not a graphprune plan: expected a JSON object, got {type(data).__name__}")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"plan version {_short(data.get('version'))} is not {PLAN_VERSION}")
        model = data.get("model", "")
        settings = data.get("settings", {})
        groups = data.get("groups")
        if not isinstance(model, str) or not isinstance(settings, dict):
            raise PlanError("not a graphprune plan: 'model' must be a string and 'settings' an object")
        if not isinstance(groups, list):
            raise PlanError("not a graphprune plan: 'groups' must be a list")
        return cls(model, settings, [_group(g, k) for k, g in enumerate(groups)])

    @classmethod
    def from_file(cls, path) -> "RewritePlan":
        """Read a plan file: a regular file (no FIFO, device or folder) of at most MAX_PLAN_BYTES."""
        from .fileio import read_regular
        return cls.from_json(read_regular(path, MAX_PLAN_BYTES, PlanError, "plan file"))


# A plan lists removed indices; 256 MiB of JSON is far beyond any real model's.
MAX_PLAN_BYTES = 256 << 20


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _int(value, what: str, lo: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise PlanError(f"not a graphprune plan: {what} must be an integer >= {lo}, got {_short(value)}")
    return value


def _group(g, k: int) -> GroupPlan:
    """One group entry, every field type-checked (json gives any type anywhere)."""
    where = f"group {k}"
    if not isinstance(g, dict):
        raise PlanError(f"not a graphprune plan: {where} is {type(g).__name__}, not an object")
    allowed = {"group", "channels", "units", "removed_units", "removed", "kept_channels", "scores"}
    unknown = sorted(set(g) - allowed)
    if unknown:
        raise PlanError(f"not a graphprune plan: {where} has unknown field(s) {_short(unknown)}")
    missing = sorted({"group", "channels", "units", "removed_units", "removed"} - set(g))
    if missing:
        raise PlanError(f"not a graphprune plan: {where} lacks {', '.join(missing)}")
    if not isinstance(g["group"], str):
        raise PlanError(f"not a graphprune plan: {where} name must be a string")
    removed = g["removed"]
    if not isinstance(removed, dict):
        raise PlanError(f"not a graphprune plan: {where} 'removed' must be an object")
    clean: dict[str, list[int]] = {}
    for key, idx in removed.items():
        name, sep, axis = key.rpartition("::")
        if not sep or not name or not (axis.lstrip("-").isascii() and axis.lstrip("-").isdigit()):
            raise PlanError(f"not a graphprune plan: {where} key {_short(key)} is not 'tensor::axis'")
        if not isinstance(idx, list):
            raise PlanError(f"not a graphprune plan: {where} {_short(key)} must list indices")
        clean[key] = [_int(i, f"{where} index", 0) for i in idx]
    scores = g.get("scores")
    if scores is not None and (not isinstance(scores, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores)):
        raise PlanError(f"not a graphprune plan: {where} scores must be a list of numbers")
    return GroupPlan(group=g["group"], channels=_int(g["channels"], f"{where} channels"),
                     units=_int(g["units"], f"{where} units"),
                     removed_units=_int(g["removed_units"], f"{where} removed_units"), removed=clean,
                     kept_channels=_int(g.get("kept_channels", 0), f"{where} kept_channels"), scores=scores)


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
