"""The ``normfuse`` command line: parse, call the API, render the report, set the exit code.

Exit codes: 0 success; 1 parity failure, or ``--strict`` with skipped candidates; 2 bad input or
usage. Errors are one line ``error: <problem>. Note: <fix>``; ``--debug`` (before or after the
command) shows the traceback.

Every destination (``-o``, ``--json``) is checked before the work starts: the input (and every
file it reads) is never one, an existing file needs ``--force``, a symbolic link needs
``--force`` (the link is replaced, never its target), anything but a regular file is refused.
Files are written to a temporary file and renamed. When an interruption or a late error comes,
the message says whether the output was written.

Size: one file for every command's parse, render and exit code, so that the commands' options
and messages stay alike; the work itself lives below the API.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from normfuse import __version__
from normfuse.core.errors import InputError, NormfuseError, ParityError, StrictError
from normfuse.core.report import Report
from normfuse.core.verdict import (
    DEFAULT_TOLERANCES,
    FOLD_TOLERANCES,
    raise_for_parity,
    raise_for_strict,
)


class _Deferred:
    """A module imported on first use: ``normfuse --help`` and argument errors need neither onnx
    nor onnxruntime (benchmarks/startup.py measures the start-up)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


def _deferred(module: str, name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = name
    return call


api: Any = _Deferred("normfuse.api")
onnx_io: Any = _Deferred("normfuse.onnxgraph.io")
FoldOptions = _deferred("normfuse.onnxgraph.fold", "FoldOptions")
run_fold = _deferred("normfuse.onnxgraph.fold", "run_fold")
default_mode = _deferred("normfuse.onnxgraph.wire", "default_mode")
check_finite = _deferred("normfuse.runtime.inputs", "check_finite")
check_runs = _deferred("normfuse.runtime.inputs", "check_runs")
check_seed = _deferred("normfuse.runtime.inputs", "check_seed")
load_inputs = _deferred("normfuse.runtime.inputs", "load_inputs")
parse_shape = _deferred("normfuse.runtime.inputs", "parse_shape")
parse_tolerances = _deferred("normfuse.runtime.inputs", "parse_tolerances")
check_models = _deferred("normfuse.runtime.parity", "check_models")
slow_check_line = _deferred("normfuse.runtime.sessions", "slow_check_line")

__all__ = ["main"]

logger = logging.getLogger(__name__)

_PROGRESS_MIN_CHAINS = 200


class _Ctx:
    debug = False
    #: The destinations of this run and the identity each had at the start (None: absent);
    #: an interruption or late error compares them to say truthfully what was written.
    destinations: dict[Path, tuple[int, int] | None] = {}  # noqa: RUF012
    signal: str | None = None


def _written() -> list[Path]:
    """The destinations that are no longer what they were when the run started."""
    return [
        p
        for p, before in _Ctx.destinations.items()
        if onnx_io.file_identity(p, follow=False) != before
    ]


def _one_line(text: str) -> str:
    """The message on one line: control characters (a newline in a file name) escaped."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _fail(exc: BaseException, debug: bool) -> None:
    if debug:
        raise exc
    written = _written()
    state = f"{', '.join(map(str, written))} was written" if written else "nothing was written"
    if isinstance(exc, NormfuseError):
        message, code = str(exc), exc.exit_code
        if written and "nothing was written" in message:
            message = message.replace("nothing was written", f"only {state}")
        elif written and "was written" not in message:
            message += f" ({state})"
    elif isinstance(exc, KeyboardInterrupt):
        what = "terminated" if _Ctx.signal == "SIGTERM" else "interrupted"
        message, code = f"{what}; {state}", 143 if what == "terminated" else 130
    elif isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        message = f"{exc.strerror or exc}{where}; {state}. Note: check the disk and the paths"
        code = 2
    else:
        message = (
            f"unexpected {type(exc).__name__}: {exc}; {state}. "
            "Note: rerun with --debug and report it"
        )
        code = 2
    click.echo(f"error: {_one_line(message)}", err=True)
    sys.exit(code)


def _destination(path: Path, force: bool, inputs: list[Path], what: str) -> Path:
    """Check a destination before any work: not an input (by identity), a regular file or a
    link (with ``--force``), in an existing folder; remember its state for the messages."""
    here = onnx_io.file_identity(path)
    for source in inputs:
        if here is not None and here == onnx_io.file_identity(source):
            raise InputError(f"the {what} {path} is the input {source}", "write to another file")
    onnx_io.check_destination(path, force=force, option="--force", what=what)
    _Ctx.destinations[path] = onnx_io.file_identity(path, follow=False)
    return path


def _json_path(
    target: str | None,
    force: bool,
    inputs: list[Path],
    others: list[Path] = (),  # type: ignore[assignment]
) -> str | None:
    """``--json PATH`` checked like ``-o`` (``-``: stdout)."""
    if target is None or target == "-":
        return target
    path = Path(target)
    for other in others:
        if path == other or (
            onnx_io.file_identity(path) is not None
            and onnx_io.file_identity(path) == onnx_io.file_identity(other)
        ):
            raise InputError(f"--json {path} is also the output", "write the report elsewhere")
    _destination(path, force, inputs, "JSON report")
    return target


def _not_an_input(out: Path, model: Any, in_place: bool) -> None:
    """Refuse an output that is one of the files the loaded model reads (its external data)."""
    here = onnx_io.file_identity(out)
    if not in_place and here is not None and here in model.meta.get(onnx_io.INPUT_FILES_KEY, ()):
        raise InputError(
            f"the output {out} is a file the input model reads", "write to another file"
        )


def _output_path(
    model: Path, output: Path | None, in_place: bool, force: bool, suffix: str
) -> Path:
    """Where a command writes: ``-o``, the input itself with ``--in-place``, or MODEL+suffix.

    Raises:
        InputError: The output is the input without ``--in-place``, exists without
            ``--force``, or its folder is missing.
    """
    if in_place and output is not None and output != model:
        raise InputError("--in-place and --output name different files", "use one of them")
    out = model if in_place else (output or model.with_name(model.stem + suffix))
    if str(out) == "-":
        raise InputError("-o - (stdout) is not supported", "give a file name")
    if in_place:
        if out.is_symlink():  # the rename would replace the link, not the file it names
            raise InputError(
                f"--in-place on {out}, a symbolic link", f"pass its target {os.path.realpath(out)}"
            )
        onnx_io.check_destination(out, force=True, option="--force")
        _Ctx.destinations[out] = onnx_io.file_identity(out, follow=False)
        return out
    here = onnx_io.file_identity(out)
    if here is not None and here == onnx_io.file_identity(model):
        raise InputError(f"the output {out} is the input", "pass --in-place to overwrite it")
    return _destination(out, force, [model], "output")


def _shapes(values: tuple[str, ...]) -> dict[str, list[int]]:
    return dict(parse_shape(v) for v in values)


def _emit_json(report_dict: dict[str, Any], target: str | None) -> None:
    """The report as JSON on stdout (``-``) or in a file (temporary file, then rename)."""
    if target is None:
        return
    text = json.dumps(report_dict, indent=2, default=float)
    if target == "-":
        click.echo(text)
        return
    path = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextmanager
def _progress(
    enabled: bool, console: Console, label: str = "folding", minimum: int = _PROGRESS_MIN_CHAINS
) -> Iterator[Callable[[int, int], None] | None]:
    if not enabled:
        yield None
        return
    bar = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    task = None
    started = False

    def update(done: int, total: int) -> None:
        nonlocal task, started
        if total < minimum:
            return
        if not started:
            bar.start()
            task = bar.add_task("fold", total=total)
            started = True
        bar.update(task, completed=done)  # type: ignore[arg-type]

    try:
        yield update
    finally:
        if started:
            bar.stop()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="normfuse")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Fold, swap, raise, lower, insert, recalibrate and check normalization layers."""
    _Ctx.destinations = {}
    _Ctx.signal = None
    _Ctx.debug = False
    # A graph is hundreds of thousands of small objects in reference cycles (nodes <-> values)
    # that live for the whole run: Python's default collector re-walks them over and over
    # (a 60k-node fold: 53 s, of which more than half collecting). Young garbage is still
    # collected; the long-lived graph is not re-walked. Same peak memory on the models measured.
    gc.set_threshold(50_000, 1000, 1000)
    for stream in (sys.stdout, sys.stderr):  # a name the terminal cannot show is replaced,
        with contextlib.suppress(AttributeError, ValueError, OSError):  # never an error
            stream.reconfigure(errors="replace")  # type: ignore[union-attr]
    with contextlib.suppress(ValueError):  # not in the main thread (tests)
        signal.signal(signal.SIGTERM, _terminated)
    _set_debug(None, None, debug)


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so that temporary files are removed on the way out."""
    _Ctx.signal = "SIGTERM"
    raise KeyboardInterrupt


def _set_debug(ctx: object, param: object, debug: bool) -> None:
    """``--debug``, given before or after the command."""
    if not debug and _Ctx.debug:
        return  # given before the command already
    _Ctx.debug = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, force=debug)
    if not debug:  # what the libraries warn about, normfuse reports itself, in one line
        for name in ("onnx_ir", "onnxscript"):
            logging.getLogger(name).setLevel(logging.ERROR)
    else:
        for name in ("onnx_ir", "onnxscript"):
            logging.getLogger(name).setLevel(logging.NOTSET)


_common_check = [
    click.option(
        "--provider",
        type=click.Choice(["auto", "cuda", "cpu"]),
        default="auto",
        show_default=True,
        help="onnxruntime provider for the parity check.",
    ),
    click.option(
        "--shape",
        "shape",
        multiple=True,
        metavar="NAME=1x3x224x224",
        help="Shape of an input with dynamic dimensions (repeatable).",
    ),
    click.option(
        "--seed", type=int, default=0, show_default=True, help="Seed of the check inputs."
    ),
    click.option(
        "--inputs",
        "inputs_path",
        type=click.Path(path_type=Path),
        default=None,
        help="Inputs for the check: an .npz file, or a folder of .npz files (one batch each).",
    ),
]


def _with(options: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def deco(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return deco


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output file [default: MODEL with .folded.onnx].",
)
@click.option(
    "--json", "json_target", metavar="PATH|-", help="Write the report as JSON ('-': stdout)."
)
@click.option("--strict", is_flag=True, help="Exit 1 when any candidate was skipped.")
@click.option("--no-check", is_flag=True, help="Skip the parity check on onnxruntime.")
@click.option("--in-place", is_flag=True, help="Overwrite the input model.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option(
    "--norm-affine",
    is_flag=True,
    help="Also fold gamma/beta of LayerNorm/GroupNorm/InstanceNorm/RMSNorm (and Mul/Add "
    "chains) into the following linear ops.",
)
@click.option(
    "--reparam",
    is_flag=True,
    help="Then merge parallel/sequential Conv, Gemm and identity branches into one op "
    "(RepVGG, MobileOne, ...; docs/reparam.md).",
)
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Write tensors to <output>.data [default: when the input had external data or "
    "the model exceeds 2 GiB].",
)
@click.option("-v", "--verbose", is_flag=True, help="List folded nodes too, not only skipped ones.")
@_with(_common_check)
def fold(
    model: Path,
    output: Path | None,
    json_target: str | None,
    strict: bool,
    no_check: bool,
    in_place: bool,
    force: bool,
    norm_affine: bool,
    reparam: bool,
    external_data: bool | None,
    verbose: bool,
    provider: str,
    shape: tuple[str, ...],
    seed: int,
    inputs_path: Path | None,
) -> None:
    """Fold inference-mode BatchNorm (and per-channel Mul/Add) into Conv/Gemm/MatMul.

    MODEL is an .onnx file, or a torch.export archive (.pt2, needs torch; no pickled code is
    executed), written back as .pt2 or, with -o x.onnx, exported, folded and checked as ONNX.
    """
    console = Console(stderr=json_target == "-", soft_wrap=True)
    try:
        suffix = ".pt2" if model.suffix == ".pt2" else ".onnx"
        out = _output_path(model, output, in_place, force, f".folded{suffix}")
        json_target = _json_path(json_target, force, [model], [out])
        shapes = _shapes(shape)
        check_seed(seed)
        inputs = load_inputs(inputs_path) if inputs_path is not None and not no_check else None
        if model.suffix == ".pt2":
            _pt2_options(norm_affine, shapes, seed, provider, inputs_path)
            _fold_pt2(
                model,
                out,
                console,
                check=not no_check,
                verbose=verbose,
                json_target=json_target,
                strict=strict,
                reparam=reparam,
            )
            return
        t0 = time.perf_counter()
        loaded = onnx_io.load(model, lazy=True)  # the model is saved once, before the file changes
        _not_an_input(out, loaded.model, in_place)
        report = Report(action="fold")
        report.timings["load"] = time.perf_counter() - t0
        with _progress(console.is_terminal, console) as progress:
            options = FoldOptions(norm_affine=norm_affine, reparam=reparam)
            run_fold(loaded.model, report, options, progress, loaded.take_proto())
        if strict and report.skipped:  # --strict fails the run: nothing is written
            report.render(console, verbose=verbose)
            _emit_json(report.to_dict(), json_target)
            _raise_strict(report)

        def verify(tmp: Path) -> None:
            if no_check:
                return
            graph = loaded.model.graph
            slow = slow_check_line(len(graph), len(graph.initializers))
            if slow is not None:  # said before it starts
                console.print(f"note: {slow}", style="dim", highlight=False)
            t = time.perf_counter()
            parts: dict[str, float] = {}
            report.parity = check_models(
                model,
                tmp,
                provider=provider,
                seed=seed,
                shapes=shapes,
                inputs=inputs,
                defaults=FOLD_TOLERANCES,
                upcast=True,
                timings=parts,
            )
            report.timings["check"] = time.perf_counter() - t
            if verbose:  # where the check's time went
                report.timings.update({f"check {k}": v for k, v in parts.items()})
            raise_for_parity(report)  # the temporary file is then removed, not renamed

        t1 = time.perf_counter()
        try:
            onnx_io.save(
                loaded.model,
                out,
                force=True,
                external_data=external_data,
                verify=verify,
                discard=in_place,  # the input's data is removed only when it is replaced
            )
        except ParityError:
            report.render(console, verbose=verbose)
            _emit_json(report.to_dict(), json_target)
            raise
        report.timings["save"] = time.perf_counter() - t1 - report.timings.get("check", 0.0)
        report.render(console, verbose=verbose)
        _emit_json(report.to_dict(), json_target)
        console.print(f"wrote {out}", highlight=False)
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        _fail(exc, _Ctx.debug)


def _raise_strict(report: Report) -> None:
    try:
        raise_for_strict(report)
    except StrictError as exc:
        raise StrictError(
            f"{exc.message}; with --strict nothing was written",
            report,
            exc.note or "fold without --strict to write what folds",
        ) from None


def _pt2_options(
    norm_affine: bool, shapes: object, seed: int, provider: str, inputs: Path | None
) -> None:
    """Refuse the options a .pt2 fold cannot honour (it was silently the same fold without)."""
    unused = [
        name
        for name, given in (
            ("--norm-affine", norm_affine),
            ("--shape", bool(shapes)),
            ("--seed", seed != 0),
            ("--provider", provider != "auto"),
            ("--inputs", inputs is not None),
        )
        if given
    ]
    if unused:
        raise InputError(
            f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to a .pt2 "
            "model: it folds BatchNorm in PyTorch and checks on its own example inputs",
            f"leave {'it' if len(unused) == 1 else 'them'} out, or export the model to ONNX "
            f"and fold that file with {'it' if len(unused) == 1 else 'them'}",
        )


def _fold_pt2(
    model: Path,
    out: Path,
    console: Console,
    *,
    check: bool,
    verbose: bool,
    json_target: str | None,
    strict: bool,
    reparam: bool = False,
) -> None:
    """Fold a torch.export archive into a .pt2 again, or export the result to ONNX."""
    try:
        from normfuse.torchmodel.export import export, load_pt2, save_pt2
        from normfuse.torchmodel.fold import fold_torch
    except ImportError:
        raise InputError(
            f"{model} is a torch.export archive, and torch is not installed",
            "pip install 'normfuse[torch]'",
        ) from None
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's own deprecations
    ep = load_pt2(model)
    folded, report = fold_torch(ep, check=check, reparam=reparam)
    if strict and report.skipped:
        report.render(console, verbose=verbose)
        _emit_json(report.to_dict(), json_target)
        _raise_strict(report)
    if out.suffix == ".onnx":
        args, kwargs = ep.example_inputs or ((), {})
        exported = export(
            folded, kwargs if kwargs and not args else args, out, check=check, force=True
        )
        report.notes += exported.notes
        report.parity = exported.parity or report.parity
        report.timings.update({k: v for k, v in exported.timings.items() if k != "fold"})
    else:
        save_pt2(folded, out, force=True)
    report.render(console, verbose=verbose)
    _emit_json(report.to_dict(), json_target)
    console.print(f"wrote {out}", highlight=False)


_rewrite_options = [
    click.argument("model", type=click.Path(path_type=Path)),
    click.option("-o", "--output", type=click.Path(path_type=Path), help="Output file."),
    click.option("--force", is_flag=True, help="Replace an existing output."),
    click.option("--in-place", is_flag=True, help="Overwrite the input model."),
    click.option("--no-check", is_flag=True, help="Skip the parity check on onnxruntime."),
    click.option(
        "--json", "json_target", metavar="PATH|-", help="Write the report as JSON ('-': stdout)."
    ),
    click.option("-v", "--verbose", is_flag=True, help="List every entry."),
    *_common_check[:3],  # --provider, --shape, --seed
]


def _run_rewrite(
    action: str,
    rewrite: Callable[[Any], tuple[Any, list[Any], list[str]]],
    *,
    exact: bool,
    what: str,
    model: Path,
    output: Path | None,
    force: bool,
    in_place: bool,
    no_check: bool,
    json_target: str | None,
    verbose: bool,
    provider: str,
    shape: tuple[str, ...],
    seed: int,
    subject: str | None = None,
    where: str | None = None,
) -> None:
    """load -> rewrite -> save (checked on the temporary file) -> report, for ONNX rewrites.

    With ``subject`` (what the rewrite changes, e.g. "BatchNormalization node"), a run that
    applies nothing writes nothing and says why; a ``--where`` that matches no ``subject`` is
    a usage error.
    """
    console = Console(stderr=json_target == "-", soft_wrap=True)
    try:
        out = _output_path(model, output, in_place, force, f".{action}.onnx")
        json_target = _json_path(json_target, force, [model], [out])
        shapes = _shapes(shape)
        check_seed(seed)
        t0 = time.perf_counter()
        loaded = onnx_io.load(model)
        _not_an_input(out, loaded.model, in_place)
        report = Report(action=action)
        report.timings["load"] = time.perf_counter() - t0
        new = api.apply_rewrite(loaded.model, action, rewrite, report)
        if subject is not None and not report.applied:
            if where is not None and not report.entries:
                raise InputError(
                    f"--where {where!r} matches no {subject}", "check the node names (inspect)"
                )
            report.render(console, verbose=verbose)
            _emit_json(report.to_dict(), json_target)
            first = report.skipped[0] if report.skipped else None
            why = (
                f"{len(report.skipped)} {subject}(s) skipped, first '{first.node}': {first.reason}"
                + (f". Fix: {first.fix}" if first.fix else "")
                if first is not None
                else f"the model has no {subject}"
            )
            console.print(f"nothing to do: {why}; nothing was written", highlight=False)
            return

        def verify(tmp: Path) -> None:
            if no_check or not report.applied:
                return
            t = time.perf_counter()
            report.parity = check_models(
                model,
                tmp,
                provider=provider,
                seed=seed,
                shapes=shapes,
                defaults=FOLD_TOLERANCES,
                upcast=True,
            )
            report.timings["check"] = time.perf_counter() - t
            api.judge_parity(report, exact=exact, what=what)  # raising keeps the file out

        try:
            onnx_io.save(new, out, force=True, verify=verify, discard=in_place)
        except ParityError:
            report.render(console, verbose=verbose)
            _emit_json(report.to_dict(), json_target)
            raise
        report.render(console, verbose=verbose)
        _emit_json(report.to_dict(), json_target)
        console.print(f"wrote {out}", highlight=False)
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        _fail(exc, _Ctx.debug)


_SWAP_TARGETS = ("groupnorm", "instancenorm", "layernorm", "frozen", "identity")


@cli.command()
@_with(_rewrite_options)
@click.option(
    "--to", "to", required=True, help="groupnorm, instancenorm, layernorm, frozen or identity."
)
@click.option(
    "--where", default=None, metavar="GLOB", help="Only BatchNorm nodes whose name matches."
)
@click.option("--groups", default="auto", show_default=True, help="GroupNorm groups: N or auto.")
@click.option(
    "--allow-single-channel-groups", is_flag=True, help="Allow 1 channel per group on (N, C) data."
)
def swap(
    to: str, where: str | None, groups: str, allow_single_channel_groups: bool, **common: Any
) -> None:
    """Replace BatchNormalization by another norm (exact for frozen; the others change the function)."""
    from normfuse.core import norms
    from normfuse.onnxgraph.swap import swap_model

    try:
        try:
            kind = norms.lookup(to)
        except InputError:
            kind = None
        if kind is None or kind.name not in _SWAP_TARGETS:
            raise InputError(
                f"cannot swap BatchNormalization to {to!r} in ONNX",
                f"use one of {', '.join(_SWAP_TARGETS)}",
            )
        g: int | str = groups if groups == "auto" else int(groups)
    except (NormfuseError, ValueError) as exc:
        _fail(
            InputError(f"--groups {groups!r} is not a number or auto")
            if isinstance(exc, ValueError)
            else exc,
            _Ctx.debug,
        )
        return
    _run_rewrite(
        "swap",
        lambda m: (
            m,
            swap_model(
                m,
                to,
                where=where,
                groups=g,
                allow_single_channel_groups=allow_single_channel_groups,
            ),
            [],
        ),
        exact=kind.exact,
        what=f"swapping to {kind.name}",
        subject="BatchNormalization node",
        where=where,
        **common,
    )


@cli.command(name="raise")
@_with(_rewrite_options)
@click.option(
    "--target-opset",
    type=int,
    default=None,
    help="Highest opset the model may be raised to (never raised without it).",
)
def raise_command(target_opset: int | None, **common: Any) -> None:
    """Write LayerNormalization / RMSNormalization / GroupNormalization for decomposed chains."""
    from normfuse.onnxgraph.raise_norms import raise_model

    _run_rewrite(
        "raise",
        lambda m: raise_model(m, target_opset=target_opset),
        exact=True,
        what="raise",
        subject="decomposed norm",
        **common,
    )


@cli.command()
@_with(_rewrite_options)
@click.option("--target-opset", type=int, required=True, help="The opset the result must run at.")
def lower(target_opset: int, **common: Any) -> None:
    """Decompose fused norm ops the target opset lacks, and lower the model's opset."""
    from normfuse.onnxgraph.lower_norms import lower_model

    _run_rewrite(
        "lower", lambda m: lower_model(m, target_opset), exact=True, what="lower", **common
    )


@cli.command()
@_with(_rewrite_options)
@click.option(
    "--norm",
    default="batchnorm",
    show_default=True,
    help="batchnorm, groupnorm, instancenorm or layernorm.",
)
@click.option(
    "--after", default="Conv,Gemm,MatMul", show_default=True, help="Op types that get a norm."
)
@click.option(
    "--before-activation/--after-activation",
    default=True,
    show_default=True,
    help="Put the norm between the op and its activation, or after the activation.",
)
@click.option("--where", default=None, metavar="GLOB", help="Only ops whose name matches.")
def insert(
    norm: str, after: str, before_activation: bool, where: str | None, **common: Any
) -> None:
    """Add a norm after each linear op that has none (BatchNorm: the identity in inference)."""
    from normfuse.core import norms
    from normfuse.onnxgraph.insert import insert_model

    ops = [a.strip() for a in after.split(",") if a.strip()]
    try:
        kind = norms.lookup(norm)
        import onnx

        unknown = [op for op in ops if not onnx.defs.has(op)]
        if unknown or not ops:
            raise InputError(
                f"--after names unknown op type(s) {', '.join(unknown) or repr(after)}",
                "give ONNX op types, e.g. --after Conv,Gemm,MatMul",
            )
    except NormfuseError as exc:
        _fail(exc, _Ctx.debug)
        return
    _run_rewrite(
        "insert",
        lambda m: (
            m,
            insert_model(m, norm=norm, after=ops, before_activation=before_activation, where=where),
            [],
        ),
        exact=kind.name == "batchnorm",
        what=f"inserting {kind.name}",
        subject=f"{'/'.join(ops)} node",
        where=where,
        **common,
    )


@cli.command()
@_with(_rewrite_options)
@click.option(
    "--data",
    "data_path",
    metavar="DIR|FILE|GLOB",
    required=True,
    help="Batches, read one at a time: a folder of .npz files (one batch each, keyed by input "
    "name; or of .npy files for a one-input model), one such file, or a glob ('calib/*.npz').",
)
@click.option("--batches", type=int, default=None, help="Use at most this many batches.")
@click.option(
    "--samples",
    type=int,
    default=None,
    help="Use at most this many samples (over the batch dimension; the last batch is cut).",
)
@click.option(
    "--where", default=None, metavar="GLOB", help="Only BatchNorm nodes whose name matches."
)
@click.option(
    "--mode",
    type=click.Choice(["sequential", "batch"]),
    default="sequential",
    show_default=True,
    help="sequential: each BatchNorm measured on what the recalibrated ones before it give, "
    "one pass per level; batch: one pass, every BatchNorm normalising with the batch's own "
    "statistics (PyTorch's training-mode recalibration).",
)
@click.option(
    "--workers",
    type=int,
    default=1,
    show_default=True,
    help="Worker processes, each an onnxruntime session on its shard of the batches; merged "
    "exactly.",
)
@click.option(
    "--cache-mb",
    type=float,
    default=1024,
    show_default=True,
    help="sequential: memory for each level's inputs (all workers); beyond it a temporary "
    "folder, removed at the end.",
)
@click.option(
    "--no-cache", is_flag=True, help="sequential: run each level's prefix from the data instead."
)
def recalibrate(
    data_path: str,
    batches: int | None,
    samples: int | None,
    where: str | None,
    mode: str,
    workers: int,
    cache_mb: float,
    no_cache: bool,
    **common: Any,
) -> None:
    """Recompute BatchNormalization mean/variance from data (float64, merged exactly)."""
    from normfuse.runtime.inputs import open_batches
    from normfuse.runtime.recalib_workers import recalibrate_onnx

    try:
        if workers < 1:
            raise InputError(f"--workers {workers} runs nothing", "give --workers 1 or more")
        if cache_mb < 0:
            raise InputError(f"--cache-mb {cache_mb:g} is below 0", "give 0 or more")
        stream = open_batches(data_path).limit(batches, samples)
    except NormfuseError as exc:
        _fail(exc, _Ctx.debug)
        return

    def rewrite(m: Any) -> tuple[Any, list[Any], list[str]]:
        entries, notes = recalibrate_onnx(
            m,
            stream,
            mode=mode,
            workers=workers,
            provider=common["provider"],
            cache=not no_cache,
            cache_mb=cache_mb,
            where=where,
            progress=True,
        )
        return m, entries, notes

    _run_rewrite(
        "recalibrate",
        rewrite,
        exact=False,
        what="recalibration",
        subject="BatchNormalization node",
        where=where,
        **common,
    )


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--json", "json_target", metavar="PATH|-", help="Write the report as JSON ('-': stdout)."
)
@click.option("--norm-affine", is_flag=True, help="Consider gamma/beta of LN/GN/IN/RMSNorm too.")
@click.option("--force", is_flag=True, help="Replace an existing --json file.")
def inspect(model: Path, json_target: str | None, norm_affine: bool, force: bool) -> None:
    """List every normalization, what it can fold into, and why not."""
    console = Console(stderr=json_target == "-", soft_wrap=True)
    try:
        json_target = _json_path(json_target, force, [model])
        report = api.inspect(model, norm_affine=norm_affine)
        report.render(console)
        _emit_json(report.to_dict(), json_target)
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        _fail(exc, _Ctx.debug)


