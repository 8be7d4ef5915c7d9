"""normfuse.export (torch -> ONNX -> fold -> parity with PyTorch) and .pt2 archives in the CLI."""

from __future__ import annotations

import json
import pickle
import zipfile

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
from click.testing import CliRunner  # noqa: E402
from torch import nn  # noqa: E402

import normfuse  # noqa: E402
from models import build  # noqa: E402
from normfuse.cli import cli  # noqa: E402
from normfuse.torchmodel.export import load_pt2  # noqa: E402
from tests.conftest import op_types  # noqa: E402
from tests.torch_models import count_bn, randomize  # noqa: E402


@pytest.mark.parametrize("name", sorted(build.MODELS))
def test_export_of_the_bundled_models_folds_everything_and_matches_pytorch(tmp_path, name):
    model, example = build.bundled(name)
    out = tmp_path / f"{name}.onnx"
    report = normfuse.export(model, (example,), out)
    proto = onnx.load(out)
    assert "BatchNormalization" not in op_types(proto)
    assert report.after.batchnorm_nodes == 0 and len(report.applied) == count_bn(model)
    assert report.parity is not None and report.parity.passed and report.parity.runs == 3
    assert report.parity.max_rel <= 1e-5
    assert any("wrote" in n and "BatchNormalization" in n for n in report.notes)
    # independent of the report: run the file ourselves
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(5).standard_normal(example.shape).astype(np.float32)
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_legacy_exporter_and_no_fold(tmp_path):
    model, example = build.bundled("resnet_small")
    report = normfuse.export(model, example, tmp_path / "a.onnx", dynamo=False)
    assert "legacy" in report.notes[0] and report.parity.passed
    report = normfuse.export(model, example, tmp_path / "b.onnx", fold=False)
    assert op_types(onnx.load(tmp_path / "b.onnx")).count("BatchNormalization") == 9
    assert report.parity.passed


