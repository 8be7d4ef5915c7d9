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


def _value_info_model(rng, with_info: set[str]) -> onnx.ModelProto:
    """Conv + BN + Mul by a per-channel constant, with value_info only for ``with_info``."""
    from tests.conftest import bn_node, bn_params, tensor

    inits = [
        tensor("W", rng.standard_normal((6, 4, 3, 3)).astype(np.float32)),
        tensor("K", rng.uniform(0.5, 2.0, (1, 6, 1, 1)).astype(np.float32)),
        *bn_params(rng, 6),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("c", "b"),
        helper.make_node("Tanh", ["b"], ["t"], name="tanh"),
        helper.make_node("Mul", ["t", "K"], ["y"], name="mul"),
    ]
    model = make_model(
        nodes, [("x", TP.FLOAT, [1, 4, 5, 5])], [("y", TP.FLOAT, [1, 6, 5, 5])], inits
    )
    for t in model.graph.initializer:
        if t.name in with_info:
            model.graph.value_info.append(
                helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            )
    return model


def _initializer_info(model: onnx.ModelProto) -> set[str]:
    inits = {t.name for t in model.graph.initializer}
    return {v.name for v in model.graph.value_info if v.name in inits}


@pytest.mark.parametrize("form", ["path", "proto", "bytes"])
def test_initializers_get_value_info_only_where_the_input_had_it(rng, tmp_path, form):
    """onnx_ir writes a value_info entry for every initializer; normfuse writes what the input
    had (on 100k small initializers the output was a quarter larger than the input)."""
    model = _value_info_model(rng, {"K"})
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    source = {"path": str(path), "proto": model, "bytes": model.SerializeToString()}[form]
    folded, report = normfuse.fold(source, check=False)
    assert len(report.applied) == 1
    out = tmp_path / "o.onnx"
    if form == "proto":
        result = folded
    else:
        normfuse.save(folded, out, force=True)
        result = onnx.load(out)
    assert _initializer_info(result) == {"K"}  # not W's replacement, not the BN's
    onnx.checker.check_model(result, full_check=True)
    x = {"x": rng.standard_normal((1, 4, 5, 5)).astype(np.float32)}
    ref, got = run(model, x)[0], run(result, x)[0]
    assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max()
    # a model that had none gets none; the command's path too
    bare = _value_info_model(rng, set())
    onnx.save(bare, path)
    from click.testing import CliRunner

    from normfuse.cli import cli

    done = CliRunner().invoke(cli, ["fold", str(path), "-o", str(out), "--force", "--no-check"])
    assert done.exit_code == 0, done.output
    assert _initializer_info(onnx.load(out)) == set()


def test_an_onnx_ir_model_keeps_onnx_irs_value_info(rng, tmp_path):
    """A model built in memory has no record of a file: onnx_ir's own writing is kept."""
    model = ir.from_proto(_value_info_model(rng, set()))
    folded, _ = normfuse.fold(model, check=False)
    out = tmp_path / "o.onnx"
    normfuse.save(folded, out)
    written = onnx.load(out)
    assert _initializer_info(written) == {t.name for t in written.graph.initializer}


