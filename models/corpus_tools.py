"""Corpus tools (not part of the installed package; tests, models/build_corpus.py and the benchmarks import it
from the checkout). Weight-stripped models: keep the structure of a model in git, regenerate its weights from a seed.

``strip_weights`` removes the data of every large floating-point initializer (and of every large float
``Constant``, which it first turns into an initializer); ``refill_weights`` puts deterministic, numerically
tame random values back.  Integer tensors (shape constants, indices, axes) and small tensors always keep
their data, so a stripped model differs from the original only in the values of its float weights.

Refilled values depend only on ``(seed, tensor name)``, never on the order in which tensors are visited, and
they are chosen by how the tensor is consumed so that deep networks neither explode nor vanish:

* weights with two or more dims: ``normal * gain / sqrt(fan_in)`` where ``fan_in`` is the contracted size
  (conv: ``prod(dims[1:])``; ConvTranspose: ``dims[0] * prod(kernel) / prod(strides)``; Gemm ``B``:
  ``dims[1]`` with ``transB=1`` else ``dims[0]``; MatMul second input: ``dims[-2]``, first input:
  ``dims[-1]``; LSTM/GRU/RNN ``W``/``R``: ``dims[-1]``; embedding tables read only by ``Gather``: unit
  normal).  ``gain`` is the caller's ``gain`` (default 1) times

  - an activation gain for the op's data input, found by walking up through layout/pooling ops: ReLU and
    ReLU6 ``sqrt(2)``, LeakyReLU ``sqrt(2/(1+a^2))``, SiLU/HardSwish/GELU (fused or decomposed) ``1.7``,
    a sigmoid gate ``x * sigmoid(s)`` (SE, GLU) twice the gain of ``x``; otherwise 1;
  - a residual damping ``1/n`` when the op's output (through bias adds, BN, activations, layout ops, each
    read once) is one of ``n`` computed terms of a sum: residual branches get 0.5, RepVGG/MobileOne-style
    multi-branch sums 1/3 .. 1/6.  Without it the stream's variance doubles at every residual block.

  Random-init exports have no information about activation scales (the dynamo exporter even drops the
  zero conv biases a BN fold produces), so these rules are what keeps 100-layer graphs near unit scale;
  on the corpus the refilled outputs have standard deviations between ~0.01 and ~30;
* 1-D tensors: BatchNormalization variance -> ``uniform(0.5, 1.5)``; scale of BatchNormalization,
  LayerNormalization, GroupNormalization, InstanceNormalization, RMS/SimplifiedLayerNormalization, and
  1-D tensors used only as a ``Mul`` factor (decomposed norms, layer scales) -> ``uniform(0.5, 1.5)``;
  every other 1-D tensor (biases, running means, ...) -> ``normal(0, 0.1)``.

Only numpy and onnx are needed.  The corpus helpers at the end (``load_manifest``, ``load_corpus_model``,
``make_inputs``) read ``models/corpus/manifest.json`` written by ``models/build_corpus.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

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


def _is_large_float(t: TensorProto, min_elements: int = MIN_ELEMENTS) -> bool:
    return t.data_type in FLOAT_TYPES and _numel(t.dims) >= min_elements


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
def _constants_to_initializers(model: onnx.ModelProto, min_elements: int = MIN_ELEMENTS) -> None:
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
                        and _is_large_float(attr.t, min_elements) and not _has_external(attr.t):
                    tensor = TensorProto()
                    tensor.CopyFrom(attr.t)
                elif attr.name == "value_floats" and len(attr.floats) >= min_elements:
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

    _constants_to_initializers(m, min_elements)
    names = list(stripped_names(m))  # stripping a stripped model keeps the earlier names
    seen = set(names)
    for graph in _graphs(m.graph):
        for t in graph.initializer:
            if _is_large_float(t, min_elements):
                _clear_data(t)
                if t.name not in seen:
                    seen.add(t.name)
                    names.append(t.name)
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


def _fan_in(dims: list[int], uses: list):
    """``(1/sqrt(fan_in), node, data_input_index)`` for a weight read by a contracting op (conv, matmul,
    ...), where ``data_input_index`` is the node's activation input; ``None`` for any other weight."""
    nd = len(dims)
    # Contracting uses first: a tied embedding is both a Gather table and the LM head's MatMul weight.
    uses = sorted(uses, key=lambda u: u[0].op_type == "Gather")
    for node, idx, perm in uses:
        op = node.op_type
        if perm is None:
            perm = list(range(nd))

        def d(i, perm=perm):  # size of dim i of the consumed (possibly transposed) tensor
            return dims[perm[i]] if -len(perm) <= i < len(perm) else 1

        if op in ("Conv", "QLinearConv", "ConvInteger") and idx == (3 if op == "QLinearConv" else 1):
            return 1.0 / np.sqrt(max(1, _numel(d(i) for i in range(1, len(perm))))), node, 0
        if op == "ConvTranspose" and idx == 1:
            kernel = _numel(d(i) for i in range(2, len(perm)))
            strides = _attr(node, "strides") or [1] * max(0, len(perm) - 2)
            return 1.0 / np.sqrt(max(1.0, d(0) * kernel / max(1, _numel(strides)))), node, 0
        if op == "Gemm" and idx in (0, 1) and len(perm) == 2:
            trans = _attr(node, "transB" if idx == 1 else "transA", 0)
            k = (d(1) if trans else d(0)) if idx == 1 else (d(0) if trans else d(1))
            return 1.0 / np.sqrt(max(1, k)), node, 1 - idx
        if op in ("MatMul", "MatMulInteger", "FusedMatMul") and idx in (0, 1):
            k = d(-2) if (idx == 1 and len(perm) >= 2) else d(-1)
            return 1.0 / np.sqrt(max(1, k)), node, 1 - idx
        if op in ("LSTM", "GRU", "RNN") and idx in (1, 2):
            return 1.0 / np.sqrt(max(1, d(-1))), None, 0
        if op == "Gather" and idx == 0:
            return 1.0, None, 0  # embedding table: unit-variance rows
    return None


