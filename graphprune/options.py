"""Every pruning option in one place: its default, its help text, and its validation.

The CLI builds its click options from these fields and the Python API builds a `PruneOptions` from keyword
arguments, so the two can never disagree on a name, a default or what is accepted. `validate()` runs once, before
any work: a bad value is one `OptionError` naming the option, never a traceback from deep inside a pass.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import GraphpruneError

IMPORTANCE = ("l1", "l2", "random", "bn-scale", "lamp", "hessian", "activation", "fluctuation", "obspa")
SCOPES = ("auto", "uniform", "global", "loss", "sensitivity")
GLOBAL_NORMS = ("mean", "max", "lamp", "none")
PROXIES = ("auto", "synthetic", "bn")
COMPENSATIONS = ("auto", "reconstruct", "none", "obs", "lsq", "bias")
SPARSE_FORMATS = ("auto", "bsr", "csr")
CHANNEL_ORDERS = ("RGB", "BGR")
IMAGE_LAYOUTS = ("auto", "NCHW", "NHWC")
FIDELITY_METRICS = ("auto", "top1", "cosine")
# an image side beyond this is not a model input size but a typo (and a huge resize)
MAX_IMAGE_SIDE = 16384


class OptionError(GraphpruneError):
    """An option has a value graphprune cannot use; the message names the option."""


def _opt(default, help: str, *, cli: str | None = None, choices=None, flag: bool = False, multiple: bool = False,
         metavar: str | None = None, default_factory=None):
    """A dataclass field that carries what the CLI needs to expose it (flag name, help, choices)."""
    meta = {"help": help, "cli": cli, "choices": choices, "flag": flag, "multiple": multiple, "metavar": metavar}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class PruneOptions:
    """What to prune, how to rank and allocate, how to compensate, and how to check the result."""

    # -- how much -------------------------------------------------------------------------------------------
    ratio: float | None = _opt(None, "Fraction of the channels of every prunable group to remove, in [0, 1) "
                                     "[default: 0.5; 0 with --sparsity].")
    target_macs: float | None = _opt(None, "Keep this fraction of the dense MACs, in (0, 1]; overrides --ratio.")
    target_params: float | None = _opt(None, "Keep this fraction of the dense parameters, in (0, 1].")
    # -- ranking and allocation -----------------------------------------------------------------------------
    importance: str = _opt("obspa", "Importance criterion (obspa: structured OBS loss with compensation, from "
                                    "--calib or the data-free proxy).", choices=IMPORTANCE)
    scope: str = _opt("auto", "uniform: the same fraction of every group; global: one ranking of normalised scores "
                              "across groups; loss: one ranking by the output loss after OBS compensation per "
                              "MAC (param) saved, from greedy OBS curves put on the output's scale by end-to-end "
                              "probes (--calib or the data-free proxy); sensitivity: per-group ratios from "
                              "measured output sensitivity (needs a target). auto: with obspa and a MACs/params "
                              "target (or --min-fidelity), loss with --calib and global without; else uniform.", choices=SCOPES)
    global_norm: str = _opt("mean", "Per-group score normalisation for --scope global.", choices=GLOBAL_NORMS)
    max_ratio: float = _opt(0.9, "Never remove more than this fraction of one group (global scope, targets), "
                                 "in (0, 1].")
    round_to: int = _opt(1, "Keep a multiple of N channels per group (N >= 1).")
    min_channels: int = _opt(1, "Keep at least N channels per group (N >= 1).")
    exclude: tuple[str, ...] = _opt(None, "Node-name glob pattern whose channels stay (repeatable).",
                                    multiple=True, default_factory=tuple)
    heads: str = _opt("auto", "Where a reshape or fused attention splits an axis into heads/groups x inner "
                              "channels: whole: remove whole heads/groups; inner: the same inner channels of every "
                              "head/group (the finest units); auto: whole heads where the split feeds attention "
                              "(a product of two activations), inner channels elsewhere (channel shuffle, group "
                              "norm).", choices=("auto", "whole", "inner"))
    whole_heads: bool = _opt(False, "Same as --heads whole.", flag=True)
    # -- data -----------------------------------------------------------------------------------------------
    calib: str | None = _opt(None, "Calibration data: .npz of input feeds (first axis = samples) or a folder of "
                                   ".npy/images.")
    calib_samples: int = _opt(256, "Calibration samples to read (>= 1).")
    holdout: int = _opt(16, "Calibration samples held out for the fidelity check (>= 0).", cli="")
    proxy: str = _opt("auto", "Data-free statistics without --calib: BatchNorm closed form where a norm feeds the "
                              "consumer and synthetic inputs elsewhere (auto), synthetic only, or closed form only.",
                      choices=PROXIES)
    image_size: str | None = _opt(None, "Images of a --calib folder: resize (keeping the aspect ratio) to cover HxW, "
                                        "then center-crop to it, e.g. 224x224 or 224 [default: the model input's "
                                        "static height and width; none if dynamic].", metavar="HxW")
    image_mean: str | None = _opt(None, "Per-channel mean subtracted from images scaled to 0..1, e.g. "
                                        "0.485,0.456,0.406 (one value, or one per channel) [default: 0].")
    image_std: str | None = _opt(None, "Per-channel std dividing images after the mean, e.g. 0.229,0.224,0.225 "
                                       "[default: 1].")
    channel_order: str = _opt("RGB", "Channel order of the image tensor.", choices=CHANNEL_ORDERS)
    image_layout: str = _opt("auto", "Image tensor layout; auto: NHWC when the model input's last dim is 3 or 1 "
                                     "and its second is not, else NCHW.", choices=IMAGE_LAYOUTS)
    sensitivity_samples: int = _opt(32, "Samples per probe of --scope sensitivity (>= 1).")
    # -- compensation ---------------------------------------------------------------------------------------
    compensate: str = _opt("auto", "Weight compensation. reconstruct: after verification, refit every layer "
                                   "downstream of a pruned one, in graph order, to the dense model's layer outputs on "
                                   "--calib (or the synthetic proxy); obs/lsq: independent refit of the consumers on "
                                   "dense statistics; bias: mean shift. auto: reconstruct with --calib; without it obs "
                                   "for obspa, else none.", choices=COMPENSATIONS)
    bn_recalibrate: bool = _opt(False, "After verification, re-estimate BatchNorm running statistics on the --calib "
                                       "data (kept only if the held-out fidelity check improves).", flag=True)
    # -- plans ----------------------------------------------------------------------------------------------
    min_fidelity: float | None = _opt(None, "With --calib: prune as far as the held-out agreement with the dense model "
                                            "stays >= F, in (0, 1], by bisecting the MACs target (overrides "
                                            "--ratio/--target-macs).")
    fidelity_metric: str = _opt("auto", "Agreement for --min-fidelity: top-1 agreement of class scores, or the "
                                        "cosine of the outputs; auto: top1 for outputs of shape [batch, classes], "
                                        "else cosine.", choices=FIDELITY_METRICS)
    dry_run: bool = _opt(False, "Print the plan; write no model.", flag=True)
    plan: object = _opt(None, "A RewritePlan to replay instead of scoring (CLI: --plan-in).", cli="")
    # -- checking -------------------------------------------------------------------------------------------
    verify: bool = _opt(True, "Check the pruned model against the masked original.", cli="")
    verify_samples: int = _opt(2, "Random inputs for the equivalence check (>= 1).")
    input_dims: dict = _opt(None, "Value of a dynamic input dim, NAME=VALUE (repeatable).", cli="",
                            default_factory=dict)
    seed: int = _opt(0, "Seed of every random choice (random criterion, synthetic and verification inputs).")
    strict: bool = _opt(False, "Fail if any channel group is frozen by a missing or failing rule.", flag=True)
    # -- sparse kernels -------------------------------------------------------------------------------------
    sparsity: float | None = _opt(None, "Block sparsity in (0, 1), e.g. 0.75: replace MatMul/Gemm/Conv layers by "
                                        "ai.graphprune sparse ops (after any channel pruning) where faster.")
    sparse_format: str = _opt("auto", "bsr: 1x16 blocks (Conv: 4 output channels); csr: unstructured "
                                      "(MatMul/Gemm); auto: bsr, csr at >= 85 % where faster.",
                              choices=SPARSE_FORMATS)
    sparse_force: bool = _opt(False, "Emit every eligible layer sparse, even where slower or without the native "
                                     "kernel library.", flag=True)
    sparse_threads: int | None = _opt(None, "Intra-op threads for the sparse timings [default: onnxruntime's].")
    # (timing branch: reproducible sparse decisions; passed straight through to passes/sparsify.py)
    sparse_plan_out: str | None = _opt(None, "Save the per-layer sparse decisions (layer, format, block, sparse or "
                                             "dense, how decided) as JSON.")
    sparse_plan_in: str | None = _opt(None, "Replay the per-layer sparse decisions of a saved sparse plan instead "
                                            "of timing.")
    sparse_no_measure: bool = _opt(False, "Decide sparse vs dense by the analytic (roofline) model alone: no "
                                          "timing, for CI and pipelines.", cli="--no-measure", flag=True)

    # ---- derived settings ---------------------------------------------------------------------------------
    @property
    def effective_ratio(self) -> float:
        if self.ratio is not None:
            return self.ratio
        return 0.0 if self.sparsity is not None else 0.5

    @property
    def target(self) -> tuple[str, float] | None:
        """('macs' | 'params', fraction to keep), or None when pruning by ratio."""
        if self.target_macs is not None:
            return "macs", self.target_macs
        if self.target_params is not None:
            return "params", self.target_params
        return None

    @property
    def head_mode(self) -> str:
        """How head splits are pruned: --whole-heads forces 'whole', else --heads (default 'auto': whole heads where
        the split feeds attention. MiniLM, 1.5x fewer MACs with --calib: embedding cosine 0.918 with inner
        channels, 0.939 with whole heads; 2x: 0.852 -> 0.882; data-free 0.649 -> 0.676)."""
        return "whole" if self.whole_heads else self.heads

    @property
    def allocation_scope(self) -> str:
        """The scope 'auto' resolves to, with a budget (MACs/params target or --min-fidelity) and obspa:
        with calibration data the compensation-aware 'loss' allocation (1.5x fewer MACs, % of dense: MiniLM
        cosine 0.817 uniform -> 0.918; OCR exact match 99.5 -> 99.7); data-free 'global' (OCR 68.0 -> 95.3,
        MiniLM cosine 0.35 -> 0.65; digits 99.6 -> 99.1 and MNIST 99.9 -> 99.6 lose a little), because the loss
        allocation's end-to-end probes on synthetic inputs mislead (OCR: 5.3 %). With a plain ratio, or another
        criterion, 'uniform': --ratio means a fraction of every group (a global ranking per channel would trade
        speed away: MNIST at ratio 0.5 kept 0.69 of the MACs instead of 0.26)."""
        if self.scope != "auto":
            return self.scope
        budget = self.target is not None or self.min_fidelity is not None
        if not (budget and self.importance == "obspa" and self.plan is None):
            return "uniform"
        return "loss" if self.calib is not None else "global"

    @property
    def reconstruct(self) -> bool:
        """Whether the sequential reconstruction stage runs: compensate 'reconstruct', or 'auto' with calibration
        data. Data-free, auto keeps the dense-statistics compensation: reconstruction on the synthetic proxy was
        measured harmful on EfficientNet-Lite0 (1.5x top-5 agreement 11.7 % with obs, 0.0 % reconstructed) and
        no better on MiniLM (cosine 71.7 obs vs 70.5), though it helps the digits CNN (benchmarks/results/
        fidelity.md); compensate='reconstruct' asks for it explicitly."""
        if self.compensate == "auto":
            return self.calib is not None
        return self.compensate == "reconstruct"

    @property
    def compensation(self) -> str:
        """The compensation applied with the rewrite: with reconstruction, obspa's own OBS updates (its ΔL assumed
        them) or none, then the reconstruct stage refits; otherwise auto resolves to obs for obspa; lsq is the
        same refit as obs."""
        if self.reconstruct:
            return "obs" if self.importance == "obspa" and self.plan is None else "none"
        method = ("obs" if self.importance == "obspa" else "none") if self.compensate == "auto" else self.compensate
        return "obs" if method == "lsq" else method

    @property
    def image_preprocessing(self) -> dict:
        """{size: (H, W) | None, mean: tuple, std: tuple, order, layout} for feeds.load_feeds; parsing is the
        validation, so a bad value is an OptionError naming the option."""
        return {"size": _parse_size(self.image_size), "mean": _parse_floats("image_mean", self.image_mean, 0.0),
                "std": _parse_floats("image_std", self.image_std, 1.0, positive=True),
                "order": self.channel_order, "layout": self.image_layout}

    def replace(self, **changes) -> PruneOptions:
        return dataclasses.replace(self, **changes).validate()

    def settings(self) -> dict:
        """The options a plan records, so a replay can say how it was made."""
        return {"ratio": self.effective_ratio, "importance": self.importance, "round_to": self.round_to,
                "min_channels": self.min_channels, "exclude": list(self.exclude), "seed": self.seed,
                "heads": self.head_mode, "scope": self.allocation_scope, "target_macs": self.target_macs,
                "target_params": self.target_params, "compensate": self.compensate,
                "calib": str(self.calib) if self.calib is not None else None}

    # ---- validation -----------------------------------------------------------------------------------------
    def validate(self) -> PruneOptions:
        """Check every value once; returns self so `PruneOptions(...).validate()` chains."""
        _number("ratio", self.ratio, lo=0.0, hi=1.0, hi_open=True, optional=True)
        _number("target_macs", self.target_macs, lo=0.0, hi=1.0, lo_open=True, optional=True)
        _number("target_params", self.target_params, lo=0.0, hi=1.0, lo_open=True, optional=True)
        if self.target_macs is not None and self.target_params is not None:
            raise OptionError("give target_macs or target_params, not both")
        _number("max_ratio", self.max_ratio, lo=0.0, hi=1.0, lo_open=True)
        _number("sparsity", self.sparsity, lo=0.0, hi=1.0, lo_open=True, hi_open=True, optional=True)
        for name in ("round_to", "min_channels", "calib_samples", "verify_samples", "sensitivity_samples"):
            _integer(name, getattr(self, name), lo=1)
        _integer("holdout", self.holdout, lo=0)
        _integer("seed", self.seed, lo=0)
        _integer("sparse_threads", self.sparse_threads, lo=1, optional=True)
        for name in ("importance", "scope", "global_norm", "proxy", "compensate", "sparse_format", "channel_order",
                     "image_layout", "fidelity_metric"):
            choices = _FIELDS[name].metadata["choices"]
            value = getattr(self, name)
            if value not in choices:
                raise OptionError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        if not isinstance(self.exclude, tuple) or not all(isinstance(p, str) for p in self.exclude):
            raise OptionError("exclude must be a sequence of node-name patterns")
        if not isinstance(self.input_dims, dict):
            raise OptionError("input_dims must be a dict of dim name -> positive integer")
        for name, value in self.input_dims.items():
            if not isinstance(name, str) or not name:
                raise OptionError(f"input_dims: dim names must be non-empty strings, got {name!r}")
            _integer(f"input_dims[{name!r}]", value, lo=1, hi=1 << 20)
        _ = self.image_preprocessing  # parsing is the check of image_size, image_mean, image_std
        _number("min_fidelity", self.min_fidelity, lo=0.0, hi=1.0, lo_open=True, optional=True)
        if self.min_fidelity is not None:
            if self.calib is None:
                raise OptionError("min_fidelity needs calibration data (calib=...): agreement is measured on "
                                  "held-out samples")
            if self.holdout < 1:
                raise OptionError("min_fidelity needs held-out samples (holdout >= 1)")
            if self.plan is not None or self.dry_run or self.sparsity is not None or self.target_params is not None:
                raise OptionError("min_fidelity chooses the MACs target itself: it cannot be combined with a "
                                  "replayed plan, dry_run, sparsity or target_params")
        if self.bn_recalibrate and self.calib is None:
            raise OptionError("bn_recalibrate needs calibration data (calib=...)")
        if self.scope == "sensitivity" and self.plan is None and self.target is None and self.min_fidelity is None:
            raise OptionError("scope 'sensitivity' allocates to a budget: give target_macs or target_params")
        if self.plan is not None:
            from .plan import RewritePlan
            if not isinstance(self.plan, RewritePlan):
                raise OptionError(f"plan must be a RewritePlan, got {type(self.plan).__name__}")
        return self

    @classmethod
    def from_kwargs(cls, **kwargs) -> PruneOptions:
        """The API's keyword arguments -> validated options; unknown names are an OptionError, not a TypeError."""
        unknown = sorted(set(kwargs) - set(_FIELDS))
        if unknown:
            raise OptionError(f"unknown option(s): {', '.join(unknown)}")
        if kwargs.get("exclude") is not None:
            exclude = kwargs["exclude"]
            kwargs["exclude"] = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        else:
            kwargs.pop("exclude", None)
        if kwargs.get("input_dims") is None:
            kwargs.pop("input_dims", None)
        if isinstance(kwargs.get("calib"), Path):
            kwargs["calib"] = str(kwargs["calib"])
        return cls(**kwargs).validate()


