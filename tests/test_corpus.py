"""The committed corpus (weight-stripped exports refilled from a seed), swept once: one test per model checks
everything that needs the model at once.

Every model: the file is stripped and refills into a model that runs with finite outputs; at ratio 0.5 it
prunes to a full-check-valid model that equals the masked original (verification ran), has fewer MACs, keeps
at least the prunable share recorded in benchmarks/results/corpus.md, and no group is frozen because a rule
failed or because an op that has a rule was reported as having none. Every fourth model: ratio 0 changes
nothing. The hand-built models and three small real ones: the data-aware criterion with compensation stays
equivalent across their coupling patterns (residuals, concats, heads, shuffles, recurrent layers).
"""
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphprune
import graphprune.ops  # noqa: F401  (registers every rule)
from graphprune.rules import RULES
from models.corpus_tools import corpus_dir, is_stripped, load_manifest, make_inputs, refill_weights

REPO = Path(__file__).resolve().parents[1]
CORPUS_TABLE = REPO / "benchmarks" / "results" / "corpus.md"
SHARE_TOLERANCE = 0.01  # the table rounds to whole percents


def _entries():
    try:
        return load_manifest()["models"]
    except FileNotFoundError:
        return []


def _recorded_prunable_shares() -> dict[str, float]:
    """model file stem -> prunable share of channels, from the committed corpus report table."""
    shares = {}
    for line in CORPUS_TABLE.read_text().splitlines():
        m = re.match(r"\|\s*(\S+)\s*\|\s*\d+\s*\|\s*(\d+)%\s*\|", line)
        if m:
            shares[m.group(1)] = int(m.group(2)) / 100
    return shares


ENTRIES = _entries()
SHARES = _recorded_prunable_shares()
RATIO_ZERO = {e["file"] for e in ENTRIES[::4]}
DATA_AWARE = {e["file"] for e in ENTRIES
              if e["name"].startswith("hand_") or e["name"] in ("mobilenet_v3_small", "gpt2", "bert")}
RULED_OPS = {op for _, op in RULES.op_types()}


def test_corpus_is_present():
    assert len(ENTRIES) >= 20, "the model corpus is missing: run models/build_corpus.py"
    missing = [e["file"] for e in ENTRIES if not (corpus_dir() / e["file"]).exists()]
    assert not missing, f"files listed in the manifest but absent: {missing}"
    unrecorded = [e["file"] for e in ENTRIES if Path(e["file"]).stem not in SHARES]
    assert not unrecorded, f"models missing from {CORPUS_TABLE.name}: run python -m benchmarks.corpus_report"


def _rule_problems(frozen_reasons: dict) -> list[str]:
    problems = [r for r in frozen_reasons if "rule failed" in r]
    for r in frozen_reasons:
        m = re.search(r"no channel rule for op (\S+)(?: \(domain (\S+)\))?", r)
        if m and RULES.lookup(m.group(1), m.group(2) or "") is not None:
            problems.append(r)
    return problems


def _run(model, feeds):
    so = ort.SessionOptions()
    # onnxruntime's graph optimisations cost more than the single run they would speed up (ViT-B: ~1 min)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in sess.run(None, feeds)]


def _rel_limit(model) -> float:
    """Verification's max relative difference allowed for this model: 1e-3, or its output type's own bound
    (atol + rtol of runtime.tolerance, relative to the output's scale) where that is looser (float16)."""
    from graphprune.runtime import tolerance
    bounds = [sum(tolerance(o.type.tensor_type.elem_type)) for o in model.graph.output]
    return max([1e-3] + bounds)


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRIES, ids=[Path(e["file"]).stem for e in ENTRIES])
def test_corpus_model(entry):
    stripped = onnx.load(str(corpus_dir() / entry["file"]))
    assert is_stripped(stripped)
    assert len(stripped.graph.node) == entry["nodes"]
    model = refill_weights(stripped, seed=0)
    if entry.get("params", 0) < 5_000_000:  # the build checked every file; re-check the small ones here
        onnx.checker.check_model(model)
    feeds = make_inputs(entry, seed=0)
    dense_outputs = _run(model, feeds)
    for out in dense_outputs:
        if np.issubdtype(out.dtype, np.floating):
            assert np.all(np.isfinite(out)), "refilled model gives non-finite outputs"

    # the finest head units (head_dim): every slicing rule runs, and the recorded shares were measured so
    pruned, report = graphprune.prune(model, ratio=0.5, verify=True, verify_samples=1, importance="l1",
                                      heads="inner")
    onnx.checker.check_model(pruned, full_check=True)
    assert report.verification is not None and report.verification["samples"] == 1
    assert report.verification["max_rel_diff"] < _rel_limit(model)
    assert report.macs_after < report.macs_before, f"MACs did not drop: {report.frozen_reasons}"
    assert not _rule_problems(report.frozen_reasons)
    recorded = SHARES[Path(entry["file"]).stem]
    assert report.prunable_share >= recorded - SHARE_TOLERANCE, \
        f"prunable share {report.prunable_share:.0%} fell below the recorded {recorded:.0%}"

    inner_units = sorted(g.units for g in report.plan.groups)
    auto_units = sorted(len(g.units) for g in graphprune.analyze_model(model, whole_heads="auto").groups)
    if auto_units != inner_units:
        # the default head mode takes whole heads at attention: that layout must prune and verify too
        pruned, report = graphprune.prune(model, ratio=0.5, verify=True, verify_samples=1, importance="l1")
        onnx.checker.check_model(pruned, full_check=True)
        assert report.verification is not None and report.verification["max_rel_diff"] < _rel_limit(model)
        assert report.macs_after < report.macs_before
        assert not _rule_problems(report.frozen_reasons)

    if entry["file"] in RATIO_ZERO:
        # canonicalisation and the rewrite alone: verification compares against the canonicalised graph, this
        # against the exported one
        same, report0 = graphprune.prune(model, ratio=0.0, verify=False, importance="l1")
        assert report0.params_after == report0.params_before
        for x, y in zip(dense_outputs, _run(same, feeds), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)

    if entry["file"] in DATA_AWARE:
        # the masked reference carries the same compensation updates and must still match
        pruned, report = graphprune.prune(model, importance="obspa", target_macs=0.7, verify=True, verify_samples=1,
                                          calib_samples=16)
        onnx.checker.check_model(pruned, full_check=True)
        assert report.verification is not None and report.verification["max_rel_diff"] < _rel_limit(model)
        assert report.macs_after <= report.macs_before
