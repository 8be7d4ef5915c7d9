"""Fold coverage on ONNX graphs: each case compares with onnxruntime at ORT_DISABLE_ALL."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper

import normfuse
from tests.conftest import (
    assert_folds,
    bn_node,
    bn_params,
    make_model,
    normal,
    op_types,
    run,
    tensor,
)

F = TP.FLOAT


def conv_bn_model(
    rng,
    *,
    dims=2,
    cin=4,
    cout=6,
    k=3,
    groups=1,
    stride=1,
    dilation=1,
    pads=1,
    bias=True,
    transpose=False,
    output_padding=0,
    opset=17,
    bn_attrs=None,
    dtype=np.float32,
    bn_dtype=None,
):
    spatial = [9, 8, 7][:dims]
    kshape = [k] * dims
    if transpose:
        w = normal(rng, [cin, cout // groups, *kshape], dtype)
    else:
        w = normal(rng, [cout, cin // groups, *kshape], dtype)
    inits = [tensor("W", w)]
    inputs = ["x", "W"]
    if bias:
        inits.append(tensor("B", normal(rng, [cout], dtype)))
        inputs.append("B")
    attrs = dict(
        group=groups, strides=[stride] * dims, dilations=[dilation] * dims, pads=[pads] * 2 * dims
    )
    if transpose and output_padding:
        attrs["output_padding"] = [output_padding] * dims
    op = "ConvTranspose" if transpose else "Conv"
    inits += bn_params(rng, cout, dtype=bn_dtype or dtype)
    nodes = [
        helper.make_node(op, inputs, ["c"], name="conv", **attrs),
        bn_node("c", "y", **(bn_attrs or {})),
    ]
    elem = {np.float32: F, np.float16: TP.FLOAT16, np.float64: TP.DOUBLE}[dtype]
    model = make_model(
        nodes, [("x", elem, [2, cin, *spatial])], [("y", elem, None)], inits, opset=opset
    )
    feeds = {"x": normal(rng, [2, cin, *spatial], dtype)}
    return model, feeds


# ---------------------------------------------------------------- BN after Conv
@pytest.mark.parametrize(
    "kw",
    [
        dict(dims=1),
        dict(dims=2),
        dict(dims=3, cin=2, cout=4),
        dict(groups=2),
        dict(groups=4, cin=4, cout=4),  # depthwise
        dict(groups=2, cin=4, cout=8),  # depthwise multiplier 2... with 2 groups
        dict(dilation=2),
        dict(stride=2),
        dict(bias=False),
        dict(k=1, pads=0),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_bn_after_conv(rng, kw):
    model, feeds = conv_bn_model(rng, **kw)
    folded, report = assert_folds(model, feeds, applied=1)
    assert op_types(folded) == ["Conv"]
    assert report.applied[0].target == "Conv 'conv'" and report.applied[0].direction == "after"
    assert folded.graph.output[0].name == "y"


@pytest.mark.parametrize("opset", [7, 9, 14, 15])
def test_bn_opset_forms(rng, opset):
    model, feeds = conv_bn_model(rng, opset=opset)
    folded, _ = assert_folds(model, feeds, applied=1)
    assert "BatchNormalization" not in op_types(folded)


def test_bn7_spatial0_with_per_channel_values_folds(rng):
    c = 3
    params = []
    for name, lo, hi in (("scale", 0.5, 2), ("bias", -1, 1), ("mean", -1, 1), ("var", 0.2, 4)):
        per_c = rng.uniform(lo, hi, (c, 1))
        params.append(tensor(f"bn_{name}", np.repeat(per_c, 4, axis=1).astype(np.float32)))
    w = tensor("W", normal(rng, [4, c]))
    nodes = [
        helper.make_node("Gemm", ["x", "W", "C"], ["g"], name="gemm", transB=1),
        bn_node("g", "y", spatial=0),
    ]
    # Gemm output is [N, 4]; spatial=0 parameters have shape [C] = [4]: per-channel by nature
    params = [tensor(p.name, rng.uniform(0.3, 2, 4).astype(np.float32)) for p in params]
    params.append(tensor("C", normal(rng, [4])))
    model = make_model(
        nodes, [("x", F, [3, c])], [("y", F, [3, 4])], [w, *params], opset=7, ir_version=3
    )
    for init in model.graph.initializer:  # IR 3: every initializer is also a graph input
        model.graph.input.append(helper.make_tensor_value_info(init.name, F, list(init.dims)))
    folded, _ = assert_folds(model, {"x": normal(rng, [3, c])}, applied=1)
    assert sorted(i.name for i in folded.graph.input) == sorted(
        ["x", *(i.name for i in folded.graph.initializer)]
    )
    assert sorted(i.name for i in folded.graph.initializer) == ["C", "W"]


def test_bn7_spatial0_with_varying_values_is_skipped(rng):
    c = 3
    model, _feeds = conv_bn_model(rng, opset=7, cout=c, bn_attrs={"spatial": 0})
    for init in model.graph.initializer:
        if init.name.startswith("bn_"):
            lo = 0.2 if init.name == "bn_var" else -1
            init.CopyFrom(tensor(init.name, rng.uniform(lo, 2, (c, 9, 8)).astype(np.float32)))
    model.graph.node[0].attribute[3].ints[:] = [1, 1, 1, 1]
    folded, report = normfuse.fold(model, check=False)
    (entry,) = report.skipped
    assert "spatial=0" in entry.reason
    assert op_types(folded) == ["Conv", "BatchNormalization"]


# ---------------------------------------------------------------- ConvTranspose
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(groups=2),
        dict(groups=4, cin=4, cout=4),
        dict(stride=2, output_padding=1),
        dict(bias=False, groups=2, stride=2),
        dict(dims=1),
        dict(dims=3, cin=2, cout=4),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain",
)
def test_bn_after_conv_transpose(rng, kw):
    model, feeds = conv_bn_model(rng, transpose=True, **kw)
    folded, _ = assert_folds(model, feeds, applied=1)
    assert op_types(folded) == ["ConvTranspose"]


# ---------------------------------------------------------------- Gemm
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.7, 1.3)])
@pytest.mark.parametrize("bias", ["none", "1d", "2d", "row"])
def test_bn_after_gemm(rng, trans_b, alpha, beta, bias):
    k, n, m = 5, 6, 3
    w = normal(rng, [n, k] if trans_b else [k, n])
    inits = [tensor("W", w), *bn_params(rng, n)]
    inputs = ["x", "W"]
    if bias != "none":
        shape = {"1d": [n], "2d": [m, n], "row": [1, n]}[bias]
        inits.append(tensor("C", normal(rng, shape)))
        inputs.append("C")
    nodes = [
        helper.make_node(
            "Gemm", inputs, ["g"], name="gemm", transB=trans_b, alpha=alpha, beta=beta
        ),
        bn_node("g", "y"),
    ]
    model = make_model(nodes, [("x", F, [m, k])], [("y", F, [m, n])], inits)
    folded, _ = assert_folds(model, {"x": normal(rng, [m, k])}, applied=1)
    assert op_types(folded) == ["Gemm"]


def test_bn_after_gemm_trans_a(rng):
    k, n, m = 5, 6, 3
    inits = [tensor("W", normal(rng, [k, n])), *bn_params(rng, n)]
    nodes = [helper.make_node("Gemm", ["x", "W"], ["g"], name="gemm", transA=1), bn_node("g", "y")]
    model = make_model(nodes, [("x", F, [k, m])], [("y", F, [m, n])], inits)
    assert_folds(model, {"x": normal(rng, [k, m])}, applied=1)


# ---------------------------------------------------------------- MatMul
@pytest.mark.parametrize("with_add", [False, True])
def test_bn_after_matmul(rng, with_add):
    k, n, m = 5, 6, 4
    inits = [tensor("W", normal(rng, [k, n])), *bn_params(rng, n)]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm")]
    src = "mm"
    if with_add:
        inits.append(tensor("b", normal(rng, [n])))
        nodes.append(helper.make_node("Add", ["mm", "b"], ["a"], name="add"))
        src = "a"
    nodes.append(bn_node(src, "y"))
    model = make_model(nodes, [("x", F, [m, k])], [("y", F, [m, n])], inits)
    folded, report = assert_folds(model, {"x": normal(rng, [m, k])}, applied=1)
    assert op_types(folded) == ["MatMul", "Add"]
    assert report.applied[0].target == "MatMul 'mm'"
    assert folded.graph.output[0].name == "y"


def test_bn_after_rank3_matmul_is_skipped_with_axis_reason(rng):
    k, n, t = 5, 6, 7
    inits = [tensor("W", normal(rng, [k, n])), *bn_params(rng, t)]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"), bn_node("mm", "y")]
    model = make_model(nodes, [("x", F, [2, t, k])], [("y", F, [2, t, n])], inits)
    folded, report = normfuse.fold(model, check=False)
    (entry,) = report.skipped
    assert "axis" in entry.reason and "MatMul 'mm'" in entry.reason
    assert op_types(folded) == op_types(model)


def test_per_last_axis_mul_after_rank3_matmul_folds(rng):
    k, n, t = 5, 6, 7
    inits = [
        tensor("W", normal(rng, [k, n])),
        tensor("s", rng.uniform(0.5, 2, n).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
        helper.make_node("Mul", ["mm", "s"], ["y"], name="mul"),
    ]
    model = make_model(nodes, [("x", F, [2, t, k])], [("y", F, [2, t, n])], inits)
    folded, _ = assert_folds(model, {"x": normal(rng, [2, t, k])}, applied=1)
    assert op_types(folded) == ["MatMul"]


# ---------------------------------------------------------------- chains and broadcasting
def test_conv_bn_bn_chain(rng):
    model, feeds = conv_bn_model(rng)
    model.graph.node[1].output[0] = "mid"
    model.graph.node.append(bn_node("mid", "y", prefix="bn2"))
    model.graph.initializer.extend(bn_params(rng, 6, prefix="bn2"))
    folded, _report = assert_folds(model, feeds, applied=2)
    assert op_types(folded) == ["Conv"]


@pytest.mark.parametrize("shape", [(6, 1, 1), (1, 6, 1, 1), (), (1,)], ids=str)
@pytest.mark.parametrize("ops", [("Mul", "Add"), ("Mul", "Sub"), ("Div", "Add"), ("Sub", "Div")])
def test_conv_elementwise_chain(rng, shape, ops):
    model, feeds = conv_bn_model(rng)
    del model.graph.node[1]
    prev = "c"
    for i, op in enumerate(ops):
        const = rng.uniform(0.5, 2.0, shape).astype(np.float32) * (1 if op != "Sub" else -1)
        model.graph.initializer.append(tensor(f"k{i}", const))
        out = "y" if i == len(ops) - 1 else f"t{i}"
        model.graph.node.append(
            helper.make_node(op, [prev, f"k{i}"], [out], name=f"{op.lower()}{i}")
        )
        prev = out
    folded, _ = assert_folds(model, feeds, applied=2)
    assert op_types(folded) == ["Conv"]


def test_constant_on_the_left(rng):
    model, feeds = conv_bn_model(rng)
    del model.graph.node[1]
    model.graph.initializer.append(tensor("k", rng.uniform(0.5, 2, (6, 1, 1)).astype(np.float32)))
    model.graph.node.append(helper.make_node("Sub", ["k", "c"], ["y"], name="rsub"))
    folded, _ = assert_folds(model, feeds, applied=1)
    assert op_types(folded) == ["Conv"]


def test_last_axis_vector_on_nchw_is_not_per_channel(rng):
    """A (C,) constant on NCHW broadcasts along W, even when W == C (onnxslim folds it wrongly)."""
    cout = 6
    model, _ = conv_bn_model(rng, cout=cout, pads=0, k=1)
    del model.graph.node[1]
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = cout  # W == C
    model.graph.initializer.append(tensor("k", rng.uniform(0.5, 2, cout).astype(np.float32)))
    model.graph.node.append(helper.make_node("Mul", ["c", "k"], ["y"], name="mul"))
    folded, report = normfuse.fold(model, check=False)
    (entry,) = report.skipped
    assert "last axis" in entry.reason and "channel axis 1" in entry.reason
    assert op_types(folded) == ["Conv", "Mul"]
    feeds = {"x": normal(rng, [2, 4, 9, cout])}
    np.testing.assert_array_equal(run(model, feeds)[0], run(folded, feeds)[0])


def test_constant_varying_on_two_axes_is_skipped(rng):
    model, _ = conv_bn_model(rng)
    del model.graph.node[1]
    model.graph.initializer.append(tensor("k", rng.uniform(0.5, 2, (6, 9, 1)).astype(np.float32)))
    model.graph.node.append(helper.make_node("Mul", ["c", "k"], ["y"], name="mul"))
    _, report = normfuse.fold(model, check=False)
    assert "varies along axes [1, 2]" in report.skipped[0].reason


def test_chain_stops_at_first_refused_link(rng):
    """Conv -> BN -> Mul(per-W) -> out: the BN folds, the Mul stays with its reason."""
    model, feeds = conv_bn_model(rng, pads=0, k=1)
    model.graph.node[1].output[0] = "b"
    model.graph.initializer.append(tensor("k", rng.uniform(0.5, 2, (1, 1, 8)).astype(np.float32)))
    model.graph.node.append(helper.make_node("Mul", ["b", "k"], ["y"], name="mul"))
    folded, report = assert_folds(model, feeds, applied=1, skipped=1)
    assert op_types(folded) == ["Conv", "Mul"]
    assert report.skipped[0].node == "mul"


# ---------------------------------------------------------------- BN before linear ops
@pytest.mark.parametrize("padding", ["zeros", "valid"])
def test_bn_before_unpadded_conv(rng, padding):
    cin, cout = 4, 6
    attrs = {"pads": [0, 0, 0, 0]} if padding == "zeros" else {"auto_pad": "VALID"}
    inits = [
        *bn_params(rng, cin),
        tensor("W", normal(rng, [cout, cin, 3, 3])),
        tensor("B", normal(rng, [cout])),
    ]
    nodes = [
        bn_node("x", "b"),
        helper.make_node("Conv", ["b", "W", "B"], ["y"], name="conv", **attrs),
    ]
    model = make_model(nodes, [("x", F, [2, cin, 9, 8])], [("y", F, None)], inits)
    folded, report = assert_folds(model, {"x": normal(rng, [2, cin, 9, 8])}, applied=1)
    assert op_types(folded) == ["Conv"]
    assert report.applied[0].direction == "before"


def test_bn_before_grouped_unpadded_conv(rng):
    cin, cout = 4, 8
    inits = [*bn_params(rng, cin), tensor("W", normal(rng, [cout, cin // 2, 3, 3]))]
    nodes = [
        bn_node("x", "b"),
        helper.make_node("Conv", ["b", "W"], ["y"], name="conv", group=2, strides=[2, 2]),
    ]
    model = make_model(nodes, [("x", F, [2, cin, 9, 8])], [("y", F, None)], inits)
    folded, _ = assert_folds(model, {"x": normal(rng, [2, cin, 9, 8])}, applied=1)
    assert op_types(folded) == ["Conv"]


def test_bn_before_padded_conv_is_skipped(rng):
    cin, cout = 4, 6
    inits = [*bn_params(rng, cin), tensor("W", normal(rng, [cout, cin, 3, 3]))]
    nodes = [
        bn_node("x", "b"),
        helper.make_node("Conv", ["b", "W"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    model = make_model(nodes, [("x", F, [2, cin, 9, 8])], [("y", F, None)], inits)
    folded, report = normfuse.fold(model, check=False)
    (entry,) = report.skipped
    assert "pads its input with zeros" in entry.reason and "borders" in entry.reason
    assert op_types(folded) == ["BatchNormalization", "Conv"]


@pytest.mark.parametrize("op", ["Gemm", "MatMul", "Gemm-transB"])
def test_bn_before_dense(rng, op):
    k, n, m = 5, 6, 4
    trans_b = op == "Gemm-transB"
    w = normal(rng, [n, k] if trans_b else [k, n])
    inits = [*bn_params(rng, k), tensor("W", w)]
    if op == "MatMul":
        lin = helper.make_node("MatMul", ["b", "W"], ["y"], name="lin")
    else:
        lin = helper.make_node(
            "Gemm", ["b", "W"], ["y"], name="lin", transB=int(trans_b), alpha=0.8
        )
    model = make_model([bn_node("x", "b"), lin], [("x", F, [m, k])], [("y", F, [m, n])], inits)
    folded, _ = assert_folds(model, {"x": normal(rng, [m, k])}, applied=1)
    assert "BatchNormalization" not in op_types(folded)


def test_bn_before_several_dense_consumers(rng):
    k, n = 5, 6
    inits = [
        *bn_params(rng, k),
        tensor("W1", normal(rng, [k, n])),
        tensor("W2", normal(rng, [n, k])),
    ]
    nodes = [
        bn_node("x", "b"),
        helper.make_node("MatMul", ["b", "W1"], ["y1"], name="q"),
        helper.make_node("Gemm", ["b", "W2"], ["y2"], name="k", transB=1),
    ]
    model = make_model(nodes, [("x", F, [3, k])], [("y1", F, None), ("y2", F, None)], inits)
    _folded, report = assert_folds(model, {"x": normal(rng, [3, k])}, applied=1)
    assert report.applied[0].target == "MatMul 'q', Gemm 'k'"


def test_mlp_input_bn_hidden_bn(rng):
    """The classic example: BN on the input (folds forward) and after each Linear (folds back)."""
    f, h = 6, 8
    inits = [
        *bn_params(rng, f, "bn0"),
        tensor("W1", normal(rng, [h, f])),
        tensor("B1", normal(rng, [h])),
        *bn_params(rng, h, "bn1"),
        tensor("W2", normal(rng, [3, h])),
    ]
    nodes = [
        bn_node("x", "a", "bn0"),
        helper.make_node("Gemm", ["a", "W1", "B1"], ["g1"], name="fc1", transB=1),
        bn_node("g1", "b1", "bn1"),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "W2"], ["y"], name="fc2", transB=1),
    ]
    model = make_model(nodes, [("x", F, [4, f])], [("y", F, None)], inits)
    folded, _ = assert_folds(model, {"x": normal(rng, [4, f])}, applied=2)
    assert op_types(folded) == ["Gemm", "Relu", "Gemm"]


# ---------------------------------------------------------------- where parameters come from
def test_params_from_constant_and_identity_nodes(rng):
    model, feeds = conv_bn_model(rng)
    inits = {i.name: i for i in model.graph.initializer}
    consts = [
        helper.make_node("Constant", [], ["Wc"], value=inits["W"]),
        helper.make_node("Constant", [], ["varc"], value=inits["bn_var"]),
        helper.make_node("Identity", ["varc"], ["vari"]),
    ]
    for n in ("W", "bn_var"):
        model.graph.initializer.remove(inits[n])
    model.graph.node[0].input[1] = "Wc"
    model.graph.node[1].input[4] = "vari"
    for i, c in enumerate(consts):
        model.graph.node.insert(i, c)
    folded, _ = assert_folds(model, feeds, applied=1)
    assert op_types(folded) == ["Conv"]


def test_dynamo_style_bias_subexpression(rng):
    """`Expand(CastLike(0, x), Expand(Shape(W, end=1), [1]))` is a constant: all five peers miss it."""
    model, feeds = conv_bn_model(rng, bias=False)
    sub = [
        helper.make_node("Shape", ["W"], ["s0"], start=0, end=1),
        helper.make_node("Constant", [], ["one"], value_ints=[1]),
        helper.make_node("Expand", ["s0", "one"], ["s1"]),
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", F, [], [0.0])),
        helper.make_node("CastLike", ["zero", "x"], ["zl"]),
        helper.make_node("Expand", ["zl", "s1"], ["bias"]),
    ]
    for i, n in enumerate(sub):
        model.graph.node.insert(i, n)
    model.graph.node[len(sub)].input.append("bias")
    folded, _ = assert_folds(model, feeds, applied=1)
    assert op_types(folded) == ["Conv"]
    assert sorted(i.name for i in folded.graph.initializer) == ["W", "bias"]


def test_params_that_are_graph_inputs_are_not_baked_in(rng):
    model, _feeds = conv_bn_model(rng)
    var = next(i for i in model.graph.initializer if i.name == "bn_var")
    model.graph.input.append(helper.make_tensor_value_info("bn_var", F, [6]))
    folded, report = normfuse.fold(model, check=False)
    (entry,) = report.skipped
    assert "graph input" in entry.reason and "bn_var" in entry.reason
    assert op_types(folded) == ["Conv", "BatchNormalization"]
    assert any(i.name == "bn_var" for i in folded.graph.input)
    assert var is not None


def test_weight_that_is_a_graph_input(rng):
    model, _feeds = conv_bn_model(rng)
    model.graph.input.append(helper.make_tensor_value_info("W", F, [6, 4, 3, 3]))
    _, report = normfuse.fold(model, check=False)
    assert "weight of Conv 'conv' is not constant" in report.skipped[0].reason


# ---------------------------------------------------------------- refusals
def test_training_mode_is_skipped(rng):
    model, _feeds = conv_bn_model(rng, opset=15, bn_attrs={"training_mode": 1})
    folded, report = normfuse.fold(model, check=False)
    (entry,) = report.skipped
    assert entry.reason.startswith("training_mode=1")
    assert entry.fix and "eval" in entry.fix
    assert op_types(folded) == ["Conv", "BatchNormalization"]


@pytest.mark.parametrize("is_test", [0, 1, None])
def test_opset6_batchnorm_folds_only_in_test_mode(rng, is_test):
    """BatchNormalization-6 normalises with batch statistics unless is_test=1 (its default is
    0): folding such a node as inference would change what the model computes."""
    attrs = {} if is_test is None else {"is_test": is_test}
    model, feeds = conv_bn_model(rng, opset=6, bn_attrs=attrs)
    model.ir_version = 3
    folded, report = normfuse.fold(model, check=False)  # onnxruntime runs no opset 6
    if is_test:
        assert len(report.applied) == 1 and op_types(folded) == ["Conv"]
        # the same graph at opset 7, which onnxruntime runs (is_test is gone there)
        bn = model.graph.node[1]
        bn.attribute.remove(next(a for a in bn.attribute if a.name == "is_test"))
        for m in (model, folded):
            m.opset_import[0].version = 7
        np.testing.assert_allclose(run(folded, feeds)[0], run(model, feeds)[0], 1e-5, 1e-6)
    else:
        (entry,) = report.skipped
        assert entry.reason.startswith("is_test=0") and "is_test=1" in (entry.fix or "")
        assert op_types(folded) == ["Conv", "BatchNormalization"]


def test_opset6_check_says_what_onnxruntime_runs(rng):
    """onnxruntime has no kernel below opset 7: the check's refusal says so and how to go on,
    instead of "fix the model"."""
    model, _ = conv_bn_model(rng, opset=6, bn_attrs={"is_test": 1})
    model.ir_version = 3
    with pytest.raises(normfuse.InputError) as info:
        normfuse.fold(model)
    assert "version_converter" in (info.value.note or "") and "--no-check" in info.value.note


def test_a_missing_kernel_is_not_called_a_broken_model(rng):
    """onnxruntime's CPU build has no float64 Conv: a valid float64 export (model.double()) was
    told to "fix the model"."""
    model, _ = conv_bn_model(rng)
    for t in model.graph.initializer:
        t.CopyFrom(
            onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float64), t.name)
        )
    for v in (*model.graph.input, *model.graph.output):
        v.type.tensor_type.elem_type = TP.DOUBLE
    with pytest.raises(normfuse.InputError) as info:
        normfuse.fold(model)
    assert "no kernel" in (info.value.note or "") and "--no-check" in info.value.note
    _, report = normfuse.fold(model, check=False)
    assert len(report.applied) == 1


def test_a_scale_computed_with_castlike_folds(rng):
    """torch's dynamo exporter (optimize=False) writes the attention scale as
    ``Mul(q, Sqrt(CastLike(Constant, q)))``: a constant, as CastLike reads only q's type. It
    was no candidate (Bert's 4 scales stayed); now it folds into the projection."""
    w = normal(rng, (8, 8))
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["q"]),
        helper.make_node("Constant", [], ["c"], value=tensor("c", np.array(0.125, np.float64))),
        helper.make_node("CastLike", ["c", "q"], ["cl"]),
        helper.make_node("Sqrt", ["cl"], ["s"]),
        helper.make_node("Mul", ["q", "s"], ["y"]),
    ]
    model = make_model(nodes, [("x", F, [2, 8])], [("y", F, [2, 8])], [tensor("W", w)], opset=18)
    model.graph.value_info.append(helper.make_tensor_value_info("q", F, [2, 8]))
    feeds = {"x": normal(rng, (2, 8))}
    folded, _ = assert_folds(model, feeds, applied=1)
    assert op_types(folded) == ["MatMul"]


