"""The exact algebra of folding a per-channel affine map into a linear op.

In inference every foldable normalization is a per-channel affine map ``y = x * scale + shift``
on one axis of the activation:

* BatchNormalization: ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``.
* ``Mul`` / ``Add`` / ``Sub`` / ``Div`` by per-channel constants.
* the gamma/beta tail of LayerNorm, GroupNorm, InstanceNorm and RMSNorm.

A linear op computes ``y[o] = sum_i W[o, i] * x[i] + b[o]`` (for convolutions the sum also runs
over kernel taps). Two moves are exact:

* :func:`absorb_after`, affine on the op's output:
  ``W'[o, i] = W[o, i] * scale[o]`` and ``b'[o] = b[o] * scale[o] + shift[o]``.
* :func:`absorb_before`, affine on the op's input:
  ``W'[o, i] = W[o, i] * scale[i]`` and ``b'[o] = b[o] + sum_i W[o, i] * shift[i]``.
  For a convolution this is exact only when no input position is padded with zeros (the shift
  would be missing at the borders), unless the shift is zero; checking that is the caller's job.

Everything is computed in float64 and rounded once, at the end, to the dtype of the weights.
Grouped convolutions are handled: input channel ``c`` of group ``g`` only meets the output
channels of the same group.

This module is pure numpy; it knows nothing about graphs.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Protocol

import ml_dtypes
import numpy as np

__all__ = [
    "Affine",
    "ChannelMoments",
    "LinearKind",
    "LinearWeights",
    "WeightArray",
    "absorb_after",
    "absorb_before",
    "dtype_max",
    "overflowed",
    "parallel_map",
    "scale_weight",
]

logger = logging.getLogger(__name__)

LinearKind = Literal["conv", "conv_transpose", "dense", "dense_t"]
"""Weight layouts.

