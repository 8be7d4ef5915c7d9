"""ONNX swap, insert, raise, lower and recalibrate, compared with onnxruntime at ORT_DISABLE_ALL."""

from __future__ import annotations

import io
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto as TP
from onnx import helper

import normfuse
from normfuse.cli import cli
from normfuse.onnxgraph.edit import identity_variance
from tests.conftest import MODELS, bn_node, bn_params, make_model, normal, op_types, run, tensor


def _bn_model(rng, opset: int, shape=(2, 8, 5, 5), c: int = 8) -> onnx.ModelProto:
    return make_model(
        [bn_node("x", "y")],
        [("x", TP.FLOAT, list(shape))],
        [("y", TP.FLOAT, list(shape))],
        bn_params(rng, c),
        opset=opset,
    )


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.abs(a64 - b64).max() / np.abs(b64).max())


def _params(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {
        t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer
    }


@pytest.mark.parametrize("name", ["resnet_small", "mlp", "dwsep", "decoder"])
def test_frozen_swap_of_bundled_models_is_exact(name):
    model = onnx.load(MODELS / f"{name}.onnx")
    swapped, report = normfuse.swap(model, "frozen")
    assert "BatchNormalization" not in op_types(swapped)
    assert all(e.exact for e in report.applied) and report.applied
    assert report.parity is not None and report.parity.passed and report.parity.max_rel <= 1e-5
    onnx.checker.check_model(swapped, full_check=True)


@pytest.mark.parametrize(
    ("opset", "form"),
    [(21, "GroupNormalization"), (18, "InstanceNormalization"), (13, "InstanceNormalization")],
)
def test_groupnorm_swap_matches_torch_group_norm_at_each_opset(rng, opset, form):
    torch = pytest.importorskip("torch")
    model = _bn_model(rng, opset)
    swapped, report = normfuse.swap(model, "groupnorm", groups=2, check=False)
    assert form in op_types(swapped) and "BatchNormalization" not in op_types(swapped)
    assert report.applied[0].exact is False
    onnx.checker.check_model(swapped, full_check=True)
    x = normal(rng, (2, 8, 5, 5)) * 3 + 1
    (got,) = run(swapped, {"x": x})
    p = _params(model)
    want = torch.nn.functional.group_norm(
        torch.from_numpy(x).double(),
        2,
        torch.from_numpy(p["bn_scale"]),
        torch.from_numpy(p["bn_bias"]),
        eps=1e-5,
    ).numpy()
    assert _rel(got, want) <= 1e-5


def _group_norm_numpy(x, groups, gamma, beta, eps):
    n, c = x.shape[:2]
    g = x.astype(np.float64).reshape(n, groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
    shape = (1, c) + (1,) * (x.ndim - 2)
    return g.reshape(x.shape) * gamma.reshape(shape) + beta.reshape(shape)


def test_groupnorm_auto_groups_and_a_numpy_reference(rng):
    model = _bn_model(rng, 21, shape=(3, 24, 4), c=24)
    swapped, report = normfuse.swap(model, "groupnorm", check=False)
    assert "(6 groups)" in report.applied[0].target
    x = normal(rng, (3, 24, 4))
    p = _params(model)
    (got,) = run(swapped, {"x": x})
    assert _rel(got, _group_norm_numpy(x, 6, p["bn_scale"], p["bn_bias"], 1e-5)) <= 1e-5


def test_layernorm_and_instancenorm_swaps_match_references(rng):
    torch = pytest.importorskip("torch")
    model = _bn_model(rng, 17)
    x = normal(rng, (2, 8, 5, 5)) * 2
    p = _params(model)
    tx, g, b = (
        torch.from_numpy(x).double(),
        torch.from_numpy(p["bn_scale"]),
        torch.from_numpy(p["bn_bias"]),
    )
    ln, _ = normfuse.swap(model, "layernorm", check=False)
    want = torch.nn.functional.layer_norm(tx.permute(0, 2, 3, 1), (8,), g, b, 1e-5).permute(
        0, 3, 1, 2
    )
    assert _rel(run(ln, {"x": x})[0], want.numpy()) <= 1e-5
    inorm, _ = normfuse.swap(model, "instancenorm", check=False)
    want = torch.nn.functional.instance_norm(tx, weight=g, bias=b, eps=1e-5)
    assert _rel(run(inorm, {"x": x})[0], want.numpy()) <= 1e-5
    old, _ = normfuse.swap(_bn_model(rng, 13), "layernorm", check=False)  # below 17: decomposed
    assert "LayerNormalization" not in op_types(old) and "ReduceMean" in op_types(old)


def test_swap_reports_changed_function_without_failing_and_refuses_bad_groups(rng):
    model = _bn_model(rng, 18)
    swapped, report = normfuse.swap(model, "identity")
    assert "BatchNormalization" not in op_types(swapped)
    assert report.parity is not None and not report.parity.passed
    assert any("as expected" in n for n in report.notes)
    _, report = normfuse.swap(model, "groupnorm", groups=3)
    assert "do not split" in report.skipped[0].reason
    flat = _bn_model(rng, 18, shape=(4, 8), c=8)
    _, report = normfuse.swap(flat, "groupnorm", groups=8)
    assert "1 channel" in report.skipped[0].reason
    _, report = normfuse.swap(flat, "instancenorm")
    assert "needs positions" in report.skipped[0].reason
    _, report = normfuse.swap(model, "frozen", where="other*")
    assert not report.entries


def test_training_mode_batchnorm_is_not_swapped(rng):
    model = make_model(
        [bn_node("x", "y", training_mode=1)],
        [("x", TP.FLOAT, [2, 8, 3, 3])],
        [("y", TP.FLOAT, None)],
        bn_params(rng, 8),
        opset=15,
    )
    _, report = normfuse.swap(model, "frozen", check=False)
    assert "training_mode=1" in report.skipped[0].reason


@pytest.mark.parametrize(
    ("opset", "attrs", "reason"),
    [(6, {}, "is_test=0"), (6, {"is_test": 0}, "is_test=0"), (8, {"spatial": 0}, "spatial=0")],
)
@pytest.mark.parametrize("to", ["frozen", "groupnorm"])
def test_old_batchnorm_modes_are_not_swapped(rng, opset, attrs, reason, to):
    """BatchNormalization-6 without is_test=1 uses batch statistics; -7/-8 with spatial=0 has
    a statistic per activation (C x H x W): neither is a per-channel map to swap (such a
    spatial=0 node was once written as a Mul by a C*H*W vector, a model onnxruntime refuses)."""
    c, h, w = 3, 4, 4
    params = bn_params(rng, c)
    if attrs.get("spatial") == 0:
        params = [
            tensor(t.name, np.resize(onnx.numpy_helper.to_array(t), (c, h, w))) for t in params
        ]
    model = make_model(
        [bn_node("x", "y", **attrs)],
        [("x", TP.FLOAT, [2, c, h, w])],
        [("y", TP.FLOAT, [2, c, h, w])],
        params,
        opset=opset,
        ir_version=3,
    )
    swapped, report = normfuse.swap(model, to, check=False)
    assert reason in report.skipped[0].reason and not report.applied
    assert op_types(swapped) == ["BatchNormalization"]


# ----------------------------------------------------------------------------------- insert


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 1e-6, 0.1])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_identity_variance_makes_var_plus_eps_one(eps, dtype):
    v = identity_variance(eps, dtype)
    assert v.dtype == np.dtype(dtype) and dtype(v + dtype(eps)) == 1


