"""``recalibrate``: recompute BatchNorm running statistics over data, exactly, in one process or
across ``torch.distributed`` processes.

During the pass every selected norm normalises each batch with that batch's own statistics (what
BatchNorm does in training, so later layers see what they saw in training), and each batch's
per-channel count, mean and sum of squared deviations are merged batch by batch in float64 with
Chan's parallel algorithm (:class:`normfuse.core.algebra.ChannelMoments`). Only the norms change
mode, and only themselves: torch's own BatchNorm layers run their training forward (bit for bit
what ``update_bn``'s pass computes) with momentum 1, so that after each call their buffers hold
that batch's mean and unbiased variance as their kernel computed them (no extra pass over the
data; rounded to float32 in a float32 model, about 1e-7 relative), read by a forward hook; every
other norm stays in eval and a pre-hook measures its input on a float64 copy (two passes) and
writes the batch's statistics, rounded, into its buffers, so that a ``SyncBatchNorm`` does not
synchronise per batch (its training forward needs a GPU), and subclasses whose forward does more
(timm's ``BatchNormAct2d``: drop and act children stay in eval) or that keep plain buffers
(``FrozenBatchNorm``) work alike, once their eval forward is read (:mod:`normsig`) and found to
normalise with those buffers. Momentum, buffers and flags are put back afterwards. Dropout and
every other module stay in eval. Across processes the per-rank ``(n, mean, M2)`` are
all-gathered in float64 and merged in rank order, so every rank ends with the same statistics,
equal to one process's over the union of the data.

Imports: torch, numpy, rich, :mod:`normfuse.core` and :mod:`normfuse.torchmodel`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfuse.core.algebra import Affine, ChannelMoments
from normfuse.core.errors import InputError
from normfuse.core.report import Entry, Report
from normfuse.runtime.recalib_workers import batch_progress
from normfuse.torchmodel.layers import FrozenBatchNorm
from normfuse.torchmodel.modules import (
    Where,
    call_module,
    has_stats,
    is_bn_like,
    matcher,
    module_names,
    module_stats,
    move_inputs,
    tensors_of,
)
from normfuse.torchmodel.normsig import NormSignature, norm_signature

__all__ = ["Estimator", "batch_moments", "recalibrate", "unwrap"]

logger = logging.getLogger(__name__)

Estimator = Literal["population", "unbiased"]
"""``population``: ``var = M2 / n`` (what normalises the data to unit variance, what ONNX
recalibration writes); ``unbiased``: ``var = M2 / (n - 1)``, what PyTorch keeps in
``running_var`` in training. ``M2 = sum (x - mean)^2`` over all ``n`` values of a channel."""

_PLAIN_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward}


def recalibrate(
    module: nn.Module,
    data: Iterable[Any],
    *,
    num_batches: int | None = None,
    num_samples: int | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    where: Where = None,
    estimator: Estimator = "unbiased",
    progress: bool | None = True,
    distributed: bool | Literal["auto"] = "auto",
) -> Report:
    """Recompute the running statistics of every BatchNorm from data, in place (module docstring).

    Args:
        module: The model, also inside ``DistributedDataParallel`` or ``torch.compile`` (the
            wrapped module runs, eagerly). Its norms' statistics change in place.
        data: Any iterable of batches, a ``DataLoader`` with workers included; one batch is
            held at a time. A tensor is the input; a tuple or list gives its first element (the
            ``(inputs, target)`` of a DataLoader); a dict is passed as keyword inputs.
        num_batches: Stop after this many batches (per process).
        num_samples: Stop after this many samples (the batches' first dimension), over all
            processes: each process takes its share and the last batch is cut to fit.
        forward_fn: ``forward_fn(model, batch)`` runs the model on a batch of any other form.
        where: Which norms to recalibrate (see :data:`normfuse.torchmodel.modules.Where`).
        estimator: The variance written to ``running_var``: ``"unbiased"`` (``M2 / (n - 1)``,
            PyTorch's convention and the default) or ``"population"`` (``M2 / n``).
        progress: A progress bar with batches/s and samples (on rank 0, on a terminal).
        distributed: ``"auto"``: merge across processes when ``torch.distributed`` is
            initialised with more than one; ``True``: require it; ``False``: this process only.

    Returns:
        A report with one entry per norm (recalibrated, or skipped with the reason) and an undo
        handle: ``report.restore()``, or ``with normfuse.recalibrate(...):`` to evaluate and
        put the previous statistics back on exit.

    Raises:
        InputError: bad arguments, no batches, a batch of a form that needs ``forward_fn``.
        Exception: whatever a batch raised, its message prefixed with the batch index; the
            statistics, flags and buffers are then as they were.
    """
    if estimator not in ("population", "unbiased"):
        raise InputError(f"estimator={estimator!r} is not known", "use 'unbiased' or 'population'")
    for label, value in (("num_batches", num_batches), ("num_samples", num_samples)):
        if value is not None and value < 1:
            raise InputError(f"{label}={value} must be at least 1")
    root, wrapper = unwrap(module)
    group = _process_group(distributed)
    rank, world = (0, 1) if group is None else (_dist().get_rank(), _dist().get_world_size())
    report = Report(action="recalibrate", framework="torch", before=module_stats(root))
    if wrapper:
        report.notes.append(f"ran the module inside {wrapper}, eagerly")
    flags = {id(m): m.training for m in root.modules()}
    run = _Run(root, report, where, estimator)
    try:
        root.eval()
        run.select()
        run.hook()
        quota = None
        if num_samples is not None:
            quota = num_samples // world + (1 if rank < num_samples % world else 0)
        with torch.no_grad():
            run.loop(data, num_batches, quota, forward_fn, progress is not False and rank == 0)
    except BaseException as exc:
        run.close()
        run.put_back()
        _restore_flags(root, flags)
        if run.failed_at is not None:
            _name_batch(exc, run.failed_at)
        raise
    run.close()
    run.put_back()
    _restore_flags(root, flags)
    batches, samples = run.batches, run.samples
    if group is not None:
        batches, samples = run.merge_ranks(group)
        report.notes.append(f"merged exactly over {world} processes")
    if batches == 0:
        raise InputError("recalibrate got no batches", "pass an iterable of model inputs")
    run.write(batches)
    report.after = module_stats(root)
    report.notes.append(f"{batches} batch(es), {samples} sample(s), {estimator} variance")
    report.undo = run.undo_handle()
    return report


def unwrap(module: nn.Module) -> tuple[nn.Module, str | None]:
    """The module a ``DistributedDataParallel``/``DataParallel`` or ``torch.compile`` wrapper
    runs, and the wrapper's name (``None`` when not wrapped)."""
    names: list[str] = []
    while True:
        inner = getattr(module, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            names.append("torch.compile")
            module = inner
            continue
        if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel):
            names.append(type(module).__name__)
            module = module.module
            continue
        return module, " and ".join(names) or None


def batch_moments(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count per channel, mean and sum of squared deviations of ``x`` (``(N, C, ...)``), float64.

    Two passes over one float64 copy: the mean, then the deviations from it (subtracted in
    place) summed as a squared 2-norm; exact to float64 rounding, no cancellation.
    """
    c = x.shape[1]
    n = x.numel() // c if c else 0
    dims = [0, *range(2, x.ndim)]
    xd = x.detach().to(torch.float64, copy=True)
    mean = xd.mean(dims)
    xd.sub_(mean.view(1, c, *([1] * (x.ndim - 2))))
    return n, mean, torch.linalg.vector_norm(xd, dim=dims).square()


@dataclasses.dataclass
class _Target:
    name: str
    module: nn.Module
    moments: ChannelMoments = dataclasses.field(default_factory=ChannelMoments)
    calls: int = 0  # calls in the current batch
    most_calls: int = 0
    own: bool = False  # torch's own BatchNorm: its training forward measures the batch
    momentum: Any = None


class _Run:
    """The state of one recalibration: targets, saved buffers, hooks, counts."""

    def __init__(self, root: nn.Module, report: Report, where: Where, estimator: str) -> None:
        self.root, self.report, self.where, self.estimator = root, report, where, estimator
        self.targets: dict[int, _Target] = {}
        self.saved: dict[int, dict[str, torch.Tensor]] = {}
        self.handles: list[Any] = []
        self.batches = self.samples = 0
        self.failed_at: int | None = None

    def select(self) -> None:
        names = module_names(self.root)
        match = matcher(self.where)
        for m in self.root.modules():
            name = names[id(m)][0]
            if id(m) in self.targets or not is_bn_like(m) or not match(name, m):
                continue
            reason = _why_not(m)
            if reason is not None:
                self.report.entries.append(Entry(name, type(m).__name__, "skipped", reason=reason))
                continue
            target = self.targets[id(m)] = _Target(name, m)
            if type(m).forward is _BatchNorm.forward and not list(m.children()):
                m.training = True  # torch's own forward, in training: bit for bit update_bn's
                if m.running_mean.dtype in (torch.float32, torch.float64):
                    target.own, target.momentum = True, m.momentum
                    m.momentum = 1.0  # type: ignore[assignment]  # buffers: the batch's statistics
            self.saved[id(m)] = {
                n: b.detach().clone() for n, b in m.named_buffers(recurse=False) if b is not None
            }

    def hook(self) -> None:
        def pre_hook(m: nn.Module, args: Any) -> None:
            target = self.targets[id(m)]
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.ndim < 2:
                raise InputError(f"norm '{target.name}' was called without an (N, C, ...) tensor")
            if target.own:  # the training forward computes the batch's statistics itself
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                return
            n, mean, m2 = batch_moments(x)
            if n == 0:
                return
            target.moments.merge(n, mean.cpu().numpy(), m2.cpu().numpy())
            target.calls += 1
            if not m.training:  # normalise with its own statistics (biased, as in training)
                m.running_mean.copy_(mean)
                m.running_var.copy_(m2 / n)

        def post_hook(m: nn.Module, args: Any, output: Any) -> None:
            """torch's BatchNorm with momentum 1 left the batch's mean and unbiased variance in
            its buffers (its kernel's, rounded to the buffers' dtype: about 1e-7 relative in
            float32): merged across batches in float64 (Chan et al.)."""
            target = self.targets[id(m)]
            x = args[0]
            c = x.shape[1]
            n = x.numel() // c if c else 0
            if n < 2:
                return
            mean = m.running_mean.detach().to(torch.float64).cpu().numpy()
            var = m.running_var.detach().to(torch.float64).cpu().numpy()
            target.moments.merge(n, mean, var * (n - 1))
            target.calls += 1

        self.handles = [t.module.register_forward_pre_hook(pre_hook) for t in self.targets.values()]
        self.handles += [
            t.module.register_forward_hook(post_hook) for t in self.targets.values() if t.own
        ]

    def loop(
        self,
        data: Iterable[Any],
        num_batches: int | None,
        quota: int | None,
        forward_fn: Callable[[nn.Module, Any], Any] | None,
        show: bool,
    ) -> None:
        total = num_batches
        if total is None and quota is None and hasattr(data, "__len__"):
            total = len(data)  # type: ignore[arg-type]
        items = iter(data)
        with _Bar(show, total) as bar:
            while (num_batches is None or self.batches < num_batches) and (
                quota is None or self.samples < quota
            ):
                self.failed_at = self.batches
                try:
                    batch = next(items)
                except StopIteration:
                    break
                count = _batch_size(batch)
                if quota is not None and count is not None and self.samples + count > quota:
                    batch, count = _take(batch, quota - self.samples), quota - self.samples
                for t in self.targets.values():
                    t.calls = 0
                if forward_fn is not None:
                    forward_fn(self.root, batch)
                else:
                    call_module(self.root, move_inputs(_model_inputs(batch), self.root))
                del batch
                for t in self.targets.values():
                    t.most_calls = max(t.most_calls, t.calls)
                self.batches += 1
                self.samples += count or 0
                bar.advance(self.samples)
        self.failed_at = None

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for t in self.targets.values():
            if t.own:
                t.module.momentum = t.momentum

    def put_back(self) -> None:
        """The buffers as they were before the pass (the hooks wrote batch statistics)."""
        with torch.no_grad():
            for k, t in self.targets.items():
                for n, b in t.module.named_buffers(recurse=False):
                    if n in self.saved[k]:
                        b.copy_(self.saved[k][n])

    def merge_ranks(self, group: Any) -> tuple[int, int]:
        """All-gather every rank's ``(n, mean, M2)`` per target in float64 and merge them in
        rank order, identically on every rank; returns the global batch and sample counts."""
        dist = _dist()
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        parts = [torch.tensor([float(self.batches), float(self.samples)], dtype=torch.float64)]
        for t in self.targets.values():
            c = t.module.running_mean.numel()
            acc = t.moments
            mean = acc.mean if acc.mean is not None else np.zeros(c)
            m2 = acc.m2 if acc.m2 is not None else np.zeros(c)
            parts.append(torch.tensor([float(acc.n), float(t.most_calls)], dtype=torch.float64))
            parts += [torch.from_numpy(mean), torch.from_numpy(m2)]
        mine = torch.cat(parts).to(device)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, mine, group=group)
        rows = [g.cpu().numpy() for g in gathered]
        batches = int(sum(r[0] for r in rows))
        samples = int(sum(r[1] for r in rows))
        offset = 2
        for t in self.targets.values():
            c = t.module.running_mean.numel()
            merged = ChannelMoments()
            for r in rows:
                n = int(r[offset])
                t.most_calls = max(t.most_calls, int(r[offset + 1]))
                merged.merge(
                    n, r[offset + 2 : offset + 2 + c], r[offset + 2 + c : offset + 2 + 2 * c]
                )
            t.moments = merged
            offset += 2 + 2 * c
        return batches, samples

    def write(self, batches: int) -> None:
        ddof = 1 if self.estimator == "unbiased" else 0
        with torch.no_grad():
            for t in self.targets.values():
                m, acc = t.module, t.moments
                entry = Entry(t.name, type(m).__name__, "skipped")
                self.report.entries.append(entry)
                if acc.mean is None or acc.m2 is None:
                    entry.reason = "never called on these batches"
                    continue
                m.running_mean.copy_(torch.from_numpy(acc.mean))
                m.running_var.copy_(torch.from_numpy(acc.var(ddof=ddof)))
                counter = getattr(m, "num_batches_tracked", None)
                if isinstance(counter, torch.Tensor):
                    counter.add_(batches)
                entry.status = "applied"
                entry.target = f"statistics over {acc.n} values per channel"
                if t.most_calls > 1:
                    entry.target += f" (called {t.most_calls} times per batch: inputs pooled)"
                    entry.warnings.append(
                        f"called {t.most_calls} times per forward: its statistics are those of "
                        "all its inputs together, each call normalised with its own batch's"
                    )

    def undo_handle(self) -> Callable[[], None]:
        saved = {k: (t.module, self.saved[k]) for k, t in self.targets.items()}

        def undo() -> None:
            with torch.no_grad():
                for m, buffers in saved.values():
                    for n, b in m.named_buffers(recurse=False):
                        if n in buffers:
                            b.copy_(buffers[n])

        return undo


def _why_not(m: nn.Module) -> str | None:
    """Why the pass cannot recalibrate ``m`` by writing batch statistics into its buffers."""
    if not has_stats(m):
        return "no running statistics (track_running_stats=False)"
    if isinstance(m, FrozenBatchNorm) or type(m).forward in _PLAIN_FORWARDS:
        return None
    sig = norm_signature(m)  # what its eval forward computes, read from the forward itself
    if not isinstance(sig, NormSignature):
        return (
            f"its forward is not known to normalise with its running statistics ({sig})"
            if sig
            else "its forward is not a norm"
        )

    def f64(t: Any, fill: float) -> np.ndarray:
        if not isinstance(t, torch.Tensor):
            return np.full(m.running_mean.numel(), fill)
        return t.detach().to(torch.float64).cpu().numpy().reshape(-1)

    own = Affine.from_batchnorm(
        f64(getattr(m, "weight", None), 1.0),
        f64(getattr(m, "bias", None), 0.0),
        f64(m.running_mean, 0.0),
        f64(m.running_var, 1.0),
        float(getattr(m, "eps", 1e-5)),
    )
    if not (
        np.allclose(sig.affine.scale, own.scale, rtol=1e-6, atol=1e-9)
        and np.allclose(sig.affine.shift, own.shift, rtol=1e-6, atol=1e-9)
    ):
        return "its forward does not normalise with running_mean/running_var as BatchNorm does"
    return None


def _restore_flags(root: nn.Module, flags: dict[int, bool]) -> None:
    for m in root.modules():
        if id(m) in flags:
            m.training = flags[id(m)]


def _name_batch(exc: BaseException, index: int) -> None:
    """Put the failing batch's index into the error's message, keeping its type."""
    text = f"batch {index} failed; the statistics were left as they were"
    if isinstance(exc, KeyboardInterrupt):
        return
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{text}: {exc.args[0]}", *exc.args[1:])
    else:
        exc.add_note(text)


def _model_inputs(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor | Mapping):
        return batch
    if isinstance(batch, tuple | list) and batch:
        return batch[0]
    raise InputError(
        f"a batch of type {type(batch).__name__} is not a tensor, tuple, list or dict",
        "pass forward_fn=lambda model, batch: model(...)",
    )


def _batch_size(batch: Any) -> int | None:
    found = tensors_of(batch)
    return int(found[0].shape[0]) if found and found[0].ndim else None


def _take(batch: Any, k: int) -> Any:
    """The first ``k`` samples of every tensor in ``batch`` that has the batch's size."""
    size = _batch_size(batch)

    def cut(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v[:k] if v.ndim and v.shape[0] == size else v
        if isinstance(v, Mapping):
            return {key: cut(x) for key, x in v.items()}
        if isinstance(v, tuple | list):
            return type(v)(cut(x) for x in v)
        return v

    return cut(batch)


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def _process_group(distributed: bool | str) -> Any:
    if distributed not in (True, False, "auto"):
        raise InputError(f"distributed={distributed!r} is not known", "use 'auto', True or False")
    if distributed is False:
        return None
    dist = _dist()
    ready = dist.is_available() and dist.is_initialized()
    if not ready:
        if distributed is True:
            raise InputError(
                "distributed=True but torch.distributed is not initialised",
                "call torch.distributed.init_process_group first (torchrun does the set-up)",
            )
        return None
    if dist.get_world_size() < 2 and distributed == "auto":
        return None
    return dist.group.WORLD


class _Bar:
    """A rich progress bar with batches, batches/s and samples; nothing when not shown."""

    def __init__(self, show: bool, total: int | None) -> None:
        self.progress = batch_progress(show)  # no bar, and no stray lines, in pipes and logs
        self.task = self.progress.add_task("recalibrating", total=total, samples=0)

    def __enter__(self) -> _Bar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def advance(self, samples: int) -> None:
        self.progress.update(self.task, advance=1, samples=samples)
