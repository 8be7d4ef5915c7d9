"""Small torchvision-style CNN families, written here (torchvision is not a dependency).

Each follows its family's block structure at a tiny width, so exported graphs have the same
patterns as the real networks: ResNet bottlenecks, MobileNet V2 inverted residuals, MobileNet
V3 blocks with squeeze-excitation and hardswish, EfficientNet MBConv with SiLU, RegNet-X group
convolutions, ShuffleNet V2 channel split and shuffle, MnasNet 5x5 blocks, VGG with BN, and a
DeepLabV3-style ASPP head with dilated convolutions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["FAMILIES", "build"]


def conv_bn(
    cin: int,
    cout: int,
    k: int = 3,
    s: int = 1,
    g: int = 1,
    d: int = 1,
    act: type[nn.Module] | None = nn.ReLU,
    bias: bool = False,
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, s, d * (k - 1) // 2, dilation=d, groups=g, bias=bias),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def vgg_features(cfg: list[int | str]) -> nn.Sequential:
    """VGG's feature stack: conv-BN-ReLU per number (the convs keep their bias, as
    torchvision's do), a 2x2 max-pool per "M"."""
    layers: list[nn.Module] = []
    cin = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers.append(conv_bn(cin, int(v), bias=True))
            cin = int(v)
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, s: int = 1, d: int = 1) -> None:
        super().__init__()
        cout = mid * 4
        self.body = nn.Sequential(
            conv_bn(cin, mid, 1), conv_bn(mid, mid, 3, s, d=d), conv_bn(mid, cout, 1, act=None)
        )
        self.down = conv_bn(cin, cout, 1, s, act=None) if s != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.down(x))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 7, 2), nn.MaxPool2d(3, 2, 1))
        self.layers = nn.Sequential(Bottleneck(16, 8), Bottleneck(32, 16, 2), Bottleneck(64, 16))
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(
            torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)
        )


class SqueezeExcite(nn.Module):
    def __init__(
        self,
        c: int,
        squeeze: int,
        gate: type[nn.Module] = nn.Sigmoid,
        act: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2, self.gate = (
            nn.Conv2d(c, squeeze, 1),
            act(),
            nn.Conv2d(squeeze, c, 1),
            gate(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class InvertedResidual(nn.Module):
    """MobileNet V2/V3, MnasNet and EfficientNet MBConv, by options."""

    def __init__(
        self,
        cin: int,
        cout: int,
        expand: int,
        k: int = 3,
        s: int = 1,
        act: type[nn.Module] = nn.ReLU6,
        se: int = 0,
        se_gate: type[nn.Module] = nn.Sigmoid,
        mid: int | None = None,
    ) -> None:
        super().__init__()
        mid = mid or cin * expand  # MobileNet V3 gives its expanded width outright
        layers: list[nn.Module] = []
        if mid != cin:
            layers.append(conv_bn(cin, mid, 1, act=act))
        layers.append(conv_bn(mid, mid, k, s, g=mid, act=act))
        if se:
            layers.append(
                SqueezeExcite(
                    mid, se, gate=se_gate, act=nn.ReLU if se_gate is nn.Hardsigmoid else nn.SiLU
                )
            )
        layers.append(conv_bn(mid, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = s == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, 3, 2, act=nn.ReLU6),
            InvertedResidual(16, 8, 1),
            InvertedResidual(8, 16, 6, s=2),
            InvertedResidual(16, 16, 6),
            conv_bn(16, 64, 1, act=nn.ReLU6),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class MobileNetV3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, 3, 2, act=nn.Hardswish),
            InvertedResidual(16, 16, 1, se=8, se_gate=nn.Hardsigmoid, act=nn.ReLU),
            InvertedResidual(16, 24, 4, k=5, s=2, act=nn.Hardswish, se=16, se_gate=nn.Hardsigmoid),
            conv_bn(24, 96, 1, act=nn.Hardswish),
        )
        self.classifier = nn.Sequential(nn.Linear(96, 64), nn.Hardswish(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class EfficientNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, 3, 2, act=nn.SiLU),
            InvertedResidual(16, 16, 1, act=nn.SiLU, se=4),
            InvertedResidual(16, 24, 6, s=2, act=nn.SiLU, se=4),
            InvertedResidual(24, 24, 6, k=5, act=nn.SiLU, se=6),
            conv_bn(24, 64, 1, act=nn.SiLU),
        )
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class RegNetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, s: int, group_width: int = 8) -> None:
        super().__init__()
        self.f = nn.Sequential(
            conv_bn(cin, cout, 1),
            conv_bn(cout, cout, 3, s, g=cout // group_width),
            conv_bn(cout, cout, 1, act=None),
        )
        self.proj = conv_bn(cin, cout, 1, s, act=None) if s != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(x) + self.f(x))


class RegNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2)
        self.trunk = nn.Sequential(
            RegNetBlock(16, 32, 2), RegNetBlock(32, 32, 1), RegNetBlock(32, 64, 2)
        )
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.trunk(self.stem(x)).mean((2, 3)))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, s: int) -> None:
        super().__init__()
        branch = cout // 2
        self.s = s
        if s > 1:
            self.branch1 = nn.Sequential(
                conv_bn(cin, cin, 3, s, g=cin, act=None), conv_bn(cin, branch, 1)
            )
        b2_in = cin if s > 1 else branch
        self.branch2 = nn.Sequential(
            conv_bn(b2_in, branch, 1),
            conv_bn(branch, branch, 3, s, g=branch, act=None),
            conv_bn(branch, branch, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.s == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 3, 2), nn.MaxPool2d(3, 2, 1))
        self.stages = nn.Sequential(
            ShuffleUnit(16, 32, 2), ShuffleUnit(32, 32, 1), ShuffleUnit(32, 64, 2)
        )
        self.conv5 = conv_bn(64, 128, 1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv5(self.stages(self.stem(x))).mean((2, 3)))


class MnasNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            conv_bn(3, 16, 3, 2),
            conv_bn(16, 16, 3, g=16),
            conv_bn(16, 8, 1, act=None),
            InvertedResidual(8, 16, 3, k=3, s=2, act=nn.ReLU),
            InvertedResidual(16, 24, 3, k=5, s=2, act=nn.ReLU),
            InvertedResidual(24, 24, 6, k=5, act=nn.ReLU),
            conv_bn(24, 64, 1),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layers(x).mean((2, 3)))


class VGGBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        cfg = [16, "M", 32, 32, "M", 64, 64, "M"]
        self.features = vgg_features(cfg)
        self.classifier = nn.Sequential(
            nn.Linear(64 * 4 * 4, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class DeepLabHead(nn.Module):
    """A DeepLabV3-style ASPP over a small backbone: dilated convs, image pooling, projection."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(conv_bn(3, 16, 3, 2), conv_bn(16, 32, 3, 2))
        self.aspp = nn.ModuleList(
            [conv_bn(32, 16, 1), conv_bn(32, 16, 3, d=2), conv_bn(32, 16, 3, d=3)]
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn(32, 16, 1))
        self.project = conv_bn(64, 16, 1)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        pooled = self.pool(f).expand(-1, -1, f.shape[2], f.shape[3])
        y = torch.cat([b(f) for b in self.aspp] + [pooled], dim=1)
        return self.head(self.project(y))


FAMILIES: dict[str, type[nn.Module]] = {
    "resnet": ResNet,
    "mobilenet_v2": MobileNetV2,
    "mobilenet_v3": MobileNetV3,
    "efficientnet": EfficientNet,
    "regnet": RegNet,
    "shufflenet_v2": ShuffleNetV2,
    "mnasnet": MnasNet,
    "vgg_bn": VGGBN,
    "deeplabv3": DeepLabHead,
}


def build(name: str, seed: int = 0) -> nn.Module:
    """A family member with random weights and BN statistics moved by training passes."""
    from models.build import randomize_batchnorm

    torch.manual_seed(seed)
    model = FAMILIES[name]()
    randomize_batchnorm(model, torch.randn(4, 3, 32, 32), passes=10, seed=seed)
    return model


def resnet50_layers(dilated: bool = False) -> nn.Sequential:
    """ResNet-50's bottlenecks 3-4-6-3 (widths 64-2048). ``dilated``: the segmentation
    backbone, whose last two stages trade their stride for dilation 2 and 4 (output stride 8)."""
    blocks: list[nn.Module] = []
    cin, dilation = 64, 1
    for stage, (mid, n, s) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))):
        first_d = dilation
        if dilated and stage >= 2:
            dilation, s = dilation * s, 1
        for i in range(n):
            blocks.append(Bottleneck(cin, mid, s if i == 0 else 1, first_d if i == 0 else dilation))
            cin = mid * 4
    return nn.Sequential(*blocks)


class ResNet50(nn.Module):
    """The ResNet-50 layout (bottlenecks 3-4-6-3, widths 64-2048): 25.6 M parameters, ~100 MB."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1))
        self.layers = resnet50_layers()
        self.fc = nn.Linear(2048, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(
            torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)
        )


class VGG16BN(nn.Module):
    """The VGG-16-BN layout: 13 conv-BN-ReLU, three 4096-wide linear layers (~138 M parameters)."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        cfg = [
            64,
            64,
            "M",
            128,
            128,
            "M",
            256,
            256,
            256,
            "M",
            512,
            512,
            512,
            "M",
            512,
            512,
            512,
            "M",
        ]
        self.features = vgg_features(cfg)
        self.pool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Dropout(),
            nn.Linear(4096, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class DenseLayer(nn.Module):
    """DenseNet: BN-ReLU-Conv1x1-BN-ReLU-Conv3x3, output concatenated to the input."""

    def __init__(self, cin: int, growth: int = 8, bottleneck: int = 4) -> None:
        super().__init__()
        mid = growth * bottleneck
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, mid, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(mid), nn.Conv2d(mid, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(torch.relu(self.norm1(x)))
        y = self.conv2(torch.relu(self.norm2(y)))
        return torch.cat([x, y], 1)


class DenseNet(nn.Module):
    """Stem, a dense block, a transition (BN-ReLU-Conv-Pool), a dense block, final BN."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.block1 = nn.Sequential(DenseLayer(16), DenseLayer(24))
        self.transition = nn.Sequential(
            nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 16, 1, bias=False), nn.AvgPool2d(2)
        )
        self.block2 = nn.Sequential(DenseLayer(16), DenseLayer(24))
        self.norm5 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.transition(self.block1(self.stem(x))))
        return self.fc(torch.relu(self.norm5(x)).mean((2, 3)))


