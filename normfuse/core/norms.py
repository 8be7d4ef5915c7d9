"""The table of norm kinds that ``swap`` and ``insert`` can write.

Each kind has a name (looked up case- and punctuation-insensitively, with aliases), whether it
keeps the function of an inference-mode BatchNorm exactly, and the fused ONNX op that writes it.
The torch modules of each kind are built by :func:`normfuse.torchmodel.layers.build_norm`.

Imports: :mod:`normfuse.core` only.

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

from normfuse.core.errors import InputError

__all__ = [
    "KINDS",
    "MAX_GROUPS",
    "MIN_CHANNELS_PER_GROUP",
    "NormKind",
    "auto_groups",
    "lookup",
]

logger = logging.getLogger(__name__)

MAX_GROUPS = 32
"""The most groups ``groups="auto"`` chooses."""

MIN_CHANNELS_PER_GROUP = 4
"""The fewest channels per group ``groups="auto"`` accepts (unless ``C`` itself is smaller)."""


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
    """

    name: str
    aliases: tuple[str, ...]
    summary: str
    exact: bool
    per_sample: bool
    has_statistics: bool
    onnx_op: str | None
    onnx_min_opset: int | None


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
