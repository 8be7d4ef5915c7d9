"""What the PyTorch rewrites share about modules: which modules are norms, selection by class,
name glob or callable (:data:`Where`), module replacement by identity, statistics, eval mode,
calling a module on example inputs and collecting its output tensors.

Imports: torch, :mod:`normfuse.core` and :mod:`normfuse.torchmodel.layers`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfuse.core.errors import InputError
from normfuse.core.report import ModelStats
from normfuse.torchmodel.layers import (
    FrozenBatchNorm,
    is_frozen_batchnorm,
)

__all__ = [
    "NORM_TYPES",
    "Where",
    "bn_dims",
    "call_module",
    "describe_module",
    "eval_mode",
    "factory_kwargs",
    "first_tensor",
    "has_stats",
    "hidden_behaviour",
    "is_bn_like",
    "is_lazy",
    "is_norm",
    "matcher",
    "module_names",
    "module_stats",
    "move_inputs",
    "replace_modules",
    "tensors_of",
]

logger = logging.getLogger(__name__)


Where = type | tuple[type, ...] | str | Sequence[str] | Callable[[str, nn.Module], bool] | None
"""Module selection: a class or tuple of classes (``isinstance``), a name glob or list of globs
(``"layer1.*"``, matched against the qualified module name), or ``callable(name, module)``."""


NORM_TYPES: tuple[type, ...] = (
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
    return isinstance(module, NORM_TYPES) or is_frozen_batchnorm(module)


def hidden_behaviour(module: nn.Module) -> str | None:
    """What a module does besides its ``forward`` that folding it would drop, or ``None``:
    forward hooks (its own, or global ones, which run on every module; the old
    ``torch.nn.utils.weight_norm`` is one), or a parametrized tensor
    (``torch.nn.utils.parametrizations.weight_norm``, ``spectral_norm``: the weight is computed
    at each call). torch.fx traces none of these, so without this check a fold would write
    the module's plain forward in its place."""
    from torch.nn.modules import module as torch_module
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module):
        names = ", ".join(module.parametrizations.keys())  # type: ignore[union-attr]
        return f"its {names} is parametrized (computed at each call, as weight_norm does)"
    own = bool(module._forward_hooks or module._forward_pre_hooks)
    if own or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        where = "" if own else "global "
        return f"{where}forward hooks run on it, and a fold would drop what they do"
    return None


def is_bn_like(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm) or is_frozen_batchnorm(module)


def matcher(where: Where) -> Callable[[str, nn.Module], bool]:
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
        batchnorm_nodes=sum(1 for m in module.modules() if is_bn_like(m)),
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


def module_names(root: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, m in root.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    return names


def first_tensor(module: nn.Module) -> torch.Tensor | None:
    for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        if t.is_floating_point():
            return t
    return None


def factory_kwargs(module: nn.Module) -> dict[str, Any]:
    t = first_tensor(module)
    return {"device": t.device, "dtype": t.dtype} if t is not None else {}


def bn_dims(module: nn.Module) -> int | None:
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


def has_stats(module: nn.Module) -> bool:
    return isinstance(getattr(module, "running_mean", None), torch.Tensor) and isinstance(
        getattr(module, "running_var", None), torch.Tensor
    )


def is_lazy(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params()


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
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


def tensors_of(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in tensors_of(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in tensors_of(v)]
    return []


def call_module(module: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return module(**inputs)
    if isinstance(inputs, tuple | list):
        return module(*inputs)
    return module(inputs)


def move_inputs(inputs: Any, module: nn.Module) -> Any:
    t = next(iter([*module.parameters(), *module.buffers()]), None)
    if t is None:
        return inputs
    device = t.device
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: move_inputs(v, module) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(move_inputs(v, module) for v in inputs)
    return inputs


_DEFAULT_REPR = ("momentum=0.1", "affine=True", "bias=True", "track_running_stats=True")


def describe_module(m: nn.Module) -> str:
    parts = [p for p in m.extra_repr().split(", ") if p and not p.endswith(_DEFAULT_REPR)]
    parts = [p for p in parts if p != "elementwise_affine=True"]
    return f"{type(m).__name__}({', '.join(parts)})" if parts else type(m).__name__
