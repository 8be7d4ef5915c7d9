"""Build the small sample models in this folder.

Each model gets random weights, BatchNorm statistics moved by training-mode passes on random
data (so running variance is far from 1), random gamma/beta, and is then exported to ONNX in
a form that keeps its BatchNormalization nodes (``torch.onnx.export`` folds BN by itself by
default: the legacy exporter in eval mode, the dynamo exporter with ``optimize=True``):

* ``mlp.onnx``: the classic BN example: BatchNorm1d on the input and after each hidden Linear,
  before ReLU (dynamo exporter, ``optimize=False``).
* ``resnet_small.onnx``: a ResNet-style CNN with basic blocks and a projection shortcut
  (dynamo exporter, ``optimize=False``: conv biases arrive as constant subexpressions).
* ``decoder.onnx``: a ConvTranspose decoder, one grouped, one with output_padding (legacy
  exporter, ``TrainingMode.PRESERVE``).
* ``dwsep.onnx``: a MobileNet-style depthwise-separable block (legacy exporter, PRESERVE).
* ``norm_block.onnx``: LayerNorm (with and without affine), an RMSNorm written as PyTorch code
  (``x * rsqrt(mean(x^2) + eps) * w``) and a GroupNorm, exported by the legacy exporter at
  opset 13, which has no fused norm ops: they arrive decomposed (``normfuse raise``).

Usage: ``python models/build.py [OUT_DIR]`` (default: this folder). Needs torch.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "MODELS",
    "NORM_MODELS",
    "build_all",
    "bundled",
    "export",
    "quiet",
    "randomize_batchnorm",
    "wide_conv_model",
]

logger = logging.getLogger(__name__)


class MLP(nn.Module):
    """BatchNorm1d on the input, then Linear -> BN -> ReLU twice, then a Linear head."""

    def __init__(self, features: int = 20, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm1d(features)
        self.fc1, self.bn1 = nn.Linear(features, hidden), nn.BatchNorm1d(hidden)
        self.fc2, self.bn2 = nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_in(x)
        x = torch.relu(self.bn1(self.fc1(x)))
        x = torch.relu(self.bn2(self.fc2(x)))
        return self.head(x)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus an identity or 1x1-conv-BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class ResNetSmall(nn.Module):
    """A stem and three basic blocks, global pooling and a linear head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.layers = nn.Sequential(
            BasicBlock(16, 16), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2)
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.head(x.mean((2, 3)))


class Decoder(nn.Module):
    """ConvTranspose upsampling: plain, grouped, and with output_padding, each followed by BN."""

    def __init__(self) -> None:
        super().__init__()
        self.up1 = nn.ConvTranspose2d(32, 32, 4, 2, 1)
        self.bn1 = nn.BatchNorm2d(32)
        self.up2 = nn.ConvTranspose2d(32, 16, 3, 2, 1, output_padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.out = nn.Conv2d(16, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.up1(x)))
        x = torch.relu(self.bn2(self.up2(x)))
        return self.out(x)


class DepthwiseSeparable(nn.Module):
    """MobileNet block: depthwise 3x3-BN-ReLU6, pointwise 1x1-BN, and a BN on the input."""

    def __init__(self, cin: int = 16, cout: int = 32) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm2d(cin)
        self.pw0 = nn.Conv2d(cin, cin, 1, bias=False)
        self.dw = nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False)
        self.bn_dw = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw0(self.bn_in(x))
        x = torch.clamp(self.bn_dw(self.dw(x)), 0, 6)
        return self.bn_pw(self.pw(x))


