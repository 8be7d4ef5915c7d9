"""Parity and latency of normfuse's folds on onnxruntime's CUDA provider, in one command.

Usage, from the repository root on the GPU machine (docs/gpu.md says how to prepare it)::

    python benchmarks/gpu.py --out DIR [--provider cuda|cpu] [--quick] [--budget-s 420]

Dry run, anywhere (CI runs it through tests/test_gpu_script.py)::

    python benchmarks/gpu.py --provider cpu --quick --out DIR

What it does:

1. Set-up, from files it brings along. normfuse and ``models/`` are imported from this tree.
   When onnxruntime's CUDA provider does not load (``--provider cuda``) or one of normfuse's
   requirements (pyproject.toml) is missing or too old, every wheel under ``shared/wheels/``,
   ``benchmarks/wheels/`` and ``--wheels`` folders (searched recursively) is installed with
   ``pip install --no-index --no-deps --target`` into a temporary folder put first on
   ``sys.path``; a wheel may come split into chunks (``NAME.whl.partaa``, ``.partab``, ...,
   from ``split -b 40M``), joined in name order and checked against ``NAME.whl.sha256`` when
   that file is there. The decision is taken by a probe in a child process, so that nothing is
   imported here before ``sys.path`` is final. It prints ``get_available_providers()``, the GPU
   (``nvidia-smi``) and the versions.
2. Models: the bundled ``models/*.onnx`` and ResNet-50, MobileNet V2 and EfficientNet-B0 at full
   size (``models/zoo.py``, random weights, BN statistics moved by training passes) exported by
   the legacy exporter with BatchNormalization kept (``TrainingMode.PRESERVE``,
   ``do_constant_folding=False``) and a dynamic batch axis, in fp32 and fp16 (``.half()``
   before the export). ``--quick``: the bundled models and the tiny ResNet of ``zoo.build`` at
   32x32, fp32 and fp16.
3. Per model: ``normfuse.fold(path, check=False)`` and ``normfuse.save``, then
   ``normfuse.check(original, folded, provider=P)``, with CUDA ``cross_check=True`` (the original
   on CPU vs on CUDA: provider noise beside the fold's error). 16-bit models are judged with
   their tensors upcast (normfuse/runtime/judge.py); their 16-bit runtime difference and the
   original's own 16-bit noise are recorded beside.
4. Latency on the provider, original vs folded, interleaved
   (``normfuse.runtime.bench.measure_latency``): batch 1 and 32 (quick: 1 and 4; a model with a
   static batch at that batch only), ``ORT_DISABLE_ALL`` and onnxruntime's default level
   (``ORT_ENABLE_ALL``), median and p10-p90 of ``session.run`` wall time (numpy in and out, so
   host-device copies included).
5. ``DIR/gpu.json`` and ``DIR/GPU.md``, rewritten after every model (a run killed at its time
   limit leaves what it finished); no new model is started when the estimate says it would end
   past ``--budget-s``.

CUDA provider options (a workaround in this script: normfuse's sessions take onnxruntime's
defaults, and normfuse/ is not changed here): onnxruntime enables TF32 for float32 Conv, Gemm
and MatMul by default (``use_tf32=1``), which rounds their inputs to a 10-bit mantissa; an exact
fold then differs from the original by that rounding (~1e-3), beyond the fp32 rule (rtol 5e-5).
So the judged check runs with ``use_tf32=0``; fp32 models are checked once more with TF32 on,
reported and not judged; latency is timed with onnxruntime's defaults (TF32 on). CUDA graphs
are off in all sessions (``enable_cuda_graph=0``, also the default). The options are passed by
wrapping ``select_provider`` in normfuse.runtime.parity/bench for the duration of each call.

Exit status: 0 when every check that ran passed (at least one ran), 1 when a check failed or a
model could not be run (or none ran), 2 when the set-up failed (e.g. ``--provider cuda`` and
CUDA does not load).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import hashlib
import importlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WHEEL_DIRS = [ROOT / "shared" / "wheels", ROOT / "benchmarks" / "wheels"]
FULL_FAMILIES = [
    ("resnet", "ResNet-50"),
    ("mobilenet_v2", "MobileNet V2"),
    ("efficientnet", "EfficientNet-B0"),
]
QUICK_FAMILY = ("resnet", "ResNet (zoo.build, tiny)")
#: Options of every CUDA session here: the judged check in exact float32.
CHECK_OPTIONS = {"use_tf32": "0", "enable_cuda_graph": "0"}
#: onnxruntime's defaults, stated: what a user's session gets (latency, the reported TF32 run).
DEFAULT_OPTIONS = {"use_tf32": "1", "enable_cuda_graph": "0"}
#: Modules normfuse needs, by distribution name in pyproject.toml.
MODULES = {"onnxruntime-gpu": "onnxruntime", "onnx_ir": "onnx_ir", "ml_dtypes": "ml_dtypes"}


def log(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------- set-up
def requirements() -> dict[str, tuple[int, ...]]:
    """Module -> minimum version, from pyproject.toml's dependencies (markers ignored)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
    found: dict[str, tuple[int, ...]] = {}
    for name, version in re.findall(r'"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)', block.group(1)):
        module = MODULES.get(name, name.replace("-", "_"))
        found[module] = max(found.get(module, ()), _version_tuple(version))
    return found


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:3])


