"""Numerical parity of two ONNX models on onnxruntime.

* Providers: ``auto`` takes onnxruntime's CUDA provider when it really loads here and the CPU
  provider otherwise, without onnxruntime's error output on machines without CUDA; the result
  says in one line which provider ran.
* Sessions run at ``ORT_DISABLE_ALL`` by default: at higher levels onnxruntime folds
  BatchNormalization into Conv by itself and would hide a wrong fold.
* A model whose IR version is newer than the installed onnxruntime accepts is lowered for the
  check only (noted in the result); the model on disk is untouched.
* Inputs are generated from the graph's input types with a seed: floats from a standard normal
  distribution, integers in ``[0, 8)``, booleans at random. A dynamic batch dimension (axis 0)
  becomes 1; other dynamic dimensions need ``shapes``.
* The pass rule, elementwise: ``|test - ref| <= atol + rtol * max|ref|`` (relative to the
  reference's largest magnitude, so zeros in the reference give neither NaN nor a demand for
  exactness). NaN/Inf must match in position and kind.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from normfuse.errors import InputError, ProviderError
from normfuse.report import Divergence, OutputParity, ParityResult

__all__ = [
    "DEFAULT_TOLERANCES",
    "FOLD_TOLERANCES",
    "check_models",
    "compare_outputs",
    "generate_inputs",
    "load_inputs",
    "parse_tolerances",
    "select_provider",
]

logger = logging.getLogger(__name__)

#: ``(atol, rtol)`` per element type for ``normfuse check``; rtol multiplies the reference's
#: largest magnitude. fp32 5e-5 flags a 1e-3 change in one conv weight of a small CNN (it moves
#: the output by 1-2e-4) and passes exact folds of deep networks (~2e-5).
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float": (1e-6, 5e-5),
    "double": (1e-12, 1e-9),
    "float16": (1e-3, 1e-2),
    "bfloat16": (1e-2, 5e-2),
}

#: The defaults of the check built into ``normfuse fold``: a wrong fold moves outputs by orders
#: of magnitude more than fp32 rounding, which reaches ~1e-4 on deep segmentation networks.
FOLD_TOLERANCES: dict[str, tuple[float, float]] = {**DEFAULT_TOLERANCES, "float": (1e-6, 2e-4)}

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}

ModelSource = str | os.PathLike | bytes


def _ort() -> Any:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    return ort


def _session_options(opt_level: str, external_folder: Path | None = None) -> Any:
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 4  # failures are reported by normfuse itself, in one line
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    if external_folder is not None:
        so.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(external_folder)
        )
    return so


@functools.cache
def _cuda_loads() -> bool:
    """Whether onnxruntime's CUDA provider really runs a session here (checked once, quietly)."""
    ort = _ort()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    so = _session_options("disable")
    so.log_severity_level = 4
    ort.set_default_logger_severity(4)
    try:
        sess = ort.InferenceSession(
            probe.SerializeToString(),
            so,
            providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        )
        return "CUDAExecutionProvider" in sess.get_providers()
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(3)


def select_provider(requested: str = "auto") -> tuple[list[str], str]:
    """The onnxruntime providers to use and a one-word label (``CUDA`` or ``CPU``).

    Raises:
        ProviderError: ``cuda`` was asked for and CUDA cannot load here.
    """
    requested = requested.lower()
    if requested not in ("auto", "cuda", "cpu"):
        raise InputError(f"unknown provider '{requested}'", "use auto, cuda or cpu")
    if requested == "cpu":
        return ["CPUExecutionProvider"], "CPU"
    if _cuda_loads():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], "CUDA"
    if requested == "cuda":
        raise ProviderError(
            "onnxruntime's CUDA provider does not load on this machine",
            "install onnxruntime-gpu with a matching CUDA runtime, or use --provider cpu",
        )
    return ["CPUExecutionProvider"], "CPU"