_FIELDS = {f.name: f for f in dataclasses.fields(PruneOptions)}


def option_fields():
    """The dataclass fields, in declaration order, for front ends that expose them."""
    return dataclasses.fields(PruneOptions)


def parse_dim(item: str) -> tuple[str, int]:
    """'NAME=VALUE' -> (NAME, VALUE) with VALUE a positive ASCII integer."""
    name, sep, value = item.partition("=")
    if not sep or not name or not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise OptionError(f"--dim expects NAME=VALUE with a positive integer, got {item!r}")
    return name, int(value)


def _parse_size(value) -> tuple[int, int] | None:
    """'224x224', '224,192', '224' or (H, W) / H -> (H, W)."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.lower().replace("x", ",").split(",")
        if not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
            raise OptionError(f"image_size must be HxW or N with positive integers, got {value!r}")
        value = [int(p) for p in parts]
    elif isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or len(value) not in (1, 2):
        raise OptionError(f"image_size must be HxW or N with positive integers, got {value!r}")
    for v in value:
        _integer("image_size", v, lo=1, hi=MAX_IMAGE_SIDE)
    return (int(value[0]), int(value[-1]))


def _parse_floats(name, value, default: float, positive: bool = False) -> tuple[float, ...]:
    """'0.485,0.456,0.406' or a sequence -> a tuple of 1 or 3 finite numbers (std: positive)."""
    if value is None:
        return (default,)
    if isinstance(value, str):
        try:
            value = [float(p) for p in value.split(",")]
        except ValueError:
            raise OptionError(f"{name} must be comma-separated numbers, got {value!r}") from None
    elif _is_number(value):
        value = [value]
    if not isinstance(value, (list, tuple)) or len(value) not in (1, 3) or not all(_is_number(v) for v in value):
        raise OptionError(f"{name} must be one number or one per channel (3), got {value!r}")
    if positive and any(v <= 0 for v in value):
        raise OptionError(f"{name} must be positive, got {value!r}")
    return tuple(float(v) for v in value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(name, value, lo, hi, lo_open=False, hi_open=False, optional=False) -> None:
    if value is None and optional:
        return
    if not _is_number(value):
        raise OptionError(f"{name} must be a finite number, got {value!r}")
    if (value < lo or (lo_open and value == lo)) or (value > hi or (hi_open and value == hi)):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise OptionError(f"{name} must be in {interval}, got {value}")


def _integer(name, value, lo, hi=None, optional=False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise OptionError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise OptionError(f"{name} must be {bound}, got {value}")
