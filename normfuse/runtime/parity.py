"""Numerical parity of two ONNX models on onnxruntime.

Both models run on the same inputs (:mod:`normfuse.runtime.inputs`) in sessions of
:mod:`normfuse.runtime.sessions`; each output is judged by the rule of
:mod:`normfuse.core.verdict`. With ``bisect`` a failure names the first diverging tensor
(:mod:`normfuse.runtime.bisect`).

Imports: onnx, onnx_ir, numpy, :mod:`normfuse.core`, :mod:`normfuse.onnxgraph.upcast` and the
runtime package.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx_ir as ir

from normfuse.core.errors import InputError, ProviderError
from normfuse.core.report import OutputParity, ParityResult
from normfuse.core.verdict import (
    CHANNEL_FLOOR_FACTOR,
    DEFAULT_TOLERANCES,
    NATIVE_INNER_NOISE_FACTOR,
    NOISE_FACTOR,
    compare_outputs,
    noise_floor,
    worse,
)
from normfuse.onnxgraph.upcast import low_precision_types
from normfuse.runtime.bisect import find_divergence
from normfuse.runtime.inputs import check_runs, check_seed, generate_inputs, tolerance_for
from normfuse.runtime.judge import judge_upcast
from normfuse.runtime.noise import (
    Graph,
    differences,
    inner_tensors,
    judge_against_noise,
    measure_noise,
    read_graph,
    selection_note,
)
from normfuse.runtime.sessions import (
    ModelSource,
    check_feeds,
    make_session,
    run_session,
    select_provider,
    slow_check_line,
)

__all__ = ["check_by_noise", "check_models", "check_same_inputs"]

logger = logging.getLogger(__name__)


def check_models(
    reference: ModelSource,
    candidate: ModelSource,
    *,
    provider: str = "auto",
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    runs: int = 1,
    opt_level: str = "disable",
    atol: Mapping[str, float] | float | None = None,
    rtol: Mapping[str, float] | float | None = None,
    inputs: Sequence[Mapping[str, np.ndarray]] | None = None,
    bisect: bool = False,
    cross_check: bool = False,
    defaults: Mapping[str, tuple[float, float]] = DEFAULT_TOLERANCES,
    upcast: bool = False,
    labels: tuple[str, str] = ("reference", "rewritten"),
    timings: dict[str, float] | None = None,
) -> ParityResult:
    """Run two models on the same inputs and compare every output.

    Args:
        reference: The original model (path or serialized bytes).
        candidate: The rewritten model.
        provider: ``auto``, ``cuda`` or ``cpu``.
        seed: Seed of the first generated batch; batch ``i`` uses ``seed + i``.
        shapes: Shapes for inputs with dynamic dimensions.
        runs: Number of generated batches (ignored when ``inputs`` are given).
        opt_level: onnxruntime graph optimization level (``disable``, ``basic``, ``extended``,
            ``all``).
        atol: Absolute tolerance, for all outputs or per output name (``"*"`` for the rest).
        rtol: Relative tolerance (times the reference's largest magnitude), likewise.
        inputs: The user's own batches, each a mapping from input name to array.
        bisect: When an output fails, name the first intermediate tensor (in the reference's
            topological order, matched by name) whose error exceeds its tolerance.
        cross_check: Also run the reference on the CPU and the CUDA provider and compare them,
            so provider noise is told apart from rewrite error (needs CUDA).
        defaults: ``(atol, rtol)`` per element type where ``atol``/``rtol`` say nothing.
        upcast: Judge 16-bit models with their tensors upcast to float32, where a rewrite's own
            error is visible (:mod:`normfuse.runtime.judge`); the 16-bit difference is then
            reported beside the original's own noise. Ignored when ``atol``/``rtol`` are given.
        labels: What the messages call the two models (``check`` of two files the user
            names: ``first``, ``second``).
        timings: Filled, when given, with seconds per part of the check (``sessions``: building
            onnxruntime sessions, ``runs``: running them, ``judge``: comparing).

    With ``upcast`` and no ``atol``/``rtol``, float32/float64 models are judged against their
    own noise (:func:`check_by_noise`) and 16-bit models with their tensors upcast.

    Raises:
        InputError: The models or inputs do not fit together.
        ProviderError: CUDA was required and does not load here.
    """
    check_seed(seed)
    if inputs is None:
        check_runs(runs)
    elif not inputs:
        raise InputError("--inputs holds no batch", "give at least one .npz file")
    first, second = labels
    providers, label = select_provider(provider)
    if cross_check and label != "CUDA":
        raise ProviderError(
            "--cross-check compares the CPU and CUDA providers, and CUDA does not load here",
            "run it on a machine with onnxruntime-gpu and a CUDA GPU",
        )
    notes: list[str] = []
    clock = _Clock(timings)
    low = False
    inner: list[str] | None = None
    if upcast and atol is None and rtol is None:
        with clock("judge"):
            graph = read_graph(reference)
            low = bool(low_precision_types(ir.from_proto(graph.proto)))
        if not low:
            parity, batch, failing = check_by_noise(
                graph,
                candidate,
                providers,
                label,
                opt_level=opt_level,
                seed=seed,
                shapes=shapes,
                runs=runs,
                inputs=inputs,
                defaults=defaults,
                labels=labels,
                clock=clock,
            )
            parity.notes[:0] = notes
            if bisect and failing is not None:
                parity.divergence = find_divergence(
                    reference, candidate, providers, opt_level, failing, atol, rtol, defaults
                )
            if cross_check:
                parity.cross_check = _cross_check(
                    reference,
                    providers,
                    opt_level,
                    batch,
                    atol,
                    rtol,
                    defaults,
                    parity.notes,
                    first,
                )
            return parity
        inner = inner_tensors(graph, read_graph(candidate))
        del graph
    with clock("sessions"):
        ref_sess = make_session(reference, providers, opt_level, notes, f"the {first}")
        cand_sess = make_session(candidate, providers, opt_level, notes, f"the {second}")
    names = [o.name for o in ref_sess.get_outputs()]
    _same_interface(ref_sess, cand_sess, names, labels)
    for spec, option in ((atol, "--atol"), (rtol, "--rtol")):
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(names) - {"*"})
            if unknown:
                raise InputError(
                    f"{option} names unknown output(s) {', '.join(unknown)}",
                    f"the outputs are {', '.join(names)}",
                )
    batches = _batches(ref_sess, inputs, seed, shapes, runs, notes)
    worst: dict[str, OutputParity] = {}
    first_failing: dict[str, np.ndarray] | None = None
    native_reference = []
    for feeds in batches:
        ref_out = run_session(ref_sess, names, feeds, first)
        native_reference.append(ref_out)
        cand_out = run_session(cand_sess, names, feeds, second)
        for name, r, c in zip(names, ref_out, cand_out, strict=True):
            result = compare_outputs(
                name,
                np.asarray(r),
                np.asarray(c),
                tolerance_for(atol, name),
                tolerance_for(rtol, name),
                defaults,
            )
            if not result.passed and first_failing is None:
                first_failing = feeds
            if name not in worst or worse(result, worst[name]):
                worst[name] = result
    parity = ParityResult(
        provider=label, outputs=[worst[n] for n in names], runs=len(batches), seed=seed, notes=notes
    )
    if low:
        judged = judge_upcast(
            reference,
            candidate,
            providers,
            opt_level,
            names,
            batches,
            native_reference,
            defaults.get("float", DEFAULT_TOLERANCES["float"]),
            seed,
            notes,
            inner,
        )
        if judged is not None:
            parity.runtime = parity.outputs
            parity.noise = [judged.noise[n] for n in names]
            parity.outputs = [judged.judged[n] for n in names] + judged.failed_tensors
            parity.judgement = judged.label
            first_failing = first_failing if not parity.passed else None
    if bisect and first_failing is not None:
        parity.divergence = find_divergence(
            reference, candidate, providers, opt_level, first_failing, atol, rtol, defaults
        )
    if cross_check:
        parity.cross_check = _cross_check(
            reference, providers, opt_level, batches[0], atol, rtol, defaults, notes, first
        )
    return parity


def check_same_inputs(
    first: object, second: object, labels: tuple[str, str] = ("first", "second")
) -> None:
    """Refuse two sessions whose inputs differ in name, type or a static dimension.

    Raises:
        InputError: The inputs differ; the message lists both.
    """

    def describe(sess: object) -> dict[str, tuple[str, list[object]]]:
        return {i.name: (i.type, list(i.shape or [])) for i in sess.get_inputs()}  # type: ignore[attr-defined]

    a, b = describe(first), describe(second)

    def static(dims: list[object]) -> list[int | None]:
        return [d if isinstance(d, int) and d >= 0 else None for d in dims]

    def fits(x: tuple[str, list[object]], y: tuple[str, list[object]]) -> bool:
        if x[0] != y[0] or len(x[1]) != len(y[1]):
            return False
        return all(
            p is None or q is None or p == q
            for p, q in zip(static(x[1]), static(y[1]), strict=True)
        )

    if set(a) != set(b) or not all(fits(a[n], b[n]) for n in a):

        def text(d: dict[str, tuple[str, list[object]]]) -> str:
            return ", ".join(
                f"{n}: {t}[{'x'.join(str(x) for x in dims)}]" for n, (t, dims) in d.items()
            )

        raise InputError(
            f"the {labels[0]} and {labels[1]} models take different inputs ({text(a)} vs "
            f"{text(b)})",
            "give models that take the same inputs",
        )


def _same_interface(
    reference: Any, candidate: Any, names: list[str], labels: tuple[str, str]
) -> None:
    """Refuse a candidate whose inputs differ or that lacks one of the reference's ``names``.

    Raises:
        InputError: Said which.
    """
    check_same_inputs(reference, candidate, labels)
    cand_names = {o.name for o in candidate.get_outputs()}
    absent = [n for n in names if n not in cand_names]
    if absent:
        raise InputError(
            f"the {labels[1]} model lacks the output(s) {', '.join(absent)} of the {labels[0]}",
            f"its outputs are {', '.join(sorted(cand_names))}; compare a model with its rewrite",
        )


def _batches(
    session: Any,
    inputs: Sequence[Mapping[str, np.ndarray]] | None,
    seed: int,
    shapes: Mapping[str, Sequence[int]] | None,
    runs: int,
    notes: list[str],
) -> list[dict[str, np.ndarray]]:
    """The user's batches checked against ``session``'s inputs, or ``runs`` generated ones."""
    if inputs is not None:
        return [check_feeds(session, dict(b), "--inputs") for b in inputs]
    return [
        generate_inputs(session, seed + run, shapes, notes if run == 0 else None)
        for run in range(runs)
    ]


class _Clock:
    """Adds the seconds spent in ``with clock(part):`` to ``timings[part]``."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings if timings is not None else {}
        self.part = ""

    def __call__(self, part: str) -> _Clock:
        self.part = part
        return self

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        spent = time.perf_counter() - self.start
        self.timings[self.part] = self.timings.get(self.part, 0.0) + spent


_Noise = tuple[dict[str, float], dict[str, float]] | str

#: A candidate graph larger than this (tensors inline) is read twice rather than held while the
#: reference's session runs.
_REREAD_BYTES = 16 << 20


def _larger(a: _Noise, b: _Noise) -> _Noise:
    """The larger of two models' noise per tensor (or why one is not usable)."""
    if isinstance(a, str):
        return a
    if isinstance(b, str):
        return b
    return (
        {n: max(a[0][n], b[0][n]) for n in a[0]},
        {n: max(a[1][n], b[1][n]) for n in a[1]},
    )


class _Inputs:
    """A session's inputs as :func:`check_same_inputs` reads them, kept after the session."""

    def __init__(self, session: Any) -> None:
        self.inputs = [
            SimpleNamespace(name=i.name, type=i.type, shape=list(i.shape or []))
            for i in session.get_inputs()
        ]

    def get_inputs(self) -> list[Any]:
        return self.inputs


def _cross_check(
    reference: ModelSource,
    providers: list[str],
    opt_level: str,
    feeds: Mapping[str, np.ndarray],
    atol: Mapping[str, float] | float | None,
    rtol: Mapping[str, float] | float | None,
    defaults: Mapping[str, tuple[float, float]],
    notes: list[str],
    first: str,
) -> list[OutputParity]:
    """The reference on the CPU provider vs on ``providers``, per output."""
    cpu_sess = make_session(reference, ["CPUExecutionProvider"], opt_level, notes)
    sess = make_session(reference, providers, opt_level, notes)
    names = [o.name for o in sess.get_outputs()]
    return [
        compare_outputs(
            n,
            np.asarray(a),
            np.asarray(b),
            tolerance_for(atol, n),
            tolerance_for(rtol, n),
            defaults,
        )
        for n, a, b in zip(
            names,
            run_session(cpu_sess, names, dict(feeds), f"{first} (CPU)"),
            run_session(sess, names, dict(feeds), first),
            strict=True,
        )
    ]


def check_by_noise(
    reference: Graph,
    candidate: ModelSource,
    providers: list[str],
    provider_label: str,
    *,
    opt_level: str,
    seed: int,
    shapes: Mapping[str, Sequence[int]] | None,
    runs: int,
    inputs: Sequence[Mapping[str, np.ndarray]] | None,
    defaults: Mapping[str, tuple[float, float]],
    labels: tuple[str, str],
    clock: _Clock,
) -> tuple[ParityResult, dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Judge a float32/float64 rewrite at its own precision against its own noise.

    One session per model, built and run one after the other (the reference's is released
    before the candidate's is built; ``candidate`` is read again then when its tensors are
    inline). Every tensor the two models share by name is exposed (:func:`inner_tensors`), and
    each model's weights (float initializers read only by :data:`WEIGHT_OPS`) are made
    overridable, so that each session also runs with its weights re-rounded
    (:meth:`Graph.rerounded`), once per batch and part of the weights (:func:`measure_noise`).
    The two models' tensors are compared (:func:`differences`) before the candidate's noise is
    measured, so that at most two sets of tensors are held. What re-rounding moves each tensor,
    the larger of the two models, is the models' own noise: each output must agree within
    ``max(floor, NOISE_FACTOR x noise)``, each inner tensor and each channel within
    ``NATIVE_INNER_NOISE_FACTOR x`` (:func:`judge_against_noise`). The candidate's noise is
    measured only when the reference's alone does not pass (a larger tolerance passes all that a
    smaller one passed): an exact rewrite costs one re-rounded run, of the reference. When
    re-rounding changes a shape or finiteness, the outputs are judged by ``defaults`` and a note
    says why.

    Each session is built from the graph alone where the model is a file: its large inline
    tensors are read by onnxruntime from the file itself (:func:`read_graph`).

    Returns:
        The result, the first batch, and the first batch on which something failed (or ``None``).
    """
    first, second = labels
    notes: list[str] = []
    slow = slow_check_line(reference.nodes, len(reference.initializers))
    if slow is not None:
        logger.warning("%s", slow)
    names = reference.outputs()
    graph = read_graph(candidate)
    shared = inner_tensors(reference, graph)
    selects = selection_note(reference.proto.graph)
    if selects is not None:
        notes.append(selects)
    wanted = names + shared
    reread = graph.inline_bytes() > _REREAD_BYTES
    if reread:
        graph.release()  # its tensors are read again once the reference's session is gone
    ref_weights = reference.weights()

    def session(graph: Graph, weights: Mapping[str, int], which: str) -> Any:
        with clock("sessions"):
            return make_session(
                graph.session_bytes(shared, weights),
                providers,
                opt_level,
                notes,
                f"the {which}",
                folder=graph.folder,
            )

    ref_sess = session(reference, ref_weights, first)
    batches = _batches(ref_sess, inputs, seed, shapes, runs, notes)
    ref_inputs = _Inputs(ref_sess)
    with clock("runs"):
        ref_runs = [run_session(ref_sess, wanted, feeds, first) for feeds in batches]
        ref_noise = measure_noise(
            ref_sess, reference, ref_weights, wanted, batches, ref_runs, seed + 1
        )
    del ref_sess
    reference.release()  # an inline model's tensors: not held beside the candidate's session
    if reread:
        graph = read_graph(candidate)
    weights = graph.weights()
    cand_sess = session(graph, weights, second)
    _same_interface(ref_inputs, cand_sess, names, labels)
    with clock("runs"):
        cand_runs = [run_session(cand_sess, wanted, feeds, second) for feeds in batches]
    with clock("judge"):  # then the reference's tensors go: two sets of tensors at most
        found = differences(wanted, ref_runs, cand_runs, defaults, names)
        fixed_outputs = [
            functools.reduce(
                lambda a, b: b if worse(b, a) else a,
                (
                    compare_outputs(n, np.asarray(r[i]), np.asarray(c[i]), None, None, defaults)
                    for r, c in zip(ref_runs, cand_runs, strict=True)
                ),
            )
            for i, n in enumerate(names)
        ]
    del ref_runs
    noise = ref_noise
    with clock("judge"):
        judged = None if isinstance(noise, str) else judge_against_noise(names, found, *noise)
    if judged is not None and (judged[1] or not all(o.passed for o in judged[0])):
        # the tolerance is the larger noise of the two models: the candidate's is measured only
        # where the reference's alone does not pass (a larger noise passes all it passed)
        with clock("runs"):
            cand_noise = measure_noise(cand_sess, graph, weights, wanted, batches, cand_runs, seed)
        noise = _larger(ref_noise, cand_noise)
        with clock("judge"):
            judged = None if isinstance(noise, str) else judge_against_noise(names, found, *noise)
    del cand_sess, cand_runs
    graph.release()
    with clock("judge"):
        label = None
        if judged is None:
            notes.append(f"{noise}: judged with the fixed tolerances")
            outputs = fixed_outputs
            inner: list[OutputParity] = []
        else:
            outputs, inner = judged
            floor = min(
                (f for o in outputs if (f := noise_floor(o.dtype)) is not None), default=None
            )
            label = (
                f"judged at the models' own precision against their own noise: tolerance "
                f"max(rtol {floor or 0:.3g}, {NOISE_FACTOR:g}x what re-rounding the weights "
                "by one unit in the last place moves each output, in the original model or, "
                "where that alone does not pass, the larger of both models; "
                f"{NATIVE_INNER_NOISE_FACTOR:g}x for each of the {len(shared)} inner tensors "
                f"and each channel, a channel at least rtol {CHANNEL_FLOOR_FACTOR * (floor or 0):.3g})"
            )
            for o in outputs:
                fixed = defaults.get({"float32": "float", "float64": "double"}.get(o.dtype, ""))
                if fixed is not None and o.rtol > fixed[1]:
                    notes.append(
                        f"output '{o.name}': the models' own {o.dtype} noise sets its tolerance "
                        f"at rtol {o.rtol:.3g}, above the fixed {fixed[1]:g}"
                    )
        failed = bool(inner) or not all(o.passed for o in outputs)
    parity = ParityResult(
        provider=provider_label,
        outputs=outputs + inner,
        runs=len(batches),
        seed=seed,
        notes=notes,
        judgement=label,
    )
    return parity, dict(batches[0]), dict(batches[0]) if failed else None
