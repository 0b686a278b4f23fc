"""The timing engine (graphprune/timing.py) and reproducible sparse decisions: the decision rule under noisy
timings, the timing cache, warm-cache compiles, sparse-plan replay, --no-measure."""
import json
import math
import os

import numpy as np
import pytest
from onnx import helper

from graphprune import timing
from graphprune.feeds import synthetic_feeds
from graphprune.ir import Graph
from graphprune.passes.canonicalize import canonicalize
from graphprune.passes.sparse_cost import layer_work
from graphprune.passes.sparse_layers import find_layers
from graphprune.passes.sparsify import SparsifyError, load_sparse_plan, sparsify, write_sparse_plan
from graphprune.timing import DEFAULT_ROOFLINE, MARGIN, TimingCache, compare, decide, sign_test_rank

from helpers import make_model, rand


@pytest.fixture(autouse=True)
def _private_timing_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv(timing.CACHE_ENV, str(tmp_path_factory.mktemp("timing-cache")))


# ---- the decision rule under noise ------------------------------------------------------------------------------
def _noisy(true_ratio, rng, outlier_rate=0.05):
    """sample(name): dense 1 ms, sparse 1 ms / true_ratio, each sample × a heavy-tailed factor exp(0.1·t₂)
    (Student t with 2 degrees of freedom: infinite variance) and, with probability outlier_rate, a 5× stall."""
    base = {"dense": 1e-3, "bsr": 1e-3 / true_ratio}

    def sample(name):
        stall = 5.0 if rng.random() < outlier_rate else 1.0
        return base[name] * math.exp(0.1 * rng.standard_t(2)) * stall
    return sample


def _naive_rule(sample, rounds=15):
    """The old cost model: medians of 15 interleaved samples, sparse when dense/sparse >= the margin."""
    d, s = [], []
    for _ in range(rounds):
        d.append(sample("dense"))
        s.append(sample("bsr"))
    return np.median(d) / np.median(s) >= MARGIN


@pytest.mark.parametrize("true_ratio", [0.5, 0.78, 0.95, 1.2, 1.5, 3.0])
def test_noisy_timings_never_flip_a_layer_outside_the_margin(true_ratio):
    """400 seeded trials per ratio. A measured decision must always be on the true side of the margin; where
    the interval does not clear it the analytic estimate decides (here: the true ratio, so that a wrong final
    decision could only come from the measurement)."""
    truth = true_ratio >= MARGIN
    measured = flips = 0
    for seed in range(400):
        rng = np.random.default_rng(seed)
        est = compare(_noisy(true_ratio, rng), "dense", ["bsr"], clock=lambda: 0.0)["bsr"]
        d = decide(est, true_ratio)
        assert est.lo <= est.ratio <= est.hi
        measured += d.how == "measured"
        flips += d.sparse != truth
    assert flips == 0
    far = abs(math.log(true_ratio / MARGIN)) > math.log(1.3)
    if far:       # far from the margin the measurement itself decides, almost always
        assert measured >= 0.95 * 400, measured


def test_the_noise_of_the_decision_test_does_flip_the_old_rule():
    """The same noise flips the old single-median rule on a layer 1.2× faster (so the test above has teeth)."""
    flips = sum(not _naive_rule(_noisy(1.2, np.random.default_rng(seed))) for seed in range(400))
    assert flips > 10


def test_sign_test_rank_is_the_largest_valid_rank():
    for n, alpha in [(12, 0.0025), (24, 0.0025), (96, 0.0025), (30, 0.05)]:
        k = sign_test_rank(n, alpha)
        assert k >= 1
        cdf = lambda j, n=n: sum(math.comb(n, i) for i in range(j + 1)) / 2 ** n  # noqa: E731
        assert cdf(k - 1) <= alpha / 2 < cdf(k)
    assert sign_test_rank(5, 0.0025) == 0                 # too few samples: no interval at this level


def test_inconclusive_measurement_defers_to_the_analytic_estimate():
    est = timing.RatioEstimate(1.12, 1.02, 1.25, 96, 1e-3, 0.9e-3)
    calls = []
    d = decide(est, lambda: calls.append(1) or 0.8)
    assert (d.sparse, d.how, d.analytic, calls) == (False, "analytic", 0.8, [1])
    clear = timing.RatioEstimate(3.0, 2.7, 3.3, 12, 3e-3, 1e-3)
    assert decide(clear, lambda: calls.append(1) or 0.5).how == "measured" and len(calls) == 1  # not consulted


# ---- the analytic model ------------------------------------------------------------------------------------------
def _layer(nodes, x_shape, y_shape, inits):
    g = Graph(make_model(nodes, [("x", x_shape)], [("y", y_shape)], inits))
    canonicalize(g)
    return find_layers(g)[0][0]


