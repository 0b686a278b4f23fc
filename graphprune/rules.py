"""Op rules and the verbs they use: the rule registry, and the `Coupler` that records what each rule declares.

An *element* is one index along one static axis of one tensor (activations and initializers alike). A rule
(one function per op type and opset range, registered with `@rule`) reads its node through the Coupler and
declares which elements must be removed together (`link`, `same`, ...), which cannot be removed (`freeze`,
`not_channel`), which weights read or make channels (`consumer`, `producer`, `contraction`), and how to fix the
node's attributes once channels are gone (`fixup`). `couple(graph)` runs every rule over a graph and returns the
Coupler holding those declarations; graphprune.analysis turns them into groups.

Anything a rule does not declare is frozen: an unknown op never passes channels through silently.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, NamedTuple

import traceback

import numpy as np
import onnx

from .errors import RuleError
from .ir import Graph, attr, subgraph_outer_names, subgraphs
from .registry import Registry

RULES = Registry("channel rule")
rule = RULES.register
NOT_CHANNEL = 0  # reason id reserved for axes that are not channels: never reported as frozen groups


@dataclass
class Consumer:
    """A contraction of an activation axis against a constant weight axis (Conv input channels, MatMul rows)."""
    node: str
    x: str
    x_axis: int
    weight: str
    weight_axis: int
    block: int = 1  # weight entries per input element (Flatten into Gemm: spatial size)


@dataclass
class Contraction:
    """Two activations contracted against each other along coupled axes (attention's Q·Kᵀ): no weight to
    score, but each channel's contribution to the product can be measured from both operands."""
    node: str
    a: str
    a_axis: int
    b: str
    b_axis: int


@dataclass
class Producer:
    """Weight rows that create an output channel (Conv/Gemm output rows, their bias, norm parameters)."""
    node: str
    y: str
    y_axis: int
    weight: str
    weight_axis: int


class OracleMask(NamedTuple):
    """Weight entries the masked reference must zero too: `weight` along `weight_axis` wherever `like` loses
    channels along `like_axis` (a recurrent node reads its own hidden state through R, inside the node)."""
    weight: str
    weight_axis: int
    like: str
    like_axis: int
    fill: str = ""  # a zero-point initializer whose values fill those entries instead of 0 (quantized weights)


class MaskFill(NamedTuple):
    """Where `node` reads `tensor`, the masked reference fills removed channels with `fill` (a scalar zero point)
    instead of 0: an integer op multiplies (q - zero_point), so a quantized zero is the zero point."""
    node: str
    tensor: str
    fill: str


@dataclass
class Choice:
    """One layout choice a rule made (which reshape factor carries the channels): `tensor` is the virtual axis
    that carries the pick, so the analysis can ban a pick that ended wholly frozen and retry."""
    key: tuple
    pick: object
    candidates: list
    tensor: str | None = None


class Coupler:
    """What a rule sees: shapes, constants, and the verbs to declare couplings. Once every rule ran, it holds
    their record: the element space (`slots`, `slot_list`, `n`), the links (`edges()`), the frozen marks
    (`element_reasons()`, `reasons`), and the weights' roles, consumers, producers, contractions, oracle masks,
    fixups and layout choices. Only graphprune.analysis reads that record; later stages read the `Analysis`."""

    def __init__(self, graph: Graph, choices: dict | None = None, whole_heads: bool | str = False):
        self.graph = graph
        self._virtual_shapes: dict[str, tuple[int]] = {}  # meeting points rules create; never in graph.shapes
        # where a reshape or fused attention splits an axis into heads/groups × inner channels: prune the outer
        # factor (whole heads / groups, "whole"), the finest units ("inner"), or whole heads where the split
        # feeds attention and inner channels elsewhere ("auto"); True/False are "whole"/"inner"
        self.heads = {True: "whole", False: "inner"}.get(whole_heads, whole_heads)
        if self.heads not in HEAD_MODES:
            raise ValueError(f"heads must be one of {', '.join(HEAD_MODES)}, not {whole_heads!r}")
        self._attention_memo: dict[int, bool] = {}
        self.slots: dict[tuple[str, int], tuple[int, int]] = {}
        self.slot_list: list[tuple[str, int]] = []
        self.n = 0
        self._edges_a: list[np.ndarray] = []
        self._edges_b: list[np.ndarray] = []
        self._frozen: list[tuple[np.ndarray, int]] = []
        self.reasons: list[str] = ["not a channel axis"]
        self._io_frozen: list[tuple[np.ndarray, int]] = []  # elements of graph inputs/outputs, with that reason
        self._named: list[tuple[np.ndarray, int]] = []  # frozen by a recognised pattern: its reason names the unit
        self._reason_ids: dict[str, int] = {"not a channel axis": NOT_CHANNEL}
        self.fixups: list[tuple[onnx.NodeProto, Callable]] = []
        self.consumers: list[Consumer] = []
        self.contractions: list[Contraction] = []
        self.producers: list[Producer] = []
        self.roles: dict[str, str] = {}
        self.oracle_masks: list[OracleMask] = []
        self.mask_fills: list[MaskFill] = []
        self.rule_failures: list[tuple[str, str, str]] = []  # (node, op, traceback) of rules that raised
        self.choices = choices if choices is not None else {}
        self.choice_log: list[Choice] = []
        self.diagnostics: list[str] = []  # rules that failed on a node (its tensors are frozen)
        self.node: onnx.NodeProto | None = None
        self._touched: set[tuple[str, int]] = set()
        # axis-level union-find, for rules that ask whether an axis is already wholly frozen
        self._axis_parent: dict[tuple[str, int], tuple[str, int]] = {}
        self._axis_dead: set[tuple[str, int]] = set()

    # ---- reading the graph --------------------------------------------------------------------------------
    def shape(self, name: str):
        virtual = self._virtual_shapes.get(name)
        return virtual if virtual is not None else self.graph.shape(name)

    def rank(self, name: str):
        s = self.shape(name)
        return None if s is None else len(s)

    def const(self, name: str):
        return self.graph.const(name) if name else None

    def attr(self, name: str, default=None):
        return attr(self.node, name, default)

    def dtype(self, name: str):
        return self.graph.dtypes.get(name)

    # ---- element space ----------------------------------------------------------------------------------------
    def slot(self, name: str, axis: int):
        """(offset, size) of the elements of `name` along `axis`, or None when the dim is not static."""
        shape = self.shape(name)
        if shape is None:
            return None
        axis = axis % len(shape) if len(shape) else 0
        key = (name, axis)
        if key in self.slots:
            return self.slots[key]
        if not len(shape) or not isinstance(shape[axis], int):
            return None
        size = shape[axis]
        self.slots[key] = (self.n, size)
        self.slot_list.append(key)
        self.n += size
        return self.slots[key]

    def virtual(self, size: int, tag: str = "") -> str:
        """A virtual one-axis tensor: a meeting point for links (reshape atoms, group indices)."""
        name = f"#{self.node.name if self.node is not None else ''}#{tag}#{len(self.slot_list)}"
        self._virtual_shapes[name] = (int(size),)
        self.slot(name, 0)
        return name

    def _ids(self, name, axis, idx=None):
        s = self.slot(name, axis)
        if s is None:
            return None
        off, size = s
        if idx is None:
            return np.arange(off, off + size, dtype=np.int64)
        return off + np.asarray(idx, dtype=np.int64)

    def _reason(self, text: str) -> int:
        if text not in self._reason_ids:
            self._reason_ids[text] = len(self.reasons)
            self.reasons.append(text)
        return self._reason_ids[text]

    def _norm_axis(self, name, axis):
        r = self.rank(name)
        return axis % r if r else 0

    # ---- verbs for rules ------------------------------------------------------------------------------------------
    def touch(self, name: str, axis: int) -> None:
        """Declare that removing any element of this axis needs nothing else from this node."""
        if name and self.rank(name):
            self._touched.add((name, self._norm_axis(name, axis)))

    def link(self, a: str, a_axis: int, b: str, b_axis: int, a_idx=None, b_idx=None) -> None:
        """Elements a[a_idx[k]] and b[b_idx[k]] must be removed together (default: identity, equal sizes)."""
        if not a or not b:
            return
        a_axis, b_axis = self._norm_axis(a, a_axis), self._norm_axis(b, b_axis)
        self._touched.add((a, a_axis))
        self._touched.add((b, b_axis))
        sa, sb = self.slot(a, a_axis), self.slot(b, b_axis)
        if sa is None or sb is None:
            if sa is not None or sb is not None:
                self.freeze(a, a_axis, reason="its size is not known statically")
                self.freeze(b, b_axis, reason="its size is not known statically")
            return
        if a_idx is None and b_idx is None and sa[1] != sb[1]:
            self.freeze(a, a_axis, reason=f"size {sa[1]} does not match {sb[1]} of '{b}'")
            self.freeze(b, b_axis, reason=f"size {sb[1]} does not match {sa[1]} of '{a}'")
            return
        ia = self._ids(a, a_axis, a_idx)
        ib = self._ids(b, b_axis, b_idx)
        if len(ia) != len(ib):
            raise RuleError(f"link maps of different lengths at node '{self.node.name}'")
        self._edges_a.append(ia)
        self._edges_b.append(ib)
        if a_idx is None and b_idx is None:
            self._axis_union((a, a_axis), (b, b_axis))

    def same(self, *names: str, axes=None) -> None:
        """Link every axis (or the given axes) of all `names` one to one: elementwise ops."""
        first = names[0]
        r = self.rank(first)
        if r is None:
            return
        for other in names[1:]:
            for ax in (range(r) if axes is None else axes):
                self.link(first, ax, other, ax)

    def same_except(self, x: str, y: str, axes, reason: str) -> None:
        """x and y have the same layout; the listed axes are frozen in both (statistics or selections run
        over them), the others pass through one to one."""
        axes = set(axes)
        for ax in range(self.rank(x)):
            if ax in axes:
                self.freeze(x, ax, reason=reason)
                self.freeze(y, ax, reason=reason)
            else:
                self.link(x, ax, y, ax)

    def reduce_axes(self, x: str, y: str, axes, keepdims: bool, on_reduced) -> None:
        """An op that removes (or keeps as size 1) `axes` of x: other axes pass through to y in order;
        `on_reduced(axis)` declares each reduced input axis."""
        out_ax = 0
        for ax in range(self.rank(x)):
            if ax in axes:
                on_reduced(ax)
                if keepdims:
                    self.not_channel(y, [out_ax])
                    out_ax += 1
            else:
                self.link(x, ax, y, out_ax)
                out_ax += 1

    def freeze(self, name: str, axis: int | None = None, idx=None, reason: str = "") -> None:
        if not name:
            return
        r = self.rank(name)
        if r is None:
            return
        where = f"{self.node.op_type} node '{self.node.name}'" if self.node is not None else "graph"
        rid = self._reason(f"{where}: {reason}" if reason else where)
        for ax in (range(r) if axis is None else [axis]):
            ax = ax % r if r else 0
            self._touched.add((name, ax))
            ids = self._ids(name, ax, idx)
            if ids is not None and len(ids):
                self._frozen.append((ids, rid))
                if idx is None:
                    self._axis_dead.add(self._axis_find((name, ax)))

    def freeze_named(self, name: str, axis: int, reason: str) -> None:
        """Freeze an axis for a reason that explains the unit better than the op-level reasons it also meets (a
        lowered LayerNorm's reshapes): it wins over every reason but a graph input/output's."""
        self.freeze(name, axis, reason=reason)
        ids = self._ids(name, self._norm_axis(name, axis))
        if ids is not None and len(ids):
            self._named.append((ids, self._reason(f"{self.node.op_type} node '{self.node.name}': {reason}")))

    def not_channel(self, name: str, axes=None) -> None:
        """Axes that never carry removable channels (kernel taps, spatial, vocabulary rows, sequence)."""
        if not name or self.rank(name) is None:
            return
        for ax in (range(self.rank(name)) if axes is None else axes):
            ax = self._norm_axis(name, ax)
            self._touched.add((name, ax))
            ids = self._ids(name, ax)
            if ids is not None and len(ids):
                self._frozen.insert(0, (ids, NOT_CHANNEL))
                self._axis_dead.add(self._axis_find((name, ax)))

    def freeze_all(self, reason: str) -> None:
        for name in list(self.node.input) + list(self.node.output):
            if name:
                self.freeze(name, reason=reason)

    def consumer(self, x: str, x_axis: int, weight: str, weight_axis: int, block: int = 1) -> None:
        """x's channels are contracted against weight's axis (block weight entries per channel)."""
        x_axis = self._norm_axis(x, x_axis)
        self.consumers.append(Consumer(self.node.name, x, x_axis, weight, weight_axis, block))
        if block == 1:
            self.link(x, x_axis, weight, weight_axis)
        else:
            s = self.slot(x, x_axis)
            w = self.slot(weight, weight_axis)
            if s is None or w is None or s[1] * block != w[1]:
                self.freeze(x, x_axis, reason="flattened channel block does not divide the weight")
                self.freeze(weight, weight_axis, reason="flattened channel block does not divide the weight")
                return
            self.link(x, x_axis, weight, weight_axis, np.repeat(np.arange(s[1]), block), np.arange(w[1]))

    def contraction(self, a: str, a_axis: int, b: str, b_axis: int) -> None:
        """a's and b's axes are summed over together (activation × activation); couples them too."""
        a_axis, b_axis = self._norm_axis(a, a_axis), self._norm_axis(b, b_axis)
        self.contractions.append(Contraction(self.node.name, a, a_axis, b, b_axis))
        self.link(a, a_axis, b, b_axis)

    def producer(self, y: str, y_axis: int, weight: str, weight_axis: int) -> None:
        self.producers.append(Producer(self.node.name, y, self._norm_axis(y, y_axis), weight, weight_axis))
        self.link(y, y_axis, weight, weight_axis)

    def role(self, name: str, role: str) -> None:
        """Tag an initializer: 'weight', 'bias', 'norm_scale', 'norm_bias', 'stat'."""
        if name and name in self.graph.initializers:
            self.roles.setdefault(name, role)

    def mask_fill(self, tensor: str, fill: str) -> None:
        """This node reads `tensor` as quantized values: the masked reference fills its removed channels with the
        zero point `fill`, not 0."""
        if tensor and fill:
            self.mask_fills.append(MaskFill(self.node.name, tensor, fill))

    def oracle_mask(self, weight: str, weight_axis: int, like: str, like_axis: int, fill: str = "") -> None:
        """The masked reference must also zero these weight entries (recurrent consumers inside one node)."""
        self.oracle_masks.append(OracleMask(weight, weight_axis, like, like_axis, fill or ""))

    def fixup(self, fn: Callable) -> None:
        """fn(rewriter, node): fix attributes / shape constants of this node after channels are removed."""
        self.fixups.append((self.node, fn))

    def choose(self, key, candidates: list):
        """Pick among candidate layouts; the analysis retries with the next one if a choice ends frozen."""
        key = (self.node.name,) + tuple(key)
        banned = self.choices.get(key, set())
        pick = next((c for c in candidates if c not in banned), candidates[0] if candidates else None)
        self.choice_log.append(Choice(key, pick, list(candidates)))
        return pick

    @property
    def whole_heads(self) -> bool:
        """Whether the current node's head split removes whole heads (see `heads`)."""
        if self.heads != "auto":
            return self.heads == "whole"
        node = self.node
        if node is None:
            return False
        key = id(node)   # names may be empty or repeated before canonicalisation
        if key not in self._attention_memo:
            self._attention_memo[key] = splits_attention(self.graph, node)
        return self._attention_memo[key]

    def bind_choice(self, virtual_name: str) -> None:
        """Name the virtual axis that carries the last choice, so a frozen outcome can be retried."""
        self.choice_log[-1].tensor = virtual_name

    def axis_dead(self, name: str, axis: int) -> bool:
        """True when the whole axis is already known to be frozen (through full one-to-one links)."""
        axis = self._norm_axis(name, axis)
        return self._axis_find((name, axis)) in self._axis_dead

    # ---- axis-level union-find (cheap, immediate) ------------------------------------------------------------------
    def _axis_find(self, k):
        p = self._axis_parent.get(k, k)
        if p == k:
            return k
        root = self._axis_find(p)
        self._axis_parent[k] = root
        return root

    def _axis_union(self, a, b):
        ra, rb = self._axis_find(a), self._axis_find(b)
        if ra != rb:
            self._axis_parent[ra] = rb
            if ra in self._axis_dead:
                self._axis_dead.add(rb)

    # ---- driver ---------------------------------------------------------------------------------------------------
    def run_rule(self, node: onnx.NodeProto) -> None:
        """Run the rule registered for this node's op at the model's opset; freeze whatever it leaves unmapped."""
        self.node = node
        self._touched = set()
        version = self.graph.opset(node.domain)
        fn = RULES.lookup(node.op_type, node.domain, version)
        if fn is None:
            domain = f" (domain {node.domain})" if node.domain not in ("", "ai.onnx") else ""
            at = f" at opset {version}" if RULES.registered(node.op_type, node.domain) else ""
            self.freeze_all(f"no channel rule for op {node.op_type}{domain}{at}")
        else:
            try:
                fn(node, self)
            except Exception as exc:  # a rule that cannot map a case freezes it, with the reason
                self.freeze_all(f"rule failed: {type(exc).__name__}: {exc}")
                self.diagnostics.append(f"the channel rule for {node.op_type} node '{node.name}' failed "
                                        f"({type(exc).__name__}: {exc}); its tensors stay whole")
                # a rule that raises is a bug: keep the traceback for `-v` and for bug reports
                self.rule_failures.append((node.name, node.op_type, traceback.format_exc()))
        for name in list(node.input) + list(node.output):
            r = self.rank(name) if name else None
            if not r:
                continue
            for ax in range(r):
                if (name, ax) not in self._touched:
                    self.freeze(name, ax, reason=f"axis {ax} of '{name}' is not mapped by the rule")
        self.node = None

    def freeze_io(self, name: str, reason: str) -> None:
        """Freeze a graph input or output: a reason that wins over any other in the unit (it alone already keeps
        the channels, whatever else a rule found)."""
        self.freeze(name, reason=reason)
        rid = self._reason(f"graph: {reason}")
        for ax in range(self.rank(name) or 0):
            ids = self._ids(name, ax)
            if ids is not None and len(ids):
                self._io_frozen.append((ids, rid))

    def freeze_at(self, node: onnx.NodeProto, names, reason: str) -> None:
        """Freeze every axis of `names`, with a reason that names `node` (outside any rule)."""
        self.node = node
        for name in names:
            self.freeze(name, reason=reason)
        self.node = None

    # ---- what the analysis reads back ------------------------------------------------------------------------------
    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Every link as two aligned arrays of element ids."""
        a = np.concatenate(self._edges_a) if self._edges_a else np.zeros(0, np.int64)
        b = np.concatenate(self._edges_b) if self._edges_b else np.zeros(0, np.int64)
        return a, b

    def element_io_reasons(self) -> np.ndarray:
        """Per element: the id of its graph input/output reason, -1 where it is not one's."""
        reason = np.full(self.n, -1, dtype=np.int64)
        for ids, rid in self._io_frozen:
            reason[ids] = rid
        return reason

    def element_named_reasons(self) -> np.ndarray:
        """Per element: the id of the pattern reason it was frozen with (freeze_named), -1 where none."""
        reason = np.full(self.n, -1, dtype=np.int64)
        for ids, rid in self._named:
            reason[ids] = rid
        return reason

    def element_reasons(self) -> np.ndarray:
        """Per element: the id of the reason it is frozen for (an index into `reasons`), -1 where it is free.
        A real reason wins over NOT_CHANNEL: not-channel marks are recorded first, so later ones overwrite them."""
        reason = np.full(self.n, -1, dtype=np.int64)
        for ids, rid in self._frozen:
            reason[ids] = np.maximum(reason[ids], rid) if rid == NOT_CHANNEL else rid
        return reason


HEAD_MODES = ("auto", "whole", "inner")
FUSED_ATTENTION = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention", "RotaryEmbedding",
                             "PackedAttention", "PackedMultiHeadAttention", "SparseAttention"})
