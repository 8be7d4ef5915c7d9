"""Decomposed norms as exporters write them, found by pattern: LayerNorm (ReduceMean/Sub/Pow|Mul/
ReduceMean/Add/Sqrt/Div|Reciprocal, with optional Casts around it and gamma/beta after it),
RMSNorm (Pow|Mul/ReduceMean/Add/Sqrt/Div|Reciprocal|1/x then Mul) and GroupNorm (Reshape/
InstanceNormalization/Reshape then Mul/Add). Each match says which fused op it is and what
opset that op needs.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from normfuse.onnxgraph.const import ConstantResolver
from normfuse.onnxgraph.edit import FUSED_MIN_OPSET, all_graphs, attr_value, model_resolver
from normfuse.onnxgraph.graph import node_name, rank_of
from normfuse.onnxgraph.paths import shape_elements

__all__ = ["Decomposed", "channel_count", "decomposed_label", "find_decomposed", "normalized_shape"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Decomposed:
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
    if node.op_type != "ReduceMean" or attr_value(node, "keepdims", 1) != 1:
        return None
    axes = attr_value(node, "axes", None)
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
    if m2 is None or _reduce_axes(m2, consts, rank_of(x)) != axes:
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


def _match_layernorm(m1: ir.Node, consts: ConstantResolver) -> Decomposed | None:
    x = m1.inputs[0]
    if x is None:
        return None
    axes = _reduce_axes(m1, consts, rank_of(x))
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
        and attr_value(cast_back, "to", None) == producer.inputs[0].type.dtype
        and len(list(x.uses())) == 2
    ):
        source = producer.inputs[0]  # computed in float32 around an fp16 input: stash_type=1
        nodes = [producer, *nodes, cast_back]
        out = cast_back.outputs[0]
    out, scale, bias = _affine_tail(out, consts, nodes)
    return Decomposed("LayerNorm", nodes, source, out, eps, axes, scale, bias, rank=rank_of(x))


def _mean_axes(node: ir.Node, consts: ConstantResolver, rank: int | None) -> list[int] | None:
    """The trailing axes a mean reduces: ReduceMean(keepdims=1), or GlobalAveragePool (axes 2..,
    which tf2onnx writes for a ReduceMean over the last axis of a rank-3 tensor)."""
    if node.op_type == "GlobalAveragePool" and node.domain in ("", "ai.onnx"):
        if rank is None or rank < 3:
            return None
        return list(range(2 - rank, 0))
    return _reduce_axes(node, consts, rank)


def _users(value: ir.Value) -> list[ir.Node]:
    seen: dict[int, ir.Node] = {}
    for use in value.uses():
        seen.setdefault(id(use.node), use.node)
    return list(seen.values())


def _constant_tail(arr: np.ndarray | None, n_axes: int) -> np.ndarray | None:
    """gamma/beta written with leading unit axes ``(1, 1, C)``, as the normalised shape ``(C,)``."""
    if arr is None:
        return None
    arr = np.asarray(arr)
    if arr.ndim > n_axes:
        lead = arr.shape[: arr.ndim - n_axes]
        if any(d != 1 for d in lead):
            return None
        arr = arr.reshape(arr.shape[arr.ndim - n_axes :])
    return arr


def _match_moments_layernorm(m1: ir.Node, consts: ConstantResolver) -> Decomposed | None:
    """LayerNorm as tf2onnx writes Keras' (moments, then ``x * inv + (beta - mean * inv)`` with
    ``inv = gamma / sqrt(var + eps)``): keras 3, and tf_keras with an unfused epsilon.

    ``mean = M(x)``, ``var = M(Sub(x, mean) ** 2)`` (M: ReduceMean or GlobalAveragePool over the
    same trailing axes; the Sub may read the mean through an Identity), ``r = 1 / Sqrt(var +
    eps)``, ``inv = r * gamma`` (or ``r``), and ``y = x * inv + shift`` with ``shift`` one of
    ``Neg(mean) * inv + beta``, ``beta - mean * inv``, ``Neg(mean) * inv``.
    """
    x = m1.inputs[0]
    if x is None:
        return None
    axes = _mean_axes(m1, consts, rank_of(x))
    if axes is None:
        return None
    mean = m1.outputs[0]
    if mean.is_graph_output():
        return None
    sub = ident = neg = None
    mean_users = _users(mean)
    for u in mean_users:
        if u.op_type == "Identity" and ident is None:
            ident = u
        elif u.op_type == "Neg" and neg is None:
            neg = u
    centred_from = mean
    for source in [mean, *([ident.outputs[0]] if ident is not None else [])]:
        for u in _users(source):
            if u.op_type == "Sub" and u.inputs[0] is x and u.inputs[1] is source:
                sub, centred_from = u, source
    if sub is None:
        return None
    d = sub.outputs[0]
    d_users = _users(d)
    if d.is_graph_output() or len(d_users) != 1 or not _squares(d_users[0], d, consts):
        return None
    sq = d_users[0]
    m2 = _only_user(sq.outputs[0])
    if m2 is None or m2.op_type != m1.op_type or _mean_axes(m2, consts, rank_of(x)) != axes:
        return None
    add = _only_user(m2.outputs[0])
    eps = _scalar(consts, _other(add, m2.outputs[0])) if add is not None else None
    if add is None or add.op_type != "Add" or eps is None:
        return None
    sqrt = _only_user(add.outputs[0])
    recip = _only_user(sqrt.outputs[0]) if sqrt is not None and sqrt.op_type == "Sqrt" else None
    if recip is None or not (
        recip.op_type == "Reciprocal"
        or (
            recip.op_type == "Div"
            and recip.inputs[1] is sqrt.outputs[0]  # type: ignore[union-attr]
            and _scalar(consts, recip.inputs[0]) == 1.0
        )
    ):
        return None
    nodes = [m1, sub, sq, m2, add, sqrt, recip]  # type: ignore[list-item]
    inv = recip.outputs[0]
    gamma = None
    user = _only_user(inv)
    if user is not None and user.op_type == "Mul":
        g = consts.try_resolve(_other(user, inv))
        if g is not None:
            gamma, inv = np.asarray(g), user.outputs[0]
            nodes.append(user)
    inv_users = _users(inv)
    if inv.is_graph_output() or len(inv_users) != 2:
        return None
    xs = next((u for u in inv_users if u.op_type == "Mul" and _other(u, inv) is x), None)
    ms = next((u for u in inv_users if u is not xs and u.op_type == "Mul"), None)
    if xs is None or ms is None:
        return None
    other = _other(ms, inv)
    negated = neg is not None and other is neg.outputs[0]
    if not negated and other is not mean:
        return None
    final = _only_user(xs.outputs[0])
    if final is None or final.op_type not in ("Add", "Sub"):
        return None
    beta = None
    shift = ms.outputs[0]
    shift_node = _only_user(shift)
    if shift_node is not None and shift_node is not final:
        if negated and shift_node.op_type == "Add":
            b = consts.try_resolve(_other(shift_node, shift))
        elif not negated and shift_node.op_type == "Sub" and shift_node.inputs[1] is shift:
            b = consts.try_resolve(shift_node.inputs[0])
        else:
            return None
        if b is None:
            return None
        beta, shift = np.asarray(b), shift_node.outputs[0]
        if _only_user(shift) is not final:
            return None
        nodes.append(shift_node)
        if final.op_type != "Add":
            return None
    elif shift_node is final:  # no beta: x * inv - mean * inv, or x * inv + Neg(mean) * inv
        if (final.op_type == "Add") != negated or (
            final.op_type == "Sub" and final.inputs[1] is not shift
        ):
            return None
    else:
        return None
    if final.op_type == "Add" and _other(final, xs.outputs[0]) is not shift:
        return None
    nodes += [ms, xs]
    extra = [n for n in (ident, neg) if n is not None and n.outputs[0] in (centred_from, other)]
    nodes[1:1] = extra
    owned = {id(n) for n in nodes} | {id(final)}
    for n in nodes:  # nothing outside reads what the pattern computes
        for o in n.outputs:
            if o.is_graph_output() or any(id(u) not in owned for u in _users(o)):
                return None
    nodes.append(final)
    n_axes = len(axes)
    scale, bias = _constant_tail(gamma, n_axes), _constant_tail(beta, n_axes)
    if (gamma is not None and scale is None) or (beta is not None and bias is None):
        return None
    return Decomposed(
        "LayerNorm", nodes, x, final.outputs[0], eps, axes, scale, bias, rank=rank_of(x)
    )


#: Ops that compute shapes and fillers around tf_keras' fused LayerNorm; removed with it when
#: nothing else reads them.
_SIDE_OPS = frozenset(
    {"Shape", "Cast", "Slice", "ReduceProd", "Unsqueeze", "Squeeze", "Expand", "Gather", "Concat"}
    | {"Constant", "Identity", "Reshape"}
)


def _through_casts(value: ir.Value | None) -> ir.Node | None:
    node = value.producer() if value is not None else None
    while (
        node is not None and node.op_type == "Cast" and node.inputs and node.inputs[0] is not None
    ):
        node = node.inputs[0].producer()
    return node


def _int_attr_list(node: ir.Node, consts: ConstantResolver, name: str = "axes") -> list[int] | None:
    axes = attr_value(node, name, None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = consts.try_resolve(node.inputs[1])
        axes = None if arr is None else np.asarray(arr).reshape(-1).tolist()
    return None if axes is None else [int(a) for a in axes]


def _filled(value: ir.Value | None, fill: float, consts: ConstantResolver) -> bool:
    """``value`` is all ``fill``: a constant, or Expand(fill, shape)."""
    arr = consts.try_resolve(value)
    if arr is not None:
        return bool(np.all(np.asarray(arr) == fill))
    node = value.producer() if value is not None else None
    return node is not None and node.op_type == "Expand" and _scalar(consts, node.inputs[0]) == fill


def _match_bn_layernorm(bn: ir.Node, consts: ConstantResolver) -> Decomposed | None:
    """tf_keras' fused LayerNormalization as tf2onnx writes it: ``x`` reshaped to
    ``(1, -1, C, 1)``, a BatchNormalization with scale Expand(1), bias Expand(0) and the row
    statistics ``mean = Squeeze(ReduceMean(x4, [0, 2, 3]))``, ``var = ReduceSumSquare(x4 - mean,
    [0, 2, 3]) / count``, reshaped back to ``Shape(x)``, then optional gamma/beta Mul/Add."""
    if len(bn.inputs) != 5 or any(v is None for v in bn.inputs):
        return None
    if any(list(o.uses()) or o.is_graph_output() for o in bn.outputs[1:] if o is not None):
        return None
    x4, scale, bias, mean1, var = bn.inputs
    if not (_filled(scale, 1.0, consts) and _filled(bias, 0.0, consts)):
        return None
    reshape1 = x4.producer()  # type: ignore[union-attr]
    if reshape1 is None or reshape1.op_type != "Reshape" or len(reshape1.inputs) < 2:
        return None
    # (1, rows, C, 1): the rows are whatever the reshape leaves (a constant -1 or computed)
    t = shape_elements(reshape1.inputs[1], consts)
    x = reshape1.inputs[0]
    if t is None or x is None or x.shape is None or x.shape.rank() < 2:
        return None
    c = x.shape.dims[-1]
    if len(t) != 4 or t[0] != 1 or t[3] != 1 or not isinstance(c, int) or t[2] != c:
        return None
    rows = [0, 2, 3]
    squeeze = mean1.producer()  # type: ignore[union-attr]
    if squeeze is None or squeeze.op_type != "Squeeze" or _int_attr_list(squeeze, consts) != rows:
        return None
    rmean = squeeze.inputs[0].producer() if squeeze.inputs[0] is not None else None
    if (
        rmean is None
        or rmean.op_type != "ReduceMean"
        or rmean.inputs[0] is not x4
        or _int_attr_list(rmean, consts) != rows
        or attr_value(rmean, "keepdims", 1) != 1
    ):
        return None
    div = var.producer()  # type: ignore[union-attr]
    if div is None or div.op_type != "Div":
        return None
    ss = div.inputs[0].producer() if div.inputs[0] is not None else None
    if (
        ss is None
        or ss.op_type != "ReduceSumSquare"
        or _int_attr_list(ss, consts) != rows
        or attr_value(ss, "keepdims", 1) != 0
    ):
        return None
    sub = ss.inputs[0].producer() if ss.inputs[0] is not None else None
    if sub is None or sub.op_type != "Sub" or sub.inputs[0] is not x4:
        return None
    if sub.inputs[1] is not rmean.outputs[0]:
        return None
    count = consts.try_resolve(div.inputs[1])
    if count is not None:
        if np.asarray(count).size != 1 or float(np.asarray(count).reshape(())) != float(c):
            return None
    else:
        prod = _through_casts(div.inputs[1])
        gather = (
            prod.inputs[0].producer() if prod is not None and prod.op_type == "ReduceProd" else None
        )
        if gather is None or gather.op_type != "Gather" or len(gather.inputs) < 2:
            return None
        shape = gather.inputs[0].producer() if gather.inputs[0] is not None else None
        idx = consts.try_resolve(gather.inputs[1])
        if (
            shape is None
            or shape.op_type != "Shape"
            or shape.inputs[0] is not x4
            or idx is None
            or np.asarray(idx).reshape(-1).tolist() != rows
        ):
            return None
    reshape2 = _only_user(bn.outputs[0])
    if reshape2 is None or reshape2.op_type != "Reshape" or len(reshape2.inputs) < 2:
        return None
    back = consts.try_resolve(reshape2.inputs[1])
    if back is not None:
        dims = list(x.shape.dims)
        if not all(isinstance(d, int) for d in dims) or np.asarray(back).tolist() != dims:
            return None
    else:
        shape_x = _through_casts(reshape2.inputs[1])
        if shape_x is None or shape_x.op_type != "Shape" or shape_x.inputs[0] is not x:
            return None
        if attr_value(shape_x, "start", 0) or attr_value(shape_x, "end", None) is not None:
            return None
    core = [reshape1, rmean, sub, ss, squeeze, div, bn, reshape2]
    tail: list[ir.Node] = []
    out, gamma, beta = _affine_tail(reshape2.outputs[0], consts, tail)
    owned = {id(n): n for n in [*core, *tail]}
    grew = True
    while grew:  # the shape and filler computations that only this pattern reads
        grew = False
        for node in list(owned.values()):
            for v in node.inputs:
                p = v.producer() if v is not None else None
                if (
                    p is None
                    or id(p) in owned
                    or x in p.outputs  # never what computes the input itself
                    or p.op_type not in _SIDE_OPS
                    or p.graph is not bn.graph
                    or any(
                        o.is_graph_output() or any(id(u) not in owned for u in _users(o))
                        for o in p.outputs
                    )
                ):
                    continue
                owned[id(p)] = p
                grew = True
    final = tail[-1] if tail else reshape2
    for node in owned.values():
        if node is final:
            continue
        for o in node.outputs:
            if o is not None and (
                o.is_graph_output() or any(id(u) not in owned for u in _users(o))
            ):
                return None
    order = {id(n): i for i, n in enumerate(bn.graph)} if bn.graph is not None else {}
    nodes = sorted(owned.values(), key=lambda n: order.get(id(n), 0))
    if nodes[-1] is not final:
        return None
    eps = float(attr_value(bn, "epsilon", 1e-5))
    scale_arr, bias_arr = _constant_tail(gamma, 1), _constant_tail(beta, 1)
    if (gamma is not None and scale_arr is None) or (beta is not None and bias_arr is None):
        return None
    return Decomposed("LayerNorm", nodes, x, out, eps, [-1], scale_arr, bias_arr, rank=rank_of(x))


def _match_rmsnorm(m: ir.Node, consts: ConstantResolver) -> Decomposed | None:
    sq_value = m.inputs[0]
    sq = sq_value.producer() if sq_value is not None else None
    if sq is None or sq.op_type not in ("Pow", "Mul"):
        return None
    x = sq.inputs[0]
    if x is None or not _squares(sq, x, consts) or _only_user(sq.outputs[0]) is not m:
        return None
    axes = _reduce_axes(m, consts, rank_of(x))
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
    return Decomposed("RMSNorm", nodes, x, out, eps, axes, scale, None, rank=rank_of(x))


def _match_groupnorm(inorm: ir.Node, consts: ConstantResolver) -> Decomposed | None:
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
            and not attr_value(shape_node, "start", 0)
            and attr_value(shape_node, "end", None) is None
        )
        or (static is not None and x_dims is not None and list(static) == x_dims)
    ):
        return None
    nodes = [reshape1, inorm, reshape2]
    if shape_node is not None and shape_node.op_type == "Shape" and len(list(target.uses())) == 1:  # type: ignore[union-attr]
        nodes.insert(0, shape_node)
    out, scale, bias = _affine_tail(reshape2.outputs[0], consts, nodes)
    rank = rank_of(x)
    eps = float(attr_value(inorm, "epsilon", 1e-5))
    gs64, gb64 = np.asarray(gs, np.float64).reshape(-1), np.asarray(gb, np.float64).reshape(-1)
    group_affine = None if np.all(gs64 == 1) and np.all(gb64 == 0) else (gs64, gb64)
    dec = Decomposed("GroupNorm", nodes, x, out, eps, [], None, None, groups, group_affine, rank)
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


def find_decomposed(model: ir.Model) -> list[tuple[ir.Graph, str, Decomposed]]:
    """Every decomposed LayerNorm, RMSNorm and GroupNorm in the model's graphs."""
    consts = model_resolver(model)
    found: list[tuple[ir.Graph, str, Decomposed]] = []
    for graph, label in all_graphs(model):
        taken: set[int] = set()
        for node in graph:
            if id(node) in taken or node.domain not in ("", "ai.onnx"):
                continue
            match: Decomposed | None = None
            if node.op_type == "ReduceMean":
                match = (
                    _match_layernorm(node, consts)
                    or _match_moments_layernorm(node, consts)
                    or _match_rmsnorm(node, consts)
                )
            elif node.op_type == "GlobalAveragePool":
                match = _match_moments_layernorm(node, consts)
            elif node.op_type == "BatchNormalization":
                match = _match_bn_layernorm(node, consts)
            elif node.op_type == "InstanceNormalization":
                match = _match_groupnorm(node, consts)
            if match is None or any(id(n) in taken for n in match.nodes):
                continue
            taken.update(id(n) for n in match.nodes)
            found.append((graph, label, match))
    return found


def decomposed_label(dec: Decomposed) -> str:
    return node_name(dec.nodes[0])


def channel_count(x: ir.Value) -> int | None:
    if x.shape is None or x.shape.rank() < 2:
        return None
    c = x.shape.dims[1]
    return c if isinstance(c, int) else None


def normalized_shape(x: ir.Value, axes: list[int]) -> list[int] | None:
    if x.shape is None:
        return None
    dims = list(x.shape.dims)
    out = [dims[a] for a in axes]
    return [d for d in out if isinstance(d, int)] if all(isinstance(d, int) for d in out) else None
