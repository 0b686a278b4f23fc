"""Seeded random scores: the baseline every criterion must beat ("unreasonable effectiveness of random")."""
from __future__ import annotations

import zlib

import numpy as np

from .base import Criterion, register


@register
class Random(Criterion):
    name = "random"

    def scores(self, group, analysis):
        rng = np.random.default_rng([self.seed, zlib.crc32(group.name.encode())])
        return rng.random(len(group.units))
