"""Small PyTorch models for the tests, with random non-trivial BatchNorm statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.build import BasicBlock  # conv-BN-ReLU-conv-BN plus a projection shortcut


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running mean/var (var far from 1), random gamma (some negative) and beta; eval."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if (
                isinstance(m, nn.modules.batchnorm._BatchNorm)
                or "FrozenBatchNorm" in type(m).__name__
            ):
                if m.running_mean is None:
                    continue
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(c, generator=gen) * 2.0)
                m.running_var.copy_(torch.rand(c, generator=gen) * 3.0 + 0.2)
                if getattr(m, "weight", None) is not None:
                    sign = torch.where(torch.rand(c, generator=gen) < 0.2, -1.0, 1.0)
                    m.weight.copy_((torch.rand(c, generator=gen) * 1.5 + 0.5) * sign)
                    m.bias.copy_(torch.randn(c, generator=gen))
    return model.eval()


class ResNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.layers = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, 2))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int = 3) -> None:
        super().__init__()
        h = c * expand
        self.block = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False),
            nn.BatchNorm2d(h),
            nn.ReLU6(),
            nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False),
            nn.BatchNorm2d(h),
            nn.ReLU6(),
            nn.Conv2d(h, c, 1, bias=False),
            nn.BatchNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class MobileNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(), InvertedResidual(8)
        )
        self.classifier = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class UNetish(nn.Module):
    """Encoder, bottleneck, ConvTranspose decoder (grouped and depthwise) with a skip concat."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, 2, groups=2)
        self.up_bn = nn.BatchNorm2d(8)
        self.dw_up = nn.ConvTranspose2d(8, 8, 3, 1, 1, groups=8, bias=False)
        self.dw_bn = nn.BatchNorm2d(8)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.enc(x)
        u = F.relu(self.up_bn(self.up(self.down(e))))
        u = F.relu(self.dw_bn(self.dw_up(u)))
        return self.out(torch.cat([u, e], 1))


class BNMLP(nn.Module):
    """The classic: BatchNorm1d on the input, a BN after each hidden Linear, before ReLU."""

    def __init__(self, features: int = 12, hidden: int = 32, classes: int = 5) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm1d(features)
        self.fc1, self.bn1 = nn.Linear(features, hidden), nn.BatchNorm1d(hidden)
        self.fc2, self.bn2 = nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn0(x)
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.fc2(x)))
        return self.head(x)


class Conv3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(4, 6, 3),
            nn.BatchNorm1d(6),
            nn.ReLU(),
            nn.ConvTranspose1d(6, 4, 3, groups=2),
            nn.BatchNorm1d(4),
        )
        self.c3 = nn.Conv3d(2, 4, 3, padding=1)
        self.b3 = nn.BatchNorm3d(4)

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x), self.b3(self.c3(v))


def count_bn(model: nn.Module) -> int:
    return sum(
        1
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or "FrozenBatchNorm" in type(m).__name__
    )


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    return float((a64 - b64).abs().max() / b64.abs().max())
