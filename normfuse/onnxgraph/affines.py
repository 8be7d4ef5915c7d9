"""The per-channel affine map of one node of a chain: BatchNormalization, a Mul/Add/Sub/Div
by a constant, or the gamma/beta tail of a normalization op.

Imports: numpy, onnx_ir, :mod:`normfuse.core`, :mod:`normfuse.onnxgraph.const` and
:mod:`normfuse.onnxgraph.graph`.
"""

from __future__ import annotations

import dataclasses
import logging

import ml_dtypes
import numpy as np
import onnx_ir as ir

from normfuse.core.algebra import Affine
from normfuse.onnxgraph.const import ConstantResolver, NotConstant
from normfuse.onnxgraph.graph import FLOAT_TYPES, Refused, float_attr, int_attr, resolve_const

__all__ = ["AffineBuilder", "Link"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Link:
    """One node of a chain."""

    node: ir.Node
    data_index: int
    kind: str  # "bn" | "elementwise" | "norm"

    @property
    def data(self) -> ir.Value:
        value = self.node.inputs[self.data_index]
        assert value is not None
        return value

    @property
    def out(self) -> ir.Value:
        return self.node.outputs[0]


class AffineBuilder:
    """Builds the affine map of chain links, or refuses with the reason."""

    def __init__(self, consts: ConstantResolver, opset: int) -> None:
        self.consts = consts
        self.opset = opset

    # ----------------------------------------------------------------- affine maps
    def affine(self, link: Link, rank: int | None) -> Affine:
        if link.kind == "bn":
            return self._bn_affine(link.node, rank)
        if link.kind == "norm":
            return self._norm_affine(link.node, rank)
        return self._elementwise_affine(link, rank)

    def _bn_affine(self, node: ir.Node, rank: int | None) -> Affine:
        version = node.version or self.opset
        if version >= 14 and int_attr(node, "training_mode", 0):
            raise Refused(
                "training_mode=1: the node normalises with batch statistics, which cannot fold",
                "export the model in eval mode (model.eval()) or set training_mode=0",
            )
        if version < 7 and not int_attr(node, "is_test", 0):
            raise Refused(
                "is_test=0: BatchNormalization-1/6 then normalises with batch statistics "
                "(training mode), which cannot fold",
                "export the model in eval mode (is_test=1), or to opset 7 or later",
            )
        extra = [o for o in node.outputs[1:] if o is not None]
        if version < 14 and any(o.name for o in extra):
            raise Refused(
                f"it declares training outputs ({', '.join(o.name or '?' for o in extra if o.name)}); "
                f"BatchNormalization-{version} then runs in training mode"
            )
        used = [o.name or "?" for o in extra if o.uses() or o.is_graph_output()]
        if used:
            raise Refused(f"its extra outputs are in use ({', '.join(used)})")
        params = []
        for i, what in enumerate(("scale", "bias", "mean", "var")):
            value = node.inputs[i + 1] if len(node.inputs) > i + 1 else None
            params.append(resolve_const(self.consts, value, what, node))
        eps = float_attr(node, "epsilon", 1e-5)
        if version < 9 and int_attr(node, "spatial", 1) == 0:
            params = [_per_channel(p, node) for p in params]
        gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        sizes = {"scale": gamma.size, "bias": beta.size, "mean": mean.size, "var": var.size}
        if len(set(sizes.values())) != 1:
            raise Refused(
                "its parameters disagree in size ("
                + ", ".join(f"{k} {v}" for k, v in sizes.items())
                + "); the model is malformed"
            )
        if not np.isfinite(np.concatenate((gamma, beta, mean, var))).all():  # one test, then which
            for name, p in (("scale", gamma), ("bias", beta), ("mean", mean), ("var", var)):
                if not np.all(np.isfinite(p)):
                    raise Refused(f"its {name} contains NaN or Inf; folding would spread it")
        if not np.isfinite(eps) or eps < 0:
            raise Refused(f"its epsilon is {eps}; folding needs a finite, non-negative epsilon")
        low = float(var.min()) if var.size else 0.0  # finite here; + eps is monotonic
        if var.size and low < 0:
            raise Refused(
                f"its running variance has negative values (min {low:.3g}); "
                "the statistics are corrupt"
            )
        if var.size and low + eps <= 0:
            raise Refused("variance + epsilon is 0 for some channel; the output is not finite")
        return Affine.from_batchnorm(gamma, beta, mean, var, eps, axis=1)

    def _norm_affine(self, node: ir.Node, rank: int | None) -> Affine:
        op = node.op_type
        gamma = resolve_const(self.consts, node.inputs[1], "scale", node).astype(np.float64)
        b_in = node.inputs[2] if len(node.inputs) > 2 and op != "RMSNormalization" else None
        beta = (
            np.zeros_like(gamma)
            if b_in is None
            else resolve_const(self.consts, b_in, "bias", node).astype(np.float64)
        )
        if op in ("LayerNormalization", "RMSNormalization"):
            if gamma.ndim > 1 and any(d != 1 for d in gamma.shape[:-1]):
                raise Refused(
                    f"its scale of shape {gamma.shape} varies over several axes, not one channel axis"
                )
            beta = np.broadcast_to(beta, gamma.shape)
            return Affine(gamma.reshape(-1), beta.reshape(-1), -1 if rank is None else rank - 1)
        if op == "GroupNormalization" and (node.version or self.opset) < 21:
            groups = int_attr(node, "num_groups", 1)
            x = node.inputs[0]
            channels = None if x is None or x.shape is None or x.shape.rank() < 2 else x.shape[1]
            if not isinstance(channels, int):
                raise Refused(
                    "GroupNormalization-18 has per-group scale and the channel count is unknown"
                )
            gamma = np.repeat(gamma.reshape(groups), channels // groups)
            beta = np.repeat(beta.reshape(groups), channels // groups)
        return Affine(gamma.reshape(-1), beta.reshape(-1), 1)

    def _elementwise_affine(self, link: Link, rank: int | None) -> Affine:
        node = link.node
        op = node.op_type
        const_index = 1 - link.data_index
        c = self.consts.resolve(node.inputs[const_index])
        dtype = link.data.dtype
        if (dtype is not None and dtype not in FLOAT_TYPES) or (
            not np.issubdtype(np.dtype(c.dtype), np.floating) and c.dtype != ml_dtypes.bfloat16
        ):
            raise Refused(f"{op} works on {dtype or c.dtype} values, not floating point")
        if rank is None:
            if c.ndim > 1 and any(d != 1 for d in c.shape[:-1]):
                raise Refused(
                    f"the rank of its input is unknown, so the constant of shape {c.shape} "
                    "cannot be placed on a channel axis"
                )
            rank_eff, c = max(c.ndim, 1), c.reshape(-1) if c.ndim else c
        else:
            rank_eff = rank
        if c.ndim > rank_eff:
            raise Refused(
                f"its constant of shape {c.shape} has more axes than its rank-{rank_eff} input, "
                "so broadcasting changes the output shape"
            )
        shape = (1,) * (rank_eff - c.ndim) + tuple(c.shape)
        varying = [i for i, d in enumerate(shape) if d != 1]
        if len(varying) > 1:
            raise Refused(
                f"its constant of shape {c.shape} varies along axes {varying} of the output, "
                "not along one channel axis"
            )
        axis = varying[0] if varying else (rank_eff - 1 if rank is not None else -1)
        if rank is None and varying:
            axis = -1
        dims = link.data.shape
        if varying and rank is not None and dims is not None and dims.rank() == rank_eff:
            have = dims[axis]
            if isinstance(have, int) and have != shape[axis]:  # (B, L, 1) * (C,): not an affine
                raise Refused(  # of its input, it broadcasts the input up to more values
                    f"its constant of shape {c.shape} broadcasts its input of shape "
                    f"{list(dims)} to {shape[axis]} values along axis {axis}, so it is no "
                    "per-channel map of its input"
                )
        v = c.astype(np.float64).reshape(-1)
        if op == "Mul":
            return Affine(v, np.zeros_like(v), axis)
        if op == "Add":
            return Affine(np.ones_like(v), v, axis)
        if op == "Sub":
            if link.data_index == 0:
                return Affine(np.ones_like(v), -v, axis)
            return Affine(-np.ones_like(v), v, axis)
        if np.any(v == 0):
            raise Refused("it divides by a constant that contains zeros")
        return Affine(1.0 / v, np.zeros_like(v), axis)

    def warnings(self, link: Link) -> list[str]:
        try:
            return self._underflow_warnings(link)
        except Refused:
            return []  # the node's own refusal says what is wrong

    def _underflow_warnings(self, link: Link) -> list[str]:
        if link.kind != "bn":
            return []
        dtype = self.data_dtype(link.data)
        if dtype not in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            return []
        try:
            var = self.consts.resolve(link.node.inputs[4]).astype(np.float64)
        except NotConstant:
            return []
        eps = float_attr(link.node, "epsilon", 1e-5)
        tiny = float(ml_dtypes.finfo(dtype.numpy()).tiny)
        low = var + eps
        if np.any(low < tiny):
            return [
                f"variance + epsilon ({low.min():.3g}) is below {dtype.name.lower()}'s smallest "
                "normal number; the fold uses the exact float64 value"
            ]
        return []

    def data_dtype(self, value: ir.Value) -> ir.DataType | None:
        """The element type of an activation, from its type or its producer's weights."""
        if value.dtype is not None:
            return value.dtype
        producer = value.producer()
        weight = producer.inputs[1] if producer is not None and len(producer.inputs) > 1 else None
        if weight is not None:
            if weight.const_value is not None:
                return weight.const_value.dtype  # from the tensor's header, nothing is read
            w = self.consts.try_resolve(weight)
            if w is not None:
                return ir.DataType.from_numpy(w.dtype)
        return None


def _per_channel(p: np.ndarray, node: ir.Node) -> np.ndarray:
    """BatchNormalization-7 with spatial=0 has per-activation parameters; fold only if constant."""
    if p.ndim <= 1:
        return p
    rows = p.reshape(p.shape[0], -1)
    if np.all(rows == rows[:, :1]):
        return rows[:, 0]
    raise Refused(
        "spatial=0 with statistics that vary within a channel; the map is not per-channel"
    )
