"""Folding in an ``nn.Module`` that ``torch.fx`` cannot trace as a whole (data-dependent control
flow, shape arithmetic such as timm's ``Conv2dSame`` padding, mobilevit's ``if new_h != H``).

With an example input (given, or built from the model), two methods, in this order:

1. ``torch.export.export(model, args, strict=False)``: the exported graph (unlifted, so its
   ``get_attr`` targets are the model's own parameter and buffer names) is searched with the
   same matchers as any graph (:func:`normfuse.torchmodel.pairs.as_norm`/``match_pair``, and
   :class:`~normfuse.torchmodel.affinechain.ChainFinder` for frozen BN written out). Each pair
   is mapped back to modules by the tensors its ops read (the conv's ``<path>.weight``/``bias``,
   the norm's ``<path>.running_mean``; a mul/add chain by its ``nn_module_stack``), and folds
   only when the linear module is a Conv/ConvTranspose/Linear whose parameters the op reads,
   the norm module's forward is a norm (:func:`~normfuse.torchmodel.normsig.norm_signature`)
   whose affine is the one the graph computes, and forward hooks on the example input show
   both modules called exactly once (the graph shows that one call's neighbours).
2. Else each child subtree that ``torch.fx`` traces is folded on its own graph (recursing into
   the children of those that do not trace); a pair folds only when hooks show each involved
   module called as often in the whole model as in that subtree's graph.

The model keeps its class: the linear module gets the folded weights (the maths of
:func:`normfuse.torchmodel.surgery.fold_pair`), the norm module is replaced by its tail
(``nn.Identity`` or its own drop/act). Each applied entry warns how the pair was found; every
norm module not covered gets a skipped entry with the tracing error.

Imports: torch, numpy, :mod:`normfuse.core` and the torchmodel package.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from normfuse.core.report import Entry, Report
from normfuse.torchmodel.affinechain import ChainFinder
from normfuse.torchmodel.modules import call_module, hidden_behaviour, replace_modules, tensors_of
from normfuse.torchmodel.normsig import NormSignature, norm_signature, tail_module
from normfuse.torchmodel.pairs import (
    FUNC_BN,
    Linear,
    Norm,
    Pair,
    as_norm,
    call_args,
    inert,
    is_bn_module,
    match_pair,
    trace_module,
)
from normfuse.torchmodel.plan import call_sites
from normfuse.torchmodel.surgery import fold_graph, fold_pair

__all__ = ["fold_untraceable", "kept_buffers", "observe_calls", "uncovered_norms"]

logger = logging.getLogger(__name__)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:160] if text else "") or type(exc).__name__


def observe_calls(root: nn.Module, inputs: Any) -> tuple[dict[int, int], dict[int, set[int]]]:
    """How often each module of ``root`` runs on ``inputs``, and which leaf modules (no
    children) receive each module's outputs, by ``id`` (hooks on one run; the tensors are held
    until it ends, so that no ``id`` is reused). A module that returns its input unchanged
    (eval dropout, ``nn.Identity``) leaves no op in an exported graph; here it shows as a
    second receiver of the tensor it passes on."""
    counts: dict[int, int] = {}
    produced: dict[int, list[torch.Tensor]] = {}
    received: dict[int, set[int]] = {}
    held: list[torch.Tensor] = []
    handles = []

    def before(m: nn.Module, args: Any, kwargs: Any) -> None:
        for t in tensors_of((args, kwargs)):
            held.append(t)
            received.setdefault(id(t), set()).add(id(m))

    def after(m: nn.Module, _args: Any, out: Any) -> None:
        counts[id(m)] = counts.get(id(m), 0) + 1
        for t in tensors_of(out):
            held.append(t)
            produced.setdefault(id(m), []).append(t)

    for m in root.modules():
        handles.append(m.register_forward_hook(after))
        if not any(True for _ in m.children()):
            handles.append(m.register_forward_pre_hook(before, with_kwargs=True))
    try:
        with torch.no_grad(), kept_buffers(root):
            call_module(root, inputs)
    finally:
        for h in handles:
            h.remove()
    receivers = {
        m: set().union(*(received.get(id(t), set()) for t in outs)) - {m}
        for m, outs in produced.items()
    }
    return counts, receivers


@contextlib.contextmanager
def kept_buffers(root: nn.Module) -> Iterator[None]:
    """Running the model (hooks, export) leaves its buffers as they were (training-mode BN)."""
    saved = [(b, b.detach().clone()) for b in root.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def _args(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, tuple | list):
        return tuple(inputs), {}
    return (inputs,), {}


class _Untraced:
    def __init__(self, root: nn.Module, inputs: Any, error: str, report: Report) -> None:
        self.root = root
        self.inputs = inputs
        self.error = error
        self.report = report
        self.modules = dict(root.named_modules())
        self.names = {id(m): n for n, m in root.named_modules()}
        self.calls, self.receivers = observe_calls(root, inputs)
        self.entries: dict[str, Entry] = {}
        self.replace: dict[int, nn.Module] = {}
        self.done: set[int] = set()  # linear modules that took a fold

    # ----------------------------------------------------------------------------- export
    def by_export(self) -> str | None:
        """Fold what torch.export shows; the export error, or ``None``."""
        args, kwargs = _args(self.inputs)
        try:
            with kept_buffers(self.root), _quiet():
                ep = torch.export.export(self.root, args, kwargs, strict=False)
            gm = ep.module()
        except Exception as exc:
            return _first_line(exc)
        how = "found by torch.export"
        for node in list(gm.graph.nodes):
            norm = as_norm(gm, node)
            if norm is None:
                continue
            path = self._norm_path(norm)
            entry = self._entry(path, norm)
            if norm.affine is None:
                entry.reason, entry.fix = norm.reason, norm.fix
                continue
            found = match_pair(gm, norm)
            if not isinstance(found, Pair):
                entry.reason, entry.fix = found
                continue
            self._apply(gm, found, path, entry, how)
        for chain in ChainFinder(gm).find():
            if not isinstance(chain, Pair):
                continue
            path = self._chain_path(chain.norm)
            if path is None:
                continue
            entry = self._entry(path, chain.norm)
            self._apply(gm, chain, path, entry, how)
        return None

    def _norm_path(self, norm: Norm) -> str:
        node = norm.erase[-1]
        if node.target in FUNC_BN:
            rm = call_args(node, FUNC_BN[node.target]).get("running_mean")
            if isinstance(rm, fx.Node) and rm.op == "get_attr":
                return str(rm.target).rpartition(".")[0]
        return norm.name

    def _chain_path(self, norm: Norm) -> str | None:
        """The one module whose forward computes every node of a mul/add chain."""
        paths = set()
        for n in norm.erase:
            stack = n.meta.get("nn_module_stack")
            if not stack:
                return None
            paths.add(str(list(stack.values())[-1][0]))
        if len(paths) != 1:
            return None
        path = paths.pop()
        m = self.modules.get(path)
        return path if m is not None and is_bn_module(m) else None

    def _entry(self, path: str, norm: Norm) -> Entry:
        m = self.modules.get(path)
        op_type = type(m).__name__ if m is not None else norm.op_type
        return self.entries.setdefault(path, Entry(path, op_type, "skipped"))

    def _apply(self, gm: fx.GraphModule, pair: Pair, path: str, entry: Entry, how: str) -> None:
        if entry.status == "applied":
            return
        reason = self._refusal(gm, pair, path)
        if reason is not None:
            entry.reason = reason
            return
        norm_mod = self.modules[path]
        lin_path = pair.lin.owner.rpartition(".")[0]
        lin_mod = self.modules[lin_path]
        sig = norm_signature(norm_mod)
        assert isinstance(sig, NormSignature)
        lin = Linear(
            pair.lin.node,
            pair.lin.kind,
            pair.lin.groups,
            pair.lin.zero_padded,
            lin_path,
            lin_mod,
            lin_mod.weight,  # type: ignore[arg-type]
            lin_mod.bias,  # type: ignore[arg-type]
            type(lin_mod).__name__,
        )
        folded = Pair(pair.norm, lin, pair.direction)
        failed = fold_pair(gm, folded, False, [0])
        if failed is not None:
            entry.reason = failed
            return
        self.done.add(id(lin_mod))
        self.replace[id(norm_mod)] = tail_module(sig.tail)
        entry.status, entry.direction = "applied", pair.direction
        entry.target = f"{type(lin_mod).__name__} '{lin_path}'"
        entry.reason = entry.fix = None
        entry.warnings = [how, *(w for w in pair.warnings if "assumed" not in w)]

    def _refusal(self, gm: fx.GraphModule, pair: Pair, path: str) -> str | None:
        lin, norm = pair.lin, pair.norm
        if pair.parts:  # the modules of each conv would need mapping; not done here
            return (
                "BN after a channel concat of convs: split across them only in a model torch.fx "
                "traces (or a GraphModule/ExportedProgram of it)"
            )
        norm_mod = self.modules.get(path)
        lin_path, _, leaf = lin.owner.rpartition(".")
        lin_mod = self.modules.get(lin_path)
        if norm_mod is None or lin_mod is None or leaf != "weight":
            return "torch.export found the pair, but not the modules that hold its tensors"
        if not isinstance(lin_mod, nn.modules.conv._ConvNd | nn.Linear):
            return f"{lin.label} reads the weight of a {type(lin_mod).__name__}, not a Conv/Linear"
        for what, module in (("", norm_mod), (f"module '{lin_path}': ", lin_mod)):
            hidden = hidden_behaviour(module)
            if hidden is not None:  # the exported graph ran them; the modules would lose them
                return what + hidden
        transposed = bool(getattr(lin_mod, "transposed", False))
        kind = (
            "dense"
            if isinstance(lin_mod, nn.Linear)
            else ("conv_transpose" if transposed else "conv")
        )
        if kind != lin.kind or int(getattr(lin_mod, "groups", 1)) != lin.groups:
            return f"{lin.label} computes differently from module '{lin_path}'"
        bias = call_args(lin.node, ("input", "weight", "bias")).get("bias")
        if lin.module is None:
            if bias is None and lin_mod.bias is not None:
                return f"{lin.label} ignores module '{lin_path}''s bias"
            if bias is not None and (
                not isinstance(bias, fx.Node) or str(bias.target) != f"{lin_path}.bias"
            ):
                return f"{lin.label} adds a bias that is not module '{lin_path}''s"
        if id(lin_mod) in self.done:
            return f"module '{lin_path}' already took another fold"
        if len(call_sites(gm, lin.owner, False)) != 1:
            return f"the weight of module '{lin_path}' is read by several ops"
        for what, m in (("linear", lin_mod), ("norm", norm_mod)):
            n = self.calls.get(id(m), 0)
            if n != 1:
                name = self.names.get(id(m), "?")
                return f"module '{name}' runs {n} times on the example input: each {what} call must fold"
        src, dst = (norm_mod, lin_mod) if pair.direction == "before" else (lin_mod, norm_mod)
        own = {id(c) for c in (*src.modules(), *dst.modules())}  # a norm's own drop/act
        between = self.receivers.get(id(src), set()) - own
        if between:  # an eval dropout or Identity module the exported graph does not show
            via = ", ".join(sorted(f"module '{self.names.get(i, '?')}'" for i in between))
            return (
                f"module '{self.names.get(id(src), '?')}' feeds module "
                f"'{self.names.get(id(dst), '?')}' through {via} (which returns its input in "
                "eval): folding across it is not done, the module would output other values"
            )
        sig = norm_signature(norm_mod)
        if not isinstance(sig, NormSignature):
            return sig or f"module '{path}' is not a norm normfuse can read"
        if pair.direction == "before" and not inert(sig.tail):
            return f"module '{path}' runs {', '.join(n for n, _ in sig.tail)} after the norm"
        assert norm.affine is not None
        ours, theirs = sig.affine.expand(norm.affine.scale.size), norm.affine
        close = np.allclose(ours.scale, theirs.scale, rtol=1e-9, atol=0) and np.allclose(
            ours.shift,
            theirs.shift,
            rtol=1e-9,
            atol=1e-12 * max(1.0, float(np.abs(theirs.shift).max(initial=0))),
        )
        if not close:
            return f"the exported graph computes a different affine from module '{path}''s forward"
        return None

    # -------------------------------------------------------------------------- subtrees
    def by_subtrees(self, export_error: str) -> None:
        self._walk(self.root, "", [])

    def _walk(self, module: nn.Module, prefix: str, above: list[tuple[nn.Module, str]]) -> None:
        """Trace each child of ``module`` (whose own code torch.fx could not trace)."""
        for name, child in module.named_children():
            qual = f"{prefix}{name}"
            if not any(is_bn_module(m) for m in child.modules()) or is_bn_module(child):
                continue  # a norm called from the untraceable code itself: reported at the end
            path = [*above, (module, name)]
            try:
                gm = trace_module(child)
            except Exception as exc:
                logger.debug("submodule %s not traceable: %s", qual, _first_line(exc))
                self._walk(child, qual + ".", path)
                continue
            self._fold_subtree(qual, child, gm, _reaches_inside(path))

    def _fold_subtree(
        self, qual: str, child: nn.Module, gm: fx.GraphModule, inside: str | None
    ) -> None:
        sub = dict(gm.named_modules())
        runs = self.calls.get(id(child), 0)

        def veto(pair: Pair) -> str | None:
            if inside is not None:
                return inside
            targets = [lin.owner for lin in pair.linears if lin.module is not None]
            if pair.norm.module_target is not None:
                targets.append(pair.norm.module_target)
            for t in targets:
                m = sub[t]
                here = len(call_sites(gm, t, True))
                whole = self.calls.get(id(m), 0)
                if whole != here * runs:
                    return (
                        f"module '{qual}.{t}' runs {whole} times on the example input, "
                        f"{here * runs} of them through submodule '{qual}'"
                    )
            return None

        entries, folded = fold_graph(gm, graph_mode=False, veto=veto)
        for target in folded:
            m = sub[target]
            sig = norm_signature(m)
            self.replace[id(m)] = tail_module(sig.tail if isinstance(sig, NormSignature) else [])
        for e in entries:
            e.node = f"{qual}.{e.node}"
            if e.target is not None:
                op, _, name = e.target.partition(" '")
                e.target = f"{op} '{qual}.{name}" if name else e.target
            if e.status == "applied":
                e.warnings.append(f"by tracing submodule '{qual}'")
                if not runs:
                    e.warnings.append(
                        f"submodule '{qual}' did not run on the example input: the fold rests "
                        "on its own graph and on no other code calling its modules"
                    )
            elif e.reason:
                e.reason = e.reason.replace(
                    "model input '", f"the input of submodule '{qual}' (from untraceable code) '"
                )
            self.entries.setdefault(e.node, e)

    # ---------------------------------------------------------------------------- finish
    def finish(self, why: str) -> nn.Module:
        self.report.entries.extend(self.entries.values())
        self.report.entries.extend(uncovered_norms(self.root, set(self.entries), why))
        return replace_modules(self.root, self.replace)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch logs the partial graph and its guards when an export fails: the note says why."""
    names = ("torch", "torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export")
    logs = [logging.getLogger(n) for n in names]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # it prints the partial graph there
            yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


