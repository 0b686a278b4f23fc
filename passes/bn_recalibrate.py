"""BN re-estimation after pruning: reset running mean/variance of every BatchNormalization to the statistics of
its (pruned) input on calibration data, so the normalisation matches the pruned network's activations.

Runs after verification: the recalibrated model is no longer the masked original (that is the point), so the
report states how many norms were re-estimated and the fidelity check measures the effect.
"""
from __future__ import annotations

import numpy as np

from graphprune.calibration import collect
from graphprune.ir import Graph


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
    if not targets:
        return 0
    stats = collect(graph, {(n.input[0], 1): False for n in targets}, feeds, progress=progress,
                    source="bn re-estimation")
    for node in targets:
        st = stats.get(node.input[0], 1)
        mean, var = node.input[3], node.input[4]
        dtype = graph.initializers[mean].dtype
        graph.set_initializer(mean, st.mean.astype(dtype))
        graph.set_initializer(var, st.var.astype(graph.initializers[var].dtype))
    return len(targets)
