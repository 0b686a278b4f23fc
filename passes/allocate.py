"""Allocation: turn per-unit scores into a plan.

scope 'uniform': every group loses the same fraction of its units. scope 'global': units of all groups are
ranked together after per-group normalisation (mean, max or LAMP-style), so weak layers lose more.
A MACs or params target is met by bisection on that fraction, measuring the exact counts of the pruned shapes
(no rewrite needed). Guards: at least `min_channels` per group, at most `max_ratio` of a group's units,
`round_to` multiples.
"""
from __future__ import annotations

import math

import numpy as np

from graphprune.metrics import count_after
from graphprune.plan import GroupPlan, RewritePlan, member_key


def units_to_keep(n_units: int, channels_per_unit: float, ratio: float, round_to: int, min_channels: int,
                  max_ratio: float = 1.0) -> int:
    keep = n_units - int(math.floor(min(ratio, max_ratio) * n_units + 0.5))
    e = max(1, int(round(channels_per_unit)))
    floor_units = max(1, math.ceil(min_channels / e), n_units - int(math.floor(max_ratio * n_units)))
    if round_to > 1:
        q = round_to // math.gcd(round_to, e)
        if n_units >= q:
            keep = max(q, int(round(keep / q)) * q)
            floor_units = math.ceil(floor_units / q) * q
    keep = max(keep, floor_units)
    return min(keep, n_units)


def _normalise(s: np.ndarray, how: str) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    if how == "max":
        d = s.max()
    elif how == "lamp":  # score / sum of scores at least as large: the top unit of every group gets 1
        order = np.argsort(s)
        tail = np.cumsum(s[order][::-1])[::-1]
        out = np.empty_like(s)
        out[order] = s[order] / np.where(tail > 0, tail, 1)
        return out
    else:
        d = s.mean()
    return s / d if d > 0 else s


def select(analysis, scores, fraction: float, scope: str = "uniform", round_to: int = 1, min_channels: int = 1,
           max_ratio: float = 0.9, norm: str = "mean") -> dict[int, list[int]]:
    """Units to drop per group id."""
    drops: dict[int, list[int]] = {}
    if scope == "uniform":
        for g in analysis.groups:
            n = len(g.units)
            keep = units_to_keep(n, g.channels / n, fraction, round_to, min_channels, max(max_ratio, fraction))
            order = np.argsort(scores[g.id], kind="stable")
            drops[g.id] = sorted(order[: n - keep].tolist())
        return drops
    # global: one threshold over normalised scores, then the per-group guards
    pooled = [(v, g.id, k) for g in analysis.groups for k, v in enumerate(_normalise(scores[g.id], norm))]
    pooled.sort(key=lambda t: t[0])
    total = len(pooled)
    wanted = {g.id: 0 for g in analysis.groups}
    for _, gid, _k in pooled[: int(math.floor(fraction * total + 0.5))]:
        wanted[gid] += 1
    for g in analysis.groups:
        n = len(g.units)
        keep = units_to_keep(n, g.channels / n, wanted[g.id] / n, round_to, min_channels, max_ratio)
        order = np.argsort(scores[g.id], kind="stable")
        drops[g.id] = sorted(order[: n - keep].tolist())
    return drops


def build_plan(analysis, drops, model_name: str = "", settings: dict | None = None) -> RewritePlan:
    plan = RewritePlan(model=model_name, settings=dict(settings or {}))
    for group in analysis.groups:
        drop = drops.get(group.id, [])
        removed: dict[str, list[int]] = {}
        for k in drop:
            for member, idx in group.units[k].elements.items():
                removed.setdefault(member_key(member), []).extend(int(i) for i in idx)
        gone = sum(group.units[k].size(group.main) for k in drop)
        plan.groups.append(GroupPlan(group=group.name, channels=group.channels, units=len(group.units),
                                     removed_units=len(drop), removed={k: sorted(v) for k, v in removed.items()},
                                     kept_channels=group.channels - gone))
    return plan


def uniform_plan(analysis, scores, ratio: float, round_to: int = 1, min_channels: int = 1,
                 model_name: str = "", settings: dict | None = None) -> RewritePlan:
    drops = select(analysis, scores, ratio, "uniform", round_to, min_channels, max_ratio=1.0)
    return build_plan(analysis, drops, model_name, settings)


def fit_target(analysis, scores, target: float, metric: str = "macs", scope: str = "uniform",
               round_to: int = 1, min_channels: int = 1, max_ratio: float = 0.9, norm: str = "mean",
               model_name: str = "", settings: dict | None = None, tolerance: float = 0.01):
    """Bisection on the removed fraction until MACs (or params) after / before reaches `target` (within
    `tolerance`, or as close as the guards allow). Returns (plan, achieved ratio)."""
    graph = analysis.graph
    before = count_after(graph, {})[metric]

    def measure(fraction):
        drops = select(analysis, scores, fraction, scope, round_to, min_channels, max_ratio, norm)
        plan = build_plan(analysis, drops, model_name, settings)
        return plan, count_after(graph, plan.removed_elements())[metric] / before

    lo, hi = 0.0, 1.0
    if measure(0.0)[1] <= target:
        return measure(0.0)
    best_fraction, best_gap = 0.0, float("inf")
    for _ in range(40):
        mid = (lo + hi) / 2
        _, achieved = measure(mid)
        if abs(achieved - target) < best_gap:
            best_fraction, best_gap = mid, abs(achieved - target)
        if best_gap <= tolerance * target / 2:
            break
        lo, hi = (mid, hi) if achieved > target else (lo, mid)
    drops = select(analysis, scores, best_fraction, scope, round_to, min_channels, max_ratio, norm)
    if round_to <= 1:  # a uniform fraction moves in coarse steps: trade single units to land on the target
        drops = _fine_tune(analysis, scores, drops, target, metric, before, tolerance, min_channels, max_ratio)
    plan = build_plan(analysis, drops, model_name, settings)
    return plan, count_after(graph, plan.removed_elements())[metric] / before


def _fine_tune(analysis, scores, drops, target, metric, before, tolerance, min_channels, max_ratio,
               steps: int = 400):
    """Add back (or take out) one unit at a time, best-scored first (worst first), until within tolerance."""
    graph = analysis.graph
    groups = {g.id: g for g in analysis.groups}

    def achieved(d):
        return count_after(graph, build_plan(analysis, d).removed_elements())[metric] / before

    drops = {k: list(v) for k, v in drops.items()}
    current = achieved(drops)
    norm = {gid: _normalise(scores[gid], "mean") for gid in groups}
    for _ in range(steps):
        if abs(current - target) <= tolerance * target * 0.9:
            break
        # one candidate per group: its best dropped unit (to restore) or its worst kept unit (to drop)
        trials = []
        for gid, g in groups.items():
            d = set(drops[gid])
            if current < target and d:
                k = max(d, key=lambda j: norm[gid][j])
                trial = {**drops, gid: sorted(d - {k})}
            elif current > target:
                n = len(g.units)
                if n - len(d) - 1 < max(1, n - int(max_ratio * n)):
                    continue
                k = min((j for j in range(n) if j not in d), key=lambda j: norm[gid][j])
                trial = {**drops, gid: sorted(d | {k})}
            else:
                continue
            trials.append((abs(achieved(trial) - target), trial))
        if not trials:
            break
        gap, trial = min(trials, key=lambda t: t[0])
        if gap >= abs(current - target):
            break  # no single unit brings us closer
        drops, current = trial, achieved(trial)
    return drops
