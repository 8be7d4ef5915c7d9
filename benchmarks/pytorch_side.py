"""The PyTorch side's figures, measured in one run: fold and export parity, low precision, recalibration.

Usage: ``python benchmarks/pytorch_side.py``

* fold: the bundled example models (``models/build.py``) folded as ``nn.Module``, max relative
  error against the original in eval mode, on their example and on 3 random inputs;
* export: ``normfuse.export`` of the same models with both exporters, worst relative error of
  onnxruntime against PyTorch (example + 2 random input sets), BatchNorm left;
* fp16/bf16: one Conv+BN with large BN scales folded by normfuse and by
  ``torch.nn.utils.fusion.fuse_conv_bn_eval``; max weight error against the exact float64
  fold of the same low-precision model, as a ratio normfuse / torch;
* recalibrate: statistics written by ``normfuse.recalibrate`` against statistics computed
  directly over the same BatchNorm inputs.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import normfuse  # noqa: E402
from models import build  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def fold_and_export() -> None:
    print(
        f"{'model':14} {'fold max rel':>13} {'export dynamo':>14} {'export legacy':>14} {'BN left':>8}"
    )
    for name in build.MODELS:
        model, example = build.bundled(name)
        folded, _ = normfuse.fold(model, example_inputs=example)
        gen = torch.Generator().manual_seed(1)
        errors = []
        with torch.no_grad():
            for x in [example, *(torch.randn(example.shape, generator=gen) for _ in range(3))]:
                errors.append(_rel(folded(x), model(x)))
        exported = []
        left = 0
        with tempfile.TemporaryDirectory() as tmp:
            for dynamo in (True, False):
                report = normfuse.export(
                    model, (example,), Path(tmp) / f"{dynamo}.onnx", dynamo=dynamo
                )
                exported.append(report.parity.max_rel if report.parity else float("nan"))
                left += report.after.batchnorm_nodes
        print(f"{name:14} {max(errors):13.2e} {exported[0]:14.2e} {exported[1]:14.2e} {left:8d}")


def low_precision() -> None:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    print(f"\n{'dtype':9} {'normfuse max |dW|':>18} {'torch fusion':>13} {'ratio':>7}")
    for dtype in (torch.float16, torch.bfloat16):
        gen = torch.Generator().manual_seed(3)
        conv, bn = nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
            bn.running_mean.copy_(torch.randn(32, generator=gen))
            bn.running_var.copy_(torch.rand(32, generator=gen) * 0.03 + 0.001)
            bn.weight.copy_(torch.rand(32, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(32, generator=gen))
        low = nn.Sequential(conv, bn).eval().to(dtype)
        exact, _ = normfuse.fold(copy.deepcopy(low).double(), check=False)
        ours, _ = normfuse.fold(copy.deepcopy(low), check=False)
        theirs = fuse_conv_bn_eval(copy.deepcopy(low[0]), copy.deepcopy(low[1]))
        ref = exact[0].weight.detach().double()
        e_ours = float((ours[0].weight.detach().double() - ref).abs().max())
        e_theirs = float((theirs.weight.detach().double() - ref).abs().max())
        print(
            f"{str(dtype).replace('torch.', ''):9} {e_ours:18.3e} {e_theirs:13.3e} {e_ours / e_theirs:7.2f}"
        )


def recalibration() -> None:
    model, example = build.bundled("resnet_small")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(example.shape, generator=gen) * 1.5 + 0.7 for _ in range(16)]
    captured: dict[str, list[torch.Tensor]] = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(
                lambda m, a, n=n: captured.setdefault(n, []).append(a[0].double())
            )
    t0 = time.perf_counter()
    normfuse.recalibrate(model, batches, progress=False)
    seconds = time.perf_counter() - t0
    worst = 0.0
    for n, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            data = torch.cat(captured[n]).transpose(0, 1).reshape(m.num_features, -1)
            worst = max(
                worst, float(((m.running_var.double() - data.var(1)) / data.var(1)).abs().max())
            )
    print(
        f"\nrecalibrate resnet_small, 16 batches: worst relative error of running_var {worst:.2e} ({seconds:.2f} s)"
    )


if __name__ == "__main__":
    fold_and_export()
    low_precision()
    recalibration()
