"""Sensitivity analysis: how much the model's outputs move when one group loses a fraction of its units.

Scores rank units *inside* a group; they say little about which group can afford to lose more (a stride-2
bottleneck of EfficientNet collapses at 10 % while its wide neighbours shrug off 30 %). Here every group is
pruned alone at a few levels, lowest-scored units first, on calibration (or proxy) samples, and the relative
output error is recorded. Allocation then gives every group the largest ratio whose error stays under one
common threshold, bisected to the MACs/params target.

One onnxruntime session serves every measurement: each channel tensor a node reads is masked by a bool mask
that is a graph input, so changing the pruned units only changes the feeds (the masked-original oracle of
verify.py, built by the same code in graphprune.masking, without rebuilding the model). Float tensors only;
weight-only oracle masks (RNN recurrences) are not applied, so the error there is an estimate.
"""
from __future__ import annotations

import numpy as np
import onnx

from graphprune.feeds import static_batch
from graphprune.masking import insert_consumer_masks
from graphprune.runtime import CPU, run, session

LEVELS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
_FLOAT = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


# ops whose output channel c is computed from input channel c alone, in the same layout (unary maps, broadcast
# arithmetic, per-channel norms, pooling): a removed channel's values stay in that channel through them
CHANNEL_LOCAL = frozenset({
    "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Elu", "Selu", "Celu", "Softplus",
    "Softsign", "Erf", "Gelu", "Mish", "PRelu", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Identity",
    "Dropout", "Cast", "Add", "Sub", "Mul", "Div", "BatchNormalization", "MaxPool", "AveragePool",
    "GlobalAveragePool", "GlobalMaxPool"})


def _depthwise(graph, node) -> bool:
    """A Conv whose every output channel reads exactly its own input channel (group = channels, multiplier 1)."""
    if node.op_type != "Conv" or node.input[1] not in graph.initializers:
        return False
    w = graph.initializers[node.input[1]]
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return w.ndim >= 3 and w.shape[1] == 1 and group == w.shape[0] > 1


def members_needing_masks(analysis) -> set[tuple[str, int]]:
    """The (tensor, axis) members whose reads still need a mask when a probe removes channels by zeroing the
    removed rows of every refittable consumer's weight (which the OBS refit does anyway) instead of masking
    every read. A removed channel's values may then flow on, wrong, through channel-local ops into other members
    of its group, as long as every place they end is a weight row that is zero: the outputs are exactly the
    masked ones. A read by anything else (a norm over the channels, attention's activation-activation MatMul, a
    reshape, a control-flow body, a tied or quantised weight) keeps its mask."""
    from .compensate import refittable
    graph = analysis.graph
    group_of = {m: g.id for g in analysis.groups for m in g.members}
    rows_zeroed = {(c.node, c.x, c.x_axis) for c in refittable(analysis)}
    need = set()
    for (name, ax), gid in group_of.items():
        if name in graph.initializers:
            continue
        for node, _ in graph.uses.get(name, []):
            if (node.name, name, ax) in rows_zeroed:
                continue
            local = node.op_type in CHANNEL_LOCAL or _depthwise(graph, node)
            out = node.output[0] if node.output else ""
            rank = len(graph.shape(out) or ()) if out else 0
            if local and any(group_of.get((out, a)) == gid for a in range(rank)):
                continue
            need.add((name, ax))
            break
    return need


def zero_removed_rows(analysis, removed: dict, weights: dict) -> dict:
    """`weights` with the removed input rows of every refittable consumer set to zero (taken from the graph when
    absent): what `members_needing_masks` relies on for the reads it leaves unmasked."""
    from .compensate import _consumers
    out = dict(weights)
    for cons, idx in _consumers(analysis, removed):
        w = np.array(out.get(cons.weight, analysis.graph.initializers[cons.weight]), copy=True)
        index = [slice(None)] * w.ndim
        index[cons.weight_axis] = np.asarray(idx, dtype=np.int64)
        w[tuple(index)] = 0
        out[cons.weight] = w
    return out


class MaskedModel:
    """The graph with a bool mask input applied to every read of a prunable channel tensor, one per axis.
    `weight_inputs`: initializers turned into graph inputs too, so a probe can feed compensated weights.
    `only`: mask just these (tensor, axis) members (see `members_needing_masks`); None masks every member."""

    def __init__(self, analysis, providers=CPU, weight_inputs=(), only: set | None = None):
        graph = analysis.graph
        model = graph.to_model(with_value_info=False)
        self.weights = {}
        if weight_inputs:
            wanted = set(weight_inputs)
            keep = [t for t in model.graph.initializer if t.name not in wanted]
            for t in model.graph.initializer:
                if t.name in wanted:
                    model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims))
                    self.weights[t.name] = graph.initializers[t.name]
            del model.graph.initializer[:]
            model.graph.initializer.extend(keep)
        # a weight fed as an input keeps its masks whatever `only` says: cheap, and what the full oracle does
        members = {m for grp in analysis.groups for m in grp.members
                   if only is None or m in only or m[0] in self.weights}
        axes_of: dict[str, list[int]] = {}
        for name, ax in sorted(members):
            axes_of.setdefault(name, []).append(ax)
        masks: dict[str, list[np.ndarray]] = {}
        for name, axes in axes_of.items():
            shape = graph.shape(name)
            if graph.dtypes.get(name) not in _FLOAT or shape is None:
                continue
            masks[name] = [np.ones(tuple(int(shape[ax]) if k == ax else 1 for k in range(len(shape))), bool)
                           for ax in axes]
        names = insert_consumer_masks(model, masks, graph.dtypes, as_inputs=True, prefix="__gp_sens")
        # (tensor, axis) -> (mask input, its shape, its dtype)
        self.masks: dict[tuple[str, int], tuple[str, tuple, type]] = {
            (name, ax): (mname, masks[name][j].shape, np.bool_)
            for name, mnames in names.items() for j, (ax, mname) in enumerate(zip(axes_of[name], mnames))}
        # onnxruntime's optimisations on, as before: measurements, not a check of the graph
        self.session = session(model, optimize=True, providers=providers)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.batch = static_batch(graph.inputs)

    def ones(self) -> dict:
        return {mname: np.ones(shape, dtype) for mname, shape, dtype in self.masks.values()}

    def run(self, feeds: dict, removed: dict | None = None, weights: dict | None = None) -> list[np.ndarray]:
        """Outputs with `removed` ((tensor, axis) -> indices) masked and `weights` (name -> array) replacing
        the original values of weight inputs."""
        masks = {**self.ones(), **self.weights, **{k: v for k, v in (weights or {}).items() if k in self.weights}}
        for (name, ax), idx in (removed or {}).items():
            if (name, ax) in self.masks and len(idx):
                mname, shape, _ = self.masks[(name, ax)]
                flat = masks[mname].reshape(-1)
                flat[np.asarray(idx)] = False
        return list(run(self.session, feeds, self.outputs, batch=self.batch, unbatched=masks).values())


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
