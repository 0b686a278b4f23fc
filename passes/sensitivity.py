"""Sensitivity analysis: how much the model's outputs move when one group loses a fraction of its units.

Scores rank units *inside* a group; they say little about which group can afford to lose more (a stride-2
bottleneck of EfficientNet collapses at 10 % while its wide neighbours shrug off 30 %). Here every group is
pruned alone at a few levels, lowest-scored units first, on calibration (or proxy) samples, and the relative
output error is recorded. Allocation then gives every group the largest ratio whose error stays under one
common threshold, bisected to the MACs/params target.

One onnxruntime session serves every measurement: each channel tensor a node reads is multiplied by a mask
that is a graph input, so changing the pruned units only changes the feeds (the masked-original oracle of
verify.py, without rebuilding the model). Float tensors only; weight-only oracle masks (RNN recurrences) are
not applied, so the error there is an estimate.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from graphprune.calibration import batches, static_batch

LEVELS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
_FLOAT = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
          onnx.TensorProto.DOUBLE: np.float64}


class MaskedModel:
    """The graph with a mask input multiplied into every read of a prunable channel tensor."""

    def __init__(self, analysis, providers=("CPUExecutionProvider",)):
        import onnxruntime as ort
        graph = analysis.graph
        model = graph.to_model(with_value_info=False)
        g = model.graph
        members = {m for grp in analysis.groups for m in grp.members}
        self.masks: dict[tuple[str, int], tuple[str, tuple, type]] = {}
        masked: dict[str, str] = {}
        new_nodes = []
        for node in g.node:
            for i, name in enumerate(node.input):
                if not name or name in graph.initializers:
                    continue
                axes = [ax for (t, ax) in members if t == name]
                dtype = _FLOAT.get(graph.dtypes.get(name))
                shape = graph.shape(name)
                if not axes or dtype is None or shape is None:
                    continue
                if name not in masked:
                    cur = name
                    for ax in axes:
                        mshape = tuple(int(shape[ax]) if k == ax else 1 for k in range(len(shape)))
                        mname = f"__gp_sens_{len(self.masks)}"
                        self.masks[(name, ax)] = (mname, mshape, dtype)
                        g.input.append(helper.make_tensor_value_info(mname, graph.dtypes[name], list(mshape)))
                        out = f"{mname}_out"
                        new_nodes.append(helper.make_node("Mul", [cur, mname], [out], name=f"{mname}_mul"))
                        cur = out
                    masked[name] = cur
                node.input[i] = masked[name]
            new_nodes.append(node)
        del g.node[:]
        g.node.extend(new_nodes)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(model.SerializeToString(), opts, providers=list(providers))
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.batch = static_batch(graph.inputs)

    def ones(self) -> dict:
        return {mname: np.ones(shape, dtype) for mname, shape, dtype in self.masks.values()}

    def run(self, feeds: dict, removed: dict | None = None) -> list[np.ndarray]:
        masks = self.ones()
        for (name, ax), idx in (removed or {}).items():
            if (name, ax) in self.masks and len(idx):
                mname, shape, _ = self.masks[(name, ax)]
                flat = masks[mname].reshape(-1)
                flat[np.asarray(idx)] = 0
        outs = None
        for feed in batches(feeds, self.batch or len(next(iter(feeds.values())))):
            got = self.session.run(self.outputs, {**feed, **masks})
            outs = got if outs is None else [np.concatenate([a, b]) for a, b in zip(outs, got)]
        return outs


def relative_error(outs, dense) -> float:
    """Mean over float outputs of ‖y − y_dense‖² / ‖y_dense‖²."""
    errs = []
    for y, d in zip(outs, dense):
        if d.dtype.kind != "f":
            continue
        denom = float(np.sum(d.astype(np.float64) ** 2)) or 1.0
        errs.append(float(np.sum((y.astype(np.float64) - d) ** 2)) / denom)
    return float(np.mean(errs)) if errs else 0.0


def measure(analysis, scores: dict, feeds: dict, levels=LEVELS, progress=None) -> dict[int, np.ndarray]:
    """Relative output error per group id at each level of removal (lowest scores first); non-decreasing."""
    model = MaskedModel(analysis)
    dense = model.run(feeds)
    curves: dict[int, np.ndarray] = {}
    for n_done, g in enumerate(analysis.groups):
        order = np.argsort(scores[g.id], kind="stable")
        errs = []
        for p in levels:
            k = int(round(p * len(g.units)))
            if errs and errs[-1] >= 1.0:  # already destroyed: deeper cuts cannot be better
                errs.append(errs[-1])
                continue
            removed: dict = {}
            for u in order[:k]:
                for member, idx in g.units[u].elements.items():
                    removed.setdefault(member, []).extend(int(i) for i in idx)
            errs.append(relative_error(model.run(feeds, removed), dense) if k else 0.0)
        curves[g.id] = np.maximum.accumulate(np.asarray(errs))
        if progress:
            progress(f"sensitivity {n_done + 1}/{len(analysis.groups)} groups")
    return curves


def ratio_under(curve: np.ndarray, threshold: float, levels=LEVELS) -> float:
    """The largest removal ratio whose (linearly interpolated) error stays at or under `threshold`."""
    xs = np.concatenate([[0.0], levels])
    ys = np.concatenate([[0.0], curve])
    if threshold >= ys[-1]:
        return float(xs[-1])
    k = int(np.searchsorted(ys, threshold, side="right"))  # first level above the threshold
    lo_x, hi_x, lo_y, hi_y = xs[k - 1], xs[k], ys[k - 1], ys[k]
    if hi_y <= lo_y:
        return float(lo_x)
    return float(lo_x + (hi_x - lo_x) * (threshold - lo_y) / (hi_y - lo_y))


class SensitivityAllocation:
    """Maps a fraction in [0, 1] to per-group ratios: a log-spaced error threshold, each group's ratio under it."""

    def __init__(self, curves: dict[int, np.ndarray], levels=LEVELS):
        self.curves = curves
        self.levels = levels
        positive = np.concatenate([c[c > 0] for c in curves.values()] or [np.array([1e-6])])
        self.lo = max(float(positive.min()) if len(positive) else 1e-6, 1e-9) / 2
        self.hi = max(float(max(c.max() for c in curves.values())), self.lo * 4) * 2

    def ratios(self, fraction: float) -> dict[int, float]:
        if fraction <= 0:
            return {gid: 0.0 for gid in self.curves}
        threshold = self.lo * (self.hi / self.lo) ** fraction
        return {gid: ratio_under(c, threshold, self.levels) for gid, c in self.curves.items()}
