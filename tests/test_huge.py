"""A model above 2 GiB, built on the fly: fold memory stays bounded, inspect reads no weights."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models.build import wide_conv_model

WIDTH, LAYERS = 2048, 15  # 15 x 151 MB of conv weights = 2.26 GB
NEEDED = 3 * WIDTH * WIDTH * 9 * 4 * LAYERS  # input, output and slack


_PROBE = """
import sys
from normfuse.cli import main
sys.argv = ["normfuse", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
status = open("/proc/self/status").read()
peak = [int(l.split()[1]) * 1024 for l in status.splitlines() if l.startswith("VmHWM")][0]
rchar = [int(l.split()[1]) for l in open("/proc/self/io").read().splitlines() if l.startswith("rchar")][0]
print(f"PROBE {code} {peak} {rchar}")
"""


def _probe(*args: str) -> tuple[int, int, int]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=600
    )
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE")]
    assert line, proc.stdout + proc.stderr
    code, peak, rchar = (int(v) for v in line[-1].split()[1:])
    return code, peak, rchar


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    folder = tmp_path_factory.mktemp("huge")
    if shutil.disk_usage(folder).free < NEEDED:
        pytest.skip(f"needs {NEEDED / 1e9:.1f} GB of free disk for a model above 2 GiB")
    if not Path("/proc/self/status").exists():
        pytest.skip("measures memory through /proc")
    return wide_conv_model(folder, WIDTH, LAYERS)


def test_fold_of_a_model_above_2gib_keeps_memory_bounded(huge):
    path, size = huge
    assert size > 2**31
    out = path.with_name("folded.onnx")
    code, peak, _ = _probe("fold", str(path), "-o", str(out), "--no-check")
    print(f"fold of {size / 1e9:.2f} GB: peak RSS {peak / 1e6:.0f} MB")
    assert code == 0
    largest = WIDTH * WIDTH * 9 * 4
    assert peak < 0.25 * size, f"peak RSS {peak / 1e6:.0f} MB for a {size / 1e9:.2f} GB model"
    assert peak < 3 * largest + 300e6  # the tensors in flight plus a fixed overhead
    folded = onnx.load(str(out), load_external_data=False)
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    # spot-check one folded layer against float64
    src = onnx.load(str(path), load_external_data=False)
    init = {t.name: t for t in src.graph.initializer}
    offset = int(next(e.value for e in init["w3"].external_data if e.key == "offset"))
    w = np.fromfile(
        path.with_name("wide.onnx.data"), np.float32, WIDTH * WIDTH * 9, offset=offset
    ).reshape(WIDTH, WIDTH, 3, 3)
    g, v = (numpy_helper.to_array(init[f"bn3_{k}"]).astype(np.float64) for k in "gv")
    expected = (w * (g / np.sqrt(v + 1e-5))[:, None, None, None]).astype(np.float32)
    new = {t.name: t for t in folded.graph.initializer}["w3"]
    location = next(e.value for e in new.external_data if e.key == "location")
    new_offset = int(next(e.value for e in new.external_data if e.key == "offset"))
    got = np.fromfile(out.with_name(location), np.float32, WIDTH * WIDTH * 9, offset=new_offset)
    np.testing.assert_array_equal(got.reshape(expected.shape), expected)


def test_inspect_of_a_model_above_2gib_reads_no_weights(huge):
    path, _ = huge
    # the baseline imports what inspect imports (the command imports onnx & co. on first use)
    small = Path(__file__).resolve().parent.parent / "models" / "dwsep.onnx"
    _, _, baseline = _probe("inspect", str(small))
    code, peak, rchar = _probe("inspect", str(path))
    print(
        f"inspect: read {(rchar - baseline) / 1e6:.2f} MB beyond start-up, peak RSS {peak / 1e6:.0f} MB"
    )
    assert code == 0
    assert rchar - baseline < 10e6, f"inspect read {(rchar - baseline) / 1e6:.0f} MB"
    assert peak < 300e6
