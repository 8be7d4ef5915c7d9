"""The API's paths as pipelines take them (issue 20) and big graphs (issue 16, item 10).

- ``load(path)`` and ``fold(path)`` read lazily, as the command does: large tensors stay in
  the file, and a file that changed before the model is saved is refused, never read.
- ``fold(onnx_ir.Model)`` works on a clone that shares the caller's tensors: the caller's
  arrays (writable numpy arrays included) keep their bytes.
- Shape inference from the loader's ModelProto gives the shapes the serialized graph gives.
- The constant resolver answers "not constant" structurally, without raising through every
  producer (what made chain finding quadratic-looking on 200k-node graphs).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as TP
from onnx import helper

import normfuse
from normfuse.core.errors import InputError
from normfuse.onnxgraph import handover, shapes
from normfuse.onnxgraph import io as onnx_io
from normfuse.onnxgraph.const import ConstantResolver
from tests.conftest import bn_node, bn_params, make_model, normal, run, tensor

F = TP.FLOAT


def _conv_bn(rng: np.random.Generator, cin: int = 8, cout: int = 32) -> onnx.ModelProto:
    """Conv (a weight above the 1 KiB lazy threshold) + BN with random statistics, then a
    per-channel Mul/Add after a Relu (a chain that stays)."""
    inits = [
        tensor("W", normal(rng, [cout, cin, 3, 3])),
        *bn_params(rng, cout),
        tensor("k", rng.uniform(0.5, 1.5, (1, cout, 1, 1)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("c", "b"),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("Mul", ["r", "k"], ["y"], name="mul"),
    ]
    return make_model(nodes, [("x", F, [2, cin, 6, 6])], [("y", F, [2, cout, 6, 6])], inits)


@pytest.fixture
def saved(rng, tmp_path):
    m = _conv_bn(rng)
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    return m, path


def test_load_is_lazy_and_save_copies_the_untouched_tensors(saved, tmp_path, rng):
    m, path = saved
    model = normfuse.load(path)
    w = model.graph.initializers["W"].const_value
    assert isinstance(w, ir.ExternalTensor), "a large tensor stays in the file"
    folded, report = normfuse.fold(model, check=False)
    assert len(report.applied) == 1
    out = normfuse.save(folded, tmp_path / "out.onnx")
    x = {"x": normal(rng, [2, 8, 6, 6])}
    np.testing.assert_allclose(run(onnx.load(out), x)[0], run(m, x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", ["rewrite", "replace", "remove", "touch"])
def test_a_changed_file_is_refused_before_its_tensors_are_read(saved, tmp_path, change):
    _, path = saved
    model = normfuse.load(path)
    folded, _ = normfuse.fold(path, check=False)  # also lazy: untouched tensors in the file
    other = _conv_bn(np.random.default_rng(99))
    if change == "rewrite":  # same inode, new bytes
        with open(path, "r+b") as f:
            f.write(other.SerializeToString())
    elif change == "replace":  # a new file renamed over it
        onnx.save(other, tmp_path / "new.onnx")
        os.replace(tmp_path / "new.onnx", path)
    elif change == "remove":
        path.unlink()
    else:  # same bytes, a new modification time
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    for what in (model, folded):
        with pytest.raises(InputError, match="since the model was read from it"):
            normfuse.save(what, tmp_path / "out.onnx", force=True)
    with pytest.raises(InputError, match="since the model was read from it"):
        normfuse.fold(model, check=False)
    assert not (tmp_path / "out.onnx").exists()


def test_the_command_refuses_nothing_when_the_file_stays(saved, tmp_path):
    _, path = saved
    model = normfuse.load(path)
    normfuse.save(model, tmp_path / "a.onnx")
    normfuse.save(model, tmp_path / "b.onnx")  # saved twice: the file is still the one read
    assert onnx.load(tmp_path / "a.onnx").SerializeToString() == (
        onnx.load(tmp_path / "b.onnx").SerializeToString()
    )


def test_fold_of_an_onnx_ir_model_leaves_the_callers_arrays(rng):
    """The clone shares tensors: writable numpy-backed tensors must keep their bytes."""
    m = _conv_bn(rng)
    model = ir.from_proto(m)
    for value in model.graph.initializers.values():  # tensors over writable arrays
        value.const_value = ir.Tensor(value.const_value.numpy().copy(), name=value.name)
    before = {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items()}
    for kwargs in ({}, {"norm_affine": True}, {"reparam": True}):
        folded, report = normfuse.fold(model, **kwargs)
        assert report.applied
        after = {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}
        assert after.keys() == before.keys()
        for k in before:
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)
        assert [n.op_type for n in model.graph] == ["Conv", "BatchNormalization", "Relu", "Mul"]
        assert folded is not model


def test_inference_from_the_source_proto_equals_the_serialized_graph(rng):
    """A tf2onnx-style graph without value_info, a Reshape whose shape is computed."""
    c = 6
    inits = [
        tensor("W", normal(rng, [c, 4, 3, 3])),
        *bn_params(rng, c),
        tensor("axes", np.array([0], np.int64)),
        tensor("tail", np.array([-1], np.int64)),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["xt", "W"], ["c"], pads=[1, 1, 1, 1]),
        bn_node("c", "b"),
        helper.make_node("Shape", ["b"], ["s"]),
        helper.make_node("Gather", ["s", "axes"], ["n"], axis=0),
        helper.make_node("Concat", ["n", "tail"], ["shape"], axis=0),
        helper.make_node("Reshape", ["b", "shape"], ["y"]),
    ]
    m = make_model(nodes, [("x", F, ["N", 5, 5, 4])], [("y", F, None)], inits)
    del m.graph.value_info[:]
    model = ir.from_proto(m)
    consts = ConstantResolver(17, model.ir_version)
    light = shapes._light_copy(model, m)
    assert light is not None
    a = shapes._shapes_of(shapes._infer(model, consts), None)
    b = shapes._shapes_of(shapes._infer(model, consts, light), None)
    assert {k: str(v) for k, v in a.items()} == {k: str(v) for k, v in b.items()}
    assert str(b["c"]) == "[N,6,5,5]"
    # a graph that is not the one read (a node more) is serialized again
    model.graph.append(ir.node("Identity", [model.graph.outputs[0]]))
    assert shapes._light_copy(model, m) is None


def test_may_be_constant_is_structural_and_agrees_with_resolve(rng):
    inits = [tensor("a", normal(rng, [3])), tensor("b", normal(rng, [3]))]
    nodes = [
        helper.make_node("Add", ["a", "b"], ["ab"]),  # constant expression
        helper.make_node("Relu", ["x"], ["r"]),  # run time
        helper.make_node("Mul", ["r", "ab"], ["m"]),  # run time (one operand is)
        helper.make_node("Shape", ["x"], ["s"]),  # constant: the input's shape is static
        helper.make_node("Cast", ["s"], ["sf"], to=TP.FLOAT),
        helper.make_node("Add", ["m", "sf"], ["y"]),
    ]
    model = ir.from_proto(make_model(nodes, [("x", F, [3])], [("y", F, [3])], inits))
    consts = ConstantResolver(17, model.ir_version)
    values = {v.name: v for n in model.graph for v in n.outputs}
    values["x"] = model.graph.inputs[0]
    expected = {"ab": True, "r": False, "m": False, "s": True, "sf": True, "y": False, "x": False}
    for name, constant in expected.items():
        assert consts.may_be_constant(values[name]) is constant, name
        assert (consts.try_resolve(values[name]) is not None) is constant, name
    np.testing.assert_array_equal(consts.try_resolve(values["sf"]), [3.0])


def test_deep_graph_chain_finding_raises_no_cascade(rng):
    """A 3,000-node residual chain: every Add is asked whether an operand is constant; the
    answer must come without resolving (and raising) through the whole prefix."""
    nodes, x = [], "x"
    for i in range(1500):
        nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
        nodes.append(helper.make_node("Add", [f"r{i}", x], [f"t{i}"]))
        x = f"t{i}"
    model = ir.from_proto(make_model(nodes, [("x", F, [1, 4])], [(x, F, [1, 4])], []))
    consts = ConstantResolver(17, model.ir_version)
    calls = 0
    resolve = consts.resolve

    def counting(value, depth=0):
        nonlocal calls
        calls += 1
        return resolve(value, depth)

    consts.resolve = counting  # type: ignore[method-assign]
    for node in model.graph:
        for v in node.inputs:
            assert consts.try_resolve(v) is None
    assert calls == 0


def test_the_loaders_proto_is_handed_over_once(saved):
    _, path = saved
    loaded = onnx_io.load(path, lazy=True)
    assert loaded.take_proto() is not None
    assert loaded.take_proto() is None


def test_rewrites_of_a_lazily_loaded_model_are_checked_from_its_file(saved, tmp_path):
    """The check must see the tensors, not references into the input file."""
    _, path = saved
    model = normfuse.load(path)
    _, report = normfuse.fold(model)  # checked
    assert report.parity is not None and report.parity.passed
    _, report = normfuse.swap(model, "frozen")
    assert report.parity is not None and report.parity.passed
    _, report = normfuse.fold(path)  # a path: lazy, checked
    assert report.parity is not None and report.parity.passed


def test_a_loaded_model_hands_its_proto_on_only_while_unchanged(saved):
    _, path = saved
    model = normfuse.load(path)
    assert onnx_io.load(model).take_proto() is not None  # unchanged: shape inference copies it
    conv = next(n for n in model.graph if n.op_type == "Conv")
    conv.attributes["pads"] = ir.AttrInt64s("pads", [0, 0, 0, 0])  # the caller changes it
    assert onnx_io.load(model).take_proto() is None
    other = normfuse.load(path)
    relu = next(n for n in other.graph if n.op_type == "Relu")
    relu.replace_input_with(0, other.graph.inputs[0])  # rewired
    assert onnx_io.load(other).take_proto() is None
    fresh = normfuse.load(path)
    fresh.graph.inputs[0].shape = ir.Shape([4, 8, 6, 6])  # another input shape
    assert onnx_io.load(fresh).take_proto() is None


def test_bytes_in_bytes_out_views_the_weights_and_writes_without_a_proto(rng):
    """fold(bytes): the large tensors are read-only views into the caller's bytes (no copy),
    the result is written as a file is (streaming); the same bytes as the proto path."""
    m = _conv_bn(rng)
    data = m.SerializeToString()
    loaded = onnx_io.load(data)
    w = loaded.model.graph.initializers["W"].const_value
    arr = w.numpy()
    assert not arr.flags.writeable and arr.base is not None  # a view, not a copy
    assert np.shares_memory(arr, np.frombuffer(data, np.uint8))
    folded, report = normfuse.fold(data)  # checked
    assert isinstance(folded, bytes) and report.parity.passed
    via_proto, _ = normfuse.fold(m, check=False)
    a, b = onnx.load_from_string(folded), via_proto
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    for x, y in zip(a.graph.initializer, b.graph.initializer, strict=True):
        assert x.name == y.name
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y))
    assert m.SerializeToString() == data  # the input is untouched
    # a bytearray may change under the model: it is copied, not viewed
    mutable = onnx_io.load(bytearray(data)).model.graph.initializers["W"].const_value
    assert not np.shares_memory(mutable.numpy(), np.frombuffer(data, np.uint8))


def test_bytes_with_a_truncated_tensor_are_refused(rng):
    m = _conv_bn(rng)
    w = next(t for t in m.graph.initializer if t.name == "W")
    w.raw_data = w.raw_data[: len(w.raw_data) // 2]
    with pytest.raises(InputError, match="raw_data holds"):
        normfuse.fold(m.SerializeToString(), check=False)


def _big_conv_bn(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv + BN with a weight above LARGE_BYTES (1 MiB): one whose fold can wait for the write."""
    cin, cout = 64, 512
    inits = [tensor("W", normal(rng, [cout, cin, 3, 3])), *bn_params(rng, cout)]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("c", "y"),
    ]
    return make_model(nodes, [("x", F, [1, cin, 4, 4])], [("y", F, [1, cout, 4, 4])], inits)


