"""Numerical parity of two ONNX models on onnxruntime.

Both models run on the same inputs (:mod:`normfuse.runtime.inputs`) in sessions of
:mod:`normfuse.runtime.sessions`; each output is judged by the rule of
:mod:`normfuse.core.verdict`. With ``bisect`` a failure names the first diverging tensor
(:mod:`normfuse.runtime.bisect`).

Imports: onnx, numpy, :mod:`normfuse.core` and the runtime package.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from normfuse.core.errors import InputError, ProviderError
from normfuse.core.report import OutputParity, ParityResult
from normfuse.core.verdict import DEFAULT_TOLERANCES, compare_outputs, worse
from normfuse.runtime.bisect import find_divergence
from normfuse.runtime.inputs import check_runs, check_seed, generate_inputs, tolerance_for
from normfuse.runtime.judge import judge_upcast, low_precision
from normfuse.runtime.sessions import (
    ModelSource,
    check_feeds,
    make_session,
    run_session,
    select_provider,
)

__all__ = ["check_models", "check_same_inputs"]

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
    ref_sess = make_session(reference, providers, opt_level, notes, f"the {first}")
    cand_sess = make_session(candidate, providers, opt_level, notes, f"the {second}")
    check_same_inputs(ref_sess, cand_sess, labels)
    names = [o.name for o in ref_sess.get_outputs()]
    cand_names = {o.name for o in cand_sess.get_outputs()}
    absent = [n for n in names if n not in cand_names]
    if absent:
        raise InputError(
            f"the {second} model lacks the output(s) {', '.join(absent)} of the {first}",
            f"its outputs are {', '.join(sorted(cand_names))}; compare a model with its rewrite",
        )
    for spec, option in ((atol, "--atol"), (rtol, "--rtol")):
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(names) - {"*"})
            if unknown:
                raise InputError(
                    f"{option} names unknown output(s) {', '.join(unknown)}",
                    f"the outputs are {', '.join(names)}",
                )
    if inputs is not None:
        batches = [check_feeds(ref_sess, dict(b), "--inputs") for b in inputs]
    else:
        batches = [
            generate_inputs(ref_sess, seed + run, shapes, notes if run == 0 else None)
            for run in range(runs)
        ]
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
    if upcast and atol is None and rtol is None and low_precision(reference):
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
        cpu_sess = make_session(reference, ["CPUExecutionProvider"], opt_level, notes)
        feeds = batches[0]
        parity.cross_check = [
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
                run_session(cpu_sess, names, feeds, f"{first} (CPU)"),
                run_session(ref_sess, names, feeds, first),
                strict=True,
            )
        ]
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
