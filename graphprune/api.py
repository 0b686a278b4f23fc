"""The Python API: prune(model_or_path, ratio=...) -> (ModelProto, PruneReport)."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .analysis import Analysis, analyze
from .errors import GraphpruneError, PlanError
from .ir import Graph, load_model, save_model
from .metrics import count
from .passmanager import PassManager
from .plan import RewritePlan, check_plan
from .rewrite import apply_removal


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
    per_layer: list = field(default_factory=list)   # (node, op, macs before, macs after)
    verification: dict | None = None
    timings: dict = field(default_factory=dict)
    seconds: float = 0.0
    diagnostics: list = field(default_factory=list)
    plan: RewritePlan | None = None
    calibration: str = ""              # where the statistics came from (file, or the data-free proxy)
    compensated: int = 0               # weights rewritten by compensation
    kept_widths: list = field(default_factory=list)  # (group, width before, width after)
    fidelity: dict | None = None       # pruned vs dense on held-out calibration samples
    bn_recalibrated: int = 0           # BatchNorms whose running statistics were re-estimated
    sensitivity: dict | None = None    # group -> relative output error at passes.sensitivity.LEVELS
    sparse_layers: list = field(default_factory=list)  # passes.sparsify.SparseLayerReport per eligible layer
    sparse: dict | None = None         # sparsify totals: layers sparse/dense, bytes, end-to-end ms, notes
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


def load_graph(model_or_path) -> tuple[Graph, bool]:
    from .passes.canonicalize import canonicalize
    model, external = load_model(model_or_path)
    graph = Graph(model)
    canonicalize(graph)
    return graph, external


def analyze_model(model_or_path, exclude=None, whole_heads: bool = False) -> Analysis:
    graph, _ = load_graph(model_or_path)
    return analyze(graph, exclude=exclude, whole_heads=whole_heads)


def summarize_analysis(analysis: Analysis, report: PruneReport) -> None:
    report.groups_total = len(analysis.groups) + len(analysis.frozen_groups)
    report.groups_frozen = len(analysis.frozen_groups)
    report.channels_prunable = sum(g.channels for g in analysis.groups)
    report.channels_frozen = sum(g.channels for g in analysis.frozen_groups)
    reasons = Counter()
    for g in analysis.frozen_groups:
        reasons[_short_reason(g.reason)] += 1
    report.frozen_reasons = dict(reasons.most_common())


def _short_reason(reason: str) -> str:
    """'Softmax node 'n12': normalises ...' -> 'Softmax: normalises ...' so reasons aggregate across nodes."""
    head, _, tail = reason.partition(": ")
    op = head.split(" node ")[0]
    return f"{op}: {tail}" if tail else head


def prune(model_or_path, ratio: float | None = None, importance: str = "l1", round_to: int = 1, min_channels: int = 1,
          exclude=None, plan: RewritePlan | None = None, verify: bool = True, verify_samples: int = 2,
          seed: int = 0, input_dims: dict | None = None, progress=None, dry_run: bool = False,
          whole_heads: bool = False, target_macs: float | None = None, target_params: float | None = None,
          scope: str = "uniform", global_norm: str = "mean", max_ratio: float = 0.9, calib=None,
          calib_samples: int = 256, compensate: str = "auto", holdout: int = 16,
          bn_recalibrate: bool = False, sensitivity_samples: int = 32, proxy: str = "auto",
          sparsity: float | None = None, sparse_format: str = "auto", sparse_force: bool = False,
          sparse_threads: int | None = None):
    """Prune `model_or_path` (path or ModelProto). Returns (pruned ModelProto, PruneReport); report.plan is
    the RewritePlan. With dry_run=True nothing is rewritten: the model is None and the plan says what would go.

    ratio: fraction of every group's channels to remove (ignored when a target is given); default 0.5, or 0
      when only `sparsity` is asked for.
    target_macs / target_params: fraction of the dense MACs / params to keep, reached within 1 %.
    scope: 'uniform' (same fraction per group), 'global' (normalised scores ranked across groups) or
      'sensitivity' (each group pruned alone at a few levels on `sensitivity_samples` calibration samples; every
      group gets the largest ratio whose output error stays under one threshold; needs a target).
    calib: .npz of input feeds or a folder of samples; without it, data-aware criteria and compensation use a
      synthetic proxy (standard-normal inputs). `holdout` samples are kept aside for the fidelity check.
    proxy: the data-free statistics without calib: 'auto' (closed form from BatchNorm parameters for consumers
      a norm feeds, synthetic inputs for the rest), 'synthetic' (synthetic inputs only), 'bn' (closed form only;
      consumers no norm feeds are scored with l1 and not compensated).
    compensate: 'auto' (= 'reconstruct'; with proxy='bn' and no calib: obs for obspa, else none), 'reconstruct'
      (sequential output-matched refit of every layer downstream of a pruned one after the rewrite, on the
      calibration data or the synthetic proxy: passes/reconstruct.py), 'none', 'obs' / 'lsq' (independent
      least-squares refit of the consumers on dense statistics), 'bias'.
    bn_recalibrate: after verification, re-estimate BatchNorm running statistics on the calibration data.
    sparsity: block sparsity for the ai.graphprune sparse ops, applied after channel pruning to every layer
      where the sparse kernel is measured faster (passes/sparsify.py); sparse_format 'auto' | 'bsr' | 'csr';
      sparse_force emits every eligible layer regardless; sparse_threads: intra-op threads for the timings.
    """
    from .passes.allocate import fit_target, select, build_plan
    from .passes.canonicalize import canonicalize
    from .passes.importance import get_criterion
    from .verify import compare, masked_reference, random_feeds

    if ratio is None:
        ratio = 0.0 if sparsity is not None else 0.5
    if not 0.0 <= ratio < 1.0:
        raise GraphpruneError(f"ratio must be in [0, 1), got {ratio}")
    if sparsity is not None:
        from .passes.sparsify import check_settings
        check_settings(sparsity, sparse_format)
    for label, t in (("target_macs", target_macs), ("target_params", target_params)):
        if t is not None and not 0.0 < t <= 1.0:
            raise GraphpruneError(f"{label} must be in (0, 1], got {t}")
    if bn_recalibrate and calib is None:
        raise GraphpruneError("bn_recalibrate needs calibration data (calib=...)")
    if scope not in ("uniform", "global", "sensitivity"):
        raise GraphpruneError(f"scope must be 'uniform', 'global' or 'sensitivity', got {scope!r}")
    if scope == "sensitivity" and plan is None and target_macs is None and target_params is None:
        raise GraphpruneError("scope 'sensitivity' allocates to a budget: give target_macs or target_params")
    if proxy not in ("auto", "synthetic", "bn"):
        raise GraphpruneError(f"proxy must be auto, synthetic or bn, got {proxy!r}")
    if compensate not in ("auto", "reconstruct", "none", "obs", "lsq", "bias"):
        raise GraphpruneError(f"compensate must be auto, reconstruct, none, obs, lsq or bias, got {compensate!r}")
    start = time.perf_counter()
    pm = PassManager(progress=progress)
    report = PruneReport()
    model, _external = pm.run("load", load_model, model_or_path)
    graph = Graph(model)
    pm.run("canonicalize", canonicalize, graph)
    method = compensate
    if compensate == "auto":
        data_free_bn_only = calib is None and proxy == "bn"   # no inputs to run: nothing to reconstruct on
        method = ("obs" if importance == "obspa" else "none") if data_free_bn_only else "reconstruct"
    method = "obs" if method == "lsq" else method
    # reconstruction starts from plain slices, or from obspa's own OBS updates (its ΔL assumed them)
    reconstruct = method == "reconstruct"
    if reconstruct:
        method = "obs" if importance == "obspa" and plan is None else "none"
    before = count(graph)
    if method in ("obs", "bias") or reconstruct:
        from .passes.compensate import ensure_biases
        pm.run("add biases", ensure_biases, graph)  # an intercept for the refit; zero, so outputs are unchanged
    analysis = pm.run("analyze", analyze, graph, exclude, whole_heads)
    summarize_analysis(analysis, report)
    report.diagnostics = list(analysis.diagnostics)

    name = model_or_path if isinstance(model_or_path, (str, Path)) else (model.graph.name or "model")
    settings = {"ratio": ratio, "importance": importance, "round_to": round_to, "min_channels": min_channels,
                "exclude": list(exclude or []), "seed": seed, "whole_heads": whole_heads, "scope": scope,
                "target_macs": target_macs, "target_params": target_params, "compensate": compensate,
                "calib": str(calib) if calib is not None else None}
    criterion = get_criterion(importance, seed=seed) if plan is None else None
    if criterion is not None:
        criterion.intercept = method == "obs"  # obspa's ΔL assumes the refit may move the bias too
    stats, heldout, feeds = None, {}, None
    if (criterion is not None and criterion.needs_data) or method != "none" or bn_recalibrate \
            or (scope == "sensitivity" and plan is None) or sparsity is not None or reconstruct:
        stats, heldout, feeds = pm.run("calibrate", _calibrate, graph, analysis, criterion, method, calib, calib_samples,
                                holdout, seed, input_dims, progress, proxy)
        report.calibration = stats.source
    if plan is None:
        criterion.stats = stats
        scores = pm.run("score", lambda: {g.id: criterion.scores(g, analysis) for g in analysis.groups})
        report.diagnostics += criterion.notes
        target = target_macs if target_macs is not None else target_params
        sensitivity = None
        if scope == "sensitivity":
            from .passes.sensitivity import SensitivityAllocation, measure
            sample = {k: v[:sensitivity_samples] for k, v in feeds.items()}
            curves = pm.run("sensitivity", measure, analysis, scores, sample, progress=progress)
            sensitivity = SensitivityAllocation(curves)
            report.sensitivity = {g.name: [round(float(e), 6) for e in curves[g.id]] for g in analysis.groups}
        if target is not None:
            metric = "macs" if target_macs is not None else "params"
            plan, achieved = pm.run("plan", fit_target, analysis, scores, target, metric, scope, round_to,
                                    min_channels, max_ratio, global_norm, str(name), settings,
                                    sensitivity=sensitivity)
        else:
            drops = select(analysis, scores, ratio, scope, round_to, min_channels,
                           max_ratio=1.0 if scope == "uniform" else max_ratio, norm=global_norm)
            plan = pm.run("plan", build_plan, analysis, drops, str(name), settings)
    else:
        pm.run("check plan", check_plan, plan, analysis)
    removed = plan.removed_elements()
    updates = {}
    if method != "none" and stats is not None:
        from .passes.compensate import bias_updates, obs_updates
        fn = obs_updates if method == "obs" else bias_updates
        updates, notes = pm.run("compensate", fn, analysis, removed, stats)
        report.diagnostics += notes
        report.compensated = len(updates)
    report.groups_pruned = sum(1 for g in plan.groups if g.removed_units)
    report.channels_removed = plan.removed_channels
    report.params_before, report.macs_before = before["params"], before["macs"]
    report.kept_widths = [(g.group, g.channels, g.kept_channels) for g in plan.groups]
    if dry_run:
        from .metrics import count_after
        after = count_after(graph, removed)
        report.params_after, report.macs_after = after["params"], after["macs"]
        report.timings = pm.timings()
        report.seconds = time.perf_counter() - start
        report.plan = plan
        return None, report

    original = graph.clone() if (verify or heldout or reconstruct) else None
    pm.run("rewrite", apply_removal, graph, analysis.fixups, removed, updates)
    pruned = graph.to_model(with_value_info=True)
    pm.run("check", _check, pruned)
    after = count(graph)
    report.params_after, report.macs_after = after["params"], after["macs"]
    report.per_layer = [(n, before["per_node"][n], after["per_node"].get(n, 0))
                        for n in before["per_node"] if before["per_node"][n]]
    if verify:
        def run_verify():
            reference = masked_reference(original, removed, analysis.coupler.oracle_masks, updates)
            feeds = random_feeds(original, verify_samples, seed=seed, dims=input_dims)
            return compare(reference, pruned, feeds)
        report.verification = pm.run("verify", run_verify)
    dense_model = original.to_model(with_value_info=False) if heldout else None
    # ---- reconstruction: after verification (which checked the structure against the masked original) ----
    if reconstruct:
        from .passes.reconstruct import reconstruct as run_reconstruction
        result = pm.run("reconstruct", run_reconstruction, original, graph, removed, feeds, report.calibration,
                        seed, progress)
        report.reconstruction = result.summary()
        report.diagnostics += result.notes
        report.compensated += sum(1 for r in result.layers if r.outputs_refit)
        if result.refit:
            pruned = graph.to_model(with_value_info=True)
    # ---- end of reconstruction ----
    if bn_recalibrate:
        from .calibration import load_feeds, split
        from .passes.bn_recalibrate import recalibrate_batchnorm
        from .verify import fidelity
        feeds, _ = split(load_feeds(calib, graph, calib_samples + holdout), holdout)
        kept_graph = graph.clone() if heldout else None
        report.bn_recalibrated = pm.run("bn re-estimation", recalibrate_batchnorm, graph, feeds, progress)
        candidate = graph.to_model(with_value_info=True)
        if heldout and report.bn_recalibrated:
            before_fid = pm.run("fidelity", fidelity, dense_model, pruned, heldout)
            after_fid = pm.run("fidelity", fidelity, dense_model, candidate, heldout)
            if _mean_rel_error(after_fid) > _mean_rel_error(before_fid):
                report.diagnostics.append(
                    f"bn re-estimation: held-out output error {_mean_rel_error(after_fid):.4f} > "
                    f"{_mean_rel_error(before_fid):.4f} without it (calibration data unlike the model's?); "
                    f"running statistics left as they were")
                report.bn_recalibrated = 0
                graph = kept_graph
                candidate = pruned
        pruned = candidate
    if sparsity is not None:
        from .passes.sparsify import sparsify_for_prune
        pruned = pm.run("sparsify", sparsify_for_prune, graph, report, feeds, calib, sparsity, sparse_format,
                        sparse_force, sparse_threads, seed, input_dims, verify, verify_samples, progress)
    if heldout:
        from .verify import fidelity
        report.fidelity = pm.run("fidelity", fidelity, dense_model, pruned, heldout)
    report.timings = pm.timings()
    report.seconds = time.perf_counter() - start
    report.plan = plan
    return pruned, report


def _mean_rel_error(fid: dict) -> float:
    errs = [o["rel_error"] for o in fid.get("outputs", {}).values() if "rel_error" in o]
    return float(np.mean(errs)) if errs else 0.0


def _calibrate(graph, analysis, criterion, method, calib, samples, holdout, seed, input_dims, progress,
               proxy="auto"):
    """Statistics for the criterion and the compensation, from calibration data or a synthetic proxy.
    Returns (Statistics, held-out feeds for the fidelity check, the feeds the statistics came from)."""
    from .calibration import collect, load_feeds, split, synthetic_feeds
    from .passes.importance.data import group_consumers
    if calib is not None:
        feeds = load_feeds(calib, graph, samples + holdout)
        feeds, heldout = split(feeds, holdout)
        source = f"{calib} ({len(next(iter(feeds.values())))} samples, {len(next(iter(heldout.values()), []))} held out)"
    else:
        feeds = synthetic_feeds(graph, min(samples, 64), seed=seed, dims=input_dims)
        heldout = {}
        source = "synthetic proxy: 64 standard-normal input samples (data-free)"
    wanted = dict(criterion.wanted(analysis)) if criterion is not None else {}
    if method != "none":
        for g in analysis.groups:
            for cons in group_consumers(g, analysis):
                key = (cons.x, cons.x_axis)
                wanted[key] = wanted.get(key, False) or method == "obs"
    closed = {}
    if calib is None and proxy != "synthetic":
        from .bn_proxy import closed_form_stats
        closed = closed_form_stats(graph, wanted)
        rest = len(wanted) - len(closed)
        if proxy == "bn":
            source = f"BatchNorm closed form for {len(closed)} of {len(wanted)} consumer inputs (data-free)"
        elif closed:
            source = (f"BatchNorm closed form for {len(closed)} consumer inputs, synthetic proxy (64 "
                      f"standard-normal input samples) for the other {rest} (data-free)")
        if proxy == "bn":
            wanted = {}
        else:
            wanted = {k: v for k, v in wanted.items() if k not in closed}
    stats = collect(graph, wanted, feeds, progress=progress, source=source)
    stats.tensors.update(closed)
    return stats, heldout, feeds


def _check(model: onnx.ModelProto) -> None:
    if model.ByteSize() < (1 << 31) - (1 << 20):
        onnx.checker.check_model(model, full_check=True)


def save(model: onnx.ModelProto, path, external_data=None) -> None:
    save_model(model, path, external_data)


__all__ = ["prune", "analyze_model", "PruneReport", "RewritePlan", "PlanError", "save", "np"]
