"""``recalibrate``: BatchNormalization statistics from data. The inputs of the BatchNorms are
exposed as outputs (through If branches and Loop bodies too), run by a runner the caller gives
(onnxruntime in :mod:`normfuse.api`), accumulated per channel in float64 (Chan et al.'s merge)
and written back; BatchNorms that depend on other BatchNorms are done after them, level by
level, so each sees its inputs as the recalibrated model produces them.

:func:`recalibrate_batch_mode` is the one-pass alternative: every BatchNorm of the main graph is
replaced, in a copy that only runs, by the same normalisation with the batch's own statistics
(as PyTorch's BatchNorm computes in training), and all their inputs are exposed at once, so the
data is read once and the statistics are those PyTorch's training-mode recalibration measures.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from normfuse.core.algebra import ChannelMoments
from normfuse.core.report import Entry
from normfuse.onnxgraph.edit import BN, all_names, fresh_name, model_resolver, read_batchnorm
from normfuse.onnxgraph.graph import node_name

__all__ = ["Runner", "recalibrate_batch_mode", "recalibrate_model"]

logger = logging.getLogger(__name__)


def _bn_levels(model: ir.Model) -> dict[int, int]:
    """For each BatchNormalization (by id), how many BatchNorms lie on the longest path before it."""
    level: dict[int, int] = {}

    def walk(graph: ir.Graph, depth_in: dict[int, int], base: int) -> int:
        deepest = base
        depth: dict[int, int] = dict(depth_in)
        for node in graph:
            d = max([depth.get(id(v), base) for v in node.inputs if v is not None] + [base])
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    d = max(d, walk(attr.value, depth, d))
                elif attr.type == ir.AttributeType.GRAPHS:
                    for g in attr.value:
                        d = max(d, walk(g, depth, d))
            if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
                level[id(node)] = d
                d += 1
            for o in node.outputs:
                depth[id(o)] = d
            deepest = max(deepest, d)
        return deepest

    walk(model.graph, {}, 0)
    return level


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


Runner = Callable[[bytes, list[str]], Callable[[dict[str, np.ndarray]], list[np.ndarray]]]
"""``runner(model_bytes, output_names)`` returns ``run(feeds) -> outputs`` (onnxruntime)."""


def recalibrate_model(
    model: ir.Model,
    batches: Sequence[dict[str, np.ndarray]],
    *,
    runner: Runner,
    where: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Entry]:
    """Recompute BatchNormalization mean/variance from ``batches``, in place.

    BatchNorms are taken level by level (a BatchNorm after another one waits until that one has
    its new statistics), so each is measured on the inputs the recalibrated model gives it.
    The variance written is the population variance of the data (``ddof=0``): the one that
    gives the normalised values unit variance, as ONNX BatchNormalization uses it.
    """
    levels = _bn_levels(model)
    consts = model_resolver(model)
    entries: dict[int, Entry] = {}
    targets: list[tuple[ir.Node, str, int, int]] = []
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
        targets.append((node, info.x.name, int(info.x.type.dtype), info.rank or 2))
    by_level: dict[int, list[tuple[ir.Node, str, int, int]]] = {}
    for t in targets:
        by_level.setdefault(levels.get(id(t[0]), 0), []).append(t)
    total = len(by_level) * len(batches)
    done = 0
    for level in sorted(by_level):
        group = by_level[level]
        proto = ir.to_proto(model)  # the current statistics, with the inputs exposed
        names = all_names(model)
        exposed: dict[str, tuple[str, bool]] = {}
        for node, xname, elem, rank in group:
            if xname in exposed:
                continue
            result = _expose(proto, xname, elem, rank, names)
            if isinstance(result, str):
                entries[id(node)].reason = result
                continue
            exposed[xname] = result
        order = list(exposed)
        run = runner(proto.SerializeToString(), [exposed[k][0] for k in order])
        moments = {k: ChannelMoments() for k in order}
        for feeds in batches:
            for xname, value in zip(order, run(feeds), strict=True):
                arr = np.asarray(value)
                if exposed[xname][1] and arr.ndim >= 3:
                    arr = arr.reshape((-1, *arr.shape[2:]))  # iterations x batch -> one batch axis
                moments[xname].add(arr)
            done += 1
            if progress is not None:
                progress(done, total)
        for node, xname, _, _ in group:
            entry = entries[id(node)]
            if xname not in moments:
                continue
            acc = moments[xname]
            if acc.mean is None:
                entry.reason = "never ran on these batches (a branch not taken)"
                continue
            _write_stats(node, acc.mean, acc.var())
            entry.status = "applied"
            entry.target = f"statistics over {acc.n} values per channel (level {level})"
            entry.exact = False
    return list(entries.values())


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


def _reduce_mean(
    x: str, axes: list[int], out: str, opset: int, names: set[str], inits: list[onnx.TensorProto]
) -> onnx.NodeProto:
    if opset >= 18:
        axes_name = fresh_name(names, f"{out}_axes")
        inits.append(onnx.numpy_helper.from_array(np.array(axes, np.int64), axes_name))
        return onnx.helper.make_node("ReduceMean", [x, axes_name], [out], keepdims=1)
    return onnx.helper.make_node("ReduceMean", [x], [out], axes=axes, keepdims=1)


def _batch_norm_nodes(
    bn: BN, y: str, opset: int, names: set[str], inits: list[onnx.TensorProto]
) -> list[onnx.NodeProto]:
    """``y = (x - mean_b) / sqrt(var_b + eps) * gamma + beta`` with the batch's own (biased)
    statistics over every axis but 1, as BatchNorm computes in training."""
    rank = bn.rank or 2
    axes = [0, *range(2, rank)]
    view = (1, bn.channels) + (1,) * (rank - 2)
    x = bn.x.name
    n = {
        k: fresh_name(names, f"{y}_{k}")
        for k in ("mean", "d", "d2", "var", "ve", "std", "xn", "xs")
    }
    consts = {
        "eps": np.array(bn.eps, bn.dtype),
        "gamma": bn.gamma.astype(bn.dtype).reshape(view),
        "beta": bn.beta.astype(bn.dtype).reshape(view),
    }
    c = {}
    for k, v in consts.items():
        c[k] = fresh_name(names, f"{y}_{k}")
        inits.append(onnx.numpy_helper.from_array(np.ascontiguousarray(v), c[k]))
    make = onnx.helper.make_node
    return [
        _reduce_mean(x, axes, n["mean"], opset, names, inits),
        make("Sub", [x, n["mean"]], [n["d"]]),
        make("Mul", [n["d"], n["d"]], [n["d2"]]),
        _reduce_mean(n["d2"], axes, n["var"], opset, names, inits),
        make("Add", [n["var"], c["eps"]], [n["ve"]]),
        make("Sqrt", [n["ve"]], [n["std"]]),
        make("Div", [n["d"], n["std"]], [n["xn"]]),
        make("Mul", [n["xn"], c["gamma"]], [n["xs"]]),
        make("Add", [n["xs"], c["beta"]], [y]),
    ]


def recalibrate_batch_mode(
    model: ir.Model,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    runner: Runner,
    where: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    total: int = 0,
) -> list[Entry]:
    """Recompute BatchNormalization statistics in one pass over ``batches``, in place.

    During the pass every BatchNormalization of the main graph normalises each batch with that
    batch's own statistics (biased variance), as PyTorch's BatchNorm does in training and so as
    ``update_bn``/PreciseBN/normfuse's PyTorch recalibration see the data; its input is
    accumulated per channel in float64 (Chan's merge). The variance written is the population
    one (``ddof=0``). BatchNorms inside subgraphs are left to ``mode="sequential"``.
    """
    consts = model_resolver(model)
    entries: list[Entry] = []
    targets: list[BN] = []
    for node in model.graph.all_nodes():
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        if where is not None and not fnmatch.fnmatchcase(node.name or "", where):
            continue
        entry = Entry(node_name(node), node.op_type, "skipped")
        entries.append(entry)
        info = read_batchnorm(node, consts)
        if isinstance(info, str):
            entry.reason = info
        elif node.graph is not model.graph:
            entry.reason = "inside a subgraph: use the sequential mode"
        elif info.x.type is None or not info.x.name or info.rank is None:
            entry.reason = "its input has no name, type or known rank"
        else:
            targets.append(info)
    proto = ir.to_proto(model)
    names = all_names(model)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 18)
    inits: list[onnx.TensorProto] = []
    exposed: list[str] = []
    live: list[BN] = []
    for info in targets:
        y = info.node.outputs[0].name
        index = _bn_proto_index(proto.graph, y) if y else None
        if index is None:
            continue
        new = _batch_norm_nodes(info, y, opset, names, inits)
        del proto.graph.node[index]
        for k, node in enumerate(new):
            proto.graph.node.insert(index + k, node)
        if info.x.name not in exposed:
            exposed.append(info.x.name)
            proto.graph.output.append(
                onnx.helper.make_tensor_value_info(info.x.name, int(info.x.type.dtype), None)
            )
        live.append(info)
    proto.graph.initializer.extend(inits)
    moments = {k: ChannelMoments() for k in exposed}
    run = runner(proto.SerializeToString(), exposed) if exposed else None
    for done, feeds in enumerate(batches if run is not None else (), 1):
        for xname, value in zip(exposed, run(feeds), strict=True):
            moments[xname].add(np.asarray(value))
        if progress is not None:
            progress(done, total)
    lookup = {node_name(i.node): i for i in live}
    for entry in entries:
        info = lookup.get(entry.node)
        if info is None or entry.reason is not None:
            if entry.reason is None:
                entry.reason = "its output could not be found in the graph"
            continue
        acc = moments[info.x.name]
        if acc.mean is None:
            entry.reason = "never ran on these batches"
            continue
        _write_stats(info.node, acc.mean, acc.var())
        entry.status = "applied"
        entry.target = f"statistics over {acc.n} values per channel (one pass, batch statistics)"
        entry.exact = False
    return entries
