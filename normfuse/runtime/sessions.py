"""onnxruntime sessions: which provider runs, and a session built for a model.

* Providers: ``auto`` takes onnxruntime's CUDA provider when it really loads here and the CPU
  provider otherwise, without onnxruntime's error output on machines without CUDA; the result
  says in one line which provider ran.
* Sessions run at ``ORT_DISABLE_ALL`` by default: at higher levels onnxruntime folds
  BatchNormalization into Conv by itself and would hide a wrong fold.
* A model whose IR version is newer than the installed onnxruntime accepts is lowered for the
  session only (noted); the model on disk is untouched.

Imports: onnxruntime (lazily), onnx, numpy and :mod:`normfuse.core`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from normfuse.core.errors import InputError, ProviderError

__all__ = [
    "ORT_TYPES",
    "ModelSource",
    "as_tensor",
    "check_feeds",
    "expected_check_seconds",
    "first_line",
    "make_session",
    "ort_module",
    "run_session",
    "select_provider",
    "session_options",
    "slow_check_line",
    "with_options",
]

logger = logging.getLogger(__name__)


ORT_TYPES = {
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


def _default_severity() -> int:
    """onnxruntime's process-wide log level: fatal only, unless normfuse logs at DEBUG.

    onnxruntime's default logger (not a session's) prints, as errors, what normfuse reports
    itself in one line or what is no failure at all: with the CUDA provider, cuDNN's rejected
    algorithm candidates during its exhaustive search ("No execution plans support the graph",
    over a hundred lines per fp16 ResNet-50 on an H200). A real failure raises, and normfuse
    reports it; ``--debug`` shows onnxruntime's errors again.
    """
    return 3 if logging.getLogger("normfuse").isEnabledFor(logging.DEBUG) else 4


def ort_module() -> Any:
    import onnxruntime as ort

    ort.set_default_logger_severity(_default_severity())
    return ort


def session_options(opt_level: str, external_folder: Path | None = None) -> Any:
    ort = ort_module()
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
    ort = ort_module()
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
    so = session_options("disable")
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
        ort.set_default_logger_severity(_default_severity())


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


def with_options(providers: list[str], *, exact_math: bool = True) -> list[Any]:
    """The providers with the options a parity run needs: onnxruntime's CUDA provider computes
    float32 convolutions and MatMuls in TF32 by default (10-bit mantissas, ~1e-3 relative), which
    would drown the error of the rewrite being judged; ``exact_math`` turns that off."""
    if not exact_math:
        return list(providers)
    return [
        ("CUDAExecutionProvider", {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p
        for p in providers
    ]


def make_session(
    source: ModelSource,
    providers: list[str],
    opt_level: str,
    notes: list[str],
    which: str = "the",
    *,
    exact_math: bool = True,
    folder: Path | None = None,
) -> Any:
    """An onnxruntime session for ``source``; ``exact_math``: no TF32 on CUDA (parity runs);
    ``folder``: where the external data of a model given as bytes lies."""
    ort = ort_module()
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source).parent
    so = session_options(opt_level, folder)
    payload = str(source) if isinstance(source, (str, os.PathLike)) else source
    providers = with_options(providers, exact_math=exact_math)
    try:
        return ort.InferenceSession(payload, so, providers=providers)
    except Exception as exc:
        match = re.search(r"max supported IR version: (\d+)", str(exc))
        if not match:
            raise _load_error(exc, which) from None
        supported = int(match.group(1))
    proto = (
        onnx.load(str(source), load_external_data=False)
        if isinstance(source, (str, os.PathLike))
        else onnx.load_from_string(source)
    )
    note = f"IR version {proto.ir_version} lowered to {supported} for the check only"
    if note not in notes:
        notes.append(note)
    proto.ir_version = supported
    try:
        return ort.InferenceSession(proto.SerializeToString(), so, providers=providers)
    except Exception as exc:
        raise _load_error(exc, which) from None


def _load_error(exc: BaseException, which: str) -> InputError:
    """Why onnxruntime refused a model, and what to do: a missing kernel (an operator version
    below 7, or a type such as float64 Conv that this build has no kernel for) is no fault of
    the model."""
    text = str(exc)
    kernel = re.search(r"Could not find an implementation for \w+\((\d+)\)", text)
    if kernel and int(kernel.group(1)) < 7:
        fix = (
            "onnxruntime runs no operator version below 7: convert the model to a newer opset "
            "(onnx.version_converter.convert_version(model, 13)) to check it, or pass --no-check"
        )
    elif kernel:
        fix = (
            "this onnxruntime has no kernel for that operator with these types (float64 and "
            "bfloat16 lack many on the CPU): the model may well be valid; pass --no-check to "
            "rewrite it without the parity check, or check on a provider that has the kernel"
        )
    elif which.endswith("rewritten"):  # the original loaded: normfuse wrote what it refuses
        fix = (
            "the original model loads, so this is a normfuse defect, not a fault of the model: "
            "nothing was written; rerun with --debug and report it"
        )
    else:
        fix = "fix the model, or pass --no-check to rewrite it without the parity check"
    return InputError(f"onnxruntime cannot load {which} model: {first_line(exc)}", fix)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    line = text.splitlines()[0][:300].rstrip(".") if text else ""
    return line or type(exc).__name__


def check_feeds(session: Any, feeds: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
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
        want = ORT_TYPES.get(expected[name].type)
        if want is not None and array.dtype != want:
            raise InputError(
                f"input '{name}' in {where} is {array.dtype}, the model takes {np.dtype(want)}",
                f"save it as {np.dtype(want)}",
            )
    return feeds


def run_session(
    session: Any, names: list[str], feeds: dict[str, np.ndarray], which: str
) -> list[np.ndarray]:
    """``session.run``, every value as one array (:func:`as_tensor`)."""
    try:
        return [as_tensor(v) for v in session.run(names, feeds)]
    except Exception as exc:
        raise InputError(
            f"onnxruntime cannot run the {which} model on these inputs: {first_line(exc)}",
            "check the input shapes (--shape) or the --inputs",
        ) from None


def as_tensor(value: Any) -> np.ndarray:
    """A value onnxruntime returned, as one array: a sequence (a list) or a map (a dict, its
    values in key order) becomes its elements flattened and joined, so that it is compared
    element by element (a different length is a different shape)."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, dict):
        value = [value[k] for k in sorted(value)]
    if isinstance(value, list | tuple):
        parts = [np.ravel(as_tensor(v)) for v in value]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return np.asarray(value)


