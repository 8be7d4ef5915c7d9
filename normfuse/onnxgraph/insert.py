"""``insert``: a norm after each Conv/Gemm/MatMul that has none, the identity in inference for
BatchNormalization (scale 1, bias 0, mean 0, ``var + eps == 1`` exactly), optionally before the
activation that follows.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from normfuse.core import norms
from normfuse.core.errors import InputError
from normfuse.core.report import Entry
from normfuse.onnxgraph.edit import (
    ANY_NORM_OPS,
    Editor,
    all_graphs,
    all_names,
    identity_variance,
    np_dtype_of,
    opset_of,
)
from normfuse.onnxgraph.emit import emit_groupnorm, emit_layernorm_decomposed
from normfuse.onnxgraph.graph import node_name, rank_of, take_over

__all__ = ["insert_model"]

logger = logging.getLogger(__name__)


def _has_norm_after(value: ir.Value) -> bool:
    return any(u.node.op_type in ANY_NORM_OPS for u in value.uses())


_ACTIVATIONS = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "Tanh",
        "Clip",
        "HardSigmoid",
        "HardSwish",
        "Gelu",
        "Elu",
        "Selu",
        "Softplus",
        "PRelu",
        "Mish",
        "Celu",
    }
)


def _after_activation(out: ir.Value, uses: list[Any]) -> ir.Value:
    """The output of the activation that alone reads ``out``: an activation op, or SiLU as the
    exporters write it (``Mul(x, Sigmoid(x))``); ``out`` itself when none does."""
    if len(uses) == 1 and uses[0].node.op_type in _ACTIVATIONS:
        return uses[0].node.outputs[0]
    nodes = {id(u.node): u.node for u in uses}
    if len(uses) == 2 and len(nodes) == 2:
        sig = next((n for n in nodes.values() if n.op_type == "Sigmoid"), None)
        mul = next((n for n in nodes.values() if n.op_type == "Mul"), None)
        if sig is not None and mul is not None:
            gate = sig.outputs[0]
            reads = [u.node for u in gate.uses()]
            if (
                set(map(id, mul.inputs)) == {id(out), id(gate)}
                and reads == [mul]
                and not gate.is_graph_output()
            ):
                return mul.outputs[0]
    return out


def insert_model(
    model: ir.Model,
    *,
    norm: str = "batchnorm",
    after: Sequence[str] = ("Conv", "Gemm", "MatMul"),
    before_activation: bool = True,
    where: str | None = None,
) -> list[Entry]:
    """Add a norm after each listed op that has none; one entry per candidate.

    Args:
        model: Changed in place.
        norm: ``batchnorm`` (the identity in inference), ``groupnorm``, ``instancenorm`` or
            ``layernorm`` (these normalise per sample and change the function).
        after: Op types that get a norm.
        before_activation: Put the norm between the op and its activation (the classic place);
            ``False`` puts it after an activation that directly follows.
        where: A glob on the ops' node names.
    """
    kind = norms.lookup(norm)
    if kind.name not in ("batchnorm", "groupnorm", "instancenorm", "layernorm"):
        raise InputError(
            f"cannot insert {kind.name}", "use batchnorm, groupnorm, instancenorm or layernorm"
        )
    opset = opset_of(model)
    names = all_names(model)
    entries: list[Entry] = []
    wanted = set(after)
    for graph, label in all_graphs(model):
        ed = Editor(graph, names, opset)
        for node in list(graph):
            if node.op_type not in wanted or node.domain not in ("", "ai.onnx"):
                continue
            if where is not None and not fnmatch.fnmatchcase(node.name or "", where):
                continue
            entry = Entry(
                node_name(node), node.op_type, "skipped", graph=label.rstrip("/"), direction="after"
            )
            entries.append(entry)
            out = node.outputs[0]
            uses = list(out.uses())
            site = out
            if not before_activation:
                site = _after_activation(out, uses)
                if site is out:
                    entry.warnings.append(
                        "no activation directly follows: placed after the op itself"
                    )
            if _has_norm_after(out) or (site is not out and _has_norm_after(site)):
                entry.reason = "already followed by a norm"
                continue
            if site.is_graph_output() and not list(site.uses()):
                entry.reason = "its output is a model output (the head): no norm added"
                continue
            rank, dtype = rank_of(site), np_dtype_of(site)
            dims = site.shape.dims if site.shape is not None else None
            if rank is None or dtype is None or dims is None:
                entry.reason = "the rank or type of its output is unknown"
                entry.fix = "run shape inference first (onnx.shape_inference.infer_shapes)"
                continue
            channel_axis = 1 if node.op_type in ("Conv", "ConvTranspose") or rank == 2 else rank - 1
            c = dims[channel_axis]
            if not isinstance(c, int):
                entry.reason = f"its channel count (axis {channel_axis}) is not static"
                continue
            if node.op_type in ("Gemm", "MatMul") and rank > 2 and kind.name != "layernorm":
                entry.reason = (
                    f"rank-{rank} output: {kind.name} would normalise axis 1, not the features"
                )
                entry.fix = "use --norm layernorm"
                continue
            anchor = _next_node(graph, site)
            start = len(ed.created)
            y = _insert_one(ed, anchor, site, kind, c, rank, dtype, channel_axis, entry)
            if y is None:
                continue
            new_nodes = {id(n) for n in ed.created[start:]}
            take_over(site, y, new_nodes, ed.fresh(f"{site.name}_before_norm"))
            entry.status = "applied"
            entry.exact = kind.name == "batchnorm"
            if site is not out:
                entry.warnings.append("placed after the activation")
    return entries


def _next_node(graph: ir.Graph, value: ir.Value) -> ir.Node | None:
    """The node after ``value``'s producer (new nodes go before it); ``None``: append."""
    producer = value.producer()
    assert producer is not None
    nodes = list(graph)
    i = nodes.index(producer)
    return nodes[i + 1] if i + 1 < len(nodes) else None


