"""Linear ops as normfuse folds into them: Conv, ConvTranspose, Gemm, MatMul (+ its bias Add).

:class:`LinearReader` reads a node's weights, channel axes and padding into a :class:`Linear`,
or says why the node is not a linear op normfuse folds into.

Imports: numpy, onnx_ir, :mod:`normfuse.core`, :mod:`normfuse.onnxgraph.const` and
:mod:`normfuse.onnxgraph.graph`.
"""

from __future__ import annotations

import dataclasses
import logging

import ml_dtypes
import numpy as np
import onnx_ir as ir

from normfuse.core import algebra
from normfuse.core.algebra import Affine, LinearWeights
from normfuse.onnxgraph.const import ConstantResolver, NotConstant
from normfuse.onnxgraph.graph import (
    LINEAR_OPS,
    Refused,
    float_attr,
    get_attr,
    int_attr,
    ints_attr,
    label_of,
    rank_of,
    resolve_const,
    users,
)

__all__ = ["Linear", "LinearReader", "bias_shape", "check_float", "check_range", "lines_up"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Linear:
    """A linear op found in the graph, with its weights read."""

    node: ir.Node
    weights: LinearWeights
    out: ir.Value  # the tensor carrying the op's result (MatMul: its bias Add's output)
    out_rank: int | None
    out_axis: int  # channel axis of ``out`` (non-negative, or -1 for "last" at unknown rank)
    in_axis: int | None  # channel axis of the data input; None when folding before is not exact
    in_refusal: str | None
    pads_input: bool  # Conv/ConvTranspose: some input position meets padding
    bias_node: ir.Node | None = None  # MatMul's Add
    bias_shape: tuple[int, ...] | None = None

    @property
    def label(self) -> str:
        return label_of(self.node)


class LinearReader:
    """Reads linear ops, caching each reading until the graph around it is rewritten."""

    def __init__(self, consts: ConstantResolver) -> None:
        self.consts = consts
        self._cache: dict[int, tuple[ir.Node, Linear | str]] = {}

    def clear(self) -> None:
        """Forget every reading (after a rewrite, or where a chain starts)."""
        self._cache.clear()

    def linear(self, node: ir.Node) -> Linear | str:
        """The linear op's reading, cached within a chain until its first rewrite.

        Every rewrite starts with a call of :meth:`clear`, and so does every chain."""
        hit = self._cache.get(id(node))
        if hit is not None and hit[0] is node:
            return hit[1]
        try:
            found: Linear | str = self._read_linear(node)
        except Refused as exc:
            found = exc.reason
        self._cache[id(node)] = (node, found)
        return found

    def _read_linear(self, node: ir.Node) -> Linear:
        op = node.op_type
        if node.domain not in ("", "ai.onnx") or op not in LINEAR_OPS:
            raise Refused(f"{label_of(node)} is not a linear op normfuse folds into")
        if len(node.inputs) < 2 or node.inputs[1] is None:
            raise Refused(f"{label_of(node)} has no weight input")
        if op in ("Conv", "ConvTranspose"):
            return self._read_conv(node)
        if op == "Gemm":
            return self._read_gemm(node)
        return self._read_matmul(node)

    def _weight(self, value: ir.Value | None, what: str, op: ir.Node) -> algebra.WeightArray:
        try:
            return self.consts.resolve_weight(value)
        except NotConstant as exc:
            raise Refused(f"the {what} of {label_of(op)} is not constant: {exc}") from None

    def _read_conv(self, node: ir.Node) -> Linear:
        w = self._weight(node.inputs[1], "weight", node)
        bias_in = node.inputs[2] if len(node.inputs) > 2 else None
        b = None if bias_in is None else resolve_const(self.consts, bias_in, "bias", node)
        groups = int_attr(node, "group", 1)
        if w.ndim < 3:
            raise Refused(f"{label_of(node)} has a weight of rank {w.ndim}")
        check_float(w, node)
        transpose = node.op_type == "ConvTranspose"
        kind: algebra.LinearKind = "conv_transpose" if transpose else "conv"
        lin = LinearWeights(kind, w, b, groups)
        if b is not None and (b.ndim != 1 or b.shape[0] != lin.out_channels):
            raise Refused(  # the dynamo exporter's Conv3d(bias=False): Expand(0, [C, 2])
                f"{label_of(node)} has a bias of shape {list(b.shape)}; ONNX allows only a "
                f"1-D bias of {lin.out_channels} values (onnxruntime refuses this node too)"
            )
        spatial = w.ndim - 2
        pads = ints_attr(node, "pads", [0] * 2 * spatial)
        auto_pad = get_attr(node, "auto_pad", "NOTSET")
        kernel = list(w.shape[2:])
        dil = ints_attr(node, "dilations", [1] * spatial)
        strides = ints_attr(node, "strides", [1] * spatial)
        pointwise = all((k - 1) * d + 1 == 1 for k, d in zip(kernel, dil, strict=False))
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads_input = not pointwise
        elif auto_pad == "VALID":
            pads_input = False
        else:
            pads_input = any(p != 0 for p in pads)
        if transpose:
            out_pad = ints_attr(node, "output_padding", [0] * spatial)
            # Each output position of a transposed conv sums a position-dependent number of
            # taps, so a shift on its input is exact only for a pointwise, unstrided one.
            pads_input = not (
                pointwise and all(s == 1 for s in strides) and not any(pads) and not any(out_pad)
            )
        return Linear(
            node=node,
            weights=lin,
            out=node.outputs[0],
            out_rank=w.ndim,
            out_axis=1,
            in_axis=1,
            in_refusal=None,
            pads_input=pads_input,
        )

    def _read_gemm(self, node: ir.Node) -> Linear:
        w = self._weight(node.inputs[1], "weight (B)", node)
        check_float(w, node)
        c_in = node.inputs[2] if len(node.inputs) > 2 else None
        c = None if c_in is None else resolve_const(self.consts, c_in, "bias (C)", node)
        alpha = float_attr(node, "alpha", 1.0)
        beta = float_attr(node, "beta", 1.0)
        trans_a = int_attr(node, "transA", 0)
        trans_b = int_attr(node, "transB", 0)
        weight = np.asarray(w, dtype=np.float64) * alpha if alpha != 1.0 else w
        bias = None if c is None else (c.astype(np.float64) * beta if beta != 1.0 else c)
        lin = LinearWeights("dense" if trans_b else "dense_t", weight, bias, 1, w.dtype)
        refusal = (
            f"{label_of(node)} has transA=1, so its input's axis 1 is the batch axis"
            if trans_a
            else None
        )
        return Linear(node, lin, node.outputs[0], 2, 1, None if trans_a else 1, refusal, False)

    def _read_matmul(self, node: ir.Node) -> Linear:
        x, wv = node.inputs[0], node.inputs[1]
        try:
            w = self.consts.resolve_weight(wv)
        except NotConstant as exc:
            raise Refused(
                f"the right operand of {label_of(node)} is not constant ({exc}), so it is not a "
                "layer with weights"
            ) from None
        check_float(w, node)
        if w.ndim != 2:
            raise Refused(f"{label_of(node)} has a weight of rank {w.ndim}; only 2-D weights fold")
        x_rank = rank_of(x)
        out_rank = None if x_rank is None else (max(x_rank, 2) if x_rank >= 2 else 1)
        out_axis = -1 if out_rank is None else out_rank - 1
        in_axis = -1 if x_rank is None else x_rank - 1
        lin = LinearWeights("dense_t", w, None)
        found = Linear(node, lin, node.outputs[0], out_rank, out_axis, in_axis, None, False)
        out = node.outputs[0]
        consumers = users(out)
        if len(consumers) == 1 and not out.is_graph_output():
            add = consumers[0]
            if add.op_type == "Add" and add.domain in ("", "ai.onnx") and len(add.inputs) == 2:
                other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
                if add.inputs[0] is not add.inputs[1]:
                    b = self.consts.try_resolve(other)
                    n = w.shape[1]
                    if b is not None and b.dtype == w.dtype and _last_axis_vector(b, n, out_rank):
                        found.weights = LinearWeights(
                            "dense_t", w, np.broadcast_to(b.reshape(-1), (n,))
                        )
                        found.bias_node = add
                        found.bias_shape = tuple(b.shape)
                        found.out = add.outputs[0]
        return found

    def is_matmul_bias(self, add: ir.Node, data_index: int) -> bool:
        data = add.inputs[data_index]
        producer = data.producer() if data is not None else None
        if producer is None or producer.op_type != "MatMul":
            return False
        lin = self.linear(producer)
        return isinstance(lin, Linear) and lin.bias_node is add

    def producer_linear(self, producer: ir.Node) -> Linear | str:
        if producer.op_type == "Add" and producer.domain in ("", "ai.onnx"):
            for v in producer.inputs:
                mm = v.producer() if v is not None else None
                if mm is not None and mm.op_type == "MatMul":
                    found = self.linear(mm)
                    if isinstance(found, Linear) and found.bias_node is producer:
                        return found
        if producer.op_type not in LINEAR_OPS or producer.domain not in ("", "ai.onnx"):
            return f"its input comes from {label_of(producer)}, not a linear op"
        return self.linear(producer)


def check_float(w: algebra.WeightArray, node: ir.Node) -> None:
    if not (np.issubdtype(w.dtype, np.floating) or w.dtype == ml_dtypes.bfloat16):
        raise Refused(f"{label_of(node)} has {w.dtype} weights; only floating-point weights fold")


def _last_axis_vector(b: np.ndarray, n: int, out_rank: int | None) -> bool:
    if b.size not in (1, n):
        return False
    if b.ndim > 1 and any(d != 1 for d in b.shape[:-1]):
        return False
    limit = out_rank if out_rank is not None else 1
    return b.ndim <= max(limit, 1)


def bias_shape(lin: Linear, bias: np.ndarray) -> tuple[int, ...]:
    shape = lin.bias_shape
    if shape is not None and int(np.prod(shape)) == bias.size:
        return shape
    return (bias.size,)


def lines_up(
    affine: Affine, axis: int, channels: int, rank: int | None, side: str = "output"
) -> str | None:
    """Why ``affine`` does not sit on the channel axis of a linear op's output/input, or None."""
    if affine.is_scalar:
        return None
    a = affine.axis
    want = axis
    if rank is not None:
        a = a % rank if a < 0 else a
        want = want % rank if want < 0 else want
    elif (a < 0) != (want < 0):
        return f"the channel axis is unknown (rank unknown), so it cannot be matched to the {side} channels"
    if a != want:
        where = "the last axis" if rank is not None and a == rank - 1 else f"axis {a}"
        return f"it acts along {where} of a rank-{rank} tensor, not the {side} channel axis {want}"
    if affine.channels != channels:
        return f"it has {affine.channels} channels but there are {channels} {side} channels"
    return None


def check_range(folded: algebra.Folded, lin: Linear) -> None:
    checks = (
        ("weight", folded.weight_peak, folded.dtype),
        (
            "bias",
            float(np.abs(folded.bias64).max()) if folded.bias64.size else 0.0,
            folded.bias.dtype,
        ),
    )
    for what, peak, dtype in checks:
        if dtype is not None and peak > algebra.dtype_max(dtype):
            raise Refused(
                f"the folded {what} of {lin.label} would reach {peak:.3g}, beyond the range of "
                f"{dtype} ({algebra.dtype_max(dtype):.3g})"
            )