def test_inserted_batchnorm_leaves_outputs_unchanged(tmp_path):
    folded, _ = normfuse.fold(onnx.load(MODELS / "resnet_small.onnx"))
    new, report = normfuse.insert(folded)
    assert len(report.applied) == 9 and all(e.exact for e in report.applied)
    head = next(e for e in report.entries if e.status == "skipped")
    assert "model output" in head.reason
    assert report.parity is not None and report.parity.passed
    assert all(o.max_abs == 0 for o in report.parity.outputs)  # the identity, bit for bit
    assert op_types(new).count("BatchNormalization") == 9
    # each new BN sits right after its Conv, before the Relu
    for node in new.graph.node:
        if node.op_type == "BatchNormalization":
            producer = next(n for n in new.graph.node if node.input[0] in n.output)
            assert producer.op_type == "Conv"


def test_insert_after_activation_and_layernorm_on_sequences(rng):
    w = tensor("w", normal(rng, (6, 6)))
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w"], ["y"]),
        ],
        [("x", TP.FLOAT, [2, 5, 6])],
        [("y", TP.FLOAT, [2, 5, 6])],
        [w],
    )
    _, report = normfuse.insert(model, check=False)
    assert "rank-3" in report.entries[0].reason
    new, report = normfuse.insert(model, norm="layernorm", before_activation=False)
    assert report.entries[0].status == "applied"
    assert any("after the activation" in w for w in report.entries[0].warnings)
    relu = next(n for n in new.graph.node if n.op_type == "Relu")
    ln = next(n for n in new.graph.node if n.op_type == "LayerNormalization")
    assert ln.input[0] == relu.output[0]
    # the norm's output takes the tensor's name, so the readers after it read what they did
    assert relu.output[0] == "r_before_norm" and ln.output[0] == "r"
    assert next(n for n in new.graph.node if n.output[0] == "y").input[0] == "r"


