"""Structural reparameterization on ``torch.fx`` graphs: parallel and sequential linear branches
merged into one op (RepVGG, ACNet, DBB, MobileOne, RepGhost, RepViT, FastViT; docs/reparam.md).

Runs after the BN folds, on a GraphModule (traced from an ``nn.Module``, given, or an
ExportedProgram's unlifted module). A *block* is a sum: ``add``/``sub`` trees whose inner results
feed only the next one, also through a per-channel scale of a sub-sum (FastViT's RepMixer
``x + s * (mixer(x) - norm(x))``). Its terms that are linear maps of one tensor ``x`` merge:

* ``conv(x)`` k x k, 1 x k, k x 1, 1 x 1 (module or functional/ATen call), perhaps followed by a
  per-channel affine (a BatchNorm as :func:`~normfuse.torchmodel.pairs.as_norm` reads it from
  what its forward computes, a ``mul``/``div`` by a per-channel constant, pass-through modules);
* a 1x1 -> k x k or k x k -> 1x1 sequence with only a per-channel affine between
  (:func:`normfuse.core.branches.compose`: exact only where the second conv's zero padding meets
  a zero of the intermediate tensor);
* ``avg_pool(x)`` counting its padding (a constant depthwise kernel), also after a 1x1 conv;
* ``x`` itself or a per-channel affine of it: an identity kernel per group;
* ``linear(x)`` terms with one another (and ``x``), constant terms into the bias.

The maths is :mod:`normfuse.core.branches` (kernels centred in a common window and summed,
float64, one rounding into the weights' dtype): ``W = sum_i c_i * pad(W_i)``,
``b = sum_i c_i * b_i``. A merge that is not exact, or that would cost more multiply-adds than
its branches, is refused with the reason; terms that do not merge stay and are added to the
merged op. A per-channel affine that alone reads the sum (RepViT's ``bn(conv(x) + conv1(x) +
x)``, a distilled head's ``/ 2``) folds into the merged op. Sequences outside sums merge
likewise. Every block gets one report entry.

The merged op is a new ``nn.Conv*d``/``nn.Linear`` module (in place of the main branch's module
when that is called only there), asymmetric paddings as an ``F.pad`` before it.

Imports: torch, numpy, :mod:`normfuse.core` and the torchmodel package.

Size: one pass over one graph (reading terms, merging, writing), the same steps and refusals as
:mod:`normfuse.onnxgraph.reparam` on the other IR; split, its parts would share all its state.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from normfuse.core import branches
from normfuse.core.branches import Incompatible, Kernel, as_vector, then_affine
from normfuse.core.report import Entry
from normfuse.torchmodel.layout import passthrough
from normfuse.torchmodel.modules import hidden_behaviour
from normfuse.torchmodel.normsig import is_meta
from normfuse.torchmodel.pairs import (
    FUNC_LINEAR,
    as_linear,
    as_norm,
    call_args,
    get_attr,
    rank_of,
    source_name,
)
from normfuse.torchmodel.plan import call_sites
from normfuse.torchmodel.surgery import drop_unused

__all__ = ["reparam_graph"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten
_FUNCS: dict[Any, str] = {
    operator.add: "add",
    torch.add: "add",
    _aten.add.Tensor: "add",
    operator.sub: "sub",
    torch.sub: "sub",
    _aten.sub.Tensor: "sub",
    operator.mul: "mul",
    torch.mul: "mul",
    _aten.mul.Tensor: "mul",
    operator.truediv: "div",
    torch.div: "div",
    _aten.div.Tensor: "div",
}
_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div"}
#: ``x += y`` as torch.export keeps it (timm's RepVggBlock: ``x += identity``)
_IN_PLACE: dict[Any, str] = {operator.iadd: "add", _aten.add_.Tensor: "add"}
_SHAPE_OPS = {"view", "reshape", "unsqueeze", "squeeze", "flatten", "contiguous", "clone", "neg"}
_AVG_POOLS: dict[Any, int] = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
for _n in (1, 2, 3):
    _AVG_POOLS[getattr(_aten, f"avg_pool{_n}d").default] = _n
_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")


class _Refused(Exception):
    """A term is no mergeable branch; ``str(exc)`` says why."""


@dataclasses.dataclass
class _Branch:
    """One term of a sum, read as a linear map of ``source``."""

    source: fx.Node
    label: str
    nodes: list[fx.Node]  # erased when merged
    trail: list[tuple[str, Any]]  # per-channel affines after the op, input side first
    kernel: Kernel | None = None
    dense: tuple[np.ndarray, np.ndarray] | None = None  # (W (out, in), b)
    pool: tuple[tuple[int, ...], ...] | None = None  # kernel, strides, begin, end
    ref: torch.Tensor | None = None  # a weight: dtype, device
    op: fx.Node | None = None  # the main linear op
    cost: int = 0
    coef: np.ndarray | None = None  # the term's per-channel coefficient in the sum (None: 1)


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    out = tuple(int(v) for v in value)
    return out * n if len(out) == 1 else out


def reparam_graph(
    gm: fx.GraphModule, label: str = "", earlier: list[Entry] | None = None, prefix: str = ""
) -> list[Entry]:
    """Merge the branches of every block of ``gm`` in place (see the module docstring).

    Args:
        gm: The graph, after the BN folds.
        label: The report's ``graph`` field.
        earlier: The BN folds' entries: a norm skipped there (an identity branch's BatchNorm)
            and merged here becomes applied, into the merged op, direction ``reparam``.
        prefix: ``gm``'s qualified name in the model (``gm`` traced from a submodule): the
            entries name modules from the model's root.

    Returns:
        One entry per block: applied with the branches merged, or skipped with the reason.
    """
    merger = _Merger(gm, label, prefix)
    entries = merger.run()
    for e in earlier or []:
        target = merger.absorbed.get(e.node)
        if target is not None and e.status == "skipped" and e.graph == label:
            e.status, e.target, e.direction, e.reason, e.fix = (
                "applied",
                target,
                "reparam",
                None,
                None,
            )
    if merger.changed:
        for node in list(gm.graph.nodes):  # nn.Identity / eval dropout left by the folds
            if passthrough(gm, node) and isinstance(node.args[0], fx.Node):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
        drop_unused(gm, set())
        gm.delete_all_unused_submodules()
        gm.graph.lint()
        gm.recompile()
    return entries


class _Merger:
    def __init__(self, gm: fx.GraphModule, label: str, prefix: str = "") -> None:
        self.gm = gm
        self.label = label
        self.prefix = prefix
        self.changed = False
        self.consts: dict[fx.Node, torch.Tensor | None] = {}
        self.rank: int | None = None
        self.absorbed: dict[str, str] = {}  # norm name -> the merged op it went into
        self.erased: set[fx.Node] = set()  # fx keeps an erased node's ``graph``

    # ------------------------------------------------------------------ reading the graph
    def run(self) -> list[Entry]:
        entries: list[Entry] = []
        roots = [n for n in self.gm.graph.nodes if self._is_sum(n) and not self._inner(n)]
        for root in roots:
            if root in self.erased:
                continue
            entry = self._block(root)
            if entry is not None:
                entries.append(entry)
        for node in list(self.gm.graph.nodes):
            if node not in self.erased and self._conv(node) is not None:
                entry = self._sequence(node)
                if entry is not None:
                    entries.append(entry)
        return entries

    @staticmethod
    def _kind(node: Any) -> str | None:
        """``add``/``sub``/``mul``/``div`` of two operands, without ``alpha`` or rounding."""
        if not isinstance(node, fx.Node) or len(node.args) != 2:
            return None
        if any(k not in ("alpha",) or node.kwargs[k] != 1 for k in node.kwargs):
            return None
        if node.op == "call_function":
            if node.target in _IN_PLACE:  # x += y where nothing else reads x: a sum
                first = node.args[0]
                alone = isinstance(first, fx.Node) and list(first.users) == [node]
                return _IN_PLACE[node.target] if alone else None
            return _FUNCS.get(node.target)
        if node.op == "call_method":
            return _METHODS.get(str(node.target))
        return None

    def _is_sum(self, node: Any) -> bool:
        return self._kind(node) in ("add", "sub") and any(
            isinstance(a, fx.Node) and self.const(a) is None for a in node.args
        )

    @staticmethod
    def _users(node: fx.Node) -> list[fx.Node]:
        return [u for u in node.users if not is_meta(u)]

    def _only_user(self, node: fx.Node) -> fx.Node | None:
        users = self._users(node)
        return users[0] if len(users) == 1 and len(node.users) == 1 else None

    def _exclusive(self, node: Any, reader: fx.Node) -> bool:
        return isinstance(node, fx.Node) and list(node.users) == [reader]

    def _scaled(self, node: Any) -> tuple[Any, fx.Node] | None:
        """``(c, x)`` of ``x * c`` or ``x / c`` with ``c`` constant (``c`` as a divisor)."""
        kind = self._kind(node)
        if kind not in ("mul", "div"):
            return None
        for i in (0, 1) if kind == "mul" else (0,):
            x, c = node.args[i], node.args[1 - i]
            value = self.const(c)
            if isinstance(x, fx.Node) and self.const(x) is None and value is not None:
                return (value if kind == "mul" else 1.0 / value), x
        return None

    def _next(self, node: fx.Node) -> tuple[fx.Node | None, list[fx.Node]]:
        """``node``'s only user after pass-through ops (each the only user of the one before),
        and those ops."""
        via: list[fx.Node] = []
        user = self._only_user(node)
        while user is not None and passthrough(self.gm, user):
            via.append(user)
            user = self._only_user(user)
        return user, via

    def _inner(self, node: fx.Node) -> bool:
        user, _ = self._next(node)
        if user is None:
            return False
        if self._is_sum(user):
            return True
        scaled = self._scaled(user)
        after = self._next(user)[0] if scaled is not None else None
        return after is not None and self._is_sum(after)

    def _unwrap(self, v: Any, reader: fx.Node) -> tuple[Any, list[fx.Node]]:
        """``v`` before pass-through ops that only ``reader``'s chain reads."""
        via: list[fx.Node] = []
        while isinstance(v, fx.Node) and passthrough(self.gm, v) and self._only_user(v) is reader:
            via.append(v)
            v, reader = v.args[0], v
        return v, via

    def const(self, value: Any) -> torch.Tensor | None:
        """A constant operand in float64 (numbers, tensor attributes and shape ops on them)."""
        if isinstance(value, bool):
            return None
        if isinstance(value, int | float):
            return torch.tensor(float(value), dtype=torch.float64)
        if not isinstance(value, fx.Node):
            return None
        if value not in self.consts:
            self.consts[value] = self._compute(value)
        return self.consts[value]

    def _compute(self, node: fx.Node) -> torch.Tensor | None:
        if node.op == "get_attr":
            try:
                t = get_attr(self.gm, str(node.target))
            except AttributeError:
                return None
            ok = isinstance(t, torch.Tensor) and t.is_floating_point()
            return t.detach().to(torch.float64).cpu() if ok else None
        name = str(node.target) if node.op == "call_method" else ""
        if node.op == "call_function":
            packet = getattr(node.target, "overloadpacket", None)
            name = str(getattr(packet or node.target, "__name__", "")).split(".")[-1]
        if name not in _SHAPE_OPS or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        base = self.const(node.args[0])
        if base is None or any(isinstance(a, fx.Node) for a in [*node.args[1:], *node.kwargs]):
            return None
        try:
            return getattr(base, name)(*node.args[1:], **node.kwargs)
        except Exception:
            return None

    def channels(self, value: torch.Tensor | float, rank: int | None) -> np.ndarray | None:
        """A constant as a per-channel vector on axis 1 of rank-``rank`` data (or a scalar)."""
        t = torch.as_tensor(value, dtype=torch.float64)
        if t.numel() == 1:
            return t.reshape(1).numpy()
        if rank is None or t.dim() > rank or t.dim() < rank - 1:
            return None
        shape = (1,) * (rank - t.dim()) + tuple(t.shape)
        if any(d != 1 for i, d in enumerate(shape) if i != 1):
            return None
        return t.reshape(-1).numpy()

    # ------------------------------------------------------------------------ the terms
    def _tree(self, root: fx.Node, coef: np.ndarray | None = None) -> tuple[list, list]:
        nodes, leaves = [root], []
        for i, v in enumerate(root.args):
            c = coef
            if self._kind(root) == "sub" and i == 1:
                c = -1.0 * (np.ones(1) if c is None else c)
            u, via = self._unwrap(v, root)
            if isinstance(u, fx.Node) and self._only_user(u) in (root, *via):
                if self._is_sum(u):
                    inner_nodes, inner_leaves = self._tree(u, c)
                    nodes += [*via, *inner_nodes]
                    leaves += inner_leaves
                    continue
                scaled = self._scaled(u)
                inner, via2 = self._unwrap(scaled[1], u) if scaled is not None else (None, [])
                if scaled is not None and isinstance(inner, fx.Node) and self._is_sum(inner):
                    vec = self.channels(scaled[0], self.rank)
                    if vec is not None and self._only_user(inner) in (u, *via2):
                        inner_nodes, inner_leaves = self._tree(inner, vec if c is None else c * vec)
                        nodes += [*via, u, *via2, *inner_nodes]
                        leaves += inner_leaves
                        continue
            leaves.append((v, c))
        return nodes, leaves

    def _step(self, node: fx.Node) -> tuple[str, Any, Any, list[fx.Node]] | None:
        """``(kind, value, input, nodes)`` of a per-channel affine node, or ``None``."""
        if passthrough(self.gm, node):
            return "id", None, node.args[0], [node]
        target = node
        if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
            target = node.args[0]  # type: ignore[assignment]  # ATen's batch norm: a tuple
        norm = as_norm(self.gm, target) if isinstance(target, fx.Node) else None
        if (
            norm is not None
            and norm.node is node
            and norm.affine is not None
            and all(type(m) in (nn.Identity, nn.Dropout) and not m.training for _, m in norm.tail)
        ):
            return "bn", norm.affine, norm.input, list(norm.erase)
        scaled = self._scaled(node)
        if scaled is not None:
            return "mul", scaled[0], scaled[1], [node]
        return None

    def trail_affine(self, trail: list[tuple[str, Any]], rank: int | None) -> tuple[Any, Any]:
        scale: np.ndarray | float = 1.0
        shift: np.ndarray | float = 0.0
        for kind, value in trail:
            if kind == "bn":
                s, t = value.scale, value.shift
            elif kind == "mul":
                s = self.channels(value, rank)
                if s is None:
                    raise Incompatible(
                        f"a constant of shape {tuple(value.shape)} is not per-channel"
                    )
                t = 0.0
            else:
                continue
            scale, shift = np.multiply(scale, s), np.multiply(shift, s) + t
        return scale, shift

    def _read(self, leaf: Any, reader: fx.Node, notes: list[tuple[Any, str]]) -> _Branch | None:
        if not isinstance(leaf, fx.Node):
            return None
        trail: list[tuple[str, Any]] = []
        nodes: list[fx.Node] = []
        v, r = leaf, reader
        while isinstance(v, fx.Node) and self._exclusive(v, r):
            step = self._step(v)
            if step is None:
                break
            kind, value, src, erase = step
            trail.insert(0, (kind, value))
            nodes += erase
            v, r = src, erase[-1]
        if not isinstance(v, fx.Node):
            return None
        if self._linear_op(v):
            if not self._exclusive(v, r):
                others = len(self._users(v)) - 1
                notes.append(
                    (
                        v.args[0],
                        f"branch output used elsewhere: {self._name(v)} also feeds {others} "
                        "other reader(s)",
                    )
                )
            else:
                try:
                    return self._linear_branch(v, trail, nodes)
                except _Refused as exc:
                    notes.append((v.args[0], str(exc)))
                    return None
        elif not trail and len(v.all_input_nodes) == 1:
            inner = v.all_input_nodes[0]
            for _ in range(4):
                step = self._step(inner) if isinstance(inner, fx.Node) else None
                if step is None:
                    break
                inner = step[2]
            if isinstance(inner, fx.Node) and self._linear_op(inner):
                notes.append(
                    (
                        inner.args[0],
                        f"nonlinearity between: {self._name(v)} between {self._name(inner)} "
                        "and the sum",
                    )
                )
        label = "identity" + (
            " " + "/".join(sorted({self._name(n).split("'")[0].strip() for n in nodes}))
            if nodes
            else ""
        )
        return _Branch(v, label, nodes, trail)

    def _input(self, op: fx.Node, nodes: list[fx.Node]) -> fx.Node:
        """``op``'s data input, before pass-through ops read by the next alone (added to
        ``nodes``): branches behind their own ``nn.Identity``/``Dropout`` read the same tensor."""
        v: Any = op.args[0]
        reader = op
        while isinstance(v, fx.Node) and self._exclusive(v, reader) and passthrough(self.gm, v):
            nodes.append(v)
            v, reader = v.args[0], v
        return v

    def _path(self, node: fx.Node) -> str:
        """The module a node belongs to, from the model's root; else the node's name."""
        path = source_name(node)
        if node.op != "call_module" and path == node.name:
            return self.prefix or path
        return f"{self.prefix}.{path}" if self.prefix else path

    def _name(self, node: fx.Node) -> str:
        if node.op == "call_module":
            what = type(self.gm.get_submodule(str(node.target))).__name__
        else:
            what = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        return f"{what} '{self._path(node)}'"

    def _is_pool(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            m = self.gm.get_submodule(str(node.target))
            return type(m) in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
        return node.op == "call_function" and node.target in _AVG_POOLS

    def _linear_op(self, node: fx.Node) -> bool:
        return self._is_pool(node) or as_linear(self.gm, node) is not None

    def _conv(self, node: fx.Node) -> tuple[Kernel, torch.Tensor] | None:
        """A convolution as a :class:`Kernel` (float64) and its weight; ``None`` if not one."""
        lin = as_linear(self.gm, node)
        if lin is None or lin.kind != "conv":
            return None
        w = lin.weight.detach()
        n = w.dim() - 2
        if lin.module is not None:
            m: Any = lin.module
            if m.padding_mode != "zeros":
                return None
            stride, padding, dilation = m.stride, m.padding, m.dilation
        else:
            a = call_args(node, FUNC_LINEAR[node.target][1])
            stride, padding, dilation = (
                a.get(k, d) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1))
            )
        if any(isinstance(v, fx.Node) for v in (stride, padding, dilation)):
            return None
        stride, dilation = _tuple(stride, n), _tuple(dilation, n)
        ks = tuple(int(k) for k in w.shape[2:])
        if isinstance(padding, str):
            total = [
                0 if padding == "valid" else d * (k - 1) for d, k in zip(dilation, ks, strict=True)
            ]
            begin = tuple(t // 2 for t in total)
            end = tuple(t - b for t, b in zip(total, begin, strict=True))
        else:
            begin = end = _tuple(padding, n)
        bias = (
            np.zeros(w.shape[0]) if lin.bias is None else lin.bias.detach().double().cpu().numpy()
        )
        kernel = Kernel(w.double().cpu().numpy(), bias, stride, dilation, begin, end, lin.groups)
        return kernel, w

    def _pool(self, node: fx.Node) -> tuple[tuple[int, ...], ...]:
        """An average pool's geometry when it is a convolution, else :class:`_Refused`."""
        if node.op == "call_module":
            m: Any = self.gm.get_submodule(str(node.target))
            hidden = hidden_behaviour(m)
            if hidden is not None:
                raise _Refused(f"{self._name(node)}: {hidden}")
            n = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(m)]
            a = {k: getattr(m, k, None) for k in _POOL_ARGS[1:]}
            a["divisor_override"] = getattr(m, "divisor_override", None)
        else:
            n = _AVG_POOLS[node.target]
            a = call_args(node, (*_POOL_ARGS, "divisor_override"))
        ks = _tuple(a["kernel_size"], n)
        strides = _tuple(a.get("stride") or ks, n)
        pads = _tuple(a.get("padding") or 0, n)
        if a.get("ceil_mode"):
            raise _Refused(f"{self._name(node)} uses ceil_mode=True (its last windows are partial)")
        if a.get("divisor_override"):
            raise _Refused(f"{self._name(node)} uses divisor_override")
        if any(pads) and a.get("count_include_pad") is False:
            raise _Refused(
                f"{self._name(node)} pads with count_include_pad=False: its border windows "
                "divide by fewer taps, which no convolution does"
            )
        return ks, strides, pads, pads

    def _linear_branch(self, op: fx.Node, trail: list, nodes: list[fx.Node]) -> _Branch:
        nodes = [*nodes, op]
        if self._is_pool(op):
            geo = self._pool(op)
            label = f"avgpool {'x'.join(map(str, geo[0]))}"
            first = self._first_of(op)
            if first is not None:  # 1x1 conv -> affine -> avg pool (DBB): one conv
                conv0, mids, mid_trail = first
                k0, w0 = conv0
                try:
                    s, t = self.trail_affine(mid_trail, k0.weight.ndim)
                    c = k0.out_channels
                    pool = branches.avgpool_kernel(c, c, *geo)
                    k = branches.compose(k0, pool, s, t)
                    cost = k0.macs() * math.prod(pool.strides) + pool.macs()
                    nodes += mids
                    return _Branch(
                        self._input(mids[-1], nodes),
                        "1x1->" + label,
                        nodes,
                        trail,
                        kernel=k,
                        ref=w0,
                        op=mids[-1],
                        cost=cost,
                    )
                except (Incompatible, ValueError) as exc:
                    logger.debug("pool sequence not merged: %s", exc)
            return _Branch(self._input(op, nodes), label, nodes, trail, pool=geo, op=op)
        conv = self._conv(op)
        if conv is not None:
            k, w = conv
            label = "x".join(map(str, k.shape))
            cost = k.macs()
            source = self._input(op, nodes)
            first = self._first_of(op)
            if first is not None:
                (k0, _), mids, mid_trail = first
                try:
                    s, t = self.trail_affine(mid_trail, k.weight.ndim)
                    cheap = branches.composed_macs(k0, k) <= k.macs() + k0.macs() * math.prod(
                        k.strides
                    )
                    if (k0.is_pointwise or k.is_pointwise) and cheap:
                        merged = branches.compose(k0, k, s, t)
                        label = "x".join(map(str, k0.shape)) + "->" + label
                        cost += k0.macs() * (math.prod(k.strides) if k0.is_pointwise else 1)
                        nodes += mids
                        source, k = self._input(mids[-1], nodes), merged
                except (Incompatible, ValueError) as exc:
                    logger.debug("sequence not merged: %s", exc)
            return _Branch(source, label, nodes, trail, kernel=k, ref=w, op=op, cost=cost)
        lin = as_linear(self.gm, op)
        if lin is None or lin.kind != "dense":
            raise _Refused(f"{self._name(op)} is not a plain convolution or linear op")
        if trail and any(kind != "id" for kind, _ in trail):
            raise _Refused(f"{self._name(op)}: an affine after a linear branch is not merged")
        w = lin.weight.detach()
        b = np.zeros(w.shape[0]) if lin.bias is None else lin.bias.detach().double().cpu().numpy()
        dense = (w.double().cpu().numpy(), b)
        source = self._input(op, nodes)
        return _Branch(source, "Linear", nodes, trail, dense=dense, ref=w, op=op, cost=w.numel())

    def _first_of(
        self, op: fx.Node
    ) -> tuple[tuple[Kernel, torch.Tensor], list[fx.Node], list] | None:
        """``((kernel, weight), nodes, trail)`` when ``op``'s input is a conv's output through
        per-channel affines only, each read by the next alone; ``nodes`` ends with that conv."""
        v, reader = op.args[0] if op.args else None, op
        mids: list[fx.Node] = []
        trail: list[tuple[str, Any]] = []
        for _ in range(8):
            if not isinstance(v, fx.Node) or not self._exclusive(v, reader):
                return None
            conv = self._conv(v)
            if conv is not None:
                return conv, [*mids, v], trail
            step = self._step(v)
            if step is None:
                return None
            kind, value, src, erase = step
            trail.insert(0, (kind, value))
            mids += erase
            v, reader = src, erase[-1]
        return None

    # ------------------------------------------------------------------------ the blocks
    def _block_rank(self, root: fx.Node) -> int | None:
        rank = rank_of(root)
        todo, seen = [root], 0
        while rank is None and todo and seen < 32:
            node = todo.pop()
            seen += 1
            conv = self._conv(node)
            if conv is not None:
                return conv[0].weight.ndim
            if not self._linear_op(node):  # beyond a linear op the rank may differ
                todo += node.all_input_nodes
        return rank

    def _block(self, root: fx.Node) -> Entry | None:
        self.rank = self._block_rank(root)
        tree, leaves = self._tree(root)
        sinks = {id(v): n for n in tree for v in n.args if isinstance(v, fx.Node)}
        notes: list[tuple[Any, str]] = []
        read: list[tuple[Any, _Branch | None, bool, np.ndarray | None]] = []
        for leaf, coef in leaves:
            if self.const(leaf) is not None:
                read.append((leaf, None, True, coef))
                continue
            br = self._read(leaf, sinks[id(leaf)], notes)
            if br is not None:
                br.coef = coef
            read.append((leaf, br, False, coef))
        by_source: dict[fx.Node, list[_Branch]] = {}
        for _, br, _, _ in read:
            if br is not None:
                by_source.setdefault(br.source, []).append(br)
        refused: dict[Any, list[str]] = {}
        for src, reason in notes:
            refused.setdefault(src, []).append(reason)
        groups = [
            g
            for g in by_source.values()
            if len(g) >= 2 and any(b.kernel is not None or b.dense is not None for b in g)
        ]
        if not groups:
            for src, reasons in refused.items():
                if len(by_source.get(src, [])) + len(reasons) >= 2:
                    return self._entry(root, "skipped", reason="; ".join(reasons))
            return None
        group = max(groups, key=lambda g: sum(b.cost for b in g))
        problems = list(refused.get(group[0].source, []))
        try:
            return self._merge(root, tree, read, group, problems)
        except (Incompatible, ValueError) as exc:
            return self._entry(root, "skipped", reason=str(exc))

    def _as_kernel(self, b: _Branch, main: Kernel) -> Kernel:
        s, t = self.trail_affine(b.trail, main.weight.ndim)
        if b.kernel is not None:
            return then_affine(b.kernel, s, t)
        if main.in_channels != main.out_channels:
            raise Incompatible(
                f"identity needs as many input as output channels ({main.in_channels} -> "
                f"{main.out_channels})"
            )
        if b.pool is not None:
            k = branches.avgpool_kernel(main.out_channels, main.group, *b.pool)
        else:
            k = branches.identity_kernel(main.out_channels, main.group, main.spatial)
        return then_affine(k, s, t)

    def _merge(self, root, tree, read, group, problems) -> Entry:
        convs = [b for b in group if b.kernel is not None]
        if convs and any(b.dense is not None for b in group):
            problems.append("convolution and linear branches on the same input do not merge")
            group = [b for b in group if b.dense is None]
        main = max(
            (b for b in group if b.kernel is not None or b.dense is not None), key=lambda b: b.cost
        )
        if main.dense is not None:
            return self._merge_dense(root, tree, read, group, main, problems)
        assert main.kernel is not None
        rank = main.kernel.weight.ndim
        if self.rank not in (None, rank):
            raise Incompatible(f"the sum has rank {self.rank}, the convolution {rank}")
        kept: list[_Branch] = []
        kernels: list[Kernel] = []
        for b in [main, *(b for b in group if b is not main)]:
            try:
                k = then_affine(self._as_kernel(b, main.kernel), as_vector(b.coef), 0.0)
                branches.merge_parallel([*kernels, k])
            except (Incompatible, ValueError) as exc:
                if b is main:
                    raise
                problems.append(f"{b.label} branch: {exc}")
                continue
            kept.append(b)
            kernels.append(k)
        if len(kept) < 2:
            return self._entry(root, "skipped", reason="; ".join(problems))
        merged = branches.merge_parallel(kernels)
        used = []
        for leaf, _, is_const, coef in read:
            vec = self.channels(self.const(leaf), rank) if is_const else None  # type: ignore[arg-type]
            if vec is not None and vec.size in (1, merged.out_channels):
                merged.bias = merged.bias + vec * as_vector(coef)
                used.append(leaf)
        names = [b.label for b in kept]
        if merged.macs() > sum(b.cost for b in kept):
            return self._entry(
                root,
                "skipped",
                reason=f"merging {' + '.join(names)} into one {'x'.join(map(str, merged.shape))} "
                f"conv would cost more multiply-adds ({merged.macs()} vs "
                f"{sum(b.cost for b in kept)} per position)",
            )
        foreign = self._foreign(read, kept, used)
        if foreign is None:
            return self._entry(
                root,
                "skipped",
                reason="a term that does not merge is scaled inside the sum; "
                + "; ".join(problems or ["no reason"]),
            )
        post: list[fx.Node] = []
        if not foreign:
            post, merged = self._after_sum(root, merged, rank)
        anchor = post[-1] if post else root
        out = self._emit_conv(anchor, main, merged)
        target = f"{self._name(out)} ({' + '.join(names)})"
        warnings = [f"not merged: {p}" for p in problems]
        if post:
            what = ", ".join(self._name(n) for n in post)
            warnings.append(f"merged the per-channel {what} after the sum")
        self._finish(
            anchor, out, foreign, [*post, *tree, *(n for b in kept for n in b.nodes)], target
        )
        return self._entry(root, "applied", target=target, warnings=warnings)

    def _foreign(self, read, kept, used) -> list | None:
        """The terms that stay (added to the merged op), or ``None`` if one is scaled."""
        taken = {id(b) for b in kept}
        foreign = [
            (leaf, coef)
            for leaf, br, _, coef in read
            if (br is None or id(br) not in taken) and not any(leaf is u for u in used)
        ]
        if any(coef is not None and np.any(coef != -1) for _, coef in foreign):
            return None
        return foreign

    def _after_sum(self, root: fx.Node, merged: Kernel, rank: int) -> tuple[list[fx.Node], Kernel]:
        user = self._only_user(root)
        if user is None:
            return [], merged
        step = self._step(user)
        if step is None or step[2] is not root or step[0] == "id":
            return [], merged
        try:
            s, t = self.trail_affine([(step[0], step[1])], rank)
        except (Incompatible, ValueError):
            return [], merged
        return step[3], then_affine(merged, s, t)

    def _merge_dense(self, root, tree, read, group, main, problems) -> Entry:
        w0 = main.dense[0]
        wsum = np.zeros_like(w0)
        bsum = np.zeros(w0.shape[0])
        kept = []
        for b in group:
            coef = as_vector(b.coef)
            if b.dense is not None:
                if b.dense[0].shape != w0.shape:
                    problems.append(f"{b.label} branch: shape {b.dense[0].shape} vs {w0.shape}")
                    continue
                wsum += b.dense[0] * coef.reshape(-1, 1)
                bsum += b.dense[1] * coef
            elif b.pool is None and not b.trail and w0.shape[0] == w0.shape[1] and coef.size == 1:
                wsum += np.eye(w0.shape[0]) * coef
            else:
                problems.append(f"{b.label} branch: only a plain identity merges with linear ops")
                continue
            kept.append(b)
        if len(kept) < 2 or any(c is not None and c.size > 1 for _, _, _, c in read):
            return self._entry(
                root,
                "skipped",
                reason="; ".join(problems) or "per-channel scales in a sum of linear ops",
            )
        used = []
        for leaf, _, is_const, coef in read:
            c = self.const(leaf) if is_const else None
            if c is not None and c.dim() <= 1 and c.numel() in (1, bsum.size):
                bsum = bsum + c.reshape(-1).numpy() * as_vector(coef)
                used.append(leaf)
        foreign = self._foreign(read, kept, used)
        if foreign is None:
            return self._entry(
                root, "skipped", reason="a term that does not merge is scaled inside the sum"
            )
        post: list[fx.Node] = []
        user = self._only_user(root)
        if not foreign and user is not None:
            scaled = self._scaled(user)
            if scaled is not None and scaled[1] is root and torch.as_tensor(scaled[0]).numel() == 1:
                wsum, bsum, post = wsum * float(scaled[0]), bsum * float(scaled[0]), [user]
        anchor = post[-1] if post else root
        layer = nn.Linear(w0.shape[1], w0.shape[0], device=main.ref.device, dtype=main.ref.dtype)
        self._load(layer, wsum, bsum, main.ref)
        out = self._install(anchor, main, layer, main.source)
        target = f"{self._name(out)} ({' + '.join(b.label for b in kept)})"
        self._finish(
            anchor, out, foreign, [*post, *tree, *(n for b in kept for n in b.nodes)], target
        )
        warnings = [f"not merged: {p}" for p in problems]
        return self._entry(root, "applied", target=target, warnings=warnings)

    # --------------------------------------------------------------------- sequences
    def _sequence(self, op: fx.Node) -> Entry | None:
        first = self._first_of(op)
        conv = self._conv(op)
        if first is None or conv is None:
            return None
        (k0, _), mids, mid_trail = first
        k1, w = conv
        if not (k0.is_pointwise or k1.is_pointwise):
            return None
        pair = f"{'x'.join(map(str, k0.shape))}->{'x'.join(map(str, k1.shape))}"
        cost = k1.macs() + k0.macs() * (math.prod(k1.strides) if k0.is_pointwise else 1)
        try:
            macs = branches.composed_macs(k0, k1)
            if macs <= cost:  # else refused before the (dense, costly) composition
                s, t = self.trail_affine(mid_trail, k1.weight.ndim)
                merged = branches.compose(k0, k1, s, t)
        except (Incompatible, ValueError) as exc:
            return self._entry(op, "skipped", reason=f"{pair}: {exc}")
        if macs > cost:
            return self._entry(
                op,
                "skipped",
                reason=f"{pair}: the merged conv would cost more multiply-adds "
                f"({macs} vs {cost} per position)",
            )
        nodes = [op, *mids]
        branch = _Branch(self._input(mids[-1], nodes), pair, nodes, [], kernel=merged, ref=w, op=op)
        try:
            out = self._emit_conv(op, branch, merged)
        except Incompatible as exc:
            return self._entry(op, "skipped", reason=f"{pair}: {exc}")
        target = f"{self._name(out)} ({pair})"
        self._finish(op, out, [], branch.nodes, target)
        return self._entry(op, "applied", target=target)

    # ------------------------------------------------------------------------ writing
    def _load(self, layer: nn.Module, w64: np.ndarray, b64: np.ndarray, ref: torch.Tensor) -> None:
        w = torch.from_numpy(np.ascontiguousarray(w64)).to(ref.dtype)
        b = torch.from_numpy(np.ascontiguousarray(b64)).to(ref.dtype)
        if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
            raise Incompatible(
                f"the merged weights overflow {str(ref.dtype).replace('torch.', '')}"
            )
        with torch.no_grad():
            layer.weight.copy_(w)  # type: ignore[operator]
            layer.bias.copy_(b)  # type: ignore[operator]
        layer.requires_grad_(ref.requires_grad)

    def _emit_conv(self, anchor: fx.Node, main: _Branch, k: Kernel) -> fx.Node:
        assert main.ref is not None
        cls: Any = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}.get(k.spatial)
        if cls is None:
            raise Incompatible(f"a {k.spatial}-D convolution is not written by normfuse")
        plain = k.pads_begin == k.pads_end and min(k.pads_begin, default=0) >= 0
        conv: Any = cls(
            k.in_channels,
            k.out_channels,
            k.shape,
            stride=k.strides,
            padding=k.pads_begin if plain else 0,
            dilation=k.dilations,
            groups=k.group,
            device=main.ref.device,
            dtype=main.ref.dtype,
        )
        self._load(conv, k.weight, k.bias, main.ref)
        source: Any = main.source
        if not plain:
            pads = [p for a in reversed(range(k.spatial)) for p in (k.pads_begin[a], k.pads_end[a])]
            with self.gm.graph.inserting_before(anchor):
                source = self.gm.graph.call_function(F.pad, (source, pads))
        return self._install(anchor, main, conv, source)

    def _install(self, anchor: fx.Node, main: _Branch, layer: nn.Module, source: Any) -> fx.Node:
        op = main.op
        assert op is not None
        if op.op == "call_module" and len(call_sites(self.gm, str(op.target), True)) == 1:
            name = str(op.target)
        else:
            base = source_name(op).replace(".", "_") + "_reparam"
            name, k = base, 1
            while hasattr(self.gm, name):
                k += 1
                name = f"{base}_{k}"
        parent, _, leaf = name.rpartition(".")
        setattr(self.gm.get_submodule(parent) if parent else self.gm, leaf, layer)
        with self.gm.graph.inserting_before(anchor):
            out = self.gm.graph.call_module(name, (source,))
        out.meta.update(
            {k: v for k, v in anchor.meta.items() if k in ("tensor_meta", "val", "nn_module_stack")}
        )
        return out

    def _finish(
        self, anchor: fx.Node, out: fx.Node, foreign: list, nodes: list[fx.Node], target: str
    ) -> None:
        """``out`` plus the terms that stay replaces ``anchor``; the merged nodes go."""
        graph = self.gm.graph
        for node in nodes:
            norm = as_norm(self.gm, node)
            if norm is not None and norm.affine is not None:
                key = norm.name if not self.prefix else f"{self.prefix}.{norm.name}"
                self.absorbed[self._path(node) if norm.module_target else key] = target
        for value, coef in foreign:
            with graph.inserting_before(anchor):
                out = graph.call_function(
                    operator.add if coef is None else operator.sub, (out, value)
                )
        anchor.replace_all_uses_with(out)
        order = {n: i for i, n in enumerate(graph.nodes)}
        for node in sorted(set(nodes), key=lambda n: -order.get(n, -1)):
            if node not in self.erased and not node.users:
                graph.erase_node(node)
                self.erased.add(node)
        self.consts.clear()
        self.changed = True

    def _entry(self, node: fx.Node, status: str, **kw: Any) -> Entry:
        return Entry(
            self._path(node),
            self._name(node).split(" ")[0],
            status,  # type: ignore[arg-type]
            graph=self.label,
            direction="reparam",
            **kw,
        )
