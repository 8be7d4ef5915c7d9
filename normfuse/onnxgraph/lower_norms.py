"""``lower``: every fused norm op above ``target_opset`` written as its decomposition, then the
model converted down to ``target_opset``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from normfuse.core.report import Entry
from normfuse.onnxgraph.const import ConstantResolver
from normfuse.onnxgraph.downgrade import downgrade_opset
from normfuse.onnxgraph.edit import (
    FUSED_MIN_OPSET,
    NP_TYPES,
    Editor,
    all_graphs,
    all_names,
    attr_value,
    functions_note,
    model_resolver,
    np_dtype_of,
    opset_of,
)
from normfuse.onnxgraph.emit import emit_groupnorm, emit_layernorm_decomposed
from normfuse.onnxgraph.graph import node_name, rank_of

__all__ = ["lower_model"]

logger = logging.getLogger(__name__)


def lower_model(model: ir.Model, target_opset: int) -> tuple[ir.Model, list[Entry], list[str]]:
    """Decompose every fused norm op the target opset lacks, then convert the model down."""
    opset = opset_of(model)
    names = all_names(model)
    consts = model_resolver(model)
    entries: list[Entry] = []
    notes: list[str] = []
    for graph, label in all_graphs(model):
        ed = Editor(graph, names, opset)
        for node in list(graph):
            if node.domain not in ("", "ai.onnx") or node.op_type not in FUSED_MIN_OPSET:
                continue
            needs = FUSED_MIN_OPSET[node.op_type]
            if node.op_type == "GroupNormalization" and opset < 21:
                needs = 18  # GroupNormalization-18: per-group scale and bias
            entry = Entry(node_name(node), node.op_type, "skipped", graph=label.rstrip("/"))
            entries.append(entry)
            if needs <= target_opset:
                entry.reason = f"opset {target_opset} has {node.op_type} (since {needs})"
                continue
            reason = _lower_one(ed, node, consts, entry, target_opset)
            if reason is not None:
                entry.reason = reason
                continue
            entry.status = "applied"
            entry.exact = True
    note = functions_note(model, "lower")
    if note:
        notes.append(note)
    if target_opset < opset:
        model, how = downgrade_opset(model, target_opset)
        notes.append(f"opset lowered from {opset} to {target_opset} ({how})")
    elif target_opset > opset:
        notes.append(f"the model's opset {opset} is already below {target_opset}")
    return model, entries, notes


def _lower_one(
    ed: Editor, node: ir.Node, consts: ConstantResolver, entry: Entry, target: int
) -> str | None:
    x = node.inputs[0]
    if x is None:
        return "no input"
    dtype = np_dtype_of(x)
    rank = rank_of(x)
    if dtype is None:
        return "its input type is unknown or not float/double/float16"
    eps = float(attr_value(node, "epsilon", 1e-5))
    if node.op_type in ("LayerNormalization", "RMSNormalization"):
        axis = int(attr_value(node, "axis", -1))
        if axis >= 0:
            if rank is None:
                return "the rank of its input is unknown"
            axis -= rank
        axes = list(range(axis, 0))
        stash = int(attr_value(node, "stash_type", 1))
        compute = np.float32 if stash == 1 else NP_TYPES.get(ir.DataType(stash), dtype)
        out_type = x.type.dtype if x.type is not None else None
        scale = node.inputs[1] if len(node.inputs) > 1 else None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if any(o is not None and (list(o.uses()) or o.is_graph_output()) for o in node.outputs[1:]):
            return "its Mean/InvStdDev outputs are used"
        y = emit_layernorm_decomposed(
            ed,
            node,
            x,
            axes,
            eps,
            scale,
            bias,
            compute,
            out_type,
            rms=node.op_type == "RMSNormalization",
        )
        entry.target = f"{len(axes)}-axis decomposition (ReduceMean/Sub/Mul/Sqrt/Div)"
    else:
        groups = int(attr_value(node, "num_groups", 0))
        s = consts.try_resolve(node.inputs[1] if len(node.inputs) > 1 else None)
        b = consts.try_resolve(node.inputs[2] if len(node.inputs) > 2 else None)
        if s is None or b is None or rank is None or groups < 1:
            return "scale/bias not constant, or rank unknown"
        s64, b64 = np.asarray(s, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
        per_group = ed.opset < 21  # GroupNormalization-18 carries a per-group scale and bias
        y = emit_groupnorm(
            ed,
            node,
            x,
            groups,
            eps,
            None if per_group else s64,
            None if per_group else b64,
            rank,
            dtype,
            (s64, b64) if per_group else None,
            fused=False,
        )
        entry.target = "Reshape/InstanceNormalization/Reshape" + ("" if per_group else " + Mul/Add")
    ed.take_over(node.outputs[0], y)
    ed.remove([node])
    return None
