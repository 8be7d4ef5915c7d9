"""The full-size layouts of models/zoo.py are torchvision's (what benchmarks/compare.py folds)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import normfuse
from tests.conftest import op_types

torch = pytest.importorskip("torch")
from models import build, zoo  # noqa: E402


@pytest.mark.parametrize("name", sorted(zoo.FULL))
def test_full_layout_has_torchvisions_parameter_count_and_output(name):
    with torch.device("meta"):
        model = zoo.FULL[name]().eval()
        out = model(torch.empty(1, 3, 224, 224))
    assert sum(p.numel() for p in model.parameters()) == zoo.TORCHVISION_PARAMETERS[name]
    segmentation = name in ("deeplabv3", "fcn")
    assert tuple(out.shape) == ((1, 21, 224, 224) if segmentation else (1, 1000))


def test_full_size_mobilenet_v3_folds_exactly(tmp_path):
    model = zoo.build_full("mobilenet_v3")
    path = tmp_path / "mnv3.onnx"
    x = torch.randn(1, 3, 224, 224)
    build.export(model, x, path, dynamo=False)
    assert op_types(onnx.load(path)).count("BatchNormalization") == 46
    folded, report = normfuse.fold(onnx.load(path), check=False)
    assert "BatchNormalization" not in op_types(folded)
    assert len(report.applied) == 46

    import onnxruntime as ort

    session = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
