"""ONNX recalibration over streamed batches: folders, globs, ``.npy`` folders, ``--batches`` and
``--samples``, worker processes merged exactly, the sequential mode's level cache (memory and
temporary folder), and the errors (NaN batch named, a failing worker in one line)."""

from __future__ import annotations

import tempfile

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import TensorProto as TP
from onnx import helper

import normfuse
from normfuse.cli import cli
from tests.conftest import bn_node, bn_params, make_model, normal, run, tensor

C = 6


def _model(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> BN0 -> Conv -> BN1 -> Relu -> Conv -> BN2 -> Add(skip from Relu) -> Conv -> BN3:
    four levels, a BatchNorm on the graph input, a skip connection across levels, random
    statistics (running variance far from 1), a dynamic batch dimension."""
    inits = [
        tensor("w1", normal(rng, (C, 3, 3, 3)) * 0.5),
        tensor("w2", normal(rng, (C, C, 3, 3)) * 0.3),
        tensor("w3", normal(rng, (C, C, 1, 1)) * 0.7),
        *bn_params(rng, 3, "bn0"),
        *bn_params(rng, C, "bn1"),
        *bn_params(rng, C, "bn2"),
        *bn_params(rng, C, "bn3"),
    ]
    nodes = [
        bn_node("x", "b0", "bn0"),
        helper.make_node("Conv", ["b0", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn_node("c1", "b1", "bn1"),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        bn_node("c2", "b2", "bn2"),
        helper.make_node("Add", ["b2", "r1"], ["s"]),
        helper.make_node("Conv", ["s", "w3"], ["c3"], name="conv3"),
        bn_node("c3", "y", "bn3"),
    ]
    return make_model(
        nodes, [("x", TP.FLOAT, ["N", 3, 7, 7])], [("y", TP.FLOAT, ["N", C, 7, 7])], inits
    )


def _batches(rng: np.random.Generator, count: int = 7, size: int = 4) -> list[np.ndarray]:
    return [(normal(rng, (size, 3, 7, 7)) * 1.7 + rng.normal(0.4, 0.5)) for _ in range(count)]


def _stats(model) -> dict[str, np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return {
        t.name: onnx.numpy_helper.to_array(t)
        for t in proto.graph.initializer
        if t.name.endswith(("_mean", "_var"))
    }


def _worst(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(
        float(np.max(np.abs(a[k].astype(np.float64) - b[k]) / np.max(np.abs(b[k])))) for k in a
    )


@pytest.fixture
def setup(tmp_path, rng):
    path = tmp_path / "m.onnx"
    onnx.save(_model(rng), path)
    xs = _batches(rng)
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, x in enumerate(xs):
        np.savez(folder / f"{i:03d}.npz", x=x)
    return path, xs, folder


def test_folder_glob_npy_and_memory_give_the_same_statistics(setup, tmp_path):
    path, xs, folder = setup
    npy = tmp_path / "npy"
    npy.mkdir()
    for i, x in enumerate(xs):
        np.save(npy / f"{i:03d}.npy", x)
    ref, report = normfuse.recalibrate(str(path), [{"x": x} for x in xs], progress=False)
    assert [e.status for e in report.entries] == ["applied"] * 4
    assert report.notes[0].startswith("7 batch(es), 28 sample(s) on CPU")
    expected = _stats(ref)
    for data in (folder, str(folder / "*.npz"), npy, str(npy / "00[0-6].npy")):
        new, _ = normfuse.recalibrate(str(path), data, progress=False)
        got = _stats(new)
        assert all(np.array_equal(got[k], expected[k]) for k in expected), data
    # the statistics are those of what the recalibrated model feeds each BatchNorm
    proto = ir.to_proto(ref)
    for bn, inp in (("bn0", "x"), ("bn1", "c1"), ("bn2", "c2"), ("bn3", "c3")):
        probe = onnx.ModelProto()
        probe.CopyFrom(proto)
        probe.graph.output.append(helper.make_tensor_value_info(inp, TP.FLOAT, None))
        values = np.concatenate([run(probe, {"x": x})[-1] for x in xs]).astype(np.float64)
        flat = np.moveaxis(values, 1, 0).reshape(values.shape[1], -1)
        np.testing.assert_allclose(expected[f"{bn}_mean"], flat.mean(1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(expected[f"{bn}_var"], flat.var(1), rtol=1e-5)
        assert not np.allclose(expected[f"{bn}_var"], 1.0, rtol=0.05)


def test_batches_and_samples_cut_the_data(setup, tmp_path):
    path, xs, folder = setup
    cut = [{"x": xs[0]}, {"x": xs[1]}, {"x": xs[2][:2]}]  # 10 samples: the third batch cut
    ref, _ = normfuse.recalibrate(str(path), cut, progress=False, mode="batch")
    new, report = normfuse.recalibrate(str(path), folder, num_samples=10, mode="batch")
    assert report.notes[0].startswith("3 batch(es), 10 sample(s)")
    assert all(np.array_equal(_stats(new)[k], v) for k, v in _stats(ref).items())
    out = tmp_path / "r.onnx"
    args = ["recalibrate", str(path), "--data", str(folder), "-o", str(out), "--no-check"]
    result = CliRunner().invoke(
        cli, [*args, "--batches", "3", "--samples", "10", "--mode", "batch"]
    )
    assert result.exit_code == 0, result.output
    assert "3 batch(es), 10 sample(s)" in result.output
    assert all(np.array_equal(_stats(onnx.load(out))[k], v) for k, v in _stats(ref).items())
    result = CliRunner().invoke(cli, [*args, "--samples", "0", "--force"])
    assert result.exit_code == 2
    assert result.output.startswith("error: --samples 0 uses no data. Note:")


def test_two_workers_equal_one(setup, tmp_path):
    """The CLI with two workers (the batch mode's workers: the float64 test below)."""
    path, _, folder = setup
    mode = "sequential"
    one, _ = normfuse.recalibrate(str(path), folder, mode=mode, progress=False)
    out = tmp_path / "w2.onnx"
    args = ["recalibrate", str(path), "--data", str(folder), "--mode", mode, "--workers", "2"]
    result = CliRunner().invoke(cli, [*args, "-o", str(out), "--no-check"])
    assert result.exit_code == 0, result.output
    assert "2 worker processes merged exactly" in result.output
    worst = _worst(_stats(onnx.load(out)), _stats(one))
    print(f"--workers 2 vs --workers 1 ({mode}): max relative difference {worst:.1e}")
    assert worst <= 1e-12  # float64 merges rounded into float32: equal but for the last bit


def test_the_level_cache_changes_nothing_in_memory_or_on_disk(setup, tmp_path, monkeypatch):
    path, _, folder = setup
    spill = tmp_path / "tmp"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    plain, report = normfuse.recalibrate(str(path), folder, cache=False, progress=False)
    levels = [e.target for e in report.entries]
    assert [t.split("(level ")[1] for t in levels] == ["0)", "1)", "2)", "3)"]
    expected = _stats(plain)
    for options in ({}, {"cache_mb": 0}, {"cache_mb": 0.01}, {"cache_mb": 0, "workers": 2}):
        new, report = normfuse.recalibrate(str(path), folder, progress=False, **options)
        got = _stats(new)
        assert all(np.array_equal(got[k], expected[k]) for k in expected), options
        if options.get("cache_mb") == 0:
            assert any("temporary folder" in n for n in report.notes), report.notes
        assert list(spill.iterdir()) == []  # the temporary folder is gone


def test_a_nan_batch_is_refused_and_named(setup):
    path, xs, folder = setup
    bad = xs[4].copy()
    bad[1, 2, 3, 3] = np.nan
    np.savez(folder / "004.npz", x=bad)
    result = CliRunner().invoke(
        cli, ["recalibrate", str(path), "--data", str(folder), "--no-check", "--workers", "2"]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "input 'x' of batch 4" in lines[0] and "004.npz) holds NaN or infinity" in lines[0]
    assert lines[0].startswith("error: worker 0: ") and "Note: give finite data" in lines[0]
    with pytest.raises(normfuse.InputError, match=r"batch 4 .* holds NaN"):
        normfuse.recalibrate(str(path), folder, mode="batch", progress=False)


def test_a_failing_worker_is_one_line_and_bad_data_user_errors(setup, tmp_path, rng):
    path, _, folder = setup
    np.savez(folder / "005.npz", x=normal(rng, (4, 2, 7, 7)))  # two channels, not three
    args = ["recalibrate", str(path), "--data", str(folder), "--no-check"]
    result = CliRunner().invoke(cli, [*args, "--workers", "2", "--mode", "batch"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert "worker 1: input 'x' of batch 5" in result.output
    assert "has the shape 4x2x7x7, the model takes ?x3x7x7" in result.output
    for data, message in (
        (tmp_path / "none", "no such file, folder or pattern"),
        (tmp_path / "*.npz", "matches no file"),
    ):
        result = CliRunner().invoke(cli, ["recalibrate", str(path), "--data", str(data)])
        assert result.exit_code == 2 and message in result.output, result.output
    pickled = tmp_path / "obj"
    pickled.mkdir()
    np.save(pickled / "0.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    result = CliRunner().invoke(cli, ["recalibrate", str(path), "--data", str(pickled)])
    assert result.exit_code == 2 and "holds Python objects" in result.output
    result = CliRunner().invoke(cli, [*args, "--workers", "0"])
    assert result.exit_code == 2 and "--workers 0" in result.output


def test_two_workers_equal_one_in_float64(tmp_path, rng):
    """A float64 model (the statistics are not rounded into float32): the merge across workers
    equals one process's to float64 rounding, on data with a large mean (where a naive sum of
    squares would cancel)."""
    c = 5
    f64 = np.float64
    inits = [
        tensor("w1", normal(rng, (c, c), f64)),
        tensor("w2", normal(rng, (c, c), f64) * 0.5),
        *bn_params(rng, c, "bn0", f64),
        *bn_params(rng, c, "bn1", f64),
        *bn_params(rng, c, "bn2", f64),
    ]
    nodes = [
        bn_node("x", "b0", "bn0"),
        helper.make_node("MatMul", ["b0", "w1"], ["m1"]),
        bn_node("m1", "b1", "bn1"),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"]),
        bn_node("m2", "b2", "bn2"),
        helper.make_node("Add", ["b2", "r1"], ["y"]),
    ]
    model = make_model(
        nodes, [("x", TP.DOUBLE, ["N", c])], [("y", TP.DOUBLE, ["N", c])], inits, ir_version=9
    )
    path = tmp_path / "f64.onnx"
    onnx.save(model, path)
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(9):
        np.save(folder / f"{i}.npy", rng.normal(100.0, 0.5, (5 + i, c)))
    worst = 0.0
    for mode in ("sequential", "batch"):
        one, _ = normfuse.recalibrate(str(path), folder, mode=mode, progress=False)
        two, report = normfuse.recalibrate(str(path), folder, mode=mode, workers=2)
        assert "2 worker processes" in report.notes[0]
        worst = max(worst, _worst(_stats(two), _stats(one)))
    print(f"float64, --workers 2 vs --workers 1: max relative difference {worst:.1e}")
    assert worst <= 1e-12


def test_statistics_given_through_identity_are_recalibrated_level_by_level(rng):
    """A fresh legacy export de-duplicates a new BN's statistics: running_var is
    Identity(weight) (ones), running_mean Identity(bias). The new statistics become the BN's
    own initializers; the next level's model left them out ("not a graph input, initializer,
    or output"), so recalibrating a never-calibrated model failed."""
    plain = _model(rng)
    model = onnx.ModelProto()
    model.CopyFrom(plain)
    for bn in ("bn1", "bn2"):  # like torch's de-duplication: fed by Identity of other tensors
        node = next(n for n in model.graph.node if n.name == bn)
        for idx, src in ((3, f"{bn}_bias"), (4, f"{bn}_scale")):
            alias = f"{bn}_alias{idx}"
            model.graph.node.insert(0, helper.make_node("Identity", [src], [alias]))
            node.input[idx] = alias
    xs = _batches(rng)
    new, report = normfuse.recalibrate(model, [{"x": x} for x in xs], progress=False)
    assert [e.status for e in report.entries] == ["applied"] * 4
    ref, _ = normfuse.recalibrate(plain, [{"x": x} for x in xs], progress=False)
    # the old statistics are no input to the new ones: the same as without the aliases
    got = {t.name: onnx.numpy_helper.to_array(t) for t in new.graph.initializer}
    want = {t.name: onnx.numpy_helper.to_array(t) for t in ref.graph.initializer}
    for bn in ("bn0", "bn1", "bn2", "bn3"):
        a = next(n for n in new.graph.node if n.name == bn)
        b = next(n for n in ref.graph.node if n.name == bn)
        for i in (3, 4):
            np.testing.assert_array_equal(got[a.input[i]], want[b.input[i]])
