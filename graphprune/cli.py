"""Command line: `graphprune MODEL --ratio R [-o OUT]` and `graphprune analyze MODEL`."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.text import Text
from rich.table import Table

from .errors import GraphpruneError
from .fileio import Terminated, write_text
from .options import PruneOptions, option_fields, parse_dim

# markup off: model, tensor and file names are data and may contain "[...]"; styles go through Text/style=
err = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)  # soft wrap: an error is one line
out = Console(highlight=False, markup=False, soft_wrap=True)


class DefaultGroup(click.Group):
    """`graphprune MODEL ...` means `graphprune prune MODEL ...`; usage errors are one `error:` line, exit 2."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["prune"] + list(args)
        return super().parse_args(ctx, args)

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """Usage errors are one `error:` line with exit code 2, like every other error (click would print a
        usage block); anything unexpected is one line too, never a traceback."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `graphprune`: the help, not an error
            out.print(exc.ctx.get_help() if exc.ctx else exc.format_message())
            sys.exit(0)
        except click.ClickException as exc:  # usage errors included
            _fail(exc.format_message())
        except click.exceptions.Abort:
            _fail("interrupted")
        except Terminated:
            _fail("terminated by SIGTERM; no output was written")
        except GraphpruneError as exc:
            _fail(str(exc))
        except MemoryError:
            _fail("out of memory (a model, dim or option asks for more than this machine has)")
        except RecursionError:
            _fail("the model is nested too deeply to process")
        except OSError as exc:
            _fail(f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}")
        except Exception as exc:  # a bug: still one line, with what to report
            _fail(f"internal error {type(exc).__name__}: {exc} (please report this with the model)")
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="graphprune")
def main():
    """Structured pruning for ONNX models: remove coupled channels, prove the result equivalent.

    \b
    graphprune MODEL --ratio 0.5 [-o OUT]     prune (same as `graphprune prune ...`)
    graphprune analyze MODEL                  show channel groups and what is frozen, and why
    """


def _printable(text) -> str:
    """Names are data: control characters (ANSI escapes, newlines) are shown as escapes, never sent raw."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))


def _fail(message: str) -> None:
    err.print(Text.assemble(("error:", "bold red"), " ", _printable(message)))
    sys.exit(2)


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _default_output(model: Path) -> Path:
    return model.with_name(model.stem + ".pruned.onnx")


def _click_type(f):
    """The click type of a PruneOptions field, from its declared type."""
    t = str(f.type)
    if f.metadata.get("choices"):
        return click.Choice(list(f.metadata["choices"]))
    if f.name == "calib":
        return click.Path(path_type=Path)
    if t.startswith("float"):
        return float
    if t.startswith("int"):
        return int
    return str


def _prune_options(fn):
    """Attach one click option per exposed PruneOptions field (name, default, help and choices come from it)."""
    for f in reversed(option_fields()):
        meta = f.metadata
        if meta.get("cli") == "":
            continue
        flag = meta.get("cli") or "--" + f.name.replace("_", "-")
        decls = [flag, "-r"] if f.name == "ratio" else [flag]
        default = f.default if f.default is not dataclasses.MISSING else None
        if meta.get("flag"):
            fn = click.option(*decls, f.name, is_flag=True, help=meta["help"])(fn)
        elif meta.get("multiple"):
            fn = click.option(*decls, f.name, multiple=True, help=meta["help"])(fn)
        else:
            fn = click.option(*decls, f.name, type=_click_type(f), default=default,
                              show_default=default is not None, help=meta["help"])(fn)
    return fn


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output file (default: MODEL.pruned.onnx next to the input; never the input itself).")
@_prune_options
@click.option("--plan-out", type=click.Path(dir_okay=False, path_type=Path), help="Save the plan as JSON.")
@click.option("--plan-in", type=click.Path(exists=False, dir_okay=False, path_type=Path),
              help="Replay a saved plan instead of scoring.")
@click.option("--no-verify", is_flag=True, help="Skip the equivalence check against the masked original.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=VALUE",
              help="Value of a dynamic input dim for verification (repeatable), e.g. --dim batch=4 --dim seq=128.")
