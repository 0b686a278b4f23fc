"""The CLI's account of the sparsify pass: one row per eligible layer, then totals."""
from __future__ import annotations

from pathlib import Path

from rich import box
from rich.table import Table
from rich.text import Text

MAX_ROWS = 40
NAME_WIDTH = 24


def _us(v) -> str:
    return "–" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.1f}")


def _bytes(n: float) -> str:
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def _short(name: str, width: int = NAME_WIDTH) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def layer_table(layers, verbose: bool = False) -> Table:
    t = Table(title="sparse layers", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("layer / node", overflow="fold")
    if verbose:
        t.add_column("input")
    t.add_column("decision (how: measured ratio [interval] / cached / analytic / replayed / forced)",
                 overflow="fold")
    t.add_column("sparsity", justify="right")
    t.add_column("dense µs", justify="right")
    t.add_column("sparse µs", justify="right")
    t.add_column("error c/p", justify="right")
    for r in layers if verbose else layers[:MAX_ROWS]:
        row = [Text.assemble(str(r.shape), "\n", (r.node if verbose else _short(r.node), "dim"))]
        if verbose:
            row.append("×".join(str(d) for d in r.x_shape))
        err = f"{r.rel_error:.3f}/{r.rel_error_plain:.3f}" if r.rel_error is not None else "–"
        row += [r.decision, f"{r.sparsity:.0%}" if r.emitted else "–", _us(r.dense_us), _us(r.sparse_us), err]
        t.add_row(*row)
    return t


def print_sparse(console, report, model_path, output, verbose: bool = False) -> None:
    s = report.sparse
    layers = report.sparse_layers
    if layers:
        console.print(layer_table(layers, verbose))
        if not verbose and len(layers) > MAX_ROWS:
            console.print(f"... {len(layers) - MAX_ROWS} more layers (use -v)")
        console.print("error c/p: the layer's output error against the dense model on the calibration rows, "
                      "‖S·Ŵ − D·W‖/‖D·W‖ (S: its input with the earlier layers sparse), with SparseGPT "
                      "compensation / with the same blocks of W just removed", style="dim")
    for note in s.get("notes", [])[: None if verbose else 6]:
        console.print(Text.assemble(("note:", "yellow"), " ", str(note)))
    line = (f"sparsity {s['sparsity']:.0%} ({s['format']}{', forced' if s['forced'] else ''}): "
            f"{s.get('layers_sparse', 0)} layers sparse, {s.get('layers_dense', 0)} kept dense")
    if output is not None and Path(output).exists():
        line += f"; file {_bytes(Path(model_path).stat().st_size)} → {_bytes(Path(output).stat().st_size)}"
    console.print(line)
    console.print(f"sparse statistics: {s['calibration']}")
    if s.get("decided_by"):
        console.print(f"sparse decisions: {s['decided_by']} (how: measured = ratio interval cleared the "
                      f"margin; cached = the same from the timing cache; analytic = roofline model; replayed = "
                      f"sparse plan; forced = --sparse-force)", style="dim")
    e2e = s.get("end_to_end")
    if e2e:
        how = "native library" if e2e["native"] else "no native library: function fallback"
        threads = s["threads"] if isinstance(s["threads"], int) else "default"
        console.print(f"whole model, batch {e2e['batch']}, {threads} threads: dense {e2e['dense_ms']:.3f} ms, "
                      f"sparse {e2e['sparse_ms']:.3f} ms ({e2e['speedup']:.2f}×"
                      + (f" [{e2e['speedup_lo']:.2f}, {e2e['speedup_hi']:.2f}]" if "speedup_lo" in e2e else "")
                      + f", {how})")
    v = s.get("verification")
    if v:
        console.print(f"verified: sparse == masked dense model on {v['samples']} random inputs "
                      f"({', '.join(v['paths'])}; max abs diff {v['max_abs_diff']:.2e})")
