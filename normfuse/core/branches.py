"""The maths of structural reparameterization: sums and compositions of convolutions.

A *branch* is a convolution written as a :class:`Kernel` (weight, bias, strides, dilations,
paddings, groups), in float64. Branches that read the same tensor and whose outputs are added
are one convolution when they agree in stride, dilation and groups and their paddings put every
kernel's taps on the same input positions: :func:`merge_parallel` embeds each kernel in the
common window (zeros elsewhere) and sums. An identity branch (the input itself, or a per-channel
affine of it) is :func:`identity_kernel`; an average pool is :func:`avgpool_kernel`. Two
convolutions in sequence with a per-channel affine between are one (:func:`compose`) when one
of them is 1x1 without stride or padding, and exactly so only where the zero padding of the
second does not meet a non-zero constant of the intermediate tensor.

Everything is computed in float64 and rounded once into the weights' dtype (:func:`rounded`).
numpy only.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = [
    "Incompatible",
    "Kernel",
    "as_vector",
    "avgpool_kernel",
    "compose",
    "identity_kernel",
    "merge_parallel",
    "rounded",
    "same_pads",
    "then_affine",
]


class Incompatible(ValueError):
    """The branches cannot be one convolution exactly; ``str(exc)`` says why."""


@dataclasses.dataclass
class Kernel:
    """A convolution in float64: ``y = conv(x, weight) + bias``.

    Attributes:
        weight: ``(out, in / group, *kernel)``.
        bias: ``(out,)``.
        strides, dilations, pads_begin, pads_end: One per spatial axis.
        group: The number of groups.
    """

    weight: np.ndarray
    bias: np.ndarray
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    group: int = 1

    @property
    def spatial(self) -> int:
        return self.weight.ndim - 2

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.group

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.weight.shape[2:])

    @property
    def is_pointwise(self) -> bool:
        """1x1, stride 1, no padding: reads each input position alone."""
        return (
            all(k == 1 for k in self.shape)
            and all(s == 1 for s in self.strides)
            and not any(self.pads_begin)
            and not any(self.pads_end)
        )

    @property
    def pads(self) -> bool:
        return any(self.pads_begin) or any(self.pads_end)

    def macs(self) -> int:
        """Multiply-adds per output position."""
        return int(self.weight.size)

    def dense(self) -> np.ndarray:
        """The weight as ``(out, in, *kernel)`` with the groups' blocks on the diagonal."""
        out, per_in = self.weight.shape[:2]
        per_out = out // self.group
        full = np.zeros((out, per_in * self.group, *self.weight.shape[2:]), np.float64)
        for g in range(self.group):
            rows = slice(g * per_out, (g + 1) * per_out)
            full[rows, g * per_in : (g + 1) * per_in] = self.weight[rows]
        return full


def identity_kernel(
    channels: int,
    group: int,
    spatial: int,
    scale: np.ndarray | float = 1.0,
    shift: np.ndarray | float = 0.0,
) -> Kernel:
    """``y = x * scale + shift`` per channel as a 1x1 convolution with ``group`` groups."""
    if channels % group:
        raise Incompatible(f"{channels} channels do not split into {group} groups")
    per = channels // group
    weight = np.zeros((channels, per) + (1,) * spatial, np.float64)
    s = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (channels,))
    idx = np.arange(channels)
    weight[(idx, idx % per) + (0,) * spatial] = s
    bias = np.broadcast_to(np.asarray(shift, np.float64).reshape(-1), (channels,)).copy()
    one = (1,) * spatial
    zero = (0,) * spatial
    return Kernel(weight, bias, one, one, zero, zero, group)


def avgpool_kernel(
    channels: int,
    group: int,
    kernel_shape: tuple[int, ...],
    strides: tuple[int, ...],
    pads_begin: tuple[int, ...],
    pads_end: tuple[int, ...],
    dilations: tuple[int, ...] | None = None,
) -> Kernel:
    """An average pool that counts padded positions (``count_include_pad=1``, or no padding) as a
    per-channel convolution with the constant kernel ``1 / prod(kernel_shape)``."""
    base = identity_kernel(channels, group, len(kernel_shape))
    weight = np.repeat(base.weight, 1, axis=0)
    for axis, k in enumerate(kernel_shape):
        weight = np.repeat(weight, k, axis=2 + axis)
    weight /= float(math.prod(kernel_shape))
    return Kernel(
        weight,
        np.zeros(channels),
        tuple(strides),
        tuple(dilations or (1,) * len(kernel_shape)),
        tuple(pads_begin),
        tuple(pads_end),
        group,
    )


