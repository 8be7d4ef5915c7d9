"""``insert``: a norm after each Conv/Gemm/MatMul that has none, the identity in inference for
BatchNormalization (scale 1, bias 0, mean 0, ``var + eps == 1`` exactly), optionally before the
activation that follows.
"""

from __future__ import annotations

import fnmatch
import logging
import math
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


#: Ops of an activation written out elementwise (GELU as ``x * (1 + Erf(x / sqrt2)) * 0.5``,
#: its tanh form, SiLU ``x * Sigmoid(x)``, HardSwish ``x * HardSigmoid(x)`` or
#: ``x * Clip(x + 3, 0, 6) / 6``, Mish ``x * Tanh(Softplus(x))``), and the nonlinear ones, one of
#: which it needs.
_PARTS = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Neg", "Sqrt", "Abs", "Min", "Max"}
    | {"Erf", "Tanh", "Sigmoid", "HardSigmoid", "Clip", "Relu", "Softplus", "Exp", "Log"}
)
_NONLINEAR = _PARTS - {"Add", "Sub", "Mul", "Div", "Neg"}
_MAX_PARTS = 16


def _after_activation(out: ir.Value, uses: list[Any]) -> ir.Value:
    """The output of the activation that alone reads ``out``: an activation op, or one written
    out elementwise (:data:`_PARTS`); ``out`` itself when none does."""
    if len(uses) == 1 and uses[0].node.op_type in _ACTIVATIONS:
        return uses[0].node.outputs[0]
    return _written_out_activation(out) or out


def _scalar_constant(value: ir.Value | None) -> bool:
    if value is None:
        return False
    tensor = value.const_value
    producer = value.producer()
    if tensor is None and producer is not None and producer.op_type == "Constant":
        attr = producer.attributes.get("value")
        tensor = attr.value if attr is not None else None
    return tensor is not None and math.prod(tensor.shape.numpy()) == 1


def _written_out_activation(out: ir.Value) -> ir.Value | None:
    """Where an activation written out as elementwise ops on ``out`` and scalar constants ends:
    the first value that every other value of those ops flows into (with a nonlinear op among
    them), then any scalar scale after it (GELU's ``* 0.5``); ``None`` when there is none."""
    found: list[ir.Node] = []  # the elementwise ops reached from ``out``, in reaching order
    seen: set[int] = set()
    todo = [u.node for u in out.uses()]
    while todo and len(found) < _MAX_PARTS:
        node = todo.pop(0)
        if id(node) in seen or node.op_type not in _PARTS or node.domain not in ("", "ai.onnx"):
            continue
        seen.add(id(node))
        found.append(node)
        for o in node.outputs:
            todo.extend(u.node for u in o.uses())
    members = {id(n) for n in found}
    for node in found:
        end = node.outputs[0]
        part = _ancestors_within(end, members)
        if _closed(out, end, part):
            return _after_scalar_scales(end)
    return None


def _ancestors_within(end: ir.Value, members: set[int]) -> dict[int, ir.Node]:
    """The nodes of ``members`` that ``end`` is computed from (its producer included)."""
    part: dict[int, ir.Node] = {}
    todo = [end.producer()]
    while todo:
        node = todo.pop()
        if node is None or id(node) in part or id(node) not in members:
            continue
        part[id(node)] = node
        todo.extend(v.producer() for v in node.inputs if v is not None)
    return part


def _closed(out: ir.Value, end: ir.Value, part: dict[int, ir.Node]) -> bool:
    """Whether ``part`` computes ``end`` from ``out`` and scalar constants alone, with a
    nonlinear op, every use of ``out`` and of its inner values inside it."""
    if len(part) < 2 or not any(n.op_type in _NONLINEAR for n in part.values()):
        return False
    if any(id(u.node) not in part for u in out.uses()) or out.is_graph_output():
        return False
    for node in part.values():
        for v in node.inputs:
            if v is None or v is out:
                continue
            producer = v.producer()
            if (producer is None or id(producer) not in part) and not _scalar_constant(v):
                return False
        for o in node.outputs:
            if o is end:
                continue
            if o.is_graph_output() or any(id(u.node) not in part for u in o.uses()):
                return False
    return True


def _after_scalar_scales(value: ir.Value) -> ir.Value:
    """``value``, or the output of the Mul/Div by a scalar constant that alone reads it (again
    and again)."""
    while not value.is_graph_output():
        uses = list(value.uses())
        if len(uses) != 1 or (uses[0].idx != 0 and uses[0].node.op_type == "Div"):
            break
        node = uses[0].node
        other = [v for v in node.inputs if v is not value]
        if node.op_type not in ("Mul", "Div") or len(other) != 1 or not _scalar_constant(other[0]):
            break
        value = node.outputs[0]
    return value


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
