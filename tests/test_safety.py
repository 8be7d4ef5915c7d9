"""Files are never lost or half-written: external data, in-place folds, processes killed mid-save."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto as TP
from onnx import helper

from normfuse.cli import cli
from tests.conftest import bn_node, bn_params, make_model, normal, run, tensor

F = TP.FLOAT


def _model(rng, channels: int = 64, layers: int = 2) -> onnx.ModelProto:
    inits, nodes, prev = [], [], "x"
    for i in range(layers):
        inits += [
            tensor(f"W{i}", normal(rng, [channels, channels, 3, 3]) * 0.05),
            *bn_params(rng, channels, f"bn{i}"),
        ]
        out = "y" if i == layers - 1 else f"r{i}"
        nodes += [
            helper.make_node(
                "Conv", [prev, f"W{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]
            ),
            bn_node(f"c{i}", f"b{i}", f"bn{i}"),
            helper.make_node("Relu", [f"b{i}"], [out]),
        ]
        prev = out
    return make_model(
        nodes, [("x", F, [1, channels, 5, 5])], [("y", F, [1, channels, 5, 5])], inits
    )


def _save_external(model: onnx.ModelProto, path: Path, location: str) -> None:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, path, save_as_external_data=True, location=location, size_threshold=1024)


def _data_files(folder: Path) -> list[str]:
    return sorted(
        p.name for p in folder.iterdir() if p.name.endswith(".data") or p.name.endswith(".bin")
    )


def test_refolding_with_force_switches_data_files_and_removes_the_old(rng, tmp_path):
    src = tmp_path / "m.onnx"
    _save_external(_model(rng), src, "weights.bin")
    out = tmp_path / "f.onnx"
    assert CliRunner().invoke(cli, ["fold", str(src), "-o", str(out)]).exit_code == 0
    assert _data_files(tmp_path) == ["f.onnx.data", "weights.bin"]
    assert CliRunner().invoke(cli, ["fold", str(src), "-o", str(out), "--force"]).exit_code == 0
    assert _data_files(tmp_path) == ["f.onnx.1.data", "weights.bin"]  # new name, old one removed
    assert CliRunner().invoke(cli, ["fold", str(src), "-o", str(out), "--force"]).exit_code == 0
    assert _data_files(tmp_path) == ["f.onnx.data", "weights.bin"]
    onnx.checker.check_model(str(out), full_check=True)


def test_the_inputs_data_file_is_never_written(rng, tmp_path):
    """Input a.onnx keeps its tensors in b.onnx.data; folding to b.onnx must not touch it."""
    src = tmp_path / "a.onnx"
    _save_external(_model(rng), src, "b.onnx.data")
    before = hashlib.sha256((tmp_path / "b.onnx.data").read_bytes()).hexdigest()
    result = CliRunner().invoke(cli, ["fold", str(src), "-o", str(tmp_path / "b.onnx")])
    assert result.exit_code == 0, result.output
    assert hashlib.sha256((tmp_path / "b.onnx.data").read_bytes()).hexdigest() == before
    assert _data_files(tmp_path) == ["b.onnx.1.data", "b.onnx.data"]
    feeds = {"x": normal(rng, [1, 64, 5, 5])}
    ref, got = run(onnx.load(src), feeds)[0], run(onnx.load(tmp_path / "b.onnx"), feeds)[0]
    assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max()


def test_in_place_fold_of_an_external_data_model(rng, tmp_path):
    src = tmp_path / "m.onnx"
    model = _model(rng)
    _save_external(model, src, "m.onnx.data")
    result = CliRunner().invoke(cli, ["fold", str(src), "--in-place"])
    assert result.exit_code == 0, result.output
    assert _data_files(tmp_path) == ["m.onnx.1.data"]  # the replaced model's data is removed
    feeds = {"x": normal(rng, [1, 64, 5, 5])}
    ref, got = run(model, feeds)[0], run(onnx.load(src), feeds)[0]
    assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max()


def test_a_users_data_file_of_another_name_is_left_alone(rng, tmp_path):
    src = tmp_path / "m.onnx"
    _save_external(_model(rng), src, "weights.bin")
    assert CliRunner().invoke(cli, ["fold", str(src), "--in-place"]).exit_code == 0
    assert _data_files(tmp_path) == ["m.onnx.data", "weights.bin"]


def _weight_digest(path: Path) -> str:
    model = onnx.load(str(path))  # loads external data too: fails if it is missing or short
    w = next(i for i in model.graph.initializer if i.name == "W0")
    return hashlib.sha256(onnx.numpy_helper.to_array(w).tobytes()).hexdigest()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_at_any_moment_the_output_is_old_or_new_never_mixed(tmp_path):
    """Alternately fold two different models into one output; SIGKILL the CLI while it saves."""
    sources = []
    for i in range(2):
        src = tmp_path / f"src{i}.onnx"
        model = _model(np.random.default_rng(i), channels=512, layers=6)  # ~57 MB
        _save_external(model, src, f"src{i}.bin")
        sources.append(src)
    out = tmp_path / "out.onnx"
    fold = [sys.executable, "-m", "normfuse.cli", "fold", "-o", str(out), "--force", "--no-check"]
    digests = []
    for src in sources:
        subprocess.run([*fold, str(src)], check=True, capture_output=True)
        digests.append(_weight_digest(out))
    assert digests[0] != digests[1]
    kills = caught = 0
    for k in range(12):
        before = {p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")}  # earlier kills'
        proc = subprocess.Popen(
            [*fold, str(sources[k % 2])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:  # wait until the save begins
            if any(p.name.endswith(".tmp") and p.name not in before for p in tmp_path.iterdir()):
                caught += 1
                break
            time.sleep(0.0005)
        time.sleep(0.01 * (k % 6))  # then kill at staggered points of the write
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        assert _weight_digest(out) in digests  # loadable, complete, and one of the two
        onnx.checker.check_model(str(out), full_check=True)
    assert caught >= 8 and kills >= 6, f"caught in the save {caught} times, killed {kills}"
    visible = {p.name for p in tmp_path.iterdir() if not p.name.startswith((".", "src"))}
    assert visible <= {"out.onnx", "out.onnx.data", "out.onnx.1.data"}, visible
