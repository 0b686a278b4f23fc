"""The one engine that streams layer statistics out of onnxruntime runs, for reconstruction and sparsify.

Pieces:
- `segment_model` / `Runner`: the part of a graph that computes some tensors (their ancestors only), optionally
  starting from already computed tensors instead of the graph inputs;
- `PrefixCache`: computes a tensor batch by batch for a walk through the layers in graph order, resuming from
  the latest cached *frontier* (every tensor produced before a position that a later node reads) instead of the
  graph inputs. A sequential walk that ran the whole prefix for every layer would cost O(L²) node executions;
  with a frontier every node runs O(1) times per walk. A frontier is kept only while it fits `budget` bytes
  (all calibration batches); where the frontier at the position asked for does not fit, the latest earlier one
  that does (sizes predicted from the inferred shapes in one sweep): in a MobileNet block the wide expanded
  tensors sit between narrow block inputs, so an early layer re-runs one block instead of the whole prefix;
- `im2col_rows` / `conv_positions`: Conv input patches at seeded random output positions (so the same rows
  can be taken from two models), tap order t = (ci·kh + r)·kw + s; `conv_columns`: the same patches as
  columns [G, Cin_g·k, n], gathered without a padded copy (reconstruction's Gram layout).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.feeds import batches, static_batch
from graphprune.ir import Graph, subgraph_outer_names

FRONTIER_BUDGET = 256 << 20        # bytes of cached frontier tensors per PrefixCache


def session(model: onnx.ModelProto, optimize: bool = False):
    """graphprune's one onnxruntime session factory (graphprune/runtime.py)."""
    from graphprune.runtime import session as runtime_session
    return runtime_session(model, optimize=optimize)


def segment_model(graph: Graph, names, available=()) -> onnx.ModelProto:
    """The nodes of `graph` that compute `names` (ancestors only, stopping at `available` tensors, which become
    graph inputs), with `names` as its outputs. Only the weights those nodes read are serialised (a walk builds
    one segment per step; converting every weight each time cost more than running the small ones)."""
    available = set(available)
    need = set(names)
    keep = []
    for node in reversed(graph.nodes):
        if any(o in need and o not in available for o in node.output):
            keep.append(node)
            need.update(i for i in node.input if i)
            need.update(subgraph_outer_names(node))
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)          # the shell: opsets, functions, metadata; no weights
    g = model.graph
    del g.node[:]
    g.node.extend(reversed(keep))
    del g.initializer[:]
    g.initializer.extend(numpy_helper.from_array(arr, name) for name, arr in graph.initializers.items()
                         if name in need and name not in available)
    del g.value_info[:]
    inputs = [i for i in graph.inputs if i.name in need and i.name not in available]
    inputs += [helper.make_tensor_value_info(n, graph.dtypes.get(n, onnx.TensorProto.FLOAT), None)
               for n in sorted(available & need)]
    del g.input[:]
    g.input.extend(inputs)
    if model.ir_version and model.ir_version < 4:      # IR 3: initializers are listed as inputs too
        g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer)
    del g.output[:]
    g.output.extend(helper.make_tensor_value_info(n, graph.dtypes.get(n, onnx.TensorProto.FLOAT), None)
                    for n in names)
    return model


def exposing(graph: Graph, names) -> onnx.ModelProto:
    """The part of the model that computes `names` from the graph inputs, with `names` as its outputs."""
    return segment_model(graph, names)


class Runner:
    """Computes some tensors of a graph for a feed, running only the part of the model that produces them
    (from the graph inputs, or from `available` tensors the feed supplies)."""

    def __init__(self, graph: Graph, names, available=(), optimize: bool = False):
        self.names = list(dict.fromkeys(names))
        model = segment_model(graph, self.names, available)
        self.inputs = [i.name for i in model.graph.input]
        self.nodes = len(model.graph.node)
        self.sess = session(model, optimize)

    def __call__(self, feed: dict) -> dict:
        return dict(zip(self.names, self.sess.run(self.names, {k: feed[k] for k in self.inputs})))


def pack(items: list, size, budget: float) -> list[list]:
    """Consecutive runs of `items` whose `size(item)` add up to at most `budget` (an item larger than the budget
    gets a run of its own): how many layers one calibration run may serve within a memory bound."""
    runs, current, used = [], [], 0
    for item in items:
        need = size(item)
        if current and used + need > budget:
            runs.append(current)
            current, used = [], 0
        current.append(item)
        used += need
    return runs + ([current] if current else [])


def feed_batches(graph: Graph, feeds: dict, batch: int = 16) -> list[dict]:
    """The calibration samples in the batches every run uses (the model's static batch, if it has one)."""
    return list(batches(feeds, static_batch(graph.inputs) or batch))


def frontier(graph: Graph, position: int) -> list[str]:
    """Tensors produced before node `position` (graph inputs included) that a node at or after it reads."""
    produced = set(graph.input_names)
    for node in graph.nodes[:position]:
        produced.update(o for o in node.output if o)
    later = set()
    for node in graph.nodes[position:]:
        later.update(i for i in node.input if i)
        later.update(subgraph_outer_names(node))
    return sorted(produced & later)


