"""A small, explicit graph wrapper over an ONNX ModelProto.

Weights live as numpy arrays keyed by name, nodes stay NodeProtos, and every tensor's static shape comes from
strict re-inference. The wrapper never mutates an array in place: setting an initializer replaces the array.
"""
from __future__ import annotations

import os
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ModelLoadError, UnsupportedModelError

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


# ---- reading untrusted models -------------------------------------------------------------------------------

# Protobuf cannot parse a message of 2 GiB or more, so a bigger .onnx file cannot be a model.
MAX_MODEL_BYTES = (1 << 31) - 1
# A declared dim (graph input, value_info, inferred) above this is treated as unknown: analysis sizes index
# arrays by static dims, and a 4 KB file may declare 10⁹. Weights are real data and keep their sizes.
MAX_STATIC_DIM = 1 << 22
# Sum of all static dims of all tensors (the analysis allocates one index per position): past it, refuse.
MAX_STATIC_POSITIONS = 1 << 26

_T = onnx.TensorProto
# bits per element of every fixed-size element type (0: strings, not fixed-size)
_ELEMENT_BITS = {_T.FLOAT: 32, _T.UINT8: 8, _T.INT8: 8, _T.UINT16: 16, _T.INT16: 16, _T.INT32: 32, _T.INT64: 64,
                 _T.STRING: 0, _T.BOOL: 8, _T.FLOAT16: 16, _T.DOUBLE: 64, _T.UINT32: 32, _T.UINT64: 64,
                 _T.COMPLEX64: 64, _T.COMPLEX128: 128, _T.BFLOAT16: 16}
