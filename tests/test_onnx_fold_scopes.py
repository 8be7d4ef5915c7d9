"""Folding inside If/Loop subgraphs and model-local functions, and the opt-in norm-affine folds."""

from __future__ import annotations

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


def _branch(name: str, rng, c: int, uses_outer: bool) -> onnx.GraphProto:
    """Conv -> BN inside a branch; the conv weight may come from the outer graph."""
    inits = [] if uses_outer else [tensor(f"{name}_W", normal(rng, [c, c, 1, 1]))]
    inits += bn_params(rng, c, prefix=f"{name}_bn")
    w = "W_outer" if uses_outer else f"{name}_W"
    nodes = [
        helper.make_node("Conv", ["x", w], [f"{name}_c"], name=f"{name}_conv"),
        bn_node(f"{name}_c", f"{name}_y", prefix=f"{name}_bn"),
    ]
    return helper.make_graph(
        nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", F, [1, c, 4, 4])], inits
    )


def test_if_branches_with_outer_scope_weights(rng):
    c = 3
    then_g = _branch("then", rng, c, uses_outer=True)
    else_g = _branch("else", rng, c, uses_outer=False)
    nodes = [
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)
    ]
    model = make_model(
        nodes,
        [("x", F, [1, c, 4, 4]), ("cond", TP.BOOL, [])],
        [("y", F, [1, c, 4, 4])],
        [tensor("W_outer", normal(rng, [c, c, 1, 1]))],
    )
    x = normal(rng, [1, c, 4, 4])
    for cond in (True, False):
        folded, report = assert_folds(model, {"x": x, "cond": np.array(cond)}, applied=2)
    graphs = {a.name: a.g for a in folded.graph.node[0].attribute}
    assert [n.op_type for n in graphs["then_branch"].node] == ["Conv"]
    assert [n.op_type for n in graphs["else_branch"].node] == ["Conv"]
    assert {e.graph for e in report.applied} == {"If 'if'/then_branch", "If 'if'/else_branch"}


def test_outer_weight_shared_by_outer_conv_is_cloned_into_the_branch(rng):
    c = 3
    then_g = _branch("then", rng, c, uses_outer=True)
    else_g = _branch("else", rng, c, uses_outer=True)
    nodes = [
        helper.make_node("Conv", ["x", "W_outer"], ["z"], name="outer_conv"),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g),
    ]
    model = make_model(
        nodes,
        [("x", F, [1, c, 4, 4]), ("cond", TP.BOOL, [])],
        [("y", F, [1, c, 4, 4]), ("z", F, [1, c, 4, 4])],
        [tensor("W_outer", normal(rng, [c, c, 1, 1]))],
    )
    x = normal(rng, [1, c, 4, 4])
    for cond in (True, False):
        folded, _ = assert_folds(model, {"x": x, "cond": np.array(cond)}, applied=2)
    outer = next(i for i in folded.graph.initializer if i.name == "W_outer")
    original = next(i for i in model.graph.initializer if i.name == "W_outer")
    assert outer.SerializeToString() == original.SerializeToString()


