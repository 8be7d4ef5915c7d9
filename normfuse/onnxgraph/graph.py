"""What the ONNX rewrites share about graphs: op sets, attribute reading, uses, names, walks.

Imports: onnx_ir, :mod:`normfuse.core`, and :mod:`normfuse.onnxgraph.const`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from normfuse.core.report import ModelStats
from normfuse.onnxgraph.const import ConstantResolver, NotConstant

__all__ = [
    "ELEMENTWISE_OPS",
    "FLOAT_TYPES",
    "KNOWN_OPSET",
    "LINEAR_OPS",
    "NORM_OPS",
    "NORM_TAIL_OPS",
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
    "rank_of",
    "resolve_const",
    "take_over",
    "users",
    "values_of",
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
    uses = list(value.uses())
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
_STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


def may_hold_subgraphs(node: ir.Node) -> bool:
    """False for a node of a standard op that never holds a subgraph."""
    return node.op_type in SUBGRAPH_OPS or node.domain not in _STANDARD_DOMAINS


def _walk(container: Container, label: str) -> Iterator[tuple[Container, str]]:
    yield container, label
    for node in container:
        if not may_hold_subgraphs(node):
            continue
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


def model_stats(model: ir.Model) -> ModelStats:
    """Node counts and parameter bytes over all graphs and functions."""
    stats = ModelStats()
    seen: set[int] = set()
    for container, _ in containers(model):
        if isinstance(container, ir.Graph):
            for v in container.initializers.values():
                if id(v) not in seen and v.const_value is not None:
                    seen.add(id(v))
                    stats.param_bytes += _nbytes(v.const_value)
        for node in container:
            stats.nodes += 1
            stats.ops[node.op_type] = stats.ops.get(node.op_type, 0) + 1
            if node.domain in ("", "ai.onnx"):
                if node.op_type == "BatchNormalization":
                    stats.batchnorm_nodes += 1
                if node.op_type in NORM_OPS:
                    stats.norm_nodes += 1
                value = node.attributes.get("value") if node.op_type == "Constant" else None
                if (
                    value is not None
                    and value.type == ir.AttributeType.TENSOR
                    and value.value is not None
                ):
                    stats.param_bytes += _nbytes(value.value)
    return stats


def _nbytes(tensor: Any) -> int:
    """``tensor.nbytes`` from the static shape without numpy (onnx_ir's goes through an array:
    on graphs of 100k tensors that was most of the statistics' time)."""
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


def values_of(container: Container) -> Iterator[ir.Value]:
    yield from container.inputs
    if isinstance(container, ir.Graph):
        yield from container.initializers.values()
    for node in container:
        yield from (v for v in node.outputs)
