"""The maths of branch merges (normfuse.core.branches) against a float64 numpy convolution."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from normfuse.core.branches import (
    Incompatible,
    Kernel,
    avgpool_kernel,
    compose,
    identity_kernel,
    merge_parallel,
    rounded,
    same_pads,
)


def conv(x: np.ndarray, k: Kernel) -> np.ndarray:
    """Reference N-d convolution in float64 (zero padding, groups, strides, dilations)."""
    n = k.spatial
    pad = [(0, 0), (0, 0)] + [(b, e) for b, e in zip(k.pads_begin, k.pads_end, strict=True)]
    xp = np.pad(x.astype(np.float64), pad)
    shape = k.shape
    out_sizes = [
        (xp.shape[2 + a] - k.dilations[a] * (shape[a] - 1) - 1) // k.strides[a] + 1
        for a in range(n)
    ]
    batch = x.shape[0]
    out = np.zeros((batch, k.out_channels, *out_sizes))
    per_in = k.weight.shape[1]
    per_out = k.out_channels // k.group
    for tap in itertools.product(*(range(s) for s in shape)):
        index = [slice(None), slice(None)]
        for a in range(n):
            start = tap[a] * k.dilations[a]
            index.append(slice(start, start + k.strides[a] * (out_sizes[a] - 1) + 1, k.strides[a]))
        window = xp[tuple(index)]
        for g in range(k.group):
            w = k.weight[(slice(g * per_out, (g + 1) * per_out), slice(None), *tap)]
            xs = window[:, g * per_in : (g + 1) * per_in]
            out[:, g * per_out : (g + 1) * per_out] += np.einsum("oc,nc...->no...", w, xs)
    return out + k.bias.reshape((1, -1) + (1,) * n)


def kernel(rng, cout, cin, shape, group=1, stride=1, dilation=1, pads=None) -> Kernel:
    n = len(shape)
    if pads is None:
        pads = [dilation * (s - 1) // 2 for s in shape]
    w = rng.standard_normal((cout, cin // group, *shape))
    return Kernel(
        w,
        rng.standard_normal(cout),
        (stride,) * n,
        (dilation,) * n,
        tuple(pads),
        tuple(pads),
        group,
    )


def close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.max(np.abs(a - b)) <= 1e-12 * max(1.0, float(np.max(np.abs(b))))


@pytest.mark.parametrize("group", [1, 2, 6])
@pytest.mark.parametrize("stride", [1, 2])
def test_parallel_3x3_1x1_1x3_3x1_identity(group, stride):
    rng = np.random.default_rng(group * 10 + stride)
    c = 6
    ks = [
        kernel(rng, c, c, (3, 3), group, stride),
        kernel(rng, c, c, (1, 1), group, stride),
        kernel(rng, c, c, (1, 3), group, stride),
        kernel(rng, c, c, (3, 1), group, stride),
    ]
    if stride == 1:
        ident = identity_kernel(c, group, 2, rng.standard_normal(c), rng.standard_normal(c))
        ks.append(ident)
    x = rng.standard_normal((2, c, 9, 8))
    merged = merge_parallel(ks)
    assert merged.shape == (3, 3)
    assert merged.pads_begin == (1, 1) and merged.pads_end == (1, 1)
    close(conv(x, merged), sum(conv(x, k) for k in ks))


def test_parallel_dilated_and_1d():
    rng = np.random.default_rng(3)
    ks = [kernel(rng, 4, 4, (3,), dilation=2), kernel(rng, 4, 4, (1,), dilation=1)]
    x = rng.standard_normal((1, 4, 11))
    merged = merge_parallel(ks)
    assert merged.dilations == (2,) and merged.pads_begin == (2,)
    close(conv(x, merged), conv(x, ks[0]) + conv(x, ks[1]))


def test_parallel_only_small_kernels_builds_the_window():
    rng = np.random.default_rng(4)
    ks = [kernel(rng, 3, 3, (1, 3)), kernel(rng, 3, 3, (3, 1))]
    merged = merge_parallel(ks)
    assert merged.shape == (3, 3)
    x = rng.standard_normal((1, 3, 5, 6))
    close(conv(x, merged), conv(x, ks[0]) + conv(x, ks[1]))


def test_asymmetric_but_aligned_padding():
    rng = np.random.default_rng(5)
    for begin, end in [((0, 0), (2, 2)), ((2, 2), (0, 0))]:
        a = kernel(rng, 2, 2, (3, 3))
        a.pads_begin, a.pads_end = begin, end  # causal windows: the 1x1's tap is at one end
        b = kernel(rng, 2, 2, (1, 1))
        merged = merge_parallel([a, b])
        x = rng.standard_normal((1, 2, 6, 5))
        close(conv(x, merged), conv(x, a) + conv(x, b))


def test_refusals():
    rng = np.random.default_rng(6)
    k3 = kernel(rng, 4, 4, (3, 3))
    with pytest.raises(Incompatible, match="misaligned"):
        merge_parallel([k3, kernel(rng, 4, 4, (1, 1), pads=(1, 1))])
    with pytest.raises(Incompatible, match="stride mismatch"):
        merge_parallel([k3, kernel(rng, 4, 4, (1, 1), stride=2)])
    with pytest.raises(Incompatible, match="groups differ"):
        merge_parallel([k3, kernel(rng, 4, 4, (1, 1), group=2)])
    with pytest.raises(Incompatible, match="dilation mismatch"):
        merge_parallel([k3, kernel(rng, 4, 4, (3, 3), dilation=2)])
    with pytest.raises(Incompatible, match="channels differ"):
        merge_parallel([k3, kernel(rng, 5, 4, (1, 1))])
    k2 = kernel(rng, 4, 4, (2, 2), pads=(0, 0))  # an even kernel's taps fall between the 3x3's?
    k2.pads_begin = (1, 1)
    k2.pads_end = (0, 0)
    merged = merge_parallel([k3, k2])  # aligned: taps -1..0 inside -1..1, same output size
    x = rng.standard_normal((1, 4, 5, 5))
    close(conv(x, merged), conv(x, k3) + conv(x, k2))


def test_identity_kernel_groups():
    rng = np.random.default_rng(7)
    s, t = rng.standard_normal(6), rng.standard_normal(6)
    for group in (1, 2, 3, 6):
        k = identity_kernel(6, group, 2, s, t)
        x = rng.standard_normal((1, 6, 4, 4))
        close(conv(x, k), x * s.reshape(1, -1, 1, 1) + t.reshape(1, -1, 1, 1))
    with pytest.raises(Incompatible):
        identity_kernel(6, 4, 2)


@pytest.mark.parametrize("pads", [0, 1])
@pytest.mark.parametrize("stride", [1, 2])
def test_avgpool_kernel(pads, stride):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 4, 7, 6))
    k = avgpool_kernel(4, 1, (3, 3), (stride, stride), (pads, pads), (pads, pads))
    xp = np.pad(x, [(0, 0), (0, 0), (pads, pads), (pads, pads)])
    ref = np.zeros_like(conv(x, k))
    for i in range(ref.shape[2]):
        for j in range(ref.shape[3]):
            ref[:, :, i, j] = xp[
                :, :, i * stride : i * stride + 3, j * stride : j * stride + 3
            ].mean(axis=(2, 3))
    close(conv(x, k), ref)


@pytest.mark.parametrize("g1,g2", [(1, 1), (2, 2), (1, 2), (2, 1)])
def test_compose_1x1_then_kxk(g1, g2):
    rng = np.random.default_rng(9 + g1 * 3 + g2)
    a = kernel(rng, 4, 6, (1, 1), group=g1)
    s, t = rng.standard_normal(4), rng.standard_normal(4)
    b = kernel(rng, 6, 4, (3, 3), group=g2, stride=2, pads=(0, 0))  # no padding: exact
    x = rng.standard_normal((1, 6, 9, 8))
    merged = compose(a, b, s, t)
    mid = conv(x, a) * s.reshape(1, -1, 1, 1) + t.reshape(1, -1, 1, 1)
    close(conv(x, merged), conv(mid, b))


def test_compose_padded_needs_zero_constant():
    rng = np.random.default_rng(10)
    a = kernel(rng, 4, 4, (1, 1))
    b = kernel(rng, 4, 4, (3, 3))  # pads 1
    with pytest.raises(Incompatible, match="borders"):
        compose(a, b, None, None)
    a.bias[:] = 0
    s = rng.standard_normal(4)
    merged = compose(a, b, s, np.zeros(4))
    x = rng.standard_normal((1, 4, 6, 6))
    close(conv(x, merged), conv(conv(x, a) * s.reshape(1, -1, 1, 1), b))


def test_compose_kxk_then_1x1_always_exact():
    rng = np.random.default_rng(11)
    a = kernel(rng, 5, 3, (3, 3), stride=2)
    b = kernel(rng, 4, 5, (1, 1))
    s, t = rng.standard_normal(5), rng.standard_normal(5)
    merged = compose(a, b, s, t)
    x = rng.standard_normal((2, 3, 9, 9))
    mid = conv(x, a) * s.reshape(1, -1, 1, 1) + t.reshape(1, -1, 1, 1)
    close(conv(x, merged), conv(mid, b))
    with pytest.raises(Incompatible, match="neither"):
        compose(a, kernel(rng, 4, 5, (3, 3), pads=(0, 0)))


def test_rounded_and_same_pads():
    assert rounded(np.array([1.0 + 2**-30]), np.float32).dtype == np.float32
    with pytest.raises(Incompatible, match="overflow"):
        rounded(np.array([1e300]), np.float32)
    assert same_pads("SAME_UPPER", 8, 3, 2, 1) == (0, 1)
    assert same_pads("SAME_LOWER", 8, 3, 2, 1) == (1, 0)
    assert same_pads("VALID", 8, 3, 2, 1) == (0, 0)


def test_random_geometries_merge_exactly_or_refuse():
    """Random kernels, paddings, strides, dilations and groups: whenever the branches' outputs
    can be added, the merge either equals their sum or is refused."""
    rng = np.random.default_rng(12)
    merged_count = 0
    for _ in range(300):
        group = int(rng.choice([1, 2]))
        stride, dil = int(rng.choice([1, 2])), int(rng.choice([1, 2]))
        ks = []
        span = int(rng.integers(0, 2))  # pads_begin + pads_end - dil * (k - 1): one output size
        for _ in range(int(rng.integers(2, 4))):
            shape = tuple(int(v) for v in rng.choice([1, 2, 3], size=2))
            k = kernel(rng, 4, 4, shape, group, stride, dilation=dil, pads=(0, 0))
            k.pads_begin = tuple(  # centred, or one tap off, or anywhere
                max(0, dil * (shape[a] - 1) // 2 + int(rng.choice([0, 0, 1, -1, dil])))
                for a in range(2)
            )
            k.pads_end = tuple(span + dil * (shape[a] - 1) - k.pads_begin[a] for a in range(2))
            if min(k.pads_end) < 0 or not rng.integers(0, 4):
                k.pads_end = tuple(int(v) for v in rng.integers(0, 3, size=2))
            ks.append(k)
        x = rng.standard_normal((1, 4, 7, 6))
        outs = [conv(x, k) for k in ks]
        if len({o.shape for o in outs}) != 1:
            continue  # an invalid sum
        try:
            merged = merge_parallel(ks)
        except Incompatible:
            continue
        merged_count += 1
        close(conv(x, merged), sum(outs))
    assert merged_count >= 20


def test_random_sequences_compose_exactly_or_refuse():
    rng = np.random.default_rng(13)
    composed = 0
    for _ in range(150):
        g1, g2 = int(rng.choice([1, 2])), int(rng.choice([1, 2]))
        first_pointwise = bool(rng.integers(0, 2))
        shape = tuple(int(v) for v in rng.choice([1, 2, 3], size=2))
        stride = int(rng.choice([1, 2]))
        if first_pointwise:
            a = kernel(rng, 4, 4, (1, 1), g1)
            b = kernel(rng, 4, 4, shape, g2, stride, pads=tuple(rng.integers(0, 2, size=2)))
        else:
            a = kernel(rng, 4, 4, shape, g1, stride, pads=tuple(rng.integers(0, 2, size=2)))
            b = kernel(rng, 4, 4, (1, 1), g2)
        if rng.integers(0, 2):
            a.bias[:] = 0
        s = rng.standard_normal(4)
        t = rng.standard_normal(4) if rng.integers(0, 2) else np.zeros(4)
        x = rng.standard_normal((1, 4, 7, 6))
        try:
            merged = compose(a, b, s, t)
        except Incompatible:
            continue
        composed += 1
        mid = conv(x, a) * s.reshape(1, -1, 1, 1) + t.reshape(1, -1, 1, 1)
        close(conv(x, merged), conv(mid, b))
    assert composed >= 40