class NormBlock(nn.Module):
    """Transformer-style token mixing with LayerNorm/RMSNorm, and a conv with GroupNorm."""

    def __init__(self, dim: int = 16, channels: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)
        self.ln_plain = nn.LayerNorm(dim, elementwise_affine=False)
        self.rms_weight = nn.Parameter(torch.rand(dim) + 0.5)
        self.conv = nn.Conv2d(4, channels, 3, padding=1)
        self.gn = nn.GroupNorm(4, channels)
        with torch.no_grad():
            for norm in (self.ln, self.gn):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0.0, 0.5)

    def forward(
        self, tokens: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.ln_plain(torch.relu(self.ln(self.fc(tokens))))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.rms_weight
        return h, self.gn(self.conv(image))


def wide_conv_model(folder: Path, width: int = 2048, layers: int = 15) -> tuple[Path, int]:
    """Conv 3x3 -> BN -> ReLU layers with external data, written straight to disk.

    ``width * width * 9 * 4`` bytes per layer (151 MB at 2048): 15 layers make a 2.26 GB model.
    Weights are a seeded random block, rolled per layer; BN statistics are random. Returns the
    model path and the size of its data file.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    block = (rng.standard_normal(1 << 20) / np.sqrt(width * 9)).astype(np.float32)
    nodes, inits, prev, offset = [], [], "input", 0
    data_name = "wide.onnx.data"
    with open(folder / data_name, "wb") as data:
        for i in range(layers):
            w = np.resize(np.roll(block, i * 7919), (width, width, 3, 3))
            w.tofile(data)
            t = onnx.TensorProto(
                name=f"w{i}", data_type=TP.FLOAT, dims=w.shape, data_location=TP.EXTERNAL
            )
            for key, value in (
                ("location", data_name),
                ("offset", str(offset)),
                ("length", str(w.nbytes)),
            ):
                t.external_data.add(key=key, value=value)
            offset += w.nbytes
            inits.append(t)
            stats = (
                rng.uniform(0.5, 2, width),
                rng.normal(size=width),
                rng.normal(size=width) * 0.1,
                rng.uniform(0.5, 2, width),
            )
            inits += [
                numpy_helper.from_array(v.astype(np.float32), f"bn{i}_{k}")
                for k, v in zip("gbmv", stats, strict=True)
            ]
            out = "output" if i == layers - 1 else f"r{i}"
            nodes += [
                helper.make_node(
                    "Conv", [prev, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]
                ),
                helper.make_node(
                    "BatchNormalization",
                    [f"c{i}", *(f"bn{i}_{k}" for k in "gbmv")],
                    [f"b{i}"],
                    name=f"bn{i}",
                ),
                helper.make_node("Relu", [f"b{i}"], [out]),
            ]
            prev = out
    graph = helper.make_graph(
        nodes,
        "wide",
        [helper.make_tensor_value_info("input", TP.FLOAT, [1, width, 4, 4])],
        [helper.make_tensor_value_info("output", TP.FLOAT, [1, width, 4, 4])],
        inits,
    )
    path = folder / "wide.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path
    )
    return path, offset


def randomize_batchnorm(
    model: nn.Module, example: torch.Tensor, passes: int = 20, seed: int = 0
) -> None:
    """Move BN running statistics with training passes; randomise gamma and beta."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            x = torch.randn(example.shape, generator=gen) * 3.0 + 0.5
            if x.shape[0] < 2:
                x = torch.cat([x, x * 0.5])
            model(x)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 2.0, generator=gen)
                m.weight.mul_(
                    torch.where(torch.rand(m.weight.shape, generator=gen) < 0.2, -1.0, 1.0)
                )
                m.bias.normal_(0.0, 1.0, generator=gen)
    model.eval()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export(
    model: nn.Module, example: Any, path: Path, dynamo: bool, opset: int | None = None
) -> None:
    """Export keeping BatchNormalization nodes (dynamo: ``optimize=False``; legacy: PRESERVE)."""
    args = example if isinstance(example, tuple) else (example,)
    with quiet():
        if dynamo:
            program = torch.onnx.export(model, args, dynamo=True, optimize=False, verbose=False)
            program.save(str(path))
        else:
            names = ["input"] if len(args) == 1 else [f"input{i}" for i in range(len(args))]
            torch.onnx.export(
                model,
                args,
                str(path),
                dynamo=False,
                opset_version=opset,
                training=torch.onnx.TrainingMode.PRESERVE,
                do_constant_folding=False,
                input_names=names,
                output_names=["output"] if len(args) == 1 else None,
            )


MODELS = {
    "mlp": (MLP, (8, 20), True),
    "resnet_small": (ResNetSmall, (1, 3, 32, 32), True),
    "decoder": (Decoder, (1, 32, 8, 8), False),
    "dwsep": (DepthwiseSeparable, (1, 16, 16, 16), False),
}
"""BatchNorm models: name -> (class, example input shape, dynamo exporter)."""

NORM_MODELS = {"norm_block": (NormBlock, ((2, 5, 16), (2, 4, 6, 6)), 13)}
"""Models with LayerNorm/RMSNorm/GroupNorm: name -> (class, input shapes, legacy opset)."""


def bundled(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The PyTorch model behind ``models/<name>.onnx`` (eval mode) and an example input."""
    cls, shape, _ = MODELS[name]
    torch.manual_seed(0)
    model = cls()
    example = torch.randn(shape)
    randomize_batchnorm(model, example)
    return model.eval(), example


def build_all(out_dir: Path) -> list[Path]:
    """Build every sample model into ``out_dir``."""
    torch.manual_seed(0)
    written = []
    for name, (cls, shape, dynamo) in MODELS.items():
        model = cls()
        example = torch.randn(shape)
        randomize_batchnorm(model, example)
        path = out_dir / f"{name}.onnx"
        export(model, example, path, dynamo)
        written.append(path)
    for name, (norm_cls, shapes, opset) in NORM_MODELS.items():
        path = out_dir / f"{name}.onnx"
        torch.manual_seed(0)
        model = norm_cls().eval()
        export(model, tuple(torch.randn(s) for s in shapes), path, dynamo=False, opset=opset)
        written.append(path)
    return written


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
    for p in build_all(target):
        print(f"{p} {p.stat().st_size / 1024:.0f} KiB")
