"""A small, explicit graph wrapper over an ONNX ModelProto.

Weights live as numpy arrays keyed by name, nodes stay NodeProtos, and every tensor's static shape comes from
strict re-inference. The wrapper never mutates an array in place: setting an initializer replaces the array.
"""
from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ModelLoadError

# Write weights to a side file above this size; protobuf cannot hold more than 2 GiB.
EXTERNAL_DATA_THRESHOLD = 1 << 30

# ONNX element types of real numbers: the tensors whose shapes probing measures
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                         onnx.TensorProto.BFLOAT16})

def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute `name` of `node`, decoded; `default` when absent."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _check_external_locations(model: onnx.ModelProto, base_dir: Path) -> bool:
    """Refuse external data that points outside the model's folder. Returns whether any tensor is external."""
    has_external = False
    base = base_dir.resolve()
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        has_external = True
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if not location:
            raise ModelLoadError(f"tensor '{tensor.name}' is external but names no data location")
        if os.path.isabs(location):
            raise ModelLoadError(f"tensor '{tensor.name}' points at absolute data location '{location}': refused")
        target = (base / location).resolve()
        if base != target and base not in target.parents:
            raise ModelLoadError(
                f"tensor '{tensor.name}' points at data location '{location}' outside the model's folder: refused")
        if not target.is_file():
            raise ModelLoadError(f"tensor '{tensor.name}': external data file '{location}' is missing")
    return has_external


def _all_tensors(model: onnx.ModelProto):
    def walk(graph):
        yield from graph.initializer
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.GRAPH:
                    yield from walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        yield from walk(g)
    yield from walk(model.graph)


def load_model(source) -> tuple[onnx.ModelProto, bool]:
    """Load a ModelProto from a path or take a given one. Returns (model, had_external_data)."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        return model, False
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelLoadError(f"expected an ONNX file, got a folder: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{path}: not an ONNX model (empty or truncated file)")
    has_external = _check_external_locations(model, path.parent)
    if has_external:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise ModelLoadError(f"{path}: could not read external data ({exc})") from exc
    return model, has_external


def save_model(model: onnx.ModelProto, path, external_data: bool | None = None) -> None:
    """Write atomically: a reader never sees a half-written file, and a failure leaves no output behind."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OSError(f"output folder does not exist: {folder}")
    if external_data is None:
        external_data = model.ByteSize() > EXTERNAL_DATA_THRESHOLD if _small_enough(model) else True
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    data_name = path.name + ".data"
    tmp_data = None
    try:
        if external_data:
            tmp_data = folder / f".{data_name}.tmp"
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(copy, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data.name, size_threshold=1024)
            # Point the tensors at the final data file name, then rename both.
            final = onnx.load(tmp, load_external_data=False)
            for tensor in _all_tensors(final):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            with open(tmp, "wb") as f:
                f.write(final.SerializeToString())
            os.replace(tmp_data, folder / data_name)
            tmp_data = None
        else:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        for leftover in (tmp, tmp_data):
            if leftover and os.path.exists(leftover):
                os.unlink(leftover)
        raise


def _small_enough(model: onnx.ModelProto) -> bool:
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) or (np.prod(t.dims, dtype=np.int64) * 4)
        if total > EXTERNAL_DATA_THRESHOLD:
            return False
    return True