def test_used_extra_outputs_are_skipped(rng):
    model, _feeds = conv_bn_model(rng, opset=9)
    model.graph.node[1].output.extend(["m", "v"])
    model.graph.output.append(helper.make_tensor_value_info("m", F, None))
    _, report = normfuse.fold(model, check=False)
    assert "training outputs" in report.skipped[0].reason


def test_conv_output_used_elsewhere_is_skipped(rng):
    model, _feeds = conv_bn_model(rng)
    model.graph.node.append(helper.make_node("Relu", ["c"], ["r"], name="relu"))
    model.graph.output.append(helper.make_tensor_value_info("r", F, None))
    folded, report = normfuse.fold(model, check=False)
    (entry,) = report.skipped
    assert "also feeds Relu 'relu'" in entry.reason
    assert op_types(folded) == op_types(model)


def test_shared_weight_is_cloned(rng):
    model, feeds = conv_bn_model(rng)
    model.graph.node.append(
        helper.make_node("Conv", ["x", "W", "B"], ["c2"], name="conv2", pads=[1, 1, 1, 1])
    )
    model.graph.output.append(helper.make_tensor_value_info("c2", F, [2, 6, 9, 8]))
    folded, _report = assert_folds(model, feeds, applied=1)
    inits = {i.name: i for i in folded.graph.initializer}
    conv2 = next(n for n in folded.graph.node if n.name == "conv2")
    assert conv2.input[1] == "W" and conv2.input[2] == "B"
    assert len(inits) == 4  # W, B untouched, plus the folded copies
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(inits["W"]),
        onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "W")),
    )