# ------------------------------------------------------------------------------ raise / lower


def _legacy_layernorm(opset: int = 13, affine: bool = True) -> onnx.ModelProto:
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.LayerNorm(8, elementwise_affine=affine)
    ).eval()
    if affine:
        with torch.no_grad():
            model[1].weight.uniform_(0.5, 1.5)
            model[1].bias.normal_()
    buffer = io.BytesIO()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 5, 8),), buffer, dynamo=False, opset_version=opset)
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("affine", [True, False])
def test_legacy_exporter_layernorm_is_raised(rng, affine):
    model = _legacy_layernorm(affine=affine)
    assert "LayerNormalization" not in op_types(model) and "ReduceMean" in op_types(model)
    raised, report = normfuse.raise_norms(model, target_opset=17)
    assert op_types(raised).count("LayerNormalization") == 1
    assert "ReduceMean" not in op_types(raised) and "Pow" not in op_types(raised)
    assert raised.opset_import[0].version == 17 and any(
        "opset raised from 13 to 17" in n for n in report.notes
    )
    x = normal(rng, (2, 5, 8)) * 3
    assert _rel(run(raised, {run_input(model): x})[0], run(model, {run_input(model): x})[0]) <= 1e-5
    onnx.checker.check_model(raised, full_check=True)


def run_input(model: onnx.ModelProto) -> str:
    return model.graph.input[0].name


def test_raise_never_raises_the_opset_silently():
    model = onnx.load(MODELS / "norm_block.onnx")
    same, report = normfuse.raise_norms(model)
    assert same.opset_import[0].version == 13 and not report.applied
    assert all("--target-opset" in e.fix for e in report.skipped) and len(report.skipped) == 4


def _feeds(model, rng):
    return {
        i.name: normal(rng, [d.dim_value for d in i.type.tensor_type.shape.dim]) * 2
        for i in model.graph.input
    }


@pytest.mark.parametrize(
    ("target", "fused"),
    [
        (23, {"LayerNormalization": 2, "RMSNormalization": 1, "GroupNormalization": 1}),
        (21, {"LayerNormalization": 2, "GroupNormalization": 1}),
        (18, {"LayerNormalization": 2}),
    ],
)
def test_norm_block_raises_and_lowers_back(rng, target, fused):
    model = onnx.load(MODELS / "norm_block.onnx")
    raised, report = normfuse.raise_norms(model, target_opset=target)
    types = op_types(raised)
    assert {k: types.count(k) for k in fused} == fused
    feeds = _feeds(model, rng)
    ref = run(model, feeds)
    for r, g in zip(ref, run(raised, feeds), strict=True):
        assert _rel(g, r) <= 1e-5
    lowered, report = normfuse.lower_norms(raised, 13)
    assert lowered.opset_import[0].version == 13 and len(report.applied) == sum(fused.values())
    assert not set(op_types(lowered)) & {
        "LayerNormalization",
        "RMSNormalization",
        "GroupNormalization",
    }
    for r, g in zip(ref, run(lowered, feeds), strict=True):
        assert _rel(g, r) <= 1e-5
    onnx.checker.check_model(lowered, full_check=True)


def test_lower_keeps_ops_the_target_has(rng):
    model = onnx.load(MODELS / "norm_block.onnx")
    raised, _ = normfuse.raise_norms(model, target_opset=23)
    lowered, report = normfuse.lower_norms(raised, 17)
    types = op_types(lowered)
    assert types.count("LayerNormalization") == 2 and "RMSNormalization" not in types
    kept = [e for e in report.skipped if e.op_type == "LayerNormalization"]
    assert len(kept) == 2 and "has LayerNormalization" in kept[0].reason


def test_inspect_lists_decomposed_norms_and_what_raise_would_write():
    report = normfuse.inspect(MODELS / "norm_block.onnx")
    raisable = [e for e in report.entries if "decomposed" in e.op_type]
    assert {e.op_type.split(" ")[0] for e in raisable} == {"LayerNorm", "RMSNorm", "GroupNorm"}
    assert all(e.status == "raisable" and e.target for e in raisable)


# ------------------------------------------------------------------------------ recalibrate


