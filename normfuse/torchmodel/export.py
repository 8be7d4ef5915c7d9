"""Export a PyTorch model to ONNX with proof: export, fold, save, then compare with PyTorch.

:func:`export` runs ``torch.onnx.export`` (the dynamo exporter by default, with its own
optimizer off so that no BatchNorm is folded in float32 behind the report's back; the legacy
exporter on request, with ``training=PRESERVE`` for the same reason), folds the ONNX model with
normfuse (float64 maths), writes it atomically, and runs it on onnxruntime against the PyTorch
module on the example inputs and on seeded random inputs of the same shapes.

:func:`load_pt2` reads a ``torch.export`` archive without executing pickled code.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from normfuse.core.errors import InputError, ParityError
from normfuse.core.report import OutputParity, ParityResult, Report
from normfuse.core.verdict import TORCH_TOLERANCES, compare_outputs, worse
from normfuse.onnxgraph import io as onnx_io
from normfuse.onnxgraph.fold import FoldOptions, model_stats, run_fold
from normfuse.runtime.sessions import make_session, select_provider
from normfuse.torchmodel.fold import example_args, fold_torch
from normfuse.torchmodel.modules import module_stats, tensors_of

__all__ = ["export", "load_pt2", "save_pt2"]

logger = logging.getLogger(__name__)


def _reference(model: Any) -> nn.Module:
    if isinstance(model, torch.export.ExportedProgram):
        return model.module()
    return model


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress to stdout, warnings and log lines; keep a library quiet."""
    torch_onnx_log = logging.getLogger("torch.onnx")
    level = torch_onnx_log.level
    torch_onnx_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_onnx_log.setLevel(level)


def _export_onnx(
    model: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    dynamo: bool,
    opset: int | None,
    dynamic_shapes: Any,
) -> tuple[ir.Model, str]:
    if dynamo:
        with _quiet():
            program = torch.onnx.export(
                model,
                args,
                kwargs=kwargs or None,
                dynamo=True,
                optimize=False,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
        if program is None:  # pragma: no cover - torch always returns one with dynamo=True
            raise InputError("torch.onnx.export returned nothing")
        return program.model, "dynamo exporter (optimize=False)"
    if isinstance(model, torch.export.ExportedProgram):
        raise InputError(
            "the legacy exporter cannot export an ExportedProgram", "use the dynamo exporter"
        )
    buffer = io.BytesIO()
    with _quiet():
        torch.onnx.export(
            model,
            args,
            buffer,  # type: ignore[arg-type]
            kwargs=kwargs or None,
            dynamo=False,
            opset_version=opset or 17,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=True,
        )
    return ir.from_proto(onnx_io.onnx.load_from_string(buffer.getvalue())), (
        "legacy exporter (training=PRESERVE)"
    )


def export(
    model: Any,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    fold: bool = True,
    check: bool = True,
    opset: int | None = None,
    dynamo: bool = True,
    dynamic_shapes: Any = None,
    force: bool = False,
    runs: int = 3,
    seed: int = 0,
    provider: str = "auto",
    tolerances: Mapping[str, tuple[float, float]] = TORCH_TOLERANCES,
) -> Report:
    """Export ``model`` to ONNX at ``path``, fold it, and prove it matches PyTorch.

    Args:
        model: An ``nn.Module`` in eval mode, or a ``torch.export.ExportedProgram``.
        example_inputs: A tensor, tuple of positional inputs or dict of keyword inputs.
        path: The ``.onnx`` file to write (atomically; tensors beyond 2 GiB go to
            ``<path>.data``).
        fold: Fold the exported model's BatchNormalization (and Mul/Add chains) with normfuse.
        check: Run the ONNX model on onnxruntime and compare with the PyTorch model on the
            example inputs and ``runs - 1`` seeded random inputs of the same shapes; raise
            :class:`ParityError` beyond ``tolerances`` (1e-5 of the largest magnitude, fp32).
        opset: ONNX opset (the exporter's default when ``None``; 17 for the legacy one).
        dynamo: Use the dynamo exporter; ``False`` for the legacy TorchScript exporter.
        dynamic_shapes: Passed to the dynamo exporter.
        force: Replace ``path`` if it exists.
        runs: Input sets compared (the example, then random ones).
        seed: Seed of the random inputs.
        provider: onnxruntime provider for the check: ``auto``, ``cuda`` or ``cpu``.
        tolerances: ``{dtype: (atol, rtol)}`` for the check.

    Returns:
        The report: what the exporter wrote, what normfuse folded, the parity per output.
    """
    report = Report(action="export")
    if isinstance(model, nn.Module) and model.training:
        raise InputError(
            f"{type(model).__name__} is in training mode: BatchNorm would export with batch statistics",
            "call model.eval() first",
        )
    if not isinstance(model, nn.Module | torch.export.ExportedProgram):
        raise InputError(f"cannot export a {type(model).__name__}", "pass an nn.Module")
    args, kwargs = example_args(example_inputs)
    t0 = time.perf_counter()
    bn_modules = (
        module_stats(model).batchnorm_nodes
        if isinstance(model, nn.Module)
        else sum(1 for n in model.graph.nodes if "batch_norm" in str(n.target))
    )
    onnx_model, how = _export_onnx(
        model, args, kwargs, dynamo=dynamo, opset=opset, dynamic_shapes=dynamic_shapes
    )
    report.timings["export"] = time.perf_counter() - t0
    written = model_stats(onnx_model).batchnorm_nodes
    report.notes.append(
        f"{how} wrote {written} BatchNormalization node(s) for {bn_modules} BatchNorm layer(s)"
        + ("" if written == bn_modules else " (the exporter folded or dropped the others itself)")
    )
    if fold:
        run_fold(onnx_model, report, FoldOptions())
        report.notes.append(
            f"normfuse folded {len(report.applied)}, left {report.after.batchnorm_nodes} "
            "BatchNormalization node(s)"
        )
    else:
        report.before = report.after = model_stats(onnx_model)

    def verify(tmp: Path) -> None:  # runs on the written file before it takes the final name
        if not check:
            return
        t2 = time.perf_counter()
        report.parity = _check_against_torch(
            model, tmp, args, kwargs, runs=runs, seed=seed, provider=provider, tolerances=tolerances
        )
        report.timings["check"] = time.perf_counter() - t2
        if not report.parity.passed:
            failed = [o.name for o in report.parity.outputs if not o.passed]
            raise ParityError(
                f"the exported model differs from PyTorch on output(s) {', '.join(failed)} "
                f"(max rel {report.parity.max_rel:.3g}); nothing was written",
                report,
                "export with fold=False to see whether the exporter or the fold differs",
            )

    t1 = time.perf_counter()
    onnx_io.save(onnx_model, path, force=force, verify=verify, discard=True)
    report.timings["save"] = time.perf_counter() - t1 - report.timings.get("check", 0.0)
    return report


def _random_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if t.is_floating_point():
        return torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype).to(t.device)
    return t.clone()  # integer inputs (indices, lengths): their valid range is the model's own


