"""Fold speed against the I/O floor, and exactness over the CNN families, measured in one run.

Usage::

    python benchmarks/bench_fold.py [--repeat 5] [--json out.json] [--skip-families]

What it prints:

1. **Speed** on a ResNet-50-sized model (25.6 M parameters, ~100 MB), exported by both PyTorch
   exporters with BN kept. Each figure is the median of ``--repeat`` runs, alternating:
   ``onnx.load + onnx.save`` (the floor, 1.0x), ``onnx_ir.load + onnx_ir.save``, a byte copy,
   normfuse's fold end to end in process (load, fold, atomic save; no parity check) with the
   API's eager load and with the CLI's lazy load (tensor bytes stay in the file), and
   the ``normfuse fold --no-check`` command (which adds Python start-up).
2. **Exactness and coverage** on the torchvision-style families in ``models/zoo.py``, both
   exporters: BN nodes before/after, max relative error against the original on onnxruntime
   (CPU, ``ORT_DISABLE_ALL``), and fold time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
import onnx_ir as ir  # noqa: E402

import normfuse  # noqa: E402
from normfuse.core.report import Report  # noqa: E402
from normfuse.onnxgraph import io as onnx_io  # noqa: E402
from normfuse.onnxgraph.fold import FoldOptions, run_fold  # noqa: E402


def _export(model, path: Path, exporter: str, shape) -> None:
    import torch

    from models.build import export

    export(model, torch.randn(*shape), path, dynamo=exporter == "dynamo")


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_speed(work: Path, repeat: int) -> list[dict]:
    import torch

    from models.build import randomize_batchnorm
    from models.zoo import ResNet50

    torch.manual_seed(0)
    model = ResNet50()
    randomize_batchnorm(model, torch.randn(2, 3, 64, 64), passes=2)
    rows = []
    for exporter in ("legacy", "dynamo"):
        src = work / f"resnet50_{exporter}.onnx"
        _export(model, src, exporter, (1, 3, 224, 224))
        out = work / "out.onnx"

        def clean() -> None:
            for p in work.glob("out*"):
                p.unlink()

        def floor(src: Path = src, out: Path = out) -> None:
            onnx.save(onnx.load(src), out)

        def ir_io(src: Path = src, out: Path = out) -> None:
            ir.save(ir.load(src), out)

        def copy(src: Path = src, out: Path = out) -> None:
            shutil.copyfile(src, out)

        def fold_api(src: Path = src, out: Path = out) -> None:
            loaded = onnx_io.load(src)
            run_fold(loaded.model, Report(), FoldOptions(), None, loaded.take_proto())
            onnx_io.save(loaded.model, out, force=True)

        def fold_lazy(src: Path = src, out: Path = out) -> None:
            loaded = onnx_io.load(src, lazy=True)
            run_fold(loaded.model, Report(), FoldOptions(), None, loaded.take_proto())
            onnx_io.save(loaded.model, out, force=True)

        def fold_cli(src: Path = src, out: Path = out) -> None:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "normfuse.cli",
                    "fold",
                    str(src),
                    "-o",
                    str(out),
                    "--no-check",
                    "--force",
                ],
                check=True,
                capture_output=True,
            )

        def startup(src: Path = src, out: Path = out) -> None:
            subprocess.run(
                [sys.executable, "-m", "normfuse.cli", "--version"], check=True, capture_output=True
            )

        cases = {
            "onnx load+save (floor)": floor,
            "onnx_ir load+save": ir_io,
            "byte copy": copy,
            "normfuse fold, eager load (the API)": fold_api,
            "normfuse fold, lazy load (the CLI), in process": fold_lazy,
            "normfuse fold (CLI)": fold_cli,
            "CLI start-up alone (normfuse --version)": startup,
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(repeat):
            for name, fn in cases.items():  # alternate, so drift hits every case alike
                clean()
                times[name].append(_time(fn))
        base = statistics.median(times["onnx load+save (floor)"])
        size = src.stat().st_size
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append(
                {
                    "model": f"resnet50 ({exporter})",
                    "size_mb": size / 1e6,
                    "case": name,
                    "median_s": med,
                    "ratio": med / base,
                }
            )
        clean()
    return rows


def bench_families(work: Path) -> list[dict]:
    from models import zoo

    rows = []
    for name in sorted(zoo.FAMILIES):
        model = zoo.build(name)
        for exporter in ("legacy", "dynamo"):
            src = work / f"{name}_{exporter}.onnx"
            _export(model, src, exporter, (1, 3, 32, 32))
            proto = onnx.load(src)
            t = time.perf_counter()
            _, report = normfuse.fold(proto, provider="cpu")
            elapsed = time.perf_counter() - t - report.timings.get("check", 0.0)
            rows.append(
                {
                    "model": name,
                    "exporter": exporter,
                    "bn_before": report.before.batchnorm_nodes,
                    "bn_after": report.after.batchnorm_nodes,
                    "skipped": len(report.skipped),
                    "max_rel": report.parity.max_rel if report.parity else None,
                    "fold_ms": elapsed * 1000,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-families", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    result: dict[str, object] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="normfuse-bench-") as tmp:
        work = Path(tmp)
        if not args.skip_speed:
            speed = bench_speed(work, args.repeat)
            result["speed"] = speed
            print(f"\n## Fold time vs the I/O floor (median of {args.repeat}, alternating)\n")
            print("| model | size | case | median | ratio to floor |")
            print("|---|---|---|---|---|")
            for r in speed:
                print(
                    f"| {r['model']} | {r['size_mb']:.0f} MB | {r['case']} | {r['median_s'] * 1000:.0f} ms | {r['ratio']:.2f}x |"
                )
        if not args.skip_families:
            fam = bench_families(work)
            result["families"] = fam
            print("\n## Exactness and coverage (onnxruntime CPU, ORT_DISABLE_ALL)\n")
            print("| model | exporter | BN before | BN after | skipped | max rel error | fold |")
            print("|---|---|---|---|---|---|---|")
            for r in fam:
                print(
                    f"| {r['model']} | {r['exporter']} | {r['bn_before']} | {r['bn_after']} | {r['skipped']} "
                    f"| {r['max_rel']:.2e} | {r['fold_ms']:.0f} ms |"
                )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