ATTENTION_HOPS = 6   # ops between a head split/merge and the attention product it belongs to (transpose, scale,
                     # rotary halves, cast): a reshape further away from any such product is not a head split


def splits_attention(graph: Graph, node) -> bool:
    """True for a fused attention op, and for a node within ATTENTION_HOPS non-weighted ops (either way) of a
    product of two activations (MatMul/Einsum with no constant operand: Q·Kᵀ or probabilities·V). Walks stop at
    layers with constant weights, so a projection's split (Q, K, V) and the merge after A·V count and a reshape
    in a convolution stack (channel shuffle, group norm) does not."""
    if node.op_type in FUSED_ATTENTION:
        return True

    def constant(name: str, depth: int = 0) -> bool:
        """An initializer, a Constant, or one seen through a dequantisation, cast or layout op (QDQ weights)."""
        if not name or name in graph.initializers:
            return True
        prod = graph.producer.get(name)
        if prod is None or depth > 3:
            return False
        if prod.op_type == "Constant":
            return True
        return prod.op_type in ("DequantizeLinear", "Cast", "Identity", "Transpose", "Reshape", "Unsqueeze") \
            and constant(prod.input[0], depth + 1)

    def weighted(n) -> bool:
        return n.op_type in ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "MatMulInteger",
                             "ConvInteger", "QLinearMatMul", "QLinearConv") and any(constant(i) for i in n.input[:2])

    def product_of_activations(n) -> bool:
        if n.op_type == "MatMul":
            return not constant(n.input[0]) and not constant(n.input[1])
        if n.op_type == "Einsum":
            return sum(not constant(i) for i in n.input) >= 2
        return False

    def data(name: str) -> bool:   # activations, not shape arithmetic (Shape → Gather → Concat → a Reshape)
        return bool(name) and graph.dtypes.get(name) not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32,
                                                              onnx.TensorProto.BOOL)

    seen = {id(node)}
    frontier = [node]
    for _ in range(ATTENTION_HOPS):
        nxt = []
        for n in frontier:
            near = [u for out in n.output if data(out) for u, _ in graph.uses.get(out, [])]
            near += [graph.producer[i] for i in n.input if data(i) and i in graph.producer]
            for m in near:
                if m is None or id(m) in seen:
                    continue
                seen.add(id(m))
                if product_of_activations(m):
                    return True
                if not weighted(m):
                    nxt.append(m)
        frontier = nxt
    return False


