"""normfuse check: parity of two models, per-output tolerances, user inputs, first divergence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto as TP
from onnx import helper

import normfuse
from normfuse.cli import cli
from tests.conftest import make_model, normal, tensor

MODELS = Path(__file__).resolve().parent.parent / "models"
F = TP.FLOAT


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _perturb_conv(src: Path, dst: Path, which: int = 2, rel: float = 1e-3) -> str:
    """Scale one conv weight by (1 + rel); return that conv's output name."""
    model = onnx.load(src)
    conv = [n for n in model.graph.node if n.op_type == "Conv"][which]
    init = next(i for i in model.graph.initializer if i.name == conv.input[1])
    arr = onnx.numpy_helper.to_array(init) * np.float32(1 + rel)
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(model, dst)
    return conv.output[0]


def test_identical_models_pass(resnet):
    result = invoke("check", resnet, resnet)
    assert result.exit_code == 0 and "PASSED | linear | max_abs=0 max_rel=0" in result.output


def test_perturbed_conv_fails_and_bisect_names_it(resnet, tmp_path):
    bad = tmp_path / "bad.onnx"
    conv_out = _perturb_conv(resnet, bad)
    result = invoke("check", resnet, bad)
    assert result.exit_code == 1 and "FAILED | linear" in result.output
    result = invoke("check", resnet, bad, "--bisect", "--json", tmp_path / "r.json")
    assert result.exit_code == 1
    assert f"first divergence: tensor '{conv_out}' from Conv" in result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["divergence"]["tensor"] == conv_out and data["divergence"]["op_type"] == "Conv"


def test_bisect_aligns_folded_models_by_name(resnet, tmp_path):
    """A folded model keeps BN output names, so bisect compares folded against original."""
    folded = tmp_path / "f.onnx"
    assert invoke("fold", resnet, "-o", folded, "--no-check").exit_code == 0
    result = normfuse.check(resnet, folded, provider="cpu", bisect=True)
    assert result.passed and result.divergence is None
    bad = tmp_path / "fbad.onnx"
    conv_out = _perturb_conv(folded, bad, which=4, rel=1e-2)
    result = normfuse.check(resnet, bad, provider="cpu", bisect=True)
    assert not result.passed and result.divergence is not None
    assert result.divergence.tensor == conv_out and result.divergence.compared > 5


def _two_output_model(rng, shape=("n", 4)):
    inits = [tensor("w", normal(rng, [4])), tensor("z", np.zeros(4, np.float32))]
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["a"], name="mul"),
        helper.make_node("Mul", ["x", "z"], ["zeros"], name="zero"),
    ]
    return make_model(
        nodes, [("x", F, list(shape))], [("a", F, list(shape)), ("zeros", F, list(shape))], inits
    )


def test_several_outputs_per_output_tolerance_and_zero_reference(rng, tmp_path):
    a = _two_output_model(rng)
    b = onnx.ModelProto()
    b.CopyFrom(a)
    w = onnx.numpy_helper.to_array(b.graph.initializer[0]) * np.float32(1.0005)
    b.graph.initializer[0].CopyFrom(tensor("w", w))
    onnx.save(a, tmp_path / "a.onnx")
    onnx.save(b, tmp_path / "b.onnx")
    result = invoke(
        "check", tmp_path / "a.onnx", tmp_path / "b.onnx", "--json", tmp_path / "r.json"
    )
    assert result.exit_code == 1
    data = json.loads((tmp_path / "r.json").read_text())
    by_name = {o["name"]: o for o in data["outputs"]}
    assert not by_name["a"]["passed"] and by_name["zeros"]["passed"]
    assert by_name["zeros"]["max_rel"] == 0.0  # all-zero reference: finite relative error
    assert any("batch dimension set to 1" in n for n in data["notes"])
    loose = invoke("check", tmp_path / "a.onnx", tmp_path / "b.onnx", "--rtol", "a=1e-3")
    assert loose.exit_code == 0
    unknown = invoke("check", tmp_path / "a.onnx", tmp_path / "b.onnx", "--rtol", "nope=1e-3")
    assert unknown.exit_code == 2 and "unknown output" in unknown.output