def cuda_loads(ort: Any) -> tuple[bool, str]:
    """Whether a session really runs on onnxruntime's CUDA provider, and if not, why."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "this onnxruntime has no CUDAExecutionProvider"
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    try:
        sess = ort.InferenceSession(
            model.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
    except Exception as exc:
        return False, str(exc).strip().splitlines()[0][:300]
    if "CUDAExecutionProvider" in sess.get_providers():
        return True, ""
    return False, "onnxruntime fell back to the CPU (CUDA or cuDNN libraries not found?)"


def load_cuda(ort: Any) -> tuple[bool, str]:
    """CUDA as it is, else after ``onnxruntime.preload_dlls()`` (CUDA libraries of pip's nvidia
    packages, which the machine's PyTorch also uses)."""
    ok, why = cuda_loads(ort)
    if ok or not hasattr(ort, "preload_dlls"):
        return ok, why
    with contextlib.redirect_stdout(sys.stderr):
        try:
            ort.preload_dlls()
        except Exception as exc:
            return False, f"{why}; preload_dlls failed: {exc}"
    return cuda_loads(ort)


def probe(provider: str) -> dict[str, Any]:
    """What this interpreter has: normfuse's requirements, torch, and (cuda) whether CUDA loads."""
    result: dict[str, Any] = {"missing": [], "versions": {}, "cuda": None, "why": ""}
    for module, minimum in requirements().items():
        try:
            mod = importlib.import_module(module)
        except Exception as exc:
            result["missing"].append(f"{module} (not importable: {str(exc)[:120]})")
            continue
        version = str(getattr(mod, "__version__", "?"))
        result["versions"][module] = version
        if version != "?" and _version_tuple(version) < minimum:
            need = ".".join(map(str, minimum))
            result["missing"].append(f"{module} {version} (normfuse needs >= {need})")
    if provider == "cuda":
        with contextlib.suppress(Exception):
            import torch  # noqa: F401  (loads the CUDA libraries first, as onnxruntime advises)
        try:
            import onnxruntime as ort

            ort.set_default_logger_severity(4)
            result["cuda"], result["why"] = load_cuda(ort)
        except Exception as exc:
            result["cuda"], result["why"] = False, f"onnxruntime: {exc}"
    return result


def run_probe(provider: str, env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--probe", provider],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"missing": [f"the probe failed: {tail}"], "versions": {}, "cuda": False, "why": ""}
    return json.loads(lines[-1])


def find_wheels(dirs: list[Path]) -> tuple[list[Path], list[tuple[str, list[Path]]]]:
    """Whole wheels and chunked ones (name -> chunks in order) under ``dirs``."""
    whole: dict[str, Path] = {}
    chunked: dict[str, list[Path]] = {}
    for d in dirs:
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*.whl")):
            whole.setdefault(p.name, p)
        for p in sorted(d.rglob("*.whl.part*")):
            chunked.setdefault(p.name.split(".whl.part")[0] + ".whl", []).append(p)
    joined = [(n, sorted(ps, key=lambda p: p.name)) for n, ps in sorted(chunked.items())]
    return [p for n, p in sorted(whole.items()) if n not in chunked], joined


def join_chunks(name: str, parts: list[Path], dirs: list[Path], dest: Path) -> Path:
    """One wheel from its chunks, checked against ``NAME.sha256`` where one lies beside.

    Without a checksum, the chunks' suffixes must run on from ``aa`` without a gap (as ``split``
    names them) and the joined file must be a zip archive: a chunk that did not arrive is named,
    not left to pip (whose message for a cut wheel, "[Errno 22] Invalid argument", says nothing).
    """
    suffixes = [p.name.rsplit(".part", 1)[1] for p in parts]
    expected = [chr(97 + i // 26) + chr(97 + i % 26) for i in range(len(parts))]
    out = dest / name
    digest = hashlib.sha256()
    with out.open("wb") as f:
        for p in parts:
            data = p.read_bytes()
            digest.update(data)
            f.write(data)
    sums = [s for d in dirs if d.is_dir() for s in d.rglob(name + ".sha256")]
    if sums:
        want = sums[0].read_text().split()[0].lower()
        if digest.hexdigest() != want:
            raise SystemExit(
                f"set-up: {name} joined from {len(parts)} chunk(s) has sha256 "
                f"{digest.hexdigest()}, {sums[0]} says {want}: a chunk is missing or damaged"
            )
    elif suffixes != expected or not zipfile.is_zipfile(out):
        raise SystemExit(
            f"set-up: {name} joined from chunk(s) {', '.join(suffixes)} (expected {expected[0]} "
            "onwards without a gap, ending in a whole zip archive): a chunk is missing; "
            "bring every chunk, and the .sha256 to check them"
        )
    return out


def install_wheels(dirs: list[Path]) -> tuple[Path | None, list[str]]:
    """Install every wheel found into a temporary ``--target`` folder; (folder, wheel names)."""
    whole, chunked = find_wheels(dirs)
    if not whole and not chunked:
        return None, []
    staging = Path(tempfile.mkdtemp(prefix="normfuse-gpu-wheels-"))
    atexit.register(shutil.rmtree, staging, True)
    wheels = list(whole)
    for name, parts in chunked:
        log(f"set-up: joining {name} from {len(parts)} chunk(s)")
        wheels.append(join_chunks(name, parts, dirs, staging))
    target = staging / "site"
    log(f"set-up: pip install --target {target} " + " ".join(w.name for w in wheels))
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"),
            *("--no-compile", "--disable-pip-version-check", "--target", str(target)),
            *map(str, wheels),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"set-up: pip install failed:\n{proc.stderr.strip()[-2000:]}")
    for w in wheels:
        if w.parent == staging:
            w.unlink()  # the joined copy (the chunks stay where they are)
    return target, [w.name for w in wheels]


def set_up(provider: str, extra_dirs: list[Path]) -> dict[str, Any]:
    """Make normfuse's requirements and (cuda) onnxruntime's CUDA provider importable here."""
    dirs = [*WHEEL_DIRS, *extra_dirs]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    first = run_probe(provider, env)
    needs = list(first["missing"])
    if provider == "cuda" and not first["cuda"]:
        needs.append(f"onnxruntime's CUDA provider ({first['why']})")
    info: dict[str, Any] = {"needed": needs, "installed": [], "target": None}
    if needs:
        log("set-up: missing here: " + "; ".join(needs))
        target, names = install_wheels(dirs)
        if target is None:
            raise SystemExit(
                "set-up: nothing to install: no *.whl or *.whl.part* under "
                + ", ".join(str(d) for d in dirs)
                + " (docs/gpu.md says how to prepare them)"
            )
        env["PYTHONPATH"] = os.pathsep.join([str(target), env["PYTHONPATH"]])
        second = run_probe(provider, env)
        left = list(second["missing"])
        if provider == "cuda" and not second["cuda"]:
            left.append(f"onnxruntime's CUDA provider ({second['why']})")
        if left:
            raise SystemExit(
                "set-up: still missing after installing the wheels: " + "; ".join(left)
            )
        sys.path.insert(0, str(target))
        os.environ["PYTHONPATH"] = env["PYTHONPATH"]
        info.update(installed=names, target=str(target))
    sys.path.insert(0, str(ROOT))
    return info


def environment(provider: str) -> dict[str, Any]:
    """Versions, providers and the GPU, printed and returned."""
    import numpy
    import onnx
    import onnx_ir
    import onnxruntime as ort

    import normfuse

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": numpy.__version__,
        "onnx": onnx.__version__,
        "onnx_ir": onnx_ir.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_file": str(Path(ort.__file__).parent),
        "onnxruntime_build_cuda": _ort_build_cuda(),
        "available_providers": ort.get_available_providers(),
        "normfuse": normfuse.__version__,
        "normfuse_file": str(Path(normfuse.__file__).parent),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
    except Exception as exc:
        env["torch"] = None
        env["torch_error"] = str(exc)[:200]
    env["gpu"] = _nvidia_smi()
    env["git_commit"] = _git_commit()
    if provider == "cuda":
        try:
            env["cuda_provider_options"] = _effective_options(ort)
        except Exception as exc:
            env["cuda_provider_options"] = f"not readable: {str(exc)[:200]}"
    log(f"onnxruntime {env['onnxruntime']} ({env['onnxruntime_file']})")
    log(f"onnxruntime.get_available_providers(): {env['available_providers']}")
    log(f"GPU: {env['gpu'] or 'none (nvidia-smi not found or no GPU)'}")
    log(
        f"python {env['python']}, numpy {env['numpy']}, onnx {env['onnx']}, onnx_ir "
        f"{env['onnx_ir']}, torch {env['torch']} (CUDA {env.get('torch_cuda')}), normfuse "
        f"{env['normfuse']}, commit {env['git_commit']}"
    )
    return env


def _ort_build_cuda() -> str | None:
    try:
        from onnxruntime.capi import build_and_package_info

        return getattr(build_and_package_info, "cuda_version", None)
    except Exception:
        return None


def _nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except Exception:
        return None
    return out.splitlines()[0].strip() if out else None


def _git_commit() -> str | None:
    """HEAD's short hash, with ``-dirty`` when the tracked files differ from it (a device that
    receives the working tree may hold an older ``.git``: the hash alone would misname the
    code that ran)."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=7"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except Exception:
        return None
    return proc.stdout.strip() or None


def _effective_options(ort: Any) -> dict[str, dict[str, str]]:
    """The CUDA provider's options as onnxruntime reports them, for both settings used here."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "opts",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    found = {}
    for label, options in (("check", CHECK_OPTIONS), ("latency", DEFAULT_OPTIONS)):
        sess = ort.InferenceSession(
            model.SerializeToString(), providers=[("CUDAExecutionProvider", options)]
        )
        got = sess.get_provider_options().get("CUDAExecutionProvider", {})
        found[label] = {
            k: got.get(k) for k in ("use_tf32", "enable_cuda_graph", "cudnn_conv_algo_search")
        }
    return found


@contextlib.contextmanager
def cuda_options(options: dict[str, str]) -> Iterator[None]:
    """normfuse's CUDA sessions, for the duration, with these provider options (workaround:
    normfuse takes onnxruntime's defaults and has no option for them)."""
    from normfuse.runtime import bench, parity, sessions

    original = sessions.select_provider

    def select(requested: str = "auto") -> tuple[list[Any], str]:
        providers, label = original(requested)
        if label == "CUDA":
            providers = [("CUDAExecutionProvider", dict(options)), *providers[1:]]
        return providers, label

    parity.select_provider = bench.select_provider = select  # type: ignore[assignment]
    try:
        yield
    finally:
        parity.select_provider = bench.select_provider = original  # type: ignore[assignment]


# ---------------------------------------------------------------------------- models
def model_inputs(path: Path) -> list[tuple[str, list[int | str]]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return [
        (i.name, [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims])
        for i in model.graph.input
        if i.name not in inits
        for dims in [i.type.tensor_type.shape.dim]
    ]


def export(model: Any, example: Any, path: Path) -> None:
    """Legacy exporter, BatchNormalization kept, batch axis dynamic."""
    import warnings

    import torch

    from models.build import quiet

    with quiet(), warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )


def family_items(quick: bool, work: Path) -> list[dict[str, Any]]:
    """One item per family and dtype; the export happens when the first of a family is run."""
    families = [QUICK_FAMILY] if quick else FULL_FAMILIES
    size = 32 if quick else 224
    items = []
    for key, title in families:
        for dtype in ("fp32", "fp16"):
            items.append(
                {
                    "model": title,
                    "family": key,
                    "dtype": dtype,
                    "kind": "family",
                    "size": size,
                    "path": work / f"{key}_{dtype}.onnx",
                }
            )
    return items


def build_family(item: dict[str, Any], quick: bool) -> None:
    """Export both dtypes of the item's family (one build, fp32 first, then ``.half()``)."""
    import torch

    from models import zoo

    key, size = item["family"], item["size"]
    model = zoo.build(key) if quick else zoo.build_full(key)
    model.eval()
    x = torch.randn(1, 3, size, size)
    export(model, x, item["path"].with_name(f"{key}_fp32.onnx"))
    export(model.half(), x.half(), item["path"].with_name(f"{key}_fp16.onnx"))


# ---------------------------------------------------------------------------- one model
def check_record(parity: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "passed": parity.passed,
        "max_rel": parity.max_rel,
        "provider": parity.provider,
        "judgement": parity.judgement,
        "lines": parity.lines(),
        "runtime_max_rel": max((o.max_rel for o in parity.runtime), default=None)
        if parity.runtime is not None
        else None,
        "noise_max_rel": max((o.max_rel for o in parity.noise), default=None)
        if parity.noise is not None
        else None,
        "cross_check_max_rel": max((o.max_rel for o in parity.cross_check), default=None)
        if parity.cross_check is not None
        else None,
        "parity": parity.to_dict(),
    }
    return rec


def latency_rows(
    original: Path, folded: Path, provider: str, batches: list[int], warmup: int, reps: int
) -> list[dict[str, Any]]:
    from normfuse.runtime.bench import measure_latency

    inputs = model_inputs(original)
    dynamic = all(dims and not isinstance(dims[0], int) for _, dims in inputs)
    static = [dims for _, dims in inputs if dims and isinstance(dims[0], int)]
    plan = batches if dynamic else [static[0][0] if static else 1]
    rows = []
    for batch in plan:
        shapes = None
        if dynamic:
            shapes = {
                n: [batch, *(d if isinstance(d, int) else 1 for d in dims[1:])]
                for n, dims in inputs
            }
        results = measure_latency(
            [str(original), str(folded)],
            provider=provider,
            opt_levels=("disable", "all"),
            warmup=warmup,
            reps=reps,
            shapes=shapes,
        )
        for level in ("disable", "all"):
            orig, fold = (r for r in results if r.opt_level == level)
            rows.append(
                {
                    "batch": batch,
                    "static_batch": not dynamic,
                    "opt_level": level,
                    "original": _lat(orig),
                    "folded": _lat(fold),
                }
            )
    return rows


def _lat(r: Any) -> dict[str, float]:
    return {"median_ms": r.median_ms, "p10_ms": r.p10_ms, "p90_ms": r.p90_ms, "reps": r.reps}


def run_item(item: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import normfuse

    path: Path = item["path"]
    rec: dict[str, Any] = {
        "model": item["model"],
        "dtype": item["dtype"],
        "kind": item["kind"],
        "inputs": [[n, dims] for n, dims in model_inputs(path)],
        "status": "error",
    }
    t = time.perf_counter()
    folded_model, report = normfuse.fold(str(path), check=False)
    folded = work / f"{path.stem}.folded.onnx"
    normfuse.save(folded_model, folded, force=True)
    del folded_model
    rec["fold"] = {
        "applied": len(report.applied),
        "skipped": len(report.skipped),
        "skip_reasons": sorted({e.reason or "" for e in report.skipped})[:5],
        "batchnorm_before": report.before.batchnorm_nodes,
        "batchnorm_after": report.after.batchnorm_nodes,
        "seconds": time.perf_counter() - t,
    }
    cuda = args.provider == "cuda"
    t = time.perf_counter()
    with cuda_options(CHECK_OPTIONS):
        parity = normfuse.check(str(path), str(folded), provider=args.provider, cross_check=cuda)
    rec["check"] = check_record(parity)
    rec["check"]["seconds"] = time.perf_counter() - t
    if cuda and item["dtype"] == "fp32":  # what onnxruntime's default (TF32 on) shows
        with cuda_options(DEFAULT_OPTIONS):
            tf32 = normfuse.check(str(path), str(folded), provider="cuda")
        rec["check_tf32"] = {"passed": tf32.passed, "max_rel": tf32.max_rel, "lines": tf32.lines()}
    t = time.perf_counter()
    with cuda_options(DEFAULT_OPTIONS):
        rec["latency"] = latency_rows(
            path, folded, args.provider, args.batches, args.warmup, args.reps
        )
    rec["latency_seconds"] = time.perf_counter() - t
    rec["status"] = "passed" if parity.passed else "failed"
    return rec


# ---------------------------------------------------------------------------- output
def _clean(value: Any) -> Any:
    """JSON without NaN/Infinity (written as strings)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _g(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    return f"{x:.2g}" if x != 0 else "0"


def _ms(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _lat_cell(rows: list[dict[str, Any]], batch_slot: int, level: str, batches: list[int]) -> str:
    for r in rows:
        if r["opt_level"] != level:
            continue
        if r["static_batch"]:
            if batch_slot != 0:
                return "static batch"
        elif r["batch"] != batches[batch_slot]:
            continue
        o, f = r["original"], r["folded"]
        prefix = f"b={r['batch']}: " if r["static_batch"] else ""
        return (
            f"{prefix}{_ms(o['median_ms'])}→{_ms(f['median_ms'])} ms "
            f"({_ms(o['p10_ms'])}–{_ms(o['p90_ms'])} → {_ms(f['p10_ms'])}–{_ms(f['p90_ms'])})"
        )
    return "—"


def markdown(result: dict[str, Any]) -> str:
    env, batches = result["environment"], result["settings"]["batches"]
    cuda = result["provider"] == "CUDA"
    title = "CUDA" if cuda else "CPU (dry run: no GPU, figures are CPU figures)"
    lines = [
        f"# normfuse on onnxruntime {title}: fold parity and latency",
        "",
        f"`{result['command']}` on {result['started']}, {result['elapsed_s']:.0f} s "
        f"(budget {result['budget_s']:.0f} s).",
        "",
        f"- GPU: {env.get('gpu') or 'none'}",
        f"- onnxruntime {env.get('onnxruntime')} (built for CUDA {env.get('onnxruntime_build_cuda')}),"
        f" providers {env.get('available_providers')}; python {env.get('python')}, onnx "
        f"{env.get('onnx')}, onnx_ir {env.get('onnx_ir')}, torch {env.get('torch')}, normfuse "
        f"{env.get('normfuse')} (commit {env.get('git_commit')})",
    ]
    if cuda:
        lines.append(
            f"- CUDA provider options as onnxruntime reports them: {env.get('cuda_provider_options')}"
        )
    lines += [
        "",
        f"| model | dtype | check ({result['provider']}) | fold max_rel | CPU-vs-CUDA max_rel "
        f"| reported, not judged | b={batches[0]} ORT_DISABLE_ALL | b={batches[0]} default "
        f"| b={batches[1]} ORT_DISABLE_ALL | b={batches[1]} default |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        if m["status"] in ("skipped", "error"):
            why = " ".join((m.get("reason") or m.get("error", "")).split()).replace("|", "/")
            lines.append(
                f"| {m['model']} | {m['dtype']} | {m['status'].upper()} | | | {why[:120]} | | | | |"
            )
            continue
        check = m["check"]
        notes = []
        if check.get("runtime_max_rel") is not None:
            notes.append(
                f"{m['dtype']} Δ {_g(check['runtime_max_rel'])} (own noise {_g(check['noise_max_rel'])})"
            )
        if "check_tf32" in m:
            notes.append(f"TF32 on: Δ {_g(m['check_tf32']['max_rel'])}")
        fold_rel = _g(check["max_rel"]) + (" (upcast)" if check.get("judgement") else "")
        cells = [
            _lat_cell(m["latency"], s, lvl, batches) for s in (0, 1) for lvl in ("disable", "all")
        ]
        lines.append(
            f"| {m['model']} | {m['dtype']} | {'PASSED' if check['passed'] else 'FAILED'} "
            f"| {fold_rel} | {_g(check['cross_check_max_rel'])} | {'; '.join(notes) or '—'} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "Check: `normfuse.check(original, folded)` on the provider at ORT_DISABLE_ALL"
        + (", TF32 off (`use_tf32=0`), with `cross_check=True`" if cuda else "")
        + "; fold max_rel is the worst output's |folded − original| / max|original|. 16-bit "
        "models are judged with their tensors upcast exactly to float32 (the judgement lines "
        "below); their 16-bit runtime difference (Δ) and the original's own 16-bit noise are "
        "reported beside."
        + (
            " CPU-vs-CUDA: the original on the CPU vs on CUDA, the provider's noise. TF32 on: "
            "the same check with onnxruntime's default `use_tf32=1`, reported."
            if cuda
            else " CPU-vs-CUDA needs CUDA (—)."
        ),
        "Latency: `session.run` wall time in ms, original→folded, median (p10–p90 → p10–p90), "
        f"{result['settings']['reps']} interleaved runs after {result['settings']['warmup']} "
        "warm-up runs each; `default` is onnxruntime's default level (ORT_ENABLE_ALL)"
        + ("; CUDA graphs off, TF32 as onnxruntime's default." if cuda else "."),
    ]
    judged = [m for m in result["models"] if m.get("check", {}).get("judgement")]
    if judged:
        lines += ["", "How each check was judged (its tolerance rule):", ""]
        lines += [f"- {m['model']} {m['dtype']}: {m['check']['judgement']}" for m in judged]
    if result["stopped_for_budget"]:
        lines += ["", "Not started (budget): " + ", ".join(result["stopped_for_budget"])]
    return "\n".join(lines) + "\n"


def write(out: Path, result: dict[str, Any]) -> None:
    for name, text in (
        ("gpu.json", json.dumps(_clean(result), indent=1) + "\n"),
        ("GPU.md", markdown(result)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


# ---------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="folder for gpu.json and GPU.md")
    p.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="bundled models + one tiny family model")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no model past this")
    p.add_argument("--wheels", type=Path, action="append", default=[], help="more wheel folders")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs (10 CUDA, 2 quick)")
    p.add_argument("--reps", type=int, default=None, help="timed runs (50 CUDA, 10 quick)")
    p.add_argument("--batches", default=None, help="two batch sizes, e.g. 1,32 (quick: 1,4)")
    p.add_argument("--probe", choices=("cuda", "cpu"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe is None and args.out is None:
        p.error("--out is required")
    if args.batches is None:
        args.batches = [1, 4] if args.quick else [1, 32]
    else:
        args.batches = [int(b) for b in args.batches.split(",")]
        if len(args.batches) != 2 or min(args.batches) < 1:
            p.error("--batches takes two sizes of 1 or more, e.g. 1,32")
    if args.warmup is None:
        args.warmup = 2 if args.quick else (10 if args.provider == "cuda" else 3)
    if args.reps is None:
        args.reps = 10 if args.quick else (50 if args.provider == "cuda" else 20)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.probe:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(probe(args.probe)), flush=True)
        return 0
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        setup = set_up(args.provider, args.wheels)
    except (SystemExit, Exception) as exc:
        text = str(exc) if isinstance(exc, SystemExit) else f"set-up: {type(exc).__name__}: {exc}"
        log(text)
        (args.out / "setup-failed.txt").write_text(text + "\n")
        return 2
    torch_error = None
    try:
        import torch  # noqa: F401  (before onnxruntime: its CUDA libraries serve both)
    except Exception as exc:
        torch_error = f"torch is not importable here ({str(exc)[:120]})"
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    if args.provider == "cuda":
        ok, why = load_cuda(ort)
        if not ok:
            log(f"set-up: onnxruntime's CUDA provider does not load: {why}")
            return 2
    env = environment(args.provider)
    env["setup"] = setup
    result: dict[str, Any] = {
        "schema": 1,
        "command": command,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "provider": "CUDA" if args.provider == "cuda" else "CPU",
        "quick": args.quick,
        "budget_s": args.budget_s,
        "elapsed_s": 0.0,
        "environment": env,
        "settings": {
            "batches": args.batches,
            "opt_levels": ["disable", "all"],
            "warmup": args.warmup,
            "reps": args.reps,
            "check_cuda_options": CHECK_OPTIONS,
            "latency_cuda_options": DEFAULT_OPTIONS,
        },
        "models": [],
        "stopped_for_budget": [],
        "complete": False,
        "passed": False,
    }
    with tempfile.TemporaryDirectory(prefix="normfuse-gpu-") as tmp:
        work = Path(tmp)
        items: list[dict[str, Any]] = [
            {"model": f"bundled {p.stem}", "dtype": "fp32", "kind": "bundled", "path": p}
            for p in sorted((ROOT / "models").glob("*.onnx"))
        ]
        items += family_items(args.quick, work)
        spent: dict[str, float] = {}
        for item in items:
            label = f"{item['model']} {item['dtype']}"
            elapsed = time.monotonic() - start
            guess = spent.get(item["kind"], max(spent.values(), default=5.0))
            if item["kind"] == "family" and not item["path"].exists():
                guess = max(guess, spent.get("family-build", 60.0 if not args.quick else 10.0))
            if elapsed + guess > args.budget_s:
                log(
                    f"{label}: not started, {elapsed:.0f} s + ~{guess:.0f} s > {args.budget_s:.0f} s"
                )
                result["stopped_for_budget"].append(label)
                result["models"].append(
                    {**_head(item), "status": "skipped", "reason": "budget: not started"}
                )
                continue
            t = time.monotonic()
            try:
                if item["kind"] == "family" and not item["path"].exists():
                    if torch_error:
                        raise _Skip(torch_error)
                    log(f"{item['model']}: building and exporting fp32 and fp16")
                    build_family(item, args.quick)
                    spent["family-build"] = time.monotonic() - t
                rec = run_item(item, args, work)
            except _Skip as exc:
                rec = {**_head(item), "status": "skipped", "reason": str(exc)}
            except Exception as exc:
                rec = {**_head(item), "status": "error", "error": f"{type(exc).__name__}: {exc}"}
                rec["traceback"] = traceback.format_exc()[-3000:]
            rec["seconds"] = time.monotonic() - t
            spent[item["kind"]] = max(spent.get(item["kind"], 0.0), rec["seconds"])
            result["models"].append(rec)
            _print(rec)
            result["elapsed_s"] = time.monotonic() - start
            write(args.out, result)
    statuses = [m["status"] for m in result["models"]]
    result["passed"] = "passed" in statuses and all(s in ("passed", "skipped") for s in statuses)
    result["complete"] = all(s != "skipped" for s in statuses)
    result["elapsed_s"] = time.monotonic() - start
    write(args.out, result)
    log("")
    log(markdown(result))
    log(
        f"{statuses.count('passed')} passed, {statuses.count('failed')} failed, "
        f"{statuses.count('error')} errors, {statuses.count('skipped')} skipped in "
        f"{result['elapsed_s']:.0f} s; wrote {args.out / 'gpu.json'} and {args.out / 'GPU.md'}"
    )
    return 0 if result["passed"] else 1


class _Skip(Exception):
    pass


def _head(item: dict[str, Any]) -> dict[str, Any]:
    return {"model": item["model"], "dtype": item["dtype"], "kind": item["kind"]}


def _print(rec: dict[str, Any]) -> None:
    label = f"{rec['model']} {rec['dtype']}"
    if rec["status"] in ("skipped", "error"):
        log(f"{label}: {rec['status'].upper()} {rec.get('reason') or rec.get('error')}")
        return
    check = rec["check"]
    log(
        f"{label}: {'PASSED' if check['passed'] else 'FAILED'} max_rel {_g(check['max_rel'])}, "
        f"{rec['fold']['applied']} folded, BN {rec['fold']['batchnorm_before']}→"
        f"{rec['fold']['batchnorm_after']}, {rec['seconds']:.1f} s"
    )
    for line in check["lines"]:
        log(f"    {line}")


if __name__ == "__main__":
    sys.exit(main())
