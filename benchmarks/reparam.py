"""Structural reparameterization on timm's train-time models (issue 22), one command.

    python benchmarks/reparam.py [--size 64] [--seconds 10] [--models repvgg_a0,...] [--parts onnx,torch]

For each model (pretrained=False, random weights, BN statistics randomised, eval mode):

(a) the train-form export, BN kept (legacy exporter, ``TrainingMode.PRESERVE``, no constant
    folding); (b) ``normfuse.fold(a, reparam=True)``; (c) the export of timm's
    ``reparameterize_model(model)`` (eval export with constant folding: the usual deploy
    export). Reported: nodes and Conv count, max error relative to the output's max against the
    train-form PyTorch model (float32; beside it the train-form export's own error), and
    onnxruntime CPU latency at ORT_ENABLE_ALL and ORT_DISABLE_ALL, batch 1, one thread, median
    of interleaved runs. What onnxruntime's own optimizer leaves of (a) is counted too (onnxsim
    and onnxslim when installed).

PyTorch, on the same model and input: ``normfuse.fold(model, reparam=True)`` (an
``nn.Module``: submodules holding a block become their merged GraphModules) against timm's
``reparameterize_model``:
convolution calls (and whether they are the same convolutions), max error relative to the
output's max against the train form's float64 forward (beside it the train form's own float32
error), fold time, and CPU latency of the forward (one thread, ``torch.inference_mode``, median
and minimum of interleaved runs) of the train form, normfuse's result and timm's deploy form,
with the ratios. Writes ``benchmarks/results/REPARAM.md``.
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = ["repvgg_a0", "repvgg_b0", "mobileone_s0", "fastvit_t8", "repghostnet_050", "repvit_m1"]
OUT = ROOT / "benchmarks" / "results" / "REPARAM.md"


def randomise_bn(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)


def export(model, x, *, keep_bn: bool) -> bytes:
    import torch

    buf = io.BytesIO()
    kw = (
        dict(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
        if keep_bn
        else dict(training=torch.onnx.TrainingMode.EVAL, do_constant_folding=True)
    )
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, **kw)
    return buf.getvalue()


def counts(data: bytes) -> tuple[int, int, int]:
    import onnx

    nodes = onnx.load_from_string(data).graph.node
    ops = [n.op_type for n in nodes if n.op_type not in ("Identity", "Constant")]
    return len(ops), ops.count("Conv"), ops.count("BatchNormalization")


def conv_signature(data: bytes) -> list[tuple]:
    """Every Conv's weight shape and attributes, sorted: equal lists are equal convolutions."""
    import onnx

    model = onnx.load_from_string(data)
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "Conv":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            shape = dims.get(n.input[1], ())
            k = len(shape) - 2
            out.append(
                (
                    shape,
                    tuple(attrs.get("strides", [1] * k)),
                    tuple(attrs.get("pads", [0] * 2 * k)),
                    tuple(attrs.get("dilations", [1] * k)),
                    attrs.get("group", 1),
                    len(n.input) > 2,
                )
            )
    return sorted(out)


def session(data: bytes, level: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def ort_optimized_convs(data: bytes) -> int:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "opt.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = path
        ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        import onnx

        nodes = onnx.load(path).graph.node
        return sum("Conv" in n.op_type for n in nodes)  # Conv and onnxruntime's FusedConv


def latencies(forms: dict[str, bytes], x: np.ndarray, seconds: float) -> dict[str, float]:
    """Median ms per run, interleaved over forms and levels (random order, each timed run after
    an untimed one of the same session), for about ``seconds`` in all."""
    sessions = {
        (f, lvl): session(d, lvl)
        for f, d in forms.items()
        for lvl in ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL")
    }
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():  # warm-up
        s.run(None, feeds[k])
    times: dict[tuple[str, str], list[float]] = {k: [] for k in sessions}
    order = list(sessions)
    rng = np.random.default_rng(0)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or min(len(v) for v in times.values()) < 5:
        # a random order each round, and each timed run right after an untimed one of the same
        # session: a run that follows another model's (cold caches) would bias the order
        rng.shuffle(order)
        for k in order:
            s = sessions[k]
            s.run(None, feeds[k])
            t = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append(time.perf_counter() - t)
    out = {f"{f}/{lvl}": float(np.median(v)) * 1e3 for (f, lvl), v in times.items()}
    out.update({f"{f}/{lvl}/min": float(np.min(v)) * 1e3 for (f, lvl), v in times.items()})
    return out


def latencies_apart(forms: dict[str, bytes], x: np.ndarray, seconds: float) -> dict[str, float]:
    """:func:`latencies` in a fresh process that imports neither torch nor timm (torch's
    OpenMP threads spin after a forward pass and take cores from onnxruntime)."""
    import json
    import subprocess

    with tempfile.TemporaryDirectory() as d:
        for f, data in forms.items():
            (Path(d) / f"{f}.onnx").write_bytes(data)
        np.save(Path(d) / "x.npy", x)
        cmd = [sys.executable, __file__, "--latency-dir", d, "--seconds", str(seconds)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(out.astype(np.float64) - ref)) / np.max(np.abs(ref)))