def test_roofline_reproduces_the_benchmark_verdicts():
    """Default constants, the project's measured cases: BERT FFN 768→3072 at 75 % (3.5–4×) sparse; 3×3 conv
    64→64 @28 at 50 % (0.78×) dense; 1×1 conv 256→512 @14 at 75 % (~1.5×) sparse; a 16×16 MatMul: call
    overhead only, dense."""
    ffn = _layer([helper.make_node("MatMul", ["x", "W"], ["y"], name="ffn")], [1, 768], [1, 3072],
                 {"W": rand(768, 3072, seed=1)})
    conv3 = _layer([helper.make_node("Conv", ["x", "W"], ["y"], name="c3", kernel_shape=[3, 3], pads=[1] * 4)],
                   [1, 64, 28, 28], [1, 64, 28, 28], {"W": rand(64, 64, 3, 3, seed=2)})
    conv1 = _layer([helper.make_node("Conv", ["x", "W"], ["y"], name="c1", kernel_shape=[1, 1])],
                   [1, 256, 14, 14], [1, 512, 14, 14], {"W": rand(512, 256, 1, 1, seed=3)})
    tiny = _layer([helper.make_node("MatMul", ["x", "W"], ["y"], name="t")], [1, 16], [1, 16],
                  {"W": rand(16, 16, seed=4)})
    r = DEFAULT_ROOFLINE.ratio
    assert 3.0 < r(layer_work(ffn, [1, 768], 0.75, "bsr")) < 4.2
    assert r(layer_work(conv3, [1, 64, 28, 28], 0.5, "bsr")) < 1.0
    assert r(layer_work(conv1, [1, 256, 14, 14], 0.75, "bsr")) > 1.3
    assert r(layer_work(tiny, [1, 16], 0.75, "bsr")) < MARGIN
    assert layer_work(conv3, [1, 64, 28, 28], 0.5, "bsr").macs == 28 * 28 * 64 * 64 * 9


