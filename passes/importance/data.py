"""Criteria that read activations of the group's consumers (calibration data or a synthetic proxy).

For a consumer with weight W (rows of W_m = the channels it reads, columns = outputs × kernel taps) and input
channel statistics (mean, variance, ‖X_c‖, channel Hessian H = XXᵀ/n, damped):
  hessian      ½ Σ_c H_cc ‖W_c‖²                        (OBD with the diagonal; HAP-style)
  activation   Σ_c ‖W_c‖ · ‖X_c‖                         (Wanda, structured)
  fluctuation  Σ_c Var(X_c) · ‖W_c‖²                     (FLAP)
  obspa        ½ tr(W_S [(H⁻¹)_SS]⁻¹ W_Sᵀ)               (structured OBS; compensation in passes/compensate.py)
A conv consumer uses the channel Hessian for every kernel tap (H ≈ H_channels ⊗ I_taps), which keeps memory at
C² per layer. Each consumer's scores are divided by their mean before summing over consumers.
A group read by no weight but contracted activation × activation (attention's Q·Kᵀ head_dim) is scored, by
every data-aware criterion, by its channels' share of the product: Σ_c ‖A_c‖·‖B_c‖ (both operands' norms).
"""
from __future__ import annotations

import numpy as np

from .base import Criterion, register
from .magnitude import L1


def group_consumers(group, analysis):
    members = set(group.members)
    graph = analysis.graph
    return [cons for cons in analysis.consumers
            if (cons.x, cons.x_axis) in members and cons.block == 1 and cons.weight in graph.initializers
            and graph.initializers[cons.weight].dtype.kind == "f"]


def group_contractions(group, analysis):
    members = set(group.members)
    return [ct for ct in analysis.contractions
            if (ct.a, ct.a_axis) in members and (ct.b, ct.b_axis) in members]


def weight_rows(weight: np.ndarray, axis: int) -> np.ndarray:
    """(channels, everything else): one row per input channel the weight reads."""
    return np.moveaxis(weight.astype(np.float64), axis, 0).reshape(weight.shape[axis], -1)


class ActivationCriterion(Criterion):
    needs_data = True
    gram = False

    def wanted(self, analysis):
        out = {}
        for g in analysis.groups:
            consumers = group_consumers(g, analysis)
            for cons in consumers:
                out[(cons.x, cons.x_axis)] = self.gram
            if not consumers:
                for ct in group_contractions(g, analysis):
                    out.setdefault((ct.a, ct.a_axis), False)
                    out.setdefault((ct.b, ct.b_axis), False)
        return out

    def channel_scores(self, rows: np.ndarray, st) -> np.ndarray:
        raise NotImplementedError

    def unit_scores(self, rows, st, units_idx) -> np.ndarray:
        per = self.channel_scores(rows, st)
        return np.array([per[idx].sum() for idx in units_idx])

    def scores(self, group, analysis):
        total = np.zeros(len(group.units))
        used = 0
        for cons in group_consumers(group, analysis):
            st = self.stats.get(cons.x, cons.x_axis) if self.stats is not None else None
            member = (cons.x, cons.x_axis)
            if st is None or st.sum is None or not all(member in u.elements for u in group.units):
                continue
            rows = weight_rows(analysis.graph.initializers[cons.weight], cons.weight_axis)
            s = self.unit_scores(rows, st, [u.elements[member] for u in group.units])
            mean = s.mean()
            if mean > 0:
                total += s / mean
                used += 1
        if not used:
            total, used = self._contraction_scores(group, analysis)
        if not used:
            self.notes.append(f"{self.name}: group {group.name} has no consumer with statistics; scored with l1")
            return L1(seed=self.seed).scores(group, analysis)
        return total


    def _contraction_scores(self, group, analysis):
        total = np.zeros(len(group.units))
        used = 0
        for ct in group_contractions(group, analysis):
            sa = self.stats.get(ct.a, ct.a_axis) if self.stats is not None else None
            sb = self.stats.get(ct.b, ct.b_axis) if self.stats is not None else None
            ka, kb = (ct.a, ct.a_axis), (ct.b, ct.b_axis)
            if sa is None or sb is None or sa.sum is None or sb.sum is None or \
                    not all(ka in u.elements and kb in u.elements for u in group.units):
                continue
            s = np.array([float(np.sum(sa.norm[u.elements[ka]] * sb.norm[u.elements[kb]])) for u in group.units])
            if s.mean() > 0:
                total += s / s.mean()
                used += 1
        return total, used


@register
class Hessian(ActivationCriterion):
    name = "hessian"

    def channel_scores(self, rows, st):
        return 0.5 * (st.sumsq / max(st.n, 1)) * (rows ** 2).sum(axis=1)


@register
class Activation(ActivationCriterion):
    name = "activation"

    def channel_scores(self, rows, st):
        return np.sqrt((rows ** 2).sum(axis=1)) * st.norm


@register
class Fluctuation(ActivationCriterion):
    name = "fluctuation"

    def channel_scores(self, rows, st):
        return st.var * (rows ** 2).sum(axis=1)


@register
class OBSPA(ActivationCriterion):
    """Structured Optimal Brain Surgeon: the loss increase of removing a unit's channels S from a consumer
    with optimal compensation of the remaining weights."""
    name = "obspa"
    gram = True

    intercept = False

    def unit_scores(self, rows, st, units_idx):
        h_inv = st.hessian_inv(intercept=self.intercept)
        sq = (rows ** 2).sum(axis=1)
        out = np.empty(len(units_idx))
        for k, idx in enumerate(units_idx):
            if len(idx) == 1:
                c = idx[0]
                out[k] = 0.5 * sq[c] / h_inv[c, c]
            else:
                m = np.linalg.inv(h_inv[np.ix_(idx, idx)])
                ws = rows[idx]
                out[k] = 0.5 * float(np.sum(ws * (m @ ws)))
        return out
