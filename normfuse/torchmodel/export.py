"""Export a PyTorch model to ONNX with proof: export, fold, save, then compare with PyTorch.

:func:`export` runs ``torch.onnx.export`` (the dynamo exporter by default, with its own
optimizer off so that no BatchNorm is folded in float32 behind the report's back; the legacy
exporter on request, with ``training=PRESERVE`` for the same reason), folds the ONNX model with
normfuse (float64 maths), writes it atomically, and runs it on onnxruntime against the PyTorch
module on the example inputs and on seeded random inputs of the same shapes.

:func:`load_pt2` reads a ``torch.export`` archive without executing anything from it: before
torch reads the archive, its JSON is validated (every symbolic expression, which torch hands to
``sympy.sympify``, must match a strict grammar of symbols, integers, arithmetic and torch's
known sympy functions; symbol names are identifiers), every tensor's declared size is checked
against the bytes the archive holds, and compressed members that expand far beyond their size
are refused; tensors are read only with ``torch.load(weights_only=True)``, other pickles are
refused, and the guard code an archive may carry (Python, run by ``ExportedProgram.module()``)
is dropped, never run.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import re
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from normfuse.core.errors import InputError, ParityError
from normfuse.core.report import OutputParity, ParityResult, Report
from normfuse.core.verdict import TORCH_TOLERANCES, compare_outputs, noise_floor, worse
from normfuse.onnxgraph import io as onnx_io
from normfuse.onnxgraph.fold import FoldOptions, model_stats, run_fold
from normfuse.runtime.sessions import make_session, select_provider
from normfuse.torchmodel.fold import example_args, fold_torch
from normfuse.torchmodel.judge import to_float64
from normfuse.torchmodel.modules import module_stats, tensors_of

__all__ = ["export", "load_pt2", "save_pt2"]

logger = logging.getLogger(__name__)


def _reference(model: Any) -> nn.Module:
    if isinstance(model, torch.export.ExportedProgram):
        return model.module()
    return model


@contextlib.contextmanager
def _attributes_kept(model: Any) -> Iterator[None]:
    """Give every submodule of ``model`` back the attributes it had before the block.

    Tracing runs ``forward`` on the caller's own modules with fake tensors: a forward that
    caches something on ``self`` (ultralytics' Detect head: ``self.anchors``, ``self.strides``,
    ``self.shape``) is left holding fake tensors, and the model no longer runs (nor could the
    check compare against it). Attributes the block set or replaced are put back or removed;
    parameters, buffers and submodules live in containers whose contents are not touched."""
    if not isinstance(model, nn.Module):
        yield
        return
    before = [(m, dict(vars(m))) for m in model.modules()]
    try:
        yield
    finally:
        for module, attrs in before:
            now = vars(module)
            for key in [k for k in now if k not in attrs]:
                del now[key]
            for key, value in attrs.items():
                if now.get(key, _MISSING) is not value:
                    now[key] = value


_MISSING = object()


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
            :class:`ParityError` when an output is further from a float64 run of the PyTorch
            model than :data:`RUNTIME_NOISE_FACTOR` times PyTorch's own float32 output is (at
            least its type's floor), or, given ``tolerances`` (or where the model cannot run
            in float64), beyond those.
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
    with _attributes_kept(model):
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
    exact = _float64_copy(reference, notes) if tolerances is TORCH_TOLERANCES else None
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
            exact_out = _run_exact(exact, a, k, len(expected), notes) if exact else None
        if exact is not None and exact_out is None:
            exact = None  # (noted) the fixed tolerances judge this run and the next ones
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, flat, strict=True)}
        got = session.run(None, feeds)
        onames = [o.name for o in session.get_outputs()]
        for i, (name, ref, test) in enumerate(zip(onames, expected, got, strict=False)):
            dtype = str(ref.dtype).replace("torch.", "")
            ref64 = ref.detach().to(torch.float64).cpu().numpy()
            atol, rtol = tolerances.get(dtype, (0.0, 0.0))
            if exact_out is not None and dtype in ("float32", "float64"):
                ref64, rtol = _own_noise(ref64, exact_out[i], dtype)
                atol = 0.0
            res = compare_outputs(name, ref64, np.asarray(test, np.float64), atol, rtol)
            res.dtype = dtype
            if name not in worst or worse(res, worst[name]):
                worst[name] = res
    if exact is not None:
        notes.append(
            f"judged against a float64 run of the PyTorch model: each output's error within "
            f"max(its type's floor, {RUNTIME_NOISE_FACTOR:g}x PyTorch's own error at its "
            "precision on the same input); two runtimes round differently, so the fixed "
            "1e-5 of max|output| failed exact exports of deep networks"
        )
    return ParityResult(label, list(worst.values()), runs=max(runs, 1), seed=seed, notes=notes)


#: Two runtimes computing one float32 function are two independent draws of rounding error;
#: the ONNX model may be this many times further from the exact function than PyTorch is.
RUNTIME_NOISE_FACTOR = 12.0


def _float64_copy(module: nn.Module, notes: list[str]) -> nn.Module | None:
    """A float64 copy of ``module`` for the exact reference, or ``None`` (with a note) when it
    cannot run so (then the fixed tolerances judge)."""
    try:
        return copy.deepcopy(module).to(torch.float64).eval()
    except Exception as exc:  # custom modules, tensor subclasses, ...
        notes.append(f"no float64 copy of the model ({exc}): judged with the fixed tolerances")
        return None


def _run_exact(
    exact: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], count: int, notes: list[str]
) -> list[torch.Tensor] | None:
    """The float64 copy's outputs, or ``None`` (with a note) when it does not run so."""
    try:
        out = tensors_of(exact(*to_float64(args), **to_float64(kwargs)))
    except Exception as exc:  # dtype-specific code, custom ops, ...
        notes.append(f"the model does not run in float64 ({str(exc)[:100]}): fixed tolerances")
        return None
    if len(out) != count:
        notes.append("the float64 copy returns other outputs: judged with the fixed tolerances")
        return None
    return out


