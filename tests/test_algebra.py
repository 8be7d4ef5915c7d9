"""The affine algebra on plain numpy: composition, and both folds against direct computation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from normfuse.core.algebra import Affine, LinearWeights, absorb_after, absorb_before, dtype_max


def test_composition_equals_sequential_application(rng):
    a = Affine(rng.uniform(0.5, 2, 5), rng.normal(size=5))
    b = Affine(rng.uniform(-2, 2, 5), rng.normal(size=5))
    scalar = Affine(np.array([3.0]), np.array([-1.0]))
    x = rng.normal(size=(2, 5, 3))
    np.testing.assert_allclose(a.then(b).apply(x), b.apply(a.apply(x)), rtol=1e-14)
    np.testing.assert_allclose(a.then(scalar).apply(x), scalar.apply(a.apply(x)), rtol=1e-14)
    assert Affine.identity(5).then(a).apply(x).tolist() == a.apply(x).tolist()


def test_batchnorm_affine(rng):
    g, b, m, v = (
        rng.uniform(0.5, 2, 4),
        rng.normal(size=4),
        rng.normal(size=4),
        rng.uniform(0.1, 3, 4),
    )
    x = rng.normal(size=(3, 4))
    bn = Affine.from_batchnorm(g, b, m, v, 1e-3, axis=1)
    np.testing.assert_allclose(bn.apply(x), g * (x - m) / np.sqrt(v + 1e-3) + b, rtol=1e-13)


@pytest.mark.parametrize("kind", ["dense", "dense_t"])
def test_dense_folds_match_direct_computation(rng, kind):
    w = rng.normal(size=(6, 4) if kind == "dense" else (4, 6))
    bias = rng.normal(size=6)
    lin = LinearWeights(kind, w, bias)
    x = rng.normal(size=(5, 4))
    y = x @ (w.T if kind == "dense" else w) + bias
    after = Affine(rng.uniform(0.5, 2, 6), rng.normal(size=6), axis=1)
    f = absorb_after(lin, after)
    np.testing.assert_allclose(
        x @ (f.weight.T if kind == "dense" else f.weight) + f.bias, after.apply(y), rtol=1e-12
    )
    before = Affine(rng.uniform(0.5, 2, 4), rng.normal(size=4), axis=1)
    f = absorb_before(lin, before)
    direct = before.apply(x) @ (w.T if kind == "dense" else w) + bias
    np.testing.assert_allclose(
        x @ (f.weight.T if kind == "dense" else f.weight) + f.bias, direct, rtol=1e-12
    )


def test_grouped_pointwise_conv_before_matches_direct(rng):
    """A 1x1 grouped conv is a block-diagonal dense layer: check both folds against it."""
    groups, cin, cout = 2, 4, 6
    w = rng.normal(size=(cout, cin // groups, 1, 1))
    dense = np.zeros((cout, cin))
    for o in range(cout):
        g = o // (cout // groups)
        dense[o, g * 2 : g * 2 + 2] = w[o, :, 0, 0]
    lin = LinearWeights("conv", w, None, groups)
    before = Affine(rng.uniform(0.5, 2, cin), rng.normal(size=cin))
    f = absorb_before(lin, before)
    x = rng.normal(size=(3, cin))
    folded_dense = np.zeros_like(dense)
    for o in range(cout):
        g = o // (cout // groups)
        folded_dense[o, g * 2 : g * 2 + 2] = f.weight[o, :, 0, 0]
    np.testing.assert_allclose(x @ folded_dense.T + f.bias, before.apply(x) @ dense.T, rtol=1e-12)


def test_mismatched_channels_raise():
    with pytest.raises(ValueError, match="3 channels"):
        Affine(np.ones(3), np.zeros(3)).expand(4)
    with pytest.raises(ValueError, match="shift has 2"):
        Affine(np.ones(3), np.zeros(2))


def test_dtype_max_covers_bfloat16():
    import ml_dtypes

    assert dtype_max(np.dtype(np.float16)) == 65504.0
    assert dtype_max(np.dtype(ml_dtypes.bfloat16)) > 3e38


def test_import_and_onnx_commands_work_without_torch(tmp_path):
    """torch is optional: block it and run the CLI on a bundled model."""
    model = Path(__file__).resolve().parent.parent / "models" / "dwsep.onnx"
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import normfuse, normfuse.cli\n"
        f"sys.argv = ['normfuse', 'fold', {str(model)!r}, '-o', {str(tmp_path / 'o.onnx')!r}]\n"
        "normfuse.cli.main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "PASSED" in proc.stdout and (tmp_path / "o.onnx").exists()


def test_channel_moments_merge_batches_exactly_and_stably():
    from normfuse.core.algebra import ChannelMoments

    rng = np.random.default_rng(5)
    batches = [rng.normal(1e4, 0.5, (int(rng.integers(1, 9)), 3, 4, 5)) for _ in range(7)]
    acc = ChannelMoments()
    for b in batches:
        acc.add(b.astype(np.float32))
    flat = np.moveaxis(np.concatenate(batches).astype(np.float32).astype(np.float64), 1, 0).reshape(
        3, -1
    )
    np.testing.assert_allclose(acc.mean, flat.mean(1), rtol=1e-12)
    np.testing.assert_allclose(acc.var(), flat.var(1), rtol=1e-9)  # a large mean cancels nothing
    np.testing.assert_allclose(acc.var(ddof=1), flat.var(1, ddof=1), rtol=1e-9)
    assert acc.n == flat.shape[1]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_peak_magnitude_matches_float64(rng, dtype):
    import ml_dtypes

    from normfuse.core.algebra import _peak

    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    w = (rng.standard_normal((64, 3, 5, 5)) * rng.uniform(0.1, 300.0)).astype(dt)
    w.reshape(-1)[17] = -float(np.abs(w.astype(np.float64)).max()) * 1.5  # the peak is negative
    assert _peak(w) == float(np.abs(w.astype(np.float64)).max())
    w.reshape(-1)[3] = np.inf
    assert _peak(w) == np.inf
    w.reshape(-1)[4] = np.nan
    assert np.isnan(_peak(w))


def test_all_finite(rng):
    import ml_dtypes

    from normfuse.core.algebra import all_finite

    for dt in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64):
        a = rng.standard_normal(100).astype(dt)
        assert all_finite(a) and all_finite(a[:0])
        for bad in (np.inf, -np.inf, np.nan):
            b = a.copy()
            b[50] = bad
            assert not all_finite(b)


def test_peak_of_half_floats_by_sign(rng):
    from normfuse.core.algebra import _peak

    w = np.abs(rng.standard_normal(1000)).astype(np.float16) + np.float16(0.5)
    assert _peak(w) == float(w.max())  # all positive
    assert _peak(-w) == float(w.max())  # all negative
    assert _peak(np.array([-0.0, 0.0, -0.0], np.float16)) == 0.0
    w[10] = -np.nan
    assert np.isnan(_peak(w))


_FACTOR_SHAPES = {  # the factor each kind of linear op scales its weight by (absorb_after)
    "conv": ((67, 5, 3, 3), (67, 1, 1, 1)),
    "conv_transpose": ((12, 7, 3, 3), (12, 7, 1, 1)),
    "dense": ((67, 40), (67, 1)),
    "matmul": ((40, 67), (1, 67)),
}


@pytest.fixture
def threads(monkeypatch):
    """A pool of three workers, used for every weight however small."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from normfuse.core import algebra

    pool = ThreadPoolExecutor(3)
    monkeypatch.setattr(algebra, "_POOL", (os.getpid(), pool, 3))
    monkeypatch.setattr(algebra, "PARALLEL_MIN_ELEMENTS", 1)
    yield pool
    pool.shutdown()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("kind", sorted(_FACTOR_SHAPES))
