"""The normfuse command line: outputs, exit codes, one-line errors, JSON, inspect, check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto as TP
from onnx import helper

from normfuse.cli import cli
from tests.conftest import bn_node, bn_params, make_model, normal, op_types, tensor

MODELS = Path(__file__).resolve().parent.parent / "models"
F = TP.FLOAT


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def padded(tmp_path, rng) -> Path:
    """BN before a padded conv: cannot fold, reported as skipped."""
    inits = [*bn_params(rng, 4), tensor("W", normal(rng, [4, 4, 3, 3]))]
    nodes = [
        bn_node("x", "b"),
        helper.make_node("Conv", ["b", "W"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    path = tmp_path / "padded.onnx"
    onnx.save(make_model(nodes, [("x", F, [1, 4, 5, 5])], [("y", F, [1, 4, 5, 5])], inits), path)
    return path


def test_fold_default_output_and_parity(resnet):
    result = invoke("fold", resnet)
    assert result.exit_code == 0, result.output
    out = resnet.with_name("resnet_small.folded.onnx")
    assert "PASSED" in result.output and f"wrote {out}" in result.output.replace("\n", "")
    folded = onnx.load(out)
    assert "BatchNormalization" not in op_types(folded)
    onnx.checker.check_model(folded, full_check=True)


def test_existing_output_needs_force(resnet, tmp_path):
    out = tmp_path / "o.onnx"
    out.write_bytes(b"keep me")
    result = invoke("fold", resnet, "-o", out)
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and "--force" in result.output
    assert out.read_bytes() == b"keep me"
    assert invoke("fold", resnet, "-o", out, "--force").exit_code == 0
    assert onnx.load(out).graph.node


def test_output_equal_to_input_needs_in_place(resnet):
    original = resnet.read_bytes()
    result = invoke("fold", resnet, "-o", resnet)
    assert result.exit_code == 2 and "--in-place" in result.output
    assert resnet.read_bytes() == original
    result = invoke("fold", resnet, "--in-place")
    assert result.exit_code == 0
    assert "BatchNormalization" not in op_types(onnx.load(resnet))


def test_json_report_to_stdout(resnet, tmp_path):
    result = CliRunner().invoke(
        cli, ["fold", str(resnet), "-o", str(tmp_path / "o.onnx"), "--json", "-"]
    )
    assert result.exit_code == 0
    start = result.stdout.index("{")
    data = json.loads(result.stdout[start:])
    assert data["applied"] == 9 and data["skipped"] == 0
    assert data["before"]["batchnorm_nodes"] == 9 and data["after"]["batchnorm_nodes"] == 0
    assert data["parity"]["passed"] and data["parity"]["outputs"][0]["max_rel"] < 1e-5


def test_json_report_to_file_lists_skips_with_reasons(padded, tmp_path):
    report = tmp_path / "r.json"
    result = invoke("fold", padded, "--json", report)
    assert result.exit_code == 0
    data = json.loads(report.read_text())
    (entry,) = data["entries"]
    assert entry["status"] == "skipped" and "pads its input with zeros" in entry["reason"]


def test_strict_exits_1_with_skips(padded):
    result = invoke("fold", padded, "--strict")
    assert result.exit_code == 1
    assert "error: 1 candidate(s) not folded" in result.output


def test_no_check_skips_parity(resnet, tmp_path):
    result = invoke("fold", resnet, "-o", tmp_path / "o.onnx", "--no-check")
    assert result.exit_code == 0 and "PASSED" not in result.output


@pytest.mark.parametrize(
    "setup,expected",
    [
        (lambda d: d / "missing.onnx", "no such file"),
        (lambda d: d, "directory"),
        (lambda d: _write(d / "empty.onnx", b""), "no graph"),
        (lambda d: _write(d / "junk.onnx", b"\xff\x00junk" * 50), "not a readable ONNX model"),
    ],
    ids=["missing", "directory", "empty", "junk"],
)
def test_bad_input_is_one_line_exit_2(tmp_path, setup, expected):
    path = setup(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke("fold", path)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_output_in_missing_folder(resnet, tmp_path):
    result = invoke("fold", resnet, "-o", tmp_path / "no" / "o.onnx")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_bad_shape_option(resnet, tmp_path):
    result = invoke("fold", resnet, "-o", tmp_path / "o.onnx", "--shape", "nonsense")
    assert result.exit_code == 2 and "name=1x3x224x224" in result.output


def test_inspect_lists_candidates(padded, resnet):
    result = invoke("inspect", resnet)
    assert result.exit_code == 0 and result.output.count("foldable") >= 9
    result = invoke("inspect", padded)
    assert "skipped" in result.output and "borders" in result.output.replace("\n", " ").replace(
        "│", ""
    )


def test_check_command(resnet, tmp_path):
    out = tmp_path / "o.onnx"
    invoke("fold", resnet, "-o", out, "--no-check")
    result = invoke("check", resnet, out)
    assert result.exit_code == 0 and "PASSED |" in result.output
    # a genuinely different model fails with exit code 1
    other = onnx.load(out)
    w = next(i for i in other.graph.initializer if i.name == "head.weight")
    arr = onnx.numpy_helper.to_array(w).copy()
    arr *= 1.5
    w.CopyFrom(onnx.numpy_helper.from_array(arr, "head.weight"))
    onnx.save(other, tmp_path / "bad.onnx")
    result = invoke("check", resnet, tmp_path / "bad.onnx")
    assert (
        result.exit_code == 1
        and "FAILED |" in result.output
        and "would pass with rtol>=" in result.output
    )


def test_real_process_no_traceback(tmp_path):
    """The installed entry point: exit code 2 and one line, without a Python traceback."""
    bad = tmp_path / "x.onnx"
    bad.write_text("hello")
    proc = subprocess.run(
        [sys.executable, "-m", "normfuse.cli", "fold", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("error:")


def test_parity_failure_keeps_output_unwritten(tmp_path, rng, monkeypatch):
    """If the folded model ever disagreed, nothing is written and the exit code is 1."""
    from normfuse.core import algebra

    inits = [tensor("W", normal(rng, [4, 3, 3, 3])), *bn_params(rng, 4)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y")]
    src = tmp_path / "m.onnx"
    onnx.save(make_model(nodes, [("x", F, [1, 3, 6, 6])], [("y", F, [1, 4, 4, 4])], inits), src)
    real = algebra.absorb_after

    def broken(lin, affine, **kwargs):
        folded = real(lin, affine, **kwargs)
        return algebra.Folded(
            folded.weight * np.float32(1.1), folded.bias, folded.bias64, folded.weight_peak
        )

    monkeypatch.setattr(algebra, "absorb_after", broken)
    result = invoke("fold", src, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 1
    assert "FAILED" in result.output and "error: the folded model differs" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_bench_one_model_folded_and_json(resnet, tmp_path):
    out = tmp_path / "lat.json"
    result = invoke(
        "bench",
        resnet,
        "--fold",
        "--reps",
        "3",
        "--warmup",
        "1",
        "--ort-opt",
        "disable",
        "--json",
        out,
    )
    assert result.exit_code == 0 and "(folded)" in result.output
    data = json.loads(out.read_text())["results"]
    assert [r["opt_level"] for r in data] == ["disable", "disable"]
    assert all(r["median_ms"] > 0 and r["reps"] == 3 for r in data)
    assert invoke("bench", resnet, resnet, "--fold").exit_code == 2
