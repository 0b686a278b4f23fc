"""Channel-element coupling: op rules declare links between channel elements, union-find turns them into groups.

An *element* is one index along one static axis of one tensor (activations and initializers alike). Op rules
link elements that must be removed together, and freeze elements that cannot be removed. Connected components
are *units* (removed whole); units that touch the same set of (tensor, axis) members form a *group*.

Anything a rule does not declare is frozen: an unknown op never passes channels through silently.
"""
from __future__ import annotations

import fnmatch
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from .errors import RuleError
from .ir import Graph, attr
from .registry import Registry

RULES = Registry("channel rule")
NOT_CHANNEL = 0  # reason id reserved for axes that are not channels: never reported as frozen groups
rule = RULES.register

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
               onnx.TensorProto.BFLOAT16}


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


class Coupler:
    """What a rule sees: shapes, constants, and the verbs to declare couplings."""

    def __init__(self, graph: Graph, choices: dict | None = None, whole_heads: bool = False):
        self.graph = graph
        # where a reshape splits an axis: prune the outer factor (whole heads / groups) instead of the finest
        self.whole_heads = whole_heads
        self.slots: dict[tuple[str, int], tuple[int, int]] = {}
        self.slot_list: list[tuple[str, int]] = []
        self.n = 0
        self._edges_a: list[np.ndarray] = []
        self._edges_b: list[np.ndarray] = []
        self._frozen: list[tuple[np.ndarray, int]] = []
        self.reasons: list[str] = ["not a channel axis"]
        self._reason_ids: dict[str, int] = {"not a channel axis": NOT_CHANNEL}
        self.fixups: list[tuple[onnx.NodeProto, Callable]] = []
        self.consumers: list[Consumer] = []
        self.contractions: list[Contraction] = []
        self.producers: list[Producer] = []
        self.roles: dict[str, str] = {}
        self.oracle_masks: list[tuple[str, int, str, int]] = []  # (initializer, axis, like_tensor, like_axis)
        self.choices = choices if choices is not None else {}
        self.choice_log: list[tuple[tuple, object, list]] = []
        self.diagnostics: list[str] = []
        self.node: onnx.NodeProto | None = None
        self._touched: set[tuple[str, int]] = set()
        # axis-level union-find, for rules that ask whether an axis is already wholly frozen
        self._axis_parent: dict[tuple[str, int], tuple[str, int]] = {}
        self._axis_dead: set[tuple[str, int]] = set()

    # ---- reading the graph --------------------------------------------------------------------------------
    def shape(self, name: str):
        return self.graph.shape(name)

    def rank(self, name: str):
        s = self.graph.shape(name)
        return None if s is None else len(s)

    def const(self, name: str):
        return self.graph.const(name) if name else None

    def attr(self, name: str, default=None):
        return attr(self.node, name, default)

    def dtype(self, name: str):
        return self.graph.dtypes.get(name)

    @property
    def opset(self) -> int:
        return self.graph.opset("")

    # ---- element space ----------------------------------------------------------------------------------------
    def slot(self, name: str, axis: int):
        """(offset, size) of the elements of `name` along `axis`, or None when the dim is not static."""
        shape = self.graph.shape(name)
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
        self.graph.shapes[name] = (int(size),)
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

    def oracle_mask(self, weight: str, weight_axis: int, like: str, like_axis: int) -> None:
        """The masked reference must also zero these weight entries (recurrent consumers inside one node)."""
        self.oracle_masks.append((weight, weight_axis, like, like_axis))

    def fixup(self, fn: Callable) -> None:
        """fn(rewriter, node): fix attributes / shape constants of this node after channels are removed."""
        self.fixups.append((self.node, fn))

    def choose(self, key, candidates: list):
        """Pick among candidate layouts; the analysis retries with the next one if a choice ends frozen."""
        key = (self.node.name,) + tuple(key)
        banned = self.choices.get(key, set())
        pick = next((c for c in candidates if c not in banned), candidates[0] if candidates else None)
        self.choice_log.append([key, pick, candidates, None])
        return pick

    def bind_choice(self, virtual_name: str) -> None:
        """Name the virtual axis that carries the last choice, so a frozen outcome can be retried."""
        self.choice_log[-1][3] = virtual_name

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
    def run_rule(self, node: onnx.NodeProto, fn: Callable | None) -> None:
        self.node = node
        self._touched = set()
        if fn is None:
            self.freeze_all(f"no channel rule for op {node.op_type}"
                            + (f" (domain {node.domain})" if node.domain not in ("", "ai.onnx") else ""))
        else:
            try:
                fn(node, self)
            except Exception as exc:  # a rule that cannot map a case freezes it, with the reason
                self.freeze_all(f"rule failed: {type(exc).__name__}: {exc}")
        for name in list(node.input) + list(node.output):
            r = self.rank(name) if name else None
            if not r:
                continue
            for ax in range(r):
                if (name, ax) not in self._touched:
                    self.freeze(name, ax, reason=f"axis {ax} of '{name}' is not mapped by the rule")
        self.node = None


