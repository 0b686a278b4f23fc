"""graphprune's one timing engine: paired, interleaved timing with a confidence interval on the speed ratio,
a decision only where the interval clears the margin, an analytic roofline for the rest, and a persistent cache.

Why. A compiler whose output depends on one unlucky sample cannot sit in an export pipeline: on a shared
machine a single timing of a layer that is 3x faster can say 0.9x. So:

1. Paired samples. `compare` times the baseline and each candidate in rounds, taking turns (A, B, A, B, ...;
   the order rotates every round), so a burst of load hits both members of a pair. Each round gives one
   log ratio log(t_baseline / t_candidate) per candidate. A sample (SessionBench) is the fastest of a few
   back-to-back calls: load only ever adds time, so the minimum drops the preempted calls.
2. A distribution-free interval. The decision statistic is the median of the paired log ratios; its confidence
   interval comes from the sign test (order statistics x_(k) .. x_(n+1-k) with k the largest rank such that
   P(Binomial(n, 1/2) <= k - 1) <= alpha / 2). It assumes nothing about the noise but independence of rounds:
   heavy tails and occasional 5x stalls move at most a few order statistics, never the interval's coverage.
   If baseline and candidate noise are alike (same machine, interleaved), the median log ratio is the log of
   the true ratio.
3. Sequential looks with a corrected alpha. The interval is checked after LOOKS rounds (a fixed schedule);
   each look spends alpha / len(LOOKS) (Bonferroni), so stopping early when the interval clears the margin
   does not inflate the error rate above alpha overall. Also stops at a time cap, and early when the
   margin sits so close to the median that even the last look would not clear it (`_futile`).
4. `decide`: sparse when the lower bound > margin, dense when the upper bound < margin, and otherwise
   (inconclusive) the analytic estimate decides: a roofline (bytes moved / bandwidth vs MACs / throughput)
   whose constants are measured once per machine and cached, so it never depends on one sample.
5. `TimingCache`: measurements and the roofline keyed by machine, onnxruntime version, kernel library hash and
   configuration, in $GRAPHPRUNE_CACHE_DIR or $XDG_CACHE_HOME/graphprune (default ~/.cache/graphprune),
   timings.json, written atomically. Same cache => same decisions => byte-identical output.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import GraphpruneError

CACHE_ENV = "GRAPHPRUNE_CACHE_DIR"
CACHE_FILE = "timings.json"
CACHE_FORMAT = 1
MARGIN = 1.1                 # a sparse layer must be at least this much faster to be emitted
ALPHA = 0.01                 # two-sided error rate of one decision's interval, over all looks together
LOOKS = (12, 24, 48, 96)     # rounds after which the interval is checked
TIME_CAP_S = 3.0             # stop looking after this long per comparison (the last look still counts)
TIGHT = 1.03                 # stop when hi/lo of the ratio interval is below this (more rounds won't clear it)
WARMUP = 2                   # untimed calls per variant before the first round
ROUND_SECONDS = 0.002        # each sample repeats the call for at least this long (timer resolution, noise)


class TimingError(GraphpruneError):
    """The timing cache or a sparse plan cannot be used."""


# ---- statistics ---------------------------------------------------------------------------------------------
def _binom_cdf_half(k: int, n: int) -> float:
    """P(Binomial(n, 1/2) <= k)."""
    if k < 0:
        return 0.0
    return sum(math.comb(n, i) for i in range(min(k, n) + 1)) / 2.0 ** n


def sign_test_rank(n: int, alpha: float) -> int:
    """The largest k >= 1 with P(Bin(n, 1/2) <= k - 1) <= alpha / 2, or 0 if none (too few samples for any
    interval at this level). [x_(k), x_(n+1-k)] of n sorted samples then covers the median with probability
    >= 1 - alpha whatever the distribution."""
    k = 0
    while k + 1 <= n // 2 and _binom_cdf_half(k, n) <= alpha / 2:
        k += 1
    return k


def median_interval(values, alpha: float) -> tuple[float, float, float]:
    """(median, lower, upper) of `values` with the sign-test interval at level 1 - alpha; (median, -inf, inf)
    when there are too few values."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    med = float(np.median(x))
    k = sign_test_rank(len(x), alpha)
    if k == 0:
        return med, -math.inf, math.inf
    return med, float(x[k - 1]), float(x[len(x) - k])