def _reaches_inside(path: list[tuple[nn.Module, str]]) -> str | None:
    """Why the untraceable code above a submodule may call its modules directly: its source
    names an attribute of the submodule (``self.block.conv``), else ``None``."""
    for module, name in path:
        try:
            source = inspect.getsource(type(module).forward)
        except (OSError, TypeError):
            continue
        if re.search(rf"\b{re.escape(name)}\s*\.\s*[A-Za-z_]", source):
            return (
                f"the untraceable code of {type(module).__name__} reaches inside '{name}' "
                f"({name}.<attribute>): its modules may be called from there too"
            )
    return None


def uncovered_norms(root: nn.Module, seen: set[str], why: str) -> list[Entry]:
    """A skipped entry for each norm module of ``root`` not named in ``seen``."""
    out = []
    for name, m in root.named_modules():
        if name and is_bn_module(m) and name not in seen:
            out.append(
                Entry(
                    name,
                    type(m).__name__,
                    "skipped",
                    reason=f"not in a graph normfuse could read: {why}",
                    fix="make the model traceable, or pass example_inputs torch.export accepts",
                )
            )
    return out


def fold_untraceable(root: nn.Module, inputs: Any, fx_error: str, report: Report) -> nn.Module:
    """Fold ``root`` (module docstring); ``inputs`` run the model once (hooks, export)."""
    work = _Untraced(root, inputs, fx_error, report)
    export_error = work.by_export()
    if export_error is None:
        report.notes.append(
            f"torch.fx could not trace {type(root).__name__} ({fx_error}); pairs found by "
            "torch.export (non-strict) on the example input, folded in the modules"
        )
        return work.finish(f"torch.fx: {fx_error}; not in torch.export's graph either")
    report.notes.append(
        f"torch.fx could not trace {type(root).__name__} ({fx_error}) and torch.export failed "
        f"({export_error}); submodules that torch.fx traces were folded on their own"
    )
    work.by_subtrees(export_error)
    return work.finish(f"torch.fx: {fx_error}; torch.export: {export_error}")
