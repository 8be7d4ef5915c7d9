"""The fast paths taken for big graphs (issue 16, item 10) give what the general code gives.

Each shortcut (tensor bytes and arrays read from the TensorProto's fields, statistics counted
per op kind, one walk of the graphs per load and save, candidate op types looked at first) is
compared with the general computation on random non-trivial data, and the generated big-graph
kinds fold to a model that computes what the original computes.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import normfuse
from benchmarks.big_graph import build
from normfuse.core.errors import InputError
from normfuse.onnxgraph import io as onnx_io
from normfuse.onnxgraph import wire
from normfuse.onnxgraph.const import read_tensor
from normfuse.onnxgraph.graph import containers, model_stats, proto_nbytes, value_names
from tests.conftest import make_model, run

_DTYPES = [
    np.float32,
    np.float16,
    np.float64,
    np.int8,
    np.uint8,
    np.int16,
    np.int32,
    np.int64,
    np.uint64,
    np.bool_,
    np.complex64,
    ml_dtypes.bfloat16,
]


def _random(rng: np.random.Generator, dtype, shape) -> np.ndarray:
    values = rng.normal(0, 3, shape) * 7
    if np.dtype(dtype) == np.bool_:
        return values > 0
    return values.astype(dtype)


def _proto(array: np.ndarray, name: str) -> onnx.TensorProto:
    if array.dtype == ml_dtypes.bfloat16:
        return helper.make_tensor(name, TP.BFLOAT16, array.shape, array.tobytes(), raw=True)
    return numpy_helper.from_array(array, name)


@pytest.mark.parametrize("dtype", _DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 5, 1, 3)])
def test_tensor_reads_from_the_proto_match_onnx_ir(rng, dtype, shape):
    array = _random(rng, dtype, shape)
    tensor = ir.serde.TensorProtoTensor(_proto(array, "t"))
    got, want = read_tensor(tensor), tensor.numpy()
    assert got.dtype == want.dtype and got.shape == want.shape == array.shape
    assert got.tobytes() == want.tobytes() == array.tobytes()
    assert got.flags.writeable == want.flags.writeable
    assert proto_nbytes(tensor) == tensor.nbytes == array.nbytes


def test_tensor_reads_of_typed_fields_and_small_types_match_onnx_ir(rng):
    typed = helper.make_tensor("f", TP.FLOAT, [2, 3], rng.normal(0, 1, 6).tolist())
    int4 = helper.make_tensor("i4", TP.INT4, [5], [1, -2, 3, -4, 5])
    for proto in (typed, int4):
        tensor = ir.serde.TensorProtoTensor(proto)
        assert np.array_equal(read_tensor(tensor), tensor.numpy())
        assert proto_nbytes(tensor) == tensor.nbytes
    strings = ir.serde.TensorProtoTensor(helper.make_tensor("s", TP.STRING, [2], [b"ab", b"c"]))
    assert proto_nbytes(strings) is None


def _reference_stats(model: ir.Model) -> tuple[int, int, int, int, dict[str, int]]:
    """The statistics counted node by node with onnx_ir's own byte counts."""
    found = [c for c, _ in containers(model)]
    graphs = [c for c in found if isinstance(c, ir.Graph)]
    values = {id(v): v for g in graphs for v in g.initializers.values()}  # each value once
    params = sum(v.const_value.nbytes for v in values.values() if v.const_value is not None)
    nodes = norm = bn = 0
    ops: dict[str, int] = {}
    for container in found:
        for node in container:
            nodes += 1
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
            if node.domain == "":
                bn += node.op_type == "BatchNormalization"
                norm += node.op_type in ("BatchNormalization", "LayerNormalization")
                if node.op_type == "Constant":
                    params += node.attributes["value"].value.nbytes
    return nodes, norm, bn, params, ops