for _name, _bits in (("FLOAT8E4M3FN", 8), ("FLOAT8E4M3FNUZ", 8), ("FLOAT8E5M2", 8), ("FLOAT8E5M2FNUZ", 8),
                     ("FLOAT8E8M0", 8), ("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4), ("UINT2", 2), ("INT2", 2)):
    if hasattr(_T, _name):
        _ELEMENT_BITS[getattr(_T, _name)] = _bits

# ai.onnx.ml ops that are whole classical models (no channels, nothing graphprune can remove)
CLASSICAL_ML_OPS = ("TreeEnsembleClassifier", "TreeEnsembleRegressor", "TreeEnsemble", "SVMClassifier",
                    "SVMRegressor", "LinearClassifier", "LinearRegressor")


def tensor_elements(tensor: onnx.TensorProto, where: str = "") -> int:
    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        raise ModelLoadError(f"{where}tensor '{tensor.name}' has negative dims {dims}")
    n = 1
    for d in dims:
        n *= int(d)
    return n


def tensor_nbytes(tensor: onnx.TensorProto, where: str = "") -> int | None:
    """Bytes the tensor's raw data must hold (None: strings, which have no fixed size)."""
    bits = _ELEMENT_BITS.get(tensor.data_type)
    if bits is None:
        raise ModelLoadError(f"{where}tensor '{tensor.name}' has unknown element type {tensor.data_type}")
    if bits == 0:
        return None
    return (tensor_elements(tensor, where) * bits + 7) // 8


def _typed_count(tensor: onnx.TensorProto) -> tuple[int, int]:
    """(values stored in the typed field, values the dims need) for a tensor without raw_data."""
    n = tensor_elements(tensor)
    dt = tensor.data_type
    bits = _ELEMENT_BITS[dt]
    if dt == _T.STRING:
        return len(tensor.string_data), n
    if dt in (_T.COMPLEX64, _T.COMPLEX128):
        field = tensor.float_data if dt == _T.COMPLEX64 else tensor.double_data
        return len(field), 2 * n
    if dt == _T.FLOAT:
        return len(tensor.float_data), n
    if dt == _T.DOUBLE:
        return len(tensor.double_data), n
    if dt == _T.INT64:
        return len(tensor.int64_data), n
    if dt in (_T.UINT32, _T.UINT64):
        return len(tensor.uint64_data), n
    # everything else lives in int32_data, sub-byte types packed per byte
    return len(tensor.int32_data), (n * bits + 7) // 8 if bits < 8 else n


def check_tensor_data(tensor: onnx.TensorProto, where: str = "") -> None:
    """An embedded tensor's data must be exactly what its dims and type need (never trust dims to size arrays)."""
    if tensor.data_location == _T.EXTERNAL:
        return
    need = tensor_nbytes(tensor, where)
    if tensor.HasField("raw_data"):
        if need is None:
            raise ModelLoadError(f"{where}string tensor '{tensor.name}' has raw_data")
        if len(tensor.raw_data) != need:
            raise ModelLoadError(f"{where}tensor '{tensor.name}': raw_data holds {len(tensor.raw_data)} bytes but "
                                 f"dims {list(tensor.dims)} of type {_T.DataType.Name(tensor.data_type)} need {need}")
        return
    have, want = _typed_count(tensor)
    if have != want:
        raise ModelLoadError(f"{where}tensor '{tensor.name}' holds {have} values but dims {list(tensor.dims)} need "
                             f"{want}")


def _external_info(tensor: onnx.TensorProto, where: str) -> tuple[str, int, int | None]:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    if not location:
        raise ModelLoadError(f"{where}tensor '{tensor.name}' is external but names no data location")
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise ModelLoadError(f"{where}tensor '{tensor.name}': external offset/length are not integers") from None
    if offset < 0 or (length is not None and length < 0):
        raise ModelLoadError(f"{where}tensor '{tensor.name}': negative external offset or length")
    return location, offset, length


def _resolve_location(tensor: onnx.TensorProto, location: str, base: Path, where: str) -> Path:
    """The data file of an external tensor, which must be a file inside the model's folder (after symlinks)."""
    shown = location.encode("unicode_escape").decode("ascii")
    if "\x00" in location:
        raise ModelLoadError(f"{where}tensor '{tensor.name}': data location '{shown}' contains a NUL byte: refused")
    if os.path.isabs(location) or location.startswith(("\\", "/")) or (len(location) > 1 and location[1] == ":"):
        raise ModelLoadError(f"{where}tensor '{tensor.name}' points at absolute data location '{shown}': refused")
    target = (base / location).resolve()
    if base != target and base not in target.parents:
        raise ModelLoadError(
            f"{where}tensor '{tensor.name}' points at data location '{shown}' outside the model's folder: refused")
    return target


def external_data_files(model: onnx.ModelProto, base_dir) -> list[Path]:
    """The resolved data files a model's external tensors read (each checked to lie in the model's folder)."""
    base = Path(base_dir).resolve()
    files = []
    for tensor in _all_tensors(model):
        if tensor.data_location == _T.EXTERNAL:
            location, _, _ = _external_info(tensor, "")
            target = _resolve_location(tensor, location, base, "")
            if target not in files:
                files.append(target)
    return files


def _load_external(model: onnx.ModelProto, base_dir: Path, where: str) -> int:
    """Read every external tensor's bytes into it, after checking location, offset and length against the
    file. Returns the number of bytes read."""
    from .fileio import open_regular
    base = base_dir.resolve()
    external = [t for t in _all_tensors(model) if t.data_location == _T.EXTERNAL]
    opened: dict[Path, tuple[int, int]] = {}
    total = 0
    try:
        for tensor in external:
            location, offset, length = _external_info(tensor, where)
            target = _resolve_location(tensor, location, base, where)
            need = tensor_nbytes(tensor, where)
            if need is None:
                raise ModelLoadError(f"{where}string tensor '{tensor.name}' cannot live in external data")
            if length is not None and length != need:
                raise ModelLoadError(f"{where}tensor '{tensor.name}': external data length {length} but dims "
                                     f"{list(tensor.dims)} need {need} bytes")
            if target not in opened:
                opened[target] = open_regular(target, ModelLoadError, f"{where}external data file of '{tensor.name}'")
            fd, size = opened[target]
            if offset + need > size:
                raise ModelLoadError(f"{where}tensor '{tensor.name}': needs bytes {offset}..{offset + need} of "
                                     f"'{location}', which has {size}")
            data = os.pread(fd, need, offset) if need else b""
            if len(data) != need:
                raise ModelLoadError(f"{where}tensor '{tensor.name}': short read from '{location}'")
            tensor.raw_data = data
            total += len(data)
            del tensor.external_data[:]
            tensor.data_location = _T.DEFAULT
    finally:
        for fd, _ in opened.values():
            os.close(fd)
    return total


def _all_tensors(model: onnx.ModelProto):
    """Every TensorProto a model can hold: initializers, sparse initializers, tensor(s) and sparse-tensor(s)
    attributes, at every graph depth, in the main graph and in model-local functions."""
    def from_attribute(a):
        if a.type == onnx.AttributeProto.TENSOR:
            yield a.t
        elif a.type == onnx.AttributeProto.TENSORS:
            yield from a.tensors
        elif a.type == onnx.AttributeProto.SPARSE_TENSOR:
            yield a.sparse_tensor.values
            yield a.sparse_tensor.indices
        elif a.type == onnx.AttributeProto.SPARSE_TENSORS:
            for s in a.sparse_tensors:
                yield s.values
                yield s.indices
        elif a.type == onnx.AttributeProto.GRAPH:
            yield from walk(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            for g in a.graphs:
                yield from walk(g)
        else:  # a mistyped attribute may still carry a tensor or graph in its other fields
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from walk(a.g)
            for g in a.graphs:
                yield from walk(g)

    def nodes(node_list):
        for node in node_list:
            for a in node.attribute:
                yield from from_attribute(a)

    def walk(graph):
        yield from graph.initializer
        for s in graph.sparse_initializer:
            yield s.values
            yield s.indices
        yield from nodes(graph.node)

    yield from walk(model.graph)
    for function in model.functions:
        yield from nodes(function.node)


def refuse_classical_ml(model: onnx.ModelProto, where: str) -> None:
    """Tree ensembles, SVMs and linear classifiers (ai.onnx.ml) have no channels: say so at once, before any
    shape inference or canonicalisation runs on their (possibly huge) attribute lists."""
    ml_nodes = [n for n in model.graph.node if n.domain == "ai.onnx.ml"]
    if not ml_nodes:
        return
    classical = next((n for n in ml_nodes if n.op_type in CLASSICAL_ML_OPS), None)
    if classical is not None or len(ml_nodes) == len(model.graph.node):
        node = classical or ml_nodes[0]
        raise UnsupportedModelError(
            f"{where}a classical ONNX-ML model ({node.op_type} node '{node.name}', domain ai.onnx.ml): it has no "
            f"neural-network channels to prune, so graphprune leaves it unchanged")


def _cycle_node(graph: onnx.GraphProto):
    """A node on a dependency cycle of the graph (None when there is none)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output if o}
    order = _toposorted(graph)
    if order is not None:
        return None
    done = {id(n) for n in _partial_order(graph)}
    k = next(k for k, n in enumerate(graph.node) if id(n) not in done)
    seen = []
    while k not in seen:  # walk producers inside the unsorted part: it must come back to a node seen
        seen.append(k)
        k = next(producer[i] for i in graph.node[k].input
                 if i in producer and i not in available and id(graph.node[producer[i]]) not in done)
    return graph.node[k]


def dependency_order(deps: list[set[int]]) -> list[int]:
    """Kahn's algorithm, first in first out: the indices of the nodes a topological sort can place, given
    deps[i] = the nodes node i reads from. All of them unless there is a cycle; the nodes on or behind a cycle
    are left out."""
    users = defaultdict(list)
    for k, d in enumerate(deps):
        for p in d:
            users[p].append(k)
    indeg = [len(d) for d in deps]
    ready = deque(k for k, d in enumerate(indeg) if d == 0)
    order = []
    while ready:
        k = ready.popleft()
        order.append(k)
        for u in users[k]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    return order


def _partial_order(graph: onnx.GraphProto) -> list:
    """The nodes a topological sort can place (all of them unless there is a cycle)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output if o}
    deps = [{producer[i] for i in n.input if i in producer and i not in available} for n in graph.node]
    return [graph.node[k] for k in dependency_order(deps)]


def _toposorted(graph: onnx.GraphProto) -> list | None:
    """The graph's nodes in dependency order, or None when there is a cycle."""
    order = _partial_order(graph)
    return order if len(order) == len(graph.node) else None


# onnx.checker complaints about models onnxruntime runs (its own ops in the ONNX domain, ops onnx deprecated,
# graph outputs declared without a shape): not a reason to refuse the input
_TOLERATED = ("No Op registered for", "deprecated", "Field 'shape' of 'type' is required but missing")


def _structural_check(graph: onnx.GraphProto, where: str) -> None:
    """What the checker would have gone on to check in the main graph: every name defined once, every node
    input defined, no cycle."""
    defined: set[str] = set()
    for name in [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}] + \
            [t.name for t in graph.initializer] + [o for n in graph.node for o in n.output if o]:
        if name in defined:
            raise ModelLoadError(f"{where}invalid model: '{name}' is defined more than once (graph must be in "
                                 f"single static assignment form)")
        defined.add(name)
    for node in graph.node:
        for i in node.input:
            if i and i not in defined:
                raise ModelLoadError(f"{where}invalid model: node '{node.name}' ({node.op_type}) reads '{i}', which "
                                     f"nothing defines")
    if _toposorted(graph) is None:
        node = _cycle_node(graph)
        raise ModelLoadError(f"{where}invalid model: the graph has a cycle: {node.op_type} node '{node.name}' "
                             f"depends on its own output")


def check_input_model(model, where: str = "") -> None:
    """Refuse an invalid input with onnx.checker's reason (duplicate names, undefined inputs, cycles, ...)
    before graphprune's own rewrites could silently 'repair' it. Nodes merely out of order are accepted
    (onnxruntime sorts them, and so does canonicalisation); onnx's 'deprecated op' complaint is no reason to
    refuse a model onnxruntime runs."""
    light = _light_copy(model) if isinstance(model, onnx.ModelProto) else model
    try:
        onnx.checker.check_model(light)  # tensor data was checked already; the check copies no weights
        if isinstance(model, onnx.ModelProto):
            _check_declared_shapes(light, where)
        return
    except onnx.checker.ValidationError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    except ValueError:  # a proto over 2 GiB: weights were embedded (only API callers get here); skip
        return
    if any(t in reason for t in _TOLERATED) and isinstance(model, onnx.ModelProto):
        _structural_check(model.graph, where)  # the checker stopped at the tolerated complaint: finish its job
        return
    if "topologically sorted" in reason and isinstance(model, onnx.ModelProto):
        order = _toposorted(model.graph)
        if order is None:
            node = _cycle_node(model.graph)
            raise ModelLoadError(f"{where}invalid model: the graph has a cycle: {node.op_type} node '{node.name}' "
                                 f"depends on its own output")
        copy = _light_copy(model)
        del copy.graph.node[:]
        copy.graph.node.extend(order)
        try:
            onnx.checker.check_model(copy)
            _check_declared_shapes(copy, where)
            return
        except onnx.checker.ValidationError as exc:
            reason = str(exc).strip().splitlines()[0]
            if any(t in reason for t in _TOLERATED):
                _structural_check(copy.graph, where)
                return
    raise ModelLoadError(f"{where}invalid model (onnx.checker): {reason}")


def _light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its big weights declared as graph inputs instead: checks copy no weight bytes."""
    copy = onnx.ModelProto()
    _copy_fields(model, copy, skip="graph")
    _copy_fields(model.graph, copy.graph, skip="initializer")
    listed = {i.name for i in copy.graph.input}
    for t in model.graph.initializer:
        if t.data_location == _T.EXTERNAL or tensor_nbytes(t) is None or len(t.raw_data) <= 4096:
            copy.graph.initializer.append(t)
        elif t.name not in listed:
            copy.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return copy


def _copy_fields(src, dst, skip: str) -> None:
    """Copy every set field of message `src` into `dst` but `skip` (no copy of the skipped field's bytes)."""
    from google.protobuf.descriptor import FieldDescriptor
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        target = getattr(dst, field.name)
        if field.type == FieldDescriptor.TYPE_MESSAGE and hasattr(value, "ListFields"):
            target.CopyFrom(value)
        elif not isinstance(value, (str, bytes, int, float, bool)):
            target.extend(value)
        else:
            setattr(dst, field.name, value)


def _check_declared_shapes(model: onnx.ModelProto, where: str) -> None:
    """A declared shape or type that contradicts the graph (onnx's strict shape inference says so) makes the
    input invalid; inference that merely cannot follow an op is no reason to refuse."""
    try:
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        text = " ".join(str(exc).split())
        if "differ" in text or "mismatch" in text.lower():
            raise ModelLoadError(f"{where}invalid model: a declared shape or type contradicts the graph "
                                 f"(onnx shape inference: {text[:300]})") from None
    except Exception:
        pass


def _check_strings(message, where: str) -> None:
    """Protobuf parses string fields without checking UTF-8; Python reads them and fails later. Touch every
    string field (names, op types, attribute strings are bytes and stay) so a bad one is refused now."""
    from google.protobuf.descriptor import FieldDescriptor
    stack = [message]
    while stack:
        msg = stack.pop()
        try:
            fields = msg.ListFields()  # reading a field decodes it: a bad string raises here
        except UnicodeDecodeError:
            fields = None
        if fields is None:
            raise ModelLoadError(f"{where}not a valid ONNX model: a name or string is not UTF-8 text")
        for field, value in fields:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                if hasattr(value, "ListFields"):
                    stack.append(value)
                else:
                    stack.extend(value)
            elif field.type == FieldDescriptor.TYPE_STRING:
                # upb hands back bytes (not str) for a string field that is not valid UTF-8
                try:
                    bad = isinstance(value, bytes) or (not isinstance(value, str) and
                                                       any(isinstance(v, bytes) for v in value))
                except UnicodeDecodeError:
                    bad = True
                if bad:
                    raise ModelLoadError(f"{where}not a valid ONNX model: a {field.name} field is not UTF-8 "
                                         f"text") from None


def _check_model_tensors(model: onnx.ModelProto, where: str) -> None:
    for tensor in _all_tensors(model):
        check_tensor_data(tensor, where)
    names = [t.name for t in model.graph.initializer]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ModelLoadError(f"{where}invalid model: two initializers are named '{dup}'")


def load_model(source) -> tuple[onnx.ModelProto, bool]:
    """Load a ModelProto from a path or take a given one. Returns (model, had_external_data).

    The path must be a regular file (a FIFO or device is refused without reading it) of less than 2 GiB;
    every tensor's data must match its dims; external data must lie in the model's folder and be as long as
    the tensor needs; classical ONNX-ML models are refused at once; onnx.checker must accept the input."""
    from .fileio import read_regular
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        _check_strings(model, "")
        refuse_classical_ml(model, "")
        if any(t.data_location == _T.EXTERNAL for t in _all_tensors(model)):
            raise ModelLoadError("the model has tensors in external data: pass its path instead of a ModelProto")
        _check_model_tensors(model, "")
        check_input_model(model, "")
        return model, False
    path = Path(source)
    where = f"{path}: "
    data = read_regular(path, MAX_MODEL_BYTES, ModelLoadError, "model file")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    del data
    _check_strings(model, where)
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{path}: not an ONNX model (empty or truncated file)")
    refuse_classical_ml(model, where)
    _check_model_tensors(model, where)
    has_external_refs = False
    for tensor in _all_tensors(model):  # locations first: never open anything outside the model's folder
        if tensor.data_location == _T.EXTERNAL:
            has_external_refs = True
            location, _, _ = _external_info(tensor, where)
            _resolve_location(tensor, location, path.parent.resolve(), where)
    _load_external(model, path.parent, where)
    # the checker sees the graph with big weights declared as inputs, so a model of any size (external data
    # over 2 GiB included) is checked in proto form without serialising its weights
    check_input_model(model, where)
    return model, has_external_refs


def input_files(path) -> list[Path]:
    """The files a run reads for the model at `path`: the model and its external data files (resolved).
    Unreadable or invalid models give just the model itself (loading reports the problem)."""
    from .fileio import read_regular
    path = Path(path)
    files = [path.resolve()]
    try:
        model = onnx.ModelProto()
        model.ParseFromString(read_regular(path, MAX_MODEL_BYTES, ModelLoadError, "model file"))
        files += [f for f in external_data_files(model, path.parent) if f not in files]
    except Exception:
        pass
    return files


# ---- writing ----------------------------------------------------------------------------------------------------

def save_model(model: onnx.ModelProto, path, external_data: bool | None = None) -> None:
    """Write atomically through graphprune.fileio: fresh O_EXCL temp files in the output's folder, then
    renames; a failure or SIGTERM leaves no temp file and the previous outputs as they were. With external
    data, weights of 1 KiB or more go to PATH.data (replaced first, then the model that points at it)."""
    from .fileio import temp_files, uninterrupted
    path = Path(path)
    if external_data is None:
        external_data = model.ByteSize() > EXTERNAL_DATA_THRESHOLD if _small_enough(model) else True
    data_name = path.name + ".data"
    with temp_files() as new:
        model_tmp = new(path)
        if not external_data:
            with model_tmp.open("wb") as f:
                f.write(model.SerializeToString())
            model_tmp.commit()
            return
        data_tmp = new(path.with_name(data_name))
        moved = []  # (tensor, raw bytes) whose data was moved out of the proto, restored in any case
        try:
            with data_tmp.open("wb") as f:
                offset = 0
                for tensor in _all_tensors(model):
                    if tensor.data_location == _T.EXTERNAL or tensor.data_type == _T.STRING:
                        continue
                    raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
                    if len(raw) < 1024:
                        continue
                    pad = (-offset) % 64
                    f.write(b"\0" * pad)
                    offset += pad
                    f.write(raw)
                    saved = onnx.TensorProto()
                    saved.CopyFrom(tensor)
                    moved.append((tensor, saved))
                    tensor.ClearField("raw_data")
                    for field_name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                        tensor.ClearField(field_name)
                    tensor.data_location = _T.EXTERNAL
                    del tensor.external_data[:]
                    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                        entry = tensor.external_data.add()
                        entry.key, entry.value = key, value
                    offset += len(raw)
            with model_tmp.open("wb") as f:
                f.write(model.SerializeToString())
        finally:
            for tensor, saved in moved:
                tensor.CopyFrom(saved)
        with uninterrupted():  # the model and its data file are replaced together, even on SIGTERM
            data_tmp.commit()
            model_tmp.commit()


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
        self.inputs: list[onnx.ValueInfoProto] = [_dynamic_negative_dims(v) for v in g.input
                                                  if v.name not in init_names]
        self.outputs: list[onnx.ValueInfoProto] = list(g.output)
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, int] = {}
        self.shape_hints: dict[str, tuple] = {}  # shapes measured or derived where onnx's inference gives up
        self.oversized: dict[str, tuple] = {}  # tensors inferred with a dim > MAX_STATIC_DIM (never run these)
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
        other.oversized = dict(getattr(self, "oversized", {}))
        other._name_counter = self._name_counter
        other._taken = None
        other.reindex()
        return other

    # ---- structure -------------------------------------------------------------------------------------
    def reindex(self) -> None:
        """Producer and uses of every tensor. Nodes inside subgraphs (Loop/Scan/If bodies) are indexed too, after
        the top level, so a top-level producer is never shadowed by a body that reuses its name (canonicalize makes
        body names unique; before it, the top level wins). A control-flow node also uses every outer name its
        bodies read, at input index -1."""
        self.producer: dict[str, onnx.NodeProto] = {}
        self.uses: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for depth, node in walk_nodes(self.nodes):
            for o in node.output:
                if o and (depth == 0 or o not in self.producer):
                    self.producer[o] = node
            for i, name in enumerate(node.input):
                if name:
                    self.uses[name].append((node, i))
            for name in subgraph_outer_names(node):
                self.uses[name].append((node, -1))
        self.input_names = [v.name for v in self.inputs]
        self.output_names = [v.name for v in self.outputs]
        self._taken = None

    def body_nodes(self) -> list[onnx.NodeProto]:
        """The nodes inside subgraphs, at any depth (empty for a graph without control flow)."""
        return [node for depth, node in walk_nodes(self.nodes) if depth]

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
            self._taken |= {n.name for _, n in walk_nodes(self.nodes)}
            for body in (g for _, n in walk_nodes(self.nodes) for g in subgraphs(n)):
                self._taken |= {v.name for v in body.input} | {t.name for t in body.initializer}
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
            if not self._data_propagation_is_bounded(model):
                raise MemoryError("data propagation could materialise a huge Range/Tile")
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:
            inferred = onnx.shape_inference.infer_shapes(model)
        self.shapes = {}
        self.dtypes = {}
        top = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
        # then the tensors of subgraph bodies (what their nodes' rules read); a name the top level has wins
        inner = [v for _, node in walk_nodes(inferred.graph.node) for body in subgraphs(node)
                 for v in list(body.value_info) + list(body.input) + list(body.output)]
        for k, v in enumerate(top + inner):
            tt = v.type.tensor_type
            if not v.type.HasField("tensor_type") or (k >= len(top) and v.name in self.dtypes):
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
        positions = 0
        self.oversized = {}
        for name, dims in self.shapes.items():
            if any(isinstance(d, int) and d > MAX_STATIC_DIM for d in dims):
                self.oversized[name] = dims
            if any(isinstance(d, int) and (d < 0 or d > MAX_STATIC_DIM) for d in dims):
                # declared, not backed by data: a huge (or negative) dim is treated as unknown
                dims = self.shapes[name] = tuple(None if isinstance(d, int) and (d < 0 or d > MAX_STATIC_DIM)
                                                 else d for d in dims)
            positions += sum(d for d in dims if isinstance(d, int))
        for name, arr in self.initializers.items():
            self.shapes[name] = tuple(int(d) for d in arr.shape)
            self.dtypes[name] = helper.np_dtype_to_tensor_dtype(arr.dtype)
        if positions > MAX_STATIC_POSITIONS:
            raise ModelLoadError(f"the model declares {positions} static tensor positions (sum of all dims of all "
                                 f"tensors), more than the {MAX_STATIC_POSITIONS} graphprune analyses")

    def _data_propagation_is_bounded(self, model: onnx.ModelProto) -> bool:
        """onnx's data propagation computes the values of 1-D integer Range/Tile outputs in C++, unbounded: a
        4 KB model can make it allocate gigabytes. Allow it only where every Range/Tile reads constants whose
        result is small (computed inputs may carry declared dims of any size)."""
        for node in model.graph.node:
            if node.op_type not in ("Range", "Tile"):
                continue
            arrays = [self.initializers.get(i) for i in node.input]
            if any(a is None for a in arrays):
                return False
            try:
                if node.op_type == "Range":
                    start, limit, delta = (float(np.asarray(a).reshape(-1)[0]) for a in arrays[:3])
                    count = abs((limit - start) / delta) if delta else float("inf")
                else:
                    count = arrays[0].size * float(np.prod(arrays[1].astype(np.float64)))
            except Exception:
                return False
            if not count <= MAX_STATIC_DIM:
                return False
        return True

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
        # onnx's inference of a body does not see the values of outer initializers: give each body a copy of the
        # small integer constants it reads (Split sizes, Reshape targets; canonicalize hoisted them out)
        for _, node in walk_nodes(g.node):
            for body in subgraphs(node):
                local = {o for n in body.node for o in n.output} | {v.name for v in body.input}
                read = {i for n in body.node for i in n.input if i and i not in local}
                for name in sorted(read):
                    arr = self.initializers.get(name)
                    if arr is not None and arr.dtype.kind in "iub" and arr.size <= 4096:
                        body.initializer.append(numpy_helper.from_array(arr, name))
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
        if out.ir_version and out.ir_version < 4:
            # IR 3 (opset <= 8 exporters): every initializer must also be listed as a graph input
            listed = set(self.input_names)
            for t in g.initializer:
                if t.name not in listed:
                    g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
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


def _dynamic_negative_dims(vi: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """A dim declared negative (Paddle writes -1 for "any") is not a size: make it an unnamed dynamic dim."""
    dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []
    if not any(d.HasField("dim_value") and d.dim_value < 0 for d in dims):
        return vi
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(vi)
    for d in copy.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value < 0:
            d.Clear()
    return copy


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


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a node holds as attributes (Loop/Scan body, If branches), in attribute order."""
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def walk_nodes(nodes, depth: int = 0):
    """(depth, node) for every node, each followed by the nodes of its subgraphs (depth + 1), recursively."""
    for node in nodes:
        yield depth, node
        for body in subgraphs(node):
            yield from walk_nodes(body.node, depth + 1)


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