def torch_convs(model, x) -> list[tuple]:
    """Every convolution call of a forward: weight shape, stride, padding, dilation, groups;
    sorted (equal lists: the same convolutions, biases aside)."""
    import torch

    calls: list[tuple] = []

    def hook(m, _args, _out) -> None:
        pad = m.padding if isinstance(m.padding, str) else tuple(m.padding)
        calls.append((tuple(m.weight.shape), tuple(m.stride), pad, tuple(m.dilation), m.groups))

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, torch.nn.modules.conv._ConvNd)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return sorted(calls)


def torch_latencies(models: dict, x, seconds: float) -> dict[str, float]:
    """Median and minimum ms of each model's forward, one thread, interleaved in random order,
    each timed run right after an untimed one of the same model."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {k: [] for k in models}
    order = list(models)
    rng = np.random.default_rng(0)
    try:
        with torch.inference_mode():
            for m in models.values():
                m(x)
            end = time.perf_counter() + seconds
            while time.perf_counter() < end or min(len(v) for v in times.values()) < 5:
                rng.shuffle(order)
                for k in order:
                    models[k](x)
                    t = time.perf_counter()
                    models[k](x)
                    times[k].append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    out = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    out.update({f"{k}/min": float(np.min(v)) * 1e3 for k, v in times.items()})
    return out


def bench_torch(model, deployed, x, ref64: np.ndarray, seconds: float) -> dict:
    """normfuse's PyTorch reparam of ``model`` against timm's ``deployed`` form."""
    import torch

    import normfuse

    t = time.perf_counter()
    merged, report = normfuse.fold(model, example_inputs=x, reparam=True, check=False)
    row: dict = {"fold_s": time.perf_counter() - t, "kind": type(merged).__name__}
    blocks = [e for e in report.entries if e.direction == "reparam" and e.op_type in ("add", "sub")]
    row["blocks"] = (
        sum(e.status == "applied" for e in blocks),
        sum(e.status == "skipped" for e in blocks),
    )
    seqs = [e for e in report.entries if e.direction == "reparam" and e not in blocks]
    row["seqs"] = (
        sum(e.status == "applied" and "Norm" not in e.op_type for e in seqs),
        sum(e.status == "skipped" for e in seqs),
    )
    forms = {"train": model, "normfuse": merged, "timm": deployed}
    sigs = {k: torch_convs(m, x) for k, m in forms.items()}
    row["convs"] = {k: len(v) for k, v in sigs.items()}
    row["same_convs"] = sigs["normfuse"] == sigs["timm"]
    bn_type = torch.nn.modules.batchnorm._BatchNorm
    row["bns"] = {k: sum(isinstance(x, bn_type) for x in m.modules()) for k, m in forms.items()}
    with torch.no_grad():
        for k, m in forms.items():
            row[f"err_{k}"] = rel_err(m(x).double().numpy(), ref64)
    row["lat"] = torch_latencies(forms, x, seconds)
    return row


def bench(name: str, size: int, seconds: float, parts: tuple[str, ...] = ("onnx", "torch")) -> dict:
    import torch

    import normfuse
    from tests.timm_shim import import_timm

    timm = import_timm()
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    randomise_bn(model, 1)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x).double().numpy()
        ref64 = copy.deepcopy(model).double()(x.double()).numpy()
    row: dict = {"model": name, "noise64": rel_err(ref, ref64)}
    deployed = reparameterize_model(copy.deepcopy(model)).eval()
    if "torch" in parts:
        row["torch"] = bench_torch(model, deployed, x, ref64, seconds)
    if "onnx" not in parts:
        return row
    a = export(model, x, keep_bn=True)
    t = time.perf_counter()
    folded, report = normfuse.fold(a, check=False, reparam=True)
    b = folded if isinstance(folded, bytes) else folded.SerializeToString()
    entries = report.entries
    row["fold_s"] = time.perf_counter() - t
    merged = [e for e in entries if e.direction == "reparam"]
    row["blocks"] = (
        sum(e.status == "applied" for e in merged),
        sum(e.status == "skipped" for e in merged),
    )
    with torch.no_grad():
        ref_c = deployed(x).double().numpy()
    c = export(deployed, x, keep_bn=False)
    forms = {"a": a, "b": b, "c": c}
    xn = x.numpy()
    for f, data in forms.items():
        row[f"counts_{f}"] = counts(data)
        s = session(data, "ORT_DISABLE_ALL")
        row[f"err_{f}"] = rel_err(s.run(None, {s.get_inputs()[0].name: xn})[0], ref)
    row["err_c_torch"] = rel_err(ref_c, ref)
    row["ort_opt_convs_a"] = ort_optimized_convs(a)
    row["same_convs"] = conv_signature(b) == conv_signature(c)
    row["lat"] = latencies_apart(forms, xn, seconds)
    return row


def fmt_torch(r: dict) -> str:
    if "error" in r or "torch" not in r:
        return f"| {r['model']} | {r.get('error', 'not run')} |" + " |" * 9
    t = r["torch"]
    c, lat = t["convs"], t["lat"]
    return (
        f"| {r['model']} | {c['train']} → {c['normfuse']} / {c['timm']} | "
        f"{'yes' if t['same_convs'] else 'no'} | {t['bns']['normfuse']} / {t['bns']['timm']} | "
        f"{t['blocks'][0]} / {t['blocks'][1]} | "
        f"{t['err_normfuse']:.1e} / {t['err_timm']:.1e} / {t['err_train']:.1e} | "
        f"{t['fold_s']:.1f} | "
        f"{lat['train']:.2f} / {lat['normfuse']:.2f} / {lat['timm']:.2f} | "
        f"{lat['train/min']:.2f} / {lat['normfuse/min']:.2f} / {lat['timm/min']:.2f} | "
        f"{lat['normfuse'] / lat['train']:.2f} / {lat['normfuse'] / lat['timm']:.2f} |"
    )


def fmt_row(r: dict) -> str:
    if "error" in r or "lat" not in r:
        return f"| {r['model']} | export or run failed: {r['error']} |" + " |" * 12
    lat = r["lat"]
    ca, cb, cc = r["counts_a"], r["counts_b"], r["counts_c"]
    return (
        f"| {r['model']} | {ca[0]} / {ca[1]} / {ca[2]} | {cb[0]} / {cb[1]} / {cb[2]} | "
        f"{cc[0]} / {cc[1]} / {cc[2]} | {'yes' if r['same_convs'] else 'no'} | "
        f"{r['ort_opt_convs_a']} | {r['blocks'][0]} / {r['blocks'][1]} | "
        f"{r['err_a']:.1e} | {r['err_b']:.1e} | {r['err_c']:.1e} | "
        f"{lat['a/ORT_ENABLE_ALL']:.2f} / {lat['b/ORT_ENABLE_ALL']:.2f} / {lat['c/ORT_ENABLE_ALL']:.2f} | "
        f"{lat['a/ORT_DISABLE_ALL']:.2f} / {lat['b/ORT_DISABLE_ALL']:.2f} / {lat['c/ORT_DISABLE_ALL']:.2f} | "
        + " / ".join(f"{lat[f'{f}/ORT_ENABLE_ALL/min']:.2f}" for f in "abc")
        + " | "
        + " / ".join(f"{lat[f'{f}/ORT_DISABLE_ALL/min']:.2f}" for f in "abc")
        + " |"
    )


def write(rows: list[dict], size: int, path: Path) -> None:
    import onnxruntime
    import torch

    lines = [
        "# Structural reparameterization (benchmarks/reparam.py)",
        "",
        f"timm train-time models, random weights, BN statistics randomised, input 1x3x{size}x{size}, "
        f"float32; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, CPU, one "
        "thread, median (and minimum) of interleaved runs in a process without torch, each timed "
        "run after an untimed one of the same session, in random order; on a shared machine the "
        "medians carry the neighbours' load, the minima show what the graphs cost. (a) the "
        "train-form export with BN kept; (b) "
        "`normfuse fold --reparam` of (a); (c) the export of timm's `reparameterize_model(model)` "
        "(eval export, constant folding). Nodes exclude Identity/Constant. Error: max |y - y_torch| "
        "/ max |y_torch| against the train-form PyTorch model in float32 (whose own float32 noise "
        "against float64 is listed below the table).",
        "",
        "| model | (a) nodes / Conv / BN | (b) | (c) | (b) convs = (c) convs | ORT-optimized (a) Conv "
        "| blocks merged / skipped "
        "| err (a) | err (b) | err (c) | ms ENABLE_ALL a / b / c | ms DISABLE_ALL a / b / c "
        "| min ms ENABLE_ALL | min ms DISABLE_ALL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [fmt_row(r) for r in rows if "lat" in r or "error" in r]
    lines += [
        "",
        "## PyTorch: `normfuse.fold(model, reparam=True)` vs timm's `reparameterize_model`",
        "",
        "The same models and input. normfuse folds the BNs and merges the branches of the "
        "train-form `nn.Module` (each submodule holding a block becomes its merged torch.fx "
        "GraphModule; the model keeps its class); timm switches each block to its deploy form. Conv: convolution calls of one forward, train "
        "form → normfuse / timm; 'same convs': the sorted lists of every call's weight shape, "
        "stride, padding, dilation and groups are equal. BN: BatchNorm modules left (timm's deploy form keeps the BNs of convs outside its reparameterizable blocks; normfuse folds them). Error: max |y - y64| / max |y64| "
        "against the train form's float64 forward, of normfuse / timm / the train form itself "
        "(float32). Latency: the forward in float32, one thread, `torch.inference_mode`, median "
        "and minimum of interleaved runs in random order (each timed run after an untimed one "
        "of the same model); ratios of the medians.",
        "",
        "| model | Conv train → normfuse / timm | same convs | BN normfuse / timm "
        "| blocks merged / skipped "
        "| err normfuse / timm / train | fold s | ms median train / normfuse / timm "
        "| ms min train / normfuse / timm | normfuse ÷ train / ÷ timm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [fmt_torch(r) for r in rows]
    lines += ["", "Float32 noise of the train-form model against its float64 run:", ""]
    lines += [f"- {r['model']}: {r['noise64']:.1e}" for r in rows if "noise64" in r]
    lines += [
        "",
        "'(b) convs = (c) convs': the sorted list of every Conv's weight shape, strides, pads, "
        "dilations, group and bias is the same in (b) and (c): the same convolutions; what else "
        "differs is in the node counts.",
    ]
    lines += [
        "",
        "onnxruntime's optimizer (column 'ORT-optimized (a) Conv': Conv and FusedConv left by "
        "ENABLE_EXTENDED) folds BN into convs and fuses activations, but merges no branches. "
        "onnxsim and onnxslim are not installed here: not measured.",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10.0, help="latency time per model")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--parts", default="onnx,torch", help="onnx, torch or both")
    p.add_argument("--latency-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.latency_dir:  # the child of latencies_apart
        import json

        d = Path(args.latency_dir)
        forms = {f.stem: f.read_bytes() for f in sorted(d.glob("*.onnx"))}
        print(json.dumps(latencies(forms, np.load(d / "x.npy"), args.seconds)))
        return
    import warnings

    warnings.filterwarnings("ignore")
    rows = []
    for name in args.models.split(","):
        t = time.perf_counter()
        try:
            row = bench(name, args.size, args.seconds, tuple(args.parts.split(",")))
        except Exception as exc:  # record and go on
            traceback.print_exc()
            row = {"model": name, "error": f"{type(exc).__name__}: {str(exc)[:120]}"}
        rows.append(row)
        if "lat" in row or "error" in row:
            print(fmt_row(row), flush=True)
        print(fmt_torch(row), f"({time.perf_counter() - t:.0f} s)", flush=True)
        write(rows, args.size, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
