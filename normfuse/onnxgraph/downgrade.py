"""Opset conversion: onnx's version converter up, and down with the fixes it needs (Reduce*
axes between attribute and input forms), plus the IR version each opset needs.
"""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir

from normfuse.core.errors import InputError
from normfuse.onnxgraph.edit import opset_of

__all__ = ["convert_opset", "downgrade_opset"]

logger = logging.getLogger(__name__)


def convert_opset(model: ir.Model, target: int) -> ir.Model:
    """The model converted to ``target`` by onnx's version converter; the IR version is kept."""
    proto = ir.to_proto(model)
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
    proto = ir.to_proto(model)
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
                old = onnx.defs.get_schema(node.op_type, target, "")
            except onnx.defs.SchemaError:
                raise InputError(
                    f"{node.op_type} does not exist at opset {target}",
                    f"choose --target-opset >= {current}",
                ) from None
            if new.since_version == old.since_version:
                continue
            if node.op_type in _REDUCE_OPS and len(node.input) > 1 and "axes" not in old.attributes:
                pass  # the older schema also takes axes as an input
            elif node.op_type in _REDUCE_OPS and len(node.input) > 1 and node.input[1]:
                axes = consts.get(node.input[1])
                if axes is None:
                    raise InputError(
                        f"{node.op_type} '{node.name}' has non-constant axes; opset {target} needs them constant"
                    )
                values = onnx.numpy_helper.to_array(axes).reshape(-1).tolist()
                moved.add(node.input[1])
                del node.input[1]
                node.attribute.append(onnx.helper.make_attribute("axes", [int(v) for v in values]))
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
    still = {i for n in proto.graph.node for i in n.input}
    for init in [i for i in proto.graph.initializer if i.name in moved and i.name not in still]:
        proto.graph.initializer.remove(init)  # axes constants now attributes
    for node in [n for n in proto.graph.node if n.op_type == "Constant" and n.output[0] in moved]:
        if node.output[0] not in still:
            proto.graph.node.remove(node)
    return ir.from_proto(proto), (
        f"nodes relabelled where only types or unused attributes changed ({', '.join(sorted(changed))})"
        if changed
        else "no node needed a change"
    )


def _min_ir(opset: int) -> int:
    """The oldest IR version that supports ``opset`` (from onnx's version table)."""
    rows = [row for row in onnx.helper.VERSION_TABLE if row[2] >= opset]
    return min((row[1] for row in rows), default=onnx.IR_VERSION)
