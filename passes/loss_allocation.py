"""Allocation that sees compensation: predicted output loss *after* OBS compensation, made comparable across layers.

Per-group scores (obspa and every other criterion) rank units inside a group; they say nothing about whether
group A can afford to lose more than group B. Here every group gets a loss curve: the output error its consumers
suffer, after the same OBS refit the compensate stage will apply, when its units are removed in the cheapest order.

For one consumer with weight rows W (one row per input channel, columns = outputs × kernel taps) and damped
input Hessian H = XXᵀ/n (passes/compensate.py, algorithms.md), removing the input channels S and refitting the rest
optimally raises the squared output error per sample by

    L(S) = tr(W_Sᵀ [(H⁻¹)_SS]⁻¹ W_S)                                   (structured OBS)

and the refit is W ← W − (H⁻¹)_{:,S} [(H⁻¹)_SS]⁻¹ W_S, H⁻¹ ← H⁻¹ − (H⁻¹)_{:,S} [(H⁻¹)_SS]⁻¹ (H⁻¹)_{S,:} (the
inverse Hessian of the remaining inputs, by the block-inverse / Schur complement identity). Because the loss is
quadratic, removing S₁ and then S₂ from the updated (W, H⁻¹) adds exactly L(S₁ ∪ S₂) − L(S₁): a greedy walk that
removes a block of the cheapest units at a time records the exact loss of every prefix of its order.

Loss is divided by the consumer's output variance tr(Wᵀ Σ W) (Σ = H − μμᵀ: ‖Y − Ȳ‖²/n, in the same Kronecker
approximation over kernel taps), so 0.01 means "1 % of that layer's output energy lost", whatever its scale. A
group read by several consumers (a residual stream) sums their relative losses.

Allocation then removes, across all groups, the units with the smallest marginal relative loss per MAC (or
parameter, or channel) they save: the Lagrangian solution of "least total relative loss for the budget" when the
curves are convex. Marginals are made non-decreasing along each group's order (running maximum), so any threshold
takes a prefix of every group's order, and passes.allocate's global selection (norm 'none') does the rest.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphprune.metrics import count_after

from .compensate import _bias_of
from .importance.data import group_consumers, weight_rows

STEPS = 48          # greedy blocks per group: the curve is exact at every block boundary
CURVE_POINTS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)   # fractions reported per group


@dataclass
class LossCurve:
    order: np.ndarray          # unit indices, cheapest first (greedy, with compensation)
    marginal: np.ndarray       # relative loss each unit of `order` adds (non-decreasing)
    consumers: int             # consumers whose statistics made the curve
    units: int = 0             # the group's units (the curve stops at max_ratio of them); 0: the curve's length

    def at(self, fraction: float) -> float:
        """Relative loss with `fraction` of the group's units removed (the curve's end where it stops short)."""
        k = int(round(fraction * (self.units or len(self.marginal))))
        return float(self.marginal[:k].sum())


class _Consumer:
    """One consumer's OBS state: weight rows and the inverse Hessian of its still-present inputs."""

    def __init__(self, rows: np.ndarray, h_inv: np.ndarray, energy: float, unit_idx: list[np.ndarray]):
        c = rows.shape[0]
        self.rows = rows.copy()
        self.h_inv = h_inv.copy()     # (c [+1 intercept]) square; the intercept row is never removed
        self.energy = energy
        self.units = unit_idx
        self.single = all(len(ix) == 1 for ix in unit_idx)
        self.channels = c

    def unit_losses(self, alive: np.ndarray) -> np.ndarray:
        out = np.full(len(self.units), np.inf)
        if self.single:
            ch = np.array([ix[0] for ix in self.units])
            d = np.diag(self.h_inv)[ch]
            sq = np.einsum("ij,ij->i", self.rows[ch], self.rows[ch])
            with np.errstate(divide="ignore", invalid="ignore"):
                loss = np.where(d > 1e-300, sq / np.maximum(d, 1e-300), 0.0)
            out = np.where(alive, loss, np.inf)
        else:
            for k in np.flatnonzero(alive):
                out[k] = self.loss(self.units[k])
        return out / self.energy

    def loss(self, idx: np.ndarray) -> float:
        block = self.h_inv[np.ix_(idx, idx)]
        ws = self.rows[idx]
        return float(np.sum(ws * np.linalg.lstsq(block, ws, rcond=None)[0]))

    def remove(self, idx: np.ndarray) -> float:
        """Remove input channels `idx` with optimal compensation; returns the exact relative loss added."""
        block = self.h_inv[np.ix_(idx, idx)]
        ws = self.rows[idx]
        cols = self.h_inv[:, idx]                                       # (H⁻¹)_{:,S}
        # one factorisation of (H⁻¹)_SS for both right-hand sides: [(H⁻¹)_SS]⁻¹ W_S and [(H⁻¹)_SS]⁻¹ (H⁻¹)_{S,:}
        solved = np.linalg.lstsq(block, np.hstack([ws, cols.T]), rcond=None)[0]
        solve_w, solve_h = solved[:, : ws.shape[1]], solved[:, ws.shape[1]:]
        added = float(np.sum(ws * solve_w))
        self.rows -= cols[: self.channels] @ solve_w
        self.h_inv -= cols @ solve_h
        self.rows[idx] = 0.0
        self.h_inv[idx, :] = 0.0
        self.h_inv[:, idx] = 0.0
        return added / self.energy


