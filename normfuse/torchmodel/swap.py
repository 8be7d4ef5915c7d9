"""``swap``: replace BatchNorm (any ``_BatchNorm`` subclass, SyncBatchNorm, FrozenBatchNorm
look-alikes) by another kind from :mod:`normfuse.core.norms`, carrying gamma/beta, eps, statistics
where the new kind has them, dtype, device, ``requires_grad`` and the training flag. Swaps
between the BatchNorm family (frozen, SyncBatchNorm, BatchNorm) are exact in eval mode;
SyncBatchNorm records the class it came from, so swapping back restores it (subclass included).

Every candidate becomes one :class:`normfuse.core.report.Entry`: applied, or skipped with a reason.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfuse.core import norms
from normfuse.core.errors import InputError
from normfuse.core.report import Entry, Report
from normfuse.torchmodel.layers import (
    FrozenBatchNorm,
    TorchNormArgs,
    build_norm,
    is_frozen_batchnorm,
)
from normfuse.torchmodel.modules import (
    Where,
    bn_dims,
    describe_module,
    factory_kwargs,
    has_stats,
    hidden_behaviour,
    is_bn_like,
    is_lazy,
    matcher,
    module_names,
    module_stats,
    replace_modules,
)
from normfuse.torchmodel.normsig import NormSignature, norm_signature

__all__ = ["build_replacement", "resolve_groups", "swap"]

logger = logging.getLogger(__name__)


_ORIGIN = "_normfuse_origin"


def _origin_of(module: nn.Module) -> tuple[type, dict[str, Any]] | None:
    origin = module.__dict__.get(_ORIGIN)
    return origin if isinstance(origin, tuple) else None


_SHELL_SKIP = frozenset(
    {"_parameters", "_buffers", "_modules", _ORIGIN, "_non_persistent_buffers_set"}
)


def _restore_origin(src: nn.Module, cls: type, shell: dict[str, Any]) -> nn.Module:
    """Rebuild an instance of ``cls`` (the class swapped to SyncBatchNorm) around ``src``'s tensors."""
    obj: Any = object.__new__(cls)
    state = {k: (copy.copy(v) if isinstance(v, dict | set) else v) for k, v in shell.items()}
    obj.__dict__.update(state)
    obj.__dict__["_parameters"] = {}
    obj.__dict__["_buffers"] = {}
    obj.__dict__["_modules"] = {}
    obj.__dict__["_non_persistent_buffers_set"] = set()
    for name in ("weight", "bias"):  # Parameters again (FrozenBatchNorm holds buffers)
        t = getattr(src, name, None)
        if isinstance(t, nn.Parameter):
            obj.register_parameter(name, t)
        elif isinstance(t, torch.Tensor):
            obj.register_parameter(name, nn.Parameter(t.detach().clone()))
        else:
            obj.register_parameter(name, None)
    for name, b in src._buffers.items():
        if name not in ("weight", "bias"):
            obj.register_buffer(name, b)
    if "num_batches_tracked" not in obj._buffers and isinstance(src, FrozenBatchNorm):
        device = src.running_mean.device
        obj.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
    for attr in ("eps", "momentum", "affine", "track_running_stats", "num_features"):
        if hasattr(src, attr):
            obj.__dict__[attr] = getattr(src, attr)
    obj.train(src.training)
    return obj


