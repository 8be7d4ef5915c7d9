"""normfuse on timm's architectures, on every path a PyTorch user has (issue 17).

Usage::

    python benchmarks/timm_sweep.py [--quick] [--out DIR] [--models a,b] [--paths p,q]
                                    [--budget S] [--threads N]

Needs timm, installed without touching torch (a bare ``pip install timm`` pulls a CUDA torch)::

    echo "torch==2.13.0" > /tmp/c.txt && python -m pip install -c /tmp/c.txt timm

timm imports torchvision, whose PyPI wheel fails to import on this CPU torch; the stand-ins of
``tests/timm_shim.py`` get around it.

Every model is built with ``pretrained=False`` with random BatchNorm gamma (a fifth negative)
and beta; its statistics come from one training-mode pass over random images with those in
place (so the network is as well conditioned as a trained one; means far from 0, variances far
from 1, as the data make them), with sigma >= |mean| / 10. Frozen and SyncBN variants are made
after that, with timm's own ``freeze_batch_norm_2d``/``convert_sync_batchnorm``. Models run in
eval mode on a small image. Then, for each path:

* ``module``: ``normfuse.fold(model, example_inputs=x)`` (default check);
* ``module_noinputs``: ``normfuse.fold(model)``, no example inputs (nothing to check with);
* ``fx_fuse``: ``torch.fx.experimental.optimization.fuse(model)``, the peer on the module path;
* ``graphmodule``: ``normfuse.fold(torch.fx.symbolic_trace(model), example_inputs=x)``;
* ``exported``: ``normfuse.fold(torch.export.export(model, (x,)))``;
* ``onnx_legacy``: ``torch.onnx.export(..., dynamo=False, training=TrainingMode.PRESERVE)``
  (BatchNormalization kept), then ``normfuse.fold``; ``onnxsim``/``onnxslim`` beside it when
  they import;
* ``onnx_dynamo``: ``torch.onnx.export(..., dynamo=True, optimize=False)``, then
  ``normfuse.fold`` (and the ONNX peers).

Recorded per path: BatchNorms before and after (modules, functional/aten calls, ONNX
BatchNormalization nodes; frozen BN written as Mul/Add is counted apart, as "cmul": Mul nodes
whose other input is computed from weights only), the maximum relative
error ``max|out - ref| / max|ref|`` against a float64 run of the original module, the time of the
fold (check included), normfuse's applied/skipped counts and its most frequent skip reasons, and
any failure (a failing path is recorded, the sweep goes on). A result is flagged WRONG when its
error exceeds 1e-4 and 100x the error of the original float32 model.

Output: a Markdown table on stdout, ``timm_sweep.json`` and ``TIMM.md`` in ``--out``
(default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import io
import json
import logging
import operator
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import fx, nn  # noqa: E402

import normfuse  # noqa: E402
from tests.timm_shim import import_timm  # noqa: E402

WRONG_ABS = 1e-4  # a fold is WRONG above this and above WRONG_FACTOR x the original's own error
WRONG_FACTOR = 100.0

# name, what it exercises, create_model kwargs, transform, image size
Spec = tuple[str, str, dict[str, Any], str | None, int]
MODELS: list[Spec] = [
    # plain Conv-BatchNorm2d (modules)
    ("resnet18", "conv-bn", {}, None, 64),
    ("resnet50d", "conv-bn", {}, None, 64),
    ("resnet10t", "conv-bn", {}, None, 64),
    ("res2net50_26w_4s", "conv-bn, split/cat", {}, None, 64),
    ("seresnext26d_32x4d", "conv-bn, SE", {}, None, 64),
    ("dla34", "conv-bn, tree/cat", {}, None, 64),
    ("hrnet_w18_small", "conv-bn, multi-branch", {}, None, 64),
    # timm's BatchNormAct2d (norm + activation in one module)
    ("efficientnet_b0", "BatchNormAct2d", {}, None, 64),
    ("mobilenetv3_large_100", "BatchNormAct2d", {}, None, 64),
    ("mobilenetv2_100", "BatchNormAct2d", {}, None, 64),
    ("mobilenetv4_conv_small", "BatchNormAct2d", {}, None, 64),
    ("regnety_002", "BatchNormAct2d", {}, None, 64),
    ("regnetx_002", "BatchNormAct2d", {}, None, 64),
    ("cspresnet50", "BatchNormAct2d, cross-stage", {}, None, 64),
    ("cspdarknet53", "BatchNormAct2d, cross-stage", {}, None, 64),
    ("ese_vovnet19b_dw", "BatchNormAct2d, concat", {}, None, 64),
    ("rexnet_100", "BatchNormAct2d", {}, None, 64),
    ("mixnet_s", "BatchNormAct2d, mixed conv", {}, None, 64),
    ("ghostnet_100", "conv-bn, ghost cat", {}, None, 64),
    ("lcnet_050", "BatchNormAct2d", {}, None, 64),
    ("resnext26ts", "BatchNormAct2d (byobnet)", {}, None, 64),
    # frozen BN (timm.layers.freeze_batch_norm_2d) and SyncBatchNorm
    ("resnet18", "frozen BN", {}, "frozen", 64),
    ("efficientnet_b0", "FrozenBatchNormAct2d", {}, "frozen", 64),
    ("regnety_002", "FrozenBatchNormAct2d", {}, "frozen", 64),
    ("resnet18", "SyncBatchNorm", {}, "syncbn", 64),
    ("efficientnet_b0", "SyncBatchNormAct", {}, "syncbn", 64),
    # modules torch.fx cannot trace
    ("tf_efficientnet_lite0", "untraceable (same padding)", {}, None, 64),
    ("tf_mobilenetv3_small_075", "untraceable (same padding)", {}, None, 64),
    ("mobilevit_xxs", "untraceable, BatchNormAct2d", {}, None, 64),
    # BatchNorm1d after Linear on tokens
    ("levit_128s", "BN1d on flattened tokens", {"img_size": 64}, None, 64),
    # BN on a block input (identity branch / pre-activation)
    ("repvgg_a0", "identity-branch BN", {}, None, 64),
    ("resnetv2_50", "pre-activation BN", {}, None, 64),
    ("fastvit_t8", "identity-branch BN (reparam)", {}, None, 64),
    # BN after concatenation
    ("dpn68", "BN after concat", {}, None, 64),
    ("densenet121", "BN after concat", {}, None, 64),
    # depthwise-separable classics
    ("tf_efficientnet_lite0", "untraceable, frozen", {}, "frozen", 64),
    ("mnasnet_100", "BatchNormAct2d", {}, None, 64),
]

QUICK = [
    ("resnet10t", None),
    ("efficientnet_b0", None),
    ("efficientnet_b0", "frozen"),
    ("tf_efficientnet_lite0", None),
    ("levit_128s", None),
    ("repvgg_a0", None),
]

PATHS = [
    "module",
    "module_noinputs",
    "fx_fuse",
    "graphmodule",
    "exported",
    "onnx_legacy",
    "onnx_dynamo",
]

_BN_FUNCS: set[Any] = {
    torch.nn.functional.batch_norm,
    torch.batch_norm,
    torch.ops.aten.batch_norm.default,
    torch.ops.aten._native_batch_norm_legit_no_training.default,
    torch.ops.aten._native_batch_norm_legit.default,
    torch.ops.aten.native_batch_norm.default,
}


# ------------------------------------------------------------------------------------ building


def calibrate(model: nn.Module, size: int, seed: int) -> None:
    """Running statistics from one training-mode pass over random images (momentum 1), so that
    the network stays as well conditioned as a trained one."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 1.0
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed))
    model.train()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom
        model.eval()


