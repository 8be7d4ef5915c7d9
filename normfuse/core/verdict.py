"""The parity rule: how an original and a rewritten model are compared, and what a failure does.

Both frontends use it: onnxruntime runs (:mod:`normfuse.runtime.parity`) and PyTorch runs
(:mod:`normfuse.torchmodel.fold`) compare each output with :func:`compare_outputs` and turn a
failed comparison or a strict skip into an error with :func:`raise_for_parity` /
:func:`raise_for_strict`.

The pass rule, elementwise: ``|test - ref| <= atol + rtol * max|ref|`` (relative to the
reference's largest magnitude, so zeros in the reference give neither NaN nor a demand for
exactness). NaN/Inf must match in position and kind.

Imports: numpy and :mod:`normfuse.core` only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

from normfuse.core.errors import ParityError, StrictError
from normfuse.core.report import OutputParity, Report

__all__ = [
    "DEFAULT_TOLERANCES",
    "FOLD_TOLERANCES",
    "INNER_NOISE_FACTOR",
    "NATIVE_INNER_NOISE_FACTOR",
    "NOISE_FACTOR",
    "NOISE_FLOORS",
    "TORCH_TOLERANCES",
    "PairStats",
    "channel_failure",
    "channel_noise_failure",
    "channel_result",
    "compare_outputs",
    "judge_parity",
    "noise_floor",
    "pair_stats",
    "per_channel_rel",
    "raise_for_parity",
    "raise_for_strict",
    "worse",
]

logger = logging.getLogger(__name__)

#: ``(atol, rtol)`` per element type for ``normfuse check``; rtol multiplies the reference's
#: largest magnitude. fp32 5e-5 flags a 1e-3 change in one conv weight of a small CNN (it moves
#: the output by 1-2e-4) and passes exact folds of deep networks (~2e-5).
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float": (1e-6, 5e-5),
    "double": (1e-12, 1e-9),
    "float16": (1e-3, 1e-2),
    "bfloat16": (1e-2, 5e-2),
}

#: A rewrite of a 16-bit model is judged with its tensors upcast to float32 (see
#: :mod:`normfuse.runtime.judge`) against ``max(rtol, NOISE_FACTOR * e)``, where ``e`` is how much
#: one independent rounding of the rewritten weights moves the outputs of this very model.
NOISE_FACTOR = 3.0
#: Inner tensors and single channels are many comparisons, each a noisier figure: they get a
#: wider factor, so that an exact fold of a deep network trips none of them, while a channel
#: folded 1% off in float16 (10-20x the rounding noise at its layer) still does.
INNER_NOISE_FACTOR = 6.0

#: float32/float64 models are judged at their own precision (onnxruntime runs Conv in float32
#: only) against ``max(floor, factor * e)``, ``e`` how much an independent re-rounding of every
#: weight of the rewritten model moves each tensor: the model's own noise, which on deep or
#: ill-conditioned networks (attention, large BN scales) exceeds any fixed tolerance an exact
#: fold could be held to. The floor: a few roundings (16 units of float32 roundoff, for a shallow
#: net where re-rounding barely moves anything); ``atol`` is 0.
NOISE_FLOORS: dict[str, float] = {"float32": 1e-6, "float64": 1e-13}


def noise_floor(dtype: str) -> float | None:
    """The rtol floor of the noise rule for an element type; ``None`` for non-float types."""
    return NOISE_FLOORS.get(dtype)


#: At the models' own precision (float32) both models' arithmetic rounds differently at every
#: op (a norm computed in float32 against one folded weight, another summation order), which
#: re-rounding the weights reproduces only statistically: over the hundreds of inner tensors and
#: thousands of channels of an exact fold of a deep network the largest error/noise ratio measured
#: is 4.2 (ten zoo exports, ResNet-50 to DenseNet). 12 leaves room; a channel folded 0.1% off
#: errs by ~1e-3 at its layer, where 12x the noise is ~2e-5.
NATIVE_INNER_NOISE_FACTOR = 12.0

#: A single channel is judged against at least this many times the floor of its type (float32:
#: 1e-5, about 84 units in the last place of the channel's largest value, the float32 floor the
#: design sets for a fold; float64 1e-12). Its noise comes from one re-rounding, and where a
#: channel holds few values (a squeeze-excitation gate: one per image) that one draw can move it
#: by almost nothing: an exact fold of timm's efficientnetv2_rw_t erred by 1.2e-6 on such a
#: channel against a measured noise below 1e-7. A channel folded 0.1% off errs by ~1e-3.
CHANNEL_FLOOR_FACTOR = 10.0


#: The defaults of the check built into ``normfuse fold``: a wrong fold moves outputs by orders
#: of magnitude more than fp32 rounding, which reaches ~1e-4 on deep segmentation networks.
FOLD_TOLERANCES: dict[str, tuple[float, float]] = {**DEFAULT_TOLERANCES, "float": (1e-6, 2e-4)}

TORCH_TOLERANCES: dict[str, tuple[float, float]] = {
    "float": (0.0, 1e-5),
    "float32": (0.0, 1e-5),
    "double": (0.0, 1e-12),
    "float64": (0.0, 1e-12),
    "float16": (0.0, 4e-3),
    "bfloat16": (0.0, 3e-2),
}
"""``(atol, rtol)`` per output dtype for the folded-vs-original check (rule of
:func:`compare_outputs`: ``|a - b| <= atol + rtol * max|ref|``)."""


@dataclasses.dataclass(frozen=True)
class PairStats:
    """What separates two tensors of the same shape, measured in one pass where both are finite."""

    nonfinite_mismatch: int  #: elements whose NaN/Inf differ in position or kind
    max_abs: float  #: ``max|a - b|`` over the elements finite in both
    mean_abs: float
    scale: float  #: ``max|a|`` over the elements finite in both
    cosine: float
    channel: tuple[float, int, float]  #: :func:`per_channel_rel` of the two


def pair_stats(a: Any, b: Any, *, cosine: bool = True) -> PairStats:
    """The figures of :func:`compare_outputs` and :func:`per_channel_rel` of two float arrays
    of the same shape. Where both are finite everywhere (the common case): six passes, the
    difference held in float32 unless an array is float64 (a subtraction of two float32 values
    is exact or off by one unit of the difference's last place); otherwise, or for other types,
    the masked computation in float64. ``cosine=False``: the cosine is not computed (NaN)."""
    import numpy as np  # imported where used: the CLI starts without numpy

    a, b = np.asarray(a), np.asarray(b)
    floating = np.issubdtype(a.dtype, np.floating) and np.issubdtype(b.dtype, np.floating)
    if not (floating and a.size):
        return _masked_stats(a, b)
    work = np.float64 if np.float64 in (a.dtype, b.dtype) else np.float32
    shape = (a.shape[0], a.shape[1], -1) if a.ndim >= 2 else (1, 1, -1)
    va = a.reshape(shape)
    with np.errstate(all="ignore"):  # an overflow or NaN shows below and goes the masked way
        high = va.max(axis=(0, 2)).astype(np.float64)
        low = va.min(axis=(0, 2)).astype(np.float64)
        diff = np.empty(a.shape, work)
        np.subtract(a, b, out=diff, dtype=work)
        np.abs(diff, out=diff)
        err = diff.reshape(shape).max(axis=(0, 2)).astype(np.float64)
    # a NaN or Inf in either array, or a difference beyond the type's range, is not finite here
    if not (np.isfinite(high).all() and np.isfinite(low).all() and np.isfinite(err).all()):
        return _masked_stats(a, b)
    mag = np.maximum(high, -low)
    max_abs = float(err.max())
    scale = float(mag.max())
    mean_abs = float(diff.mean(dtype=np.float64))
    del diff
    cos = _cosine_of(a, b, max_abs) if cosine else float("nan")
    channel = _worst_channel(mag, err) if a.ndim >= 2 else (0.0, -1, 0.0)
    return PairStats(0, max_abs, mean_abs, scale, cos, channel)


def _cosine_of(a: Any, b: Any, max_abs: float) -> float:
    """The cosine of two finite float arrays, summed in float64 (1 where both are zero and
    equal, 0 where one is zero)."""
    import numpy as np  # imported where used: the CLI starts without numpy

    flat_a, flat_b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    # einsum's own loop, not BLAS: a BLAS dot spins its threads on a busy machine
    ab = float(np.einsum("i,i->", flat_a, flat_b, dtype=np.float64))
    aa = float(np.einsum("i,i->", flat_a, flat_a, dtype=np.float64))
    bb = float(np.einsum("i,i->", flat_b, flat_b, dtype=np.float64))
    denom = math.sqrt(aa * bb)
    return ab / denom if denom > 0 else (1.0 if max_abs == 0 else 0.0)


def _masked_stats(ref: Any, test: Any) -> PairStats:
    """:func:`pair_stats` where NaN/Inf occur or the types are not float."""
    import numpy as np  # imported where used: the CLI starts without numpy

    r = ref.astype(np.float64)
    t = test.astype(np.float64)
    fin_r, fin_t = np.isfinite(r), np.isfinite(t)
    both = fin_r & fin_t
    nonfinite_mismatch = int(np.sum(fin_r != fin_t)) + int(
        np.sum(~fin_r & ~fin_t & ~((r == t) | (np.isnan(r) & np.isnan(t))))
    )
    diff = np.abs(r[both] - t[both])
    max_abs = float(diff.max()) if diff.size else 0.0
    mean_abs = float(diff.mean()) if diff.size else 0.0
    scale = float(np.abs(r[both]).max()) if diff.size else 0.0
    rv, tv = r[both], t[both]
    # sums, not BLAS: a BLAS dot spins its threads on a busy machine (66 ms for 40k elements)
    denom = math.sqrt(float(np.sum(rv * rv)) * float(np.sum(tv * tv)))
    cosine = float(np.sum(rv * tv)) / denom if denom > 0 else (1.0 if max_abs == 0 else 0.0)
    return PairStats(
        nonfinite_mismatch, max_abs, mean_abs, scale, cosine, _masked_channel_rel(r, t)
    )


def compare_outputs(
    name: str,
    ref: np.ndarray,
    test: np.ndarray,
    atol: float | None = None,
    rtol: float | None = None,
    defaults: Mapping[str, tuple[float, float]] = DEFAULT_TOLERANCES,
    stats: PairStats | None = None,
) -> OutputParity:
    """Compare one output; see the module docstring for the rule. ``stats``: the pair's
    :func:`pair_stats` when already measured."""
    dtype = str(ref.dtype)
    default = defaults.get({"float32": "float", "float64": "double"}.get(dtype, dtype), (0.0, 0.0))
    atol = default[0] if atol is None else atol
    rtol = default[1] if rtol is None else rtol
    if ref.shape != test.shape:
        return OutputParity(
            name, dtype, float("inf"), float("inf"), float("inf"), 0.0, 0, atol, rtol, False, None
        )
    s = pair_stats(ref, test) if stats is None else stats
    max_abs, scale = s.max_abs, s.scale
    max_rel = max_abs / scale if scale > 0 else max_abs
    passed = s.nonfinite_mismatch == 0 and max_abs <= atol + rtol * scale
    if s.nonfinite_mismatch:
        min_rtol = None
    elif scale > 0:
        min_rtol = max(0.0, (max_abs - atol) / scale)
    else:
        min_rtol = 0.0 if max_abs <= atol else None
    return OutputParity(
        name,
        dtype,
        max_abs,
        max_rel,
        s.mean_abs,
        s.cosine,
        s.nonfinite_mismatch,
        atol,
        rtol,
        passed,
        min_rtol,
    )


def worse(a: OutputParity, b: OutputParity) -> bool:
    """Whether ``a`` is the worse of two results (failed beats passed, then larger error)."""
    return (not a.passed and b.passed) or (a.passed == b.passed and a.max_rel > b.max_rel)


def raise_for_parity(report: Report) -> None:
    """Raise :class:`ParityError` when the report's parity check failed."""
    if report.parity is not None and not report.parity.passed:
        failed = [o.name for o in report.parity.outputs if not o.passed]
        what = "folded" if report.action in ("fold", "export") else f"rewritten ({report.action})"
        raise ParityError(
            f"the {what} model differs from the original on output(s) {', '.join(failed)} "
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


#: The name of a judged inner tensor, module output or channel (not a model output).
_INNER = re.compile(r"^(tensor|module) '.*'( channel \d+)?( \(inside the model\))?$")


def judge_parity(report: Report, *, exact: bool, what: str) -> None:
    """Exact rewrites raise :class:`ParityError` on a mismatch; others note the difference."""
    if report.parity is None:
        return
    report.parity.informational = not exact
    if not exact:  # a change meant to happen: the inner tensors after it differ too, unsaid
        report.parity.outputs = [
            o for o in report.parity.outputs if not _INNER.match(o.name)
        ] or report.parity.outputs
    if exact:
        raise_for_parity(report)
    elif not report.parity.passed:
        report.notes.append(
            f"outputs differ from the original (max rel {report.parity.max_rel:.3g}), as "
            f"expected: {what} changes the function"
        )


#: In the per-channel figure a channel's error is measured against ``max(max|channel|,
#: CHANNEL_FLOOR * max|tensor|)``: a near-silent channel (a ReLU output that is almost all zero)
#: would otherwise turn rounding noise into large relative errors.
CHANNEL_FLOOR = 0.1


def per_channel_rel(a: np.ndarray, b: np.ndarray) -> tuple[float, int, float]:
    """The largest ``max|a - b| / max(max|a_c|, CHANNEL_FLOOR * max|a|)`` over the channels
    ``a_c`` (axis 1), which channel, and its ``max|a - b|``."""
    import numpy as np  # imported where used: the CLI starts without numpy

    a, b = np.asarray(a), np.asarray(b)
    if a.ndim < 2 or a.shape != b.shape or a.size == 0:
        return 0.0, -1, 0.0
    return pair_stats(a, b, cosine=False).channel


def _masked_channel_rel(a64: Any, b64: Any) -> tuple[float, int, float]:
    """:func:`per_channel_rel` of two float64 arrays that may hold NaN/Inf."""
    import numpy as np  # imported where used: the CLI starts without numpy

    if a64.ndim < 2 or a64.shape != b64.shape or a64.size == 0:
        return 0.0, -1, 0.0
    ca = np.moveaxis(a64, 1, 0).reshape(a64.shape[1], -1)
    cb = np.moveaxis(b64, 1, 0).reshape(b64.shape[1], -1)
    with np.errstate(invalid="ignore"):
        scale = np.nanmax(np.abs(ca), axis=1)
        err = np.nanmax(np.abs(ca - cb), axis=1)
    return _worst_channel(scale, err)


def _worst_channel(scale: Any, err: Any) -> tuple[float, int, float]:
    """The channel with the largest ``err / max(scale, CHANNEL_FLOOR * max(scale))``, its
    ratio and its ``err`` (channels with a non-finite or zero scale do not count)."""
    import numpy as np  # imported where used: the CLI starts without numpy

    with np.errstate(invalid="ignore"):
        scale = np.maximum(scale, CHANNEL_FLOOR * np.nanmax(scale))
    live = np.isfinite(scale) & np.isfinite(err) & (scale > 0)
    if not np.any(live):
        return 0.0, -1, 0.0
    rel = np.where(live, err / np.where(live, scale, 1.0), 0.0)
    c = int(np.argmax(rel))
    return float(rel[c]), c, float(err[c])


def channel_failure(
    name: str, ref: Any, cand: Any, moved: tuple[Any, Any], floor: float
) -> OutputParity | None:
    """A channel whose relative error is beyond the noise of re-rounding, per channel.

    A fold that scales one channel wrongly errs by that factor on the whole channel, which a
    tensor-wide figure can hide when that channel is small beside the others."""
    import numpy as np  # imported where used: the CLI starts without numpy

    if not np.issubdtype(np.asarray(ref).dtype, np.floating):
        return None
    noise = max(per_channel_rel(cand, m)[0] for m in moved)
    return channel_noise_failure(name, ref, cand, max(floor, INNER_NOISE_FACTOR * noise))


def channel_noise_failure(name: str, ref: Any, cand: Any, rtol: float) -> OutputParity | None:
    """The channel (axis 1) of ``cand`` whose relative error against ``ref`` exceeds ``rtol``
    (:func:`per_channel_rel`), or ``None``."""
    import numpy as np  # imported where used: the CLI starts without numpy

    if not np.issubdtype(np.asarray(ref).dtype, np.floating):
        return None
    return channel_result(name, str(np.asarray(cand).dtype), per_channel_rel(ref, cand), rtol)


def channel_result(
    name: str, dtype: str, measured: tuple[float, int, float], rtol: float
) -> OutputParity | None:
    """The failure of the channel :func:`per_channel_rel` found (``measured``) when its error
    exceeds ``rtol``, or ``None``."""
    err, channel, err_abs = measured
    if channel < 0 or err <= rtol:
        return None
    return OutputParity(
        f"tensor '{name}' channel {channel}",
        dtype,
        err_abs,
        err,
        err_abs,
        float("nan"),
        0,
        0.0,
        rtol,
        False,
        err,
    )