def test_threaded_scaling_is_bit_identical(rng, threads, dtype, kind):
    from normfuse.core.algebra import scale_weight

    shape, factor_shape = _FACTOR_SHAPES[kind]
    w = (rng.standard_normal(shape) * 3).astype(dtype)
    factor = rng.uniform(-3.0, 3.0, factor_shape)
    expected = (w.astype(np.float64) * factor).astype(dtype)  # float64, rounded once
    assert scale_weight(w, factor, np.dtype(dtype)).tobytes() == expected.tobytes()
    again = w.copy()
    assert scale_weight(again, factor, np.dtype(dtype), in_place=True) is again
    assert again.tobytes() == expected.tobytes()
    with pytest.raises(ValueError, match="in place"):
        scale_weight(w.astype(np.float64), factor, np.dtype(dtype), in_place=True)
    one = np.array(2.5, dtype)  # a 0-d weight has no rows to split
    assert scale_weight(one, np.array(3.0), np.dtype(dtype)) == np.array(7.5, dtype)


def _scale_in_child(queue) -> None:
    from normfuse.core.algebra import scale_weight

    w = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    queue.put(scale_weight(w, np.full((64, 1), 2.0), np.dtype(np.float32)).sum())


def test_a_forked_child_makes_its_own_threads(rng, monkeypatch):
    """The parent's pool has no threads in a forked child: using it there would wait forever."""
    import multiprocessing
    import os
    from concurrent.futures import ThreadPoolExecutor

    from normfuse.core import algebra
    from normfuse.core.algebra import scale_weight

    # one thread, four blocks: afterwards the pool counts its thread idle four times, so in the
    # child it would queue the blocks for a thread that the fork did not copy
    pool = ThreadPoolExecutor(1)
    monkeypatch.setattr(algebra, "_POOL", (os.getpid(), pool, 4))
    monkeypatch.setattr(algebra, "PARALLEL_MIN_ELEMENTS", 1)

    w = rng.standard_normal((64, 32)).astype(np.float32)
    scale_weight(w, np.full((64, 1), 2.0), np.dtype(np.float32))  # the parent's pool has run
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_scale_in_child, args=(queue,))
    child.start()
    child.join(30)
    if child.is_alive():
        child.kill()
    pool.shutdown()
    assert child.exitcode == 0
    assert queue.get(timeout=5) == float(np.arange(64 * 32).sum() * 2)


