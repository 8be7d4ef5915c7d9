"""``recalibrate``: recompute BatchNorm running statistics over a set of batches, exactly (float64,
Chan's parallel mean/variance merge), restoring training flags afterwards.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from rich.progress import Progress
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfuse.core.algebra import ChannelMoments
from normfuse.core.errors import InputError
from normfuse.core.report import Entry, Report
from normfuse.torchmodel.modules import (
    Where,
    call_module,
    has_stats,
    is_bn_like,
    matcher,
    module_names,
    module_stats,
    move_inputs,
)

__all__ = ["progress_bar", "recalibrate"]

logger = logging.getLogger(__name__)


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
    names = module_names(module)
    match = matcher(where)
    targets: dict[int, Any] = {}
    for m in module.modules():
        if id(m) in targets or not is_bn_like(m) or not match(names[id(m)][0], m):
            continue
        if not has_stats(m):
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
        with torch.no_grad(), progress_bar(progress, num_batches, batches) as items:
            for batch in items:
                if num_batches is not None and seen >= num_batches:
                    break
                call_module(module, move_inputs(_strip_target(batch), module))
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
def progress_bar(
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
