"""Issue 18: ONNX graphs written by other converters (tf2onnx from Keras, paddle2onnx).

Each graph is built by hand with onnx.helper, node for node, attribute for attribute and with the
constant shapes and dtypes of real tf2onnx 1.17 output (tensorflow 2.21, keras 3.15, tf_keras
2.21; ``benchmarks/converters.py`` converts the same layers) or, for paddle2onnx, of the
sequences the issue lists, so that no TensorFlow or Paddle is needed here. BN statistics are
random and far from the identity (running variance 0.05-6, some negative gamma).

Each test folds with the public API (``normfuse.fold(model, check=True)``) and checks:
(a) parity with the original on onnxruntime at ORT_DISABLE_ALL, relative error <= 1e-5 of the
output's max-abs; (b) what folded and what stayed; (c) ``onnx.checker`` with ``full_check``.
Every pattern folds (through the layout ops, normfuse/onnxgraph/paths.py) or raises; the
misaligned ones stay refused with their reasons. ``xfail(strict=True)`` marks a pattern that does
not fold yet (none at present).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import normfuse
from tests.conftest import bn_node, bn_params, make_model, tensor

F = TensorProto.FLOAT
ML = [helper.make_opsetid("ai.onnx.ml", 2)]  # tf2onnx always imports it
IR = {11: 6, 13: 7, 17: 8}  # the IR versions the converters write with each opset
EPS = 1e-3  # Keras' BatchNormalization and LayerNormalization default
LAYOUT_OPS = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
ELEMENTWISE = {"Mul", "Add", "Sub", "Div"}


def xfail(pattern: str):
    # raises=AssertionError: an import error or a ParityError is a real failure, not the gap
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=f"issue 18: {pattern}")


# ---------------------------------------------------------------------------------------- helpers
def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.5).astype(np.float32)


def _stats(rng: np.random.Generator, c: int) -> tuple[np.ndarray, ...]:
    """gamma (some negative), beta, mean, variance far from 1; float64."""
    gamma = rng.uniform(0.5, 2.0, c) * np.where(rng.random(c) < 0.3, -1, 1)
    return gamma, rng.normal(0, 1, c), rng.normal(0, 2, c), rng.uniform(0.05, 6.0, c)


def _bn_as_mul_add(rng: np.random.Generator, c: int, eps: float = EPS):
    """What Keras writes for an inference BN: ``x * s + t`` with s, t from random statistics."""
    gamma, beta, mean, var = _stats(rng, c)
    s = gamma / np.sqrt(var + eps)
    return s.astype(np.float32), (beta - mean * s).astype(np.float32)


def _tf2onnx(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """tf2onnx's header: IR version, ai.onnx.ml import, producer; no value_info."""
    model.ir_version = IR[opset]
    model.producer_name, model.producer_version = "tf2onnx", "1.17.0"
    del model.graph.value_info[:]
    return model


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _parity(original: onnx.ModelProto, result: onnx.ModelProto, feeds, rtol: float = 1e-5) -> None:
    ref, got = _run(original, feeds), _run(result, feeds)
    assert len(ref) == len(got)
    for r, g in zip(ref, got, strict=True):
        assert r.shape == g.shape
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        scale = np.abs(r64).max()
        assert scale > 0
        err = np.abs(r64 - g64).max() / scale
        assert err <= rtol, f"relative error {err:.3g} > {rtol:g}"


def _fold(model: onnx.ModelProto, feeds, **kwargs) -> tuple[onnx.ModelProto, normfuse.Report]:
    """Check the input, fold (parity-checked by normfuse too), check the output, compare on ORT;
    ``inspect`` predicted what folded, with the same targets."""
    onnx.checker.check_model(model, full_check=True)
    before = model.SerializeToString()
    folded, report = normfuse.fold(model, check=True, **kwargs)
    assert model.SerializeToString() == before, "fold modified its input"
    assert isinstance(folded, onnx.ModelProto)
    onnx.checker.check_model(folded, full_check=True)
    _parity(model, folded, feeds)
    predicted = normfuse.inspect(model, norm_affine=kwargs.get("norm_affine", False))
    foldable = {(e.node, e.target) for e in predicted.entries if e.status == "foldable"}
    assert foldable == {(e.node, e.target) for e in report.applied}, "inspect differs from fold"
    return folded, report


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _consts(model: onnx.ModelProto) -> set[str]:
    names = {i.name for i in model.graph.initializer}
    names |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return names


