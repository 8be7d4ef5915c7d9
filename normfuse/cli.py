"""The ``normfuse`` command line: parse, call the API, render the report, set the exit code.

Exit codes: 0 success; 1 parity failure, or ``--strict`` with skipped candidates; 2 bad input or
usage. Errors are one line ``error: <problem>. Note: <fix>``; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from normfuse import __version__, api
from normfuse.core.errors import InputError, NormfuseError, ParityError
from normfuse.core.report import Report
from normfuse.core.verdict import FOLD_TOLERANCES, raise_for_parity, raise_for_strict
from normfuse.onnxgraph import io as onnx_io
from normfuse.onnxgraph.fold import FoldOptions, run_fold
from normfuse.runtime.inputs import load_inputs, parse_shape, parse_tolerances
from normfuse.runtime.parity import check_models

__all__ = ["main"]

logger = logging.getLogger(__name__)

_PROGRESS_MIN_CHAINS = 200


class _Ctx:
    debug = False


def _fail(exc: BaseException, debug: bool) -> None:
    if debug:
        raise exc
    if isinstance(exc, NormfuseError):
        message, code = str(exc), exc.exit_code
    elif isinstance(exc, KeyboardInterrupt):
        message, code = "interrupted; nothing was written", 130
    elif isinstance(exc, OSError):
        message, code = f"{exc.strerror or exc} ({exc.filename})" if exc.filename else str(exc), 2
    else:
        message = f"unexpected {type(exc).__name__}: {exc}. Note: rerun with --debug and report it"
        code = 2
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


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
    if not in_place:
        if out.exists() and model.exists() and out.resolve() == model.resolve():
            raise InputError(f"the output {out} is the input", "pass --in-place to overwrite it")
        if out.exists() and not force:
            raise InputError(f"{out} exists", "pass --force to replace it")
    if not out.parent.is_dir():
        raise InputError(f"the output folder {out.parent} does not exist")
    return out


def _shapes(values: tuple[str, ...]) -> dict[str, list[int]]:
    return dict(parse_shape(v) for v in values)


def _emit_json(report_dict: dict[str, Any], target: str | None) -> None:
    if target is None:
        return
    text = json.dumps(report_dict, indent=2, default=float)
    if target == "-":
        click.echo(text)
    else:
        Path(target).write_text(text + "\n")


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
    _Ctx.debug = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING)
    if not debug:  # what the libraries warn about, normfuse reports itself, in one line
        for name in ("onnx_ir", "onnxscript"):
            logging.getLogger(name).setLevel(logging.ERROR)


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
        shapes = _shapes(shape)
        inputs = load_inputs(inputs_path) if inputs_path is not None and not no_check else None
        if model.suffix == ".pt2":
            _fold_pt2(
                model,
                out,
                console,
                check=not no_check,
                verbose=verbose,
                json_target=json_target,
                strict=strict,
            )
            return
        t0 = time.perf_counter()
        loaded = onnx_io.load(model, lazy=True)  # the model is saved once, before the file changes
        report = Report(action="fold")
        report.timings["load"] = time.perf_counter() - t0
        with _progress(console.is_terminal, console) as progress:
            run_fold(loaded.model, report, FoldOptions(norm_affine=norm_affine), progress)

        def verify(tmp: Path) -> None:
            if no_check:
                return
            t = time.perf_counter()
            report.parity = check_models(
                model,
                tmp,
                provider=provider,
                seed=seed,
                shapes=shapes,
                inputs=inputs,
                defaults=FOLD_TOLERANCES,
                upcast=True,
            )
            report.timings["check"] = time.perf_counter() - t
            raise_for_parity(report)  # the temporary file is then removed, not renamed

        t1 = time.perf_counter()
        try:
            onnx_io.save(
                loaded.model,
                out,
                force=True,
                external_data=external_data,
                verify=verify,
                discard=True,
            )
        except ParityError:
            report.render(console, verbose=verbose)
            _emit_json(report.to_dict(), json_target)
            raise
        report.timings["save"] = time.perf_counter() - t1 - report.timings.get("check", 0.0)
        report.render(console, verbose=verbose)
        _emit_json(report.to_dict(), json_target)
        console.print(f"wrote {out}", highlight=False)
        if strict:
            raise_for_strict(report)
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        _fail(exc, _Ctx.debug)


def _fold_pt2(
    model: Path,
    out: Path,
    console: Console,
    *,
    check: bool,
    verbose: bool,
    json_target: str | None,
    strict: bool,
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
    ep = load_pt2(model)
    folded, report = fold_torch(ep, check=check)
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
    if strict:
        raise_for_strict(report)


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
) -> None:
    """load -> rewrite -> save (checked on the temporary file) -> report, for ONNX rewrites."""
    console = Console(stderr=json_target == "-", soft_wrap=True)
    try:
        out = _output_path(model, output, in_place, force, f".{action}.onnx")
        shapes = _shapes(shape)
        t0 = time.perf_counter()
        loaded = onnx_io.load(model)
        report = Report(action=action)
        report.timings["load"] = time.perf_counter() - t0
        new = api.apply_rewrite(loaded.model, action, rewrite, report)

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
            onnx_io.save(new, out, force=True, verify=verify, discard=True)
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
        kind = norms.lookup(to)
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

    try:
        kind = norms.lookup(norm)
    except NormfuseError as exc:
        _fail(exc, _Ctx.debug)
        return
    ops = [a.strip() for a in after.split(",") if a.strip()]
    _run_rewrite(
        "insert",
        lambda m: (
            m,
            insert_model(m, norm=norm, after=ops, before_activation=before_activation, where=where),
            [],
        ),
        exact=kind.name == "batchnorm",
        what=f"inserting {kind.name}",
        **common,
    )


@cli.command()
@_with(_rewrite_options)
@click.option(
    "--data",
    "data_path",
    type=click.Path(path_type=Path),
    required=True,
    help="Batches: an .npz file, or a folder of .npz files (one batch each), keyed by input name.",
)
@click.option("--batches", type=int, default=None, help="Use at most this many batches.")
@click.option(
    "--where", default=None, metavar="GLOB", help="Only BatchNorm nodes whose name matches."
)
def recalibrate(data_path: Path, batches: int | None, where: str | None, **common: Any) -> None:
    """Recompute BatchNormalization mean/variance from data (float64, level by level)."""
    from normfuse.onnxgraph.recalibrate import recalibrate_model
    from normfuse.runtime.sessions import check_feeds, make_session, select_provider

    try:
        data = load_inputs(data_path)[: batches if batches is not None else None]
        providers, label = select_provider(common["provider"])
    except NormfuseError as exc:
        _fail(exc, _Ctx.debug)
        return
    notes: list[str] = []

    def runner(payload: bytes, names: list[str]) -> Callable[[dict[str, Any]], list[Any]]:
        session = make_session(payload, providers, "disable", notes)
        return lambda feeds: session.run(names, check_feeds(session, feeds, str(data_path)))

    console = Console(stderr=True)

    def rewrite(m: Any) -> tuple[Any, list[Any], list[str]]:
        with _progress(console.is_terminal, console, "recalibrating", minimum=1) as progress:
            entries = recalibrate_model(m, data, runner=runner, where=where, progress=progress)
        return m, entries, [f"{len(data)} batch(es) on {label}", *notes]

    _run_rewrite("recalibrate", rewrite, exact=False, what="recalibration", **common)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--json", "json_target", metavar="PATH|-", help="Write the report as JSON ('-': stdout)."
)
@click.option("--norm-affine", is_flag=True, help="Consider gamma/beta of LN/GN/IN/RMSNorm too.")
def inspect(model: Path, json_target: str | None, norm_affine: bool) -> None:
    """List every normalization, what it can fold into, and why not."""
    console = Console(stderr=json_target == "-", soft_wrap=True)
    try:
        report = api.inspect(model, norm_affine=norm_affine)
        report.render(console)
        _emit_json(report.to_dict(), json_target)
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        _fail(exc, _Ctx.debug)


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
    help="Absolute tolerance, for every output or one (repeatable).",
)
@click.option(
    "--rtol",
    multiple=True,
    metavar="[NAME=]X",
    help="Relative tolerance, times max|reference| (repeatable, per output too).",
)
@click.option(
    "--bisect", is_flag=True, help="On failure, name the first intermediate tensor that differs."
)
@click.option(
    "--cross-check",
    is_flag=True,
    help="Also compare the reference on CPU vs CUDA, to tell provider noise from rewrite error.",
)
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
            atol=parse_tolerances(atol, "--atol"),
            rtol=parse_tolerances(rtol, "--rtol"),
            inputs=load_inputs(inputs_path) if inputs_path is not None else None,
            bisect=bisect,
            cross_check=cross_check,
            upcast=True,
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
    help="With one MODEL: fold it (in a temporary folder) and compare original vs folded.",
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
@_with(_common_check[:3])
def bench(
    models: tuple[Path, ...],
    fold_first: bool,
    levels: tuple[str, ...],
    warmup: int,
    reps: int,
    json_target: str | None,
    provider: str,
    shape: tuple[str, ...],
    seed: int,
) -> None:
    """Inference latency of MODEL, or of several models compared run by run."""
    import tempfile

    from rich.table import Table

    from normfuse.runtime.bench import measure_latency

    console = Console(stderr=json_target == "-", soft_wrap=True)
    try:
        if fold_first and len(models) != 1:
            raise InputError("--fold takes exactly one model")
        for m in models:
            onnx_io.load(m, copy=False)
        with tempfile.TemporaryDirectory(prefix="normfuse-bench-") as tmp:
            paths = list(models)
            if fold_first:
                loaded = onnx_io.load(models[0], lazy=True)
                run_fold(loaded.model, Report(), FoldOptions())
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


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
