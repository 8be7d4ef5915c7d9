"""Writing norms as ONNX nodes: per-channel affines, decomposed LayerNorm, GroupNorm in the form
the opset allows (GroupNormalization-21, -18 plus Mul/Add, or InstanceNormalization between
Reshapes).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from normfuse.onnxgraph.edit import NP_TYPES, Editor

__all__ = [
    "channel_shape",
    "emit_channel_affine",
    "emit_groupnorm",
    "emit_layernorm_decomposed",
    "emit_reduce_mean",
    "shape_of",
]

logger = logging.getLogger(__name__)


def channel_shape(channels: int, rank: int) -> tuple[int, ...]:
    return (channels,) + (1,) * max(rank - 2, 0)


def emit_channel_affine(
    ed: Editor,
    anchor: ir.Node | None,
    y: ir.Value,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    rank: int,
    dtype: Any,
) -> ir.Value:
    """``y * gamma + beta`` per channel (axis 1); Mul/Add left out where they change nothing."""
    if gamma is not None and not np.all(gamma == 1):
        shape = channel_shape(gamma.size, rank)
        y = ed.op(anchor, "Mul", [y, ed.const("gamma", gamma.astype(dtype).reshape(shape))])
    if beta is not None and not np.all(beta == 0):
        shape = channel_shape(beta.size, rank)
        y = ed.op(anchor, "Add", [y, ed.const("beta", beta.astype(dtype).reshape(shape))])
    return y


def emit_reduce_mean(ed: Editor, anchor: ir.Node | None, x: ir.Value, axes: list[int]) -> ir.Value:
    if ed.opset >= 18:
        return ed.op(
            anchor, "ReduceMean", [x, ed.const("axes", np.asarray(axes, np.int64))], {"keepdims": 1}
        )
    return ed.op(anchor, "ReduceMean", [x], {"axes": axes, "keepdims": 1})


def emit_layernorm_decomposed(
    ed: Editor,
    anchor: ir.Node | None,
    x: ir.Value,
    axes: list[int],
    eps: float,
    scale: ir.Value | np.ndarray | None,
    bias: ir.Value | np.ndarray | None,
    compute: Any,
    out_type: ir.DataType | None,
    rms: bool = False,
) -> ir.Value:
    """LayerNorm (or RMSNorm) over ``axes`` written with basic ops, valid at ``ed.opset``."""
    cast = out_type is not None and compute is not None and NP_TYPES.get(out_type) is not compute
    src = x
    if cast:
        src = ed.op(anchor, "Cast", [x], {"to": ir.DataType.from_numpy(np.dtype(compute))})
    dt = compute or np.float32
    if rms:
        sq = ed.op(anchor, "Mul", [src, src])
        ms = emit_reduce_mean(ed, anchor, sq, axes)
        std = ed.op(
            anchor, "Sqrt", [ed.op(anchor, "Add", [ms, ed.const("eps", np.asarray(eps, dt))])]
        )
        y = ed.op(anchor, "Div", [src, std])
    else:
        mean = emit_reduce_mean(ed, anchor, src, axes)
        d = ed.op(anchor, "Sub", [src, mean])
        var = emit_reduce_mean(ed, anchor, ed.op(anchor, "Mul", [d, d]), axes)
        std = ed.op(
            anchor, "Sqrt", [ed.op(anchor, "Add", [var, ed.const("eps", np.asarray(eps, dt))])]
        )
        y = ed.op(anchor, "Div", [d, std])
    if cast and out_type is not None:
        y = ed.op(anchor, "Cast", [y], {"to": out_type})
    for operand, op in ((scale, "Mul"), (bias, "Add")):
        if operand is None:
            continue
        value = operand if isinstance(operand, ir.Value) else ed.const(f"ln_{op.lower()}", operand)
        y = ed.op(anchor, op, [y, value])
    return y


def emit_groupnorm(
    ed: Editor,
    anchor: ir.Node | None,
    x: ir.Value,
    groups: int,
    eps: float,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    rank: int,
    dtype: Any,
    group_affine: tuple[np.ndarray, np.ndarray] | None = None,
    fused: bool = True,
) -> ir.Value:
    """GroupNorm in the best form ``ed.opset`` allows: GroupNormalization-21 with per-channel
    ``gamma``/``beta``; below 21, Reshape/InstanceNormalization/Reshape and a per-channel
    Mul/Add (GroupNormalization-18 is deprecated: onnx's checker refuses it). ``group_affine``
    is a per-group scale and bias (what GroupNormalization-18 carries); ``fused=False`` always
    writes the decomposed form (for ``lower``)."""
    if fused and ed.opset >= 21 and group_affine is None and gamma is not None and beta is not None:
        return ed.op(
            anchor,
            "GroupNormalization",
            [x, ed.const("gn_scale", gamma.astype(dtype)), ed.const("gn_bias", beta.astype(dtype))],
            {"epsilon": float(eps), "num_groups": groups},
        )
    gs, gb = group_affine if group_affine is not None else (np.ones(groups), np.zeros(groups))
    shape = ed.const("gn_shape", np.asarray([0, groups, -1], np.int64))
    grouped = ed.op(anchor, "Reshape", [x, shape])
    normed = ed.op(
        anchor,
        "InstanceNormalization",
        [grouped, ed.const("in_scale", gs.astype(dtype)), ed.const("in_bias", gb.astype(dtype))],
        {"epsilon": float(eps)},
    )
    y = ed.op(anchor, "Reshape", [normed, shape_of(ed, anchor, x)])
    return emit_channel_affine(ed, anchor, y, gamma, beta, rank, dtype)


def shape_of(ed: Editor, anchor: ir.Node | None, x: ir.Value) -> ir.Value:
    """``x``'s shape as a constant (0 = copy the batch size) when its other dimensions are
    static, else a Shape node (which onnx's version converter cannot take below opset 15)."""
    dims = list(x.shape.dims) if x.shape is not None else None
    if dims is not None and len(dims) >= 2 and all(isinstance(d, int) for d in dims[1:]):
        return ed.const("shape", np.asarray([0, *dims[1:]], np.int64))
    return ed.op(anchor, "Shape", [x])