class PrefixCache:
    """Tensors of `graph` batch by batch, for a walk through it in graph order (see the module docstring).
    The caller may change the weights of nodes at or after the last position asked for between calls; nodes
    before it must not change (their outputs may be cached), unless it calls `reset` first."""

    def __init__(self, graph: Graph, feed_list: list[dict], budget: int = FRONTIER_BUDGET, optimize: bool = True):
        self.graph = graph
        self.feeds = feed_list
        self.budget = budget
        self.optimize = optimize
        self.runs = 0                      # onnxruntime sessions built (for the report)
        self.node_runs = 0                 # node executions (one node on one batch), for the report
        self._sizes = None                 # predicted frontier bytes per position (see _frontier_sizes)
        self.reset()

    def reset(self) -> None:
        """Forget the cached frontier (after weights before it changed): the next call runs from the inputs."""
        self.cut = 0                       # position of the cached frontier (0: the graph inputs)
        self.cached = self.feeds           # per batch {name: value} at self.cut

    def _tensor_bytes(self, name: str, samples: int) -> int | None:
        shape = self.graph.shape(name)
        if not shape or not all(isinstance(d, int) for d in shape[1:]):
            return None
        elem = helper.tensor_dtype_to_np_dtype(self.graph.dtypes.get(name, onnx.TensorProto.FLOAT)).itemsize
        return samples * int(np.prod(shape[1:], dtype=np.int64)) * elem

    def _predicted_bytes(self, names) -> int | None:
        """Bytes of `names` over all samples from the inferred shapes (None when a dim besides the batch
        is unknown)."""
        samples = sum(len(next(iter(f.values()))) for f in self.feeds)
        sizes = [self._tensor_bytes(n, samples) for n in names]
        return None if any(s is None for s in sizes) else sum(sizes)

    def _frontier_sizes(self) -> list:
        """Predicted bytes of the frontier at every position 0..N (None where a member's size is unknown), in one
        sweep: a tensor produced by node i (graph inputs: i = -1) is in the frontier at p for i < p ≤ its last
        reader."""
        if self._sizes is not None:
            return self._sizes
        g = self.graph
        samples = sum(len(next(iter(f.values()))) for f in self.feeds)
        n = len(g.nodes)
        last = {}
        for pos, node in enumerate(g.nodes):
            for name in list(node.input) + sorted(subgraph_outer_names(node)):
                if name:
                    last[name] = pos
        born = {name: 0 for name in g.input_names}
        for pos, node in enumerate(g.nodes):
            born.update((o, pos + 1) for o in node.output if o)
        size, unknown = np.zeros(n + 2, np.int64), np.zeros(n + 2, np.int64)
        for name, start in born.items():
            end = last.get(name, -1)
            if end < start:
                continue
            b = self._tensor_bytes(name, samples)
            arr, value = (unknown, 1) if b is None else (size, b)
            arr[start] += value
            arr[end + 1] -= value
        size, unknown = np.cumsum(size), np.cumsum(unknown)
        self._sizes = [None if unknown[p] else int(size[p]) for p in range(n + 1)]
        return self._sizes

    def _cut_for(self, position: int) -> int:
        """Where to cache the frontier for a walk that reached `position`: there, if it fits the budget (or its size
        is only known at run time); else the latest earlier position whose frontier is known to fit (in a
        MobileNet block the input is narrow and the expanded tensors are wide: resuming from the block input
        re-runs one block, not the whole prefix); else nowhere (self.cut)."""
        if position <= self.cut:
            return self.cut
        sizes = self._frontier_sizes()
        if position >= len(sizes) or sizes[position] is None or sizes[position] <= self.budget:
            return position
        for p in range(position - 1, self.cut, -1):
            if sizes[p] is not None and sizes[p] <= self.budget:
                return p
        return self.cut

    def values(self, names, position: int, batches=None):
        """Yields (batch index, {name: value}) for `names`, all computed by nodes before `position` (or by the
        nodes that compute them, when none of those is at or after `position`), and moves the cache to the
        frontier at `position` (or an earlier one, see _cut_for) when it fits the budget. `batches`: only these
        batch indices, and the cache stays where it is."""
        names = list(dict.fromkeys(names))
        cut = self._cut_for(position) if batches is None else self.cut
        front = frontier(self.graph, cut) if cut > self.cut else []
        available = set(self.cached[0]) if self.cached else set()
        wanted = [n for n in names if n not in available]
        wanted += [n for n in front if n not in wanted and n not in available]
        runner = Runner(self.graph, wanted, available, self.optimize) if wanted else None
        self.runs += runner is not None
        keep, size = bool(front), 0
        new_cache = []
        for b, cached in enumerate(self.cached):
            if batches is not None and b not in batches:
                continue
            got = dict(cached)
            if runner is not None:
                got.update(runner(cached))
                self.node_runs += runner.nodes
            if keep:
                entry = {n: (got[n] if n in got else cached[n]) for n in front}
                size += sum(v.nbytes for v in entry.values())
                if size * len(self.cached) / (b + 1) > self.budget:   # projected over all batches
                    keep, new_cache = False, []
                else:
                    new_cache.append(entry)
            yield b, {n: got[n] for n in names}
        if keep:
            self.cut, self.cached = cut, new_cache


