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
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

from benchmarks.compare import PEERS, _session, run_tool  # noqa: E402

FAMILIES = ["resnet", "mobilenet_v2", "efficientnet"]
#: Tools that replace BN by a runtime subgraph computing the folded weights at inference
#: (Cast/Sqrt/Div/Mul before each conv) rather than folded constants: they match the unfolded
#: model by construction and are not ranked.
RUNTIME_SUBGRAPH = {"onnxoptimizer"}


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


def main() -> None:
    import importlib.util

    import torch

    from models import build, zoo

    parser = argparse.ArgumentParser(description="fold error on fp16 models")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    tools = ["normfuse"] + [t for t, m in PEERS.items() if importlib.util.find_spec(m) is not None]
    lines = [
        "| model | reference | unfolded fp16 | " + " | ".join(tools) + " |",
        "|---" * (len(tools) + 3) + "|",
    ]
    with tempfile.TemporaryDirectory(prefix="normfuse-fp16-") as tmp:
        work = Path(tmp)
        for name in FAMILIES:
            build.export(
                zoo.build(name), torch.randn(1, 3, 32, 32), work / "fp32.onnx", dynamo=False
            )
            build.export(
                zoo.build(name).half(),
                torch.randn(1, 3, 32, 32).half(),
                work / "fp16.onnx",
                dynamo=False,
            )
            upcast(work / "fp16.onnx", work / "exact.onnx")
            for tool in tools:
                run_tool(tool, work / "fp16.onnx", work / f"{tool}.onnx")
            rng = np.random.default_rng(0)
            xs = [
                rng.standard_normal((1, 3, 32, 32)).astype(np.float16).astype(np.float32)
                for _ in range(args.batches)
            ]
            for label, ref_path in (
                ("fp32 original", work / "fp32.onnx"),
                ("fp16 model, exact", work / "exact.onnx"),
            ):
                ref = _session(ref_path)
                refs = [
                    ref.run(None, {ref.get_inputs()[0].name: x})[0].astype(np.float64) for x in xs
                ]
                row = [rms_error(work / "fp16.onnx", xs, refs)] + [
                    rms_error(work / f"{t}.onnx", xs, refs) for t in tools
                ]
                folds = [
                    v for t, v in zip(tools, row[1:], strict=True) if t not in RUNTIME_SUBGRAPH
                ]
                best = min(folds)
                cells = [
                    f"**{v:.2e}**" if v == best and t not in RUNTIME_SUBGRAPH else f"{v:.2e}"
                    for t, v in zip(tools, row[1:], strict=True)
                ]
                lines.append(f"| {name} | {label} | {row[0]:.2e} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "FP16.md").write_text(
        "# Error folding adds to fp16 models\n\n"
        f"`python benchmarks/fp16.py` (one run): RMS error relative to the reference's RMS, mean over "
        f"{args.batches} seeded batches; onnxruntime CPU, ORT_DISABLE_ALL. Best fold in bold.\n\n"
        + text
        + "\n"
    )


if __name__ == "__main__":
    main()
