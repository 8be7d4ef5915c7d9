"""Hugging Face transformers' norm patterns through the PyTorch frontend, rebuilt by hand.

transformers is not a dependency (nor installed in CI): each module below has the structure and
``forward`` of the transformers class it is named after (transformers 5.24), with random
non-trivial statistics (running var not 1, gamma/beta random). The last test runs the real
classes when transformers imports, and skips otherwise.

Regression (fails before the fix): a module whose class name says "BatchNorm" but whose forward
is a Conv + BatchNorm (+ tanh, dropout) layer (``FastSpeech2ConformerBatchNormConvLayer``,
``SpeechT5BatchNormConvLayer``) or a BatchNorm between transposes (``PatchTSTBatchNorm``) was
kept as one opaque call and refused as a norm ("its forward does not start with a per-channel
affine"), hiding the Conv-BN pairs inside it. It is now traced into.

Accuracy is measured against a float64 run of the original: ``max|out - ref64| / max|ref64|``.
"""

from __future__ import annotations

import copy
import importlib
import sys
import types
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import normfuse  # noqa: E402
from tests.test_torch_thirdparty import LinearNorm  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

TOL = 1e-5  # of the output's largest magnitude


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics (var in [0.5, 2]) and gamma/beta of every norm; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor):
                rm.copy_(torch.randn(rm.shape, generator=g) * 0.5)
                rv.copy_(torch.rand(rv.shape, generator=g) * 1.5 + 0.5)
            if "Norm" in type(m).__name__ or isinstance(m, nn.modules.batchnorm._BatchNorm):
                w, b = getattr(m, "weight", None), getattr(m, "bias", None)
                if isinstance(w, torch.Tensor) and w.ndim == 1:
                    w.copy_(torch.rand(w.shape, generator=g) + 0.5)
                if isinstance(b, torch.Tensor) and b.ndim == 1:
                    b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    return model.eval()


def float64_error(original: nn.Module, folded: nn.Module, x: torch.Tensor) -> float:
    ref = copy.deepcopy(original).double().eval()
    with torch.no_grad():
        want = ref(x.double())
        got = folded(x).double()
    return float((got - want).abs().max() / want.abs().max())


def entries(report: Any) -> dict[str, Any]:
    return {e.node: e for e in report.entries}


