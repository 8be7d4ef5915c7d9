"""How much error folding adds to fp16 models, normfuse beside its peers, in one run.

Usage: ``python benchmarks/fp16.py [--batches 16] [--out benchmarks/results]``

For three families of ``models/zoo.py`` exported in fp16 (legacy exporter, BN kept), each tool
folds the model, and the result is compared, as the RMS error relative to the reference's RMS,
averaged over seeded batches:

* against the fp32 original (the model the fp16 one was converted from), and
* against the fp16 model's own exact function (its fp16 weights run in fp32 on the same fp16
  inputs): this isolates what the fold itself adds.

The unfolded fp16 model is listed as the baseline: any fold of fp16 weights rounds them a
second time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

from benchmarks.compare import PEERS, RUNTIME_SUBGRAPH, _session, run_tool  # noqa: E402

FAMILIES = ["resnet", "mobilenet_v2", "efficientnet"]


def upcast(src: Path, dst: Path) -> None:
    """The fp16 model computed in fp32: fp16 values are exact in fp32."""
    model = onnx.load(src)

    def fix(t: onnx.TensorProto) -> None:
        if t.data_type == onnx.TensorProto.FLOAT16:
            t.CopyFrom(
                onnx.numpy_helper.from_array(
                    onnx.numpy_helper.to_array(t).astype(np.float32), t.name
                )
            )

    for t in model.graph.initializer:
        fix(t)
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                fix(a.t)
            if node.op_type == "Cast" and a.name == "to" and a.i == onnx.TensorProto.FLOAT16:
                a.i = onnx.TensorProto.FLOAT
    for v in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
            v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    onnx.save(model, dst)


def rms_error(path: Path, xs: list[np.ndarray], refs: list[np.ndarray]) -> float:
    sess = _session(path)
    name = sess.get_inputs()[0].name
    errors = []
    for x, ref in zip(xs, refs, strict=True):
        out = sess.run(None, {name: x.astype(np.float16)})[0].astype(np.float64)
        errors.append(np.sqrt(np.mean((out - ref) ** 2)) / np.sqrt(np.mean(ref**2)))
    return float(np.mean(errors))


def errors(work: Path, tools: list[str], batches: int) -> dict[str, dict[str, float]]:
    """RMS errors of the unfolded fp16 model and of each tool's fold, against both references."""
    rng = np.random.default_rng(0)
    xs = [
        rng.standard_normal((1, 3, 32, 32)).astype(np.float16).astype(np.float32)
        for _ in range(batches)
    ]
    out: dict[str, dict[str, float]] = {}
    for label, ref_path in (("fp32", work / "fp32.onnx"), ("exact", work / "exact.onnx")):
        ref = _session(ref_path)
        refs = [ref.run(None, {ref.get_inputs()[0].name: x})[0].astype(np.float64) for x in xs]
        out[label] = {"unfolded": rms_error(work / "fp16.onnx", xs, refs)} | {
            t: rms_error(work / f"{t}.onnx", xs, refs) for t in tools
        }
    return out


def main() -> None:
    import importlib.util

    import torch

    from models import build, zoo

    parser = argparse.ArgumentParser(description="fold error on fp16 models")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=24, help="model realisations per family")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    tools = ["normfuse"] + [t for t, m in PEERS.items() if importlib.util.find_spec(m) is not None]
    ranked = [t for t in tools if t not in RUNTIME_SUBGRAPH]
    results: dict[str, list[dict[str, dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="normfuse-fp16-") as tmp:
        work = Path(tmp)
        for name in FAMILIES:
            results[name] = []
            for seed in range(args.seeds):
                build.export(
                    zoo.build(name, seed),
                    torch.randn(1, 3, 32, 32),
                    work / "fp32.onnx",
                    dynamo=False,
                )
                build.export(
                    zoo.build(name, seed).half(),
                    torch.randn(1, 3, 32, 32).half(),
                    work / "fp16.onnx",
                    dynamo=False,
                )
                upcast(work / "fp16.onnx", work / "exact.onnx")
                for tool in tools:
                    run_tool(tool, work / "fp16.onnx", work / f"{tool}.onnx")
                results[name].append(errors(work, tools, args.batches))
                print(
                    f"{name} seed {seed}: "
                    + ", ".join(
                        f"{t} {results[name][-1]['fp32'][t]:.2e}" for t in ["unfolded", *tools]
                    ),
                    flush=True,
                )
    lines = [
        "| model | reference | unfolded fp16 | " + " | ".join(tools) + " |",
        "|---" * (len(tools) + 3) + "|",
    ]
    for name, runs in results.items():
        for label, title in (("fp32", "fp32 original"), ("exact", "fp16 model, exact")):
            mean = {t: float(np.mean([r[label][t] for r in runs])) for t in ["unfolded", *tools]}
            wins = {
                t: sum(r[label][t] <= min(r[label][u] for u in ranked) for r in runs)
                for t in ranked
            }
            best = min(mean[t] for t in ranked)
            cells = []
            for t in tools:
                cell = f"{mean[t]:.2e}"
                if t in ranked:
                    cell = (
                        f"**{cell}**" if mean[t] == best else cell
                    ) + f" ({wins[t]}/{len(runs)})"
                cells.append(cell)
            lines.append(
                f"| {name} | {title} | {mean['unfolded']:.2e} | " + " | ".join(cells) + " |"
            )
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "FP16.md").write_text(
        "# Error folding adds to fp16 models\n\n"
        f"`python benchmarks/fp16.py` (one run): RMS error of the output relative to the "
        f"reference's RMS, {args.batches} seeded batches, onnxruntime CPU at ORT_DISABLE_ALL; "
        f"mean over {args.seeds} model realisations (seeds) per family, and in brackets on how "
        "many seeds the tool's fold was the closest of all folds. Lowest mean in bold. "
        "onnxoptimizer computes the folded weights at run time (not a fold of constants) and "
        "matches the unfolded model; it is not ranked.\n\n" + text + "\n"
    )
    (args.out / "fp16.json").write_text(
        json.dumps({"tools": tools, "results": results}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
