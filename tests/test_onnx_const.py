"""The weight-side constant evaluator, checked against onnx's reference implementation."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as TP
from onnx import helper
from onnx.reference import ReferenceEvaluator

from normfuse.onnxgraph.const import ConstantResolver, NotConstant
from tests.conftest import make_model, tensor

A = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7 + 0.5
I64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731

CASES = {
    "reshape": (13, [("Reshape", ["a", "shape"], {})], {"shape": I64(4, 0, -1)}),
    "unsqueeze13": (13, [("Unsqueeze", ["a", "axes"], {})], {"axes": I64(0, -1)}),
    "unsqueeze11": (11, [("Unsqueeze", ["a"], {"axes": [1]})], {}),
    "squeeze13": (
        13,
        [("Unsqueeze", ["a", "axes"], {}), ("Squeeze", ["t0", "axes"], {})],
        {"axes": I64(0)},
    ),
    "squeeze11": (
        11,
        [("Unsqueeze", ["a"], {"axes": [0]}), ("Squeeze", ["t0"], {"axes": [0]})],
        {},
    ),
    "transpose": (13, [("Transpose", ["a"], {"perm": [2, 0, 1]})], {}),
    "transpose_default": (13, [("Transpose", ["a"], {})], {}),
    "concat": (13, [("Concat", ["a", "a"], {"axis": 1})], {}),
    "constant_of_shape": (
        13,
        [("ConstantOfShape", ["shape"], {"value": helper.make_tensor("v", TP.FLOAT, [1], [2.5])})],
        {"shape": I64(2, 3)},
    ),
    "gather": (13, [("Gather", ["a", "idx"], {"axis": 2})], {"idx": I64(3, 0)}),
    "slice13": (
        13,
        [("Slice", ["a", "st", "en", "ax", "sp"], {})],
        {"st": I64(0, 3), "en": I64(2, 0), "ax": I64(0, 2), "sp": I64(1, -1)},
    ),
    "slice9": (9, [("Slice", ["a"], {"starts": [1], "ends": [3], "axes": [1]})], {}),
    "cast": (13, [("Cast", ["a"], {"to": TP.FLOAT16})], {}),
    "arith": (
        13,
        [
            ("Mul", ["a", "a"], {}),
            ("Sub", ["t0", "a"], {}),
            ("Div", ["t1", "a"], {}),
            ("Add", ["t2", "a"], {}),
        ],
        {},
    ),
    "unary": (
        13,
        [("Neg", ["a"], {}), ("Abs", ["t0"], {}), ("Sqrt", ["t1"], {}), ("Reciprocal", ["t2"], {})],
        {},
    ),
    "pow": (13, [("Pow", ["a", "two"], {})], {"two": np.array(2.0, np.float32)}),
    "int_div": (13, [("Div", ["i", "three"], {})], {"i": I64(7, -7, 9), "three": I64(3)}),
    "expand": (13, [("Expand", ["a", "shape"], {})], {"shape": I64(2, 2, 3, 4)}),
    "shape_slice": (15, [("Shape", ["a"], {"start": 1, "end": 3})], {}),
    "range": (
        13,
        [("Range", ["r0", "r1", "r2"], {})],
        {"r0": I64(0)[0], "r1": I64(4)[0], "r2": I64(1)[0]},
    ),
    "range_step": (
        13,
        [("Range", ["r0", "r1", "r2"], {})],
        {"r0": I64(5)[0], "r1": I64(-2)[0], "r2": I64(-3)[0]},
    ),
    "range_float": (
        13,
        [("Range", ["r0", "r1", "r2"], {})],
        {
            "r0": np.array(0.5, np.float32),
            "r1": np.array(2.3, np.float32),
            "r2": np.array(0.4, np.float32),
        },
    ),
    "range_empty": (
        13,
        [("Range", ["r0", "r1", "r2"], {})],
        {"r0": I64(3)[0], "r1": I64(1)[0], "r2": I64(1)[0]},
    ),
    "range_unsqueeze": (  # the dynamo exporter's GroupNorm affine: Unsqueeze(g, Range(1, 2, 1))
        13,
        [("Range", ["r0", "r1", "r0"], {}), ("Unsqueeze", ["a", "t0"], {})],
        {"r0": I64(1)[0], "r1": I64(2)[0]},
    ),
}


def _graph(opset, steps, extra):
    inits = [tensor("a", A)] + [tensor(k, v) for k, v in extra.items()]
    nodes = []
    for i, (op, inputs, attrs) in enumerate(steps):
        out = "out" if i == len(steps) - 1 else f"t{i}"
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
    graph = helper.make_graph(
        nodes, "g", [], [helper.make_tensor_value_info("out", TP.UNDEFINED, None)], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


@pytest.mark.parametrize("name", sorted(CASES))
def test_evaluator_matches_reference(name):
    opset, steps, extra = CASES[name]
    model = _graph(opset, steps, extra)
    expected = ReferenceEvaluator(model).run(None, {})[0]
    m = ir.from_proto(model)
    got = ConstantResolver(opset).resolve(m.graph.outputs[0])
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_reasons_for_non_constants():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Custom", ["w"], ["c"], domain="vendor"),
        helper.make_node("Shape", ["x"], ["s"]),
    ]
    model = make_model(
        nodes,
        [("x", TP.FLOAT, ["n", 3])],
        [("r", TP.FLOAT, None), ("c", TP.FLOAT, None), ("s", TP.INT64, None)],
        [tensor("w", A)],
        extra_opsets=[helper.make_opsetid("vendor", 1)],
    )
    m = ir.from_proto(model)
    resolver = ConstantResolver(17)
    outs = {v.name: v for v in m.graph.outputs}
    with pytest.raises(NotConstant, match="Relu 'relu' at run time"):
        resolver.resolve(outs["r"])
    with pytest.raises(NotConstant, match="vendor::Custom"):
        resolver.resolve(outs["c"])
    with pytest.raises(NotConstant, match="only known at run time"):
        resolver.resolve(outs["s"])
    with pytest.raises(NotConstant, match="graph input"):
        resolver.resolve(m.graph.inputs[0])
    # cached: the same reason again
    with pytest.raises(NotConstant, match="Relu"):
        resolver.resolve(outs["r"])
    assert resolver.try_resolve(outs["r"]) is None


def test_constant_node_attribute_forms():
    nodes = [
        helper.make_node("Constant", [], ["f"], value_float=1.5),
        helper.make_node("Constant", [], ["fs"], value_floats=[1.0, 2.0]),
        helper.make_node("Constant", [], ["i"], value_int=3),
        helper.make_node("Constant", [], ["is"], value_ints=[4, 5]),
    ]
    outs = [(n, TP.UNDEFINED, None) for n in ("f", "fs", "i", "is")]
    model = onnx.helper.make_model(
        helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(*o) for o in outs]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    m = ir.from_proto(model)
    r = ConstantResolver(17)
    got = [r.resolve(v) for v in m.graph.outputs]
    assert got[0] == np.float32(1.5) and got[1].tolist() == [1.0, 2.0]
    assert got[2] == 3 and got[3].tolist() == [4, 5]


@pytest.mark.parametrize(("delta", "limit"), [(0, 5), (1, 1 << 40)], ids=["delta-zero", "too-many"])
def test_a_range_that_cannot_be_a_constant_is_not_one(delta, limit):
    inits = [tensor("s", I64(0)[0]), tensor("l", I64(limit)[0]), tensor("d", I64(delta)[0])]
    model = _graph(13, [("Range", ["s", "l", "d"], {})], {})
    model.graph.initializer.extend(inits)
    with pytest.raises(NotConstant, match="Range"):
        ConstantResolver(13).resolve(ir.from_proto(model).graph.outputs[0])
