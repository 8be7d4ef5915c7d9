"""Fold inference-mode BatchNorm into Conv/ConvTranspose/Linear in PyTorch models.

Inputs: an ``nn.Module``, a ``torch.fx.GraphModule`` or a ``torch.export.ExportedProgram``. The
maths is :mod:`normfuse.core.algebra` (float64, one rounding into the weight's dtype):

* BatchNorm after a linear op: ``W' = W * s`` on the output channels, ``b' = b * s + t`` with
  ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``.
* BatchNorm before a Linear, or before a conv that pads no input with zeros:
  ``W' = W * s`` on the input channels, ``b' = b + sum(W * t)``.

How candidates are found: the model is traced with ``torch.fx`` (Conv/Linear/BatchNorm modules
kept as calls, subclasses included when they do not override ``forward``; torchvision-style
FrozenBatchNorm too), so every call site of every module is known:

* A module called from several places is folded once when every call is followed by the same
  BatchNorm; otherwise a GraphModule gets a folded clone for the folded call, and a plain
  ``nn.Module`` (whose ``forward`` code cannot change) keeps it and reports why.
* For an ``nn.Module`` the result keeps its class: folded BatchNorms become ``nn.Identity`` and
  the linear modules get the new weights. Functional ``F.batch_norm`` with constant statistics
  folds in GraphModules and ExportedPrograms (their graph can change), not in ``forward`` code.
* When tracing fails (data-dependent control flow), pairs that ``nn.Sequential`` order proves
  adjacent still fold, and the report says so.

Every BatchNorm found becomes one report entry: applied (into which op, after or before), or
skipped with the reason (training mode, ``track_running_stats=False``, conv output used
elsewhere, zero padding, shape mismatch, ...).
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn

from normfuse.core.errors import InputError, ParityError
from normfuse.core.report import Entry, ModelStats, OutputParity, ParityResult, Report
from normfuse.core.verdict import (
    TORCH_TOLERANCES,
    compare_outputs,
    raise_for_parity,
    raise_for_strict,
)
from normfuse.torchmodel.judge import judge_float64, to_float64
from normfuse.torchmodel.modules import (
    call_module,
    eval_mode,
    module_stats,
    move_inputs,
    replace_modules,
    tensors_of,
)
from normfuse.torchmodel.normsig import NormSignature, norm_signature, tail_module
from normfuse.torchmodel.pairs import (
    BN_TARGETS,
    GUESSED_SHAPES,
    is_bn_module,
    is_linear_module,
    trace_module,
)
from normfuse.torchmodel.reparam import reparam_graph
from normfuse.torchmodel.surgery import drop_unused, fold_graph, sequential_graph
from normfuse.torchmodel.untraced import fold_untraceable, kept_buffers, uncovered_norms

__all__ = ["compare_torch_outputs", "example_args", "fold_torch", "guess_inputs"]

logger = logging.getLogger(__name__)


def _check(
    reference: Any,
    candidate: Any,
    inputs: Any,
    tolerances: Mapping[str, tuple[float, float]],
    entries: list[Entry],
) -> ParityResult:
    """The parity rule (:mod:`normfuse.torchmodel.judge`): judged in float64 where the models
    run so and the tolerances are the defaults, else at their own precision."""
    with torch.no_grad(), eval_mode(reference), eval_mode(candidate):
        ref = call_module(reference, inputs)
        out = call_module(candidate, inputs)
    native = compare_torch_outputs(ref, out, tolerances)
    parity = ParityResult("PyTorch", native, notes=["reference: the original module, eval mode"])
    if tolerances is not TORCH_TOLERANCES:
        return parity
    # a norm folded into the op before it outputs what it did, unless another norm after it
    # folded into the same op (BN -> BN): the last of each target's chain only
    last: dict[str, str] = {}
    for e in entries:
        if e.status == "applied" and e.direction == "after" and e.target is not None:
            last[e.target] = e.node
    same = set(last.values())
    judged = judge_float64(reference, candidate, inputs, (0.0, 1e-12), parity.notes, same=same)
    if judged is None or len(judged[0]) != len(native):
        return parity
    results, inner, label = judged
    refs64 = _float64_outputs(reference, inputs)
    parity.runtime = native
    parity.noise = [
        compare_outputs(o.name, r64, t.detach().to(torch.float64).cpu().numpy(), 0.0, 0.0)
        for o, r64, t in zip(native, refs64, tensors_of(ref), strict=False)
    ]
    parity.outputs = results + inner
    parity.judgement = label
    return parity


def guess_inputs(model: nn.Module, notes: list[str]) -> torch.Tensor | None:
    """An input built from the model when none was given: batch 2, the first conv's input
    channels (or the first Linear's features), a spatial size that strides up to 32 divide.
    ``None``, with a note saying nothing was compared, when the model does not run on it."""
    first = next(
        (m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)), None
    )
    param = next(iter([*model.parameters(), *model.buffers()]), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else None
    shapes: list[tuple[int, ...]] = []
    if isinstance(first, nn.Linear):
        shapes = [(2, first.in_features)]
    elif isinstance(first, nn.modules.conv._ConvNd):
        c = first.in_channels
        dims = len(first.kernel_size)
        sizes = {1: (64, 256), 2: (64, 224), 3: (16, 32)}.get(dims, (16,))
        shapes = [(2, c, *([s] * dims)) for s in sizes]
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        x = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
        try:
            with torch.no_grad(), eval_mode(model):
                call_module(model, x)
        except Exception:
            continue
        notes.append(
            f"no example_inputs: outputs compared on a generated input of shape {tuple(shape)}"
        )
        return x
    notes.append(
        "no example_inputs and none could be built from the model: outputs not compared "
        "(pass example_inputs=...)"
    )
    return None


def _float64_outputs(module: Any, inputs: Any) -> list[Any]:
    ref64 = copy.deepcopy(module).to(torch.float64)
    with torch.no_grad(), eval_mode(ref64):
        out = call_module(ref64, to_float64(inputs))
    return [t.detach().cpu().numpy() for t in tensors_of(out)]


def compare_torch_outputs(
    ref: Any, out: Any, tolerances: Mapping[str, tuple[float, float]] = TORCH_TOLERANCES
) -> list[OutputParity]:
    """Compare the tensors of two (nested) outputs pairwise."""
    refs, outs = tensors_of(ref), tensors_of(out)
    if len(refs) != len(outs):
        raise ParityError(f"the models return {len(refs)} and {len(outs)} tensors")
    results = []
    for i, (r, t) in enumerate(zip(refs, outs, strict=True)):
        dtype = str(r.dtype).replace("torch.", "")
        atol, rtol = tolerances.get(dtype, (0.0, 0.0))
        res = compare_outputs(
            f"output {i}",
            r.detach().to(torch.float64).cpu().numpy(),
            t.detach().to(torch.float64).cpu().numpy(),
            atol,
            rtol,
        )
        res.dtype = dtype
        results.append(res)
    return results


def example_args(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple | list):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _shape_prop(gm: fx.GraphModule, example_inputs: Any) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    args, kwargs = example_args(example_inputs)
    if kwargs:
        placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        args = args + tuple(kwargs[p] for p in placeholders[len(args) :] if p in kwargs)
    with torch.no_grad(), eval_mode(gm):
        ShapeProp(gm).propagate(*args)


def fold_torch(
    model: Any,
    *,
    example_inputs: Any = None,
    check: bool = True,
    inplace: bool = False,
    strict: bool = False,
    tolerances: Mapping[str, tuple[float, float]] = TORCH_TOLERANCES,
    reparam: bool = False,
) -> tuple[Any, Report]:
    """Fold BatchNorm into neighbouring Conv/ConvTranspose/Linear ops of a PyTorch model.

    Args:
        model: ``nn.Module`` (the result keeps its class), ``torch.fx.GraphModule`` (a
            GraphModule again; modules called from several places can be cloned) or
            ``torch.export.ExportedProgram`` (exported again after folding).
        example_inputs: A tensor, tuple of positional inputs or dict of keyword inputs. Used to
            verify shapes (Linear + BatchNorm1d needs ``(N, C)`` activations: without example
            inputs such a pair stays) and to check the folded model against the original
            (``check``). ExportedPrograms carry their own.
        check: Compare outputs on ``example_inputs`` and raise :class:`ParityError` beyond
            ``tolerances`` (default: 1e-5 of the output's largest magnitude for float32).
        inplace: Change ``model`` itself (``nn.Module``/``GraphModule`` only).
        strict: Raise :class:`normfuse.StrictError` when some candidate was skipped.
        tolerances: ``{dtype: (atol, rtol)}`` for the check.
        reparam: Then merge parallel/sequential linear branches into one op
            (:mod:`normfuse.torchmodel.reparam`). In an ``nn.Module``, submodules holding a
            block become their merged GraphModules (the model keeps its class); a block in the
            model's own ``forward`` is merged in a trace of the whole (``torch.fx``, else
            ``torch.export``), and the result is then that GraphModule.

    Returns:
        ``(folded_model, report)``.
    """
    report = Report(action="fold", framework="torch")
    t0 = time.perf_counter()
    folded: Any
    reference: Any
    if isinstance(model, torch.export.ExportedProgram):
        folded, reference, example_inputs = _fold_exported(model, example_inputs, report, reparam)
    elif isinstance(model, nn.Module):
        reference = model
        generated = example_inputs is None
        if generated:  # shapes for the proofs that need them, and the check
            guessed: list[str] = []
            example_inputs = guess_inputs(model, guessed)
            if (check and not inplace) or example_inputs is None:
                report.notes.extend(guessed)
            else:
                report.notes.append(
                    "no example_inputs: shapes read on a generated input of shape "
                    f"{tuple(example_inputs.shape)}; outputs not compared "
                    f"({'inplace=True' if inplace else 'check=False'})"
                )
        token = GUESSED_SHAPES.set(generated)  # a generated input shows no rank of the data
        try:
            folded = _fold_module(model, example_inputs, inplace, report)
            if reparam:
                folded = _reparam_module(folded, example_inputs, inplace, report)
        finally:
            GUESSED_SHAPES.reset(token)
        if inplace and check and example_inputs is not None:
            report.notes.append("inplace=True: the original is gone, parity not checked")
            check = False
    else:
        raise InputError(
            f"cannot fold a {type(model).__name__}",
            "pass an nn.Module, a torch.fx.GraphModule or a torch.export.ExportedProgram",
        )
    report.timings["fold"] = time.perf_counter() - t0
    if check and example_inputs is not None:
        t1 = time.perf_counter()
        inputs = (
            move_inputs(example_inputs, folded) if isinstance(folded, nn.Module) else example_inputs
        )
        ref_mod = (
            reference.module() if isinstance(reference, torch.export.ExportedProgram) else reference
        )
        out_mod = folded.module() if isinstance(folded, torch.export.ExportedProgram) else folded
        report.parity = _check(ref_mod, out_mod, inputs, tolerances, report.entries)
        report.timings["check"] = time.perf_counter() - t1
        raise_for_parity(report)
    elif check and not any("not compared" in n for n in report.notes):
        report.notes.append("no example_inputs: outputs not compared (pass example_inputs=...)")
    if strict:
        raise_for_strict(report)
    return folded, report


def _fold_module(model: nn.Module, example_inputs: Any, inplace: bool, report: Report) -> nn.Module:
    root = model if inplace else copy.deepcopy(model)
    report.before = module_stats(root)
    if isinstance(root, fx.GraphModule):
        if example_inputs is not None:
            _shape_prop(root, example_inputs)
        entries, folded = fold_graph(root, graph_mode=True)
        drop_unused(root, folded)
        report.entries.extend(entries)
        report.after = module_stats(root)
        return root
    try:
        gm = trace_module(root)
        traced = True
    except Exception as exc:  # data-dependent control flow, unsupported ops, ...
        text = str(exc).strip().splitlines()
        why = (text[0][:160] if text else "") or type(exc).__name__
        inputs = example_inputs
        if inputs is None:
            scratch: list[str] = []
            inputs = guess_inputs(root, scratch)
            if inputs is not None:
                report.notes.append(
                    f"no example_inputs: torch.export and the call counts ran on a generated "
                    f"input of shape {tuple(inputs.shape)}"
                )
        if inputs is not None:
            try:
                root = fold_untraceable(root, inputs, why, report)
                report.after = module_stats(root)
                return root
            except Exception as exc2:  # the model does not run on the inputs, ...
                report.entries.clear()
                report.notes.append(f"torch.export/submodule tracing failed: {exc2}")
        report.notes.append(
            f"torch.fx could not trace {type(root).__name__} ({why}); "
            "folded only pairs that nn.Sequential order proves adjacent"
        )
        seq = sequential_graph(root)
        if seq is None:
            report.entries.extend(uncovered_norms(root, set(), f"torch.fx: {why}"))
            report.after = module_stats(root)
            return root
        gm, traced = seq, False
    if traced and example_inputs is not None:
        try:
            _shape_prop(gm, example_inputs)
        except Exception as exc:
            report.notes.append(
                f"shapes not propagated: {str(exc).splitlines()[0] if str(exc) else exc}"
            )
    entries, folded = fold_graph(gm, graph_mode=False)
    names = {n: m for n, m in gm.named_modules()}
    counts: dict[int, int] = {}
    for _, m in root.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    identity: dict[int, nn.Module] = {}
    for target in folded:
        m = names[target]
        sig = norm_signature(m)  # a norm's own modules after it (drop, act) stay, in order
        identity[id(m)] = tail_module(sig.tail if isinstance(sig, NormSignature) else [])
    report.entries.extend(entries)
    root = replace_modules(root, identity)
    if not traced:
        for e in report.entries:
            if e.status == "applied":
                e.warnings.append("adjacent in nn.Sequential; calls from elsewhere are not visible")
        seen = {e.node for e in report.entries}
        report.entries.extend(uncovered_norms(root, seen, "torch.fx could not trace the model"))
    report.after = module_stats(root)
    return root


def _reparam_module(root: nn.Module, example_inputs: Any, inplace: bool, report: Report) -> Any:
    """The branch merges of ``root`` (already BN-folded): on ``root`` itself when it is a
    GraphModule; else in its submodules (:func:`_reparam_parts`, the model keeps its class), then
    on a traced copy of the whole, returned when a block merged there."""
    if isinstance(root, fx.GraphModule):
        report.entries.extend(reparam_graph(root, earlier=report.entries))
        report.after = module_stats(root)
        return root
    found, replaced = _reparam_parts(root, example_inputs, report)
    how = "torch.fx"
    try:
        gm: Any = trace_module(root)
    except Exception as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        gm = None
        if example_inputs is not None:
            args, kwargs = example_args(example_inputs)
            try:
                with kept_buffers(root), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    gm = torch.export.export(root, args, kwargs, strict=False).module()
                how = "torch.export"
            except Exception as exc2:
                why += f"; torch.export: {(str(exc2).strip().splitlines() or [''])[0][:160]}"
        if gm is None:
            report.notes.append(f"reparam: the model as a whole could not be traced ({why})")
    entries = reparam_graph(gm, earlier=report.entries) if gm is not None else []
    for e in entries:
        if e.status == "applied" or e.node not in found:
            found[e.node] = e
    report.entries.extend(sorted(found.values(), key=lambda e: _path_key(e.node)))
    if replaced:
        replaced.sort(key=_path_key)
        report.notes.append(
            f"reparam: merged inside {len(replaced)} submodule(s), each replaced by its merged "
            f"torch.fx GraphModule ({', '.join(replaced[:3])}{', ...' if len(replaced) > 3 else ''}"
            f"); the model keeps its class {type(root).__name__}"
        )
    if not any(e.status == "applied" for e in entries):
        report.after = module_stats(root)
        return root
    report.notes.append(
        f"reparam: merged in a {how} GraphModule of {type(root).__name__} (a block in its own "
        f"forward): the result is that GraphModule (its submodules keep their names), not a "
        f"{type(root).__name__}"
        + ("; inplace=True changed the model's BN folds only" if inplace else "")
    )
    report.after = module_stats(gm)
    return gm


def _path_key(path: str) -> list[tuple[int, int | str]]:
    """A module path as a sort key: ``stages.10`` after ``stages.9``."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in path.split(".")]


def _reparam_parts(
    root: nn.Module, example_inputs: Any, report: Report
) -> tuple[dict[str, Entry], list[str]]:
    """Merge inside the outermost submodules that ``torch.fx`` traces alone (a nested block is
    then merged once, in one rounding) and replace each where a block merged by its merged
    GraphModule, so that the model keeps its class.

    Only submodules that every call on ``example_inputs`` (forward pre-hooks) passes tensors
    only, positionally, one for each parameter of ``forward``: a trace alone reads optional
    arguments as given, which a call without them would contradict. Returns the entries by
    block and the submodules replaced."""
    found: dict[str, Entry] = {}
    replaced: list[str] = []
    if example_inputs is None:
        return found, replaced
    plain: dict[int, bool] = {}

    def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            params = list(inspect.signature(m.forward).parameters.values())
        except (TypeError, ValueError):
            params = []
        good = (
            not kwargs
            and len(args) == len(params)
            and all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
            and all(isinstance(a, torch.Tensor) for a in args)
        )
        plain[id(m)] = plain.get(id(m), True) and good

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in root.modules()]
    try:
        with torch.no_grad(), kept_buffers(root), eval_mode(root):
            call_module(root, move_inputs(example_inputs, root))
    except Exception:
        return found, replaced
    finally:
        for h in handles:
            h.remove()
    covered: list[str] = []  # traced whole: their blocks are all seen there
    for name, sub in root.named_modules():
        if (
            not name
            or any(name.startswith(f"{c}.") for c in covered)
            or not plain.get(id(sub))
            or not any(True for _ in sub.children())
            or isinstance(sub, fx.GraphModule)
            or is_linear_module(sub)
            or is_bn_module(sub)
        ):
            continue
        try:
            gm = trace_module(sub)
        except Exception:
            continue  # its children are tried
        covered.append(name)
        entries = reparam_graph(gm, earlier=report.entries, prefix=name)
        for e in entries:
            found[e.node] = e
        if any(e.status == "applied" for e in entries):
            parent, _, leaf = name.rpartition(".")
            for key, value in vars(sub).items():  # what code around it reads (ultralytics'
                if not key.startswith("_") and key not in vars(gm):  # m.f, m.i in the parent)
                    vars(gm)[key] = value
            setattr(root.get_submodule(parent) if parent else root, leaf, gm)
            replaced.append(name)
    return found, replaced


