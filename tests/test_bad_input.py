"""Every kind of broken input gets exit 2 and one line, changes nothing, and writes nothing.

Cases fold can still handle (an unknown op, an opset newer than normfuse knows, BN parameters
that disagree in size) fold what they can with ``--no-check`` and report the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto as TP
from onnx import helper

from normfuse.cli import cli
from tests.conftest import bn_node, bn_params, make_model, normal, tensor

F = TP.FLOAT


def _good() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [tensor("W", normal(rng, [4, 3, 3, 3])), *bn_params(rng, 4)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y")]
    return make_model(nodes, [("x", F, [1, 3, 6, 6])], [("y", F, [1, 4, 4, 4])], inits)


def _edit(fn: Callable[[onnx.ModelProto], None]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        model = _good()
        fn(model)
        path.write_bytes(model.SerializeToString())

    return write


def _undefined(m: onnx.ModelProto) -> None:
    m.graph.node[1].input[0] = "undefined"


def _cycle(m: onnx.ModelProto) -> None:
    m.graph.node[0].input[0] = "y"


def _dup_output(m: onnx.ModelProto) -> None:
    m.graph.output.append(m.graph.output[0])


def _twice_produced(m: onnx.ModelProto) -> None:
    m.graph.node.append(helper.make_node("Relu", ["x"], ["c"]))


def _malformed_tensor(m: onnx.ModelProto) -> None:
    m.graph.initializer[0].data_type = 77


def _good_bytes(path: Path) -> None:
    path.write_bytes(_good().SerializeToString())


BROKEN = {
    "empty": (lambda p: p.write_bytes(b""), "no graph"),
    "random bytes": (
        lambda p: p.write_bytes(np.random.default_rng(1).bytes(3000)),
        "not a readable ONNX model",
    ),
    "truncated": (
        lambda p: p.write_bytes(_good().SerializeToString()[:150]),
        "not a readable ONNX model",
    ),
    "text file": (
        lambda p: p.write_text("graph { node { op_type: 'Relu' } }"),
        "not a readable ONNX model",
    ),
    "a TensorProto": (
        lambda p: p.write_bytes(tensor("t", np.ones(3, np.float32)).SerializeToString()),
        "not a readable ONNX model",
    ),
    "undefined tensor": (_edit(_undefined), "is never defined"),
    "cycle": (_edit(_cycle), "is produced later"),
    "duplicate graph output": (_edit(_dup_output), "listed twice"),
    "tensor produced twice": (_edit(_twice_produced), "'c' is redeclared"),
    "malformed tensor": (_edit(_malformed_tensor), "77 is not a valid DataType"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_model_is_one_line_exit_2(tmp_path, case):
    make, expected = BROKEN[case]
    src = tmp_path / "m.onnx"
    make(src)
    before = src.read_bytes()
    for extra in ([], ["--no-check"]):
        result = CliRunner().invoke(cli, ["fold", str(src), "-o", str(tmp_path / "o.onnx"), *extra])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (
            result.output
        )
        assert src.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_debug_shows_the_traceback(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(b"junk" * 10)
    result = CliRunner().invoke(cli, ["--debug", "fold", str(src)])
    assert (
        result.exit_code != 0
        and result.exception is not None
        and not isinstance(result.exception, SystemExit)
    )


def _unknown_op(m: onnx.ModelProto) -> None:
    m.graph.node.append(helper.make_node("Foo", ["y"], ["z"], domain="vendor", name="foo"))
    m.graph.output[0].name = "z"
    m.opset_import.append(helper.make_opsetid("vendor", 1))


def _future_opset(m: onnx.ModelProto) -> None:
    m.opset_import[0].version = 99


def _bn_sizes(m: onnx.ModelProto) -> None:
    scale = next(i for i in m.graph.initializer if i.name == "bn_scale")
    scale.CopyFrom(tensor("bn_scale", np.ones(5, np.float32)))


def _negative_epsilon(m: onnx.ModelProto) -> None:
    m.graph.node[1].attribute.append(helper.make_attribute("epsilon", -1e-3))


HANDLED = {
    "unknown op": (_unknown_op, 1, None),
    "future opset": (_future_opset, 0, "newer than normfuse knows"),
    "BN parameter sizes": (_bn_sizes, 0, "disagree in size"),
    "negative epsilon": (_negative_epsilon, 0, "epsilon is"),
}


@pytest.mark.parametrize("case", sorted(HANDLED))
def test_odd_models_fold_what_they_can_and_say_why_not(tmp_path, case):
    edit, folded, reason = HANDLED[case]
    src = tmp_path / "m.onnx"
    _edit(edit)(src)
    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(
        cli, ["fold", str(src), "-o", str(out), "--no-check", "--json", str(tmp_path / "r.json")]
    )
    assert result.exit_code == 0, result.output
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["applied"] == folded
    if reason:
        assert reason in report["entries"][0]["reason"]
    types = [n.op_type for n in onnx.load(out).graph.node]
    if case == "unknown op":
        assert types == ["Conv", "Foo"]  # untouched
    # with the check, onnxruntime judges the model; a model it cannot load is a one-line error
    checked = CliRunner().invoke(cli, ["fold", str(src), "-o", str(tmp_path / "c.onnx")])
    assert checked.exit_code in (0, 2)
    if checked.exit_code == 2:
        assert checked.output.strip().startswith("error: onnxruntime cannot load")
        assert "--no-check" in checked.output
        assert not (tmp_path / "c.onnx").exists()


@pytest.mark.parametrize(
    "args,expected",
    [
        (lambda d: ["fold", str(d / "m.onnx"), "-o", str(d / "m.onnx")], "pass --in-place"),
        (lambda d: ["fold", str(d / "m.onnx"), "-o", str(d / "nope" / "o.onnx")], "does not exist"),
        (lambda d: ["fold", str(d / "missing.onnx")], "no such file"),
        (lambda d: ["fold", str(d)], "is a directory"),
        (
            lambda d: ["fold", str(d / "m.onnx"), "--in-place", "-o", str(d / "x.onnx")],
            "use one of them",
        ),
        (lambda d: ["check", str(d / "m.onnx"), str(d / "other.onnx")], "different inputs"),
        (
            lambda d: [
                "check",
                str(d / "m.onnx"),
                str(d / "m.onnx"),
                "--inputs",
                str(d / "none.npz"),
            ],
            "no such inputs",
        ),
    ],
)
def test_bad_arguments(tmp_path, args, expected):
    _good_bytes(tmp_path / "m.onnx")
    other = _good()
    other.graph.input[0].name = "z"
    other.graph.node[0].input[0] = "z"
    (tmp_path / "other.onnx").write_bytes(other.SerializeToString())
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(cli, args(tmp_path))
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error: ") and expected in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
