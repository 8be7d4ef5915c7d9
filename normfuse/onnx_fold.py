"""Fold per-channel affine maps into neighbouring linear ops in onnx_ir graphs.

The maths lives in :mod:`normfuse.algebra`; this module finds the pairs safely.

A *chain* is a maximal run of affine nodes where each node's output feeds only the next one:
``BatchNormalization``; ``Mul``/``Add``/``Sub``/``Div`` with one constant operand (``c / x`` is not
affine and does not count); and, with ``norm_affine``, the gamma/beta tail of
``LayerNormalization``/``GroupNormalization``/``InstanceNormalization``/``RMSNormalization`` as the
head of a chain. For each chain:

1. **after**: the longest valid prefix folds into the producing linear op (Conv, ConvTranspose,
   Gemm, MatMul with a constant 2-D right operand and its optional constant ``Add``) when that
   op's output feeds nothing else: ``W' = W * s`` along the output channels, ``b' = b * s + t``.
2. **before**: the longest valid suffix of what is left folds into the consuming linear ops, all
   of them, when every consumer is one and the fold is exact there: ``W' = W * s`` along the
   input channels, ``b' = b + sum(W * t)``. A Conv that pads its input with zeros only takes
   a map without shift. By default only suffixes that contain a BatchNormalization fold this
   way; ``norm_affine`` also folds plain Mul/Add chains and normalization tails.
3. every other node of the chain is reported as skipped with the reason.

Every BatchNormalization, every normalization tail considered, and every Mul/Add/Sub/Div of a
chain that touches a linear op or a normalization gets exactly one report entry. A refused
fold leaves the graph untouched. Folded tensors keep the name of the last output of the folded
chain, so the original and the folded model align by tensor name.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir

from normfuse import algebra
from normfuse.algebra import Affine, LinearWeights
from normfuse.errors import InputError
from normfuse.onnx_const import LARGE_BYTES, ConstantResolver, NotConstant, read_tensor
from normfuse.report import Entry, ModelStats, Status

__all__ = ["FoldOptions", "fold_model", "model_stats"]

logger = logging.getLogger(__name__)

LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
ELEMENTWISE_OPS = frozenset({"Mul", "Add", "Sub", "Div"})
NORM_TAIL_OPS = frozenset(
    {"LayerNormalization", "GroupNormalization", "InstanceNormalization", "RMSNormalization"}
)
NORM_OPS = NORM_TAIL_OPS | {"BatchNormalization"}
#: The newest default-domain opset whose semantics normfuse knows (that of the installed onnx).
KNOWN_OPSET = onnx.defs.onnx_opset_version()
_FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)

Container = ir.Graph | ir.Function


@dataclasses.dataclass(frozen=True)
class FoldOptions:
    """What :func:`fold_model` may do.

    Attributes:
        norm_affine: Also fold the gamma/beta of LayerNorm/GroupNorm/InstanceNorm/RMSNorm, and
            plain Mul/Add chains, into the following linear ops (the norm keeps gamma=1, beta=0).
        dry_run: Decide and report, change nothing (``normfuse inspect``).
    """

    norm_affine: bool = False
    dry_run: bool = False


class _Refused(Exception):
    """A candidate cannot fold; ``reason`` says why and ``fix`` how to make it fold."""

    def __init__(self, reason: str, fix: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


def _label(node: ir.Node) -> str:
    return f"{node.op_type} '{node_name(node)}'"


def take_over(old: ir.Value, new: ir.Value, computing: set[int], renamed: str) -> None:
    """``new`` stands in for ``old``: every reader of ``old`` but the nodes that compute ``new``
    from it (ids in ``computing``) reads ``new``, graph outputs included, and ``new`` takes
    ``old``'s name, type and shape; ``old`` is renamed ``renamed``."""
    for use in list(old.uses()):
        if id(use.node) not in computing:
            use.node.replace_input_with(use.idx, new)
    graph = old.graph
    if graph is not None and old.is_graph_output():
        outputs = graph.outputs
        for i, v in enumerate(outputs):
            if v is old:
                outputs[i] = new
    name = old.name
    old.name = renamed
    new.name = name
    new.type, new.shape = old.type, old.shape


def node_name(node: ir.Node) -> str:
    """The node's name, or ``<op_type>:<first output>`` when it has none."""
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs else "?"
    return f"<{node.op_type}:{out}>"


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    a = node.attributes.get(name)
    if a is None:
        return default
    if a.value is None:
        raise _Refused(f"{_label(node)} has a malformed attribute '{name}'")
    return a.value


def _int(node: ir.Node, name: str, default: int) -> int:
    try:
        return int(_attr(node, name, default))
    except (TypeError, ValueError):
        raise _Refused(f"{_label(node)} has a malformed attribute '{name}'") from None


def _float(node: ir.Node, name: str, default: float) -> float:
    try:
        return float(_attr(node, name, default))
    except (TypeError, ValueError):
        raise _Refused(f"{_label(node)} has a malformed attribute '{name}'") from None


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    try:
        return [int(v) for v in _attr(node, name, default)]
    except (TypeError, ValueError):
        raise _Refused(f"{_label(node)} has a malformed attribute '{name}'") from None