def _copy_state(src: nn.Module, dst: nn.Module, reuse: bool) -> None:
    """Carry gamma/beta (values, ``requires_grad``) and statistics from ``src`` to ``dst``."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            s, d = getattr(src, name, None), getattr(dst, name, None)
            if not isinstance(s, torch.Tensor) or not isinstance(d, torch.Tensor):
                continue
            if reuse and isinstance(s, nn.Parameter) and isinstance(d, nn.Parameter):
                setattr(dst, name, s)  # same Parameter: optimizers keep working
                continue
            d.copy_(s)
            if isinstance(d, nn.Parameter):
                d.requires_grad_(s.requires_grad if isinstance(s, nn.Parameter) else True)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            s, d = getattr(src, name, None), getattr(dst, name, None)
            if isinstance(s, torch.Tensor) and isinstance(d, torch.Tensor):
                if reuse and s.dtype == d.dtype:
                    dst._buffers[name] = s
                else:
                    d.copy_(s)


def resolve_groups(
    module: nn.Module, channels: int, groups: int | str, allow_single: bool
) -> tuple[int | None, str | None, str | None]:
    """``(groups, reason, fix)``: the GroupNorm groups for ``module``, or why there are none."""
    if groups == "auto":
        g = norms.auto_groups(channels)
    else:
        try:
            g = int(groups)
        except (TypeError, ValueError):
            raise InputError(f"groups={groups!r} is not an int or 'auto'") from None
        if g < 1 or channels % g:
            return None, f"{channels} channels do not split into {g} groups", "use groups='auto'"
    one_d = isinstance(module, nn.BatchNorm1d | nn.LazyBatchNorm1d) or bn_dims(module) is None
    if channels // g == 1 and one_d and not allow_single:
        return (
            None,
            f"{g} groups of 1 channel on BatchNorm1d data: for (N, C) inputs GroupNorm would "
            "normalise single values and output only its bias",
            "use groups='auto' (or allow_single_channel_groups=True if inputs are (N, C, L))",
        )
    return g, None, None


def swap(
    module: nn.Module,
    to: str,
    *,
    where: Where = None,
    groups: int | str = "auto",
    allow_single_channel_groups: bool = False,
    dims: int | None = None,
    inplace: bool = False,
    example_inputs: Any = None,
) -> tuple[nn.Module, Report]:
    """Replace BatchNorm layers by another norm kind.

    Args:
        module: The model. Not modified unless ``inplace``.
        to: A kind from :mod:`normfuse.core.norms`: ``groupnorm``, ``frozen``, ``instancenorm``,
            ``layernorm`` (over channels), ``syncbn``, ``batchnorm`` (from SyncBatchNorm or
            FrozenBatchNorm) or ``identity``.
        where: Which modules (see :data:`Where`); all candidates by default.
        groups: GroupNorm groups, an int or ``"auto"`` (see :func:`normfuse.core.norms.auto_groups`).
        allow_single_channel_groups: Allow GroupNorm with one channel per group on BatchNorm1d.
        dims: Spatial rank for ``to="batchnorm"`` when the source does not say it (a SyncBatchNorm
            not made by normfuse): 0/1 -> BatchNorm1d, 2 -> BatchNorm2d, 3 -> BatchNorm3d.
        inplace: Change ``module`` itself.
        example_inputs: Inputs of one forward pass (run in eval mode, nothing kept): they tell
            the rank of what each BatchNorm1d sees; ``to="instancenorm"`` needs (N, C, L) and
            is refused for a BatchNorm1d without them.

    Returns:
        ``(model, report)``; the report marks each swap ``exact`` or not.
    """
    kind = norms.lookup(to)
    match = matcher(where)
    root = module if inplace else copy.deepcopy(module)
    report = Report(action="swap", framework="torch", before=module_stats(root))
    names = module_names(root)
    ranks = _input_ranks(root, example_inputs) if kind.name == "instancenorm" else {}
    new: dict[int, nn.Module] = {}
    for m in list(root.modules()):
        if id(m) in new or not _is_candidate(m, kind):
            continue
        name = names[id(m)][0]
        if not match(name, m):
            continue
        entry = Entry(node=name or "<root>", op_type=type(m).__name__, status="skipped")
        report.entries.append(entry)
        sig = norm_signature(m)  # what its forward computes, not what its class is called
        if isinstance(sig, str):
            entry.reason = sig
            continue
        hidden = hidden_behaviour(m)
        if hidden is not None:  # a new module would not carry them
            entry.reason, entry.fix = hidden, "remove the hooks before swapping"
            continue
        if kind.name == "instancenorm" and bn_dims(m) is None and ranks.get(id(m)) != {3}:
            seen = ranks.get(id(m))
            entry.reason = "InstanceNorm1d needs (N, C, L) inputs; " + (
                f"it sees rank {', '.join(map(str, sorted(seen)))} data"
                if seen
                else "the rank of this BatchNorm1d's input is unknown"
            )
            entry.fix = (
                "use groupnorm or layernorm" if seen else "pass example_inputs to show its input"
            )
            continue
        built = build_replacement(m, kind, entry, groups, allow_single_channel_groups, dims)
        if built is None:
            continue
        tail = sig.tail if isinstance(sig, NormSignature) else []
        if tail:  # BatchNormAct2d: the new norm, then its own drop/act as they were
            built = nn.Sequential(OrderedDict([("norm", built), *tail]))
            entry.warnings.append(
                f"its forward also runs {', '.join(n for n, _ in tail)} after the norm: kept"
            )
        new[id(m)] = built
        entry.status = "applied"
        entry.target = describe_module(built)
        entry.exact = kind.exact and _same_on_a_probe(m, built, entry)
        if kind.exact and m.training:
            entry.warnings.append(
                "exact in eval mode; in training the statistics behave as the new kind's"
            )
        if len(names[id(m)]) > 1:
            entry.warnings.append(f"shared module, also at {', '.join(names[id(m)][1:])}")
    root = replace_modules(root, new)
    report.after = module_stats(root)
    changed = [e for e in report.applied if e.exact is False]
    if changed:
        report.notes.append(
            f"{len(changed)} swap(s) change the function: fine-tune the model"
            + (
                ", or re-estimate running statistics with normfuse.recalibrate"
                if kind.has_statistics
                else " (the new norm has no running statistics to re-estimate)"
            )
        )
    if not report.entries:
        report.notes.append(f"no module to swap to {kind.name} (where={where!r})")
    return root, report


def _input_ranks(root: nn.Module, example_inputs: Any) -> dict[int, set[int]]:
    """The ranks of the tensors each module receives on ``example_inputs`` (eval mode, no
    gradients, buffers given back), by module id; empty without inputs or when the run fails."""
    if example_inputs is None:
        return {}
    from normfuse.torchmodel.modules import call_module, eval_mode, move_inputs
    from normfuse.torchmodel.untraced import kept_buffers

    seen: dict[int, set[int]] = {}

    def hook(m: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            seen.setdefault(id(m), set()).add(args[0].dim())

    handles = [m.register_forward_pre_hook(hook) for m in root.modules()]
    try:
        with torch.no_grad(), kept_buffers(root), eval_mode(root):
            call_module(root, move_inputs(example_inputs, root))
    except Exception:  # without shapes the swap is refused, with the fix
        return {}
    finally:
        for h in handles:
            h.remove()
    return seen


def _is_candidate(m: nn.Module, kind: norms.NormKind) -> bool:
    if not is_bn_like(m):
        return False
    if kind.name == "batchnorm":
        return isinstance(m, nn.SyncBatchNorm) or is_frozen_batchnorm(m)
    if kind.name == "frozen":
        return not is_frozen_batchnorm(m)
    if kind.name == "syncbn":
        return not isinstance(m, nn.SyncBatchNorm)
    return True


def build_replacement(
    m: Any,
    kind: norms.NormKind,
    entry: Entry,
    groups: int | str,
    allow_single: bool,
    dims: int | None,
) -> nn.Module | None:
    if is_lazy(m):
        entry.reason = "lazy module without parameters yet"
        entry.fix = "run one forward pass before swapping"
        return None
    channels = int(getattr(m, "num_features", 0) or m.running_mean.numel())
    eps = float(getattr(m, "eps", 1e-5))
    affine = isinstance(getattr(m, "weight", None), torch.Tensor)
    if kind.has_statistics and not has_stats(m) and kind.name != "syncbn":
        entry.reason = "no running statistics (track_running_stats=False): nothing to freeze"
        return None
    args = TorchNormArgs(
        channels=channels,
        dims=bn_dims(m),
        eps=eps,
        momentum=getattr(m, "momentum", 0.1),
        affine=affine,
        track_running_stats=has_stats(m),
        factory_kwargs=factory_kwargs(m),
    )
    if kind.name == "groupnorm":
        g, reason, fix = resolve_groups(m, channels, groups, allow_single)
        if g is None:
            entry.reason, entry.fix = reason, fix
            return None
        args = _replace(args, groups=g)
    if kind.name == "batchnorm":
        origin = _origin_of(m)
        if origin is not None:
            return _restore_origin(m, *origin)
        if dims is not None:
            args = _replace(args, dims=dims)
        elif isinstance(m, nn.SyncBatchNorm):
            entry.warnings.append("original class unknown: BatchNorm2d (pass dims= to choose)")
            args = _replace(args, dims=2)
    built: nn.Module = build_norm(kind, args)
    reuse = kind.name in ("syncbn", "batchnorm") and not is_frozen_batchnorm(m)
    _copy_state(m, built, reuse=reuse)
    if kind.name in ("syncbn", "frozen") and isinstance(m, _BatchNorm):
        # remember the class, so that swapping back restores it (subclass included)
        shell = {k: v for k, v in m.__dict__.items() if k not in _SHELL_SKIP}
        built.__dict__[_ORIGIN] = (type(m), shell)
    built.train(m.training)
    return built


def _replace(args: TorchNormArgs, **changes: Any) -> TorchNormArgs:
    import dataclasses

    return dataclasses.replace(args, **changes)


def _same_on_a_probe(old: nn.Module, new: nn.Module, entry: Entry) -> bool:
    """An exact swap is only called exact when both compute the same on a random probe
    (float64 copies in eval mode, inputs of the channel count at every rank they take)."""
    channels = getattr(old, "num_features", None)
    mean = getattr(old, "running_mean", None)
    if isinstance(mean, torch.Tensor):
        channels = int(mean.numel())
    if not isinstance(channels, int):
        entry.warnings.append("not compared (channel count unknown): exactness not shown")
        return False
    a = copy.deepcopy(old).to(torch.float64).eval()
    b = copy.deepcopy(new).to(torch.float64).eval()
    gen = torch.Generator().manual_seed(0)
    for rank in (4, 2, 3, 5):
        x = torch.randn((2, channels) + (3,) * (rank - 2), generator=gen, dtype=torch.float64)
        try:
            with torch.no_grad():
                want, got = a(x), b(x)
        except Exception:
            continue
        scale = float(want.abs().max()) or 1.0
        if got.shape == want.shape and float((got - want).abs().max()) <= 1e-9 * scale:
            return True
        entry.warnings.append("differs from the original on a probe: not exact")
        return False
    entry.warnings.append("not compared (no probe shape runs): exactness not shown")
    return False