def _make_session(
    source: ModelSource, providers: list[str], opt_level: str, notes: list[str], which: str = "the"
) -> Any:
    ort = _ort()
    folder = Path(source).parent if isinstance(source, (str, os.PathLike)) else None
    so = _session_options(opt_level, folder)
    payload = str(source) if isinstance(source, (str, os.PathLike)) else source
    try:
        return ort.InferenceSession(payload, so, providers=providers)
    except Exception as exc:
        match = re.search(r"max supported IR version: (\d+)", str(exc))
        if not match:
            raise InputError(
                f"onnxruntime cannot load {which} model: {_first_line(exc)}",
                "fix the model, or pass --no-check to fold without the parity check",
            ) from None
        supported = int(match.group(1))
    proto = (
        onnx.load(str(source), load_external_data=False)
        if folder is not None
        else onnx.load_from_string(source)  # type: ignore[arg-type]
    )
    note = f"IR version {proto.ir_version} lowered to {supported} for the check only"
    if note not in notes:
        notes.append(note)
    proto.ir_version = supported
    try:
        return ort.InferenceSession(proto.SerializeToString(), so, providers=providers)
    except Exception as exc:
        raise InputError(f"onnxruntime cannot load the model: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return text.splitlines()[0][:300] if text else type(exc).__name__


def parse_shape(text: str) -> tuple[str, list[int]]:
    """``name=1x3x224x224`` -> ``("name", [1, 3, 224, 224])``."""
    name, sep, dims = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, [int(d) for d in dims.lower().split("x")]
    except ValueError:
        raise InputError(
            f"cannot read the shape '{text}'", "write it as name=1x3x224x224"
        ) from None


def load_inputs(path: str | os.PathLike) -> list[dict[str, np.ndarray]]:
    """Batches from an ``.npz`` file (one batch) or a folder of ``.npz`` files (one each, sorted)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.npz"))
        if not files:
            raise InputError(f"the folder {p} holds no .npz files")
    elif p.is_file():
        files = [p]
    else:
        raise InputError(f"no such inputs file or folder: {p}")
    batches = []
    for f in files:
        try:
            with np.load(f, allow_pickle=False) as data:
                batches.append({k: data[k] for k in data.files})
        except (OSError, ValueError) as exc:
            raise InputError(
                f"cannot read inputs from {f} ({_first_line(exc)})", "save them with numpy.savez"
            ) from None
    return batches


def _check_feeds(session: Any, feeds: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    expected = {i.name: i for i in session.get_inputs()}
    missing = sorted(set(expected) - set(feeds))
    extra = sorted(set(feeds) - set(expected))
    if missing or extra:
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"unknown {', '.join(extra)}" if extra else "",
            )
            if part
        )
        raise InputError(
            f"the inputs in {where} do not match the model ({detail})",
            f"the model takes {', '.join(expected)}",
        )
    for name, array in feeds.items():
        want = _ORT_TYPES.get(expected[name].type)
        if want is not None and array.dtype != want:
            raise InputError(
                f"input '{name}' in {where} is {array.dtype}, the model takes {np.dtype(want)}",
                f"save it as {np.dtype(want)}",
            )
    return feeds


def parse_tolerances(values: Sequence[str], option: str) -> float | dict[str, float] | None:
    """``["1e-4"]`` -> 1e-4; ``["logits=1e-4", "1e-5"]`` -> per output, with ``*`` for the rest."""
    if not values:
        return None
    result: dict[str, float] = {}
    for text in values:
        name, sep, number = text.rpartition("=")
        try:
            value = float(number)
        except ValueError:
            raise InputError(
                f"cannot read {option} '{text}'", f"write {option} 1e-4 or {option} name=1e-4"
            ) from None
        result[name if sep else "*"] = value
    return result["*"] if list(result) == ["*"] else result


def _tolerance(spec: Mapping[str, float] | float | None, name: str) -> float | None:
    if isinstance(spec, Mapping):
        return spec.get(name, spec.get("*"))
    return spec


def generate_inputs(
    session: Any,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    notes: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded random inputs for every input of an onnxruntime session."""
    rng = np.random.default_rng(seed)
    shapes = dict(shapes or {})
    feeds: dict[str, np.ndarray] = {}
    for inp in session.get_inputs():
        dtype = _ORT_TYPES.get(inp.type)
        if dtype is None and inp.type == "tensor(bfloat16)":
            raise InputError(
                f"input '{inp.name}' is bfloat16, which onnxruntime cannot feed from numpy"
            )
        if dtype is None:
            raise InputError(
                f"input '{inp.name}' has type {inp.type}, which normfuse cannot generate"
            )
        if inp.name in shapes:
            shape = list(shapes[inp.name])
        else:
            shape = []
            for axis, dim in enumerate(inp.shape):
                if isinstance(dim, int) and dim >= 0:
                    shape.append(dim)
                elif axis == 0:
                    shape.append(1)
                    if notes is not None:
                        notes.append(f"input '{inp.name}': dynamic batch dimension set to 1")
                else:
                    raise InputError(
                        f"input '{inp.name}' has the dynamic dimension '{dim}' at axis {axis}",
                        f"give its shape with --shape {inp.name}=1x3x224x224",
                    )
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[inp.name] = rng.integers(0, 8, shape).astype(dtype)
    return feeds


def compare_outputs(
    name: str,
    ref: np.ndarray,
    test: np.ndarray,
    atol: float | None = None,
    rtol: float | None = None,
    defaults: Mapping[str, tuple[float, float]] = DEFAULT_TOLERANCES,
) -> OutputParity:
    """Compare one output; see the module docstring for the rule."""
    dtype = str(ref.dtype)
    default = defaults.get({"float32": "float", "float64": "double"}.get(dtype, dtype), (0.0, 0.0))
    atol = default[0] if atol is None else atol
    rtol = default[1] if rtol is None else rtol
    if ref.shape != test.shape:
        return OutputParity(
            name, dtype, float("inf"), float("inf"), float("inf"), 0.0, 0, atol, rtol, False, None
        )
    r = ref.astype(np.float64)
    t = test.astype(np.float64)
    fin_r, fin_t = np.isfinite(r), np.isfinite(t)
    both = fin_r & fin_t
    nonfinite_mismatch = int(np.sum(fin_r != fin_t)) + int(
        np.sum(~fin_r & ~fin_t & ~((r == t) | (np.isnan(r) & np.isnan(t))))
    )
    diff = np.abs(r[both] - t[both])
    max_abs = float(diff.max()) if diff.size else 0.0
    mean_abs = float(diff.mean()) if diff.size else 0.0
    scale = float(np.abs(r[both]).max()) if diff.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    rv, tv = r[both], t[both]
    denom = float(np.linalg.norm(rv) * np.linalg.norm(tv))
    cosine = float(rv @ tv / denom) if denom > 0 else (1.0 if max_abs == 0 else 0.0)
    passed = nonfinite_mismatch == 0 and max_abs <= atol + rtol * scale
    if nonfinite_mismatch:
        min_rtol = None
    elif scale > 0:
        min_rtol = max(0.0, (max_abs - atol) / scale)
    else:
        min_rtol = 0.0 if max_abs <= atol else None
    return OutputParity(
        name,
        dtype,
        max_abs,
        max_rel,
        mean_abs,
        cosine,
        nonfinite_mismatch,
        atol,
        rtol,
        passed,
        min_rtol,
    )


def check_models(
    reference: ModelSource,
    candidate: ModelSource,
    *,
    provider: str = "auto",
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    runs: int = 1,
    opt_level: str = "disable",
    atol: Mapping[str, float] | float | None = None,
    rtol: Mapping[str, float] | float | None = None,
    inputs: Sequence[Mapping[str, np.ndarray]] | None = None,
    bisect: bool = False,
    cross_check: bool = False,
    defaults: Mapping[str, tuple[float, float]] = DEFAULT_TOLERANCES,
) -> ParityResult:
    """Run two models on the same inputs and compare every output.

    Args:
        reference: The original model (path or serialized bytes).
        candidate: The rewritten model.
        provider: ``auto``, ``cuda`` or ``cpu``.
        seed: Seed of the first generated batch; batch ``i`` uses ``seed + i``.
        shapes: Shapes for inputs with dynamic dimensions.
        runs: Number of generated batches (ignored when ``inputs`` are given).
        opt_level: onnxruntime graph optimization level (``disable``, ``basic``, ``extended``,
            ``all``).
        atol: Absolute tolerance, for all outputs or per output name (``"*"`` for the rest).
        rtol: Relative tolerance (times the reference's largest magnitude), likewise.
        inputs: The user's own batches, each a mapping from input name to array.
        bisect: When an output fails, name the first intermediate tensor (in the reference's
            topological order, matched by name) whose error exceeds its tolerance.
        cross_check: Also run the reference on the CPU and the CUDA provider and compare them,
            so provider noise is told apart from rewrite error (needs CUDA).
        defaults: ``(atol, rtol)`` per element type where ``atol``/``rtol`` say nothing.

    Raises:
        InputError: The models or inputs do not fit together.
        ProviderError: CUDA was required and does not load here.
    """
    providers, label = select_provider(provider)
    if cross_check and label != "CUDA":
        raise ProviderError(
            "--cross-check compares the CPU and CUDA providers, and CUDA does not load here",
            "run it on a machine with onnxruntime-gpu and a CUDA GPU",
        )
    notes: list[str] = []
    ref_sess = _make_session(reference, providers, opt_level, notes, "the reference")
    cand_sess = _make_session(candidate, providers, opt_level, notes, "the rewritten")
    ref_inputs = [(i.name, i.type) for i in ref_sess.get_inputs()]
    cand_inputs = {i.name: i.type for i in cand_sess.get_inputs()}
    missing = [n for n, _ in ref_inputs if n not in cand_inputs]
    mismatched = [n for n, t in ref_inputs if n in cand_inputs and cand_inputs[n] != t]
    if missing or mismatched or len(cand_inputs) != len(ref_inputs):
        raise InputError(
            "the two models take different inputs "
            f"({', '.join(f'{n}: {t}' for n, t in ref_inputs)} vs "
            f"{', '.join(f'{n}: {t}' for n, t in cand_inputs.items())})"
        )
    names = [o.name for o in ref_sess.get_outputs()]
    cand_names = {o.name for o in cand_sess.get_outputs()}
    absent = [n for n in names if n not in cand_names]
    if absent:
        raise InputError(f"the rewritten model lacks the output(s) {', '.join(absent)}")
    for spec, option in ((atol, "--atol"), (rtol, "--rtol")):
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(names) - {"*"})
            if unknown:
                raise InputError(
                    f"{option} names unknown output(s) {', '.join(unknown)}",
                    f"the outputs are {', '.join(names)}",
                )
    if inputs is not None:
        batches = [_check_feeds(ref_sess, dict(b), "--inputs") for b in inputs]
    else:
        batches = [
            generate_inputs(ref_sess, seed + run, shapes, notes if run == 0 else None)
            for run in range(runs)
        ]
    worst: dict[str, OutputParity] = {}
    first_failing: dict[str, np.ndarray] | None = None
    for feeds in batches:
        ref_out = _run(ref_sess, names, feeds, "reference")
        cand_out = _run(cand_sess, names, feeds, "rewritten")
        for name, r, c in zip(names, ref_out, cand_out, strict=True):
            result = compare_outputs(
                name,
                np.asarray(r),
                np.asarray(c),
                _tolerance(atol, name),
                _tolerance(rtol, name),
                defaults,
            )
            if not result.passed and first_failing is None:
                first_failing = feeds
            if name not in worst or _worse(result, worst[name]):
                worst[name] = result
    parity = ParityResult(
        provider=label, outputs=[worst[n] for n in names], runs=len(batches), seed=seed, notes=notes
    )
    if bisect and first_failing is not None:
        parity.divergence = _bisect(
            reference, candidate, providers, opt_level, first_failing, atol, rtol, defaults
        )
    if cross_check:
        cpu_sess = _make_session(reference, ["CPUExecutionProvider"], opt_level, notes)
        feeds = batches[0]
        parity.cross_check = [
            compare_outputs(
                n, np.asarray(a), np.asarray(b), _tolerance(atol, n), _tolerance(rtol, n), defaults
            )
            for n, a, b in zip(
                names,
                _run(cpu_sess, names, feeds, "reference (CPU)"),
                _run(ref_sess, names, feeds, "reference"),
                strict=True,
            )
        ]
    return parity