# ---- the cache ---------------------------------------------------------------------------------------------------
def test_cache_round_trip_location_and_atomic_write(tmp_path, monkeypatch):
    monkeypatch.setenv(timing.CACHE_ENV, str(tmp_path / "c"))
    assert timing.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(timing.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert timing.cache_dir() == tmp_path / "xdg" / "graphprune"
    monkeypatch.setenv(timing.CACHE_ENV, str(tmp_path / "c"))
    key = dict(timing.machine_key(2), layer=["MatMul", 768, 3072], sparsity=0.75)
    assert {"cpu", "cores", "onnxruntime", "kernels", "threads"} <= set(key)
    cache = TimingCache()
    assert cache.get(key) is None
    cache.put(key, {"estimates": {"bsr": {"ratio": 3.5}}})
    cache.save()
    other = TimingCache()                             # another process adds its own entry meanwhile
    other.put(dict(key, threads=1), {"x": 1})
    other.save()
    cache.put(dict(key, sparsity=0.5), {"y": 2})      # merges with what is on disk, loses nothing
    cache.save()
    again = TimingCache()
    assert again.get(key) == {"estimates": {"bsr": {"ratio": 3.5}}}
    assert again.get(dict(key, threads=1)) == {"x": 1} and again.get(dict(key, sparsity=0.5)) == {"y": 2}
    assert sorted(os.listdir(tmp_path / "c")) == ["timings.json"]          # no temp file left behind
    (tmp_path / "c" / "timings.json").write_text("{not json")
    broken = TimingCache()
    assert broken.get(key) is None and "unreadable" in broken.note


# ---- compiles: warm cache, replay, no-measure --------------------------------------------------------------------
def _mlp():
    return make_model([helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
                       helper.make_node("Relu", ["h"], ["r"], name="relu"),
                       helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")],
                      [("x", [1, 64])], [("y", [1, 32])], {"W1": rand(64, 128, seed=8), "W2": rand(128, 32, seed=9)})


def _per_layer_timing(factors, seed=0):
    """A measure factory with noise: sparse time = factor[layer] × dense time, each sample × exp(0.1·t₂).
    Every call is recorded."""
    rng = np.random.default_rng(seed)
    calls = []

    def measure(models, feed, threads):
        layer = models["dense"].graph.node[0].name
        calls.append(layer)
        factor = factors.get(layer, 1.0)
        return lambda name: 1e-4 * (1.0 if name == "dense" else factor) * math.exp(0.1 * rng.standard_t(2))
    measure.calls = calls
    return measure


def _compile(model=None, **kw):
    g = Graph(model or _mlp())
    canonicalize(g)
    kw.setdefault("end_to_end", False)
    kw.setdefault("verify_samples", 1)
    return sparsify(g, 0.75, synthetic_feeds(g, 16), "synthetic", **kw)


def test_warm_cache_gives_identical_plan_and_byte_identical_model(tmp_path):
    # fc1 clearly faster sparse; fc2 right at the margin (inconclusive: the calibrated roofline decides)
    first_timing = _per_layer_timing({"fc1": 0.3, "fc2": 1 / 1.1})
    first = _compile(measure=first_timing, cache=TimingCache(tmp_path))
    assert "fc1" in first_timing.calls and "fc2" in first_timing.calls
    assert first.layers[0].how == "measured" and first.layers[0].format == "bsr"
    assert first.layers[1].how == "analytic" and first.layers[1].analytic is not None
    second_timing = _per_layer_timing({"fc1": 5.0, "fc2": 5.0}, seed=1)   # would say dense if it were asked
    second = _compile(measure=second_timing, cache=TimingCache(tmp_path))
    assert second_timing.calls == []                                     # nothing timed, roofline included
    assert [r.how for r in second.layers] == ["cached", "cached"]
    assert [e["format"] for e in second.plan["layers"]] == [e["format"] for e in first.plan["layers"]]
    assert [e["sparse"] for e in second.plan["layers"]] == [e["sparse"] for e in first.plan["layers"]]
    assert second.model.SerializeToString() == first.model.SerializeToString()
    assert "cached: measured 3." in second.layers[0].decision


def test_replay_from_a_sparse_plan_times_nothing_and_writes_the_same_model(tmp_path):
    measured = _compile(measure=_per_layer_timing({"fc1": 0.4, "fc2": 3.0}))
    assert [r.format for r in measured.layers] == ["bsr", "dense"]
    plan_file = tmp_path / "plan.json"
    write_sparse_plan(plan_file, measured.plan)
    saved = json.loads(plan_file.read_text())
    assert [(e["layer"], e["format"], e["block"], e["sparse"], e["decided_by"]) for e in saved["layers"]] == \
        [("fc1", "bsr", [1, 16], True, "measured"), ("fc2", "dense", None, False, "measured")]
    never = _per_layer_timing({})
    replayed = _compile(measure=never, plan_in=load_sparse_plan(plan_file))
    assert never.calls == []
    assert [r.how for r in replayed.layers] == ["replayed", "replayed"]
    assert replayed.layers[0].decision.startswith("bsr (replayed: measured 2.")
    assert replayed.model.SerializeToString() == measured.model.SerializeToString()
    with pytest.raises(SparsifyError, match="sparsity 0.75, not 0.5"):
        g = Graph(_mlp())
        sparsify(g, 0.5, synthetic_feeds(g, 4), plan_in=saved, end_to_end=False)
    saved["layers"][1]["layer"] = "other"
    with pytest.raises(SparsifyError, match="no entry for layer.*fc2.*other not in the model"):
        _compile(plan_in=saved)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SparsifyError, match="not a graphprune sparse plan"):
        load_sparse_plan(tmp_path / "bad.json")


def test_no_measure_makes_no_timing_calls_and_is_reproducible(tmp_path):
    recorder = _per_layer_timing({})
    a = _compile(measure=recorder, no_measure=True, end_to_end=False, cache=TimingCache(tmp_path))
    b = _compile(measure=recorder, no_measure=True, end_to_end=False, cache=TimingCache(tmp_path))
    assert recorder.calls == []
    assert [r.how for r in a.layers] == ["analytic", "analytic"]
    assert all(r.dense_us is None and r.ratio is None and r.analytic is not None for r in a.layers)
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert not (tmp_path / "timings.json").exists()                   # nothing measured, nothing cached


def test_cli_no_measure_plan_out_then_plan_in_writes_the_same_file(tmp_path):
    import onnx
    from click.testing import CliRunner

    from graphprune.cli import main
    model = tmp_path / "mlp.onnx"
    onnx.save(_mlp(), str(model))
    first, second, plan = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "plan.json"
    run = CliRunner().invoke(main, [str(model), "--sparsity", "0.75", "--no-measure", "--sparse-plan-out",
                                    str(plan), "-o", str(first), "--verify-samples", "1"], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    assert "analytic" in run.output and "analytic model (no measurement)" in run.output
    layers = json.loads(plan.read_text())["layers"]
    assert [e["layer"] for e in layers] == ["fc1", "fc2"] and {e["decided_by"] for e in layers} == {"analytic"}
    assert not (timing.cache_dir() / "timings.json").exists()                # nothing was measured
    run = CliRunner().invoke(main, [str(model), "--sparsity", "0.75", "--sparse-plan-in", str(plan), "-o",
                                    str(second), "--verify-samples", "1"], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    assert "replayed" in run.output
    assert first.read_bytes() == second.read_bytes()
