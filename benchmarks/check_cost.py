"""What the default check of ``normfuse fold`` costs, beside one onnxruntime session per model.

Usage: ``python benchmarks/check_cost.py [--families resnet,densenet,mobilenet_v2] [--repeat 3]``

Exports the zoo families at full size (legacy exporter, BN kept; ResNet-50 also in float16) and
writes a 302 MB conv net with external data, then for each, ``--repeat`` times (medians):
``normfuse fold`` with its check (``--json`` timings: the check, split into sessions, runs and
judging) and its peak RSS, the same with ``--no-check``, and the time to build one onnxruntime
session from the original's file and one from the folded file (``ORT_DISABLE_ALL``) and run
each once: issue 20's bound on the check. Prints one line per model with the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from peers import _one_session  # noqa: E402

NORMFUSE = [sys.executable, "-m", "normfuse"]


def _models(work: Path, families: list[str]) -> list[Path]:
    import torch

    from models import build, zoo

    paths = []
    for name in families:
        model = zoo.build_full(name)
        path = work / f"{name}.onnx"
        build.export(model, torch.randn(1, 3, 224, 224), path, dynamo=False)
        paths.append(path)
        if name == "resnet":
            half = work / f"{name}_fp16.onnx"
            build.export(model.half(), torch.randn(1, 3, 224, 224).half(), half, dynamo=False)
            paths.append(half)
    (work / "wide").mkdir()
    paths.append(build.wide_conv_model(work / "wide", 2048, 2)[0])
    return paths


def _fold(src: Path, out: Path, *extra: str) -> tuple[dict, float]:
    """The command's ``--json`` timings and its peak RSS in MB (GNU time)."""
    report = out.with_suffix(".json")
    cmd = ["/usr/bin/time", "-f", "%M", *NORMFUSE, "fold", str(src), "-o", str(out), "--force"]
    done = subprocess.run(
        [*cmd, "--verbose", "--json", str(report), *extra], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"normfuse fold {src.name} failed: {done.stderr.strip()[-300:]}")
    rss = int(done.stderr.strip().splitlines()[-1]) / 1024
    return json.loads(report.read_text())["timings"], rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="resnet,densenet,mobilenet_v2")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="normfuse-check-cost-") as tmp:
        work = Path(tmp)
        for src in _models(work, args.families.split(",")):
            out = work / "folded.onnx"
            runs = []
            for _ in range(args.repeat):
                timed, rss = _fold(src, out)
                _, rss_plain = _fold(src, out, "--no-check")  # the same folded file
                bound = _one_session(src) + _one_session(out)
                parts = [timed.get(f"check {k}", 0.0) for k in ("sessions", "runs", "judge")]
                runs.append((timed["check"], bound, rss, rss_plain, *parts))
            check, bound, rss, plain, sessions, ran, judge = (
                statistics.median(x) for x in zip(*runs, strict=True)
            )
            print(
                f"{src.name}: check {check:.2f} s (sessions {sessions:.2f}, runs {ran:.2f}, "
                f"judge {judge:.2f}); one session per model {bound:.2f} s; "
                f"check / one session per model {check / bound:.2f}x; peak RSS {rss:.0f} MB "
                f"({plain:.0f} MB with --no-check)",
                flush=True,
            )


if __name__ == "__main__":
    main()
