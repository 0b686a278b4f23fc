"""Normalise any exporter's graph: constants as initializers, no Identity/Dropout, folded shape arithmetic,
exporter-lowered LayerNorms fused back (lowered_norms.py), unique node names, topological order, fresh shapes."""
from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.errors import ModelLoadError
from graphprune.ir import FLOAT_TYPES, Graph, attr, dependency_order, subgraph_outer_names, subgraphs, walk_nodes

from .lowered_norms import fuse_lowered_layer_norms

NON_FOLDABLE = {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "RandomNormal", "RandomUniform",
                "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "If", "Loop", "Scan"}
# Folding a big weight transform just moves bytes around; folding shape arithmetic is what rules need. Low-bit
# weights stay quantized: folding their DequantizeLinear/Cast/Mul would store them as float, 4x larger.
FOLD_LIMIT = 1 << 22
LOW_BIT_TYPES = {np.int8, np.uint8, np.int16, np.uint16}
# Shared float initializers up to this size are copied apart (untie_small_shared); larger ones are real ties.
UNTIE_LIMIT = 4096


def canonicalize(graph: Graph) -> dict:
    stats = {"hoisted": flatten_subgraph_scopes(graph)}
    stats["constants"] = _constants_to_initializers(graph)
    stats["removed"] = _drop_passthrough(graph)
    _explicit_default_axes(graph)
    _toposort(graph)
    _name_nodes(graph)
    graph.reindex()
    graph.infer_shapes()
    stats["folded"] = fold_to_fixed_point(graph)
    stats["untied"] = untie_small_shared(graph)
    refine_shapes(graph)
    stats["probed"] = probe_shapes(graph)
    if stats["probed"]:  # measured shapes make more shape reads static: fold them too
        stats["folded"] += fold_to_fixed_point(graph)
        refine_shapes(graph)
    # after folding: the lowering's shape arithmetic is literal by now, and its shapes are known
    stats["fused_norms"] = fuse_lowered_layer_norms(graph)
    if stats["fused_norms"]:
        graph.infer_shapes()
        refine_shapes(graph)
    return stats


def fold_to_fixed_point(graph: Graph, hints: dict | None = None, rounds: int = 32) -> int:
    """Fold, re-infer, repeat: a folded shape computation gives static shapes further down (TF-style 'same'
    padding computes every Pad from the Shape of the previous Pad's output)."""
    total = 0
    for _ in range(rounds):
        n = fold_constants(graph)
        graph.reindex()
        graph.infer_shapes(hints)
        total += n
        if not n:
            break
    return total


def untie_small_shared(graph: Graph, limit: int = UNTIE_LIMIT) -> int:
    """Give each consumer its own copy of a small shared float initializer. Exporters de-duplicate equal
    tensors (all-ones BN scales, zero biases), which would couple unrelated layers; a copy is exact. Large
    shared weights (tied embeddings) stay shared: that tie is real and is pruned as one coupling."""
    n = 0
    for name, arr in list(graph.initializers.items()):
        if arr.dtype.kind != "f" or arr.size > limit or arr.size < 2:
            continue
        # a Loop/Scan/If input is not a reader of its own: its body reads the value (a loop-invariant weight the
        # Loop carries is the weight its body's MatMul reads, and must stay that one tensor)
        uses = [u for u in graph.uses.get(name, []) if u[1] >= 0 and not subgraphs(u[0])]
        if len({id(node) for node, _ in uses}) < 2 or name in graph.output_names:
            continue
        for node, i in uses[1:]:
            node.input[i] = graph.add_initializer(name, arr)
            n += 1
    if n:
        graph.reindex()
        graph.infer_shapes()
    return n


def probe_shapes(graph: Graph, bases=(32, 48)) -> int:
    """Where static inference leaves float tensors without a full shape (exporter idioms onnx cannot follow),
    run the model twice in onnxruntime with different values for every dynamic input dim: a dim that is equal
    in both runs is static; the others get a symbolic name, the input's own where the pair of sizes matches
    one input dim, so equal dynamic dims compare equal downstream. Returns the number of tensors refined."""
    # onnx infers no type at all behind ops whose function body it cannot expand (GroupNormalization,
    # MeanVarianceNormalization without axes, onnxruntime ops in the ONNX domain): guess the type of the
    # node's first input (a wrong guess only makes the session below fail, which skips probing as before);
    # where onnxruntime registers the op's schema (com.microsoft ops), its type constraints decide instead, so an
    # integer output (EmbedLayerNormalization's mask_index) is not guessed float behind an integer first input
    for node in graph.nodes:
        from_schema = _schema_output_types(node, graph.dtypes)
        for k, o in enumerate(node.output):
            if not o or o in graph.dtypes:
                continue
            if from_schema.get(k) is not None:
                graph.dtypes[o] = from_schema[k]
            elif node.input and graph.dtypes.get(node.input[0]) in FLOAT_TYPES:
                graph.dtypes[o] = graph.dtypes[node.input[0]]
    unknown = [n for n in _value_names(graph) if graph.dtypes.get(n) in FLOAT_TYPES and
               (graph.shape(n) is None or any(d is None for d in graph.shape(n)))]
    if not unknown:
        return 0
    from graphprune.feeds import random_feeds
    from graphprune.runtime import expose, run, session
    model = expose(graph.to_model(with_value_info=False), unknown, graph.dtypes)
    symbols = _symbolic_dims(graph)
    try:
        sess = session(model, log_level=4)
        runs = []
        for r, base in enumerate(bases):
            values = {name: (1 + r if first else base * (k + 1)) for k, (name, first) in enumerate(symbols)}
            feed = random_feeds(graph, 1, seed=0, dims=values)[0]
            runs.append([np.shape(o) for o in run(sess, feed, unknown).values()])
    except Exception:
        return 0
    by_pair = {((1, 2) if first else (bases[0] * (k + 1), bases[1] * (k + 1))): name
               for k, (name, first) in enumerate(symbols)}
    hints = {}
    for name, a, b in zip(unknown, runs[0], runs[1]):
        if len(a) != len(b):
            continue
        hints[name] = tuple(int(x) if x == y else by_pair.get((int(x), int(y)), f"dyn_{x}_{y}")
                            for x, y in zip(a, b))
    graph.infer_shapes(hints)
    for name, d in hints.items():  # onnx may drop hints it cannot merge; keep what we measured
        cur = graph.shape(name)
        if cur is None or any(x is None for x in cur):
            graph.shapes[name] = d
    return len(hints)


_ORT_TYPE_NAMES = {f"tensor({k})": v for k, v in (
    ("float", onnx.TensorProto.FLOAT), ("float16", onnx.TensorProto.FLOAT16), ("double", onnx.TensorProto.DOUBLE),
    ("bfloat16", onnx.TensorProto.BFLOAT16), ("int32", onnx.TensorProto.INT32), ("int64", onnx.TensorProto.INT64),
    ("int8", onnx.TensorProto.INT8), ("uint8", onnx.TensorProto.UINT8), ("bool", onnx.TensorProto.BOOL))}


@functools.lru_cache(maxsize=1)
def _ort_schemas() -> dict:
    """(domain, op) -> onnxruntime's schemas of that op, newest first (empty without the schema API)."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
        schemas = ort_state.get_all_operator_schema()
    except Exception:
        return {}
    out: dict = {}
    for s in schemas:
        out.setdefault((s.domain if s.domain != "ai.onnx" else "", s.name), []).append(s)
    for v in out.values():
        v.sort(key=lambda s: -s.since_version)
    return out


def _schema_output_types(node, dtypes) -> dict:
    """Output index -> element type, from onnxruntime's schema of a non-ONNX-domain op: an output whose type
    parameter some input shares takes that input's type, one allowed a single type takes it. Outputs the
    schema leaves open (or ops without one) are missing: the caller guesses those."""
    if node.domain in ("", "ai.onnx"):
        return {}
    found = _ort_schemas().get((node.domain, node.op_type))
    if not found:
        return {}
    schema = found[0]
    allowed = {t.type_param_str: t.allowed_type_strs for t in schema.type_constraints}
    if not schema.inputs or not schema.outputs:
        return {}
    by_param: dict = {}
    for i, name in enumerate(node.input):
        formal = schema.inputs[min(i, len(schema.inputs) - 1)]
        if name and name in dtypes:
            by_param.setdefault(formal.typeStr, dtypes[name])
    out = {}
    for k in range(len(node.output)):
        param = schema.outputs[min(k, len(schema.outputs) - 1)].typeStr
        if param in by_param:
            out[k] = by_param[param]
        elif len(allowed.get(param, [])) == 1 or param in _ORT_TYPE_NAMES:
            out[k] = _ORT_TYPE_NAMES.get(allowed[param][0] if param in allowed else param)
    return out


def _symbolic_dims(graph: Graph) -> list[tuple[str, bool]]:
    """Dynamic input dims in order of appearance: (name, is it a leading (batch) axis)."""
    out: dict[str, bool] = {}
    for vi in graph.inputs:
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if not d.HasField("dim_value") and d.dim_param:
                out.setdefault(d.dim_param, k == 0)
    return list(out.items())


def _value_names(graph: Graph):
    for node in graph.nodes:
        for o in node.output:
            if o:
                yield o


def refine_shapes(graph: Graph, rounds: int = 4) -> None:
    """Fill Reshape output dims onnx could not infer (a target built from Shape->Gather of a dynamic dim and
    constants), then re-infer downstream. Repeats while that helps and folds what became static."""
    hints: dict[str, tuple] = {}
    for _ in range(rounds):
        found = False
        for node in graph.nodes:
            if node.op_type != "Reshape":
                continue
            y = node.output[0]
            cur = graph.shape(y)
            if cur is not None and all(d is not None for d in cur):
                continue
            dims = _reshape_dims(graph, node)
            if dims is not None and dims != cur:
                hints[y] = dims
                found = True
        if not found:
            return
        graph.infer_shapes(hints)
        fold_to_fixed_point(graph, hints)


def _shape_values(graph: Graph, name: str, depth: int = 0):
    """Per position of a shape tensor: int constant, symbolic dim name, or None."""
    value = graph.const(name)
    if value is not None:
        return [int(v) for v in value.reshape(-1)]
    node = graph.producer.get(name)
    if node is None or depth > 8:
        return None
    if node.op_type == "Concat":
        out = []
        for piece in node.input:
            sub = _shape_values(graph, piece, depth + 1)
            if sub is None:
                return None
            out.extend(sub)
        return out
    if node.op_type in ("Unsqueeze", "Cast", "Squeeze", "Identity"):
        return _shape_values(graph, node.input[0], depth + 1)
    if node.op_type == "Gather" and graph.const(node.input[1]) is not None:
        src = graph.producer.get(node.input[0])
        if src is not None and src.op_type == "Shape":
            shape = graph.shape(src.input[0])
            if shape is None:
                return None
            full = list(shape)[slice(attr(src, "start", 0), attr(src, "end", len(shape)))]
            return [full[int(i) % len(full)] for i in graph.const(node.input[1]).reshape(-1)]
    if node.op_type == "Shape":
        shape = graph.shape(node.input[0])
        return None if shape is None else list(shape)[slice(attr(node, "start", 0), attr(node, "end", len(shape)))]
    return None


def _reshape_dims(graph: Graph, node):
    xs = graph.shape(node.input[0])
    values = _shape_values(graph, node.input[1])
    if xs is None or values is None or any(v is None for v in values) or any(d is None for d in xs):
        return None
    dims = [xs[k] if v == 0 else v for k, v in enumerate(values)]
    if sum(1 for d in dims if d == -1) > 1:
        return None
    if -1 in dims:
        static_in = int(np.prod([d for d in xs if isinstance(d, int)]))
        static_out = int(np.prod([d for d in dims if isinstance(d, int) and d != -1]))
        sym_in = sorted(d for d in xs if isinstance(d, str))
        sym_out = sorted(d for d in dims if isinstance(d, str))
        if sym_in != sym_out or static_out == 0 or static_in % static_out:
            return None
        dims[dims.index(-1)] = static_in // static_out
    return tuple(dims)


def _hoist_constants(graph: Graph, nodes, outputs) -> tuple[list, int]:
    """Turn the standard Constants among `nodes` into initializers of `graph` (not those that are themselves a
    graph/body output). Returns (the remaining nodes, how many were hoisted)."""
    kept, n = [], 0
    for node in nodes:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            graph.set_initializer(node.output[0], _constant_value(node))
            n += 1
        else:
            kept.append(node)
    return kept, n


def _constants_to_initializers(graph: Graph) -> int:
    graph.nodes, n = _hoist_constants(graph, graph.nodes, set(graph.output_names))
    return n


def _constant_value(node) -> np.ndarray:
    a = node.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    if a.name == "value_float":
        return np.array(a.f, dtype=np.float32)
    if a.name == "value_floats":
        return np.array(list(a.floats), dtype=np.float32)
    if a.name == "value_int":
        return np.array(a.i, dtype=np.int64)
    if a.name == "value_ints":
        return np.array(list(a.ints), dtype=np.int64)
    if a.name == "sparse_value":
        from onnx.reference.ops.op_constant import _check_dtype  # noqa: F401
        raise NotImplementedError("sparse Constant")
    raise NotImplementedError(f"Constant with attribute {a.name}")


# ---- subgraph bodies ---------------------------------------------------------------------------------------------
def flatten_subgraph_scopes(graph: Graph) -> int:
    """Make Loop/Scan/If bodies readable by the same rules as the main graph: every name a body defines gets a
    name no other scope uses (a body may shadow an outer name), body initializers and Constants move to the top
    level (every body sees it; the rewrite then slices them like any weight), a Loop's loop-invariant carried
    values (the body passes them through unchanged: tf2onnx carries the weights) are read from the outer value
    directly, so a body MatMul sees a constant weight, and stale body value_info is dropped (it is re-inferred).
    Returns the number of constants hoisted."""
    if not graph.body_nodes():
        return 0
    taken = set(graph.input_names) | set(graph.initializers) | set(graph.output_names)
    taken |= {o for node in graph.nodes for o in node.output}
    hoisted = 0
    for node in graph.nodes:
        for body in _control_flow_bodies(node):
            hoisted += _flatten_body(graph, body, {}, taken)
        _read_invariants_from_outside(node)
    graph.reindex()
    return hoisted


def _control_flow_bodies(node) -> list:
    """The bodies of an ONNX Loop/Scan/If (the ones channel rules follow); other ops' subgraphs (onnxruntime's
    BeamSearch decoder, ...) may bind names their own way and stay as they are."""
    if node.op_type in ("Loop", "Scan", "If") and node.domain in ("", "ai.onnx"):
        return subgraphs(node)
    return []


def _fresh(base: str, taken: set) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}__s{k}"
    taken.add(name)
    return name


def _flatten_body(graph: Graph, body: onnx.GraphProto, outer_rename: dict, taken: set) -> int:
    """Rename `body`'s local names apart from every other scope (outer_rename: the names the enclosing scopes
    renamed, which this body may read), hoist its constants, recurse into nested bodies."""
    rename = dict(outer_rename)
    local = [v.name for v in body.input] + [t.name for t in body.initializer] + \
        [o for n in body.node for o in n.output if o]
    for name in local:
        # a local name shadows any outer one: inside this body it is always the local tensor
        rename[name] = _fresh(name, taken) if name in taken else name
        taken.add(rename[name])
    for v in list(body.input) + list(body.output):
        v.name = rename.get(v.name, v.name)
    for t in body.initializer:
        t.name = rename[t.name]
    for n in body.node:
        for i, name in enumerate(n.input):
            n.input[i] = rename.get(name, name)
        for i, name in enumerate(n.output):
            n.output[i] = rename.get(name, name)
    del body.value_info[:]
    n_hoisted = 0
    outputs = {o.name for o in body.output}
    for t in list(body.initializer):
        if t.name not in outputs:
            graph.set_initializer(t.name, numpy_helper.to_array(t))
            body.initializer.remove(t)
            n_hoisted += 1
    kept, hoisted = _hoist_constants(graph, body.node, outputs)
    n_hoisted += hoisted
    del body.node[:]
    body.node.extend(kept)
    for n in body.node:
        for nested in _control_flow_bodies(n):  # a nested body reads this scope's names under their new names
            n_hoisted += _flatten_body(graph, nested, {k: v for k, v in rename.items() if k != v}, taken)
        _read_invariants_from_outside(n)
    return n_hoisted


def _read_invariants_from_outside(node: onnx.NodeProto) -> None:
    """A Loop carried value the body returns unchanged equals its initial value in every iteration: the body's
    nodes read the outer initial value instead (the carried slot stays, so the Loop's outputs do not change)."""
    if node.op_type != "Loop" or node.domain not in ("", "ai.onnx"):
        return
    body = subgraphs(node)[0]
    ins, outs = [v.name for v in body.input], [v.name for v in body.output]
    swap = {}
    for k in range(2, min(len(ins), len(node.input), len(outs) + 1)):
        if outs[k - 1] == ins[k] and node.input[k]:
            swap[ins[k]] = node.input[k]
    if not swap:
        return
    for n in body.node:
        for i, name in enumerate(n.input):
            n.input[i] = swap.get(name, name)
        _rename_in_subgraphs(n, swap)


def _explicit_default_axes(graph: Graph) -> None:
    """MeanVarianceNormalization without `axes`: write the default [0, 2, 3] out. onnx 1.23's function-body
    inference fails without it, and the strict check after pruning then refuses the model."""
    for node in graph.nodes:
        if node.op_type == "MeanVarianceNormalization" and node.domain in ("", "ai.onnx") \
                and attr(node, "axes") is None:
            node.attribute.append(helper.make_attribute("axes", [0, 2, 3]))


def _drop_passthrough(graph: Graph) -> int:
    """Remove Identity and inference-mode Dropout by renaming their consumers' inputs."""
    outputs = set(graph.output_names)
    rename: dict[str, str] = {}
    kept, n = [], 0
    for node in graph.nodes:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        passthrough = node.op_type == "Identity" or (
            node.op_type == "Dropout" and (len(node.output) < 2 or not node.output[1])
            and (len(node.input) < 3 or not node.input[2]))
        if passthrough and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            rename[node.output[0]] = node.input[0]
            n += 1
            continue
        kept.append(node)
    if rename:
        for node in kept:
            _rename_in_subgraphs(node, rename)
    graph.nodes = kept
    return n


def _rename_in_subgraphs(node, rename):
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for n in g.node:
                for i, name in enumerate(n.input):
                    if name in rename:
                        n.input[i] = rename[name]
                _rename_in_subgraphs(n, rename)


def _toposort(graph: Graph) -> None:
    available = set(graph.input_names) | set(graph.initializers) | {""}
    producers = {}
    for idx, node in enumerate(graph.nodes):
        for o in node.output:
            producers[o] = idx
    deps = []
    for node in graph.nodes:
        needs = {i for i in list(node.input) + sorted(subgraph_outer_names(node)) if i not in available}
        deps.append({producers[i] for i in needs if i in producers})
    order = dependency_order(deps)
    if len(order) < len(graph.nodes):
        raise ModelLoadError(_cycle_message(graph.nodes, deps))
    graph.nodes = [graph.nodes[i] for i in order]


def _cycle_message(nodes, deps) -> str:
    """Name the nodes of one cycle of the node dependency graph (deps[i]: the nodes node i reads from)."""
    import networkx as nx
    dependencies = nx.DiGraph((p, i) for i, d in enumerate(deps) for p in d)
    cycle = [u for u, _ in nx.find_cycle(dependencies)]

    def describe(i):
        node = nodes[i]
        return f"{node.op_type} node '{node.name or node.output[0]}'"
    path = " -> ".join(describe(i) for i in cycle + cycle[:1])
    return f"the graph has a cycle: {describe(cycle[0])} reads its own output ({path}); ONNX graphs must be acyclic"


def _name_nodes(graph: Graph) -> None:
    seen = set()
    for k, (_, node) in enumerate(walk_nodes(graph.nodes)):  # body nodes too: diagnostics name them
        if not node.name or node.name in seen:
            base = node.name or f"{node.op_type}_{k}"
            name = base
            j = 1
            while name in seen:
                name = f"{base}_{j}"
                j += 1
            node.name = name
        seen.add(node.name)


# ---- constant folding ------------------------------------------------------------------------------------------
def fold_constants(graph: Graph) -> int:
    """Fold nodes whose inputs are all constant, and shape reads of static dims. Weight-only quantised
    weights (low-bit initializer -> Cast/DequantizeLinear) are left as they are."""
    graph.nodes, folded = _fold_nodes(graph, graph.nodes, set(graph.output_names), subgraph_outer_names)
    return folded + _fold_in_bodies(graph, graph.nodes)


def _fold_nodes(graph: Graph, nodes, outputs: set, nested) -> tuple[list, int]:
    """Fold the foldable nodes of one scope into initializers: standard-domain, one output that is not a graph
    (or body) output, and not `nested(node)` (a node whose subgraphs would have to be folded too). Returns the
    nodes kept and how many were folded."""
    kept, folded = [], 0
    for node in nodes:
        value = None
        if node.domain in ("", "ai.onnx") and node.op_type not in NON_FOLDABLE and not nested(node) \
                and len(node.output) == 1 and node.output[0] not in outputs:
            value = _try_fold(graph, node)
        if value is not None:
            graph.set_initializer(node.output[0], value)
            folded += 1
        else:
            kept.append(node)
    return kept, folded


def _fold_in_bodies(graph: Graph, nodes) -> int:
    """Fold inside Loop/Scan/If bodies too (a body Reshape whose target is computed from Shape of a body
    tensor). Bodies were renamed apart, so a folded value becomes a top-level initializer the body reads; a
    body's own outputs stay nodes (the Loop binds them by position)."""
    folded = 0
    for node in nodes:
        for body in _control_flow_bodies(node):
            kept, count = _fold_nodes(graph, body.node, {o.name for o in body.output}, subgraphs)
            folded += count
            if len(kept) < len(body.node):
                del body.node[:]
                body.node.extend(kept)
            folded += _fold_in_bodies(graph, body.node)
    return folded


def _try_fold(graph: Graph, node):
    op = node.op_type
    if op == "Shape":
        shape = graph.shape(node.input[0])
        if shape is None:
            return None
        r = len(shape)
        start, end = attr(node, "start", 0), attr(node, "end", r)
        part = shape[slice(start, end)]
        if all(isinstance(d, int) for d in part):
            return np.array(part, dtype=np.int64)
        return None
    if op == "Size":
        shape = graph.shape(node.input[0])
        if shape is not None and all(isinstance(d, int) for d in shape):
            return np.array(int(np.prod(shape)), dtype=np.int64)
        return None
    if op in ("Gather", "Slice") and _shape_source(graph, node.input[0])[0] is not None \
            and all(graph.is_const(i) for i in node.input[1:] if i):
        return _fold_partial_shape(graph, node)
    inputs = [i for i in node.input if i]
    if not inputs or not all(graph.is_const(i) for i in inputs):
        return None
    arrays = [graph.const(i) for i in inputs]
    if op in ("Cast", "Mul", "DequantizeLinear") and any(a.dtype.type in LOW_BIT_TYPES for a in arrays):
        return None
    # A large float weight that a non-foldable node reads too (tied embedding read by Gather and, through a
    # Transpose, by the LM head) must stay one tensor: folding would store a second copy and silently untie the
    # coupling. When every reader folds (PyTorch's gate reordering Slices of LSTM weights), nothing is copied.
    for name, a in zip(inputs, arrays):
        if a.dtype.kind == "f" and a.size > UNTIE_LIMIT and not all(
                all(graph.is_const(i) for i in user.input if i) for user, _ in graph.uses.get(name, [])):
            return None
    if sum(a.size for a in arrays) > FOLD_LIMIT or _fold_output_too_big(graph, node, arrays):
        return None
    try:
        result = _evaluate(node, graph)
    except Exception:
        return None
    if result is None or result.size > FOLD_LIMIT:
        return None
    return result


def _fold_output_too_big(graph: Graph, node, arrays) -> bool:
    """Whether folding would materialise more than FOLD_LIMIT elements: decided before evaluating, since a
    4 KB model can ask ConstantOfShape/Expand/Tile/Range (or a broadcast) for 10⁹ of them."""
    shape = graph.shape(node.output[0]) if node.output else None
    if shape is not None and all(isinstance(d, int) for d in shape):
        return float(np.prod(shape, dtype=np.float64)) > FOLD_LIMIT
    try:
        op = node.op_type
        if op == "ConstantOfShape":
            n = float(np.prod(arrays[0].astype(np.float64)))
        elif op == "Expand":
            a, b = list(arrays[0].shape), [float(x) for x in arrays[1].reshape(-1)]
            r = max(len(a), len(b))
            a, b = [1] * (r - len(a)) + a, [1.0] * (r - len(b)) + b
            n = float(np.prod([max(x, y) for x, y in zip(a, b)]))
        elif op == "Tile":
            n = arrays[0].size * float(np.prod(arrays[1].astype(np.float64)))
        elif op == "Range":
            start, limit, delta = (float(np.asarray(x).reshape(-1)[0]) for x in arrays[:3])
            n = abs((limit - start) / delta) if delta else float("inf")
        else:
            n = float(np.prod(np.broadcast_shapes(*(a.shape for a in arrays)), dtype=np.float64))
    except Exception:
        return False  # evaluation will fail or be small; FOLD_LIMIT still bounds the result
    return not n <= FOLD_LIMIT


def _shape_source(graph: Graph, name: str, depth: int = 0):
    """(the Shape node, element type) where `name` is Shape(t), possibly cast (tf2onnx reads shapes as int32:
    Shape -> Cast -> Slice), else (None, None)."""
    node = graph.producer.get(name)
    if node is None or depth > 4:
        return None, None
    if node.op_type == "Shape":
        return node, np.int64
    if node.op_type == "Cast" and attr(node, "to") in (onnx.TensorProto.INT32, onnx.TensorProto.INT64):
        src, _ = _shape_source(graph, node.input[0], depth + 1)
        return src, (np.int32 if attr(node, "to") == onnx.TensorProto.INT32 else np.int64)
    return None, None


def _fold_partial_shape(graph: Graph, node):
    """Gather/Slice of a (cast) Shape that picks static dims only: their values, in the shape's element type
    (a channel count read this way becomes a literal that rules rewrite; Div/Mul/Range on it then fold too)."""
    shape_node, dtype = _shape_source(graph, node.input[0])
    shape = graph.shape(shape_node.input[0])
    if shape is None:
        return None
    r = len(shape)
    full = list(shape)[slice(attr(shape_node, "start", 0), attr(shape_node, "end", r))]
    n = len(full)
    if node.op_type == "Gather":
        idx = graph.const(node.input[1])
        picked = [full[int(i) % n] for i in idx.reshape(-1)]
        if all(isinstance(d, int) for d in picked):
            return np.array(picked, dtype=dtype).reshape(idx.shape)
        return None
    starts, ends = graph.const(node.input[1]), graph.const(node.input[2])
    steps = graph.const(node.input[4]) if len(node.input) > 4 and node.input[4] else np.array([1])
    picked = full[slice(int(starts[0]), int(ends[0]), int(steps[0]))]
    if all(isinstance(d, int) for d in picked):
        return np.array(picked, dtype=dtype)
    return None


def _evaluate(node, graph: Graph):
    """Evaluate one node on constant inputs with onnx's reference implementation."""
    from onnx.reference import ReferenceEvaluator
    inputs = [i for i in node.input if i]
    feeds = {name: graph.const(name) for name in inputs}
    vis_in = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(feeds[n].dtype), feeds[n].shape)
              for n in inputs]
    vis_out = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output]
    g = helper.make_graph([node], "fold", vis_in, vis_out)
    model = helper.make_model(g, opset_imports=graph.model.opset_import)
    ref = ReferenceEvaluator(model)
    out = ref.run(None, feeds)[0]
    return np.asarray(out)
