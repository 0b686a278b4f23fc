"""Command line: `graphprune MODEL --ratio R [-o OUT]` and `graphprune analyze MODEL`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .errors import GraphpruneError

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


class DefaultGroup(click.Group):
    """`graphprune MODEL ...` means `graphprune prune MODEL ...`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["prune"] + list(args)
        return super().parse_args(ctx, args)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="graphprune")
def main():
    """Structured pruning for ONNX models: remove coupled channels, prove the result equivalent.

    \b
    graphprune MODEL --ratio 0.5 [-o OUT]     prune (same as `graphprune prune ...`)
    graphprune analyze MODEL                  show channel groups and what is frozen, and why
    """


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}")
    sys.exit(2)


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _default_output(model: Path) -> Path:
    return model.with_name(model.stem + ".pruned.onnx")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ratio", "-r", type=float, default=None,
              help="Fraction of the channels of every prunable group to remove, in [0, 1) "
                   "[default: 0.5; 0 with --sparsity].")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output file (default: MODEL.pruned.onnx next to the input; never the input itself).")
@click.option("--importance", default="l1", show_default=True,
              help="l1, l2, random, bn-scale, lamp, hessian, activation, fluctuation, obspa.")
@click.option("--target-macs", type=float, help="Keep this fraction of the dense MACs (e.g. 0.5); overrides --ratio.")
@click.option("--target-params", type=float, help="Keep this fraction of the dense parameters.")
@click.option("--scope", type=click.Choice(["uniform", "global", "sensitivity"]), default="uniform",
              show_default=True,
              help="Same fraction per group; one ranking across groups; or per-group ratios from measured "
                   "output sensitivity (needs --target-macs/--target-params; reads --calib or a synthetic proxy).")
@click.option("--global-norm", type=click.Choice(["mean", "max", "lamp"]), default="mean", show_default=True,
              help="Per-group score normalisation for --scope global.")
@click.option("--max-ratio", type=float, default=0.9, show_default=True,
              help="Never remove more than this fraction of one group (global scope and targets).")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration data: .npz of input feeds (first axis = samples) or a folder of .npy/images.")
@click.option("--calib-samples", type=int, default=256, show_default=True)
@click.option("--proxy", type=click.Choice(["auto", "synthetic", "bn"]), default="auto", show_default=True,
              help="Data-free statistics without --calib: BatchNorm closed form where a norm feeds the consumer "
                   "and synthetic inputs elsewhere (auto), synthetic only, or closed form only.")
@click.option("--bn-recalibrate", is_flag=True,
              help="After verification, re-estimate BatchNorm running statistics on the --calib data "
                   "(kept only if the held-out fidelity check improves).")
@click.option("--compensate", type=click.Choice(["auto", "reconstruct", "none", "obs", "lsq", "bias"]),
              default="auto", show_default=True,
              help="Weight compensation. reconstruct: after verification, refit every layer downstream of a "
                   "pruned one, in graph order, to the dense model's layer outputs on --calib (or the synthetic "
                   "proxy); obs/lsq: independent refit of the consumers on dense statistics; bias: mean shift. "
                   "auto: reconstruct (obs for obspa / none with --proxy bn and no --calib).")
@click.option("--round-to", type=int, default=1, show_default=True, help="Keep a multiple of N channels per group.")
@click.option("--min-channels", type=int, default=1, show_default=True, help="Keep at least N channels per group.")
@click.option("--exclude", multiple=True, help="Node-name glob pattern whose channels stay (repeatable).")
@click.option("--whole-heads", is_flag=True,
              help="Where a reshape splits an axis (attention heads, channel groups), remove whole heads/groups "
                   "instead of the same inner channels from every head.")
@click.option("--dry-run", is_flag=True, help="Print the plan; write no model.")
@click.option("--plan-out", type=click.Path(dir_okay=False, path_type=Path), help="Save the plan as JSON.")
@click.option("--plan-in", type=click.Path(exists=False, dir_okay=False, path_type=Path),
              help="Replay a saved plan instead of scoring.")
@click.option("--no-verify", is_flag=True, help="Skip the equivalence check against the masked original.")
@click.option("--verify-samples", type=int, default=2, show_default=True, help="Random inputs for the check.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=VALUE",
              help="Value of a dynamic input dim for verification (repeatable), e.g. --dim batch=4 --dim seq=128.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sparsity", type=float,
              help="Block sparsity in (0, 1), e.g. 0.75: replace MatMul/Gemm/Conv layers by ai.graphprune "
                   "sparse ops (after any channel pruning) where they are measured faster on this machine.")
@click.option("--sparse-format", type=click.Choice(["auto", "bsr", "csr"]), default="auto", show_default=True,
              help="bsr: 1x16 blocks (Conv: 4 output channels); csr: unstructured (MatMul/Gemm); auto: bsr, "
                   "csr at >= 85 % where measured faster.")
