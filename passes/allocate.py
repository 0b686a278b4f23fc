"""Allocation: turn per-unit scores into a plan.

scope 'uniform': every group loses the same fraction of its units. scope 'global': units of all groups are
ranked together after per-group normalisation (mean, max or LAMP-style), so weak layers lose more. scope
'sensitivity': each group gets the largest ratio whose measured output error (passes/sensitivity.py) stays
under a common threshold.
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
    if how == "none":   # scores already comparable across groups (passes.loss_allocation)
        return s
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
           max_ratio: float = 0.9, norm: str = "mean", sensitivity=None) -> dict[int, list[int]]:
    """Units to drop per group id."""
    drops: dict[int, list[int]] = {}
    if scope == "sensitivity":
        ratios = sensitivity.ratios(fraction)
        for g in analysis.groups:
            n = len(g.units)
            keep = units_to_keep(n, g.channels / n, ratios[g.id], round_to, min_channels, max_ratio)
            order = np.argsort(scores[g.id], kind="stable")
            drops[g.id] = sorted(order[: n - keep].tolist())
        return drops
    if scope == "uniform":
        for g in analysis.groups:
            n = len(g.units)
            keep = units_to_keep(n, g.channels / n, fraction, round_to, min_channels, max(max_ratio, fraction))
            order = np.argsort(scores[g.id], kind="stable")
            drops[g.id] = sorted(order[: n - keep].tolist())
        return drops
    # global: one threshold over normalised scores, then the per-group guards
    # an infinite score marks a unit that never goes (passes.loss_allocation: no statistics, past max_ratio)
    pooled = [(v, g.id, k) for g in analysis.groups for k, v in enumerate(_normalise(scores[g.id], norm))
              if np.isfinite(v)]
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


class _Counter:
    """Removed-element counts per (tensor, axis) for a drop selection, without building a plan."""

    def __init__(self, analysis):
        self.groups = analysis.groups
        self.members = {g.id: list(g.members) for g in analysis.groups}
        self.sizes = {g.id: np.array([[u.size(m) for m in g.members] for u in g.units]) for g in analysis.groups}

    def cuts(self, drops) -> dict:
        out: dict = {}
        for gid, d in drops.items():
            if not len(d):
                continue
            counts = self.sizes[gid][list(d)].sum(axis=0)
            for m, n in zip(self.members[gid], counts):
                if n:
                    out[m] = out.get(m, 0) + int(n)
        return out


def fit_target(analysis, scores, target: float, metric: str = "macs", scope: str = "uniform",
               round_to: int = 1, min_channels: int = 1, max_ratio: float = 0.9, norm: str = "mean",
               model_name: str = "", settings: dict | None = None, tolerance: float = 0.01, sensitivity=None):
    """Bisection on the removed fraction until MACs (or params) after / before reaches `target` (within
    `tolerance`, or as close as the guards allow), then single-unit trades to land inside it.
    Returns (plan, achieved ratio)."""
    graph = analysis.graph
    counter = _Counter(analysis)
    before = count_after(graph, {})[metric]

    def achieved(drops):
        return count_after(graph, counter.cuts(drops))[metric] / before

    def at(fraction):
        return select(analysis, scores, fraction, scope, round_to, min_channels, max_ratio, norm, sensitivity)

    lo, hi = 0.0, 1.0
    best_fraction, best_gap = 0.0, abs(achieved(at(0.0)) - target)
    if achieved(at(0.0)) > target:
        for _ in range(40):
            mid = (lo + hi) / 2
            a = achieved(at(mid))
            if abs(a - target) < best_gap:
                best_fraction, best_gap = mid, abs(a - target)
            if best_gap <= tolerance * target / 2:
                break
            lo, hi = (mid, hi) if a > target else (lo, mid)
    drops = at(best_fraction)
    if round_to <= 1:  # a uniform fraction moves in coarse steps: trade single units to land on the target
        drops = _fine_tune(analysis, scores, drops, target, achieved, tolerance, max_ratio, norm=norm)
    plan = build_plan(analysis, drops, model_name, settings)
    return plan, achieved(drops)


def _fine_tune(analysis, scores, drops, target, achieved, tolerance, max_ratio, steps: int = 200,
               breadth: int = 8, norm: str = "mean"):
    """Restore the best dropped unit (or drop the worst kept one) of whichever of the `breadth` most
    promising groups lands closest to the target, one unit at a time, while that gets closer."""
    groups = {g.id: g for g in analysis.groups}
    normed = {gid: _normalise(scores[gid], norm) for gid in groups}
    drops = {k: list(v) for k, v in drops.items()}
    current = achieved(drops)
    for _ in range(steps):
        if abs(current - target) <= tolerance * target * 0.9:
            break
        options = []
        for gid, g in groups.items():
            d = set(drops[gid])
            if current < target and d:
                k = max(d, key=lambda j: normed[gid][j])
                options.append((-normed[gid][k], gid, sorted(d - {k})))
            elif current > target:
                n = len(g.units)
                if n - len(d) - 1 < max(1, n - int(max_ratio * n)):
                    continue
                k = min((j for j in range(n) if j not in d), key=lambda j: normed[gid][j])
                if not np.isfinite(normed[gid][k]):
                    continue  # a unit that never goes
                options.append((normed[gid][k], gid, sorted(d | {k})))
        options.sort(key=lambda t: t[0])
        trials = [(abs(achieved({**drops, gid: d}) - target), gid, d) for _, gid, d in options[:breadth]]
        if not trials:
            break
        gap, gid, d = min(trials, key=lambda t: t[0])
        if gap >= abs(current - target):
            break  # no single unit brings us closer
        drops[gid] = d
        current = achieved(drops)
    return drops