def _own_noise(ref: np.ndarray, exact: torch.Tensor, dtype: str) -> tuple[np.ndarray, float]:
    """The float64 reference and the rtol that PyTorch's own output at ``dtype`` sets."""
    exact64 = exact.detach().to(torch.float64).cpu().numpy()
    scale = float(np.abs(exact64).max(initial=0.0))
    own = float(np.abs(ref - exact64).max(initial=0.0))
    floor = noise_floor(dtype) or 0.0
    return exact64, max(floor, RUNTIME_NOISE_FACTOR * own / scale) if scale else floor


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


#: A token of a symbolic expression in a .pt2 archive: a name, an integer, a quoted name (the
#: first argument of ``Symbol('s0', ...)``), an operator, a bracket, a comma, ``=``, spaces.
_TOKEN = re.compile(
    r"\s+|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<int>[0-9]+)|'(?P<quoted>[A-Za-z_][A-Za-z0-9_]*)'"
    r"|(?P<op>//|[-+*/%(),=])"
)

#: The functions an expression may call: sympy's constructors in ``srepr`` form and the
#: functions torch's deserializer gives sympy.
_SYMPY_CALLS = frozenset(
    {
        "Symbol", "Integer", "Add", "Mul", "Pow", "Rational", "Max", "Min", "Abs", "Eq", "Ne",
        "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "floor", "ceiling", "FloorDiv",
        "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt",
        "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv",
        "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt",
        "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "BitwiseFn_bitwise_and",
        "BitwiseFn_bitwise_or",
    }
)  # fmt: skip

#: Assumptions ``Symbol(...)`` may be given, as ``name=True`` / ``name=False``.
_SYMBOL_ASSUMPTIONS = frozenset(
    {"positive", "negative", "integer", "nonnegative", "nonpositive", "real", "finite", "zero"}
)

