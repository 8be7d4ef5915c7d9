"""ONNX from other converters (issue 18): Keras models converted by tf2onnx, folded by normfuse,
onnxsim and onnxslim; per-channel affines and BatchNormalization nodes before and after.

Usage (one command; conversion runs in a TensorFlow environment of its own, measuring here)::

    python3 -m venv /work/tfvenv
    /work/tfvenv/bin/pip install tensorflow-cpu tf_keras tf2onnx onnxsim onnxslim onnxruntime
    .venv/bin/python benchmarks/converters.py                   # default: --quick set of models
    .venv/bin/python benchmarks/converters.py --apps all --json out.json --markdown out.md
    .venv/bin/python benchmarks/converters.py --from-dir DIR    # measure converted .onnx files

The TensorFlow side (``--tf-python``, default ``$NORMFUSE_TF_PYTHON`` or ``/work/tfvenv/bin/
python``) runs this file as ``converters.py _convert ...``: it builds Keras applications
(keras 3 and tf_keras, ``weights=None``, small inputs) and hand-made layer patterns, sets
random BatchNormalization statistics and biases (seeded; variance 0.2-3, some negative gamma)
and converts each with tf2onnx twice, with its default optimizers and with ``optimizers={}``
(``--opset``, default 13). tensorflow-cpu, tf_keras, keras, tf2onnx and the current numpy and
protobuf install side by side there; normfuse's own environment needs none of them. Paddle
models (``paddle2onnx`` pins an old onnx: convert in a third environment) and any other
converted files are measured with ``--from-dir``.

Paddle files (docs/converters.md, "Paddle (paddle2onnx)"; paddlepaddle 3.3.1 CPU, paddle2onnx
2.1.0, which also needs ``packaging``)::

    python3 -m venv /work/paddlevenv
    /work/paddlevenv/bin/pip install paddlepaddle paddle2onnx packaging

A short script run by ``/work/paddlevenv/bin/python`` builds each model (``paddle.vision.models.
mobilenet_v2(pretrained=False, scale=0.5)``, ``resnet18(pretrained=False)``, Conv2D/Conv1D/
Conv2DTranspose/Linear + BatchNorm layers), sets random BN ``_mean``/``_variance``/weight/bias
and conv/linear biases with ``set_value``, calls ``model.eval()`` and ``paddle.jit.save(model,
DIR/model, input_spec=[paddle.static.InputSpec([None, ...], "float32", "x")])`` (paddle 3
writes ``model.json`` + ``model.pdiparams``), then converts each at opset 11 and 13::

    /work/paddlevenv/bin/paddle2onnx --model_dir DIR --model_filename model.json \\
        --params_filename model.pdiparams --save_file /tmp/paddle_onnx/NAME_op13.onnx \\
        --opset_version 13
    .venv/bin/python benchmarks/converters.py --from-dir /tmp/paddle_onnx --out /tmp/pb

(the Markdown header says tf2onnx whatever the files' converter; an optional ``manifest.json``
beside the files adds its fields to the rows).

Per file, measured here with onnx and onnxruntime only (normfuse is run through its CLI,
``normfuse fold IN -o OUT --force --json OUT.json``, with ``--norm-affine`` when this script is
given it, so this file imports nothing from the package):

* ``BN``: BatchNormalization nodes; ``aff``: Mul/Add/Sub/Div nodes whose other operand is a
  constant that varies along exactly one axis (a per-channel map; a MatMul's bias Add and
  scalar constants are not counted); ``near``: those of them whose data path reaches a
  Conv/ConvTranspose/Gemm/MatMul through only layout ops (Transpose, Reshape, Squeeze,
  Unsqueeze, Flatten, Identity, Dropout) and other such affines, before or after them.
* for normfuse and for each peer found in ``--peer-python`` (default: the TensorFlow python):
  ``BN``/``aff``/``near`` left, the largest relative error of any output against the original
  on onnxruntime CPU at ``ORT_DISABLE_ALL`` (random inputs, seed 0, dynamic dims set to 1) and
  the seconds from file in to file out (normfuse: load + fold + save from its JSON report, its
  own parity check excluded; peers: load + rewrite + save, imports excluded), or the error.

Prints a Markdown table (and a count of normfuse's skip reasons); ``--json`` and
``--markdown`` also write them. Output files go to ``--out`` (default ``benchmarks/out/
converters``, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()
LINEAR = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
LAYOUT = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Dropout"}
ELEMENTWISE = {"Mul", "Add", "Sub", "Div"}
PEERS = ("onnxsim", "onnxslim")

#: Keras applications: name -> (constructor name, input shape, extra kwargs).
APPS = {
    "MobileNet": ("MobileNet", (96, 96, 3), {"alpha": 0.25}),
    "MobileNetV2": ("MobileNetV2", (96, 96, 3), {"alpha": 0.35}),
    "MobileNetV3Small": ("MobileNetV3Small", (96, 96, 3), {"minimalistic": False}),
    "EfficientNetB0": ("EfficientNetB0", (64, 64, 3), {}),
    "DenseNet121": ("DenseNet121", (64, 64, 3), {}),
    "ResNet50": ("ResNet50", (64, 64, 3), {}),
    "InceptionV3": ("InceptionV3", (75, 75, 3), {}),
    "Xception": ("Xception", (71, 71, 3), {}),
    "NASNetMobile": ("NASNetMobile", (64, 64, 3), {}),
}
QUICK_APPS = ["MobileNet", "MobileNetV2", "MobileNetV3Small"]
PATTERNS = [
    "conv_bn",
    "dense_bn",
    "conv1d_bn",
    "conv3d_bn",
    "convtranspose_bn",
    "depthwise_bn",
    "separable_bn",
    "bn_dense",
    "conv_relu_bn_conv",
    "dense_rank3_bn",
    "gap_conv1x1_bn",
    "layernorm",
]


# =============================================================== the TensorFlow side (_convert)
def _randomize(model, rng) -> None:
    """Random BN statistics (variance 0.2-3, some negative gamma) and biases."""
    import numpy as np

    for layer in model.layers:
        weights = layer.weights
        if not weights:
            continue
        values = []
        for w, v in zip(weights, layer.get_weights(), strict=True):
            name, dtype = (getattr(w, "path", None) or w.name).split("/")[-1], v.dtype
            if "moving_variance" in name:
                v = rng.uniform(0.2, 3.0, v.shape)
            elif "moving_mean" in name:
                v = rng.normal(0, 0.5, v.shape)
            elif "gamma" in name:
                v = rng.uniform(0.5, 1.5, v.shape) * np.where(rng.random(v.shape) < 0.2, -1, 1)
            elif "beta" in name or "bias" in name:
                v = rng.normal(0, 0.2, v.shape)
            values.append(np.asarray(v, dtype=dtype))
        layer.set_weights(values)


def _pattern(lib, name: str):
    """A small Keras model of one layer pattern; returns (model, input shape without batch)."""
    L = lib.layers
    spec = {
        "conv_bn": ((8, 8, 3), lambda x: L.BatchNormalization()(L.Conv2D(6, 3)(x))),
        "dense_bn": ((5,), lambda x: L.BatchNormalization()(L.Dense(6)(x))),
        "conv1d_bn": ((12, 3), lambda x: L.BatchNormalization()(L.Conv1D(6, 3)(x))),
        "conv3d_bn": ((5, 5, 5, 2), lambda x: L.BatchNormalization()(L.Conv3D(4, 3)(x))),
        "convtranspose_bn": (
            (6, 6, 3),
            lambda x: L.BatchNormalization()(L.Conv2DTranspose(4, 3, strides=2)(x)),
        ),
        "depthwise_bn": ((8, 8, 3), lambda x: L.BatchNormalization()(L.DepthwiseConv2D(3)(x))),
        "separable_bn": (
            (8, 8, 3),
            lambda x: L.BatchNormalization()(L.SeparableConv2D(6, 3)(x)),
        ),
        "bn_dense": ((5,), lambda x: L.Dense(6)(L.BatchNormalization()(x))),
        "conv_relu_bn_conv": (
            (8, 8, 3),
            lambda x: L.Conv2D(5, 1)(L.BatchNormalization()(L.ReLU()(L.Conv2D(4, 3)(x)))),
        ),
        "dense_rank3_bn": ((5, 3), lambda x: L.BatchNormalization()(L.Dense(4)(x))),
        "gap_conv1x1_bn": (
            (8, 8, 3),
            lambda x: L.BatchNormalization()(
                L.Conv2D(5, 1)(L.GlobalAveragePooling2D(keepdims=True)(L.Conv2D(4, 3)(x)))
            ),
        ),
        "layernorm": ((5, 8), lambda x: L.LayerNormalization()(L.Dense(8)(x))),
    }
    shape, body = spec[name]
    inp = lib.Input(shape)
    return lib.Model(inp, body(inp)), shape


def _from_function(model, shape, opset: int, path: str, optimizers) -> None:
    """tf2onnx.convert.from_function with ``optimizers`` (its public signature lacks it)."""
    import tensorflow as tf
    from tf2onnx import tf_loader
    from tf2onnx.convert import _convert_common, tensor_names_from_structed

    spec = (tf.TensorSpec((None, *shape), tf.float32, name="x"),)
    fn = tf.function(lambda x: model(x, training=False), input_signature=spec)
    cf = fn.get_concrete_function(*spec)
    inputs = [t.name for t in cf.inputs if t.dtype != tf.dtypes.resource]
    outputs = [t.name for t in cf.outputs if t.dtype != tf.dtypes.resource]
    with tf.device("/cpu:0"):
        frozen = tf_loader.from_function(cf, inputs, outputs)
        _convert_common(
            frozen,
            name=cf.name,
            continue_on_error=True,
            opset=opset,
            input_names=inputs,
            output_names=outputs,
            optimizers=optimizers,
            tensors_to_rename=tensor_names_from_structed(cf, inputs, outputs),
            output_path=path,
        )


def _convert(argv: list[str]) -> int:
    """Runs under the TensorFlow python: build, randomise, convert; writes manifest.json."""
    p = argparse.ArgumentParser(prog="converters.py _convert")
    p.add_argument("--out", required=True)
    p.add_argument("--apps", default="")
    p.add_argument("--patterns", default="")
    p.add_argument("--libs", default="keras3,tf_keras")
    p.add_argument("--optimizers", default="default,none")
    p.add_argument("--opset", type=int, default=13)
    a = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf
    import tf2onnx

    tf.get_logger().setLevel("ERROR")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    jobs = [("app", n) for n in filter(None, a.apps.split(","))]
    jobs += [("pattern", n) for n in filter(None, a.patterns.split(","))]
    for lib_name in filter(None, a.libs.split(",")):
        if lib_name == "keras3":
            import keras as lib
        else:
            import tf_keras as lib
        for kind, name in jobs:
            try:
                if kind == "app":
                    ctor, shape, kw = APPS[name]
                    model = getattr(lib.applications, ctor)(
                        weights=None, input_shape=shape, classes=10, **kw
                    )
                else:
                    model, shape = _pattern(lib, name)
                _randomize(model, np.random.default_rng(0))
            except Exception as exc:  # reported, the run goes on
                manifest.append({"file": None, "model": name, "lib": lib_name, "error": repr(exc)})
                continue
            for opt in filter(None, a.optimizers.split(",")):
                optimizers = None if opt == "default" else {}
                fname = f"{kind}-{name}-{lib_name}-{opt}-op{a.opset}.onnx"
                row = {"file": fname, "model": name, "kind": kind, "lib": lib_name, "opt": opt}
                t0 = time.perf_counter()
                try:
                    if lib_name == "keras3":
                        _from_function(model, shape, a.opset, str(out / fname), optimizers)
                    else:
                        spec = (tf.TensorSpec((None, *shape), tf.float32, name="x"),)
                        tf2onnx.convert.from_keras(
                            model,
                            input_signature=spec,
                            opset=a.opset,
                            output_path=str(out / fname),
                            optimizers=optimizers,
                        )
                except Exception as exc:
                    row["error"] = repr(exc)[:300]
                row["convert_s"] = round(time.perf_counter() - t0, 2)
                manifest.append(row)
                print(f"converted {fname} in {row['convert_s']} s", file=sys.stderr, flush=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return 0


# ==================================================================== peers (_peer, any python)
def _peer(argv: list[str]) -> int:
    """``_peer TOOL IN OUT``: one JSON line with the seconds (imports excluded) or the error."""
    tool, src, dst = argv
    import onnx

    try:
        if tool == "onnxsim":
            import onnxsim

            t0 = time.perf_counter()
            model, _ = onnxsim.simplify(onnx.load(src))
        else:
            import onnxslim

            t0 = time.perf_counter()
            model = onnxslim.slim(onnx.load(src))
        onnx.save(model, dst)
        print(json.dumps({"seconds": time.perf_counter() - t0}))
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:300]}))
    return 0


# ====================================================================== measuring (this python)
def _consts(model) -> dict[str, object]:
    from onnx import numpy_helper

    found: dict[str, object] = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            found[n.output[0]] = n.attribute[0].t
    return {k: numpy_helper.to_array(v) for k, v in found.items()}


def stats(model) -> dict[str, int]:
    """BN nodes, per-channel affines, and those of them next to a linear op (see the docstring)."""
    consts = _consts(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def affine_data(n) -> str | None:
        """The data input of a per-channel affine node, else None."""
        if n.op_type not in ELEMENTWISE or len(n.input) != 2:
            return None
        const = [i in consts for i in n.input]
        if const.count(True) != 1:
            return None
        c = consts[n.input[const.index(True)]]
        if sum(d > 1 for d in getattr(c, "shape", ())) != 1:
            return None
        return n.input[const.index(False)]

    def passes(n) -> bool:
        return n.op_type in LAYOUT or affine_data(n) is not None

    def near(n) -> bool:
        v, seen = affine_data(n), 0
        while v in producer and seen < 50:
            p = producer[v]
            if p.op_type in LINEAR:
                return True
            if not passes(p):
                break
            v, seen = (p.input[0] if p.op_type in LAYOUT else affine_data(p)), seen + 1
        v, seen = n.output[0], 0
        while seen < 50:
            users = consumers.get(v, [])
            if any(u.op_type in LINEAR and u.input[0] == v for u in users):
                return True
            nxt = [u for u in users if passes(u)]
            if len(nxt) != 1 or len(users) != 1:
                return False
            v, seen = nxt[0].output[0], seen + 1
        return False

    aff = []
    for n in model.graph.node:
        data = affine_data(n)
        if data is None:
            continue
        p = producer.get(data)
        if n.op_type == "Add" and p is not None and p.op_type in ("MatMul", "Gemm"):
            continue  # a MatMul's bias
        aff.append(n)
    return {
        "nodes": len(model.graph.node),
        "bn": sum(n.op_type == "BatchNormalization" for n in model.graph.node),
        "aff": len(aff),
        "near": sum(near(n) for n in aff),
    }


def _feeds(model, seed: int = 0) -> dict:
    import numpy as np
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        shape = [d.dim_value if d.dim_value > 0 else 1 for d in i.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        if i.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.DOUBLE) and not feeds:
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
        elif i.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.DOUBLE):
            # tf2onnx leaves some Keras 3 variables as inputs (Normalization's mean and
            # variance, which feed a Sqrt): positive values keep them finite
            feeds[i.name] = rng.uniform(0.5, 1.5, shape).astype(dtype)
        else:
            feeds[i.name] = np.ones(shape, dtype)
    return feeds


def _outputs(path: Path, feeds: dict) -> list:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}  # a tool may turn such an input into a constant
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def _rel_error(ref: list, got: list) -> float:
    import numpy as np

    worst = 0.0
    for r, g in zip(ref, got, strict=True):
        r64, g64 = np.asarray(r, np.float64), np.asarray(g, np.float64)
        scale = float(np.abs(r64).max()) or 1.0
        worst = max(worst, float(np.abs(r64 - g64).max()) / scale)
    return worst


def _default_cli() -> str:
    local = ROOT / ".venv" / "bin" / "normfuse"
    return str(local) if local.exists() else (shutil.which("normfuse") or "normfuse")


def _has(python: str, module: str) -> bool:
    code = f"import importlib.util,sys; sys.exit(importlib.util.find_spec('{module}') is None)"
    return subprocess.run([python, "-c", code], capture_output=True).returncode == 0


def _run_normfuse(
    cli: str, src: Path, dst: Path, timeout: int, extra: tuple[str, ...] = ()
) -> dict:
    report = dst.with_suffix(".json")
    cmd = [cli, "fold", str(src), "-o", str(dst), "--force", "--json", str(report), *extra]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    if not report.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    data = json.loads(report.read_text())
    t = data.get("timings", {})
    out = {
        "seconds": sum(t.get(k, 0.0) for k in ("load", "fold", "save")),
        "applied": data.get("applied"),
        "skipped": data.get("skipped"),
        "reasons": [
            (e["op_type"], e.get("reason") or "")
            for e in data.get("entries", [])
            if e["status"] == "skipped"
        ],
    }
    if proc.returncode != 0 or not dst.exists():
        out["error"] = f"exit {proc.returncode}" + ("" if dst.exists() else " (no output written)")
    return out


def _run_peer(python: str, tool: str, src: Path, dst: Path, timeout: int) -> dict:
    try:
        proc = subprocess.run(
            [python, str(HERE), "_peer", tool, str(src), str(dst)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"error": tail[0][:200]}
    return json.loads(lines[-1])


def measure(files: list[Path], manifest: dict, args) -> list[dict]:
    import onnx

    peers = [t for t in PEERS if args.peer_python and _has(args.peer_python, t)]
    work = Path(args.out) / "folded"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for f in files:
        row: dict = {"file": f.name, **{k: v for k, v in manifest.get(f.name, {}).items()}}
        try:
            model = onnx.load(str(f))
            row["before"] = stats(model)
            feeds = _feeds(model)
            ref = _outputs(f, feeds)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            continue
        extra = ("--norm-affine",) if getattr(args, "norm_affine", False) else ()
        tools = [
            (
                "normfuse",
                lambda s, d, extra=extra: _run_normfuse(args.normfuse, s, d, args.timeout, extra),
            )
        ]
        tools += [
            (t, lambda s, d, t=t: _run_peer(args.peer_python, t, s, d, args.timeout)) for t in peers
        ]
        for tool, runner in tools:
            dst = work / f"{f.stem}.{tool}.onnx"
            dst.unlink(missing_ok=True)
            res = runner(f, dst)
            if "error" not in res or dst.exists():
                try:
                    res.update(stats(onnx.load(str(dst))))
                    res["rel_err"] = _rel_error(ref, _outputs(dst, feeds))
                except Exception as exc:
                    res["error"] = f"{type(exc).__name__}: {exc}"[:300]
            row[tool] = res
        rows.append(row)
        print(f"measured {f.name}", file=sys.stderr, flush=True)
    return rows


# ========================================================================================= output
def _cell(res: dict | None) -> tuple[str, str, str]:
    if not res:
        return "-", "-", "-"
    if "error" in res and "bn" not in res:
        return "error", res["error"][:60].replace("|", "/"), "-"
    left = f"{res['bn']} / {res['aff']} ({res['near']})"
    err = f"{res['rel_err']:.1e}" if "rel_err" in res else "-"
    secs = f"{res['seconds']:.2f}" if "seconds" in res else "-"
    return left, err, secs


def table(rows: list[dict], peers: list[str]) -> str:
    tools = ["normfuse", *peers]
    head = ["file", "nodes", "BN / aff (near) before"]
    for t in tools:
        head += [f"{t}: BN / aff (near) left", f"{t} err", f"{t} s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    total: Counter = Counter()
    for r in rows:
        name = r["file"].removesuffix(".onnx")
        if "before" not in r:
            lines.append(f"| {name} | error: {r.get('error', '?')[:80]} |" + " |" * (len(head) - 2))
            continue
        b = r["before"]
        cells = [name, str(b["nodes"]), f"{b['bn']} / {b['aff']} ({b['near']})"]
        for k in ("bn", "aff", "near"):
            total[f"before_{k}"] += b[k]
        for t in tools:
            cells += list(_cell(r.get(t)))
            for k in ("bn", "aff", "near"):
                total[f"{t}_{k}"] += (r.get(t) or {}).get(k, b[k])
        lines.append("| " + " | ".join(cells) + " |")
    cells = [
        f"**total ({len(rows)} files)**",
        "",
        f"{total['before_bn']} / {total['before_aff']} ({total['before_near']})",
    ]
    for t in tools:
        cells += [f"{total[f'{t}_bn']} / {total[f'{t}_aff']} ({total[f'{t}_near']})", "", ""]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reasons_table(rows: list[dict]) -> str:
    def general(reason: str) -> str:
        reason = re.sub(r"'[^'\s]+'", "'…'", reason)  # names (tf names have no spaces)
        reason = re.sub(r"\(\d[\d, ]*\)", "(…)", reason)
        return reason[:300]

    counts = Counter(
        (op, general(reason))
        for r in rows
        for op, reason in (r.get("normfuse") or {}).get("reasons", [])
    )
    if not counts:
        return "normfuse skipped nothing."
    lines = ["| skipped | op | normfuse's reason |", "|---|---|---|"]
    for (op, reason), n in counts.most_common():
        lines.append(f"| {n} | {op} | {reason.replace('|', '/')} |")
    return "\n".join(lines)


def _default_tf_python() -> str | None:
    env = os.environ.get("NORMFUSE_TF_PYTHON")
    if env:
        return env
    for cand in ("/work/tfvenv/bin/python",):
        if Path(cand).exists():
            return cand
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_convert"]:
        return _convert(argv[1:])
    if argv[:1] == ["_peer"]:
        return _peer(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "converters"))
    p.add_argument("--from-dir", help="measure the .onnx files of this folder, convert nothing")
    p.add_argument("--tf-python", default=_default_tf_python())
    p.add_argument("--peer-python", default=None, help="python with onnxsim/onnxslim")
    p.add_argument("--normfuse", default=_default_cli(), help="the normfuse CLI")
    p.add_argument("--apps", default="quick", help=f"quick, all, none, or names: {','.join(APPS)}")
    p.add_argument("--patterns", default="all", help=f"all, none, or names: {','.join(PATTERNS)}")
    p.add_argument("--libs", default="keras3,tf_keras")
    p.add_argument("--optimizers", default="default,none")
    p.add_argument("--opset", type=int, default=13)
    p.add_argument("--timeout", type=int, default=600, help="seconds per conversion/tool run")
    p.add_argument(
        "--norm-affine",
        action="store_true",
        help="fold with --norm-affine (plain Mul/Add chains also fold into the following op)",
    )
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--markdown", help="write the tables here")
    args = p.parse_args(argv)
    args.peer_python = args.peer_python or args.tf_python or sys.executable
    t0 = time.perf_counter()
    manifest: dict = {}
    if args.from_dir:
        files = sorted(Path(args.from_dir).glob("*.onnx"))
        mf = Path(args.from_dir) / "manifest.json"
        if mf.exists():
            manifest = {r["file"]: r for r in json.loads(mf.read_text()) if r.get("file")}
    else:
        if not args.tf_python:
            p.error("no TensorFlow python: pass --tf-python or set NORMFUSE_TF_PYTHON")
        apps = {"quick": QUICK_APPS, "all": list(APPS), "none": []}.get(
            args.apps, args.apps.split(",")
        )
        patterns = {"all": PATTERNS, "none": []}.get(args.patterns, args.patterns.split(","))
        models = Path(args.out) / "models"
        if models.exists():
            shutil.rmtree(models)
        cmd = [
            args.tf_python,
            str(HERE),
            "_convert",
            "--out",
            str(models),
            "--apps",
            ",".join(apps),
            "--patterns",
            ",".join(patterns),
            "--libs",
            args.libs,
            "--optimizers",
            args.optimizers,
            "--opset",
            str(args.opset),
        ]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)
        converted = [ln for ln in proc.stderr.splitlines() if ln.startswith("converted ")]
        print(f"{len(converted)} file(s) converted", file=sys.stderr)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        rows = json.loads((models / "manifest.json").read_text())
        for r in rows:
            if r.get("error"):
                print(
                    f"conversion failed: {r['model']} {r.get('lib')}: {r['error']}", file=sys.stderr
                )
        manifest = {r["file"]: r for r in rows if r.get("file") and not r.get("error")}
        files = [models / f for f in manifest]
    peers = [t for t in PEERS if _has(args.peer_python, t)]
    rows = measure(files, manifest, args)
    md = (
        (
            f"Files from {args.from_dir}"
            if getattr(args, "from_dir", None)
            else f"Converted by tf2onnx (opset {args.opset})"
        )
        + "; BN / aff (near): BatchNormalization nodes / "
        "per-channel Mul/Add/Sub/Div / those next to a linear op through layout ops; err: max "
        "relative error on onnxruntime (ORT_DISABLE_ALL); s: file in to file out.\n\n"
        + table(rows, peers)
        + "\n\nnormfuse's skip reasons (names and shapes elided):\n\n"
        + reasons_table(rows)
        + f"\n\n{len(rows)} files in {time.perf_counter() - t0:.0f} s\n"
    )
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
