"""``recalibrate``: BatchNormalization statistics from data, in float64 (Chan et al.'s merge).

This module plans the passes over the data and writes the statistics; it never runs a model.
Each pass is a :class:`Step` (an ONNX model, what it is fed, which of its tensors to measure and
which to keep for the next step) that an executor runs over every batch (onnxruntime, in one or
several processes: :mod:`normfuse.runtime.recalib_workers`) and answers with per-channel
moments (:class:`StepResult`).

* :func:`recalibrate_model` (``mode="sequential"``): BatchNorms are taken level by level (a
  BatchNorm after another one waits until that one has its new statistics), so each is measured
  on the inputs the recalibrated model gives it. Level ``l`` runs only the nodes it needs: from
  the data, the prefix of the graph up to the inputs of that level; with the cache, only the
  nodes between the previous level's *frontier* (every tensor of depth at most ``l`` that a
  later node reads, kept by the executor from the previous step) and this one's.
  BatchNorms inside If/Loop bodies make every level run the whole graph with their inputs
  exposed as outputs (through the branches and bodies), from the data.
* :func:`recalibrate_batch_mode`: one pass; every BatchNorm of the main graph is replaced, in a
  copy that only runs, by the same normalisation with the batch's own statistics (as PyTorch's
  BatchNorm computes in training), and all their inputs are measured at once.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from normfuse.core.algebra import ChannelMoments
from normfuse.core.report import Entry
from normfuse.onnxgraph.edit import BN, all_names, fresh_name, model_resolver, read_batchnorm
from normfuse.onnxgraph.graph import node_name
from normfuse.onnxgraph.protos import to_proto

__all__ = ["Executor", "Step", "StepResult", "recalibrate_batch_mode", "recalibrate_model"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Step:
    """One pass over the data.

    Attributes:
        model: The serialized ONNX model to run per batch; ``None`` when nothing needs running
            (every tensor wanted is fed).
        outputs: The names the model returns, in order.
        inputs: The names fed to it (from the data or the kept tensors), and fed through.
        source: ``"data"`` (the batches) or ``"cache"`` (the tensors the previous step kept).
        measure: Key -> name of a tensor (an output or an input) whose moments the executor
            computes (float64, per channel on axis 1).
        moments: Key -> the outputs that carry a tensor's moments measured in the model itself
            (its float64 mean with kept dimensions, sum of squared deviations, element count).
        stacked: Outputs with a leading iteration axis (Loop/Scan scan outputs).
        keep: Tensors (outputs or inputs) to keep, per batch, for the next step.
        index: This step's number (from 1) and how many the run has at most.
        opt_level: onnxruntime's graph optimisation for it: ``disable`` (the same kernels on
            the same values whatever the step's extent, so the cache changes nothing) or
            ``all`` (one pass where only speed matters: fusions move values by float rounding).
    """

    model: bytes | None
    outputs: list[str]
    inputs: list[str]
    source: str
    measure: dict[str, str]
    moments: dict[str, tuple[str, str, str]] = dataclasses.field(default_factory=dict)
    stacked: frozenset[str] = frozenset()
    keep: list[str] = dataclasses.field(default_factory=list)
    index: tuple[int, int] = (1, 1)
    opt_level: str = "disable"


@dataclasses.dataclass
class StepResult:
    """What an executor gives back for a :class:`Step`.

    Attributes:
        moments: Per measure key, the moments over all the batches.
        kept: The ONNX element type of every kept tensor, or ``None`` when they could not all
            be kept (then the next level starts from the data again).
    """

    moments: dict[str, ChannelMoments]
    kept: dict[str, int] | None = None


Executor = Callable[[Step], StepResult]
"""Runs a :class:`Step` over every batch (see :mod:`normfuse.runtime.recalib_workers`)."""


def _targets(
    model: ir.Model, where: str | None, entries: dict[int, Entry]
) -> list[tuple[ir.Node, BN]]:
    """The BatchNorms to recalibrate; every one matched gets an entry (skipped with a reason)."""
    consts = model_resolver(model)
    targets = []
    for node in model.graph.all_nodes():
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        if where is not None and not fnmatch.fnmatchcase(node.name or "", where):
            continue
        entry = Entry(node_name(node), node.op_type, "skipped")
        entries[id(node)] = entry
        info = read_batchnorm(node, consts)
        if isinstance(info, str):
            entry.reason = info
            continue
        if info.x.type is None or not info.x.name:
            entry.reason = "its input has no name or type"
            continue
        targets.append((node, info))
    return targets


def recalibrate_model(
    model: ir.Model,
    *,
    execute: Executor,
    where: str | None = None,
    cache: bool = True,
) -> list[Entry]:
    """Recompute BatchNormalization mean/variance level by level, in place (module docstring).

    The variance written is the population variance of the data (``ddof=0``): the one that
    gives the normalised values unit variance, as ONNX BatchNormalization uses it.

    Args:
        model: The model; the statistics of its BatchNorms change in place.
        execute: Runs a :class:`Step` over the data.
        where: Only BatchNorm nodes whose name matches this glob.
        cache: Ask the executor to keep each level's frontier for the next level; without it
            every level runs its prefix of the graph from the data.
    """
    levels, depths = _depths(model)
    entries: dict[int, Entry] = {}
    targets = _targets(model, where, entries)
    by_level: dict[int, list[tuple[ir.Node, BN]]] = {}
    for t in targets:
        by_level.setdefault(levels.get(id(t[0]), 0), []).append(t)
    order = sorted(by_level)
    nested = any(node.graph is not model.graph for node, _ in targets)
    cut = None if nested else _Cut(model, depths)
    prev: int | None = None  # the level whose frontier the executor holds
    types: dict[str, int] = {}
    for k, level in enumerate(order, 1):
        group = by_level[level]
        if cut is None:
            step, names = _exposed_step(model, group, entries)
        else:
            keep_next = cache and k < len(order)
            measure = {id(info.x): (info.x, info.rank) for _, info in group}
            step = cut.step(list(measure.values()), level, prev, types, keep_next)
            names = {info.x.name: info.x.name for _, info in group if info.x.name}
        step.index = (k, len(order))
        result = execute(step)
        if cut is not None and result.kept is not None and step.keep:
            prev, types = level, result.kept
        else:
            prev = None
        for node, info in group:
            entry = entries[id(node)]
            key = info.x.name
            if entry.reason is not None or key not in names:
                continue
            acc = result.moments.get(key)
            if acc is None or acc.mean is None:
                entry.reason = "never ran on these batches (a branch not taken)"
                continue
            _write_stats(node, acc.mean, acc.var())
            entry.status = "applied"
            entry.target = f"statistics over {acc.n} values per channel (level {level})"
            entry.exact = False
    return list(entries.values())


def _exposed_step(
    model: ir.Model, group: list[tuple[ir.Node, BN]], entries: dict[int, Entry]
) -> tuple[Step, dict[str, str]]:
    """The whole model with the inputs of ``group`` exposed as outputs (through If/Loop bodies)."""
    proto = to_proto(model)  # the current statistics
    names = all_names(model)
    exposed: dict[str, tuple[str, bool]] = {}
    for node, info in group:
        xname = info.x.name
        assert xname and info.x.type is not None
        if xname in exposed:
            continue
        result = _expose(proto, xname, int(info.x.type.dtype), info.rank or 2, names)
        if isinstance(result, str):
            entries[id(node)].reason = result
            continue
        exposed[xname] = result
    measure = {k: v[0] for k, v in exposed.items()}
    step = Step(
        model=proto.SerializeToString() if measure else None,
        outputs=list(measure.values()),
        inputs=[v.name for v in model.graph.inputs if v.name and v.const_value is None],
        source="data",
        measure=measure,
        stacked=frozenset(v[0] for v in exposed.values() if v[1]),
    )
    return step, {k: k for k in measure}


def _depths(model: ir.Model) -> tuple[dict[int, int], dict[int, int]]:
    """For each BatchNormalization (by id), how many BatchNorms lie on the longest path before
    it; and for each node of the main graph (by id), that count for its outputs."""
    level: dict[int, int] = {}
    out: dict[int, int] = {}

    def walk(graph: ir.Graph, depth_in: dict[int, int], base: int, top: bool) -> int:
        deepest = base
        depth: dict[int, int] = dict(depth_in)
        for node in graph:
            d = max([depth.get(id(v), base) for v in node.inputs if v is not None] + [base])
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    d = max(d, walk(attr.value, depth, d, False))
                elif attr.type == ir.AttributeType.GRAPHS:
                    for g in attr.value:
                        d = max(d, walk(g, depth, d, False))
            if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
                level[id(node)] = d
                d += 1
            for o in node.outputs:
                depth[id(o)] = d
            if top:
                out[id(node)] = d
            deepest = max(deepest, d)
        return deepest

    walk(model.graph, {}, 0, True)
    return level, out


class _Cut:
    """The main graph cut by depth: which nodes a level needs and what crosses each cut.

    ``P(l)``: the nodes whose outputs have depth at most ``l`` (they depend only on BatchNorms
    of levels below ``l``); the frontier ``F(l)``: graph inputs and outputs of ``P(l)`` that a
    node outside ``P(l)`` reads (directly or from inside its If/Loop bodies).
    """

    def __init__(self, model: ir.Model, depths: dict[int, int]) -> None:
        self.model = model
        self.names = all_names(model)
        self.opset = model.opset_imports.get("", 18)
        self.nodes = list(model.graph)
        self.depth = [depths[id(n)] for n in self.nodes]
        self.inputs = [v for v in model.graph.inputs if v.const_value is None]
        main: set[int] = {id(v) for v in model.graph.inputs}
        main.update(id(v) for v in model.graph.initializers.values())
        self.producer: dict[int, int] = {}
        for i, n in enumerate(self.nodes):
            for o in n.outputs:
                main.add(id(o))
                self.producer[id(o)] = i
        self.uses: list[list[ir.Value]] = []
        self.read_at: dict[int, int] = {}  # value -> the deepest node that reads it
        for i, n in enumerate(self.nodes):
            used: dict[int, ir.Value] = {id(v): v for v in n.inputs if v is not None}
            for attr in n.attributes.values():
                graphs = (
                    [attr.value]
                    if attr.type == ir.AttributeType.GRAPH
                    else list(attr.value)
                    if attr.type == ir.AttributeType.GRAPHS
                    else []
                )
                for g in graphs:
                    for inner in g.all_nodes():
                        for v in inner.inputs:
                            if v is not None and id(v) in main:
                                used[id(v)] = v
            self.uses.append(list(used.values()))
            for key in used:
                self.read_at[key] = max(self.read_at.get(key, -1), self.depth[i])

    def frontier(self, level: int | None) -> list[ir.Value]:
        if level is None:
            return list(self.inputs)
        found = [v for v in self.inputs if self.read_at.get(id(v), -1) > level]
        for i, n in enumerate(self.nodes):
            if self.depth[i] <= level:
                found += [o for o in n.outputs if self.read_at.get(id(o), -1) > level]
        return found

    def step(
        self,
        measure: list[tuple[ir.Value, int | None]],
        level: int,
        prev: int | None,
        types: dict[str, int],
        keep_next: bool,
    ) -> Step:
        """The nodes between the frontier of ``prev`` (``None``: the graph inputs) and the
        inputs of level ``level`` (and its frontier, when ``keep_next``). The tensors measured
        that the step computes are measured in it (float64 moments as outputs)."""
        fed = self.frontier(prev)
        fed_ids = {id(v) for v in fed}
        keep = self.frontier(level) if keep_next else []
        wanted: dict[int, ir.Value] = {id(v): v for v, _ in measure}
        wanted.update((id(v), v) for v in keep)
        chosen: set[int] = set()
        stack = [self.producer[k] for k in wanted if k not in fed_ids]
        while stack:
            i = stack.pop()
            if i in chosen:
                continue
            chosen.add(i)
            for v in self.uses[i]:
                if id(v) in fed_ids or (v.producer() is None and v.const_value is not None):
                    continue
                stack.append(self.producer[id(v)])
        idx = sorted(chosen)
        used: dict[int, ir.Value] = {}
        for i in idx:
            used.update((id(v), v) for v in self.uses[i])
            # and what a level before gave it: new statistics where they were not its own
            # initializers (Identity(weight) in a fresh legacy export)
            used.update((id(v), v) for v in self.nodes[i].inputs if v is not None)
        in_graph = {
            v.name or "": rank for v, rank in measure if id(v) not in fed_ids and rank is not None
        }
        outputs = [
            v.name or ""
            for k, v in wanted.items()
            if k not in fed_ids and (v.name not in in_graph or id(v) in {id(u) for u in keep})
        ]
        model = None
        moments: dict[str, tuple[str, str, str]] = {}
        if idx:
            graph = onnx.GraphProto(name=f"recalibrate_level_{level}")
            graph.node.extend(ir.serde.serialize_node(self.nodes[i]) for i in idx)
            for name, rank in in_graph.items():
                nodes, moments[name] = _moment_nodes(
                    name, rank, self.opset, self.names, graph.initializer
                )
                graph.node.extend(nodes)
                outputs += moments[name]
            for v in fed:
                if id(v) not in used:
                    continue
                if prev is None:
                    graph.input.append(ir.serde.serialize_value(v))
                else:
                    name = v.name or ""
                    graph.input.append(onnx.helper.make_tensor_value_info(name, types[name], None))
            for v in used.values():
                if v.producer() is None and v.const_value is not None and id(v) not in fed_ids:
                    tensor = ir.serde.serialize_tensor(v.const_value)
                    tensor.name = v.name or ""
                    graph.initializer.append(tensor)
            graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
            proto = onnx.helper.make_model(
                graph,
                opset_imports=[
                    onnx.helper.make_opsetid(d, v) for d, v in self.model.opset_imports.items()
                ],
                ir_version=self.model.ir_version,
            )
            proto.functions.extend(
                ir.serde.serialize_function(f) for f in self.model.functions.values()
            )
            model = proto.SerializeToString()
        return Step(
            model=model,
            outputs=outputs if model is not None else [],
            inputs=[v.name or "" for v in fed if id(v) in used or id(v) in wanted],
            source="data" if prev is None else "cache",
            measure={v.name or "": v.name or "" for v, _ in measure if v.name not in moments},
            moments=moments,
            keep=[v.name or "" for v in keep],
        )


_SUBGRAPH_OWNERS = {"If": ("then_branch", "else_branch"), "Loop": ("body",), "Scan": ("body",)}


def _find_path(
    graph: onnx.GraphProto, xname: str
) -> list[tuple[onnx.NodeProto, str, onnx.GraphProto]] | None:
    """The chain of (owner node, attribute, subgraph) down to the graph holding a BatchNorm on ``xname``."""
    for node in graph.node:
        if node.op_type == "BatchNormalization" and node.input and node.input[0] == xname:
            return []
    for node in graph.node:
        for attr in node.attribute:
            if attr.type != onnx.AttributeProto.GRAPH:
                continue
            found = _find_path(attr.g, xname)
            if found is not None:
                return [(node, attr.name, attr.g), *found]
    return None


def _expose(
    proto: onnx.ModelProto, xname: str, elem: int, rank: int, names: set[str]
) -> tuple[str, bool] | str:
    """Make the tensor ``xname`` an output of the main graph, through If/Loop/Scan nesting.

    Returns ``(output name, stacked)`` (stacked: a Loop/Scan scan output with one more leading
    axis), or the reason it cannot be reached.
    """
    path = _find_path(proto.graph, xname)
    if path is None:
        return "not found in the graph"
    name, stacked = xname, False
    for owner, attr_name, sub in reversed(path):
        if owner.op_type not in _SUBGRAPH_OWNERS:
            return f"inside a {owner.op_type} body"
        tap = fresh_name(names, f"{xname}_tap")
        sub.node.append(onnx.helper.make_node("Identity", [name], [tap]))
        sub.output.append(onnx.helper.make_tensor_value_info(tap, elem, None))
        if owner.op_type == "If":
            other_name = next(b for b in _SUBGRAPH_OWNERS["If"] if b != attr_name)
            other = next(a.g for a in owner.attribute if a.name == other_name)
            empty = fresh_name(names, f"{xname}_untaken")
            dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
            value = onnx.numpy_helper.from_array(np.zeros((0,) * max(rank, 2), dtype))
            other.node.append(onnx.helper.make_node("Constant", [], [empty], value=value))
            other.output.append(onnx.helper.make_tensor_value_info(empty, elem, None))
        else:
            stacked = True
        name = fresh_name(names, f"{xname}_out")
        owner.output.append(name)
    proto.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return name, stacked


def _write_stats(node: ir.Node, mean: np.ndarray, var: np.ndarray) -> None:
    """Put new mean/var into ``node``: in place when the initializer is its own, else a new one."""
    graph = node.graph
    assert isinstance(graph, ir.Graph)
    for idx, arr in ((3, mean), (4, var)):
        old = node.inputs[idx]
        assert old is not None
        dtype = old.type.dtype.numpy() if old.type is not None else np.dtype(np.float32)
        shape = tuple(old.const_value.shape) if old.const_value is not None else arr.shape
        tensor = ir.tensor(np.array(arr.astype(dtype).reshape(shape), order="C"))
        own = (  # an initializer (of this graph or an outer one) that only this node reads
            old.const_value is not None
            and old.producer() is None
            and len(list(old.uses())) == 1
            and not old.is_graph_input()
            and not old.is_graph_output()
        )
        if own:
            old.const_value = tensor
            continue
        names = set(graph.initializers) | {v.name for n in graph for v in n.outputs if v.name}
        new = ir.Value(
            name=fresh_name(names, f"{node_name(node)}_{'mean' if idx == 3 else 'var'}"),
            const_value=tensor,
        )
        new.type, new.shape = ir.TensorType(tensor.dtype), ir.Shape(arr.reshape(shape).shape)
        graph.register_initializer(new)
        node.replace_input_with(idx, new)


def _bn_proto_index(graph: onnx.GraphProto, output: str) -> int | None:
    for i, n in enumerate(graph.node):
        if n.op_type == "BatchNormalization" and n.output and n.output[0] == output:
            return i
    return None


def _reduce(
    op: str, x: str, axes: list[int], out: str, opset: int, names: set[str], inits: list[Any]
) -> onnx.NodeProto:
    """``ReduceMean`` (keepdims) or ``ReduceSum`` (not), with axes as the opset wants them."""
    keep = int(op == "ReduceMean")
    if opset >= (18 if op == "ReduceMean" else 13):
        axes_name = fresh_name(names, f"{out}_axes")
        inits.append(onnx.numpy_helper.from_array(np.array(axes, np.int64), axes_name))
        return onnx.helper.make_node(op, [x, axes_name], [out], keepdims=keep)
    return onnx.helper.make_node(op, [x], [out], axes=axes, keepdims=keep)


def _moment_nodes(
    x: str, rank: int, opset: int, names: set[str], inits: list[Any]
) -> tuple[list[onnx.NodeProto], tuple[str, str, str]]:
    """Nodes that measure ``x`` per channel (axis 1) in float64: its mean (kept dims), the sum
    of squared deviations from it, and its element count; and those three names."""
    axes = [0, *range(2, rank)]
    n = {k: fresh_name(names, f"{x}_{k}") for k in ("f64", "mean64", "dev", "dev2", "m2", "size")}
    make = onnx.helper.make_node
    nodes = [
        make("Cast", [x], [n["f64"]], to=onnx.TensorProto.DOUBLE),
        _reduce("ReduceMean", n["f64"], axes, n["mean64"], opset, names, inits),
        make("Sub", [n["f64"], n["mean64"]], [n["dev"]]),
        make("Mul", [n["dev"], n["dev"]], [n["dev2"]]),
        _reduce("ReduceSum", n["dev2"], axes, n["m2"], opset, names, inits),
        make("Size", [x], [n["size"]]),
    ]
    return nodes, (n["mean64"], n["m2"], n["size"])


def _batch_stats_bn(
    bn: BN,
    proto_node: onnx.NodeProto,
    moments: tuple[str, str, str],
    stat_type: int,
    names: set[str],
    inits: list[Any],
) -> list[onnx.NodeProto]:
    """The BatchNorm fed with the batch's own statistics (float64, rounded to its type; the
    biased variance, as BatchNorm uses in training) in place of its running ones."""
    mean64, m2, size = moments
    y = proto_node.output[0]
    n = {k: fresh_name(names, f"{y}_{k}") for k in ("vec", "count", "per", "var64", "mean", "var")}
    c = {k: fresh_name(names, f"{y}_{k}") for k in ("flat", "channels")}
    inits.append(onnx.numpy_helper.from_array(np.array([-1], np.int64), c["flat"]))
    inits.append(onnx.numpy_helper.from_array(np.array(bn.channels, np.float64), c["channels"]))
    make = onnx.helper.make_node
    node = onnx.NodeProto()
    node.CopyFrom(proto_node)
    node.input[3], node.input[4] = n["mean"], n["var"]
    return [
        make("Reshape", [mean64, c["flat"]], [n["vec"]]),
        make("Cast", [size], [n["count"]], to=onnx.TensorProto.DOUBLE),
        make("Div", [n["count"], c["channels"]], [n["per"]]),
        make("Div", [m2, n["per"]], [n["var64"]]),
        make("Cast", [n["vec"]], [n["mean"]], to=stat_type),
        make("Cast", [n["var64"]], [n["var"]], to=stat_type),
        node,
    ]


def recalibrate_batch_mode(
    model: ir.Model, *, execute: Executor, where: str | None = None
) -> list[Entry]:
    """Recompute BatchNormalization statistics in one pass over the data, in place.

    During the pass every BatchNormalization of the main graph normalises each batch with that
    batch's own statistics (biased variance), as PyTorch's BatchNorm does in training and so as
    ``update_bn``/PreciseBN/normfuse's PyTorch recalibration see the data; its input is
    accumulated per channel in float64 (Chan's merge). The variance written is the population
    one (``ddof=0``). BatchNorms inside subgraphs are left to ``mode="sequential"``.
    """
    by_node: dict[int, Entry] = {}
    targets: list[BN] = []
    for node, info in _targets(model, where, by_node):
        entry = by_node[id(node)]
        if node.graph is not model.graph:
            entry.reason = "inside a subgraph: use the sequential mode"
        elif info.rank is None:
            entry.reason = "its input has no known rank"
        else:
            targets.append(info)
    entries = list(by_node.values())
    proto = to_proto(model)
    names = all_names(model)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 18)
    init_types = {t.name: t.data_type for t in proto.graph.initializer}
    inits: list[Any] = []
    measured: dict[str, tuple[str, str, str]] = {}
    live: list[BN] = []
    for info in targets:
        y = info.node.outputs[0].name
        index = _bn_proto_index(proto.graph, y) if y else None
        xname = info.x.name
        if index is None or xname is None or info.rank is None or info.x.type is None:
            continue
        bn_node = proto.graph.node[index]
        found = measured.get(xname)
        new: list[onnx.NodeProto] = []
        if found is None:
            new, found = _moment_nodes(xname, info.rank, opset, names, inits)
            measured[xname] = found
        stat_type = init_types.get(bn_node.input[3], int(info.x.type.dtype))
        new += _batch_stats_bn(info, bn_node, found, stat_type, names, inits)
        del proto.graph.node[index]
        for k, node in enumerate(new):
            proto.graph.node.insert(index + k, node)
        live.append(info)
    proto.graph.initializer.extend(inits)
    moments: dict[str, ChannelMoments] = {}
    if measured:
        del proto.graph.output[:]
        outputs = [name for triple in measured.values() for name in triple]
        proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
        step = Step(
            model=proto.SerializeToString(),
            outputs=outputs,
            inputs=[v.name for v in model.graph.inputs if v.name and v.const_value is None],
            source="data",
            measure={},
            moments=measured,
            opt_level="all",
        )
        moments = execute(step).moments
    lookup = {node_name(i.node): i for i in live}
    for entry in entries:
        live_bn = lookup.get(entry.node)
        if live_bn is None or entry.reason is not None:
            if entry.reason is None:
                entry.reason = "its output could not be found in the graph"
            continue
        acc = moments.get(live_bn.x.name or "", ChannelMoments())
        if acc.mean is None:
            entry.reason = "never ran on these batches"
            continue
        _write_stats(live_bn.node, acc.mean, acc.var())
        entry.status = "applied"
        entry.target = f"statistics over {acc.n} values per channel (one pass, batch statistics)"
        entry.exact = False
    return entries
