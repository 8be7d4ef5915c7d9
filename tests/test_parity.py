"""Parity metrics, provider selection, input generation and IR lowering for the check."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper

import normfuse
from normfuse.core import verdict
from normfuse.runtime import inputs, parity, sessions
from tests.conftest import make_model


def test_metrics_and_rule():
    ref = np.array([0.0, 1.0, -4.0, 2.0], np.float32)
    test = ref + np.array([0.0, 1e-4, 0.0, -2e-4], np.float32)
    r = verdict.compare_outputs("y", ref, test, atol=0.0, rtol=1e-4)
    assert r.max_abs == pytest.approx(2e-4, rel=1e-3)
    assert r.max_rel == pytest.approx(2e-4 / 4, rel=1e-3)  # relative to max|ref|, no NaN on zeros
    assert r.passed  # 2e-4 <= 1e-4 * 4
    assert 0.999 < r.cosine <= 1.0
    strict = verdict.compare_outputs("y", ref, test, atol=0.0, rtol=1e-5)
    assert not strict.passed and strict.min_rtol == pytest.approx(5e-5, rel=1e-3)
    assert "would pass with rtol>=" in strict.line() and strict.line().startswith("FAILED | y |")


def test_zero_reference_does_not_give_nan():
    z = np.zeros(5, np.float32)
    r = verdict.compare_outputs("z", z, z)
    assert r.passed and r.max_rel == 0.0 and r.cosine == 1.0


def test_nan_mismatch_fails():
    ref = np.array([1.0, np.nan, 3.0], np.float32)
    same = verdict.compare_outputs("n", ref, ref.copy())
    assert same.passed and same.nonfinite_mismatch == 0
    diff = verdict.compare_outputs("n", ref, np.array([1.0, 2.0, 3.0], np.float32))
    assert not diff.passed and diff.nonfinite_mismatch == 1 and diff.min_rtol is None


def test_default_tolerances_per_dtype():
    a16 = verdict.compare_outputs("h", np.ones(3, np.float16), np.ones(3, np.float16))
    a32 = verdict.compare_outputs("f", np.ones(3, np.float32), np.ones(3, np.float32))
    i64 = verdict.compare_outputs("i", np.arange(3), np.arange(3) + np.array([0, 0, 1]))
    assert a16.rtol > a32.rtol
    assert not i64.passed  # integers compare exactly


def test_provider_selection_is_quiet_and_honest(capfd):
    providers, label = sessions.select_provider("auto")
    assert label in ("CPU", "CUDA")
    assert providers[-1] == "CPUExecutionProvider"
    captured = capfd.readouterr()
    assert "Failed to load library" not in captured.err + captured.out
    assert sessions.select_provider("cpu") == (["CPUExecutionProvider"], "CPU")
    if label == "CPU":
        with pytest.raises(normfuse.ProviderError, match="--provider cpu"):
            sessions.select_provider("cuda")


def _relu_model(ir_version: int, shape) -> onnx.ModelProto:
    return make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [("x", TP.FLOAT, shape)],
        [("y", TP.FLOAT, shape)],
        [],
        ir_version=ir_version,
    )


def test_newer_ir_version_is_lowered_for_the_check_only():
    model = _relu_model(onnx.IR_VERSION, [2, 3])
    data = model.SerializeToString()
    result = parity.check_models(data, data, provider="cpu")
    assert result.passed
    import onnxruntime as ort

    try:
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception:  # this onnxruntime refuses the IR version: the check must say it lowered it
        assert any("lowered" in n for n in result.notes)
    assert model.ir_version == onnx.IR_VERSION


def test_dynamic_dims(tmp_path):
    model = _relu_model(10, ["batch", 3, "h"])
    data = model.SerializeToString()
    with pytest.raises(normfuse.InputError, match="--shape x="):
        parity.check_models(data, data, provider="cpu")
    result = parity.check_models(data, data, provider="cpu", shapes={"x": [2, 3, 5]})
    assert result.passed
    partial = _relu_model(10, ["batch", 3])
    res = parity.check_models(
        partial.SerializeToString(), partial.SerializeToString(), provider="cpu"
    )
    assert any("batch dimension set to 1" in n for n in res.notes)


def test_generated_inputs_are_seeded_normal(tmp_path):
    import onnxruntime as ort

    model = _relu_model(10, [1000])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = inputs.generate_inputs(sess, seed=3)["x"]
    b = inputs.generate_inputs(sess, seed=3)["x"]
    np.testing.assert_array_equal(a, b)
    assert a.min() < -1 and a.max() > 1  # not uniform [0, 1)


def test_check_api_accepts_any_model_form(rng):
    a = _relu_model(10, [2, 3])
    result = normfuse.check(a, a.SerializeToString(), provider="cpu", runs=2)
    assert result.passed and result.runs == 2


def test_onnxruntime_default_logger_is_quiet_unless_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime's process-wide logger prints, as errors, what is no failure: cuDNN's rejected
    algorithms during its exhaustive search (96 lines for an fp16 ResNet-50 check on an H200).
    normfuse sets it to fatal-only, and back to errors under --debug (the normfuse logger at
    DEBUG)."""
    import logging

    import onnxruntime as ort

    calls: list[int] = []
    monkeypatch.setattr(ort, "set_default_logger_severity", calls.append)
    log = logging.getLogger("normfuse")
    before = log.level
    try:
        log.setLevel(logging.WARNING)
        sessions.ort_module()
        log.setLevel(logging.DEBUG)
        sessions.ort_module()
    finally:
        log.setLevel(before)
    assert calls == [4, 3]