def couple(graph: Graph, exclude: list[str] | None = None, choices: dict | None = None,
           whole_heads: bool | str = False) -> Coupler:
    """Run every node's rule over `graph`, inside Loop/Scan/If bodies too (their rules tie the bodies' formal
    inputs and outputs to the node's). Graph inputs and outputs, tensors read inside subgraphs no rule follows,
    and every tensor of a node whose name matches an `exclude` glob are frozen too."""
    from . import ops  # noqa: F401  (registers the rules)
    from .ops.control import CONTROL_FLOW

    c = Coupler(graph, choices, whole_heads)
    for name in graph.input_names:
        c.freeze_io(name, reason=f"graph input '{name}'")

    def run_scope(nodes):
        for node in nodes:
            failures = len(c.rule_failures)
            c.run_rule(node)
            if any(fnmatch.fnmatch(node.name, pat) for pat in exclude or []):
                # an excluded Loop/Scan/If keeps what its bodies read whole too (the weights of the layer)
                c.freeze_at(node, list(node.input) + list(node.output) + sorted(subgraph_outer_names(node)),
                            reason=f"excluded by pattern matching node '{node.name}'")
            bodies = subgraphs(node)
            if not bodies:
                continue
            followed = node.op_type in CONTROL_FLOW and node.domain in ("", "ai.onnx") \
                and RULES.lookup(node.op_type, node.domain, graph.opset(node.domain)) is not None \
                and len(c.rule_failures) == failures
            if followed:
                for body in bodies:
                    run_scope(body.node)
            else:  # the body's formal inputs and outputs are tied to nothing: what it reads stays whole
                c.freeze_at(node, subgraph_outer_names(node),
                            reason=f"read inside a subgraph of {node.op_type} node '{node.name}', which no "
                                   f"channel rule follows")

    run_scope(graph.nodes)
    for name in graph.output_names:
        c.freeze_io(name, reason=f"reaches graph output '{name}'")
    return c
