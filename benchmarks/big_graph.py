"""Fold time against node count on graphs of 25k to 200k nodes, in one run (issue 16, item 10).

Usage: ``python benchmarks/big_graph.py [--sizes 25000,50000,100000,200000] [--kinds sparse,...]``

Three compositions, each generated at every size (random weights, BN statistics randomised):

- ``sparse``: a long Relu/Add residual chain with a Conv+BatchNormalization every 1,000 nodes
  (a huge graph with few candidates: the cost is the graph itself);
- ``affine``: Mul-by-a-per-channel-constant then Tanh, over and over (every other node is a
  candidate that cannot fold: the nonlinearity is between it and any linear op);
- ``dense``: Conv 1x1, BatchNormalization, Relu, residual Add blocks (a fold every 4 nodes).

For each: ``normfuse fold --no-check`` as a command (start-up included) and the Python API
path a pipeline takes (``normfuse.fold(path, check=False)`` then ``normfuse.save``), wall time,
microseconds per node, and the per-node time at the largest size over the smallest
(1.0 = linear in the node count). The target (issue 16): a 200k-node graph in under 10 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import normfuse  # noqa: E402

C = 8  # channels


def _bn(rng: np.random.Generator, i: int, src: str, dst: str) -> tuple[onnx.NodeProto, list]:
    params = [
        rng.uniform(0.5, 1.5, C),
        rng.standard_normal(C),
        rng.standard_normal(C),
        rng.uniform(0.5, 2.0, C),
    ]
    names = [f"{k}{i}" for k in ("g", "b", "m", "v")]
    inits = [
        numpy_helper.from_array(p.astype(np.float32), n) for p, n in zip(params, names, strict=True)
    ]
    node = helper.make_node("BatchNormalization", [src, *names], [dst], name=f"bn{i}")
    return node, inits


def build(kind: str, n_nodes: int, path: Path) -> int:
    """Write a ``kind`` graph of about ``n_nodes`` nodes to ``path``; the node count."""
    rng = np.random.default_rng(0)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x, i = "x", 0
    while len(nodes) < n_nodes:
        if kind == "dense" or (kind == "sparse" and i % 500 == 0):
            w = rng.standard_normal((C, C, 1, 1)).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"))
            bn, params = _bn(rng, i, f"c{i}", f"n{i}")
            nodes.append(bn)
            inits += params
            if kind == "dense":
                nodes.append(helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"))
                nodes.append(helper.make_node("Add", [f"r{i}", x], [f"t{i}"], name=f"add{i}"))
            else:
                nodes.append(helper.make_node("Identity", [f"n{i}"], [f"t{i}"], name=f"id{i}"))
        elif kind == "sparse":
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            nodes.append(helper.make_node("Add", [f"r{i}", x], [f"t{i}"], name=f"add{i}"))
        else:  # affine
            k = rng.uniform(0.9, 1.1, (1, C, 1, 1)).astype(np.float32)
            inits.append(numpy_helper.from_array(k, f"k{i}"))
            nodes.append(helper.make_node("Mul", [x, f"k{i}"], [f"m{i}"], name=f"mul{i}"))
            nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i}"], name=f"tanh{i}"))
        x, i = f"t{i}", i + 1
    graph = helper.make_graph(
        nodes,
        f"{kind}_{n_nodes}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, 4, 4])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", C, 4, 4])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return len(nodes)


def _cli(src: Path, out: Path) -> float:
    cmd = [sys.executable, "-m", "normfuse", "fold", str(src), "-o", str(out), "--force"]
    t = time.perf_counter()
    subprocess.run([*cmd, "--no-check"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def _api(src: Path, out: Path) -> float:
    t = time.perf_counter()
    folded, _ = normfuse.fold(str(src), check=False)
    normfuse.save(folded, out, force=True)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="25000,50000,100000,200000")
    parser.add_argument("--kinds", default="sparse,affine,dense")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = args.kinds.split(",")
    print("| graph | nodes | MB | command (s) | µs/node | API path (s) | µs/node |")
    print("|---|---|---|---|---|---|---|")
    per_node: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="normfuse-big-") as tmp:
        for kind in kinds:
            for size in sizes:
                src, out = Path(tmp) / f"{kind}{size}.onnx", Path(tmp) / "out.onnx"
                n = build(kind, size, src)
                cli, api = _cli(src, out), _api(src, out)
                for what, t in (("cli", cli), ("api", api)):
                    per_node.setdefault((kind, what), []).append(t / n)
                mb = src.stat().st_size / 2**20
                print(
                    f"| {kind} | {n:,} | {mb:.1f} | {cli:.2f} | {cli / n * 1e6:.0f} "
                    f"| {api:.2f} | {api / n * 1e6:.0f} |",
                    flush=True,
                )
                src.unlink()
    if len(sizes) > 1:
        print(f"\nper-node time at {sizes[-1]:,} over {sizes[0]:,} nodes (1.00 = linear):")
        for (kind, what), values in per_node.items():
            print(f"  {kind:7s} {what}: {values[-1] / values[0]:.2f}")


if __name__ == "__main__":
    main()
