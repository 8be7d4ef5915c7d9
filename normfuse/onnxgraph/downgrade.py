"""Opset conversion: onnx's version converter up, and down with the fixes it needs (Reduce*
axes between attribute and input forms), plus the IR version each opset needs.
"""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir

from normfuse.core.errors import InputError
from normfuse.onnxgraph.edit import opset_of
from normfuse.onnxgraph.protos import to_proto

__all__ = ["convert_opset", "downgrade_opset"]

logger = logging.getLogger(__name__)


def convert_opset(model: ir.Model, target: int) -> ir.Model:
    """The model converted to ``target`` by onnx's version converter; the IR version is kept."""
    proto = to_proto(model)
    ir_version = proto.ir_version
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise InputError(
            f"onnx's version converter cannot take the model from opset {opset_of(model)} to {target}: "
            f"{text[0] if text else type(exc).__name__}",
            "choose another --target-opset",
        ) from None
    converted.ir_version = max(ir_version, _min_ir(target))  # keep the input's, unless too old
    return ir.from_proto(converted)


_REDUCE_OPS = frozenset(
    {
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceSumSquare",
    }
)


def downgrade_opset(model: ir.Model, target: int) -> tuple[ir.Model, str]:
    """The model at the lower opset ``target``, and how it got there.

    onnx's version converter is tried first. It lacks many downgrade adapters (Add-14 -> 13,
    Shape-15 -> 13, ...), so where it fails each node is checked instead: an op whose schema is
    the same at both opsets stays; one whose newer schema only widened types or added
    attributes and inputs the node does not use is relabelled; Reduce ops move their constant
    ``axes`` input back to the attribute; anything else is refused, naming the op. The parity
    check that follows compares the result with the original on onnxruntime.
    """
    try:
        return convert_opset(model, target), "onnx version converter"
    except InputError as exc:
        first = exc.message
    reduce_axes = _reduce_axes(model, opset_of(model))
    proto = to_proto(model)
    current = opset_of(model)
    consts = {i.name: i for i in proto.graph.initializer}
    for n in proto.graph.node:  # the version converter writes axes as Constant nodes
        if n.op_type == "Constant" and len(n.output) == 1:
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            if value is not None:
                consts[n.output[0]] = value
    changed: set[str] = set()
    moved: set[str] = set()

    def fix(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    fix(attr.g)
            if node.domain not in ("", "ai.onnx"):
                continue
            try:
                new = onnx.defs.get_schema(node.op_type, current, "")
            except onnx.defs.SchemaError:
                raise InputError(
                    f"{node.op_type} '{node.name}' is no operator of opset {current}",
                    "fix the model's opset import",
                ) from None
            try:
                old = onnx.defs.get_schema(node.op_type, target, "")
            except onnx.defs.SchemaError:
                first_version = min(
                    v.since_version
                    for v in onnx.defs.get_all_schemas_with_history()
                    if v.name == node.op_type and v.domain in ("", "ai.onnx")
                )
                raise InputError(
                    f"{node.op_type} does not exist at opset {target} (it came in opset "
                    f"{first_version})",
                    f"choose --target-opset >= {first_version}",
                ) from None
            if new.since_version == old.since_version:
                continue
            if node.op_type in _REDUCE_OPS and len(node.input) > 1 and "axes" not in old.attributes:
                pass  # the older schema also takes axes as an input
            elif node.op_type in _REDUCE_OPS and len(node.input) > 1 and node.input[1]:
                axes = consts.get(node.input[1])
                if axes is not None:
                    values = onnx.numpy_helper.to_array(axes).reshape(-1).tolist()
                elif node.input[1] in reduce_axes:  # computed from constants (the dynamo
                    values = reduce_axes[node.input[1]]  # exporter's Reshape(Constant, [-1]))
                else:
                    raise InputError(
                        f"{node.op_type} '{node.name}' has non-constant axes; opset {target} needs them constant"
                    )
                moved.add(node.input[1])
                del node.input[1]
                node.attribute.append(onnx.helper.make_attribute("axes", [int(v) for v in values]))
            for attr in [a for a in node.attribute if a.name not in old.attributes]:
                if _is_default(attr, new):  # what the older op does anyway (Resize-19's
                    node.attribute.remove(attr)  # antialias=0, keep_aspect_ratio_policy=stretch)
            unknown = [a.name for a in node.attribute if a.name not in old.attributes]
            if unknown or len([i for i in node.input if i]) > old.max_input:
                raise InputError(
                    f"{node.op_type} '{node.name}' uses {', '.join(unknown) or 'inputs'} that opset {target} lacks "
                    f"(and the version converter failed: {first})",
                    f"choose --target-opset >= {new.since_version}",
                )
            changed.add(node.op_type)

    fix(proto.graph)
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = target
    _drop_unread(proto.graph, moved)
    return ir.from_proto(proto), (
        f"nodes relabelled where only types or unused attributes changed ({', '.join(sorted(changed))})"
        if changed
        else "no node needed a change"
    )


def _min_ir(opset: int) -> int:
    """The oldest IR version that supports ``opset`` (from onnx's version table)."""
    rows = [row for row in onnx.helper.VERSION_TABLE if row[2] >= opset]
    return min((row[1] for row in rows), default=onnx.IR_VERSION)


def _reduce_axes(model: ir.Model, opset: int) -> dict[str, list[int]]:
    """The Reduce ops' axes inputs that are computed from constants, by name, as integers."""
    from normfuse.onnxgraph.const import ConstantResolver

    consts = ConstantResolver(opset, model.ir_version)
    found: dict[str, list[int]] = {}
    try:
        for graph in model.graphs():
            for node in graph:
                if node.op_type not in _REDUCE_OPS or len(node.inputs) < 2:
                    continue
                axes = node.inputs[1]
                value = consts.try_resolve(axes) if axes is not None and axes.name else None
                if value is not None and value.dtype.kind in "iu":
                    found[axes.name] = [int(v) for v in value.reshape(-1)]  # type: ignore[index]
    finally:
        consts.close()
    return found


def _is_default(attr: onnx.AttributeProto, schema: onnx.defs.OpSchema) -> bool:
    """Whether ``attr`` holds the default value ``schema`` gives it."""
    formal = schema.attributes.get(attr.name)
    if formal is None or not formal.default_value.name:
        return False
    given = onnx.helper.get_attribute_value(attr)
    default = onnx.helper.get_attribute_value(formal.default_value)
    return given == default


def _drop_unread(graph: onnx.GraphProto, moved: set[str]) -> None:
    """Remove what computed the axes now written as attributes, where nothing else reads it:
    their initializers, and the nodes (Constant, or the dynamo exporter's Reshape of
    Constants) whose outputs no node or graph output reads any more, back to the inputs."""
    outputs = {o.name for o in graph.output} | {i.name for i in graph.input}  # IR < 4
    todo = set(moved)
    while todo:
        read = {i for n in graph.node for i in n.input} | outputs
        for sub in (a.g for n in graph.node for a in n.attribute if a.type == a.GRAPH):
            read |= {i for n in sub.node for i in n.input}  # outer names read inside
        unread = todo - read
        todo = set()
        for init in [i for i in graph.initializer if i.name in unread]:
            graph.initializer.remove(init)
        for node in [n for n in graph.node if n.output and set(n.output) <= unread]:
            if not any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute):
                graph.node.remove(node)
                todo |= {i for i in node.input if i}