@dataclass
class RatioEstimate:
    """Speed ratio baseline time / candidate time (> 1: the candidate is faster) from paired rounds."""
    ratio: float
    lo: float
    hi: float
    rounds: int
    baseline_s: float            # median seconds per call
    candidate_s: float

    def clears(self, margin: float) -> bool | None:
        """True: faster by the margin; False: not; None: the interval contains the margin."""
        if self.lo > margin:
            return True
        if self.hi < margin:
            return False
        return None

    def describe(self) -> str:
        return f"{self.ratio:.2f}× [{self.lo:.2f}, {self.hi:.2f}], {self.rounds} rounds"


def compare(sample, baseline: str, candidates: list[str], margin: float = MARGIN, alpha: float = ALPHA,
            looks=LOOKS, time_cap_s: float = TIME_CAP_S, warmup: int = WARMUP,
            clock=time.perf_counter) -> dict[str, RatioEstimate]:
    """Paired interleaved timing of `baseline` against each candidate. `sample(name)` returns one timing
    (seconds per call) of the variant `name`. Stops at the first look where every candidate's interval clears
    the margin or is tight, at the last look, or after the time cap."""
    names = [baseline] + list(candidates)
    for name in names:
        for _ in range(warmup):
            sample(name)
    times = {name: [] for name in names}
    per_look = alpha / len(looks)
    start = clock()
    result: dict[str, RatioEstimate] = {}
    rounds = 0
    for look in looks:
        while rounds < look:
            shift = rounds % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(float(sample(name)))
            rounds += 1
        result = {}
        for c in candidates:
            logs = np.log(np.asarray(times[baseline])) - np.log(np.asarray(times[c]))
            med, lo, hi = median_interval(logs, per_look)
            result[c] = RatioEstimate(math.exp(med), math.exp(lo), math.exp(hi), rounds,
                                      float(np.median(times[baseline])), float(np.median(times[c])))
        settled = all(r.clears(margin) is not None or r.hi / r.lo < TIGHT
                      or (len(looks) > 1 and rounds >= looks[-2] and _futile(r, margin, looks[-1]))
                      for r in result.values())
        if settled or clock() - start > time_cap_s:
            break
    return result


def _futile(r: RatioEstimate, margin: float, last_look: int) -> bool:
    """Would the interval still contain the margin at the last look? Its half-width (in log space) shrinks
    about as 1/sqrt(rounds); if the margin lies within the half-width predicted for the last look around the
    current median, more rounds are unlikely to decide, so stop (the analytic model decides). Asked only from
    the second-to-last look on: with few rounds the sign-test interval spans extreme order statistics and the
    1/sqrt scaling is too optimistic. This only ever ends a comparison as inconclusive, never conclusive."""
    if not (math.isfinite(r.lo) and math.isfinite(r.hi)) or r.rounds >= last_look:
        return False
    predicted = 0.5 * (math.log(r.hi) - math.log(r.lo)) * math.sqrt(r.rounds / last_look)
    return abs(math.log(r.ratio) - math.log(margin)) < predicted


def median_times(sample, names: list[str], rounds: int = 15, warmup: int = WARMUP,
                 quantile: float = 0.5) -> dict[str, float]:
    """A quantile (default the median) of seconds per call of each variant over interleaved rounds. The roofline
    calibration takes a low quantile: load on a shared machine only ever adds time, so the fast end of the
    distribution is the stable estimate of what the hardware does."""
    for name in names:
        for _ in range(warmup):
            sample(name)
    times = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(float(sample(name)))
    return {name: float(np.quantile(v, quantile)) for name, v in times.items()}


