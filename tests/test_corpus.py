"""End to end on the committed corpus (weight-stripped exports refilled from a seed): every model prunes at
ratio 0.5 to a full-check-valid model that onnxruntime runs, equals the masked original, and has fewer MACs;
ratio 0 changes nothing."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphprune
from graphprune.verify import random_feeds, session
from models.corpus_tools import refill_weights

CORPUS = Path(__file__).resolve().parents[1] / "models" / "corpus"
MANIFEST = CORPUS / "manifest.json"


def _entries():
    if not MANIFEST.exists():
        return []
    data = json.loads(MANIFEST.read_text())
    entries = data["models"] if isinstance(data, dict) else data
    return [e for e in entries if (CORPUS / Path(e["file"]).name).exists()]


ENTRIES = _entries()


def test_corpus_is_present():
    assert len(ENTRIES) >= 20, "the model corpus is missing: run models/build_corpus.py"


def _load(entry):
    return refill_weights(onnx.load(str(CORPUS / Path(entry["file"]).name)), seed=0)


@pytest.mark.parametrize("entry", ENTRIES, ids=[Path(e["file"]).stem for e in ENTRIES])
def test_prunes_to_equivalent_smaller_model(entry):
    model = _load(entry)
    pruned, report = graphprune.prune(model, ratio=0.5, verify=True, verify_samples=1)
    onnx.checker.check_model(pruned, full_check=True)
    assert report.macs_after < report.macs_before, f"MACs did not drop: {report.frozen_reasons}"
    assert report.verification["max_rel_diff"] < 1e-3


@pytest.mark.parametrize("entry", ENTRIES[::4], ids=[Path(e["file"]).stem for e in ENTRIES[::4]])
def test_ratio_zero_is_identity(entry):
    model = _load(entry)
    pruned, report = graphprune.prune(model, ratio=0.0, verify=False)
    assert report.params_after == report.params_before
    from graphprune.ir import Graph
    feeds = random_feeds(Graph(model), 1, seed=3)
    a = session(model).run(None, feeds[0])
    b = session(pruned).run(None, feeds[0])
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


# Data-aware criteria with compensation across the coupling patterns (residuals, concats, heads, shuffles,
# recurrent layers): the masked reference carries the same weight updates and must still match.
SMALL = [e for e in ENTRIES if e["name"].startswith("hand_") or e["name"] in ("mobilenet_v3_small", "gpt2", "bert")]


@pytest.mark.parametrize("entry", SMALL, ids=[Path(e["file"]).stem for e in SMALL])
def test_obspa_with_compensation_stays_equivalent(entry):
    model = _load(entry)
    pruned, report = graphprune.prune(model, importance="obspa", target_macs=0.7, verify=True, verify_samples=1,
                                      calib_samples=16)
    onnx.checker.check_model(pruned, full_check=True)
    assert report.verification["max_rel_diff"] < 1e-3
    assert report.macs_after <= report.macs_before