def _conv_bn_chain(rng) -> onnx.ModelProto:
    inits = [
        tensor("w1", normal(rng, (6, 3, 3, 3))),
        tensor("w2", normal(rng, (6, 6, 1, 1))),
        *bn_params(rng, 6, "bn1"),
        *bn_params(rng, 6, "bn2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        bn_node("c1", "b1", "bn1"),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        bn_node("c2", "y", "bn2"),
    ]
    return make_model(
        nodes, [("x", TP.FLOAT, [4, 3, 8, 8])], [("y", TP.FLOAT, [4, 6, 6, 6])], inits, opset=17
    )


def _stats(model, node_input: str, batches):
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(node_input, TP.FLOAT, None))
    values = np.concatenate([run(probe, b)[-1] for b in batches]).astype(np.float64)
    flat = np.moveaxis(values, 1, 0).reshape(values.shape[1], -1)
    return flat.mean(1), flat.var(1)


def test_recalibrated_statistics_match_numpy_level_by_level(rng):
    model = _conv_bn_chain(rng)
    batches = [{"x": normal(rng, (4, 3, 8, 8)) * 1.7 + 0.4} for _ in range(5)]
    new, report = normfuse.recalibrate(model, batches)
    assert [e.status for e in report.entries] == ["applied", "applied"]
    assert "level 0" in report.entries[0].target and "level 1" in report.entries[1].target
    p = _params(new)
    for bn, inp in (("bn1", "c1"), ("bn2", "c2")):
        mean, var = _stats(new, inp, batches)  # measured on the recalibrated model itself
        np.testing.assert_allclose(p[f"{bn}_mean"], mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(p[f"{bn}_var"], var, rtol=1e-4)
    assert np.array_equal(p["bn1_scale"], _params(model)["bn1_scale"])  # gamma/beta untouched


def test_recalibrate_reaches_batchnorm_inside_if_branches(rng):
    then_graph = helper.make_graph(
        [bn_node("x", "t", "bn")], "then", [], [helper.make_tensor_value_info("t", TP.FLOAT, None)]
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TP.FLOAT, None)],
    )
    model = make_model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)],
        [("x", TP.FLOAT, [2, 4, 3]), ("cond", TP.BOOL, [])],
        [("y", TP.FLOAT, None)],
        bn_params(rng, 4),
        opset=17,
    )
    xs = [normal(rng, (2, 4, 3)) + 2 for _ in range(3)]
    new, report = normfuse.recalibrate(model, [{"x": x, "cond": np.array(True)} for x in xs])
    assert report.entries[0].status == "applied"
    flat = np.moveaxis(np.concatenate(xs).astype(np.float64), 1, 0).reshape(4, -1)
    p = _params(new)
    np.testing.assert_allclose(p["bn_mean"], flat.mean(1), rtol=1e-4)
    np.testing.assert_allclose(p["bn_var"], flat.var(1), rtol=1e-4)
    _, report = normfuse.recalibrate(model, [{"x": xs[0], "cond": np.array(False)}])
    assert "never ran" in report.entries[0].reason


# ----------------------------------------------------------------------------------- CLI


def test_cli_commands_write_and_check(tmp_path, rng):
    runner = CliRunner()
    src = tmp_path / "resnet.onnx"
    shutil.copy(MODELS / "resnet_small.onnx", src)
    result = runner.invoke(cli, ["swap", str(src), "--to", "frozen"])
    assert result.exit_code == 0, result.output
    assert "BatchNormalization" not in op_types(onnx.load(tmp_path / "resnet.swap.onnx"))
    result = runner.invoke(
        cli, ["swap", str(src), "--to", "groupnorm", "-o", str(tmp_path / "gn.onnx")]
    )
    assert result.exit_code == 0 and "as expected" in result.output
    block = tmp_path / "block.onnx"
    shutil.copy(MODELS / "norm_block.onnx", block)
    result = runner.invoke(cli, ["raise", str(block), "--target-opset", "23"])
    assert result.exit_code == 0 and "4 raised" in result.output, result.output
    result = runner.invoke(
        cli, ["lower", str(tmp_path / "block.raise.onnx"), "--target-opset", "13"]
    )
    assert result.exit_code == 0 and "4 lowered" in result.output, result.output
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        np.savez(data / f"{i}.npz", x=normal(rng, (1, 3, 32, 32)))
    result = runner.invoke(cli, ["recalibrate", str(src), "--data", str(data), "--batches", "2"])
    assert (
        result.exit_code == 0
        and "9 recalibrated" in result.output
        and "2 batch(es)" in result.output
    )
    result = runner.invoke(cli, ["insert", str(tmp_path / "resnet.swap.onnx"), "--after", "Conv"])
    assert result.exit_code == 0, result.output