def test_nan_and_negative_variance_are_refused(rng):
    for bad, text in ((np.nan, "NaN"), (-1.0, "negative")):
        model, _ = conv_bn_model(rng)
        var = next(i for i in model.graph.initializer if i.name == "bn_var")
        arr = onnx.numpy_helper.to_array(var).copy()
        arr[2] = bad
        var.CopyFrom(tensor("bn_var", arr))
        _, report = normfuse.fold(model, check=False)
        assert text in report.skipped[0].reason


# ---------------------------------------------------------------- dtypes
def test_fp16_conv(rng):
    model, feeds = conv_bn_model(rng, dtype=np.float16)
    folded, report = assert_folds(model, feeds, applied=1, rtol=2e-3)
    assert any("float16" in n and "second time" in n for n in report.notes)
    w = next(i for i in folded.graph.initializer if i.name == "W")
    assert onnx.numpy_helper.to_array(w).dtype == np.float16


def gemm_bn_model(rng, dtype, k=5, n=6, m=4):
    elem = {
        np.float32: F,
        np.float64: TP.DOUBLE,
        np.float16: TP.FLOAT16,
        ml_dtypes.bfloat16: TP.BFLOAT16,
    }[dtype]
    inits = [
        tensor("W", normal(rng, [n, k]).astype(dtype)),
        tensor("C", normal(rng, [n]).astype(dtype)),
        *bn_params(rng, n, dtype=dtype),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "W", "C"], ["g"], name="gemm", transB=1),
        bn_node("g", "y"),
    ]
    model = make_model(nodes, [("x", elem, [m, k])], [("y", elem, [m, n])], inits, opset=15)
    return model, {"x": normal(rng, [m, k]).astype(dtype)}


