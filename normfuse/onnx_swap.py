"""Replace, add, raise, lower and re-estimate normalization in ONNX graphs (on onnx_ir).

* :func:`swap_model`: BatchNormalization -> ``groupnorm`` / ``instancenorm`` / ``layernorm``
  (over channels) / ``frozen`` (exact per-channel Mul + Add) / ``identity``, gamma/beta and eps
  carried over, written in the form the model's opset allows (GroupNormalization-21; at opset
  18-20 the per-group op plus a per-channel Mul/Add; below 18 Reshape/InstanceNormalization/
  Reshape plus Mul/Add; LayerNormalization below 17 as its decomposition).
* :func:`raise_model`: decomposed LayerNorm (ReduceMean/Sub/Pow|Mul/ReduceMean/Add/Sqrt/Div|
  Reciprocal, with optional Casts around it and gamma/beta after it), RMSNorm (Pow|Mul/
  ReduceMean/Add/Sqrt/Div|Reciprocal|1/x then Mul) and GroupNorm (Reshape/InstanceNormalization/
  Reshape then Mul/Add) become LayerNormalization-17, RMSNormalization-23 and
  GroupNormalization-21 (or -18 plus Mul/Add). The opset is raised only up to ``target_opset``,
  by onnx's version converter, and said in the report; otherwise the match is skipped with the
  reason.
* :func:`lower_model`: the reverse, for every fused norm op above ``target_opset``, then the
  model converted down to ``target_opset``.
* :func:`insert_model`: a norm after each Conv/Gemm/MatMul that has none, the identity in
  inference for BatchNormalization (scale 1, bias 0, mean 0, ``var + eps == 1`` exactly).
* :func:`recalibrate_model`: BatchNormalization statistics from data: the inputs of the
  BatchNorms are exposed as outputs (through If branches and Loop bodies too), run on
  onnxruntime, accumulated per channel in float64 (Chan et al.'s merge) and written back;
  BatchNorms that depend on other BatchNorms are done after them, level by level, so each sees
  its inputs as the recalibrated model produces them.

Each match is one :class:`normfuse.report.Entry`, applied (with ``exact`` saying whether the
function is kept) or skipped with the reason.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from normfuse import norms
from normfuse.algebra import ChannelMoments
from normfuse.errors import InputError
from normfuse.onnx_const import ConstantResolver
from normfuse.onnx_fold import containers, node_name, take_over
from normfuse.report import Entry

__all__ = [
    "FUSED_MIN_OPSET",
    "identity_variance",
    "insert_model",
    "lower_model",
    "raise_model",
    "recalibrate_model",
    "swap_model",
]

logger = logging.getLogger(__name__)

FUSED_MIN_OPSET = {"LayerNormalization": 17, "GroupNormalization": 21, "RMSNormalization": 23}
"""The opset each fused norm op (in its current form) needs."""

_NORM_OPS = frozenset(
    {
        "BatchNormalization",
        "InstanceNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "RMSNormalization",
        "LpNormalization",
        "MeanVarianceNormalization",
    }
)
_NP = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.DOUBLE: np.float64,
    ir.DataType.FLOAT16: np.float16,
}


def opset_of(model: ir.Model) -> int:
    """The model's default-domain opset."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def identity_variance(eps: float, dtype: Any = np.float32) -> np.ndarray:
    """A variance ``v`` in ``dtype`` with ``v + eps == 1`` exactly in that dtype (so that
    ``x / sqrt(v + eps)`` is ``x``): ``1 - eps`` or one of its neighbours."""
    dt = np.dtype(dtype)
    one, e = dt.type(1.0), dt.type(eps)
    v = dt.type(1.0 - float(eps))
    for _ in range(8):
        total = dt.type(v + e)
        if total == one:
            return np.asarray(v, dtype=dt)
        v = np.nextafter(v, dt.type(-np.inf) if total > one else dt.type(np.inf), dtype=dt)
    return np.asarray(dt.type(1.0 - float(eps)), dtype=dt)


# ------------------------------------------------------------------------------ graph editing


class _Editor:
    """Emits nodes and initializers into one graph, before an anchor node."""

    def __init__(self, graph: ir.Graph, names: set[str], opset: int) -> None:
        self.graph = graph
        self.names = names
        self.opset = opset
        self.created: list[ir.Node] = []

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=self.fresh(base), const_value=ir.tensor(np.array(array, order="C")))
        value.type = ir.TensorType(value.const_value.dtype)  # type: ignore[union-attr]
        value.shape = ir.Shape(array.shape)
        self.graph.register_initializer(value)
        return value

    def op(
        self,
        anchor: ir.Node | None,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        attributes: dict[str, Any] | None = None,
        base: str = "",
    ) -> ir.Value:
        """Add one node before ``anchor`` (at the end when ``None``); returns its output."""
        prefix = base or (node_name(anchor) if anchor is not None else "normfuse")
        name = self.fresh(f"{prefix}_{op_type}")
        node = ir.Node(
            "",
            op_type,
            inputs,
            ir.convenience.convert_attributes(attributes or {}),
            name=name,
        )
        node.outputs[0].name = self.fresh(name)
        if anchor is None:
            self.graph.append(node)
        else:
            self.graph.insert_before(anchor, node)
        self.created.append(node)
        return node.outputs[0]

    def take_over(self, old: ir.Value, new: ir.Value) -> None:
        """``new`` replaces ``old`` everywhere, graph outputs included, and takes its name."""
        if old.is_graph_output() and (new.is_graph_input() or new.producer() is None):
            new = self.op(old.producer(), "Identity", [new])  # an input keeps its own name
        outputs = self.graph.outputs
        for i, v in enumerate(outputs):
            if v is old:
                outputs[i] = new
        ir.convenience.replace_all_uses_with(old, new)
        name = old.name
        old.name = self.fresh(f"{name}_replaced")
        new.name = name
        new.type = old.type
        new.shape = old.shape

    def remove(self, nodes: Iterable[ir.Node]) -> None:
        nodes = list(nodes)
        inputs = [v for n in nodes for v in n.inputs if v is not None]
        self.graph.remove(nodes, safe=True)
        for v in inputs:  # parameters nothing reads any more
            if (
                v.name is not None
                and v.name in self.graph.initializers
                and self.graph.initializers[v.name] is v
                and not list(v.uses())
                and not v.is_graph_output()
                and not v.is_graph_input()
            ):
                del self.graph.initializers[v.name]
            elif v.producer() is not None and not list(v.uses()) and not v.is_graph_output():
                producer = v.producer()
                if (
                    producer is not None
                    and producer.graph is self.graph  # not removed already
                    and producer.op_type in ("Constant", "Shape")
                    and all(
                        not list(o.uses()) and not o.is_graph_output() for o in producer.outputs
                    )
                ):
                    self.remove([producer])


