"""Inference latency on onnxruntime: one model, or several compared run by run.

Models are timed interleaved (A, B, A, B, ...) after a warm-up, on the same seeded inputs, so
drift of the machine hits all of them alike; the result is the median and the 10th/90th
percentiles of per-run wall time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from normfuse.core.errors import InputError
from normfuse.runtime.inputs import check_seed, generate_inputs
from normfuse.runtime.parity import check_same_inputs
from normfuse.runtime.sessions import make_session, run_session, select_provider

__all__ = ["Latency", "measure_latency"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Latency:
    """Latency of one model on one provider and optimization level, in milliseconds."""

    model: str
    provider: str
    opt_level: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    reps: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


def measure_latency(
    models: Sequence[str | os.PathLike],
    *,
    provider: str = "auto",
    opt_levels: Sequence[str] = ("disable", "all"),
    warmup: int = 10,
    reps: int = 50,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[Latency]:
    """Time each model at each optimization level, interleaved.

    Args:
        models: Model paths; all must take the same inputs.
        provider: ``auto``, ``cuda`` or ``cpu``.
        opt_levels: onnxruntime graph optimization levels to time.
        warmup: Untimed runs per model and level first.
        reps: Timed runs per model and level.
        shapes: Shapes for inputs with dynamic dimensions.
        seed: Seed of the inputs.
        progress: Called with ``(done, total)`` timed runs.

    Returns:
        One :class:`Latency` per model and level, levels outermost.
    """
    if warmup < 0 or reps < 1:
        raise InputError(
            f"--warmup {warmup} --reps {reps}: nothing to time", "give --warmup >= 0, --reps >= 1"
        )
    check_seed(seed)
    providers, label = select_provider(provider)
    results: list[Latency] = []
    total = len(opt_levels) * reps * len(models)
    done = 0
    for level in opt_levels:
        notes: list[str] = []
        sessions = [
            make_session(m, providers, level, notes, "the", exact_math=False) for m in models
        ]
        for i, sess in enumerate(sessions[1:], 1):
            check_same_inputs(sessions[0], sess, (str(models[0]), str(models[i])))
        feeds = generate_inputs(sessions[0], seed, shapes)
        outputs = [[o.name for o in sess.get_outputs()] for sess in sessions]
        for i, sess in enumerate(sessions):  # one checked run each: user errors are told as such
            run_session(sess, outputs[i], feeds, str(models[i]))
            for _ in range(warmup):
                sess.run(None, feeds)
        times: list[list[float]] = [[] for _ in sessions]
        for _ in range(reps):
            for i, sess in enumerate(sessions):
                t = time.perf_counter()
                sess.run(None, feeds)
                times[i].append((time.perf_counter() - t) * 1000)
                done += 1
                if progress is not None:
                    progress(done, total)
        for model, ts in zip(models, times, strict=True):
            q = np.percentile(ts, [10, 90])
            results.append(
                Latency(
                    str(model), label, level, statistics.median(ts), float(q[0]), float(q[1]), reps
                )
            )
    return results
