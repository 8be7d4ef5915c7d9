"""Layout paths: a per-channel affine moves through layout ops with its channel axis tracked.

Converters put layout ops between a linear op and its norm: tf2onnx writes NHWC graphs with a
``Transpose`` on each side of every Conv (and ``Reshape``/``Squeeze`` around Conv1D and Dense on
rank-3 input), paddle2onnx an ``Identity`` after each layer. A per-channel map on axis ``a`` after
such an op is a per-channel map on the axis that ``a`` came from, when that axis is one axis of
the same length holding the same elements:

* ``Transpose`` permutes the axes; ``Identity`` and inference-mode ``Dropout`` keep them;
* ``Squeeze``/``Unsqueeze`` remove/insert unit axes and keep the others;
* ``Reshape``/``Flatten`` keep axis ``a`` when some axis of the result has the same length and
  the same stride (the product of the lengths after it): a no-op reshape, or unit axes added or
  removed; a reshape that splits or merges the channel axis has no such axis.

An :class:`AxisPath` is a run of such ops, each output feeding only the next op, with the
mapping of axes from one end to the other. :func:`walk_back` and :func:`walk_forward` find the
path between a chain of affines and a linear op; :class:`InferredShapes` fills the shapes that a
converter did not write (tf2onnx writes no ``value_info``) for the length of one fold, from onnx's
shape inference on a copy without the large weights, and takes them back afterwards so the model
written gains no ``value_info``.

Imports: onnx, onnx_ir, numpy, :mod:`normfuse.onnxgraph.const` and :mod:`normfuse.onnxgraph.graph`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_ir as ir

from normfuse.onnxgraph.const import ConstantResolver
from normfuse.onnxgraph.graph import (
    ELEMENTWISE_OPS,
    LINEAR_OPS,
    NORM_OPS,
    exclusive,
    get_attr,
    label_of,
    others,
    rank_of,
)
from normfuse.onnxgraph.wire import quiet

__all__ = [
    "LAYOUT_OPS",
    "AxisPath",
    "InferredShapes",
    "Step",
    "dims_of",
    "infer_types",
    "shape_elements",
    "walk_back",
    "walk_forward",
]

logger = logging.getLogger(__name__)

LAYOUT_OPS = frozenset(
    {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Pad"}
)
#: Pad modes that only repeat values already there (a per-channel affine commutes with them).
_REPEATING_PADS = frozenset({"reflect", "edge", "wrap"})
#: Initializers above this size go to shape inference as typed inputs, without their values.
_INFER_INLINE_BYTES = 1024
#: Ops around which a fold reads shapes (with elementwise ops that have a constant operand).
_READ_BY_FOLD = LINEAR_OPS | NORM_OPS | LAYOUT_OPS


@dataclasses.dataclass
class Step:
    """One layout op and how the axes of its input map to the axes of its output.

    ``pairs`` maps input axes to output axes (non-negative) for the axes that pass one to one;
    None means every axis passes unchanged whatever the rank (Identity, Dropout).
    """

    node: ir.Node
    in_rank: int | None
    out_rank: int | None
    pairs: dict[int, int] | None
    lost: str  # what the op does to an axis without a partner, for reasons

    @property
    def label(self) -> str:
        return label_of(self.node)


def _norm(axis: int, rank: int | None) -> int | None:
    if axis >= 0:
        return axis
    return None if rank is None else axis + rank


def _dims(value: ir.Value | None) -> list[int | str | None] | None:
    if value is None or value.shape is None:
        return None
    out: list[int | str | None] = []
    for d in value.shape:
        if isinstance(d, int):
            out.append(d)
        else:
            out.append(d.value if isinstance(d, ir.SymbolicDim) else None)
    return out


def _int_list(consts: ConstantResolver, node: ir.Node, name: str, index: int) -> list[int] | None:
    """An ``axes``-like list from the attribute or (newer opsets) the input ``index``."""
    attr = node.attributes.get(name)
    if attr is not None and attr.value is not None:
        return [int(a) for a in attr.value]
    if len(node.inputs) > index and node.inputs[index] is not None:
        arr = consts.try_resolve(node.inputs[index])
        if arr is None:
            return None
        return [int(a) for a in np.asarray(arr).reshape(-1)]
    return []


def _stride(dims: list[int | str | None]) -> tuple[int, tuple[tuple[str, int], ...]] | None:
    """The product of ``dims``: known integer part and symbolic names; None if a dim is unknown."""
    n = 1
    names: Counter[str] = Counter()
    for d in dims:
        if d is None:
            return None
        if isinstance(d, int):
            n *= d
        else:
            names[d] += 1
    return n, tuple(sorted(names.items()))


def _reshape_pairs(ins: list[int | str | None], outs: list[int | str | None]) -> dict[int, int]:
    """Input axes that survive a reshape as one axis of the same length and stride."""
    pairs: dict[int, int] = {}
    out_keys = {}
    for j, d in enumerate(outs):
        s = _stride(outs[j + 1 :])
        if d is not None and s is not None:
            out_keys.setdefault((d, s), j)
    for i, d in enumerate(ins):
        s = _stride(ins[i + 1 :])
        if d is None or s is None:
            continue
        j = out_keys.get((d, s))
        if j is not None:
            pairs[i] = j
    return pairs


def shape_elements(
    value: ir.Value | None, consts: ConstantResolver, depth: int = 0
) -> list[int | str | None] | None:
    """The entries of a 1-D integer tensor computed from constants and ``Shape`` ops, each a
    known int, a symbolic dim, or None (unknown): enough for a Reshape target like tf2onnx's
    ``Concat(Gather(Shape(x), [0, 1]), [C])``."""
    if value is None or depth > 16:
        return None
    arr = consts.try_resolve(value)
    if arr is not None:
        a = np.asarray(arr)
        if a.ndim > 1 or not np.issubdtype(a.dtype, np.integer):
            return None
        return [int(v) for v in a.reshape(-1)]
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or not node.inputs:
        return None
    op, ins = node.op_type, node.inputs
    if op in ("Cast", "Identity", "Squeeze", "Unsqueeze"):  # 1-D or scalar in, the same out
        return shape_elements(ins[0], consts, depth + 1)
    if op == "Shape":
        dims = _dims(ins[0])
        if dims is None:
            return None
        start = int(get_attr(node, "start", 0) or 0)
        end = get_attr(node, "end", None)
        return dims[start : None if end is None else int(end)]
    if op == "Concat":
        out: list[int | str | None] = []
        for v in ins:
            part = shape_elements(v, consts, depth + 1)
            if part is None:
                return None
            out.extend(part)
        return out
    if op == "Slice":
        data = shape_elements(ins[0], consts, depth + 1)
        if len(ins) >= 3:  # opset >= 10: starts, ends, axes, steps as inputs
            parts = [consts.try_resolve(v) if v is not None else None for v in ins[1:5]]
            starts, ends = parts[0], parts[1]
            axes = parts[2] if len(parts) > 2 else None
            steps = parts[3] if len(parts) > 3 else None
            if (
                starts is None
                or ends is None
                or (len(ins) > 3 and ins[3] is not None and axes is None)
            ):
                return None
            if len(ins) > 4 and ins[4] is not None and steps is None:
                return None
        else:
            starts, ends = get_attr(node, "starts", None), get_attr(node, "ends", None)
            axes, steps = get_attr(node, "axes", None), None
        if data is None or starts is None or ends is None:
            return None
        flat = [np.asarray(a).reshape(-1).tolist() for a in (starts, ends)]
        if len(flat[0]) != 1 or len(flat[1]) != 1:
            return None
        if axes is not None and np.asarray(axes).reshape(-1).tolist() not in ([0], [-1]):
            return None
        step = 1 if steps is None else int(np.asarray(steps).reshape(-1)[0])
        if step != 1:
            return None
        n = len(data)
        lo, hi = (int(v[0]) for v in flat)
        lo = max(0, min(n, lo + n if lo < 0 else lo))
        hi = max(0, min(n, hi + n if hi < 0 else hi))
        return data[lo:hi]
    if op == "ReduceProd" and int(get_attr(node, "keepdims", 1) or 0) in (0, 1):
        axes = _int_list(consts, node, "axes", 1)
        data = shape_elements(ins[0], consts, depth + 1)
        if data is None or axes not in ([], [0], [-1], None):
            return None
        if all(isinstance(d, int) for d in data):
            return [int(np.prod(np.array(data, dtype=np.int64)))]
        return [None]
    if op == "Gather" and len(ins) > 1 and int(get_attr(node, "axis", 0) or 0) == 0:
        data = shape_elements(ins[0], consts, depth + 1)
        idx = consts.try_resolve(ins[1])
        if data is None or idx is None:
            return None
        try:
            return [data[int(i)] for i in np.asarray(idx).reshape(-1)]
        except IndexError:
            return None
    return None


def dims_of(
    value: ir.Value | None, consts: ConstantResolver, depth: int = 0
) -> list[int | str | None] | None:
    """The dims of ``value``: its shape, or (where inference gave none, as after a Reshape to a
    shape computed with ReduceProd) from its producer: a Reshape's target, a MatMul by a 2-D
    weight, an elementwise op by a constant that does not broadcast the data."""
    dims = _dims(value)
    if dims is not None or value is None or depth > 8:
        return dims
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or not node.inputs:
        return None
    op, ins = node.op_type, node.inputs
    if op == "Reshape" and len(ins) > 1:
        return _reshape_target(node, consts, dims_of(ins[0], consts, depth + 1))
    if op == "MatMul" and len(ins) == 2:
        a = dims_of(ins[0], consts, depth + 1)
        w = _dims(ins[1])
        if w is None and ins[1] is not None and ins[1].const_value is not None:
            w = [int(d) for d in ins[1].const_value.shape.numpy()]
        if a is not None and len(a) >= 2 and w is not None and len(w) == 2:
            return [*a[:-1], w[1]]
        return None
    if op in ("Add", "Mul", "Sub", "Div") and len(ins) == 2:
        for data, other in ((ins[0], ins[1]), (ins[1], ins[0])):
            c = consts.try_resolve(other)
            if c is None:
                continue
            d = dims_of(data, consts, depth + 1)
            if d is not None and c.ndim <= len(d):
                tail = d[len(d) - c.ndim :] if c.ndim else []
                if all(k == 1 or k == t for k, t in zip(c.shape, tail, strict=True)):
                    return d
            return None
    if op in ("Identity", "Relu", "Sigmoid", "Tanh", "Cast"):
        return dims_of(ins[0], consts, depth + 1)
    return None


def _reshape_target(
    node: ir.Node, consts: ConstantResolver, ins: list[int | str | None] | None
) -> list[int | str | None] | None:
    """The output dims of a Reshape from its target, when inference gave none."""
    target = shape_elements(node.inputs[1], consts) if len(node.inputs) > 1 else None
    if target is None:
        return None
    allowzero = int(get_attr(node, "allowzero", 0) or 0)
    out: list[int | str | None] = []
    for k, t in enumerate(target):
        if t == 0 and not allowzero:
            out.append(ins[k] if ins is not None and k < len(ins) else None)
        elif t is None or isinstance(t, str):
            out.append(t)
        elif t < 0:
            out.append(None)  # -1: whatever is left; the strides after it are still known
        else:
            out.append(t)
    return out


def layout_step(node: ir.Node, consts: ConstantResolver) -> Step | str:
    """The axis map of a layout op, or why the node does not pass an axis through."""
    op = node.op_type
    label = label_of(node)
    if node.domain not in ("", "ai.onnx") or op not in LAYOUT_OPS:
        return f"{label} is not a layout op"
    if not node.inputs or node.inputs[0] is None or not node.outputs:
        return f"{label} has no data input"
    x, y = node.inputs[0], node.outputs[0]
    in_rank, out_rank = rank_of(x), rank_of(y)
    if op == "Identity":
        return Step(node, in_rank, out_rank, None, "")
    if op == "Dropout":
        extra = [o for o in node.outputs[1:] if o is not None]
        if any(list(o.uses()) or o.is_graph_output() for o in extra):
            return f"the mask of {label} is in use"
        version = node.version or consts.opset
        if version < 7 and not int(get_attr(node, "is_test", 0) or 0):
            return f"{label} runs in training mode (is_test=0)"
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            mode = consts.try_resolve(node.inputs[2])
            if mode is None or bool(np.asarray(mode).reshape(-1)[0]):
                return f"{label} may run in training mode (training_mode is not constant False)"
        return Step(node, in_rank, out_rank, None, "")
    if op == "Pad":
        return _pad_step(node, consts, in_rank, out_rank)
    if op == "Transpose":
        perm = get_attr(node, "perm", None)
        if perm is None:
            rank = in_rank if in_rank is not None else out_rank
            if rank is None:
                return f"the rank of {label}'s input is unknown"
            perm = list(range(rank))[::-1]
        perm = [int(p) for p in perm]
        return Step(node, len(perm), len(perm), {p: j for j, p in enumerate(perm)}, "moves")
    if op in ("Squeeze", "Unsqueeze"):
        axes = _int_list(consts, node, "axes", 1)
        if axes is None:
            return f"the axes of {label} are not constant"
        if op == "Squeeze":
            if not axes:
                dims = _dims(x)
                if dims is None or any(d is None or isinstance(d, str) for d in dims):
                    return f"{label} squeezes every unit axis and its input shape is unknown"
                axes = [i for i, d in enumerate(dims) if d == 1]
            rank = (
                in_rank
                if in_rank is not None
                else (None if out_rank is None else out_rank + len(axes))
            )
            if rank is None and any(a < 0 for a in axes):
                return f"the rank of {label}'s input is unknown"
            gone = {_norm(a, rank) for a in axes}
            if rank is None:
                return f"the rank of {label}'s input is unknown"
            kept = [i for i in range(rank) if i not in gone]
            return Step(node, rank, len(kept), {i: j for j, i in enumerate(kept)}, "removes")
        rank = (
            out_rank if out_rank is not None else (None if in_rank is None else in_rank + len(axes))
        )
        if rank is None:
            return f"the rank of {label}'s output is unknown"
        new = {_norm(a, rank) for a in axes}
        kept = [j for j in range(rank) if j not in new]
        return Step(node, len(kept), rank, {i: j for i, j in enumerate(kept)}, "")
    # Reshape, Flatten: match axes by length and stride
    ins = dims_of(x, consts)
    if ins is None:
        return f"the shape of {label}'s input is unknown"
    outs = _dims(y)
    if op == "Flatten":
        k = int(get_attr(node, "axis", 1) or 0)
        k = k + len(ins) if k < 0 else k
        if outs is None:
            lead, tail = _stride(ins[:k]), _stride(ins[k:])
            outs = [
                lead[0] if lead is not None and not lead[1] else None,
                tail[0] if tail is not None and not tail[1] else None,
            ]
    elif outs is None or any(d is None for d in outs):
        target = _reshape_target(node, consts, ins)
        if target is not None and (outs is None or len(outs) == len(target)):
            outs = (
                target
                if outs is None
                else [o if o is not None else t for o, t in zip(outs, target, strict=True)]
            )
    if outs is None:
        return f"the shape of {label}'s output is unknown"
    return Step(node, len(ins), len(outs), _reshape_pairs(ins, outs), "splits or merges")


def _pad_step(
    node: ir.Node, consts: ConstantResolver, in_rank: int | None, out_rank: int | None
) -> Step | str:
    """A Pad that repeats values (reflect, edge, wrap: PyTorch's reflect/replicate/circular
    padding) passes every axis it does not pad; a constant pad is no layout op (the padding
    value would have to take the affine too)."""
    label = label_of(node)
    mode = get_attr(node, "mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode not in _REPEATING_PADS:
        return f"{label} pads with a constant (mode {mode}), which a shift does not keep"
    version = node.version or consts.opset
    pads = (
        [int(p) for p in get_attr(node, "pads", get_attr(node, "paddings", []))]
        if version < 11
        else _int_list(consts, node, "pads", 1)
    )
    if not pads:
        return f"the pads of {label} are not constant"
    axes = _int_list(consts, node, "axes", 3) if version >= 18 else []
    if axes is None:
        return f"the axes of {label} are not constant"
    rank = in_rank if in_rank is not None else out_rank
    if rank is None and (not axes or any(a < 0 for a in axes)):
        rank = len(pads) // 2 if not axes else None
    if rank is None:
        return f"the rank of {label}'s input is unknown"
    axes = [a % rank for a in axes] if axes else list(range(rank))
    n = len(axes)
    if len(pads) != 2 * n:
        return f"{label} has {len(pads)} pads for {n} axes"
    padded = {a for i, a in enumerate(axes) if pads[i] or pads[i + n]}
    return Step(node, rank, rank, {i: i for i in range(rank) if i not in padded}, "pads")


@dataclasses.dataclass
class AxisPath:
    """Layout ops in data-flow order, each output feeding only the next op."""

    steps: list[Step]

    @property
    def nodes(self) -> list[ir.Node]:
        return [s.node for s in self.steps]

    @property
    def start(self) -> ir.Value:
        value = self.steps[0].node.inputs[0]
        assert value is not None
        return value

    @property
    def end(self) -> ir.Value:
        return self.steps[-1].node.outputs[0]

    def rank_at_start(self, end_rank: int | None = None) -> int | None:
        rank = end_rank
        for s in reversed(self.steps):
            rank = rank if s.pairs is None else s.in_rank
        return rank if rank is not None else rank_of(self.start)

    def rank_at_end(self, start_rank: int | None = None) -> int | None:
        rank = start_rank
        for s in self.steps:
            rank = rank if s.pairs is None else s.out_rank
        return rank if rank is not None else rank_of(self.end)

    def describe(self) -> str:
        labels = [s.label for s in self.steps]
        if len(labels) > 4:
            labels = [*labels[:2], f"{len(labels) - 3} more", labels[-1]]
        return ", ".join(labels)

    def axis_before(self, axis: int, rank: int | None, there: str) -> int | str:
        """The input axis at the start for ``axis`` at the end (of rank ``rank``), or why none;
        ``there`` names what is at the start (for reasons)."""
        for s in reversed(self.steps):
            if s.pairs is None:
                continue
            a = _norm(axis, s.out_rank if s.out_rank is not None else rank)
            if a is None:
                return f"the rank at {s.label} is unknown, so the channel axis cannot be followed"
            back = {j: i for i, j in s.pairs.items()}
            if a not in back:
                return f"{s.label} between it and {there} {s.lost} the channel axis"
            axis, rank = back[a], s.in_rank
        return axis

    def axis_after(self, axis: int, rank: int | None, there: str) -> int | str:
        """The output axis at the end for ``axis`` at the start, or why none."""
        for s in self.steps:
            if s.pairs is None:
                continue
            a = _norm(axis, s.in_rank if s.in_rank is not None else rank)
            if a is None:
                return f"the rank at {s.label} is unknown, so the channel axis cannot be followed"
            if a not in s.pairs:
                return f"{s.label} between it and {there} {s.lost} the channel axis"
            axis, rank = s.pairs[a], s.out_rank
        return axis


def _layout_node(node: ir.Node | None, consumer: ir.Node) -> bool:
    return (
        node is not None
        and node.op_type in LAYOUT_OPS
        and node.domain in ("", "ai.onnx")
        and node.graph is consumer.graph
    )


def walk_back(
    value: ir.Value, consumer: ir.Node, consts: ConstantResolver
) -> tuple[AxisPath | None, str | None]:
    """The layout ops that lead to ``value`` (read by ``consumer``), walking up to the first
    other op; (the path or None, why the walk stopped early or None)."""
    steps: list[Step] = []
    while True:
        producer = value.producer()
        if producer is None or not _layout_node(producer, consumer):
            break
        if not exclusive(value, consumer):
            return (AxisPath(steps[::-1]) if steps else None), (
                f"the output of {label_of(producer)} also feeds {others(value, consumer)}"
            )
        step = layout_step(producer, consts)
        if isinstance(step, str):
            return (AxisPath(steps[::-1]) if steps else None), step
        steps.append(step)
        consumer = producer
        value = producer.inputs[0]  # type: ignore[assignment]
    return (AxisPath(steps[::-1]) if steps else None), None


def walk_forward(value: ir.Value, consts: ConstantResolver) -> tuple[AxisPath | None, str | None]:
    """The layout ops that ``value`` runs through while each tensor has one reader."""
    steps: list[Step] = []
    while not value.is_graph_output():
        uses = list(value.uses())
        if len(uses) != 1 or uses[0].idx != 0:
            break
        node = uses[0].node
        if not _layout_node(node, node) or (
            value.producer() is not None and node.graph is not value.producer().graph  # type: ignore[union-attr]
        ):
            break
        step = layout_step(node, consts)
        if isinstance(step, str):
            return (AxisPath(steps) if steps else None), step
        steps.append(step)
        value = node.outputs[0]
    return (AxisPath(steps) if steps else None), None


# ---------------------------------------------------------------------------- shape inference
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


_LOOKED_AT = _READ_BY_FOLD | ELEMENTWISE_OPS | {"Shape"}  # the op types _fold_reads reads


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
        elif op in _READ_BY_FOLD or id(node) in affine:
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
        if c is None or c.size == 0 or bool(np.all(c == 1)) or bool(np.all(c == 0)):
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
        large = tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.ByteSize() > (
            _INFER_INLINE_BYTES + 64
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
