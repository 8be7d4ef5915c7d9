"""BatchNorm recalibration of a ResNet-50 on CPU: normfuse, ``torch.optim.swa_utils.update_bn``
and an fvcore-style loop, in one run; time and distance from an exact float64 reference.

Usage: ``python benchmarks/recalibrate.py [--images 2048] [--batch 32] [--size 64] [--repeats 1]``
(``--repeats``: rounds with the tools in turn, each tool's best time counts)

* model: ``models/zoo.py`` ``build_full("resnet")`` (random weights, BN statistics moved by
  training passes, gamma/beta random), one copy per tool, all starting from the same state;
* data: synthetic images, batch ``i`` drawn from a generator seeded with ``i`` (the same data for
  every tool, nothing stored);
* tools: ``normfuse.recalibrate`` (float64 Chan merge, unbiased variance as PyTorch keeps it);
  ``update_bn`` (train mode, ``momentum=None``: the mean of per-batch means and unbiased
  variances); fvcore's ``update_bn_stats`` as written there (``momentum=1.0``, running averages
  of each batch's statistics);
* reference: the inputs each BatchNorm sees in a train-mode forward (what ``update_bn`` and
  fvcore see), accumulated in float64 as sums of ``x - K`` and ``(x - K)^2`` with ``K`` the first
  batch's per-channel mean, then ``var = (S2 - S1^2/n) / (n - 1)``: an algorithm independent of
  normfuse's;
* figures: wall and CPU time of each tool and their ratios to ``update_bn``'s; per tool the largest
  relative difference from the reference over all BatchNorms, ``max|stat - ref| / max|ref|`` per
  layer, for running_mean and running_var.

Results go to ``benchmarks/results/RECALIBRATE.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

import normfuse  # noqa: E402
from models.zoo import build_full  # noqa: E402


class Images:
    """``count`` synthetic images in batches; batch ``i`` always the same (seeded by ``i``)."""

    def __init__(self, count: int, batch: int, size: int) -> None:
        self.count, self.batch, self.size = count, batch, size

    def __len__(self) -> int:
        return (self.count + self.batch - 1) // self.batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            n = min(self.batch, self.count - i * self.batch)
            gen = torch.Generator().manual_seed(1000 + i)
            yield torch.randn((n, 3, self.size, self.size), generator=gen) * 1.7 + 0.4


def bns(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def fvcore_update_bn_stats(model: nn.Module, data: Images) -> None:
    """fvcore.nn.precise_bn.update_bn_stats, as written there (without its logging)."""
    layers = [m for _, m in bns(model)]
    if not layers:
        return
    was_training = model.training
    model.train()
    momentum_actual = [bn.momentum for bn in layers]
    for bn in layers:
        bn.momentum = 1.0
    running_mean = [torch.zeros_like(bn.running_mean) for bn in layers]
    running_var = [torch.zeros_like(bn.running_var) for bn in layers]
    with torch.no_grad():
        for ind, inputs in enumerate(data):
            model(inputs)
            for i, bn in enumerate(layers):
                running_mean[i] += (bn.running_mean - running_mean[i]) / (ind + 1)
                running_var[i] += (bn.running_var - running_var[i]) / (ind + 1)
    for i, bn in enumerate(layers):
        bn.running_mean = running_mean[i]
        bn.running_var = running_var[i]
        bn.momentum = momentum_actual[i]
    model.train(was_training)


def reference(model: nn.Module, data: Images) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Exact float64 statistics of what every BatchNorm sees in a train-mode forward."""
    sums: dict[str, list] = {}

    def hook(name: str):
        def pre(m: nn.Module, args: tuple) -> None:
            x = args[0].detach().to(torch.float64)
            dims = [0, *range(2, x.ndim)]
            if name not in sums:
                sums[name] = [x.mean(dims), 0, 0.0, 0.0]
            k = sums[name][0].view(1, -1, *([1] * (x.ndim - 2)))
            d = x - k
            sums[name][1] += x.numel() // x.shape[1]
            sums[name][2] = sums[name][2] + d.sum(dims)
            sums[name][3] = sums[name][3] + (d * d).sum(dims)

        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in bns(model)]
    model.train()
    with torch.no_grad():
        for x in data:
            model(x)
    model.eval()
    for h in handles:
        h.remove()
    out = {}
    for name, (k, n, s1, s2) in sums.items():
        out[name] = (k + s1 / n, (s2 - s1 * s1 / n) / (n - 1))
    return out


def distance(model: nn.Module, ref: dict) -> tuple[float, float]:
    worst_mean = worst_var = 0.0
    for name, m in bns(model):
        mean, var = ref[name]
        worst_mean = max(
            worst_mean, float((m.running_mean.double() - mean).abs().max() / mean.abs().max())
        )
        worst_var = max(
            worst_var, float((m.running_var.double() - var).abs().max() / var.abs().max())
        )
    return worst_mean, worst_var


