"""Shapes for a rewrite: onnx's shape inference where the converter wrote no ``value_info``.

:class:`InferredShapes` fills the shapes a fold reads (tf2onnx writes no ``value_info``) for the
length of one fold, from onnx's shape inference on a copy without the large weights, and takes
them back afterwards so the model written gains no ``value_info``; elementwise nodes no fold can
touch are found first and need none (:func:`_fold_reads`). :func:`infer_types` is onnx_ir's
inference pass for the other rewrites, without its mistake on sequence values.

Imports: onnx, onnx_ir, numpy, :mod:`normfuse.onnxgraph.const`, :mod:`normfuse.onnxgraph.graph`,
:mod:`normfuse.onnxgraph.paths` and :mod:`normfuse.onnxgraph.wire`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_ir as ir

from normfuse.onnxgraph.const import ConstantResolver, all_equal_to
from normfuse.onnxgraph.graph import (
    ELEMENTWISE_OPS,
    LINEAR_OPS,
    NORM_OPS,
    tensor_proto_nbytes,
)
from normfuse.onnxgraph.paths import LAYOUT_OPS, READ_BY_FOLD, dims_of
from normfuse.onnxgraph.protos import quiet

__all__ = ["InferredShapes", "infer_types"]

logger = logging.getLogger(__name__)

#: Initializers above this size go to shape inference as typed inputs, without their values.
_INFER_INLINE_BYTES = 1024


def infer_types(model: ir.Model) -> None:
    """onnx_ir's shape inference pass on ``model``, without its mistake on values that are not
    tensors: it gives a sequence (SplitToSequence: ``torch.chunk`` in dynamo exports) the
    tensor type of its elements, which onnxruntime refuses to load. Values an op's schema
    may make a sequence, optional or map keep the type and shape they had."""
    from onnx_ir.passes.common import ShapeInferencePass

    graphs = list(model.graphs())
    before = [
        (v, v.type, v.shape)
        for g in graphs
        for v in [*g.inputs, *(o for n in g for o in n.outputs)]
        if v is not None
    ]
    try:
        with quiet("onnx_ir.passes.common.shape_inference", "onnx_ir.serde"):
            ShapeInferencePass()(model)  # it logs a traceback where inference fails
    except Exception as exc:  # inference is a help, never a requirement
        logger.info("shape inference failed: %s", exc)
        return
    opsets = model.opset_imports
    for v, type_, shape in before:
        if v.type is type_ and v.shape is shape:
            continue
        if (type_ is not None and not isinstance(type_, ir.TensorType)) or _maybe_not_tensor(
            v, opsets
        ):
            v.type, v.shape = type_, shape


def _maybe_not_tensor(value: ir.Value, opsets: dict[str, int]) -> bool:
    """Whether the op producing ``value`` may make it a sequence, optional or map (by its
    schema; an op without one counts as may)."""
    node = value.producer()
    if node is None:
        return False
    domain = "" if node.domain == "ai.onnx" else node.domain
    return _output_may_not_be_tensor(
        node.op_type, domain, opsets.get(domain, opsets.get("ai.onnx", 1)), value.index() or 0
    )


@functools.lru_cache(maxsize=1024)
def _output_may_not_be_tensor(op: str, domain: str, opset: int, index: int) -> bool:
    try:
        schema = onnx.defs.get_schema(op, opset, domain)
    except onnx.defs.SchemaError:
        return True
    outputs = schema.outputs
    if not outputs:
        return True
    formal = outputs[min(index, len(outputs) - 1)]
    allowed = [formal.type_str]
    for constraint in schema.type_constraints:
        if constraint.type_param_str == formal.type_str:
            allowed = list(constraint.allowed_type_strs)
    return any(not t.startswith("tensor(") for t in allowed)


class InferredShapes:
    """Shapes from onnx's shape inference (strict off) for the main graph's values that have
    none, set for the length of a fold and taken back by :meth:`restore`.

    Inference runs on a copy of the graph in which initializers above 1 KiB are typed inputs
    without values, so nothing large is read or copied. ``source`` is the ModelProto the model
    was just read from, unchanged since (the loader's, :attr:`normfuse.onnxgraph.io.Loaded.proto`):
    its fields are copied in C++ instead of serializing every node again. ``for_fold`` sets
    shapes only on the values a fold reads (:func:`_fold_reads`), not on every value.
    """

    def __init__(
        self,
        model: ir.Model,
        opset: int,
        source: onnx.ModelProto | None = None,
        *,
        for_fold: bool = False,
        consts: ConstantResolver | None = None,
    ) -> None:
        self._given: list[tuple[ir.Value, ir.Shape]] = []
        #: ``for_fold``: the main graph's elementwise nodes with a constant operand that no
        #: fold can touch (see :func:`_fold_reads`), by id.
        self.inert: dict[int, ir.Node] = {}
        graph = model.graph
        # the shapes values had, for those that take an inferred one over from another value
        nodes = list(graph)  # one walk of the linked node list, two passes over the copy
        everything = [v for n in nodes for v in n.outputs if v is not None]
        self._had: dict[int, tuple[ir.Value, ir.Shape]] = {
            id(v): (v, v.shape) for v in everything if v.shape is not None
        }
        own = consts is None
        if consts is None:
            consts = ConstantResolver(opset, model.ir_version)
        if for_fold:
            outputs, self.inert = _fold_reads(nodes, consts)
        else:
            outputs = everything
        missing = [v for v in outputs if v.shape is None and v.name]
        if not missing:
            if own:
                consts.close()
            return
        try:
            result: onnx.GraphProto | None = None
            try:
                light = _light_copy(model, source) if source is not None else None
                result = _infer(model, consts, light)
            except Exception as exc:  # inference is a help, never a requirement
                logger.info("shape inference failed, using the shapes the model has: %s", exc)
            inferred = _shapes_of(result, {v.name for v in missing if v.name})
            if len(inferred) < len(missing) and for_fold:
                # the fallback below builds a shape from the producer's: give it every value
                missing = [v for v in everything if v.shape is None and v.name]
                inferred = _shapes_of(result, None)
            for v in missing:  # in graph order, so each can build on the ones before
                shape = inferred.get(v.name or "")
                if shape is None:
                    dims = dims_of(v, consts)
                    if dims is not None:
                        shape = ir.Shape(
                            [ir.SymbolicDim(d) if isinstance(d, str) else d for d in dims]
                        )
                if shape is not None:
                    v.shape = shape
                    self._given.append((v, shape))
        finally:
            if own:
                consts.close()
            else:  # what needed a shape may resolve now
                consts.forget_failures()

    @property
    def count(self) -> int:
        return len(self._given)

    def restore(self, model: ir.Model) -> None:
        """Take back every inferred shape, also where the fold copied one to a new value."""
        if not self._given:
            return
        given = {id(shape) for _, shape in self._given}
        for v, shape in self._given:
            if v.shape is shape:
                v.shape = None
        graph = model.graph
        for v in [*graph.inputs, *graph.outputs, *(o for n in graph for o in n.outputs)]:
            if v is not None and v.shape is not None and id(v.shape) in given:
                had = self._had.get(id(v))
                v.shape = had[1] if had is not None and had[0] is v else None
        self._given.clear()
        self._had.clear()


#: Inputs that hold shapes or axes: a computed one that resolves to a small constant goes to
#: inference as a constant (onnx's data propagation does not follow every op tf2onnx writes).
_SHAPE_INPUTS = {
    "Reshape": (1,),
    "Unsqueeze": (1,),
    "Squeeze": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Slice": (1, 2, 3, 4),
    "ConstantOfShape": (0,),
    "Pad": (1,),
    "Resize": (2, 3),
    "Upsample": (1,),
    "ReduceMean": (1,),
    "ReduceSum": (1,),
    "Split": (1,),
}


_LOOKED_AT = READ_BY_FOLD | ELEMENTWISE_OPS | {"Shape"}  # the op types _fold_reads reads


def _fold_reads(
    nodes: Iterable[ir.Node], consts: ConstantResolver
) -> tuple[list[ir.Value], dict[int, ir.Node]]:
    """The computed values whose shapes a fold may read, each once, in graph order, and the
    elementwise nodes no fold touches, by id.

    The values: the inputs and outputs of linear ops, norms, layout ops and of the elementwise
    ops with an operand that may be constant which a fold may touch, and what ``Shape`` reads
    (a constant can come from a shape). An elementwise op no fold touches reaches no linear op
    or norm through such ops and layout ops, and its constant is known and neither all ones
    nor all zeros (``_Folder.fold_chain`` passes over a chain of them without reading a shape).
    """
    seen: set[int] = set()
    out: list[ir.Value] = []

    def add(values: Iterable[ir.Value | None]) -> None:
        for v in values:
            if v is not None and id(v) not in seen and v.producer() is not None:
                seen.add(id(v))
                out.append(v)

    nodes = list(nodes)
    affine = {
        id(node)
        for node in nodes
        if node.op_type in ELEMENTWISE_OPS
        and node.domain in ("", "ai.onnx")
        and any(consts.may_be_constant(v) for v in node.inputs)
    }
    reaching = _reaching_linear(nodes, affine)
    inert: dict[int, ir.Node] = {}
    for node in nodes:
        op = node.op_type
        if op not in _LOOKED_AT or node.domain not in ("", "ai.onnx"):
            continue
        if (
            id(node) in affine
            and id(node) not in reaching
            and not _may_change_nothing(node, consts)
        ):
            inert[id(node)] = node
        elif op in READ_BY_FOLD or id(node) in affine:
            add(node.inputs)
            add(node.outputs)
        elif op == "Shape" and node.inputs:
            add(node.inputs[:1])
    return out, inert


def _reaching_linear(nodes: list[ir.Node], affine: set[int]) -> set[int]:
    """The ``affine`` nodes (elementwise with an operand that may be constant) connected to a
    linear op or a norm through affine nodes and layout ops, in either direction: the only
    ones a fold can report (``_Folder._reportable`` looks no further), found component by
    component in one pass."""
    component: dict[int, int] = {}
    touches: list[bool] = []
    for start in nodes:
        if id(start) not in affine or id(start) in component:
            continue
        index = len(touches)
        touches.append(False)
        component[id(start)] = index
        todo = [start]
        while todo:
            node = todo.pop()
            around = [v.producer() for v in node.inputs if v is not None]
            around += [u for v in node.outputs for u in v.consumers()]
            for other in around:
                if other is None or id(other) in component:
                    continue
                op = other.op_type
                if op in LINEAR_OPS or op in NORM_OPS:
                    touches[index] = True
                elif id(other) in affine or op in LAYOUT_OPS:
                    component[id(other)] = index
                    todo.append(other)
    return {key for key, index in component.items() if touches[index] and key in affine}


def _may_change_nothing(node: ir.Node, consts: ConstantResolver) -> bool:
    """Whether a constant operand of ``node`` is all ones or all zeros, or not known without
    shapes: a fold may remove such a node, and whether that keeps the shape needs shapes."""
    for v in node.inputs:
        if v is None or not consts.may_be_constant(v):
            continue
        c = consts.try_resolve(v)
        if c is None or c.size == 0 or all_equal_to(c, 1) or all_equal_to(c, 0):
            return True
    return False


def _light_copy(model: ir.Model, source: onnx.ModelProto) -> onnx.ModelProto | None:
    """``source`` without the bytes of its large initializers, or ``None`` when its main graph
    is not node for node the one of ``model`` (then the graph is serialized again)."""
    graph, src = model.graph, source.graph
    if len(src.node) != len(graph):
        return None
    proto = onnx.ModelProto()
    proto.ir_version = max(model.ir_version, 4)
    proto.opset_import.extend(source.opset_import)
    proto.functions.extend(source.functions)
    g = proto.graph
    g.name = src.name or "main"
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    inputs = {i.name for i in src.input}
    for tensor in src.initializer:
        nbytes = tensor_proto_nbytes(tensor)
        large = tensor.data_location == onnx.TensorProto.EXTERNAL or (
            tensor.ByteSize() > _INFER_INLINE_BYTES + 64
            if nbytes is None
            else nbytes > _INFER_INLINE_BYTES
        )
        if not large:
            g.initializer.append(tensor)
        elif tensor.name not in inputs:
            g.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
    return proto


def _infer(
    model: ir.Model, consts: ConstantResolver, light: onnx.ModelProto | None = None
) -> onnx.GraphProto:
    """The main graph after onnx's shape inference (``value_info`` and outputs typed)."""
    graph = model.graph
    if light is not None:
        given: dict[int, str] = {}
        for i, node in enumerate(graph):
            proto_node = light.graph.node[i] if node.op_type in _SHAPE_INPUTS else None
            if proto_node is None:
                continue
            if proto_node.op_type != node.op_type or list(proto_node.output) != [
                o.name or "" for o in node.outputs
            ]:
                light = None  # not the graph that was read: serialize it again
                break
            _fold_shape_inputs(node, proto_node, light.graph, consts, given)
    if light is not None:
        return _run_inference(light)
    proto = onnx.ModelProto()
    proto.ir_version = max(model.ir_version, 4)
    for domain, version in model.opset_imports.items():
        proto.opset_import.add(domain=domain, version=version)
    g = proto.graph
    g.name = graph.name or "main"
    names = set()
    for v in graph.inputs:
        g.input.append(ir.serde.serialize_value(v))
        names.add(v.name)
    for name, v in graph.initializers.items():
        tensor = v.const_value
        if tensor is None:
            continue
        if tensor.nbytes <= _INFER_INLINE_BYTES:
            g.initializer.append(ir.serde.serialize_tensor(tensor))
            g.initializer[-1].name = name
        elif name not in names:
            g.input.append(
                onnx.helper.make_tensor_value_info(
                    name, int(tensor.dtype), [int(d) for d in tensor.shape.numpy()]
                )
            )
    folded: dict[int, str] = {}
    for node in graph:
        value = node.attributes.get("value") if node.op_type == "Constant" else None
        if (
            value is not None
            and value.type == ir.AttributeType.TENSOR
            and value.value is not None
            and value.value.nbytes > _INFER_INLINE_BYTES
            and node.outputs[0].name
        ):  # a large constant goes in as a typed input, like a large initializer
            t = value.value
            g.input.append(
                onnx.helper.make_tensor_value_info(
                    node.outputs[0].name, int(t.dtype), [int(d) for d in t.shape.numpy()]
                )
            )
            continue
        proto_node = g.node.add()
        ir.serde.serialize_node_into(proto_node, node)
        _fold_shape_inputs(node, proto_node, g, consts, folded)
    for v in graph.outputs:
        g.output.append(ir.serde.serialize_value(v))
    for function in model.functions.values():
        proto.functions.append(ir.serde.serialize_function(function))
    return _run_inference(proto)


def _fold_shape_inputs(
    node: ir.Node,
    proto_node: onnx.NodeProto,
    g: onnx.GraphProto,
    consts: ConstantResolver,
    folded: dict[int, str],
) -> None:
    """Computed shape/axes inputs that resolve to small integer constants go in as constants."""
    for idx in _SHAPE_INPUTS.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ():
        v = node.inputs[idx] if idx < len(node.inputs) else None
        producer = v.producer() if v is not None else None
        if v is None or producer is None or producer.op_type == "Constant":
            continue
        if id(v) not in folded:
            arr = consts.try_resolve(v)
            if arr is None or arr.size > 64 or not np.issubdtype(arr.dtype, np.integer):
                continue
            name = f"__normfuse_shape_{len(folded)}"
            g.initializer.append(onnx.numpy_helper.from_array(np.asarray(arr), name))
            folded[id(v)] = name
        proto_node.input[idx] = folded[id(v)]


def _run_inference(proto: onnx.ModelProto) -> onnx.GraphProto:
    return onnx.shape_inference.infer_shapes(
        proto, check_type=False, strict_mode=False, data_prop=True
    ).graph


def _shapes_of(graph: onnx.GraphProto | None, wanted: set[str] | None) -> dict[str, ir.Shape]:
    """Shapes by value name from an inferred graph (only the ``wanted`` names, when given);
    values of one shape share one Shape object (never modified), decoded once."""
    out: dict[str, ir.Shape] = {}
    if graph is None:
        return out
    decoded: dict[bytes, ir.Shape] = {}
    for info in [*graph.value_info, *graph.output]:
        if wanted is not None and info.name not in wanted:
            continue
        t = info.type
        if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            continue
        proto = t.tensor_type.shape
        key = proto.SerializeToString()
        if key in decoded:
            out[info.name] = decoded[key]
            continue
        dims: list[int | str | None] = []
        for d in proto.dim:
            kind = d.WhichOneof("value")  # one call where two HasField tests were
            if kind == "dim_value":
                dims.append(int(d.dim_value))
            elif kind == "dim_param":
                dims.append(d.dim_param)
            else:
                dims.append(None)
        out[info.name] = decoded[key] = ir.Shape(dims)
    return out
