"""Small torchvision-style CNN families, written here (torchvision is not a dependency).

Each follows its family's block structure at a tiny width, so exported graphs have the same
patterns as the real networks: ResNet bottlenecks, MobileNet V2 inverted residuals, MobileNet
V3 blocks with squeeze-excitation and hardswish, EfficientNet MBConv with SiLU, RegNet-X group
convolutions, ShuffleNet V2 channel split and shuffle, MnasNet 5x5 blocks, VGG with BN, and a
DeepLabV3-style ASPP head with dilated convolutions.
"""

from __future__ import annotations

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
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, s, d * (k - 1) // 2, dilation=d, groups=g, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def vgg_features(cfg: list[int | str]) -> nn.Sequential:
    """VGG's feature stack: conv-BN-ReLU per number, a 2x2 max-pool per "M"."""
    layers: list[nn.Module] = []
    cin = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers.append(conv_bn(cin, int(v)))
            cin = int(v)
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, s: int = 1) -> None:
        super().__init__()
        cout = mid * 4
        self.body = nn.Sequential(
            conv_bn(cin, mid, 1), conv_bn(mid, mid, 3, s), conv_bn(mid, cout, 1, act=None)
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
    ) -> None:
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
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


class ResNet50(nn.Module):
    """The ResNet-50 layout (bottlenecks 3-4-6-3, widths 64-2048): 25.6 M parameters, ~100 MB."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1))
        blocks: list[nn.Module] = []
        cin = 64
        for mid, n, s in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(n):
                blocks.append(Bottleneck(cin, mid, s if i == 0 else 1))
                cin = mid * 4
        self.layers = nn.Sequential(*blocks)
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