#: Names a plain symbol may not have (Python's own words and builtins' names are no symbols).
_NOT_SYMBOLS = frozenset({"lambda", "import", "exec", "eval", "open", "compile", "globals"})


def _check_expression(text: str, where: str) -> None:
    """Refuse a symbolic expression outside the grammar (see :data:`_TOKEN`): a call only to a
    known sympy function, ``=`` only after a known assumption and before True/False, no
    attribute access, subscripts, strings other than symbol names, or names with ``__``."""

    def refuse(why: str) -> InputError:
        return InputError(
            f"the .pt2 archive holds a symbolic expression normfuse does not accept at {where} "
            f"({why}: {text[:80]!r})",
            "normfuse runs nothing from an input; re-export the model with torch.export.save",
        )

    if len(text) > 10_000:
        raise refuse("too long")
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise refuse(f"character {text[pos]!r}")
        pos = m.end()
        if m.lastgroup is not None:
            tokens.append((m.lastgroup, m.group(m.lastgroup)))
    depth = 0
    for i, (kind, value) in enumerate(tokens):
        after = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        before = tokens[i - 1][1] if i else ""
        if kind == "name":
            if "__" in value or value in _NOT_SYMBOLS:
                raise refuse(f"the name {value}")
            if after == "(" and value not in _SYMPY_CALLS:
                raise refuse(f"a call of {value}")
            if after == "=" and value not in _SYMBOL_ASSUMPTIONS:
                raise refuse(f"the keyword {value}")
            if before == "=" and value not in ("True", "False"):
                raise refuse(f"{value} after =")
        elif kind == "quoted" and before != "(":
            raise refuse("a string that is not a symbol's name")
        elif value == "(":
            depth += 1
        elif value == ")":
            depth -= 1
            if depth < 0:
                raise refuse("unbalanced brackets")
    if depth:
        raise refuse("unbalanced brackets")


#: Members larger than this are not read to be validated (a model.json is a few MB at most).
_JSON_LIMIT = 256 * 2**20


def _check_archive(path: Path) -> None:
    """Validate a .pt2 archive before torch reads any of it (see the module's docstring).

    Raises:
        InputError: Not a zip archive, a member that expands too far, a tensor whose declared
            size exceeds the bytes stored for it, or a symbolic expression outside the grammar.
    """
    note = "write it with torch.export.save(torch.export.export(model, args), path)"
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path} is not a torch.export archive (not a zip file)", note)
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            for info in members.values():
                ratio_ok = info.file_size <= 100 * info.compress_size + 2**20
                if info.compress_type != zipfile.ZIP_STORED and not ratio_ok:
                    raise InputError(
                        f"{path} member {info.filename!r} expands from {info.compress_size} to "
                        f"{info.file_size} bytes (a zip bomb?)",
                        note,
                    )
            for name, info in members.items():
                if not name.endswith(".json"):
                    continue
                if info.file_size > _JSON_LIMIT:
                    raise InputError(f"{path} member {name!r} is {info.file_size} bytes", note)
                try:
                    document = json.loads(archive.read(name))
                except (ValueError, RecursionError):
                    raise InputError(f"{path} member {name!r} is not valid JSON", note) from None
                _check_json(document, f"{name}")
                if name.endswith("_config.json"):
                    _check_sizes(path, archive, members, name, document)
    except InputError:
        raise
    except (OSError, zipfile.BadZipFile, EOFError, RecursionError) as exc:
        raise InputError(f"cannot read {path} as a torch.export archive ({exc})", note) from None