def _consumers_of(group, analysis, stats) -> list[_Consumer]:
    graph = analysis.graph
    out = []
    for cons in group_consumers(group, analysis):
        st = stats.get(cons.x, cons.x_axis) if stats is not None else None
        member = (cons.x, cons.x_axis)
        if st is None or st.gram is None or not all(member in u.elements for u in group.units):
            continue
        rows = weight_rows(graph.initializers[cons.weight], cons.weight_axis)
        intercept = _bias_of(graph, cons.node, cons.weight, cons.weight_axis) is not None
        # centred: the refit moves the mean into the bias, and an output's mean carries no information a later
        # layer does not get back from the bias, so the loss is measured against the output's variance
        cov = st.gram / max(st.n, 1) - np.outer(st.mean, st.mean)
        energy = float(np.einsum("ij,ij->", rows, cov @ rows))
        if not energy > 0:
            continue
        out.append(_Consumer(rows, st.hessian_inv(intercept=intercept, shrink=True), energy,
                             [np.asarray(u.elements[member], dtype=np.int64) for u in group.units]))
    return out


def loss_curve(group, analysis, stats, limit: int) -> LossCurve | None:
    """Greedy removal of `limit` units, a block of the currently cheapest at a time; None without statistics."""
    consumers = _consumers_of(group, analysis, stats)
    if not consumers:
        return None
    n = len(group.units)
    limit = min(limit, n)
    alive = np.ones(n, bool)
    order: list[int] = []
    marginal: list[float] = []
    block = max(1, -(-limit // STEPS))
    while len(order) < limit:
        losses = sum(c.unit_losses(alive) for c in consumers)
        take = min(block, limit - len(order))
        picks = np.argsort(losses, kind="stable")[:take]
        added = 0.0
        for c in consumers:
            idx = np.concatenate([c.units[k] for k in picks])
            added += c.remove(idx)
        # spread the block's exact loss over its units in proportion to their single-unit estimates
        est = np.maximum(losses[picks], 0.0)
        share = est / est.sum() if est.sum() > 0 else np.full(take, 1.0 / take)
        order.extend(int(k) for k in picks)
        marginal.extend(float(v) for v in max(added, 0.0) * share)
        alive[picks] = False
    return LossCurve(np.array(order, dtype=np.int64), np.maximum.accumulate(np.array(marginal)), len(consumers), n)


def score_curve(scores: np.ndarray, limit: int) -> LossCurve:
    """A stand-in curve for a group no weight reads (attention's Q·Kᵀ head_dim: two activations contract it,
    nothing can be refit): the criterion's order, each unit's share of the group's total score as its local
    loss. Only its shape matters: the end-to-end probes put it on the output's scale like any other."""
    s = np.maximum(np.asarray(scores, dtype=np.float64), 0.0)
    order = np.argsort(s, kind="stable")[:limit]
    share = s[order] / s.sum() if s.sum() > 0 else np.full(len(order), 1.0 / max(len(s), 1))
    return LossCurve(order.astype(np.int64), np.maximum.accumulate(share), 0, len(s))


def curves(analysis, stats, max_ratio: float, scores: dict | None = None, progress=None) -> dict[int, LossCurve | None]:
    """Loss curves per group id; groups no weight with statistics reads get a `score_curve` from `scores` when
    given, else None."""
    out = {}
    for i, g in enumerate(analysis.groups):
        n = len(g.units)
        limit = min(n - 1, int(np.floor(max_ratio * n)))
        out[g.id] = loss_curve(g, analysis, stats, limit) if n > 1 else None
        if out[g.id] is None and n > 1 and scores is not None and g.id in scores:
            out[g.id] = score_curve(scores[g.id], limit)
        if progress and i % 20 == 0:
            progress(f"loss curves {i + 1}/{len(analysis.groups)} groups")
    return out


def unit_savings(analysis, metric: str) -> dict[int, float]:
    """What one unit of each group saves: MACs or params (exact counts with that unit alone removed), or
    channels."""
    graph = analysis.graph
    out = {}
    if metric not in ("macs", "params"):
        return {g.id: g.channels / max(len(g.units), 1) for g in analysis.groups}
    before = count_after(graph, {})[metric]
    for g in analysis.groups:
        unit = g.units[0]
        cuts = {m: len(idx) for m, idx in unit.elements.items() if len(idx)}
        out[g.id] = max(before - count_after(graph, cuts)[metric], 0)
    return out


def allocation_scores(analysis, loss_curves: dict, savings: dict, gains: dict | None = None) -> tuple[dict, list[str]]:
    """Per-unit priorities for a global selection (norm 'none'): marginal relative loss per unit saved, along each
    group's order. Groups without a curve (no consumer with statistics) are kept whole; units beyond a curve's end
    (the max_ratio guard) are never selected."""
    scores, notes = {}, []
    kept_whole = []
    for g in analysis.groups:
        n = len(g.units)
        curve = loss_curves.get(g.id)
        save = savings.get(g.id, 0)
        if curve is None or not save > 0:
            scores[g.id] = np.full(n, np.inf)
            if n > 1:
                kept_whole.append(g.name)
            continue
        s = np.full(n, np.inf)   # units beyond the curve's end (the max_ratio guard) never go
        ramp = curve.marginal / save
        if gains and g.id in gains:   # each unit's local loss on the output's scale, gains interpolated by depth
            ks, gs = gains[g.id]
            ramp = np.maximum.accumulate(ramp * np.interp(np.arange(1, len(ramp) + 1), ks, gs))
        # strictly increasing along the order, so the group's own argsort keeps the greedy order among ties
        s[curve.order] = ramp + np.arange(len(ramp)) * (max(float(ramp[-1]), 1e-300) * 1e-12)
        scores[g.id] = s
    if kept_whole:
        notes.append(f"loss allocation: {len(kept_whole)} group(s) have no consumer with activation statistics and "
                     f"are kept whole: {', '.join(kept_whole[:5])}{' ...' if len(kept_whole) > 5 else ''}")
    return scores, notes


PROBE_LEVELS = (0.2, 0.5, 0.85)   # fractions of each group's order probed end to end
PROBE_SAMPLES = 8                  # samples per probe: ranks groups, not a fidelity measurement


def measure_gains(analysis, stats, loss_curves: dict, feeds: dict, levels=PROBE_LEVELS,
                  progress=None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """End-to-end check of each curve: remove the first `level` of the group's order with the OBS refit the
    compensate stage would apply, run the model on `feeds` and measure the relative output error; the group's
    gain at that level is that error over the curve's predicted local loss there. Returns group id ->
    (unit counts probed, gains).

    Local losses are in units of each consumer's own output variance; how much of that reaches the model's
    outputs differs by orders of magnitude between layers (a narrow residual stream or a stride-2 expansion
    amplifies it, a branch added to a wide residual stream damps it) and grows faster than the local loss when a
    group is cut deep (measured on EfficientNet-Lite0: a 1152-wide expansion costs 0.05 % of the output at 25 %
    and far more at 90 %). A few probes per group, in one session whose masks and consumer weights are inputs
    (passes.sensitivity.MaskedModel), put every curve on the output's scale at the depths the allocation uses."""
    from .compensate import _consumers, obs_updates
    from .sensitivity import MaskedModel, members_needing_masks, relative_error, zero_removed_rows
    graph = analysis.graph
    plans = {}
    weight_names = set()
    for g in analysis.groups:
        curve = loss_curves.get(g.id)
        if curve is None:
            continue
        counts = sorted({min(len(curve.order), max(1, int(round(f * len(g.units))))) for f in levels})
        steps = []
        for k in counts:
            removed: dict = {}
            for u in curve.order[:k]:
                for member, idx in g.units[u].elements.items():
                    removed.setdefault(member, []).extend(int(i) for i in idx)
            steps.append((k, removed, float(curve.marginal[:k].sum())))
            for cons, _ in _consumers(analysis, removed):
                weight_names.add(cons.weight)
                found = _bias_of(graph, cons.node, cons.weight, cons.weight_axis)
                if found is not None:
                    weight_names.add(found[0])
        plans[g.id] = steps
    # masks only where zeroed weight rows do not already remove the channels: every mask (a Where on each read)
    # also blocks onnxruntime's Conv fusions; on EfficientNet-Lite0 a probe then takes 0.16 s, not 0.27 s
    model = MaskedModel(analysis, weight_inputs=weight_names, only=members_needing_masks(analysis))
    dense = model.run(feeds)
    out = {}
    for n_done, (gid, steps) in enumerate(plans.items()):
        ks, gains = [], []
        for k, removed, predicted in steps:
            updates, _ = obs_updates(analysis, removed, stats)
            updates = zero_removed_rows(analysis, removed, updates)
            error = relative_error(model.run(feeds, removed, updates), dense)
            ks.append(k)
            gains.append(error / predicted if predicted > 0 else (1e6 if error > 0 else 1.0))
            if error >= 1.0:   # destroyed: deeper cuts are no better; keep the last gain for them
                break
        out[gid] = (np.array(ks, dtype=np.float64), np.array(gains))
        if progress and n_done % 10 == 0:
            progress(f"loss curves: end-to-end probes, group {n_done + 1}/{len(plans)}")
    return out
