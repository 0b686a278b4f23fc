"""Channel grouping: the links op rules declare (graphprune.rules) become units and groups.

An *element* is one index along one static axis of one tensor. Elements the rules link are connected by a
union-find; each connected component is a *unit* (removed whole), frozen if any of its elements is. Units that
touch the same set of (tensor, axis) members form a *group*, named after the node that produces it. When a
layout choice a rule made (which factor of a reshape carries the channels) ends wholly frozen, the analysis
bans it and runs the rules again.

The result, `Analysis`, is plain data: later stages never see the rules' Coupler.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from .ir import Graph
from .rules import NOT_CHANNEL, Consumer, Contraction, Coupler, MaskFill, OracleMask, Producer, couple


@dataclass
class Unit:
    """Elements removed together: `root` is the unit's id (its smallest element id)."""
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
    """What channel analysis found, as plain data for every later stage (scoring, allocation, compensation,
    sensitivity, rewrite, verification).

    groups         prunable groups; `group.id` is the index in this list
    frozen_groups  groups that must stay whole, each with the `reason` of its first frozen unit
    units          unit id -> Unit, for every unit of every group above
    roles          initializer -> 'weight', 'bias', 'norm_scale', 'norm_bias' or 'stat'
    consumers      activation axes contracted against a weight axis (what data-aware scores and compensation read)
    producers      weight axes that create an activation axis (what names a group)
    contractions   activation x activation contractions (attention's Q·Kᵀ), scored from both operands
    oracle_masks   weight entries the masked reference must zero along with removed channels (verify)
    mask_fills     (node, tensor, zero point): quantized inputs whose removed channels the masked reference fills
                   with the zero point instead of 0 (verify)
    fixups         (node, fn(rewriter, node)): attribute and shape-constant fixes the rewrite runs
    diagnostics    notes for the report (a rule that failed on a node)
    rule_failures  (node, op, traceback) of every rule that raised: a bug, printed by `-v`

    Element space, for checking plans against units: every static (tensor, axis) the rules saw, virtual
    meeting points (names starting with '#') included, owns the element ids `offset .. offset + size - 1` with
    `slots[(tensor, axis)] == (offset, size)`; `element_unit[e]` is the id of element e's unit and
    `element_frozen[e]` whether that unit is frozen.
    """
    graph: Graph
    groups: list[ChannelGroup]
    frozen_groups: list[ChannelGroup]
    units: dict[int, Unit] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    consumers: list[Consumer] = field(default_factory=list)
    producers: list[Producer] = field(default_factory=list)
    contractions: list[Contraction] = field(default_factory=list)
    oracle_masks: list[OracleMask] = field(default_factory=list)
    mask_fills: list[MaskFill] = field(default_factory=list)
    rule_failures: list[tuple[str, str, str]] = field(default_factory=list)
    fixups: list[tuple[onnx.NodeProto, Callable]] = field(default_factory=list)
    diagnostics: list[str] = field(default_factory=list)
    slots: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    element_unit: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    element_frozen: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def group_graph(self):
        """A networkx DiGraph of the groups and what they touch, for inspection (`graphprune analyze
        --graph out.graphml`). Nodes: 'group/<id>' and 'frozen/<id>' (kind 'group': name, channels, units,
        frozen, reason), 'tensor/<name>' (kind 'tensor': shape, initializer, role) and 'node/<name>' (kind
        'node': op_type). Edges: group -> tensor for each member (axes, widths), and the dataflow around those
        tensors: producing node -> tensor, tensor -> reading node (input index)."""
        import networkx as nx

        out = nx.DiGraph()
        touched: set[str] = set()
        for prefix, groups in (("group", self.groups), ("frozen", self.frozen_groups)):
            for g in groups:
                gid = f"{prefix}/{g.id}"
                out.add_node(gid, kind="group", name=g.name, channels=g.channels, units=len(g.units),
                             frozen=g.frozen, reason=g.reason)
                axes: dict[str, list[int]] = defaultdict(list)
                for name, axis in g.members:
                    axes[name].append(axis)
                for name, its_axes in axes.items():
                    out.add_edge(gid, f"tensor/{name}", kind="member", axes=",".join(map(str, its_axes)),
                                 widths=",".join(str(g.width((name, a))) for a in its_axes))
                    touched.add(name)
        for name in sorted(touched):
            shape = self.graph.shape(name)
            attrs = {"kind": "tensor", "initializer": name in self.graph.initializers,
                     "shape": "" if shape is None else "x".join(str(d) for d in shape)}
            if name in self.roles:
                attrs["role"] = self.roles[name]
            out.add_node(f"tensor/{name}", **attrs)
            node = self.graph.producer.get(name)
            if node is not None:
                out.add_node(f"node/{node.name}", kind="node", op_type=node.op_type)
                out.add_edge(f"node/{node.name}", f"tensor/{name}", kind="output")
            for node, index in self.graph.uses.get(name, []):
                out.add_node(f"node/{node.name}", kind="node", op_type=node.op_type)
                out.add_edge(f"tensor/{name}", f"node/{node.name}", kind="input", index=int(index))
        return out


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