def test_fp64_gemm(rng):
    model, feeds = gemm_bn_model(rng, np.float64)
    folded, _ = assert_folds(model, feeds, applied=1, rtol=1e-12)
    w = next(i for i in folded.graph.initializer if i.name == "W")
    assert onnx.numpy_helper.to_array(w).dtype == np.float64


def test_fp16_data_with_fp32_bn_parameters(rng):
    """BatchNormalization-15 allows fp32 statistics on fp16 data: the result must stay valid."""
    model, feeds = conv_bn_model(rng, dtype=np.float16, bn_dtype=np.float32, opset=15)
    folded, _ = assert_folds(model, feeds, applied=1, rtol=2e-3)
    for init in folded.graph.initializer:
        assert init.data_type == TP.FLOAT16


def test_bfloat16_weights_are_rounded_once(rng):
    """bf16 Gemm: the folded weight equals the float64 fold rounded once to bfloat16."""
    model, _ = gemm_bn_model(rng, ml_dtypes.bfloat16)
    folded, _report = normfuse.fold(model, check=False)
    onnx.checker.check_model(folded, full_check=True)
    assert op_types(folded) == ["Gemm"]
    inits = {
        i.name: onnx.numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer
    }
    s = inits["bn_scale"] / np.sqrt(inits["bn_var"] + 1e-5)
    expected_w = (inits["W"] * s[:, None]).astype(ml_dtypes.bfloat16)
    expected_c = (inits["C"] * s + inits["bn_bias"] - inits["bn_mean"] * s).astype(
        ml_dtypes.bfloat16
    )
    got = {i.name: i for i in folded.graph.initializer}
    assert got["W"].data_type == TP.BFLOAT16
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(got["W"]).astype(np.float32), expected_w.astype(np.float32)
    )
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(got["C"]).astype(np.float32), expected_c.astype(np.float32)
    )


def test_fp16_overflow_is_refused(rng):
    model, _feeds = conv_bn_model(rng, dtype=np.float16)
    var = next(i for i in model.graph.initializer if i.name == "bn_var")
    var.CopyFrom(tensor("bn_var", np.full(6, 1e-7, np.float16)))
    gamma = next(i for i in model.graph.initializer if i.name == "bn_scale")
    gamma.CopyFrom(tensor("bn_scale", np.full(6, 60000, np.float16)))
    model.graph.node[1].attribute.append(helper.make_attribute("epsilon", 1e-7))
    folded, report = normfuse.fold(model, check=False)
    assert "beyond the range of float16" in report.skipped[0].reason
    assert op_types(folded) == ["Conv", "BatchNormalization"]


def test_fp16_tiny_variance_warns_and_folds_exactly(rng):
    model, _feeds = conv_bn_model(rng, dtype=np.float16, bn_dtype=np.float32, opset=15)
    var = next(i for i in model.graph.initializer if i.name == "bn_var")
    var.CopyFrom(tensor("bn_var", np.full(6, 1e-6, np.float32)))
    model.graph.node[1].attribute.append(helper.make_attribute("epsilon", 1e-6))
    gamma = next(i for i in model.graph.initializer if i.name == "bn_scale")
    gamma.CopyFrom(tensor("bn_scale", np.full(6, 1e-3, np.float32)))
    folded, report = normfuse.fold(model, check=False)
    assert report.applied and "smallest normal" in report.applied[0].warnings[0]
    w = onnx.numpy_helper.to_array(next(i for i in folded.graph.initializer if i.name == "W"))
    assert np.all(np.isfinite(w))


