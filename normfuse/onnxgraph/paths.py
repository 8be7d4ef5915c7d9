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
path between a chain of affines and a linear op (the shapes they read come from
:mod:`normfuse.onnxgraph.shapes` where the converter wrote none).

Imports: onnx, onnx_ir, numpy, :mod:`normfuse.onnxgraph.const` and :mod:`normfuse.onnxgraph.graph`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import numpy as np
import onnx_ir as ir

from normfuse.onnxgraph.const import ConstantResolver
from normfuse.onnxgraph.graph import (
    LINEAR_OPS,
    NORM_OPS,
    exclusive,
    get_attr,
    label_of,
    others,
    rank_of,
)

__all__ = [
    "LAYOUT_OPS",
    "READ_BY_FOLD",
    "AxisPath",
    "Step",
    "dims_of",
    "origin",
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
#: Ops around which a fold reads shapes (with elementwise ops that have a constant operand).
READ_BY_FOLD = LINEAR_OPS | NORM_OPS | LAYOUT_OPS


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


def origin(value: ir.Value, consumer: ir.Node) -> ir.Value:
    """The value that the layout ops leading to ``value`` start from, whoever else reads them
    (where :func:`walk_back` stops early, what the walk would have reached)."""
    producer = value.producer()
    while _layout_node(producer, consumer) and producer.inputs and producer.inputs[0] is not None:  # type: ignore[union-attr]
        consumer, value = producer, producer.inputs[0]  # type: ignore[assignment,union-attr]
        producer = value.producer()
    return value


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
