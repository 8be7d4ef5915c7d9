"""What the ONNX rewrites share about graphs: op sets, attribute reading, uses, names, walks.

Imports: onnx_ir, :mod:`normfuse.core`, and :mod:`normfuse.onnxgraph.const`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from normfuse.core.report import ModelStats
from normfuse.onnxgraph.const import ConstantResolver, NotConstant, reads_shape_only

__all__ = [
    "ELEMENTWISE_OPS",
    "FLOAT_TYPES",
    "KNOWN_OPSET",
    "LINEAR_OPS",
    "NORM_OPS",
    "NORM_TAIL_OPS",
    "STANDARD_DOMAINS",
    "SUBGRAPH_OPS",
    "Container",
    "Refused",
    "containers",
    "exclusive",
    "float_attr",
    "get_attr",
    "int_attr",
    "ints_attr",
    "label_of",
    "may_hold_subgraphs",
    "model_stats",
    "node_name",
    "others",
    "proto_nbytes",
    "rank_of",
    "reads_shape_only",
    "resolve_const",
    "take_over",
    "tensor_proto_nbytes",
    "users",
    "value_names",
]

logger = logging.getLogger(__name__)

LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
ELEMENTWISE_OPS = frozenset({"Mul", "Add", "Sub", "Div"})
NORM_TAIL_OPS = frozenset(
    {"LayerNormalization", "GroupNormalization", "InstanceNormalization", "RMSNormalization"}
)
NORM_OPS = NORM_TAIL_OPS | {"BatchNormalization"}
#: The newest default-domain opset whose semantics normfuse knows (that of the installed onnx).
KNOWN_OPSET = onnx.defs.onnx_opset_version()
FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)

Container = ir.Graph | ir.Function


class Refused(Exception):
    """A candidate cannot fold; ``reason`` says why and ``fix`` how to make it fold."""

    def __init__(self, reason: str, fix: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


def label_of(node: ir.Node) -> str:
    return f"{node.op_type} '{node_name(node)}'"


def take_over(old: ir.Value, new: ir.Value, computing: set[int], renamed: str) -> None:
    """``new`` stands in for ``old``: every reader of ``old`` but the nodes that compute ``new``
    from it (ids in ``computing``) reads ``new``, graph outputs included, and ``new`` takes
    ``old``'s name, type and shape; ``old`` is renamed ``renamed``."""
    for use in list(old.uses()):
        if id(use.node) not in computing:
            use.node.replace_input_with(use.idx, new)
    graph = old.graph
    if graph is not None and old.is_graph_output():
        outputs = graph.outputs
        for i, v in enumerate(outputs):
            if v is old:
                outputs[i] = new
    name = old.name
    old.name = renamed
    new.name = name
    new.type, new.shape = old.type, old.shape


def node_name(node: ir.Node) -> str:
    """The node's name, or ``<op_type>:<first output>`` when it has none."""
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs else "?"
    return f"<{node.op_type}:{out}>"


def get_attr(node: ir.Node, name: str, default: Any) -> Any:
    a = node.attributes.get(name)
    if a is None:
        return default
    if a.value is None:
        raise Refused(f"{label_of(node)} has a malformed attribute '{name}'")
    return a.value


def int_attr(node: ir.Node, name: str, default: int) -> int:
    try:
        return int(get_attr(node, name, default))
    except (TypeError, ValueError):
        raise Refused(f"{label_of(node)} has a malformed attribute '{name}'") from None


def float_attr(node: ir.Node, name: str, default: float) -> float:
    try:
        return float(get_attr(node, name, default))
    except (TypeError, ValueError):
        raise Refused(f"{label_of(node)} has a malformed attribute '{name}'") from None


def ints_attr(node: ir.Node, name: str, default: list[int]) -> list[int]:
    try:
        return [int(v) for v in get_attr(node, name, default)]
    except (TypeError, ValueError):
        raise Refused(f"{label_of(node)} has a malformed attribute '{name}'") from None