def _defaults(i: int) -> str:
    """The default tolerances of ``check`` per element type, for its help."""
    return ", ".join(f"{t} {v[i]:g}" for t, v in DEFAULT_TOLERANCES.items())


@cli.command()
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option(
    "--json", "json_target", metavar="PATH|-", help="Write the result as JSON ('-': stdout)."
)
@click.option("--runs", type=int, default=1, show_default=True, help="Number of input batches.")
@click.option(
    "--ort-opt",
    type=click.Choice(["disable", "basic", "extended", "all"]),
    default="disable",
    show_default=True,
    help="onnxruntime graph optimization level.",
)
@click.option(
    "--atol",
    multiple=True,
    metavar="[NAME=]X",
    help="Absolute tolerance, for every output or one (repeatable). Given, it replaces the "
    "tolerance measured on the models (README: how the check judges a rewrite), outputs only; "
    f"where none can be measured: {_defaults(0)}.",
)
@click.option(
    "--rtol",
    multiple=True,
    metavar="[NAME=]X",
    help="Relative tolerance, times max|reference| (repeatable, per output too). Given, it "
    "replaces the tolerance measured on the models, outputs only; where none can be measured: "
    f"{_defaults(1)}.",
)
@click.option(
    "--bisect", is_flag=True, help="On failure, name the first intermediate tensor that differs."
)
@click.option(
    "--cross-check",
    is_flag=True,
    help="Also compare the reference on CPU vs CUDA, to tell provider noise from rewrite error.",
)
@click.option("--force", is_flag=True, help="Replace an existing --json file.")
@_with(_common_check)
def check(
    reference: Path,
    candidate: Path,
    json_target: str | None,
    runs: int,
    ort_opt: str,
    atol: tuple[str, ...],
    rtol: tuple[str, ...],
    bisect: bool,
    cross_check: bool,
    force: bool,
    provider: str,
    shape: tuple[str, ...],
    seed: int,
    inputs_path: Path | None,
) -> None:
    """Compare two ONNX models output by output on the same inputs.

    Exit code 0 when every output passes, 1 when one fails, 2 on bad input.
    """
    console = Console(stderr=json_target == "-", soft_wrap=True)
    try:
        json_target = _json_path(json_target, force, [reference, candidate])
        check_runs(runs)
        check_seed(seed)
        atols, rtols = parse_tolerances(atol, "--atol"), parse_tolerances(rtol, "--rtol")
        for p in (reference, candidate):
            onnx_io.load(p, copy=False)
        result = check_models(
            reference,
            candidate,
            provider=provider,
            seed=seed,
            shapes=_shapes(shape),
            runs=runs,
            opt_level=ort_opt,
            atol=atols,
            rtol=rtols,
            inputs=load_inputs(inputs_path) if inputs_path is not None else None,
            bisect=bisect,
            cross_check=cross_check,
            upcast=True,
            labels=("reference", "second"),
        )
        console.print(f"parity on {result.provider} ({result.runs} batch(es)):", highlight=False)
        for line in result.lines():
            style = "red" if line.startswith(("FAILED", "first divergence")) else "green"
            console.print(line, style=style, highlight=False)
        for n in result.notes:
            console.print(f"note: {n}", style="dim", highlight=False)
        _emit_json(result.to_dict(), json_target)
        if not result.passed:
            sys.exit(1)
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        _fail(exc, _Ctx.debug)


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--fold",
    "fold_first",
    is_flag=True,
    help="With one MODEL: fold it (in a temporary folder) and time original vs folded.",
)
@click.option(
    "--ort-opt",
    "levels",
    multiple=True,
    type=click.Choice(["disable", "basic", "extended", "all"]),
    help="onnxruntime optimization level(s) to time [default: disable and all].",
)
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed runs first.")
@click.option(
    "--reps", type=int, default=50, show_default=True, help="Timed runs per model and level."
)
@click.option(
    "--json", "json_target", metavar="PATH|-", help="Write the results as JSON ('-': stdout)."
)
@click.option("--force", is_flag=True, help="Replace an existing --json file.")
@click.option(
    "--provider",
    type=click.Choice(["auto", "cuda", "cpu"]),
    default="auto",
    show_default=True,
    help="onnxruntime provider to time on.",
)
@_with(_common_check[1:3])
def bench(
    models: tuple[Path, ...],
    fold_first: bool,
    levels: tuple[str, ...],
    warmup: int,
    reps: int,
    json_target: str | None,
    force: bool,
    provider: str,
    shape: tuple[str, ...],
    seed: int,
) -> None:
    """Inference latency of MODEL, or of several models compared run by run (outputs are not
    compared: use `normfuse check` for that)."""
    import tempfile

    from rich.table import Table

    from normfuse.runtime.bench import measure_latency

    console = Console(stderr=json_target == "-", soft_wrap=True)
    try:
        json_target = _json_path(json_target, force, list(models))
        check_seed(seed)
        if fold_first and len(models) != 1:
            raise InputError("--fold takes exactly one model")
        for m in models:
            onnx_io.load(m, copy=False)
        with tempfile.TemporaryDirectory(prefix="normfuse-bench-") as tmp:
            paths = list(models)
            if fold_first:
                loaded = onnx_io.load(models[0], lazy=True)
                run_fold(loaded.model, Report(), FoldOptions(), None, loaded.take_proto())
                paths.append(
                    onnx_io.save(loaded.model, Path(tmp) / f"{models[0].stem}.folded.onnx")
                )
            with _progress(console.is_terminal, console, "timing", minimum=0) as progress:
                results = measure_latency(
                    paths,
                    provider=provider,
                    opt_levels=levels or ("disable", "all"),
                    warmup=warmup,
                    reps=reps,
                    shapes=_shapes(shape),
                    seed=seed,
                    progress=progress,
                )
        table = Table(title=f"latency on {results[0].provider}, {reps} runs, median (p10-p90)")
        table.add_column("model")
        table.add_column("ort level")
        table.add_column("median ms", justify="right")
        table.add_column("p10-p90 ms", justify="right")
        table.add_column("vs first", justify="right")
        for level in levels or ("disable", "all"):
            rows = [r for r in results if r.opt_level == level]
            for r in rows:
                name = Path(r.model).name if not (fold_first and r is rows[-1]) else "(folded)"
                table.add_row(
                    name,
                    level,
                    f"{r.median_ms:.3f}",
                    f"{r.p10_ms:.3f}-{r.p90_ms:.3f}",
                    f"{r.median_ms / rows[0].median_ms:.3f}x",
                )
        console.print(table)
        _emit_json({"results": [r.to_dict() for r in results]}, json_target)
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        _fail(exc, _Ctx.debug)


for _command in cli.commands.values():  # --debug after the command, too
    _command.params.append(
        click.Option(
            ["--debug"],
            is_flag=True,
            expose_value=False,
            callback=_set_debug,
            help="Show tracebacks instead of one-line errors.",
        )
    )


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
