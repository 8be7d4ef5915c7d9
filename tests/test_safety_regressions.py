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


# --- 4. two processes writing one output with external data ----------------------------------


def _weights_digest(path: Path) -> str:
    model = onnx.load(str(path))  # reads the external data: fails when it is missing or short
    digest = hashlib.sha256()
    for t in sorted(model.graph.initializer, key=lambda t: t.name):
        digest.update(numpy_helper.to_array(t).tobytes())
    return digest.hexdigest()


def test_concurrent_writers_of_one_output_never_break_it(tmp_path):
    """30 rounds of two concurrent folds into one output (external data, with the check): the
    output always loads, passes the checker and is one of the two results; both runs exit 0
    (each checks its own bytes), and no data file is left that the output does not use."""
    sources, expected = [], []
    for i in range(2):
        src = tmp_path / f"src{i}.onnx"
        model = _model(np.random.default_rng(10 + i), channels=128, layers=2)  # ~1.2 MB
        onnx.save(
            onnx.ModelProto.FromString(model.SerializeToString()),
            src,
            save_as_external_data=True,
            location=f"src{i}.bin",
            size_threshold=1024,
        )
        sources.append(src)
    out = tmp_path / "out.onnx"
    fold = [sys.executable, "-m", "normfuse.cli", "fold", "-o", str(out), "--force"]
    for src in sources:
        subprocess.run([*fold, str(src)], check=True, capture_output=True, timeout=120)
        expected.append(_weights_digest(out))
    assert expected[0] != expected[1]
    for _ in range(30):
        procs = [
            subprocess.Popen([*fold, str(s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for s in sources
        ]
        results = [(p.wait(timeout=120), p.stderr.read().decode()) for p in procs]  # type: ignore[union-attr]
        for p in procs:
            p.stdout.close()  # type: ignore[union-attr]
            p.stderr.close()  # type: ignore[union-attr]
        assert all(rc == 0 for rc, _ in results), results
        assert _weights_digest(out) in expected
        onnx.checker.check_model(str(out), full_check=True)
        used = {
            e.value
            for t in onnx.load(str(out), load_external_data=False).graph.initializer
            for e in t.external_data
            if e.key == "location"
        }
        data = {p.name for p in tmp_path.iterdir() if p.name.startswith("out.onnx.")}
        hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert data <= used | {"out.onnx.data", "out.onnx.1.data"}, (data, used)
        assert not hidden, hidden


# --- 6. the message tells the state of the output ------------------------------------------


def test_interrupt_after_the_rename_says_the_output_was_written(small, tmp_path, monkeypatch):
    from normfuse.onnxgraph import io as onnx_io

    real = onnx_io.save

    def save_then_interrupt(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt  # Ctrl-C just after the rename

    monkeypatch.setattr(onnx_io, "save", save_then_interrupt)
    out = tmp_path / "o.onnx"
    result = invoke("fold", small, "-o", out, "--no-check")
    assert result.exit_code == 130
    line = _one_error_line(result.stderr)
    assert out.is_file() and f"{out} was written" in line and "nothing was written" not in line


def test_interrupt_before_the_rename_says_nothing_was_written(small, tmp_path, monkeypatch):
    from normfuse.onnxgraph import io as onnx_io

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_io, "write_streaming", interrupt)
    out = tmp_path / "o.onnx"
    result = invoke("fold", small, "-o", out, "--no-check")
    assert result.exit_code == 130
    assert "nothing was written" in _one_error_line(result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_disk_full_names_the_output_and_what_to_do(small, tmp_path, monkeypatch):
    import errno

    from normfuse.onnxgraph import io as onnx_io

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_io, "write_streaming", full)
    out = tmp_path / "o.onnx"
    result = invoke("fold", small, "-o", out, "--no-check")
    assert result.exit_code == 2
    line = _one_error_line(result.stderr)
    assert str(out) in line and "No space left" in line and "Note:" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


@pytest.mark.skipif(not hasattr(os, "kill"), reason="needs signals")
def test_sigterm_during_the_save_leaves_no_temporary_files(tmp_path):
    import signal
    import time

    src = tmp_path / "big.onnx"
    model = _model(np.random.default_rng(0), channels=512, layers=6)  # ~57 MB
    onnx.save(
        onnx.ModelProto.FromString(model.SerializeToString()),
        src,
        save_as_external_data=True,
        location="big.bin",
        size_threshold=1024,
    )
    out = tmp_path / "out.onnx"
    stopped = 0
    for k in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-m", "normfuse.cli", "fold", src, "-o", out, "--force"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
                break
            time.sleep(0.001)
        time.sleep(0.02 * k)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            stopped += 1
        _, err = proc.communicate(timeout=60)
        if proc.returncode == 143:
            assert "terminated" in err.decode()
        left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert not left, left
        if out.exists():
            onnx.checker.check_model(str(out), full_check=True)
        orphans = {p.name for p in tmp_path.iterdir() if p.name.startswith("out.onnx.")}
        assert orphans <= {"out.onnx.data", "out.onnx.1.data"}, orphans
    assert stopped >= 2


# --- 7/8. .pt2 archives -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dynamic_pt2(tmp_path_factory) -> Path:
    """A torch.export archive of a Conv-BN module with a dynamic batch dimension."""
    pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("pt2")
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
        b = torch.export.Dim("b", min=1, max=64)
        ep = torch.export.export(m, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: b},))
        torch.export.save(ep, sys.argv[1])
        """
    )
    path = folder / "d.pt2"
    subprocess.run([sys.executable, "-c", script, path], check=True, capture_output=True)
    return path


def _rewrite_pt2(src: Path, dst: Path, change) -> Path:
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, change(info.filename, zin.read(info.filename)))
    return dst


def test_pt2_symbolic_expression_with_code_is_refused(dynamic_pt2, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import zipfile

    with zipfile.ZipFile(dynamic_pt2) as z:
        names = [n for n in z.namelist() if n.endswith("models/model.json")]
        assert names and b"expr_str" in z.read(names[0]), "the archive has no symbolic dims"

    def evil(name: str, data: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return data
        doc = json.loads(data)

        def walk(node):
            if isinstance(node, dict):
                for k, v in node.items():
                    if k == "expr_str":
                        node[k] = "__import__('os').system('touch pwned')"
                    else:
                        walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(doc)
        return json.dumps(doc).encode()

    bad = _rewrite_pt2(dynamic_pt2, tmp_path / "s.pt2", evil)
    proc = cli_process("fold", bad, "-o", tmp_path / "o.pt2", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "symbolic expression" in _one_error_line(proc.stderr)
    assert not (tmp_path / "pwned").exists(), "code from the archive ran"
    assert not (tmp_path / "o.pt2").exists()


def test_pt2_declared_size_beyond_the_archive_is_refused(dynamic_pt2, tmp_path):
    def inflate(name: str, data: bytes) -> bytes:
        if not name.endswith("model_weights_config.json"):
            return data
        doc = json.loads(data)
        meta = next(iter(doc["config"].values()))["tensor_meta"]
        meta["sizes"] = [{"as_int": 20000}, {"as_int": 20000}]  # 1.6 GB of float32
        meta["strides"] = [{"as_int": 20000}, {"as_int": 1}]
        return json.dumps(doc).encode()

    bad = _rewrite_pt2(dynamic_pt2, tmp_path / "big.pt2", inflate)
    proc = cli_process("fold", bad, "-o", tmp_path / "o.pt2", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "declares" in _one_error_line(proc.stderr)


def test_pt2_deflate_bomb_is_refused(dynamic_pt2, tmp_path):
    import zipfile

    bomb = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(dynamic_pt2) as zin, zipfile.ZipFile(bomb, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
        prefix = zin.namelist()[0].split("/")[0]
        zout.writestr(f"{prefix}/extra", b"\0" * 20_000_000, compress_type=zipfile.ZIP_DEFLATED)
    proc = cli_process("fold", bomb, "-o", tmp_path / "o.pt2", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "expands" in _one_error_line(proc.stderr)


def test_broken_pt2_gives_one_line(dynamic_pt2, tmp_path):
    def truncate(name: str, data: bytes) -> bytes:
        return data[: len(data) // 2] if name.endswith("models/model.json") else data

    bad = _rewrite_pt2(dynamic_pt2, tmp_path / "broken.pt2", truncate)
    proc = cli_process("fold", bad, "-o", tmp_path / "o.pt2", timeout=120)
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr)


def test_pt2_output_gets_the_umask_and_a_pt2_temp_name(dynamic_pt2, tmp_path):
    out = tmp_path / "o.pt2"
    proc = subprocess.run(
        [
            *("sh", "-c", 'umask 022 && exec "$@"', "sh", sys.executable, "-m", "normfuse.cli"),
            *("fold", str(dynamic_pt2), "-o", str(out), "--no-check"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
    assert "does not end" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr


# --- 9. non-regular and huge inputs ----------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
@pytest.mark.parametrize("command", ["inspect", "fold"])
def test_a_device_as_the_model_is_refused_at_once(tmp_path, command):
    extra = ["-o", tmp_path / "o.onnx"] if command == "fold" else []
    proc = cli_process(command, "/dev/zero", *extra, timeout=10)
    assert proc.returncode == 2
    assert "character device" in _one_error_line(proc.stderr)


def test_a_large_file_that_is_not_a_model_is_refused_quickly(tmp_path):
    """Zeros, and a file whose first field is a valid ModelProto field followed by garbage."""
    for name, head in (("zeros.onnx", b""), ("garbage.onnx", b"\x08\x07\xff\xff\xff")):
        path = tmp_path / name
        with open(path, "wb") as f:
            f.write(head)
            f.truncate(200_000_000)  # sparse
        try:
            proc = cli_process("inspect", path, timeout=5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name}: a 200 MB file was not refused within 5 s")
        assert proc.returncode == 2
        _one_error_line(proc.stderr)


# --- 12. one line, as promised (inputs files, locations, claimed sizes, data) -----------------


def _npz_cases(folder: Path) -> dict[str, Path]:
    import io
    import pickle
    import zipfile

    cases = {}
    npy = folder / "renamed.npz"
    np.save(folder / "plain.npy", np.zeros((1, 3, 32, 32), np.float32))
    (folder / "plain.npy").rename(npy)
    cases["npy-renamed"] = npy
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (1_000_000, 1_000_000)}
    )
    claim = folder / "claim.npz"
    with zipfile.ZipFile(claim, "w") as z:
        z.writestr("x.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + b"\0" * 64)
    cases["huge-header"] = claim
    raw = folder / "pickle.npz"
    with zipfile.ZipFile(raw, "w") as z:
        z.writestr("x.npy", pickle.dumps({"a": 1}))
    cases["raw-pickle"] = raw
    nan = folder / "nan.npz"
    np.savez(nan, x=np.full((1, 3, 32, 32), np.nan, np.float32))
    cases["nan"] = nan
    return cases


@pytest.mark.parametrize(
    "command,case",
    [
        *(("recalibrate", c) for c in ("npy-renamed", "huge-header", "raw-pickle", "nan")),
        *(("check", c) for c in ("npy-renamed", "huge-header", "raw-pickle")),  # NaN: checkable
    ],
)
def test_bad_data_files_give_one_line(tmp_path, case, command):
    path = _npz_cases(tmp_path)[case]
    if command == "recalibrate":
        args = ["recalibrate", _R, "--data", path, "-o", tmp_path / "r.onnx"]
    else:
        args = ["check", _R, _R, "--inputs", path]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    line = _one_error_line(result.stderr)
    assert "Note:" in line and "unexpected" not in line, line
    assert not (tmp_path / "r.onnx").exists()


def test_a_huge_shape_is_refused(tmp_path):
    result = invoke("check", _R, _R, "--shape", "x=1x99999999999")
    assert result.exit_code == 2, result.output
    assert "Note:" in _one_error_line(result.stderr)


@pytest.mark.parametrize("location", ["w\x00.bin", "w\n.bin"], ids=["nul", "newline"])
def test_control_characters_in_a_data_location_give_one_line(tmp_path, rng, location):
    model = _model(rng)
    w = next(t for t in model.graph.initializer if t.name == "W0")
    data = numpy_helper.to_array(w).tobytes()
    w.ClearField("raw_data")
    w.data_location = TP.EXTERNAL
    for key, value in (("location", location), ("length", str(len(data)))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    result = invoke("fold", src, "-o", tmp_path / "o.onnx", "--no-check")
    assert result.exit_code == 2, result.output
    _one_error_line(result.stderr)


def test_a_tensor_claiming_1e12_elements_gives_one_line(tmp_path, rng):
    model = _model(rng)
    w = next(t for t in model.graph.initializer if t.name == "W0")
    del w.dims[:]
    w.dims.extend([1_000_000, 1_000_000])
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    for args in (["fold", src, "-o", tmp_path / "o.onnx", "--no-check"], ["inspect", src]):
        proc = cli_process(*args, timeout=30)
        assert proc.returncode == 2, proc.stderr
        assert "malformed" in _one_error_line(proc.stderr)


def test_recalibrate_refuses_nan_data_naming_the_batch(tmp_path):
    data = tmp_path / "calib"
    data.mkdir()
    np.savez(data / "a.npz", x=np.zeros((1, 3, 32, 32), np.float32))
    bad = np.zeros((1, 3, 32, 32), np.float32)
    bad[0, 0, 0, 0] = np.inf
    np.savez(data / "b.npz", x=bad)
    result = invoke("recalibrate", _R, "--data", data, "-o", tmp_path / "r.onnx")
    assert result.exit_code == 2, result.output
    line = _one_error_line(result.stderr)
    assert "batch 1" in line and "NaN or infinity" in line
    assert not (tmp_path / "r.onnx").exists()


# --- 1/2. destinations that are inputs by another name ------------------------------------------


def test_output_naming_the_inputs_data_file_is_refused(tmp_path, rng):
    src = tmp_path / "m.onnx"
    onnx.save(
        onnx.ModelProto.FromString(_model(rng).SerializeToString()),
        src,
        save_as_external_data=True,
        location="m.bin",
        size_threshold=1024,
    )
    data = tmp_path / "m.bin"
    before = _sha(data)
    hard = tmp_path / "alias.bin"
    os.link(data, hard)  # the same file under another name: compared by identity
    for target in (data, hard):
        result = invoke("fold", src, "-o", target, "--force", "--no-check")
        assert result.exit_code == 2, result.output
        _one_error_line(result.stderr)
        assert _sha(data) == before


def test_json_naming_the_output_is_refused(small, tmp_path):
    out = tmp_path / "o.onnx"
    result = invoke("fold", small, "-o", out, "--json", out, "--no-check")
    assert result.exit_code == 2, result.output
    _one_error_line(result.stderr)
    assert not out.exists()


def test_json_to_a_symlink_with_force_replaces_the_link_not_its_target(small, tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("keep me\n")
    link = tmp_path / "report.json"
    link.symlink_to(target.name)
    result = invoke("inspect", small, "--json", link, "--force")
    assert result.exit_code == 0, result.output
    assert target.read_text() == "keep me\n"
    assert not link.is_symlink() and json.loads(link.read_text())["entries"]


def test_in_place_on_a_symlink_is_refused(small, tmp_path):
    link = tmp_path / "link.onnx"
    link.symlink_to(small.name)
    before = _sha(small)
    result = invoke("fold", link, "--in-place", "--no-check")
    assert result.exit_code == 2, result.output
    assert "symbolic link" in _one_error_line(result.stderr)
    assert link.is_symlink() and _sha(small) == before
