"""ONNX BatchNorm recalibration on CPU: ``--mode batch`` and ``--mode sequential`` (with and
without the level cache, one and two workers) against plain onnxruntime inference over the same
batches, read from the same folder of ``.npz`` files.

Usage: ``python benchmarks/recalibrate_onnx.py [--images 256] [--batch 16] [--size 64]``

* models: ``models/resnet_small.onnx`` (9 BatchNorms, a fixed batch of 1: ``--small-batches``
  batches of one 32x32 image) and a ResNet-50 (``models/zoo.py`` ``build_full("resnet")``,
  random weights, BN statistics moved by training passes) exported with a dynamic batch
  dimension (``--images`` images at ``--size`` in batches of ``--batch``);
* inference: one onnxruntime session at ``ORT_DISABLE_ALL`` (the level normfuse's sessions
  run at, so that nothing folds BatchNorm away) reading every batch from the folder and running
  it; ``ORT_ENABLE_ALL`` for reference;
* recalibration: ``normfuse.recalibrate(path, folder, mode=..., check=False)``, the whole call
  (model load, passes, statistics written); each figure is the best of ``--repeats`` rounds
  (``--no-cache``: one round).

Results go to ``benchmarks/results/RECALIBRATE_ONNX.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import normfuse  # noqa: E402


def resnet50(path: Path) -> None:
    import torch

    from models.zoo import build_full

    model = build_full("resnet").eval()
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (torch.randn(2, 3, 64, 64),),
        buf,
        dynamo=False,
        do_constant_folding=False,
        input_names=["x"],
        dynamic_axes={"x": {0: "n"}},
    )
    onnx.save(onnx.load_from_string(buf.getvalue()), path)


def write_batches(folder: Path, count: int, batch: int, shape: tuple[int, ...]) -> None:
    folder.mkdir()
    for i in range(count):
        rng = np.random.default_rng(1000 + i)
        x = (rng.standard_normal((batch, *shape)) * 1.7 + 0.4).astype(np.float32)
        np.savez(folder / f"{i:05d}.npz", x=x)


def inference(path: Path, folder: Path, level: str) -> None:
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for f in sorted(folder.glob("*.npz")):
        with np.load(f) as data:
            session.run(None, {"x": data["x"]})


def best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(
    name: str, path: Path, folder: Path, repeats: int, rows: list[str], only: str | None
) -> None:
    def recal(**kw: object) -> Callable[[], object]:
        return lambda: normfuse.recalibrate(str(path), folder, check=False, progress=False, **kw)

    plain = best(lambda: inference(path, folder, "disable"), repeats)
    cases = [
        ("inference, ORT_DISABLE_ALL", lambda: inference(path, folder, "disable")),
        ("inference, ORT_ENABLE_ALL", lambda: inference(path, folder, "all")),
        ("--mode batch", recal(mode="batch")),
        ("--mode batch --workers 2", recal(mode="batch", workers=2)),
        ("--mode sequential (cache)", recal()),
        ("--mode sequential --cache-mb 0 (all to disk)", recal(cache_mb=0)),
        ("--mode sequential --no-cache", recal(cache=False)),
    ]
    for label, fn in cases:
        if (
            only
            and not label.startswith("inference")
            and not any(w in label for w in only.split(","))
        ):
            continue
        rounds = 1 if label.endswith("--no-cache") else repeats  # the slow one: once
        seconds = plain if label.endswith("DISABLE_ALL") else best(fn, rounds)
        rows.append(f"| {name} | {label} | {seconds:.2f} | {seconds / plain:.2f}x |")
        print(rows[-1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--small-batches", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", default=None, help="runs whose label holds one of these (a,b)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/RECALIBRATE_ONNX.md")
    args = parser.parse_args()
    rows = [
        "| model | run | seconds | vs inference (ORT_DISABLE_ALL) |",
        "|---|---|---:|---:|",
    ]
    with tempfile.TemporaryDirectory(prefix="normfuse-bench-") as tmp:
        work = Path(tmp)
        small = work / "small"
        write_batches(small, args.small_batches, 1, (3, 32, 32))
        measure(
            f"resnet_small, {args.small_batches} x 1 image",
            ROOT / "models/resnet_small.onnx",
            small,
            args.repeats,
            rows,
            args.only,
        )
        path = work / "resnet50.onnx"
        resnet50(path)
        data = work / "data"
        write_batches(data, args.images // args.batch, args.batch, (3, args.size, args.size))
        name = f"ResNet-50, {args.images} images {args.size}x{args.size} in batches of {args.batch}"
        measure(name, path, data, args.repeats, rows, args.only)
    text = "\n".join(
        [
            "# ONNX recalibration vs inference (CPU)",
            "",
            f"`python benchmarks/recalibrate_onnx.py --images {args.images} --batch {args.batch} "
            f"--size {args.size} --repeats {args.repeats}` on {platform.processor() or 'CPU'}, "
            f"{os.cpu_count()} cores, onnxruntime {ort.__version__}; best of {args.repeats}.",
            "",
            *rows,
            "",
        ]
    )
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