def test_in_memory_forms_fold_large_weights_when_written_and_equal_the_file_path(rng, tmp_path):
    """fold(ModelProto) and fold(bytes) compute a large folded weight while the result is
    written (not all of them beside the copy): the results are the command's byte for byte."""
    m = _big_conv_bn(rng)
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    folded, _ = normfuse.fold(str(path), check=False)
    normfuse.save(folded, tmp_path / "f.onnx")
    want = onnx.load(tmp_path / "f.onnx").SerializeToString()
    from_proto, _ = normfuse.fold(m, check=False)
    from_bytes, _ = normfuse.fold(m.SerializeToString(), check=False)
    assert from_proto.SerializeToString() == want
    assert onnx.load_from_string(from_bytes).SerializeToString() == want
    # deferred: the result of an onnx_ir model parsed from a proto holds the weight unevaluated
    result, _ = normfuse.fold(ir.from_proto(m), check=False)
    weight = next(n for n in result.graph if n.op_type == "Conv").inputs[1].const_value
    assert isinstance(weight, ir.LazyTensor)
    assert np.array_equal(
        weight.numpy(), onnx.numpy_helper.to_array(onnx.load_from_string(want).graph.initializer[0])
    )


def test_a_writable_array_of_the_caller_is_folded_at_once(rng):
    """The caller may still change their numpy arrays after the call: a weight read from one
    is folded during the call, never later from whatever the array holds then."""
    model = ir.from_proto(_big_conv_bn(rng))
    w = model.graph.initializers["W"]
    w.const_value = ir.Tensor(np.array(w.const_value.numpy()))  # writable, the caller's
    result, _ = normfuse.fold(model, check=False)
    weight = next(n for n in result.graph if n.op_type == "Conv").inputs[1].const_value
    before = np.array(weight.numpy())
    w.const_value.numpy()[...] = 0
    assert not isinstance(weight, ir.LazyTensor) and np.array_equal(weight.numpy(), before)


