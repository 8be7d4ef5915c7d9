"""Per-channel ``mul``/``add``/``sub``/``div`` chains by constants after a linear op, in a
``torch.fx`` graph (GraphModule, or an ExportedProgram's module): how a frozen BatchNorm looks
once traced or exported (``x * (w * (rv + eps).rsqrt()) + (b - rm * scale)``).

A chain starts at a Conv/ConvTranspose/Linear whose output has one data use, and each link is
an elementwise op of the previous value and a *constant*: a Python number, or a node computed
from ``get_attr`` tensors (parameters, buffers, lifted constants) by pure ops only (views,
arithmetic, ``rsqrt``, dtype casts), evaluated once, in float64 from the stored tensors. Each
link's value has one data use (the next link). A link folds when broadcasting the constant
against the op's output changes neither its shape nor its dtype and the constant varies along
the op's channel axis only (axis 1 for convs, the last for Linear), as the ONNX side's
``_elementwise_affine`` requires. The maps compose in float64 into one :class:`Affine`, which
is folded as a BatchNorm would be (:func:`normfuse.torchmodel.surgery.fold_pair`).

Imports: torch, numpy, :mod:`normfuse.core` and :mod:`normfuse.torchmodel.pairs`.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import numpy as np
import torch
from torch import fx

from normfuse.core.algebra import Affine
from normfuse.torchmodel.layout import shape_of
from normfuse.torchmodel.normsig import is_meta
from normfuse.torchmodel.pairs import Linear, Norm, Pair, as_linear, get_attr, source_name

__all__ = ["ChainFinder", "erase_dead_constants"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten

# the chain's links: op name -> kind
_LINK_FUNCS: dict[Any, str] = {
    operator.mul: "mul",
    operator.add: "add",
    operator.sub: "sub",
    operator.truediv: "div",
    torch.mul: "mul",
    torch.add: "add",
    torch.sub: "sub",
    torch.div: "div",
    _aten.mul.Tensor: "mul",
    _aten.mul.Scalar: "mul",
    _aten.add.Tensor: "add",
    _aten.add.Scalar: "add",
    _aten.sub.Tensor: "sub",
    _aten.sub.Scalar: "sub",
    _aten.div.Tensor: "div",
    _aten.div.Scalar: "div",
}
_LINK_METHODS = {"mul": "mul", "add": "add", "sub": "sub", "div": "div"}

# pure ops a constant sub-expression may use (by name: aten packet, torch function or method)
_PURE = frozenset(
    {
        "view",
        "reshape",
        "_unsafe_view",
        "unsqueeze",
        "squeeze",
        "flatten",
        "expand",
        "permute",
        "transpose",
        "t",
        "contiguous",
        "clone",
        "to",
        "_to_copy",
        "type_as",
        "float",
        "double",
        "half",
        "add",
        "sub",
        "mul",
        "div",
        "truediv",
        "rsub",
        "neg",
        "rsqrt",
        "sqrt",
        "pow",
        "reciprocal",
        "exp",
        "log",
        "abs",
        "alias",
        "lift_fresh_copy",
        "detach",
        "getitem",
    }
)


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    t = node.target
    packet = getattr(t, "overloadpacket", None)
    if packet is not None:
        return str(getattr(packet, "__name__", "")).split(".")[-1]
    return str(getattr(t, "__name__", ""))


def _run(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    return node.target(*args, **kwargs)  # type: ignore[operator]


class _Consts:
    """Values of constant sub-expressions: native (dtype, shape) and float64, each once."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.native: dict[fx.Node, Any] = {}
        self.wide: dict[fx.Node, Any] = {}
        self.bad: set[fx.Node] = set()

    def is_const(self, value: Any) -> bool:
        if isinstance(value, bool):
            return False
        if isinstance(value, int | float):
            return True
        if not isinstance(value, fx.Node):
            return False
        return self._eval(value)

    def _eval(self, node: fx.Node) -> bool:
        if node in self.native:
            return True
        if node in self.bad:
            return False
        ok = self._compute(node)
        if not ok:
            self.bad.add(node)
        return ok

    def _compute(self, node: fx.Node) -> bool:
        if node.op == "get_attr":
            try:
                t = get_attr(self.gm, str(node.target))
            except AttributeError:
                return False
            if not isinstance(t, torch.Tensor):
                return False
            self.native[node] = t.detach()
            self.wide[node] = t.detach().to(torch.float64) if t.is_floating_point() else t.detach()
            return True
        if node.op not in ("call_function", "call_method") or _op_name(node) not in _PURE:
            return False
        if node.op == "call_function" and node.target is operator.getitem:
            return False  # tuple outputs of multi-output ops: not worth following
        for a in node.all_input_nodes:
            if not self._eval(a):
                return False
        try:
            args_n, kw_n = fx.node.map_arg((node.args, node.kwargs), lambda n: self.native[n])
            args_w, kw_w = fx.node.map_arg((node.args, node.kwargs), lambda n: self.wide[n])
            with torch.no_grad():
                self.native[node] = _run(node, args_n, kw_n)  # type: ignore[arg-type]
                self.wide[node] = _run(node, args_w, kw_w)  # type: ignore[arg-type]
        except Exception:
            self.native.pop(node, None)
            return False
        return True

    def values(self, value: Any) -> tuple[Any, Any]:
        if isinstance(value, fx.Node):
            return self.native[value], self.wide[value]
        return value, value