@click.option("--sparse-force", is_flag=True,
              help="Emit every eligible layer sparse, even where slower or without the native kernel library.")
@click.option("--sparse-threads", type=int, help="Intra-op threads for the sparse timings [default: onnxruntime's].")
@click.option("--strict", is_flag=True, help="Fail if any channel group is frozen by a missing or failing rule.")
@click.option("-v", "--verbose", is_flag=True, help="Per-layer MACs, pass timings.")
def prune(model, ratio, output, importance, target_macs, target_params, scope, global_norm, max_ratio, calib, proxy,
          calib_samples, bn_recalibrate, compensate, round_to, min_channels, exclude, whole_heads, dry_run, plan_out, plan_in,
          no_verify, verify_samples, dims, seed, sparsity, sparse_format, sparse_force, sparse_threads, strict,
          verbose):
    """Prune MODEL and write a smaller, verified ONNX file."""
    from .api import prune as run_prune, save
    from .plan import RewritePlan

    if ratio is not None and not 0.0 <= ratio < 1.0:
        _fail(f"--ratio must be in [0, 1), got {ratio}")
    if sparsity is not None and not 0.0 < sparsity < 1.0:
        _fail(f"--sparsity must be in (0, 1), got {sparsity}")
    if not model.exists():
        _fail(f"model file not found: {model}")
    output = output or _default_output(model)
    if not dry_run:
        if output.resolve() == model.resolve():
            _fail("output would overwrite the input model; choose another -o")
        if not output.parent.exists():
            _fail(f"output folder does not exist: {output.parent}")
    input_dims = {}
    for item in dims:
        name, _, value = item.partition("=")
        if not value.isdigit():
            _fail(f"--dim expects NAME=VALUE with a positive integer, got {item!r}")
        input_dims[name] = int(value)
    plan = None
    if plan_in:
        try:
            plan = RewritePlan.from_json(Path(plan_in).read_text())
        except OSError as exc:
            _fail(f"cannot read plan {plan_in}: {exc.strerror}")
        except GraphpruneError as exc:
            _fail(f"{plan_in}: {exc}")

    def progress(msg):
        if verbose:
            err.print(f"[dim]  {msg}[/]")

    try:
        with err.status("pruning ...", spinner="dots") as status:
            def step(msg):
                status.update(f"[dim]{msg}[/]")
                progress(msg)
            pruned, report = run_prune(str(model), ratio=ratio, importance=importance, round_to=round_to,
                                       min_channels=min_channels, exclude=list(exclude), plan=plan,
                                       verify=not no_verify, verify_samples=verify_samples, seed=seed,
                                       input_dims=input_dims,
                                       progress=step, dry_run=dry_run, whole_heads=whole_heads,
                                       target_macs=target_macs, target_params=target_params, scope=scope,
                                       global_norm=global_norm, max_ratio=max_ratio, calib=calib,
                                       calib_samples=calib_samples, compensate=compensate,
                                       bn_recalibrate=bn_recalibrate, proxy=proxy, sparsity=sparsity,
                                       sparse_format=sparse_format, sparse_force=sparse_force,
                                       sparse_threads=sparse_threads)
        if strict:
            bad = {r: n for r, n in report.frozen_reasons.items() if "no channel rule" in r or "rule failed" in r}
            if bad:
                _fail("strict mode: groups frozen by missing/failing rules: " + "; ".join(bad))
        if plan_out:
            _write_text(plan_out, report.plan.to_json())
        if dry_run:
            _print_plan(report.plan)
        else:
            save(pruned, output)
    except GraphpruneError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{exc.filename or output}: {exc.strerror or exc}")
    _print_summary(report, None if dry_run else output, verbose)
    if report.sparse is not None:
        from .sparse_report import print_sparse
        print_sparse(out, report, model, None if dry_run else output, verbose)


def _write_text(path: Path, text: str) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _print_plan(plan) -> None:
    table = Table(title="plan (dry run)", show_lines=False)
    for col in ("group", "channels", "units", "remove units", "keep channels"):
        table.add_column(col, justify="right" if col != "group" else "left")
    for g in plan.groups:
        table.add_row(g.group, str(g.channels), str(g.units), str(g.removed_units), str(g.kept_channels))
    out.print(table)


def _before_after(title: str, first: str, rows) -> Table:
    t = Table(title=title)
    t.add_column(first)
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    for row in rows:
        t.add_row(*row)
    return t