# ---- onnxruntime sessions -----------------------------------------------------------------------------------
class SessionBench:
    """`sample(name)` over onnxruntime sessions of several models fed the same input. One sample runs the model
    `reps` times (about ROUND_SECONDS in all; fixed per model after a warm-up, so every sample is the same work)
    and returns the fastest of those calls. On a shared machine, load only ever adds time: a preempted call is
    slower, never faster. The minimum of a few back-to-back calls drops the calls that were preempted, and the
    paired log ratios of minima are far less noisy than those of sums, with the same centre when both models
    see the same load."""

    def __init__(self, models: dict, feed: dict, threads: int | None, native: bool = True):
        from .runtime import session
        self.feed = feed
        self.sessions = {k: session(m, optimize=True, threads=threads, custom_ops=native, name=f"{k} timing model")
                         for k, m in models.items()}
        self.reps = {}
        for k, s in self.sessions.items():
            s.run(None, feed)
            t0 = time.perf_counter()
            s.run(None, feed)
            self.reps[k] = max(3, int(ROUND_SECONDS / max(time.perf_counter() - t0, 1e-7)))

    def __call__(self, name: str) -> float:
        s, feed = self.sessions[name], self.feed
        best = math.inf
        for _ in range(self.reps[name]):
            t0 = time.perf_counter()
            s.run(None, feed)
            best = min(best, time.perf_counter() - t0)
        return best


# ---- analytic model -----------------------------------------------------------------------------------------
# Kernel classes with their own sparse throughput. Dense throughput is measured on the same shapes.
KINDS = ("bsr_matmul", "csr_matmul", "conv1x1", "convkxk")


@dataclass
class Work:
    """What one layer call moves and computes (float32), dense and sparse."""
    kind: str                  # one of KINDS
    macs: float                # dense multiply-adds
    kept_macs: float           # multiply-adds the sparse kernel does
    dense_bytes: float         # weights + activations in and out
    sparse_bytes: float        # packed values + indices + activations in and out


@dataclass
class Roofline:
    """Per-call time = overhead + max(bytes / bandwidth, MACs / throughput), dense and sparse alike, with a
    sparse throughput per kernel class. Calibrated once per machine (sparse_cost.calibrate_roofline)."""
    bandwidth: float                                   # bytes per second, a dense GEMV streaming its weights
    overhead_s: float                                  # per node call
    dense_macs: dict = field(default_factory=dict)     # kind -> multiply-adds per second, onnxruntime dense
    sparse_macs: dict = field(default_factory=dict)    # kind -> multiply-adds per second, ai.graphprune op
    source: str = "default"                            # 'default' or 'calibrated'

    def dense_s(self, w: Work) -> float:
        return self.overhead_s + max(w.dense_bytes / self.bandwidth, w.macs / self.dense_macs[w.kind])

    def sparse_s(self, w: Work) -> float:
        return self.overhead_s + max(w.sparse_bytes / self.bandwidth, w.kept_macs / self.sparse_macs[w.kind])

    def ratio(self, w: Work) -> float:
        return self.dense_s(w) / self.sparse_s(w)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Roofline:
        return cls(float(d["bandwidth"]), float(d["overhead_s"]), dict(d["dense_macs"]), dict(d["sparse_macs"]),
                   d.get("source", "calibrated"))


# Used only without a calibration (--no-measure on a machine that never calibrated): the medians of the
# project's 2-core AVX2 benchmark machine (benchmarks/results/sparse.md, sparse_conv_rerun.md): the BERT FFN
# 768x3072 GEMV at ~350 us => ~27 GB/s; 1x1 conv 128->256 @14x14 dense ~105 us => ~60 GMAC/s, sparse 75 %
# ~67 us => ~24 GMAC/s kept; 3x3 conv at 50 % 0.78x of dense => sparse ~0.39 of dense throughput.
DEFAULT_ROOFLINE = Roofline(
    bandwidth=25e9, overhead_s=5e-6,
    dense_macs={"bsr_matmul": 45e9, "csr_matmul": 45e9, "conv1x1": 55e9, "convkxk": 55e9},
    sparse_macs={"bsr_matmul": 30e9, "csr_matmul": 8e9, "conv1x1": 24e9, "convkxk": 21e9},
    source="default")


