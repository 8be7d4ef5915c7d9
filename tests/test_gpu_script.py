"""The GPU script (benchmarks/gpu.py) cannot rot: its dry run passes here, on the CPU.

The dry run is exactly ``python benchmarks/gpu.py --provider cpu --quick --out DIR``: the bundled
models and a tiny family model in fp32 and fp16, folded, checked and timed on onnxruntime's CPU
provider. The set-up's wheel handling (chunks joined, checksum, ``pip --target``) is tested
with a small wheel built here.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu

ROOT = Path(__file__).resolve().parent.parent


def _dry_run(script: str, *args: str) -> None:
    """``python SCRIPT ARGS --quick`` from the repository root; it must exit 0."""
    proc = subprocess.run(
        [sys.executable, script, *args, "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_dry_run_passes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _dry_run("benchmarks/gpu.py", "--provider", "cpu", "--out", str(out))
    result = json.loads((out / "gpu.json").read_text())
    assert result["schema"] == 1
    assert result["provider"] == "CPU" and result["quick"] is True
    assert result["passed"] is True and result["complete"] is True
    assert result["stopped_for_budget"] == []
    assert result["settings"]["batches"] == [1, 4]
    assert result["settings"]["opt_levels"] == ["disable", "all"]
    env = result["environment"]
    assert "CPUExecutionProvider" in env["available_providers"]
    for key in ("python", "numpy", "onnx", "onnx_ir", "onnxruntime", "torch", "normfuse"):
        assert env[key], key

    models = result["models"]
    bundled = sorted(p.stem for p in (ROOT / "models").glob("*.onnx"))
    assert [m["model"] for m in models if m["kind"] == "bundled"] == [
        f"bundled {b}" for b in bundled
    ]
    family = [m for m in models if m["kind"] == "family"]
    assert [m["dtype"] for m in family] == ["fp32", "fp16"]
    for m in models:
        assert m["status"] == "passed", m
        check = m["check"]
        assert check["passed"] is True and check["provider"] == "CPU"
        assert check["lines"] and all(not ln.startswith("FAILED") for ln in check["lines"])
        assert check["max_rel"] < 1e-2
        assert check["cross_check_max_rel"] is None  # CPU-vs-CUDA needs CUDA
        assert m["fold"]["batchnorm_after"] <= m["fold"]["batchnorm_before"]
        assert m["latency"], m["model"]
        for row in m["latency"]:
            assert row["opt_level"] in ("disable", "all")
            for side in ("original", "folded"):
                lat = row[side]
                assert 0 < lat["p10_ms"] <= lat["median_ms"] <= lat["p90_ms"]
    for m in family:
        assert m["fold"]["applied"] > 0 and m["fold"]["batchnorm_after"] == 0
        assert sorted({(r["batch"], r["opt_level"]) for r in m["latency"]}) == [
            (1, "all"),
            (1, "disable"),
            (4, "all"),
            (4, "disable"),
        ]
    fp16 = family[1]["check"]
    assert fp16["judgement"] and "upcast" in fp16["judgement"]
    assert fp16["runtime_max_rel"] is not None and fp16["noise_max_rel"] is not None

    table = (out / "GPU.md").read_text()
    assert "CPU (dry run" in table
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and "PASSED" in ln]
    assert len(rows) == len(models)
    assert "FAILED" not in table


def _wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel (module ``nf_gpu_probe_pkg``)."""
    name = "nf_gpu_probe_pkg-0.1-py3-none-any.whl"
    files = {
        "nf_gpu_probe_pkg/__init__.py": "VALUE = 42\n",
        "nf_gpu_probe_pkg-0.1.dist-info/METADATA": (
            "Metadata-Version: 2.1\nName: nf_gpu_probe_pkg\nVersion: 0.1\n"
        ),
        "nf_gpu_probe_pkg-0.1.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = [f"{n},sha256=,{len(t)}" for n, t in files.items()]
    files["nf_gpu_probe_pkg-0.1.dist-info/RECORD"] = "\n".join(
        [*record, "nf_gpu_probe_pkg-0.1.dist-info/RECORD,,"]
    )
    path = folder / name
    with zipfile.ZipFile(path, "w") as z:
        for n, t in files.items():
            z.writestr(n, t)
    return path


def _split(wheel: Path, dest: Path, size: int) -> None:
    data = wheel.read_bytes()
    dest.mkdir(parents=True)
    for i in range(0, len(data), size):
        suffix = chr(ord("a") + i // size // 26) + chr(ord("a") + i // size % 26)
        (dest / f"{wheel.name}.part{suffix}").write_bytes(data[i : i + size])


def test_chunked_wheel_is_joined_checked_and_installed(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    chunks = tmp_path / "wheels"
    _split(wheel, chunks / "1", 300)  # chunks may lie in several folders (one per transfer)
    for part in sorted((chunks / "1").iterdir())[2:]:
        (chunks / "2").mkdir(exist_ok=True)
        part.rename(chunks / "2" / part.name)
    (chunks / f"{wheel.name}.sha256").write_text(f"{digest}  {wheel.name}\n")
    wheel.unlink()
    whole, chunked = gpu.find_wheels([chunks])
    assert whole == [] and [n for n, _ in chunked] == [wheel.name]
    assert len(chunked[0][1]) >= 3
    target, names = gpu.install_wheels([chunks])
    assert names == [wheel.name]
    assert target is not None
    assert (target / "nf_gpu_probe_pkg" / "__init__.py").read_text() == "VALUE = 42\n"


def test_damaged_chunk_is_refused(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path)
    chunks = tmp_path / "wheels"
    (chunks).mkdir()
    (chunks / f"{wheel.name}.sha256").write_text(hashlib.sha256(b"other").hexdigest() + "\n")
    _split(wheel, chunks / "1", 300)
    with pytest.raises(SystemExit, match="missing or damaged"):
        gpu.install_wheels([chunks])


def test_requirements_read_from_pyproject() -> None:
    req = gpu.requirements()
    assert req["onnx_ir"] >= (1, 1) and "onnxruntime" in req and "numpy" in req


@pytest.mark.parametrize("drop", [0, -1], ids=["first", "last"])
def test_missing_chunk_without_checksum_is_named(tmp_path: Path, drop: int) -> None:
    """Chunks of one wheel sent over several calls: one that did not arrive stops the set-up
    with its name, before pip (which says only "[Errno 22] Invalid argument" for a cut wheel)."""
    wheel = _wheel(tmp_path)
    chunks = tmp_path / "wheels"
    _split(wheel, chunks / "1", 300)
    parts = sorted((chunks / "1").iterdir())
    assert len(parts) >= 3
    parts[drop].unlink()
    with pytest.raises(SystemExit, match="a chunk is missing"):
        gpu.install_wheels([chunks])


def test_torch_gpu_dry_run(tmp_path: Path) -> None:
    """benchmarks/gpu_torch.py on the CPU: every fold keeps its device and dtype, folds, and
    the folded output equals the original's at float32 rounding (against a float64 run)."""
    out = tmp_path / "out"
    _dry_run("benchmarks/gpu_torch.py", "--device", "cpu", "--out", str(out))
    result = json.loads((out / "torch_gpu.json").read_text())
    assert [(r["form"], r["dtype"]) for r in result["rows"]] == [
        ("nn.Module", "float32"),
        ("ExportedProgram", "float32"),
    ]
    for r in result["rows"]:
        assert r["status"] == "passed", r
        assert r["devices"] == ["cpu"] and r["dtypes"] == ["float32"]
        assert r["folded"] > 0
        assert r["folded_vs_float64"] < 10 * max(r["original_vs_float64"], 1e-7)
    assert (out / "TORCH_GPU.md").read_text().count("| passed |") == 2
