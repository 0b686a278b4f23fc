"""The prune pipeline: named stages over one context, each declaring what it needs and provides.

    load -> canonicalize -> add biases -> analyze -> calibrate -> score -> sensitivity | loss curves
    -> allocate | check plan -> compensate -> rewrite -> check -> verify -> reconstruct -> bn re-estimation -> sparsify -> fidelity

A stage whose condition is false is logged as skipped. The passes themselves live in `passes/` and
`graphprune/*`; this module only says in which order they run and what flows between them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .analysis import Analysis, analyze
from .errors import GraphpruneError
from .ir import Graph, load_model
from .metrics import count, count_after
from .options import PruneOptions
from .passmanager import PassManager, Stage
from .plan import RewritePlan, check_plan
from .report import PruneReport
from .rewrite import apply_removal


@dataclass
class Context:
    """Everything the stages hand to each other. A field is None until the stage that provides it has run."""
    options: PruneOptions
    source: object                                   # path or ModelProto, as given
    report: PruneReport = field(default_factory=PruneReport)
    progress: object = None                          # callable(str) for long stages, or None
    graph: Graph | None = None                       # the working graph (pruned in place by 'rewrite')
    counts_before: dict | None = None                # params/MACs/per-node MACs of the canonical dense graph
    analysis: Analysis | None = None
    criterion: object = None                         # passes.importance Criterion (None when replaying a plan)
    stats: object = None                             # calibration.Statistics (data or data-free proxy)
    feeds: dict | None = None                        # calibration/proxy samples the statistics came from
    heldout: dict | None = None                      # held-out calibration samples (empty without --calib)
    scores: dict | None = None                       # group id -> unit scores
    sensitivity: object = None                       # passes.sensitivity.SensitivityAllocation
    allocation_scores: dict | None = None            # scope 'loss': group id -> per-unit priority
    scope: str = ""                                  # the allocation scope in use (options.allocation_scope, or
                                                     # 'uniform' when auto's data-free proxy could not run)
    plan: RewritePlan | None = None
    removed: dict | None = None                      # (tensor, axis) -> removed indices
    updates: dict | None = None                      # initializer name -> compensated weights
    original: Graph | None = None                    # the dense graph, kept for verification and fidelity
    pruned: onnx.ModelProto | None = None

    @property
    def name(self) -> str:
        if isinstance(self.source, (str, Path)):
            return str(self.source)
        return self.graph.model.graph.name if self.graph is not None else "model"


# ---- stage bodies -------------------------------------------------------------------------------------------

def _load(ctx: Context) -> str:
    model, _external = load_model(ctx.source)
    ctx.graph = Graph(model)
    return f"{len(model.graph.node)} nodes, opset {ctx.graph.opset('')}"


def _canonicalize(ctx: Context) -> str:
    from .passes.canonicalize import canonicalize
    canonicalize(ctx.graph)
    ctx.counts_before = count(ctx.graph)
    return f"{len(ctx.graph.nodes)} nodes after folding"


def _add_biases(ctx: Context) -> str:
    from .passes.compensate import ensure_biases
    added = ensure_biases(ctx.graph)  # an intercept for the refit; zero, so outputs are unchanged
    return f"{added} zero biases added"


def _analyze(ctx: Context) -> str:
    o = ctx.options
    ctx.analysis = analyze(ctx.graph, exclude=list(o.exclude), whole_heads=o.head_mode)
    ctx.report.add_analysis(ctx.analysis)
    ctx.report.diagnostics = list(ctx.analysis.diagnostics)
    return f"{len(ctx.analysis.groups)} groups, {len(ctx.analysis.frozen_groups)} frozen"


def _needs_statistics(ctx: Context) -> bool:
    o = ctx.options
    return ((ctx.criterion is not None and ctx.criterion.needs_data) or o.compensation != "none"
            or o.bn_recalibrate or (ctx.scope in ("sensitivity", "loss") and o.plan is None) or o.sparsity is not None
            or o.reconstruct or o.min_fidelity is not None)


def _calibrate(ctx: Context) -> str:
    try:
        ctx.stats, ctx.heldout, ctx.feeds = _statistics(ctx.graph, ctx.analysis, ctx.criterion, ctx.options,
                                                         ctx.progress, ctx.counts_before["macs"], ctx.scope)
    except GraphpruneError as exc:
        o = ctx.options
        if o.calib is not None or o.sparsity is not None or o.scope in ("sensitivity", "loss") \
                or ctx.criterion is None:   # asked for explicitly: no quiet fallback
            raise
        # The data-free proxy could not run (synthetic inputs the model refuses, e.g. dims no default fits): the
        # default recipe must still prune, so rank by magnitude and compensate nothing, and say so.
        from .passes.importance import get_criterion
        ctx.criterion = get_criterion("l1", seed=o.seed)
        ctx.stats, ctx.feeds, ctx.heldout = None, None, {}
        ctx.scope = "uniform"
        note = (f"the data-free statistics proxy could not run ({exc}); ranked by l1 without compensation "
                f"(give --calib, or --dim for the dynamic dims)")
        ctx.report.diagnostics.append(note)
        ctx.report.calibration = "none: the data-free proxy could not run"
        return "proxy failed: l1, no compensation"
    ctx.report.calibration = ctx.stats.source
    return ctx.stats.source


def _statistics(graph, analysis, criterion, o: PruneOptions, progress=None, macs: int = 0, scope: str = ""):
    """Statistics for the criterion and the compensation, from calibration data or a data-free proxy.
    Returns (Statistics, held-out feeds for the fidelity check, the feeds the statistics came from)."""
    from .calibration import collect
    from .feeds import load_feeds, split, synthetic_feeds
    from .passes.importance.data import group_consumers
    if o.calib is not None:
        feeds, heldout = split(load_feeds(o.calib, graph, o.calib_samples + o.holdout, o.image_preprocessing), o.holdout)
        source = (f"{o.calib} ({len(next(iter(feeds.values())))} samples, "
                  f"{len(next(iter(heldout.values()), []))} held out)")
    else:
        # The proxy's cost is running the model on its samples: 64 for models under 1 GMAC per sample, 16 above
        # (ResNet-50 at 224²: 4.1 GMACs, 51 s of proxy runs with 64 samples on 2 shared cores). Conv layers
        # still see thousands of rows per sample; Gemm heads are rank-deficient either way and damped. `macs`: the
        # dense count canonicalize made (symbolic dims as 1).
        n = min(o.calib_samples, 64 if macs < 1e9 else 16)
        feeds = synthetic_feeds(graph, n, seed=o.seed, dims=o.input_dims)
        heldout = {}
        source = f"synthetic proxy: {n} standard-normal input samples (data-free)"
    wanted = dict(criterion.wanted(analysis)) if criterion is not None else {}
    if o.compensation != "none" or scope == "loss":
        gram = o.compensation == "obs" or scope == "loss"   # loss curves need every consumer's Hessian
        for g in analysis.groups:
            for cons in group_consumers(g, analysis):
                key = (cons.x, cons.x_axis)
                wanted[key] = wanted.get(key, False) or gram
    closed = {}
    if o.calib is None and o.proxy != "synthetic":
        from .bn_proxy import closed_form_stats
        closed = closed_form_stats(graph, wanted)
        if o.proxy == "bn":
            source = f"BatchNorm closed form for {len(closed)} of {len(wanted)} consumer inputs (data-free)"
            wanted = {}
        else:
            if closed:
                n = len(next(iter(feeds.values())))
                source = (f"BatchNorm closed form for {len(closed)} consumer inputs, synthetic proxy ({n} "
                          f"standard-normal input samples) for the other {len(wanted) - len(closed)} (data-free)")
            wanted = {k: v for k, v in wanted.items() if k not in closed}
    stats = collect(graph, wanted, feeds, progress=progress, source=source)
    stats.tensors.update(closed)
    return stats, heldout, feeds


def _macs_dims(ctx: Context) -> str:
    """Representative values for the symbolic dims, so MACs (targets, report) count seq x seq attention instead of
    one token; the dense counts are redone with them. Parameters do not depend on dims and keep their count."""
    from .metrics import representative_dims, set_dims
    o = ctx.options
    feeds = ctx.feeds if o.calib is not None else None
    dims = representative_dims(ctx.graph, o.input_dims, feeds)
    set_dims(ctx.graph, dims)
    ctx.report.assumed_dims = {name: {"value": v, "source": src} for name, (v, src) in sorted(dims.items())}
    if dims:
        dense = count(ctx.graph)
        ctx.counts_before = {**ctx.counts_before, "macs": dense["macs"], "per_node": dense["per_node"]}
    return ", ".join(f"{n}={v} ({src})" for n, (v, src) in sorted(dims.items())) or "no symbolic dims"


def _score(ctx: Context) -> str:
    ctx.criterion.stats = ctx.stats
    ctx.scores = {g.id: ctx.criterion.scores(g, ctx.analysis) for g in ctx.analysis.groups}
    ctx.report.diagnostics += ctx.criterion.notes
    return f"{ctx.options.importance} over {len(ctx.scores)} groups"


def _sensitivity(ctx: Context) -> str:
    from .passes.sensitivity import SensitivityAllocation, measure
    o = ctx.options
    sample = {k: v[:o.sensitivity_samples] for k, v in ctx.feeds.items()}
    curves = measure(ctx.analysis, ctx.scores, sample, progress=ctx.progress)
    ctx.sensitivity = SensitivityAllocation(curves)
    ctx.report.sensitivity = {g.name: [round(float(e), 6) for e in curves[g.id]] for g in ctx.analysis.groups}
    return f"{len(curves)} groups probed on {len(next(iter(sample.values())))} samples"


def _loss_curves(ctx: Context) -> str:
    from .passes.loss_allocation import (CURVE_POINTS, PROBE_SAMPLES, allocation_scores, curves, measure_gains,
                                         unit_savings)
    o = ctx.options
    found = curves(ctx.analysis, ctx.stats, o.max_ratio, ctx.scores, progress=ctx.progress)
    # held-out calibration samples where there are some: the OBS refit was fit on the others, and a probe on its
    # own fitting data would reward a refit that only memorises them (a pooled head sees one row per sample)
    pool = ctx.heldout if ctx.heldout else ctx.feeds
    sample = {k: v[:PROBE_SAMPLES] for k, v in pool.items()}
    gains = measure_gains(ctx.analysis, ctx.stats, found, sample, progress=ctx.progress)
    metric = o.target[0] if o.target is not None else "channels"
    ctx.allocation_scores, notes = allocation_scores(ctx.analysis, found, unit_savings(ctx.analysis, metric), gains)
    ctx.report.diagnostics += notes
    ctx.report.loss_curves = {g.name: [round(found[g.id].at(f), 6) for f in CURVE_POINTS]
                              for g in ctx.analysis.groups if found.get(g.id) is not None}
    weighted = sum(c is not None and c.consumers > 0 for c in found.values())
    by_score = sum(c is not None and c.consumers == 0 for c in found.values())
    return (f"{weighted} OBS curves, {by_score} score curves, {len(found) - weighted - by_score} kept whole; "
            f"per {metric} saved")


def _allocate(ctx: Context) -> str:
    from .passes.allocate import build_plan, fit_target, select
    o = ctx.options
    # scope 'loss' is a global selection over priorities that are already comparable across groups
    scope, norm, scores = (("global", "none", ctx.allocation_scores) if ctx.scope == "loss"
                            else (ctx.scope, o.global_norm, ctx.scores))
    if o.target is not None:
        metric, target = o.target
        ctx.plan, achieved = fit_target(ctx.analysis, scores, target, metric, scope, o.round_to,
                                        o.min_channels, o.max_ratio, norm, ctx.name, o.settings(),
                                        sensitivity=ctx.sensitivity)
        if abs(achieved - target) > 0.01 * target:
            ctx.report.diagnostics.append(
                f"target {metric} {target:g} not reached: the plan keeps {achieved:.3f} of the dense {metric} "
                f"(frozen groups, --max-ratio {o.max_ratio:g}, --min-channels {o.min_channels} and --round-to "
                f"{o.round_to} bound what can go)")
        return f"{ctx.scope} to {metric} {target:g}: reached {achieved:.3f}"
    drops = select(ctx.analysis, scores, o.effective_ratio, scope, o.round_to, o.min_channels,
                   max_ratio=1.0 if scope == "uniform" else o.max_ratio, norm=norm)
    ctx.plan = build_plan(ctx.analysis, drops, ctx.name, o.settings())
    return f"{ctx.scope}, ratio {o.effective_ratio:g}"


def _check_plan(ctx: Context) -> str:
    check_plan(ctx.options.plan, ctx.analysis)
    ctx.plan = ctx.options.plan
    return "replayed plan fits the model"


def _removed(ctx: Context) -> None:
    ctx.removed = ctx.plan.removed_elements()
    ctx.updates = {}
    r = ctx.report
    r.plan = ctx.plan
    r.groups_pruned = sum(1 for g in ctx.plan.groups if g.removed_units)
    r.channels_removed = ctx.plan.removed_channels
    r.params_before, r.macs_before = ctx.counts_before["params"], ctx.counts_before["macs"]
    r.kept_widths = [(g.group, g.channels, g.kept_channels) for g in ctx.plan.groups]


def _compensate(ctx: Context) -> str:
    from .passes.compensate import bias_updates, obs_updates
    fn = obs_updates if ctx.options.compensation == "obs" else bias_updates
    ctx.updates, notes = fn(ctx.analysis, ctx.removed, ctx.stats)
    ctx.report.diagnostics += notes
    ctx.report.compensated = len(ctx.updates)
    return f"{ctx.options.compensation}: {len(ctx.updates)} weights"


def _dry_run_counts(ctx: Context) -> str:
    after = count_after(ctx.graph, ctx.removed)
    ctx.report.params_after, ctx.report.macs_after = after["params"], after["macs"]
    return f"MACs {ctx.report.macs_ratio:.3f} of dense (nothing written)"


def _rewrite(ctx: Context) -> str:
    ctx.original = ctx.graph.clone()  # shares the weight arrays: only the nodes are copied
    apply_removal(ctx.graph, ctx.analysis.fixups, ctx.removed, ctx.updates)
    ctx.pruned = ctx.graph.to_model(with_value_info=True)
    after = count(ctx.graph)
    r = ctx.report
    r.params_after, r.macs_after = after["params"], after["macs"]
    before = ctx.counts_before["per_node"]
    r.per_layer = [(n, before[n], after["per_node"].get(n, 0)) for n in before if before[n]]
    return f"{r.channels_removed} channels removed; MACs {r.macs_ratio:.3f}, params {r.params_ratio:.3f} of dense"


def _check(ctx: Context) -> str:
    """onnx.checker's full check of the pruned model. A complaint the dense input model draws as well (e.g.
    an op onnx calls deprecated that onnxruntime runs) is the input's, not the rewrite's: a note, not a failure."""
    from .runtime import check_model
    try:
        if not check_model(ctx.pruned):
            return "over 2 GiB: full check skipped"
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        try:
            check_model(ctx.original.to_model(with_value_info=False))
        except onnx.checker.ValidationError as dense_exc:
            if str(dense_exc).strip().splitlines()[:1] == [first]:
                ctx.report.diagnostics.append(f"onnx.checker rejects the input model too, so the pruned one is "
                                              f"written anyway: {first}")
                return "input model fails the same check (noted)"
        raise
    return "onnx.checker full check passed"


def _verify(ctx: Context) -> str:
    from .feeds import random_feeds
    from .verify import compare, masked_reference
    o = ctx.options
    reference = masked_reference(ctx.original, ctx.removed, ctx.analysis.oracle_masks, ctx.updates,
                                 ctx.analysis.mask_fills)
    feeds = random_feeds(ctx.original, o.verify_samples, seed=o.seed, dims=o.input_dims)
    ctx.report.verification = compare(reference, ctx.pruned, feeds, removed=ctx.removed)
    return f"max abs diff {ctx.report.verification['max_abs_diff']:.2e} on {o.verify_samples} inputs"


def _reconstruct(ctx: Context) -> str:
    """Sequential output-matched refit (passes/reconstruct.py), after verification checked the structure against
    the masked original."""
    from .passes.reconstruct import reconstruct
    result = reconstruct(ctx.original, ctx.graph, ctx.removed, ctx.feeds, ctx.report.calibration,
                         ctx.options.seed, ctx.progress)
    r = ctx.report
    r.reconstruction = result.summary()
    r.diagnostics += result.notes
    r.compensated += result.refit
    if result.refit:
        ctx.pruned = ctx.graph.to_model(with_value_info=True)
    msg = f"{result.refit} of {len(result.layers)} layers refit in {result.waves} waves"
    e2e = result.end_to_end
    if "before" in e2e:
        reverted = sum(1 for layer in result.layers if layer.reverted)
        msg += (f"; held-out output error {e2e['before']['rel_error']:.4f} -> {e2e['after']['rel_error']:.4f}"
                + (f" ({reverted} refits reverted by the end-to-end check)" if reverted else ""))
    return msg


def _bn_recalibrate(ctx: Context) -> str:
    from .feeds import load_feeds, split
    from .passes.bn_recalibrate import recalibrate_batchnorm
    from .verify import fidelity
    o, r = ctx.options, ctx.report
    feeds, _ = split(load_feeds(o.calib, ctx.graph, o.calib_samples + o.holdout, o.image_preprocessing), o.holdout)
    kept_graph = ctx.graph.clone()
    r.bn_recalibrated = recalibrate_batchnorm(ctx.graph, feeds, ctx.progress)
    candidate = ctx.graph.to_model(with_value_info=True)
    if ctx.heldout and r.bn_recalibrated:
        dense = ctx.original.to_model(with_value_info=False)
        before = _mean_rel_error(fidelity(dense, ctx.pruned, ctx.heldout))
        after = _mean_rel_error(fidelity(dense, candidate, ctx.heldout))
        if after > before:
            r.diagnostics.append(f"bn re-estimation: held-out output error {after:.4f} > {before:.4f} without it "
                                 f"(calibration data unlike the model's?); running statistics left as they were")
            r.bn_recalibrated = 0
            ctx.graph = kept_graph
            return "reverted: held-out error grew"
    ctx.pruned = candidate
    return f"{r.bn_recalibrated} BatchNorms re-estimated"


def _sparsify(ctx: Context) -> str:
    from .passes.sparsify import sparsify_for_prune
    o = ctx.options
    ctx.pruned = sparsify_for_prune(ctx.graph, ctx.report, ctx.feeds, o.calib, o.sparsity, o.sparse_format,
                                    o.sparse_force, o.sparse_threads, o.seed, o.input_dims, o.verify,
                                    o.verify_samples, ctx.progress, plan_in=o.sparse_plan_in,
                                    plan_out=o.sparse_plan_out, no_measure=o.sparse_no_measure)
    s = ctx.report.sparse or {}
    return f"{s.get('sparse_layers', '?')} sparse layers"


def _fidelity(ctx: Context) -> str:
    from .verify import fidelity, layer_profile
    dense = ctx.original.to_model(with_value_info=False)
    ctx.report.fidelity = fidelity(dense, ctx.pruned, ctx.heldout)
    ctx.report.fidelity["layers"] = layer_profile(dense, ctx.pruned, ctx.heldout, ctx.removed)
    return f"{ctx.report.fidelity['samples']} held-out samples"


def _mean_rel_error(fid: dict) -> float:
    errs = [o["rel_error"] for o in fid.get("outputs", {}).values() if "rel_error" in o]
    return float(np.mean(errs)) if errs else 0.0


# ---- --min-fidelity: bisection over the MACs target ---------------------------------------------------------

# Bisection steps of the MACs target over (0, 1]: 2⁻⁶ ≈ 1.6 % of the dense MACs resolution, 6 rewrites + 1 final.
FIDELITY_STEPS = 6
# the stages a --min-fidelity trial repeats; everything before 'allocate' (analysis, statistics, scores) runs once
_FIRST_REPEATED = "allocate"


def agreement(fid: dict, metric: str, graph: Graph) -> float:
    """One number from verify.fidelity's per-output entries, the worst output's. top1: agreement of the dense
    top-1 class; cosine: mean per-sample cosine. auto: top1 for logit-like outputs (fidelity reports a KL, i.e.
    a last axis of >= 2 entries not L2-normalised) of rank <= 2 ([batch, classes]), cosine for the others;
    explicit top1 falls back to cosine for an output without a class axis."""
    values = []
    for name, entry in fid.get("outputs", {}).items():
        rank = len(graph.shape(name) or ())
        logits = "kl" in entry and rank <= 2
        use_top1 = "top1_agreement" in entry and (metric == "top1" or (metric == "auto" and logits))
        values.append(entry["top1_agreement"] if use_top1 else entry["cosine"])
    return float(min(values)) if values else 0.0


def _trial(base: Context, target: float, pm: PassManager, verify: bool) -> Context:
    """The repeated stages at MACs target `target` on a copy of the dense graph, sharing the analysis,
    statistics and scores of `base`. The analysis' fixups name nodes of the dense graph, which the rewrite edits
    in place: they are pointed at the copy's nodes (same order) so the dense graph stays dense for the next trial."""
    from dataclasses import replace
    graph = base.graph.clone()
    # the dense graph's dims are already resolved (set_dims: probe runs, shape inference at those values)
    graph.macs_dims = dict(getattr(base.graph, "macs_dims", {}))
    same = {id(a): b for a, b in zip(base.graph.nodes, graph.nodes)}
    analysis = replace(base.analysis, fixups=[(same.get(id(n), n), fn) for n, fn in base.analysis.fixups])
    ctx = replace(base, options=base.options.replace(target_macs=target, verify=verify), graph=graph,
                  analysis=analysis, report=replace(base.report, diagnostics=list(base.report.diagnostics)),
                  plan=None, removed=None, updates=None, original=None, pruned=None)
    repeated = stages()
    first = next(i for i, s in enumerate(repeated) if s.name == _FIRST_REPEATED)
    pm.run_stages(repeated[first:], ctx)
    return ctx