def leftover_bn(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# ------------------------------------------------------------------ "BatchNorm"-named containers


class FastSpeech2ConformerBatchNormConvLayer(nn.Module):
    """transformers' postnet layer (FastSpeech2Conformer, SpeechT5): Conv1d, BatchNorm1d, tanh
    on all but the last layer, dropout."""

    def __init__(self, cin: int, cout: int, last: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel_size=5, padding=2, bias=False)
        self.batch_norm = nn.BatchNorm1d(cout)
        self.activation = None if last else nn.Tanh()
        self.dropout = nn.Dropout(0.5)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv(hidden_states)
        hidden_states = self.batch_norm(hidden_states)
        if self.activation is not None:
            hidden_states = self.activation(hidden_states)
        return self.dropout(hidden_states)


class Postnet(nn.Module):
    """``FastSpeech2ConformerSpeechDecoderPostnet``: a Linear to mel bins, then the layers on
    the transposed features, added back."""

    def __init__(self, hidden: int = 12, mels: int = 6, units: int = 10, layers: int = 3) -> None:
        super().__init__()
        self.mels = mels
        self.feat_out = nn.Linear(hidden, mels)
        dims = [mels, *[units] * (layers - 1), mels]
        self.layers = nn.ModuleList(
            FastSpeech2ConformerBatchNormConvLayer(dims[i], dims[i + 1], i == layers - 1)
            for i in range(layers)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        before = self.feat_out(hidden_states).view(hidden_states.size(0), -1, self.mels)
        out = before.transpose(1, 2)
        for layer in self.layers:
            out = layer(out)
        return before + out.transpose(1, 2)


class DataDependentPostnet(Postnet):
    """The same, called from code that neither torch.fx nor torch.export traces (a branch on
    the data, as FastSpeech2Conformer's duration predictor): the subtree path."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = super().forward(hidden_states)
        if float(hidden_states.sum()) > 1e9:  # data-dependent: never true here
            return out * 2
        return out


class BranchyPostnet(Postnet):
    """Called from code that torch.fx cannot trace but torch.export can (``int(x.size(1))``)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        frames = int(hidden_states.size(1))
        out = super().forward(hidden_states)
        return out if frames > 0 else out * 0


@pytest.mark.parametrize("cls", [Postnet, DataDependentPostnet, BranchyPostnet])
def test_batchnorm_named_conv_layer_is_traced_into(cls: type[nn.Module]) -> None:
    """Regression: each layer's Conv1d-BatchNorm1d folds; no entry calls the layer a norm."""
    model = randomise(cls())
    x = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(1))
    folded, report = normfuse.fold(model, example_inputs=x)
    by_node = entries(report)
    assert not any(e.op_type == "FastSpeech2ConformerBatchNormConvLayer" for e in report.entries)
    for i in range(3):
        e = by_node[f"layers.{i}.batch_norm"]
        assert e.status == "applied", e.reason
        assert e.target is not None and f"layers.{i}.conv" in e.target
    assert leftover_bn(folded) == []
    assert isinstance(folded.layers[0].activation, nn.Tanh)  # the layer's own code still runs
    assert float64_error(model, folded, x) < TOL


class PatchTSTBatchNorm(nn.Module):
    """transformers' PatchTST/PatchTSMixer: BatchNorm1d over the features, between transposes."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.batchnorm = nn.BatchNorm1d(d_model)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.batchnorm(inputs.transpose(1, 2)).transpose(1, 2)


class PatchTSTLayer(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.mix = nn.Linear(d, d)
        self.norm_sublayer1 = PatchTSTBatchNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_sublayer1(x + self.mix(x))
        return x + self.ff(x)


def test_batchnorm_named_transpose_wrapper_reports_its_inner_norm() -> None:
    """Regression: the inner BatchNorm1d gets the entry, with where it sits (after a residual
    add), not the wrapper with "its forward computes 'transpose'"; nothing folds, nothing
    changes."""
    model = randomise(PatchTSTLayer())
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    folded, report = normfuse.fold(model, example_inputs=x)
    assert [e.node for e in report.entries] == ["norm_sublayer1.batchnorm"]
    e = report.entries[0]
    assert e.status == "skipped" and e.op_type == "BatchNorm1d"
    assert "transpose" in (e.reason or "") and "per-channel affine" not in (e.reason or "")
    assert float64_error(model, folded, x) < TOL


# ------------------------------------------------------------------ patterns that fold today


class DetrFrozenBatchNorm2d(nn.Module):
    """transformers' DETR/RT-DETR/Table Transformer frozen BN: buffers, eps written in forward."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.reshape(1, -1, 1, 1)
        bias = self.bias.reshape(1, -1, 1, 1)
        running_var = self.running_var.reshape(1, -1, 1, 1)
        running_mean = self.running_mean.reshape(1, -1, 1, 1)
        epsilon = 1e-5
        scale = weight * (running_var + epsilon).rsqrt()
        bias = bias - running_mean * scale
        return x * scale + bias


class ConvLayer(nn.Module):
    """ResNetConvLayer / RTDetrConvNormLayer / Segformer's decode head: conv, norm, activation."""

    def __init__(self, cin: int, cout: int, norm: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.normalization = norm(cout)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.normalization(self.convolution(x)))


class DetrBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvLayer(3, 8, DetrFrozenBatchNorm2d)
        self.stage = ConvLayer(8, 8, DetrFrozenBatchNorm2d)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[-1] % 2:  # shape branch: torch.fx cannot trace it
            pixel_values = pixel_values[..., :-1]
        return self.stage(self.stem(pixel_values))


def test_detr_frozen_batchnorm_folds() -> None:
    model = randomise(DetrBackbone())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    folded, report = normfuse.fold(model, example_inputs=x)
    assert [e.status for e in report.entries] == ["applied", "applied"]
    assert all(isinstance(folded.get_submodule(e.node), nn.Identity) for e in report.entries)
    assert isinstance(folded.stem.activation, nn.ReLU)
    assert float64_error(model, folded, x) < TOL


class LevitClassificationLayer(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.batch_norm = nn.BatchNorm1d(cin)
        self.linear = nn.Linear(cin, cout)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.linear(self.batch_norm(hidden_state))


class Levit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = LinearNorm(8, 16)  # transformers' LevitMLPLayerWithBN computes the same
        self.act = nn.Hardswish()
        self.down = LinearNorm(16, 8)
        self.classifier = LevitClassificationLayer(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.down(self.act(self.up(x)))
        return self.classifier(x.mean(1))


def test_levit_batchnorm1d_after_and_before_linear_fold() -> None:
    model = randomise(Levit())
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    folded, report = normfuse.fold(model, example_inputs=x)
    by_node = entries(report)
    assert by_node["up.bn"].direction == "after"
    assert by_node["down.bn"].direction == "after"
    assert by_node["classifier.batch_norm"].direction == "before"
    assert leftover_bn(folded) == []
    assert float64_error(model, folded, x) < TOL


class BitGroupNormActivation(nn.GroupNorm):
    """transformers' BiT: a GroupNorm subclass whose forward adds an activation."""

    def __init__(self, groups: int, channels: int) -> None:
        super().__init__(groups, channels)
        self.activation = nn.ReLU()

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        hidden_state = nn.functional.group_norm(
            hidden_state, self.num_groups, self.weight, self.bias, self.eps
        )
        return self.activation(hidden_state)


class WeightStandardizedConv2d(nn.Conv2d):
    """transformers' BiT: the weight is standardised by ``F.batch_norm(training=True)``."""

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        weight = nn.functional.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            training=True,
            momentum=0.0,
            eps=1e-6,
        ).reshape_as(self.weight)
        return nn.functional.conv2d(hidden_state, weight, self.bias, self.stride, self.padding)


def test_bit_weight_standardization_and_groupnorm_act_stay() -> None:
    """Neither is a BatchNorm of activations: nothing folds, the output is unchanged."""
    model = randomise(
        nn.Sequential(
            WeightStandardizedConv2d(3, 8, 3, bias=False),
            BitGroupNormActivation(2, 8),
            WeightStandardizedConv2d(8, 4, 1, bias=False),
        )
    )
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    folded, report = normfuse.fold(model, example_inputs=x)
    assert not any(e.status == "applied" for e in report.entries)
    # regression: the weight standardization was reported as a norm in training mode
    assert len(report.entries) == 2
    assert all("weight standardization" in (e.reason or "") for e in report.entries)
    assert isinstance(folded[1], BitGroupNormActivation)
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


# ------------------------------------------------------------------ the real classes, optional


def _import_transformers() -> Any:
    """transformers, or a skip: torchvision's PyPI wheel fails to import on the CPU torch unless
    its two registration modules are stubbed (as ``tests/timm_shim.py`` does for timm)."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    if "torchvision" not in sys.modules:
        for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules.setdefault(name, types.ModuleType(name))
    try:
        return importlib.import_module("transformers")
    except Exception as exc:
        pytest.skip(f"transformers does not import: {exc}")


def test_transformers_postnet_and_detr_backbone_fold() -> None:
    T = _import_transformers()
    from transformers.models.fastspeech2_conformer import modeling_fastspeech2_conformer as fs

    cfg = T.FastSpeech2ConformerConfig(
        hidden_size=16,
        num_mel_bins=8,
        speech_decoder_postnet_units=12,
        speech_decoder_postnet_layers=3,
        reduction_factor=1,
    )
    postnet = randomise(fs.FastSpeech2ConformerSpeechDecoderPostnet(cfg))
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    folded, report = normfuse.fold(postnet, example_inputs=x)
    assert [e.status for e in report.entries] == ["applied"] * 3
    assert leftover_bn(folded) == []
    with torch.no_grad():
        got = folded(x)[1]
        want = copy.deepcopy(postnet).double()(x.double())[1]
    assert float((got.double() - want).abs().max() / want.abs().max()) < TOL

    backbone_cfg = T.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage2"]
    )
    detr = T.DetrModel(
        T.DetrConfig(
            use_timm_backbone=False,
            backbone_config=backbone_cfg,
            use_pretrained_backbone=False,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=16,
            decoder_ffn_dim=16,
            num_queries=3,
        )
    )
    backbone = randomise(detr.backbone.model)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    folded, report = normfuse.fold(backbone, example_inputs=pixels)
    frozen = [e for e in report.entries if e.op_type == "DetrFrozenBatchNorm2d"]
    assert frozen and all(e.status == "applied" for e in frozen)
    with torch.no_grad():
        got = folded(pixels).feature_maps[-1]
        want = copy.deepcopy(backbone).double()(pixels.double()).feature_maps[-1]
    assert float((got.double() - want).abs().max() / want.abs().max()) < TOL


# --- ONNX: a Linear's output read by a Shape beside its BN (LeViT's reshape_as) --------------


class LevitMLPLayerWithBN(nn.Module):
    """transformers' LevitMLPLayerWithBN: ``bn(linear(x).flatten(0, 1)).reshape_as(linear(x))``;
    the legacy export reads the Linear's output through a ``Shape`` for ``reshape_as``."""

    def __init__(self, cin: int = 8, cout: int = 16, tap: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.batch_norm = nn.BatchNorm1d(cout)
        self.tap = tap  # another reader of the Linear's elements: the BN must stay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        y = self.batch_norm(h.flatten(0, 1)).reshape_as(h)
        return y + torch.relu(h) if self.tap else y


@pytest.mark.parametrize("tap", [False, True])
def test_a_shape_reader_beside_the_norm_does_not_stop_the_fold(tmp_path, tap) -> None:
    model = randomise(LevitMLPLayerWithBN(tap=tap)).eval()
    path = tmp_path / "levit_mlp.onnx"
    torch.onnx.export(
        model,
        (torch.randn(2, 5, 8),),
        str(path),
        dynamo=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
        opset_version=17,
    )
    assert any(n.op_type == "Shape" for n in onnx.load(path).graph.node)
    folded, report = normfuse.fold(str(path), provider="cpu")
    bn = [e for e in report.entries if e.op_type == "BatchNormalization"]
    if tap:  # the Relu reads the elements the fold would rescale
        assert bn and bn[0].status == "skipped" and "also feeds" in bn[0].reason
        return
    assert [e.status for e in bn] == ["applied"] and report.parity.passed, report.summary()
    out = tmp_path / "folded.onnx"
    normfuse.save(folded, out)
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(out).graph.node)