* ``conv``: ``W[out, in / groups, *kernel]`` (ONNX Conv, ``nn.Conv*d``).
* ``conv_transpose``: ``W[in, out / groups, *kernel]`` (ONNX ConvTranspose, ``nn.ConvTranspose*d``).
* ``dense``: ``W[out, in]`` (Gemm with ``transB=1``, ``nn.Linear``).
* ``dense_t``: ``W[in, out]`` (MatMul right operand, Gemm with ``transB=0``).
"""


class WeightArray(Protocol):
    """What the algebra needs of a weight: its geometry, and its values through numpy.

    A numpy array is one; so is a file-backed tensor that reads its values only when numpy
    asks (:class:`normfuse.onnxgraph.const.FileArray`). Values are taken with ``np.asarray``.
    """

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> Any: ...

    @property
    def ndim(self) -> int: ...


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


@dataclasses.dataclass(frozen=True)
class Affine:
    """A per-channel affine map ``y = x * scale + shift`` along ``axis`` of a tensor.

    Attributes:
        scale: float64 vector of length C, or of length 1 for a scalar (all channels alike).
        shift: float64 vector of the same length as ``scale``.
        axis: The channel axis of the activation this map applies to. Informational for this
            module; graph code uses it to check that the map lines up with a linear op.
    """

    scale: np.ndarray
    shift: np.ndarray
    axis: int = 1

    def __post_init__(self) -> None:
        scale = np.atleast_1d(_f64(self.scale)).reshape(-1)
        shift = np.atleast_1d(_f64(self.shift)).reshape(-1)
        if scale.shape != shift.shape:
            if scale.size == 1:
                scale = np.broadcast_to(scale, shift.shape).copy()
            elif shift.size == 1:
                shift = np.broadcast_to(shift, scale.shape).copy()
            else:
                raise ValueError(f"scale has {scale.size} channels but shift has {shift.size}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "shift", shift)

    @classmethod
    def identity(cls, channels: int = 1, axis: int = 1) -> Affine:
        """The map that changes nothing."""
        return cls(np.ones(channels), np.zeros(channels), axis)

    @classmethod
    def from_batchnorm(
        cls,
        gamma: np.ndarray,
        beta: np.ndarray,
        mean: np.ndarray,
        var: np.ndarray,
        eps: float,
        axis: int = 1,
    ) -> Affine:
        """The inference-mode BatchNorm ``gamma * (x - mean) / sqrt(var + eps) + beta``."""
        scale = _f64(gamma) / np.sqrt(_f64(var) + float(eps))
        return cls(scale, _f64(beta) - _f64(mean) * scale, axis)

    @property
    def channels(self) -> int:
        """Number of channels, 1 for a scalar map."""
        return int(self.scale.size)

    @property
    def is_scalar(self) -> bool:
        """True when the same scale and shift apply to every channel."""
        return self.scale.size == 1

    @property
    def has_shift(self) -> bool:
        """True when some channel has a non-zero shift."""
        return bool(np.any(self.shift != 0.0))

    def then(self, other: Affine) -> Affine:
        """The composition: first ``self``, then ``other``.

        ``(x * s1 + t1) * s2 + t2 = x * (s1 * s2) + (t1 * s2 + t2)``.
        """
        axis = self.axis if other.is_scalar else other.axis
        return Affine(self.scale * other.scale, self.shift * other.scale + other.shift, axis)

    def expand(self, channels: int) -> Affine:
        """This map with its scale and shift broadcast to ``channels`` entries."""
        if self.channels == channels:
            return self
        if not self.is_scalar:
            raise ValueError(f"affine over {self.channels} channels cannot apply to {channels}")
        return Affine(np.full(channels, self.scale[0]), np.full(channels, self.shift[0]), self.axis)

    def split(self, counts: list[int]) -> list[Affine]:
        """This map cut into consecutive channel ranges of ``counts`` entries (a norm after a
        channel concat: each concatenated op takes its range).

        Raises:
            ValueError: The counts do not add up to this map's channels.
        """
        whole = self.expand(sum(counts))
        edges = np.cumsum([0, *counts])
        return [
            Affine(whole.scale[a:b].copy(), whole.shift[a:b].copy(), self.axis)
            for a, b in itertools.pairwise(edges.tolist())
        ]

    def apply(self, x: np.ndarray, axis: int | None = None) -> np.ndarray:
        """Apply the map to an array (float64), for tests and reference computations."""
        ax = self.axis if axis is None else axis
        x64 = _f64(x)
        shape = [1] * x64.ndim
        if not self.is_scalar:
            shape[ax] = self.channels
        return x64 * self.scale.reshape(shape) + self.shift.reshape(shape)


@dataclasses.dataclass(frozen=True)
class LinearWeights:
    """The weights of one linear op, in its own layout.

    Attributes:
        kind: The weight layout, see :data:`LinearKind`.
        weight: The weight array, any float dtype (float16, bfloat16, float32, float64).
        bias: The bias, or ``None``. Its last axis is the output channel axis; it may have
            leading axes (a 2-D Gemm ``C``) or size 1 there (it broadcasts).
        groups: Convolution groups; 1 for dense layers.
        dtype: The dtype results are written in; defaults to ``weight.dtype``.
    """

    kind: LinearKind
    weight: WeightArray
    bias: np.ndarray | None = None
    groups: int = 1
    dtype: np.dtype | None = None

    @property
    def out_dtype(self) -> np.dtype:
        """The dtype results are written in."""
        return np.dtype(self.dtype) if self.dtype is not None else np.dtype(self.weight.dtype)

    @property
    def out_channels(self) -> int:
        """Number of output channels."""
        w = self.weight
        if self.kind == "conv":
            return int(w.shape[0])
        if self.kind == "conv_transpose":
            return int(w.shape[1]) * self.groups
        if self.kind == "dense":
            return int(w.shape[0])
        return int(w.shape[1])

    @property
    def in_channels(self) -> int:
        """Number of input channels."""
        w = self.weight
        if self.kind == "conv":
            return int(w.shape[1]) * self.groups
        if self.kind == "conv_transpose":
            return int(w.shape[0])
        if self.kind == "dense":
            return int(w.shape[1])
        return int(w.shape[0])


@dataclasses.dataclass(frozen=True)
class Folded:
    """New weights after a fold, rounded once to the op's dtype.

    Attributes:
        weight: The new weight, in the op's dtype; ``None`` when deferred (see ``factor``).
        bias: The new bias, in the op's dtype.
        bias64: The bias in float64, before rounding.
        weight_peak: An upper bound of ``|W'|`` in float64, exact when it exceeds the dtype's
            range (``inf``: the fold overflows); weights that were NaN or infinite before the
            fold are left out, as the fold keeps them.
        factor: ``W' = W * factor`` (float64, broadcastable): :func:`scale_weight` computes the
            weight from it later, bit for bit the same.
        dtype: The dtype of the weight.
    """

    weight: np.ndarray | None
    bias: np.ndarray
    bias64: np.ndarray
    weight_peak: float
    factor: np.ndarray | None = None
    dtype: np.dtype | None = None


def _expand_dims(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


#: Weights of at least this many elements are scaled by several threads (numpy's loops release
#: the GIL); below it handing the work over costs more than it saves.
PARALLEL_MIN_ELEMENTS = 1 << 18

_POOL: tuple[int, ThreadPoolExecutor | None, int] | None = None


_IGNORED_SETTINGS: set[str] = set()


def threads() -> int:
    """How many threads normfuse computes with: ``NORMFUSE_THREADS`` when set to a positive
    integer, capped at the cores this process may run on (said once), else one per such core,
    at most 8."""
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    setting = os.environ.get("NORMFUSE_THREADS", "").strip()
    if setting:
        if setting.isdigit() and int(setting) > 0:
            if int(setting) <= cores:
                return int(setting)
            if setting not in _IGNORED_SETTINGS:  # said once
                _IGNORED_SETTINGS.add(setting)
                logger.warning(
                    "NORMFUSE_THREADS=%s is more than the %d usable core(s); using %d",
                    setting,
                    cores,
                    cores,
                )
            return cores
        if setting not in _IGNORED_SETTINGS:  # said once
            _IGNORED_SETTINGS.add(setting)
            logger.warning("NORMFUSE_THREADS=%r is not a positive integer; ignored", setting)
    return min(cores, 8)


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[fn(x) for x in items]``, in order, on :func:`threads` threads (numpy releases the
    interpreter lock in its loops); on one thread where there is one."""
    pool, _ = _pool()
    if pool is None or len(items) < 2:
        return [fn(x) for x in items]
    return list(pool.map(fn, items))


