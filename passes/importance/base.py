"""The one small interface every importance criterion implements."""
from __future__ import annotations

import numpy as np

from graphprune.analysis import Analysis, ChannelGroup

CRITERIA: dict[str, type] = {}


class Criterion:
    """Scores the units of a group; higher means keep. Subclasses set `name` and implement `scores`.

    Criteria that read activations set `needs_data`; the pipeline then collects the statistics that
    `wanted(analysis)` asks for (calibration data, or a synthetic data-free proxy) and hands them over in
    `self.stats` before scoring. `notes` collects visible fallbacks ("group X has no norm: used l1").
    """
    name = ""
    needs_data = False

    def __init__(self, seed: int = 0, **options):
        self.seed = seed
        self.options = options
        self.stats = None
        self.notes: list[str] = []

    def wanted(self, analysis: Analysis) -> dict[tuple[str, int], bool]:
        """(tensor, axis) -> whether the channel Gram matrix is needed (not only per-channel moments)."""
        return {}

    def scores(self, group: ChannelGroup, analysis: Analysis) -> np.ndarray:
        raise NotImplementedError


def register(cls):
    if cls.name in CRITERIA:
        raise ValueError(f"importance criterion {cls.name!r} registered twice")
    CRITERIA[cls.name] = cls
    return cls


def get_criterion(name: str, **options) -> Criterion:
    if name not in CRITERIA:
        from graphprune.options import OptionError
        raise OptionError(f"unknown importance criterion {name!r}; choose from {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name](**options)