# ---- decisions --------------------------------------------------------------------------------------------------
@dataclass
class Decision:
    sparse: bool
    how: str                         # 'measured', 'analytic', 'cached', 'replayed', 'forced', 'no library'
    measured: RatioEstimate | None = None
    analytic: float | None = None    # roofline ratio, when it decided or was consulted
    margin: float = MARGIN

    def reason(self) -> str:
        parts = []
        if self.measured is not None:
            m = self.measured
            verdict = " inconclusive" if m.clears(self.margin) is None else ""
            parts.append(f"measured {m.describe()}{verdict}")
        if self.analytic is not None:
            parts.append(f"analytic {self.analytic:.2f}×")
        return "; ".join(parts)


def decide(measured: RatioEstimate | None, analytic, margin: float = MARGIN) -> Decision:
    """The rule: a measurement decides only when its interval clears the margin; otherwise the analytic ratio
    (`analytic`: a number, or a function returning one, called only when needed) decides."""
    if measured is not None:
        verdict = measured.clears(margin)
        if verdict is not None:
            return Decision(verdict, "measured", measured, margin=margin)
    ratio = analytic() if callable(analytic) else analytic
    return Decision(ratio >= margin, "analytic", measured, ratio, margin)


# ---- machine identity and the cache ---------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_LIB_HASH: dict = {}


def kernel_library_hash() -> str:
    """sha256 (first 16 hex) of the native kernel library in use, or 'none'."""
    from graphprune import kernels
    path = kernels.library_path()
    if path is None:
        return "none"
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _LIB_HASH:
        _LIB_HASH[key] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    return _LIB_HASH[key]


def machine_key(threads: int | None) -> dict:
    import onnxruntime as ort
    return {"cpu": cpu_model(), "cores": os.cpu_count() or 0, "onnxruntime": ort.__version__,
            "kernels": kernel_library_hash(), "threads": threads or 0}


def cache_dir() -> Path:
    """$GRAPHPRUNE_CACHE_DIR, else $XDG_CACHE_HOME/graphprune, else ~/.cache/graphprune."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "graphprune"


def key_string(key: dict) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


class TimingCache:
    """timings.json: {"format": 1, "entries": {canonical JSON key: entry}}. Reads tolerate a missing or corrupt
    file (treated as empty, with a note); writes merge with what is on disk and replace it atomically."""

    def __init__(self, directory: str | Path | None = None, enabled: bool = True):
        self.dir = Path(directory) if directory is not None else cache_dir()
        self.path = self.dir / CACHE_FILE
        self.enabled = enabled
        self.note = None
        self.entries = self._read() if enabled else {}
        self.dirty = {}

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            self.note = f"timing cache {self.path} unreadable ({type(exc).__name__}); measuring afresh"
            return {}
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
            self.note = f"timing cache {self.path} has another format; measuring afresh"
            return {}
        return data["entries"]

    def get(self, key: dict):
        return self.entries.get(key_string(key)) if self.enabled else None

    def put(self, key: dict, entry) -> None:
        if self.enabled:
            self.entries[key_string(key)] = entry
            self.dirty[key_string(key)] = entry

    def save(self) -> None:
        """Merge the new entries into the file on disk (another process may have added some) and replace it:
        a unique temp file in the same folder, opened with O_EXCL, then os.replace (atomic on POSIX)."""
        if not self.enabled or not self.dirty:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        on_disk = self._read()
        on_disk.update(self.dirty)
        text = json.dumps({"format": CACHE_FORMAT, "entries": on_disk}, sort_keys=True, indent=1)
        tmp = self.dir / f".{CACHE_FILE}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.entries = on_disk
        self.dirty = {}


def estimate_to_json(m: RatioEstimate | None) -> dict | None:
    return None if m is None else asdict(m)


def estimate_from_json(d) -> RatioEstimate | None:
    return None if d is None else RatioEstimate(**{k: float(v) if k != "rounds" else int(v) for k, v in d.items()})
