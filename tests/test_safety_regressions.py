"""Regression tests for issue 16 (safety holes found by hostile testing), black box.

Each test states the behaviour the issue asks for. Tests of defects that today's code still has
are ``xfail(strict=True)``: the suite stays green now, and a fix turns them into failures
("XPASS(strict)") until the marker is removed. The CLI is driven in-process with CliRunner
where that is safe, and as a real process (``python -m normfuse.cli``) where the test needs an
environment variable, a timeout (FIFOs, huge files) or the real standard streams.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
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

from normfuse.cli import cli
from tests.conftest import bn_node, bn_params, make_model, normal, run, tensor

F = TP.FLOAT
MODELS = Path(__file__).resolve().parent.parent / "models"
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def cli_process(*args: object, timeout: float = 60, env: dict[str, str] | None = None):
    """The CLI as a real process; raises subprocess.TimeoutExpired past ``timeout``."""
    return subprocess.run(
        [sys.executable, "-m", "normfuse.cli", *(str(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _model(rng, channels: int = 16, layers: int = 2, names: list[str] | None = None):
    """Conv-BN-ReLU chain with random, non-trivial BN statistics."""
    inits, nodes, prev = [], [], "x"
    for i in range(layers):
        inits += [
            tensor(f"W{i}", normal(rng, [channels, channels, 3, 3]) * 0.1),
            *bn_params(rng, channels, f"bn{i}"),
        ]
        out = "y" if i == layers - 1 else f"r{i}"
        name = names[i] if names else f"conv{i}"
        nodes += [
            helper.make_node("Conv", [prev, f"W{i}"], [f"c{i}"], name=name, pads=[1, 1, 1, 1]),
            bn_node(f"c{i}", f"b{i}", f"bn{i}"),
            helper.make_node("Relu", [f"b{i}"], [out]),
        ]
        prev = out
    return make_model(
        nodes, [("x", F, [1, channels, 5, 5])], [("y", F, [1, channels, 5, 5])], inits
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_error_line(text: str) -> str:
    """The stderr of a refused run: one line ``error: ...``, no traceback, no warnings."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{text}"
    assert lines[0].startswith("error:"), text
    assert "Traceback" not in text
    return lines[0]


@pytest.fixture
def small(tmp_path, rng) -> Path:
    path = tmp_path / "in.onnx"
    onnx.save(_model(rng), path)
    return path


# --- 1. the input's external data is deleted ------------------------------------------------


@pytest.mark.parametrize("command", [["fold"], ["swap", "--to", "frozen"]], ids=["fold", "swap"])
def test_replacing_an_output_keeps_the_data_the_input_reads(tmp_path, rng, command):
    model = _model(rng)
    b = tmp_path / "b.onnx"
    onnx.save(
        onnx.ModelProto.FromString(model.SerializeToString()),
        b,
        save_as_external_data=True,
        location="b.onnx.data",
        size_threshold=1024,
    )
    a = tmp_path / "a.onnx"
    a.write_bytes(b.read_bytes())  # a.onnx reads b.onnx.data too
    data = tmp_path / "b.onnx.data"
    before = _sha(data)

    result = invoke(command[0], a, "-o", b, "--force", *command[1:])

    assert result.exit_code == 0, result.output
    assert data.is_file(), "b.onnx.data, which the input a.onnx reads, was deleted"
    assert _sha(data) == before
    feeds = {"x": normal(rng, [1, 16, 5, 5])}
    ref = run(model, feeds)[0]
    for path in (a, b):
        got = run(onnx.load(str(path)), feeds)[0]  # onnx.load reads the external data
        assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max(), path.name


# --- 2. --json PATH overwrites anything -----------------------------------------------------


def test_json_naming_the_input_is_refused(small, tmp_path):
    before = _sha(small)
    out = tmp_path / "j.onnx"
    result = invoke("fold", small, "-o", out, "--json", small, "--no-check")
    assert result.exit_code == 2, result.output
    assert _sha(small) == before
    assert not out.exists(), "a destination was refused, yet the model was written"
    _one_error_line(result.stderr)