def analyze(graph: Graph, exclude: list[str] | None = None, whole_heads: bool | str = False,
            max_retries: int = 4) -> Analysis:
    """Run every op rule, group coupled channels, freeze the rest with reasons."""
    choices: dict = {}
    for _ in range(max_retries + 1):
        coupler = couple(graph, exclude or [], choices, whole_heads)
        result = _group(graph, coupler)
        if not _revise_choices(coupler, result, choices):
            return result
    return result


def _group(graph: Graph, c: Coupler) -> Analysis:
    """Union-find over the rules' links; a unit is frozen with the highest reason id among its elements, or with
    its graph input/output reason where it has one."""
    a, b = c.edges()
    root = components(c.n, a, b)
    reason = c.element_reasons()
    root_reason = np.full(c.n, -1, dtype=np.int64)
    fr = reason >= 0
    np.maximum.at(root_reason, root[fr], reason[fr])
    # a unit that reaches a graph input or output is frozen for that reason, whatever else froze it: name it
    io_reason = c.element_io_reasons()
    io = io_reason >= 0
    root_io = np.full(c.n, -1, dtype=np.int64)
    np.maximum.at(root_io, root[io], io_reason[io])
    named_reason = c.element_named_reasons()
    named = named_reason >= 0
    root_named = np.full(c.n, -1, dtype=np.int64)
    np.maximum.at(root_named, root[named], named_reason[named])
    root_reason = np.where(root_io >= 0, root_io, np.where(root_named >= 0, root_named, root_reason))

    groups, frozen_groups = _build_groups(graph, c, root, root_reason)
    units = {u.root: u for g in groups + frozen_groups for u in g.units}
    return Analysis(graph, groups, frozen_groups, units=units, roles=c.roles, consumers=c.consumers,
                    producers=c.producers, contractions=c.contractions, oracle_masks=c.oracle_masks, mask_fills=c.mask_fills, rule_failures=c.rule_failures,
                    fixups=c.fixups, diagnostics=c.diagnostics, slots=c.slots, element_unit=root,
                    element_frozen=(root_reason >= 0)[root])


def _revise_choices(c: Coupler, result: Analysis, choices: dict) -> bool:
    """Ban layout choices whose chosen virtual axis ended wholly frozen, when an alternative exists."""
    changed = False
    for choice in c.choice_log:
        tensor = choice.tensor
        if choice.pick is None or len(choice.candidates) < 2 or tensor is None or (tensor, 0) not in c.slots:
            continue
        off, size = c.slots[(tensor, 0)]
        if result.element_frozen[off:off + size].all():
            banned = choices.setdefault(choice.key, set())
            if choice.pick not in banned and len(banned) < len(choice.candidates) - 1:
                banned.add(choice.pick)
                changed = True
    return changed


def _build_groups(graph: Graph, c: Coupler, root: np.ndarray, root_reason: np.ndarray):
    n = c.n
    frozen_root = root_reason >= 0
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