class ChainFinder:
    """Finds the per-channel affine chain after each linear op of ``gm`` (module docstring)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.consts = _Consts(gm)

    @property
    def constant_nodes(self) -> set[fx.Node]:
        """Every node evaluated as a constant sub-expression."""
        return set(self.consts.native)

    def find(self) -> list[Pair | tuple[Norm, str]]:
        """A :class:`Pair` per chain that folds, ``(norm, reason)`` per chain that does not."""
        out: list[Pair | tuple[Norm, str]] = []
        for node in list(self.gm.graph.nodes):
            lin = as_linear(self.gm, node)
            if lin is None:
                continue
            found = self._chain(lin)
            if found is not None:
                out.append(found)
        return out

    def _link(self, node: fx.Node, current: fx.Node) -> tuple[str, Any, bool] | None:
        """``(kind, constant, constant_first)`` when ``node`` is ``current`` op a constant."""
        if node.op == "call_function":
            kind = _LINK_FUNCS.get(node.target)
        elif node.op == "call_method":
            kind = _LINK_METHODS.get(str(node.target))
        else:
            kind = None
        if kind is None or len(node.args) != 2:
            return None
        if set(node.kwargs) - {"alpha"}:
            return None
        a, b = node.args
        if a is current and b is not current and self.consts.is_const(b):
            return kind, b, False
        if b is current and a is not current and self.consts.is_const(a):
            return kind, a, True
        return None

    def _chain(self, lin: Linear) -> Pair | tuple[Norm, str] | None:
        links: list[tuple[fx.Node, str, Any, bool]] = []
        current = lin.node
        while True:
            users = [u for u in current.users if not is_meta(u)]
            if len(users) != 1:
                break
            found = self._link(users[0], current)
            if found is None:
                break
            links.append((users[0], *found))
            current = users[0]
        if not links:
            return None
        first = links[0][0]
        name = source_name(first)
        if name == lin.owner.rpartition(".")[0] or name == source_name(lin.node):
            name = first.name
        norm = Norm(
            current,
            [n for n, *_ in reversed(links)],
            lin.node,
            name,
            "+".join(k for _, k, _, _ in links),
            None,
            lin.channels("out"),
        )
        shape = shape_of(lin.node)
        if shape is None:
            return norm, (
                f"a {norm.op_type} chain by constants after {lin.label}: the shapes are unknown "
                "(pass example_inputs), so its broadcast cannot be checked"
            )
        axis = 1 if lin.kind != "dense" else len(shape) - 1
        if len(shape) < 2 or shape[axis] != lin.channels("out"):
            return norm, f"{lin.label}'s output has shape {shape}: no channel axis to follow"
        scale = np.ones(shape[axis])
        shift = np.zeros(shape[axis])
        dtype = lin.weight.dtype
        for node, kind, const, first_is_const in links:
            got = self._affine(node, kind, const, first_is_const, shape, axis, dtype)
            if isinstance(got, str):
                if node is first:
                    return norm, f"{node.op} '{node.name}' after {lin.label}: {got}"
                # fold the valid prefix only: the chain ends before this link
                k = [n for n, *_ in links].index(node)
                links = links[:k]
                break
            s, t = got
            scale, shift = scale * s, shift * s + t
        last = links[-1][0]
        norm.node = last
        norm.erase = [n for n, *_ in reversed(links)]
        norm.op_type = "+".join(k for _, k, _, _ in links)
        norm.affine = Affine(scale, shift, axis=axis)
        if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
            return norm, "the composed per-channel map is not finite"
        pair = Pair(norm, lin, "after")
        pair.warnings.append(
            f"a per-channel {norm.op_type} chain by constants (frozen BN written out), "
            "composed in float64"
        )
        return pair

    def _affine(
        self,
        node: fx.Node,
        kind: str,
        const: Any,
        const_first: bool,
        shape: tuple[int, ...],
        axis: int,
        dtype: torch.dtype,
    ) -> tuple[np.ndarray, np.ndarray] | str:
        native, wide = self.consts.values(const)
        alpha = node.kwargs.get("alpha", 1)
        if isinstance(alpha, bool) or not isinstance(alpha, int | float):
            return "its alpha is not a number"
        if isinstance(native, torch.Tensor):
            if not native.is_floating_point() and native.dim() > 0:
                return f"its constant is {native.dtype}, not floating point"
            if native.is_floating_point() and native.dim() > 0 and native.dtype != dtype:
                return f"its constant is {native.dtype}: the result's dtype would change"
            cshape = tuple(native.shape)
            if len(cshape) > len(shape):
                return f"its constant of shape {cshape} broadcasts the output to a higher rank"
            padded = (1,) * (len(shape) - len(cshape)) + cshape
            varying = [i for i, d in enumerate(padded) if d != 1]
            if any(i != axis for i in varying):
                return (
                    f"its constant of shape {cshape} varies along axis "
                    f"{', '.join(str(i) for i in varying if i != axis)}, not only the channel "
                    f"axis {axis}"
                )
            if padded[axis] not in (1, shape[axis]):
                return f"its constant of shape {cshape} does not match {shape[axis]} channels"
            c = wide.to(torch.float64).reshape(-1).cpu().numpy()
            c = np.broadcast_to(c, (shape[axis],)) if c.size == 1 else c
        else:
            c = np.full(shape[axis], float(native))
        c = np.asarray(c, dtype=np.float64) * (float(alpha) if kind in ("add", "sub") else 1.0)
        if kind in ("add", "sub") and alpha != 1 and const_first:
            return "alpha scales the linear op's output"
        one, zero = np.ones_like(c), np.zeros_like(c)
        if kind == "mul":
            return c, zero
        if kind == "add":
            return one, c
        if kind == "sub":
            return (-one, c) if const_first else (one, -c)
        # div
        if const_first:
            return "the constant is divided by the output: not affine"
        if np.any(c == 0) or not np.all(np.isfinite(c)):
            return "it divides by zero or a non-finite constant"
        return 1.0 / c, zero


def erase_dead_constants(gm: fx.GraphModule, nodes: set[fx.Node]) -> None:
    """Remove the constant sub-expressions among ``nodes`` that nothing uses any more (after
    a chain folded); their ``get_attr`` leaves go with :func:`surgery.drop_unused`."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if node in nodes and not node.users and node.op in ("call_function", "call_method"):
                gm.graph.erase_node(node)
                nodes.discard(node)
                changed = True
