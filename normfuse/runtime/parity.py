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
from normfuse.runtime.inputs import generate_inputs, tolerance_for
from normfuse.runtime.judge import judge_upcast, low_precision
from normfuse.runtime.sessions import (
    ModelSource,
    check_feeds,
    make_session,
    run_session,
    select_provider,
)

__all__ = ["check_models"]

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

    Raises:
        InputError: The models or inputs do not fit together.
        ProviderError: CUDA was required and does not load here.
    """
    providers, label = select_provider(provider)
    if cross_check and label != "CUDA":
        raise ProviderError(
            "--cross-check compares the CPU and CUDA providers, and CUDA does not load here",
            "run it on a machine with onnxruntime-gpu and a CUDA GPU",
        )
    notes: list[str] = []
    ref_sess = make_session(reference, providers, opt_level, notes, "the reference")
    cand_sess = make_session(candidate, providers, opt_level, notes, "the rewritten")
    ref_inputs = [(i.name, i.type) for i in ref_sess.get_inputs()]
    cand_inputs = {i.name: i.type for i in cand_sess.get_inputs()}
    missing = [n for n, _ in ref_inputs if n not in cand_inputs]
    mismatched = [n for n, t in ref_inputs if n in cand_inputs and cand_inputs[n] != t]
    if missing or mismatched or len(cand_inputs) != len(ref_inputs):
        raise InputError(
            "the two models take different inputs "
            f"({', '.join(f'{n}: {t}' for n, t in ref_inputs)} vs "
            f"{', '.join(f'{n}: {t}' for n, t in cand_inputs.items())})"
        )
    names = [o.name for o in ref_sess.get_outputs()]
    cand_names = {o.name for o in cand_sess.get_outputs()}
    absent = [n for n in names if n not in cand_names]
    if absent:
        raise InputError(f"the rewritten model lacks the output(s) {', '.join(absent)}")
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
        ref_out = run_session(ref_sess, names, feeds, "reference")
        native_reference.append(ref_out)
        cand_out = run_session(cand_sess, names, feeds, "rewritten")
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
                run_session(cpu_sess, names, feeds, "reference (CPU)"),
                run_session(ref_sess, names, feeds, "reference"),
                strict=True,
            )
        ]
    return parity