def rank_of(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return value.shape.rank()


def users(value: ir.Value) -> list[ir.Node]:
    return [u.node for u in value.uses()]


def exclusive(value: ir.Value, node: ir.Node) -> bool:
    """Whether ``node`` is the only reader of ``value``'s elements (a reader of its shape or
    type alone does not count: a fold keeps both) and it is no graph output."""
    uses = [u for u in value.uses() if not reads_shape_only(u.node, u.idx)]
    return len(uses) == 1 and uses[0].node is node and not value.is_graph_output()


def others(value: ir.Value, node: ir.Node) -> str:
    names: list[str] = [label_of(u) for u in users(value) if u is not node]
    if value.is_graph_output():
        names.append("a graph output")
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def resolve_const(
    consts: ConstantResolver, value: ir.Value | None, what: str, op: ir.Node
) -> np.ndarray:
    """The constant ``value`` (``what`` of ``op``), or :class:`Refused` saying it is not one."""
    try:
        return consts.resolve(value)
    except NotConstant as exc:
        raise Refused(f"the {what} of {label_of(op)} is not constant: {exc}") from None


#: The standard ops that hold subgraphs; nodes of other standard ops are not looked into
#: (on a 200k-node graph, reading every node's attributes was a second per walk).
SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


def may_hold_subgraphs(node: ir.Node) -> bool:
    """False for a node of a standard op that never holds a subgraph."""
    return node.op_type in SUBGRAPH_OPS or node.domain not in STANDARD_DOMAINS


def _walk(container: Container, label: str) -> Iterator[tuple[Container, str]]:
    yield container, label
    for node in container:
        if node.op_type not in SUBGRAPH_OPS and node.domain in STANDARD_DOMAINS:
            continue  # not may_hold_subgraphs(node), without a call per node
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from _walk(attr.value, f"{label}{label_of(node)}/{attr.name}")
            elif attr.type == ir.AttributeType.GRAPHS:
                for i, g in enumerate(attr.value):
                    yield from _walk(g, f"{label}{label_of(node)}/{attr.name}[{i}]")


def containers(model: ir.Model) -> Iterator[tuple[Container, str]]:
    """The main graph, its subgraphs and the model-local functions, with display labels."""
    yield from _walk(model.graph, "")
    for function in model.functions.values():
        yield from _walk(function, f"function '{function.domain}.{function.name}'/")


def model_stats(model: ir.Model, sizes: dict[int, tuple[Any, int]] | None = None) -> ModelStats:
    """Node counts and parameter bytes over all graphs and functions.

    Args:
        model: The model.
        sizes: Byte counts of tensors by id (with the tensor, so that an id is not reused),
            filled and read: statistics taken before and after a rewrite count each tensor the
            rewrite left alone once.
    """
    stats = ModelStats()
    ops = stats.ops
    seen: set[int] = set()
    known = {} if sizes is None else sizes
    for container, _ in containers(model):
        if isinstance(container, ir.Graph):
            for v in container.initializers.values():
                tensor = v.const_value
                if id(v) in seen or tensor is None:
                    continue
                seen.add(id(v))
                hit = known.get(id(tensor))
                if hit is None or hit[0] is not tensor:
                    hit = known[id(tensor)] = (tensor, _nbytes(tensor))
                stats.param_bytes += hit[1]
        # counted by (op, domain) first: one dictionary update per kind, not per node
        kinds = Counter([(node.op_type, node.domain) for node in container])
        constants = False
        for (op, domain), count in kinds.items():
            stats.nodes += count
            ops[op] = ops.get(op, 0) + count
            if domain in ("", "ai.onnx"):
                if op == "BatchNormalization":
                    stats.batchnorm_nodes += count
                if op in NORM_OPS:
                    stats.norm_nodes += count
                constants = constants or op == "Constant"
        for node in container if constants else ():
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            value = node.attributes.get("value")
            if (
                value is not None
                and value.type == ir.AttributeType.TENSOR
                and value.value is not None
            ):
                stats.param_bytes += _nbytes(value.value)
    return stats


def _nbytes(tensor: Any) -> int:
    """``tensor.nbytes`` from the static shape without numpy (onnx_ir's goes through an array:
    on graphs of 100k tensors that was most of the statistics' time). A tensor read from a
    TensorProto gives its dims straight from the proto (its ``shape`` builds a new Shape at
    every access)."""
    need = proto_nbytes(tensor)
    if need is not None:
        return need
    dims = tensor.shape.dims
    if all(type(d) is int for d in dims):
        try:
            count = 1
            for d in dims:
                count *= d
            return (count * tensor.dtype.bitwidth + 7) // 8
        except TypeError:  # a type without a bit width (strings)
            pass
    return int(tensor.nbytes)


def proto_nbytes(tensor: Any) -> int | None:
    """The bytes that the dims and element type of a tensor read from a TensorProto need, from
    the proto's own fields (onnx_ir's ``shape`` builds a new Shape at every access); ``None``
    for other tensors and for types without a bit width."""
    if type(tensor) is not _PROTO_TENSOR:
        return None
    return tensor_proto_nbytes(tensor.raw)


def tensor_proto_nbytes(proto: Any) -> int | None:
    """The bytes a TensorProto's dims and element type need, ``None`` for types without a bit
    width. Unlike ``ByteSize()``, which encodes the message to count it, it reads no data."""
    bits = _BITS.get(proto.data_type)
    return None if bits is None else (math.prod(proto.dims) * bits + 7) // 8


_PROTO_TENSOR = ir.serde.TensorProtoTensor


def _bit_widths() -> dict[int, int]:
    widths = {}
    for t in ir.DataType:
        try:
            widths[int(t)] = t.bitwidth
        except TypeError:  # strings, undefined
            continue
    return widths


_BITS = _bit_widths()  # data_type -> bits per element


def value_names(found: Iterable[Container]) -> set[str]:
    """The non-empty names of the values of ``found``: inputs, initializers, node outputs."""
    names: set[str | None] = set()
    for container in found:
        names.update([v.name for v in container.inputs])
        if isinstance(container, ir.Graph):
            names.update([v.name for v in container.initializers.values()])
        names.update([v.name for node in container for v in node.outputs])
    names.discard(None)
    names.discard("")
    return names  # type: ignore[return-value]
