"""Regression tests for issue 15 (what a new user hits), defects 1, 2a, 3, 4, 6, 7 and 8.

Each test states the behaviour the issue asks for. Tests of defects that today's code still has
are ``xfail(strict=True)``: the suite stays green now, and a fix turns them into failures
("XPASS(strict)") until the marker is removed. Only the public API (``normfuse.*``) and the CLI
are used.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import normfuse
from normfuse.cli import cli
from tests.conftest import bn_node, bn_params, make_model, normal, run, tensor

F = TP.FLOAT
MODELS = Path(__file__).resolve().parent.parent / "models"
RESNET = MODELS / "resnet_small.onnx"  # input x: 1x3x32x32, output 'linear'
NORM_BLOCK = MODELS / "norm_block.onnx"  # decomposed LN/RMSNorm/GN, an InstanceNormalization


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{text}"
    assert lines[0].startswith("error:") and "Traceback" not in text, text
    return lines[0]


def _conv_bn_model(rng, channels: int = 16, layers: int = 2) -> onnx.ModelProto:
    inits, nodes, prev = [], [], "x"
    for i in range(layers):
        inits += [
            tensor(f"W{i}", normal(rng, [channels, channels, 3, 3]) * 0.1),
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


# --- 1. API with external data --------------------------------------------------------------


@pytest.fixture
def external(tmp_path, rng, monkeypatch):
    """tmp/dir/model.onnx with its weights in model.onnx.data; the cwd is tmp (not dir)."""
    model = _conv_bn_model(rng)
    (tmp_path / "dir").mkdir()
    (tmp_path / "other").mkdir()
    onnx.save(
        onnx.ModelProto.FromString(model.SerializeToString()),
        tmp_path / "dir" / "model.onnx",
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    monkeypatch.chdir(tmp_path)
    return model


def _same_outputs(model: onnx.ModelProto, path: Path, rng) -> None:
    feeds = {"x": normal(rng, [1, 16, 5, 5])}
    ref, got = run(model, feeds)[0], run(onnx.load(str(path)), feeds)[0]
    assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max()


def test_loaded_external_data_model_folds_unchecked_and_saves_elsewhere(external, tmp_path, rng):
    m = normfuse.load("dir/model.onnx")
    folded, report = normfuse.fold(m, check=False)
    assert len(report.applied) == 2
    out = normfuse.save(folded, tmp_path / "other" / "out.onnx", force=True)
    _same_outputs(external, Path(out), rng)


def test_loaded_external_data_model_folds_with_the_default_check(external, tmp_path, rng):
    m = normfuse.load("dir/model.onnx")
    folded, report = normfuse.fold(m)
    assert report.parity is not None and report.parity.passed
    out = normfuse.save(folded, tmp_path / "other" / "out.onnx", force=True)
    _same_outputs(external, Path(out), rng)


# --- 2a. checks that refuse exact fp16 folds ------------------------------------------------


def _conv3(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """3x3 convolution with padding 1, float64 (calibrates the BN statistics)."""
    _, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.stack([xp[:, :, i : i + h, j : j + wd] for i in range(3) for j in range(3)], 2)
    return np.einsum("nckhw,ock->nohw", cols, w.reshape(w.shape[0], c, 9))


def deep_fp16(seed: int = 2, blocks: int = 16, c: int = 16, hw: int = 8, casts: bool = False):
    """A ResNet-like fp16 net: stem, ``blocks`` residual blocks of two conv-BN, a conv-BN head
    (34 conv-BN layers). BN statistics are those of the conv outputs on random data, perturbed
    (so the net stays in range, like a trained one); gamma has negative entries, and is small
    (x0.3) on each residual branch's last BN, as in trained ResNets. ``casts``:
    float32 input and output with Casts, as the usual float16 converter writes them."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    xs = rng.standard_normal((8, c, hw, hw))

    def conv_bn(x, xv, name, relu, gamma_scale=1.0):
        w = (rng.standard_normal((c, c, 3, 3)) * np.sqrt(2.0 / (c * 9))).astype(np.float16)
        y = _conv3(xv, w.astype(np.float64))
        mean, var = y.mean(axis=(0, 2, 3)), y.var(axis=(0, 2, 3))
        gamma = rng.uniform(0.5, 1.5, c) * np.where(rng.random(c) < 0.3, -1, 1)
        gamma = gamma * gamma_scale
        beta = rng.normal(0, 0.5, c)
        mean = mean + rng.normal(0, 0.1, c) * np.sqrt(var)
        var = var * rng.uniform(0.8, 1.25, c)
        inits.append(numpy_helper.from_array(w, f"{name}_W"))
        for part, v in zip(("scale", "bias", "mean", "var"), (gamma, beta, mean, var), strict=True):
            inits.append(numpy_helper.from_array(v.astype(np.float16), f"{name}_bn_{part}"))
        nodes.append(
            helper.make_node("Conv", [x, f"{name}_W"], [f"{name}_c"], name=name, pads=[1, 1, 1, 1])
        )
        nodes.append(bn_node(f"{name}_c", f"{name}_b", f"{name}_bn"))
        shape = (1, c, 1, 1)
        yv = (y - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + 1e-5) * gamma.reshape(
            shape
        ) + beta.reshape(shape)
        if not relu:
            return f"{name}_b", yv
        nodes.append(helper.make_node("Relu", [f"{name}_b"], [f"{name}_r"]))
        return f"{name}_r", np.maximum(yv, 0)

    if casts:
        nodes.append(helper.make_node("Cast", ["x32"], ["x"], to=TP.FLOAT16))
    x, xv = conv_bn("x", xs, "stem", True)
    for i in range(blocks):
        a, av = conv_bn(x, xv, f"b{i}a", True)
        b, bv = conv_bn(a, av, f"b{i}b", False, gamma_scale=0.3)
        nodes.append(helper.make_node("Add", [x, b], [f"b{i}_sum"]))
        nodes.append(helper.make_node("Relu", [f"b{i}_sum"], [f"b{i}_out"]))
        x, xv = f"b{i}_out", np.maximum(xv + bv, 0)
    head, _ = conv_bn(x, xv, "head", False)
    shape = [1, c, hw, hw]
    if casts:
        nodes.append(helper.make_node("Cast", [head], ["y"], to=TP.FLOAT))
        return make_model(nodes, [("x32", F, shape)], [("y", F, shape)], inits)
    nodes.append(helper.make_node("Identity", [head], ["y"]))
    return make_model(nodes, [("x", TP.FLOAT16, shape)], [("y", TP.FLOAT16, shape)], inits)


