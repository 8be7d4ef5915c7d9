"""Norm layers that PyTorch lacks, channels first like every ``torch.nn`` norm.

* :class:`FrozenBatchNorm`: BatchNorm with fixed statistics and affine, stored as buffers, for any
  rank (``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ...). It calls the same kernel as an
  ``nn.BatchNorm*d`` in eval mode, so swapping one for the other keeps outputs bit for bit.
* :class:`ChannelLayerNorm`: LayerNorm over the channel axis at each position (ConvNeXt's
  ``LayerNorm2d``), for any rank.

This module imports torch; the rest of normfuse imports it only when torch is needed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normfuse.core.norms import NormKind

__all__ = [
    "ChannelLayerNorm",
    "FrozenBatchNorm",
    "TorchNormArgs",
    "build_norm",
    "is_frozen_batchnorm",
]

logger = logging.getLogger(__name__)


class FrozenBatchNorm(nn.Module):
    """BatchNorm whose statistics and affine never change: ``y = (x - mean) / sqrt(var + eps) * w + b``.

    All four tensors are buffers: no parameter trains, and ``model.train()`` does not make it
    use batch statistics. The channel axis is 1, any rank >= 2.

    Args:
        num_features: Number of channels ``C``.
        eps: Added to the variance.
        device: Device of the buffers.
        dtype: Dtype of the buffers.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # a BatchNorm state dict loads into a FrozenBatchNorm: its counter has no meaning here
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (channels on axis 1) with the frozen statistics."""
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis (1) at every position, as ConvNeXt's ``LayerNorm2d``.

    For ``(N, C)`` inputs it is a plain LayerNorm over ``C``; for ``(N, C, *spatial)`` it
    normalises the ``C`` values at each spatial position.

    Args:
        num_channels: Number of channels ``C``.
        eps: Added to the variance.
        elementwise_affine: Learn a per-channel ``weight`` and ``bias``.
        device: Device of the parameters.
        dtype: Dtype of the parameters.
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_channels,
            eps=eps,
            elementwise_affine=elementwise_affine,
            device=device,
            dtype=dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over axis 1."""
        y = F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)


_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """True for :class:`FrozenBatchNorm` and look-alikes such as torchvision's ``FrozenBatchNorm2d``.

    A look-alike has "FrozenBatchNorm" in its class name, the four buffers ``weight``, ``bias``,
    ``running_mean``, ``running_var`` and a float ``eps``.
    """
    if isinstance(module, FrozenBatchNorm):
        return True
    if "FrozenBatchNorm" not in type(module).__name__:
        return False
    buffers = dict(module.named_buffers(recurse=False))
    return all(isinstance(buffers.get(n), torch.Tensor) for n in _FROZEN_BUFFERS) and isinstance(
        getattr(module, "eps", None), (float, int)
    )


@dataclasses.dataclass(frozen=True)
class TorchNormArgs:
    """What a torch factory needs to build a norm for ``channels`` channels.

    Attributes:
        channels: Number of channels ``C``.
        dims: Spatial rank of the data (0 for ``(N, C)``, 1 for ``(N, C, L)``, 2, 3), or
            ``None`` when unknown (BatchNorm1d takes both ``(N, C)`` and ``(N, C, L)``).
        eps: Added to the variance.
        momentum: Running-statistics momentum (BatchNorm kinds).
        affine: Learn gamma/beta.
        track_running_stats: Keep running statistics (BatchNorm kinds).
        groups: GroupNorm groups, already resolved to an int.
        factory_kwargs: ``device`` and ``dtype``.
    """

    channels: int
    dims: int | None = 2
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    groups: int = 1
    factory_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def _batchnorm(a: TorchNormArgs) -> Any:
    cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}.get(
        a.dims if a.dims is not None else 1, nn.BatchNorm2d
    )
    return cls(
        a.channels,
        eps=a.eps,
        momentum=a.momentum,
        affine=a.affine,
        track_running_stats=a.track_running_stats,
        **a.factory_kwargs,
    )


def _frozen(a: TorchNormArgs) -> Any:
    return FrozenBatchNorm(a.channels, eps=a.eps, **a.factory_kwargs)


def _groupnorm(a: TorchNormArgs) -> Any:
    return nn.GroupNorm(a.groups, a.channels, eps=a.eps, affine=a.affine, **a.factory_kwargs)


def _instancenorm(a: TorchNormArgs) -> Any:
    cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}.get(
        a.dims if a.dims is not None else 1, nn.InstanceNorm2d
    )
    return cls(a.channels, eps=a.eps, affine=a.affine, **a.factory_kwargs)


def _layernorm(a: TorchNormArgs) -> Any:
    return ChannelLayerNorm(a.channels, eps=a.eps, elementwise_affine=a.affine, **a.factory_kwargs)


def _syncbn(a: TorchNormArgs) -> Any:
    return nn.SyncBatchNorm(
        a.channels,
        eps=a.eps,
        momentum=a.momentum,
        affine=a.affine,
        track_running_stats=a.track_running_stats,
        **a.factory_kwargs,
    )


def _identity(a: TorchNormArgs) -> Any:
    return nn.Identity()


_FACTORIES: dict[str, Callable[[TorchNormArgs], nn.Module]] = {
    "batchnorm": _batchnorm,
    "frozen": _frozen,
    "groupnorm": _groupnorm,
    "instancenorm": _instancenorm,
    "layernorm": _layernorm,
    "syncbn": _syncbn,
    "identity": _identity,
}


def build_norm(kind: NormKind, args: TorchNormArgs) -> nn.Module:
    """A torch module of ``kind`` for ``args`` (channels first, channel axis 1)."""
    return _FACTORIES[kind.name](args)