@click.option("-v", "--verbose", is_flag=True, help="Stage log, per-layer MACs, kept widths.")
def prune(model, output, plan_out, plan_in, no_verify, dims, verbose, **fields):
    """Prune MODEL and write a smaller, verified ONNX file."""
    from .api import prune as run_prune, save
    from .plan import RewritePlan

    if not model.exists():
        _fail(f"model file not found: {model}")
    dry_run = fields.get("dry_run", False)
    output = output or _default_output(model)
    try:
        input_dims = dict(parse_dim(item) for item in dims)
        fields["exclude"] = tuple(fields.get("exclude") or ())
        if fields.get("calib") is not None:
            fields["calib"] = str(fields["calib"])
        if plan_in:
            fields["plan"] = RewritePlan.from_file(plan_in)
        options = PruneOptions.from_kwargs(verify=not no_verify, input_dims=input_dims, **fields)
    except GraphpruneError as exc:
        _fail(str(exc))
    _check_paths(model, None if dry_run else output, plan_out, plan_in, options.calib,
                 options.sparse_plan_out, options.sparse_plan_in)

    def progress(msg):
        if verbose:
            err.print("  " + _printable(msg), style="dim")

    try:
        with err.status("pruning ...", spinner="dots") as status:
            def step(msg):
                status.update(Text(_printable(msg), style="dim"))
                progress(msg)
            pruned, report = run_prune(str(model), options, progress=step)
        if options.strict:
            bad = {r: n for r, n in report.frozen_reasons.items() if "no channel rule" in r or "rule failed" in r}
            if bad:
                _fail("strict mode: groups frozen by missing/failing rules: " + "; ".join(bad))
        if plan_out:
            write_text(plan_out, report.plan.to_json())  # fresh O_EXCL temp file, then a rename
        if dry_run:
            _print_plan(report.plan)
        else:
            save(pruned, output)
    except GraphpruneError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{exc.filename or output}: {exc.strerror or exc}")
    except MemoryError:
        _fail(f"{model}: out of memory (the model, its declared dims or the options ask for more than this "
              f"machine has)")
    _print_summary(report, None if dry_run else output, verbose)
    if report.sparse is not None:
        from .sparse_report import print_sparse
        print_sparse(out, report, model, None if dry_run else output, verbose)


def _check_paths(model: Path, output: Path | None, plan_out: Path | None, plan_in: Path | None, calib,
                 sparse_plan_out=None, sparse_plan_in=None) -> None:
    """No output may be an input (the model, its external data files, --plan-in, --sparse-plan-in, --calib or a
    file inside a --calib folder), or another output of the same run. The model's external data file
    (OUT.data) counts as an output: it is written when the weights are big."""
    from .ir import input_files
    model_files = input_files(model)
    inputs = {"the input model": [model_files[0]]}
    if len(model_files) > 1:
        inputs["the input model's external data"] = model_files[1:]
    if plan_in:
        inputs["--plan-in"] = [plan_in.resolve()]
    if sparse_plan_in:
        inputs["--sparse-plan-in"] = [Path(sparse_plan_in).resolve()]
    if calib:
        inputs["--calib"] = [Path(calib).resolve()]
    outputs = {"-o": output, "-o's external data file": output.with_name(output.name + ".data") if output else None,
               "--plan-out": plan_out, "--sparse-plan-out": Path(sparse_plan_out) if sparse_plan_out else None}
    seen: dict[Path, str] = {}
    for label, path in outputs.items():
        if path is None:
            continue
        real = path.resolve()
        for in_label, in_paths in inputs.items():
            for in_path in in_paths:
                if real == in_path or (in_label == "--calib" and in_path in real.parents) or _same_file(real, in_path):
                    _fail(f"{label} {path} would overwrite {in_label}; choose another path")
        if real in seen:
            _fail(f"{label} and {seen[real]} name the same file {path}")
        seen[real] = label
        if not path.parent.exists():
            _fail(f"output folder does not exist: {path.parent}")
        if path.exists() and not path.is_file():
            _fail(f"{label} {path} exists and is not a regular file")