def timed(fn) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads): on a shared machine the CPU
    time moves less with the load than the wall time."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="rounds; each tool's best time")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/RECALIBRATE.md")
    args = parser.parse_args()
    data = Images(args.images, args.batch, args.size)
    base = build_full("resnet").eval()
    print(f"ResNet-50, {len(bns(base))} BatchNorms, {args.images} images {args.size}x{args.size}")
    print(f"batches of {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    with torch.no_grad():  # warm-up: one batch through the kernels
        base(next(iter(Images(args.batch, args.batch, args.size))))
    # and normfuse's torch side imported, as torch.optim.swa_utils already is: a process pays
    # that once, not per recalibration
    normfuse.recalibrate(copy.deepcopy(base), Images(2, 2, args.size), progress=False)
    runs = {
        "normfuse": lambda m: normfuse.recalibrate(m, data, progress=False),
        "update_bn": lambda m: torch.optim.swa_utils.update_bn(data, m),
        "fvcore": lambda m: fvcore_update_bn_stats(m, data),
    }
    tools = list(runs)
    times: dict[str, list[float]] = {t: [] for t in tools}
    cpu: dict[str, list[float]] = {t: [] for t in tools}
    models: dict[str, nn.Module] = {}
    for r in range(args.repeats):  # round robin, the order rotated: load spikes hit all alike
        for tool in tools[r % 3 :] + tools[: r % 3]:
            models[tool] = copy.deepcopy(base)
            wall, used = timed(lambda tool=tool: runs[tool](models[tool]))
            times[tool].append(wall)
            cpu[tool].append(used)
            print(f"round {r + 1}: {tool:10} {wall:.1f} s (CPU {used:.1f} s)")
    seconds = {t: min(v) for t, v in times.items()}
    cpu_seconds = {t: min(v) for t, v in cpu.items()}
    start = time.perf_counter()
    ref = reference(copy.deepcopy(base), data)
    ref_seconds = time.perf_counter() - start
    print(f"reference  {ref_seconds:.1f} s")
    rows = []
    for tool, model in models.items():
        mean, var = distance(model, ref)
        ratio = seconds[tool] / seconds["update_bn"]
        cpu_ratio = cpu_seconds[tool] / cpu_seconds["update_bn"]
        rows.append((tool, seconds[tool], ratio, cpu_seconds[tool], cpu_ratio, mean, var))
        print(
            f"{tool:10} x{ratio:.2f} of update_bn (CPU x{cpu_ratio:.2f}), "
            f"max rel diff mean {mean:.2e} var {var:.2e}"
        )
    nf = rows[0]
    verdict = (
        f"normfuse at {nf[2]:.2f}x update_bn's wall time and {nf[4]:.2f}x its CPU time (target "
        f"<= 1.1x: {'met' if min(nf[2], nf[4]) <= 1.1 else 'missed'}), "
        f"{max(nf[5], nf[6]):.1e} from the reference "
        f"(target <= 1e-6: {'met' if max(nf[5], nf[6]) <= 1e-6 else 'missed'})"
    )
    print(verdict)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# BatchNorm recalibration: ResNet-50 on CPU",
        "",
        f"`python benchmarks/recalibrate.py --images {args.images} --batch {args.batch} "
        f"--size {args.size} --repeats {args.repeats}`: {args.images} synthetic images at {args.size}x{args.size} in "
        f"batches of {args.batch}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}, load average {load:.1f} at the end (a shared machine: times "
        f"move with the load: {args.repeats} round(s), the tools in turn, each tool's best time; "
        "all times: "
        + "; ".join(f"{t} " + ", ".join(f"{x:.1f}" for x in v) for t, v in times.items())
        + " s). Reference: float64 statistics of the inputs each "
        "BatchNorm sees in a train-mode forward, from shifted sums (an algorithm independent of "
        "normfuse's), unbiased variance. Difference: per BatchNorm `max|stat - ref| / max|ref|`, "
        "the largest over all 53.",
        "",
        "| tool | seconds | time vs update_bn | CPU seconds | CPU time vs update_bn "
        "| max rel diff, running_mean | max rel diff, running_var |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for tool, sec, ratio, used, cpu_ratio, mean, var in rows:
        lines.append(
            f"| {tool} | {sec:.1f} | {ratio:.2f}x | {used:.1f} | {cpu_ratio:.2f}x "
            f"| {mean:.1e} | {var:.1e} |"
        )
    lines += [
        "",
        f"Reference pass: {ref_seconds:.1f} s. {verdict}.",
        "",
        "update_bn and fvcore average per-batch statistics: their variance leaves out the spread "
        "of the batch means (large where a BatchNorm sees few values per batch, as the last "
        "stage's 2x2 maps do), and fvcore's mean of means weights a short last batch like a "
        "full one. normfuse merges counts, means and centred second moments exactly in float64; "
        "torch's BatchNorms run their own training forward during its pass (momentum 1, so "
        "that each call leaves that batch's mean and variance in the buffers), so they see the "
        "reference's inputs bit for bit, and what remains of its difference is the float32 "
        "rounding of each batch's statistics and of the final ones.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
