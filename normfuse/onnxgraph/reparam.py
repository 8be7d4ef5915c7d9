"""Structural reparameterization: merge parallel and sequential linear branches into one op.

Runs after the BN folds (docs/reparam.md). A *block* is a sum (``Add``/``Sub`` trees whose inner
results feed only the next node, ``Sum``, per-channel scales of sub-sums) with two or more terms
that are linear maps of one tensor ``x``: ``Conv(x)`` (+ a per-channel affine), a 1x1->kxk or
kxk->1x1 sequence, ``AveragePool(x)`` counting its padding, ``x`` or a per-channel affine of it
(an identity kernel per group), ``Gemm``/``MatMul`` on ``x``, and constant per-channel terms.
They become one Conv (or Gemm/MatMul) when strides, dilations and groups agree and the paddings
put every tap on the same input positions (:mod:`normfuse.core.branches`: float64, one rounding).
A merge that is not exact, or costs more multiply-adds than its branches, is refused; terms that
do not merge stay and are added to the merged op. Sequences outside sums merge likewise. Every
block gets one report entry. Imports: numpy, onnx_ir, :mod:`normfuse.core`, ``const``,
``graph`` and ``edit``.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx_ir as ir

from normfuse.core import branches
from normfuse.core.branches import Incompatible, Kernel, as_vector, then_affine
from normfuse.core.report import Entry
from normfuse.onnxgraph.const import ConstantResolver, NotConstant
from normfuse.onnxgraph.edit import Editor, all_graphs, all_names, opset_of
from normfuse.onnxgraph.edit import batchnorm_not_inference as not_inference
from normfuse.onnxgraph.graph import Refused, get_attr, int_attr, ints_attr, label_of, node_name

__all__ = ["reparam_model"]

logger = logging.getLogger(__name__)

_SUMS = ("Add", "Sum", "Sub")


@dataclasses.dataclass
class _Branch:
    """One term of a sum, read as a linear map of ``source``."""

    source: ir.Value
    label: str
    nodes: list[ir.Node]  # removed when merged
    kernel: Kernel | None = None  # conv branches
    dense: tuple[np.ndarray, np.ndarray] | None = None  # (W (in, out), b) of Gemm/MatMul
    scale: np.ndarray | None = None  # identity: per-channel scale/shift (1-D or scalar)
    shift: np.ndarray | None = None
    pool: ir.Node | None = None  # AveragePool, as a kernel once the channels are known
    cost: int = 0
    dtype: object = None
    gemm: bool = False
    rank: int | None = None  # the rank assumed to read per-channel constants of the trail
    coef: np.ndarray | None = None  # the term's per-channel coefficient in the sum (None: 1)


def reparam_model(model: ir.Model, *, dry_run: bool = False) -> list[Entry]:
    """Merge the branches of every block of ``model`` in place (see the module docstring).

    Args:
        model: The model; unchanged when ``dry_run``.
        dry_run: Decide and report (status ``foldable``), change nothing.

    Returns:
        One entry per block: applied with the branches merged, or skipped with the reason.
    """
    names = all_names(model)
    entries: list[Entry] = []
    for graph, label in all_graphs(model):
        consts = ConstantResolver(opset_of(model), model.ir_version)
        try:
            entries.extend(_Merger(graph, label, consts, names, dry_run).run())
        finally:
            consts.close()
    return entries


class _Merger:
    def __init__(self, graph: ir.Graph, label: str, consts, names: set[str], dry_run: bool) -> None:
        self.graph = graph
        self.label = label
        self.consts = consts
        self.dry_run = dry_run
        self.editor = Editor(graph, names, 1)
        self.tree_rank: int | None = None  # the rank assumed for a Mul expanded in a tree
        self.keep: list[object] = []  # removed nodes and values: their ids stay unique in the cache

    def run(self) -> list[Entry]:
        entries: list[Entry] = []
        roots = [n for n in self.graph if self._is_sum(n) and not self._inner(n)]
        for root in roots:
            if root.graph is not self.graph:
                continue
            entry = self._block(root)
            self.consts.drop_large()
            if entry is not None:
                entries.append(entry)
        for node in list(self.graph):
            if node.graph is self.graph and node.op_type == "Conv" and node.domain == "":
                entry = self._sequence(node)
                if entry is not None:
                    entries.append(entry)
        return entries

    @staticmethod
    def _is_sum(node: ir.Node) -> bool:
        return (
            node.domain in ("", "ai.onnx")
            and node.op_type in _SUMS
            and len(node.outputs) == 1
            and (node.op_type != "Sub" or len(node.inputs) == 2)
        )

    def _only_user(self, value: ir.Value) -> ir.Node | None:
        uses = list(value.uses())
        if len(uses) != 1 or value.is_graph_output() or uses[0].node.graph is not self.graph:
            return None
        return uses[0].node

    def _scale(self, node: ir.Node) -> tuple[np.ndarray, ir.Value, int] | None:
        """``(c, x, rank)`` of ``Mul(x, c)`` with ``c`` a per-channel constant."""
        if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            return None
        out = node.outputs[0]
        rank = out.shape.rank() if out.shape is not None and out.shape.rank() else 4
        for i in (0, 1):
            c = self._per_channel(node.inputs[1 - i], rank)
            x = node.inputs[i]
            if c is not None and x is not None and self.consts.try_resolve(x) is None:
                return c, x, rank
        return None

    def _inner(self, node: ir.Node) -> bool:
        """The sum feeds only another sum (maybe through a per-channel scale): it is part of
        that one's tree."""
        user = self._only_user(node.outputs[0])
        if user is None:
            return False
        if self._is_sum(user):
            return True
        scaled = self._scale(user)
        if scaled is None or scaled[1] is not node.outputs[0]:
            return False
        after = self._only_user(user.outputs[0])
        return after is not None and self._is_sum(after)

    def _tree(self, root: ir.Node, coef: np.ndarray | None = None):
        """The nodes of the sum tree under ``root`` and its terms ``(value, coefficient)``:
        ``Sub`` negates its second term, ``Mul`` by a per-channel constant scales a sub-sum
        (FastViT's RepMixer: ``x + s * (mixer(x) - norm(x))``); ``None`` is 1."""
        nodes, leaves = [root], []
        for i, v in enumerate(root.inputs):
            if v is None:
                continue
            c = coef
            if root.op_type == "Sub" and i == 1:
                c = -1.0 * (np.asarray(1.0) if c is None else c)
            p = v.producer()
            if p is not None and self._only_user(v) is root:
                if self._is_sum(p) and p.graph is self.graph:
                    inner_nodes, inner_leaves = self._tree(p, c)
                    nodes.extend(inner_nodes)
                    leaves.extend(inner_leaves)
                    continue
                scaled = self._scale(p)
                if scaled is not None and p.graph is self.graph:
                    k, data, rank = scaled
                    q = data.producer()
                    if q is not None and self._is_sum(q) and self._only_user(data) is p:
                        self.tree_rank = rank
                        inner_nodes, inner_leaves = self._tree(q, k if c is None else c * k)
                        nodes.extend([p, *inner_nodes])
                        leaves.extend(inner_leaves)
                        continue
            leaves.append((v, c))
        return nodes, leaves

    def _exclusive(self, value: ir.Value, node: ir.Node) -> bool:
        uses = list(value.uses())
        return len(uses) == 1 and uses[0].node is node and not value.is_graph_output()

    def _affine(self, node: ir.Node, rank: int, axis_last: bool = False):
        """``(scale, shift, input)`` of a per-channel affine node, or ``None``."""
        if node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Identity":
            return 1.0, 0.0, node.inputs[0]
        if node.op_type == "BatchNormalization" and not axis_last:
            return self._batchnorm(node)
        if node.op_type in ("Mul", "Add") and len(node.inputs) == 2:
            for i in (0, 1):
                c = self._per_channel(node.inputs[1 - i], rank, axis_last)
                if c is not None and self.consts.try_resolve(node.inputs[i]) is None:
                    if node.op_type == "Mul":
                        return c, 0.0, node.inputs[i]
                    return 1.0, c, node.inputs[i]
        return None

    def _batchnorm(self, node: ir.Node) -> tuple[np.ndarray, np.ndarray, ir.Value] | None:
        if not_inference(node, self.consts.opset) or len(node.inputs) < 5:
            return None
        if any(list(o.uses()) or o.is_graph_output() for o in node.outputs[1:]):
            return None
        values = [self.consts.try_resolve(v) for v in node.inputs[1:5]]
        if any(v is None or v.dtype.kind != "f" for v in values):
            return None
        gamma, beta, mean, var = (np.asarray(v, np.float64).reshape(-1) for v in values)
        s = gamma / np.sqrt(var + float(get_attr(node, "epsilon", 1e-5)))
        return s, beta - mean * s, node.inputs[0]

    def _per_channel(
        self, value: ir.Value | None, rank: int, axis_last: bool = False
    ) -> np.ndarray | None:
        arr = self.consts.try_resolve(value)
        if arr is None or arr.dtype.kind != "f" or arr.ndim > rank:
            return None
        shape = (1,) * (rank - arr.ndim) + tuple(arr.shape)
        axis = rank - 1 if axis_last else 1
        if any(d != 1 for i, d in enumerate(shape) if i != axis):
            return None
        return np.asarray(arr, np.float64).reshape(-1)

    def _conv_kernel(self, node: ir.Node) -> Kernel:
        if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            raise Refused(f"{label_of(node)} is not a standard Conv")
        try:
            w = self.consts.resolve(node.inputs[1])
            b = (
                self.consts.resolve(node.inputs[2])
                if len(node.inputs) > 2 and node.inputs[2]
                else None
            )
        except NotConstant:
            raise Refused(f"weights not constant ({label_of(node)})") from None
        if w.dtype.kind != "f" or w.ndim < 3:
            raise Refused(f"{label_of(node)} has no float weight of rank >= 3")
        n = w.ndim - 2
        strides = tuple(ints_attr(node, "strides", [1] * n))
        dil = tuple(ints_attr(node, "dilations", [1] * n))
        ks = ints_attr(node, "kernel_shape", list(w.shape[2:]))
        if tuple(ks) != tuple(w.shape[2:]):
            raise Refused(f"{label_of(node)}: kernel_shape differs from its weight")
        group = int_attr(node, "group", 1)
        auto = get_attr(node, "auto_pad", "NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if auto in ("NOTSET", ""):
            pads = ints_attr(node, "pads", [0] * 2 * n)
            begin, end = tuple(pads[:n]), tuple(pads[n:])
        else:
            x = node.inputs[0]
            dims = list(x.shape)[2:] if x is not None and x.shape is not None else []
            if auto != "VALID" and (len(dims) != n or not all(isinstance(d, int) for d in dims)):
                raise Refused(f"{label_of(node)}: auto_pad={auto} on an input of unknown size")
            both = [
                branches.same_pads(
                    auto, int(dims[a]) if dims else 0, w.shape[2 + a], strides[a], dil[a]
                )
                for a in range(n)
            ]
            begin, end = tuple(p[0] for p in both), tuple(p[1] for p in both)
        bias = np.zeros(w.shape[0]) if b is None else np.asarray(b, np.float64).reshape(-1)
        return Kernel(np.asarray(w, np.float64), bias, strides, dil, begin, end, group)

    def _pool(self, node: ir.Node) -> tuple[tuple[int, ...], ...] | str:
        """AveragePool's geometry when it is a convolution, else the reason."""
        ks = tuple(ints_attr(node, "kernel_shape", []))
        n = len(ks)
        auto = get_attr(node, "auto_pad", "NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if auto not in ("NOTSET", "", "VALID"):
            return f"{label_of(node)} uses auto_pad={auto}"
        pads = [0] * 2 * n if auto == "VALID" else ints_attr(node, "pads", [0] * 2 * n)
        if int_attr(node, "ceil_mode", 0):
            return f"{label_of(node)} uses ceil_mode=1 (its last windows are partial)"
        if any(pads) and not int_attr(node, "count_include_pad", 0):
            return (
                f"{label_of(node)} pads with count_include_pad=0: its border windows divide by "
                "fewer taps, which no convolution does"
            )
        strides = tuple(ints_attr(node, "strides", [1] * n))
        dil = tuple(ints_attr(node, "dilations", [1] * n))
        return ks, strides, tuple(pads[:n]), tuple(pads[n:]), dil

    def _read(self, leaf: ir.Value, sink: ir.Node, why: list[tuple[object, str]]) -> _Branch | None:
        """The term ``leaf`` (read by ``sink``) as a branch, or ``None``; what keeps a linear op
        from being a branch goes to ``why`` as ``(its input, reason)``."""
        trail: list[ir.Node] = []
        scale: np.ndarray | float = 1.0
        shift: np.ndarray | float = 0.0
        v, reader = leaf, sink
        assumed: int | None = None
        while True:
            p = v.producer()
            if p is None or p.graph is not self.graph:
                break
            if p.op_type == "Conv" and p.domain in ("", "ai.onnx"):
                break
            rank = 4
            if v.shape is not None and v.shape.rank() is not None:
                rank = v.shape.rank()
            aff = self._affine(p, rank) if p.op_type != "Add" else None
            if aff is None or not self._exclusive(v, reader):
                break
            s, t, src = aff
            scale, shift = np.multiply(scale, s), np.multiply(shift, s) + t
            trail.append(p)
            if p.op_type in ("Mul", "Add"):
                assumed = rank
            v, reader = src, p
        p = v.producer()
        if p is not None and p.graph is self.graph and p.domain in ("", "ai.onnx"):
            if p.op_type in ("Conv", "AveragePool", "Gemm", "MatMul"):
                if not self._exclusive(v, reader):
                    n = len(list(v.uses())) - 1 + v.is_graph_output()
                    why.append(
                        (
                            id(p.inputs[0]),
                            f"branch output used elsewhere: {label_of(p)} also feeds "
                            f"{n} other reader(s)",
                        )
                    )
                else:
                    try:
                        br = self._linear_branch(p, trail, scale, shift)
                        if br.kernel is not None and assumed not in (None, br.kernel.weight.ndim):
                            raise Refused(f"a constant after {label_of(p)} has an unknown rank")
                        return br
                    except Refused as exc:
                        why.append((id(p.inputs[0]), exc.reason))
                        return None
            elif not trail and len(p.inputs) == 1 and p.inputs[0] is not None:
                q = p.inputs[0].producer()
                if q is not None and q.op_type in ("Conv", "Gemm", "MatMul") and q.inputs:
                    why.append(
                        (
                            id(q.inputs[0]),
                            f"nonlinearity between: {label_of(p)} between {label_of(q)} and the sum",
                        )
                    )
        if not trail:
            return _Branch(leaf, "identity", [], scale=np.asarray(1.0), shift=np.asarray(0.0))
        kinds = "/".join(sorted({n.op_type for n in trail}))
        br = _Branch(
            v, f"identity {kinds}", trail, scale=np.asarray(scale), shift=np.asarray(shift)
        )
        br.rank = assumed
        return br

    def _keys(self, leaf: ir.Value) -> set[int]:
        """The tensors a term may be a linear map of (cheap: no weight is read), to read only
        the terms that share one with another term."""
        keys = {id(leaf)}
        v = leaf
        for _ in range(8):
            p = v.producer()
            if p is None or p.graph is not self.graph or not p.inputs:
                break
            data = [i for i in p.inputs if i is not None and i.const_value is None]
            if p.op_type in ("Conv", "Gemm", "MatMul", "AveragePool") and p.inputs[0] is not None:
                keys.add(id(p.inputs[0]))
                v = p.inputs[0]
            elif p.op_type in ("BatchNormalization", "Identity", "Mul", "Add") and data:
                keys.update(id(i) for i in data)
                v = data[0]
            elif len(p.inputs) == 1 and p.inputs[0] is not None:  # a nonlinearity: for the report
                v = p.inputs[0]
            else:
                break
            keys.add(id(v))
        return keys

    def _linear_branch(
        self, p: ir.Node, trail: list[ir.Node], scale: object, shift: object
    ) -> _Branch:
        if p.op_type in ("Gemm", "MatMul"):
            return self._dense_branch(p, trail)
        if p.op_type == "AveragePool":
            geo = self._pool(p)
            if isinstance(geo, str):
                raise Refused(geo)
            label = f"avgpool {'x'.join(map(str, geo[0]))}"
            first = self._first_of(p, len(geo[0]) + 2)
            if first is not None:  # 1x1 conv -> affine -> AveragePool (DBB): one conv
                conv0, mid_nodes, s, t = first
                try:
                    k0 = self._conv_kernel(conv0)
                    c = k0.out_channels
                    pool = branches.avgpool_kernel(c, c, *geo)
                    k = then_affine(branches.compose(k0, pool, s, t), scale, shift)
                    dtype = self.consts.resolve(conv0.inputs[1]).dtype
                    nodes = [*trail, p, *mid_nodes, conv0]
                    cost = k0.macs() * math.prod(pool.strides) + pool.macs()
                    return _Branch(
                        conv0.inputs[0], "1x1->" + label, nodes, kernel=k, cost=cost, dtype=dtype
                    )
                except (Refused, Incompatible) as exc:
                    logger.debug("pool sequence not merged: %s", exc)
            br = _Branch(p.inputs[0], label, [*trail, p], pool=p)
            br.scale, br.shift = np.asarray(scale), np.asarray(shift)
            return br
        k = self._conv_kernel(p)
        nodes = [*trail, p]
        k = then_affine(k, scale, shift)
        label = "x".join(map(str, k.shape))
        cost = k.macs()
        dtype = self.consts.resolve(p.inputs[1]).dtype
        source = p.inputs[0]
        first = self._first_of(p, k.weight.ndim)
        if first is not None:
            conv0, mid_nodes, s, t = first
            try:
                k0 = self._conv_kernel(conv0)
                if branches.composed_macs(k0, k) <= k.macs() + k0.macs() * math.prod(k.strides):
                    merged = branches.compose(k0, k, s, t)
                    label = "x".join(map(str, k0.shape)) + "->" + label
                    cost += k0.macs() * (math.prod(k.strides) if k0.is_pointwise else 1)
                    nodes += [*mid_nodes, conv0]
                    source, k = conv0.inputs[0], merged
            except (Refused, Incompatible) as exc:
                logger.debug("sequence not merged: %s", exc)
        return _Branch(source, label, nodes, kernel=k, cost=cost, dtype=dtype)

    def _first_of(self, conv: ir.Node, rank: int):
        """``(conv0, affine nodes, scale, shift)`` when ``conv``'s input is a conv's output
        through per-channel affines only, each read by the next alone."""
        v, reader = conv.inputs[0], conv
        mids: list[ir.Node] = []
        scale: np.ndarray | float = 1.0
        shift: np.ndarray | float = 0.0
        for _ in range(8):
            if v is None or not self._exclusive(v, reader):
                return None
            p = v.producer()
            if p is None or p.graph is not self.graph:
                return None
            if p.op_type == "Conv" and p.domain in ("", "ai.onnx"):
                return p, mids, np.asarray(scale), np.asarray(shift)
            aff = self._affine(p, rank)
            if aff is None:
                return None
            s, t, src = aff
            scale, shift = np.multiply(scale, s), np.multiply(shift, s) + t
            mids.append(p)
            v, reader = src, p
        return None

    def _dense_branch(self, p: ir.Node, trail: list[ir.Node]) -> _Branch:
        if trail:
            raise Refused(f"{label_of(p)}: an affine after a Gemm/MatMul branch is not merged")
        try:
            w = self.consts.resolve(p.inputs[1])
        except NotConstant:
            raise Refused(f"weights not constant ({label_of(p)})") from None
        if w.ndim != 2 or w.dtype.kind != "f":
            raise Refused(f"{label_of(p)}: weight is not a 2-D float matrix")
        w64 = np.asarray(w, np.float64)
        b = np.zeros(w.shape[1] if p.op_type == "MatMul" else 0)
        if p.op_type == "Gemm":
            if int_attr(p, "transA", 0):
                raise Refused(f"{label_of(p)} transposes its input")
            alpha = float(get_attr(p, "alpha", 1.0))
            beta = float(get_attr(p, "beta", 1.0))
            w64 = (w64.T if int_attr(p, "transB", 0) else w64) * alpha
            b = np.zeros(w64.shape[1])
            if len(p.inputs) > 2 and p.inputs[2] is not None:
                c = self.consts.try_resolve(p.inputs[2])
                if c is None or c.size not in (1, w64.shape[1]) or c.ndim > 2:
                    raise Refused(f"{label_of(p)}: its C is not a constant per-output vector")
                b = np.broadcast_to(np.asarray(c, np.float64).reshape(-1) * beta, (w64.shape[1],))
        br = _Branch(p.inputs[0], p.op_type, [p], dense=(w64, np.array(b)), dtype=w.dtype)
        br.gemm = p.op_type == "Gemm"
        br.cost = w.size
        return br

    def _block(self, root: ir.Node) -> Entry | None:
        self.tree_rank = None
        tree, leaves = self._tree(root)
        read: list[tuple[ir.Value, _Branch | None, bool, np.ndarray | None]] = []
        notes: list[tuple[object, str]] = []
        sinks = {id(v): n for n in tree for v in n.inputs if v is not None}
        keys = [self._keys(leaf) for leaf, _ in leaves]
        seen: dict[int, int] = {}
        for ks in keys:
            for k in ks:
                seen[k] = seen.get(k, 0) + 1
        for (leaf, coef), ks in zip(leaves, keys, strict=True):
            if self.consts.try_resolve(leaf) is not None:
                read.append((leaf, None, True, coef))
                continue
            if not any(seen[k] > 1 for k in ks):  # shares no tensor with another term
                read.append((leaf, None, False, coef))
                continue
            br = self._read(leaf, sinks[id(leaf)], notes)
            if br is not None:
                br.coef = coef
            read.append((leaf, br, False, coef))
        by_source: dict[int, list[_Branch]] = {}
        for _, br, _, _ in read:
            if br is not None:
                by_source.setdefault(id(br.source), []).append(br)
        refused: dict[int, list[str]] = {}
        for src, reason in notes:
            refused.setdefault(src, []).append(reason)  # type: ignore[arg-type]
        groups = [
            g
            for g in by_source.values()
            if len(g) >= 2 and any(b.kernel is not None or b.dense is not None for b in g)
        ]
        if not groups:
            # a candidate all the same: two or more terms on one tensor, one of them linear
            for src, reasons in refused.items():
                if len(by_source.get(src, [])) + len(reasons) >= 2:  # type: ignore[call-overload]
                    return self._entry(root, "skipped", reason="; ".join(reasons))
            return None
        group = max(groups, key=lambda g: sum(b.cost for b in g))
        problems = list(refused.get(id(group[0].source), []))
        return self._merge(root, tree, read, group, problems)

    def _merge(self, root, tree, read, group, problems) -> Entry:
        convs = [b for b in group if b.kernel is not None]
        dense = [b for b in group if b.dense is not None]
        if convs and dense:
            problems.append("Conv and Gemm/MatMul branches on the same input do not merge")
            group = [b for b in group if b.dense is None]
            dense = []
        main = max(
            (b for b in group if b.kernel is not None or b.dense is not None), key=lambda b: b.cost
        )
        consts = [(leaf, coef) for leaf, _, is_const, coef in read if is_const]
        if dense:
            return self._merge_dense(root, tree, read, group, main, consts, problems)
        rank = main.kernel.weight.ndim
        if self.tree_rank not in (None, rank):
            return self._entry(
                root, "skipped", reason="a per-channel scale inside the sum has an unknown rank"
            )
        kept: list[_Branch] = [main]
        kernels: list[Kernel] = [then_affine(main.kernel, as_vector(main.coef), 0.0)]
        for b in group:
            if b is main:
                continue
            try:
                k = then_affine(self._as_kernel(b, main.kernel), as_vector(b.coef), 0.0)
                branches.merge_parallel([*kernels, k])
            except Incompatible as exc:
                problems.append(f"{b.label} branch: {exc}")
                continue
            kept.append(b)
            kernels.append(k)
        if len(kept) < 2:
            return self._entry(root, "skipped", reason="; ".join(problems))
        merged = branches.merge_parallel(kernels)
        extra = np.zeros(merged.out_channels)
        used_consts = []
        for c, coef in consts:
            vec = self._per_channel(c, rank)
            if vec is not None and vec.size in (1, merged.out_channels):
                extra = extra + vec * as_vector(coef)
                used_consts.append(c)
        merged.bias = merged.bias + extra
        names = [b.label for b in kept]
        if merged.macs() > sum(b.cost for b in kept):
            return self._entry(
                root,
                "skipped",
                reason=f"merging {' + '.join(names)} into one {'x'.join(map(str, merged.shape))} "
                f"conv would cost more multiply-adds ({merged.macs()} vs "
                f"{sum(b.cost for b in kept)} per position)",
            )
        taken = {id(b) for b in kept}
        foreign = [
            (leaf, coef)
            for leaf, br, _, coef in read
            if (br is None or id(br) not in taken) and not any(leaf is c for c in used_consts)
        ]
        if any(coef is not None and np.any(coef != -1) for _, coef in foreign):
            return self._entry(
                root,
                "skipped",
                reason="a term that does not merge is scaled inside the sum; "
                + "; ".join(problems or ["no reason"]),
            )
        post: list[ir.Node] = []
        if not foreign:
            post, merged = self._after_sum(root, merged, rank)
        target_name = node_name(next(n for n in main.nodes if n.op_type == "Conv"))
        target = f"Conv '{target_name}' ({' + '.join(names)})"
        warnings = [f"not merged: {p}" for p in problems]
        if post:
            warnings.append(
                "merged the per-channel " + ", ".join(label_of(n) for n in post) + " after the sum"
            )
        if self.dry_run:
            return self._entry(root, "foldable", target=target, warnings=warnings)
        anchor = post[-1] if post else root
        try:
            conv_out = self._emit_conv(anchor, main.source, merged, main.dtype, target_name)
        except Incompatible as exc:
            return self._entry(root, "skipped", reason=str(exc))
        out = self._add_foreign(anchor, conv_out, foreign)
        self.editor.take_over(anchor.outputs[0], out)
        self._remove([*post, *tree, *(n for br in kept for n in br.nodes)], conv_out, target_name)
        return self._entry(root, "applied", target=target, warnings=warnings)

    def _remove(self, nodes: list[ir.Node], new: ir.Value | None = None, name: str = "") -> None:
        """Remove ``nodes`` and what only fed them (Identity/Constant in front of parameters,
        as the legacy exporter writes them); ``new``'s producer takes the name ``name``."""
        self.keep.extend(nodes)
        self.keep.extend(v for n in nodes for v in [*n.inputs, *n.outputs])
        inputs = [v for n in nodes for v in n.inputs if v is not None]
        self.editor.remove(nodes)
        while inputs:
            v = inputs.pop()
            p = v.producer()
            if (
                p is not None
                and p.graph is self.graph
                and p.op_type in ("Identity", "Constant")
                and not any(list(o.uses()) or o.is_graph_output() for o in p.outputs)
            ):
                inputs.extend(i for i in p.inputs if i is not None)
                self.keep.extend([p, *p.inputs, *p.outputs])
                self.editor.remove([p])
        producer = new.producer() if new is not None else None
        if producer is not None and name and not any(n.name == name for n in self.graph):
            producer.name = name

    def _add_foreign(self, anchor: ir.Node, out: ir.Value, foreign: list) -> ir.Value:
        """``out`` plus the terms that did not merge (``Sub`` for those with coefficient -1)."""
        for f, coef in foreign:
            out = self.editor.op(anchor, "Add" if coef is None else "Sub", [out, f])
        return out

    def _after_sum(self, root: ir.Node, merged: Kernel, rank: int) -> tuple[list[ir.Node], Kernel]:
        v = root.outputs[0]
        uses = list(v.uses())
        if len(uses) != 1 or v.is_graph_output():
            return [], merged
        p = uses[0].node
        if p.op_type not in ("BatchNormalization", "Mul") or p.graph is not self.graph:
            return [], merged
        aff = self._affine(p, rank)
        if aff is None or aff[2] is not v:
            return [], merged
        s, t, _ = aff
        return [p], then_affine(merged, s, t)

    def _as_kernel(self, b: _Branch, main: Kernel) -> Kernel:
        n = main.spatial
        if b.kernel is not None:
            return b.kernel
        if b.rank is not None and b.rank != main.weight.ndim:
            raise Incompatible("a per-channel constant on the identity has an unknown rank")
        if main.in_channels != main.out_channels:
            raise Incompatible(
                f"identity needs as many input as output channels ({main.in_channels} -> "
                f"{main.out_channels})"
            )
        if b.pool is not None:
            ks, strides, begin, end, dil = self._pool(b.pool)  # type: ignore[misc]
            k = branches.avgpool_kernel(main.out_channels, main.group, ks, strides, begin, end, dil)
        else:
            k = branches.identity_kernel(main.out_channels, main.group, n)
        return then_affine(k, b.scale, b.shift)

    def _merge_dense(self, root, tree, read, group, main, consts, problems) -> Entry:
        w0, _ = main.dense
        if self.tree_rank not in (None, 2):
            return self._entry(
                root, "skipped", reason="a per-channel scale inside the sum is not on the last axis"
            )
        wsum = np.zeros_like(w0)
        bsum = np.zeros(w0.shape[1])
        kept = []
        for b in group:
            if b.dense is not None:
                if b.dense[0].shape != w0.shape:
                    problems.append(f"{b.label} branch: shape {b.dense[0].shape} vs {w0.shape}")
                    continue
                wsum += b.dense[0] * as_vector(b.coef).reshape(1, -1)
                bsum += b.dense[1] * as_vector(b.coef)
            else:
                if b.rank not in (None, 2) or w0.shape[0] != w0.shape[1]:
                    problems.append("identity needs a square weight and a 2-D input")
                    continue
                s = np.broadcast_to(np.asarray(b.scale, np.float64).reshape(-1), (w0.shape[0],))
                if b.nodes and any(n.op_type == "BatchNormalization" for n in b.nodes):
                    problems.append("a BatchNormalization on a 2-D identity branch is not merged")
                    continue
                wsum += np.diag(s) * as_vector(b.coef).reshape(1, -1)
                shift = np.broadcast_to(np.asarray(b.shift, np.float64).reshape(-1), bsum.shape)
                bsum += shift * as_vector(b.coef)
            kept.append(b)
        if len(kept) < 2:
            return self._entry(root, "skipped", reason="; ".join(problems))
        used = []
        for c, coef in consts:
            vec = self._per_channel(c, 2, axis_last=True)
            arr = self.consts.try_resolve(c)
            if not any(b.gemm for b in kept) and (arr is None or arr.ndim > 1):
                vec = None  # a MatMul's input may be 1-D: (1, n) would widen its output
            if vec is not None and vec.size in (1, bsum.size):
                bsum = bsum + vec * as_vector(coef)
                used.append(c)
        taken = {id(b) for b in kept}
        foreign = [
            (leaf, coef)
            for leaf, br, _, coef in read
            if (br is None or id(br) not in taken) and not any(leaf is c for c in used)
        ]
        if any(coef is not None and np.any(coef != -1) for _, coef in foreign):
            return self._entry(
                root, "skipped", reason="a term that does not merge is scaled inside the sum"
            )
        names = [b.label for b in kept]
        gemm = any(b.gemm for b in kept)
        target = (
            f"{'Gemm' if gemm else 'MatMul'} '{node_name(main.nodes[-1])}' ({' + '.join(names)})"
        )
        warnings = [f"not merged: {p}" for p in problems]
        if self.dry_run:
            return self._entry(root, "foldable", target=target, warnings=warnings)
        ed = self.editor
        base = node_name(main.nodes[-1])
        wv = ed.const(f"{base}.weight", branches.rounded(wsum, main.dtype))
        bv = ed.const(f"{base}.bias", branches.rounded(bsum, main.dtype))
        if gemm:
            out = ed.op(root, "Gemm", [main.source, wv, bv], base=base)
        else:
            out = ed.op(root, "MatMul", [main.source, wv], base=base)
            out = ed.op(root, "Add", [out, bv], base=base)
        out = self._add_foreign(root, out, foreign)
        ed.take_over(root.outputs[0], out)
        self._remove([*tree, *(n for br in kept for n in br.nodes)])
        return self._entry(root, "applied", target=target, warnings=warnings)

    def _sequence(self, conv: ir.Node) -> Entry | None:
        w = conv.inputs[1] if len(conv.inputs) > 1 else None
        shape = w.const_value.shape if w is not None and w.const_value is not None else None
        if shape is None:
            return None
        first = self._first_of(conv, len(shape))  # structure first: weights are read after
        if first is None:
            return None
        conv0, mids, s, t = first
        try:
            k0, k1 = self._conv_kernel(conv0), self._conv_kernel(conv)
        except Refused:
            return None
        if not (k0.is_pointwise or k1.is_pointwise):
            return None
        pair = f"{'x'.join(map(str, k0.shape))}->{'x'.join(map(str, k1.shape))}"
        cost = k1.macs() + k0.macs() * (math.prod(k1.strides) if k0.is_pointwise else 1)
        try:  # the cost from the shapes first: a depthwise conv's merge builds a dense weight
            macs = branches.composed_macs(k0, k1)
            if macs <= cost:
                merged = branches.compose(k0, k1, s, t)
        except Incompatible as exc:
            return self._entry(conv, "skipped", reason=f"{pair}: {exc}")
        if macs > cost:
            return self._entry(
                conv,
                "skipped",
                reason=f"{pair}: the merged conv would cost more multiply-adds "
                f"({macs} vs {cost} per position)",
            )
        target = f"Conv '{node_name(conv)}' ({pair})"
        if self.dry_run:
            return self._entry(conv, "foldable", target=target)
        dtype = self.consts.resolve(conv.inputs[1]).dtype
        try:
            out = self._emit_conv(conv, conv0.inputs[0], merged, dtype, node_name(conv))
        except Incompatible as exc:
            return self._entry(conv, "skipped", reason=str(exc))
        self.editor.take_over(conv.outputs[0], out)
        self._remove([conv, *mids, conv0], out, node_name(conv))
        return self._entry(conv, "applied", target=target)

    def _emit_conv(
        self, anchor: ir.Node, source: ir.Value, k: Kernel, dtype: object, name: str
    ) -> ir.Value:
        """A Conv of ``k`` on ``source`` before ``anchor`` (weights rounded once into ``dtype``)."""
        w, b = branches.rounded(k.weight, dtype), branches.rounded(k.bias, dtype)  # type: ignore[arg-type]
        ed = self.editor
        attrs = {
            "kernel_shape": list(k.shape),
            "strides": list(k.strides),
            "pads": [*k.pads_begin, *k.pads_end],
            "dilations": list(k.dilations),
            "group": k.group,
        }
        inputs = [source, ed.const(f"{name}.weight", w), ed.const(f"{name}.bias", b)]
        return ed.op(anchor, "Conv", inputs, attrs, base=name)

    def _entry(self, node: ir.Node, status, **kw) -> Entry:
        return Entry(
            node_name(node), node.op_type, status, graph=self.label, direction="reparam", **kw
        )
