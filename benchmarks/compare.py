"""normfuse beside onnxsim, onnxslim, onnxoptimizer, the onnxscript rewriter and onnxruntime's
offline optimizer: coverage, exactness, speed and memory, measured on the same files in one run.

Usage::

    pip install onnxsim onnxslim onnxoptimizer matplotlib   # the peers (any subset) and the chart
    python benchmarks/compare.py [--quick] [--repeat 3] [--out benchmarks/results]

Models are built here with torch (no downloads, random weights, BN statistics moved by
training passes): the families of ``models/zoo.py`` at their full torchvision sizes (ResNet-50,
MobileNet V2, MobileNet V3 Large, EfficientNet-B0, RegNetX-400MF, ShuffleNet V2, MnasNet,
VGG-16-BN, DenseNet-121, GoogLeNet, ConvNeXt-Tiny, DeepLabV3 and FCN on ResNet-50; 9 MB to
553 MB), exported by the legacy exporter (``TrainingMode.PRESERVE``) and the dynamo exporter
(``optimize=False``), fp16 exports of three of them, the bundled sample models, small
hand-written ONNX graphs with patterns the peers miss (BN inside a model-local function, a
decomposed BN as Mul/Add after a conv, ...), and a 2.4 GB model with external data.
``--quick`` builds the families at a tiny width instead and skips the 2.4 GB model.

Every tool runs in its own process (``benchmarks/peers.py``) on every model, alternating, so
drift hits all alike; each repeat starts one tool later in the order, and the page cache's
dirty pages are written back (``sync``) before every run, so no tool pays for another's output.
Per model and tool: BatchNormalization nodes left, total nodes, ``onnx.checker`` (full check)
pass, max relative error against the original on onnxruntime
CPU at ``ORT_DISABLE_ALL`` (fp16 models: against the fp32 original), the time from file in to
file out (imports excluded; median of ``--repeat`` runs) and its ratio to the I/O
floor (``onnx.load`` + ``onnx.save`` of the same file), and peak RSS minus the RSS after the
tool's imports. Writes ``compare.json``, ``RESULTS.md`` and, with matplotlib, ``compare.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from benchmarks.peers import API_TOOLS  # noqa: E402

PEERS = {
    "onnxsim": "onnxsim",
    "onnxslim": "onnxslim",
    "onnxoptimizer": "onnxoptimizer",
    "onnxscript": "onnxscript",
    "ort-basic": "onnxruntime",
}
FP16_FAMILIES = ["resnet", "mobilenet_v2", "efficientnet"]


def _count(model: onnx.ModelProto) -> tuple[int, int]:
    """(BatchNormalization nodes, all nodes), subgraphs and functions included."""
    bn = nodes = 0

    def walk(graph_nodes):
        nonlocal bn, nodes
        for n in graph_nodes:
            nodes += 1
            bn += n.op_type == "BatchNormalization"
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g.node)
                for g in a.graphs:
                    walk(g.node)

    walk(model.graph.node)
    for f in model.functions:
        walk(f.node)
    return bn, nodes


# ------------------------------------------------------------------ models
def _synthetic(work: Path) -> dict[str, Path]:
    """Patterns the peers miss: BN inside a function, decomposed BN (Mul/Add) after a conv."""
    rng = np.random.default_rng(0)
    c = 16

    def t(name, arr):
        return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)

    gamma, beta = rng.uniform(0.5, 2, c), rng.normal(size=c)
    mean, var = rng.normal(size=c), rng.uniform(0.1, 4, c)
    w = rng.normal(size=(c, c, 3, 3)) * 0.1
    out = {}
    # 1. Conv -> BN in a model-local function, called twice
    const = lambda name, arr: helper.make_node("Constant", [], [name], value=t(name, arr))  # noqa: E731
    fn = helper.make_function(
        "blocks",
        "ConvBN",
        ["x"],
        ["y"],
        [
            const("w", w),
            const("g", gamma),
            const("b", beta),
            const("m", mean),
            const("v", var),
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"]),
        ],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [
            helper.make_node("ConvBN", ["input"], ["h"], domain="blocks"),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("ConvBN", ["r"], ["output"], domain="blocks"),
        ],
        "function_bn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, c, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, c, 16, 16])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("blocks", 1)],
        functions=[fn],
        ir_version=10,
    )
    out["function_bn"] = work / "function_bn.onnx"
    onnx.save(model, out["function_bn"])
    # 2. Conv -> Mul -> Add (a BN decomposed by a converter) -> Relu, twice
    s = gamma / np.sqrt(var + 1e-3)
    nodes, inits, prev = [], [], "input"
    for i in range(2):
        inits += [
            t(f"w{i}", w),
            t(f"s{i}", s.reshape(c, 1, 1)),
            t(f"t{i}", (beta - mean * s).reshape(c, 1, 1)),
        ]
        nodes += [
            helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Mul", [f"c{i}", f"s{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"t{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], ["output" if i else "r0"]),
        ]
        prev = "r0"
    graph = helper.make_graph(
        nodes,
        "decomposed_bn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, c, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, c, 16, 16])],
        inits,
    )
    out["decomposed_bn"] = work / "decomposed_bn.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10),
        out["decomposed_bn"],
    )

    def conv_then(
        name, tail_nodes, tail_inits, elem=TensorProto.FLOAT, wdtype=np.float32, size=16, opset=17
    ):
        inits = [numpy_helper.from_array(w.astype(wdtype), "w"), *tail_inits]
        nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]), *tail_nodes]
        graph = helper.make_graph(
            nodes,
            name,
            [helper.make_tensor_value_info("input", elem, [1, c, size, size])],
            [helper.make_tensor_value_info("output", elem, [1, c, size, size])],
            inits,
        )
        out[name] = work / f"{name}.onnx"
        onnx.save(
            helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10),
            out[name],
        )

    bn_inits = [t("g", gamma), t("b", beta), t("m", mean), t("v", var)]
    # 3. fp16 data, fp32 BN statistics (legal since BatchNormalization-15)
    conv_then(
        "fp16_conv_fp32_bn",
        [helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["output"])],
        bn_inits,
        elem=TensorProto.FLOAT16,
        wdtype=np.float16,
        opset=15,
    )
    # 4. a (C,) constant on NCHW acts on W, not on channels (here W == C)
    conv_then(
        "mul_last_axis",
        [helper.make_node("Mul", ["c", "k"], ["output"])],
        [t("k", rng.uniform(0.5, 2, c))],
    )
    # 5. BN in training mode normalises with batch statistics: must not fold
    conv_then(
        "bn_training_mode",
        [
            helper.make_node(
                "BatchNormalization",
                ["c", "g", "b", "m", "v"],
                ["output", "running_mean", "running_var"],
                training_mode=1,
            )
        ],
        bn_inits,
        opset=15,
    )
    return out


def build_models(work: Path, quick: bool, families: list[str] | None = None) -> list[dict]:
    """The run's models: the families at full size (tiny with ``quick``), both exporters, fp16
    exports of three, the bundled and hand-written pattern models, and (not ``quick``) the
    external-data model above 2 GB. ``families``: only these families, nothing else."""
    import torch

    from models import build, zoo

    shape = (1, 3, 32, 32) if quick else (1, 3, 224, 224)
    items: list[dict] = []
    for name in sorted(zoo.FAMILIES):
        if families is not None and name not in families:
            continue
        model = zoo.build(name) if quick else zoo.build_full(name)
        for exporter in ("legacy", "dynamo"):
            path = work / f"{name}_{exporter}.onnx"
            build.export(model, torch.randn(*shape), path, dynamo=exporter == "dynamo")
            items.append({"model": f"{name} ({exporter})", "path": path, "kind": "family"})
        if name in FP16_FAMILIES:  # the same weights, rounded to fp16
            path = work / f"{name}_fp16.onnx"
            build.export(model.half(), torch.randn(*shape).half(), path, dynamo=False)
            items.append(
                {
                    "model": f"{name} (legacy, fp16)",
                    "path": path,
                    "kind": "fp16",
                    "fp32": work / f"{name}_legacy.onnx",
                }
            )
        del model
    if families is not None:
        return items
    for p in sorted((ROOT / "models").glob("*.onnx")):
        items.append({"model": f"bundled {p.stem}", "path": p, "kind": "pattern"})
    for name, p in _synthetic(work).items():
        items.append({"model": name, "path": p, "kind": "fp16" if "fp16" in name else "pattern"})
    if not quick:
        items.append(
            {
                "model": "wide convs, external data",
                "path": build.wide_conv_model(work, 2048, 16)[0],
                "kind": "huge",
            }
        )
    return items


# ------------------------------------------------------------------ measuring
def run_tool(tool: str, src: Path, dst: Path, external: bool = False) -> dict:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "peers.py"), tool, str(src), str(dst)]
        + (["--external"] if external else []),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def _session(path: Path):
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def max_rel_error(reference: Path, candidate: Path, cast_to=None) -> float:
    """Max |cand - ref| / max|ref| over all outputs, on seeded normal inputs (fp32 reference)."""
    ref, cand = _session(reference), _session(candidate)
    rng = np.random.default_rng(0)
    kinds = {"tensor(float16)": np.float16, "tensor(double)": np.float64}
    feeds = {
        i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(
            kinds.get(i.type, np.float32)
        )
        for i in ref.get_inputs()
    }
    cand_feeds = {k: v.astype(cast_to) for k, v in feeds.items()} if cast_to else feeds
    worst = 0.0
    for r, c in zip(ref.run(None, feeds), cand.run(None, cand_feeds), strict=True):
        r64, c64 = np.asarray(r, np.float64), np.asarray(c, np.float64)
        if not np.all(np.isfinite(c64)):
            return float("inf")
        worst = max(worst, float(np.abs(r64 - c64).max() / max(np.abs(r64).max(), 1e-30)))
    return worst


def _checker(path: Path) -> bool:
    try:
        onnx.checker.check_model(str(path), full_check=True)
        return True
    except Exception:
        return False


def measure(items: list[dict], tools: list[str], repeat: int, work: Path) -> list[dict]:
    rows = []
    for item in items:
        src: Path = item["path"]
        reps = 1 if item["kind"] == "huge" else repeat
        runs: dict[str, list[dict]] = {t: [] for t in ["floor", *tools]}
        order = list(runs)
        for rep in range(reps):
            # alternate, each repeat starting one tool later, so that no tool always runs
            # right after the same one; sync first, so that no run pays for the writeback of
            # the previous run's output
            for tool in order[rep % len(order) :] + order[: rep % len(order)]:
                dst = work / f"out_{tool}.onnx"
                for stale in work.glob(f"out_{tool}.onnx*"):
                    stale.unlink()
                os.sync()
                runs[tool].append(run_tool(tool, src, dst, item["kind"] == "huge"))
                if tool != "floor" and rep == reps - 1:
                    runs[tool][-1]["_out"] = dst
                else:
                    dst.unlink(missing_ok=True)
        floor = statistics.median(r["seconds"] for r in runs["floor"] if "seconds" in r)
        bn_before, nodes_before = _count(onnx.load(src, load_external_data=False))
        size = sum(p.stat().st_size for p in src.parent.glob(src.name + "*"))  # with its .data
        print(f"{item['model']}: {bn_before} BN, {size / 1e6:.1f} MB", file=sys.stderr)
        for tool in tools:
            results = runs[tool]
            last = results[-1]
            row = {
                "model": item["model"],
                "kind": item["kind"],
                "tool": tool,
                "size_mb": size / 1e6,
                "bn_before": bn_before,
                "nodes_before": nodes_before,
            }
            if "error" in last:
                row["error"] = last["error"]
                rows.append(row)
                continue
            out: Path = last.pop("_out")
            secs = statistics.median(r["seconds"] for r in results)
            folded = onnx.load(out, load_external_data=False)
            row["bn_after"], row["nodes_after"] = _count(folded)
            row["seconds"] = secs
            row["ratio"] = secs / floor
            row["work_rss_mb"] = (last["peak_rss"] - last["baseline_rss"]) / 1e6
            row["peak_rss_mb"] = last["peak_rss"] / 1e6
            row["checker"] = _checker(out)
            if "phases" in last:
                row["phases"] = last["phases"]
            try:
                if item["kind"] == "fp16" and "fp32" in item:
                    row["max_rel"] = max_rel_error(item["fp32"], out, cast_to=np.float16)
                    row["fp16_original_rel"] = max_rel_error(item["fp32"], src, cast_to=np.float16)
                else:
                    row["max_rel"] = max_rel_error(src, out)
            except Exception as exc:  # the output does not run on onnxruntime
                row["run_error"] = str(exc).splitlines()[0][:200]
            for produced in work.glob(out.name + "*"):
                produced.unlink()
            rows.append(row)
    return rows


# ------------------------------------------------------------------ reporting
def _fmt(row: dict) -> str:
    if "error" in row:
        return f"| {row['model']} | {row['tool']} | failed: {row['error'][:80]} | | | | | |"
    err = row.get("max_rel")
    err_s = "does not run" if "run_error" in row else (f"{err:.1e}" if err is not None else "")
    if verdict(row) == "wrong":
        err_s = f"**{err_s} (wrong)**"
    return (
        f"| {row['model']} | {row['tool']} | {row['bn_before']} → {row['bn_after']} | {row['nodes_after']} "
        f"| {'yes' if row['checker'] else '**no**'} | {err_s} | {row['ratio']:.2f}× | {row['work_rss_mb']:.0f} MB |"
    )


WRONG = {"fp16": 5e-2}  # max relative error above which an output counts as wrong
WRONG_DEFAULT = 1e-3


def verdict(row: dict) -> str:
    """``ok``, ``failed`` (the tool raised), ``invalid`` (checker or onnxruntime refuse it) or ``wrong``."""
    if "error" in row:
        return "failed"
    if not row.get("checker") or "run_error" in row:
        return "invalid"
    if row.get("max_rel") is not None and row["max_rel"] > WRONG.get(row["kind"], WRONG_DEFAULT):
        return "wrong"
    return "ok"


def bn_left(row: dict) -> int:
    """BN nodes left; a failed, invalid or wrong output folded nothing."""
    return row["bn_after"] if verdict(row) == "ok" else row["bn_before"]


def summary(rows: list[dict], tools: list[str]) -> list[str]:
    lines = [
        "| tool | models with BN left | BN left (all models) | failed / invalid / wrong outputs | worst fp32 error (valid outputs) "
        "| fp16 error vs fp32 original (median) | time / I/O floor, median over models > 20 MB | work memory / model size (largest model) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    largest = max((r["size_mb"] for r in rows), default=1)
    for tool in tools:
        mine = [r for r in rows if r["tool"] == tool]
        good = [r for r in mine if verdict(r) == "ok"]
        counts = {
            v: sum(1 for r in mine if verdict(r) == v) for v in ("failed", "invalid", "wrong")
        }
        fp32 = [r["max_rel"] for r in good if r["kind"] != "fp16" and r.get("max_rel") is not None]
        fp16 = [r["max_rel"] for r in good if r["kind"] == "fp16" and "fp16_original_rel" in r]
        big = [r["ratio"] for r in mine if "ratio" in r and r["size_mb"] > 20]
        mem = [
            r["work_rss_mb"] / r["size_mb"]
            for r in mine
            if "work_rss_mb" in r and r["size_mb"] == largest
        ]
        nan = float("nan")
        lines.append(
            f"| {tool} | {sum(1 for r in mine if bn_left(r) > 0)}/{len(mine)} | {sum(bn_left(r) for r in mine)} "
            f"| {counts['failed']} / {counts['invalid']} / {counts['wrong']} | {max(fp32, default=nan):.1e} "
            f"| {statistics.median(fp16) if fp16 else nan:.1e} | {statistics.median(big) if big else nan:.2f}× "
            f"| {mem[0] if mem else nan:.2f}× |"
        )
    return lines


#: Tools that replace BN by a runtime subgraph computing the folded weights at inference
#: (Cast/Sqrt/Div/Mul before each conv) rather than folded constants: in fp16 they match the
#: unfolded model by construction and are not ranked on fp16 error.
RUNTIME_SUBGRAPH = {"onnxoptimizer"}


def targets(rows: list[dict], tools: list[str], fp16_runs: dict | None) -> list[str]:
    """Issue 6's targets, each with normfuse's figure and ``met`` or ``missed``."""
    peers = [t for t in tools if t != "normfuse" and t not in API_TOOLS]
    mine = {r["model"]: r for r in rows if r["tool"] == "normfuse"}
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["tool"]] = r
    out = ["| target | normfuse | verdict |", "|---|---|---|"]

    def add(target: str, figure: str, ok: bool) -> None:
        out.append(f"| {target} | {figure} | {'met' if ok else '**missed**'} |")

    inf = float("inf")
    best = {
        m: min((bn_left(t[p]) for p in peers if p in t), default=inf) for m, t in by_model.items()
    }
    worse = [m for m, t in by_model.items() if bn_left(t["normfuse"]) > best[m]]
    fewer = [m for m, t in by_model.items() if bn_left(t["normfuse"]) < best[m]]
    add(
        "coverage: no more BN left than the best peer on every model",
        f"more on {len(worse)}/{len(by_model)} models, fewer on {len(fewer)}",
        not worse,
    )
    fp32 = [r.get("max_rel") for r in mine.values() if r["kind"] != "fp16"]
    worst = max((e for e in fp32 if e is not None), default=float("nan"))
    add(
        "exactness: fp32 max relative error <= 1e-5 everywhere",
        f"{worst:.1e}",
        worst <= 1e-5 and all(verdict(r) == "ok" for r in mine.values()),
    )
    if fp16_runs:
        ranked = [t for t in fp16_runs["tools"] if t not in RUNTIME_SUBGRAPH]
        lost = []
        for family, runs in fp16_runs["results"].items():
            mean = {t: sum(r["fp32"][t] for r in runs) / len(runs) for t in ranked}
            if mean["normfuse"] > min((mean[t] for t in ranked if t != "normfuse"), default=inf):
                lost.append(family)
        seeds = len(next(iter(fp16_runs["results"].values())))
        add(
            f"fp16 error vs the fp32 original no worse than any peer's (benchmarks/fp16.py, mean of {seeds} seeds per family)",
            f"lowest on {len(fp16_runs['results']) - len(lost)}/{len(fp16_runs['results'])} families"
            + (f" (not on {', '.join(lost)})" if lost else ""),
            not lost,
        )
    single = [
        m
        for m, t in by_model.items()
        if t["normfuse"]["kind"] == "fp16"
        and "fp16_original_rel" in t["normfuse"]
        and t["normfuse"]["max_rel"]
        > min(
            (
                t[p]["max_rel"]
                for p in peers
                if p in t and verdict(t[p]) == "ok" and p not in RUNTIME_SUBGRAPH
            ),
            default=inf,
        )
    ]
    n16 = sum(1 for t in by_model.values() if "fp16_original_rel" in t["normfuse"])
    out.append(
        "| fp16 in this run: one model realisation and one input each (max relative error; "
        "too noisy to rank, see the row above) "
        f"| lowest on {n16 - len(single)}/{n16} fp16 models | not a verdict |"
    )
    big = {m: r for m, r in mine.items() if r["size_mb"] > 20 and "ratio" in r}
    if big:
        med = statistics.median(r["ratio"] for r in big.values())
        add("speed: median time <= 1.2x the I/O floor, models > 20 MB", f"{med:.2f}x", med <= 1.2)
        slower = [
            m
            for m in big
            if "ort-basic" in by_model[m]
            and big[m]["seconds"] >= by_model[m]["ort-basic"].get("seconds", float("inf"))
        ]
        add(
            "speed: faster than onnxruntime's offline optimizer on every model > 20 MB",
            f"slower on {len(slower)}/{len(big)}",
            not slower,
        )
    allmed = statistics.median(r["ratio"] for r in mine.values() if "ratio" in r)
    add(
        "speed: median time <= 1.2x the I/O floor, all models (KB-sized ones: fixed cost of a few ms)",
        f"{allmed:.2f}x",
        allmed <= 1.2,
    )
    for label, huge, bound in (
        ("in-memory models > 20 MB", False, 1.5),
        (">2 GB external-data model", True, 0.5),
    ):
        sel = [
            r
            for r in mine.values()
            if (r["kind"] == "huge") == huge and r["size_mb"] > 20 and "work_rss_mb" in r
        ]
        if sel:
            ratio = max(r["work_rss_mb"] / r["size_mb"] for r in sel)
            add(
                f"memory: peak RSS after imports <= {bound}x the model size, {label}",
                f"{ratio:.2f}x",
                ratio <= bound,
            )
    return out


def api_targets(rows: list[dict]) -> list[str]:
    """Issue 20's targets: each API path against the command's internal path (``normfuse``)
    and onnxruntime's offline optimizer, measured in the same run."""
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["tool"]] = r
    out = [
        "| model | MB | "
        + " | ".join(f"{t} time / memory" for t in API_TOOLS[:4])
        + " | api-load / onnxruntime | command with its check: start-up, load, fold, check, save (s)"
        " | check / one session per model |",
        "|---|---|" + "---|" * 7,
    ]
    nan = float("nan")
    worst_time: dict[str, float] = {}
    worst_mem: dict[str, float] = {}
    vs_ort: list[tuple[float, float]] = []
    check_cost: list[float] = []
    for model, tools in by_model.items():
        cli = tools.get("normfuse", {})
        if "seconds" not in cli:
            continue
        cells = []
        for tool in API_TOOLS[:4]:
            r = tools.get(tool, {})
            if "seconds" not in r:
                cells.append("—")
                continue
            t = r["seconds"] / cli["seconds"]
            extra = (r["work_rss_mb"] - cli["work_rss_mb"]) / r["size_mb"]
            worst_time[tool] = max(worst_time.get(tool, 0.0), t)
            worst_mem[tool] = max(worst_mem.get(tool, -inf_), extra)
            cells.append(f"{t:.2f}× / {extra:+.2f}")
        api, ort = tools.get("api-load", {}), tools.get("ort-basic", {})
        ratio = api["seconds"] / ort["seconds"] if "seconds" in api and "seconds" in ort else nan
        if ratio == ratio:
            vs_ort.append((cli["size_mb"], ratio))
        check = tools.get("cli-check", {})
        phases = check.get("phases") or {}
        parts = [phases.get(k, nan) for k in ("load", "fold", "check", "save")]
        startup = check.get("seconds", nan) - sum(parts)  # interpreter, imports, the rest
        ph = ", ".join(f"{v:.2f}" for v in (startup, *parts))
        cost = phases.get("check", nan) / phases.get("one session per model", nan)
        if cost == cost:
            check_cost.append(cost)
        out.append(
            f"| {model} | {cli['size_mb']:.0f} | {' | '.join(cells)} | {ratio:.2f}× | {ph} "
            f"| {cost:.2f}× |"
        )
    out += [
        "",
        "Time: the API path's over the command's internal path; memory: the API path's work "
        "memory minus the command's, in model sizes (0 = the same; in-memory forms hold the "
        "caller's model and return a new one). Check / one session per model: the check's "
        "time over building and running one onnxruntime session from each model's file "
        "(`ORT_DISABLE_ALL`), timed right after it.",
        "",
        "| target (issue 20) | figure | verdict |",
        "|---|---|---|",
    ]

    def add(target: str, figure: str, ok: bool) -> None:
        out.append(f"| {target} | {figure} | {'met' if ok else '**missed**'} |")

    for tool, t in worst_time.items():
        add(f"{tool} within 1.1× of the command's path, every model", f"worst {t:.2f}×", t <= 1.1)
    for tool, m in worst_mem.items():
        bound = 0.2 if tool in ("api-path", "api-load") else 1.0
        add(
            f"{tool} memory: at most {bound} model sizes above the command's",
            f"worst {m:+.2f}",
            m <= bound,
        )
    big = [r for size, r in vs_ort if size > 20]
    if big:
        med = statistics.median(big)
        add("api-load median time <= 0.7× onnxruntime's, models > 20 MB", f"{med:.2f}×", med <= 0.7)
        slower = sum(1 for r in big if r >= 1.0)
        add(
            "api-load slower than onnxruntime on no model > 20 MB",
            f"{slower}/{len(big)}",
            not slower,
        )
    if check_cost:
        worst = max(check_cost)
        add(
            "the check costs at most one session per model (build + run), every model",
            f"{statistics.median(check_cost):.2f}× median, worst {worst:.2f}×",
            worst <= 1.0,
        )
    return out