def _rank(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return value.shape.rank()


def _uses(value: ir.Value) -> list[ir.Node]:
    return [u.node for u in value.uses()]


def _exclusive(value: ir.Value, node: ir.Node) -> bool:
    uses = list(value.uses())
    return len(uses) == 1 and uses[0].node is node and not value.is_graph_output()


def _others(value: ir.Value, node: ir.Node) -> str:
    names: list[str] = [_label(u) for u in _uses(value) if u is not node]
    if value.is_graph_output():
        names.append("a graph output")
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


@dataclasses.dataclass
class _Linear:
    """A linear op found in the graph, with its weights read."""

    node: ir.Node
    weights: LinearWeights
    out: ir.Value  # the tensor carrying the op's result (MatMul: its bias Add's output)
    out_rank: int | None
    out_axis: int  # channel axis of ``out`` (non-negative, or -1 for "last" at unknown rank)
    in_axis: int | None  # channel axis of the data input; None when folding before is not exact
    in_refusal: str | None
    pads_input: bool  # Conv/ConvTranspose: some input position meets padding
    bias_node: ir.Node | None = None  # MatMul's Add
    bias_shape: tuple[int, ...] | None = None

    @property
    def label(self) -> str:
        return _label(self.node)


@dataclasses.dataclass
class _Link:
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


def _walk(container: Container, label: str) -> Iterator[tuple[Container, str]]:
    yield container, label
    for node in container:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from _walk(attr.value, f"{label}{_label(node)}/{attr.name}")
            elif attr.type == ir.AttributeType.GRAPHS:
                for i, g in enumerate(attr.value):
                    yield from _walk(g, f"{label}{_label(node)}/{attr.name}[{i}]")


def containers(model: ir.Model) -> Iterator[tuple[Container, str]]:
    """The main graph, its subgraphs and the model-local functions, with display labels."""
    yield from _walk(model.graph, "")
    for function in model.functions.values():
        yield from _walk(function, f"function '{function.domain}.{function.name}'/")


def model_stats(model: ir.Model) -> ModelStats:
    """Node counts and parameter bytes over all graphs and functions."""
    stats = ModelStats()
    seen: set[int] = set()
    for container, _ in containers(model):
        if isinstance(container, ir.Graph):
            for v in container.initializers.values():
                if id(v) not in seen and v.const_value is not None:
                    seen.add(id(v))
                    stats.param_bytes += v.const_value.nbytes
        for node in container:
            stats.nodes += 1
            if node.domain in ("", "ai.onnx"):
                if node.op_type == "BatchNormalization":
                    stats.batchnorm_nodes += 1
                if node.op_type in NORM_OPS:
                    stats.norm_nodes += 1
                value = node.attributes.get("value") if node.op_type == "Constant" else None
                if (
                    value is not None
                    and value.type == ir.AttributeType.TENSOR
                    and value.value is not None
                ):
                    stats.param_bytes += value.value.nbytes
    return stats


def fold_model(
    model: ir.Model,
    options: FoldOptions = FoldOptions(),
    progress: Callable[[int, int], None] | None = None,
) -> list[Entry]:
    """Fold every foldable affine in ``model`` in place.

    Args:
        model: The model; modified in place unless ``options.dry_run``.
        options: What may be folded.
        progress: Called with ``(done, total)`` chains as work proceeds.

    Returns:
        One entry per candidate, in graph order.
    """
    names = {v.name for c, _ in containers(model) for v in _values(c) if v.name}
    work: list[_Folder] = []
    for container, label in containers(model):
        opset = (
            container.opset_imports.get("")
            if isinstance(container, ir.Function)
            else model.opset_imports.get("")
        )
        opset = opset or model.opset_imports.get("ai.onnx") or 1
        work.append(_Folder(container, label, opset, model.ir_version, names, options))
    try:
        plans = [(folder, folder.chains()) for folder in work]
        total = sum(len(chains) for _, chains in plans)
        done = 0
        entries: list[Entry] = []
        for folder, chains in plans:
            for chain in chains:
                entries.extend(folder.fold_chain(chain))
                folder.consts.drop_large()
                done += 1
                if progress is not None:
                    progress(done, total)
            entries.extend(folder.lone_norm_entries())
    finally:
        for folder in work:
            folder.consts.close()
    return entries


def _values(container: Container) -> Iterator[ir.Value]:
    yield from container.inputs
    if isinstance(container, ir.Graph):
        yield from container.initializers.values()
    for node in container:
        yield from (v for v in node.outputs)


class _Folder:
    """Folds the chains of one graph or function."""

    def __init__(
        self,
        container: Container,
        label: str,
        opset: int,
        ir_version: int,
        names: set[str],
        options: FoldOptions,
    ) -> None:
        self.container = container
        self.label = label
        self.opset = opset
        self.ir_version = ir_version
        self.names = names
        self.options = options
        self.consts = ConstantResolver(opset, ir_version, keep_open=True)
        self.reported: set[int] = set()
        self.is_main = label == ""
        self._wanted_names: list[tuple[ir.Value, str]] = []
        self.too_new: list[ir.Node] = []
        self._linears: dict[int, tuple[ir.Node, _Linear | str]] = {}

    # ----------------------------------------------------------------- finding chains
    def _link(self, node: ir.Node) -> _Link | None:
        if node.domain not in ("", "ai.onnx") or not node.outputs:
            return None
        if self.opset > KNOWN_OPSET and node.op_type in NORM_OPS | ELEMENTWISE_OPS:
            self.too_new.append(node)
            return None
        op = node.op_type
        if op == "BatchNormalization" and node.inputs and node.inputs[0] is not None:
            return _Link(node, 0, "bn")
        if op in NORM_TAIL_OPS and self.options.norm_affine and len(node.inputs) >= 2:
            return _Link(node, 0, "norm")
        if op in ELEMENTWISE_OPS and len(node.inputs) == 2 and None not in node.inputs:
            const = [self.consts.try_resolve(v) is not None for v in node.inputs]
            if const == [False, True]:
                return _Link(node, 0, "elementwise")
            if const == [True, False] and op != "Div":
                if op == "Add" and self._is_matmul_bias(node, 1):
                    return None
                return _Link(node, 1, "elementwise")
            if const == [False, True] and op == "Add" and self._is_matmul_bias(node, 0):
                return None
        return None

    def _is_matmul_bias(self, add: ir.Node, data_index: int) -> bool:
        data = add.inputs[data_index]
        producer = data.producer() if data is not None else None
        if producer is None or producer.op_type != "MatMul":
            return False
        lin = self._linear(producer)
        return isinstance(lin, _Linear) and lin.bias_node is add

    def chains(self) -> list[list[_Link]]:
        """The maximal chains of affine nodes, in graph order."""
        links: dict[int, _Link] = {}
        order: list[_Link] = []
        for node in self.container:
            link = self._link(node)
            if link is not None and not (
                link.kind == "elementwise" and self._is_matmul_bias(node, link.data_index)
            ):
                links[id(node)] = link
                order.append(link)
        nxt: dict[int, _Link] = {}
        has_prev: set[int] = set()
        for link in order:
            if link.kind == "norm":
                continue
            prev = link.data.producer()
            if prev is not None and id(prev) in links and _exclusive(link.data, link.node):
                nxt[id(prev)] = link
                has_prev.add(id(link.node))
        result = []
        for link in order:
            if id(link.node) in has_prev:
                continue
            chain = [link]
            while id(chain[-1].node) in nxt:
                chain.append(nxt[id(chain[-1].node)])
            result.append(chain)
        return result

    # ----------------------------------------------------------------- linear ops
    def _const(self, value: ir.Value | None, what: str, op: ir.Node) -> np.ndarray:
        try:
            return self.consts.resolve(value)
        except NotConstant as exc:
            raise _Refused(f"the {what} of {_label(op)} is not constant: {exc}") from None

    def _linear(self, node: ir.Node) -> _Linear | str:
        """The linear op's reading, cached within a chain until its first rewrite.

        Every rewrite starts with :meth:`_set_input` or :meth:`_insert_bias`, which empty the
        cache; :meth:`fold_chain` empties it too."""
        hit = self._linears.get(id(node))
        if hit is not None and hit[0] is node:
            return hit[1]
        try:
            found: _Linear | str = self._read_linear(node)
        except _Refused as exc:
            found = exc.reason
        self._linears[id(node)] = (node, found)
        return found

    def _read_linear(self, node: ir.Node) -> _Linear:
        op = node.op_type
        if node.domain not in ("", "ai.onnx") or op not in LINEAR_OPS:
            raise _Refused(f"{_label(node)} is not a linear op normfuse folds into")
        if len(node.inputs) < 2 or node.inputs[1] is None:
            raise _Refused(f"{_label(node)} has no weight input")
        if op in ("Conv", "ConvTranspose"):
            return self._read_conv(node)
        if op == "Gemm":
            return self._read_gemm(node)
        return self._read_matmul(node)

    def _weight(self, value: ir.Value | None, what: str, op: ir.Node) -> algebra.WeightArray:
        try:
            return self.consts.resolve_weight(value)
        except NotConstant as exc:
            raise _Refused(f"the {what} of {_label(op)} is not constant: {exc}") from None

    def _read_conv(self, node: ir.Node) -> _Linear:
        w = self._weight(node.inputs[1], "weight", node)
        bias_in = node.inputs[2] if len(node.inputs) > 2 else None
        b = None if bias_in is None else self._const(bias_in, "bias", node)
        groups = _int(node, "group", 1)
        if w.ndim < 3:
            raise _Refused(f"{_label(node)} has a weight of rank {w.ndim}")
        _check_float(w, node)
        transpose = node.op_type == "ConvTranspose"
        kind: algebra.LinearKind = "conv_transpose" if transpose else "conv"
        lin = LinearWeights(kind, w, b, groups)
        spatial = w.ndim - 2
        pads = _ints(node, "pads", [0] * 2 * spatial)
        auto_pad = _attr(node, "auto_pad", "NOTSET")
        kernel = list(w.shape[2:])
        dil = _ints(node, "dilations", [1] * spatial)
        strides = _ints(node, "strides", [1] * spatial)
        pointwise = all((k - 1) * d + 1 == 1 for k, d in zip(kernel, dil, strict=False))
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads_input = not pointwise
        elif auto_pad == "VALID":
            pads_input = False
        else:
            pads_input = any(p != 0 for p in pads)
        if transpose:
            out_pad = _ints(node, "output_padding", [0] * spatial)
            # Each output position of a transposed conv sums a position-dependent number of
            # taps, so a shift on its input is exact only for a pointwise, unstrided one.
            pads_input = not (
                pointwise and all(s == 1 for s in strides) and not any(pads) and not any(out_pad)
            )
        return _Linear(
            node=node,
            weights=lin,
            out=node.outputs[0],
            out_rank=w.ndim,
            out_axis=1,
            in_axis=1,
            in_refusal=None,
            pads_input=pads_input,
        )

    def _read_gemm(self, node: ir.Node) -> _Linear:
        w = self._weight(node.inputs[1], "weight (B)", node)
        _check_float(w, node)
        c_in = node.inputs[2] if len(node.inputs) > 2 else None
        c = None if c_in is None else self._const(c_in, "bias (C)", node)
        alpha = _float(node, "alpha", 1.0)
        beta = _float(node, "beta", 1.0)
        trans_a = _int(node, "transA", 0)
        trans_b = _int(node, "transB", 0)
        weight = np.asarray(w, dtype=np.float64) * alpha if alpha != 1.0 else w
        bias = None if c is None else (c.astype(np.float64) * beta if beta != 1.0 else c)
        lin = LinearWeights("dense" if trans_b else "dense_t", weight, bias, 1, w.dtype)
        refusal = (
            f"{_label(node)} has transA=1, so its input's axis 1 is the batch axis"
            if trans_a
            else None
        )
        return _Linear(node, lin, node.outputs[0], 2, 1, None if trans_a else 1, refusal, False)

    def _read_matmul(self, node: ir.Node) -> _Linear:
        x, wv = node.inputs[0], node.inputs[1]
        try:
            w = self.consts.resolve_weight(wv)
        except NotConstant as exc:
            raise _Refused(
                f"the right operand of {_label(node)} is not constant ({exc}), so it is not a "
                "layer with weights"
            ) from None
        _check_float(w, node)
        if w.ndim != 2:
            raise _Refused(f"{_label(node)} has a weight of rank {w.ndim}; only 2-D weights fold")
        x_rank = _rank(x)
        out_rank = None if x_rank is None else (max(x_rank, 2) if x_rank >= 2 else 1)
        out_axis = -1 if out_rank is None else out_rank - 1
        in_axis = -1 if x_rank is None else x_rank - 1
        lin = LinearWeights("dense_t", w, None)
        found = _Linear(node, lin, node.outputs[0], out_rank, out_axis, in_axis, None, False)
        out = node.outputs[0]
        consumers = _uses(out)
        if len(consumers) == 1 and not out.is_graph_output():
            add = consumers[0]
            if add.op_type == "Add" and add.domain in ("", "ai.onnx") and len(add.inputs) == 2:
                other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
                if add.inputs[0] is not add.inputs[1]:
                    b = self.consts.try_resolve(other)
                    n = w.shape[1]
                    if b is not None and b.dtype == w.dtype and _last_axis_vector(b, n, out_rank):
                        found.weights = LinearWeights(
                            "dense_t", w, np.broadcast_to(b.reshape(-1), (n,))
                        )
                        found.bias_node = add
                        found.bias_shape = tuple(b.shape)
                        found.out = add.outputs[0]
        return found

    # ----------------------------------------------------------------- affine maps
    def _affine(self, link: _Link, rank: int | None) -> Affine:
        if link.kind == "bn":
            return self._bn_affine(link.node, rank)
        if link.kind == "norm":
            return self._norm_affine(link.node, rank)
        return self._elementwise_affine(link, rank)

    def _bn_affine(self, node: ir.Node, rank: int | None) -> Affine:
        version = node.version or self.opset
        if version >= 14 and _int(node, "training_mode", 0):
            raise _Refused(
                "training_mode=1: the node normalises with batch statistics, which cannot fold",
                "export the model in eval mode (model.eval()) or set training_mode=0",
            )
        extra = [o for o in node.outputs[1:] if o is not None]
        if version < 14 and any(o.name for o in extra):
            raise _Refused(
                f"it declares training outputs ({', '.join(o.name or '?' for o in extra if o.name)}); "
                f"BatchNormalization-{version} then runs in training mode"
            )
        used = [o.name or "?" for o in extra if o.uses() or o.is_graph_output()]
        if used:
            raise _Refused(f"its extra outputs are in use ({', '.join(used)})")
        params = []
        for i, what in enumerate(("scale", "bias", "mean", "var")):
            value = node.inputs[i + 1] if len(node.inputs) > i + 1 else None
            params.append(self._const(value, what, node))
        eps = _float(node, "epsilon", 1e-5)
        if version < 9 and _int(node, "spatial", 1) == 0:
            params = [_per_channel(p, node) for p in params]
        gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        sizes = {"scale": gamma.size, "bias": beta.size, "mean": mean.size, "var": var.size}
        if len(set(sizes.values())) != 1:
            raise _Refused(
                "its parameters disagree in size ("
                + ", ".join(f"{k} {v}" for k, v in sizes.items())
                + "); the model is malformed"
            )
        for name, p in (("scale", gamma), ("bias", beta), ("mean", mean), ("var", var)):
            if not np.all(np.isfinite(p)):
                raise _Refused(f"its {name} contains NaN or Inf; folding would spread it")
        if not np.isfinite(eps) or eps < 0:
            raise _Refused(f"its epsilon is {eps}; folding needs a finite, non-negative epsilon")
        if np.any(var < 0):
            raise _Refused(
                f"its running variance has negative values (min {var.min():.3g}); "
                "the statistics are corrupt"
            )
        if np.any(var + eps <= 0):
            raise _Refused("variance + epsilon is 0 for some channel; the output is not finite")
        return Affine.from_batchnorm(gamma, beta, mean, var, eps, axis=1)

    def _norm_affine(self, node: ir.Node, rank: int | None) -> Affine:
        op = node.op_type
        gamma = self._const(node.inputs[1], "scale", node).astype(np.float64)
        b_in = node.inputs[2] if len(node.inputs) > 2 and op != "RMSNormalization" else None
        beta = (
            np.zeros_like(gamma)
            if b_in is None
            else self._const(b_in, "bias", node).astype(np.float64)
        )
        if op in ("LayerNormalization", "RMSNormalization"):
            if gamma.ndim > 1 and any(d != 1 for d in gamma.shape[:-1]):
                raise _Refused(
                    f"its scale of shape {gamma.shape} varies over several axes, not one channel axis"
                )
            beta = np.broadcast_to(beta, gamma.shape)
            return Affine(gamma.reshape(-1), beta.reshape(-1), -1 if rank is None else rank - 1)
        if op == "GroupNormalization" and (node.version or self.opset) < 21:
            groups = _int(node, "num_groups", 1)
            x = node.inputs[0]
            channels = None if x is None or x.shape is None or x.shape.rank() < 2 else x.shape[1]
            if not isinstance(channels, int):
                raise _Refused(
                    "GroupNormalization-18 has per-group scale and the channel count is unknown"
                )
            gamma = np.repeat(gamma.reshape(groups), channels // groups)
            beta = np.repeat(beta.reshape(groups), channels // groups)
        return Affine(gamma.reshape(-1), beta.reshape(-1), 1)

    def _elementwise_affine(self, link: _Link, rank: int | None) -> Affine:
        node = link.node
        op = node.op_type
        const_index = 1 - link.data_index
        c = self.consts.resolve(node.inputs[const_index])
        dtype = link.data.dtype
        if (dtype is not None and dtype not in _FLOAT_TYPES) or (
            not np.issubdtype(np.dtype(c.dtype), np.floating) and c.dtype != ml_dtypes.bfloat16
        ):
            raise _Refused(f"{op} works on {dtype or c.dtype} values, not floating point")
        if rank is None:
            if c.ndim > 1 and any(d != 1 for d in c.shape[:-1]):
                raise _Refused(
                    f"the rank of its input is unknown, so the constant of shape {c.shape} "
                    "cannot be placed on a channel axis"
                )
            rank_eff, c = max(c.ndim, 1), c.reshape(-1) if c.ndim else c
        else:
            rank_eff = rank
        if c.ndim > rank_eff:
            raise _Refused(
                f"its constant of shape {c.shape} has more axes than its rank-{rank_eff} input, "
                "so broadcasting changes the output shape"
            )
        shape = (1,) * (rank_eff - c.ndim) + tuple(c.shape)
        varying = [i for i, d in enumerate(shape) if d != 1]
        if len(varying) > 1:
            raise _Refused(
                f"its constant of shape {c.shape} varies along axes {varying} of the output, "
                "not along one channel axis"
            )
        axis = varying[0] if varying else (rank_eff - 1 if rank is not None else -1)
        if rank is None and varying:
            axis = -1
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
            raise _Refused("it divides by a constant that contains zeros")
        return Affine(1.0 / v, np.zeros_like(v), axis)

    # ----------------------------------------------------------------- the decision
    def fold_chain(self, chain: list[_Link]) -> list[Entry]:
        """Fold what can fold in one chain; one entry per reportable node."""
        self._linears.clear()
        rank = self._chain_rank(chain)
        warnings = [self._warnings(link) for link in chain]
        names = [node_name(link.node) for link in chain]
        reportable = self._reportable(chain)
        affines: list[Affine | _Refused] = []
        for link in chain:
            try:
                affines.append(self._affine(link, rank))
            except _Refused as exc:
                affines.append(exc)
            except NotConstant as exc:
                affines.append(_Refused(str(exc)))
        done: dict[int, tuple[str, str]] = {}  # chain index -> (direction, target)
        k, after_reason = self._fold_forward(chain, affines, done)
        suffix, before_reason, before_fix = self._fold_backward(chain, affines, k, rank, done)
        entries = []
        for i, link in enumerate(chain):
            if not reportable[i]:
                continue
            self.reported.add(id(link.node))
            common: dict[str, Any] = {
                "node": names[i],
                "op_type": link.node.op_type,
                "graph": self.label.rstrip("/"),
            }
            if i in done:
                direction, target = done[i]
                status: Status = "foldable" if self.options.dry_run else "applied"
                entries.append(
                    Entry(
                        **common,
                        status=status,
                        target=target,
                        direction=direction,
                        warnings=warnings[i],
                    )
                )
                continue
            own = affines[i]
            if isinstance(own, _Refused):
                reason, fix = own.reason, own.fix
            else:
                parts = []
                if after_reason:
                    parts.append(f"cannot fold into its producer: {after_reason}")
                if before_reason and i in suffix:
                    parts.append(f"cannot fold into its consumers: {before_reason}")
                elif i not in suffix:
                    parts.append("a node between it and the next linear op cannot fold")
                reason = "; ".join(parts)
                fix = before_fix if i in suffix else None
            entries.append(Entry(**common, status="skipped", reason=reason, fix=fix))
        return entries

    def _reportable(self, chain: list[_Link]) -> list[bool]:
        """BN and norm nodes always; Mul/Add/... when the chain touches a foldable linear op."""
        if any(link.kind != "elementwise" for link in chain):
            return [True] * len(chain)
        head_input = chain[0].data.producer()
        touches = head_input is not None and isinstance(self._producer_linear(head_input), _Linear)
        touches = touches or any(
            isinstance(self._linear(u), _Linear)
            for u in _uses(chain[-1].out)
            if u.op_type in LINEAR_OPS
        )
        return [touches] * len(chain)

    def _fold_forward(
        self, chain: list[_Link], affines: list[Affine | _Refused], done: dict[int, tuple[str, str]]
    ) -> tuple[int, str | None]:
        """Fold the longest valid prefix into the producing linear op; (its length, why not more)."""
        head = chain[0]
        if head.kind == "norm":
            return 0, None
        producer = head.data.producer()
        if producer is None:
            return 0, f"its input '{head.data.name}' is a graph input, not a linear op's output"
        if producer.graph is not head.node.graph:
            return 0, "its input comes from an outer graph"
        found = self._producer_linear(producer)
        if isinstance(found, str):
            return 0, found
        if not _exclusive(found.out, head.node):
            return 0, (
                f"the output of {found.label} also feeds {_others(found.out, head.node)}; "
                "folding would change what they see"
            )
        acc: Affine | None = None
        reason: str | None = None
        k = 0
        for a in affines:
            if isinstance(a, _Refused):
                break
            mismatch = _lines_up(a, found.out_axis, found.weights.out_channels, found.out_rank)
            if mismatch:
                reason = f"{mismatch} of {found.label}"
                break
            acc = a if acc is None else acc.then(a)
            k += 1
        if acc is None:
            return 0, reason
        try:
            self._apply_after(found, chain[:k], acc)
        except _Refused as exc:
            return 0, exc.reason
        done.update({i: ("after", found.label) for i in range(k)})
        return k, reason

    def _fold_backward(
        self,
        chain: list[_Link],
        affines: list[Affine | _Refused],
        k: int,
        rank: int | None,
        done: dict[int, tuple[str, str]],
    ) -> tuple[list[int], str | None, str | None]:
        """Fold the longest valid suffix of ``chain[k:]`` into the consumers.

        Returns:
            The suffix's chain indices, and why it did not fold (reason, fix) if it did not.
        """
        j = len(chain)
        axis: int | None = None
        while j > k:  # valid maps with one consistent channel axis
            a = affines[j - 1]
            if isinstance(a, _Refused) or (not a.is_scalar and axis is not None and a.axis != axis):
                break
            axis = axis if a.is_scalar else a.axis
            j -= 1
        suffix = list(range(j, len(chain)))
        if not suffix:
            return [], None, None
        links = [chain[i] for i in suffix]
        if not self.options.norm_affine and not any(link.kind == "bn" for link in links):
            consumers = _uses(links[-1].out)
            if consumers and all(isinstance(self._linear(c), _Linear) for c in consumers):
                names = ", ".join(_label(c) for c in consumers)
                fix = "pass --norm-affine (norm_affine=True)"
                return suffix, f"folding a Mul/Add chain into the following {names} is opt-in", fix
            return suffix, "nothing linear to fold into", None
        maps = [affines[i] for i in suffix]
        assert all(isinstance(a, Affine) for a in maps)  # the suffix is valid maps only
        acc = maps[0]
        for a in maps[1:]:
            acc = acc.then(a)  # type: ignore[union-attr, arg-type]
        try:
            target = self._apply_before(links, acc, rank)  # type: ignore[arg-type]
        except _Refused as exc:
            return suffix, exc.reason, exc.fix
        done.update({i: ("before", target) for i in suffix})
        return suffix, None, None

    def lone_norm_entries(self) -> list[Entry]:
        """Entries for normalization nodes no chain covered: opset too new, or opt-in folds."""
        entries = [
            Entry(
                node=node_name(node),
                op_type=node.op_type,
                status="skipped",
                graph=self.label.rstrip("/"),
                reason=f"opset {self.opset} is newer than normfuse knows ({KNOWN_OPSET}); "
                "its semantics may have changed",
                fix="upgrade normfuse (and onnx)",
            )
            for node in self.too_new
            if node.op_type in NORM_OPS
        ]
        for node in self.container:
            if (
                node.op_type in NORM_TAIL_OPS
                and node.domain in ("", "ai.onnx")
                and id(node) not in self.reported
                and self.options.dry_run
            ):
                entries.append(
                    Entry(
                        node=node_name(node),
                        op_type=node.op_type,
                        status="skipped",
                        graph=self.label.rstrip("/"),
                        reason="its statistics are per sample; only its gamma/beta tail can fold",
                        fix="pass --norm-affine to fold gamma/beta into the following linear ops",
                    )
                )
        return entries

    def _warnings(self, link: _Link) -> list[str]:
        try:
            return self._underflow_warnings(link)
        except _Refused:
            return []  # the node's own refusal says what is wrong

    def _underflow_warnings(self, link: _Link) -> list[str]:
        if link.kind != "bn":
            return []
        dtype = self._data_dtype(link.data)
        if dtype not in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            return []
        try:
            var = self.consts.resolve(link.node.inputs[4]).astype(np.float64)
        except NotConstant:
            return []
        eps = _float(link.node, "epsilon", 1e-5)
        tiny = float(ml_dtypes.finfo(dtype.numpy()).tiny)
        low = var + eps
        if np.any(low < tiny):
            return [
                f"variance + epsilon ({low.min():.3g}) is below {dtype.name.lower()}'s smallest "
                "normal number; the fold uses the exact float64 value"
            ]
        return []

    def _data_dtype(self, value: ir.Value) -> ir.DataType | None:
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

    def _chain_rank(self, chain: list[_Link]) -> int | None:
        head = chain[0]
        if head.kind != "norm":
            producer = head.data.producer()
            if producer is not None and producer.op_type in LINEAR_OPS | {"Add"}:
                found = self._producer_linear(producer)
                if isinstance(found, _Linear) and found.out_rank is not None:
                    return found.out_rank
        for link in chain:
            r = _rank(link.data)
            if r is not None:
                return r
        r = _rank(chain[-1].out)
        return r

    def _producer_linear(self, producer: ir.Node) -> _Linear | str:
        if producer.op_type == "Add" and producer.domain in ("", "ai.onnx"):
            for v in producer.inputs:
                mm = v.producer() if v is not None else None
                if mm is not None and mm.op_type == "MatMul":
                    found = self._linear(mm)
                    if isinstance(found, _Linear) and found.bias_node is producer:
                        return found
        if producer.op_type not in LINEAR_OPS or producer.domain not in ("", "ai.onnx"):
            return f"its input comes from {_label(producer)}, not a linear op"
        return self._linear(producer)

    # ----------------------------------------------------------------- rewriting
    def _apply_after(self, lin: _Linear, links: list[_Link], affine: Affine) -> None:
        folded = algebra.absorb_after(lin.weights, affine, defer=self._deferrable(lin))
        _check_range(folded, lin)
        if self.options.dry_run:
            return
        node = lin.node
        self._set_input(node, 1, self._weight_data(lin, folded))
        new_out = lin.out
        if node.op_type in ("Conv", "ConvTranspose"):
            self._set_input(node, 2, folded.bias, role="bias")
        elif node.op_type == "Gemm":
            self._set_input(node, 2, folded.bias, role="bias")
            _set_float_attr(node, "alpha", 1.0)
            _set_float_attr(node, "beta", 1.0)
        elif lin.bias_node is not None:
            add = lin.bias_node
            idx = 1 if add.inputs[0] is node.outputs[0] else 0
            self._set_input(
                add, idx, folded.bias.reshape(_bias_shape(lin, folded.bias)), role="bias"
            )
        elif np.any(folded.bias64 != 0):
            new_out = self._insert_bias(node, folded.bias)
        tail = links[-1].out
        name = tail.name
        tail.replace_all_uses_with(new_out, replace_graph_outputs=True)
        removed_inputs = [v for link in links for v in link.node.inputs if v is not None]
        self.container.remove([link.node for link in links], safe=True)
        tail_type, tail_shape = tail.type, tail.shape
        tail.name = None
        new_out.name = name
        new_out.type = tail_type or new_out.type
        new_out.shape = tail_shape or new_out.shape
        for v in removed_inputs:
            self._prune(v)
        self._restore_names()

    def _apply_before(self, links: list[_Link], affine: Affine, rank: int | None) -> str:
        """Fold into every consumer of the chain's output; returns the targets' labels."""
        tail = links[-1].out
        if tail.is_graph_output():
            raise _Refused(f"its output '{tail.name}' is a graph output")
        uses = list(tail.uses())
        if not uses:
            raise _Refused("its output is unused")
        targets: list[tuple[_Linear, int]] = []
        type_only: list[Any] = []  # onnx_ir Usage pairs
        for use in uses:
            consumer = use.node
            if consumer.op_type == "CastLike" and use.idx == 1 and consumer.domain == "":
                type_only.append(use)  # reads only the dtype, which the fold keeps
                continue
            if consumer.graph is not links[-1].node.graph:
                raise _Refused(f"its output is used in a subgraph ({_label(consumer)})")
            if consumer.op_type not in LINEAR_OPS:
                raise _Refused(
                    f"its output also feeds {_label(consumer)}, which is not a linear op"
                )
            found = self._linear(consumer)
            if isinstance(found, str):
                raise _Refused(found)
            if use.idx != 0:
                raise _Refused(f"it feeds {found.label} as a weight, not as its data input")
            if found.in_axis is None:
                raise _Refused(found.in_refusal or f"{found.label} cannot take it")
            in_rank = _rank(tail) if _rank(tail) is not None else rank
            if in_rank is None and found.node.op_type in ("Conv", "ConvTranspose"):
                in_rank = found.out_rank
            if found.node.op_type == "Gemm":
                in_rank = 2
            mismatch = _lines_up(affine, found.in_axis, found.weights.in_channels, in_rank, "input")
            if mismatch:
                raise _Refused(f"{mismatch} of {found.label}")
            if found.pads_input and affine.has_shift:
                if found.node.op_type == "ConvTranspose":
                    raise _Refused(
                        f"{found.label} is not pointwise, so a shift on its input does not fold "
                        "exactly"
                    )
                raise _Refused(
                    f"{found.label} pads its input with zeros: folding the shift would change "
                    "the borders"
                )
            targets.append((found, use.idx))
        if not targets:
            raise _Refused("its output is only used for its type (CastLike)")
        foldeds = []
        for found, _ in targets:
            folded = algebra.absorb_before(found.weights, affine, defer=self._deferrable(found))
            _check_range(folded, found)
            foldeds.append(folded)
        label = ", ".join(found.label for found, _ in targets)
        if self.options.dry_run:
            return label
        head = links[0]
        if head.kind == "norm":
            source = head.out
            self._neutralise_norm(head.node)
            removed = links[1:]
        else:
            source = head.data
            removed = links
        for (found, idx), folded in zip(targets, foldeds, strict=True):
            node = found.node
            self._set_input(node, 1, self._weight_data(found, folded))
            if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
                self._set_input(node, 2, folded.bias, role="bias")
                if node.op_type == "Gemm":
                    _set_float_attr(node, "alpha", 1.0)
                    _set_float_attr(node, "beta", 1.0)
            elif found.bias_node is not None:
                add = found.bias_node
                bidx = 1 if add.inputs[0] is node.outputs[0] else 0
                self._set_input(
                    add, bidx, folded.bias.reshape(_bias_shape(found, folded.bias)), role="bias"
                )
            elif np.any(folded.bias64 != 0):
                self._insert_bias(node, folded.bias)
            node.replace_input_with(idx, source)
        for use in type_only:
            use.node.replace_input_with(use.idx, source)
        if removed:
            removed_inputs = [v for link in removed for v in link.node.inputs if v is not None]
            self.container.remove([link.node for link in removed], safe=True)
            for v in removed_inputs:
                self._prune(v)
        self._restore_names()
        return label

    def _deferrable(self, lin: _Linear) -> bool:
        """Fold this weight lazily: it is file-backed, large, and used as stored (no Gemm alpha)."""
        source = lin.node.inputs[1].const_value if lin.node.inputs[1] is not None else None
        return (
            isinstance(source, ir.ExternalTensor)
            and source.nbytes >= LARGE_BYTES
            and lin.weights.weight.dtype == lin.weights.out_dtype
        )

    def _weight_data(self, lin: _Linear, folded: algebra.Folded) -> np.ndarray | ir.LazyTensor:
        """The folded weight, or a tensor that computes it from the file when it is written."""
        if folded.weight is not None:
            return folded.weight
        weight = lin.node.inputs[1]
        source = weight.const_value if weight is not None else None
        factor, dtype = folded.factor, folded.dtype
        assert isinstance(source, ir.ExternalTensor) and factor is not None and dtype is not None

        label = lin.label

        def compute() -> ir.Tensor:
            values = read_tensor(source)  # a fresh array, unless the tensor had to map it
            own = values.flags.writeable and values.dtype == dtype
            result = algebra.scale_weight(values, factor, dtype, in_place=own)
            # an element that is not finite overflowed unless it was stored so (the stored
            # weight is read again when the product overwrote it; this path is the rare one)
            if not algebra.all_finite(result) and algebra.overflowed(
                read_tensor(source) if own else values, result
            ):
                raise InputError(
                    f"the folded weight of {label} overflows {dtype}; nothing was written",
                    "check the BatchNorm statistics of that layer",
                )
            return ir.Tensor(result)

        return ir.LazyTensor(
            compute, dtype=ir.DataType.from_numpy(dtype), shape=ir.Shape(source.shape.numpy())
        )

    def _neutralise_norm(self, node: ir.Node) -> None:
        gamma = self.consts.resolve(node.inputs[1])
        self._set_input(node, 1, np.ones_like(gamma))
        if (
            len(node.inputs) > 2
            and node.inputs[2] is not None
            and node.op_type != "RMSNormalization"
        ):
            beta = self.consts.resolve(node.inputs[2])
            self._set_input(node, 2, np.zeros_like(beta), role="bias")

    def _fresh(self, base: str) -> str:
        name = base
        i = 1
        while name in self.names:
            name = f"{base}_{i}"
            i += 1
        self.names.add(name)
        return name

    def _set_input(
        self, node: ir.Node, index: int, array: np.ndarray | ir.LazyTensor, role: str = "weight"
    ) -> None:
        """Give ``node`` a new constant input, in place when nothing else uses the old one."""
        self._linears.clear()
        old = node.inputs[index] if index < len(node.inputs) else None
        shape = tuple(array.shape.numpy()) if isinstance(array, ir.LazyTensor) else array.shape
        if (
            old is not None
            and old.is_initializer()
            and not self.consts.is_overridable_input(old)
            and not old.is_graph_output()
            and _exclusive(old, node)
        ):
            old.const_value = _as_tensor(array, old.name)
            if old.shape is not None and tuple(old.shape) != shape:
                old.shape = ir.Shape(shape)
            self.consts.forget(old)
            return
        base = f"{old.name}_folded" if old is not None and old.name else f"{node_name(node)}_{role}"
        value = self._new_const(self._fresh(base), array, before=node)
        if old is not None and old.name:
            self._wanted_names.append((value, old.name))
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        node.replace_input_with(index, value)
        if old is not None:
            self._prune(old)

    def _new_const(self, name: str, array: np.ndarray | ir.LazyTensor, before: ir.Node) -> ir.Value:
        tensor = _as_tensor(array, name)
        shape = tuple(tensor.shape.numpy())
        if isinstance(self.container, ir.Graph):
            # typed like onnx_ir types initializers on load, so a second fold changes nothing
            value = ir.Value(
                name=name,
                const_value=tensor,
                type=ir.TensorType(tensor.dtype),
                shape=ir.Shape(shape),
            )
            self.container.register_initializer(value)
            if self.ir_version < 4 and self.is_main:
                self.container.inputs.append(value)
            return value
        const = ir.Node(
            "", "Constant", [], [ir.AttrTensor("value", tensor)], name=self._fresh(f"{name}_const")
        )
        const.outputs[0].name = name
        const.outputs[0].shape = ir.Shape(shape)
        const.outputs[0].type = ir.TensorType(tensor.dtype)
        self.container.insert_before(before, const)
        return const.outputs[0]

    def _insert_bias(self, node: ir.Node, bias: np.ndarray) -> ir.Value:
        """Add ``bias`` after ``node``'s output; the sum takes over the output's name and uses."""
        self._linears.clear()
        out = node.outputs[0]
        const = self._new_const(self._fresh(f"{node_name(node)}_bias"), bias, before=node)
        add = ir.Node("", "Add", [out, const], name=self._fresh(f"{node_name(node)}_bias_add"))
        take_over(out, add.outputs[0], {id(add)}, self._fresh(f"{out.name}_matmul"))
        self.container.insert_after(node, add)
        return add.outputs[0]

    def _prune(self, value: ir.Value) -> None:
        """Remove what became dead: unused initializers and constant-producing nodes."""
        stack = [value]
        while stack:
            v = stack.pop()
            if v is None or list(v.uses()) or v.is_graph_output():
                continue
            if v.is_graph_input():
                if self.ir_version < 4 and v.is_initializer() and v.graph is not None:
                    v.graph.inputs.remove(v)  # IR < 4 lists every initializer as an input
                else:
                    continue
            if v.is_initializer():
                graph = v.graph
                if graph is not None and v.name is not None and v.name in graph.initializers:
                    graph.initializers.pop(v.name)
                    self.names.discard(v.name)
                self.consts.forget(v)
                continue
            producer = v.producer()
            if producer is None or producer.graph is None:
                continue
            if any(list(o.uses()) or o.is_graph_output() for o in producer.outputs):
                continue
            inputs = [i for i in producer.inputs if i is not None]
            producer.graph.remove(producer, safe=True)
            self.names.difference_update(o.name for o in producer.outputs if o.name)
            stack.extend(inputs)

    def _restore_names(self) -> None:
        """Give new tensors back the names of the tensors they replaced, once those are gone."""
        for value, wanted in self._wanted_names:
            if wanted not in self.names and value.name != wanted:
                self.names.discard(value.name or "")
                value.name = wanted
                self.names.add(wanted)
        self._wanted_names.clear()


def _as_tensor(data: np.ndarray | ir.LazyTensor, name: str | None) -> ir.TensorProtocol:
    if isinstance(data, ir.LazyTensor):
        data.name = name
        return data
    return ir.Tensor(data, name=name)


def _check_float(w: algebra.WeightArray, node: ir.Node) -> None:
    if not (np.issubdtype(w.dtype, np.floating) or w.dtype == ml_dtypes.bfloat16):
        raise _Refused(f"{_label(node)} has {w.dtype} weights; only floating-point weights fold")


def _per_channel(p: np.ndarray, node: ir.Node) -> np.ndarray:
    """BatchNormalization-7 with spatial=0 has per-activation parameters; fold only if constant."""
    if p.ndim <= 1:
        return p
    rows = p.reshape(p.shape[0], -1)
    if np.all(rows == rows[:, :1]):
        return rows[:, 0]
    raise _Refused(
        "spatial=0 with statistics that vary within a channel; the map is not per-channel"
    )


def _last_axis_vector(b: np.ndarray, n: int, out_rank: int | None) -> bool:
    if b.size not in (1, n):
        return False
    if b.ndim > 1 and any(d != 1 for d in b.shape[:-1]):
        return False
    limit = out_rank if out_rank is not None else 1
    return b.ndim <= max(limit, 1)


def _bias_shape(lin: _Linear, bias: np.ndarray) -> tuple[int, ...]:
    shape = lin.bias_shape
    if shape is not None and int(np.prod(shape)) == bias.size:
        return shape
    return (bias.size,)


def _lines_up(
    affine: Affine, axis: int, channels: int, rank: int | None, side: str = "output"
) -> str | None:
    """Why ``affine`` does not sit on the channel axis of a linear op's output/input, or None."""
    if affine.is_scalar:
        return None
    a = affine.axis
    want = axis
    if rank is not None:
        a = a % rank if a < 0 else a
        want = want % rank if want < 0 else want
    elif (a < 0) != (want < 0):
        return f"the channel axis is unknown (rank unknown), so it cannot be matched to the {side} channels"
    if a != want:
        where = "the last axis" if rank is not None and a == rank - 1 else f"axis {a}"
        return f"it acts along {where} of a rank-{rank} tensor, not the {side} channel axis {want}"
    if affine.channels != channels:
        return f"it has {affine.channels} channels but there are {channels} {side} channels"
    return None


def _check_range(folded: algebra.Folded, lin: _Linear) -> None:
    checks = (
        ("weight", folded.weight_peak, folded.dtype),
        (
            "bias",
            float(np.abs(folded.bias64).max()) if folded.bias64.size else 0.0,
            folded.bias.dtype,
        ),
    )
    for what, peak, dtype in checks:
        if dtype is not None and peak > algebra.dtype_max(dtype):
            raise _Refused(
                f"the folded {what} of {lin.label} would reach {peak:.3g}, beyond the range of "
                f"{dtype} ({algebra.dtype_max(dtype):.3g})"
            )


def _set_float_attr(node: ir.Node, name: str, value: float) -> None:
    current = node.attributes.get(name)
    if current is not None and float(current.value) != value:
        node.attributes[name] = ir.AttrFloat32(name, value)