def _check_against_torch(
    model: Any,
    path: Path,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    runs: int,
    seed: int,
    provider: str,
    tolerances: Mapping[str, tuple[float, float]],
) -> ParityResult:
    providers, label = select_provider(provider)
    notes: list[str] = ["reference: the PyTorch model (eval mode, no grad)"]
    session = make_session(path, providers, "disable", notes)
    names = [i.name for i in session.get_inputs()]
    reference = _reference(model)
    gen = torch.Generator().manual_seed(seed)
    worst: dict[str, OutputParity] = {}
    for run in range(max(runs, 1)):
        if run == 0:
            a, k = args, kwargs
        else:
            a = tuple(_random_like(x, gen) if isinstance(x, torch.Tensor) else x for x in args)
            k = {
                n: _random_like(v, gen) if isinstance(v, torch.Tensor) else v
                for n, v in kwargs.items()
            }
        flat = [*(tensors_of(a)), *(tensors_of(k))]
        if len(flat) != len(names):
            raise InputError(
                f"the ONNX model has {len(names)} inputs but the example has {len(flat)} tensors"
            )
        with torch.no_grad():
            expected = tensors_of(reference(*a, **k))
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, flat, strict=True)}
        got = session.run(None, feeds)
        onames = [o.name for o in session.get_outputs()]
        for name, ref, test in zip(onames, expected, got, strict=False):
            dtype = str(ref.dtype).replace("torch.", "")
            atol, rtol = tolerances.get(dtype, (0.0, 0.0))
            res = compare_outputs(
                name,
                ref.detach().to(torch.float64).cpu().numpy(),
                np.asarray(test, np.float64),
                atol,
                rtol,
            )
            res.dtype = dtype
            if name not in worst or worse(res, worst[name]):
                worst[name] = res
    return ParityResult(label, list(worst.values()), runs=max(runs, 1), seed=seed, notes=notes)


# ------------------------------------------------------------------------------------ .pt2 files


@contextlib.contextmanager
def _no_pickled_code() -> Iterator[None]:
    """Make ``torch.export.load`` read tensors with ``weights_only=True`` and refuse other pickles."""
    from torch.export.pt2_archive import _package

    original = torch.load

    def safe_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise InputError(
            "the .pt2 archive holds pickled Python objects",
            "normfuse does not execute pickled code; export the model without custom objects",
        )

    saved = (_package.torch.load, _package.pickle.loads, torch._C._pickle_load_obj)
    torch.load = safe_load
    _package.pickle.loads = refuse
    torch._C._pickle_load_obj = refuse
    try:
        yield
    finally:
        torch.load = saved[0]
        _package.pickle.loads = saved[1]
        torch._C._pickle_load_obj = saved[2]


def load_pt2(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """Read a ``torch.export.save`` archive; tensors only through ``torch.load(weights_only=True)``.

    Raises:
        InputError: The file is missing, not an archive, or holds pickled objects.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p} does not exist")
    try:
        with _no_pickled_code(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(str(p))
    except InputError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        if "Weights only load failed" in str(exc):
            raise InputError(
                f"{p} holds pickled data that is not plain tensors",
                "normfuse loads tensors only with torch.load(weights_only=True) and runs no "
                "pickled code; re-export the model from trusted code",
            ) from None
        raise InputError(
            f"cannot read {p} as a torch.export archive: {text[0] if text else type(exc).__name__}",
            "write it with torch.export.save(torch.export.export(model, args), path)",
        ) from None


def save_pt2(
    ep: torch.export.ExportedProgram, path: str | os.PathLike, *, force: bool = False
) -> Path:
    """Write an ExportedProgram atomically (temporary file, then rename)."""
    out = Path(path)
    if out.exists() and not force:
        from normfuse.core.errors import OutputExistsError

        raise OutputExistsError(f"{out} exists", "pass --force to replace it")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent or ".")
    os.close(fd)
    try:
        torch.export.save(ep, tmp)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out


def fold_pt2(
    path: str | os.PathLike, *, check: bool = True, strict: bool = False
) -> tuple[torch.export.ExportedProgram, Report]:
    """Load a ``.pt2`` archive safely and fold it (checked on its own example inputs)."""
    ep = load_pt2(path)
    return fold_torch(ep, check=check, strict=strict)
