"""Shared helpers: tiny ONNX models with random, non-trivial BN statistics, run on onnxruntime."""

from __future__ import annotations

import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import normfuse

ort.set_default_logger_severity(3)

NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(ml_dtypes.bfloat16): TensorProto.BFLOAT16,
}


MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture
def resnet(tmp_path) -> Path:
    """A copy of the bundled ResNet-style model."""
    dst = tmp_path / "resnet_small.onnx"
    shutil.copy(MODELS / "resnet_small.onnx", dst)
    return dst


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def tensor(name: str, array: np.ndarray) -> TensorProto:
    """An initializer; bfloat16 arrays go through raw bytes."""
    array = np.asarray(array)
    if array.dtype == ml_dtypes.bfloat16:
        t = helper.make_tensor(name, TensorProto.BFLOAT16, array.shape, array.tobytes(), raw=True)
        return t
    return numpy_helper.from_array(array, name)


def bn_params(
    rng: np.random.Generator, c: int, prefix: str = "bn", dtype=np.float32
) -> list[TensorProto]:
    """gamma (some negative), beta, mean, and variance far from 1."""
    gamma = rng.uniform(0.5, 2.0, c) * np.where(rng.random(c) < 0.3, -1, 1)
    beta = rng.normal(0, 1, c)
    mean = rng.normal(0, 2, c)
    var = rng.uniform(0.05, 6.0, c)
    return [
        tensor(f"{prefix}_{n}", v.astype(dtype))
        for n, v in zip(("scale", "bias", "mean", "var"), (gamma, beta, mean, var), strict=True)
    ]


def bn_node(x: str, y: str, prefix: str = "bn", **attrs) -> onnx.NodeProto:
    return helper.make_node(
        "BatchNormalization",
        [x, f"{prefix}_scale", f"{prefix}_bias", f"{prefix}_mean", f"{prefix}_var"],
        [y],
        name=prefix,
        **attrs,
    )


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[tuple[str, int, list]],
    outputs: list[tuple[str, int, list | None]],
    initializers: list[TensorProto],
    opset: int = 17,
    ir_version: int = 10,
    functions: list | None = None,
    extra_opsets: list | None = None,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        initializers,
    )
    opsets = [helper.make_opsetid("", opset), *(extra_opsets or [])]
    model = helper.make_model(
        graph, opset_imports=opsets, ir_version=ir_version, functions=functions
    )
    model.producer_name = "normfuse-tests"
    if any(s is None for _, _, s in outputs):
        inferred = onnx.shape_inference.infer_shapes(model)
        known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
        for out in model.graph.output:
            if not out.type.tensor_type.HasField("shape") and out.name in known:
                out.type.CopyFrom(known[out.name].type)
    return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def assert_folds(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    *,
    rtol: float = 1e-5,
    applied: int | None = None,
    skipped: int = 0,
    **kwargs,
) -> tuple[onnx.ModelProto, normfuse.Report]:
    """Fold, compare with the original on onnxruntime (ORT_DISABLE_ALL), run the full checker."""
    onnx.checker.check_model(model, full_check=True)
    folded, report = normfuse.fold(model, check=False, **kwargs)
    assert isinstance(folded, onnx.ModelProto)
    onnx.checker.check_model(folded, full_check=True)
    if applied is not None:
        assert len(report.applied) == applied, report.to_dict()["entries"]
    assert len(report.skipped) == skipped, [(e.node, e.reason) for e in report.skipped]
    ref = run(model, feeds)
    got = run(folded, feeds)
    for r, g in zip(ref, got, strict=True):
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        scale = np.abs(r64).max()
        assert scale > 0
        err = np.abs(r64 - g64).max() / scale
        assert err <= rtol, f"relative error {err:.3g} > {rtol:g}"
    return folded, report


def normal(rng: np.random.Generator, shape, dtype=np.float32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)