def _expose_all(source: ModelSource) -> tuple[bytes, Path | None, list[tuple[str, str, str]]]:
    """The model with every node output made a graph output, and those tensors in order."""
    folder = Path(source).parent if isinstance(source, (str, os.PathLike)) else None
    proto = (
        onnx.load(str(source), load_external_data=False)
        if folder is not None
        else onnx.load_from_string(source)  # type: ignore[arg-type]
    )
    existing = {o.name for o in proto.graph.output}
    order = []
    for i, node in enumerate(proto.graph.node):
        for out in node.output:
            if out and out not in existing:
                proto.graph.output.append(onnx.ValueInfoProto(name=out))
                existing.add(out)
                order.append((out, node.name or f"#{i}", node.op_type))
    return proto.SerializeToString(), folder, order


def _bisect(
    reference: ModelSource,
    candidate: ModelSource,
    providers: list[str],
    opt_level: str,
    feeds: dict[str, np.ndarray],
    atol: Mapping[str, float] | float | None,
    rtol: Mapping[str, float] | float | None,
    defaults: Mapping[str, tuple[float, float]],
) -> Divergence | None:
    ref_bytes, ref_folder, order = _expose_all(reference)
    cand_bytes, cand_folder, cand_order = _expose_all(candidate)
    ort = _ort()
    ref_sess = ort.InferenceSession(
        ref_bytes, _session_options(opt_level, ref_folder), providers=providers
    )
    cand_sess = ort.InferenceSession(
        cand_bytes, _session_options(opt_level, cand_folder), providers=providers
    )
    cand_names = {name for name, _, _ in cand_order} | {o.name for o in cand_sess.get_outputs()}
    ref_names = {o.name for o in ref_sess.get_outputs()}
    common = [(n, node, op) for n, node, op in order if n in cand_names and n in ref_names]
    for o in ref_sess.get_outputs():  # graph outputs come last in topological terms
        if o.name not in {n for n, _, _ in common} and o.name in cand_names:
            common.append((o.name, "(graph output)", ""))
    wanted = [n for n, _, _ in common]
    ref_vals = _run(ref_sess, wanted, feeds, "reference")
    cand_vals = _run(cand_sess, wanted, feeds, "rewritten")
    for (name, node, op), r, c in zip(common, ref_vals, cand_vals, strict=True):
        if not isinstance(r, np.ndarray) or not isinstance(c, np.ndarray):
            continue
        result = compare_outputs(
            name, r, c, _tolerance(atol, name), _tolerance(rtol, name), defaults
        )
        if not result.passed:
            return Divergence(
                tensor=name,
                node=node,
                op_type=op,
                max_abs=result.max_abs,
                max_rel=result.max_rel,
                compared=len(common),
            )
    return None


def _run(session: Any, names: list[str], feeds: dict[str, np.ndarray], which: str) -> list[Any]:
    try:
        return session.run(names, feeds)
    except Exception as exc:
        raise InputError(
            f"onnxruntime cannot run the {which} model on these inputs: {_first_line(exc)}",
            "check the input shapes (--shape) or the --inputs",
        ) from None


def _worse(a: OutputParity, b: OutputParity) -> bool:
    return (not a.passed and b.passed) or (a.passed == b.passed and a.max_rel > b.max_rel)