def test_deep_fp16_net_folds_with_the_default_check():
    """fp16 in and out: passes today on CPU (honest fold: max rel 9.4e-4 < rtol 1e-2); guards
    the fix of the fp16 rule against refusing it."""
    model = deep_fp16()
    _, report = normfuse.fold(model, provider="cpu")
    assert len(report.applied) == 34 and not report.skipped
    assert report.parity is not None and report.parity.passed


def test_deep_fp16_net_with_cast_io_folds_with_the_default_check():
    model = deep_fp16(casts=True)
    _, report = normfuse.fold(model, provider="cpu")
    assert len(report.applied) == 34 and not report.skipped
    assert report.parity is not None and report.parity.passed


def test_a_wrong_fp16_fold_fails_the_check():
    model = deep_fp16()
    folded, _ = normfuse.fold(model, check=False)
    wrong = onnx.ModelProto.FromString(
        folded.SerializeToString() if isinstance(folded, onnx.ModelProto) else folded
    )
    x = np.random.default_rng(0).standard_normal((1, 16, 8, 8)).astype(np.float16)
    ref = run(model, {"x": x})[0].astype(np.float32)
    channel = int(np.abs(ref).reshape(16, -1).max(axis=1).argmax())  # the output's largest
    last_conv = [n for n in wrong.graph.node if n.op_type == "Conv"][-1]
    w = next(t for t in wrong.graph.initializer if t.name == last_conv.input[1])
    array = numpy_helper.to_array(w).copy()
    array[channel] = (array[channel].astype(np.float32) * 1.01).astype(np.float16)
    w.CopyFrom(numpy_helper.from_array(array, w.name))
    assert normfuse.check(model, folded, provider="cpu").passed  # the honest fold passes
    result = normfuse.check(model, wrong, provider="cpu")
    assert result.passed is False, f"a 1% wrong fold passed (max rel {result.max_rel:.3g})"


# --- 3. user-data mistakes reported as internal errors ----------------------------------------


def _user_error(result) -> str:
    assert result.exit_code == 2, result.output
    line = _one_error_line(result.stderr)
    assert "unexpected" not in line and "report it" not in line and "Note:" in line, line
    return line