def test_dynamic_shapes(rng, tmp_path):
    model = _two_output_model(rng, shape=("n", "k"))
    onnx.save(model, tmp_path / "m.onnx")
    result = invoke("check", tmp_path / "m.onnx", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "--shape x=" in result.output
    result = invoke("check", tmp_path / "m.onnx", tmp_path / "m.onnx", "--shape", "x=3x4")
    assert result.exit_code == 0
    # a shape the model cannot run on: one clear line, no onnxruntime log spew
    result = CliRunner().invoke(
        cli, ["check", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--shape", "x=3x5"]
    )
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: onnxruntime cannot run the reference model")
    assert len(result.output.strip().splitlines()) == 1


def test_npz_inputs_file_and_folder(rng, tmp_path):
    model = _two_output_model(rng)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "one.npz", x=normal(rng, [2, 4]))
    assert (
        invoke(
            "check", tmp_path / "m.onnx", tmp_path / "m.onnx", "--inputs", tmp_path / "one.npz"
        ).exit_code
        == 0
    )
    batches = tmp_path / "batches"
    batches.mkdir()
    for i in range(3):
        np.savez(batches / f"{i}.npz", x=normal(rng, [i + 1, 4]))
    result = invoke("check", tmp_path / "m.onnx", tmp_path / "m.onnx", "--inputs", batches)
    assert result.exit_code == 0 and "3 batch(es)" in result.output
    np.savez(tmp_path / "wrong.npz", y=normal(rng, [2, 4]))
    result = invoke(
        "check", tmp_path / "m.onnx", tmp_path / "m.onnx", "--inputs", tmp_path / "wrong.npz"
    )
    assert result.exit_code == 2 and "missing x" in result.output and "unknown y" in result.output
    np.savez(tmp_path / "f64.npz", x=np.ones((2, 4)))
    result = invoke(
        "check", tmp_path / "m.onnx", tmp_path / "m.onnx", "--inputs", tmp_path / "f64.npz"
    )
    assert result.exit_code == 2 and "float64" in result.output


def test_integer_and_boolean_inputs(rng, tmp_path):
    table = tensor("table", normal(rng, [8, 3]))
    nodes = [
        helper.make_node("Gather", ["table", "idx"], ["g"]),
        helper.make_node("Where", ["mask", "g", "zero"], ["y"]),
    ]
    model = make_model(
        nodes,
        [("idx", TP.INT64, [5]), ("mask", TP.BOOL, [5, 3])],
        [("y", F, [5, 3])],
        [table, tensor("zero", np.zeros(1, np.float32))],
    )
    onnx.save(model, tmp_path / "m.onnx")
    result = normfuse.check(tmp_path / "m.onnx", tmp_path / "m.onnx", provider="cpu", runs=3)
    assert result.passed and result.runs == 3


def test_models_with_different_inputs_are_refused(rng, tmp_path):
    a = _two_output_model(rng)
    b = _two_output_model(rng)
    b.graph.input[0].name = "other"
    for n in b.graph.node:
        n.input[0] = "other"
    onnx.save(a, tmp_path / "a.onnx")
    onnx.save(b, tmp_path / "b.onnx")
    result = invoke("check", tmp_path / "a.onnx", tmp_path / "b.onnx")
    assert result.exit_code == 2 and "different inputs" in result.output


def test_cross_check_without_cuda_is_a_clear_error(resnet):
    from normfuse.runtime import sessions

    if sessions.select_provider("auto")[1] == "CUDA":
        result = invoke("check", resnet, resnet, "--cross-check")
        assert result.exit_code == 0 and "CPU vs CUDA" in result.output
    else:
        result = invoke("check", resnet, resnet, "--cross-check")
        assert result.exit_code == 2 and "CUDA does not load here" in result.output


def test_tolerance_parsing():
    from normfuse.runtime.inputs import parse_tolerances

    assert parse_tolerances(["1e-4"], "--atol") == 1e-4
    assert parse_tolerances(["a=1e-3", "2e-5"], "--rtol") == {"a": 1e-3, "*": 2e-5}
    with pytest.raises(normfuse.InputError, match="name=1e-4"):
        parse_tolerances(["a=lots"], "--atol")
