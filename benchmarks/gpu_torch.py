"""normfuse's PyTorch frontend on models that live on the GPU, in one command.

Usage, from the repository root on the GPU machine (docs/gpu.md)::

    python3 benchmarks/gpu_torch.py --out DIR [--device cuda|cpu] [--quick]

Dry run, anywhere (tests/test_gpu_script.py runs it)::

    python benchmarks/gpu_torch.py --device cpu --quick --out DIR

For ResNet-50, MobileNet V2 and EfficientNet-B0 at full size (``models/zoo.py``'s
``build_full``: random weights, BN statistics moved by training passes; ``--quick``: the tiny
ResNet of ``zoo.build``), in fp32 and fp16 (fp32 only on the CPU), as an ``nn.Module`` and as
an ``ExportedProgram``, all on ``--device``: ``normfuse.fold(model, example_inputs=(x,))``
with a batch of 8 at 224x224 (quick: 2 at 32x32) on the device, its own check included. Then
it records what a user relies on: the folded model's parameters and buffers stay on the device
and in the dtype they had, the folded output against the original's on the same input, and
both against a float64 run of the same weights (the model's own rounding beside the fold's).
TF32 is off for the comparison (``torch.backends``), so fp32 figures are float32 arithmetic.

Writes ``DIR/torch_gpu.json`` and ``DIR/TORCH_GPU.md``. Exit status 0 when every fold ran,
kept device and dtype, and folded at least one BN; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import normfuse  # noqa: E402
from models import zoo  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def one(name: str, dtype: torch.dtype, form: str, device: str, quick: bool) -> dict[str, Any]:
    build = zoo.build if quick else zoo.build_full
    shape = (2, 3, 32, 32) if quick else (8, 3, 224, 224)
    row: dict[str, Any] = {"model": name, "dtype": str(dtype).removeprefix("torch."), "form": form}
    try:
        model = build(name).eval().to(device, dtype)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        if form == "ExportedProgram":
            model = torch.export.export(model, (x,))
        start = time.perf_counter()
        folded, report = normfuse.fold(model, example_inputs=(x,))
        row["seconds"] = time.perf_counter() - start
        run_o = model.module() if form == "ExportedProgram" else model
        run_f = folded.module() if form == "ExportedProgram" else folded
        with torch.no_grad():
            y_o, y_f = run_o(x), run_f(x)
            exact = build(name).eval().to(device, torch.float64)(x.double())
        tensors = [*run_f.parameters(), *run_f.buffers()]
        floats = [t for t in tensors if t.is_floating_point()]
        row.update(
            summary=report.summary().splitlines()[0],
            folded=sum(1 for e in report.entries if e.status == "applied"),
            devices=sorted({str(t.device) for t in tensors}),
            dtypes=sorted({str(t.dtype).removeprefix("torch.") for t in floats}),
            folded_vs_original=_rel(y_f, y_o),
            original_vs_float64=_rel(y_o, exact),
            folded_vs_float64=_rel(y_f, exact),
        )
        kept = row["devices"] == [str(x.device)] and row["dtypes"] == [row["dtype"]]
        row["status"] = "passed" if kept and row["folded"] > 0 else "failed"
    except Exception as exc:  # recorded, the next model still runs
        row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
        traceback.print_exc(limit=6)
    return row


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# normfuse's PyTorch frontend on models on the " + result["device"],
        "",
        f"`{result['command']}` on {result['started']}; {result['gpu']}; torch {result['torch']}",
        "",
        "| model | dtype | form | status | folded | devices, dtypes after | folded vs original "
        "| original vs float64 | folded vs float64 | fold+check s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r["status"] == "error":
            lines.append(
                f"| {r['model']} | {r['dtype']} | {r['form']} | error: {r['error']} | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['form']} | {r['status']} | {r['folded']} "
            f"| {', '.join(r['devices'])}; {', '.join(r['dtypes'])} "
            f"| {r['folded_vs_original']:.2e} | {r['original_vs_float64']:.2e} "
            f"| {r['folded_vs_float64']:.2e} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: torch sees no CUDA device. Note: run with --device cpu for the dry run")
        return 2
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    names = ["resnet"] if args.quick else ["resnet", "mobilenet_v2", "efficientnet"]
    dtypes = [torch.float32] + ([torch.float16] if args.device.startswith("cuda") else [])
    result: dict[str, Any] = {
        "command": "python3 benchmarks/gpu_torch.py " + " ".join(argv or sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU",
        "torch": torch.__version__,
        "rows": [],
    }
    for name in names:
        for dtype in dtypes:
            for form in ("nn.Module", "ExportedProgram"):
                row = one(name, dtype, form, args.device, args.quick)
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "torch_gpu.json").write_text(json.dumps(result, indent=1))
    (args.out / "TORCH_GPU.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(r["status"] == "passed" for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