class Inception(nn.Module):
    """GoogLeNet's inception block of BasicConv2d (conv-BN-ReLU) branches."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool: int) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, c1, 1)
        self.b2 = nn.Sequential(conv_bn(cin, c3r, 1), conv_bn(c3r, c3, 3))
        self.b3 = nn.Sequential(conv_bn(cin, c5r, 1), conv_bn(c5r, c5, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, pool, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            conv_bn(3, 16, 7, 2), nn.MaxPool2d(3, 2, 1), conv_bn(16, 32, 1), conv_bn(32, 48, 3)
        )
        self.inception = nn.Sequential(
            Inception(48, 16, 24, 32, 4, 8, 8), Inception(64, 32, 32, 48, 8, 16, 16)
        )
        self.fc = nn.Linear(112, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.inception(self.stem(x)).mean((2, 3)))


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channels-first LayerNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, 1, 3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(nn.functional.gelu(self.pw1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """No BatchNorm at all: LayerNorm (normalises per sample), so nothing to fold by default."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 4, 4), LayerNorm2d(32))
        self.blocks = nn.Sequential(ConvNeXtBlock(32), ConvNeXtBlock(32))
        self.head = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class FCN(nn.Module):
    """FCN: a ResNet-style backbone and a conv-BN-ReLU-dropout-conv head, upsampled."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(conv_bn(3, 16, 3, 2), Bottleneck(16, 8), Bottleneck(32, 8, 2))
        self.head = nn.Sequential(conv_bn(32, 16, 3), nn.Dropout(0.1), nn.Conv2d(16, 5, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.backbone(x))
        return nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


FAMILIES.update({"densenet": DenseNet, "googlenet": GoogLeNet, "convnext": ConvNeXt, "fcn": FCN})


# ---------------------------------------------------------------- full-size layouts
# The published torchvision configurations of the same families, built from the blocks above
# with random weights (no downloads): what the benchmarks fold, at the sizes users fold.


def _divisible(v: float, by: int = 8) -> int:
    """torchvision's ``_make_divisible``: round to a multiple of ``by``, never 10 % below."""
    new = max(by, int(v + by / 2) // by * by)
    return new + by if new < 0.9 * v else new


class Pooled(nn.Module):
    """A classifier: ``head(features(x)`` averaged over H and W``)``."""

    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features, self.head = features, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class Segmenter(nn.Module):
    """A dense predictor: the head's map upsampled bilinearly to the input size."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.backbone(x))
        return nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """DeepLabV3's atrous spatial pyramid pooling: a 1x1 branch, dilated 3x3 branches and
    image pooling, concatenated and projected."""

    def __init__(self, cin: int, rates: tuple[int, ...], cout: int = 256) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn(cin, cout, 1)] + [conv_bn(cin, cout, 3, d=r) for r in rates]
        )
        self.pool = conv_bn(cin, cout, 1)
        self.project = nn.Sequential(conv_bn(cout * (len(rates) + 2), cout, 1), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(nn.functional.adaptive_avg_pool2d(x, 1))
        pooled = pooled.expand(-1, -1, x.shape[2], x.shape[3])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


def _resnet50_backbone() -> nn.Sequential:
    return nn.Sequential(conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1), resnet50_layers(True))


def mobilenet_v2_full() -> nn.Module:
    layers: list[nn.Module] = [conv_bn(3, 32, 3, 2, act=nn.ReLU6)]
    cin = 32
    for t, c, n, s in (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ):
        for i in range(n):
            layers.append(InvertedResidual(cin, c, t, s=s if i == 0 else 1))
            cin = c
    layers.append(conv_bn(cin, 1280, 1, act=nn.ReLU6))
    return Pooled(nn.Sequential(*layers), nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000)))


def mobilenet_v3_full() -> nn.Module:
    """MobileNet V3 Large."""
    layers: list[nn.Module] = [conv_bn(3, 16, 3, 2, act=nn.Hardswish)]
    cin = 16
    for k, mid, c, se, hs, s in (
        (3, 16, 16, False, False, 1),
        (3, 64, 24, False, False, 2),
        (3, 72, 24, False, False, 1),
        (5, 72, 40, True, False, 2),
        (5, 120, 40, True, False, 1),
        (5, 120, 40, True, False, 1),
        (3, 240, 80, False, True, 2),
        (3, 200, 80, False, True, 1),
        (3, 184, 80, False, True, 1),
        (3, 184, 80, False, True, 1),
        (3, 480, 112, True, True, 1),
        (3, 672, 112, True, True, 1),
        (5, 672, 160, True, True, 2),
        (5, 960, 160, True, True, 1),
        (5, 960, 160, True, True, 1),
    ):
        act = nn.Hardswish if hs else nn.ReLU
        squeeze = _divisible(mid // 4) if se else 0
        layers.append(
            InvertedResidual(cin, c, 1, k, s, act=act, se=squeeze, se_gate=nn.Hardsigmoid, mid=mid)
        )
        cin = c
    layers.append(conv_bn(cin, 960, 1, act=nn.Hardswish))
    head = nn.Sequential(
        nn.Linear(960, 1280), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1280, 1000)
    )
    return Pooled(nn.Sequential(*layers), head)


def efficientnet_full() -> nn.Module:
    """EfficientNet-B0."""
    layers: list[nn.Module] = [conv_bn(3, 32, 3, 2, act=nn.SiLU)]
    cin = 32
    for t, k, s, c, n in (
        (1, 3, 1, 16, 1),
        (6, 3, 2, 24, 2),
        (6, 5, 2, 40, 2),
        (6, 3, 2, 80, 3),
        (6, 5, 1, 112, 3),
        (6, 5, 2, 192, 4),
        (6, 3, 1, 320, 1),
    ):
        for i in range(n):
            se = max(1, cin // 4)
            layers.append(InvertedResidual(cin, c, t, k, s if i == 0 else 1, act=nn.SiLU, se=se))
            cin = c
    layers.append(conv_bn(cin, 1280, 1, act=nn.SiLU))
    return Pooled(nn.Sequential(*layers), nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000)))


def regnet_full() -> nn.Module:
    """RegNetX-400MF: depths 1-2-7-12, widths 32-64-160-400, group width 16."""
    layers: list[nn.Module] = [conv_bn(3, 32, 3, 2)]
    cin = 32
    for depth, width in ((1, 32), (2, 64), (7, 160), (12, 400)):
        for i in range(depth):
            layers.append(RegNetBlock(cin, width, 2 if i == 0 else 1, group_width=16))
            cin = width
    return Pooled(nn.Sequential(*layers), nn.Linear(400, 1000))


def shufflenet_v2_full() -> nn.Module:
    """ShuffleNet V2 x1.0."""
    layers: list[nn.Module] = [conv_bn(3, 24, 3, 2), nn.MaxPool2d(3, 2, 1)]
    cin = 24
    for repeats, c in ((4, 116), (8, 232), (4, 464)):
        for i in range(repeats):
            layers.append(ShuffleUnit(cin, c, 2 if i == 0 else 1))
            cin = c
    layers.append(conv_bn(cin, 1024, 1))
    return Pooled(nn.Sequential(*layers), nn.Linear(1024, 1000))


def mnasnet_full() -> nn.Module:
    """MnasNet 1.0."""
    layers: list[nn.Module] = [
        conv_bn(3, 32, 3, 2),
        conv_bn(32, 32, 3, g=32),
        conv_bn(32, 16, 1, act=None),
    ]
    cin = 16
    for c, k, s, t, n in (
        (24, 3, 2, 3, 3),
        (40, 5, 2, 3, 3),
        (80, 5, 2, 6, 3),
        (96, 3, 1, 6, 2),
        (192, 5, 2, 6, 4),
        (320, 3, 1, 6, 1),
    ):
        for i in range(n):
            layers.append(InvertedResidual(cin, c, t, k, s if i == 0 else 1, act=nn.ReLU))
            cin = c
    layers.append(conv_bn(cin, 1280, 1))
    return Pooled(nn.Sequential(*layers), nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000)))


def densenet_full() -> nn.Module:
    """DenseNet-121: growth 32, blocks 6-12-24-16, transitions halving the channels."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    c = 64
    for b, n in enumerate((6, 12, 24, 16)):
        for _ in range(n):
            layers.append(DenseLayer(c, growth=32))
            c += 32
        if b < 3:
            layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False)]
            layers.append(nn.AvgPool2d(2))
            c //= 2
    layers += [nn.BatchNorm2d(c), nn.ReLU()]
    return Pooled(nn.Sequential(*layers), nn.Linear(c, 1000))