def test_loop_body(rng):
    c = 3
    body_inits = [tensor("Wl", normal(rng, [c, c, 1, 1])), *bn_params(rng, c, prefix="lbn")]
    body = helper.make_graph(
        [
            helper.make_node("Conv", ["v_in", "Wl"], ["lc"], name="loop_conv"),
            bn_node("lc", "lb", prefix="lbn"),
            helper.make_node("Tanh", ["lb"], ["v_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TP.INT64, []),
            helper.make_tensor_value_info("cond_in", TP.BOOL, []),
            helper.make_tensor_value_info("v_in", F, [1, c, 4, 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TP.BOOL, []),
            helper.make_tensor_value_info("v_out", F, [1, c, 4, 4]),
        ],
        body_inits,
    )
    nodes = [helper.make_node("Loop", ["n", "", "x"], ["y"], name="loop", body=body)]
    model = make_model(
        nodes, [("x", F, [1, c, 4, 4]), ("n", TP.INT64, [])], [("y", F, [1, c, 4, 4])], []
    )
    _folded, report = assert_folds(
        model, {"x": normal(rng, [1, c, 4, 4]), "n": np.array(3)}, applied=1
    )
    assert report.applied[0].graph == "Loop 'loop'/body"


def test_model_local_function_is_folded_without_inlining(rng):
    c = 4
    w = normal(rng, [c, c, 1, 1])
    gamma, beta, mean, var = (onnx.numpy_helper.to_array(t) for t in bn_params(rng, c))
    const = lambda name, arr: helper.make_node("Constant", [], [name], value=tensor(name, arr))  # noqa: E731
    fn = helper.make_function(
        "pkg",
        "ConvBN",
        ["fx"],
        ["fy"],
        [
            const("fw", w),
            const("g", gamma),
            const("b", beta),
            const("m", mean),
            const("v", var),
            helper.make_node("Conv", ["fx", "fw"], ["fc"], name="fconv"),
            helper.make_node("BatchNormalization", ["fc", "g", "b", "m", "v"], ["fy"], name="fbn"),
        ],
        [helper.make_opsetid("", 17)],
    )
    nodes = [helper.make_node("ConvBN", ["x"], ["y"], domain="pkg", name="call")]
    model = make_model(
        nodes,
        [("x", F, [1, c, 5, 5])],
        [("y", F, [1, c, 5, 5])],
        [],
        functions=[fn],
        extra_opsets=[helper.make_opsetid("pkg", 1)],
    )
    folded, report = assert_folds(model, {"x": normal(rng, [1, c, 5, 5])}, applied=1)
    assert op_types(folded) == ["ConvBN"]
    body = [n.op_type for n in folded.functions[0].node]
    assert "BatchNormalization" not in body and body.count("Conv") == 1
    assert report.applied[0].graph == "function 'pkg.ConvBN'"


# ---------------------------------------------------------------- --norm-affine
def _ln_model(rng, op="LayerNormalization", opset=17, k=8, n=5, consumers=1):
    inits = [tensor("gamma", rng.uniform(0.5, 2, k).astype(np.float32))]
    inputs = ["x", "gamma"]
    if op == "LayerNormalization":
        inits.append(tensor("beta", normal(rng, [k])))
        inputs.append("beta")
    nodes = [helper.make_node(op, inputs, ["ln"], name="norm", axis=-1)]
    outputs = []
    for i in range(consumers):
        inits.append(tensor(f"W{i}", normal(rng, [k, n])))
        nodes.append(helper.make_node("MatMul", ["ln", f"W{i}"], [f"y{i}"], name=f"proj{i}"))
        outputs.append((f"y{i}", F, [2, 3, n]))
    return make_model(nodes, [("x", F, [2, 3, k])], outputs, inits, opset=opset)


@pytest.mark.parametrize("consumers", [1, 3])
def test_layernorm_affine_into_matmuls(rng, consumers):
    model = _ln_model(rng, consumers=consumers)
    feeds = {"x": normal(rng, [2, 3, 8])}
    _, off = normfuse.fold(model, check=False)
    assert off.entries == []  # opt-in: nothing happens without norm_affine
    folded, _report = assert_folds(model, feeds, applied=1, norm_affine=True)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in folded.graph.initializer}
    np.testing.assert_array_equal(inits["gamma"], np.ones(8, np.float32))
    np.testing.assert_array_equal(inits["beta"], np.zeros(8, np.float32))
    assert op_types(folded).count("Add") == consumers  # beta became a bias after each MatMul


def test_rmsnorm_affine_into_matmul(rng):
    model = _ln_model(rng, op="RMSNormalization", opset=23)
    folded, _ = assert_folds(model, {"x": normal(rng, [2, 3, 8])}, applied=1, norm_affine=True)
    assert op_types(folded) == ["RMSNormalization", "MatMul"]


def test_layernorm_feeding_a_non_linear_op_is_skipped(rng):
    model = _ln_model(rng)
    model.graph.node.append(helper.make_node("Relu", ["ln"], ["r"], name="relu"))
    model.graph.output.append(helper.make_tensor_value_info("r", F, [2, 3, 8]))
    folded, report = normfuse.fold(model, check=False, norm_affine=True)
    assert "Relu 'relu'" in report.skipped[0].reason
    assert folded.SerializeToString() == normfuse.fold(model, check=False)[0].SerializeToString()


def _channel_norm_model(rng, op, opset, c=8, groups=4):
    per = c if (op != "GroupNormalization" or opset >= 21) else groups
    inits = [
        tensor("gamma", rng.uniform(0.5, 2, per).astype(np.float32)),
        tensor("beta", normal(rng, [per])),
        tensor("W", normal(rng, [6, c, 1, 1])),
    ]
    attrs = {"num_groups": groups} if op == "GroupNormalization" else {}
    nodes = [
        helper.make_node(op, ["x", "gamma", "beta"], ["n"], name="norm", **attrs),
        helper.make_node("Conv", ["n", "W"], ["y"], name="pw"),
    ]
    return make_model(nodes, [("x", F, [2, c, 5, 5])], [("y", F, [2, 6, 5, 5])], inits, opset=opset)


def test_groupnorm18_per_group_affine_into_pointwise_conv(rng):
    """GroupNormalization-18 has per-group gamma/beta (the checker calls it deprecated)."""
    model = _channel_norm_model(rng, "GroupNormalization", 18)
    folded, report = normfuse.fold(model, check=False, norm_affine=True)
    assert report.applied[0].target == "Conv 'pw'"
    feeds = {"x": normal(rng, [2, 8, 5, 5])}
    ref, got = run(model, feeds)[0], run(folded, feeds)[0]
    assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("op,opset", [("GroupNormalization", 21), ("InstanceNormalization", 17)])
def test_channel_norms_into_pointwise_conv(rng, op, opset):
    model = _channel_norm_model(rng, op, opset)
    _, report = assert_folds(model, {"x": normal(rng, [2, 8, 5, 5])}, applied=1, norm_affine=True)
    assert report.applied[0].target == "Conv 'pw'"


def test_decomposed_layernorm_tail_into_matmul(rng):
    k, n = 8, 5
    inits = [
        tensor("axes", np.array([-1], np.int64)),
        tensor("eps", np.array(1e-5, np.float32)),
        tensor("two", np.array(2.0, np.float32)),
        tensor("g", rng.uniform(0.5, 2, k).astype(np.float32)),
        tensor("b", normal(rng, [k])),
        tensor("W", normal(rng, [k, n])),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["mu"]),
        helper.make_node("Sub", ["x", "mu"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["d2"]),
        helper.make_node("ReduceMean", ["d2", "axes"], ["var"]),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["d", "sd"], ["xn"]),
        helper.make_node("Mul", ["xn", "g"], ["xg"], name="gamma_mul"),
        helper.make_node("Add", ["xg", "b"], ["xb"], name="beta_add"),
        helper.make_node("MatMul", ["xb", "W"], ["y"], name="proj"),
    ]
    model = make_model(nodes, [("x", F, [2, 3, k])], [("y", F, [2, 3, n])], inits, opset=18)
    _, default = normfuse.fold(model, check=False)
    assert {e.node for e in default.skipped} == {"gamma_mul", "beta_add"}
    assert "--norm-affine" in default.skipped[0].fix
    folded, _ = assert_folds(model, {"x": normal(rng, [2, 3, k])}, applied=2, norm_affine=True)
    assert "Mul" not in op_types(folded)


def test_inspect_lists_norms_and_changes_nothing(rng):
    model = _ln_model(rng)
    conv_model = make_model(
        [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1]), bn_node("c", "y")],
        [("x", F, [1, 4, 6])],
        [("y", F, [1, 4, 6])],
        [tensor("W", normal(rng, [4, 4, 3])), *bn_params(rng, 4)],
    )
    before = conv_model.SerializeToString()
    report = normfuse.inspect(conv_model)
    assert [(e.node, e.status) for e in report.entries] == [("bn", "foldable")]
    assert conv_model.SerializeToString() == before
    ln = normfuse.inspect(model)
    assert ln.entries[0].status == "skipped" and "--norm-affine" in ln.entries[0].fix
    assert normfuse.inspect(model, norm_affine=True).entries[0].status == "foldable"