def _norms(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "running_mean", None), torch.Tensor)
        and isinstance(getattr(m, "running_var", None), torch.Tensor)
    ]


def randomize(model: nn.Module, size: int, seed: int) -> nn.Module:
    """Random gamma (a fifth negative) and beta, statistics calibrated on random images with
    them in place (means far from 0, variances far from 1, as the data's), sigma >= |mean| / 10.

    Not jittered further: in a 50-layer network every BN that is off by 20 % compounds, the
    activations grow a hundredfold and float32 itself loses 1e-2 of the output (efficientnet_b0).
    Eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _norms(model):
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor):
                c = w.numel()
                sign = torch.where(torch.rand(c, generator=gen) < 0.2, -1.0, 1.0)
                w.copy_((torch.rand(c, generator=gen) * 1.0 + 0.5) * sign)
                b.copy_(torch.randn(c, generator=gen) * 0.2)
    calibrate(model, size, seed + 7)
    with torch.no_grad():
        for m in _norms(model):
            rm, rv = m.running_mean, m.running_var
            # a channel nearly constant on the calibration batch would subtract a large mean
            # from large values and amplify float32 rounding: keep |mean| / sigma <= 10
            rv.copy_(torch.maximum(rv, 0.01 * rm.square() + 1e-3))
    return model.eval()


def build(timm: Any, spec: Spec, seed: int) -> tuple[nn.Module, torch.Tensor]:
    name, _, kwargs, transform, size = spec
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    model = randomize(model, size, seed)
    if transform == "syncbn":
        from timm.layers import convert_sync_batchnorm

        model = convert_sync_batchnorm(model).eval()
    if transform == "frozen":
        from timm.layers import freeze_batch_norm_2d

        model = freeze_batch_norm_2d(model).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


# ------------------------------------------------------------------------------------ measuring


def rel(out: Any, ref: torch.Tensor) -> float:
    out_t = torch.as_tensor(np.asarray(out)) if not isinstance(out, torch.Tensor) else out
    out_t, ref = out_t.detach().double(), ref.detach().double()
    if out_t.shape != ref.shape:
        return float("inf")
    return float((out_t - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return first_tensor(next(iter(out.values())))
    if isinstance(out, list | tuple):
        return first_tensor(out[0])
    raise TypeError(f"no tensor in {type(out).__name__}")


def forward(model: Any, x: torch.Tensor) -> torch.Tensor:
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    with torch.no_grad():
        return first_tensor(model(x))


def count_bn_module(model: nn.Module) -> int:
    live = None
    n = 0
    if isinstance(model, fx.GraphModule):
        live = {str(node.target) for node in model.graph.nodes if node.op == "call_module"}
        n += sum(
            1
            for node in model.graph.nodes
            if node.op == "call_function" and node.target in _BN_FUNCS
        )
    for name, m in model.named_modules():
        if live is not None and name not in live:
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or "FrozenBatchNorm" in type(m).__name__:
            n += 1
    return n


def count_bn_ep(ep: torch.export.ExportedProgram) -> int:
    return sum(1 for n in ep.graph.nodes if n.op == "call_function" and n.target in _BN_FUNCS)


def count_bn_onnx(model: Any) -> int:
    import onnx

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model)

    def walk(nodes: Any) -> int:
        k = 0
        for node in nodes:
            k += node.op_type == "BatchNormalization"
            for attr in node.attribute:
                if attr.g is not None:
                    k += walk(attr.g.node)
                for g in attr.graphs:
                    k += walk(g.node)
        return k

    return walk(proto.graph.node) + sum(walk(f.node) for f in proto.functions)


_MUL_FUNCS: set[Any] = {operator.mul, torch.mul, torch.ops.aten.mul.Tensor, "mul", "mul_"}


def count_const_mul_fx(graph: fx.Graph, const_placeholders: set[str] | None = None) -> int:
    """Mul nodes with exactly one input computed only from weights: how a frozen BN (timm's
    ``FrozenBatchNorm2d``/``FrozenBatchNormAct2d``) looks once traced or exported."""
    const: set[fx.Node] = set()
    held = const_placeholders or set()
    n = 0
    for node in graph.nodes:
        if node.op == "get_attr" or (node.op == "placeholder" and node.name in held):
            const.add(node)
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        ins = node.all_input_nodes
        if ins and all(a in const for a in ins):
            const.add(node)
        elif node.target in _MUL_FUNCS and len(ins) == 2 and sum(a in const for a in ins) == 1:
            n += 1
    return n


def count_const_mul_ep(ep: torch.export.ExportedProgram) -> int:
    from torch.export.graph_signature import InputKind

    kinds = {InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR}
    held = {s.arg.name for s in ep.graph_signature.input_specs if s.kind in kinds}
    return count_const_mul_fx(ep.graph, held)


def count_const_mul_onnx(data: bytes) -> int:
    import onnx

    graph = onnx.load_from_string(data).graph
    const = {i.name for i in graph.initializer}
    n = 0
    for node in graph.node:
        ins = [i for i in node.input if i]
        if node.op_type == "Constant" or (ins and all(i in const for i in ins)):
            const.update(node.output)
        elif node.op_type == "Mul" and len(ins) == 2 and sum(i in const for i in ins) == 1:
            n += 1
    return n


def ort_run(model_bytes: bytes, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = max(1, (os.cpu_count() or 2) // 2)
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: x.numpy()})[0]


def summarize(report: Any) -> dict[str, Any]:
    reasons = collections.Counter(_short(e.reason) for e in report.skipped)
    return {
        "applied": len(report.applied),
        "skipped": len(report.skipped),
        "reasons": [f"{n}x {r}" for r, n in reasons.most_common(3)],
        "notes": [_short(n, 160) for n in report.notes],
        "compared": report.parity is not None,
    }


def _short(text: str | None, n: int = 110) -> str:
    text = (text or "").replace("\n", " ")
    # names differ per node; keep the kind of reason
    return text if len(text) <= n else text[: n - 1] + "…"


def _fold(model: Any, **kw: Any) -> tuple[Any, Any, str | None]:
    """normfuse.fold with the default check; on ParityError, fold again unchecked for figures."""
    try:
        folded, report = normfuse.fold(model, **kw)
        return folded, report, None
    except normfuse.ParityError as exc:
        status = f"ParityError (max rel {exc.report.parity.max_rel:.3g})"
        folded, report = normfuse.fold(model, check=False, **kw)
        return folded, report, status


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield


# ------------------------------------------------------------------------------------ the paths


def run_path(path: str, model: nn.Module, x: torch.Tensor, ref: torch.Tensor) -> list[dict]:
    """One path (and its peers): a list of records."""
    rec: dict[str, Any] = {"path": path, "tool": "normfuse"}
    if path == "module":
        rec["bn_before"] = count_bn_module(model)
        t = time.perf_counter()
        folded, report, status = _fold(model, example_inputs=x)
        rec["time_s"] = time.perf_counter() - t
        rec.update(bn_after=count_bn_module(folded), max_rel=rel(forward(folded, x), ref))
        rec.update(summarize(report), status=status or "ok")
        return [rec]
    if path == "module_noinputs":
        rec["bn_before"] = count_bn_module(model)
        t = time.perf_counter()
        folded, report = normfuse.fold(model)  # no inputs: the check cannot run
        rec["time_s"] = time.perf_counter() - t
        rec.update(bn_after=count_bn_module(folded), max_rel=rel(forward(folded, x), ref))
        rec.update(summarize(report), status="ok")
        return [rec]
    if path == "fx_fuse":
        from torch.fx.experimental.optimization import fuse

        rec.update(tool="torch.fx fuse", bn_before=count_bn_module(model))
        t = time.perf_counter()
        fused = fuse(model)
        rec["time_s"] = time.perf_counter() - t
        rec.update(cmul_after=count_const_mul_fx(fused.graph))
        rec.update(
            bn_after=count_bn_module(fused), max_rel=rel(forward(fused, x), ref), status="ok"
        )
        return [rec]
    if path == "graphmodule":
        gm = fx.symbolic_trace(model)
        rec["bn_before"] = count_bn_module(gm)
        t = time.perf_counter()
        folded, report, status = _fold(gm, example_inputs=x)
        rec["time_s"] = time.perf_counter() - t
        rec.update(
            cmul_before=count_const_mul_fx(gm.graph), cmul_after=count_const_mul_fx(folded.graph)
        )
        rec.update(bn_after=count_bn_module(folded), max_rel=rel(forward(folded, x), ref))
        rec.update(summarize(report), status=status or "ok")
        return [rec]
    if path == "exported":
        t = time.perf_counter()
        ep = torch.export.export(model, (x,))
        rec["export_s"] = time.perf_counter() - t
        rec["bn_before"] = count_bn_ep(ep)
        t = time.perf_counter()
        folded, report, status = _fold(ep)
        rec["time_s"] = time.perf_counter() - t
        rec.update(cmul_before=count_const_mul_ep(ep), cmul_after=count_const_mul_ep(folded))
        rec.update(bn_after=count_bn_ep(folded), max_rel=rel(forward(folded, x), ref))
        rec.update(summarize(report), status=status or "ok")
        return [rec]
    if path in ("onnx_legacy", "onnx_dynamo"):
        t = time.perf_counter()
        onnx_bytes = export_onnx(model, x, dynamo=path == "onnx_dynamo")
        rec["export_s"] = time.perf_counter() - t
        rec["bn_before"] = count_bn_onnx(onnx_bytes)
        rec["export_rel"] = rel(ort_run(onnx_bytes, x), ref)
        t = time.perf_counter()
        folded, report, status = _fold(onnx_bytes)
        rec["time_s"] = time.perf_counter() - t
        out_bytes = folded if isinstance(folded, bytes) else folded.SerializeToString()
        rec.update(
            cmul_before=count_const_mul_onnx(onnx_bytes), cmul_after=count_const_mul_onnx(out_bytes)
        )
        rec.update(bn_after=count_bn_onnx(out_bytes), max_rel=rel(ort_run(out_bytes, x), ref))
        rec.update(summarize(report), status=status or "ok")
        records = [rec]
        for peer in onnx_peers():
            records.append(run_onnx_peer(peer, path, onnx_bytes, x, ref, rec["bn_before"]))
        return records
    raise ValueError(path)


def export_onnx(model: nn.Module, x: torch.Tensor, dynamo: bool) -> bytes:
    with quiet():
        if dynamo:
            program = torch.onnx.export(model, (x,), dynamo=True, optimize=False, verbose=False)
            return program.model_proto.SerializeToString()
        with tempfile.TemporaryDirectory() as tmp:
            f = Path(tmp) / "m.onnx"
            torch.onnx.export(
                model,
                (x,),
                str(f),
                dynamo=False,
                training=torch.onnx.TrainingMode.PRESERVE,
                do_constant_folding=False,
                opset_version=17,
            )
            return f.read_bytes()


def onnx_peers() -> list[str]:
    peers = []
    for name in ("onnxsim", "onnxslim"):
        try:
            __import__(name)
            peers.append(name)
        except Exception:
            pass
    return peers


def run_onnx_peer(
    peer: str, path: str, onnx_bytes: bytes, x: torch.Tensor, ref: torch.Tensor, before: int
) -> dict:
    import onnx

    rec: dict[str, Any] = {"path": path, "tool": peer, "bn_before": before}
    try:
        proto = onnx.load_from_string(onnx_bytes)
        t = time.perf_counter()
        with quiet():
            if peer == "onnxsim":
                import onnxsim

                out, ok = onnxsim.simplify(proto)
                if not ok:
                    raise RuntimeError("onnxsim: check failed")
            else:
                import onnxslim

                out = onnxslim.slim(proto)
        rec["time_s"] = time.perf_counter() - t
        data = out.SerializeToString()
        rec.update(
            cmul_before=count_const_mul_onnx(onnx_bytes), cmul_after=count_const_mul_onnx(data)
        )
        rec.update(bn_after=count_bn_onnx(data), max_rel=rel(ort_run(data, x), ref), status="ok")
    except Exception as exc:
        rec.update(
            status=f"error: {type(exc).__name__}: {_short(str(exc).splitlines()[0] if str(exc) else '')}"
        )
    return rec


# ------------------------------------------------------------------------------------- the sweep


def sweep(specs: list[Spec], paths: list[str], budget: float | None) -> list[dict]:
    timm = import_timm()
    if timm is None:
        raise SystemExit(
            "timm does not import: install it with "
            "'echo torch==2.13.0 > /tmp/c.txt && python -m pip install -c /tmp/c.txt timm'"
        )
    records: list[dict] = []
    start = time.perf_counter()
    for i, spec in enumerate(specs):
        label = spec[0] + (f"[{spec[3]}]" if spec[3] else "")
        base = {"model": label, "pattern": spec[1]}
        if budget is not None and time.perf_counter() - start > budget:
            records.append({**base, "path": "*", "tool": "-", "status": "not run: --budget spent"})
            continue
        t_model = time.perf_counter()
        try:
            with quiet():
                model, x = build(timm, spec, seed=100 + i)
                ref = forward(copy.deepcopy(model).double(), x.double())
                own = rel(forward(model, x), ref)
        except Exception as exc:
            records.append(
                {**base, "path": "*", "tool": "-", "status": f"build failed: {exc!r}"[:300]}
            )
            print(f"{label}: build failed: {exc!r}"[:200], file=sys.stderr)
            continue
        for path in paths:
            try:
                with quiet():
                    got = run_path(path, model, x, ref)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                got = [
                    {
                        "path": path,
                        "tool": "torch.fx fuse" if path == "fx_fuse" else "normfuse",
                        "status": f"error: {type(exc).__name__}: {_short(first, 200)}",
                        "traceback": traceback.format_exc(limit=-3),
                    }
                ]
            for r in got:
                r.update(base, fp32_rel=own)
                r["wrong"] = _wrong(r, own)
                records.append(r)
        print(
            f"{label:34} {time.perf_counter() - t_model:6.1f}s  "
            + " ".join(
                f"{r['path']}:{_cell(r)}"
                for r in records
                if r["model"] == label and r["tool"] == "normfuse"
            ),
            file=sys.stderr,
            flush=True,
        )
    return records


def _wrong(r: dict, own: float) -> bool:
    err = r.get("max_rel")
    return err is not None and (not np.isfinite(err) or err > max(WRONG_ABS, WRONG_FACTOR * own))


def _cell(r: dict | None) -> str:
    if r is None:
        return ""
    status = r.get("status", "")
    if status.startswith("not run"):
        return "not run"
    if status.startswith(("error", "build")):
        what = status.split(":")[1].strip() if ":" in status else status
        return f"fails ({what})"
    if "max_rel" not in r:
        return status
    cell = f"{r['bn_before']}→{r['bn_after']} {r['max_rel']:.0e}"
    if r.get("cmul_before"):
        cell += f" [cmul {r['cmul_before']}→{r.get('cmul_after')}]"
    elif r.get("cmul_after"):
        cell += f" [cmul {r['cmul_after']} left]"
    if r.get("wrong"):
        cell += " **WRONG**"
    if status.startswith("ParityError"):
        cell += " (check raised)"  # the default check raised ParityError; figures: check=False
    return cell


def table(records: list[dict], paths: list[str]) -> str:
    cols: list[tuple[str, str]] = []
    for p in paths:
        tools = ["torch.fx fuse"] if p == "fx_fuse" else ["normfuse"]
        if p.startswith("onnx"):
            tools += sorted(
                {r["tool"] for r in records if r["path"] == p and r["tool"] not in tools}
            )
        cols += [(p, t) for t in tools]
    head = ["model", "pattern"] + [
        p if t in ("normfuse", "torch.fx fuse") else f"{p} {t}" for p, t in cols
    ]
    lines = [
        "BN before→after, max relative error against float64 of the original module; "
        "[cmul a→b]: Mul nodes by weight-only tensors (frozen BN once traced/exported); "
        "(check raised): normfuse's default check raised ParityError, the figures are those of "
        "the same fold with check=False; **WRONG**: error above 1e-4 and 100x the float32 "
        "original's own.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    models = list(dict.fromkeys(r["model"] for r in records))
    for m in models:
        mine = [r for r in records if r["model"] == m]
        row = [m, mine[0]["pattern"]]
        every = next((r for r in mine if r["path"] == "*"), None)
        for p, t in cols:
            if every is not None:
                row.append(_cell(every))
                continue
            row.append(_cell(next((r for r in mine if r["path"] == p and r["tool"] == t), None)))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def totals(records: list[dict], paths: list[str]) -> str:
    lines = [
        "",
        "| path | tool | models | BN before | BN left | WRONG | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = list(dict.fromkeys((r["path"], r["tool"]) for r in records if r["path"] != "*"))
    for p, t in keys:
        rs = [r for r in records if r["path"] == p and r["tool"] == t]
        ok = [r for r in rs if "bn_after" in r]
        lines.append(
            f"| {p} | {t} | {len(rs)} | {sum(r['bn_before'] for r in ok)} | "
            f"{sum(r['bn_after'] for r in ok)} | {sum(1 for r in rs if r.get('wrong'))} | "
            f"{len(rs) - len(ok)} |"
        )
    return "\n".join(lines)


def reasons_section(records: list[dict]) -> str:
    lines = ["", "Most frequent skip reasons / failures (normfuse):", ""]
    for r in records:
        if r["tool"] != "normfuse":
            continue
        bits = list(r.get("reasons", []))
        if r.get("status", "ok") != "ok":
            bits.insert(0, r["status"])
        if bits:
            lines.append(f"* {r['model']} / {r['path']}: " + "; ".join(bits))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a handful of small models")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument(
        "--models", help="comma-separated timm names (all specs with that name), in this order"
    )
    ap.add_argument("--paths", help=f"comma-separated subset of {','.join(PATHS)}")
    ap.add_argument("--budget", type=float, help="seconds after which no new model starts")
    ap.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch intra-op threads (1 on a busy machine: idle OpenMP workers spin)",
    )
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(max(1, args.threads))
    specs = MODELS
    if args.quick:
        specs = [s for q in QUICK for s in MODELS if (s[0], s[3]) == q]
    if args.models:  # in the order given, so that a --budget keeps the first ones
        wanted = args.models.split(",")
        specs = [s for w in dict.fromkeys(wanted) for s in MODELS if s[0] == w]
    paths = PATHS if not args.paths else [p for p in args.paths.split(",") if p in PATHS]
    t0 = time.perf_counter()
    records = sweep(specs, paths, args.budget)
    text = table(records, paths) + "\n" + totals(records, paths) + "\n" + reasons_section(records)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "timm": getattr(import_timm(), "__version__", None),
        "normfuse": normfuse.__version__,
        "python": platform.python_version(),
        "quick": args.quick,
        "seconds": time.perf_counter() - t0,
        "paths": paths,
    }
    (args.out / "timm_sweep.json").write_text(
        json.dumps({"meta": meta, "records": records}, indent=1, default=str)
    )
    (args.out / "TIMM.md").write_text(
        f"# normfuse on timm (torch {meta['torch']}, timm {meta['timm']}{', --quick' if args.quick else ''})\n\n"
        + text
        + "\n"
    )
    print(
        f"\nwrote {args.out / 'timm_sweep.json'} and {args.out / 'TIMM.md'} ({meta['seconds']:.0f} s)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