# ---- rows -------------------------------------------------------------------------------------------------
def conv_output_size(x_shape, conv: dict) -> tuple[int, int]:
    kh, kw = conv["kernel_shape"]
    sh, sw = conv["strides"]
    dh, dw = conv["dilations"]
    top, left, bottom, right = conv["pads"]
    h, w = x_shape[2:]
    return ((h + top + bottom - dh * (kh - 1) - 1) // sh + 1, (w + left + right - dw * (kw - 1) - 1) // sw + 1)


def conv_positions(batch: int, out_hw: tuple[int, int], pick_rows: int, rng) -> np.ndarray:
    """Flat indices (b·ho·wo + i·wo + j) of up to `pick_rows` random output positions, sorted."""
    total = batch * out_hw[0] * out_hw[1]
    if total <= pick_rows:
        return np.arange(total)
    return np.sort(rng.choice(total, pick_rows, replace=False))


def im2col_at(x: np.ndarray, conv: dict, pick: np.ndarray) -> np.ndarray:
    """[n, Cin, kh, kw] input patches of a Conv at the flat output positions `pick` (one gather of [n, Cin]
    per tap; a 1×1 unpadded conv needs no padded copy)."""
    kh, kw = conv["kernel_shape"]
    sh, sw = conv["strides"]
    dh, dw = conv["dilations"]
    top, left, bottom, right = conv["pads"]
    ho, wo = conv_output_size(x.shape, conv)
    bi, rest = np.divmod(pick, ho * wo)
    oi, oj = np.divmod(rest, wo)
    if (kh, kw) == (1, 1) and not any(conv["pads"]):
        return x[bi, :, oi * sh, oj * sw][:, :, None, None]
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right))) if any(conv["pads"]) else x
    out = np.empty((len(pick), x.shape[1], kh, kw), dtype=x.dtype)
    for r in range(kh):
        for t in range(kw):
            out[:, :, r, t] = xp[bi, :, oi * sh + r * dh, oj * sw + t * dw]
    return out


def im2col_rows(x: np.ndarray, conv: dict, pick_rows: int, rng) -> np.ndarray:
    """[n, Cin·kh·kw] input patches of a Conv at up to `pick_rows` random output positions."""
    pick = conv_positions(x.shape[0], conv_output_size(x.shape, conv), pick_rows, rng)
    return im2col_at(x, conv, pick).reshape(len(pick), -1)


def at_positions(y: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """[n, C] values of an NCHW tensor at flat output positions `pick` (as conv_positions numbers them)."""
    b, c, h, w = y.shape
    bi, rest = np.divmod(pick, h * w)
    return y.reshape(b, c, h * w)[bi, :, rest]


def conv_taps(hw: tuple, conv: dict, oi: np.ndarray, oj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For output rows `oi`, cols `oj` of a Conv over an H×W input: the flat input position i·W + j every tap
    (r, s) reads, [kh·kw, n] (clamped into the input where it falls in the padding), and whether it lies inside."""
    kh, kw = conv["kernel_shape"]
    sh, sw = conv["strides"]
    dh, dw = conv["dilations"]
    top, left = conv["pads"][:2]
    h, w = hw
    ii = (oi * sh - top)[None, :] + (np.arange(kh) * dh)[:, None]           # [kh, n]
    jj = (oj * sw - left)[None, :] + (np.arange(kw) * dw)[:, None]          # [kw, n]
    ii, jj = np.broadcast_to(ii[:, None], (kh, kw, len(oi))), np.broadcast_to(jj[None], (kh, kw, len(oi)))
    valid = ((ii >= 0) & (ii < h) & (jj >= 0) & (jj < w)).reshape(kh * kw, -1)
    flat = (np.clip(ii, 0, h - 1) * w + np.clip(jj, 0, w - 1)).reshape(kh * kw, -1)
    return flat, valid


def conv_columns(x: np.ndarray, conv: dict, groups: int, pick: np.ndarray) -> np.ndarray:
    """[G, Cin_g·kh·kw, n] the im2col rows of a Conv at the flat output positions `pick`, as columns, one block per
    group (tap order as im2col_at). Gathered straight from the NCHW input, no padded copy: a tap that falls in
    the padding reads a clamped position and is zeroed. Columns are the layout the Gram products want
    (XᵀX = A·Aᵀ, XᵀY = A·Y for A = Xᵀ), and a depthwise layer's blocks come out without a transpose."""
    b, c, h, w = x.shape
    ho, wo = conv_output_size(x.shape, conv)
    bi, rest = np.divmod(pick, ho * wo)
    flat, valid = conv_taps((h, w), conv, *np.divmod(rest, wo))
    cols = x.reshape(b, c, h * w).transpose(1, 0, 2)[:, np.broadcast_to(bi, flat.shape), flat]   # [C, T, n]
    if not valid.all():
        cols *= valid
    return cols.reshape(groups, c // groups * flat.shape[0], len(pick))
