"""A norm after a channel ``Concat`` of convolutions: each takes its slice of the affine.

timm's MixNet (``MixedConv2d``) splits the channels, runs a conv of another kernel size on each
part and concatenates the results along the channels before one BatchNorm. The BN's per-channel
map acts on each conv's output channels alone, so channel range ``[a, b)`` of the affine folds
into the conv that produced those channels, exactly as a BN after that conv would. This holds
when every concatenated tensor is a Conv/ConvTranspose output that nothing else reads (each conv
then outputs other values, which no one else sees), and the Concat's output only feeds the
chain.

Imports: numpy, onnx_ir, :mod:`normfuse.core` and the onnxgraph package.
"""

from __future__ import annotations

import onnx_ir as ir

from normfuse.core.algebra import Affine
from normfuse.onnxgraph.graph import exclusive, get_attr, rank_of
from normfuse.onnxgraph.linear import Linear, LinearReader

__all__ = ["concat_parts", "slices"]

_PARTS = frozenset({"Conv", "ConvTranspose"})


def concat_parts(concat: ir.Node, reader: ir.Node, linears: LinearReader) -> list[Linear] | None:
    """The convolutions that a channel Concat read by ``reader`` alone concatenates, each
    read by nothing else, or ``None`` when the Concat is not such a one."""
    if concat.op_type != "Concat" or concat.domain not in ("", "ai.onnx"):
        return None
    out = concat.outputs[0]
    rank = rank_of(out)
    axis = get_attr(concat, "axis", None)
    if rank is None or not isinstance(axis, int) or axis % rank != 1:
        return None
    if out.is_graph_output() or not exclusive(out, reader):
        return None
    parts: list[Linear] = []
    seen: set[int] = set()
    for v in concat.inputs:
        producer = v.producer() if v is not None else None
        if v is None or producer is None or id(v) in seen or producer.graph is not concat.graph:
            return None
        seen.add(id(v))
        if producer.op_type not in _PARTS or producer.domain not in ("", "ai.onnx"):
            return None
        if v.is_graph_output() or len(list(v.uses())) != 1:
            return None
        found = linears.linear(producer)
        if not isinstance(found, Linear) or found.out is not v or found.out_axis != 1:
            return None
        parts.append(found)
    return parts if len(parts) > 1 else None


def slices(affine: Affine, parts: list[Linear]) -> list[Affine] | None:
    """``affine`` cut into each part's channel range, or ``None`` when its channels are not
    the parts' together."""
    try:
        return affine.split([p.weights.out_channels for p in parts])
    except ValueError:
        return None