class Graph:
    """Mutable view of one ONNX graph: nodes, weights as numpy arrays, inferred shapes."""

    def __init__(self, model: onnx.ModelProto):
        # The shell keeps opset imports, metadata_props, doc_string, functions; weights live as arrays.
        self.model = onnx.ModelProto()
        _copy_shell(model, self.model)
        g = model.graph
        self.nodes: list[onnx.NodeProto] = list(g.node)
        self.initializers: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        init_names = set(self.initializers)
        # Old exporters list initializers as graph inputs: they are weights, not feeds.
        self.inputs: list[onnx.ValueInfoProto] = [v for v in g.input if v.name not in init_names]
        self.outputs: list[onnx.ValueInfoProto] = list(g.output)
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, int] = {}
        self.shape_hints: dict[str, tuple] = {}  # shapes measured or derived where onnx's inference gives up
        self._name_counter = 0
        self._taken = None
        self.reindex()

    def clone(self) -> "Graph":
        """A copy that shares weight arrays (never mutated in place) but owns its nodes and shapes."""
        other = Graph.__new__(Graph)
        other.model = onnx.ModelProto()
        other.model.CopyFrom(self.model)
        other.nodes = []
        for node in self.nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            other.nodes.append(copy)
        other.initializers = dict(self.initializers)
        other.inputs = list(self.inputs)
        other.outputs = list(self.outputs)
        other.shapes = dict(self.shapes)
        other.dtypes = dict(self.dtypes)
        other.shape_hints = dict(self.shape_hints)
        other._name_counter = self._name_counter
        other._taken = None
        other.reindex()
        return other

    # ---- structure -------------------------------------------------------------------------------------
    def reindex(self) -> None:
        self.producer: dict[str, onnx.NodeProto] = {}
        self.uses: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in self.nodes:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for i, name in enumerate(node.input):
                if name:
                    self.uses[name].append((node, i))
            for name in subgraph_outer_names(node):
                self.uses[name].append((node, -1))
        self.input_names = [v.name for v in self.inputs]
        self.output_names = [v.name for v in self.outputs]
        self._taken = None

    def is_const(self, name: str) -> bool:
        return name in self.initializers

    def const(self, name: str):
        return self.initializers.get(name)

    def set_initializer(self, name: str, array: np.ndarray) -> None:
        self.initializers[name] = np.asarray(array)
        self.shapes[name] = tuple(int(d) for d in np.shape(array))

    def fresh_name(self, base: str) -> str:
        if self._taken is None:
            self._taken = set(self.initializers) | set(self.producer) | set(self.input_names)
            self._taken |= {n.name for n in self.nodes}
        name = base
        while name in self._taken:
            self._name_counter += 1
            name = f"{base}__{self._name_counter}"
        self._taken.add(name)
        return name

    def add_initializer(self, base: str, array: np.ndarray) -> str:
        name = self.fresh_name(base)
        self.set_initializer(name, array)
        return name

    def opset(self, domain: str = "") -> int:
        for imp in self.model.opset_import:
            if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
                return imp.version
        return 0

    # ---- shapes -----------------------------------------------------------------------------------------
    def shape(self, name: str):
        """Tuple of dims (int, or str for symbolic, or None for unknown), or None when the rank is unknown."""
        return self.shapes.get(name)

    def infer_shapes(self, hints: dict | None = None) -> None:
        """Clear all value_info and re-infer from scratch, so no stale shape survives a rewrite.
        `hints` ({tensor: dims}) are shapes graphprune derived itself where onnx's inference gives up."""
        self.shape_hints.update(hints or {})
        model = self._skeleton()
        for name, dims in self.shape_hints.items():
            if name in self.dtypes:
                model.graph.value_info.append(helper.make_tensor_value_info(name, self.dtypes[name], list(dims)))
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:
            inferred = onnx.shape_inference.infer_shapes(model)
        self.shapes = {}
        self.dtypes = {}
        for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            tt = v.type.tensor_type
            if not v.type.HasField("tensor_type"):
                continue
            self.dtypes[v.name] = tt.elem_type
            if tt.HasField("shape"):
                self.shapes[v.name] = tuple(_dim(d) for d in tt.shape.dim)
        # onnx's inference may drop a hint it cannot merge with its own result (a Reshape whose target it only
        # knows in part); a measured or derived dim is never worse than an unknown one
        for name, dims in self.shape_hints.items():
            cur = self.shapes.get(name)
            if cur is None or (len(cur) == len(dims) and any(d is None for d in cur)):
                self.shapes[name] = tuple(h if c is None else c for c, h in zip(cur or dims, dims))
        for name, arr in self.initializers.items():
            self.shapes[name] = tuple(int(d) for d in arr.shape)
            self.dtypes[name] = helper.np_dtype_to_tensor_dtype(arr.dtype)

    def _skeleton(self) -> onnx.ModelProto:
        """The model for shape inference: big weights become typed graph inputs, so no weight bytes are copied
        (small and integer constants stay, data propagation needs their values)."""
        out = onnx.ModelProto()
        for field_name in ("ir_version", "producer_name", "domain", "model_version"):
            setattr(out, field_name, getattr(self.model, field_name))
        out.opset_import.extend(self.model.opset_import)
        out.functions.extend(self.model.functions)
        g = out.graph
        g.name = self.model.graph.name
        g.node.extend(self.nodes)
        g.input.extend(self.inputs)
        g.output.extend(self.outputs)
        for name, arr in self.initializers.items():
            if arr.size <= 4096 or arr.dtype.kind in "iub":
                g.initializer.append(numpy_helper.from_array(arr, name))
            else:
                g.input.append(helper.make_tensor_value_info(
                    name, helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape)))
        return out

    # ---- export -----------------------------------------------------------------------------------------
    def to_model(self, with_value_info: bool = True) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(self.model)
        g = out.graph
        del g.node[:]
        g.node.extend(self.nodes)
        del g.initializer[:]
        used = set()
        for node in self.nodes:
            used.update(node.input)
            used.update(subgraph_outer_names(node))
        used.update(self.output_names)
        g.initializer.extend(numpy_helper.from_array(arr, name) for name, arr in self.initializers.items()
                             if name in used)
        del g.input[:]
        g.input.extend(self.inputs)
        del g.output[:]
        g.output.extend(self.outputs)
        del g.value_info[:]
        if with_value_info:
            for name, dims in self.shapes.items():
                if name in self.initializers or name in self.input_names or name in self.output_names:
                    continue
                if name in self.dtypes:
                    g.value_info.append(helper.make_tensor_value_info(name, self.dtypes[name], list(dims)))
        return out


def _copy_shell(model: onnx.ModelProto, shell: onnx.ModelProto) -> None:
    """Copy everything of a model but its initializers (which the Graph holds as arrays)."""
    graph = model.graph
    saved = list(graph.initializer)
    del graph.initializer[:]
    try:
        shell.CopyFrom(model)
    finally:
        graph.initializer.extend(saved)


def _dim(d):
    if d.HasField("dim_value"):
        return int(d.dim_value)
    if d.HasField("dim_param") and not d.dim_param.startswith("unk__"):  # onnx's placeholder for "unknown"
        return d.dim_param
    return None


def subgraph_outer_names(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing scope."""
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                local.update(n.output)
            for n in g.node:
                names.update(i for i in n.input if i and i not in local)
                names.update(x for x in subgraph_outer_names(n) if x not in local)
            names.update(o.name for o in g.output if o.name not in local)
    return names
