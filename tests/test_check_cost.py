"""What the default check costs, and that its shortcuts keep its verdicts (issue 20, target 3).

- The figures of a comparison are measured in one pass where both tensors are finite
  (:func:`pair_stats`); they agree with the masked float64 computation, which still handles
  NaN, Inf and overflow.
- A session is built from the graph alone: a model file's large inline tensors are referenced
  where they lie and onnxruntime reads them from the file (each model's own file).
- The rewritten model's noise is measured only when something fails against the original's
  (float32), and a second 16-bit re-rounding only when the first leaves something failing: an
  exact fold costs one re-rounded run, a wrong one is still refused.
"""

from __future__ import annotations

from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import normfuse
from normfuse.core.verdict import _masked_stats, compare_outputs, pair_stats
from normfuse.runtime import judge, parity
from normfuse.runtime.noise import read_graph
from normfuse.runtime.parity import check_models
from tests.test_check_noise import _conv_bn_stack, _fold, _off_by


def _close(a: float, b: float) -> bool:
    return a == b or abs(a - b) <= 1e-6 * abs(b) + 1e-30 or (np.isnan(a) and np.isnan(b))


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        st.sampled_from([np.float16, np.float32, np.float64]),
        hnp.array_shapes(min_dims=0, max_dims=4, max_side=5),
        elements=st.floats(-1e4, 1e4, width=16),
    ),
    st.integers(0, 2**32 - 1),
    st.sampled_from([None, "nan", "inf", "-inf"]),
)
def test_one_pass_figures_agree_with_the_masked_float64_ones(a, seed, bad):
    rng = np.random.default_rng(seed)
    b = (a.astype(np.float64) + rng.standard_normal(a.shape) * 1e-2).astype(a.dtype)
    if bad is not None and a.size:
        b.reshape(-1)[rng.integers(a.size)] = float(bad)
    fast, slow = pair_stats(a, b), _masked_stats(a, b)
    assert fast.nonfinite_mismatch == slow.nonfinite_mismatch
    for field in ("max_abs", "mean_abs", "scale", "cosine"):
        assert _close(getattr(fast, field), getattr(slow, field)), field
    assert fast.channel[1] == slow.channel[1]
    assert _close(fast.channel[0], slow.channel[0]) and _close(fast.channel[2], slow.channel[2])


def test_a_difference_beyond_float32_goes_the_float64_way():
    a = np.full((2, 3), 3e38, np.float32)
    stats = pair_stats(a, -a)
    assert stats.nonfinite_mismatch == 0 and stats.max_abs == pytest.approx(6e38, rel=1e-6)
    result = compare_outputs("y", a, -a, 0.0, 1e-3)
    assert not result.passed and result.max_rel == pytest.approx(2.0, rel=1e-6)


def test_sessions_are_built_from_the_graph_and_read_each_models_own_file(tmp_path):
    src, folded = _fold(_conv_bn_stack(6, c=64), tmp_path, "wide")
    graph = read_graph(src)
    light = graph.session_bytes([], graph.weights())
    assert len(light) < src.stat().st_size / 20  # the weights are not in the session's bytes
    assert check_models(src, folded, provider="cpu", upcast=True).passed
    # the same file names in another folder, one weight 1e-3 off: read from that file
    other = tmp_path / "other"
    other.mkdir()
    (other / src.name).write_bytes(src.read_bytes())
    _off_by(folded, other / folded.name, 3, 1.001)
    assert not check_models(src, other / folded.name, provider="cpu", upcast=True).passed


def _count(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[object]:
    calls: list[object] = []
    real = getattr(module, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _fold(_conv_bn_stack(12, seed=3), tmp_path_factory.mktemp("stack"), "stack")


def test_an_exact_fold_measures_only_the_originals_noise(stack, monkeypatch):
    src, folded = stack
    calls = _count(monkeypatch, parity, "measure_noise")
    assert check_models(src, folded, provider="cpu", upcast=True).passed
    assert len(calls) == 1


def test_a_wrong_fold_measures_both_and_is_refused_as_before(stack, tmp_path, monkeypatch):
    src, folded = stack
    wrong = tmp_path / "wrong.onnx"
    _off_by(folded, wrong, 5, 1.001)
    calls = _count(monkeypatch, parity, "measure_noise")
    result = check_models(src, wrong, provider="cpu", upcast=True)
    assert len(calls) == 2 and not result.passed
    assert any("'n5'" in o.name for o in result.outputs if not o.passed), result.lines()


def _fp16_stack(tmp_path: Path) -> Path:
    model = _conv_bn_stack(8, seed=5)
    for t in model.graph.initializer:
        t.CopyFrom(
            onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float16), t.name)
        )
    for v in (*model.graph.input, *model.graph.output):
        v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    path = tmp_path / "half.onnx"
    onnx.save(model, path)
    return path


