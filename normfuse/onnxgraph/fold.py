"""Fold per-channel affine maps into neighbouring linear ops in onnx_ir graphs.

The maths lives in :mod:`normfuse.core.algebra`; this module finds the pairs safely.

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
import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from normfuse.core import algebra
from normfuse.core.algebra import Affine
from normfuse.core.gcpause import gc_paused
from normfuse.core.report import Entry, Report, Status
from normfuse.onnxgraph.affines import AffineBuilder, Link
from normfuse.onnxgraph.chains import ChainFinder
from normfuse.onnxgraph.concat import concat_parts, slices
from normfuse.onnxgraph.const import (
    ConstantResolver,
    NotConstant,
    all_equal_to,
    reads_shape_only,
)
from normfuse.onnxgraph.graph import (
    KNOWN_OPSET,
    LINEAR_OPS,
    NORM_OPS,
    NORM_TAIL_OPS,
    Container,
    Refused,
    containers,
    exclusive,
    label_of,
    model_stats,
    node_name,
    others,
    rank_of,
    users,
    value_names,
)
from normfuse.onnxgraph.linear import Linear, LinearReader, check_range, lines_up
from normfuse.onnxgraph.paths import AxisPath, origin, walk_back, walk_forward
from normfuse.onnxgraph.shapes import InferredShapes
from normfuse.onnxgraph.writer import GraphWriter, deferrable

if TYPE_CHECKING:
    import onnx

__all__ = ["FoldOptions", "fold_model", "model_stats", "run_fold"]

_IDENTITY = {
    "Mul": "multiplies by 1",
    "Div": "divides by 1",
    "Add": "adds 0",
    "Sub": "subtracts 0",
}

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FoldOptions:
    """What :func:`fold_model` may do.

    Attributes:
        norm_affine: Also fold the gamma/beta of LayerNorm/GroupNorm/InstanceNorm/RMSNorm, and
            plain Mul/Add chains, into the following linear ops (the norm keeps gamma=1, beta=0).
        dry_run: Decide and report, change nothing (``normfuse inspect``).
        reparam: Then merge parallel/sequential linear branches into one op
            (:mod:`normfuse.onnxgraph.reparam`: RepVGG, MobileOne, ...).
    """

    norm_affine: bool = False
    dry_run: bool = False
    reparam: bool = False


def fold_model(
    model: ir.Model,
    options: FoldOptions = FoldOptions(),
    progress: Callable[[int, int], None] | None = None,
    source: onnx.ModelProto | None = None,
) -> list[Entry]:
    """Fold every foldable affine in ``model`` in place.

    Args:
        model: The model; modified in place unless ``options.dry_run``.
        options: What may be folded.
        progress: Called with ``(done, total)`` chains as work proceeds.
        source: The ModelProto ``model`` was just read from, unchanged since
            (:meth:`normfuse.onnxgraph.io.Loaded.take_proto`); it spares shape inference a
            serialization of the graph.

    Returns:
        One entry per candidate, in graph order.
    """
    found = list(containers(model))
    names = value_names(c for c, _ in found)
    main_opset = model.opset_imports.get("") or model.opset_imports.get("ai.onnx") or 1
    work: list[_Folder] = []
    for container, label in found:
        opset = (
            container.opset_imports.get("")
            if isinstance(container, ir.Function)
            else model.opset_imports.get("")
        )
        opset = opset or model.opset_imports.get("ai.onnx") or 1
        work.append(_Folder(container, label, opset, model.ir_version, names, options))
    try:
        # converters that write no value_info (tf2onnx); the main graph's constants, read
        # to decide which values need shapes, are read once for both
        inferred = InferredShapes(model, main_opset, source, for_fold=True, consts=work[0].consts)
        work[0].inert = inferred.inert
    except BaseException:
        for folder in work:
            folder.consts.close()
        raise
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
        inferred.restore(model)
    return entries


class _Folder:
    """Folds the chains of one graph or function: decides, and hands the writes to a writer."""

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
        self.options = options
        self.consts = ConstantResolver(opset, ir_version, keep_open=True)
        self.reader = LinearReader(self.consts)
        self.affines = AffineBuilder(self.consts, opset)
        self.finder = ChainFinder(container, self.consts, self.reader, opset, options.norm_affine)
        self.writer = GraphWriter(
            container, names, self.consts, self.reader, ir_version, label == ""
        )
        self.reported: set[int] = set()
        #: Elementwise nodes no fold touches, by id (:attr:`InferredShapes.inert`).
        self.inert: dict[int, ir.Node] = {}
        #: Dry run: the end of each chain that would fold whole into the linear op before it,
        #: by id -> that op and the layout ops between, which write the value once folded (a
        #: later chain that reads it folds into the op, as it would in a real run).
        self.virtual: dict[int, tuple[Linear, AxisPath | None]] = {}

    def chains(self) -> list[list[Link]]:
        """The maximal chains of affine nodes, in graph order."""
        return self.finder.chains()

    # ----------------------------------------------------------------- the decision
    def fold_chain(self, chain: list[Link]) -> list[Entry]:
        """Fold what can fold in one chain; one entry per reportable node."""
        if self.inert and all(self.inert.get(id(link.node)) is link.node for link in chain):
            return []  # known before any shape was inferred: what the test below finds
        self.reader.clear()
        reportable = self._reportable(chain)
        if not any(reportable) and not any(map(self._may_be_identity, chain)):
            return []  # a Mul/Add/... that touches no linear op and changes something stays
        rank = self._chain_rank(chain)
        warnings = [self.affines.warnings(link) for link in chain]
        names = [node_name(link.node) for link in chain]
        affines: list[Affine | Refused] = []
        for link in chain:
            try:
                affines.append(self.affines.affine(link, rank))
            except Refused as exc:
                affines.append(exc)
            except NotConstant as exc:
                affines.append(Refused(str(exc)))
        done: dict[int, tuple[str | None, str]] = {}  # chain index -> (direction, target)
        if any(reportable):
            k, after_reason = self._fold_forward(chain, affines, rank, done)
            suffix, before = self._fold_backward(chain, affines, k, rank, done)
        else:  # Mul/Add/... that touch no linear op (see _reportable) fold in neither direction
            after_reason, suffix, before = None, [], {}
        for i in self._drop_identities(chain, affines, done):
            reportable[i] = True
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
            if isinstance(own, Refused):
                reason, fix = own.reason, own.fix
            else:
                parts = []
                if after_reason:
                    parts.append(f"cannot fold into its producer: {after_reason}")
                before_reason, fix = before.get(i, (None, None))
                if before_reason:
                    parts.append(f"cannot fold into its consumers: {before_reason}")
                elif i not in suffix:
                    parts.append("a node between it and the next linear op cannot fold")
                reason = "; ".join(parts)
            entries.append(Entry(**common, status="skipped", reason=reason, fix=fix))
        return entries

    def _reportable(self, chain: list[Link]) -> list[bool]:
        """BN and norm nodes always; Mul/Add/... when the chain touches a foldable linear op."""
        if any(link.kind != "elementwise" for link in chain):
            return [True] * len(chain)
        head = chain[0]
        head_input, start = head.data.producer(), head.data
        if head_input is not None:
            path, _ = walk_back(head.data, head.node, self.consts)
            if path is not None:
                head_input, start = path.start.producer(), path.start
        touches = id(start) in self.virtual or (  # (dry run: a chain before folds into one)
            head_input is not None and isinstance(self.reader.producer_linear(head_input), Linear)
        )
        touches = touches or any(
            isinstance(self.reader.linear(u), Linear)
            for u in users(self._past_layout(chain[-1].out))
            if u.op_type in LINEAR_OPS
        )
        return [touches] * len(chain)

    def _drop_identities(
        self,
        chain: list[Link],
        affines: list[Affine | Refused],
        done: dict[int, tuple[str | None, str]],
    ) -> list[int]:
        """Remove the Mul/Add/Sub/Div left in ``chain`` that change nothing (x * 1, x + 0: a
        converter's Normalization layer at its default statistics) and do not broadcast."""
        dropped = []
        for i, link in enumerate(chain):
            a = affines[i]
            if (
                i in done
                or link.kind != "elementwise"
                or not isinstance(a, Affine)
                or not (np.all(a.scale == 1.0) and np.all(a.shift == 0.0))
                or not self._keeps_shape(link)
            ):
                continue
            if not self.options.dry_run:
                self.writer.bypass(link.node, link.data)
            done[i] = (None, f"nothing: it {_IDENTITY[link.node.op_type]}, so it was removed")
            dropped.append(i)
        return dropped

    def _may_be_identity(self, link: Link) -> bool:
        """Whether an elementwise link's constant is all ones (Mul, Div) or all zeros (Add, and
        Sub of the constant): what :meth:`_drop_identities` needs, checked without working out
        the affine (on graphs of 100k such nodes that alone took seconds)."""
        op = link.node.op_type
        if link.kind != "elementwise" or op not in _IDENTITY or (op == "Sub" and link.data_index):
            return False
        c = self.consts.try_resolve(link.node.inputs[1 - link.data_index])
        return c is not None and all_equal_to(c, 1 if op in ("Mul", "Div") else 0)

    def _keeps_shape(self, link: Link) -> bool:
        """The node's output is its data input (shape and type): no broadcasting to more."""
        out = link.out
        if out.is_graph_output():
            return False
        c = self.consts.try_resolve(link.node.inputs[1 - link.data_index])
        dims = link.data.shape
        if c is None or (link.data.dtype is not None and link.data.dtype.numpy() != c.dtype):
            return False
        if c.size == 1 and (c.ndim == 0 or (dims is not None and c.ndim <= dims.rank())):
            return True
        if dims is None or c.ndim > dims.rank():
            return False
        tail = list(dims)[dims.rank() - c.ndim :]
        return all(
            k == 1 or (isinstance(d, int) and d == k) for k, d in zip(c.shape, tail, strict=True)
        )

    def _past_layout(self, value: ir.Value) -> ir.Value:
        """The tensor after the layout ops that ``value`` alone runs through."""
        path, _ = walk_forward(value, self.consts)
        return path.end if path is not None else value

    def _fold_forward(
        self,
        chain: list[Link],
        affines: list[Affine | Refused],
        end_rank: int | None,
        done: dict[int, tuple[str, str]],
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
        path, stop = walk_back(head.data, head.node, self.consts)
        if stop is not None:  # unless no linear op lies beyond, whatever the layout ops do
            start = origin(head.data, head.node).producer()
            if start is None or start.graph is not head.node.graph:
                return 0, stop
            found = self.reader.producer_linear(start)
            return 0, found if isinstance(found, str) else stop
        joint = path.start if path is not None else head.data
        virtual = self.virtual.get(id(joint))
        if virtual is not None:  # as the real run will see it once the chain before has folded
            reader = path.nodes[0] if path is not None else head.node
            if not exclusive(joint, reader):
                return 0, (
                    f"the output of {label_of(joint.producer())} also feeds "  # type: ignore[arg-type]
                    f"{others(joint, reader)}; folding would change what they see"
                )
            if virtual[1] is not None:  # the folded chain's layout ops too
                path = AxisPath(virtual[1].steps + (path.steps if path is not None else []))
        via = f" through {path.describe()}" if path is not None else ""
        if path is not None:
            producer = path.start.producer()
            if producer is None:
                return 0, f"its input comes{via} from graph input '{path.start.name}'"
            if producer.graph is not head.node.graph:
                return 0, f"its input comes{via} from an outer graph"
        found = virtual[0] if virtual is not None else self.reader.producer_linear(producer)
        if isinstance(found, str):
            parts = concat_parts(producer, head.node, self.reader) if path is None else None
            if parts is not None and virtual is None:  # MixNet: a BN after convs concatenated
                if self._folds_before(chain, affines, end_rank):
                    return 0, None  # into the one op after it instead (inception_next)
                return self._fold_into_parts(chain, affines, parts, producer, done)
            return 0, found + (f" (it reaches {label_of(head.node)}{via})" if path else "")
        first = path.nodes[0] if path is not None else head.node
        if virtual is None and not exclusive(found.out, first):
            return 0, (
                f"the output of {found.label} also feeds {others(found.out, first)}; "
                "folding would change what they see"
            )
        out_rank = found.out_rank
        if path is not None and out_rank is None:
            out_rank = path.rank_at_start(end_rank)
        acc: Affine | None = None
        reason: str | None = None
        k = 0
        for a in affines:
            if isinstance(a, Refused):
                break
            if path is not None and not a.is_scalar:
                mapped = path.axis_before(a.axis, end_rank, found.label)
                if isinstance(mapped, str):
                    reason = mapped
                    break
                a = Affine(a.scale, a.shift, mapped)
            mismatch = lines_up(a, found.out_axis, found.weights.out_channels, out_rank)
            if mismatch and path is not None and not a.is_scalar and out_rank is not None:
                want = found.out_axis % out_rank
                if a.axis != want:
                    mismatch = (
                        f"{via.strip()} it acts along axis {a.axis} of the output of "
                        f"{found.label}, not its channel axis {want}"
                    )
            if mismatch:
                reason = (
                    mismatch
                    if mismatch.startswith("through")
                    else f"{mismatch} of {found.label}{via}"
                )
                break
            acc = a if acc is None else acc.then(a)
            k += 1
        if acc is None:
            return 0, reason
        try:
            self._apply_after(found, chain[:k], acc, path)
        except Refused as exc:
            return 0, exc.reason
        done.update({i: ("after", found.label + via) for i in range(k)})
        if self.options.dry_run and k == len(chain):
            self.virtual[id(chain[-1].out)] = (found, path)
        return k, reason

    def _folds_before(
        self, chain: list[Link], affines: list[Affine | Refused], rank: int | None
    ) -> bool:
        """Whether the whole chain would fold into the ops that read it (decided, not done)."""
        maps = [a for a in affines if isinstance(a, Affine)]
        if len(maps) < len(affines) or len({a.axis for a in maps if not a.is_scalar}) > 1:
            return False  # what _fold_backward would not take whole either
        try:
            self._apply_before(chain, functools.reduce(Affine.then, maps), rank, dry=True)
        except Refused:
            return False
        return True

    def _fold_into_parts(
        self,
        chain: list[Link],
        affines: list[Affine | Refused],
        parts: list[Linear],
        concat: ir.Node,
        done: dict[int, tuple[str, str]],
    ) -> tuple[int, str | None]:
        """Fold the longest valid prefix into the convs a channel Concat joins, each its slice
        (:mod:`normfuse.onnxgraph.concat`); (its length, why not more)."""
        rank = rank_of(concat.outputs[0])
        total = sum(p.weights.out_channels for p in parts)
        acc: Affine | None = None
        reason: str | None = None
        k = 0
        for a in affines:
            if isinstance(a, Refused):
                break
            mismatch = lines_up(a, 1, total, rank)
            if mismatch:
                reason = f"{mismatch} of {label_of(concat)}"
                break
            acc = a if acc is None else acc.then(a)
            k += 1
        pieces = slices(acc, parts) if acc is not None else None
        if pieces is None:
            return 0, reason or f"its channels are not those of the convs {label_of(concat)} joins"
        foldeds = []
        try:
            for lin, piece in zip(parts, pieces, strict=True):
                folded = algebra.absorb_after(lin.weights, piece, defer=deferrable(lin))
                check_range(folded, lin)
                foldeds.append(folded)
        except Refused as exc:
            return 0, exc.reason
        target = f"{', '.join(p.label for p in parts)}, each its channels of {label_of(concat)}"
        if not self.options.dry_run:
            self.writer.write_into_parts(parts, chain[:k], foldeds, concat)
        done.update({i: ("after", target) for i in range(k)})
        return k, reason

    def _fold_backward(
        self,
        chain: list[Link],
        affines: list[Affine | Refused],
        k: int,
        rank: int | None,
        done: dict[int, tuple[str, str]],
    ) -> tuple[list[int], dict[int, tuple[str, str | None]]]:
        """Fold the longest valid suffix of ``chain[k:]`` into the consumers, or else the longest
        shorter one that folds (a scale after a shift folds into a conv that pads its input).

        Returns:
            The valid suffix's chain indices, and why each of those that did not fold did not
            (reason, fix).
        """
        j = len(chain)
        axis: int | None = None
        while j > k:  # valid maps with one consistent channel axis
            a = affines[j - 1]
            if isinstance(a, Refused) or (not a.is_scalar and axis is not None and a.axis != axis):
                break
            axis = axis if a.is_scalar else a.axis
            j -= 1
        suffix = list(range(j, len(chain)))
        if not suffix:
            return [], {}
        links = [chain[i] for i in suffix]
        opt_in = not self.options.norm_affine and not any(link.kind == "bn" for link in links)
        if opt_in:
            consumers = users(self._past_layout(links[-1].out))
            if not (
                consumers and all(isinstance(self.reader.linear(c), Linear) for c in consumers)
            ):
                return suffix, dict.fromkeys(suffix, ("nothing linear to fold into", None))
            names = ", ".join(label_of(c) for c in consumers)
        maps: list[Affine] = [affines[i] for i in suffix]  # type: ignore[misc]
        first: Refused | None = None  # why the whole suffix does not fold
        for start in range(len(suffix)):  # the longest part that folds
            acc = functools.reduce(Affine.then, maps[start:])
            try:  # an opt-in fold is only tried: the fix is offered where it would fold
                target = self._apply_before(links[start:], acc, rank, dry=opt_in)
            except Refused as exc:
                first = first or exc
                continue
            why = dict.fromkeys(suffix[:start], (first.reason, first.fix)) if first else {}
            if opt_in:
                reason = f"folding a Mul/Add chain into the following {names} is opt-in"
                why.update(
                    dict.fromkeys(suffix[start:], (reason, "pass --norm-affine (norm_affine=True)"))
                )
            else:
                done.update({i: ("before", target) for i in suffix[start:]})
            return suffix, why
        assert first is not None
        return suffix, dict.fromkeys(suffix, (first.reason, first.fix))

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
            for node in self.finder.too_new
            if node.op_type in NORM_OPS
        ]
        for node in self.container if self.options.dry_run else ():  # (a pass saved otherwise)
            if (
                node.op_type in NORM_TAIL_OPS
                and node.domain in ("", "ai.onnx")
                and id(node) not in self.reported
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

    def _chain_rank(self, chain: list[Link]) -> int | None:
        head = chain[0]
        if head.kind != "norm":
            producer = head.data.producer()
            if producer is not None and producer.op_type in LINEAR_OPS | {"Add"}:
                found = self.reader.producer_linear(producer)
                if isinstance(found, Linear) and found.out_rank is not None:
                    return found.out_rank
            if rank_of(head.data) is None and producer is not None:
                path, _ = walk_back(head.data, head.node, self.consts)
                start = path.start.producer() if path is not None else None
                if path is not None and start is not None:
                    found = self.reader.producer_linear(start)
                    if isinstance(found, Linear) and found.out_rank is not None:
                        r = path.rank_at_end(found.out_rank)
                        if r is not None:
                            return r
        for link in chain:
            r = rank_of(link.data)
            if r is not None:
                return r
        r = rank_of(chain[-1].out)
        return r

    # ----------------------------------------------------------------- rewriting
    def _apply_after(
        self, lin: Linear, links: list[Link], affine: Affine, path: AxisPath | None
    ) -> None:
        folded = algebra.absorb_after(lin.weights, affine, defer=deferrable(lin))
        check_range(folded, lin)
        if self.options.dry_run:
            return
        self.writer.write_after(lin, links, folded, path.end if path is not None else None)

    def _apply_before(
        self, links: list[Link], affine: Affine, rank: int | None, dry: bool = False
    ) -> str:
        """Fold into every consumer of the chain's output (``dry``: only decide); returns the
        targets' labels."""
        tail = links[-1].out
        if tail.is_graph_output():
            raise Refused(f"its output '{tail.name}' is a graph output")
        path, stop = walk_forward(tail, self.consts)
        via = f" through {path.describe()}" if path is not None else ""
        end = path.end if path is not None else tail
        if stop is not None:
            raise Refused(stop)
        if end.is_graph_output():
            raise Refused(f"its output reaches graph output '{end.name}'{via}")
        uses = list(end.uses())
        if not uses:
            raise Refused(f"its output is unused{via}")
        if path is not None and not affine.is_scalar:
            mapped = path.axis_after(affine.axis, rank, "the next linear op")
            if isinstance(mapped, str):
                raise Refused(mapped)
            affine = Affine(affine.scale, affine.shift, mapped)
            rank = path.rank_at_end(rank)
        targets: list[tuple[Linear, int]] = []
        for use in uses:
            consumer = use.node
            if reads_shape_only(consumer, use.idx):  # Shape, Size, CastLike's target: the fold
                continue  # keeps both (ViT attention reads x.shape[0]); the writer moves them
            if consumer.graph is not links[-1].node.graph:
                raise Refused(f"its output is used in a subgraph ({label_of(consumer)})")
            if consumer.op_type not in LINEAR_OPS:
                raise Refused(
                    f"its output{via} also feeds {label_of(consumer)}, which is not a linear op"
                )
            found = self.reader.linear(consumer)
            if isinstance(found, str):
                raise Refused(found)
            if use.idx != 0:
                raise Refused(f"it feeds {found.label} as a weight, not as its data input")
            if found.in_axis is None:
                raise Refused(found.in_refusal or f"{found.label} cannot take it")
            in_rank = rank_of(end) if rank_of(end) is not None else rank
            if in_rank is None and found.node.op_type in ("Conv", "ConvTranspose"):
                in_rank = found.out_rank
            if found.node.op_type == "Gemm":
                in_rank = 2
            mismatch = lines_up(affine, found.in_axis, found.weights.in_channels, in_rank, "input")
            if mismatch:
                raise Refused(f"{mismatch} of {found.label}{via}")
            if found.pads_input and affine.has_shift:
                if found.node.op_type == "ConvTranspose":
                    raise Refused(
                        f"{found.label} is not pointwise, so a shift on its input does not fold "
                        "exactly"
                    )
                raise Refused(
                    f"{found.label} pads its input with zeros: folding the shift would change "
                    "the borders"
                )
            targets.append((found, use.idx))
        if not targets:
            raise Refused("its output is only read for its shape or type")
        foldeds = []
        for found, _ in targets:
            folded = algebra.absorb_before(found.weights, affine, defer=deferrable(found))
            check_range(folded, found)
            foldeds.append(folded)
        label = ", ".join(found.label for found, _ in targets) + via
        if self.options.dry_run or dry:
            return label
        first = path.nodes[0] if path is not None else None
        self.writer.write_before(links, targets, foldeds, first)
        return label


def run_fold(
    model: ir.Model,
    report: Report,
    options: FoldOptions,
    progress: Callable[[int, int], None] | None = None,
    source: onnx.ModelProto | None = None,
) -> None:
    """Fold ``model`` in place and fill ``report`` (entries, statistics, fold time); ``source``
    as for :func:`fold_model`. The garbage collector is paused meanwhile."""
    with gc_paused():
        _run_fold(model, report, options, progress, source)


def _run_fold(
    model: ir.Model,
    report: Report,
    options: FoldOptions,
    progress: Callable[[int, int], None] | None,
    source: onnx.ModelProto | None,
) -> None:
    t = time.perf_counter()
    sizes: dict[int, tuple[Any, int]] = {}  # tensor sizes, each counted once for both figures
    if not options.dry_run:
        report.before = model_stats(model, sizes)
    report.entries.extend(fold_model(model, options, progress, source))
    if options.reparam:
        from normfuse.onnxgraph.reparam import reparam_model

        report.entries.extend(reparam_model(model, dry_run=options.dry_run))
    report.after = model_stats(model, sizes)
    low = sorted({d for d in _low_precision_weights(model)})
    if low and report.applied:
        report.notes.append(
            f"the folded weights are {'/'.join(low)}: folding rounds them a second time, which "
            "about doubles their rounding noise (benchmarks/fp16.py); for the best accuracy fold the "
            "float32 model before converting it"
        )
    if options.dry_run:
        report.before = report.after
    report.timings["fold"] = time.perf_counter() - t


def _low_precision_weights(model: ir.Model) -> set[str]:
    kinds = {ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}
    return {
        kinds[v.const_value.dtype]
        for v in model.graph.initializers.values()
        if v.const_value is not None and v.const_value.dtype in kinds
    }