def googlenet_full() -> nn.Module:
    def pool() -> nn.Module:
        return nn.MaxPool2d(3, 2, ceil_mode=True)

    layers = [
        conv_bn(3, 64, 7, 2),
        pool(),
        conv_bn(64, 64, 1),
        conv_bn(64, 192, 3),
        pool(),
        Inception(192, 64, 96, 128, 16, 32, 32),
        Inception(256, 128, 128, 192, 32, 96, 64),
        pool(),
        Inception(480, 192, 96, 208, 16, 48, 64),
        Inception(512, 160, 112, 224, 24, 64, 64),
        Inception(512, 128, 128, 256, 24, 64, 64),
        Inception(512, 112, 144, 288, 32, 64, 64),
        Inception(528, 256, 160, 320, 32, 128, 128),
        nn.MaxPool2d(2, 2, ceil_mode=True),
        Inception(832, 256, 160, 320, 32, 128, 128),
        Inception(832, 384, 192, 384, 48, 128, 128),
    ]
    return Pooled(nn.Sequential(*layers), nn.Sequential(nn.Dropout(0.2), nn.Linear(1024, 1000)))


def convnext_full() -> nn.Module:
    """ConvNeXt-Tiny: depths 3-3-9-3, widths 96-768; random layer scales and LayerNorm affines."""
    layers: list[nn.Module] = [nn.Conv2d(3, 96, 4, 4), LayerNorm2d(96, eps=1e-6)]
    dims = (96, 192, 384, 768)
    for i, (depth, dim) in enumerate(zip((3, 3, 9, 3), dims, strict=True)):
        if i:
            layers += [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dim, 2, 2)]
        layers += [ConvNeXtBlock(dim) for _ in range(depth)]
    model = Pooled(
        nn.Sequential(*layers), nn.Sequential(nn.LayerNorm(768, eps=1e-6), nn.Linear(768, 1000))
    )
    with torch.no_grad():  # trained values, not the init's 1 / 0 / 1e-6
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
            elif isinstance(m, ConvNeXtBlock):
                m.gamma.uniform_(0.05, 1.0)
    return model