def _rank(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return value.shape.rank()


def _np_dtype(value: ir.Value) -> Any:
    if value.type is None or value.type.dtype not in _NP:
        return None
    return _NP[value.type.dtype]


def _channel_shape(channels: int, rank: int) -> tuple[int, ...]:
    return (channels,) + (1,) * max(rank - 2, 0)


def _emit_channel_affine(
    ed: _Editor,
    anchor: ir.Node | None,
    y: ir.Value,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    rank: int,
    dtype: Any,
) -> ir.Value:
    """``y * gamma + beta`` per channel (axis 1); Mul/Add left out where they change nothing."""
    if gamma is not None and not np.all(gamma == 1):
        shape = _channel_shape(gamma.size, rank)
        y = ed.op(anchor, "Mul", [y, ed.const("gamma", gamma.astype(dtype).reshape(shape))])
    if beta is not None and not np.all(beta == 0):
        shape = _channel_shape(beta.size, rank)
        y = ed.op(anchor, "Add", [y, ed.const("beta", beta.astype(dtype).reshape(shape))])
    return y


def _emit_reduce_mean(
    ed: _Editor, anchor: ir.Node | None, x: ir.Value, axes: list[int]
) -> ir.Value:
    if ed.opset >= 18:
        return ed.op(
            anchor, "ReduceMean", [x, ed.const("axes", np.asarray(axes, np.int64))], {"keepdims": 1}
        )
    return ed.op(anchor, "ReduceMean", [x], {"axes": axes, "keepdims": 1})


def _emit_layernorm_decomposed(
    ed: _Editor,
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
    cast = out_type is not None and compute is not None and _NP.get(out_type) is not compute
    src = x
    if cast:
        src = ed.op(anchor, "Cast", [x], {"to": ir.DataType.from_numpy(np.dtype(compute))})
    dt = compute or np.float32
    if rms:
        sq = ed.op(anchor, "Mul", [src, src])
        ms = _emit_reduce_mean(ed, anchor, sq, axes)
        std = ed.op(
            anchor, "Sqrt", [ed.op(anchor, "Add", [ms, ed.const("eps", np.asarray(eps, dt))])]
        )
        y = ed.op(anchor, "Div", [src, std])
    else:
        mean = _emit_reduce_mean(ed, anchor, src, axes)
        d = ed.op(anchor, "Sub", [src, mean])
        var = _emit_reduce_mean(ed, anchor, ed.op(anchor, "Mul", [d, d]), axes)
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


def _emit_groupnorm(
    ed: _Editor,
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
    y = ed.op(anchor, "Reshape", [normed, _shape_of(ed, anchor, x)])
    return _emit_channel_affine(ed, anchor, y, gamma, beta, rank, dtype)


def _shape_of(ed: _Editor, anchor: ir.Node | None, x: ir.Value) -> ir.Value:
    """``x``'s shape as a constant (0 = copy the batch size) when its other dimensions are
    static, else a Shape node (which onnx's version converter cannot take below opset 15)."""
    dims = list(x.shape.dims) if x.shape is not None else None
    if dims is not None and len(dims) >= 2 and all(isinstance(d, int) for d in dims[1:]):
        return ed.const("shape", np.asarray([0, *dims[1:]], np.int64))
    return ed.op(anchor, "Shape", [x])


# ----------------------------------------------------------------------------------- swap


@dataclasses.dataclass
class _BN:
    node: ir.Node
    x: ir.Value
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float
    rank: int | None
    dtype: Any

    @property
    def channels(self) -> int:
        return int(self.mean.size)


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _batchnorm(node: ir.Node, consts: ConstantResolver) -> _BN | str:
    if _attr(node, "training_mode", 0):
        return "training_mode=1: normalises with batch statistics"
    if any(list(o.uses()) or o.is_graph_output() for o in node.outputs[1:]):
        return "its running-statistics outputs are used (a training graph)"
    x = node.inputs[0]
    if x is None:
        return "no input"
    values = [consts.try_resolve(v) for v in node.inputs[1:5]]
    if any(v is None for v in values) or len(values) < 4:
        return "scale, bias, mean or variance is not a constant"
    gamma, beta, mean, var = (np.asarray(v, np.float64).reshape(-1) for v in values)
    dtype = _np_dtype(x)
    if dtype is None:
        return "its input type is unknown or not float/double/float16"
    return _BN(
        node, x, gamma, beta, mean, var, float(_attr(node, "epsilon", 1e-5)), _rank(x), dtype
    )


def _graphs(model: ir.Model) -> Iterator[tuple[ir.Graph, str]]:
    for container, label in containers(model):
        if isinstance(container, ir.Graph):
            yield container, label


def _all_names(model: ir.Model) -> set[str]:
    names: set[str] = set()
    for container, _ in containers(model):
        names.update(v.name for v in container.inputs if v.name)
        if isinstance(container, ir.Graph):
            names.update(container.initializers)
        for node in container:
            if node.name:
                names.add(node.name)
            names.update(o.name for o in node.outputs if o.name)
    return names


def _resolver(model: ir.Model) -> ConstantResolver:
    return ConstantResolver(opset_of(model), model.ir_version)


def functions_note(model: ir.Model, what: str) -> str | None:
    """A note when norm nodes sit in model-local functions, which these rewrites leave."""
    hits = sum(1 for f in model.functions.values() for n in f if n.op_type in _NORM_OPS)
    if hits:
        return f"{hits} norm node(s) inside model-local functions were left: {what} works on graphs"
    return None


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
        groups: GroupNorm groups, an int or ``"auto"`` (:func:`normfuse.norms.auto_groups`).
        allow_single_channel_groups: Allow one channel per group on ``(N, C)`` data.
    """
    kind = norms.lookup(to)
    if kind.name not in ("groupnorm", "instancenorm", "layernorm", "frozen", "identity"):
        raise InputError(
            f"cannot swap BatchNormalization to {kind.name} in ONNX",
            "use groupnorm, instancenorm, layernorm, frozen or identity",
        )
    opset = opset_of(model)
    names = _all_names(model)
    consts = _resolver(model)
    entries: list[Entry] = []
    for graph, label in _graphs(model):
        ed = _Editor(graph, names, opset)
        for node in list(graph):
            if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
                continue
            if where is not None and not fnmatch.fnmatchcase(node.name or "", where):
                continue
            entry = Entry(node_name(node), node.op_type, "skipped", graph=label.rstrip("/"))
            entries.append(entry)
            bn = _batchnorm(node, consts)
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
    ed: _Editor,
    bn: _BN,
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
                ed.const(f"{node_name(node)}_scale", a.astype(dt).reshape(_channel_shape(c, rank))),
            ],
        )
        return ed.op(
            node,
            "Add",
            [
                y,
                ed.const(f"{node_name(node)}_shift", t.astype(dt).reshape(_channel_shape(c, rank))),
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
        return _emit_groupnorm(ed, node, bn.x, g, bn.eps, bn.gamma, bn.beta, rank, dt)
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
        y = _emit_layernorm_decomposed(
            ed, node, x, [-1], bn.eps, bn.gamma.astype(dt), bn.beta.astype(dt), dt, None
        )
    if rank > 2:
        y = ed.op(node, "Transpose", [y], {"perm": [0, rank - 1, *range(1, rank - 1)]})
    return y


# ---------------------------------------------------------------------------------- insert


def _has_norm_after(value: ir.Value) -> bool:
    return any(u.node.op_type in _NORM_OPS for u in value.uses())


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
    names = _all_names(model)
    entries: list[Entry] = []
    wanted = set(after)
    for graph, label in _graphs(model):
        ed = _Editor(graph, names, opset)
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
            if not before_activation and len(uses) == 1 and uses[0].node.op_type in _ACTIVATIONS:
                site = uses[0].node.outputs[0]
            if _has_norm_after(out) or (site is not out and _has_norm_after(site)):
                entry.reason = "already followed by a norm"
                continue
            if site.is_graph_output() and not list(site.uses()):
                entry.reason = "its output is a model output (the head): no norm added"
                continue
            rank, dtype = _rank(site), _np_dtype(site)
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
    ed: _Editor,
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
            return _emit_layernorm_decomposed(ed, anchor, x, [-1], 1e-5, None, None, dtype, None)
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
            else _emit_layernorm_decomposed(ed, anchor, t, [-1], 1e-5, None, None, dtype, None)
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
    return _emit_groupnorm(ed, anchor, x, g, 1e-5, np.ones(c), np.zeros(c), rank, dtype)


# ----------------------------------------------------------------------------------- raise


@dataclasses.dataclass
class _Decomposed:
    kind: str  # "LayerNorm" | "RMSNorm" | "GroupNorm"
    nodes: list[ir.Node]
    x: ir.Value
    out: ir.Value
    eps: float
    axes: list[int] = dataclasses.field(default_factory=list)
    scale: np.ndarray | None = None
    bias: np.ndarray | None = None
    groups: int = 0
    group_affine: tuple[np.ndarray, np.ndarray] | None = None
    rank: int | None = None

    @property
    def op(self) -> str:
        return {
            "LayerNorm": "LayerNormalization",
            "RMSNorm": "RMSNormalization",
            "GroupNorm": "GroupNormalization",
        }[self.kind]

    @property
    def needs(self) -> int:
        return FUSED_MIN_OPSET[self.op]


def _only_user(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    a, b = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    if a is value:
        return b
    if b is value:
        return a
    return None


def _scalar(consts: ConstantResolver, value: ir.Value | None) -> float | None:
    arr = consts.try_resolve(value)
    if arr is None or arr.size != 1:
        return None
    return float(np.asarray(arr, np.float64).reshape(()))


def _reduce_axes(node: ir.Node, consts: ConstantResolver, rank: int | None) -> list[int] | None:
    if node.op_type != "ReduceMean" or _attr(node, "keepdims", 1) != 1:
        return None
    axes = _attr(node, "axes", None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = consts.try_resolve(node.inputs[1])
        axes = None if arr is None else [int(a) for a in np.asarray(arr).reshape(-1)]
    if not axes:
        return None
    out = []
    for a in axes:
        if a >= 0:
            if rank is None:
                return None
            a -= rank
        out.append(int(a))
    out.sort()
    if out != list(range(-len(out), 0)):
        return None  # only trailing, contiguous axes are a LayerNorm
    return out


def _squares(node: ir.Node, x: ir.Value, consts: ConstantResolver) -> bool:
    """``node`` computes ``x * x`` (Pow(x, 2) or Mul(x, x))."""
    if node.op_type == "Pow" and node.inputs[0] is x:
        return _scalar(consts, node.inputs[1]) == 2.0
    return node.op_type == "Mul" and node.inputs[0] is x and node.inputs[1] is x


def _std_from(
    sq: ir.Node, x: ir.Value, axes: list[int], consts: ConstantResolver
) -> tuple[list[ir.Node], ir.Value, float] | None:
    """From a square node: ReduceMean -> Add(eps) -> Sqrt; returns (nodes, sqrt output, eps)."""
    m2 = _only_user(sq.outputs[0])
    if m2 is None or _reduce_axes(m2, consts, _rank(x)) != axes:
        return None
    add = _only_user(m2.outputs[0])
    if add is None or add.op_type != "Add":
        return None
    eps = _scalar(consts, _other(add, m2.outputs[0]))
    sqrt = _only_user(add.outputs[0])
    if eps is None or sqrt is None or sqrt.op_type != "Sqrt":
        return None
    return [sq, m2, add, sqrt], sqrt.outputs[0], eps


def _divide(
    d: ir.Value, std: ir.Value, consts: ConstantResolver
) -> tuple[list[ir.Node], ir.Value] | None:
    """``d / std`` as Div(d, std), Mul(d, Reciprocal(std)) or Mul(d, Div(1, std))."""
    for use in std.uses():
        n = use.node
        if n.op_type == "Div" and n.inputs[0] is d and n.inputs[1] is std:
            return [n], n.outputs[0]
    user = _only_user(std)
    if user is None:
        return None
    if user.op_type == "Reciprocal" or (
        user.op_type == "Div" and user.inputs[1] is std and _scalar(consts, user.inputs[0]) == 1.0
    ):
        mul = _only_user(user.outputs[0])
        if mul is not None and mul.op_type == "Mul" and _other(mul, user.outputs[0]) is d:
            return [user, mul], mul.outputs[0]
    return None


def _affine_tail(
    out: ir.Value, consts: ConstantResolver, nodes: list[ir.Node], with_bias: bool = True
) -> tuple[ir.Value, np.ndarray | None, np.ndarray | None]:
    scale = bias = None
    user = _only_user(out)
    if user is not None and user.op_type == "Mul":
        arr = consts.try_resolve(_other(user, out))
        if arr is not None:
            scale, out = np.asarray(arr), user.outputs[0]
            nodes.append(user)
            user = _only_user(out)
    if with_bias and user is not None and user.op_type == "Add":
        arr = consts.try_resolve(_other(user, out))
        if arr is not None:
            bias, out = np.asarray(arr), user.outputs[0]
            nodes.append(user)
    return out, scale, bias


def _match_layernorm(m1: ir.Node, consts: ConstantResolver) -> _Decomposed | None:
    x = m1.inputs[0]
    if x is None:
        return None
    axes = _reduce_axes(m1, consts, _rank(x))
    if axes is None:
        return None
    subs = [u.node for u in m1.outputs[0].uses()]
    if (
        len(subs) != 1
        or subs[0].op_type != "Sub"
        or subs[0].inputs[0] is not x
        or subs[0].inputs[1] is not m1.outputs[0]
    ):
        return None
    sub = subs[0]
    d = sub.outputs[0]
    users = {id(u.node): u.node for u in d.uses()}
    if d.is_graph_output() or len(users) != 2:
        return None
    sq = next((n for n in users.values() if _squares(n, d, consts)), None)
    if sq is None:
        return None
    found = _std_from(sq, d, axes, consts)
    if found is None:
        return None
    std_nodes, std, eps = found
    div = _divide(d, std, consts)
    if div is None or id(div[0][-1]) not in users:
        return None  # d must feed exactly the square and the division
    nodes = [m1, sub, *std_nodes, *div[0]]
    out = div[1]
    source = x
    cast_back = _only_user(out)
    producer = x.producer()
    if (
        producer is not None
        and producer.op_type == "Cast"
        and cast_back is not None
        and cast_back.op_type == "Cast"
        and producer.inputs[0] is not None
        and producer.inputs[0].type is not None
        and _attr(cast_back, "to", None) == producer.inputs[0].type.dtype
        and len(list(x.uses())) == 2
    ):
        source = producer.inputs[0]  # computed in float32 around an fp16 input: stash_type=1
        nodes = [producer, *nodes, cast_back]
        out = cast_back.outputs[0]
    out, scale, bias = _affine_tail(out, consts, nodes)
    return _Decomposed("LayerNorm", nodes, source, out, eps, axes, scale, bias, rank=_rank(x))


def _match_rmsnorm(m: ir.Node, consts: ConstantResolver) -> _Decomposed | None:
    sq_value = m.inputs[0]
    sq = sq_value.producer() if sq_value is not None else None
    if sq is None or sq.op_type not in ("Pow", "Mul"):
        return None
    x = sq.inputs[0]
    if x is None or not _squares(sq, x, consts) or _only_user(sq.outputs[0]) is not m:
        return None
    axes = _reduce_axes(m, consts, _rank(x))
    if axes is None:
        return None
    found = _std_from(sq, x, axes, consts)
    if found is None:
        return None
    std_nodes, std, eps = found
    div = _divide(x, std, consts)
    if div is None:
        return None
    nodes = [*std_nodes, *div[0]]
    out, scale, _ = _affine_tail(div[1], consts, nodes, with_bias=False)
    return _Decomposed("RMSNorm", nodes, x, out, eps, axes, scale, None, rank=_rank(x))


def _match_groupnorm(inorm: ir.Node, consts: ConstantResolver) -> _Decomposed | None:
    grouped = inorm.inputs[0]
    reshape1 = grouped.producer() if grouped is not None else None
    if reshape1 is None or reshape1.op_type != "Reshape" or _only_user(grouped) is not inorm:  # type: ignore[arg-type]
        return None
    x = reshape1.inputs[0]
    shape = consts.try_resolve(reshape1.inputs[1])
    if x is None or shape is None or shape.size != 3 or int(shape[2]) != -1:
        return None
    groups = int(shape[1])
    gs, gb = consts.try_resolve(inorm.inputs[1]), consts.try_resolve(inorm.inputs[2])
    reshape2 = _only_user(inorm.outputs[0])
    if gs is None or gb is None or reshape2 is None or reshape2.op_type != "Reshape":
        return None
    target = reshape2.inputs[1]
    shape_node = target.producer() if target is not None else None
    static = consts.try_resolve(target)
    x_dims = list(x.shape.dims) if x.shape is not None else None
    if not (
        (
            shape_node is not None
            and shape_node.op_type == "Shape"
            and shape_node.inputs[0] is x
            and not _attr(shape_node, "start", 0)
            and _attr(shape_node, "end", None) is None
        )
        or (static is not None and x_dims is not None and list(static) == x_dims)
    ):
        return None
    nodes = [reshape1, inorm, reshape2]
    if shape_node is not None and shape_node.op_type == "Shape" and len(list(target.uses())) == 1:  # type: ignore[union-attr]
        nodes.insert(0, shape_node)
    out, scale, bias = _affine_tail(reshape2.outputs[0], consts, nodes)
    rank = _rank(x)
    eps = float(_attr(inorm, "epsilon", 1e-5))
    gs64, gb64 = np.asarray(gs, np.float64).reshape(-1), np.asarray(gb, np.float64).reshape(-1)
    group_affine = None if np.all(gs64 == 1) and np.all(gb64 == 0) else (gs64, gb64)
    dec = _Decomposed("GroupNorm", nodes, x, out, eps, [], None, None, groups, group_affine, rank)
    for arr, field in ((scale, "scale"), (bias, "bias")):
        if arr is None:
            continue
        flat = _per_channel(arr, rank)
        if flat is None:
            return None  # not per channel: leave it
        setattr(dec, field, flat)
    return dec


def _per_channel(arr: np.ndarray, rank: int | None) -> np.ndarray | None:
    if rank is None or arr.ndim > rank:
        return None
    shape = (1,) * (rank - arr.ndim) + arr.shape
    if any(s != 1 for i, s in enumerate(shape) if i != 1) or arr.ndim < rank - 1:
        return None
    return np.asarray(arr, np.float64).reshape(-1)


def find_decomposed(model: ir.Model) -> list[tuple[ir.Graph, str, _Decomposed]]:
    """Every decomposed LayerNorm, RMSNorm and GroupNorm in the model's graphs."""
    consts = _resolver(model)
    found: list[tuple[ir.Graph, str, _Decomposed]] = []
    for graph, label in _graphs(model):
        taken: set[int] = set()
        for node in graph:
            if id(node) in taken or node.domain not in ("", "ai.onnx"):
                continue
            match: _Decomposed | None = None
            if node.op_type == "ReduceMean":
                match = _match_layernorm(node, consts) or _match_rmsnorm(node, consts)
            elif node.op_type == "InstanceNormalization":
                match = _match_groupnorm(node, consts)
            if match is None or any(id(n) in taken for n in match.nodes):
                continue
            taken.update(id(n) for n in match.nodes)
            found.append((graph, label, match))
    return found


def _label_of(dec: _Decomposed) -> str:
    return node_name(dec.nodes[0])


def raise_model(
    model: ir.Model, *, target_opset: int | None = None, dry_run: bool = False
) -> tuple[ir.Model, list[Entry], list[str]]:
    """Write fused ops for decomposed norms; returns ``(model, entries, notes)``.

    The model is changed in place unless its opset must be raised (then a converted copy is
    returned).
    """
    notes: list[str] = []
    matches = find_decomposed(model)
    opset = opset_of(model)
    limit = max(opset, target_opset or opset)
    goals = [_goal(m, limit) for _, _, m in matches]
    want = max([g for g in goals if g is not None], default=opset)
    if dry_run:
        opset = max(opset, want)
    elif want > opset:
        model = convert_opset(model, want)
        notes.append(f"opset raised from {opset} to {want} (within --target-opset {target_opset})")
        opset = want
        matches = find_decomposed(model)
    names = _all_names(model)
    consts = _resolver(model)
    entries: list[Entry] = []
    replaced: dict[int, ir.Value] = {}  # outputs of earlier rewrites -> their new values
    for graph, label, dec in matches:
        entry = Entry(
            _label_of(dec),
            f"{dec.kind} (decomposed, {len(dec.nodes)} nodes)",
            "skipped",
            graph=label.rstrip("/"),
        )
        entries.append(entry)
        needs = dec.needs
        if needs > opset:
            entry.reason = f"{dec.op} needs opset {needs}; the model has {opset}"
            entry.fix = f"pass --target-opset {needs} to raise the model's opset"
            continue
        while id(dec.x) in replaced:  # a norm that reads an already raised one
            dec = dataclasses.replace(dec, x=replaced[id(dec.x)])
        reason = _raise_one(_Editor(graph, names, opset), dec, consts, entry, dry_run, replaced)
        if reason is not None:
            entry.reason = reason
            continue
        entry.status = "foldable" if dry_run else "applied"
        entry.exact = True
    return model, entries, notes


def _goal(dec: _Decomposed, limit: int) -> int | None:
    """The opset this match needs, if ``limit`` allows it."""
    return dec.needs if dec.needs <= limit else None


def _raise_one(
    ed: _Editor,
    dec: _Decomposed,
    consts: ConstantResolver,
    entry: Entry,
    dry_run: bool,
    replaced: dict[int, ir.Value],
) -> str | None:
    x = dec.x
    dtype = _np_dtype(x)
    if dtype is None:
        return "its input type is unknown or not float/double/float16"
    anchor = dec.nodes[-1]
    if dec.kind == "GroupNorm":  # needs opset 21 (checked by the caller)
        c = _channels(x)
        if dec.rank is None or c is None:
            return "the rank or channel count of its input is unknown"
        gamma = dec.scale if dec.scale is not None else np.ones(c)
        beta = dec.bias if dec.bias is not None else np.zeros(c)
        if dec.group_affine is not None:  # a per-group affine inside: per channel, then ours
            per = c // dec.groups
            gamma, beta = (
                np.repeat(dec.group_affine[0], per) * gamma,
                np.repeat(dec.group_affine[1], per) * gamma + beta,
            )
        entry.target = f"GroupNormalization-21 ({dec.groups} groups)"
        if dry_run:
            return None
        y = _emit_groupnorm(ed, anchor, x, dec.groups, dec.eps, gamma, beta, dec.rank, dtype)
    else:
        normalized = _normalized_shape(x, dec.axes)
        scale, bias = dec.scale, dec.bias
        for arr in (scale, bias):
            if arr is not None and normalized is None and arr.size != 1:
                return "the normalised dimensions are not static, so gamma/beta cannot be checked"
            if arr is not None and normalized is not None:
                try:
                    np.broadcast_to(arr, normalized)
                except ValueError:
                    return f"gamma/beta of shape {arr.shape} do not match the normalised shape {normalized}"
                lead = arr.ndim - len(normalized)
                if lead > 0 and any(s != 1 for s in arr.shape[:lead]):
                    return "gamma/beta vary along axes that are not normalised"
        if normalized is None:
            return "the normalised dimensions are not static"
        full = tuple(normalized)
        s = np.broadcast_to(scale if scale is not None else np.ones(()), full).astype(dtype)
        b = np.broadcast_to(bias, full).astype(dtype) if bias is not None else None
        entry.target = f"{dec.op} (axis {dec.axes[0]}, epsilon {dec.eps:g})"
        if dry_run:
            return None
        inputs = [x, ed.const(f"{_label_of(dec)}_scale", s)]
        if dec.kind == "LayerNorm" and b is not None:
            inputs.append(ed.const(f"{_label_of(dec)}_bias", b))
        y = ed.op(
            anchor, dec.op, inputs, {"axis": dec.axes[0], "epsilon": dec.eps}, base=_label_of(dec)
        )
    ed.take_over(dec.out, y)
    replaced[id(dec.out)] = y
    ed.remove(reversed(dec.nodes))
    return None


def _channels(x: ir.Value) -> int | None:
    if x.shape is None or x.shape.rank() < 2:
        return None
    c = x.shape.dims[1]
    return c if isinstance(c, int) else None


def _normalized_shape(x: ir.Value, axes: list[int]) -> list[int] | None:
    if x.shape is None:
        return None
    dims = list(x.shape.dims)
    out = [dims[a] for a in axes]
    return [d for d in out if isinstance(d, int)] if all(isinstance(d, int) for d in out) else None


def convert_opset(model: ir.Model, target: int) -> ir.Model:
    """The model converted to ``target`` by onnx's version converter; the IR version is kept."""
    proto = ir.to_proto(model)
    ir_version = proto.ir_version
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise InputError(
            f"onnx's version converter cannot take the model from opset {opset_of(model)} to {target}: "
            f"{text[0] if text else type(exc).__name__}",
            "choose another --target-opset",
        ) from None
    converted.ir_version = max(ir_version, _min_ir(target))  # keep the input's, unless too old
    return ir.from_proto(converted)


_REDUCE_OPS = frozenset(
    {
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceSumSquare",
    }
)


def downgrade_opset(model: ir.Model, target: int) -> tuple[ir.Model, str]:
    """The model at the lower opset ``target``, and how it got there.

    onnx's version converter is tried first. It lacks many downgrade adapters (Add-14 -> 13,
    Shape-15 -> 13, ...), so where it fails each node is checked instead: an op whose schema is
    the same at both opsets stays; one whose newer schema only widened types or added
    attributes and inputs the node does not use is relabelled; Reduce ops move their constant
    ``axes`` input back to the attribute; anything else is refused, naming the op. The parity
    check that follows compares the result with the original on onnxruntime.
    """
    try:
        return convert_opset(model, target), "onnx version converter"
    except InputError as exc:
        first = exc.message
    proto = ir.to_proto(model)
    current = opset_of(model)
    consts = {i.name: i for i in proto.graph.initializer}
    for n in proto.graph.node:  # the version converter writes axes as Constant nodes
        if n.op_type == "Constant" and len(n.output) == 1:
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            if value is not None:
                consts[n.output[0]] = value
    changed: set[str] = set()
    moved: set[str] = set()

    def fix(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    fix(attr.g)
            if node.domain not in ("", "ai.onnx"):
                continue
            try:
                new = onnx.defs.get_schema(node.op_type, current, "")
                old = onnx.defs.get_schema(node.op_type, target, "")
            except onnx.defs.SchemaError:
                raise InputError(
                    f"{node.op_type} does not exist at opset {target}",
                    f"choose --target-opset >= {current}",
                ) from None
            if new.since_version == old.since_version:
                continue
            if node.op_type in _REDUCE_OPS and len(node.input) > 1 and "axes" not in old.attributes:
                pass  # the older schema also takes axes as an input
            elif node.op_type in _REDUCE_OPS and len(node.input) > 1 and node.input[1]:
                axes = consts.get(node.input[1])
                if axes is None:
                    raise InputError(
                        f"{node.op_type} '{node.name}' has non-constant axes; opset {target} needs them constant"
                    )
                values = onnx.numpy_helper.to_array(axes).reshape(-1).tolist()
                moved.add(node.input[1])
                del node.input[1]
                node.attribute.append(onnx.helper.make_attribute("axes", [int(v) for v in values]))
            unknown = [a.name for a in node.attribute if a.name not in old.attributes]
            if unknown or len([i for i in node.input if i]) > old.max_input:
                raise InputError(
                    f"{node.op_type} '{node.name}' uses {', '.join(unknown) or 'inputs'} that opset {target} lacks "
                    f"(and the version converter failed: {first})",
                    f"choose --target-opset >= {new.since_version}",
                )
            changed.add(node.op_type)

    fix(proto.graph)
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = target
    still = {i for n in proto.graph.node for i in n.input}
    for init in [i for i in proto.graph.initializer if i.name in moved and i.name not in still]:
        proto.graph.initializer.remove(init)  # axes constants now attributes
    for node in [n for n in proto.graph.node if n.op_type == "Constant" and n.output[0] in moved]:
        if node.output[0] not in still:
            proto.graph.node.remove(node)
    return ir.from_proto(proto), (
        f"nodes relabelled where only types or unused attributes changed ({', '.join(sorted(changed))})"
        if changed
        else "no node needed a change"
    )


def _min_ir(opset: int) -> int:
    """The oldest IR version that supports ``opset`` (from onnx's version table)."""
    rows = [row for row in onnx.helper.VERSION_TABLE if row[2] >= opset]
    return min((row[1] for row in rows), default=onnx.IR_VERSION)


# ----------------------------------------------------------------------------------- lower


def lower_model(model: ir.Model, target_opset: int) -> tuple[ir.Model, list[Entry], list[str]]:
    """Decompose every fused norm op the target opset lacks, then convert the model down."""
    opset = opset_of(model)
    names = _all_names(model)
    consts = _resolver(model)
    entries: list[Entry] = []
    notes: list[str] = []
    for graph, label in _graphs(model):
        ed = _Editor(graph, names, opset)
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
    ed: _Editor, node: ir.Node, consts: ConstantResolver, entry: Entry, target: int
) -> str | None:
    x = node.inputs[0]
    if x is None:
        return "no input"
    dtype = _np_dtype(x)
    rank = _rank(x)
    if dtype is None:
        return "its input type is unknown or not float/double/float16"
    eps = float(_attr(node, "epsilon", 1e-5))
    if node.op_type in ("LayerNormalization", "RMSNormalization"):
        axis = int(_attr(node, "axis", -1))
        if axis >= 0:
            if rank is None:
                return "the rank of its input is unknown"
            axis -= rank
        axes = list(range(axis, 0))
        stash = int(_attr(node, "stash_type", 1))
        compute = np.float32 if stash == 1 else _NP.get(ir.DataType(stash), dtype)
        out_type = x.type.dtype if x.type is not None else None
        scale = node.inputs[1] if len(node.inputs) > 1 else None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if any(o is not None and (list(o.uses()) or o.is_graph_output()) for o in node.outputs[1:]):
            return "its Mean/InvStdDev outputs are used"
        y = _emit_layernorm_decomposed(
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
        groups = int(_attr(node, "num_groups", 0))
        s = consts.try_resolve(node.inputs[1] if len(node.inputs) > 1 else None)
        b = consts.try_resolve(node.inputs[2] if len(node.inputs) > 2 else None)
        if s is None or b is None or rank is None or groups < 1:
            return "scale/bias not constant, or rank unknown"
        s64, b64 = np.asarray(s, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
        per_group = ed.opset < 21  # GroupNormalization-18 carries a per-group scale and bias
        y = _emit_groupnorm(
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


# ----------------------------------------------------------------------------- recalibrate


def _bn_levels(model: ir.Model) -> dict[int, int]:
    """For each BatchNormalization (by id), how many BatchNorms lie on the longest path before it."""
    level: dict[int, int] = {}

    def walk(graph: ir.Graph, depth_in: dict[int, int], base: int) -> int:
        deepest = base
        depth: dict[int, int] = dict(depth_in)
        for node in graph:
            d = max([depth.get(id(v), base) for v in node.inputs if v is not None] + [base])
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    d = max(d, walk(attr.value, depth, d))
                elif attr.type == ir.AttributeType.GRAPHS:
                    for g in attr.value:
                        d = max(d, walk(g, depth, d))
            if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
                level[id(node)] = d
                d += 1
            for o in node.outputs:
                depth[id(o)] = d
            deepest = max(deepest, d)
        return deepest

    walk(model.graph, {}, 0)
    return level


_SUBGRAPH_OWNERS = {"If": ("then_branch", "else_branch"), "Loop": ("body",), "Scan": ("body",)}


def _find_path(
    graph: onnx.GraphProto, xname: str
) -> list[tuple[onnx.NodeProto, str, onnx.GraphProto]] | None:
    """The chain of (owner node, attribute, subgraph) down to the graph holding a BatchNorm on ``xname``."""
    for node in graph.node:
        if node.op_type == "BatchNormalization" and node.input and node.input[0] == xname:
            return []
    for node in graph.node:
        for attr in node.attribute:
            if attr.type != onnx.AttributeProto.GRAPH:
                continue
            found = _find_path(attr.g, xname)
            if found is not None:
                return [(node, attr.name, attr.g), *found]
    return None


def _expose(
    proto: onnx.ModelProto, xname: str, elem: int, rank: int, names: set[str]
) -> tuple[str, bool] | str:
    """Make the tensor ``xname`` an output of the main graph, through If/Loop/Scan nesting.

    Returns ``(output name, stacked)`` (stacked: a Loop/Scan scan output with one more leading
    axis), or the reason it cannot be reached.
    """
    path = _find_path(proto.graph, xname)
    if path is None:
        return "not found in the graph"
    name, stacked = xname, False
    for owner, attr_name, sub in reversed(path):
        if owner.op_type not in _SUBGRAPH_OWNERS:
            return f"inside a {owner.op_type} body"
        tap = _fresh(names, f"{xname}_tap")
        sub.node.append(onnx.helper.make_node("Identity", [name], [tap]))
        sub.output.append(onnx.helper.make_tensor_value_info(tap, elem, None))
        if owner.op_type == "If":
            other_name = next(b for b in _SUBGRAPH_OWNERS["If"] if b != attr_name)
            other = next(a.g for a in owner.attribute if a.name == other_name)
            empty = _fresh(names, f"{xname}_untaken")
            dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
            value = onnx.numpy_helper.from_array(np.zeros((0,) * max(rank, 2), dtype))
            other.node.append(onnx.helper.make_node("Constant", [], [empty], value=value))
            other.output.append(onnx.helper.make_tensor_value_info(empty, elem, None))
        else:
            stacked = True
        name = _fresh(names, f"{xname}_out")
        owner.output.append(name)
    proto.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return name, stacked


Runner = Callable[[bytes, list[str]], Callable[[dict[str, np.ndarray]], list[np.ndarray]]]
"""``runner(model_bytes, output_names)`` returns ``run(feeds) -> outputs`` (onnxruntime)."""


def recalibrate_model(
    model: ir.Model,
    batches: Sequence[dict[str, np.ndarray]],
    *,
    runner: Runner,
    where: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Entry]:
    """Recompute BatchNormalization mean/variance from ``batches``, in place.

    BatchNorms are taken level by level (a BatchNorm after another one waits until that one has
    its new statistics), so each is measured on the inputs the recalibrated model gives it.
    The variance written is the population variance of the data (``ddof=0``): the one that
    gives the normalised values unit variance, as ONNX BatchNormalization uses it.
    """
    levels = _bn_levels(model)
    consts = _resolver(model)
    entries: dict[int, Entry] = {}
    targets: list[tuple[ir.Node, str, int, int]] = []
    for node in model.graph.all_nodes():
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        if where is not None and not fnmatch.fnmatchcase(node.name or "", where):
            continue
        entry = Entry(node_name(node), node.op_type, "skipped")
        entries[id(node)] = entry
        info = _batchnorm(node, consts)
        if isinstance(info, str):
            entry.reason = info
            continue
        if info.x.type is None or not info.x.name:
            entry.reason = "its input has no name or type"
            continue
        targets.append((node, info.x.name, int(info.x.type.dtype), info.rank or 2))
    by_level: dict[int, list[tuple[ir.Node, str, int, int]]] = {}
    for t in targets:
        by_level.setdefault(levels.get(id(t[0]), 0), []).append(t)
    total = len(by_level) * len(batches)
    done = 0
    for level in sorted(by_level):
        group = by_level[level]
        proto = ir.to_proto(model)  # the current statistics, with the inputs exposed
        names = _all_names(model)
        exposed: dict[str, tuple[str, bool]] = {}
        for node, xname, elem, rank in group:
            if xname in exposed:
                continue
            result = _expose(proto, xname, elem, rank, names)
            if isinstance(result, str):
                entries[id(node)].reason = result
                continue
            exposed[xname] = result
        order = list(exposed)
        run = runner(proto.SerializeToString(), [exposed[k][0] for k in order])
        moments = {k: ChannelMoments() for k in order}
        for feeds in batches:
            for xname, value in zip(order, run(feeds), strict=True):
                arr = np.asarray(value)
                if exposed[xname][1] and arr.ndim >= 3:
                    arr = arr.reshape((-1, *arr.shape[2:]))  # iterations x batch -> one batch axis
                moments[xname].add(arr)
            done += 1
            if progress is not None:
                progress(done, total)
        for node, xname, _, _ in group:
            entry = entries[id(node)]
            if xname not in moments:
                continue
            acc = moments[xname]
            if acc.mean is None:
                entry.reason = "never ran on these batches (a branch not taken)"
                continue
            _write_stats(node, acc.mean, acc.var())
            entry.status = "applied"
            entry.target = f"statistics over {acc.n} values per channel (level {level})"
            entry.exact = False
    return list(entries.values())


def _write_stats(node: ir.Node, mean: np.ndarray, var: np.ndarray) -> None:
    """Put new mean/var into ``node``: in place when the initializer is its own, else a new one."""
    graph = node.graph
    assert isinstance(graph, ir.Graph)
    for idx, arr in ((3, mean), (4, var)):
        old = node.inputs[idx]
        assert old is not None
        dtype = old.type.dtype.numpy() if old.type is not None else np.dtype(np.float32)
        shape = tuple(old.const_value.shape) if old.const_value is not None else arr.shape
        tensor = ir.tensor(np.array(arr.astype(dtype).reshape(shape), order="C"))
        own = (  # an initializer (of this graph or an outer one) that only this node reads
            old.const_value is not None
            and old.producer() is None
            and len(list(old.uses())) == 1
            and not old.is_graph_input()
            and not old.is_graph_output()
        )
        if own:
            old.const_value = tensor
            continue
        names = set(graph.initializers) | {v.name for n in graph for v in n.outputs if v.name}
        new = ir.Value(
            name=_fresh(names, f"{node_name(node)}_{'mean' if idx == 3 else 'var'}"),
            const_value=tensor,
        )
        new.type, new.shape = ir.TensorType(tensor.dtype), ir.Shape(arr.reshape(shape).shape)
        graph.register_initializer(new)
        node.replace_input_with(idx, new)


def _fresh(names: set[str], base: str) -> str:
    name, k = base, 1
    while name in names:
        k += 1
        name = f"{base}_{k}"
    names.add(name)
    return name
