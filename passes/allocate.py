"""Allocation: turn per-unit scores into a plan (uniform ratio per group in this version)."""
from __future__ import annotations

import math

import numpy as np

from graphprune.plan import GroupPlan, RewritePlan, member_key


def units_to_keep(n_units: int, channels_per_unit: float, ratio: float, round_to: int, min_channels: int) -> int:
    keep = n_units - int(math.floor(ratio * n_units + 0.5))
    e = max(1, int(round(channels_per_unit)))
    floor_units = max(1, math.ceil(min_channels / e))
    if round_to > 1:
        q = round_to // math.gcd(round_to, e)
        if n_units >= q:
            keep = max(q, int(round(keep / q)) * q)
            floor_units = math.ceil(floor_units / q) * q
    keep = max(keep, floor_units)
    return min(keep, n_units)


def uniform_plan(analysis, scores: dict[int, np.ndarray], ratio: float, round_to: int = 1,
                 min_channels: int = 1, model_name: str = "", settings: dict | None = None) -> RewritePlan:
    plan = RewritePlan(model=model_name, settings=dict(settings or {}))
    for group in analysis.groups:
        n = len(group.units)
        width = group.channels
        keep = units_to_keep(n, width / n, ratio, round_to, min_channels)
        s = scores[group.id]
        order = np.argsort(s, kind="stable")  # lowest score first
        drop = sorted(order[: n - keep].tolist())
        removed: dict[str, list[int]] = {}
        for k in drop:
            for member, idx in group.units[k].elements.items():
                removed.setdefault(member_key(member), []).extend(int(i) for i in idx)
        gone = sum(group.units[k].size(group.main) for k in drop)
        plan.groups.append(GroupPlan(group=group.name, channels=width, units=n, removed_units=len(drop),
                                     removed={k: sorted(v) for k, v in removed.items()},
                                     kept_channels=width - gone))
    return plan
