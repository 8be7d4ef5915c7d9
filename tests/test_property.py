"""Property test: random Conv/ConvTranspose/Gemm configurations fold exactly and idempotently."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto as TP
from onnx import helper

import normfuse
from tests.conftest import bn_node, bn_params, make_model, run, tensor

ELEM = {np.float32: TP.FLOAT, np.float16: TP.FLOAT16}


@st.composite
def conv_case(draw):
    transpose = draw(st.booleans())
    dims = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    pad = draw(st.integers(0, 1))
    bias = draw(st.booleans())
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    before = draw(st.booleans()) and not transpose
    seed = draw(st.integers(0, 2**16))
    return dict(
        transpose=transpose,
        dims=dims,
        groups=groups,
        cin=cin,
        cout=cout,
        k=k,
        stride=stride,
        dilation=dilation,
        pad=pad,
        bias=bias,
        dtype=dtype,
        before=before,
        seed=seed,
    )


def build_conv(c):
    rng = np.random.default_rng(c["seed"])
    dt = c["dtype"]
    size = [7, 6, 5][: c["dims"]]
    kshape = [c["k"]] * c["dims"]
    wshape = (
        [c["cin"], c["cout"] // c["groups"], *kshape]
        if c["transpose"]
        else [c["cout"], c["cin"] // c["groups"], *kshape]
    )
    inits = [tensor("W", rng.standard_normal(wshape).astype(dt))]
    ins = ["b" if c["before"] else "x", "W"]
    if c["bias"]:
        inits.append(tensor("B", rng.standard_normal(c["cout"]).astype(dt)))
        ins.append("B")
    attrs = dict(
        group=c["groups"],
        strides=[c["stride"]] * c["dims"],
        dilations=[c["dilation"]] * c["dims"],
        pads=[c["pad"]] * 2 * c["dims"],
    )
    op = "ConvTranspose" if c["transpose"] else "Conv"
    if c["before"]:
        inits += bn_params(rng, c["cin"], dtype=dt)
        nodes = [bn_node("x", "b"), helper.make_node(op, ins, ["y"], name="conv", **attrs)]
    else:
        inits += bn_params(rng, c["cout"], dtype=dt)
        nodes = [helper.make_node(op, ins, ["c"], name="conv", **attrs), bn_node("c", "y")]
    model = make_model(
        nodes, [("x", ELEM[dt], [2, c["cin"], *size])], [("y", ELEM[dt], None)], inits
    )
    return model, {"x": rng.standard_normal([2, c["cin"], *size]).astype(dt)}


def assert_parity_and_idempotence(model, feeds, dtype, expect_fold):
    folded, report = normfuse.fold(model, check=False)
    onnx.checker.check_model(folded, full_check=True)
    assert len(report.applied) == int(expect_fold), report.to_dict()["entries"]
    ref, got = run(model, feeds)[0].astype(np.float64), run(folded, feeds)[0].astype(np.float64)
    scale = np.abs(ref).max()
    tol = 1e-5 if dtype == np.float32 else 5e-3
    assert np.abs(ref - got).max() <= tol * scale
    again, second = normfuse.fold(folded, check=False)
    assert again.SerializeToString() == folded.SerializeToString()
    assert second.applied == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_case())
def test_conv_configurations(c):
    model, feeds = build_conv(c)
    exact = not c["before"] or c["pad"] == 0
    assert_parity_and_idempotence(model, feeds, c["dtype"], expect_fold=exact)


@settings(max_examples=30, deadline=None)
@given(
    trans_b=st.booleans(),
    alpha=st.floats(0.25, 2.0),
    beta=st.floats(0.25, 2.0),
    bias=st.sampled_from(["none", "1d", "2d"]),
    before=st.booleans(),
    k=st.integers(1, 6),
    n=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_gemm_configurations(trans_b, alpha, beta, bias, before, k, n, seed):
    rng = np.random.default_rng(seed)
    m = 3
    inits = [tensor("W", rng.standard_normal([n, k] if trans_b else [k, n]).astype(np.float32))]
    ins = ["b" if before else "x", "W"]
    if bias != "none":
        inits.append(
            tensor("C", rng.standard_normal([n] if bias == "1d" else [m, n]).astype(np.float32))
        )
        ins.append("C")
    gemm = helper.make_node(
        "Gemm",
        ins,
        ["y" if before else "g"],
        name="gemm",
        transB=int(trans_b),
        alpha=alpha,
        beta=beta,
    )
    if before:
        inits += bn_params(rng, k)
        nodes = [bn_node("x", "b"), gemm]
    else:
        inits += bn_params(rng, n)
        nodes = [gemm, bn_node("g", "y")]
    model = make_model(nodes, [("x", TP.FLOAT, [m, k])], [("y", TP.FLOAT, [m, n])], inits)
    assert_parity_and_idempotence(
        model, {"x": rng.standard_normal([m, k]).astype(np.float32)}, np.float32, True
    )
