"""The Python API: fold, inspect and check ONNX models.

Example, inside an export pipeline::

    import torch, normfuse

    program = torch.onnx.export(model.eval(), (x,), dynamo=True, optimize=False)
    folded, report = normfuse.fold(program)        # an ONNXProgram again, parity checked
    print(len(report.applied), "folded;", [e.reason for e in report.skipped])
    normfuse.save(folded, "model.onnx")
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import onnx
import onnx_ir as ir

from normfuse.core.errors import InputError, NormfuseError, StrictError
from normfuse.core.report import ParityResult, Report
from normfuse.core.verdict import FOLD_TOLERANCES, judge_parity, raise_for_parity, raise_for_strict
from normfuse.onnxgraph import handover
from normfuse.onnxgraph import io as onnx_io
from normfuse.onnxgraph.fold import FoldOptions, fold_model, model_stats, run_fold
from normfuse.onnxgraph.protos import to_proto
from normfuse.runtime.parity import check_models

__all__ = [
    "StrictError",
    "apply_rewrite",
    "check",
    "export",
    "fold",
    "insert",
    "inspect",
    "judge_parity",
    "load",
    "lower_norms",
    "onnx_rewrite",
    "raise_norms",
    "recalibrate",
    "save",
    "swap",
]

logger = logging.getLogger(__name__)

M = TypeVar("M")


def load(source: object) -> ir.Model:
    """Read a model (path, bytes, ModelProto, onnx_ir.Model, ONNXProgram).

    From a path the read is lazy, as the command's: tensors of 1 KiB or more stay in the file
    (memory maps) and are read when used or copied file to file by :func:`save`. The file must
    stay unchanged until then: :func:`save` (and any rewrite) checks its size, inode and
    modification time and refuses a changed file (docs/python.md).

    From a path or ``bytes`` the model is a :class:`normfuse.onnxgraph.handover.LoadedModel`
    (an ``onnx_ir.Model``): a rewrite of it that comes before the caller looks into its graph
    takes that graph instead of copying it, and the model reads its graph again when next
    looked at.
    """
    loaded = onnx_io.load(source, copy=False, lazy=True)
    handover.remember(loaded.model, loaded.proto)  # a rewrite of it unchanged starts from this
    if isinstance(source, bytes):  # immutable: read again from the same bytes
        return handover.LoadedModel(loaded.model, functools.partial(_read_again, source, None))
    if loaded.path is None:
        return loaded.model
    path = Path(os.path.abspath(loaded.path))
    read = functools.partial(_read_again, path, onnx_io.file_state(path))
    return handover.LoadedModel(loaded.model, read, path)


def _read_again(source: Path | bytes, state: object, model: ir.Model) -> ir.Model:
    """``model``'s graph read again from its source, once a rewrite took the first; refused
    when the file (or a file it reads) changed since ``model`` was read (``state``: the
    model file's then)."""
    onnx_io.check_unchanged(model)
    if isinstance(source, Path) and onnx_io.file_state(source) != state:
        raise InputError(
            f"{source} changed since the model was read from it",
            "load the model again; keep the file unchanged until the model is saved "
            "(docs/python.md: lazy loading)",
        )
    loaded = onnx_io.load(source, copy=False, lazy=True)
    handover.remember(loaded.model, loaded.proto)
    return loaded.model


def save(
    model: object,
    path: str | os.PathLike,
    *,
    force: bool = False,
    external_data: bool | None = None,
) -> Path:
    """Write a model atomically; see :func:`normfuse.onnxgraph.io.save`."""
    return onnx_io.save(model, path, force=force, external_data=external_data)


def fold(
    model: M,
    *,
    check: bool = True,
    strict: bool = False,
    norm_affine: bool = False,
    provider: str = "auto",
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    progress: Callable[[int, int], None] | None = None,
    example_inputs: Any = None,
    reparam: bool = False,
) -> tuple[M | ir.Model, Report]:
    """Fold inference-mode normalization into neighbouring linear ops.

    PyTorch models (``nn.Module``, ``torch.fx.GraphModule``, ``torch.export.ExportedProgram``,
    and the path of a ``torch.export.save`` archive, ``.pt2``, read without running anything
    from it, which gives an ExportedProgram) are folded by
    :func:`normfuse.torchmodel.fold.fold_torch` (``example_inputs`` then serve the check).

    The input is never modified. The result has the type of the input (``onnx.ModelProto``,
    ``bytes``, ``onnx_ir.Model``, ``torch.onnx.ONNXProgram``); a path gives an ``onnx_ir.Model``
    whose untouched tensors still read lazily from the input file and its external data, as
    :func:`load` (the file must stay unchanged until the model is saved; a change is refused).

    Args:
        model: The model.
        check: Compare the folded model with the original on onnxruntime (seeded random
            inputs, ``ORT_DISABLE_ALL``) and raise :class:`ParityError` on a mismatch.
        strict: Raise :class:`StrictError` when some candidate was skipped.
        norm_affine: Also fold the gamma/beta of LayerNorm/GroupNorm/InstanceNorm/RMSNorm and
            plain Mul/Add chains into the following linear ops.
        provider: ``auto``, ``cuda`` or ``cpu`` for the check.
        seed: Seed of the check's inputs.
        shapes: Shapes for inputs with dynamic non-batch dimensions, for the check.
        progress: Called with ``(done, total)``.
        reparam: Then merge parallel/sequential linear branches into one op (RepVGG,
            MobileOne, ...; docs/reparam.md). ONNX: in the graph. PyTorch: a GraphModule or
            ExportedProgram in its graph; in an ``nn.Module``, each submodule holding a block
            becomes its merged GraphModule (the model keeps its class), and a block in the
            model's own ``forward`` makes the result a traced GraphModule of the whole.

    Returns:
        ``(folded_model, report)``.

    Raises:
        InputError: The model cannot be read.
        ParityError: ``check`` found a mismatch (``exc.report`` has the figures).
        StrictError: ``strict`` and something was skipped.
    """
    if isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() == ".pt2":
        from normfuse.torchmodel.export import load_pt2

        model = load_pt2(model)  # type: ignore[assignment]  # validated, no pickled code run
    if _is_torch(model):
        from normfuse.torchmodel.fold import fold_torch

        _refuse_onnx_options(
            model,
            norm_affine=(norm_affine, False),
            provider=(provider, "auto"),
            seed=(seed, 0),
            shapes=(shapes, None),
        )
        return fold_torch(
            model, example_inputs=example_inputs, check=check, strict=strict, reparam=reparam
        )
    report = Report(action="fold")
    t0 = time.perf_counter()
    loaded = onnx_io.load(model, lazy=True)
    reference = _reference_bytes(model, loaded) if check else None
    report.timings["load"] = time.perf_counter() - t0
    options = FoldOptions(norm_affine=norm_affine, reparam=reparam)
    run_fold(loaded.model, report, options, progress, loaded.take_proto())
    if check:
        t1 = time.perf_counter()
        report.parity = _check_in_memory(
            loaded,
            reference,
            provider=provider,
            seed=seed,
            shapes=shapes,
            defaults=FOLD_TOLERANCES,
            upcast=True,
        )
        report.timings["check"] = time.perf_counter() - t1
        raise_for_parity(report)
    if strict:
        raise_for_strict(report)
    return onnx_io.to_kind(loaded, loaded.model), report


def inspect(model: object, *, norm_affine: bool = False) -> Report:
    """What :func:`fold` would do, without changing anything."""
    loaded = onnx_io.load(model, copy=False, lazy=True)
    report = Report(action="inspect")
    options = FoldOptions(norm_affine=norm_affine, dry_run=True)
    run_fold(loaded.model, report, options, None, loaded.take_proto())
    if not norm_affine:
        _suggest_only_what_folds(loaded.model, report)
    from normfuse.onnxgraph.edit import FUSED_MIN_OPSET
    from normfuse.onnxgraph.raise_norms import raise_model

    if model_stats(loaded.model).param_bytes < 256 * 2**20:
        _infer_shapes(loaded.model)  # LayerNorm matching needs the normalised dimensions
    _, raisable, _ = raise_model(
        loaded.model, target_opset=max(FUSED_MIN_OPSET.values()), dry_run=True
    )
    report.entries.extend(raisable)  # decomposed norms, and what `normfuse raise` would write
    return report


def _suggest_only_what_folds(model: ir.Model, report: Report) -> None:
    """Keep the "pass --norm-affine" fix only on entries that it would fold (a dry run with it
    says so); elsewhere say why it would not."""
    hinted = [e for e in report.entries if e.fix and "--norm-affine" in e.fix]
    if not hinted:
        return
    probe = {
        (e.graph, e.node): e for e in fold_model(model, FoldOptions(norm_affine=True, dry_run=True))
    }
    for e in hinted:
        other = probe.get((e.graph, e.node))
        if other is not None and other.status == "foldable":
            continue
        e.fix = None
        if other is not None and other.reason:
            e.reason = f"{e.reason}; its gamma/beta would not fold either: {other.reason}"


def check(
    reference: object,
    candidate: object,
    *,
    provider: str = "auto",
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    runs: int = 1,
    opt_level: str = "disable",
    atol: Mapping[str, float] | float | None = None,
    rtol: Mapping[str, float] | float | None = None,
    inputs: Sequence[Mapping[str, Any]] | str | os.PathLike | None = None,
    bisect: bool = False,
    cross_check: bool = False,
) -> ParityResult:
    """Compare two models on onnxruntime; see :func:`normfuse.runtime.parity.check_models`.

    ``inputs``: batches (``{input name: array}`` each), or what the command's ``--inputs``
    takes: an ``.npz`` file (one batch) or a folder of them."""
    if isinstance(inputs, str | os.PathLike):
        from normfuse.runtime.inputs import load_inputs

        inputs = load_inputs(inputs)
    elif inputs is not None:
        batches = [] if isinstance(inputs, Mapping) else list(inputs)
        if not batches or not all(isinstance(b, Mapping) for b in batches):
            raise InputError(
                "inputs must be a list of batches, each a {input name: array} mapping",
                "wrap one batch in a list ([batch]), or pass the path of an .npz file or folder",
            )
        inputs = batches
    with tempfile.TemporaryDirectory(prefix="normfuse-") as tmp:
        a = _as_source(reference, Path(tmp) / "reference.onnx")
        b = _as_source(candidate, Path(tmp) / "candidate.onnx")
        return check_models(
            a,
            b,
            provider=provider,
            seed=seed,
            shapes=shapes,
            runs=runs,
            opt_level=opt_level,
            atol=atol,
            rtol=rtol,
            inputs=inputs,
            bisect=bisect,
            cross_check=cross_check,
            upcast=True,
        )


def _reference_bytes(model: object, loaded: onnx_io.Loaded) -> bytes | None:
    """The original model for the check, taken before folding, without another round trip."""
    if loaded.path is not None or onnx_io.reads_lazily(loaded.model):
        return None  # checked from the file
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    return to_proto(loaded.model).SerializeToString()  # the private copy, not yet folded


def _as_source(model: object, spill: Path) -> str | bytes:
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    inner = onnx_io.unwrap(model)
    if onnx_io.has_external_data(inner):
        onnx_io.save(inner, spill, force=True, external_data=True)
        return str(spill)
    if onnx_io.reads_lazily(inner):  # tensors still in the input file: copied file to file
        onnx_io.save(inner, spill, force=True, external_data=False)
        return str(spill)
    return to_proto(inner).SerializeToString()


def _reference_source(loaded: onnx_io.Loaded, reference: bytes | None, folder: Path) -> str | bytes:
    """The original for the check: its file, its bytes, or the caller's untouched model (the
    rewrite worked on a copy) written with its external data into ``folder``."""
    if loaded.path is not None:
        return str(loaded.path)
    if reference is not None:
        return reference
    if loaded.original is not None:
        return _as_source(loaded.original, folder / "reference.onnx")
    raise NormfuseError("the original model was not kept for the check")


def _check_in_memory(
    loaded: onnx_io.Loaded, reference: bytes | None, **kwargs: Any
) -> ParityResult:
    with tempfile.TemporaryDirectory(prefix="normfuse-") as tmp:
        ref = _reference_source(loaded, reference, Path(tmp))
        cand = _as_source(loaded.model, Path(tmp) / "folded.onnx")
        return check_models(ref, cand, **kwargs)


def _refuse_onnx_options(model: object, **given: tuple[Any, Any]) -> None:
    """Refuse the options that apply to ONNX models only, when given for a PyTorch one (they
    were ignored without a word)."""
    named = [name for name, (value, default) in given.items() if value != default]
    if named:
        raise InputError(
            f"{', '.join(named)} {'applies' if len(named) == 1 else 'apply'} to ONNX models, not to "
            f"a {type(model).__name__} (the PyTorch frontend folds BatchNorm and checks on the "
            "model's own device with example_inputs)",
            "drop the option, or export to ONNX (normfuse.export) and fold that"
            + (" with norm_affine=True" if "norm_affine" in named else ""),
        )


def _refuse_exported_program(model: object, action: str) -> None:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.export.ExportedProgram):
        raise InputError(
            f"normfuse.{action} takes an nn.Module or a torch.fx.GraphModule, not an "
            "ExportedProgram",
            "pass the nn.Module it was exported from (the norms are its modules), and export "
            "the result again",
        )


