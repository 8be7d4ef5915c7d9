"""``insert``: add a norm after each Conv/Linear that has none (so before its activation), and
optionally on the model's input; new BatchNorms are the identity in eval mode. Call order and
shapes come from forward hooks on the example inputs.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from normfuse.core import norms
from normfuse.core.errors import InputError
from normfuse.core.report import Entry, Report
from normfuse.torchmodel.layers import (
    TorchNormArgs,
    build_norm,
)
from normfuse.torchmodel.modules import (
    Where,
    call_module,
    describe_module,
    eval_mode,
    has_stats,
    is_norm,
    matcher,
    module_names,
    module_stats,
    move_inputs,
    replace_modules,
    tensors_of,
)

__all__ = ["insert"]

logger = logging.getLogger(__name__)


_LINEAR_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


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
        outs = tensors_of(output)
        ins = tensors_of(args)
        keep.append((ins, outs))
        calls.append(_Call(m, [id(t) for t in ins], outs[0] if len(outs) == 1 else None))

    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        with torch.no_grad(), eval_mode(module):
            out = call_module(module, example_inputs)
    finally:
        for h in handles:
            h.remove()
    inputs = {id(t) for t in tensors_of(example_inputs)}
    outputs = {id(t) for t in tensors_of(out)}
    keep.append(out)
    return calls, inputs, outputs


def _identity_norm(
    kind: norms.NormKind, channels: int, dims: int, like: Any, last: bool = False
) -> Any:
    if last and kind.name == "layernorm":  # a Linear's features are its last axis
        return nn.LayerNorm(channels, device=like.device, dtype=like.dtype)
    args = TorchNormArgs(
        channels=channels,
        dims=dims,
        groups=norms.auto_groups(channels),
        factory_kwargs={"device": like.device, "dtype": like.dtype},
    )
    m: Any = build_norm(kind, args)
    if has_stats(m):
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
    calls, model_inputs, model_outputs = _trace_calls(root, move_inputs(example_inputs, root))
    names = module_names(root)
    match = matcher(after)
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
        _applied(entry, kind, f"{name}.norm = {describe_module(new_norm)}")
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
    _applied(entry, kind, f"{name}.norm0 = {describe_module(new_norm)}")
