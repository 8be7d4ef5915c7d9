"""How long the command takes to start, beside the interpreter and onnx's own import, in one run.

Usage: ``python benchmarks/startup.py [--runs 15]``

Times, as the median of interleaved runs (each a fresh process): ``python -c pass``,
``python -c "import onnx"``, ``normfuse --help``, ``normfuse inspect`` of a 7 KB bundled model,
and the peers' ``--help`` where they are installed (onnxsim, onnxslim). The target (issue 15):
``normfuse --help`` within 1.5x of the interpreter plus onnx's import.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _cases() -> dict[str, list[str]]:
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import onnx'": [sys.executable, "-c", "import onnx"],
        "normfuse --help": [sys.executable, "-m", "normfuse", "--help"],
        "normfuse inspect dwsep.onnx": [
            sys.executable,
            "-m",
            "normfuse",
            "inspect",
            str(ROOT / "models" / "dwsep.onnx"),
        ],
    }
    for peer in ("onnxsim", "onnxslim"):
        exe = shutil.which(peer, path=str(BIN)) or shutil.which(peer)
        if exe:
            cases[f"{peer} --help"] = [exe, "--help"]
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    cases = _cases()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.runs):
        for name, cmd in cases.items():  # interleaved: load on the machine hits all alike
            t = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = med["python -c 'import onnx'"]
    print("| command | median (s) | / (python + import onnx) |\n|---|---|---|")
    for name, value in med.items():
        print(f"| {name} | {value:.3f} | {value / floor:.2f}x |")
    ratio = med["normfuse --help"] / floor
    print(f"\nnormfuse --help: {ratio:.2f}x the interpreter plus onnx's import (target <= 1.5x)")


if __name__ == "__main__":
    main()