def _fidelity_search(ctx: Context, pm: PassManager) -> Context:
    """--min-fidelity F: the smallest MACs target whose pruned model keeps held-out agreement >= F.

    Agreement falls (not strictly) as the target falls, so bisection on (0, 1] keeps `lo` failing and `hi`
    passing (hi = 1 is the dense model, agreement 1, never run). After FIDELITY_STEPS halvings hi is the answer
    within 2⁻ᴺ; it is rebuilt once more with verification on (trials skip it: same plan, so same structure)."""
    o = ctx.options
    all_stages = stages()
    first = next(i for i, s in enumerate(all_stages) if s.name == _FIRST_REPEATED)
    pm.run_stages(all_stages[:first], ctx)
    if not ctx.heldout:
        raise GraphpruneError(f"min_fidelity: {o.calib} gave no held-out samples (use more samples, holdout >= 1)")
    lo, hi, curve = 0.0, 1.0, []
    for _ in range(FIDELITY_STEPS):
        mid = (lo + hi) / 2
        trial = _trial(ctx, mid, pm, verify=False)
        value = agreement(trial.report.fidelity, o.fidelity_metric, ctx.graph)
        curve.append((round(mid, 6), round(trial.report.macs_ratio, 6), round(value, 6)))
        lo, hi = (lo, mid) if value >= o.min_fidelity else (mid, hi)
    final = _trial(ctx, hi, pm, verify=o.verify)
    final.report.fidelity_search = curve
    final.report.fidelity_target = hi
    if hi == 1.0:
        final.report.diagnostics.append(f"min_fidelity {o.min_fidelity:g}: every MACs target tried (down from "
                                        f"{curve[0][0]:g}) fell below it on the held-out samples; nothing pruned")
    return final