# ---------------------------------------------------------------- graph hygiene
def test_idempotent_and_deterministic(rng):
    model, _feeds = conv_bn_model(rng)
    once, _r1 = normfuse.fold(model, check=False)
    twice, r2 = normfuse.fold(once, check=False)
    again, _ = normfuse.fold(model, check=False)
    assert r2.entries == []
    assert twice.SerializeToString() == once.SerializeToString()
    assert again.SerializeToString() == once.SerializeToString()


def test_unused_initializers_removed_names_kept(rng):
    model, _feeds = conv_bn_model(rng)
    folded, _ = normfuse.fold(model, check=False)
    assert sorted(i.name for i in folded.graph.initializer) == ["B", "W"]
    assert [n.name for n in folded.graph.node] == ["conv"]
    assert [o.name for o in folded.graph.output] == ["y"]
    assert folded.ir_version == model.ir_version
    assert folded.producer_name == "normfuse-tests"


def test_input_model_is_not_modified(rng):
    model, _ = conv_bn_model(rng)
    before = model.SerializeToString()
    normfuse.fold(model, check=False)
    assert model.SerializeToString() == before


def test_bn_with_no_linear_neighbour_has_a_reason(rng):
    c = 4
    inits = bn_params(rng, c)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        bn_node("r", "b"),
        helper.make_node("Relu", ["b"], ["y"]),
    ]
    model = make_model(nodes, [("x", F, [2, c, 3, 3])], [("y", F, None)], inits)
    _, report = normfuse.fold(model, check=False)
    (entry,) = report.skipped
    assert "Relu 'relu'" in entry.reason and "not a linear op" in entry.reason


def test_bn_graph_output_before_linear_is_skipped(rng):
    k = 5
    inits = [*bn_params(rng, k), tensor("W", normal(rng, [k, 3]))]
    nodes = [bn_node("x", "b"), helper.make_node("MatMul", ["b", "W"], ["y"], name="mm")]
    model = make_model(nodes, [("x", F, [2, k])], [("y", F, None), ("b", F, None)], inits)
    _, report = normfuse.fold(model, check=False)
    assert "graph output" in report.skipped[0].reason


def test_attention_scale_mul_is_not_a_candidate(rng):
    """`q * 0.125` feeding `MatMul(q, k^T)` (no constant weight) is not reported at all."""
    inits = [tensor("scale", np.array(0.125, np.float32))]
    nodes = [
        helper.make_node("Mul", ["q", "scale"], ["qs"], name="scale_q"),
        helper.make_node("MatMul", ["qs", "kt"], ["y"], name="scores"),
    ]
    model = make_model(
        nodes, [("q", F, [2, 4, 8]), ("kt", F, [2, 8, 4])], [("y", F, [2, 4, 4])], inits
    )
    folded, report = normfuse.fold(model, check=False)
    assert report.entries == []
    assert folded.SerializeToString() == normfuse.fold(folded, check=False)[0].SerializeToString()


def test_fp16_fold_in_float64_beats_folding_in_float16(rng):
    """Against the fp32 original, the float64 fold is never worse than an fp16-arithmetic fold."""
    c = 16
    w32 = normal(rng, [c, 8, 3, 3])
    gamma = rng.uniform(0.5, 2, c).astype(np.float32)
    beta, mean = normal(rng, [c]), normal(rng, [c])
    var = rng.uniform(1e-5, 5e-4, c).astype(np.float32)  # small variances: where fp16 maths hurts
    eps = 1e-5

    def model(dtype):
        inits = [tensor("W", w32.astype(dtype))] + [
            tensor(f"bn_{n}", v.astype(dtype))
            for n, v in zip(("scale", "bias", "mean", "var"), (gamma, beta, mean, var), strict=True)
        ]
        nodes = [
            helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            bn_node("c", "y", epsilon=eps),
        ]
        elem = TP.FLOAT if dtype == np.float32 else TP.FLOAT16
        return make_model(nodes, [("x", elem, [1, 8, 6, 6])], [("y", elem, [1, c, 6, 6])], inits)

    x = normal(rng, [1, 8, 6, 6])
    reference = run(model(np.float32), {"x": x})[0].astype(np.float64)
    fp16 = model(np.float16)
    folded, _ = normfuse.fold(fp16, check=False)
    ours = run(folded, {"x": x.astype(np.float16)})[0].astype(np.float64)
    # the same fold done in float16 arithmetic, as other tools do it
    h = np.float16
    s16 = gamma.astype(h) / np.sqrt(var.astype(h) + h(eps))
    naive = onnx.ModelProto()
    naive.CopyFrom(folded)
    inits = {i.name: i for i in naive.graph.initializer}
    inits["W"].CopyFrom(tensor("W", w32.astype(h) * s16[:, None, None, None]))
    bias_name = naive.graph.node[0].input[2]
    inits[bias_name].CopyFrom(tensor(bias_name, beta.astype(h) - mean.astype(h) * s16))
    theirs = run(naive, {"x": x.astype(np.float16)})[0].astype(np.float64)
    err_ours = np.abs(ours - reference).max()
    err_theirs = np.abs(theirs - reference).max()
    print(
        f"fp16 max abs error vs fp32 original: float64 fold {err_ours:.3g}, fp16 fold {err_theirs:.3g}"
    )
    assert np.isfinite(err_ours) and err_ours <= err_theirs