def test_cli_bad_input_is_one_line(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(cli, ["swap", str(tmp_path / "nope.onnx"), "--to", "frozen"])
    assert (
        missing.exit_code == 2
        and missing.output.startswith("error:")
        and len(missing.output.splitlines()) == 1
    )
    bad_kind = runner.invoke(
        cli,
        ["swap", str(MODELS / "mlp.onnx"), "--to", "weightnorm", "-o", str(tmp_path / "o.onnx")],
    )
    assert bad_kind.exit_code == 2 and "groupnorm" in bad_kind.output
    exists = tmp_path / "o.onnx"
    exists.write_bytes(b"keep")
    again = runner.invoke(
        cli, ["swap", str(MODELS / "mlp.onnx"), "--to", "frozen", "-o", str(exists)]
    )
    assert again.exit_code == 2 and exists.read_bytes() == b"keep"
    no_data = runner.invoke(
        cli, ["recalibrate", str(MODELS / "mlp.onnx"), "--data", str(tmp_path / "none")]
    )
    assert no_data.exit_code == 2 and "error:" in no_data.output
    too_low = runner.invoke(
        cli,
        [
            "lower",
            str(MODELS / "norm_block.onnx"),
            "--target-opset",
            "5",
            "-o",
            str(tmp_path / "l.onnx"),
        ],
    )
    assert too_low.exit_code == 2 and "opset 5 lacks" in too_low.output
    assert len(too_low.output.splitlines()) == 1 and not (tmp_path / "l.onnx").exists()


def test_recalibrate_reaches_batchnorm_inside_a_loop_body(rng):
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            bn_node("x", "b", "bn"),
            helper.make_node("Add", ["carry", "b"], ["carry_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TP.INT64, []),
            helper.make_tensor_value_info("cond_in", TP.BOOL, []),
            helper.make_tensor_value_info("carry", TP.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TP.BOOL, []),
            helper.make_tensor_value_info("carry_out", TP.FLOAT, None),
        ],
    )
    model = make_model(
        [helper.make_node("Loop", ["n", "", "init"], ["y"], body=body)],
        [("x", TP.FLOAT, [2, 4, 3]), ("n", TP.INT64, []), ("init", TP.FLOAT, [2, 4, 3])],
        [("y", TP.FLOAT, None)],
        bn_params(rng, 4),
        opset=17,
    )
    xs = [normal(rng, (2, 4, 3)) * 2 - 1 for _ in range(2)]
    feeds = [
        {"x": x, "n": np.array(3, np.int64), "init": np.zeros((2, 4, 3), np.float32)} for x in xs
    ]
    new, report = normfuse.recalibrate(model, feeds)
    assert report.entries[0].status == "applied", report.entries[0].reason
    flat = np.moveaxis(np.concatenate(xs).astype(np.float64), 1, 0).reshape(4, -1)
    p = _params(new)
    np.testing.assert_allclose(p["bn_mean"], flat.mean(1), rtol=1e-4)  # 3 iterations, same data
    np.testing.assert_allclose(p["bn_var"], flat.var(1), rtol=1e-4)


def _sequence_model(rng) -> onnx.ModelProto:
    """Conv -> SplitToSequence (torch.chunk in dynamo exports) -> BN on one half + the other."""
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("SplitToSequence", ["c", "halves"], ["seq"], axis=1, name="chunk"),
        helper.make_node("SequenceAt", ["seq", "zero"], ["a"], name="first"),
        helper.make_node("SequenceAt", ["seq", "one"], ["b"], name="second"),
        bn_node("a", "n"),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("Add", ["r", "b"], ["y"]),
    ]
    inits = [
        tensor("W", normal(rng, [16, 3, 3, 3])),
        tensor("halves", np.array([8, 8], np.int64)),
        tensor("zero", np.array(0, np.int64)),
        tensor("one", np.array(1, np.int64)),
        *bn_params(rng, 8),
    ]
    return make_model(nodes, [("x", TP.FLOAT, [2, 3, 6, 6])], [("y", TP.FLOAT, None)], inits)