def _is_torch(model: object) -> bool:
    """True for torch modules and exported programs, without importing torch."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    return isinstance(model, torch.nn.Module | torch.export.ExportedProgram)


def _infer_shapes(model: ir.Model) -> None:
    """Fill in value shapes (ranks are needed to write per-channel constants)."""
    from normfuse.onnxgraph.shapes import infer_types

    infer_types(model)


def apply_rewrite(
    model: ir.Model,
    action: str,
    rewrite: Callable[[ir.Model], tuple[ir.Model, list[Any], list[str]]],
    report: Report,
) -> ir.Model:
    """Infer shapes, run ``rewrite`` (returns model, entries, notes), fill ``report``."""
    from normfuse.onnxgraph.edit import functions_note

    report.before = model_stats(model)
    t = time.perf_counter()
    _infer_shapes(model)
    new, entries, notes = rewrite(model)
    report.entries.extend(entries)
    report.notes.extend(notes)
    note = functions_note(new, action)
    if note:
        report.notes.append(note)
    report.after = model_stats(new)
    report.timings[action] = time.perf_counter() - t
    return new


def onnx_rewrite(
    model: Any,
    action: str,
    rewrite: Callable[[ir.Model], tuple[ir.Model, list[Any], list[str]]],
    *,
    exact: bool,
    check: bool = True,
    provider: str = "auto",
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    what: str = "",
) -> tuple[Any, Report]:
    """Load ``model``, apply ``rewrite`` (returns model, entries, notes), check parity.

    With ``exact`` a parity failure raises :class:`ParityError`; otherwise the difference is
    only reported (the rewrite is meant to change the function).
    """
    report = Report(action=action)
    t0 = time.perf_counter()
    loaded = onnx_io.load(model)
    reference = _reference_bytes(model, loaded) if check else None
    report.timings["load"] = time.perf_counter() - t0
    new = apply_rewrite(loaded.model, action, rewrite, report)
    if check and report.applied:
        t2 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="normfuse-") as tmp:
            ref = _reference_source(loaded, reference, Path(tmp))
            cand = _as_source(new, Path(tmp) / "candidate.onnx")
            report.parity = check_models(
                ref,
                cand,
                provider=provider,
                seed=seed,
                shapes=shapes,
                defaults=FOLD_TOLERANCES,
                upcast=True,
            )
        report.timings["check"] = time.perf_counter() - t2
        judge_parity(report, exact=exact, what=what or action)
    return onnx_io.to_kind(loaded, new), report


def swap(model: Any, to: str, **options: Any) -> tuple[Any, Report]:
    """Replace BatchNorm layers by another norm kind.

    PyTorch modules: see :func:`normfuse.torchmodel.swap.swap`. ONNX models (any form
    :func:`normfuse.fold` takes): see :func:`normfuse.onnxgraph.swap.swap_model`; options ``where``
    (node-name glob), ``groups``, ``allow_single_channel_groups``, ``check``, ``provider``,
    ``seed``, ``shapes``. Exact swaps (``frozen``) are checked on onnxruntime and raise
    :class:`ParityError` on a mismatch; the others report the difference.
    """
    if _is_torch(model):
        from normfuse.torchmodel.swap import swap as swap_torch

        _refuse_exported_program(model, "swap")
        return swap_torch(model, to, **options)
    from normfuse.core import norms
    from normfuse.onnxgraph.swap import swap_model

    kind = norms.lookup(to)
    check_opts = {
        k: options.pop(k) for k in ("check", "provider", "seed", "shapes") if k in options
    }
    return onnx_rewrite(
        model,
        "swap",
        lambda m: (m, swap_model(m, to, **options), []),
        exact=kind.exact,
        what=f"swapping to {kind.name}",
        **check_opts,
    )


def insert(model: Any, example_inputs: Any = None, **options: Any) -> tuple[Any, Report]:
    """Add a norm after each linear op that has none.

    PyTorch modules (``example_inputs`` required): :func:`normfuse.torchmodel.insert.insert`. ONNX
    models: :func:`normfuse.onnxgraph.insert.insert_model` (``norm``, ``after``,
    ``before_activation``, ``where``), checked like :func:`swap`.
    """
    if _is_torch(model):
        from normfuse.torchmodel.insert import insert as insert_torch

        _refuse_exported_program(model, "insert")
        return insert_torch(model, example_inputs, **options)
    from normfuse.core import norms
    from normfuse.onnxgraph.insert import insert_model

    kind = norms.lookup(options.get("norm", "batchnorm"))
    check_opts = {
        k: options.pop(k) for k in ("check", "provider", "seed", "shapes") if k in options
    }
    return onnx_rewrite(
        model,
        "insert",
        lambda m: (m, insert_model(m, **options), []),
        exact=kind.name == "batchnorm",
        what=f"inserting {kind.name}",
        **check_opts,
    )


def raise_norms(
    model: Any, *, target_opset: int | None = None, **check_opts: Any
) -> tuple[Any, Report]:
    """Write LayerNormalization/RMSNormalization/GroupNormalization for decomposed chains.

    See :func:`normfuse.onnxgraph.raise_norms.raise_model`; parity-checked (exact).
    """
    from normfuse.onnxgraph.raise_norms import raise_model

    return onnx_rewrite(
        model,
        "raise",
        lambda m: raise_model(m, target_opset=target_opset),
        exact=True,
        **check_opts,
    )


def lower_norms(model: Any, target_opset: int, **check_opts: Any) -> tuple[Any, Report]:
    """Decompose fused norm ops the target opset lacks; see :func:`normfuse.onnxgraph.lower_norms.lower_model`."""
    from normfuse.onnxgraph.lower_norms import lower_model

    return onnx_rewrite(
        model, "lower", lambda m: lower_model(m, target_opset), exact=True, **check_opts
    )


def recalibrate(model: Any, batches: Any, **options: Any) -> Any:
    """Recompute BatchNorm statistics from data.

    PyTorch modules: :func:`normfuse.torchmodel.recalibrate.recalibrate` (in place, returns the
    report with an undo handle; options ``num_batches``, ``num_samples``, ``forward_fn``,
    ``where``, ``estimator``, ``progress``, ``distributed``; see docs/recalibrate.md).
    ONNX models: ``batches`` is a path (an ``.npz``/``.npy`` file, a folder of them, or a glob),
    read one batch at a time, or a list of ``{input name: array}``; returns ``(model, report)``.
    Options: ``mode`` (``"sequential"``/``"batch"``), ``num_batches``, ``num_samples``,
    ``workers``, ``cache``, ``cache_mb``, ``where``, ``provider``, ``progress`` (a bar on a
    terminal, ``False``, or ``callable(done, total)``), ``check``; see
    :func:`normfuse.runtime.recalib_workers.recalibrate_onnx`.
    """
    if _is_torch(model):
        from normfuse.torchmodel.recalibrate import recalibrate as recalibrate_torch

        _refuse_exported_program(model, "recalibrate")
        return recalibrate_torch(model, batches, **options)
    from normfuse.runtime.inputs import memory_batches, open_batches
    from normfuse.runtime.recalib_workers import DEFAULT_CACHE_MB, recalibrate_onnx

    if isinstance(batches, (str, os.PathLike)):
        stream = open_batches(batches, option="data")
    elif isinstance(batches, Mapping):
        stream = memory_batches([batches])
    else:
        stream = memory_batches(list(batches))
    stream = stream.limit(options.pop("num_batches", None), options.pop("num_samples", None))
    run = {
        "mode": options.pop("mode", "sequential"),
        "workers": options.pop("workers", 1),
        "provider": options.pop("provider", "auto"),
        "cache": options.pop("cache", True),
        "cache_mb": options.pop("cache_mb", DEFAULT_CACHE_MB),
        "where": options.pop("where", None),
        "progress": options.pop("progress", True),
    }

    def rewrite(m: ir.Model) -> tuple[ir.Model, list[Any], list[str]]:
        entries, notes = recalibrate_onnx(m, stream, **run)
        return m, entries, notes

    return onnx_rewrite(model, "recalibrate", rewrite, exact=False, what="recalibration", **options)


def _require_torch(model: object, what: str) -> None:
    if not _is_torch(model):
        raise InputError(
            f"{what} takes a PyTorch nn.Module, not a {type(model).__name__}",
            "for ONNX models use normfuse fold",
        )


def export(model: Any, example_inputs: Any, path: str | os.PathLike, **options: Any) -> Report:
    """Export to ONNX, fold and prove parity with PyTorch; see :func:`normfuse.torchmodel.export.export`."""
    _require_torch(model, "export")
    from normfuse.torchmodel.export import export as export_torch

    return export_torch(model, example_inputs, path, **options)