def test_thread_count_follows_the_environment(monkeypatch, caplog):
    import os

    from normfuse.core import algebra
    from normfuse.core.algebra import threads

    monkeypatch.setattr(algebra, "_IGNORED_SETTINGS", set())
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))  # 3 <= the cores
    monkeypatch.setenv("NORMFUSE_THREADS", "3")
    assert threads() == 3
    monkeypatch.delenv("NORMFUSE_THREADS")
    assert threads() == min(len(os.sched_getaffinity(0)), 8)
    monkeypatch.setenv("NORMFUSE_THREADS", "zero")
    with caplog.at_level("WARNING", logger="normfuse.core.algebra"):
        assert threads() == min(len(os.sched_getaffinity(0)), 8)
        assert threads() == min(len(os.sched_getaffinity(0)), 8)
    assert caplog.text.count("NORMFUSE_THREADS='zero' is not a positive integer") == 1


def test_one_thread_scales_without_a_pool(rng, monkeypatch):
    from normfuse.core import algebra

    monkeypatch.setenv("NORMFUSE_THREADS", "1")
    monkeypatch.setattr(algebra, "_POOL", None)
    monkeypatch.setattr(algebra, "PARALLEL_MIN_ELEMENTS", 1)
    w = rng.standard_normal((64, 9)).astype(np.float32)
    factor = rng.uniform(0.5, 2.0, (64, 1))
    got = algebra.scale_weight(w, factor, np.dtype(np.float32))
    assert algebra._POOL is not None and algebra._POOL[1] is None  # no threads were started
    assert got.tobytes() == (w.astype(np.float64) * factor).astype(np.float32).tobytes()


def test_a_weight_that_was_infinite_is_no_overflow(rng):
    """The range check is about what the fold creates: a stored infinity stays infinite (and a
    NaN stays NaN) in its own element; a finite weight pushed past the range is an overflow."""
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w[1, 2, 0, 0] = np.inf
    w[2, 0, 1, 1] = np.nan
    lin = LinearWeights("conv", w, None)
    scale = np.array([2.0, -3.0, 0.5, 1.0])
    folded = absorb_after(lin, Affine(scale, np.zeros(4)))
    product = np.abs(w.astype(np.float64) * scale[:, None, None, None])
    assert folded.weight_peak == product[np.isfinite(w)].max()
    assert folded.weight[1, 2, 0, 0] == -np.inf and np.isnan(folded.weight[2, 0, 1, 1])
    big = absorb_after(lin, Affine(np.array([1.0, 1e39, 1.0, 1.0]), np.zeros(4)))
    assert big.weight_peak > dtype_max(np.float32)  # finite weights times 1e39: overflow