def _print_summary(report, output, verbose: bool) -> None:
    table = Table(show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("ratio", justify="right")
    table.add_row("params", _fmt(report.params_before), _fmt(report.params_after), f"{report.params_ratio:.3f}")
    table.add_row("MACs", _fmt(report.macs_before), _fmt(report.macs_after), f"{report.macs_ratio:.3f}")
    out.print(table)
    out.print(f"groups: {report.groups_total} total, {report.groups_pruned} pruned, "
              f"{report.groups_frozen} frozen; channels removed: {report.channels_removed} "
              f"of {report.channels_prunable} prunable ({report.prunable_share:.0%} of all channels prunable)")
    if report.frozen_reasons:
        out.print("frozen groups by reason:")
        for reason, n in list(report.frozen_reasons.items())[: 12 if not verbose else None]:
            out.print(f"  {n:4d}  {reason}")
    if report.calibration:
        out.print(f"statistics: {report.calibration}" + (f"; compensated {report.compensated} weights"
                                                          if report.compensated else ""))
    for note in report.diagnostics[: 6 if not verbose else None]:
        out.print(f"[yellow]note:[/] {note}")
    if report.reconstruction and report.reconstruction["layers"]:
        rec = report.reconstruction
        worst = max(rec["per_layer"], key=lambda r: r["rel_error_after"])
        out.print(f"reconstructed {rec['layers_refit']} of {rec['layers']} layers in {rec['seconds']:.1f} s "
                  f"(largest layer error after: {worst['rel_error_after']:.3f} at '{worst['node']}', "
                  f"{worst['rel_error_before']:.3f} before)")
        if verbose:
            out.print(_before_after("reconstruction: relative layer error", "node",
                                    [(r["node"], f"{r['rel_error_before']:.4f}", f"{r['rel_error_after']:.4f}")
                                     for r in rec["per_layer"]]))
    if report.bn_recalibrated:
        out.print(f"re-estimated the running statistics of {report.bn_recalibrated} BatchNorm layers "
                  f"(after verification)")
    if report.fidelity:
        for name, f in report.fidelity["outputs"].items():
            agree = f" top-1 agreement {f['top1_agreement']:.1%}," if "top1_agreement" in f else ""
            agree += f" top-5 {f['top5_agreement']:.1%}," if "top5_agreement" in f else ""
            agree += f" KL {f['kl']:.4f}," if "kl" in f else ""
            out.print(f"fidelity on {report.fidelity['samples']} held-out calibration samples, output '{name}':"
                      f"{agree} cosine {f['cosine']:.4f}, relative error {f['rel_error']:.3f}")
    if verbose and report.kept_widths:
        out.print(_before_after("kept widths", "group", [(g, str(b), str(a)) for g, b, a in report.kept_widths]))
    if report.verification:
        v = report.verification
        out.print(f"verified: pruned == masked original on {v['samples']} random inputs "
                  f"(max abs diff {v['max_abs_diff']:.2e})")
    if verbose and report.per_layer:
        out.print(_before_after("per layer MACs", "node", [(n, _fmt(b), _fmt(a)) for n, b, a in report.per_layer]))
    if verbose:
        out.print("passes: " + ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items()))
    out.print(f"time: {report.seconds:.2f} s" + (f"; wrote {output}" if output else ""))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--exclude", multiple=True, help="Node-name glob pattern whose channels stay (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-v", "--verbose", is_flag=True, help="List every group and every frozen group with its reason.")
def analyze(model, exclude, as_json, verbose):
    """Show MODEL's channel groups, their sizes, and frozen channels with reasons."""
    from .api import PruneReport, analyze_model, summarize_analysis
    if not model.exists():
        _fail(f"model file not found: {model}")
    try:
        analysis = analyze_model(str(model), exclude=list(exclude))
    except GraphpruneError as exc:
        _fail(str(exc))
    report = PruneReport()
    summarize_analysis(analysis, report)
    if as_json:
        data = {
            "groups": [{"name": g.name, "units": len(g.units), "channels": g.channels,
                        "members": [f"{t}::{a}" for t, a in g.members]} for g in analysis.groups],
            "frozen": [{"name": g.name, "channels": g.channels, "reason": g.reason} for g in analysis.frozen_groups],
            "frozen_reasons": report.frozen_reasons,
            "prunable_share": report.prunable_share,
        }
        out.print_json(json.dumps(data))
        return
    table = Table(title=f"{len(analysis.groups)} prunable groups")
    table.add_column("group")
    table.add_column("units", justify="right")
    table.add_column("channels", justify="right")
    table.add_column("members", justify="right")
    shown = analysis.groups if verbose else analysis.groups[:40]
    for g in shown:
        table.add_row(g.name, str(len(g.units)), str(g.channels), str(len(g.members)))
    out.print(table)
    if len(shown) < len(analysis.groups):
        out.print(f"... {len(analysis.groups) - len(shown)} more (use -v)")
    out.print(f"prunable channels: {report.channels_prunable}, frozen: {report.channels_frozen} "
              f"({report.prunable_share:.0%} prunable)")
    if analysis.frozen_groups:
        out.print("frozen groups by reason:")
        for reason, n in report.frozen_reasons.items():
            out.print(f"  {n:4d}  {reason}")
        if verbose:
            for g in analysis.frozen_groups:
                out.print(f"  - {g.name} ({g.channels} ch): {g.reason}")


if __name__ == "__main__":
    main()