_SQRT2 = float(np.sqrt(2.0))
# Ops that move, pool or select values without changing their distribution much (activation-gain lookup).
_GAIN_TRANSPARENT = {"Identity", "Cast", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool",
                     "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "Pad",
                     "Resize", "Upsample", "Slice", "Split", "Concat", "DepthToSpace", "SpaceToDepth", "Dropout",
                     "Expand", "Tile", "Gather"}
# Ops between a weighted op and a residual Add that keep the branch a branch (bias, norm, layout, constant
# scale or sigmoid gate, activation).
_BRANCH_TRANSPARENT = {"Identity", "Cast", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
                       "BatchNormalization", "Dropout", "Add", "Mul", "Slice", "Split", "Concat", "Relu",
                       "LeakyRelu", "Clip", "HardSwish", "Gelu", "Elu", "Selu", "Mish", "Tanh"}


class _Graph:
    """Producers, consumers and constant names over all (sub)graphs, for the gain rules."""

    def __init__(self, model: onnx.ModelProto, uses):
        self.uses = uses
        self.producer: dict[str, onnx.NodeProto] = {}
        self.const: set[str] = set()
        for g in _graphs(model.graph):
            self.const.update(t.name for t in g.initializer)
            for n in g.node:
                for o in n.output:
                    self.producer[o] = n
                if n.op_type == "Constant":
                    self.const.update(n.output)

    def is_const(self, name: str, depth: int = 0) -> bool:
        if name in self.const:
            return True
        n = self.producer.get(name)
        return (n is not None and depth < 4 and n.op_type in ("Identity", "Cast", "Reshape", "Unsqueeze",
                                                                "Transpose", "DequantizeLinear")
                and self.is_const(n.input[0], depth + 1))

    def act_gain(self, name: str, depth: int = 0) -> float:
        """Kaiming-style gain for a weight whose op reads ``name``: sqrt(1 / E[f(x)^2]) for the
        activation f that produced ``name`` (ReLU: sqrt(2); SiLU/GELU/HardSwish: 1.7; sigmoid gate: x2)."""
        n = self.producer.get(name)
        if n is None or depth > 16:
            return 1.0
        op = n.op_type
        if op == "Relu" or (op == "Clip" and len(n.input) > 1 and n.input[1]):
            return _SQRT2
        if op == "LeakyRelu":
            alpha = _attr(n, "alpha", 0.01)
            return float(np.sqrt(2.0 / (1.0 + alpha * alpha)))
        if op in ("HardSwish", "Gelu", "Mish", "FastGelu", "BiasGelu", "QuickGelu"):
            return 1.7
        if op == "Mul" and len(n.input) == 2:
            a, b = n.input
            if self.is_const(a) or self.is_const(b):  # x * constant: look further up
                return self.act_gain(b if self.is_const(a) else a, depth + 1)
            for x, y in ((a, b), (b, a)):
                py = self.producer.get(y)
                if py is None:
                    continue
                if py.op_type in ("Sigmoid", "HardSigmoid"):
                    if py.input[0] == x:
                        return 1.7  # SiLU / Swish
                    return min(4.0, 2.0 * self.act_gain(x, depth + 1))  # sigmoid gate (SE, GLU)
                if py.op_type == "Add" and any(self.producer.get(i) is not None
                                               and self.producer[i].op_type in ("Erf", "Tanh")
                                               for i in py.input):
                    return 1.7  # decomposed GELU: x * (1 + erf(x / sqrt(2)))
            return 1.0
        if op in _GAIN_TRANSPARENT and n.input:
            src = next((i for i in n.input if i and not self.is_const(i)), n.input[0])
            return self.act_gain(src, depth + 1)
        return 1.0

    def data_uses(self, name: str) -> list:
        """Consumers of ``name`` that read its values (not just its shape)."""
        return [u for u in self.uses.get(name, []) if u[0].op_type not in ("Shape", "Size")]

    def _is_gate(self, name: str) -> bool:
        n = self.producer.get(name)
        return n is not None and n.op_type in ("Sigmoid", "HardSigmoid")

    def _is_sum(self, node: onnx.NodeProto | None) -> bool:
        return (node is not None and node.op_type in ("Add", "Sum") and len(node.input) >= 2
                and sum(1 for i in node.input if i and not self.is_const(i)) >= 2)

    def _terms(self, name: str, depth: int = 0) -> int:
        """Number of computed terms summed into ``name`` by a tree of single-use Adds."""
        n = self.producer.get(name)
        if depth > 32 or not self._is_sum(n) or len(self.data_uses(name)) != 1 and depth > 0:
            return 1
        return sum(self._terms(i, depth + 1) for i in n.input if i and not self.is_const(i))

    def residual_terms(self, name: str, depth: int = 0) -> int:
        """If ``name`` (a weighted op's output) is one term of a residual / multi-branch sum, reached
        through bias adds, norms, layout ops or constant scales whose results are read only once, the
        number of computed terms in that sum (climbing chains of single-use Adds); else 1."""
        uses = self.data_uses(name)
        if len(uses) == 2:  # SiLU / Swish: x -> Sigmoid -> Mul(x, .) reads x twice but is one path
            ops = sorted(uses, key=lambda u: u[0].op_type != "Sigmoid")
            if ops[0][0].op_type in ("Sigmoid", "HardSigmoid") and ops[1][0].op_type == "Mul" \
                    and ops[0][0].output[0] in ops[1][0].input:
                uses = [(ops[1][0], ops[1][1])]
        if depth > 8 or len(uses) != 1:  # a tensor read twice is a trunk (skip source), not a branch
            return 1
        node, idx = uses[0]
        op = node.op_type
        if self._is_sum(node):
            root = node
            for _ in range(32):  # climb to the top of a chain of single-use Adds
                up = self.data_uses(root.output[0])
                if len(up) == 1 and self._is_sum(up[0][0]):
                    root = up[0][0]
                else:
                    break
            return max(2, self._terms(root.output[0]))
        if op in _BRANCH_TRANSPARENT and node.output:
            if op == "Mul" and not any(self.is_const(i) or self._is_gate(i)
                                       for j, i in enumerate(node.input) if j != idx):
                return 1
            if op == "BatchNormalization" and idx != 0:
                return 1
            return self.residual_terms(node.output[0], depth + 1)
        return 1


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


