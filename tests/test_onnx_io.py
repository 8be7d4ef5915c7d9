"""Loading and saving: every input form, external data, metadata kept, atomic writes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as TP
from onnx import helper

import normfuse
from normfuse.onnxgraph import io as onnx_io
from normfuse.onnxgraph import wire
from tests.conftest import bn_node, bn_params, make_model, normal, op_types, run, tensor

F = TP.FLOAT


@pytest.fixture
def model(rng) -> onnx.ModelProto:
    inits = [tensor("W", normal(rng, [16, 8, 3, 3])), *bn_params(rng, 16)]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("c", "y"),
    ]
    m = make_model(nodes, [("x", F, [1, 8, 6, 6])], [("y", F, [1, 16, 6, 6])], inits, ir_version=9)
    m.doc_string = "a test model"
    m.producer_version = "7.7"
    m.model_version = 3
    helper.set_model_props(m, {"author": "tests", "license": "none"})
    m.graph.doc_string = "graph doc"
    return m


def test_every_input_form_round_trips(model, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    ir_model = ir.from_proto(model)
    for source, kind in (
        (path, ir.Model),
        (str(path), ir.Model),
        (model.SerializeToString(), bytes),
        (model, onnx.ModelProto),
        (ir_model, ir.Model),
    ):
        folded, report = normfuse.fold(source, check=False)
        assert isinstance(folded, kind), type(folded)
        assert len(report.applied) == 1
    # the caller's onnx_ir.Model is not modified
    assert [n.op_type for n in ir_model.graph] == ["Conv", "BatchNormalization"]


def test_metadata_ir_version_and_opsets_are_kept(model, tmp_path):
    folded, _ = normfuse.fold(model, check=False)
    out = tmp_path / "f.onnx"
    normfuse.save(folded, out)
    saved = onnx.load(out)
    assert saved.ir_version == 9
    assert [(o.domain, o.version) for o in saved.opset_import] == [
        (o.domain, o.version) for o in model.opset_import
    ]
    assert saved.producer_name == model.producer_name and saved.producer_version == "7.7"
    assert saved.doc_string == "a test model" and saved.model_version == 3
    assert {p.key: p.value for p in saved.metadata_props} == {"author": "tests", "license": "none"}
    assert saved.graph.doc_string == "graph doc"


def test_external_data_is_read_lazily_and_written_back(model, tmp_path, rng):
    src = tmp_path / "in"
    src.mkdir()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save with external data rewrites the proto it is given
    onnx.save(
        copy,
        src / "m.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    loaded = normfuse.load(src / "m.onnx")
    w = loaded.graph.initializers["W"].const_value
    assert isinstance(w, ir.ExternalTensor)
    folded, _ = normfuse.fold(src / "m.onnx", check=False)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    normfuse.save(folded, out_dir / "f.onnx")
    assert (out_dir / "f.onnx.data").exists()
    saved = onnx.load(out_dir / "f.onnx", load_external_data=False)
    big = [t for t in saved.graph.initializer if t.name == "W"]
    assert big and big[0].data_location == TP.EXTERNAL
    assert {e.value for t in big for e in t.external_data if e.key == "location"} == {"f.onnx.data"}
    feeds = {"x": normal(rng, [1, 8, 6, 6])}
    ref = run(model, feeds)[0]
    got = run(onnx.load(out_dir / "f.onnx"), feeds)[0]
    assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max()
    # the input's data file is untouched
    assert sorted(p.name for p in src.iterdir()) == ["m.onnx", "weights.bin"]


def test_save_refuses_to_overwrite_without_force(model, tmp_path):
    out = tmp_path / "f.onnx"
    out.write_bytes(b"precious")
    with pytest.raises(normfuse.OutputExistsError, match="force=True"):
        normfuse.save(model, out)
    assert out.read_bytes() == b"precious"
    normfuse.save(model, out, force=True)
    assert onnx.load(out).graph.node


def test_save_into_missing_folder_is_an_input_error(model, tmp_path):
    with pytest.raises(normfuse.InputError, match="does not exist"):
        normfuse.save(model, tmp_path / "nope" / "f.onnx")


def test_failed_verification_leaves_nothing(model, tmp_path):
    out = tmp_path / "f.onnx"

    def verify(path):
        assert path.exists() and path != out
        raise normfuse.ParityError("boom")

    with pytest.raises(normfuse.ParityError):
        onnx_io.save(ir.from_proto(model), out, verify=verify)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"\x00\x01garbage\xff" * 10, b"not a model at all"])
def test_bad_files_are_input_errors(tmp_path, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    with pytest.raises(normfuse.InputError):
        normfuse.load(bad)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(normfuse.InputError, match="no such file"):
        normfuse.load(tmp_path / "missing.onnx")
    with pytest.raises(normfuse.InputError, match="directory"):
        normfuse.load(tmp_path)


def test_unknown_type():
    with pytest.raises(normfuse.InputError, match="cannot read a model from int"):
        normfuse.load(42)


def test_onnx_program_round_trip(tmp_path):
    torch = pytest.importorskip("torch")

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))

    m = M()
    m.bn.running_var.uniform_(0.2, 3)
    m.bn.running_mean.normal_()
    m.eval()
    program = torch.onnx.export(
        m, (torch.randn(1, 3, 8, 8),), dynamo=True, optimize=False, verbose=False
    )
    before = op_types(program.model_proto)
    folded, report = normfuse.fold(program)
    assert type(folded).__name__ == "ONNXProgram"
    assert "BatchNormalization" not in op_types(folded.model_proto)
    assert op_types(program.model_proto) == before  # the caller's program is untouched
    assert report.parity is not None and report.parity.passed
    x = torch.randn(1, 3, 8, 8)
    np.testing.assert_allclose(folded(x)[0].numpy(), m(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_streaming_writer_equals_onnx_ir_serialization(tmp_path, rng):
    """Every kind of initializer: from the file, new numpy (fp32/bf16/int/bool), string, renamed."""
    import ml_dtypes

    then_g = helper.make_graph(
        [helper.make_node("Identity", ["sub_w"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", F, [2])],
        [tensor("sub_w", normal(rng, [2]))],
    )
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=then_g)]
    model = make_model(
        nodes, [("cond", TP.BOOL, [])], [("y", F, [2])], [tensor("kept", normal(rng, [3, 4]))]
    )
    model.graph.initializer.append(helper.make_tensor("names", TP.STRING, [2], [b"a", b"b"]))
    m = ir.from_proto(model)
    for name, array in (
        ("f32", normal(rng, [5, 7])),
        ("bf16", normal(rng, [4]).astype(ml_dtypes.bfloat16)),
        ("i64", np.arange(6, dtype=np.int64).reshape(2, 3)),
        ("flags", np.array([True, False])),
        ("scalar", np.array(1.5, np.float32)),
        ("größe", normal(rng, [3])),
    ):
        m.graph.register_initializer(ir.Value(name=name, const_value=ir.Tensor(array, name=name)))
    m.graph.initializers["kept"].name = "kept_renamed"
    m.graph.initializers["f32"].const_value.doc_string = "new weights"
    m.graph.initializers["i64"].const_value.metadata_props["origin"] = "tests, ünïcode"
    out = tmp_path / "s.onnx"
    wire.write_streaming(m, out)
    assert onnx.load(out) == ir.to_proto(m)
    onnx.checker.check_model(out, full_check=True)
    # the same tensors through a data file (every tensor of 4 bytes or more goes there)
    wire.write_streaming(m, tmp_path / "e.onnx", external_data="e.data", size_threshold=4)
    refs = onnx.load(tmp_path / "e.onnx", load_external_data=False).graph.initializer
    assert {"f32", "i64", "größe", "scalar"} <= {t.name for t in refs if t.external_data}
    written = onnx.load(tmp_path / "e.onnx")
    for t in written.graph.initializer:
        t.ClearField("data_location")  # onnx.load leaves DEFAULT set explicitly
    assert written == ir.to_proto(m)
    # the model is left as it was
    assert all(v.const_value is not None for v in m.graph.initializers.values())


def _external_model(
    model: onnx.ModelProto, folder, location: str, length: int | None = None
) -> None:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    w = next(i for i in copy.graph.initializer if i.name == "W")
    w.ClearField("raw_data")
    w.data_location = TP.EXTERNAL
    for key, value in (
        ("location", location),
        ("offset", "0"),
        ("length", str(length or 16 * 8 * 9 * 4)),
    ):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(copy, folder / "m.onnx")


@pytest.mark.parametrize(
    "location,expected",
    [
        ("../../etc/passwd", "points outside the model's folder"),
        ("/etc/passwd", "points outside the model's folder"),
        ("missing.bin", "is missing"),
        ("short.bin", "shorter than tensor 'W' needs"),
    ],
)
def test_external_data_is_confined_and_checked(model, tmp_path, location, expected):
    (tmp_path / "short.bin").write_bytes(b"\0" * 100)
    _external_model(model, tmp_path, location)
    with pytest.raises(normfuse.InputError, match=expected):
        normfuse.load(tmp_path / "m.onnx")


def test_external_data_symlink_leading_out_is_refused(model, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(b"\0" * 16 * 8 * 9 * 4)
    inner = tmp_path / "model"
    inner.mkdir()
    (inner / "w.bin").symlink_to(outside / "secret.bin")
    _external_model(model, inner, "w.bin")
    with pytest.raises(normfuse.InputError, match="points outside"):
        normfuse.load(inner / "m.onnx")


def test_lazy_load_reads_no_tensor_bytes_and_round_trips(model, tmp_path, rng):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    loaded = onnx_io.load(path, lazy=True).model
    w = loaded.graph.initializers["W"].const_value
    assert isinstance(w, ir.ExternalTensor) and w.meta.get(wire.SELF_BACKED_KEY)
    assert not onnx_io.has_external_data(loaded)  # it is still an ordinary single-file model
    np.testing.assert_array_equal(w.numpy(), onnx.numpy_helper.to_array(model.graph.initializer[0]))
    wire.write_streaming(loaded, tmp_path / "lazy.onnx")
    wire.write_streaming(onnx_io.load(path).model, tmp_path / "eager.onnx")
    assert (tmp_path / "lazy.onnx").read_bytes() == (tmp_path / "eager.onnx").read_bytes()


def test_cli_in_place_fold_with_lazy_tensors(model, tmp_path, rng):
    from click.testing import CliRunner

    from normfuse.cli import cli

    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = CliRunner().invoke(cli, ["fold", str(path), "--in-place"])
    assert result.exit_code == 0, result.output
    folded = onnx.load(path)
    assert op_types(folded) == ["Conv"]
    feeds = {"x": normal(rng, [1, 8, 6, 6])}
    ref, got = run(model, feeds)[0], run(folded, feeds)[0]
    assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max()
    # folding the result again changes nothing, through files too
    result = CliRunner().invoke(cli, ["fold", str(path), "-o", str(tmp_path / "again.onnx")])
    assert result.exit_code == 0
    assert onnx.load(tmp_path / "again.onnx") == folded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.onnx", "m.onnx"]


def test_lazy_load_of_junk_falls_back_to_a_clear_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x0a\xff\xff\xff\xff\x0f" + b"x" * 40)
    with pytest.raises(normfuse.InputError):
        onnx_io.load(bad, lazy=True)


def test_lazy_load_leaves_external_data_models_to_the_external_path(model, tmp_path):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(
        copy, tmp_path / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0
    )
    loaded = onnx_io.load(tmp_path / "m.onnx", lazy=True).model
    assert onnx_io.has_external_data(loaded)


@pytest.fixture
def big_model(rng) -> onnx.ModelProto:
    """Weights above the 1 MiB threshold, so their fold is deferred to the write."""
    inits = [
        tensor("W", normal(rng, [256, 128, 3, 3]) * 0.05),
        *bn_params(rng, 256),
        tensor("W2", normal(rng, [256, 256, 3, 3]) * 0.05),
        *bn_params(rng, 256, "bn2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("c", "b"),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("Conv", ["r", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        bn_node("c2", "y", "bn2"),
    ]
    return make_model(nodes, [("x", F, [1, 128, 6, 6])], [("y", F, [1, 256, 6, 6])], inits)


@pytest.mark.parametrize("threads", ["1", "4"])
def test_deferred_fold_through_the_cli_is_exact(big_model, tmp_path, rng, monkeypatch, threads):
    """With one thread, and with several (scaling split by rows, the next weight computed while
    one is written): the same bytes as the eager fold."""
    from click.testing import CliRunner

    from normfuse.cli import cli
    from normfuse.core import algebra

    monkeypatch.setenv("NORMFUSE_THREADS", threads)
    monkeypatch.setattr(algebra, "_POOL", None)

    src = tmp_path / "big.onnx"
    onnx.save(big_model, src)
    loaded = onnx_io.load(src, lazy=True).model
    from normfuse.core.report import Report
    from normfuse.onnxgraph.fold import FoldOptions, run_fold

    run_fold(loaded, Report(), FoldOptions())
    assert isinstance(loaded.graph.initializers["W"].const_value, ir.LazyTensor)  # deferred
    result = CliRunner().invoke(cli, ["fold", str(src), "-o", str(tmp_path / "f.onnx")])
    assert result.exit_code == 0, result.output
    folded = onnx.load(tmp_path / "f.onnx")
    onnx.checker.check_model(folded, full_check=True)
    # bit-identical to the eager fold of the same model
    eager, _ = normfuse.fold(big_model, check=False)
    assert folded == eager
    feeds = {"x": normal(rng, [1, 128, 6, 6])}
    ref, got = run(big_model, feeds)[0], run(folded, feeds)[0]
    assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max()


def test_deferred_fold_of_an_external_data_model(big_model, tmp_path, rng):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    copy = onnx.ModelProto()
    copy.CopyFrom(big_model)
    onnx.save(
        copy, src_dir / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=1024
    )
    folded, report = normfuse.fold(src_dir / "m.onnx")
    assert report.parity is not None and report.parity.passed and len(report.applied) == 2
    normfuse.save(folded, tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").exists()
    eager, _ = normfuse.fold(big_model, check=False)
    written = onnx.load(tmp_path / "out.onnx")
    for init in written.graph.initializer:  # onnx.load leaves data_location=DEFAULT set explicitly
        init.ClearField("data_location")
    assert written == eager


def test_outputs_get_ordinary_permissions(model, tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        out = tmp_path / "f.onnx"
        normfuse.save(model, out, external_data=True)
        for path in (out, tmp_path / "f.onnx.data"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    finally:
        os.umask(mask)


def test_deferred_fold_before_a_big_file_backed_conv(rng, tmp_path):
    from click.testing import CliRunner

    from normfuse.cli import cli

    inits = [*bn_params(rng, 512), tensor("W", normal(rng, [512, 512, 1, 1]) * 0.05)]  # 1 MiB
    nodes = [bn_node("x", "b"), helper.make_node("Conv", ["b", "W"], ["y"], name="pw")]
    model = make_model(nodes, [("x", F, [1, 512, 3, 3])], [("y", F, [1, 512, 3, 3])], inits)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    result = CliRunner().invoke(cli, ["fold", str(src), "-o", str(tmp_path / "f.onnx")])
    assert result.exit_code == 0, result.output
    folded = onnx.load(tmp_path / "f.onnx")
    assert op_types(folded) == ["Conv"]
    eager, _ = normfuse.fold(model, check=False)
    assert folded == eager


def test_a_deferred_weight_that_overflows_leaves_nothing(rng, tmp_path):
    """float32 weights are scaled only while the output is written; an overflow found there
    (the second of three deferred weights, computed in the writer's thread) stops the write and
    leaves no file behind."""
    inits, nodes, prev = [], [], "x"
    for i in range(3):
        w = normal(rng, [256, 256, 3, 3]) * 0.05  # 2.4 MB: deferred
        if i == 1:
            w[5] = 1e37  # |W| * scale is above float32's 3.4e38
            w[7, 0, 0, 0] = np.nan  # a NaN stored elsewhere does not hide the overflow
        gamma, beta, mean, var = bn_params(rng, 256, f"bn{i}")
        if i == 1:
            gamma = tensor("bn1_scale", np.full(256, 1e3, np.float32))
        inits += [tensor(f"W{i}", w), gamma, beta, mean, var]
        nodes += [
            helper.make_node(
                "Conv", [prev, f"W{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]
            ),
            bn_node(f"c{i}", f"y{i}" if i < 2 else "y", f"bn{i}"),
        ]
        prev = f"y{i}"
    model = make_model(nodes, [("x", F, [1, 256, 3, 3])], [("y", F, [1, 256, 3, 3])], inits)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    loaded = onnx_io.load(src, lazy=True).model
    from normfuse.core.report import Report
    from normfuse.onnxgraph.fold import FoldOptions, run_fold

    run_fold(loaded, Report(), FoldOptions())
    assert all(
        isinstance(loaded.graph.initializers[f"W{i}"].const_value, ir.LazyTensor) for i in range(3)
    )
    with pytest.raises(normfuse.InputError, match="overflows"):
        onnx_io.save(loaded, tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_lazy_load_finds_an_external_tensor_in_an_attribute(rng, tmp_path):
    """A model read from its own file (large embedded weights) that also has a Constant whose
    tensor lies in a data file beside it: the constant is read from the source folder, and the
    folded model written elsewhere computes the same."""
    from normfuse.core.report import Report
    from normfuse.onnxgraph.fold import FoldOptions, run_fold

    src_dir = tmp_path / "src"
    src_dir.mkdir()
    c = normal(rng, [1, 64, 1, 1])
    c.tofile(src_dir / "c.bin")
    ct = TP(name="c", data_type=TP.FLOAT, dims=c.shape, data_location=TP.EXTERNAL)
    for k, v in (("location", "c.bin"), ("offset", "0"), ("length", str(c.nbytes))):
        ct.external_data.add(key=k, value=v)
    inits = [tensor("W", normal(rng, [64, 32, 3, 3]) * 0.1), *bn_params(rng, 64)]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["cv"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("cv", "b"),
        helper.make_node("Constant", [], ["k"], value=ct),
        helper.make_node("Add", ["b", "k"], ["y"]),
    ]
    model = make_model(nodes, [("x", F, [1, 32, 5, 5])], [("y", F, [1, 64, 5, 5])], inits)
    onnx.save(model, src_dir / "m.onnx")
    loaded = onnx_io.load(src_dir / "m.onnx", lazy=True)
    assert loaded.model.meta.get(wire.SELF_BACKED_KEY)  # the weights stay in the file
    run_fold(loaded.model, Report(), FoldOptions())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    onnx_io.save(loaded.model, out_dir / "f.onnx")
    assert op_types(onnx.load(out_dir / "f.onnx")) == ["Conv"]  # the constant was read, and folded
    feeds = {"x": normal(rng, [1, 32, 5, 5])}
    ref = run(onnx.load(src_dir / "m.onnx"), feeds)[0]
    got = run(onnx.load(out_dir / "f.onnx"), feeds)[0]
    assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max()


def test_a_deferred_weight_that_was_already_infinite_is_no_overflow(big_model, tmp_path, rng):
    """A stored weight with an infinity stays infinite when scaled, in its own element: the
    write is not refused as an overflow (the scaled copy overwrote the read, so the check reads
    the stored weight again), and the model computes what the original does."""
    from normfuse.core.report import Report
    from normfuse.onnxgraph.fold import FoldOptions, run_fold

    model = onnx.ModelProto()
    model.CopyFrom(big_model)
    w = next(t for t in model.graph.initializer if t.name == "W2")  # the last conv
    values = onnx.numpy_helper.to_array(w).copy()
    values[3, 2, 1, 1] = np.inf  # output channel 3 is not finite, the others are
    w.CopyFrom(onnx.numpy_helper.from_array(values, "W2"))
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    loaded = onnx_io.load(src, lazy=True).model
    run_fold(loaded, Report(), FoldOptions())
    assert isinstance(loaded.graph.initializers["W2"].const_value, ir.LazyTensor)  # deferred
    onnx_io.save(loaded, tmp_path / "f.onnx")
    folded = onnx.load(tmp_path / "f.onnx")
    assert "BatchNormalization" not in op_types(folded)
    feeds = {"x": normal(rng, [1, 128, 6, 6])}
    ref, got = run(model, feeds)[0], run(folded, feeds)[0]
    finite = np.isfinite(ref)
    assert not finite[:, 3].any() and finite[:, 4:].all()
    assert np.array_equal(finite, np.isfinite(got))
    assert np.abs(ref - got)[finite].max() <= 1e-5 * np.abs(ref[finite]).max()
    eager, report = normfuse.fold(model, check=False)  # the eager fold agrees, bit for bit
    assert not report.skipped and folded == eager