def _mixed_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Initializers of several types, Constant nodes, a custom-domain op, an If subgraph."""
    c = 4
    inits = [
        _proto(_random(rng, np.float32, (c, c, 1, 1)), "w"),
        _proto(_random(rng, np.float16, (c,)), "h"),
        _proto(_random(rng, ml_dtypes.bfloat16, (3, 2)), "bf"),
        _proto(_random(rng, np.int64, (2,)), "shape"),
        helper.make_tensor("i4", TP.INT4, [3], [1, 2, -3]),
        _proto(np.array(True), "cond"),
    ]
    inits += [_proto(rng.uniform(0.5, 2.0, c).astype(np.float32), n) for n in ("g", "b", "m", "v")]
    branch = helper.make_graph(
        [
            helper.make_node(
                "Constant", [], ["k"], value=_proto(_random(rng, np.float32, (c,)), "kv")
            ),
            helper.make_node("Identity", ["k"], ["out"]),
        ],
        "branch",
        [],
        [helper.make_tensor_value_info("out", TP.FLOAT, [c])],
    )
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
        helper.make_node("BatchNormalization", ["y", "g", "b", "m", "v"], ["z"], name="bn"),
        helper.make_node("Constant", [], ["k0"], value=_proto(_random(rng, np.float64, (5,)), "c")),
        helper.make_node("Relu", ["z"], ["r"], name="relu"),
        helper.make_node("Custom", ["r"], ["q"], name="custom", domain="my.domain"),
        helper.make_node(
            "If", ["cond"], ["sel"], name="if", then_branch=branch, else_branch=branch
        ),
        helper.make_node("LayerNormalization", ["r", "h"], ["ln"], name="ln", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mixed",
        [helper.make_tensor_value_info("x", TP.FLOAT, [1, c, 3, 3])],
        [helper.make_tensor_value_info(n, TP.FLOAT, None) for n in ("q", "sel", "ln")],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def test_model_stats_match_a_node_by_node_count(rng):
    model = ir.from_proto(_mixed_model(rng))
    stats = model_stats(model)
    nodes, norm, bn, params, ops = _reference_stats(model)
    assert (stats.nodes, stats.norm_nodes, stats.batchnorm_nodes) == (nodes, norm, bn)
    assert stats.param_bytes == params
    assert stats.ops == ops and list(stats.ops) == list(ops)  # same counts, same order


def test_value_names_are_every_named_value(rng):
    model = ir.from_proto(_mixed_model(rng))
    found = [c for c, _ in containers(model)]
    want = set()
    for c in found:
        values = [*c.inputs, *(c.initializers.values() if isinstance(c, ir.Graph) else [])]
        values += [o for n in c for o in n.outputs]
        want |= {v.name for v in values if v.name}
    assert value_names(found) == want and len(found) == 3  # the main graph and two branches


def test_a_tensor_whose_raw_bytes_are_short_is_still_refused(rng, tmp_path):
    w = _proto(_random(rng, np.float32, (4, 4, 1, 1)), "w")
    w.raw_data = w.raw_data[:-4]  # below the lazy-read size: read as a TensorProto
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, [1, 4, 2, 2])],
        [helper.make_tensor_value_info("y", TP.FLOAT, None)],
        [w],
    )
    path = tmp_path / "short.onnx"
    onnx.save(helper.make_model(graph), path)
    with pytest.raises(InputError, match="raw_data holds 60 bytes, its dims need 64"):
        onnx_io.load(path, lazy=True)


def test_saved_tensors_keep_dims_type_and_bytes(rng, tmp_path):
    model = _mixed_model(rng)
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    loaded = onnx_io.load(src, lazy=True)
    onnx_io.save(loaded.model, out)
    want = {t.name: t for t in model.graph.initializer}
    got = {t.name: t for t in onnx.load(out).graph.initializer}
    assert want.keys() == got.keys()
    for name, t in want.items():
        assert list(got[name].dims) == list(t.dims) and got[name].data_type == t.data_type
        assert np.array_equal(numpy_helper.to_array(got[name]), numpy_helper.to_array(t))


def test_a_tensor_header_is_its_proto_without_data(rng):
    for dtype, shape in ((np.float32, (3, 0, 2)), (np.int64, ()), (np.float16, (7,))):
        proto = _proto(_random(rng, dtype, shape), "t")
        tensor = ir.serde.TensorProtoTensor(proto)
        header = onnx.TensorProto()
        header.ParseFromString(wire._header("t", tensor))
        expected = onnx.TensorProto()
        expected.CopyFrom(proto)
        expected.ClearField("raw_data")
        assert header == expected


@pytest.mark.parametrize(
    ("kind", "nodes", "applied"),
    [("sparse", 2400, 3), ("affine", 400, 0), ("dense", 80, 20)],
    ids=lambda v: str(v),
)
def test_generated_big_graph_kinds_fold_to_the_same_function(tmp_path, kind, nodes, applied):
    path = tmp_path / f"{kind}.onnx"
    build(kind, nodes, Path(path))
    folded, report = normfuse.fold(str(path), check=False)
    assert len(report.applied) == applied
    assert len(report.skipped) == 0
    assert report.before.nodes - report.after.nodes == applied
    out = tmp_path / "folded.onnx"
    normfuse.save(folded, out)
    original, result = onnx.load(path), onnx.load(out)
    assert [n.name for n in result.graph.node] == [
        n.name for n in original.graph.node if n.op_type != "BatchNormalization"
    ]
    if kind != "sparse":  # its residual chain doubles the values a thousand times: no numbers
        original.ir_version = result.ir_version = 10  # what this onnxruntime reads
        x = np.random.default_rng(7).normal(0, 1, (2, 8, 4, 4)).astype(np.float32)
        (want,) = run(original, {"x": x})
        (got,) = run(result, {"x": x})
        assert np.isfinite(want).all()
        assert np.allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))
    _, again = normfuse.fold(str(out), check=False)  # idempotent
    assert len(again.applied) == 0 and again.before.nodes == again.after.nodes


def test_statistics_before_and_after_share_sizes_but_see_new_tensors(rng):
    model = ir.from_proto(_mixed_model(rng))
    sizes: dict = {}
    before = model_stats(model, sizes)
    assert before == model_stats(model)
    w = model.graph.initializers["w"]
    w.const_value = ir.Tensor(_random(rng, np.float64, (4, 4, 1, 1)), name="w")  # 4x the bytes
    after = model_stats(model, sizes)
    assert after == model_stats(model)
    assert after.param_bytes - before.param_bytes == 16 * 8 - 16 * 4


def _conv_bn(rng: np.random.Generator, var: np.ndarray, mean: np.ndarray, eps: float):
    c = var.size
    inits = [
        _proto(_random(rng, np.float32, (c, c, 1, 1)), "w"),
        _proto(rng.uniform(0.5, 2.0, c).astype(np.float32), "g"),
        _proto(rng.normal(0, 1, c).astype(np.float32), "b"),
        _proto(mean.astype(np.float32), "m"),
        _proto(var.astype(np.float32), "v"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
        helper.make_node(
            "BatchNormalization", ["y", "g", "b", "m", "v"], ["z"], name="bn", epsilon=eps
        ),
    ]
    return make_model(
        nodes, [("x", TP.FLOAT, [1, c, 2, 2])], [("z", TP.FLOAT, [1, c, 2, 2])], inits
    )


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        (
            "negative",
            "its running variance has negative values (min -0.25); the statistics are corrupt",
        ),
        ("zero", "variance + epsilon is 0 for some channel; the output is not finite"),
        ("nan", "its mean contains NaN or Inf; folding would spread it"),
        ("fine", None),
    ],
)
def test_batchnorm_statistics_are_judged_as_before(rng, case, reason):
    var = rng.uniform(0.5, 3.0, 6)
    mean = rng.normal(0, 2, 6)
    eps = 1e-5
    if case == "negative":
        var[[1, 4]] = [-0.25, -0.125]
    elif case == "zero":
        var[2], eps = 0.0, 0.0
    elif case == "nan":
        mean[3] = np.nan
    _, report = normfuse.fold(_conv_bn(rng, var, mean, eps), check=False)
    if reason is None:
        assert len(report.applied) == 1 and not report.skipped
    else:
        (entry,) = report.skipped
        assert entry.reason == reason


def test_lazy_load_views_only_the_large_tensors(rng, tmp_path):
    sizes = [(4,), (255,), (256,), (257,), (64, 64), (3, 5)]  # float32: 256 elements = 1 KiB
    arrays = {f"t{i}": _random(rng, np.float32, s) for i, s in enumerate(sizes)}
    nodes = [helper.make_node("Identity", [n], [f"o{n}"]) for n in arrays]
    graph = helper.make_graph(
        nodes,
        "g",
        [],
        [helper.make_tensor_value_info(f"o{n}", TP.FLOAT, None) for n in arrays],
        [_proto(a, n) for n, a in arrays.items()],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), path)
    model = onnx_io.load(path, lazy=True).model
    for name, array in arrays.items():
        tensor = model.graph.initializers[name].const_value
        assert isinstance(tensor, ir.ExternalTensor) == (array.nbytes >= wire.LAZY_MIN_BYTES)
        assert np.array_equal(read_tensor(tensor), array)
