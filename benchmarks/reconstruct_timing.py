"""Cost and fidelity of sequential reconstruction, this revision against a baseline revision, interleaved.

    python benchmarks/reconstruct_timing.py [--models efficientnet_lite0 minilm] [--speedups 1.5 2]
        [--baseline main] [--repeats 1] [--json out.json]

For each model and speed-up it runs, one after the other in the same process (the machine is shared, so only
ratios of runs made side by side mean anything):
- `obs`: `graphprune.prune(model, importance="obspa", target_macs=1/s, calib=NPZ, calib_samples=256,
  verify=False, holdout=0, compensate="obs")`: no reconstruction (the OBS-compensated slices it starts from);
- `new`: the same with the default compensation (reconstruction), this revision's code;
- `base`: the same with passes/reconstruct.py and passes/layer_stats.py of `--baseline` (read with git show and
  loaded in place of this revision's reconstruct pass; the rest of the pipeline is this revision's).
It prints the whole prune time, the reconstruct stage time, process CPU seconds, the held-out end-to-end
check (new only) and the task fidelity on the model's evaluation set (benchmarks/fidelity.py's evaluators).
Data and models: benchmarks/.cache (python benchmarks/fidelity_models.py).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))


def baseline_reconstruct(rev: str):
    """The `reconstruct` function of revision `rev`, with that revision's layer_stats beside it."""
    def show(path):
        return subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], capture_output=True, text=True,
                              check=True).stdout
    tag = "_baseline"
    modules = {}
    for name, path in (("layer_stats", "passes/layer_stats.py"), ("reconstruct", "passes/reconstruct.py")):
        src = show(path).replace("from .layer_stats import", f"from .layer_stats{tag} import")
        mod = types.ModuleType(f"graphprune.passes.{name}{tag}")
        mod.__package__ = "graphprune.passes"
        sys.modules[mod.__name__] = mod
        exec(compile(src, f"{rev}:{path}", "exec"), mod.__dict__)
        modules[name] = mod
    old = modules["reconstruct"].reconstruct

    def reconstruct(*args, **kwargs):
        result = old(*args, **kwargs)
        for name, default in (("end_to_end", {}), ("timings", {}), ("node_runs", {})):
            if not hasattr(result, name):      # a revision before these fields: the pipeline reads them
                setattr(result, name, default)
        return result
    return reconstruct


def run_cell(model: str, speedup: float, mode: str, evaluator, baseline):
    import graphprune
    from graphprune.passes import reconstruct as rc

    import fidelity_models as fm
    paths = fm.paths(model)
    kwargs = {"importance": "obspa", "target_macs": 1 / speedup, "calib": str(paths["calib"]),
              "calib_samples": 256, "verify": False, "holdout": 0}
    if mode == "obs":
        kwargs["compensate"] = "obs"
    own = rc.reconstruct
    if mode == "base":
        rc.reconstruct = baseline
    try:
        t, c = time.perf_counter(), time.process_time()
        pruned, report = graphprune.prune(str(paths["onnx"]), **kwargs)
        seconds, cpu = time.perf_counter() - t, time.process_time() - c
    finally:
        rc.reconstruct = own
    rec = report.reconstruction or {}
    return {"model": model, "speedup": speedup, "mode": mode, "prune_s": round(seconds, 1), "cpu_s": round(cpu, 1),
            "reconstruct_s": round(report.timings.get("reconstruct", 0.0), 1),
            "macs_ratio": round(report.macs_after / report.macs_before, 3),
            "end_to_end": rec.get("end_to_end"), "phases": rec.get("timings"),
            "refit": f"{rec.get('layers_refit')}/{rec.get('layers')}" if rec else "",
            "notes": [n for n in rec.get("notes", []) if n.startswith("reconstruction end-to-end")],
            "fidelity": {k: round(v, 2) for k, v in evaluator.score(pruned).items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["efficientnet_lite0", "minilm"])
    ap.add_argument("--speedups", nargs="+", type=float, default=[1.5])
    ap.add_argument("--baseline", default="main", help="git revision to compare with ('' for none)")
    ap.add_argument("--modes", nargs="+", default=["obs", "new", "base"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    from fidelity import EVALUATORS
    baseline = baseline_reconstruct(args.baseline) if args.baseline and "base" in args.modes else None
    rows = []
    for model in args.models:
        evaluator = EVALUATORS[model](model, quick=False)
        for speedup in args.speedups:
            for _ in range(args.repeats):
                for mode in args.modes:
                    if mode == "base" and baseline is None:
                        continue
                    row = run_cell(model, speedup, mode, evaluator, baseline)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