def test_recalibrate_with_data_of_the_wrong_shape_is_a_user_error(tmp_path):
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.zeros((1, 3, 7, 7), np.float32))
    _user_error(invoke("recalibrate", RESNET, "--data", data, "-o", tmp_path / "r.onnx"))
    assert not (tmp_path / "r.onnx").exists()


def test_bench_of_models_with_different_inputs_is_a_user_error(padded):
    _user_error(invoke("bench", RESNET, padded, "--reps", "1", "--warmup", "0"))


# --- 4. --strict writes the output and exits 1 ----------------------------------------------


def test_strict_with_a_skipped_candidate_writes_nothing(padded, tmp_path):
    out = tmp_path / "o.onnx"
    result = invoke("fold", padded, "-o", out, "--strict")
    assert result.exit_code == 1, result.output
    assert not out.exists(), "--strict failed the run, yet the output was written"


def test_api_strict_raises_and_returns_nothing(padded):
    """The behaviour the CLI must match (passes today)."""
    with pytest.raises(normfuse.StrictError):
        normfuse.fold(str(padded), strict=True, check=False)


# --- 6. commands that change nothing -----------------------------------------------------------


def test_swap_where_matching_nothing_is_a_usage_error(tmp_path):
    out = tmp_path / "s.onnx"
    result = invoke("swap", RESNET, "--to", "frozen", "--where", "nomatch", "-o", out)
    assert result.exit_code == 2, result.output
    assert "nomatch" in _one_error_line(result.stderr)
    assert not out.exists()


def test_insert_after_an_unknown_op_type_is_a_usage_error(tmp_path):
    out = tmp_path / "i.onnx"
    result = invoke("insert", RESNET, "--after", "Foo", "-o", out)
    assert result.exit_code == 2, result.output
    assert "Foo" in _one_error_line(result.stderr)
    assert not out.exists()


def test_raise_without_target_opset_says_nothing_to_do(tmp_path):
    result = invoke("raise", NORM_BLOCK, "-o", tmp_path / "r.onnx")
    assert "nothing to do" in result.output.lower(), result.output
    assert "--target-opset" in result.output