inf_ = float("inf")


def chart(rows: list[dict], tools: list[str], path: Path) -> bool:
    if importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    left = [sum(bn_left(r) for r in rows if r["tool"] == t) for t in tools]
    total = sum(r["bn_before"] for r in rows if r["tool"] == tools[0])
    colors = ["#2a7" if t == "normfuse" else "#999" for t in tools]
    axes[0].bar(tools, left, color=colors)
    axes[0].set_title(f"BatchNormalization left (of {total}) — lower is better")
    big = [
        [r["ratio"] for r in rows if r["tool"] == t and r["size_mb"] > 20 and "ratio" in r]
        for t in tools
    ]
    axes[1].bar(tools, [statistics.median(b) if b else 0 for b in big], color=colors)
    axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[1].set_title("time / (onnx.load + onnx.save), models > 20 MB")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


LATENCY_MODELS = (
    "resnet (legacy)",
    "resnet (dynamo)",
    "mobilenet_v2 (legacy)",
    "efficientnet (legacy)",
)


def latency(items: list[dict], work: Path) -> list[dict]:
    """Inference latency of original vs normfuse-folded models, both ORT levels, on CPU and,
    where onnxruntime's CUDA provider loads, on CUDA."""
    from normfuse.core.report import Report
    from normfuse.onnxgraph import io as onnx_io
    from normfuse.onnxgraph.fold import FoldOptions, run_fold
    from normfuse.runtime.bench import measure_latency
    from normfuse.runtime.sessions import select_provider

    providers = ["cpu"] + (["cuda"] if select_provider("auto")[1] == "CUDA" else [])
    rows = []
    for item in items:
        if item["model"] not in LATENCY_MODELS:
            continue
        loaded = onnx_io.load(item["path"], lazy=True)
        run_fold(loaded.model, Report(), FoldOptions(), None, loaded.take_proto())
        folded = onnx_io.save(loaded.model, work / "latency_folded.onnx", force=True)
        big = item["path"].stat().st_size > 20e6
        for provider in providers:
            results = measure_latency(
                [item["path"], folded],
                provider=provider,
                opt_levels=("disable", "all"),
                warmup=3 if big and provider == "cpu" else 20,
                reps=15 if big and provider == "cpu" else 200,
            )
            for level in ("disable", "all"):
                orig, fold = (r for r in results if r.opt_level == level)
                rows.append(
                    {
                        "model": item["model"],
                        "provider": provider.upper(),
                        "level": level,
                        "original_ms": orig.median_ms,
                        "folded_ms": fold.median_ms,
                        "ratio": fold.median_ms / orig.median_ms,
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="normfuse beside its peers")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny-width families and no >2 GB model (minutes instead of an hour)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per tool and model (median; the >2 GB model: 1)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--api",
        action="store_true",
        help="also the Python API's paths and the command with its check (issue 20)",
    )
    parser.add_argument(
        "--peers",
        default=None,
        help="only these peers, comma-separated (default: every one installed)",
    )
    parser.add_argument(
        "--families",
        default=None,
        help="only these zoo families, comma-separated (no pattern models, no 2 GB model)",
    )
    parser.add_argument(
        "--from-json",
        action="store_true",
        help="rewrite RESULTS.md and the chart from the saved compare.json (and fp16.json) only",
    )
    args = parser.parse_args()
    tools = ["normfuse", *(API_TOOLS if args.api else [])] + [
        t
        for t, mod in PEERS.items()
        if importlib.util.find_spec(mod) is not None
        and (args.peers is None or t in args.peers.split(","))
    ]
    families = args.families.split(",") if args.families else None
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        saved = json.loads((args.out / "compare.json").read_text())
        tools, rows, lat = saved["tools"], saved["rows"], saved["latency"]
    else:
        with tempfile.TemporaryDirectory(prefix="normfuse-compare-") as tmp:
            work = Path(tmp)
            items = build_models(work, args.quick, families)
            rows = measure(items, tools, args.repeat, work)
            lat = latency(items, work)
        (args.out / "compare.json").write_text(
            json.dumps({"tools": tools, "rows": rows, "latency": lat}, indent=1, default=str)
        )
    fp16_json = args.out / "fp16.json"
    fp16_runs = json.loads(fp16_json.read_text()) if fp16_json.exists() else None
    md = [
        "# normfuse beside its peers",
        "",
        f"Tools: {', '.join(tools)}. One run of `python benchmarks/compare.py`"
        f"{' --quick' if args.quick else ''}; CPU, onnxruntime `ORT_DISABLE_ALL` for errors.",
        "",
        "## Summary",
        "",
        *summary(rows, tools),
        "",
        "A BN counts as left when the tool left it or when its output is failed, invalid or wrong "
        "(a max relative error above 1e-3, fp16: 5e-2): a wrong fold removes nodes but is no fold. "
        "`bn_training_mode` must keep its BN (batch statistics). Work memory is peak RSS (VmHWM) "
        "minus the RSS after the tool's imports.",
        "",
        "## Targets (issue 6)",
        "",
        *targets(rows, tools, fp16_runs),
        "",
        *(
            ["## The Python API's paths (issue 20)", "", *api_targets(rows), ""]
            if any(t in tools for t in API_TOOLS)
            else []
        ),
        "## Inference latency, original vs folded by normfuse (onnxruntime, median)",
        "",
        "CUDA rows appear where onnxruntime's CUDA provider loads; this run: "
        + ("CPU and CUDA." if any(r.get("provider") == "CUDA" for r in lat) else "CPU only."),
        "",
        "| model | provider | onnxruntime level | original | folded | folded / original |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['model']} | {r.get('provider', 'CPU')} | {r['level']} "
            f"| {r['original_ms']:.3f} ms | {r['folded_ms']:.3f} ms "
            f"| {r['ratio']:.2f}× |"
            for r in lat
        ),
        "",
        "## Every model and tool",
        "",
        "| model | tool | BN | nodes after | checker | max rel error | time / floor | work memory |",
        "|---|---|---|---|---|---|---|---|",
        *(_fmt(r) for r in rows),
    ]
    (args.out / "RESULTS.md").write_text("\n".join(md) + "\n")
    drew = chart(rows, tools, args.out / "compare.png")
    print("\n".join(summary(rows, tools)))
    print(f"wrote {args.out / 'RESULTS.md'}{' and compare.png' if drew else ''}")


if __name__ == "__main__":
    main()
