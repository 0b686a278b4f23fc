"""The one engine that streams layer statistics out of onnxruntime runs, for reconstruction and sparsify.

Pieces:
- `segment_model` / `Runner`: the part of a graph that computes some tensors (their ancestors only), optionally
  starting from already computed tensors instead of the graph inputs;
- `PrefixCache`: computes a tensor batch by batch for a walk through the layers in graph order, resuming from
  the latest cached *frontier* (every tensor produced before a position that a later node reads) instead of the
  graph inputs. A sequential walk that ran the whole prefix for every layer would cost O(L²) node executions;
  with a frontier every node runs O(1) times per walk. A frontier is kept only while it fits `budget` bytes
  (all calibration batches): early layers of a CNN have large activations but short prefixes, so they re-run
  from the inputs; deep layers have small frontiers and resume from them;
- `im2col_rows` / `conv_positions`: Conv input patches at seeded random output positions (so the same rows
  can be taken from two models), tap order t = (ci·kh + r)·kw + s.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from graphprune.feeds import batches, static_batch
from graphprune.ir import Graph, subgraph_outer_names

FRONTIER_BUDGET = 256 << 20        # bytes of cached frontier tensors per PrefixCache


def session(model: onnx.ModelProto, optimize: bool = False):
    """graphprune's one onnxruntime session factory (graphprune/runtime.py)."""
    from graphprune.runtime import session as runtime_session
    return runtime_session(model, optimize=optimize)


def segment_model(graph: Graph, names, available=()) -> onnx.ModelProto:
    """The nodes of `graph` that compute `names` (ancestors only, stopping at `available` tensors, which become
    graph inputs), with `names` as its outputs."""
    available = set(available)
    need = set(names)
    keep = []
    for node in reversed(graph.nodes):
        if any(o in need and o not in available for o in node.output):
            keep.append(node)
            need.update(i for i in node.input if i)
            need.update(subgraph_outer_names(node))
    model = graph.to_model(with_value_info=False)
    g = model.graph
    del g.node[:]
    g.node.extend(reversed(keep))
    inits = [t for t in g.initializer if t.name in need]
    del g.initializer[:]
    g.initializer.extend(inits)
    inputs = [i for i in g.input if i.name in need and i.name not in available]
    inputs += [helper.make_tensor_value_info(n, graph.dtypes.get(n, onnx.TensorProto.FLOAT), None)
               for n in sorted(available & need)]
    del g.input[:]
    g.input.extend(inputs)
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
        self.sess = session(model, optimize)

    def __call__(self, feed: dict) -> dict:
        return dict(zip(self.names, self.sess.run(self.names, {k: feed[k] for k in self.inputs})))


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
    before it must not change (their outputs may be cached)."""

    def __init__(self, graph: Graph, feed_list: list[dict], budget: int = FRONTIER_BUDGET, optimize: bool = True):
        self.graph = graph
        self.feeds = feed_list
        self.budget = budget
        self.optimize = optimize
        self.cut = 0                       # position of the cached frontier (0: the graph inputs)
        self.cached = feed_list            # per batch {name: value} at self.cut
        self.runs = 0                      # onnxruntime sessions built (for the report)

    def _predicted_bytes(self, names) -> int | None:
        """Bytes of `names` over all samples from the inferred shapes (None when a dim besides the batch
        is unknown)."""
        samples = sum(len(next(iter(f.values()))) for f in self.feeds)
        total = 0
        for n in names:
            shape = self.graph.shape(n)
            if not shape or not all(isinstance(d, int) for d in shape[1:]):
                return None
            elem = helper.tensor_dtype_to_np_dtype(self.graph.dtypes.get(n, onnx.TensorProto.FLOAT)).itemsize
            total += samples * int(np.prod(shape[1:], dtype=np.int64)) * elem
        return total

    def values(self, names, position: int):
        """Yields (batch index, {name: value}) for `names`, all computed by nodes before `position` (or by the
        nodes that compute them, when none of those is at or after `position`), and moves the cache to the
        frontier at `position` when it fits the budget."""
        names = list(dict.fromkeys(names))
        front = frontier(self.graph, position) if position > self.cut else []
        available = set(self.cached[0]) if self.cached else set()
        wanted = [n for n in names if n not in available]
        wanted += [n for n in front if n not in wanted and n not in available]
        runner = Runner(self.graph, wanted, available, self.optimize) if wanted else None
        self.runs += runner is not None
        keep, size = bool(front), 0
        predicted = self._predicted_bytes(front)
        if predicted is not None and predicted > self.budget:
            keep = False                  # known too big: do not even ask onnxruntime for the frontier
            wanted = [n for n in names if n not in available]
            runner = Runner(self.graph, wanted, available, self.optimize) if wanted else None
        new_cache = []
        for b, cached in enumerate(self.cached):
            got = dict(cached)
            if runner is not None:
                got.update(runner(cached))
            if keep:
                entry = {n: (got[n] if n in got else cached[n]) for n in front}
                size += sum(v.nbytes for v in entry.values())
                if size * len(self.cached) / (b + 1) > self.budget:   # projected over all batches
                    keep, new_cache = False, []
                else:
                    new_cache.append(entry)
            yield b, {n: got[n] for n in names}
        if keep:
            self.cut, self.cached = position, new_cache


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