# ---- the pipeline ---------------------------------------------------------------------------------------------

def stages() -> list[Stage]:
    """The stages in order, with their contracts."""
    def writing(ctx):
        return not ctx.options.dry_run

    return [
        Stage("load", _load, needs=("source",), provides=("graph",)),
        Stage("canonicalize", _canonicalize, needs=("graph",), provides=("counts_before",)),
        Stage("add biases", _add_biases, needs=("graph",),
              when=lambda c: c.options.compensation in ("obs", "bias") or c.options.reconstruct),
        Stage("analyze", _analyze, needs=("graph",), provides=("analysis",)),
        Stage("calibrate", _calibrate, needs=("graph", "analysis", "counts_before"), provides=("heldout",),
              when=_needs_statistics),
        Stage("macs dims", _macs_dims, needs=("graph", "counts_before")),
        Stage("score", _score, needs=("analysis", "criterion"), provides=("scores",),
              when=lambda c: c.options.plan is None),
        Stage("sensitivity", _sensitivity, needs=("analysis", "scores", "feeds"), provides=("sensitivity",),
              when=lambda c: c.options.plan is None and c.scope == "sensitivity"),
        Stage("loss curves", _loss_curves, needs=("analysis", "stats", "feeds"), provides=("allocation_scores",),
              when=lambda c: c.options.plan is None and c.scope == "loss"),
        Stage("allocate", _allocate, needs=("analysis", "scores", "counts_before"), provides=("plan",),
              when=lambda c: c.options.plan is None),
        Stage("check plan", _check_plan, needs=("analysis",), provides=("plan",),
              when=lambda c: c.options.plan is not None),
        Stage("plan summary", _removed, needs=("plan", "counts_before"), provides=("removed", "updates")),
        Stage("compensate", _compensate, needs=("analysis", "removed", "stats"),
              when=lambda c: c.options.compensation != "none" and c.stats is not None),
        Stage("count", _dry_run_counts, needs=("graph", "removed"), when=lambda c: c.options.dry_run),
        Stage("rewrite", _rewrite, needs=("graph", "analysis", "removed", "updates"), provides=("pruned",),
              when=writing),
        Stage("check", _check, needs=("pruned", "original"), when=writing),
        Stage("verify", _verify, needs=("original", "pruned", "removed"),
              when=lambda c: writing(c) and c.options.verify),
        Stage("reconstruct", _reconstruct, needs=("original", "graph", "removed", "feeds"), provides=("pruned",),
              when=lambda c: writing(c) and c.options.reconstruct),
        Stage("bn re-estimation", _bn_recalibrate, needs=("graph", "pruned", "original"),
              when=lambda c: writing(c) and c.options.bn_recalibrate),
        Stage("sparsify", _sparsify, needs=("graph", "feeds"), provides=("pruned",),
              when=lambda c: writing(c) and c.options.sparsity is not None),
        Stage("fidelity", _fidelity, needs=("original", "pruned", "heldout"),
              when=lambda c: writing(c) and bool(c.heldout)),
    ]


def run(source, options: PruneOptions, progress=None) -> Context:
    """Run every stage on `source` (path or ModelProto); returns the context (ctx.pruned, ctx.report)."""
    start = time.perf_counter()
    ctx = Context(options=options, source=source, progress=progress, scope=options.allocation_scope)
    if options.plan is None:
        from .passes.importance import get_criterion
        ctx.criterion = get_criterion(options.importance, seed=options.seed)
        ctx.criterion.intercept = options.compensation == "obs"  # obspa's ΔL assumes the refit may move the bias
    pm = PassManager(progress=progress)
    if options.min_fidelity is None:
        pm.run_stages(stages(), ctx)
    else:
        ctx = _fidelity_search(ctx, pm)
    ctx.report.timings = pm.timings()
    ctx.report.stage_log = pm.log()
    ctx.report.seconds = time.perf_counter() - start
    ctx.report.plan = ctx.plan
    return ctx