@pytest.mark.parametrize(
    "args",
    [["swap", "--to", "frozen"], ["swap", "--to", "groupnorm"], ["insert"]],
    ids=["swap-frozen", "swap-groupnorm", "insert"],
)
def test_a_sequence_value_keeps_its_type_through_every_rewrite(rng, tmp_path, args):
    """onnx_ir's shape inference gave SplitToSequence's output the tensor type of its elements,
    which onnxruntime refuses: swap, insert and raise (the same inference) failed their own check on every dynamo
    export with torch.chunk (YOLOv8's C2f, diffusers' VAE, Phi3), and wrote that model with
    --no-check."""
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    model = _sequence_model(rng)
    onnx.save(model, src)
    done = CliRunner().invoke(cli, [args[0], str(src), "-o", str(out), *args[1:]])
    assert done.exit_code == 0, done.output  # its check ran on onnxruntime
    written = onnx.load(out)
    assert [v.name for v in written.graph.value_info if v.type.HasField("tensor_type")].count(
        "seq"
    ) == 0
    x = {"x": normal(rng, [2, 3, 6, 6])}
    got = run(written, x)[0]  # loads and runs
    if args[-1] in ("frozen", "insert"):  # the same function in inference
        assert _rel(got, run(model, x)[0]) <= 1e-5


def test_a_rewritten_model_onnxruntime_refuses_is_called_a_defect_not_the_inputs():
    from normfuse.runtime.sessions import _load_error

    exc = RuntimeError(
        "[ONNXRuntimeError] : 1 : FAIL : Load model failed:Type Error: Type (tensor(float)) "
        "of output arg (seq) of node (chunk) does not match expected type (seq(tensor(float)))."
    )
    ours = _load_error(exc, "the rewritten")
    assert "normfuse defect" in ours.note and "fix the model" not in ours.note
    assert not str(ours).endswith(".")  # the CLI adds one: no '..'
    theirs = _load_error(exc, "the second")  # `normfuse check a.onnx b.onnx`: the user's
    assert "fix the model" in theirs.note and "to fold" not in theirs.note


def test_lower_takes_axes_computed_from_constants_and_defaults_it_can_drop(rng):
    """The dynamo exporter (opset 18+) writes RMSNorm's ReduceMean axes as
    Reshape(Constant, Constant) and Resize with antialias=0, keep_aspect_ratio_policy=stretch
    (the defaults, what Resize-13 does); a Pad-18 makes onnx's converter give up, so each node
    is taken down by hand: both were refused."""
    nodes = [
        helper.make_node("Constant", [], ["ax0"], value=tensor("a", np.array([-1], np.int64))),
        helper.make_node("Constant", [], ["flat"], value=tensor("f", np.array([-1], np.int64))),
        helper.make_node("Reshape", ["ax0", "flat"], ["axes"]),
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Div", ["x", "rms"], ["n"]),
        helper.make_node("Pad", ["n", "pads"], ["p"], mode="reflect"),
        helper.make_node(
            "Resize",
            ["p", "", "scales"],
            ["y"],
            mode="nearest",
            antialias=0,
            keep_aspect_ratio_policy="stretch",
        ),
    ]
    inits = [
        tensor("eps", np.array(1e-6, np.float32)),
        tensor("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
        tensor("scales", np.array([1, 1, 2, 2], np.float32)),
    ]
    model = make_model(
        nodes, [("x", TP.FLOAT, [1, 3, 4, 5])], [("y", TP.FLOAT, [1, 3, 12, 14])], inits, 20
    )
    lowered, _ = normfuse.lower_norms(model, 17)  # the default check ran
    assert lowered.opset_import[0].version == 17
    (reduce,) = [n for n in lowered.graph.node if n.op_type == "ReduceMean"]
    assert list(reduce.input) == ["sq"] and helper.get_attribute_value(reduce.attribute[-1]) == [-1]
    assert "Reshape" not in op_types(lowered)  # what computed the axes went with them
    (resize,) = [n for n in lowered.graph.node if n.op_type == "Resize"]
    assert {a.name for a in resize.attribute} == {"mode"}
    onnx.checker.check_model(lowered)
    x = {"x": normal(rng, [1, 3, 4, 5])}
    assert _rel(run(lowered, x)[0], run(model, x)[0]) == 0.0


def test_lower_names_the_opset_an_op_came_in():
    model = make_model(
        [helper.make_node("Gelu", ["x"], ["y"])],
        [("x", TP.FLOAT, [2, 3])],
        [("y", TP.FLOAT, [2, 3])],
        [],
        21,
    )
    with pytest.raises(normfuse.InputError, match=r"came in opset 20") as info:
        normfuse.lower_norms(model, 17)
    assert "choose --target-opset >= 20" in str(info.value.note)
    lowered, _ = normfuse.lower_norms(model, 20)
    assert lowered.opset_import[0].version == 20


def test_the_python_api_leaves_stderr_alone(caplog):
    """A library call printed onnx_ir's warnings: a traceback where shape inference failed (a
    value_info that disagrees with inference), and one line per value with an inferred shape
    but no type (about 700 for a small diffusers UNet's raise_norms)."""
    import logging

    import onnx_ir as ir

    from normfuse.onnxgraph.protos import to_proto
    from normfuse.onnxgraph.shapes import infer_types

    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [2, 3])],
        value_info=[helper.make_tensor_value_info("h", TP.FLOAT, [2, 3, 4])],  # wrong rank
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with caplog.at_level(logging.DEBUG, logger="onnx_ir"):
        infer_types(model)  # strict inference fails: the model is left as it was
        h = model.graph.node(0).outputs[0]
        h.type, h.shape = None, ir.Shape([2, 3])  # a shape normfuse inferred, no type
        to_proto(model)
    loud = [r for r in caplog.records if r.name.startswith("onnx_ir") and r.levelno >= logging.INFO]
    assert [r.getMessage() for r in loud] == []


