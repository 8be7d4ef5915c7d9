"""Structural reparameterization on ONNX graphs (normfuse.onnxgraph.reparam).

Each block is built with onnx.helper and random non-trivial weights and BN statistics, merged,
checked with onnx.checker (full_check) and compared with the original on onnxruntime at
ORT_DISABLE_ALL (max abs error <= 1e-5 of the output's max magnitude, float32).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from normfuse.onnxgraph.reparam import reparam_model

F = TensorProto.FLOAT


class Block:
    """Builds a one-input graph node by node."""

    def __init__(self, rng: np.random.Generator, channels: int = 6, size=(9, 8)) -> None:
        self.rng = rng
        self.c = channels
        self.size = size
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs = [helper.make_tensor_value_info("x", F, [1, channels, *size])]
        self.k = 0

    def name(self, base: str) -> str:
        self.k += 1
        return f"{base}{self.k}"

    def const(self, array: np.ndarray, base: str = "c") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x, cout, k, *, cin=None, group=1, stride=1, pads=None, dilation=1, bias=True):
        cin = self.c if cin is None else cin
        ks = list(k) if isinstance(k, tuple) else [k, k]
        w = self.rng.standard_normal((cout, cin // group, *ks)) / np.sqrt(cin * np.prod(ks))
        inputs = [x, self.const(w, "W")]
        if bias:
            inputs.append(self.const(self.rng.standard_normal(cout) * 0.5, "B"))
        if pads is None:
            pads = [dilation * (s - 1) // 2 for s in ks] * 2
        return self.node(
            "Conv",
            inputs,
            kernel_shape=ks,
            strides=[stride, stride],
            pads=list(pads),
            dilations=[dilation, dilation],
            group=group,
        )

    def bn(self, x, c=None):
        c = self.c if c is None else c
        r = self.rng
        params = [
            r.uniform(0.5, 1.5, c),
            r.standard_normal(c) * 0.3,
            r.standard_normal(c) * 0.3,
            r.uniform(0.5, 2.0, c),
        ]
        return self.node("BatchNormalization", [x] + [self.const(p, "bn") for p in params])

    def add(self, *terms):
        out = terms[0]
        for t in terms[1:]:
            out = self.node("Add", [out, t])
        return out

    def model(self, out: str, extra_outputs=(), extra_inputs=(), shape=None) -> onnx.ModelProto:
        outputs = [helper.make_empty_tensor_value_info(o) for o in (out, *extra_outputs)]
        graph = helper.make_graph(
            self.nodes, "block", self.inputs + list(extra_inputs), outputs, self.inits
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        model = onnx.shape_inference.infer_shapes(model)  # the outputs' types
        del model.graph.value_info[:]
        if shape is not None:  # where shape inference gives none
            model.graph.output[0].CopyFrom(helper.make_tensor_value_info(out, F, shape))
        onnx.checker.check_model(model, full_check=True)
        return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def merge(model: onnx.ModelProto, **kw):
    m = ir.from_proto(model)
    entries = reparam_model(m, **kw)
    out = ir.to_proto(m)
    onnx.checker.check_model(out, full_check=True)
    return out, entries


def feeds_for(model: onnx.ModelProto, rng) -> dict[str, np.ndarray]:
    out = {}
    for i in model.graph.input:
        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        out[i.name] = rng.standard_normal(dims).astype(np.float32)
    return out


def assert_same(a: onnx.ModelProto, b: onnx.ModelProto, rng) -> None:
    feeds = feeds_for(a, rng)
    for ya, yb in zip(run(a, feeds), run(b, feeds), strict=True):
        assert ya.shape == yb.shape
        assert np.max(np.abs(ya - yb)) <= 1e-5 * np.max(np.abs(ya)), np.max(np.abs(ya - yb))


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def check_merge(model, rng, expected_ops, status="applied", **kw):
    merged, entries = merge(model, **kw)
    assert ops(merged) == expected_ops
    assert_same(model, merged, rng)
    assert entries and all(e.status == status for e in entries), [e.to_dict() for e in entries]
    again, more = merge(merged)  # idempotent: nothing left to merge
    assert ops(again) == ops(merged) and not [e for e in more if e.status == "applied"]
    return merged, entries


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(2024)


def test_repvgg_block_with_bns(rng):
    b = Block(rng)
    out = b.add(b.bn(b.conv("x", 6, 3, bias=False)), b.bn(b.conv("x", 6, 1, bias=False)), b.bn("x"))
    _, entries = check_merge(b.model(out), rng, ["Conv"])
    assert "3x3 + 1x1 + identity BatchNormalization" in entries[0].target


def test_repvgg_block_after_fold(rng):
    import normfuse

    b = Block(rng)
    out = b.add(b.bn(b.conv("x", 6, 3, bias=False)), b.bn(b.conv("x", 6, 1, bias=False)), b.bn("x"))
    model = b.model(out)
    folded, _ = normfuse.fold(model, check=False)
    assert ops(folded).count("BatchNormalization") == 1  # the identity's BN stays
    merged, _ = check_merge(folded, rng, ["Conv"])
    assert_same(model, merged, rng)


@pytest.mark.parametrize("group", [1, 2, 6])
def test_acnet_sum_grouped(rng, group):
    b = Block(rng)
    terms = [
        b.conv("x", 6, 3, group=group),
        b.conv("x", 6, (1, 3), group=group),
        b.conv("x", 6, (3, 1), group=group),
        b.conv("x", 6, 1, group=group),
        "x",
    ]
    out = b.node("Sum", terms)
    _, entries = check_merge(b.model(out), rng, ["Conv"])
    assert entries[0].target.endswith("(3x3 + 1x3 + 3x1 + 1x1 + identity)")


def test_mobileone_depthwise_branches_with_scale_identity(rng):
    b = Block(rng)
    terms = [b.bn(b.conv("x", 6, 3, group=6, bias=False)) for _ in range(3)]
    terms.append(b.bn(b.conv("x", 6, 1, group=6, bias=False)))
    terms.append(b.node("Mul", ["x", b.const(rng.standard_normal((6, 1, 1)))]))
    terms.append(b.const(rng.standard_normal((1, 6, 1, 1))))  # a bias left by a fold
    check_merge(b.model(b.add(*terms)), rng, ["Conv"])


def test_stride_2(rng):
    b = Block(rng)
    out = b.add(b.conv("x", 8, 3, stride=2), b.conv("x", 8, 1, stride=2, pads=[0, 0, 0, 0]))
    merged, _ = check_merge(b.model(out), rng, ["Conv"])
    attrs = {a.name: helper.get_attribute_value(a) for a in merged.graph.node[0].attribute}
    assert attrs["strides"] == [2, 2] and attrs["pads"] == [1, 1, 1, 1]


def test_dilated_and_causal_padding(rng):
    b = Block(rng)
    out = b.add(b.conv("x", 6, 3, dilation=2), b.conv("x", 6, 1))
    check_merge(b.model(out), rng, ["Conv"])
    b = Block(rng)
    out = b.add(b.conv("x", 6, 3, pads=[2, 2, 0, 0]), b.conv("x", 6, 1))  # causal: taps -2..0
    check_merge(b.model(out), rng, ["Conv"])


def test_misaligned_padding_refused(rng):
    b = Block(rng)
    out = b.add(b.conv("x", 6, 3, dilation=2), b.conv("x", 6, 3, dilation=2, pads=[1, 1, 3, 3]))
    model = b.model(out)
    merged, entries = merge(model)
    assert ops(merged) == ops(model)
    assert len(entries) == 1 and entries[0].status == "skipped"
    assert "padding misaligned" in entries[0].reason


def test_dilation_mismatch_refused(rng):
    b = Block(rng)
    out = b.add(b.conv("x", 6, 3), b.conv("x", 6, 3, dilation=2))
    model = b.model(out)
    merged, entries = merge(model)
    assert ops(merged) == ops(model) and entries[0].status == "skipped"
    assert "dilation mismatch" in entries[0].reason


def test_used_elsewhere_refused_and_partial(rng):
    b = Block(rng)
    c1 = b.conv("x", 6, 1)
    out = b.add(b.conv("x", 6, 3), c1)
    model = b.model(out, extra_outputs=[c1])
    merged, entries = merge(model)
    assert ops(merged) == ops(model)
    assert entries[0].status == "skipped" and "used elsewhere" in entries[0].reason
    b = Block(rng)
    c1 = b.conv("x", 6, 1)
    out = b.add(b.conv("x", 6, 3), c1, "x")
    model = b.model(out, extra_outputs=[c1])
    merged, entries = merge(model)
    assert ops(merged) == ["Conv", "Conv", "Add"]  # 3x3 + identity merged, the 1x1 added
    assert entries[0].status == "applied" and "used elsewhere" in entries[0].warnings[0]
    assert_same(model, merged, rng)


def test_nonlinearity_between_refused(rng):
    b = Block(rng)
    out = b.add(b.conv("x", 6, 3), b.node("Relu", [b.conv("x", 6, 1)]))
    model = b.model(out)
    merged, entries = merge(model)
    assert ops(merged) == ops(model)
    assert entries[0].status == "skipped" and "nonlinearity between" in entries[0].reason


def test_weights_not_constant_refused(rng):
    b = Block(rng)
    w = helper.make_tensor_value_info("w", F, [6, 6, 1, 1])
    c1 = b.node("Conv", ["x", "w"], kernel_shape=[1, 1])
    out = b.add(b.conv("x", 6, 3), c1)
    model = b.model(out, extra_inputs=[w])
    merged, entries = merge(model)
    assert ops(merged) == ops(model)
    assert entries[0].status == "skipped" and "not constant" in entries[0].reason


def test_scalar_scaled_identity_and_wider_output(rng):
    b = Block(rng)
    out = b.add(b.conv("x", 6, 3), b.conv("x", 6, 1), b.node("Mul", ["x", b.const(2.0)]))
    check_merge(b.model(out), rng, ["Conv"])
    b = Block(rng)
    y = b.conv("x", 8, 3)
    out = b.add(y, b.conv("x", 8, 1))
    check_merge(b.model(out), rng, ["Conv"])


def test_foreign_term_kept(rng):
    b = Block(rng)
    y = helper.make_tensor_value_info("y", F, [1, 6, 9, 8])
    out = b.add(b.conv("x", 6, 3), "y", b.conv("x", 6, 1))
    model = b.model(out, extra_inputs=[y])
    check_merge(model, rng, ["Conv", "Add"])


def test_bn_after_sum_merged(rng):
    b = Block(rng)
    out = b.bn(b.add(b.conv("x", 6, 3, group=6), b.conv("x", 6, 1, group=6), "x"))
    _, entries = check_merge(b.model(out), rng, ["Conv"])
    assert any("after the sum" in w for w in entries[0].warnings)


def test_sequential_1x1_then_3x3(rng):
    # no padding in the 3x3: exact with the first conv's bias and the BN's shift
    b = Block(rng)
    out = b.conv(b.bn(b.conv("x", 6, 1)), 6, 3, pads=[0, 0, 0, 0])
    _, entries = check_merge(b.model(out), rng, ["Conv"])
    assert "1x1->3x3" in entries[0].target
    # padding and a non-zero intermediate constant: refused
    b = Block(rng)
    out = b.conv(b.bn(b.conv("x", 6, 1)), 6, 3)
    model = b.model(out)
    merged, entries = merge(model)
    assert ops(merged) == ops(model)
    assert entries[0].status == "skipped" and "borders" in entries[0].reason
    # padding, no bias and a scale-only affine: exact
    b = Block(rng)
    mid = b.node("Mul", [b.conv("x", 6, 1, bias=False), b.const(rng.standard_normal((6, 1, 1)))])
    check_merge(b.model(b.conv(mid, 6, 3)), rng, ["Conv"])


def test_sequential_3x3_then_1x1(rng):
    b = Block(rng)
    out = b.conv(b.bn(b.conv("x", 6, 3, stride=2)), 4, 1, cin=6)
    check_merge(b.model(out), rng, ["Conv"])


def test_sequential_more_expensive_refused(rng):
    b = Block(rng, channels=16)
    out = b.conv(b.conv("x", 2, 1, cin=16), 16, 3, cin=2, pads=[0, 0, 0, 0])  # a bottleneck
    model = b.model(out)
    merged, entries = merge(model)
    assert ops(merged) == ops(model)
    assert entries[0].status == "skipped" and "multiply-adds" in entries[0].reason


def test_separable_conv_is_refused_on_cost_before_any_weight_is_merged(rng, monkeypatch):
    """A depthwise 3x3 then a pointwise conv (Keras SeparableConv2D): the merge would cost
    more, which the shapes tell; composing first built a dense weight (Xception: 2 s a pair)."""
    from normfuse.core import branches

    def never(*args, **kwargs):
        raise AssertionError("composed although the shapes refuse the merge")

    monkeypatch.setattr(branches, "compose", never)
    b = Block(rng, channels=16)
    out = b.conv(b.conv("x", 16, 3, group=16, bias=False), 24, 1, cin=16)
    model = b.model(out)
    merged, entries = merge(model)
    assert ops(merged) == ops(model)
    assert entries[0].status == "skipped" and "(3456 vs 528 per position)" in entries[0].reason


def test_dbb_block(rng):
    b = Block(rng)
    pool = b.bn(b.node("AveragePool", [b.bn(b.conv("x", 6, 1))], kernel_shape=[3, 3], pads=[0] * 4))
    # the pooled branch has no padding: 3x3 taps at 0..2, so the main conv reads -1..1: align it
    main = b.conv("x", 6, 3, pads=[0, 0, 0, 0])
    seq2 = b.conv(b.conv("x", 6, 1, bias=False), 6, 3, pads=[0, 0, 0, 0])
    out = b.add(main, pool, seq2)
    _, entries = check_merge(b.model(out, shape=[1, 6, 7, 6]), rng, ["Conv"])
    assert "1x1->avgpool 3x3" in entries[0].target


def test_avgpool_branch(rng):
    b = Block(rng)
    pool = b.node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1] * 4, count_include_pad=1)
    check_merge(b.model(b.add(b.conv("x", 6, 3), pool), shape=[1, 6, 9, 8]), rng, ["Conv"])
    b = Block(rng)
    pool = b.node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1] * 4)  # count_include_pad=0
    model = b.model(b.add(b.conv("x", 6, 3), pool), shape=[1, 6, 9, 8])
    merged, entries = merge(model)
    assert ops(merged) == ops(model)
    assert entries[0].status == "skipped" and "count_include_pad=0" in entries[0].reason


def test_gemm_branches(rng):
    b = Block(rng)
    b.inputs = [helper.make_tensor_value_info("x", F, [3, 6])]
    g1 = b.node(
        "Gemm",
        ["x", b.const(rng.standard_normal((6, 6))), b.const(rng.standard_normal(6))],
        transB=1,
        alpha=0.5,
    )
    g2 = b.node(
        "Gemm", ["x", b.const(rng.standard_normal((6, 6))), b.const(rng.standard_normal(6))]
    )
    _, entries = check_merge(b.model(b.add(g1, g2, "x")), rng, ["Gemm"])
    assert entries[0].target.startswith("Gemm")


def test_matmul_branches(rng):
    b = Block(rng)
    b.inputs = [helper.make_tensor_value_info("x", F, [2, 5, 6])]
    m1 = b.node("MatMul", ["x", b.const(rng.standard_normal((6, 4)))])
    m2 = b.node("MatMul", ["x", b.const(rng.standard_normal((6, 4)))])
    out = b.add(m1, b.const(rng.standard_normal(4)), m2)
    check_merge(b.model(out), rng, ["MatMul", "Add"])


def test_dry_run_changes_nothing(rng):
    b = Block(rng)
    out = b.add(b.conv("x", 6, 3), b.conv("x", 6, 1))
    model = b.model(out)
    merged, entries = merge(model, dry_run=True)
    assert ops(merged) == ops(model)
    assert [e.status for e in entries] == ["foldable"]


def test_plain_residual_is_no_candidate(rng):
    b = Block(rng)
    h = b.node("Relu", [b.conv("x", 6, 3)])
    out = b.add(b.conv(h, 6, 3), "x")
    model = b.model(out)
    merged, entries = merge(model)
    assert ops(merged) == ops(model) and entries == []


def test_float16_block(rng):
    b = Block(rng)
    out = b.add(b.conv("x", 6, 3), b.conv("x", 6, 1), "x")
    model = b.model(out)
    from onnx import numpy_helper as nh

    for t in model.graph.initializer:
        t.CopyFrom(nh.from_array(nh.to_array(t).astype(np.float16), t.name))
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    merged, _ = merge(model)
    assert ops(merged) == ["Conv"]
    assert merged.graph.initializer[0].data_type == TensorProto.FLOAT16
    x = rng.standard_normal((1, 6, 9, 8)).astype(np.float16)
    ya, yb = run(model, {"x": x})[0], run(merged, {"x": x})[0]
    assert np.max(np.abs(ya.astype(np.float64) - yb)) <= 5e-3 * np.max(np.abs(ya))


def test_api_fold_reparam_checked(rng):
    import normfuse

    b = Block(rng)
    out = b.add(b.bn(b.conv("x", 6, 3, bias=False)), b.bn(b.conv("x", 6, 1, bias=False)), b.bn("x"))
    model = b.model(b.node("Relu", [out]))
    folded, report = normfuse.fold(model, reparam=True)  # checked on onnxruntime
    assert ops(folded) == ["Conv", "Relu"]
    assert report.parity is not None and all(o.passed for o in report.parity.outputs)
    assert [e.status for e in report.entries if e.direction == "reparam"] == ["applied"]
    assert report.after.ops.get("Conv") == 1
    plain, _ = normfuse.fold(model, check=False)
    assert "BatchNormalization" in ops(plain)  # off by default


def test_repmixer_sub_and_layer_scale(rng):
    # FastViT's RepMixer: x + s * (mixer(x) - norm(x)), mixer a depthwise conv + BN + identity BN
    b = Block(rng)
    mixer = b.add(b.bn(b.conv("x", 6, 3, group=6, bias=False)), b.bn("x"))
    inner = b.node("Sub", [mixer, b.bn("x")])
    scaled = b.node("Mul", [inner, b.const(rng.standard_normal((6, 1, 1)))])
    _, entries = check_merge(b.model(b.add("x", scaled)), rng, ["Conv"])
    assert entries[0].target.count("identity") == 3


def test_sub_with_foreign_terms(rng):
    b = Block(rng)
    y = helper.make_tensor_value_info("y", F, [1, 6, 9, 8])
    out = b.node("Sub", [b.node("Sub", ["y", b.conv("x", 6, 3)]), b.conv("x", 6, 1)])
    check_merge(b.model(out, extra_inputs=[y]), rng, ["Conv", "Add"])
    b = Block(rng)
    out = b.node("Sub", [b.add(b.conv("x", 6, 3), b.conv("x", 6, 1)), "y"])
    check_merge(b.model(out, extra_inputs=[y]), rng, ["Conv", "Sub"])
    b = Block(rng)  # a foreign term under a scale: refused, unchanged
    inner = b.add(b.conv("x", 6, 3), "y")
    scaled = b.node("Mul", [inner, b.const(rng.standard_normal((6, 1, 1)))])
    model = b.model(b.add(scaled, b.conv("x", 6, 1)), extra_inputs=[y])
    merged, entries = merge(model)
    assert ops(merged) == ops(model) and entries[0].status == "skipped"


@pytest.mark.parametrize("seed", range(12))
def test_random_blocks_exact_or_unchanged(seed):
    """Random RepVGG/ACNet/MobileOne-like blocks: merged exactly, or left as they were."""
    rng = np.random.default_rng(seed)
    b = Block(rng)
    group = int(rng.choice([1, 2, 6]))
    stride = int(rng.choice([1, 1, 2]))
    terms = []
    for _ in range(int(rng.integers(1, 4))):
        k = [(3, 3), (1, 1), (1, 3), (3, 1)][int(rng.integers(0, 4))]
        pads = [s // 2 for s in k] * 2 if stride == 1 or rng.integers(0, 3) else [0, 0, 0, 0]
        conv = b.conv(
            "x", 6, k, group=group, stride=stride, pads=pads, bias=bool(rng.integers(0, 2))
        )
        terms.append(b.bn(conv) if rng.integers(0, 2) else conv)
    if stride == 1 and rng.integers(0, 2):
        terms.append(b.bn("x") if rng.integers(0, 2) else "x")
    if len(terms) < 2:
        terms.append(b.conv("x", 6, 3, group=group, stride=stride))
    try:
        model = b.model(b.add(*terms))
    except onnx.checker.ValidationError:
        pytest.skip("the random terms do not add up (shapes differ)")
    except onnx.shape_inference.InferenceError:
        pytest.skip("the random terms do not add up (shapes differ)")
    merged, entries = merge(model)
    assert_same(model, merged, rng)
    if ops(merged) != ops(model):
        assert ops(merged) in (["Conv"], ["Conv", "Add"], ["Conv", "Conv", "Add"])
        assert entries[0].status == "applied"
    else:
        assert all(e.status == "skipped" for e in entries)


def test_cli_fold_reparam(rng, tmp_path):
    from click.testing import CliRunner

    from normfuse.cli import cli

    b = Block(rng)
    out = b.add(b.bn(b.conv("x", 6, 3, bias=False)), b.bn(b.conv("x", 6, 1, bias=False)), b.bn("x"))
    src, dst = tmp_path / "block.onnx", tmp_path / "merged.onnx"
    onnx.save(b.model(out), src)
    args = ["fold", str(src), "-o", str(dst), "--reparam"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert ops(onnx.load(dst)) == ["Conv"]
    plain = tmp_path / "plain.onnx"
    result = CliRunner().invoke(cli, ["fold", str(src), "-o", str(plain)], catch_exceptions=False)
    assert result.exit_code == 0 and "BatchNormalization" in ops(onnx.load(plain))
