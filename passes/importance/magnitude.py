"""Group magnitude (Li et al. ICLR'17; Torch-Pruning group norm): sum over every weight member of the group of
the norm of the slices each unit owns, normalised per member so one big layer does not dominate."""
from __future__ import annotations

import numpy as np

from .base import Criterion, register

SCORED_ROLES = {"weight", "bias", "norm_scale", "norm_bias", None}


def member_slice_norms(array: np.ndarray, axis: int, power: int) -> np.ndarray:
    """Per index along `axis`: sum of |w|^power over the rest of the tensor."""
    a = np.abs(np.moveaxis(array.astype(np.float64, copy=False), axis, 0)).reshape(array.shape[axis], -1)
    return (a ** power).sum(axis=1) if power != 1 else a.sum(axis=1)


class Magnitude(Criterion):
    power = 1

    def scores(self, group, analysis):
        graph = analysis.graph
        roles = analysis.roles
        total = np.zeros(len(group.units))
        used = 0
        for member in group.members:
            name, axis = member
            arr = graph.initializers.get(name)
            if arr is None or arr.dtype.kind != "f" or arr.ndim == 0 or roles.get(name) not in SCORED_ROLES:
                continue
            norms = member_slice_norms(arr, axis, self.power)
            per_unit = np.array([norms[u.elements[member]].sum() if member in u.elements else 0.0
                                 for u in group.units])
            mean = per_unit.mean()
            if mean > 0:
                total += per_unit / mean
                used += 1
        return total


@register
class L1(Magnitude):
    name = "l1"
    power = 1


@register
class L2(Magnitude):
    name = "l2"
    power = 2
