"""Importance criteria: each scores the units of one channel group (higher = keep)."""
from .base import CRITERIA, Criterion, get_criterion, register  # noqa: F401
from . import data, magnitude, random_, weights_only  # noqa: F401  (register the criteria)
