"""Swap, insert and re-estimate normalization layers in PyTorch modules.

* :func:`swap`: replace BatchNorm (any ``_BatchNorm`` subclass, SyncBatchNorm, FrozenBatchNorm
  look-alikes) by another kind from :mod:`normfuse.norms`, carrying gamma/beta, eps, statistics
  where the new kind has them, dtype, device, ``requires_grad`` and the training flag. Swaps
  between the BatchNorm family (frozen, SyncBatchNorm, BatchNorm) are exact in eval mode;
  SyncBatchNorm records the class it came from, so swapping back restores it (subclass included).
* :func:`insert`: add a norm after each Conv/Linear that has none (so before its activation),
  and optionally on the model's input; new BatchNorms are the identity in eval mode.
* :func:`recalibrate`: recompute BatchNorm running statistics over a set of batches, exactly
  (float64, Chan's parallel mean/variance merge), restoring training flags afterwards.

Every candidate becomes one :class:`normfuse.report.Entry`: applied, or skipped with a reason.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from rich.progress import Progress
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfuse import norms
from normfuse.algebra import ChannelMoments
from normfuse.errors import InputError
from normfuse.report import Entry, ModelStats, Report
from normfuse.torch_layers import FrozenBatchNorm, is_frozen_batchnorm

__all__ = [
    "Where",
    "insert",
    "is_norm",
    "module_stats",
    "recalibrate",
    "replace_modules",
    "swap",
]

logger = logging.getLogger(__name__)

Where = type | tuple[type, ...] | str | Sequence[str] | Callable[[str, nn.Module], bool] | None
"""Module selection: a class or tuple of classes (``isinstance``), a name glob or list of globs
(``"layer1.*"``, matched against the qualified module name), or ``callable(name, module)``."""

_ORIGIN = "_normfuse_origin"
_NORM_TYPES: tuple[type, ...] = (
    _BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
    FrozenBatchNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def is_norm(module: nn.Module) -> bool:
    """True for any normalization layer torch or normfuse knows (and FrozenBatchNorm look-alikes)."""
    return isinstance(module, _NORM_TYPES) or is_frozen_batchnorm(module)


def _is_bn_like(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm) or is_frozen_batchnorm(module)


def _matcher(where: Where) -> Callable[[str, nn.Module], bool]:
    if where is None:
        return lambda name, m: True
    if isinstance(where, type) or (
        isinstance(where, tuple) and all(isinstance(w, type) for w in where)
    ):
        types = where
        return lambda name, m: isinstance(m, types)
    if isinstance(where, str):
        pattern = where
        return lambda name, m: fnmatch.fnmatchcase(name, pattern)
    if isinstance(where, Sequence):
        patterns = [str(p) for p in where]
        return lambda name, m: any(fnmatch.fnmatchcase(name, p) for p in patterns)
    if callable(where):
        return lambda name, m: bool(where(name, m))
    raise InputError(
        f"where={where!r} is not a module class, a name glob or a callable",
        "pass e.g. where=nn.BatchNorm2d, where='layer1.*' or where=lambda name, m: ...",
    )


def module_stats(module: nn.Module) -> ModelStats:
    """Leaf modules, norm modules, BatchNorm modules and parameter/buffer bytes of a module."""
    leaves = [m for m in module.modules() if not list(m.children())]
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return ModelStats(
        nodes=len(leaves),
        norm_nodes=sum(1 for m in module.modules() if is_norm(m)),
        batchnorm_nodes=sum(1 for m in module.modules() if _is_bn_like(m)),
        param_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
    )


def replace_modules(root: nn.Module, new: Mapping[int, nn.Module]) -> nn.Module:
    """Put ``new[id(old)]`` wherever ``old`` is referenced under ``root``; returns the new root.

    A module referenced under several names is replaced everywhere by the same new module.
    """
    if id(root) in new:
        return new[id(root)]
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if child is not None and id(child) in new:
                setattr(parent, name, new[id(child)])
    return root


def _names(root: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, m in root.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    return names


def _first_tensor(module: nn.Module) -> torch.Tensor | None:
    for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        if t.is_floating_point():
            return t
    return None


def _factory_kwargs(module: nn.Module) -> dict[str, Any]:
    t = _first_tensor(module)
    return {"device": t.device, "dtype": t.dtype} if t is not None else {}


def _bn_dims(module: nn.Module) -> int | None:
    """Spatial rank a BatchNorm-like module takes, ``None`` when it is ambiguous."""
    if isinstance(module, nn.BatchNorm3d | nn.LazyBatchNorm3d):
        return 3
    if isinstance(module, nn.BatchNorm2d | nn.LazyBatchNorm2d):
        return 2
    if isinstance(module, nn.BatchNorm1d | nn.LazyBatchNorm1d):
        return None  # (N, C) or (N, C, L)
    name = type(module).__name__
    for d in (3, 2, 1):
        if f"{d}d" in name:
            return d if d > 1 else None
    return None


def _has_stats(module: nn.Module) -> bool:
    return isinstance(getattr(module, "running_mean", None), torch.Tensor) and isinstance(
        getattr(module, "running_var", None), torch.Tensor
    )


def _is_lazy(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params()


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


def _resolve_groups(
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
    one_d = isinstance(module, nn.BatchNorm1d | nn.LazyBatchNorm1d) or _bn_dims(module) is None
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
) -> tuple[nn.Module, Report]:
    """Replace BatchNorm layers by another norm kind.

    Args:
        module: The model. Not modified unless ``inplace``.
        to: A kind from :mod:`normfuse.norms`: ``groupnorm``, ``frozen``, ``instancenorm``,
            ``layernorm`` (over channels), ``syncbn``, ``batchnorm`` (from SyncBatchNorm or
            FrozenBatchNorm) or ``identity``.
        where: Which modules (see :data:`Where`); all candidates by default.
        groups: GroupNorm groups, an int or ``"auto"`` (see :func:`normfuse.norms.auto_groups`).
        allow_single_channel_groups: Allow GroupNorm with one channel per group on BatchNorm1d.
        dims: Spatial rank for ``to="batchnorm"`` when the source does not say it (a SyncBatchNorm
            not made by normfuse): 0/1 -> BatchNorm1d, 2 -> BatchNorm2d, 3 -> BatchNorm3d.
        inplace: Change ``module`` itself.

    Returns:
        ``(model, report)``; the report marks each swap ``exact`` or not.
    """
    kind = norms.lookup(to)
    match = _matcher(where)
    root = module if inplace else copy.deepcopy(module)
    report = Report(action="swap", framework="torch", before=module_stats(root))
    names = _names(root)
    new: dict[int, nn.Module] = {}
    for m in list(root.modules()):
        if id(m) in new or not _is_candidate(m, kind):
            continue
        name = names[id(m)][0]
        if not match(name, m):
            continue
        entry = Entry(node=name or "<root>", op_type=type(m).__name__, status="skipped")
        report.entries.append(entry)
        built = _build(m, kind, entry, groups, allow_single_channel_groups, dims)
        if built is None:
            continue
        new[id(m)] = built
        entry.status = "applied"
        entry.target = _describe(built)
        entry.exact = kind.exact
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


def _is_candidate(m: nn.Module, kind: norms.NormKind) -> bool:
    if not _is_bn_like(m):
        return False
    if kind.name == "batchnorm":
        return isinstance(m, nn.SyncBatchNorm) or is_frozen_batchnorm(m)
    if kind.name == "frozen":
        return not is_frozen_batchnorm(m)
    if kind.name == "syncbn":
        return not isinstance(m, nn.SyncBatchNorm)
    return True


def _build(
    m: Any,
    kind: norms.NormKind,
    entry: Entry,
    groups: int | str,
    allow_single: bool,
    dims: int | None,
) -> nn.Module | None:
    if _is_lazy(m):
        entry.reason = "lazy module without parameters yet"
        entry.fix = "run one forward pass before swapping"
        return None
    channels = int(getattr(m, "num_features", 0) or m.running_mean.numel())
    eps = float(getattr(m, "eps", 1e-5))
    affine = isinstance(getattr(m, "weight", None), torch.Tensor)
    if kind.has_statistics and not _has_stats(m) and kind.name != "syncbn":
        entry.reason = "no running statistics (track_running_stats=False): nothing to freeze"
        return None
    args = norms.TorchNormArgs(
        channels=channels,
        dims=_bn_dims(m),
        eps=eps,
        momentum=getattr(m, "momentum", 0.1),
        affine=affine,
        track_running_stats=_has_stats(m),
        factory_kwargs=_factory_kwargs(m),
    )
    if kind.name == "groupnorm":
        g, reason, fix = _resolve_groups(m, channels, groups, allow_single)
        if g is None:
            entry.reason, entry.fix = reason, fix
            return None
        args = _replace(args, groups=g)
    if kind.name == "instancenorm" and args.dims is None:
        entry.warnings.append(
            "InstanceNorm1d needs (N, C, L) inputs; on (N, C) data use groupnorm or layernorm"
        )
    if kind.name == "batchnorm":
        origin = _origin_of(m)
        if origin is not None:
            return _restore_origin(m, *origin)
        if dims is not None:
            args = _replace(args, dims=dims)
        elif isinstance(m, nn.SyncBatchNorm):
            entry.warnings.append("original class unknown: BatchNorm2d (pass dims= to choose)")
            args = _replace(args, dims=2)
    built: nn.Module = kind.build_torch(args)
    reuse = kind.name in ("syncbn", "batchnorm") and not is_frozen_batchnorm(m)
    _copy_state(m, built, reuse=reuse)
    if kind.name in ("syncbn", "frozen") and isinstance(m, _BatchNorm):
        # remember the class, so that swapping back restores it (subclass included)
        shell = {k: v for k, v in m.__dict__.items() if k not in _SHELL_SKIP}
        built.__dict__[_ORIGIN] = (type(m), shell)
    built.train(m.training)
    return built


def _replace(args: norms.TorchNormArgs, **changes: Any) -> norms.TorchNormArgs:
    import dataclasses

    return dataclasses.replace(args, **changes)


_DEFAULT_REPR = ("momentum=0.1", "affine=True", "bias=True", "track_running_stats=True")


def _describe(m: nn.Module) -> str:
    parts = [p for p in m.extra_repr().split(", ") if p and not p.endswith(_DEFAULT_REPR)]
    parts = [p for p in parts if p != "elementwise_affine=True"]
    return f"{type(m).__name__}({', '.join(parts)})" if parts else type(m).__name__


# ----------------------------------------------------------------------------------------- insert

_LINEAR_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    flags = {id(m): m.training for m in module.modules()}
    try:
        module.eval()
    except NotImplementedError:  # torch.export's unlifted modules: already fixed in eval
        yield
        return
    try:
        yield
    finally:
        for m in module.modules():
            m.train(flags[id(m)])


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def _call(module: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return module(**inputs)
    if isinstance(inputs, tuple | list):
        return module(*inputs)
    return module(inputs)


class _Call:
    __slots__ = ("inputs", "module", "output", "shape")

    def __init__(self, module: nn.Module, inputs: list[int], output: torch.Tensor | None) -> None:
        self.module = module
        self.inputs = inputs
        self.output = id(output) if output is not None else None
        self.shape = tuple(output.shape) if output is not None else None


def _trace_calls(module: nn.Module, example_inputs: Any) -> tuple[list[_Call], set[int], set[int]]:
    """Leaf module calls in order, with the ids of their input/output tensors."""
    calls: list[_Call] = []
    keep: list[Any] = []  # keep tensors alive so their ids stay unique

    def hook(m: nn.Module, args: Any, output: Any) -> None:
        outs = _tensors(output)
        ins = _tensors(args)
        keep.append((ins, outs))
        calls.append(_Call(m, [id(t) for t in ins], outs[0] if len(outs) == 1 else None))

    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        with torch.no_grad(), _eval_mode(module):
            out = _call(module, example_inputs)
    finally:
        for h in handles:
            h.remove()
    inputs = {id(t) for t in _tensors(example_inputs)}
    outputs = {id(t) for t in _tensors(out)}
    keep.append(out)
    return calls, inputs, outputs


def _identity_norm(
    kind: norms.NormKind, channels: int, dims: int, like: Any, last: bool = False
) -> Any:
    if last and kind.name == "layernorm":  # a Linear's features are its last axis
        return nn.LayerNorm(channels, device=like.device, dtype=like.dtype)
    args = norms.TorchNormArgs(
        channels=channels,
        dims=dims,
        groups=norms.auto_groups(channels),
        factory_kwargs={"device": like.device, "dtype": like.dtype},
    )
    m: Any = kind.build_torch(args)
    if _has_stats(m):
        with torch.no_grad():
            # (x - 0) / sqrt((1 - eps) + eps) * 1 + 0 = x: the identity in eval mode
            m.running_var.fill_(1.0 - float(getattr(m, "eps", 0.0)))
    return m


def insert(
    module: nn.Module,
    example_inputs: Any,
    *,
    norm: str = "batchnorm",
    after: Where = _LINEAR_TYPES,
    input_norm: bool = False,
    inplace: bool = False,
) -> tuple[nn.Module, Report]:
    """Add a norm after each Conv/Linear that has none, and optionally on the input.

    One forward pass on ``example_inputs`` (in eval mode, without gradients) shows which
    modules run, in what order, on which tensors and with what shapes; no tracing is needed.
    Each selected op whose output does not go straight into a norm, and is not a model output,
    becomes ``nn.Sequential(op=<op>, norm=<norm>)`` under the same name, so the norm comes
    before whatever activation follows. New BatchNorm/FrozenBatchNorm layers are the identity
    in eval mode (weight 1, bias 0, mean 0, var ``1 - eps``); other kinds normalise per sample
    and change the function.

    Args:
        module: The model. Not modified unless ``inplace``.
        example_inputs: A tensor, a tuple of positional inputs or a dict of keyword inputs.
        norm: The kind to insert (``batchnorm``, ``frozen``, ``groupnorm``, ``layernorm``,
            ``instancenorm``).
        after: Which ops get a norm (see :data:`Where`); Conv and Linear layers by default.
        input_norm: Also add a norm in front of the first op that reads a model input (``bn0``).
        inplace: Change ``module`` itself.

    Returns:
        ``(model, report)``; each new layer is one entry.
    """
    kind = norms.lookup(norm)
    if kind.name in ("identity", "syncbn"):
        raise InputError(f"insert makes no sense with norm={kind.name!r}", "use batchnorm")
    root = module if inplace else copy.deepcopy(module)
    report = Report(action="insert", framework="torch", before=module_stats(root))
    calls, model_inputs, model_outputs = _trace_calls(root, _move(example_inputs, root))
    names = _names(root)
    match = _matcher(after)
    consumers: dict[int, list[_Call]] = {}
    for c in calls:
        for t in c.inputs:
            consumers.setdefault(t, []).append(c)
    wrapped: dict[int, nn.Module] = {}
    seen: set[int] = set()
    first_input_op: _Call | None = None
    for c in calls:
        m = c.module
        if not isinstance(m, _LINEAR_TYPES):
            continue
        if first_input_op is None and any(t in model_inputs for t in c.inputs):
            first_input_op = c
        if id(m) in seen or not match(names[id(m)][0], m):
            continue
        seen.add(id(m))
        name = names[id(m)][0]
        entry = Entry(node=name, op_type=type(m).__name__, status="skipped", direction="after")
        report.entries.append(entry)
        sites = [s for s in calls if s.module is m]
        reason = _insert_refusal(m, sites, consumers, model_outputs, kind)
        if reason is not None:
            entry.reason, entry.fix = reason
            continue
        rank = len(sites[0].shape or ())
        channels = m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
        new_norm = _identity_norm(
            kind, channels, max(rank - 2, 0), m.weight, last=isinstance(m, nn.Linear)
        )
        new_norm.train(m.training)
        wrapped[id(m)] = nn.Sequential(OrderedDict(op=m, norm=new_norm))
        _applied(entry, kind, f"{name}.norm = {_describe(new_norm)}")
    if input_norm:
        _insert_input_norm(report, first_input_op, names, kind, wrapped)
    root = replace_modules(root, wrapped)
    report.after = module_stats(root)
    if not report.entries:
        report.notes.append("no Conv/Linear module ran on the example inputs")
    return root, report


def _applied(entry: Entry, kind: norms.NormKind, target: str) -> None:
    entry.status = "applied"
    entry.target = target
    entry.exact = kind.has_statistics
    if not kind.has_statistics:
        entry.warnings.append(
            f"{kind.name} normalises per sample: not the identity; train the model"
        )


def _insert_refusal(
    m: nn.Module,
    sites: list[_Call],
    consumers: dict[int, list[_Call]],
    model_outputs: set[int],
    kind: norms.NormKind,
) -> tuple[str, str | None] | None:
    for s in sites:
        if s.output is None:
            return "returns several tensors", None
        if s.output in model_outputs:
            return "its output is a model output (the head): no norm added", None
        users = consumers.get(s.output, [])
        if any(is_norm(u.module) for u in users):
            if len(sites) > 1:
                return "called at several places, some followed by a norm", None
            return "already followed by a norm", None
    rank = len(sites[0].shape or ())
    if isinstance(m, nn.Linear) and rank > 2 and kind.name != "layernorm":
        return (
            f"Linear output has rank {rank}: {kind.name} would normalise axis 1, not the features",
            "use norm='layernorm'",
        )
    if isinstance(m, nn.Linear) and kind.name == "instancenorm":
        return "InstanceNorm needs positions to normalise over", "use batchnorm or layernorm"
    return None


def _insert_input_norm(
    report: Report,
    first: _Call | None,
    names: dict[int, list[str]],
    kind: norms.NormKind,
    wrapped: dict[int, nn.Module],
) -> None:
    if first is None:
        report.entries.append(
            Entry("<input>", "input", "skipped", reason="no Conv/Linear reads a model input")
        )
        return
    m: Any = first.module
    name = names[id(m)][0]
    entry = Entry(f"{name} input", type(m).__name__, "skipped", direction="before")
    report.entries.append(entry)
    channels = m.in_channels if isinstance(m, nn.modules.conv._ConvNd) else m.in_features
    rank = len(first.shape or ())
    if isinstance(m, nn.Linear) and rank > 2 and kind.name != "layernorm":
        entry.reason, entry.fix = "input has rank > 2 for a Linear", "use norm='layernorm'"
        return
    new_norm = _identity_norm(
        kind, channels, max(rank - 2, 0), m.weight, last=isinstance(m, nn.Linear)
    )
    new_norm.train(m.training)
    after = wrapped.get(id(m))
    layers = OrderedDict(norm0=new_norm, op=m)
    if after is not None:
        layers["norm"] = after.norm  # one Sequential(norm0, op, norm) rather than two nested
    wrapped[id(m)] = nn.Sequential(layers)
    _applied(entry, kind, f"{name}.norm0 = {_describe(new_norm)}")


def _move(inputs: Any, module: nn.Module) -> Any:
    t = next(iter([*module.parameters(), *module.buffers()]), None)
    if t is None:
        return inputs
    device = t.device
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: _move(v, module) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(_move(v, module) for v in inputs)
    return inputs


# ----------------------------------------------------------------------------------- recalibrate


def recalibrate(
    module: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    where: Where = None,
    progress: bool | None = None,
) -> Report:
    """Recompute the running statistics of every BatchNorm from data, in place.

    Each BatchNorm runs as in training (normalising with batch statistics, so later layers see
    what they saw in training) while its input is accumulated exactly: per-channel mean and
    unbiased variance over all values of all batches, in float64, merged batch by batch with
    the parallel algorithm of Chan et al. These replace ``running_mean`` and ``running_var``
    (what PreciseBN estimates, without its averaging error); ``num_batches_tracked`` grows by
    the number of batches. Other modules (dropout, ...) stay in eval mode; every module's
    training flag is restored afterwards (momentum is never touched), gradients are not
    computed, and if a batch fails the statistics are left as they were.

    Args:
        module: The model; its BatchNorm statistics are changed in place.
        batches: An iterable of model inputs: tensors, tuples of positional inputs, dicts of
            keyword inputs, or ``(inputs, target)`` pairs from a DataLoader (see below).
        num_batches: Stop after this many batches.
        where: Which BatchNorm modules to recalibrate (see :data:`Where`).
        progress: Show a progress bar (default: when stdout is a terminal).

    A batch that is a 2-tuple/list whose second item is not a float tensor is taken as
    ``(inputs, target)`` and only ``inputs`` is fed.

    Returns:
        A report with one entry per BatchNorm: recalibrated, or skipped with the reason.
    """
    report = Report(action="recalibrate", framework="torch", before=module_stats(module))
    names = _names(module)
    match = _matcher(where)
    targets: dict[int, Any] = {}
    for m in module.modules():
        if id(m) in targets or not _is_bn_like(m) or not match(names[id(m)][0], m):
            continue
        if not _has_stats(m):
            report.entries.append(
                Entry(
                    names[id(m)][0],
                    type(m).__name__,
                    "skipped",
                    reason="no running statistics (track_running_stats=False)",
                )
            )
            continue
        targets[id(m)] = m
    moments = {k: ChannelMoments() for k in targets}

    def pre_hook(m: nn.Module, args: Any) -> None:
        moments[id(m)].add(args[0].detach().to(torch.float64).cpu().numpy())

    flags = {id(m): m.training for m in module.modules()}
    saved = {
        k: {n: b.clone() for n, b in m.named_buffers(recurse=False)} for k, m in targets.items()
    }
    handles = [m.register_forward_pre_hook(pre_hook) for m in targets.values()]
    seen = 0
    try:
        module.eval()
        for m in targets.values():
            if isinstance(m, _BatchNorm):
                m.train()
        with torch.no_grad(), _progress(progress, num_batches, batches) as items:
            for batch in items:
                if num_batches is not None and seen >= num_batches:
                    break
                _call(module, _move(_strip_target(batch), module))
                seen += 1
    finally:
        for h in handles:
            h.remove()
        for m in module.modules():
            m.train(flags[id(m)])
        with torch.no_grad():  # undo the updates BatchNorm made itself in training mode
            for k, m in targets.items():
                for n, b in m.named_buffers(recurse=False):
                    b.copy_(saved[k][n])
    if seen == 0:
        raise InputError("recalibrate got no batches", "pass an iterable of model inputs")
    with torch.no_grad():
        for k, m in targets.items():
            name = names[k][0]
            acc = moments[k]
            entry = Entry(name, type(m).__name__, "skipped")
            report.entries.append(entry)
            if acc.mean is None or acc.m2 is None:
                entry.reason = "never called on these batches"
                continue
            m.running_mean.copy_(torch.from_numpy(acc.mean).to(m.running_mean))
            m.running_var.copy_(
                torch.from_numpy(acc.var(ddof=1)).to(m.running_var)
            )  # as PyTorch keeps it
            counter = getattr(m, "num_batches_tracked", None)
            if isinstance(counter, torch.Tensor):
                counter.add_(seen)
            entry.status = "applied"
            entry.target = f"statistics over {acc.n} values per channel"
    report.after = module_stats(module)
    report.notes.append(f"{seen} batch(es)")
    return report


def _strip_target(batch: Any) -> Any:
    if (
        isinstance(batch, tuple | list)
        and len(batch) == 2
        and not (isinstance(batch[1], torch.Tensor) and batch[1].is_floating_point())
    ):
        return batch[0]
    return batch


@contextlib.contextmanager
def _progress(
    show: bool | None, total: int | None, items: Iterable[Any]
) -> Iterator[Iterable[Any]]:
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(transient=True, disable=show is False) as bar:
        if show is None and not bar.console.is_terminal:
            bar.disable = True
        task = bar.add_task("recalibrating", total=total)

        def walk() -> Iterator[Any]:
            for item in items:
                yield item
                bar.advance(task)

        yield walk()
