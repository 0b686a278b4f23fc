"""What a prune run reports: sizes before and after, groups, plan, statistics, checks, timings."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .plan import RewritePlan


@dataclass
class PruneReport:
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    groups_total: int = 0
    groups_pruned: int = 0
    groups_frozen: int = 0
    channels_prunable: int = 0
    channels_frozen: int = 0
    channels_removed: int = 0
    frozen_reasons: dict = field(default_factory=dict)
    per_layer: list = field(default_factory=list)   # (node, macs before, macs after)
    verification: dict | None = None
    timings: dict = field(default_factory=dict)
    stage_log: list = field(default_factory=list)   # one line per pipeline stage (time, summary or 'skipped')
    seconds: float = 0.0
    diagnostics: list = field(default_factory=list)
    rule_failures: list = field(default_factory=list)  # (node, op, traceback) of channel rules that raised
    plan: RewritePlan | None = None
    calibration: str = ""              # where the statistics came from (file, or the data-free proxy)
    compensated: int = 0               # weights rewritten by compensation
    kept_widths: list = field(default_factory=list)  # (group, width before, width after)
    fidelity: dict | None = None       # pruned vs dense on held-out calibration samples
    bn_recalibrated: int = 0           # BatchNorms whose running statistics were re-estimated
    sensitivity: dict | None = None    # group -> relative output error at passes.sensitivity.LEVELS
    loss_curves: dict | None = None    # group -> predicted relative loss at passes.loss_allocation.CURVE_POINTS
    sparse_layers: list = field(default_factory=list)  # passes.sparsify.SparseLayerReport per eligible layer
    sparse: dict | None = None         # sparsify totals: layers sparse/dense, bytes, end-to-end ms, notes
    assumed_dims: dict = field(default_factory=dict)  # symbolic dim -> {value, source} the MACs were counted at
    fidelity_search: list = field(default_factory=list)  # --min-fidelity: (MACs target, MACs ratio, agreement)
    fidelity_target: float | None = None  # --min-fidelity: the MACs target chosen
    reconstruction: dict | None = None  # passes.reconstruct summary: per-layer relative errors before/after

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def prunable_share(self) -> float:
        total = self.channels_prunable + self.channels_frozen
        return self.channels_prunable / total if total else 0.0

    def add_analysis(self, analysis) -> None:
        """Group counts and frozen reasons (aggregated over nodes) from an Analysis."""
        self.groups_total = len(analysis.groups) + len(analysis.frozen_groups)
        self.groups_frozen = len(analysis.frozen_groups)
        self.channels_prunable = sum(g.channels for g in analysis.groups)
        self.channels_frozen = sum(g.channels for g in analysis.frozen_groups)
        self.rule_failures = list(getattr(analysis, "rule_failures", []))
        reasons = Counter(short_reason(g.reason) for g in analysis.frozen_groups)
        self.frozen_reasons = dict(reasons.most_common())


def short_reason(reason: str) -> str:
    """'Softmax node 'n12': normalises ...' -> 'Softmax: normalises ...' so reasons aggregate across nodes."""
    head, _, tail = reason.partition(": ")
    op = head.split(" node ")[0]
    return f"{op}: {tail}" if tail else head