def _pool() -> tuple[ThreadPoolExecutor | None, int]:
    """A pool of :func:`threads` workers and its size; no pool for one thread. Made again in a
    forked child, whose copy of the parent's pool has no threads."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        workers = threads()
        pool = ThreadPoolExecutor(workers, "normfuse") if workers > 1 else None
        _POOL = (os.getpid(), pool, workers)
    return _POOL[1], _POOL[2]


def scale_weight(
    w: WeightArray, factor: np.ndarray, dtype: np.dtype, *, in_place: bool = False
) -> np.ndarray:
    """``w * factor`` computed in float64 and rounded once into ``dtype``.

    numpy's buffered ufunc loop does the float64 product and the cast chunk by chunk, so no
    float64 copy of the whole weight is made. A file-backed weight is read here, once. Large
    weights are cut into blocks of rows that threads scale side by side; every element is the
    same product either way. ``in_place``: write the result over ``w`` (an array of ``dtype``
    the caller owns), so no second weight-sized array is made.
    """
    values = np.asarray(w)
    if in_place and values.dtype != dtype:
        raise ValueError(f"cannot scale {values.dtype} values into {dtype} in place")
    out = values if in_place else np.empty(values.shape, dtype=dtype)
    rows = values.shape[0] if values.ndim else 0
    per_row = rows > 1 and factor.ndim == values.ndim and factor.shape[0] == rows

    def scale(block: Any) -> None:  # a slice of rows, or ... for all
        with np.errstate(over="ignore"):  # overflow is reported through the peak, and refused
            np.multiply(
                values[block],
                factor[block] if per_row else factor,
                out=out[block],
                dtype=np.float64,
                casting="unsafe",
            )

    pool, workers = _pool() if values.size >= PARALLEL_MIN_ELEMENTS else (None, 1)
    if pool is None or rows < 2:
        scale(...)
        return out
    edges = np.linspace(0, rows, min(workers, rows) + 1).astype(int).tolist()
    list(pool.map(scale, [slice(a, b) for a, b in itertools.pairwise(edges)]))  # re-raises
    return out


def _peak(w: np.ndarray) -> float:
    """``max |w|`` (``nan`` if some value is NaN). For 2-byte floats (float16, bfloat16) numpy's
    float reductions are slow; their magnitudes order like the integers of their bits without
    the sign, which reduce fast."""
    if w.dtype.itemsize == 2 and w.dtype.kind in "fV":
        # without the sign bit: the top positive is the int16 maximum, the top negative the
        # uint16 maximum; two reductions, no temporary array
        bits = w.reshape(-1)
        positive = max(int(bits.view(np.int16).max()), 0)
        negative = max(int(bits.view(np.uint16).max()) - 0x8000, 0)
        top = np.array([max(positive, negative)], dtype=np.uint16)
        return float(top.view(w.dtype)[0])
    return max(abs(float(w.max())), abs(float(w.min())))


def all_finite(a: np.ndarray) -> bool:
    """No NaN or infinity in ``a`` (one fast reduction, also for float16 and bfloat16)."""
    return not a.size or math.isfinite(_peak(a))


def overflowed(stored: np.ndarray, result: np.ndarray) -> bool:
    """Some element of ``result`` is not finite where ``stored`` was (a NaN or infinity the
    weight had before the fold stays one, and is no overflow)."""
    return bool(np.any(~np.isfinite(result) & np.isfinite(stored)))


def _bound(w: np.ndarray, factor: np.ndarray, dtype: np.dtype) -> float:  # w: the values
    """An upper bound of ``|w * factor|``, exact when it exceeds what ``dtype`` holds.

    Elements that are NaN or infinite in ``w`` are left out: they stay what they were (the op
    computed with them before the fold too), so they are no overflow of the fold."""
    if not w.size:
        return 0.0
    bound = _peak(w) * float(np.abs(factor).max())
    if bound <= dtype_max(dtype):
        return bound
    stored = w.astype(np.float64)
    product = np.abs(stored * factor)
    product[~np.isfinite(np.broadcast_to(stored, product.shape))] = 0.0
    return float(product.max())


def _finish(
    lin: LinearWeights, w: WeightArray, factor: np.ndarray, b64: np.ndarray, defer: bool
) -> Folded:
    dtype = lin.out_dtype
    bias_dtype = lin.bias.dtype if lin.bias is not None and lin.dtype is None else dtype
    if defer and np.dtype(dtype).itemsize >= 4:
        # float32/float64: overflow would need |W| * scale above 3.4e38; the deferred computation
        # checks its result instead, so the weight is not read now
        weight, peak = None, 0.0
    elif defer:
        weight, peak = None, _bound(np.asarray(w), factor, dtype)
    else:
        values = np.asarray(w)  # reads a file-backed weight, once
        weight, peak = scale_weight(values, factor, dtype), _bound(values, factor, dtype)
    with np.errstate(over="ignore"):  # the caller compares bias64 with the dtype's range
        return Folded(weight, b64.astype(bias_dtype), b64, peak, factor, np.dtype(dtype))


def absorb_after(lin: LinearWeights, affine: Affine, *, defer: bool = False) -> Folded:
    """Fold ``affine`` applied to the op's output into the op.

    Args:
        lin: The linear op's weights.
        affine: The map on the output channels (scalar maps broadcast).
        defer: Do not compute the new weight now; return its ``factor`` for :func:`scale_weight`.

    Returns:
        The new weight and bias (the bias is created when the op had none).
    """
    c_out = lin.out_channels
    a = affine.expand(c_out)
    w = lin.weight
    b = _f64(lin.bias) if lin.bias is not None else np.zeros(c_out)
    if lin.kind == "conv":
        factor = _expand_dims(a.scale, w.ndim, 0)
    elif lin.kind == "conv_transpose":
        g = lin.groups
        in_per_group = w.shape[0] // g
        per_in = np.repeat(a.scale.reshape(g, -1), in_per_group, axis=0)  # [in, out/g]
        factor = per_in.reshape(per_in.shape + (1,) * (w.ndim - 2))
    elif lin.kind == "dense":
        factor = a.scale[:, None]
    else:
        factor = a.scale[None, :]
    return _finish(lin, w, factor, b * a.scale + a.shift, defer)


def absorb_before(lin: LinearWeights, affine: Affine, *, defer: bool = False) -> Folded:
    """Fold ``affine`` applied to the op's input into the op.

    Exact for dense ops; for convolutions only when the op pads no input position with zeros
    or ``affine`` has no shift. The caller checks that.

    Args:
        lin: The linear op's weights.
        affine: The map on the input channels (scalar maps broadcast).
        defer: Do not compute the new weight now; return its ``factor`` for :func:`scale_weight`.

    Returns:
        The new weight and bias (the bias is created when the op had none).
    """
    c_in = lin.in_channels
    a = affine.expand(c_in)
    w = np.asarray(lin.weight)  # the bias needs the values (sums over taps)
    b = _f64(lin.bias) if lin.bias is not None else np.zeros(lin.out_channels)
    if lin.kind == "conv":
        g = lin.groups
        out_per_group = w.shape[0] // g
        scale = np.repeat(a.scale.reshape(g, -1), out_per_group, axis=0)  # [out, in/g]
        shift = np.repeat(a.shift.reshape(g, -1), out_per_group, axis=0)
        taps = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2, dtype=np.float64)  # [out, in/g]
        b = b + (taps * shift).sum(axis=1)
        factor = scale.reshape(scale.shape + (1,) * (w.ndim - 2))
    elif lin.kind == "conv_transpose":
        g = lin.groups
        taps = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2, dtype=np.float64)  # [in, out/g]
        contrib = (taps * a.shift[:, None]).reshape(g, -1, w.shape[1]).sum(axis=1)
        b = b + contrib.reshape(-1)
        factor = _expand_dims(a.scale, w.ndim, 0)
    elif lin.kind == "dense":
        b = b + _f64(w) @ a.shift
        factor = a.scale[None, :]
    else:
        b = b + a.shift @ _f64(w)
        factor = a.scale[:, None]
    return _finish(lin, w, factor, b, defer)


def dtype_max(dtype: np.dtype) -> float:
    """Largest finite value of a float dtype (bfloat16 and the float8 types included)."""
    dt = np.dtype(dtype)
    try:
        return float(np.finfo(dt).max)
    except ValueError:
        return float(ml_dtypes.finfo(dt).max)


class ChannelMoments:
    """Per-channel count, mean and sum of squared deviations over batches, in float64.

    Batches are merged with the parallel algorithm of Chan, Golub and LeVeque (1979), which
    stays accurate where a running sum of squares would cancel. The channel axis is 1.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        """Add the values of one batch ``x`` (``(N, C, ...)``)."""
        if x.size == 0 or x.ndim < 2:
            return
        v = np.moveaxis(np.asarray(x, np.float64), 1, 0).reshape(x.shape[1], -1)
        mean = v.mean(axis=1)
        self.merge(v.shape[1], mean, ((v - mean[:, None]) ** 2).sum(axis=1))

    def merge(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        """Merge the moments of other values: their count, per-channel mean and sum of squared
        deviations from that mean (Chan et al.: ``M2 = M2_a + M2_b + d^2 n_a n_b / n``)."""
        if n <= 0:
            return
        mean, m2 = np.asarray(mean, np.float64), np.asarray(m2, np.float64)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = int(n), mean.copy(), m2.copy()
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * n / total)
        self.n = total

    def var(self, ddof: int = 0) -> np.ndarray:
        """The variance, population (``ddof=0``) or unbiased (``ddof=1``)."""
        assert self.m2 is not None
        return self.m2 / max(self.n - ddof, 1)