def _bn_count(model: ir.Model) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph)


def test_a_loaded_model_nobody_looked_into_is_handed_over_and_read_again(saved, tmp_path, rng):
    """load -> fold takes the loaded graph as the command does (no copy); the caller's model
    still has its BN and reads its graph again from the file, equal to a fresh load."""
    m, path = saved
    model = normfuse.load(path)
    taken, proto = handover.take(normfuse.load(path))
    assert proto is not None, "the source proto goes with it: shape inference copies it"
    folded, report = normfuse.fold(model)  # checked against the file
    assert report.parity is not None and report.parity.passed and len(report.applied) == 1
    assert _bn_count(folded) == 0 and _bn_count(model) == 1
    assert not {id(n) for n in folded.graph} & {id(n) for n in model.graph}
    assert handover.take(model) is None, "looked into: a plain model, copied by a rewrite"
    again, _ = normfuse.fold(model, check=False)  # now a copy of the caller's model
    out = [normfuse.save(f, tmp_path / f"{i}.onnx") for i, f in enumerate((folded, again))]
    assert onnx.load(out[0]) == onnx.load(out[1])
    x = {"x": normal(rng, [2, 8, 6, 6])}
    np.testing.assert_allclose(run(onnx.load(out[0]), x)[0], run(m, x)[0], rtol=1e-5, atol=1e-5)
    assert [n.op_type for n in taken.graph] == [n.op_type for n in model.graph]