def test_a_16_bit_exact_fold_runs_one_rerounding_a_wrong_one_two(tmp_path, monkeypatch):
    src = _fp16_stack(tmp_path)
    folded, report = normfuse.fold(str(src), check=False)
    assert report.applied
    out = tmp_path / "half.folded.onnx"
    normfuse.save(folded, out)
    calls = _count(monkeypatch, judge, "_rerounded")
    result = check_models(src, out, provider="cpu", upcast=True)
    assert result.passed and "upcast exactly" in (result.judgement or ""), result.lines()
    assert len(calls) == 1
    wrong = tmp_path / "wrong.onnx"
    model = onnx.load(out)
    conv = [n for n in model.graph.node if n.op_type == "Conv"][4]
    inits = {t.name: t for t in model.graph.initializer}
    w = onnx.numpy_helper.to_array(inits[conv.input[1]]).copy()
    w[0] = (w[0].astype(np.float32) * 1.01).astype(np.float16)
    inits[conv.input[1]].CopyFrom(onnx.numpy_helper.from_array(w, conv.input[1]))
    onnx.save(model, wrong)
    calls.clear()
    result = check_models(src, wrong, provider="cpu", upcast=True)
    assert not result.passed and len(calls) == 2


def test_a_model_named_through_a_link_from_another_folder_is_checked(stack, tmp_path):
    """The session reads the weights from the file as it really is: onnxruntime refuses a
    reference through a link that leads out of the model's folder."""
    src, folded = stack
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "link.onnx"
    link.symlink_to(src)
    assert check_models(link, folded, provider="cpu", upcast=True).passed


def test_a_model_with_inline_and_external_tensors_is_checked(tmp_path):
    """Large inline tensors beside external data of its own: the graph keeps its folder."""
    model = _conv_bn_stack(4, c=32, seed=7)
    src = tmp_path / "mixed.onnx"
    big = sorted(model.graph.initializer, key=lambda t: -len(t.raw_data))
    onnx.external_data_helper.set_external_data(big[0], "mixed.data")
    (tmp_path / "mixed.data").write_bytes(big[0].raw_data)
    big[0].ClearField("raw_data")
    big[0].data_location = onnx.TensorProto.EXTERNAL
    onnx.save(model, src)
    assert read_graph(src).folder == tmp_path
    folded, _ = normfuse.fold(str(src), check=False)
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    normfuse.save(folded, out)
    assert check_models(src, out, provider="cpu", upcast=True).passed


def test_the_float16_unit_is_the_spacing_above_each_magnitude():
    """Every finite float16: the unit its re-rounding moves by is the spacing of float16 above
    its magnitude (2 ** (exponent - 10); subnormals 2 ** -24), built from the bits."""
    from normfuse.onnxgraph.upcast import _ulp

    v = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    v = v[np.isfinite(v) & (np.abs(v) < np.finfo(np.float16).max)]  # the largest: no value above
    got = _ulp(v)
    assert got.dtype == np.float32
    assert np.array_equal(got, np.spacing(np.abs(v)).astype(np.float32))
    assert _ulp(np.array([65504.0], np.float16))[0] == 32.0


def test_a_16_bit_ir3_model_is_checked(tmp_path):
    """IR 3 (every initializer also a graph input): onnxruntime overrides none of them there,
    and the re-rounded run of the 16-bit judge once stopped with "Invalid input name"."""
    model = onnx.load(_fp16_stack(tmp_path))
    model.ir_version = 3
    model.opset_import[0].version = 9
    model.graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in model.graph.initializer
    )
    src = tmp_path / "half3.onnx"
    onnx.save(model, src)
    _, report = normfuse.fold(str(src))  # the default check
    assert report.applied and report.parity is not None and report.parity.passed
    assert "upcast exactly" in (report.parity.judgement or "")


def test_a_16_bit_model_with_external_data_is_judged_upcast_from_any_folder(tmp_path, monkeypatch):
    """A float16 model whose float32 tensor stays in its external data file (dynamo exports):
    the upcast copy went to onnxruntime as bytes, which looked for that file beside the working
    directory, and the check fell back to judging at float16 with a note."""
    rng = np.random.default_rng(0)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float16), "W"),
        onnx.numpy_helper.from_array((rng.random(8) + 0.5).astype(np.float16), "s"),
        onnx.numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b32"),
    ]
    h = onnx.helper
    nodes = [
        h.make_node("Cast", ["x"], ["x32"], to=onnx.TensorProto.FLOAT),
        h.make_node("Add", ["x32", "b32"], ["a32"]),
        h.make_node("Cast", ["a32"], ["a"], to=onnx.TensorProto.FLOAT16),
        h.make_node("MatMul", ["a", "W"], ["q"]),
        h.make_node("Mul", ["q", "s"], ["y"]),
    ]
    io = [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT16, [2, 8]) for n in ("x", "y")]
    model = h.make_model(
        h.make_graph(nodes, "g", io[:1], io[1:], inits), opset_imports=[h.make_opsetid("", 18)]
    )
    (tmp_path / "m").mkdir()
    src = tmp_path / "m" / "m.onnx"
    onnx.save(model, src, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    folded, report = normfuse.fold(str(src), check=False)
    assert report.applied
    out = tmp_path / "out" / "m.folded.onnx"
    out.parent.mkdir()
    normfuse.save(folded, out)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = check_models(src, out, provider="cpu", upcast=True)
    assert result.passed and "upcast exactly" in (result.judgement or ""), result.lines()
    assert not [n for n in result.notes if "cannot load" in n], result.notes
