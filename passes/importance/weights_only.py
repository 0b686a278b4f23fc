"""Data-free criteria beyond plain magnitude: BN-scale (network slimming) and LAMP."""
from __future__ import annotations

import numpy as np

from .base import Criterion, register
from .magnitude import L1


@register
class BNScale(Criterion):
    """Σ|γ| of the norm scales in the group (Liu et al., ICCV'17). A group with no norm falls back to l1,
    and says so in `notes`."""
    name = "bn-scale"

    def scores(self, group, analysis):
        graph, roles = analysis.graph, analysis.roles
        total = np.zeros(len(group.units))
        found = False
        for member in group.members:
            name, axis = member
            if roles.get(name) != "norm_scale":
                continue
            gamma = np.abs(graph.initializers[name].astype(np.float64))
            gamma = np.moveaxis(gamma, axis, 0).reshape(gamma.shape[axis], -1).sum(axis=1)
            total += np.array([gamma[u.elements[member]].sum() if member in u.elements else 0.0
                               for u in group.units])
            found = True
        if not found:
            self.notes.append(f"bn-scale: group {group.name} has no norm scale; scored with l1")
            return L1(seed=self.seed).scores(group, analysis)
        return total


def lamp_scores(weights: np.ndarray) -> np.ndarray:
    """LAMP score of every weight (Lee et al. ICLR'21): w_u² / Σ_{v ≥ u} w_v² in ascending-magnitude order.
    The largest weight of a layer scores 1; invariant to rescaling the layer."""
    flat = weights.astype(np.float64).reshape(-1) ** 2
    order = np.argsort(flat, kind="stable")
    sorted_sq = flat[order]
    tail = np.cumsum(sorted_sq[::-1])[::-1]  # Σ over v >= u in sorted order
    out = np.empty_like(flat)
    out[order] = np.divide(sorted_sq, tail, out=np.zeros_like(sorted_sq), where=tail > 0)
    return out.reshape(weights.shape)


@register
class Lamp(Criterion):
    """Channel score = mean LAMP score of the weights it owns, summed over the group's weight members."""
    name = "lamp"

    def scores(self, group, analysis):
        graph, roles = analysis.graph, analysis.roles
        total = np.zeros(len(group.units))
        for member in group.members:
            name, axis = member
            arr = graph.initializers.get(name)
            if arr is None or arr.dtype.kind != "f" or roles.get(name) != "weight" or arr.ndim < 2:
                continue
            lamp = lamp_scores(arr)
            per_index = np.moveaxis(lamp, axis, 0).reshape(arr.shape[axis], -1).mean(axis=1)
            total += np.array([per_index[u.elements[member]].mean() if member in u.elements else 0.0
                               for u in group.units])
        return total
