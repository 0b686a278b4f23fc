"""BN re-estimation after pruning: reset running mean/variance of every BatchNormalization to the statistics of
its (pruned) input on calibration data, so the normalisation matches the pruned network's activations.

Norms are re-estimated one at a time in topological order, each on activations that already pass through the
re-estimated norms upstream (estimating all at once from the old network compounds the error downstream).
Re-estimation also adapts the norms to the calibration data's distribution: with calibration data unlike the
deployment data that hurts even an unpruned model, so the API keeps the result only when the fidelity check
on held-out samples improves.

Runs after verification: the recalibrated model is no longer the masked original (that is the point), so the
report states how many norms were re-estimated and the fidelity check measures the effect.
"""
from __future__ import annotations

from graphprune.calibration import collect
from graphprune.ir import Graph

MAX_SAMPLES = 64  # per-channel mean/var over batch × spatial positions: a few dozen samples suffice


def recalibrate_batchnorm(graph: Graph, feeds: dict, progress=None) -> int:
    """Re-estimate running statistics of every BatchNormalization whose mean/var are unshared initializers.
    Returns the number of norms updated."""
    targets = []
    for node in graph.nodes:
        if node.op_type != "BatchNormalization" or len(node.input) < 5:
            continue
        mean, var = node.input[3], node.input[4]
        if mean in graph.initializers and var in graph.initializers and \
                len(graph.uses.get(mean, [])) == 1 and len(graph.uses.get(var, [])) == 1:
            targets.append(node)
    feeds = {k: v[:MAX_SAMPLES] for k, v in feeds.items()}
    for k, node in enumerate(targets):  # graph.nodes is topologically sorted
        stats = collect(graph, {(node.input[0], 1): False}, feeds, source="bn re-estimation")
        st = stats.get(node.input[0], 1)
        mean, var = node.input[3], node.input[4]
        graph.set_initializer(mean, st.mean.astype(graph.initializers[mean].dtype))
        graph.set_initializer(var, st.var.astype(graph.initializers[var].dtype))
        if progress:
            progress(f"bn re-estimation {k + 1}/{len(targets)}")
    return len(targets)