def _same_file(a: Path, b: Path) -> bool:
    """Two names of one file (a hard link resolves to itself, not to the other name)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _print_plan(plan) -> None:
    table = Table(title="plan (dry run)", show_lines=False)
    for col in ("group", "channels", "units", "remove units", "keep channels"):
        table.add_column(col, justify="right" if col != "group" else "left")
    for g in plan.groups:
        table.add_row(_printable(g.group), str(g.channels), str(g.units), str(g.removed_units), str(g.kept_channels))
    out.print(table)


def _before_after(title: str, first: str, rows) -> Table:
    t = Table(title=title)
    t.add_column(first)
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    for row in rows:
        t.add_row(*(_printable(c) for c in row))
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
    if report.assumed_dims:
        out.print("MACs counted at " + ", ".join(f"{_printable(n)}={d['value']} ({d['source']})"
                                                 for n, d in report.assumed_dims.items())
                  + " (the written model keeps its dynamic dims)")
    out.print(f"groups: {report.groups_total} total, {report.groups_pruned} pruned, "
              f"{report.groups_frozen} frozen; channels removed: {report.channels_removed} "
              f"of {report.channels_prunable} prunable ({report.prunable_share:.0%} of all channels prunable)")
    if report.frozen_reasons:
        out.print("frozen groups by reason:")
        for reason, n in list(report.frozen_reasons.items())[: 12 if not verbose else None]:
            out.print(f"  {n:4d}  {_printable(reason)}")
    if report.calibration:
        out.print(f"statistics: {_printable(report.calibration)}" + (f"; compensated {report.compensated} weights"
                                                          if report.compensated else ""))
    for note in report.diagnostics[: 6 if not verbose else None]:
        out.print(Text.assemble(("note:", "yellow"), " ", _printable(note)))
    if report.reconstruction and report.reconstruction["layers"]:
        rec = report.reconstruction
        worst = max(rec["per_layer"], key=lambda r: r["rel_error_after"])
        out.print(f"reconstructed {rec['layers_refit']} of {rec['layers']} layers in {rec['seconds']:.1f} s "
                  f"(largest layer error after: {worst['rel_error_after']:.3f} at '{_printable(worst['node'])}', "
                  f"{worst['rel_error_before']:.3f} before)")
        e2e = rec.get("end_to_end") or {}
        if verbose and "before" in e2e:
            def show(e):
                return f"{e['rel_error']:.4f}" + ("" if e["top1"] is None else f" (top-1 agreement {e['top1']:.1%})")
            reverted = sum(1 for r in rec["per_layer"] if r.get("reverted"))
            out.print(f"reconstruction end-to-end check on the held-out calibration batches: output error "
                      f"{show(e2e['before'])} -> {show(e2e['after'])}"
                      + (f"; {reverted} layer refits reverted" if reverted else "; every refit kept"))
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
            out.print(f"fidelity on {report.fidelity['samples']} held-out calibration samples, output "
                      f"'{_printable(name)}':"
                      f"{agree} cosine {f['cosine']:.4f}, relative error {f['rel_error']:.3f}")
        layers = report.fidelity.get("layers") or []
        if layers:
            enters = next((r for r in layers if r["rel_error"] > 0.05), None)
            worst = max(layers, key=lambda r: r["rel_error"])
            out.print(f"layer error profile ({len(layers)} layers): "
                      + (f"first above 5 % at '{_printable(enters['node'])}' ({enters['op']}, "
                         f"{enters['rel_error']:.3f}); " if enters else "every layer within 5 %; ")
                      + f"largest {worst['rel_error']:.3f} at '{_printable(worst['node'])}'")
            if verbose:
                t = Table(title="layer error profile (held-out, kept channels)")
                for col in ("node", "op", "relative error"):
                    t.add_column(col, justify="right" if col == "relative error" else "left")
                for r in layers:
                    t.add_row(_printable(r["node"]), r["op"], f"{r['rel_error']:.4f}")
                out.print(t)
    if report.fidelity_search:
        steps = ", ".join(f"{t:.3f}->{m:.3f}" for t, _r, m in report.fidelity_search)
        out.print(f"--min-fidelity: MACs target {report.fidelity_target:.3f} chosen (bisection target->agreement: "
                  f"{steps})")
    if verbose and report.kept_widths:
        out.print(_before_after("kept widths", "group", [(g, str(b), str(a)) for g, b, a in report.kept_widths]))
    if report.verification:
        v = report.verification
        degenerate = "; ".join(f"'{_printable(k)}' {why}" for k, why in v.get("degenerate", {}).items())
        if "compared" in v and not v["compared"]:
            out.print(Text.assemble(("not verified:", "yellow"), f" on {v['samples']} random inputs the outputs "
                                    f"prove nothing ({degenerate}) and no tensor feeding them could be compared"))
        elif v.get("intermediate"):
            out.print(f"verified: pruned == masked original on {v['samples']} random inputs at tensor "
                      f"'{_printable(v['compared'][0])}', because the outputs prove nothing ({degenerate}) "
                      f"(max abs diff {v['max_abs_diff']:.2e})")
        else:
            out.print(f"verified: pruned == masked original on {v['samples']} random inputs "
                      f"(max abs diff {v['max_abs_diff']:.2e})")
    if verbose and report.per_layer:
        out.print(_before_after("per layer MACs", "node", [(n, _fmt(b), _fmt(a)) for n, b, a in report.per_layer]))
    if verbose:
        for node, op, trace in report.rule_failures:
            err.print(f"channel rule for {_printable(op)} node '{_printable(node)}' raised (a bug; please report):",
                      style="red")
            err.print(trace.rstrip(), markup=False, highlight=False)
        out.print("stages:")
        for line in report.stage_log:
            out.print("  " + _printable(line))
    out.print(f"time: {report.seconds:.2f} s" + (f"; wrote {_printable(output)}" if output else ""))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--exclude", multiple=True, help="Node-name glob pattern whose channels stay (repeatable).")
@click.option("--heads", type=click.Choice(["auto", "whole", "inner"]), default="auto", show_default=True,
              help="Head splits as `prune` takes them: whole heads at attention (auto), everywhere, or inner channels.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-v", "--verbose", is_flag=True, help="List every group and every frozen group with its reason.")
@click.option("--graph", "graph_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the groups and the tensors and nodes they touch as GraphML.")
def analyze(model, exclude, heads, as_json, verbose, graph_out):
    """Show MODEL's channel groups, their sizes, and frozen channels with reasons."""
    from .api import analyze_model
    from .report import PruneReport
    if not model.exists():
        _fail(f"model file not found: {model}")
    try:
        analysis = analyze_model(str(model), exclude=list(exclude), whole_heads=heads)
    except GraphpruneError as exc:
        _fail(str(exc))
    except MemoryError:
        _fail(f"{model}: out of memory (the model or its declared dims ask for more than this machine has)")
    report = PruneReport()
    report.add_analysis(analysis)
    if graph_out is not None:
        import networkx as nx
        nx.write_graphml(analysis.group_graph(), str(graph_out))
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
        table.add_row(_printable(g.name), str(len(g.units)), str(g.channels), str(len(g.members)))
    out.print(table)
    if len(shown) < len(analysis.groups):
        out.print(f"... {len(analysis.groups) - len(shown)} more (use -v)")
    out.print(f"prunable channels: {report.channels_prunable}, frozen: {report.channels_frozen} "
              f"({report.prunable_share:.0%} prunable)")
    if analysis.frozen_groups:
        out.print("frozen groups by reason:")
        for reason, n in report.frozen_reasons.items():
            out.print(f"  {n:4d}  {_printable(reason)}")
        if verbose:
            for g in analysis.frozen_groups:
                out.print(f"  - {_printable(g.name)} ({g.channels} ch): {_printable(g.reason)}")


if __name__ == "__main__":
    main()