def test_check_takes_the_inputs_the_command_takes(tmp_path, rng):
    """``inputs=`` as a path (an .npz file, a folder of them) as ``--inputs`` takes; a single
    mapping is refused in one line (it raised a raw ValueError from dict())."""
    model = onnx.load(MODELS / "norm_block.onnx")
    feeds = _feeds(model, rng)
    np.savez(tmp_path / "batch.npz", **feeds)
    (tmp_path / "many").mkdir()
    for i in range(2):
        np.savez(tmp_path / "many" / f"{i}.npz", **_feeds(model, rng))
    assert normfuse.check(model, model, inputs=tmp_path / "batch.npz").passed
    parity = normfuse.check(model, model, inputs=str(tmp_path / "many"))
    assert parity.passed and parity.runs == 2
    assert normfuse.check(model, model, inputs=iter([feeds])).runs == 1  # a generator too
    with pytest.raises(normfuse.InputError, match="list of batches"):
        normfuse.check(model, model, inputs=feeds)


def test_insert_after_the_activation_knows_silu_as_exporters_write_it(rng):
    """SiLU exports as ``Mul(x, Sigmoid(x))``: ``before_activation=False`` put the BN between
    the Conv and both (YOLOv8: all 57), silently; now after the Mul, and a node with no
    activation after it says so."""
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", ["c"], ["s"]),
            helper.make_node("Mul", ["c", "s"], ["a"]),
            helper.make_node("Conv", ["a", "w2"], ["y"]),
        ],
        [("x", TP.FLOAT, [2, 3, 6, 6])],
        [("y", TP.FLOAT, [2, 4, 6, 6])],
        [tensor("w", normal(rng, (5, 3, 3, 3))), tensor("w2", normal(rng, (4, 5, 1, 1)))],
    )
    new, report = normfuse.insert(model, before_activation=False)  # the check ran
    first, last = report.entries
    assert first.status == "applied" and any("after the activation" in w for w in first.warnings)
    mul = next(n for n in new.graph.node if n.op_type == "Mul")
    bn = next(n for n in new.graph.node if n.op_type == "BatchNormalization")
    assert bn.input[0] == mul.output[0]
    assert last.reason is not None or any("no activation" in w for w in last.warnings)
    x = {"x": normal(rng, [2, 3, 6, 6])}
    assert _rel(run(new, x)[0], run(model, x)[0]) <= 1e-6


def _const(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=helper.make_tensor(name, TP.FLOAT, [], [value])
    )


