"""The Python API: prune(model_or_path, ratio=...) -> (ModelProto, PruneReport).

Every keyword is a field of `graphprune.options.PruneOptions` (validated once, shared with the CLI); the work is
the stage pipeline in `graphprune/pipeline.py`.
"""
from __future__ import annotations

import onnx

from .analysis import Analysis, analyze
from .errors import PlanError
from .ir import Graph, load_model, save_model
from .options import PruneOptions
from .plan import RewritePlan
from .report import PruneReport


def load_graph(model_or_path) -> tuple[Graph, bool]:
    """Load and canonicalize; returns the graph and whether the model had external data. Any failure is a
    GraphpruneError (a PassError naming the step when it is not one already)."""
    from .passes.canonicalize import canonicalize
    from .passmanager import PassManager
    pm = PassManager()
    model, external = pm.run("load", load_model, model_or_path)
    graph = pm.run("graph", Graph, model)
    pm.run("canonicalize", canonicalize, graph)
    return graph, external


def analyze_model(model_or_path, exclude=None, whole_heads: bool | str = False) -> Analysis:
    """Channel groups and frozen groups (with reasons) of a model, without pruning it."""
    from .passmanager import PassManager
    graph, _ = load_graph(model_or_path)
    return PassManager().run("analyze", analyze, graph, exclude=exclude, whole_heads=whole_heads)


def prune(model_or_path, options: PruneOptions | None = None, *, progress=None, **kwargs):
    """Prune `model_or_path` (path or ModelProto). Returns (pruned ModelProto, PruneReport); report.plan is the
    RewritePlan. With dry_run=True nothing is rewritten: the model is None and the plan says what would go.

    Pass either `options` (a PruneOptions) or its fields as keywords, e.g.
    `prune("m.onnx", ratio=0.5)` or `prune("m.onnx", target_macs=0.5, importance="obspa", calib="feeds.npz")`.
    See PruneOptions for every field, its default and its meaning. `progress` is a callable(str) for long stages.
    """
    from .pipeline import run
    if options is None:
        options = PruneOptions.from_kwargs(**kwargs)
    elif kwargs:
        options = options.replace(**kwargs)
    else:
        options = options.validate()
    ctx = run(model_or_path, options, progress=progress)
    return (None if options.dry_run else ctx.pruned), ctx.report


def save(model: onnx.ModelProto, path, external_data=None) -> None:
    """Write atomically; weights go to external data when the model is large."""
    save_model(model, path, external_data)


__all__ = ["prune", "analyze_model", "load_graph", "PruneOptions", "PruneReport", "RewritePlan", "PlanError",
           "save"]