def residual_damping(terms: int) -> float:
    """Extra factor ``1/terms`` for a weight whose output is one of ``terms`` computed tensors summed
    together: a residual branch (2 terms) gets 0.5, so a block grows the stream's variance by ~1.25x instead
    of 2x; RepVGG/MobileOne-style multi-branch sums (3-6 terms) stay near unit gain."""
    return 1.0 if terms <= 1 else 1.0 / terms


def _values(t: TensorProto, uses: list, seed: int, gain: float, graph: _Graph) -> np.ndarray:
    dims = [int(x) for x in t.dims]
    rng = _rng(seed, t.name)
    std = None
    if len(dims) >= 2:
        found = _fan_in(dims, uses)
        if found is not None:
            std, node, data_idx = found
            if node is not None:
                if data_idx < len(node.input) and node.input[data_idx]:
                    std *= graph.act_gain(node.input[data_idx])
                if node.output:
                    std *= residual_damping(graph.residual_terms(node.output[0]))
    if std is None and sum(1 for x in dims if x > 1) >= 2:  # other N-D tensor: torch's [out, in, ...]
        std = 1.0 / np.sqrt(max(1, _numel(dims[1:])))
    if std is not None:
        gen = np.float64 if t.data_type == TensorProto.DOUBLE else np.float32
        vals = rng.standard_normal(dims, dtype=gen) * gen(gain * std)
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
    info = _Graph(m, uses)
    for graph in _graphs(m.graph):
        for t in graph.initializer:
            if t.data_type not in FLOAT_TYPES:
                continue
            if t.name in targets or (rerandomize and _numel(t.dims) >= MIN_ELEMENTS):
                users = list(_final_uses(t.name, uses, list(range(len(t.dims)))))
                arr = _values(t, users, seed, gain, info)
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
    return Path(__file__).resolve().parent / "corpus"


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
    """Random feeds for a manifest entry.

    Integer inputs are drawn from ``[low, high]`` (inclusive), float inputs from ``[low, high)``.  Symbolic
    dims take their value from ``dims``, else from the entry's ``example_shape`` (the size used at export),
    else 1 for batch-like names and 8 otherwise.
    """
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
            hi = 1 if hi is None else hi
            feeds[inp["name"]] = rng.integers(lo, hi, size=shape, endpoint=True).astype(dt)  # inclusive
        else:
            lo = -1.0 if lo is None else lo
            hi = 1.0 if hi is None else hi
            feeds[inp["name"]] = rng.uniform(lo, hi, size=shape).astype(dt)
    return feeds