def same_pads(mode: str, size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """The explicit ``(begin, end)`` padding of ``auto_pad`` ``SAME_UPPER``/``SAME_LOWER``/
    ``VALID`` along one axis of length ``size``."""
    if mode == "VALID":
        return 0, 0
    out = -(-size // stride)
    total = max((out - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)
    small, large = total // 2, total - total // 2
    return (small, large) if mode == "SAME_UPPER" else (large, small)


def merge_parallel(kernels: list[Kernel]) -> Kernel:
    """One convolution equal to the sum of ``kernels`` applied to the same input.

    Raises:
        Incompatible: strides, dilations, groups or channels differ, or the paddings do not put
            the kernels' taps on the same input positions (with the same output size).
    """
    if not kernels:
        raise Incompatible("no branch")
    first = kernels[0]
    n = first.spatial
    for k in kernels[1:]:
        if k.spatial != n:
            raise Incompatible("the branches have different numbers of spatial axes")
        if k.out_channels != first.out_channels or k.in_channels != first.in_channels:
            raise Incompatible(
                f"channels differ ({k.in_channels}->{k.out_channels} vs "
                f"{first.in_channels}->{first.out_channels})"
            )
        if k.group != first.group:
            raise Incompatible(f"groups differ ({k.group} vs {first.group})")
    # A 1x1 kernel's dilation does not matter: it takes the others' so that it can align.
    wide = [k for k in kernels if any(s > 1 for s in k.shape)]
    dil = wide[0].dilations if wide else first.dilations
    strides = first.strides
    for k in kernels:
        if tuple(k.strides) != tuple(strides):
            raise Incompatible(f"stride mismatch ({list(k.strides)} vs {list(strides)})")
        if any(s > 1 for s in k.shape) and tuple(k.dilations) != tuple(dil):
            raise Incompatible(f"dilation mismatch ({list(k.dilations)} vs {list(dil)})")
    starts, shape, pads_end = [], [], []
    for a in range(n):
        d = dil[a]
        lo = [-k.pads_begin[a] for k in kernels]
        hi = [-k.pads_begin[a] + d * (k.shape[a] - 1) for k in kernels]
        span = {k.pads_begin[a] + k.pads_end[a] - d * (k.shape[a] - 1) for k in kernels}
        if len(span) != 1:
            raise Incompatible(
                f"padding misaligned on axis {a}: the branches' outputs differ in size "
                f"(pads {[(k.pads_begin[a], k.pads_end[a]) for k in kernels]}, "
                f"kernels {[k.shape[a] for k in kernels]})"
            )
        start = min(lo)
        if any((v - start) % d for v in lo):
            raise Incompatible(
                f"padding misaligned on axis {a}: the kernels' taps fall between each other's "
                f"(dilation {d})"
            )
        starts.append(start)
        shape.append((max(hi) - start) // d + 1)
        pads_end.append(span.pop() - (-start) + d * (shape[-1] - 1))
    out, per_in = first.weight.shape[:2]
    weight = np.zeros((out, per_in, *tuple(shape)), np.float64)
    bias = np.zeros(out, np.float64)
    for k in kernels:
        index = [slice(None), slice(None)]
        for a in range(n):
            off = (-k.pads_begin[a] - starts[a]) // dil[a]
            index.append(slice(off, off + k.shape[a]))
        weight[tuple(index)] += k.weight
        bias += k.bias
    return Kernel(
        weight,
        bias,
        tuple(strides),
        tuple(dil),
        tuple(-s for s in starts),
        tuple(pads_end),
        first.group,
    )


def compose(
    first: Kernel,
    second: Kernel,
    scale: np.ndarray | None = None,
    shift: np.ndarray | None = None,
) -> Kernel:
    """One convolution equal to ``second(first(x) * scale + shift)``.

    One of the two must be pointwise (1x1, stride 1, no padding). When ``second`` pads, the
    intermediate tensor's zero padding would have to be ``first``'s constant (its bias times
    ``scale`` plus ``shift``) for the merge to be exact: it is refused unless that constant is 0.

    Raises:
        Incompatible: with the reason.
    """
    mid = first.out_channels
    if second.in_channels != mid:
        raise Incompatible(f"channels differ ({mid} out of the first, {second.in_channels} in)")
    s = np.ones(mid) if scale is None else np.broadcast_to(np.asarray(scale, np.float64), (mid,))
    t = np.zeros(mid) if shift is None else np.broadcast_to(np.asarray(shift, np.float64), (mid,))
    const = first.bias * s + t  # the intermediate tensor where first's input is all zeros
    if second.pads and np.any(const != 0):
        raise Incompatible(
            "the second conv pads its input with zeros, but the first conv's bias and the affine's "
            "shift make the intermediate tensor non-zero there: the merged conv would differ at "
            "the borders"
        )
    group = _composed_group(first, second)
    w1 = first.dense() * s.reshape((mid,) + (1,) * (first.weight.ndim - 1))
    w2 = second.dense()
    if first.is_pointwise:  # (D, M, *k) x (M, C) -> (D, C, *k)
        dense = np.einsum("dm...,mc->dc...", w2, w1.reshape(w1.shape[:2]))
        geometry = second
    else:  # (D, M) x (M, C, *k) -> (D, C, *k)
        dense = np.einsum("dm,mc...->dc...", w2.reshape(w2.shape[:2]), w1)
        geometry = first
    bias = second.bias + w2.reshape(w2.shape[0], w2.shape[1], -1).sum(axis=2) @ const
    out, cin = dense.shape[:2]
    per_out, per_in = out // group, cin // group
    weight = np.empty((out, per_in, *dense.shape[2:]), np.float64)
    for g in range(group):
        rows = slice(g * per_out, (g + 1) * per_out)
        weight[rows] = dense[rows, g * per_in : (g + 1) * per_in]
    return Kernel(
        weight,
        bias,
        geometry.strides,
        geometry.dilations,
        geometry.pads_begin,
        geometry.pads_end,
        group,
    )


def _composed_group(first: Kernel, second: Kernel) -> int:
    """The group count of :func:`compose`'s result.

    Raises:
        Incompatible: Neither conv is pointwise, or their groups cannot be merged.
    """
    if not (first.is_pointwise or second.is_pointwise):
        raise Incompatible("neither conv is 1x1 without stride or padding")
    if first.group == second.group:
        return first.group
    if first.group == 1 or second.group == 1:
        return 1
    raise Incompatible(f"groups differ ({first.group} then {second.group})")


def composed_macs(first: Kernel, second: Kernel) -> int:
    """The multiply-adds per output position of :func:`compose`'s result, from the shapes
    alone (composing a depthwise conv with a pointwise one builds a dense weight first).

    Raises:
        Incompatible: As :func:`compose` for the geometry.
    """
    group = _composed_group(first, second)
    geometry = second if first.is_pointwise else first
    return second.out_channels * (first.in_channels // group) * math.prod(geometry.shape)


def as_vector(coef: np.ndarray | float | None) -> np.ndarray:
    """A per-channel coefficient as a 1-D float64 array (``None`` is 1)."""
    return np.ones(1) if coef is None else np.asarray(coef, np.float64).reshape(-1)


def then_affine(k: Kernel, scale: object, shift: object) -> Kernel:
    """``k`` followed by a per-channel ``y * scale + shift`` (scalars or vectors)."""
    s = np.broadcast_to(as_vector(scale), (k.out_channels,))  # type: ignore[arg-type]
    t = np.broadcast_to(as_vector(shift), (k.out_channels,))  # type: ignore[arg-type]
    w = k.weight * s.reshape((-1,) + (1,) * (k.weight.ndim - 1))
    return dataclasses.replace(k, weight=w, bias=k.bias * s + t)


def rounded(array: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """``array`` (float64) rounded once into ``dtype``, refusing values out of its range."""
    dt = np.dtype(dtype)
    if dt.kind == "f" and array.size:
        top = float(np.max(np.abs(array)))
        if not math.isfinite(top) or top > float(np.finfo(dt).max):
            raise Incompatible(f"the merged weights overflow {dt.name}")
    return np.ascontiguousarray(array.astype(dt))