def _insert_one(
    ed: Editor,
    anchor: ir.Node | None,
    x: ir.Value,
    kind: norms.NormKind,
    c: int,
    rank: int,
    dtype: Any,
    channel_axis: int,
    entry: Entry,
) -> ir.Value | None:
    base = f"{x.name}_norm"
    if kind.name == "batchnorm":
        eps = 1e-5
        entry.target = f"BatchNormalization({c}), identity in inference"
        return ed.op(
            anchor,
            "BatchNormalization",
            [
                x,
                ed.const(f"{base}_scale", np.ones(c, dtype)),
                ed.const(f"{base}_bias", np.zeros(c, dtype)),
                ed.const(f"{base}_mean", np.zeros(c, dtype)),
                ed.const(f"{base}_var", np.full(c, identity_variance(eps, dtype), dtype)),
            ],
            {"epsilon": eps},
            base=base,
        )
    entry.warnings.append(f"{kind.name} normalises per sample: not the identity; train the model")
    if kind.name == "layernorm":
        entry.target = f"LayerNormalization over axis {channel_axis}"
        if channel_axis == rank - 1:
            if ed.opset >= 17:
                return ed.op(
                    anchor,
                    "LayerNormalization",
                    [
                        x,
                        ed.const(f"{base}_scale", np.ones(c, dtype)),
                        ed.const(f"{base}_bias", np.zeros(c, dtype)),
                    ],
                    {"axis": -1, "epsilon": 1e-5},
                    base=base,
                )
            return emit_layernorm_decomposed(ed, anchor, x, [-1], 1e-5, None, None, dtype, None)
        perm = [0, *range(2, rank), 1]
        t = ed.op(anchor, "Transpose", [x], {"perm": perm})
        y = (
            ed.op(
                anchor,
                "LayerNormalization",
                [
                    t,
                    ed.const(f"{base}_scale", np.ones(c, dtype)),
                    ed.const(f"{base}_bias", np.zeros(c, dtype)),
                ],
                {"axis": -1, "epsilon": 1e-5},
            )
            if ed.opset >= 17
            else emit_layernorm_decomposed(ed, anchor, t, [-1], 1e-5, None, None, dtype, None)
        )
        return ed.op(anchor, "Transpose", [y], {"perm": [0, rank - 1, *range(1, rank - 1)]})
    if kind.name == "instancenorm":
        if rank < 3:
            entry.reason = "InstanceNormalization needs positions: the output is (N, C)"
            return None
        entry.target = "InstanceNormalization"
        return ed.op(
            anchor,
            "InstanceNormalization",
            [
                x,
                ed.const(f"{base}_scale", np.ones(c, dtype)),
                ed.const(f"{base}_bias", np.zeros(c, dtype)),
            ],
            {"epsilon": 1e-5},
        )
    g = norms.auto_groups(c)
    entry.target = f"GroupNorm ({g} groups)"
    return emit_groupnorm(ed, anchor, x, g, 1e-5, np.ones(c), np.zeros(c), rank, dtype)