def _affines(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Mul/Add/Sub/Div nodes with exactly one constant operand."""
    consts = _consts(model)
    return [
        n
        for n in model.graph.node
        if n.op_type in ELEMENTWISE and len(n.input) == 2 and sum(i in consts for i in n.input) == 1
    ]


def _skips(report: normfuse.Report) -> list[tuple[str, str, str | None]]:
    return [(e.op_type, e.node, e.reason) for e in report.skipped]


def _assert_folded(
    model: onnx.ModelProto,
    folded: onnx.ModelProto,
    report: normfuse.Report,
    must_fold: list[str],
    *,
    kept: dict[str, int] | None = None,
    bias_adds: int = 0,
) -> None:
    """No BN or affine left (``bias_adds`` constant Adds may stay as a MatMul's bias), every node
    of ``must_fold`` reported applied, nothing skipped, and the layout ops in ``kept`` still there
    (those not named may be dropped only as provable no-ops, which parity then vouches for)."""
    ops = _ops(folded)
    assert "BatchNormalization" not in ops, ops
    left = _affines(folded)
    assert not [n.op_type for n in left if n.op_type in ("Mul", "Div")], ops
    assert len(left) <= bias_adds, [(n.op_type, n.name) for n in left]
    assert not report.skipped, _skips(report)
    applied = {e.node for e in report.applied}
    assert set(must_fold) <= applied, (must_fold, applied)
    for op, count in (kept or {}).items():
        assert ops.count(op) == count, (op, ops)
    # every linear op is still there
    for op in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
        assert ops.count(op) == _ops(model).count(op), ops


def _assert_refused(
    model: onnx.ModelProto, folded: onnx.ModelProto, report: normfuse.Report, bn: str
) -> None:
    """The BN stays with a reason, and the graph is the original one (weights included)."""
    assert _ops(folded) == _ops(model)
    entries = [e for e in report.skipped if e.node == bn]
    assert entries and entries[0].reason, _skips(report)
    assert not report.applied, [(e.op_type, e.node) for e in report.applied]
    orig = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    new = {i.name: onnx.numpy_helper.to_array(i) for i in folded.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Conv":
            w = node.input[1]
            assert np.array_equal(orig[w], new[w])


def _nhwc(rng: np.random.Generator, *shape: int) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal(shape).astype(np.float32)}


T = helper.make_node


# --------------------------------------------------- 1. tf_keras without remove_back_to_back
def test_conv_transpose_pair_bn():
    """tf_keras Conv2D + BatchNormalization, tf2onnx ``optimizers={}`` (opset 13)."""
    rng = _rng(1)
    nodes = [
        T("Transpose", ["x"], ["x_nchw"], name="conv2d/Conv2D__6", perm=[0, 3, 1, 2]),
        T(
            "Conv",
            ["x_nchw", "W", "B"],
            ["conv"],
            name="conv2d/BiasAdd",
            dilations=[1, 1],
            strides=[1, 1],
            kernel_shape=[3, 3],
            group=1,
        ),
        T("Transpose", ["conv"], ["conv_nhwc"], name="conv2d/BiasAdd__8", perm=[0, 2, 3, 1]),
        T("Transpose", ["conv_nhwc"], ["bn_in"], name="bn/FusedBatchNormV3__10", perm=[0, 3, 1, 2]),
        bn_node("bn_in", "bn_out", "bn", epsilon=EPS),
        T("Transpose", ["bn_out"], ["y_nhwc"], name="bn/FusedBatchNormV3__12", perm=[0, 2, 3, 1]),
        T("Identity", ["y_nhwc"], ["id0"], name="Identity__1"),
        T("Identity", ["id0"], ["y"], name="Identity__2"),
    ]
    inits = [tensor("W", _w(rng, 4, 3, 3, 3)), tensor("B", _w(rng, 4)), *bn_params(rng, 4)]
    model = _tf2onnx(
        make_model(
            nodes,
            [("x", F, ["unk__56", 6, 6, 3])],
            [("y", F, ["unk__56", 4, 4, 4])],
            inits,
            opset=13,
            extra_opsets=ML,
        ),
        13,
    )
    folded, report = _fold(model, _nhwc(rng, 2, 6, 6, 3))
    _assert_folded(model, folded, report, ["bn"])
    # the outer Transposes change the layout; the inner pair cancels and may go, but only together
    assert _ops(folded).count("Transpose") in (2, 4), _ops(folded)


# --------------------------------------------------- 2. no-op Reshape on a 1x1-spatial tensor
def test_conv_noop_reshape_bn():
    """tf_keras GAP(keepdims) -> Conv2D 1x1 -> BN, tf2onnx default optimizers (InceptionV3-like)."""
    rng = _rng(2)
    nodes = [
        T("Transpose", ["x"], ["x_nchw"], name="conv2d/Conv2D__6", perm=[0, 3, 1, 2]),
        T(
            "Conv",
            ["x_nchw", "W0", "B0"],
            ["c0"],
            name="conv2d/BiasAdd",
            dilations=[1, 1],
            strides=[1, 1],
            kernel_shape=[3, 3],
            group=1,
        ),
        T("GlobalAveragePool", ["c0"], ["gap"], name="global_average_pooling2d/Mean"),
        T("Reshape", ["gap", "new_shape__61"], ["gap_r"], name="Reshape__61"),
        T(
            "Conv",
            ["gap_r", "W1", "B1"],
            ["c1"],
            name="conv2d_1/BiasAdd",
            dilations=[1, 1],
            strides=[1, 1],
            kernel_shape=[1, 1],
            group=1,
        ),
        T("Reshape", ["c1", "new_shape__58"], ["bn_in"], name="bn/FusedBatchNormV3__54"),
        bn_node("bn_in", "bn_out", "bn", epsilon=EPS),
        T("Reshape", ["bn_out", "new_shape__62"], ["y"], name="bn/FusedBatchNormV3__56"),
    ]
    inits = [
        tensor("new_shape__62", np.array([-1, 1, 1, 5], np.int64)),
        tensor("new_shape__61", np.array([-1, 4, 1, 1], np.int64)),
        tensor("new_shape__58", np.array([-1, 5, 1, 1], np.int64)),
        tensor("W1", _w(rng, 5, 4, 1, 1)),
        tensor("B1", _w(rng, 5)),
        tensor("W0", _w(rng, 4, 3, 3, 3)),
        tensor("B0", _w(rng, 4)),
        *bn_params(rng, 5),
    ]
    model = _tf2onnx(
        make_model(
            nodes,
            [("x", F, ["unk__63", 6, 6, 3])],
            [("y", F, ["unk__64", 1, 1, 5])],
            inits,
            opset=13,
            extra_opsets=ML,
        ),
        13,
    )
    folded, report = _fold(model, _nhwc(rng, 2, 6, 6, 3))
    _assert_folded(model, folded, report, ["bn"], kept={"Transpose": 1, "GlobalAveragePool": 1})
    # the last Reshape (N,5,1,1)->(N,1,1,5) is a no-op on the data too, but it is the output's
    # declared layout; the two -1/C/1/1 Reshapes are no-ops and may go
    assert _ops(folded).count("Reshape") >= 1


# --------------------------------------------------------------------------- 3. paddle2onnx
B = "p2o.DynamicDimension.0"  # paddle2onnx's name for a -1 batch


def _paddle(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    model = make_model(nodes, inputs, outputs, inits, opset=11, ir_version=IR[11])
    model.producer_name, model.producer_version = "PaddlePaddle", "1.2.0"
    return model


def test_paddle_conv_add_identity_bn():
    rng = _rng(3)
    nodes = [
        T(
            "Conv",
            ["x", "conv2d_0.w_0"],
            ["conv2d_1.tmp_0"],
            name="p2o.Conv.0",
            dilations=[1, 1],
            group=1,
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            strides=[1, 1],
        ),
        T("Add", ["conv2d_1.tmp_0", "conv2d_0.b_0"], ["conv2d_1.tmp_1"], name="p2o.Add.0"),
        T("Identity", ["conv2d_1.tmp_1"], ["conv2d_1.tmp_1.id"], name="p2o.Identity.0"),
        bn_node("conv2d_1.tmp_1.id", "y", "bn", epsilon=1e-5, momentum=0.9),
    ]
    inits = [
        tensor("conv2d_0.w_0", _w(rng, 6, 3, 3, 3)),
        tensor("conv2d_0.b_0", _w(rng, 1, 6, 1, 1)),
        *bn_params(rng, 6),
    ]
    model = _paddle(nodes, [("x", F, [B, 3, 8, 8])], [("y", F, [B, 6, 8, 8])], inits)
    folded, report = _fold(model, {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)})
    _assert_folded(model, folded, report, ["bn", "p2o.Add.0"])


@pytest.mark.parametrize("source", ["Concat", "Conv"])
def test_paddle_identity_fan_out_is_named_only_where_a_linear_op_lies_beyond(source):
    """paddle2onnx DenseNet: ``Concat -> Identity -> {BN, Identity}``. The BN stays because no
    linear op lies beyond the Identity, which is the reason to give (the fan-out blamed before
    would not fold it if removed); beyond a Conv the fan-out is what stops the fold."""
    rng = _rng(9)
    conv = dict(kernel_shape=[1, 1], pads=[0, 0, 0, 0], strides=[1, 1])
    first = (
        T("Concat", ["x", "x"], ["cat"], name="p2o.Concat.0", axis=1)
        if source == "Concat"
        else T("Conv", ["x", "w0"], ["cat"], name="p2o.Conv.0", **conv)
    )
    nodes = [
        first,
        T("Identity", ["cat"], ["cat.id"], name="p2o.Identity.9"),
        T("Identity", ["cat.id"], ["cat.id2"], name="p2o.Identity.10"),
        bn_node("cat.id", "b", "bn", epsilon=1e-5, momentum=0.9),
        T("Relu", ["b"], ["r"], name="p2o.Relu.0"),
        T("Conv", ["r", "w1"], ["y"], name="p2o.Conv.1", **conv),
    ]
    inits = [tensor("w0", _w(rng, 6, 3, 1, 1)), tensor("w1", _w(rng, 4, 6, 1, 1))]
    inits += bn_params(rng, 6)
    model = _paddle(
        nodes,
        [("x", F, [B, 3, 5, 5])],
        [("y", F, [B, 4, 5, 5]), ("cat.id2", F, [B, 6, 5, 5])],
        inits,
    )
    folded, report = _fold(model, {"x": rng.standard_normal((2, 3, 5, 5)).astype(np.float32)})
    _assert_refused(model, folded, report, "bn")
    reason = next(e.reason for e in report.skipped if e.node == "bn")
    if source == "Concat":
        assert "its input comes from Concat 'p2o.Concat.0', not a linear op" in reason, reason
        assert "also feeds" not in reason.split(";")[0], reason
    else:
        assert "the output of Identity 'p2o.Identity.9' also feeds" in reason, reason


def test_keras_preprocessing_scale_after_a_shift_folds_alone_into_the_padded_stem():
    """Keras' Rescaling then Normalization before a 'same'-padded stem conv (EfficientNetV2):
    ``x * 1/255 - mean`` then ``* 1/std``. The shift cannot fold into a conv that pads its input
    with zeros, but the last scale alone can, exactly; ``--norm-affine`` is offered only for it,
    and folds it; the other two keep the padding reason."""
    rng = _rng(11)
    mean = rng.uniform(0.3, 0.6, (1, 3, 1, 1)).astype(np.float32)
    inv_std = rng.uniform(2.0, 5.0, (1, 3, 1, 1)).astype(np.float32)
    nodes = [
        T("Mul", ["x", "k255"], ["r"], name="rescaling/mul"),
        T("Sub", ["r", "mean"], ["c"], name="normalization/sub"),
        T("Mul", ["c", "inv_std"], ["n"], name="normalization/truediv"),
        T("Conv", ["n", "w"], ["y"], name="stem_conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    inits = [
        tensor("k255", np.array(1 / 255, np.float32)),
        tensor("mean", mean),
        tensor("inv_std", inv_std),
        tensor("w", _w(rng, 8, 3, 3, 3)),
    ]
    model = _tf2onnx(
        make_model(nodes, [("x", F, [1, 3, 8, 8])], [("y", F, [1, 8, 8, 8])], inits, opset=13), 13
    )
    feeds = {"x": rng.uniform(0, 255, (1, 3, 8, 8)).astype(np.float32)}
    _, report = _fold(model, feeds)
    fixes = {e.node: e.fix for e in report.skipped}
    assert fixes == {
        "rescaling/mul": None,
        "normalization/sub": None,
        "normalization/truediv": "pass --norm-affine (norm_affine=True)",
    }, fixes
    padding = [e for e in report.skipped if "pads its input with zeros" in e.reason]
    assert {e.node for e in padding} == {"rescaling/mul", "normalization/sub"}
    folded, report = _fold(model, feeds, norm_affine=True)
    assert [e.node for e in report.applied] == ["normalization/truediv"]
    assert _ops(folded) == ["Mul", "Sub", "Conv"]


def test_paddle_matmul_add_identity_bn():
    rng = _rng(4)
    nodes = [
        T("MatMul", ["x", "linear_0.w_0"], ["linear_1.tmp_0"], name="p2o.MatMul.0"),
        T("Add", ["linear_1.tmp_0", "linear_0.b_0"], ["linear_1.tmp_1"], name="p2o.Add.0"),
        T("Identity", ["linear_1.tmp_1"], ["linear_1.tmp_1.id"], name="p2o.Identity.0"),
        bn_node("linear_1.tmp_1.id", "y", "bn", epsilon=1e-5, momentum=0.9),
    ]
    inits = [
        tensor("linear_0.w_0", _w(rng, 10, 7)),
        tensor("linear_0.b_0", _w(rng, 7)),
        *bn_params(rng, 7),
    ]
    model = _paddle(nodes, [("x", F, [B, 10])], [("y", F, [B, 7])], inits)
    folded, report = _fold(model, {"x": rng.standard_normal((3, 10)).astype(np.float32)})
    _assert_folded(model, folded, report, ["bn"], bias_adds=1)


def test_paddle_convtranspose_identity_add_identity_bn():
    rng = _rng(5)
    nodes = [
        T(
            "ConvTranspose",
            ["x", "conv2d_transpose_0.w_0"],
            ["ct.tmp_0"],
            name="p2o.ConvTranspose.0",
            dilations=[1, 1],
            group=1,
            kernel_shape=[4, 4],
            pads=[1, 1, 1, 1],
            strides=[2, 2],
        ),
        T("Identity", ["ct.tmp_0"], ["ct.tmp_0.id"], name="p2o.Identity.0"),
        T("Add", ["ct.tmp_0.id", "conv2d_transpose_0.b_0"], ["ct.tmp_1"], name="p2o.Add.0"),
        T("Identity", ["ct.tmp_1"], ["ct.tmp_1.id"], name="p2o.Identity.1"),
        bn_node("ct.tmp_1.id", "y", "bn", epsilon=1e-5, momentum=0.9),
    ]
    inits = [
        tensor("conv2d_transpose_0.w_0", _w(rng, 4, 5, 4, 4)),
        tensor("conv2d_transpose_0.b_0", _w(rng, 1, 5, 1, 1)),
        *bn_params(rng, 5),
    ]
    model = _paddle(nodes, [("x", F, [B, 4, 5, 5])], [("y", F, [B, 5, 10, 10])], inits)
    folded, report = _fold(model, {"x": rng.standard_normal((2, 4, 5, 5)).astype(np.float32)})
    _assert_folded(model, folded, report, ["bn", "p2o.Add.0"])


def test_paddle_conv1d_identity_squeeze_bn():
    rng = _rng(6)
    nodes = [
        T("Unsqueeze", ["x"], ["x4"], name="p2o.Unsqueeze.0", axes=[2]),
        T(
            "Conv",
            ["x4", "conv1d_0.w_0", "conv1d_0.b_0"],
            ["conv1d_1.tmp_0"],
            name="p2o.Conv.0",
            dilations=[1, 1],
            group=1,
            kernel_shape=[1, 3],
            pads=[0, 1, 0, 1],
            strides=[1, 1],
        ),
        T("Identity", ["conv1d_1.tmp_0"], ["conv1d_1.tmp_0.id"], name="p2o.Identity.0"),
        T("Squeeze", ["conv1d_1.tmp_0.id"], ["conv1d_1.tmp_1"], name="p2o.Squeeze.0", axes=[2]),
        bn_node("conv1d_1.tmp_1", "y", "bn", epsilon=1e-5, momentum=0.9),
    ]
    inits = [
        tensor("conv1d_0.w_0", _w(rng, 6, 4, 1, 3)),
        tensor("conv1d_0.b_0", _w(rng, 6)),
        *bn_params(rng, 6),
    ]
    model = _paddle(nodes, [("x", F, [B, 4, 12])], [("y", F, [B, 6, 12])], inits)
    folded, report = _fold(model, {"x": rng.standard_normal((2, 4, 12)).astype(np.float32)})
    _assert_folded(model, folded, report, ["bn"], kept={"Squeeze": 1, "Unsqueeze": 1})


# ------------------------------------------------------- 4. Keras 3: BN as Mul/Add on NHWC
def test_keras3_conv_transpose_mul_add():
    """keras 3 Conv2D + BatchNormalization, tf2onnx ``optimizers={}`` (opset 13)."""
    rng = _rng(7)
    s, t = _bn_as_mul_add(rng, 4)
    nodes = [
        T("Transpose", ["x"], ["x_nchw"], name="conv2d_1/convolution__26", perm=[0, 3, 1, 2]),
        T(
            "Conv",
            ["x_nchw", "W", "B"],
            ["conv"],
            name="conv2d_1/BiasAdd",
            dilations=[1, 1],
            strides=[1, 1],
            kernel_shape=[3, 3],
            group=1,
        ),
        T("Transpose", ["conv"], ["conv_nhwc"], name="conv2d_1/BiasAdd__28", perm=[0, 2, 3, 1]),
        T("Mul", ["conv_nhwc", "bn/batchnorm/mul:0"], ["m"], name="bn/batchnorm/mul_1"),
        T("Add", ["m", "bn/batchnorm/sub:0"], ["a"], name="bn/batchnorm/add_1"),
        T("Identity", ["a"], ["id0"], name="Identity__1"),
        T("Identity", ["id0"], ["y"], name="Identity__2"),
    ]
    inits = [
        tensor("W", _w(rng, 4, 3, 3, 3)),
        tensor("B", _w(rng, 4)),
        tensor("bn/batchnorm/mul:0", s),
        tensor("bn/batchnorm/sub:0", t),
    ]
    model = _tf2onnx(
        make_model(
            nodes,
            [("x", F, ["unk__30", 6, 6, 3])],
            [("y", F, ["unk__31", 4, 4, 4])],
            inits,
            opset=13,
            extra_opsets=ML,
        ),
        13,
    )
    folded, report = _fold(model, _nhwc(rng, 2, 6, 6, 3))
    _assert_folded(
        model, folded, report, ["bn/batchnorm/mul_1", "bn/batchnorm/add_1"], kept={"Transpose": 2}
    )


# --------------------------------------------------------------- 5. Keras Conv1D, Dense rank 3
def test_keras_conv1d_squeeze_add_mul_add():
    """keras 3 / tf_keras Conv1D + BatchNormalization, tf2onnx default optimizers (opset 13)."""
    rng = _rng(8)
    s, t = _bn_as_mul_add(rng, 4)
    nodes = [
        T("Unsqueeze", ["x", "const_fold_opt__37"], ["x4"], name="conv1d/convolution/ExpandDims"),
        T("Transpose", ["x4"], ["x_nchw"], name="conv1d/convolution__6", perm=[0, 3, 1, 2]),
        T(
            "Conv",
            ["x_nchw", "conv1d/convolution/ExpandDims_1:0"],
            ["conv"],
            name="conv1d/convolution",
            dilations=[1, 1],
            strides=[1, 1],
            kernel_shape=[1, 3],
            group=1,
        ),
        T("Squeeze", ["conv", "axes_const__13__14"], ["sq"], name="conv1d/convolution/Squeeze"),
        T("Add", ["sq", "const_fold_opt__38"], ["biased"], name="conv1d/BiasAdd"),
        T("Mul", ["biased", "bn/batchnorm/mul:0"], ["m"], name="bn/batchnorm/mul_1"),
        T("Add", ["m", "const_fold_opt__35"], ["a"], name="bn/batchnorm/add_1"),
        T("Transpose", ["a"], ["y"], name="bn/batchnorm/add_1__12", perm=[0, 2, 1]),
    ]
    inits = [
        tensor("conv1d/convolution/ExpandDims_1:0", _w(rng, 4, 3, 1, 3)),
        tensor("bn/batchnorm/mul:0", s.reshape(1, 4, 1)),
        tensor("const_fold_opt__38", _w(rng, 1, 4, 1)),
        tensor("const_fold_opt__37", np.array([-3], np.int64)),
        tensor("const_fold_opt__35", t.reshape(1, 4, 1)),
        tensor("axes_const__13__14", np.array([2], np.int64)),
    ]
    model = _tf2onnx(
        make_model(
            nodes,
            [("x", F, ["unk__39", 10, 3])],
            [("y", F, ["unk__40", 8, 4])],
            inits,
            opset=13,
            extra_opsets=ML,
        ),
        13,
    )
    folded, report = _fold(model, _nhwc(rng, 2, 10, 3))
    _assert_folded(
        model,
        folded,
        report,
        ["conv1d/BiasAdd", "bn/batchnorm/mul_1", "bn/batchnorm/add_1"],
        kept={"Squeeze": 1, "Unsqueeze": 1, "Transpose": 2},
    )


def test_keras_conv1d_transpose_squeeze_add_mul_add_noopt():
    """The same layers with tf2onnx ``optimizers={}``: NHWC Squeeze and (C,) constants."""
    rng = _rng(9)
    s, t = _bn_as_mul_add(rng, 4)
    nodes = [
        T("Cast", ["dim:0"], ["dim64"], name="conv1d/convolution/ExpandDims__5", to=7),
        T(
            "Reshape",
            ["dim64", "reshape_const__45"],
            ["axes"],
            name="conv1d/convolution/ExpandDims__6",
        ),
        T("Unsqueeze", ["x", "axes"], ["x4"], name="conv1d/convolution/ExpandDims"),
        T("Transpose", ["x4"], ["x_nchw"], name="conv1d/convolution__8", perm=[0, 3, 1, 2]),
        T(
            "Conv",
            ["x_nchw", "conv1d/convolution/ExpandDims_1:0"],
            ["conv"],
            name="conv1d/convolution",
            dilations=[1, 1],
            strides=[1, 1],
            kernel_shape=[1, 3],
            group=1,
        ),
        T("Transpose", ["conv"], ["conv_nhwc"], name="conv1d/convolution__10", perm=[0, 2, 3, 1]),
        T("Squeeze", ["conv_nhwc", "axes_const__51"], ["sq"], name="conv1d/convolution/Squeeze"),
        T("Add", ["sq", "conv1d/Squeeze:0"], ["biased"], name="conv1d/BiasAdd"),
        T("Mul", ["biased", "bn/batchnorm/mul:0"], ["m"], name="bn/batchnorm/mul_1"),
        T("Add", ["m", "bn/batchnorm/sub:0"], ["a"], name="bn/batchnorm/add_1"),
        T("Identity", ["a"], ["id0"], name="Identity__1"),
        T("Identity", ["id0"], ["y"], name="Identity__2"),
    ]
    inits = [
        tensor("reshape_const__45", np.array([1], np.int64)),
        tensor("conv1d/convolution/ExpandDims_1:0", _w(rng, 4, 3, 1, 3)),
        tensor("dim:0", np.array(-3, np.int32)),
        tensor("conv1d/Squeeze:0", _w(rng, 4)),
        tensor("bn/batchnorm/sub:0", t),
        tensor("bn/batchnorm/mul:0", s),
        tensor("axes_const__51", np.array([-3], np.int64)),
    ]
    model = _tf2onnx(
        make_model(
            nodes,
            [("x", F, ["unk__52", 10, 3])],
            [("y", F, ["unk__53", 8, 4])],
            inits,
            opset=13,
            extra_opsets=ML,
        ),
        13,
    )
    folded, report = _fold(model, _nhwc(rng, 2, 10, 3))
    _assert_folded(
        model,
        folded,
        report,
        ["conv1d/BiasAdd", "bn/batchnorm/mul_1", "bn/batchnorm/add_1"],
        kept={"Squeeze": 1, "Unsqueeze": 1, "Transpose": 2},
    )


def test_keras_dense_rank3_matmul_reshape_add_mul_add():
    """tf_keras Dense on (N, 5, 3) + BatchNormalization, tf2onnx default optimizers (opset 13):
    Tensordot is written as Reshape -> MatMul -> Reshape to a shape computed from Shape(x)."""
    rng = _rng(10)
    s, t = _bn_as_mul_add(rng, 4)
    nodes = [
        T("Shape", ["x"], ["shape"], name="dense/Tensordot/Shape"),
        T("Cast", ["shape"], ["shape32"], name="dense/Tensordot/Shape__40", to=6),
        T(
            "Reshape",
            ["x", "dense/Tensordot/Reshape_shape__43"],
            ["x2"],
            name="dense/Tensordot/Reshape",
        ),
        T(
            "MatMul",
            ["x2", "dense/Tensordot/ReadVariableOp:0"],
            ["mm"],
            name="dense/Tensordot/MatMul",
        ),
        T(
            "Gather",
            ["shape32", "dense/Tensordot/free:0"],
            ["free"],
            name="dense/Tensordot/GatherV2",
            axis=0,
        ),
        T(
            "Concat",
            ["free", "dense/Tensordot/Const_2:0"],
            ["out_shape32"],
            name="dense/Tensordot/concat_1",
            axis=0,
        ),
        T("Cast", ["out_shape32"], ["out_shape"], name="dense/Tensordot__42", to=7),
        T("Reshape", ["mm", "out_shape"], ["mm3"], name="dense/Tensordot"),
        T("Add", ["mm3", "dense/BiasAdd/ReadVariableOp:0"], ["biased"], name="dense/BiasAdd"),
        T("Mul", ["biased", "bn/batchnorm/mul:0"], ["m"], name="bn/batchnorm/mul_1"),
        T("Add", ["m", "bn/batchnorm/sub:0"], ["y"], name="bn/batchnorm/add_1"),
    ]
    inits = [
        tensor("dense/Tensordot/free:0", np.array([0, 1], np.int32)),
        tensor("dense/Tensordot/Reshape_shape__43", np.array([-1, 3], np.int64)),
        tensor("dense/Tensordot/ReadVariableOp:0", _w(rng, 3, 4)),
        tensor("dense/Tensordot/Const_2:0", np.array([4], np.int32)),
        tensor("dense/BiasAdd/ReadVariableOp:0", _w(rng, 4)),
        tensor("bn/batchnorm/sub:0", t),
        tensor("bn/batchnorm/mul:0", s),
    ]
    model = _tf2onnx(
        make_model(
            nodes,
            [("x", F, ["unk__44", 5, 3])],
            [("y", F, ["unk__45", "unk__46", 4])],
            inits,
            opset=13,
            extra_opsets=ML,
        ),
        13,
    )
    folded, report = _fold(model, _nhwc(rng, 2, 5, 3))
    _assert_folded(
        model,
        folded,
        report,
        ["bn/batchnorm/mul_1", "bn/batchnorm/add_1"],
        kept={"Reshape": 2},
        bias_adds=1,
    )


def test_keras3_dense_rank3_tensordot_noopt():
    """keras 3 Dense on (N, 5, 3) + BatchNormalization, tf2onnx ``optimizers={}`` (opset 13):
    both Tensordot Reshapes get shapes computed with ReduceProd, which onnx's shape inference
    does not follow, so the MatMul's output shape comes from the Reshape's target."""
    rng = _rng(21)
    s, t = _bn_as_mul_add(rng, 4)
    p = "functional_9_1/dense_2_1/Tensordot"
    nodes = [
        T("Shape", ["x"], ["shape"], name=f"{p}/Shape"),
        T("Cast", ["shape"], ["shape32"], name=f"{p}/Shape__3285", to=6),
        T("Gather", ["shape32", f"{p}/axes:0"], ["g_axes"], name=f"{p}/GatherV2_1", axis=0),
        T("ReduceProd", ["g_axes"], ["prod_axes"], name=f"{p}/Prod_1", axes=[0], keepdims=0),
        T("Gather", ["shape32", f"{p}/free:0"], ["g_free"], name=f"{p}/GatherV2", axis=0),
        T("ReduceProd", ["g_free"], ["prod_free"], name=f"{p}/Prod", axes=[0], keepdims=0),
        T("Concat", ["g_free", f"{p}/Const_2:0"], ["out_shape32"], name=f"{p}/concat_1", axis=0),
        T("Cast", ["out_shape32"], ["out_shape"], name=f"{p}__3292", to=7),
        T(
            "Unsqueeze",
            ["prod_axes", "const_axes__3288"],
            ["u1"],
            name=f"{p}/stack_Unsqueeze__3289",
        ),
        T(
            "Unsqueeze",
            ["prod_free", "const_axes__3286"],
            ["u0"],
            name=f"{p}/stack_Unsqueeze__3287",
        ),
        T("Concat", ["u0", "u1"], ["in_shape32"], name=f"{p}/stack_Concat__3290", axis=0),
        T("Cast", ["in_shape32"], ["in_shape"], name=f"{p}/Reshape__3291", to=7),
        T("Reshape", ["x", "in_shape"], ["x2"], name=f"{p}/Reshape"),
        T(
            "MatMul",
            ["x2", "functional_9_1/dense_2_1/Cast/ReadVariableOp:0"],
            ["mm"],
            name=f"{p}/MatMul",
        ),
        T("Reshape", ["mm", "out_shape"], ["mm3"], name=p),
        T("Add", ["mm3", "bias"], ["biased"], name="functional_9_1/dense_2_1/BiasAdd"),
        T("Mul", ["biased", "bn/batchnorm/mul:0"], ["m"], name="bn/batchnorm/mul_1"),
        T("Add", ["m", "bn/batchnorm/sub:0"], ["a"], name="bn/batchnorm/add_1"),
        T("Identity", ["a"], ["id0"], name="Identity"),
        T("Identity", ["id0"], ["y"], name="Identity_graph_outputs_Identity__3284"),
    ]
    inits = [
        tensor(f"{p}/free:0", np.array([0, 1], np.int32)),
        tensor(f"{p}/axes:0", np.array([2], np.int32)),
        tensor(f"{p}/Const_2:0", np.array([4], np.int32)),
        tensor("functional_9_1/dense_2_1/Cast/ReadVariableOp:0", _w(rng, 3, 4)),
        tensor("bias", _w(rng, 4)),
        tensor("bn/batchnorm/sub:0", t),
        tensor("bn/batchnorm/mul:0", s),
        tensor("const_axes__3288", np.array([0], np.int64)),
        tensor("const_axes__3286", np.array([0], np.int64)),
    ]
    model = _tf2onnx(
        make_model(
            nodes,
            [("x", F, ["unk__3293", 5, 3])],
            [("y", F, ["unk__3294", "unk__3295", 4])],
            inits,
            opset=13,
            extra_opsets=ML,
        ),
        13,
    )
    folded, report = _fold(model, _nhwc(rng, 2, 5, 3))
    _assert_folded(
        model,
        folded,
        report,
        ["functional_9_1/dense_2_1/BiasAdd", "bn/batchnorm/mul_1", "bn/batchnorm/add_1"],
        kept={"Reshape": 2},
        bias_adds=1,
    )
    assert all(f"through Reshape '{p}'" in e.target for e in report.applied)


@pytest.mark.parametrize("layer", ["depthwise", "conv3d"])
def test_conv_transpose_add_transpose_bn(layer):
    """tf_keras DepthwiseConv2D / Conv3D + BatchNormalization, tf2onnx ``optimizers={}``: the
    bias is an NHWC Add between two Transposes; the depthwise weight is computed (Reshape ->
    Transpose of the Keras kernel), as tf2onnx writes it."""
    rng = _rng(11)
    if layer == "depthwise":
        c, to_nchw, to_nhwc = 3, [0, 3, 1, 2], [0, 2, 3, 1]
        x_shape, y_shape = ["unk__74", 6, 6, 3], ["unk__75", 4, 4, 3]
        weight_nodes = [
            T(
                "Reshape",
                ["dw/ReadVariableOp:0", "dw/depthwise__65"],
                ["w_r"],
                name="dw/depthwise__66",
            ),
            T("Transpose", ["w_r"], ["w"], name="dw/depthwise__67", perm=[3, 2, 0, 1]),
        ]
        weight_inits = [
            tensor("dw/depthwise__65", np.array([3, 3, 1, 3], np.int64)),
            tensor("dw/ReadVariableOp:0", _w(rng, 3, 3, 3, 1)),
        ]
        conv_attrs = dict(dilations=[1, 1], strides=[1, 1], kernel_shape=[3, 3], group=3)
        feeds = _nhwc(rng, 2, 6, 6, 3)
    else:
        c, to_nchw, to_nhwc = 3, [0, 4, 1, 2, 3], [0, 2, 3, 4, 1]
        x_shape, y_shape = ["unk__60", 5, 5, 5, 2], ["unk__61", 3, 3, 3, 3]
        weight_nodes = []
        weight_inits = [tensor("w", _w(rng, 3, 2, 3, 3, 3))]
        conv_attrs = dict(dilations=[1, 1, 1], strides=[1, 1, 1], kernel_shape=[3, 3, 3], group=1)
        feeds = _nhwc(rng, 2, 5, 5, 5, 2)
    nodes = [
        T("Transpose", ["x"], ["x_nchw"], name="conv/Conv__1", perm=to_nchw),
        *weight_nodes,
        T("Conv", ["x_nchw", "w"], ["conv"], name="conv/Conv", **conv_attrs),
        T("Transpose", ["conv"], ["conv_nhwc"], name="conv/Conv__2", perm=to_nhwc),
        T("Add", ["conv_nhwc", "conv/BiasAdd/ReadVariableOp:0"], ["biased"], name="conv/BiasAdd"),
        T("Transpose", ["biased"], ["bn_in"], name="bn/FusedBatchNormV3__70", perm=to_nchw),
        bn_node("bn_in", "bn_out", "bn", epsilon=EPS),
        T("Transpose", ["bn_out"], ["y_nhwc"], name="bn/FusedBatchNormV3__72", perm=to_nhwc),
        T("Identity", ["y_nhwc"], ["id0"], name="Identity__1"),
        T("Identity", ["id0"], ["y"], name="Identity__2"),
    ]
    inits = [*weight_inits, tensor("conv/BiasAdd/ReadVariableOp:0", _w(rng, c)), *bn_params(rng, c)]
    model = _tf2onnx(
        make_model(
            nodes, [("x", F, x_shape)], [("y", F, y_shape)], inits, opset=13, extra_opsets=ML
        ),
        13,
    )
    folded, report = _fold(model, feeds)
    _assert_folded(model, folded, report, ["bn", "conv/BiasAdd"])
    # the Transposes on the data path (the depthwise weight's own Reshape -> Transpose goes when
    # the folded weight replaces it as an initializer)
    n = sum(1 for m in folded.graph.node if m.op_type == "Transpose" and m.input[0] != "w_r")
    assert n in (2, 4), _ops(folded)


# ------------------------------------------- 6. tf2onnx writes no value_info: shape inference
def _no_value_info_model(rng: np.random.Generator) -> onnx.ModelProto:
    """keras 3 Conv2D -> ReLU -> BatchNormalization -> Conv2D 1x1, tf2onnx defaults: the BN is
    Mul/Add by (1, C, 1, 1) constants before an unpadded Conv, and the graph has no value_info."""
    s, t = _bn_as_mul_add(rng, 3)
    nodes = [
        T("Transpose", ["x"], ["x_nchw"], name="conv2d/convolution__6", perm=[0, 3, 1, 2]),
        T(
            "Conv",
            ["x_nchw", "W0", "B0"],
            ["c0"],
            name="conv2d/BiasAdd",
            dilations=[1, 1],
            strides=[1, 1],
            kernel_shape=[3, 3],
            group=1,
        ),
        T("Relu", ["c0"], ["r"], name="re_lu/Relu"),
        T("Mul", ["r", "bn/batchnorm/mul:0"], ["m"], name="bn/batchnorm/mul_1"),
        T("Add", ["m", "const_fold_opt__20"], ["a"], name="bn/batchnorm/add_1"),
        T(
            "Conv",
            ["a", "W1", "B1"],
            ["c1"],
            name="conv2d_1/BiasAdd",
            dilations=[1, 1],
            strides=[1, 1],
            kernel_shape=[1, 1],
            group=1,
        ),
        T("Transpose", ["c1"], ["y"], name="conv2d_1/BiasAdd__18", perm=[0, 2, 3, 1]),
    ]
    inits = [
        tensor("W0", _w(rng, 3, 3, 3, 3)),
        tensor("B0", _w(rng, 3)),
        tensor("bn/batchnorm/mul:0", s.reshape(1, 3, 1, 1)),
        tensor("const_fold_opt__20", t.reshape(1, 3, 1, 1)),
        tensor("W1", _w(rng, 4, 3, 1, 1)),
        tensor("B1", _w(rng, 4)),
    ]
    model = _tf2onnx(
        make_model(
            nodes,
            [("x", F, ["unk__21", 6, 6, 3])],
            [("y", F, ["unk__22", 4, 4, 4])],
            inits,
            opset=13,
            extra_opsets=ML,
        ),
        13,
    )
    assert not model.graph.value_info
    return model


def test_no_value_info_mul_add_before_conv():
    rng = _rng(12)
    model = _no_value_info_model(rng)
    folded, report = _fold(model, _nhwc(rng, 2, 6, 6, 3), norm_affine=True)
    _assert_folded(
        model,
        folded,
        report,
        ["bn/batchnorm/mul_1", "bn/batchnorm/add_1"],
        kept={"Relu": 1, "Transpose": 2},
    )
    # the shapes inferred for the fold are not written: no value_info beyond the weights' types
    weights = {i.name for i in folded.graph.initializer}
    assert not [v.name for v in folded.graph.value_info if v.name not in weights]


def test_no_value_info_rank_is_inferred_by_default():
    """Without ``norm_affine`` a plain Mul/Add chain before a Conv is opt-in; the reason must be
    that (or the fold), not an unknown rank."""
    rng = _rng(12)
    model = _no_value_info_model(rng)
    _, report = _fold(model, _nhwc(rng, 2, 6, 6, 3))
    reasons = [e.reason or "" for e in report.skipped]
    assert not any("rank" in r for r in reasons), reasons
    assert {e.node for e in report.entries} >= {"bn/batchnorm/mul_1", "bn/batchnorm/add_1"}


# -------------------------------------------------------- 7. misaligned: must stay refused
def test_refused_reshape_splits_channel_axis():
    """Conv (N, 8, 4, 4) -> Reshape (N, 4, 2, 16) -> BN(4): the conv's channel axis is split in
    two, so no axis of the BN's input is the conv's output channel axis of the same length."""
    rng = _rng(13)
    nodes = [
        T("Conv", ["x", "W", "B"], ["conv"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        T("Reshape", ["conv", "shape"], ["r"], name="split"),
        bn_node("r", "y", "bn"),
    ]
    inits = [
        tensor("W", _w(rng, 8, 3, 3, 3)),
        tensor("B", _w(rng, 8)),
        tensor("shape", np.array([-1, 4, 2, 16], np.int64)),
        *bn_params(rng, 4),
    ]
    model = make_model(nodes, [("x", F, ["N", 3, 4, 4])], [("y", F, ["N", 4, 2, 16])], inits)
    folded, report = _fold(model, {"x": rng.standard_normal((2, 3, 4, 4)).astype(np.float32)})
    _assert_refused(model, folded, report, "bn")
    reason = report.skipped[0].reason
    assert "Reshape 'split' between it and Conv 'conv'" in reason and "channel axis" in reason


def test_refused_reshape_moves_spatial_into_channel_axis():
    """Conv (N, 4, 4, 4) -> Reshape (N, 8, 2, 4) -> BN(8): BN channels 2k and 2k+1 scale two
    halves of conv channel k differently; no per-output-channel weight can do that."""
    rng = _rng(14)
    nodes = [
        T("Conv", ["x", "W", "B"], ["conv"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        T("Reshape", ["conv", "shape"], ["r"], name="mix"),
        bn_node("r", "y", "bn"),
    ]
    inits = [
        tensor("W", _w(rng, 4, 3, 3, 3)),
        tensor("B", _w(rng, 4)),
        tensor("shape", np.array([-1, 8, 2, 4], np.int64)),
        *bn_params(rng, 8),
    ]
    model = make_model(nodes, [("x", F, ["N", 3, 4, 4])], [("y", F, ["N", 8, 2, 4])], inits)
    folded, report = _fold(model, {"x": rng.standard_normal((2, 3, 4, 4)).astype(np.float32)})
    _assert_refused(model, folded, report, "bn")
    reason = report.skipped[0].reason
    assert "Reshape 'mix' between it and Conv 'conv'" in reason and "channel axis" in reason


def test_refused_transpose_moves_channel_axis():
    """Conv (N, 4, 4, 5) -> Transpose(0, 2, 1, 3) -> BN(4): the BN scales along the conv's H axis
    (of the same length as its channels, so only the axis tells them apart)."""
    rng = _rng(15)
    nodes = [
        T("Conv", ["x", "W", "B"], ["conv"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        T("Transpose", ["conv"], ["t"], name="swap", perm=[0, 2, 1, 3]),
        bn_node("t", "y", "bn"),
    ]
    inits = [tensor("W", _w(rng, 4, 3, 3, 3)), tensor("B", _w(rng, 4)), *bn_params(rng, 4)]
    model = make_model(nodes, [("x", F, ["N", 3, 4, 5])], [("y", F, ["N", 4, 4, 5])], inits)
    folded, report = _fold(model, {"x": rng.standard_normal((2, 3, 4, 5)).astype(np.float32)})
    _assert_refused(model, folded, report, "bn")
    reason = report.skipped[0].reason
    assert "through Transpose 'swap'" in reason and "not its channel axis 1" in reason


def test_refused_keras3_transpose_nhwc_mul_on_wrong_axis():
    """Conv -> Transpose(0, 2, 3, 1) -> Mul((W, 1)) -> Add: after the Transpose the constant
    varies along W (length 4 = C), not along the channels."""
    rng = _rng(16)
    nodes = [
        T("Conv", ["x", "W", "B"], ["conv"], name="conv", kernel_shape=[1, 1]),
        T("Transpose", ["conv"], ["t"], name="to_nhwc", perm=[0, 2, 3, 1]),
        T("Mul", ["t", "s"], ["m"], name="mul"),
        T("Add", ["m", "b"], ["y"], name="add"),
    ]
    inits = [
        tensor("W", _w(rng, 4, 3, 1, 1)),
        tensor("B", _w(rng, 4)),
        tensor("s", _w(rng, 4, 1) + 2),
        tensor("b", _w(rng, 4, 1)),
    ]
    model = make_model(nodes, [("x", F, ["N", 3, 5, 4])], [("y", F, ["N", 5, 4, 4])], inits)
    folded, report = _fold(model, {"x": rng.standard_normal((2, 3, 5, 4)).astype(np.float32)})
    assert _ops(folded) == _ops(model)
    assert not report.applied, [(e.op_type, e.node) for e in report.applied]
    # like any Mul/Add that touches no linear op, it may go unreported; if reported, with reasons
    assert all(e.reason for e in report.skipped)


# --------------------------------------------------- 8. raise: Keras LayerNormalization forms
def _keras3_layernorm(x: str, y: str, c: int, rank: int, rng, *, gap: bool, noopt: bool, eps=EPS):
    """keras 3 LayerNormalization(axis=-1) as tf2onnx writes it: moments, then the
    ``x * inv + (beta - mean * inv)`` formula with ``inv = Reciprocal(Sqrt(var + eps)) * gamma``.
    With default optimizers a ReduceMean over the last axis of a rank-3 tensor becomes a
    GlobalAveragePool; with ``optimizers={}`` an Identity sits between the mean and the Sub."""
    p = "layer_normalization"
    cshape = (1,) * (rank - 1) + (c,)
    gamma = (rng.uniform(0.5, 2.0, c) * np.where(rng.random(c) < 0.3, -1, 1)).astype(np.float32)
    inits = [
        tensor(f"{p}/add/y:0", np.array(eps, np.float32)),
        tensor(f"{p}/Reshape_1:0", rng.normal(0, 1, cshape).astype(np.float32)),
        tensor(f"{p}/Reshape:0", gamma.reshape(cshape)),
    ]

    def mean(src, out, name):
        if gap:
            return T("GlobalAveragePool", [src], [out], name=name)
        return T("ReduceMean", [src], [out], name=name, axes=[rank - 1], keepdims=1)

    nodes = [mean(x, "mean", f"{p}/moments/mean")]
    m_for_sub = "mean"
    if noopt:
        nodes.append(T("Identity", ["mean"], ["mean_sg"], name=f"{p}/moments/StopGradient"))
        m_for_sub = "mean_sg"
    if not noopt:
        nodes.append(T("Neg", ["mean"], ["neg"], name=f"{p}/Neg"))
    nodes += [
        T("Sub", [x, m_for_sub], ["d"], name=f"{p}/moments/SquaredDifference"),
        T("Mul", ["d", "d"], ["d2"], name=f"{p}/moments/SquaredDifference__6"),
        mean("d2", "var", f"{p}/moments/variance"),
        T("Add", ["var", f"{p}/add/y:0"], ["ve"], name=f"{p}/add"),
        T("Sqrt", ["ve"], ["sd"], name=f"{p}/Rsqrt"),
        T("Reciprocal", ["sd"], ["rsd"], name=f"{p}/Rsqrt__9"),
        T("Mul", ["rsd", f"{p}/Reshape:0"], ["inv"], name=f"{p}/mul"),
        T("Mul", [x, "inv"], ["xs"], name=f"{p}/mul_2"),
    ]
    if noopt:
        nodes.append(T("Neg", ["mean"], ["neg"], name=f"{p}/Neg"))
    nodes += [
        T("Mul", ["neg", "inv"], ["ms"], name=f"{p}/mul_1"),
        T("Add", ["ms", f"{p}/Reshape_1:0"], ["shift"], name=f"{p}/add_1"),
        T("Add", ["xs", "shift"], [y], name=f"{p}/add_2"),
    ]
    return nodes, inits


def _tfkeras_layernorm_unfused(x: str, y: str, c: int, rng, eps=1e-6):
    """tf_keras LayerNormalization with epsilon < 1.001e-5 (not fused), rank 3, tf2onnx
    defaults: tf.nn.moments + tf.nn.batch_normalization, ``x * inv + (beta - mean * inv)``
    with (C,) gamma/beta and ``Sub(beta, mean * inv)``."""
    p = "layer_normalization"
    gamma = (rng.uniform(0.5, 2.0, c) * np.where(rng.random(c) < 0.3, -1, 1)).astype(np.float32)
    inits = [
        tensor(f"{p}/batchnorm/add/y:0", np.array(eps, np.float32)),
        tensor(f"{p}/mul/ReadVariableOp:0", gamma),
        tensor(f"{p}/add/ReadVariableOp:0", rng.normal(0, 1, c).astype(np.float32)),
    ]
    nodes = [
        T("GlobalAveragePool", [x], ["mean"], name=f"{p}/moments/mean"),
        T("Sub", [x, "mean"], ["d"], name=f"{p}/moments/SquaredDifference"),
        T("Mul", ["d", "d"], ["d2"], name=f"{p}/moments/SquaredDifference__5"),
        T("GlobalAveragePool", ["d2"], ["var"], name=f"{p}/moments/variance"),
        T("Add", ["var", f"{p}/batchnorm/add/y:0"], ["ve"], name=f"{p}/batchnorm/add"),
        T("Sqrt", ["ve"], ["sd"], name=f"{p}/batchnorm/Rsqrt"),
        T("Reciprocal", ["sd"], ["rsd"], name=f"{p}/batchnorm/Rsqrt__7"),
        T("Mul", ["rsd", f"{p}/mul/ReadVariableOp:0"], ["inv"], name=f"{p}/batchnorm/mul"),
        T("Mul", ["mean", "inv"], ["ms"], name=f"{p}/batchnorm/mul_2"),
        T("Mul", [x, "inv"], ["xs"], name=f"{p}/batchnorm/mul_1"),
        T("Sub", [f"{p}/add/ReadVariableOp:0", "ms"], ["shift"], name=f"{p}/batchnorm/sub"),
        T("Add", ["xs", "shift"], [y], name=f"{p}/batchnorm/add_1"),
    ]
    return nodes, inits


def _tfkeras_layernorm_fused(x: str, y: str, c: int, rank: int, rng, eps=EPS, noopt=False):
    """tf_keras LayerNormalization (default epsilon 1e-3, fused): x is reshaped to
    (1, N*..., C, 1) and normalised by a BatchNormalization whose mean and variance are
    computed per row (ReduceMean / Sub / ReduceSumSquare / Div by the count), with scale and
    bias Expand(1.0) and Expand(0.0); then Reshape back and Mul gamma (C,), Add beta (C,)."""
    p = "layer_normalization"
    gamma = (rng.uniform(0.5, 2.0, c) * np.where(rng.random(c) < 0.3, -1, 1)).astype(np.float32)
    inits = [
        tensor(f"{p}/zeros/Const:0", np.array(0.0, np.float32)),
        tensor(f"{p}/ones/Const:0", np.array(1.0, np.float32)),
        tensor(f"{p}/mul/ReadVariableOp:0", gamma),
        tensor(f"{p}/add/ReadVariableOp:0", rng.normal(0, 1, c).astype(np.float32)),
        tensor(f"{p}/Reshape_shape__60", np.array([1, -1, c, 1], np.int64)),
        *(
            [
                tensor("zero1", np.array([0], np.int64)),
                tensor("lead_end", np.array([rank - 1], np.int64)),
                tensor("last_end", np.array([rank], np.int64)),
                tensor("one32", np.array(1, np.int32)),
            ]
            if noopt
            else []
        ),
        tensor("const_starts__7", np.array([rank - 1], np.int64)),
        tensor("const_axes__34", np.array([0, 2, 3], np.int64)),
        tensor("const_axes__15", np.array([0], np.int64)),
    ]
    nodes = [
        T("Shape", [x], ["shape"], name=f"{p}/Shape"),
        T("Cast", ["shape"], ["shape32"], name=f"{p}/Shape__26", to=6),
        T("Cast", ["shape32"], ["shape64"], name=f"{p}/Reshape_1__53", to=7),
        *(
            # optimizers={}: the (1, rows, C, 1) target is computed from Shape(x)
            [
                T("Slice", ["shape32", "zero1", "lead_end", "zero1"], ["lead_d"], name="ss"),
                T("ReduceProd", ["lead_d"], ["rows_t"], name="Prod", axes=[0], keepdims=0),
                T("Slice", ["shape32", "lead_end", "last_end", "zero1"], ["last_d"], name="ss1"),
                T("ReduceProd", ["last_d"], ["c_t"], name="Prod_1", axes=[0], keepdims=0),
                T("Unsqueeze", ["one32", "zero1"], ["t0"], name="u0"),
                T("Unsqueeze", ["rows_t", "zero1"], ["t1"], name="u1"),
                T("Unsqueeze", ["c_t", "zero1"], ["t2"], name="u2"),
                T("Unsqueeze", ["one32", "zero1"], ["t3"], name="u3"),
                T("Concat", ["t0", "t1", "t2", "t3"], ["target32"], name="cc", axis=0),
                T("Cast", ["target32"], ["target"], name="cc_cast", to=7),
                T("Reshape", [x, "target"], ["x4"], name=f"{p}/Reshape"),
            ]
            if noopt
            else [T("Reshape", [x, f"{p}/Reshape_shape__60"], ["x4"], name=f"{p}/Reshape")]
        ),
        T(
            "Slice",
            ["shape32", "const_axes__15", "const_starts__7", "const_axes__15"],
            ["lead"],
            name=f"{p}/strided_slice",
        ),
        T("ReduceProd", ["lead"], ["rows"], name=f"{p}/Prod", axes=[0], keepdims=0),
        T("Unsqueeze", ["rows", "const_axes__15"], ["rows1"], name=f"{p}/ones/packed"),
        T("Cast", ["rows1"], ["rows64"], name=f"{p}/ones__30", to=7),
        T("Expand", [f"{p}/zeros/Const:0", "rows64"], ["zeros"], name=f"{p}/zeros"),
        T("Expand", [f"{p}/ones/Const:0", "rows64"], ["ones"], name=f"{p}/ones"),
        T("Shape", ["x4"], ["shape4"], name="Shape__44"),
        T("ReduceMean", ["x4"], ["mean"], name="ReduceMean__31", axes=[0, 2, 3], keepdims=1),
        T("Sub", ["x4", "mean"], ["d"], name="Sub__37"),
        T("ReduceSumSquare", ["d"], ["ss"], name="ReduceSumSquare__41", axes=[0, 2, 3], keepdims=0),
        T("Squeeze", ["mean", "const_axes__34"], ["mean1"], name="Squeeze__35"),
        T("Gather", ["shape4", "const_axes__34"], ["dims"], name="Gather__48"),
        T("ReduceProd", ["dims"], ["count"], name="ReduceProd__49", axes=[0], keepdims=0),
        T("Cast", ["count"], ["countf"], name="Cast__50", to=1),
        T("Div", ["ss", "countf"], ["var"], name="Div__51"),
        T(
            "BatchNormalization",
            ["x4", "ones", "zeros", "mean1", "var"],
            ["bn"],
            name=f"{p}/FusedBatchNormV3",
            epsilon=eps,
        ),
        T("Reshape", ["bn", "shape64"], ["normed"], name=f"{p}/Reshape_1"),
        T("Mul", ["normed", f"{p}/mul/ReadVariableOp:0"], ["scaled"], name=f"{p}/mul"),
        T("Add", ["scaled", f"{p}/add/ReadVariableOp:0"], [y], name=f"{p}/add"),
    ]
    return nodes, inits


RAISE_FORMS = {
    # name: (builder, rank, preceding Dense)
    "keras3-rank3-gap": (lambda r: _keras3_layernorm("x", "y", 8, 3, r, gap=True, noopt=False), 3),
    "keras3-rank3-noopt": (
        lambda r: _keras3_layernorm("x", "y", 8, 3, r, gap=False, noopt=True),
        3,
    ),
    "keras3-rank4": (lambda r: _keras3_layernorm("x", "y", 6, 4, r, gap=False, noopt=False), 4),
    "keras3-dense-rank2": (
        lambda r: _keras3_layernorm("h", "y", 8, 2, r, gap=False, noopt=False),
        2,
    ),
    "tf_keras-unfused-eps1e-6": (lambda r: _tfkeras_layernorm_unfused("x", "y", 8, r), 3),
    "tf_keras-fused": (lambda r: _tfkeras_layernorm_fused("x", "y", 8, 3, r), 3),
    "tf_keras-fused-dense-rank2": (lambda r: _tfkeras_layernorm_fused("h", "y", 8, 2, r), 2),
    "tf_keras-fused-noopt": (lambda r: _tfkeras_layernorm_fused("x", "y", 8, 3, r, noopt=True), 3),
}
SHAPES = {2: ["unk__11", 8], 3: ["unk__11", 5, 8], 4: ["unk__11", 4, 4, 6]}


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("form", sorted(RAISE_FORMS))
def test_raise_keras_layernorm(form, opset):
    rng = _rng(17)
    build, rank = RAISE_FORMS[form]
    nodes, inits = build(rng)
    shape = SHAPES[rank]
    if any("h" in n.input for n in nodes):  # after a Dense
        nodes = [
            T("MatMul", ["x", "dense/ReadVariableOp:0"], ["mm"], name="dense/MatMul"),
            T("Add", ["mm", "dense/BiasAdd/ReadVariableOp:0"], ["h"], name="dense/BiasAdd"),
            *nodes,
        ]
        inits += [
            tensor("dense/ReadVariableOp:0", _w(rng, 8, 8)),
            tensor("dense/BiasAdd/ReadVariableOp:0", _w(rng, 8)),
        ]
    model = _tf2onnx(
        make_model(
            nodes, [("x", F, shape)], [("y", F, shape)], inits, opset=opset, extra_opsets=ML
        ),
        opset,
    )
    onnx.checker.check_model(model, full_check=True)
    raised, report = normfuse.raise_norms(model, target_opset=17)
    assert isinstance(raised, onnx.ModelProto)
    onnx.checker.check_model(raised, full_check=True)
    ops = _ops(raised)
    assert ops.count("LayerNormalization") == 1, ops
    for gone in (
        "ReduceMean",
        "GlobalAveragePool",
        "Sqrt",
        "Reciprocal",
        "BatchNormalization",
        "ReduceSumSquare",
        "Neg",
    ):
        assert gone not in ops, ops
    assert [e.status for e in report.entries] == ["applied"], report.entries
    feeds = {"x": rng.standard_normal([3, *shape[1:]]).astype(np.float32) * 3 + 1}
    _parity(model, raised, feeds)