def _fold_exported(
    ep: torch.export.ExportedProgram, example_inputs: Any, report: Report, reparam: bool = False
) -> tuple[torch.export.ExportedProgram, torch.export.ExportedProgram, Any]:
    with warnings.catch_warnings():  # torch's own pytree deprecation noise on deepcopy
        warnings.simplefilter("ignore", FutureWarning)
        gm: Any = copy.deepcopy(ep.module())  # its tensors are ep's own: fold a private copy
    report.before = _ep_stats(ep)
    if example_inputs is None and ep.example_inputs is not None:
        args, kwargs = ep.example_inputs
        example_inputs = kwargs if kwargs and not args else args
    if example_inputs is None:
        raise InputError(
            "the ExportedProgram carries no example inputs",
            "pass example_inputs=... (needed to export the folded program again)",
        )
    entries, folded = fold_graph(gm, graph_mode=True)
    drop_unused(gm, folded)
    report.entries.extend(entries)
    if reparam:
        report.entries.extend(reparam_graph(gm, earlier=report.entries))
    args, kwargs = example_args(example_inputs)
    dynamic = _dynamic_shapes(ep, args, kwargs)
    try:
        new = torch.export.export(gm, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        if dynamic is None:
            raise
        report.notes.append(
            f"re-export with dynamic shapes failed ({str(exc).splitlines()[0]}); static shapes used"
        )
        new = torch.export.export(gm, args, kwargs, strict=False)
    report.after = _ep_stats(new)
    return new, ep, example_inputs


def _dynamic_shapes(
    ep: torch.export.ExportedProgram, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The dynamic dimensions of ``ep``'s user inputs, as ``Dim.DYNAMIC`` specs (or ``None``)."""
    from torch.export.graph_signature import InputKind

    user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    specs: list[dict[int, Any] | None] = []
    any_dynamic = False
    for name in user:
        val = nodes[name].meta.get("val") if name in nodes else None
        if not isinstance(val, torch.Tensor):
            specs.append(None)
            continue
        dims = {
            i: torch.export.Dim.DYNAMIC for i, d in enumerate(val.shape) if not isinstance(d, int)
        }
        any_dynamic |= bool(dims)
        specs.append(dims or None)
    if not any_dynamic or kwargs or len(specs) != len(args):
        return None
    return tuple(specs)


def _ep_stats(ep: torch.export.ExportedProgram) -> ModelStats:
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    return ModelStats(
        nodes=len(calls),
        norm_nodes=sum(1 for n in calls if n.target in BN_TARGETS),
        batchnorm_nodes=sum(1 for n in calls if n.target in BN_TARGETS),
        param_bytes=sum(t.numel() * t.element_size() for t in ep.state_dict.values()),
    )
