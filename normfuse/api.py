"""The Python API: fold, inspect and check ONNX models.

Example, inside an export pipeline::

    import torch, normfuse

    program = torch.onnx.export(model.eval(), (x,), dynamo=True, optimize=False)
    folded, report = normfuse.fold(program)        # an ONNXProgram again, parity checked
    print(len(report.applied), "folded;", [e.reason for e in report.skipped])
    normfuse.save(folded, "model.onnx")
"""

from __future__ import annotations

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

from normfuse import onnx_io
from normfuse.errors import InputError, NormfuseError, ParityError
from normfuse.onnx_fold import FoldOptions, fold_model, model_stats
from normfuse.parity import FOLD_TOLERANCES, check_models
from normfuse.report import ParityResult, Report

__all__ = [
    "StrictError",
    "check",
    "export",
    "fold",
    "insert",
    "inspect",
    "load",
    "recalibrate",
    "save",
    "swap",
]

logger = logging.getLogger(__name__)

M = TypeVar("M")


class StrictError(NormfuseError):
    """``strict=True`` and some candidates were skipped."""

    exit_code = 1

    def __init__(self, message: str, report: Report, note: str | None = None) -> None:
        super().__init__(message, note)
        self.report = report


def load(source: object) -> ir.Model:
    """Read a model (path with lazy external data, bytes, ModelProto, onnx_ir.Model, ONNXProgram)."""
    return onnx_io.load(source, copy=False).model


def save(
    model: object,
    path: str | os.PathLike,
    *,
    force: bool = False,
    external_data: bool | None = None,
) -> Path:
    """Write a model atomically; see :func:`normfuse.onnx_io.save`."""
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
) -> tuple[M | ir.Model, Report]:
    """Fold inference-mode normalization into neighbouring linear ops.

    PyTorch models (``nn.Module``, ``torch.fx.GraphModule``, ``torch.export.ExportedProgram``)
    are folded by :func:`normfuse.fx_fold.fold_torch` (``example_inputs`` then serve the check).

    The input is never modified. The result has the type of the input (``onnx.ModelProto``,
    ``bytes``, ``onnx_ir.Model``, ``torch.onnx.ONNXProgram``); a path gives an ``onnx_ir.Model``
    whose untouched tensors still read lazily from the input's external data.

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

    Returns:
        ``(folded_model, report)``.

    Raises:
        InputError: The model cannot be read.
        ParityError: ``check`` found a mismatch (``exc.report`` has the figures).
        StrictError: ``strict`` and something was skipped.
    """
    if _is_torch(model):
        from normfuse.fx_fold import fold_torch

        return fold_torch(model, example_inputs=example_inputs, check=check, strict=strict)
    report = Report(action="fold")
    t0 = time.perf_counter()
    loaded = onnx_io.load(model)
    reference = _reference_bytes(model, loaded) if check else None
    report.timings["load"] = time.perf_counter() - t0
    run_fold(loaded.model, report, FoldOptions(norm_affine=norm_affine), progress)
    if check:
        t1 = time.perf_counter()
        report.parity = _check_in_memory(
            loaded, reference, provider=provider, seed=seed, shapes=shapes, defaults=FOLD_TOLERANCES
        )
        report.timings["check"] = time.perf_counter() - t1
        raise_for_parity(report)
    if strict:
        raise_for_strict(report)
    return onnx_io.to_kind(loaded, loaded.model), report