def deeplabv3_full() -> nn.Module:
    """DeepLabV3 with the dilated ResNet-50 backbone, 21 classes (no auxiliary head)."""
    head = nn.Sequential(ASPP(2048, (12, 24, 36)), conv_bn(256, 256, 3), nn.Conv2d(256, 21, 1))
    return Segmenter(_resnet50_backbone(), head)


def fcn_full() -> nn.Module:
    """FCN with the dilated ResNet-50 backbone, 21 classes (no auxiliary head)."""
    head = nn.Sequential(conv_bn(2048, 512, 3), nn.Dropout(0.1), nn.Conv2d(512, 21, 1))
    return Segmenter(_resnet50_backbone(), head)


FULL: dict[str, Callable[[], nn.Module]] = {
    "resnet": ResNet50,
    "mobilenet_v2": mobilenet_v2_full,
    "mobilenet_v3": mobilenet_v3_full,
    "efficientnet": efficientnet_full,
    "regnet": regnet_full,
    "shufflenet_v2": shufflenet_v2_full,
    "mnasnet": mnasnet_full,
    "vgg_bn": VGG16BN,
    "deeplabv3": deeplabv3_full,
    "densenet": densenet_full,
    "googlenet": googlenet_full,
    "convnext": convnext_full,
    "fcn": fcn_full,
}
"""Family -> its full-size torchvision layout (ResNet-50, MobileNet V2, MobileNet V3 Large,
EfficientNet-B0, RegNetX-400MF, ShuffleNet V2 x1.0, MnasNet 1.0, VGG-16-BN, DeepLabV3-ResNet50,
DenseNet-121, GoogLeNet, ConvNeXt-Tiny, FCN-ResNet50)."""

#: Parameter counts of torchvision's models (``weights=None``, no auxiliary heads).
TORCHVISION_PARAMETERS = {
    "resnet": 25_557_032,
    "mobilenet_v2": 3_504_872,
    "mobilenet_v3": 5_483_032,
    "efficientnet": 5_288_548,
    "regnet": 5_495_976,
    "shufflenet_v2": 2_278_604,
    "mnasnet": 4_383_312,
    "vgg_bn": 138_365_992,
    "deeplabv3": 39_638_869,
    "densenet": 7_978_856,
    "googlenet": 6_624_904,
    "convnext": 28_589_128,
    "fcn": 32_957_013,
}


def build_full(name: str, seed: int = 0, example: tuple[int, ...] = (2, 3, 64, 64)) -> nn.Module:
    """A full-size family member with random weights and BN statistics moved by training passes."""
    from models.build import randomize_batchnorm

    torch.manual_seed(seed)
    model = FULL[name]()
    randomize_batchnorm(model, torch.randn(example), passes=2, seed=seed)
    return model
