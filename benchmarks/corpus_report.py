"""Per corpus model: prunable share of channels, MACs before/after at a ratio, frozen groups by reason, wall time.

    python -m benchmarks.corpus_report [--ratio 0.5] [--only NAME ...] [--merge]

Writes benchmarks/results/corpus.md. Wall time covers the whole graphprune run on an in-memory model
(canonicalize, analyze, score, plan, rewrite, checker, verification on one random input).
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import onnx

import graphprune
from models.corpus_tools import refill_weights

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "models" / "corpus"
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--only", nargs="*")
    p.add_argument("--merge", action="store_true",
                   help="with --only: replace or add just these models' rows in the committed table")
    args = p.parse_args()
    data = json.loads((CORPUS / "manifest.json").read_text())
    entries = data["models"] if isinstance(data, dict) else data
    rows, ok, reasons_total = [], 0, Counter()
    for e in entries:
        path = CORPUS / Path(e["file"]).name
        if not path.exists() or (args.only and not any(o in path.name for o in args.only)):
            continue
        model = refill_weights(onnx.load(str(path)), seed=0)
        t = time.perf_counter()
        try:
            # head splits in their finest units (head_dim), as tests/test_corpus.py compares the shares: every
            # slicing rule runs, and whole heads (the default at attention) would count head_dim axes as kept
            pruned, r = graphprune.prune(model, ratio=args.ratio, verify=True, verify_samples=1, importance="l1",
                                         heads="inner")
            status = "ok" if r.macs_after < r.macs_before else "no MAC drop"
            ok += status == "ok"
        except Exception as exc:  # report, keep going
            rows.append(f"| {path.stem} | {len(model.graph.node)} | - | - | - | - | FAILED: {str(exc)[:120]} | |")
            print(path.stem, "FAILED", exc, flush=True)
            continue
        wall = time.perf_counter() - t
        reasons = "; ".join(f"{n}× {k}" for k, n in list(r.frozen_reasons.items())[:4])
        reasons_total.update(r.frozen_reasons)
        rows.append(f"| {path.stem} | {len(model.graph.node)} | {r.prunable_share:.0%} | {r.macs_before / 1e6:.1f} | "
                    f"{r.macs_after / 1e6:.1f} ({r.macs_ratio:.2f}) | {r.groups_frozen} | {status} | {wall:.2f} | "
                    f"{reasons} |")
        print(rows[-1], flush=True)
    lines = [f"# corpus at ratio {args.ratio} (refilled random weights, seed 0, `--importance l1 --heads inner`)", "",
             f"{ok} of {len(rows)} models prune to a valid, equivalent, smaller model.", "",
             "| model | nodes | prunable channels | MMACs before | MMACs after (ratio) | frozen groups | result | "
             "wall s | top frozen reasons |", "|---|---|---|---|---|---|---|---|---|"] + rows
    lines += ["", "## frozen groups by reason, whole corpus", ""]
    lines += [f"- {n}× {k}" for k, n in reasons_total.most_common(30)]
    RESULTS.mkdir(exist_ok=True)
    if not args.only:  # a partial run must not overwrite the committed whole-corpus table
        (RESULTS / "corpus.md").write_text("\n".join(lines) + "\n")
    elif args.merge:
        _merge_rows(RESULTS / "corpus.md", rows)
    print(f"{ok}/{len(rows)} ok")


def _merge_rows(table: Path, rows: list[str]) -> None:
    """Replace the rows of the models in `rows` (matched by the first cell) and add the new ones after the last
    model row; the header and the reason summary are left as they were (they describe the last full run)."""
    lines = table.read_text().splitlines()
    new = {r.split("|")[1].strip(): r for r in rows}
    out, last_row = [], 0
    for line in lines:
        key = line.split("|")[1].strip() if line.startswith("| ") else None
        if key in new:
            line = new.pop(key)
        out.append(line)
        if line.startswith("| ") and not line.startswith("| model"):
            last_row = len(out)
    out[last_row:last_row] = list(new.values())
    table.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