# ---------------------------------------------------------------- layout paths (issue 18)
def _nhwc_affine_model(rng, c: int = 4):
    """Mul/Add by (C,) on NHWC input -> Transpose to NCHW -> unpadded 1x1 Conv."""
    inits = [
        tensor("s", (rng.uniform(0.5, 2, c) * (-1.0) ** np.arange(c)).astype(np.float32)),
        tensor("t", normal(rng, [c])),
        tensor("W", normal(rng, [5, c, 1, 1])),
        tensor("B", normal(rng, [5])),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["m"], name="mul"),
        helper.make_node("Add", ["m", "t"], ["a"], name="add"),
        helper.make_node("Transpose", ["a"], ["a_nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["a_nchw", "W", "B"], ["y"], name="conv", kernel_shape=[1, 1]),
    ]
    return make_model(nodes, [("x", F, [2, 3, 3, c])], [("y", F, [2, 5, 3, 3])], inits)


def test_affine_before_conv_through_transpose(rng):
    model = _nhwc_affine_model(rng)
    folded, report = assert_folds(
        model, {"x": normal(rng, [2, 3, 3, 4])}, applied=2, norm_affine=True
    )
    assert op_types(folded) == ["Transpose", "Conv"]
    assert all(e.target == "Conv 'conv' through Transpose 'to_nchw'" for e in report.applied)
    assert all(e.direction == "before" for e in report.applied)


def test_affine_before_conv_through_transpose_is_opt_in(rng):
    model = _nhwc_affine_model(rng)
    folded, report = normfuse.fold(model, check=False)
    assert op_types(folded) == op_types(model)
    assert {e.node for e in report.skipped} == {"mul", "add"}
    assert all("opt-in" in (e.reason or "") for e in report.skipped)


@pytest.mark.parametrize("spatial", [1, 2])
def test_bn_before_gemm_through_flatten(rng, spatial):
    """(N, C, 1, 1) -> BN -> Flatten -> Gemm folds back; with 2x2 spatial the Flatten merges the
    channel axis with the spatial ones, so the BN stays with that reason."""
    c, n = 6, 3
    inits = [*bn_params(rng, c), tensor("W", normal(rng, [n, c * spatial * spatial]))]
    nodes = [
        bn_node("x", "b"),
        helper.make_node("Flatten", ["b"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "W"], ["y"], name="fc", transB=1),
    ]
    shape = [2, c, spatial, spatial]
    model = make_model(nodes, [("x", F, shape)], [("y", F, [2, n])], inits)
    if spatial == 1:
        folded, report = assert_folds(model, {"x": normal(rng, shape)}, applied=1)
        assert op_types(folded) == ["Flatten", "Gemm"]
        assert report.applied[0].target == "Gemm 'fc' through Flatten 'flat'"
    else:
        folded, report = normfuse.fold(model, check=False)
        assert op_types(folded) == op_types(model)
        (entry,) = report.skipped
        assert "Flatten 'flat'" in entry.reason and "splits or merges the channel axis" in (
            entry.reason
        )


def test_bn_after_matmul_through_dropout_and_unsqueeze(rng):
    k, c = 5, 6
    inits = [
        tensor("W", normal(rng, [k, c])),
        tensor("axes", np.array([2], np.int64)),
        *bn_params(rng, c),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
        helper.make_node("Dropout", ["mm"], ["d"], name="drop"),
        helper.make_node("Unsqueeze", ["d", "axes"], ["u"], name="unsq"),
        bn_node("u", "y"),
    ]
    model = make_model(nodes, [("x", F, [3, k])], [("y", F, [3, c, 1])], inits)
    folded, report = assert_folds(model, {"x": normal(rng, [3, k])}, applied=1)
    assert op_types(folded) == ["MatMul", "Add", "Dropout", "Unsqueeze"]
    assert report.applied[0].target == "MatMul 'mm' through Dropout 'drop', Unsqueeze 'unsq'"
    assert folded.graph.output[0].name == "y"


def test_dropout_in_training_mode_is_not_a_path(rng):
    inits = [
        tensor("W", normal(rng, [4, 3, 3, 3])),
        tensor("ratio", np.array(0.0, np.float32)),
        tensor("train", np.array(True)),
        *bn_params(rng, 4),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("Dropout", ["c", "ratio", "train"], ["d"], name="drop"),
        bn_node("d", "y"),
    ]
    model = make_model(nodes, [("x", F, [1, 3, 5, 5])], [("y", F, [1, 4, 3, 3])], inits)
    folded, report = normfuse.fold(model, check=False)
    assert op_types(folded) == op_types(model)
    (entry,) = report.skipped
    assert "training mode" in entry.reason


def test_path_tensor_read_elsewhere_is_refused(rng):
    """Conv -> Transpose -> Transpose -> BN where the NHWC tensor is also a graph output: folding
    would change it, so the BN stays, saying so."""
    inits = [tensor("W", normal(rng, [4, 3, 3, 3])), *bn_params(rng, 4)]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("Transpose", ["c"], ["nhwc"], name="t1", perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["nhwc"], ["nchw"], name="t2", perm=[0, 3, 1, 2]),
        bn_node("nchw", "y"),
    ]
    model = make_model(
        nodes,
        [("x", F, [1, 3, 5, 5])],
        [("y", F, [1, 4, 3, 3]), ("nhwc", F, [1, 3, 3, 4])],
        inits,
    )
    folded, report = normfuse.fold(model, check=False)
    assert op_types(folded) == op_types(model)
    (entry,) = report.skipped
    assert "Transpose 't1'" in entry.reason and "a graph output" in entry.reason


def test_bn_after_conv_through_transpose_pair_without_value_info(rng):
    """Shapes come from inference for the fold only: the folded model gains no value_info."""
    inits = [
        tensor("W", normal(rng, [4, 3, 3, 3])),
        tensor("B", normal(rng, [4])),
        *bn_params(rng, 4),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"),
        helper.make_node("Transpose", ["c"], ["nhwc"], name="t1", perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["nhwc", "shape"], ["r"], name="noop"),
        helper.make_node("Transpose", ["r"], ["nchw"], name="t2", perm=[0, 3, 1, 2]),
        bn_node("nchw", "y"),
    ]
    inits.append(tensor("shape", np.array([0, 0, -1, 4], np.int64)))
    model = make_model(nodes, [("x", F, ["N", 3, 5, 5])], [("y", F, ["N", 4, 3, 3])], inits)
    assert not model.graph.value_info
    folded, report = assert_folds(model, {"x": normal(rng, [2, 3, 5, 5])}, applied=1)
    weights = {i.name for i in folded.graph.initializer}  # typed on save, as without a path
    assert not [v.name for v in folded.graph.value_info if v.name not in weights]
    assert op_types(folded) == ["Conv", "Transpose", "Reshape", "Transpose"]
    assert report.applied[0].target == (
        "Conv 'conv' through Transpose 't1', Reshape 'noop', Transpose 't2'"
    )
    assert folded.graph.output[0].name == "y"


