"""Weight-stripped models: keep the structure of a model in git, regenerate its weights from a seed.

``strip_weights`` removes the data of every large floating-point initializer (and of every large float
``Constant``, which it first turns into an initializer); ``refill_weights`` puts deterministic, numerically
tame random values back.  Integer tensors (shape constants, indices, axes) and small tensors always keep
their data, so a stripped model differs from the original only in the values of its float weights.

Refilled values depend only on ``(seed, tensor name)``, never on the order in which tensors are visited, and
they are chosen by how the tensor is consumed so that deep networks neither explode nor vanish:

* weights with two or more dims: ``normal * gain / sqrt(fan_in)`` where ``fan_in`` is the contracted size
  (conv: ``prod(dims[1:])``; ConvTranspose: ``dims[0] * prod(kernel) / prod(strides)``; Gemm ``B``:
  ``dims[1]`` with ``transB=1`` else ``dims[0]``; MatMul second input: ``dims[-2]``, first input:
  ``dims[-1]``; LSTM/GRU/RNN ``W``/``R``: ``dims[-1]``; embedding tables read by ``Gather``: unit normal);
* 1-D tensors: BatchNormalization variance -> ``uniform(0.5, 1.5)``; scale of BatchNormalization,
  LayerNormalization, GroupNormalization, InstanceNormalization, RMS/SimplifiedLayerNormalization, and
  1-D tensors used only as a ``Mul`` factor (decomposed norms, layer scales) -> ``uniform(0.5, 1.5)``;
  every other 1-D tensor (biases, running means, ...) -> ``normal(0, 0.1)``.

Only numpy and onnx are needed.  The corpus helpers at the end (``load_manifest``, ``load_corpus_model``,
``make_inputs``) read ``models/corpus/manifest.json`` written by ``models/build_corpus.py``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STRIPPED_KEY = "graphprune.stripped"
#: Tensors with fewer elements than this keep their data.
MIN_ELEMENTS = 16
#: Floating-point element types whose data is stripped / refilled.
FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}

# Ops a weight may pass through (unchanged values, maybe another dtype/layout) before its real consumer.
_PASS_THROUGH = {"Identity", "Cast", "CastLike", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten",
                 "DequantizeLinear", "Expand"}
# (op_type, input index) of normalisation scales.
_NORM_SCALES = {("BatchNormalization", 1), ("LayerNormalization", 1), ("GroupNormalization", 1),
                ("InstanceNormalization", 1), ("SimplifiedLayerNormalization", 1), ("RMSNormalization", 1),
                ("SkipLayerNormalization", 2), ("SkipSimplifiedLayerNormalization", 2)}


# ---------------------------------------------------------------------------------------------- helpers
def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and, recursively, every subgraph held by a node attribute (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _numel(dims: Iterable[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _is_large_float(t: TensorProto) -> bool:
    return t.data_type in FLOAT_TYPES and _numel(t.dims) >= MIN_ELEMENTS


def _has_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def _clear_data(t: TensorProto) -> None:
    for f in ("raw_data", "float_data", "double_data", "int32_data", "int64_data", "uint64_data",
              "string_data", "external_data"):
        t.ClearField(f)
    t.data_location = TensorProto.DEFAULT


def _get_meta(model: onnx.ModelProto, key: str) -> str | None:
    for p in model.metadata_props:
        if p.key == key:
            return p.value
    return None


def _set_meta(model: onnx.ModelProto, key: str, value: str | None) -> None:
    keep = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    for p in keep:
        model.metadata_props.add(key=p.key, value=p.value)
    if value is not None:
        model.metadata_props.add(key=key, value=value)


def stripped_names(model: onnx.ModelProto) -> list[str]:
    """Names of the initializers whose data ``strip_weights`` removed (empty for a normal model)."""
    raw = _get_meta(model, STRIPPED_KEY)
    return list(json.loads(raw)) if raw else []


def is_stripped(model: onnx.ModelProto) -> bool:
    return _get_meta(model, STRIPPED_KEY) is not None


# ---------------------------------------------------------------------------------------------- strip
def _constants_to_initializers(model: onnx.ModelProto) -> None:
    """Turn ``Constant`` nodes holding large float tensors into initializers of the same graph."""
    for graph in list(_graphs(model.graph)):
        graph_outputs = {o.name for o in graph.output}
        keep = []
        changed = False
        for node in graph.node:
            tensor = None
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1 \
                    and node.output[0] not in graph_outputs and len(node.attribute) == 1:
                attr = node.attribute[0]
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR \
                        and _is_large_float(attr.t) and not _has_external(attr.t):
                    tensor = TensorProto()
                    tensor.CopyFrom(attr.t)
                elif attr.name == "value_floats" and len(attr.floats) >= MIN_ELEMENTS:
                    tensor = numpy_helper.from_array(np.asarray(attr.floats, dtype=np.float32))
            if tensor is None:
                keep.append(node)
                continue
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            if model.ir_version < 4:  # initializers had to be graph inputs before IR v4
                graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
            changed = True
        if changed:
            del graph.node[:]
            graph.node.extend(keep)


def strip_weights(model: onnx.ModelProto | str | os.PathLike, base_dir: str | os.PathLike | None = None,
                  min_elements: int = MIN_ELEMENTS) -> onnx.ModelProto:
    """Return a copy of ``model`` without the data of its large floating-point weights.

    ``model`` may be a path (external data next to it is loaded) or a ModelProto; a ModelProto whose
    tensors live in external data needs ``base_dir``, the folder the data files are relative to.
    Every FLOAT/FLOAT16/DOUBLE initializer with at least ``min_elements`` elements keeps its name, dims
    and data type but loses its values; the names are listed (JSON) in the ``graphprune.stripped``
    metadata entry.  Large float ``Constant`` nodes become initializers first.  Everything else (integer
    tensors, small tensors, opset imports, metadata, doc strings) is kept.
    """
    global MIN_ELEMENTS
    if isinstance(model, (str, os.PathLike)):
        m = onnx.load(os.fspath(model), load_external_data=True)
    else:
        m = onnx.ModelProto()
        m.CopyFrom(model)
    if any(_has_external(t) for g in _graphs(m.graph) for t in g.initializer):
        if base_dir is None:
            raise ValueError("model has tensors in external data: pass the model's path, or base_dir=")
        from onnx.external_data_helper import load_external_data_for_model
        load_external_data_for_model(m, os.fspath(base_dir))

    saved, MIN_ELEMENTS = MIN_ELEMENTS, min_elements
    try:
        _constants_to_initializers(m)
        names = list(stripped_names(m))  # stripping twice keeps the first list
        seen = set(names)
        for graph in _graphs(m.graph):
            for t in graph.initializer:
                if _is_large_float(t):
                    _clear_data(t)
                    if t.name not in seen:
                        seen.add(t.name)
                        names.append(t.name)
    finally:
        MIN_ELEMENTS = saved
    _set_meta(m, STRIPPED_KEY, json.dumps(names))
    return m


# ---------------------------------------------------------------------------------------------- refill
def _rng(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *words]))


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _consumer_map(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for graph in _graphs(model.graph):
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name:
                    uses.setdefault(name, []).append((node, i))
    return uses


def _final_uses(name: str, uses, perm: list[int] | None, depth: int = 0):
    """Consumers of ``name`` after pass-through ops, with the dim permutation applied on the way.

    Yields ``(node, input_index, perm)``: ``perm[i]`` is the original dim that sits at position ``i`` of
    the consumed tensor, or ``None`` when a reshape lost track of the layout.
    """
    for node, idx in uses.get(name, []):
        if node.op_type in _PASS_THROUGH and idx == 0 and depth < 8 and node.output:
            p = perm
            if node.op_type == "Transpose" and p is not None:
                tp = _attr(node, "perm")
                p = list(reversed(p)) if tp is None else [p[j] for j in tp]
            elif node.op_type not in ("Identity", "Cast", "CastLike", "DequantizeLinear"):
                p = None
            yield from _final_uses(node.output[0], uses, p, depth + 1)
        else:
            yield node, idx, perm


def _fan_in(dims: list[int], uses: list) -> tuple[str, float]:
    """('normal', std) for a weight with two or more dims."""
    nd = len(dims)
    default = max(1, _numel(dims[1:]))
    for node, idx, perm in uses:
        op = node.op_type
        if perm is None:
            perm = list(range(nd))

        def d(i):  # size of dim i of the consumed (possibly transposed) tensor
            return dims[perm[i]] if -len(perm) <= i < len(perm) else default

        if op in ("Conv", "QLinearConv", "ConvInteger") and idx == (3 if op == "QLinearConv" else 1):
            return "normal", 1.0 / np.sqrt(max(1, _numel(d(i) for i in range(1, len(perm)))))
        if op == "ConvTranspose" and idx == 1:
            kernel = _numel(d(i) for i in range(2, len(perm)))
            strides = _attr(node, "strides") or [1] * max(0, len(perm) - 2)
            return "normal", 1.0 / np.sqrt(max(1.0, d(0) * kernel / max(1, _numel(strides))))
        if op == "Gemm" and idx in (0, 1) and len(perm) == 2:
            trans = _attr(node, "transB" if idx == 1 else "transA", 0)
            k = (d(1) if trans else d(0)) if idx == 1 else (d(0) if trans else d(1))
            return "normal", 1.0 / np.sqrt(max(1, k))
        if op in ("MatMul", "MatMulInteger", "FusedMatMul") and idx in (0, 1):
            k = d(-2) if (idx == 1 and len(perm) >= 2) else d(-1)
            return "normal", 1.0 / np.sqrt(max(1, k))
        if op in ("LSTM", "GRU", "RNN") and idx in (1, 2):
            return "normal", 1.0 / np.sqrt(max(1, d(-1)))
        if op == "Gather" and idx == 0:
            return "normal", 1.0
    return "normal", 1.0 / np.sqrt(default)


def _one_d_kind(uses: list) -> str:
    """'var', 'scale' or 'bias' for a 1-D tensor."""
    kinds = set()
    for node, idx, _ in uses:
        if node.op_type == "BatchNormalization" and idx == 4:
            kinds.add("var")
        elif (node.op_type, idx) in _NORM_SCALES:
            kinds.add("scale")
        elif node.op_type == "Mul":
            kinds.add("mul")
        elif node.op_type == "Div" and idx == 1:
            kinds.add("var")  # a divisor must stay away from zero
        else:
            kinds.add("bias")
    if "var" in kinds:
        return "var"
    if "scale" in kinds or kinds == {"mul"}:
        return "scale"
    return "bias"


def _values(t: TensorProto, uses: list, seed: int, gain: float) -> np.ndarray:
    dims = [int(x) for x in t.dims]
    rng = _rng(seed, t.name)
    if len(dims) >= 2 and sum(1 for x in dims if x > 1) >= 2:
        _, std = _fan_in(dims, uses)
        vals = rng.standard_normal(dims) * (gain * std)
    else:  # 1-D, or N-D with a single non-trivial dim (e.g. a per-channel scale stored as 1 x C x 1 x 1)
        kind = _one_d_kind(uses)
        if kind in ("var", "scale"):
            vals = rng.uniform(0.5, 1.5, size=dims)
        else:
            vals = rng.normal(0.0, 0.1, size=dims)
    return vals.astype(FLOAT_TYPES[t.data_type])


def refill_weights(model: onnx.ModelProto, seed: int = 0, rerandomize: bool = False,
                   gain: float = 1.0) -> onnx.ModelProto:
    """Return a copy of ``model`` whose stripped initializers hold deterministic random values.

    Values depend only on ``seed`` and each tensor's name.  A model that was not stripped is returned
    unchanged (as a copy) unless ``rerandomize=True``, which refills every float initializer with at least
    16 elements.  The ``graphprune.stripped`` metadata entry is removed: the result is a normal model.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    targets = set(stripped_names(m))
    if not targets and not rerandomize:
        return m
    uses = _consumer_map(m)
    for graph in _graphs(m.graph):
        for t in graph.initializer:
            if t.data_type not in FLOAT_TYPES:
                continue
            if t.name in targets or (rerandomize and _numel(t.dims) >= MIN_ELEMENTS):
                users = list(_final_uses(t.name, uses, list(range(len(t.dims)))))
                arr = _values(t, users, seed, gain)
                _clear_data(t)
                t.raw_data = arr.tobytes()
    _set_meta(m, STRIPPED_KEY, None)
    return m


