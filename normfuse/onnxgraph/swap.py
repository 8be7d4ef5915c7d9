"""``swap``: BatchNormalization -> ``groupnorm`` / ``instancenorm`` / ``layernorm`` (over
channels) / ``frozen`` (exact per-channel Mul + Add) / ``identity``, gamma/beta and eps carried
over, written in the form the model's opset allows (GroupNormalization-21; at opset 18-20 the
per-group op plus a per-channel Mul/Add; below 18 Reshape/InstanceNormalization/Reshape plus
Mul/Add; LayerNormalization below 17 as its decomposition).
"""

from __future__ import annotations

import fnmatch
import logging

import numpy as np
import onnx_ir as ir

from normfuse.core import norms
from normfuse.core.errors import InputError
from normfuse.core.report import Entry
from normfuse.onnxgraph.edit import (
    BN,
    Editor,
    all_graphs,
    all_names,
    model_resolver,
    opset_of,
    read_batchnorm,
)
from normfuse.onnxgraph.emit import (
    channel_shape,
    emit_groupnorm,
    emit_layernorm_decomposed,
)
from normfuse.onnxgraph.graph import node_name

__all__ = ["swap_model"]

logger = logging.getLogger(__name__)


def swap_model(
    model: ir.Model,
    to: str,
    *,
    where: str | None = None,
    groups: int | str = "auto",
    allow_single_channel_groups: bool = False,
) -> list[Entry]:
    """Replace BatchNormalization nodes in place; one entry per BatchNormalization.

    Args:
        model: The model, changed in place.
        to: ``groupnorm``, ``instancenorm``, ``layernorm`` (over channels at each position),
            ``frozen`` (exact Mul + Add) or ``identity``.
        where: A glob on node names; every BatchNormalization by default.
        groups: GroupNorm groups, an int or ``"auto"`` (:func:`normfuse.core.norms.auto_groups`).
        allow_single_channel_groups: Allow one channel per group on ``(N, C)`` data.
    """
    kind = norms.lookup(to)
    if kind.name not in ("groupnorm", "instancenorm", "layernorm", "frozen", "identity"):
        raise InputError(
            f"cannot swap BatchNormalization to {kind.name} in ONNX",
            "use groupnorm, instancenorm, layernorm, frozen or identity",
        )
    opset = opset_of(model)
    names = all_names(model)
    consts = model_resolver(model)
    entries: list[Entry] = []
    for graph, label in all_graphs(model):
        ed = Editor(graph, names, opset)
        for node in list(graph):
            if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
                continue
            if where is not None and not fnmatch.fnmatchcase(node.name or "", where):
                continue
            entry = Entry(node_name(node), node.op_type, "skipped", graph=label.rstrip("/"))
            entries.append(entry)
            bn = read_batchnorm(node, consts)
            if isinstance(bn, str):
                entry.reason = bn
                continue
            result = _swap_one(ed, bn, kind, groups, allow_single_channel_groups, entry)
            if result is None:
                continue
            ed.take_over(node.outputs[0], result)
            ed.remove([node])
            entry.status = "applied"
            entry.exact = kind.exact
    return entries


def _swap_one(
    ed: Editor,
    bn: BN,
    kind: norms.NormKind,
    groups: int | str,
    allow_single: bool,
    entry: Entry,
) -> ir.Value | None:
    node, c, rank, dt = bn.node, bn.channels, bn.rank, bn.dtype
    if kind.name == "identity":
        entry.target = "removed (identity)"
        return bn.x
    if rank is None:
        entry.reason = "the rank of its input is unknown"
        entry.fix = "run shape inference first (onnx.shape_inference.infer_shapes)"
        return None
    if kind.name == "frozen":
        a = np.asarray(bn.gamma / np.sqrt(bn.var + bn.eps))
        t = bn.beta - bn.mean * a
        entry.target = "Mul + Add (per channel)"
        y = ed.op(
            node,
            "Mul",
            [
                bn.x,
                ed.const(f"{node_name(node)}_scale", a.astype(dt).reshape(channel_shape(c, rank))),
            ],
        )
        return ed.op(
            node,
            "Add",
            [
                y,
                ed.const(f"{node_name(node)}_shift", t.astype(dt).reshape(channel_shape(c, rank))),
            ],
        )
    if kind.name == "instancenorm":
        if rank < 3:
            entry.reason = "InstanceNormalization needs positions: the input is (N, C)"
            entry.fix = "use groupnorm or layernorm"
            return None
        entry.target = "InstanceNormalization"
        return ed.op(
            node,
            "InstanceNormalization",
            [
                bn.x,
                ed.const("in_scale", bn.gamma.astype(dt)),
                ed.const("in_bias", bn.beta.astype(dt)),
            ],
            {"epsilon": bn.eps},
        )
    if kind.name == "groupnorm":
        if groups == "auto":
            g = norms.auto_groups(c)
        else:
            g = int(groups)
            if g < 1 or c % g:
                entry.reason = f"{c} channels do not split into {g} groups"
                entry.fix = "use --groups auto"
                return None
        if c // g == 1 and rank == 2 and not allow_single:
            entry.reason = (
                f"{g} groups of 1 channel on (N, C) data: the output would be the bias alone"
            )
            entry.fix = "use --groups auto"
            return None
        form = (
            "GroupNormalization-21"
            if ed.opset >= 21
            else "Reshape/InstanceNormalization/Reshape + Mul/Add"
        )
        entry.target = f"{form} ({g} groups)"
        return emit_groupnorm(ed, node, bn.x, g, bn.eps, bn.gamma, bn.beta, rank, dt)
    # layernorm over the channels at each position (ConvNeXt's LayerNorm2d)
    entry.target = "LayerNormalization over channels" + (
        "" if ed.opset >= 17 else f" (decomposed: opset {ed.opset} < 17)"
    )
    x = bn.x
    if rank > 2:
        perm = [0, *range(2, rank), 1]
        x = ed.op(node, "Transpose", [x], {"perm": perm})
    if ed.opset >= 17:
        y = ed.op(
            node,
            "LayerNormalization",
            [x, ed.const("ln_scale", bn.gamma.astype(dt)), ed.const("ln_bias", bn.beta.astype(dt))],
            {"axis": -1, "epsilon": bn.eps},
        )
    else:
        y = emit_layernorm_decomposed(
            ed, node, x, [-1], bn.eps, bn.gamma.astype(dt), bn.beta.astype(dt), dt, None
        )
    if rank > 2:
        y = ed.op(node, "Transpose", [y], {"perm": [0, rank - 1, *range(1, rank - 1)]})
    return y