# --- 7. messages that mislead ------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory) -> dict[str, Path]:
    """A torch.export archive and a state dict of a Conv-BN module (made in a subprocess)."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("needs torch")
    folder = tmp_path_factory.mktemp("torch")
    script = textwrap.dedent(
        """
        import sys, torch
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
            def forward(self, x):
                return self.bn(self.conv(x))
        m = M().eval()
        torch.export.save(torch.export.export(m, (torch.randn(1, 3, 8, 8),)), sys.argv[1])
        torch.save(m.state_dict(), sys.argv[2])
        """
    )
    pt2, pt = folder / "m.pt2", folder / "m.pt"
    subprocess.run([sys.executable, "-c", script, pt2, pt], check=True, capture_output=True)
    return {"pt2": pt2, "pt": pt}


@pytest.mark.parametrize("case", ["inspect-pt2", "check-pt2", "inspect-pt"])
def test_torch_files_are_accepted_or_explained(torch_files, case):
    command, kind = case.split("-")
    path = torch_files[kind]
    result = invoke(command, path, *([path] if command == "check" else []))
    if kind == "pt2" and result.exit_code == 0:
        return  # accepted, as fold accepts it
    assert result.exit_code == 2, result.output
    line = _one_error_line(result.stderr)
    assert "Note:" in line, line


@pytest.mark.parametrize("other", ["other_output", "other_input"])
def test_check_of_unrelated_models_does_not_blame_a_rewrite(tmp_path, rng, padded, other):
    def matmul(name: str, out: str) -> Path:
        w = numpy_helper.from_array(normal(rng, [4, 8]), "W")
        node = helper.make_node("MatMul", ["x", "W"], [out])
        path = tmp_path / name
        onnx.save(make_model([node], [("x", F, [2, 4])], [(out, F, [2, 8])], [w]), path)
        return path

    a = matmul("a.onnx", "y")
    b = matmul("b.onnx", "z") if other == "other_output" else padded
    result = invoke("check", a, b)
    assert result.exit_code == 2, result.output
    assert "rewritten" not in _one_error_line(result.stderr)


def test_shape_of_an_unknown_input_is_refused():
    result = invoke("check", RESNET, RESNET, "--shape", "nope=1x3x32x32")
    assert result.exit_code == 2, result.output
    line = _one_error_line(result.stderr)
    assert "nope" in line and "unknown input" in line, line


def test_swap_to_lists_only_kinds_onnx_accepts(tmp_path):
    result = invoke("swap", RESNET, "--to", "bogus", "-o", tmp_path / "s.onnx")
    assert result.exit_code == 2, result.output
    line = _one_error_line(result.stderr)
    assert "groupnorm" in line
    assert not re.search(r"\b(batchnorm|syncbn)\b", line), line


def test_python_save_error_names_the_python_argument(tmp_path):
    out = tmp_path / "o.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(normfuse.OutputExistsError) as info:
        normfuse.save(normfuse.load(str(RESNET)), out)
    assert "force=True" in str(info.value) and "--force" not in str(info.value)
    assert out.read_bytes() == b"keep me"


def test_bench_help_mentions_no_parity_check():
    result = invoke("bench", "--help")
    assert result.exit_code == 0
    assert "parity" not in result.output.lower(), result.output


def test_check_help_states_the_default_tolerances():
    """By default the tolerance is measured on the models; the figures are the fall-back."""
    result = invoke("check", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    tolerances = text[text.index("--atol") : text.index("--bisect")]
    assert "measured on the models" in tolerances, tolerances
    assert "where none can be measured: float 1e-06" in tolerances, tolerances
    assert "where none can be measured: float 5e-05" in tolerances, tolerances


def test_inspect_applies_nothing_and_does_not_call_raise_candidates_foldable():
    result = invoke("inspect", NORM_BLOCK, "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report.get("applied", 0) == 0, report.get("applied")
    decomposed = [e for e in report["entries"] if "decomposed" in str(e.get("op_type"))]
    assert decomposed, report["entries"]
    assert all(e["status"] != "foldable" for e in decomposed), [e["status"] for e in decomposed]


def test_a_suggested_fix_folds_the_entry(tmp_path):
    result = invoke("inspect", NORM_BLOCK, "--json", "-")
    assert result.exit_code == 0, result.output
    suggested = {
        e["node"]
        for e in json.loads(result.stdout)["entries"]
        if "--norm-affine" in str(e.get("fix")) + str(e.get("reason"))
    }
    folded = invoke(
        "fold", NORM_BLOCK, "--norm-affine", "--no-check", "-o", tmp_path / "f.onnx", "--json", "-"
    )
    assert folded.exit_code == 0, folded.output
    still_skipped = {
        e["node"] for e in json.loads(folded.stdout)["entries"] if e["status"] == "skipped"
    }
    assert not suggested & still_skipped, suggested & still_skipped


@pytest.mark.parametrize(
    "args",
    [["raise", "--target-opset", "23"], ["fold", "--norm-affine"]],
    ids=["raise", "norm-affine"],
)
def test_summary_counts_the_ops_the_command_changed(tmp_path, args):
    result = invoke(args[0], NORM_BLOCK, *args[1:], "--no-check", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0, result.output
    assert "BatchNormalization 0 -> 0" not in result.output, result.output


# --- 8. --debug after the subcommand, python -m normfuse --------------------------------------


def test_debug_is_accepted_after_the_subcommand(tmp_path):
    out = tmp_path / "o.onnx"
    result = invoke("fold", "--debug", RESNET, "-o", out, "--no-check")
    assert result.exit_code == 0, result.output
    assert out.is_file()


@pytest.mark.xfail(
    importlib.util.find_spec("normfuse.__main__") is None,
    strict=True,
    reason="issue 15 defect 8: 'python -m normfuse' has no normfuse/__main__.py (exit 1)",
)
def test_python_dash_m_normfuse_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "normfuse", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr
    assert "fold" in proc.stdout and "Usage" in proc.stdout


def test_the_summary_names_changed_ops_in_the_same_order_on_every_run():
    """Op types whose counts change equally were listed in a set's order, which Python's hash
    seed changes from run to run: two runs of one fold printed different summary lines."""
    code = (
        "from normfuse.core.report import ModelStats as S;"
        "b = S(ops={'Conv': 4, 'Mul': 1, 'Add': 1, 'Transpose': 3, 'Reshape': 1});"
        "a = S(ops={'Conv': 4, 'Transpose': 2});"
        "print(b.changed_ops(a))"
    )
    lines = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in range(8)
    }
    assert lines == {"[('Add', 1, 0), ('Mul', 1, 0), ('Reshape', 1, 0)]\n"}