# ---------------------------------------------------------------------------------------------- corpus
def corpus_dir() -> Path:
    """``models/corpus`` of this checkout (override with the GRAPHPRUNE_CORPUS environment variable)."""
    env = os.environ.get("GRAPHPRUNE_CORPUS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "models" / "corpus"


def load_manifest(directory: str | os.PathLike | None = None) -> dict:
    """The corpus manifest: ``{"models": [...], "failed": [...], ...}``."""
    d = Path(directory) if directory else corpus_dir()
    with open(d / "manifest.json", encoding="utf-8") as f:
        return json.load(f)


def corpus_entries(directory: str | os.PathLike | None = None, exporter: str | None = None) -> list[dict]:
    entries = load_manifest(directory)["models"]
    return [e for e in entries if exporter is None or e["exporter"] == exporter]


def load_corpus_model(name: str, exporter: str = "legacy", seed: int = 0,
                      directory: str | os.PathLike | None = None) -> tuple[onnx.ModelProto, dict]:
    """Load a corpus model with weights refilled from ``seed``; returns ``(model, manifest entry)``."""
    d = Path(directory) if directory else corpus_dir()
    for e in corpus_entries(d):
        if e["name"] == name and e["exporter"] == exporter:
            return refill_weights(onnx.load(str(d / e["file"])), seed=seed), e
    raise KeyError(f"no corpus model {name!r} exported with {exporter!r}")


_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
              "int32": np.int32, "bool": np.bool_, "uint8": np.uint8, "int8": np.int8}


def make_inputs(entry: dict, seed: int = 0, dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Random feeds for a manifest entry; symbolic dims take their value from ``dims`` (default: the
    ``"example"`` size recorded in the manifest, else 1 for batch-like names and 8 otherwise)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in entry["inputs"]:
        shape = []
        for i, s in enumerate(inp["shape"]):
            if isinstance(s, str):
                ex = inp.get("example_shape")
                shape.append((dims or {}).get(s, ex[i] if ex else (1 if "batch" in s else 8)))
            else:
                shape.append(int(s))
        dt = _NP_DTYPES[inp["dtype"]]
        lo, hi = inp.get("low"), inp.get("high")
        if np.issubdtype(dt, np.integer) or dt is np.bool_:
            lo = 0 if lo is None else lo
            hi = 2 if hi is None else hi
            feeds[inp["name"]] = rng.integers(lo, hi, size=shape).astype(dt)  # high is exclusive
        else:
            lo = -1.0 if lo is None else lo
            hi = 1.0 if hi is None else hi
            feeds[inp["name"]] = rng.uniform(lo, hi, size=shape).astype(dt)
    return feeds