def test_small_tensors_are_written_as_read_or_encoded_anew(tmp_path):
    """A small initializer is copied as it was read when it keeps its name and raw bytes; one
    renamed, or stored as float_data, is written from its values: the arrays come back."""
    a = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    b = np.linspace(-1, 1, 5).astype(np.float32)
    raw = numpy_helper.from_array(a, "a")
    typed = helper.make_tensor("b", TP.FLOAT, [5], b.tolist())  # float_data, not raw_data
    assert not typed.HasField("raw_data")
    nodes = [
        helper.make_node("Identity", ["a"], ["oa"]),
        helper.make_node("Identity", ["b"], ["ob"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [],
        [helper.make_tensor_value_info(n, TP.FLOAT, None) for n in ("oa", "ob")],
        [raw, typed],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    loaded = onnx_io.load(path, lazy=True).model
    out = tmp_path / "o.onnx"
    onnx_io.save(loaded, out)
    written = {t.name: t for t in onnx.load(out).graph.initializer}
    assert written["a"] == raw  # as read, field for field
    assert np.array_equal(numpy_helper.to_array(written["b"]), b)
    loaded.graph.initializers["a"].name = "renamed"
    onnx_io.save(loaded, out, force=True)
    written = {t.name: t for t in onnx.load(out).graph.initializer}
    assert set(written) == {"renamed", "b"}
    assert np.array_equal(numpy_helper.to_array(written["renamed"]), a)


def test_elementwise_nodes_no_fold_touches_are_passed_over_exactly(rng):
    """Without value_info: a Mul between two Tanh is passed over before shapes are inferred
    (none are needed for it); a Mul by ones is still removed (whether that keeps the shape
    needs the inferred one), and a Mul reaching a Conv through a Transpose pair still folds
    (``norm_affine``: into the Conv after it)."""
    from normfuse.onnxgraph.shapes import InferredShapes

    c = 6
    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 2.0, (1, c, 1, 1)).astype(np.float32), "k1"),
        numpy_helper.from_array(np.ones((1, c, 1, 1), np.float32), "ones"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, (1, 1, 1, c)).astype(np.float32), "k2"),
        numpy_helper.from_array(rng.standard_normal((5, c, 1, 1)).astype(np.float32), "W"),
    ]
    nodes = [
        helper.make_node("Tanh", ["x"], ["t0"]),
        helper.make_node("Mul", ["t0", "k1"], ["m1"], name="passed"),
        helper.make_node("Tanh", ["m1"], ["t1"]),
        helper.make_node("Mul", ["t1", "ones"], ["m2"], name="ones"),
        helper.make_node("Tanh", ["m2"], ["t2"]),
        helper.make_node("Transpose", ["t2"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Mul", ["nhwc", "k2"], ["m3"], name="reaching"),
        helper.make_node("Transpose", ["m3"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "W"], ["y"], name="conv"),
    ]
    model = make_model(
        nodes, [("x", TP.FLOAT, [2, c, 4, 3])], [("y", TP.FLOAT, [2, 5, 4, 3])], inits
    )
    assert not model.graph.value_info
    ir_model = ir.from_proto(model)
    shapes = InferredShapes(ir_model, 17, for_fold=True)
    assert sorted(n.name for n in shapes.inert.values()) == ["passed"]
    shapes.restore(ir_model)
    folded, report = normfuse.fold(model, check=False, norm_affine=True)  # Mul before a Conv
    names = [n.name for n in folded.graph.node]
    assert "passed" in names and "ones" not in names and "reaching" not in names
    assert {e.node for e in report.applied} == {"ones", "reaching"}
    x = {"x": rng.standard_normal((2, c, 4, 3)).astype(np.float32)}
    ref, got = run(model, x)[0], run(folded, x)[0]
    assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max()


def test_a_constant_known_only_from_an_inferred_shape_still_folds(rng):
    """The fold reads its constants once, before and after shapes are inferred. A scale that
    comes from the Shape of a value with no shape in the file (6, the Conv's channels) is not
    constant before inference and is after it: read first for a Mul no fold touches (after a
    Tanh), it is read again for the Mul after the Conv, which folds."""
    inits = [
        numpy_helper.from_array(rng.standard_normal((6, 4, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["c"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["n"], axis=0),
        helper.make_node("Cast", ["n"], ["k"], to=TP.FLOAT),
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("Mul", ["t", "k"], ["z"], name="apart"),
        helper.make_node("Mul", ["c", "k"], ["y"], name="scale"),
    ]
    model = make_model(
        nodes,
        [("x", TP.FLOAT, [1, 4, 5, 5])],
        [("y", TP.FLOAT, [1, 6, 5, 5]), ("z", TP.FLOAT, [1, 4, 5, 5])],
        inits,
    )
    folded, report = normfuse.fold(model, check=False)
    assert [e.node for e in report.applied] == ["scale"], report.to_dict()["entries"]
    assert [n.name for n in folded.graph.node if n.op_type == "Mul"] == ["apart"]
    x = {"x": rng.standard_normal((1, 4, 5, 5)).astype(np.float32)}
    for ref, got in zip(run(model, x), run(folded, x), strict=True):
        assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max()


def test_the_commands_gc_pause_hands_what_it_made_to_the_oldest_generation():
    """The first young collection after a pause walked every object the pause made (0.6 s
    after each load, fold and save of a 200k-node graph). In the command, whose process ends
    after one rewrite, they join the oldest generation; a library caller keeps the collector's
    own pace (promoted, the graphs of 12 folds in a loop waited for a full collection: 4.8 GB
    instead of 2.7 GB). Nested pauses stay paused, and an error gives the collector back."""
    import gc

    from normfuse.core import gcpause
    from normfuse.core.gcpause import gc_paused

    assert gc.isenabled() and not gcpause._PROMOTE  # the library's default
    with gc_paused():
        junk = [[i] for i in range(50_000)]
    assert not any(o is junk for o in gc.get_objects(generation=2))
    gcpause.promote_on_leaving(True)
    try:
        with gc_paused():
            with gc_paused():
                assert not gc.isenabled()
            assert not gc.isenabled()  # the outer block still holds it
            junk = [[i] for i in range(50_000)]
        assert gc.isenabled()
        assert len(gc.get_objects(generation=0)) < 5_000
        assert any(o is junk for o in gc.get_objects(generation=2))
        with pytest.raises(ValueError), gc_paused():
            raise ValueError("boom")
        assert gc.isenabled()
    finally:
        gcpause.promote_on_leaving(False)