@dataclass
class Unit:
    root: int
    elements: dict[tuple[str, int], np.ndarray]  # member -> indices along that axis

    def size(self, member) -> int:
        return len(self.elements.get(member, ()))


@dataclass
class ChannelGroup:
    """Units that touch the same members: the thing allocation prunes with one ratio."""
    id: int
    members: list[tuple[str, int]]
    units: list[Unit]
    frozen: bool = False
    reason: str = ""
    name: str = ""
    main: tuple[str, int] | None = None  # the member whose width a user calls the layer width

    @property
    def channels(self) -> int:
        return self.width(self.main or self.members[0])

    def width(self, member) -> int:
        return sum(u.size(member) for u in self.units)


@dataclass
class Analysis:
    graph: Graph
    coupler: Coupler
    root: np.ndarray
    groups: list[ChannelGroup]
    frozen_groups: list[ChannelGroup]
    diagnostics: list[str] = field(default_factory=list)

    @property
    def fixups(self):
        return self.coupler.fixups

    def member_slot(self, member):
        return self.coupler.slots[member]


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected-component label (the minimum element id) for each of n elements, vectorised."""
    parent = np.arange(n, dtype=np.int64)
    if not len(a):
        return parent
    while True:
        pa, pb = parent[a], parent[b]
        diff = pa != pb
        if not diff.any():
            break
        lo = np.minimum(pa[diff], pb[diff])
        hi = np.maximum(pa[diff], pb[diff])
        np.minimum.at(parent, hi, lo)
        while True:  # pointer jumping until every element points at a root
            pp = parent[parent]
            if np.array_equal(pp, parent):
                break
            parent = pp
    return parent


def analyze(graph: Graph, exclude: list[str] | None = None, whole_heads: bool = False,
            max_retries: int = 4) -> Analysis:
    """Run every op rule, group coupled channels, freeze the rest with reasons."""
    from . import ops  # noqa: F401  (registers the rules)

    choices: dict = {}
    for _ in range(max_retries + 1):
        result = _analyze_once(graph, exclude or [], choices, whole_heads)
        changed = _revise_choices(result, choices)
        if not changed:
            return result
    return result


def _analyze_once(graph: Graph, exclude: list[str], choices: dict, whole_heads: bool = False) -> Analysis:
    c = Coupler(graph, choices, whole_heads)
    for name in graph.input_names:
        c.freeze(name, reason=f"graph input '{name}'")
    for node in graph.nodes:
        fn = RULES.lookup(node.op_type, node.domain)
        c.run_rule(node, fn)
        if any(fnmatch.fnmatch(node.name, pat) for pat in exclude):
            c.node = node
            for name in list(node.input) + list(node.output):
                c.freeze(name, reason=f"excluded by pattern matching node '{node.name}'")
            c.node = None
    for name in graph.output_names:
        c.freeze(name, reason=f"reaches graph output '{name}'")
    for node in graph.nodes:
        from .ir import subgraph_outer_names
        outer = subgraph_outer_names(node)
        if outer:
            c.node = node
            for name in outer:
                c.freeze(name, reason="read inside a subgraph")
            c.node = None

    n = c.n
    a = np.concatenate(c._edges_a) if c._edges_a else np.zeros(0, np.int64)
    b = np.concatenate(c._edges_b) if c._edges_b else np.zeros(0, np.int64)
    root = components(n, a, b)
    reason = np.full(n, -1, dtype=np.int64)
    for ids, rid in c._frozen:  # not-channel marks come first, so real reasons overwrite them
        reason[ids] = np.maximum(reason[ids], rid) if rid == NOT_CHANNEL else rid
    root_reason = np.full(n, -1, dtype=np.int64)
    fr = reason >= 0
    np.maximum.at(root_reason, root[fr], reason[fr])

    groups, frozen_groups = _build_groups(graph, c, root, root_reason)
    return Analysis(graph, c, root, groups, frozen_groups, c.diagnostics)


def _revise_choices(result: Analysis, choices: dict) -> bool:
    """Ban layout choices whose chosen virtual axis ended wholly frozen, when an alternative exists."""
    c = result.coupler
    changed = False
    for key, pick, candidates, tensor in c.choice_log:
        if pick is None or len(candidates) < 2 or tensor is None or (tensor, 0) not in c.slots:
            continue
        off, size = c.slots[(tensor, 0)]
        if c._root_frozen[result.root[off:off + size]].all():
            banned = choices.setdefault(key, set())
            if pick not in banned and len(banned) < len(candidates) - 1:
                banned.add(pick)
                changed = True
    return changed


def _build_groups(graph: Graph, c: Coupler, root: np.ndarray, root_reason: np.ndarray):
    n = c.n
    frozen_root = root_reason >= 0
    c._root_frozen = frozen_root
    # Which slots are real tensors, and which of them are float initializers (weights that make a unit worth it)
    slot_of = np.empty(n, dtype=np.int64)
    weighty = np.zeros(len(c.slot_list), dtype=bool)
    real = np.zeros(len(c.slot_list), dtype=bool)
    for k, key in enumerate(c.slot_list):
        off, size = c.slots[key]
        slot_of[off:off + size] = k
        name = key[0]
        real[k] = not name.startswith("#")
        arr = graph.initializers.get(name)
        # float weights, and quantized ones (int8/uint8/int16 behind a DequantizeLinear); int32/int64 initializers
        # are shape constants or quantized biases, which alone never make a unit worth removing
        weighty[k] = arr is not None and arr.size > 1 and (
            arr.dtype.kind == "f" or (arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2)) or (
            arr is not None and c.roles.get(name) in ("weight",))
    if n == 0:
        return [], []
    is_real = real[slot_of]
    has_weight = np.zeros(n, dtype=bool)
    np.logical_or.at(has_weight, root, weighty[slot_of])

    # unit signature: the set of real slots each root touches
    elems = np.nonzero(is_real)[0]
    order = np.lexsort((elems, slot_of[elems], root[elems]))
    elems = elems[order]
    r_sorted = root[elems]
    s_sorted = slot_of[elems]
    # split per root
    bounds = np.nonzero(np.diff(r_sorted))[0] + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(elems)]])
    by_sig: dict[tuple, list[Unit]] = defaultdict(list)
    frozen_by_sig: dict[tuple, list[Unit]] = defaultdict(list)
    sig_reason: dict[tuple, str] = {}
    for s, e in zip(starts, ends):
        r = int(r_sorted[s])
        if not has_weight[r]:
            continue
        slots_here = s_sorted[s:e]
        ids_here = elems[s:e]
        sb = np.nonzero(np.diff(slots_here))[0] + 1
        ss = np.concatenate([[0], sb])
        se = np.concatenate([sb, [len(slots_here)]])
        unit_elems = {}
        for a0, a1 in zip(ss, se):
            key = c.slot_list[int(slots_here[a0])]
            off = c.slots[key][0]
            unit_elems[key] = ids_here[a0:a1] - off
        sig = tuple(sorted(unit_elems))
        unit = Unit(r, unit_elems)
        if frozen_root[r]:
            if root_reason[r] == NOT_CHANNEL:
                continue
            frozen_by_sig[sig].append(unit)
            sig_reason.setdefault(sig, c.reasons[int(root_reason[r])])
        else:
            by_sig[sig].append(unit)
    producers = {}
    for p in c.producers:  # weights first, so a group is named after its Conv/Gemm, not a bias or norm
        if c.roles.get(p.weight) == "weight":
            producers.setdefault((p.y, p.y_axis), p.node)
    for p in c.producers:
        producers.setdefault((p.y, p.y_axis), p.node)
    groups = []
    for sig, units in by_sig.items():
        groups.append(_make_group(len(groups), sig, units, producers, graph))
    frozen = []
    for sig, units in frozen_by_sig.items():
        frozen.append(_make_group(len(frozen), sig, units, producers, graph, sig_reason[sig]))
    return groups, frozen


def _make_group(gid, sig, units, producers, graph, reason=None) -> ChannelGroup:
    """Name a group after the node that produces it (a Conv, Gemm, ...); its width is that output's width."""
    group = ChannelGroup(gid, list(sig), units, frozen=reason is not None, reason=reason or "")
    made = [(producers[m], m) for m in sig if m in producers]
    if made:
        group.name, group.main = made[0]
        return group
    acts = [m for m in sig if m[0] not in graph.initializers]
    group.main = max(acts or list(sig), key=group.width)
    group.name = f"{group.main[0]}:{group.main[1]}"
    return group