#: A check whose expected time is above this many seconds is announced before it starts.
SLOW_CHECK_S = 30.0


def expected_check_seconds(nodes: int, initializers: int) -> float:
    """Roughly how long the check of a model this size takes: building one onnxruntime
    session per model (two), which grows faster than linearly in the nodes and the initializers.

    Measured with onnxruntime 1.31 at ``ORT_DISABLE_ALL`` on two shared cores: a chain of
    10k / 50k / 100k / 200k small nodes builds in 0.2 / 1.6 / 3.6 / 9.8 s; with one initializer
    per second node, 1.3 / 20 / 86 / 208 s. A rough figure, for telling seconds from minutes.
    """
    per_session = 9.8 * (nodes / 200_000) ** 1.33 + 1.3 * (initializers / 5_000) ** 1.75
    return 2 * per_session


def slow_check_line(nodes: int, initializers: int) -> str | None:
    """One line saying that the check will be slow and how to skip it, or ``None``."""
    seconds = expected_check_seconds(nodes, initializers)
    if seconds < SLOW_CHECK_S:
        return None
    when = f"{seconds / 60:.0f} minutes" if seconds >= 90 else f"{seconds:.0f} s"
    return (
        f"the check builds an onnxruntime session per model for {nodes:,} nodes and "
        f"{initializers:,} initializers: expect about {when} (--no-check skips it)"
    )