def test_the_callers_fields_reach_the_rewrite_and_stay_the_callers(saved):
    _, path = saved
    model = normfuse.load(path)
    model.producer_name = "mine"
    model.metadata_props["stage"] = "export"
    folded, _ = normfuse.fold(model, check=False)
    assert folded.producer_name == "mine" and folded.metadata_props["stage"] == "export"
    folded.metadata_props["stage"] = "folded"
    folded.producer_name = "other"
    assert model.producer_name == "mine" and model.metadata_props["stage"] == "export"
    assert _bn_count(model) == 1


def test_an_edit_before_the_rewrite_is_seen_and_the_graph_is_not_taken(saved, rng):
    """The caller looked into the graph and changed it: the rewrite works on a copy of the
    changed model (the edit counts), the caller's objects stay the caller's."""
    m, path = saved
    model = normfuse.load(path)
    bn = next(n for n in model.graph if n.op_type == "BatchNormalization")
    bn.attributes["epsilon"] = ir.AttrFloat32("epsilon", 0.5)
    folded, report = normfuse.fold(model)  # checked against the edited model
    assert report.parity is not None and report.parity.passed
    assert bn.graph is model.graph and _bn_count(model) == 1
    edited = onnx.ModelProto()
    edited.CopyFrom(m)
    node = next(n for n in edited.graph.node if n.op_type == "BatchNormalization")
    node.attribute.append(helper.make_attribute("epsilon", 0.5))
    x = {"x": normal(rng, [2, 8, 6, 6])}
    got = run(ir.to_proto(folded), x)[0]
    np.testing.assert_allclose(got, run(edited, x)[0], rtol=1e-5, atol=1e-5)
    assert np.abs(got - run(m, x)[0]).max() > 1e-3, "the edit changes the result"


def test_a_handed_over_model_refuses_a_changed_file_when_read_again(saved):
    _, path = saved
    model = normfuse.load(path)
    normfuse.fold(model, check=False)  # took its graph
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(InputError, match="changed since the model was read"):
        _ = model.graph


def test_a_model_loaded_from_bytes_is_handed_over_and_read_again(rng):
    m = _conv_bn(rng)
    model = normfuse.load(m.SerializeToString())
    folded, report = normfuse.fold(model)
    assert report.parity is not None and report.parity.passed
    assert _bn_count(folded) == 0 and _bn_count(model) == 1