def test_sequence_values_inside_a_model_are_compared(rng: np.random.Generator) -> None:
    """The check exposes every tensor the two models share, sequences too, which onnxruntime
    returns as lists (of differently shaped tensors here): once an "unexpected ValueError"
    (found on onnx's bundled test_sequence_model1). They are compared element by element."""
    c = 8
    w = rng.standard_normal((c, 3, 3, 3)).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2, c), rng.standard_normal(c)
    mean, var = rng.standard_normal(c) * 2, rng.uniform(0.2, 3, c)
    inits = [
        onnx.numpy_helper.from_array(np.asarray(v, np.float32), n)
        for n, v in zip("wgbmv", (w, gamma, beta, mean, var), strict=True)
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"]),
        helper.make_node("MaxPool", ["n"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("SequenceConstruct", ["n", "p"], ["seq"]),
        helper.make_node("SequenceAt", ["seq", "i"], ["y"]),
    ]
    inits.append(onnx.numpy_helper.from_array(np.array(1, np.int64), "i"))
    model = make_model(
        nodes, [("x", TP.FLOAT, [1, 3, 6, 6])], [("y", TP.FLOAT, None)], inits, opset=17
    )
    _, report = normfuse.fold(model)  # the default check
    assert len(report.applied) == 1 and report.parity is not None and report.parity.passed
    parts = [np.ones((2, 2), np.float32), np.zeros(3, np.float32)]
    assert sessions.as_tensor(parts).tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert sessions.as_tensor({"b": [2.0], "a": [1.0]}).tolist() == [1.0, 2.0]


def test_the_shape_to_give_has_the_inputs_rank(rng: np.random.Generator) -> None:
    """A token input [batch, seq] was told to take --shape ids=1x3x224x224."""
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [("x", TP.FLOAT, ["batch", "seq", 8])],
        [("y", TP.FLOAT, None)],
        [onnx.numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")],
    )
    with pytest.raises(normfuse.InputError) as info:
        normfuse.check(model, model)
    assert info.value.note == "give its shape with --shape x=1x16x8"


def test_the_shape_to_give_is_a_multiple_where_the_exporter_says_so(rng: np.random.Generator):
    """torch.export names a detector's input size '32*h': the note said 16, which the model
    cannot take (its reshapes fail at run time)."""
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [("x", TP.FLOAT, ["batch", 3, "32*h", "w*8"])],
        [("y", TP.FLOAT, None)],
        [],
    )
    with pytest.raises(normfuse.InputError) as info:
        normfuse.check(model, model)
    assert info.value.note == "give its shape with --shape x=1x3x32x16"
