"""CNN families exported by both PyTorch exporters (keeping BN) fold to zero BatchNormalization."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import normfuse
from tests.conftest import op_types

torch = pytest.importorskip("torch")
from models import build, zoo  # noqa: E402

EXPORTERS = ["legacy-preserve", "dynamo-unoptimized"]


def export(model, path, exporter: str) -> onnx.ModelProto:
    build.export(model, torch.randn(1, 3, 32, 32), path, dynamo=exporter == "dynamo-unoptimized")
    return onnx.load(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache: dict[tuple[str, str], onnx.ModelProto] = {}

    def get(name: str, exporter: str) -> onnx.ModelProto:
        if (name, exporter) not in cache:
            path = tmp_path_factory.mktemp("export") / f"{name}.onnx"
            cache[name, exporter] = export(zoo.build(name), path, exporter)
        return cache[name, exporter]

    return get


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", sorted(zoo.FAMILIES))
def test_family_folds_every_bn_that_follows_a_conv(exported, name, exporter):
    model = exported(name, exporter)
    bn_before = op_types(model).count("BatchNormalization")
    if name != "convnext":  # ConvNeXt has LayerNorm only
        assert bn_before > 0, "the exporter already folded BN: the test would prove nothing"
    folded, report = normfuse.fold(model, provider="cpu")
    producers = {o: n for n in folded.graph.node for o in n.output}
    left = [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    assert all(
        producers.get(n.input[0]) is None or producers[n.input[0]].op_type != "Conv" for n in left
    )
    assert len(report.skipped) == len(left) and all(e.reason for e in report.skipped)
    assert len([e for e in report.applied if e.op_type == "BatchNormalization"]) == bn_before - len(
        left
    )
    if name in ("densenet",):
        assert left, "DenseNet's BN after concat/ReLU cannot fold; the test expects leftovers"
    else:
        assert left == []
    assert report.parity is not None and report.parity.passed
    assert report.parity.max_rel <= 1e-5, report.parity.max_rel
    onnx.checker.check_model(folded, full_check=True)


def test_default_exports_already_fold_bn():
    """Documented in the README: eval-mode exports need no normfuse fold for BN after conv."""
    model = zoo.build("resnet")
    x = torch.randn(1, 3, 32, 32)
    with build.quiet():
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    assert "BatchNormalization" not in op_types(program.model_proto)


def test_export_pipeline_example(tmp_path):
    """The README's pipeline: export -> fold -> save, and the result matches PyTorch."""
    model = zoo.build("mobilenet_v2")
    x = torch.randn(1, 3, 32, 32)
    with build.quiet():
        program = torch.onnx.export(model, (x,), dynamo=True, optimize=False, verbose=False)
    folded, _report = normfuse.fold(program)
    normfuse.save(folded, tmp_path / "model.onnx")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    expected = model(x).detach().numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