_WRITTEN_OUT = {  # activation -> its nodes on "c", ending in "a" (as the exporters write them)
    "gelu_legacy": [  # torch.onnx.export(dynamo=False) of nn.GELU()
        _const("sq2", 1.4142135),
        _const("one", 1.0),
        _const("half", 0.5),
        helper.make_node("Div", ["c", "sq2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["p"]),
        helper.make_node("Mul", ["c", "p"], ["m"]),
        helper.make_node("Mul", ["m", "half"], ["a"]),
    ],
    "gelu_tanh": [
        _const("three", 3.0),
        _const("k", 0.044715),
        _const("r", 0.7978846),
        _const("one", 1.0),
        _const("half", 0.5),
        helper.make_node("Pow", ["c", "three"], ["c3"]),
        helper.make_node("Mul", ["c3", "k"], ["kc3"]),
        helper.make_node("Add", ["c", "kc3"], ["inner"]),
        helper.make_node("Mul", ["inner", "r"], ["arg"]),
        helper.make_node("Tanh", ["arg"], ["t"]),
        helper.make_node("Add", ["one", "t"], ["p"]),
        helper.make_node("Mul", ["half", "c"], ["h"]),
        helper.make_node("Mul", ["h", "p"], ["a"]),
    ],
    "hardswish": [
        _const("three", 3.0),
        _const("six", 6.0),
        helper.make_node("Add", ["c", "three"], ["c3"]),
        helper.make_node("Clip", ["c3"], ["cl"]),
        helper.make_node("Mul", ["c", "cl"], ["m"]),
        helper.make_node("Div", ["m", "six"], ["a"]),
    ],
    "mish": [
        helper.make_node("Softplus", ["c"], ["sp"]),
        helper.make_node("Tanh", ["sp"], ["t"]),
        helper.make_node("Mul", ["c", "t"], ["a"]),
    ],
}


@pytest.mark.parametrize("activation", sorted(_WRITTEN_OUT))
def test_insert_after_an_activation_written_out_elementwise(rng, activation):
    """GELU as the legacy exporter writes it (Div/Erf/Add/Mul/Mul), its tanh form, HardSwish
    and Mish: the norm goes after the activation's last op (GELU's ``* 0.5`` included), and a
    per-channel scale after it (a layer scale) is not taken for part of it."""
    scale = tensor("ls", rng.uniform(0.5, 1.5, (1, 5, 1, 1)).astype(np.float32))
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            *_WRITTEN_OUT[activation],
            helper.make_node("Mul", ["a", "ls"], ["s"]),
            helper.make_node("Conv", ["s", "w2"], ["y"]),
        ],
        [("x", TP.FLOAT, [2, 3, 6, 6])],
        [("y", TP.FLOAT, [2, 4, 6, 6])],
        [tensor("w", normal(rng, (5, 3, 3, 3))), tensor("w2", normal(rng, (4, 5, 1, 1))), scale],
    )
    new, report = normfuse.insert(model, after=["Conv"], before_activation=False)  # checked
    first = report.entries[0]
    assert first.status == "applied" and any("after the activation" in w for w in first.warnings)
    bn = next(n for n in new.graph.node if n.op_type == "BatchNormalization")
    layer_scale = next(n for n in new.graph.node if "ls" in n.input)
    assert layer_scale.input[0] == bn.output[0], "between the activation and the layer scale"
    assert bn.input[0] == "a_before_norm"
    x = {"x": normal(rng, [2, 3, 6, 6])}
    assert _rel(run(new, x)[0], run(model, x)[0]) <= 1e-6


def test_written_out_ops_that_read_another_tensor_are_no_activation(rng):
    """``c * Sigmoid(c) + r`` with ``r`` another tensor ends at the Mul (the SiLU); a SiLU whose
    input also feeds another op is no activation of the Conv alone: the norm goes after the
    Conv."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c"], ["g"]),
        helper.make_node("Mul", ["c", "g"], ["a"]),
        helper.make_node("Add", ["a", "x5"], ["y"]),
    ]
    model = make_model(
        nodes,
        [("x", TP.FLOAT, [2, 3, 6, 6]), ("x5", TP.FLOAT, [2, 5, 6, 6])],
        [("y", TP.FLOAT, [2, 5, 6, 6])],
        [tensor("w", normal(rng, (5, 3, 3, 3)))],
    )
    new, _ = normfuse.insert(model, after=["Conv"], before_activation=False)
    bn = next(n for n in new.graph.node if n.op_type == "BatchNormalization")
    assert bn.input[0] == "a_before_norm"
    branch = [  # c also read by a Conv: the SiLU is no activation of c alone
        *nodes[:3],
        helper.make_node("Conv", ["c", "w3"], ["z"]),
        helper.make_node("Add", ["a", "z"], ["y"]),
    ]
    model = make_model(
        branch,
        [("x", TP.FLOAT, [2, 3, 6, 6])],
        [("y", TP.FLOAT, [2, 5, 6, 6])],
        [tensor("w", normal(rng, (5, 3, 3, 3))), tensor("w3", normal(rng, (5, 5, 1, 1)))],
    )
    new, report = normfuse.insert(model, after=["Conv"], before_activation=False)
    bn = next(n for n in new.graph.node if n.op_type == "BatchNormalization")
    assert bn.input[0] == "c_before_norm"
    assert any("no activation" in w for w in report.entries[0].warnings)