def test_export_refuses_training_mode_and_existing_output(tmp_path):
    model, example = build.bundled("mlp")
    with pytest.raises(normfuse.InputError, match="training mode"):
        normfuse.export(model.train(), example, tmp_path / "m.onnx")
    model.eval()
    (tmp_path / "m.onnx").write_bytes(b"keep")
    with pytest.raises(normfuse.OutputExistsError):
        normfuse.export(model, example, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == b"keep"


def test_failed_parity_writes_nothing(tmp_path, monkeypatch):
    import normfuse.torchmodel.export as fx_export

    model, example = build.bundled("mlp")
    real = fx_export._reference
    monkeypatch.setattr(fx_export, "_reference", lambda m: lambda *a, **k: real(m)(*a, **k) * 1.001)
    with pytest.raises(normfuse.ParityError, match="nothing was written"):
        normfuse.export(model, example, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


class _Deep(nn.Module):
    """24 conv + BN layers with random statistics."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1)]
        for _ in range(24):
            layers += [nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_export_is_judged_against_a_float64_run_and_a_wrong_fold_still_fails(tmp_path, monkeypatch):
    """Each output's error against a float64 run of the PyTorch model must stay within a
    multiple of PyTorch's own float32 error: an exact fold passes whatever two runtimes' roundings
    do; one output channel 0.1% off fails."""
    import normfuse.torchmodel.export as fx_export

    model = randomize(_Deep()).eval()
    x = torch.randn(1, 3, 12, 12)
    report = normfuse.export(model, (x,), tmp_path / "ok.onnx")
    assert report.parity is not None and report.parity.passed
    assert any("judged against a float64 run" in n for n in report.parity.notes)
    real = fx_export.run_fold

    def off_by_a_permille(onnx_model, rep, options):
        real(onnx_model, rep, options)
        conv = [n for n in onnx_model.graph if n.op_type == "Conv"][-1]
        w = conv.inputs[1].const_value.numpy().copy()
        w[0] *= 1.001
        conv.inputs[1].const_value = ir.Tensor(w, name=conv.inputs[1].name)

    monkeypatch.setattr(fx_export, "run_fold", off_by_a_permille)
    with pytest.raises(normfuse.ParityError, match="nothing was written"):
        normfuse.export(model, (x,), tmp_path / "wrong.onnx")
    assert not (tmp_path / "wrong.onnx").exists()


def _pt2(tmp_path, name="resnet_small"):
    model, example = build.bundled(name)
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (example,)), str(path))
    return model, example, path


def test_cli_folds_a_pt2_archive_into_pt2_and_onnx(tmp_path):
    model, example, path = _pt2(tmp_path)
    runner = CliRunner()
    result = runner.invoke(cli, ["fold", str(path), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    ep = load_pt2(tmp_path / "model.folded.pt2")
    assert not any("batch_norm" in str(n.target) for n in ep.graph.nodes)
    with torch.no_grad():
        got = ep.module()(example)
        assert float((got - model(example)).abs().max() / model(example).abs().max()) <= 1e-5
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["applied"] == 9 and report["framework"] == "torch"
    result = runner.invoke(cli, ["fold", str(path), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    assert "BatchNormalization" not in op_types(onnx.load(tmp_path / "m.onnx"))
    assert "PASSED" in result.output


class _Branches(nn.Module):
    """Two parallel convs summed (a RepVGG block without BN)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(4, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def test_cli_pt2_takes_reparam_and_refuses_what_does_not_apply(tmp_path):
    """--reparam was dropped on a .pt2 without a word, as were --norm-affine, --seed, --shape,
    --provider and --inputs: the same fold, exit 0."""
    model, x = _Branches().eval(), torch.randn(1, 4, 8, 8)
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    runner = CliRunner()
    result = runner.invoke(
        cli, ["fold", str(path), "--reparam", "--json", str(tmp_path / "r.json")]
    )
    assert result.exit_code == 0, result.output
    ep = load_pt2(tmp_path / "m.folded.pt2")
    assert sum("conv2d" in str(n.target) for n in ep.graph.nodes) == 1
    with torch.no_grad():
        assert float((ep.module()(x) - model(x)).abs().max()) < 1e-5
    for extra in (
        ["--norm-affine"],
        ["--seed", "3"],
        ["--shape", "x=1x4x8x8"],
        ["--provider", "cpu"],
    ):
        result = runner.invoke(cli, ["fold", str(path), "-o", str(tmp_path / "o.pt2"), *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert f"error: {extra[0]} does not apply to a .pt2 model" in result.output


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pt2_with_a_pickled_payload_is_refused_without_running_it(tmp_path):
    _, _, path = _pt2(tmp_path, "mlp")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"].values()))
                first["use_pickle"] = True
                target = first["path_name"]
                data = json.dumps(config).encode()
            dst.writestr(info, data)
        # the pickled weight: loading it with weights_only=False would create the marker file
        name = next(n for n in src.namelist() if n.endswith(f"weights/{target}"))
    with zipfile.ZipFile(evil, "a") as dst:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dst.writestr(name, pickle.dumps(_Evil(str(marker))))
    result = CliRunner().invoke(cli, ["fold", str(evil), "-o", str(tmp_path / "out.pt2")])
    assert result.exit_code == 2
    assert result.output.startswith("error:") and "Traceback" not in result.output
    assert "pickled" in result.output and len(result.output.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out.pt2").exists()
    with pytest.raises(normfuse.InputError, match="pickled"):
        normfuse.fold(evil)  # the Python API reads it the same way
    assert not marker.exists()


def test_the_python_api_folds_a_pt2_path_into_an_exported_program(tmp_path):
    model, example, path = _pt2(tmp_path)
    folded, report = normfuse.fold(path)  # checked on the archive's example inputs
    assert isinstance(folded, torch.export.ExportedProgram)
    assert len(report.applied) == 9 and report.parity is not None and report.parity.passed
    assert not any("batch_norm" in str(n.target) for n in folded.graph.nodes)
    with torch.no_grad():
        got, want = folded.module()(example), model(example)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


def test_pt2_that_is_not_an_archive_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip")
    result = CliRunner().invoke(cli, ["fold", str(bad)])
    assert result.exit_code == 2 and "torch.export archive" in result.output


def test_export_of_an_nn_module_with_a_custom_bn_subclass(tmp_path):
    class MyBN(nn.BatchNorm2d):
        pass

    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), MyBN(4), nn.ReLU()))
    report = normfuse.export(model, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx")
    assert report.after.batchnorm_nodes == 0 and report.parity.passed


def test_export_gives_back_the_attributes_tracing_set():
    """Tracing runs forward on the caller's modules: what it caches on ``self`` is put back
    (added attributes removed, replaced ones restored; parameters and buffers untouched)."""
    from normfuse.torchmodel.export import _attributes_kept

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    head = model[1]
    head.shape = None
    weight, mean = model[0].weight, head.running_mean
    with _attributes_kept(model):
        head.anchors = torch.empty(2, 5)  # set by forward
        head.shape = (1, 4, 8, 8)
        model[0].weight = nn.Parameter(torch.zeros(4, 3, 1, 1))  # a parameter: not an attribute
    assert not hasattr(head, "anchors") and head.shape is None
    assert model[0].weight is not weight  # parameters are the model's own business
    assert head.running_mean is mean


def test_export_of_ultralytics_yolo_keeps_the_model_usable(tmp_path):
    """ultralytics' Detect head caches anchors in forward; tracing left fake tensors there:
    the check failed with a raw torch error and the caller's model no longer ran."""
    pytest.importorskip("ultralytics")
    from ultralytics.nn.tasks import DetectionModel

    class Head(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            out = self.m(x)
            return out[0] if isinstance(out, (tuple, list)) else out

    detector = DetectionModel("yolov8n.yaml", verbose=False).eval()
    detector.model[-1].export, detector.model[-1].format = True, "onnx"
    model = randomize(Head(detector)).eval()
    x = torch.randn(1, 3, 64, 64)
    report = normfuse.export(model, (x,), tmp_path / "y.onnx")
    assert report.parity is not None and report.parity.passed
    assert report.after.batchnorm_nodes == 0 and len(report.applied) == count_bn(model)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