@pytest.mark.parametrize("command", ["fold", "inspect"])
def test_json_to_an_existing_file_needs_force(small, tmp_path, command):
    victim = tmp_path / "other.txt"
    victim.write_text("keep me\n")
    extra = ["-o", tmp_path / "o.onnx", "--no-check"] if command == "fold" else []
    result = invoke(command, small, *extra, "--json", victim)
    assert result.exit_code == 2, result.output
    assert "--force" in _one_error_line(result.stderr)
    assert victim.read_text() == "keep me\n"


def test_json_to_a_symlink_is_refused(small, tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("keep me\n")
    link = tmp_path / "report.json"
    link.symlink_to(target.name)
    result = invoke("fold", small, "-o", tmp_path / "o.onnx", "--json", link, "--no-check")
    assert result.exit_code == 2, result.output
    _one_error_line(result.stderr)
    assert target.read_text() == "keep me\n"
    assert link.is_symlink()


# --- 3. non-regular outputs ------------------------------------------------------------------


def test_dangling_symlink_output_needs_force(small, tmp_path):
    link = tmp_path / "out.onnx"
    link.symlink_to("nowhere.onnx")
    result = invoke("fold", small, "-o", link, "--no-check")
    assert result.exit_code == 2, result.output
    _one_error_line(result.stderr)
    assert link.is_symlink() and os.readlink(link) == "nowhere.onnx"
    assert not (tmp_path / "nowhere.onnx").exists()


@needs_fifo
def test_fifo_output_is_refused_even_with_force(small, tmp_path):
    fifo = tmp_path / "out.onnx"
    os.mkfifo(fifo)
    proc = cli_process("fold", small, "-o", fifo, "--force", "--no-check", timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    _one_error_line(proc.stderr)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced"


# --- 5. the lazy loader reads past a tensor's bytes -------------------------------------------


def test_short_raw_data_is_refused(tmp_path, rng):
    w = numpy_helper.from_array(normal(rng, [16, 16, 3, 3]), "W")
    w.raw_data = w.raw_data[: len(w.raw_data) // 2]  # 4608 of the 9216 bytes its dims declare
    after = numpy_helper.from_array(normal(rng, [16, 16, 3, 3]), "E")  # the bytes that follow
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("c", "b"),
        helper.make_node("Add", ["b", "E"], ["y"]),
    ]
    model = make_model(
        nodes, [("x", F, [1, 16, 3, 3])], [("y", F, None)], [w, after, *bn_params(rng, 16)]
    )
    src = tmp_path / "short.onnx"
    src.write_bytes(model.SerializeToString())  # onnx.save would not write an invalid model
    out = tmp_path / "o.onnx"
    result = invoke("fold", src, "-o", out, "--no-check")
    assert result.exit_code == 2, result.output
    _one_error_line(result.stderr)
    assert not out.exists()


# --- 6. an error after the output was written -------------------------------------------------


def test_non_ascii_names_on_an_ascii_stdout_tell_the_truth(tmp_path, rng):
    src = tmp_path / "u.onnx"
    onnx.save(_model(rng, names=["卷积_α", "свёртка"]), src)
    out = tmp_path / "o.onnx"
    proc = cli_process(
        "fold", src, "-o", out, "--no-check", "-v", env={"PYTHONIOENCODING": "ascii"}
    )
    if proc.returncode == 0:  # the fix the issue prefers: errors="replace"
        assert out.is_file()
        onnx.checker.check_model(str(out), full_check=True)
    else:  # a failure must say what happened to the output
        assert "nothing was written" not in proc.stderr
        assert not out.exists() or str(out) in proc.stderr, (proc.returncode, proc.stderr)


def test_unwritable_json_destination_is_refused_before_writing(small, tmp_path):
    out = tmp_path / "o.onnx"
    result = invoke("fold", small, "-o", out, "--no-check", "--json", tmp_path / "no" / "r.json")
    assert result.exit_code == 2, result.output
    assert not out.exists(), "exit 2 although the output was written"
    _one_error_line(result.stderr)


# --- 9. unbounded work on hostile files -------------------------------------------------------


@needs_fifo
def test_fifo_input_is_refused_promptly(tmp_path):
    fifo = tmp_path / "m.onnx"
    os.mkfifo(fifo)
    try:
        proc = cli_process("fold", fifo, "-o", tmp_path / "o.onnx", timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("a FIFO as input was not refused within 5 s")
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr)


def test_a_file_of_zeros_is_refused_within_seconds(tmp_path):
    zeros = tmp_path / "z.onnx"
    with open(zeros, "wb") as f:
        f.truncate(50_000_000)
    try:
        proc = cli_process("fold", zeros, "-o", tmp_path / "o.onnx", "--no-check", timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("a 50 MB file of zeros was not refused within 5 s")
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr)


# --- 11. NORMFUSE_THREADS is not capped -------------------------------------------------------

_THREADS_SCRIPT = textwrap.dedent(
    """
    import os, threading
    import numpy as np
    from onnx import TensorProto as TP, helper
    from tests.conftest import bn_node, bn_params, make_model, normal, tensor
    import normfuse

    rng = np.random.default_rng(0)
    c = 512  # a 512x512 weight: large enough to be scaled by a pool of threads
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y")]
    model = make_model(
        nodes, [("x", TP.FLOAT, [1, c, 2, 2])], [("y", TP.FLOAT, [1, c, 2, 2])],
        [tensor("W", normal(rng, [c, c, 1, 1])), *bn_params(rng, c)],
    )
    normfuse.fold(model, check=False)
    print(threading.active_count(), len(os.sched_getaffinity(0)))
    """
)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs sched_getaffinity")
def test_normfuse_threads_is_capped_at_the_usable_cores():
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", _THREADS_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env={**os.environ, "NORMFUSE_THREADS": "100000"},
    )
    assert proc.returncode == 0, proc.stderr
    alive, cores = map(int, proc.stdout.split()[-2:])
    assert alive <= cores + 2, f"{alive} threads alive for {cores} usable core(s)"  # + main, writer


def test_capping_normfuse_threads_is_reported(tmp_path, rng):
    c = 512
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y")]
    src = tmp_path / "big.onnx"
    onnx.save(
        make_model(
            nodes,
            [("x", F, [1, c, 2, 2])],
            [("y", F, [1, c, 2, 2])],
            [tensor("W", normal(rng, [c, c, 1, 1])), *bn_params(rng, c)],
        ),
        src,
    )
    proc = cli_process(
        "fold", src, "-o", tmp_path / "o.onnx", "--no-check", env={"NORMFUSE_THREADS": "100000"}
    )
    assert proc.returncode == 0, proc.stderr
    assert "NORMFUSE_THREADS" in proc.stdout + proc.stderr


# --- 12/13. one line, as promised --------------------------------------------------------------

_R = MODELS / "resnet_small.onnx"  # input x: 1x3x32x32


@pytest.mark.parametrize(
    "args",
    [
        ["check", _R, _R, "--runs", "0"],
        ["check", _R, _R, "--seed", "-1"],
        ["fold", _R, "-o", "{tmp}/o.onnx", "--seed", "-1"],
        ["check", _R, _R, "--shape", "x=1x-3"],
        ["check", _R, _R, "--atol", "-1"],
        ["check", _R, _R, "--rtol", "inf"],
        ["check", _R, _R, "--rtol", "nan"],
    ],
    ids=["runs0", "seed-1", "fold-seed-1", "shape-neg", "atol-neg", "rtol-inf", "rtol-nan"],
)
def test_bad_numbers_give_one_error_line_with_a_note(tmp_path, args):
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in args]
    result = invoke(*args)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.exit_code == 2, result.output
    line = _one_error_line(result.stderr)
    assert "Note:" in line and "unexpected" not in line, line


def test_json_report_still_written_where_allowed(small, tmp_path):
    """Guard for item 2's fix: a new --json file beside the output is still written."""
    report = tmp_path / "r.json"
    result = invoke("fold", small, "-o", tmp_path / "o.onnx", "--json", report, "--no-check")
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["applied"] == 2
