"""The table of norm kinds that ``swap`` and ``insert`` can write.

Each kind has a name (looked up case- and punctuation-insensitively, with aliases), whether it
keeps the function of an inference-mode BatchNorm exactly, and a torch factory that builds it
channels first (``num_channels`` first, channel axis 1, as every ``torch.nn`` norm and timm's
norm layers). torch is imported only inside the factories.

GroupNorm groups: ``groups="auto"`` picks the largest divisor ``g`` of ``C`` with ``g <= 32``
(the default of Wu and He, 2018) that leaves at least :data:`MIN_CHANNELS_PER_GROUP` channels
per group, and ``g = 1`` (one group, a LayerNorm over channels and positions) when no divisor
does. With one channel per group, GroupNorm normalises each channel of each sample on its own:
on ``(N, C)`` data (one value per channel) every output equals the bias and the signal is gone,
so that is refused unless asked for.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from typing import Any

from normfuse.errors import InputError

__all__ = [
    "KINDS",
    "MAX_GROUPS",
    "MIN_CHANNELS_PER_GROUP",
    "NormKind",
    "TorchNormArgs",
    "auto_groups",
    "lookup",
]

logger = logging.getLogger(__name__)

MAX_GROUPS = 32
"""The most groups ``groups="auto"`` chooses."""

MIN_CHANNELS_PER_GROUP = 4
"""The fewest channels per group ``groups="auto"`` accepts (unless ``C`` itself is smaller)."""


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
    from torch import nn

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
    from normfuse.torch_layers import FrozenBatchNorm

    return FrozenBatchNorm(a.channels, eps=a.eps, **a.factory_kwargs)


def _groupnorm(a: TorchNormArgs) -> Any:
    from torch import nn

    return nn.GroupNorm(a.groups, a.channels, eps=a.eps, affine=a.affine, **a.factory_kwargs)


def _instancenorm(a: TorchNormArgs) -> Any:
    from torch import nn

    cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}.get(
        a.dims if a.dims is not None else 1, nn.InstanceNorm2d
    )
    return cls(a.channels, eps=a.eps, affine=a.affine, **a.factory_kwargs)


def _layernorm(a: TorchNormArgs) -> Any:
    from normfuse.torch_layers import ChannelLayerNorm

    return ChannelLayerNorm(a.channels, eps=a.eps, elementwise_affine=a.affine, **a.factory_kwargs)


def _syncbn(a: TorchNormArgs) -> Any:
    from torch import nn

    return nn.SyncBatchNorm(
        a.channels,
        eps=a.eps,
        momentum=a.momentum,
        affine=a.affine,
        track_running_stats=a.track_running_stats,
        **a.factory_kwargs,
    )


def _identity(a: TorchNormArgs) -> Any:
    from torch import nn

    return nn.Identity()


@dataclasses.dataclass(frozen=True)
class NormKind:
    """One norm kind.

    Attributes:
        name: Canonical name (what reports print).
        aliases: Other accepted names.
        summary: One line for help texts.
        exact: Replacing an inference-mode BatchNorm by this kind keeps the function exactly.
        per_sample: Statistics are per sample: works with batch size 1 in training.
        has_statistics: It keeps running statistics (they are copied over on a swap).
        onnx_op: The fused ONNX op, if there is one.
        onnx_min_opset: The opset that op needs.
        build_torch: The torch factory.
    """

    name: str
    aliases: tuple[str, ...]
    summary: str
    exact: bool
    per_sample: bool
    has_statistics: bool
    onnx_op: str | None
    onnx_min_opset: int | None
    build_torch: Callable[[TorchNormArgs], Any]


KINDS: dict[str, NormKind] = {
    k.name: k
    for k in (
        NormKind(
            "batchnorm",
            ("bn", "batchnorm1d", "batchnorm2d", "batchnorm3d"),
            "BatchNorm (from SyncBatchNorm or FrozenBatchNorm: the original class when known)",
            True,
            False,
            True,
            "BatchNormalization",
            1,
            _batchnorm,
        ),
        NormKind(
            "frozen",
            ("frozenbn", "frozenbatchnorm", "frozenbatchnorm2d"),
            "BatchNorm with fixed statistics and affine (buffers only): exact in eval",
            True,
            True,
            True,
            None,
            None,
            _frozen,
        ),
        NormKind(
            "groupnorm",
            ("gn",),
            "GroupNorm, per-sample statistics over channel groups (groups=N or 'auto')",
            False,
            True,
            False,
            "GroupNormalization",
            18,
            _groupnorm,
        ),
        NormKind(
            "instancenorm",
            ("in", "instancenorm1d", "instancenorm2d", "instancenorm3d"),
            "InstanceNorm with affine, per-sample and per-channel statistics over positions",
            False,
            True,
            False,
            "InstanceNormalization",
            6,
            _instancenorm,
        ),
        NormKind(
            "layernorm",
            ("ln", "layernorm2d", "channellayernorm"),
            "LayerNorm over the channels at each position (ConvNeXt's LayerNorm2d)",
            False,
            True,
            False,
            "LayerNormalization",
            17,
            _layernorm,
        ),
        NormKind(
            "syncbn",
            ("syncbatchnorm",),
            "SyncBatchNorm (statistics synchronised across processes in training): exact in eval",
            True,
            False,
            True,
            "BatchNormalization",
            1,
            _syncbn,
        ),
        NormKind(
            "identity",
            ("none", "remove"),
            "removes the norm (nn.Identity)",
            False,
            True,
            False,
            None,
            None,
            _identity,
        ),
    )
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_KEY = {_key(a): k for k in KINDS.values() for a in (k.name, *k.aliases)}


def lookup(name: str) -> NormKind:
    """The kind called ``name`` ("GroupNorm", "group_norm", "gn" all work).

    Raises:
        InputError: Unknown name; the message lists the known ones.
    """
    kind = _BY_KEY.get(_key(str(name)))
    if kind is None:
        raise InputError(
            f"unknown norm kind {name!r}",
            f"use one of {', '.join(KINDS)}",
        )
    return kind


def auto_groups(
    channels: int,
    max_groups: int = MAX_GROUPS,
    min_channels_per_group: int = MIN_CHANNELS_PER_GROUP,
) -> int:
    """The largest divisor of ``channels`` not above ``max_groups`` that leaves at least
    ``min_channels_per_group`` channels per group; 1 when none does.

    >>> auto_groups(256), auto_groups(64), auto_groups(24), auto_groups(3)
    (32, 16, 6, 1)
    """
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0 and channels // g >= min_channels_per_group:
            return g
    return 1
