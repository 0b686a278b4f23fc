"""Weight compensation in the consumers of removed channels (producers' rows are simply deleted).

obs (= lsq): W' = W − W_S [(H⁻¹)_SS]⁻¹ (H⁻¹)_{S,:}, the least-squares refit of the kept inputs to reproduce
    the layer's original output on the calibration (or proxy) activations (He et al. ICCV'17; OBS/SparseGPT).
    With a bias (`ensure_biases` gives every Conv/Gemm one), the refit has an intercept: H is augmented
    with the constant input 1, so the removed channels' mean moves into the bias along with the rest.
bias: the removed channels' mean contribution W_S·μ_S moves into the consumer's bias (FLAP-style).
Updates are whole new arrays in the original shapes; the rewrite slices them like any weight, and the masked
reference used for verification carries the same updates.
"""
from __future__ import annotations

import numpy as np

from .importance.data import weight_rows


def _single_reader(graph, name) -> bool:
    return len({id(n) for n, _ in graph.uses.get(name, [])}) == 1


def refittable(analysis):
    """Consumers whose weight a compensation may replace: one reader of a float initializer, channel-wise reads
    (block 1). Tied or quantised weights are left alone: a refit would have to serve every reader."""
    graph = analysis.graph
    for cons in analysis.consumers:
        if cons.block != 1 or cons.weight not in graph.initializers:
            continue
        if graph.initializers[cons.weight].dtype.kind != "f" or not _single_reader(graph, cons.weight):
            continue
        yield cons


def _consumers(analysis, removed):
    for cons in refittable(analysis):
        idx = removed.get((cons.x, cons.x_axis))
        if idx is not None and len(idx):
            yield cons, idx


def ensure_biases(graph) -> int:
    """Give every Conv and Gemm with a constant weight a zero bias, so compensation has an intercept to move
    removed channels' means into (a Conv followed by BatchNorm usually has none). Run before analysis, so
    the new biases are sliced with their layer's outputs. Returns the number of biases added."""
    added = 0
    for node in graph.nodes:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) > 2 and node.input[2]:
            continue
        w = graph.initializers.get(node.input[1])
        if w is None or w.dtype.kind != "f":
            continue
        if node.op_type == "Conv":
            width = w.shape[0]
        else:
            attrs = {a.name: a for a in node.attribute}
            trans_b = attrs["transB"].i if "transB" in attrs else 0
            if w.ndim != 2:
                continue
            width = w.shape[0] if trans_b else w.shape[1]
        name = graph.add_initializer(f"{node.name or node.output[0]}.bias", np.zeros(width, w.dtype))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
        added += 1
    if added:
        graph.reindex()
    return added


def obs_updates(analysis, removed, stats, updates: dict | None = None) -> tuple[dict, list[str]]:
    updates = dict(updates or {})
    notes = []
    graph = analysis.graph
    for cons, idx in _consumers(analysis, removed):
        st = stats.get(cons.x, cons.x_axis)
        if st is None or st.gram is None:
            notes.append(f"obs: no Hessian for '{cons.x}': consumer '{cons.node}' not compensated")
            continue
        w = updates.get(cons.weight, graph.initializers[cons.weight])
        rows = weight_rows(w, cons.weight_axis)
        found = _bias_of(graph, cons.node, cons.weight, cons.weight_axis)
        h_inv = st.hessian_inv(intercept=found is not None)
        delta = -h_inv[:, idx] @ np.linalg.solve(h_inv[np.ix_(idx, idx)], rows[idx])
        if found is not None:
            # last row: the intercept's change per weight column (outputs × taps); taps add up per output
            _apply_bias_shift(graph, updates, w, cons, found, delta[-1])
            delta = delta[:-1]
        new_rows = rows + delta
        moved_shape = (w.shape[cons.weight_axis],) + tuple(np.delete(w.shape, cons.weight_axis))
        updates[cons.weight] = np.moveaxis(new_rows.reshape(moved_shape), 0, cons.weight_axis).astype(w.dtype)
    return updates, notes


def _apply_bias_shift(graph, updates, w, cons, found, per_column) -> None:
    """Add a shift given per weight column (the layout of `weight_rows`: all axes but the input axis) to
    the consumer's bias, summing the kernel taps of each output."""
    bias, out_axis = found
    rest = [a for a in range(w.ndim) if a != cons.weight_axis]
    shaped = per_column.reshape([w.shape[a] for a in rest])
    shift = np.moveaxis(shaped, rest.index(out_axis), 0).reshape(w.shape[out_axis], -1).sum(axis=1)
    b = updates.get(bias, graph.initializers[bias])
    updates[bias] = (b.astype(np.float64) + shift).astype(b.dtype)


def _bias_of(graph, node_name, weight, weight_axis):
    """(bias initializer, weight output axis) of a consumer, or None: Conv/Gemm bias input, MatMul → Add."""
    node = next(n for n in graph.nodes if n.name == node_name)
    w = graph.initializers[weight]
    if node.op_type == "Conv" and len(node.input) > 2 and node.input[2] in graph.initializers:
        return node.input[2], 0
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] in graph.initializers:
        bias = node.input[2]
        if graph.initializers[bias].ndim == 1 and w.ndim == 2:
            return bias, 1 - weight_axis
    if node.op_type == "MatMul" and w.ndim == 2:
        uses = graph.uses.get(node.output[0], [])
        if len(uses) == 1 and uses[0][0].op_type == "Add":
            add = uses[0][0]
            other = add.input[1 - uses[0][1]]
            if other in graph.initializers and graph.initializers[other].ndim == 1 \
                    and _single_reader(graph, other):
                return other, 1
    return None


def bias_updates(analysis, removed, stats, updates: dict | None = None) -> tuple[dict, list[str]]:
    updates = dict(updates or {})
    notes = []
    graph = analysis.graph
    for cons, idx in _consumers(analysis, removed):
        st = stats.get(cons.x, cons.x_axis)
        found = _bias_of(graph, cons.node, cons.weight, cons.weight_axis)
        if st is None or found is None:
            notes.append(f"bias: consumer '{cons.node}' has no bias to absorb the mean; not compensated")
            continue
        bias, out_axis = found
        w = updates.get(cons.weight, graph.initializers[cons.weight]).astype(np.float64)
        moved = np.moveaxis(w, (cons.weight_axis, out_axis), (0, 1))
        per_out = moved.reshape(moved.shape[0], moved.shape[1], -1).sum(axis=2)  # (C, O): taps summed
        shift = st.mean[idx] @ per_out[idx]
        b = updates.get(bias, graph.initializers[bias])
        updates[bias] = (b.astype(np.float64) + shift).astype(b.dtype)
    return updates, notes