def run_fold(
    model: ir.Model,
    report: Report,
    options: FoldOptions,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Fold ``model`` in place and fill ``report`` (entries, statistics, fold time)."""
    t = time.perf_counter()
    if not options.dry_run:
        report.before = model_stats(model)
    report.entries.extend(fold_model(model, options, progress))
    report.after = model_stats(model)
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


def raise_for_parity(report: Report) -> None:
    """Raise :class:`ParityError` when the report's parity check failed."""
    if report.parity is not None and not report.parity.passed:
        failed = [o.name for o in report.parity.outputs if not o.passed]
        raise ParityError(
            f"the folded model differs from the original on output(s) {', '.join(failed)} "
            f"(max rel {report.parity.max_rel:.3g})",
            report,
            "please report this model; use --no-check only to inspect the result",
        )


def raise_for_strict(report: Report) -> None:
    """Raise :class:`StrictError` when some candidate was skipped."""
    if report.skipped:
        first = report.skipped[0]
        raise StrictError(
            f"{len(report.skipped)} candidate(s) not folded, first {first.op_type} "
            f"'{first.node}': {first.reason}",
            report,
        )


def inspect(model: object, *, norm_affine: bool = False) -> Report:
    """What :func:`fold` would do, without changing anything."""
    loaded = onnx_io.load(model, copy=False)
    report = Report(action="inspect")
    run_fold(loaded.model, report, FoldOptions(norm_affine=norm_affine, dry_run=True))
    return report


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
    inputs: Sequence[Mapping[str, Any]] | None = None,
    bisect: bool = False,
    cross_check: bool = False,
) -> ParityResult:
    """Compare two models on onnxruntime; see :func:`normfuse.parity.check_models`."""
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
        )


def _reference_bytes(model: object, loaded: onnx_io.Loaded) -> bytes | None:
    """The original model for the check, taken before folding, without another round trip."""
    if loaded.path is not None or onnx_io.has_external_data(loaded.model):
        return None  # checked from the file
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    return ir.to_proto(loaded.model).SerializeToString()  # the private copy, not yet folded


def _as_source(model: object, spill: Path) -> str | bytes:
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    inner = onnx_io.unwrap(model)
    if onnx_io.has_external_data(inner):
        onnx_io.save(inner, spill, force=True, external_data=True)
        return str(spill)
    return ir.to_proto(inner).SerializeToString()


def _check_in_memory(
    loaded: onnx_io.Loaded, reference: bytes | None, **kwargs: Any
) -> ParityResult:
    with tempfile.TemporaryDirectory(prefix="normfuse-") as tmp:
        ref = str(loaded.path) if loaded.path is not None else reference
        if ref is None:
            raise NormfuseError("the original model was not kept for the check")
        cand = _as_source(loaded.model, Path(tmp) / "folded.onnx")
        return check_models(ref, cand, **kwargs)


def _is_torch(model: object) -> bool:
    """True for torch modules and exported programs, without importing torch."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    return isinstance(model, torch.nn.Module | torch.export.ExportedProgram)


def _require_torch(model: object, what: str) -> None:
    if not _is_torch(model):
        raise InputError(
            f"{what} takes a PyTorch nn.Module, not a {type(model).__name__}",
            "for ONNX models use normfuse fold",
        )


def swap(model: Any, to: str, **options: Any) -> tuple[Any, Report]:
    """Replace BatchNorm layers by another norm kind; see :func:`normfuse.fx_swap.swap`."""
    _require_torch(model, "swap")
    from normfuse.fx_swap import swap as swap_torch

    return swap_torch(model, to, **options)


def insert(model: Any, example_inputs: Any, **options: Any) -> tuple[Any, Report]:
    """Add a norm after each Conv/Linear that has none; see :func:`normfuse.fx_swap.insert`."""
    _require_torch(model, "insert")
    from normfuse.fx_swap import insert as insert_torch

    return insert_torch(model, example_inputs, **options)


def recalibrate(model: Any, batches: Any, **options: Any) -> Report:
    """Recompute BatchNorm statistics from data; see :func:`normfuse.fx_swap.recalibrate`."""
    _require_torch(model, "recalibrate")
    from normfuse.fx_swap import recalibrate as recalibrate_torch

    return recalibrate_torch(model, batches, **options)


def export(model: Any, example_inputs: Any, path: str | os.PathLike, **options: Any) -> Report:
    """Export to ONNX, fold and prove parity with PyTorch; see :func:`normfuse.fx_export.export`."""
    _require_torch(model, "export")
    from normfuse.fx_export import export as export_torch

    return export_torch(model, example_inputs, path, **options)