def _check_json(document: Any, where: str) -> None:
    """Every ``expr_str`` in the grammar, every range-constraint key a plain name."""
    stack: list[tuple[Any, str]] = [(document, where)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr_str" and isinstance(value, str):
                    _check_expression(value, f"{at}/{key}")
                elif key == "range_constraints" and isinstance(value, dict):
                    for symbol in value:
                        _check_expression(str(symbol), f"{at}/{key}")
                if isinstance(value, (dict, list)):
                    stack.append((value, f"{at}/{key}"))
        elif isinstance(node, list):
            stack.extend((item, at) for item in node if isinstance(item, (dict, list)))


def _check_sizes(
    path: Path,
    archive: zipfile.ZipFile,
    members: dict[str, zipfile.ZipInfo],
    config: str,
    document: Any,
) -> None:
    """Each tensor of a weights/constants config needs at most the bytes its member holds."""
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    folder = config.rsplit("/", 1)[0]
    entries = document.get("config", {}) if isinstance(document, dict) else {}
    for name, entry in entries.items() if isinstance(entries, dict) else ():
        meta = entry.get("tensor_meta") if isinstance(entry, dict) else None
        if not isinstance(meta, dict):
            continue
        member = members.get(f"{folder}/{entry.get('path_name')}")
        dtype = _SERIALIZE_TO_TORCH_DTYPE.get(meta.get("dtype"))
        try:
            sizes = [int(d["as_int"]) for d in meta.get("sizes", [])]
            strides = [int(d["as_int"]) for d in meta.get("strides", [])]
            offset = int((meta.get("storage_offset") or {}).get("as_int", 0))
        except (KeyError, TypeError, ValueError):
            continue  # symbolic sizes: torch checks them against the storage itself
        if member is None or dtype is None:
            continue
        itemsize = torch.empty((), dtype=dtype).element_size()
        if any(d == 0 for d in sizes):
            need = 0
        elif any(d < 0 for d in sizes) or len(strides) != len(sizes) or offset < 0:
            need = math.inf
        else:
            need = (
                offset + sum((d - 1) * abs(st) for d, st in zip(sizes, strides, strict=True)) + 1
            ) * itemsize
        if need > member.file_size:
            raise InputError(
                f"{path}: tensor '{name}' declares {sizes} of {dtype} ({need} bytes) but the "
                f"archive holds {member.file_size} bytes for it",
                "the archive is corrupt or hostile; re-export the model",
            )


def load_pt2(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """Read a ``torch.export.save`` archive, running nothing from it (see the module's docstring).

    Raises:
        InputError: The file is missing, not an archive, fails the validation, or holds
            pickled objects.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p} does not exist" if not p.exists() else f"{p} is not a regular file")
    _check_archive(p)
    try:
        with _no_pickled_code(), warnings.catch_warnings(), _quiet_loggers():
            warnings.simplefilter("ignore")
            ep = torch.export.load(str(p))
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
        first = text[0] if text else type(exc).__name__
        first = first.replace("Please check the warnings above for possible errors.", "")
        raise InputError(
            f"cannot read {p} as a torch.export archive: {first.strip().rstrip('.')}",
            "write it with torch.export.save(torch.export.export(model, args), path)",
        ) from None
    if getattr(ep, "_guards_code", None):
        ep._guards_code = []  # Python from the archive, exec'd by ep.module(): never run
    return ep


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    """torch logs warnings while it reads a broken archive; the error is reported in one line."""
    names = ("torch", "torch._export", "torch.export", "torch._export.serde.serialize")
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for log, _ in saved:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in saved:
            log.setLevel(level)


def save_pt2(
    ep: torch.export.ExportedProgram, path: str | os.PathLike, *, force: bool = False
) -> Path:
    """Write an ExportedProgram atomically (temporary ``.pt2`` file, then rename), with the
    permissions a new file gets (the umask applied).

    Raises:
        OutputExistsError: The output exists (or is a link) and ``force`` is false.
        InputError: The output is not a regular file, or its folder is missing.
    """
    from normfuse.onnxgraph.wire import default_mode

    out = Path(path)
    onnx_io.check_destination(out, force=force)
    folder = out.parent if str(out.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".tmp.pt2", dir=folder)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.export.save(ep, tmp)
        os.chmod(tmp, default_mode())
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