def test_identity_affines_are_removed(rng):
    """Keras' Normalization layer at its default statistics (x - 0) / 1 on the NHWC input before
    a padded conv: no fold is exact there (the borders), but the nodes change nothing, so they go.
    The scalar Mul before them is a plain Mul chain into the conv: opt-in, it stays."""
    inits = [
        tensor("k", np.array(1 / 255, np.float32)),
        tensor("zero", np.zeros((1, 1, 1, 3), np.float32)),
        tensor("one", np.ones((1, 1, 1, 3), np.float32)),
        tensor("W", normal(rng, [4, 3, 3, 3])),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "k"], ["s"], name="rescale"),
        helper.make_node("Sub", ["s", "zero"], ["c"], name="centre"),
        helper.make_node("Div", ["c", "one"], ["n"], name="norm"),
        helper.make_node("Transpose", ["n"], ["t"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t", "W"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    model = make_model(nodes, [("x", F, ["N", 5, 5, 3])], [("y", F, ["N", 4, 5, 5])], inits)
    folded, report = assert_folds(model, {"x": normal(rng, [2, 5, 5, 3])}, applied=2, skipped=1)
    assert op_types(folded) == ["Mul", "Transpose", "Conv"]
    assert {e.node: e.target for e in report.applied} == {
        "centre": "nothing: it subtracts 0, so it was removed",
        "norm": "nothing: it divides by 1, so it was removed",
    }
    assert report.skipped[0].node == "rescale"


def test_identity_affine_that_broadcasts_stays(rng):
    """x (N, 1) + zeros (4,) is (N, 4): not the identity on x's shape, so it stays."""
    inits = [tensor("zero", np.zeros(4, np.float32)), tensor("W", normal(rng, [4, 3]))]
    nodes = [
        helper.make_node("Add", ["x", "zero"], ["a"], name="widen"),
        helper.make_node("MatMul", ["a", "W"], ["y"], name="mm"),
    ]
    model = make_model(nodes, [("x", F, [2, 1])], [("y", F, [2, 3])], inits)
    folded, report = normfuse.fold(model, check=False)
    assert op_types(folded) == ["Add", "MatMul"]
    assert not report.applied


def test_a_conv_bias_of_the_wrong_shape_is_a_refusal_not_a_crash(rng):
    """The dynamo exporter writes Conv3d(bias=False)'s bias as Expand(0, [C, 2]): a (6, 2)
    tensor (onnxruntime refuses the node). It was "unexpected ValueError ... report it"."""
    inits = [
        tensor("W", normal(rng, [6, 4, 3, 3, 3])),
        tensor("B", np.zeros((6, 2), np.float32)),
        *bn_params(rng, 6),
    ]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"), bn_node("c", "y")]
    model = make_model(nodes, [("x", F, [1, 4, 5, 5, 5])], [("y", F, [1, 6, 3, 3, 3])], inits)
    folded, report = normfuse.fold(model, check=False)
    (entry,) = report.skipped
    assert "bias of shape [6, 2]" in entry.reason and "1-D bias of 6 values" in entry.reason
    assert op_types(folded) == ["Conv", "BatchNormalization"]


def test_the_dynamo_exporters_groupnorm_affine_folds(rng):
    """torch's dynamo exporter writes GroupNorm's gamma/beta on (B, C, L) as
    ``Mul(x, CastLike(Unsqueeze(gamma, Range(1, rank - 1, 1)), x))`` then
    ``Add(m, CastLike(Unsqueeze(beta, ...), m))``: with Range evaluated, the element type of
    a value without value_info found, and the Add's CastLike reading the removed Mul's output
    pointed elsewhere, both fold into the MatMul after the Transpose (they had no entry)."""
    c, length = 16, 8
    inits = [
        tensor("gamma", rng.uniform(0.5, 2.0, c).astype(np.float32)),
        tensor("beta", normal(rng, [c])),
        tensor("shape", np.array([2, c, length], np.int64)),
        tensor("one", np.array(1, np.int64)),
        tensor("rank", np.array(3, np.int64)),
        tensor("W", normal(rng, [c, 5])),
        tensor("bias", normal(rng, [5])),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["v"]),  # no value_info: dtype unknown
        helper.make_node("Sub", ["rank", "one"], ["last"]),
        helper.make_node("Range", ["one", "last", "one"], ["axes"]),
        helper.make_node("Unsqueeze", ["gamma", "axes"], ["g"]),
        helper.make_node("Unsqueeze", ["beta", "axes"], ["b"]),
        helper.make_node("CastLike", ["g", "v"], ["gc"]),
        helper.make_node("Mul", ["v", "gc"], ["m"], name="gamma_mul"),
        helper.make_node("CastLike", ["b", "m"], ["bc"]),
        helper.make_node("Add", ["m", "bc"], ["a"], name="beta_add"),
        helper.make_node("Transpose", ["a"], ["t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "W"], ["mm"], name="proj"),
        helper.make_node("Add", ["mm", "bias"], ["y"]),
    ]
    model = make_model(
        nodes, [("x", F, [2, c, length])], [("y", F, [2, length, 5])], inits, opset=18
    )
    feeds = {"x": normal(rng, [2, c, length])}
    folded, report = assert_folds(model, feeds, applied=2, norm_affine=True)
    assert {e.node for e in report.applied} == {"gamma_mul", "beta_add"}
    assert all("proj" in e.target for e in report.applied)
    assert "Range" not in op_types(folded) and "Mul" not in op_types(folded)


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm"])
def test_a_shape_read_beside_the_next_linear_op_does_not_stop_a_fold_before(rng, norm):
    """HF ViT-style attention reads ``hidden_states.shape[0]`` of the LayerNorm output beside
    the q/k/v MatMuls; a BatchNorm1d -> Linear with ``y.shape[0]`` the same. The Shape reads
    the norm's input after the fold (the same shape); both folds were refused."""
    c = 8
    shape = [2, 5, c] if norm == "layernorm" else [4, c]
    if norm == "layernorm":
        inits = [
            tensor("gamma", rng.uniform(0.5, 2.0, c).astype(np.float32)),
            tensor("beta", normal(rng, [c])),
        ]
        first = helper.make_node(
            "LayerNormalization", ["x", "gamma", "beta"], ["n"], axis=-1, name="norm"
        )
    else:
        inits = bn_params(rng, c)
        first = bn_node("x", "n")
    inits += [tensor("W", normal(rng, [c, 3])), tensor("one", np.array([0], np.int64))]
    nodes = [
        first,
        helper.make_node("MatMul", ["n", "W"], ["y"], name="proj"),
        helper.make_node("Shape", ["n"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["batch"], axis=0),
    ]
    model = make_model(
        nodes,
        [("x", F, shape)],
        [("y", F, [*shape[:-1], 3]), ("batch", TP.INT64, [1])],
        inits,
    )
    feeds = {"x": normal(rng, shape)}
    folded, report = assert_folds(model, feeds, applied=1, norm_affine=norm == "layernorm")
    assert report.applied[0].direction == "before" and "proj" in report.applied[0].target
    assert run(folded, feeds)[1].tolist() == [shape[0]]


@pytest.mark.parametrize(
    ("mode", "pads", "folds"),
    [
        ("reflect", [0, 0, 1, 2, 0, 0, 2, 1], True),
        ("edge", [0, 0, 1, 1, 0, 0, 1, 1], True),
        ("wrap", [0, 0, 1, 1, 0, 0, 1, 1], True),
        ("constant", [0, 0, 1, 1, 0, 0, 1, 1], False),
        ("reflect", [0, 1, 1, 1, 0, 1, 1, 1], False),  # pads the channel axis
    ],
    ids=["reflect", "edge", "wrap", "constant", "channel-padded"],
)
@pytest.mark.parametrize("direction", ["before", "after"])
def test_a_pad_that_repeats_values_passes_a_fold(rng, mode, pads, folds, direction):
    """PyTorch's reflect/replicate/circular padding exports as Pad then a Conv without pads;
    a per-channel affine commutes with a pad that only repeats values, so BN folds through it
    (BN -> Pad -> Conv before, Conv -> Pad -> BN after); a constant pad or a padded channel
    axis does not pass."""
    c = 6
    inits = [tensor("W", normal(rng, [c, c, 3, 3])), tensor("pads", np.array(pads, np.int64))]
    inits += bn_params(rng, c)
    pad = helper.make_node("Pad", ["p_in", "pads"], ["p_out"], mode=mode, name="pad")
    if direction == "before":
        nodes = [bn_node("x", "p_in"), pad, helper.make_node("Conv", ["p_out", "W"], ["y"])]
    else:
        nodes = [helper.make_node("Conv", ["x", "W"], ["p_in"]), pad, bn_node("p_out", "y")]
    model = make_model(nodes, [("x", F, [2, c, 7, 8])], [("y", F, None)], inits, opset=19)
    feeds = {"x": normal(rng, [2, c, 7, 8])}
    if folds:
        folded, report = assert_folds(model, feeds, applied=1)
        assert report.applied[0].direction == direction
        assert "BatchNormalization" not in op_types(folded) and "Pad" in op_types(folded)
        _, checked = normfuse.fold(model)  # the check leaves the pad's output uncompared
        assert checked.parity is not None and checked.parity.passed
    else:
        _, report = normfuse.fold(model, check=False)
        (entry,) = report.skipped
        assert "Pad 'pad'" in entry.reason


@pytest.mark.parametrize("case", ["matmul", "conv", "gemm"])
def test_a_mul_add_that_broadcasts_its_input_up_is_no_per_channel_map(rng, case):
    """``lin(v.unsqueeze(-1) * w + b)`` (tabular/time-series tokenizers): (B, L, 1) * (C,) is
    (B, L, C); folded into the MatMul after it, the model did not load (written so with
    --no-check). The same for (N, 1, H, W) * (C, 1, 1) before a 1x1 Conv and (N, 1) + (C,)
    before a Gemm."""
    c = 4
    if case == "matmul":
        shape, const_shape, w = [2, 5, 1], [c], normal(rng, [c, 3])
        linear = helper.make_node("MatMul", ["a", "W"], ["y"])
        out = [2, 5, 3]
    elif case == "conv":
        shape, const_shape, w = [2, 1, 3, 3], [c, 1, 1], normal(rng, [3, c, 1, 1])
        linear = helper.make_node("Conv", ["a", "W"], ["y"])
        out = [2, 3, 3, 3]
    else:
        shape, const_shape, w = [2, 1], [c], normal(rng, [3, c])
        linear = helper.make_node("Gemm", ["a", "W"], ["y"], transB=1)
        out = [2, 3]
    inits = [
        tensor("W", w),
        tensor("k", rng.uniform(0.5, 2.0, const_shape).astype(np.float32)),
        tensor("b", normal(rng, const_shape)),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "k"], ["m"], name="scale"),
        helper.make_node("Add", ["m", "b"], ["a"], name="shift"),
        linear,
    ]
    model = make_model(nodes, [("x", F, shape)], [("y", F, out)], inits)
    feeds = {"x": normal(rng, shape)}
    _, report = assert_folds(model, feeds, skipped=1, norm_affine=True)  # loads, runs
    (entry,) = report.skipped
    assert entry.node == "scale" and "broadcasts its input" in entry.reason
    assert [e.node for e in report.applied] == ["shift"]  # on the broadcast values: a fold


def test_inspect_sees_a_chain_that_folds_once_the_chain_before_it_has(rng):
    """Whisper's dynamo export: ``MatMul -> Add(bias) -> Mul(scale) -> Reshape -> Transpose ->
    Mul``. The second Mul reaches a linear op only once the first has folded into it: fold folds
    both; inspect called the second nothing (or removable) while the first was not yet folded."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "b"], ["lin"], name="bias"),
        helper.make_node("Mul", ["lin", "s1"], ["q"], name="scale"),
        helper.make_node("Reshape", ["q", "shape"], ["v"], name="view"),
        helper.make_node("Transpose", ["v"], ["t"], name="transpose", perm=[0, 2, 1, 3]),
        helper.make_node("Mul", ["t", "s2"], ["u"], name="scale2"),
        helper.make_node("Relu", ["u"], ["y"], name="relu"),
    ]
    inits = [
        tensor("w", normal(rng, [8, 8])),
        tensor("b", normal(rng, [8])),
        tensor("s1", np.array(0.35, np.float32)),
        tensor("shape", np.array([2, 3, 2, 4], np.int64)),
        tensor("s2", np.array(1.5, np.float32)),
    ]
    model = make_model(nodes, [("x", TP.FLOAT, [2, 3, 8])], [("y", TP.FLOAT, [2, 2, 3, 4])], inits)
    predicted = normfuse.inspect(model)
    folded, report = normfuse.fold(model)  # checked
    applied = {(e.node, e.target) for e in report.applied}
    assert {"scale", "scale2"} <= {node for node, _ in applied}, report.entries
    foldable = {(e.node, e.target) for e in predicted.entries if e.status == "foldable"}
    assert foldable == applied
    assert [n.op_type for n in folded.graph.node] == [
        "MatMul",
        "Add",
        "Reshape",
        "Transpose",
        "Relu",
    ]


def test_inspect_does_not_fold_a_chain_whose_input_the_chain_before_shares(rng):
    """keras 3 MobileNetV3: ``Conv -> Mul -> Add`` (a BN written out, folds whole), then
    HardSwish ``x * Clip(x + 3) / 6``: the ``+ 3`` reads x beside the Mul, so it cannot fold
    into the conv once the BN has; inspect said it would (fold did not)."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "s"], ["m"], name="bn_mul"),
        helper.make_node("Add", ["m", "t"], ["h"], name="bn_add"),
        helper.make_node("Add", ["h", "three"], ["h3"], name="hs_add"),
        helper.make_node("Clip", ["h3", "zero", "six"], ["r"], name="hs_clip"),
        helper.make_node("Mul", ["h", "r"], ["p"], name="hs_mul"),
        helper.make_node("Div", ["p", "six"], ["y"], name="hs_div"),
    ]
    inits = [
        tensor("w", normal(rng, [4, 3, 3, 3])),
        tensor("s", rng.uniform(0.5, 1.5, (1, 4, 1, 1)).astype(np.float32)),
        tensor("t", normal(rng, [1, 4, 1, 1])),
        tensor("three", np.array(3.0, np.float32)),
        tensor("zero", np.array(0.0, np.float32)),
        tensor("six", np.array(6.0, np.float32)),
    ]
    model = make_model(
        nodes, [("x", TP.FLOAT, [1, 3, 6, 6])], [("y", TP.FLOAT, [1, 4, 6, 6])], inits
    )
    predicted = normfuse.inspect(model)
    _, report = normfuse.fold(model)  # checked
    applied = {(e.node, e.target) for e in report.applied}
    assert {node for node, _ in applied} == {"bn_mul", "bn_add"}
    assert {(e.node, e.target) for e in predicted.entries if e.status == "foldable"} == applied


def _mixed_conv(rng, concat: str = "convs") -> onnx.ModelProto:
    """timm MixNet's MixedConv2d as exported: Split -> a conv of each kernel size -> Concat -> BN.
    ``concat``: ``convs``; ``shared`` (a conv's output is also a model output); ``pool`` (one
    part is a MaxPool); ``twice`` (the same conv concatenated twice)."""
    parts = {"convs": ["c0", "c1"], "shared": ["c0", "c1"], "pool": ["c0", "p1"]}
    parts["twice"] = ["c0", "c0"]
    channels = {"convs": 10, "shared": 10, "pool": 8, "twice": 8}[concat]
    nodes = [
        helper.make_node("Split", ["x", "sp"], ["x0", "x1"], axis=1),
        helper.make_node("Conv", ["x0", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1], group=2),
        helper.make_node("Conv", ["x1", "w1", "b1"], ["c1"], name="conv1", pads=[2, 2, 2, 2]),
        helper.make_node("MaxPool", ["x1"], ["p1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", parts[concat], ["cat"], name="cat", axis=1),
        bn_node("cat", "b", "bn"),
        helper.make_node("Relu", ["b"], ["r"]),
    ]
    outputs = [("r", TP.FLOAT, [2, channels, 8, 8])]
    if concat == "shared":
        outputs.append(("c1", TP.FLOAT, [2, 6, 8, 8]))
    inits = [
        tensor("sp", np.array([2, 4], np.int64)),
        tensor("w0", normal(rng, [4, 1, 3, 3])),
        tensor("w1", normal(rng, [6, 4, 5, 5])),
        tensor("b1", normal(rng, [6])),
        *bn_params(rng, channels),
    ]
    return make_model(nodes, [("x", TP.FLOAT, [2, 6, 8, 8])], outputs, inits)


def test_a_bn_after_a_channel_concat_of_convs_folds_into_each_its_slice(rng):
    """MixNet (timm mixnet_s: 34 of its 49 BN): each conv takes its channels of the BN's
    affine, exactly; inspect says so too."""
    model = _mixed_conv(rng)
    predicted = normfuse.inspect(model)
    folded, report = normfuse.fold(model)  # checked
    assert [(e.node, e.status) for e in report.entries] == [("bn", "applied")]
    assert "each its channels of Concat 'cat'" in report.entries[0].target
    assert {(e.node, e.target) for e in predicted.entries if e.status == "foldable"} == {
        (e.node, e.target) for e in report.applied
    }
    assert op_types(folded) == ["Split", "Conv", "Conv", "MaxPool", "Concat", "Relu"]
    x = {"x": normal(rng, [2, 6, 8, 8])}
    want, got = run(model, x)[0], run(folded, x)[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("concat", ["shared", "pool", "twice"])
def test_a_bn_after_a_concat_stays_unless_every_part_is_a_conv_read_there_alone(rng, concat):
    model = _mixed_conv(rng, concat=concat)
    folded, report = normfuse.fold(model)
    bn = next(e for e in report.entries if e.node == "bn")
    assert bn.status == "skipped" and "Concat 'cat'" in bn.reason, bn
    assert op_types(folded).count("BatchNormalization") == 1


def test_a_bn_after_a_concat_folds_into_the_one_op_after_it_where_it_can(rng):
    """inception_next's mixer: concat, BN, then a 1x1 conv: the BN goes into that one conv (as
    on the PyTorch side), not split across the convs before it."""
    model = _mixed_conv(rng)
    graph = model.graph
    relu = next(n for n in graph.node if n.op_type == "Relu")
    graph.node.remove(relu)
    graph.node.append(helper.make_node("Conv", ["b", "w2"], ["r"], name="pointwise"))
    graph.initializer.append(tensor("w2", normal(rng, [10, 10, 1, 1])))
    predicted = normfuse.inspect(model)
    folded, report = normfuse.fold(model)  # checked
    assert [(e.node, e.direction, e.target) for e in report.applied] == [
        ("bn", "before", "Conv 'pointwise'")
    ]
    assert {(e.node, e.target) for e in predicted.entries if e.status == "foldable"} == {
        ("bn", "Conv 'pointwise'")
    }
    x = {"x": normal(rng, [2, 6, 8, 8])}
    want, got = run(model, x)[0], run(folded, x)[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
