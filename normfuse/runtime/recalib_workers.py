"""The runtime side of ONNX ``recalibrate``: the :class:`~normfuse.onnxgraph.recalibrate.Step`
plans of :mod:`normfuse.onnxgraph.recalibrate` run with onnxruntime over streamed batches, in
this process or in worker processes, and their per-channel moments merged exactly.

* Data: a :class:`~normfuse.runtime.inputs.BatchStream` (files read one batch at a time, each
  checked: names, dtypes and fixed dimensions against the model's inputs, finite values).
* Workers (``workers > 1``): processes started with ``spawn`` (onnxruntime is not fork-safe),
  worker ``k`` reads batches ``k, k + N, ...``; each step goes to every worker, which answers
  with its float64 ``(n, mean, M2)`` per tensor, merged in worker order with Chan's formula.
  A worker that fails stops the run with its one-line error; one that dies is reported with
  its exit code; on any error or interruption every worker is ended and joined. Workers ignore
  SIGINT (the parent ends them), and a worker whose parent has gone stops at its next batch.
* The cache (``--mode sequential``): the tensors a step keeps for the next one, per batch, in
  memory within a byte budget, the rest in a temporary folder this run creates and removes;
  when neither can hold them the next level runs its prefix from the data.

Imports: onnxruntime (lazily), numpy, rich, :mod:`normfuse.core`, :mod:`normfuse.onnxgraph` and
:mod:`normfuse.runtime`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from normfuse.core.algebra import ChannelMoments
from normfuse.core.errors import InputError, NormfuseError
from normfuse.core.report import Entry
from normfuse.onnxgraph.recalibrate import (
    Step,
    StepResult,
    recalibrate_batch_mode,
    recalibrate_model,
)
from normfuse.runtime.inputs import BatchRef, BatchStream
from normfuse.runtime.sessions import (
    first_line,
    make_session,
    ort_module,
    select_provider,
    session_options,
    with_options,
)

__all__ = [
    "DEFAULT_CACHE_MB",
    "BatchRate",
    "InputSpec",
    "ShardRunner",
    "add_moments",
    "batch_progress",
    "input_specs",
    "recalibrate_onnx",
]

logger = logging.getLogger(__name__)

#: The default memory budget of the sequential mode's cache, in MiB (all workers together).
DEFAULT_CACHE_MB = 1024

Progress_ = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A model input: its name, numpy dtype (``None``: not checked) and dimensions
    (``None`` where dynamic, ``None`` for the whole when the rank is unknown)."""

    name: str
    dtype: np.dtype | None
    dims: tuple[int | None, ...] | None


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The inputs a batch must feed (those without an initializer), from the graph."""
    specs = []
    for v in model.graph.inputs:
        if v.const_value is not None or not v.name:
            continue
        dtype = None
        if isinstance(v.type, ir.TensorType):
            with contextlib.suppress(Exception):
                dtype = np.dtype(v.type.dtype.numpy())
        dims = None
        if v.shape is not None:
            dims = tuple(d if isinstance(d, int) else None for d in v.shape)
        specs.append(InputSpec(v.name, dtype, dims))
    return specs


def _check_batch(
    batch: dict[str, np.ndarray], specs: list[InputSpec], stream: BatchStream, ref: BatchRef
) -> None:
    where = f"batch {ref.index} ({stream.name(ref)})"
    names = [s.name for s in specs]
    missing = sorted(set(names) - set(batch))
    extra = sorted(set(batch) - set(names))
    if missing or extra:
        detail = "; ".join(
            p
            for p in (
                f"missing {', '.join(missing)}" if missing else "",
                f"unknown {', '.join(extra)}" if extra else "",
            )
            if p
        )
        raise InputError(
            f"the inputs of {where} do not match the model ({detail})",
            f"the model takes {', '.join(names)}",
        )
    for spec in specs:
        array = batch[spec.name]
        if spec.dtype is not None and array.dtype != spec.dtype:
            raise InputError(
                f"input '{spec.name}' of {where} is {array.dtype}, the model takes {spec.dtype}",
                f"save it as {spec.dtype}",
            )
        if spec.dims is None:
            continue
        fits = array.ndim == len(spec.dims) and all(
            d is None or d == n for d, n in zip(spec.dims, array.shape, strict=True)
        )
        if not fits:
            want = "x".join("?" if d is None else str(d) for d in spec.dims) or "a scalar"
            got = "x".join(map(str, array.shape)) or "a scalar"
            raise InputError(
                f"input '{spec.name}' of {where} has the shape {got}, the model takes {want}",
                "give batches of the model's input shape",
            )


# ---------------------------------------------------------------------------------- the cache


class _Budget:
    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0


class _Store:
    """Tensors kept per batch: in memory while the budget allows, else in a file each."""

    def __init__(self, budget: _Budget, folder: Path | None, tag: str) -> None:
        self.budget, self.folder, self.tag = budget, folder, tag
        self.items: list[dict[str, np.ndarray] | tuple[Path, list[Any]]] = []
        self.spilled = 0
        self.broken: str | None = None

    def add(self, tensors: dict[str, Any]) -> None:
        if self.broken is not None:
            return
        if not all(isinstance(v, np.ndarray) for v in tensors.values()):
            self.drop("a kept tensor is not a plain tensor")
            return
        size = sum(v.nbytes for v in tensors.values())
        if self.budget.used + size <= self.budget.limit:
            self.budget.used += size
            self.items.append(tensors)
            return
        if self.folder is None:
            self.drop("over the memory budget and no temporary folder")
            return
        path = self.folder / f"{self.tag}-{len(self.items)}.bin"
        meta = []
        try:
            with open(path, "wb") as f:
                for name, v in tensors.items():
                    np.ascontiguousarray(v).tofile(f)
                    meta.append((name, v.dtype.str, v.shape))
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            self.drop(f"the temporary folder refused it ({first_line(exc)})")
            return
        self.items.append((path, meta))
        self.spilled += 1

    def take(self, i: int) -> dict[str, np.ndarray]:
        """Batch ``i``'s tensors, freed from the store as they are handed out."""
        item = self.items[i]
        self.items[i] = {}
        if isinstance(item, dict):
            self.budget.used -= sum(v.nbytes for v in item.values())
            return item
        path, meta = item
        out = {}
        with open(path, "rb") as f:
            for name, dtype, shape in meta:
                out[name] = np.fromfile(f, np.dtype(dtype), math.prod(shape)).reshape(shape)
        with contextlib.suppress(OSError):
            path.unlink()
        return out

    def drop(self, why: str | None = None) -> None:
        for i, item in enumerate(self.items):
            if isinstance(item, tuple):
                with contextlib.suppress(OSError):
                    item[0].unlink()
            else:
                self.take(i)
        self.items = []
        if why is not None:
            self.broken = why


# ------------------------------------------------------------------------------ one shard


class ShardRunner:
    """Runs steps over one shard of the batches (all of them in one process)."""

    def __init__(
        self,
        stream: BatchStream,
        specs: list[InputSpec],
        providers: list[str],
        cache_bytes: int,
        folder: Path | None,
        threads: int = 0,
        tick: Callable[[int], None] | None = None,
    ) -> None:
        self.stream, self.specs, self.providers = stream, specs, providers
        self.budget = _Budget(cache_bytes)
        self.folder, self.threads, self.tick = folder, threads, tick
        self.store: _Store | None = None
        self.notes: list[str] = []
        self.steps = 0

    def _session(self, payload: bytes, level: str) -> Any:
        ort = ort_module()
        so = session_options(level)
        if self.threads:
            so.intra_op_num_threads = self.threads
        try:
            return ort.InferenceSession(payload, so, providers=with_options(self.providers))
        except Exception:  # an IR version too new, or a model it cannot load: the common path
            return make_session(payload, self.providers, level, self.notes)

    def _batches(self, step: Step) -> Iterator[tuple[BatchRef, dict[str, np.ndarray]]]:
        if step.source == "cache":
            store = self.store
            assert store is not None and store.broken is None
            for i, ref in enumerate(self.stream.refs):
                yield ref, store.take(i)
            return
        for ref in self.stream.refs:
            batch = self.stream.read(ref)
            if self.stream.single is not None:
                batch = {self.stream.single if k == "" else k: v for k, v in batch.items()}
            _check_batch(batch, self.specs, self.stream, ref)
            yield ref, batch

    def run(self, step: Step) -> StepResult:
        self.steps += 1
        if step.source == "data" and self.store is not None:
            self.store.drop()
            self.store = None
        session = self._session(step.model, step.opt_level) if step.model is not None else None
        feeds_of = [i.name for i in session.get_inputs()] if session is not None else []
        new = _Store(self.budget, self.folder, f"{os.getpid()}-{self.steps}") if step.keep else None
        moments = {k: ChannelMoments() for k in [*step.measure, *step.moments]}
        for ref, feeds in self._batches(step):
            values: dict[str, Any] = dict(feeds)
            if session is not None:
                try:
                    outs = session.run(step.outputs, {n: feeds[n] for n in feeds_of})
                except Exception as exc:
                    raise InputError(
                        f"onnxruntime cannot run the model on batch {ref.index} "
                        f"({self.stream.name(ref)}): {first_line(exc)}",
                        "check the input shapes",
                    ) from None
                values.update(zip(step.outputs, outs, strict=True))
            for key, name in step.measure.items():
                arr = np.asarray(values[name])
                if name in step.stacked and arr.ndim >= 3:
                    arr = arr.reshape((-1, *arr.shape[2:]))  # iterations x batch -> one axis
                add_moments(moments[key], arr)
            for key, (mean_name, m2_name, size_name) in step.moments.items():
                mean = np.asarray(values[mean_name], np.float64).reshape(-1)
                size = int(np.asarray(values[size_name]))
                if mean.size and size:
                    m2 = np.asarray(values[m2_name], np.float64).reshape(-1)
                    moments[key].merge(size // mean.size, mean, m2)
            if new is not None:
                new.add({n: values[n] for n in step.keep})
            del values, feeds
            if self.tick is not None:
                self.tick((ref.take if ref.take is not None else ref.size) or 0)
        if self.store is not None and step.source == "cache":
            self.store.drop()
        self.store = new if new is not None and new.broken is None else None
        kept = None
        if new is not None and new.broken is None:
            kept = {}
            for item in new.items[:1]:
                if isinstance(item, dict):
                    kept = {k: _elem(v.dtype) for k, v in item.items()}
                else:
                    kept = {name: _elem(np.dtype(d)) for name, d, _ in item[1]}
        elif new is not None:
            note = f"level inputs not cached: {new.broken}; those levels ran from the data"
            if note not in self.notes:
                self.notes.append(note)
        if new is not None and new.spilled and _SPILLED not in self.notes:
            self.notes.append(_SPILLED)
        return StepResult(moments, kept)

    def close(self) -> None:
        if self.store is not None:
            self.store.drop()
            self.store = None


_SPILLED = "the cache went partly to a temporary folder (removed at the end)"


def add_moments(acc: ChannelMoments, x: np.ndarray) -> None:
    """Merge the per-channel moments of ``x`` (``(N, C, ...)``, channel axis 1) into ``acc``:
    the float64 mean of the float32 values (numpy's pairwise sums), then the squared deviations
    from it summed in float64; the same figures as :meth:`ChannelMoments.add` to float64
    rounding, with one float64 copy and no transposed one."""
    if x.size == 0 or x.ndim < 2:
        return
    v = x.reshape(x.shape[0], x.shape[1], -1)
    mean = v.mean(axis=(0, 2), dtype=np.float64)
    d = v.astype(np.float64)
    d -= mean[None, :, None]
    acc.merge(v.shape[0] * v.shape[2], mean, np.einsum("ncs,ncs->c", d, d))


def _elem(dtype: np.dtype) -> int:
    return int(onnx.helper.np_dtype_to_tensor_dtype(dtype))


# ---------------------------------------------------------------------------------- workers


def _worker(
    conn: Connection,
    stream: BatchStream,
    specs: list[InputSpec],
    providers: list[str],
    cache_bytes: int,
    folder: str | None,
    threads: int,
) -> None:
    """A worker process: steps in, ``("tick", samples)`` per batch and one answer per step out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which ends us
    runner = ShardRunner(
        stream,
        specs,
        providers,
        cache_bytes,
        Path(folder) if folder else None,
        threads,
        lambda samples: conn.send(("tick", samples)),
    )
    try:
        while True:
            try:
                step = conn.recv()
            except (EOFError, OSError):
                return  # the parent has gone
            if step is None:
                return
            try:
                result = runner.run(step)
            except NormfuseError as exc:
                conn.send(("error", exc.message, exc.note))
                continue
            except (BrokenPipeError, EOFError):
                return
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {first_line(exc)}", None))
                continue
            conn.send(("done", result, runner.notes))
    except (BrokenPipeError, EOFError, OSError):
        return
    finally:
        runner.close()


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored (so that a process started here inherits that) and held back meanwhile:
    one that comes reaches this process's own handler at the end."""
    try:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to hand on
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class _Pool:
    """``workers`` processes, each on its shard; ``run`` sends a step to all and merges."""

    def __init__(
        self,
        stream: BatchStream,
        specs: list[InputSpec],
        providers: list[str],
        workers: int,
        cache_bytes: int,
        folder: Path | None,
        tick: Callable[[int], None],
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // workers)
        self.tick = tick
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        self.notes: list[str] = []
        for k in range(workers):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_worker,
                args=(
                    theirs,
                    stream.shard(k, workers),
                    specs,
                    providers,
                    cache_bytes // workers,
                    str(folder) if folder else None,
                    threads,
                ),
                name=f"normfuse-recalibrate-{k}",
                daemon=True,
            )
            with _sigint_ignored():  # inherited: a Ctrl-C during its start-up is the parent's
                proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(mine)

    def run(self, step: Step) -> list[StepResult]:
        for conn in self.conns:
            conn.send(step)
        results: dict[int, StepResult] = {}
        index = {id(c): k for k, c in enumerate(self.conns)}
        while len(results) < len(self.conns):
            pending = [c for k, c in enumerate(self.conns) if k not in results]
            for ready in wait(pending):
                k = index[id(ready)]
                conn = self.conns[k]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    proc = self.procs[k]
                    proc.join(timeout=5)
                    raise InputError(
                        f"recalibration worker {k} stopped (exit code {proc.exitcode})",
                        "rerun with --workers 1 to see the error, or check the memory",
                    ) from None
                if msg[0] == "tick":
                    self.tick(msg[1])
                elif msg[0] == "error":
                    raise InputError(f"worker {k}: {msg[1]}", msg[2])
                else:
                    results[k] = msg[1]
                    for note in msg[2]:
                        if note not in self.notes:
                            self.notes.append(note)
        return [results[k] for k in range(len(self.conns))]

    def close(self, clean: bool) -> None:
        """Stop the workers: asked to (``clean``) or ended at once; always joined."""
        for conn in self.conns:
            if clean:
                with contextlib.suppress(OSError):
                    conn.send(None)
        deadline = time.monotonic() + (10 if clean else 0)
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()


def _merge(results: list[StepResult]) -> StepResult:
    """Per tensor, the workers' moments merged in worker order (Chan et al.)."""
    moments: dict[str, ChannelMoments] = {}
    for r in results:
        for key, acc in r.moments.items():
            total = moments.setdefault(key, ChannelMoments())
            if acc.mean is not None and acc.m2 is not None:
                total.merge(acc.n, acc.mean, acc.m2)
    kept: dict[str, int] | None = {}
    for r in results:
        if r.kept is None or kept is None:
            kept = None
            continue
        kept.update(r.kept)
    return StepResult(moments, kept)


# ---------------------------------------------------------------------------- progress bar


class BatchRate(ProgressColumn):
    """Batches per second (``-`` before the first)."""

    def render(self, task: Task) -> Text:
        speed = task.speed
        return Text(f"{speed:.2f} batches/s" if speed else "- batches/s")


def batch_progress(show: bool) -> Progress:
    """The recalibration bar (both frontends): batches, batches/s, samples seen, time, on
    standard error; disabled unless ``show`` and standard error is a terminal."""
    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        BatchRate(),
        TextColumn("{task.fields[samples]} samples"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not (show and console.is_terminal),
    )


class _Bar:
    """A rich bar (batches, batches/s, samples seen, level) on a terminal; else nothing."""

    def __init__(self, show: bool) -> None:
        self.progress = batch_progress(show)
        self.task = self.progress.add_task("recalibrating", total=None, samples=0)
        self.samples = 0

    def step(self, step: Step, batches: int) -> None:
        k, of = step.index
        label = f"recalibrating (level {k}/{of})" if of > 1 else "recalibrating"
        self.samples = 0
        self.progress.reset(self.task, total=batches, description=label, samples=0)

    def advance(self, samples: int) -> None:
        self.samples += samples
        self.progress.update(self.task, advance=1, samples=self.samples)


# ------------------------------------------------------------------------------ the front


class _Executor:
    """Runs steps in this process (one worker) or in a pool; owns the temporary folder."""

    def __init__(
        self,
        stream: BatchStream,
        specs: list[InputSpec],
        providers: list[str],
        workers: int,
        cache_bytes: int,
        spill: bool,
        show: bool,
        callback: Progress_ | None,
    ) -> None:
        self.stream, self.specs, self.providers = stream, specs, providers
        self.workers, self.cache_bytes, self.spill = workers, cache_bytes, spill
        self.bar = _Bar(show and callback is None)
        self.callback = callback
        self.done = 0
        self.folder: Path | None = None
        self.local: ShardRunner | None = None
        self.pool: _Pool | None = None
        self.total = 0

    def __enter__(self) -> _Executor:
        if self.spill:
            try:
                self.folder = Path(tempfile.mkdtemp(prefix="normfuse-recalibrate-"))
            except OSError:
                self.folder = None
        self.bar.progress.start()
        try:
            if self.workers > 1:
                self.pool = _Pool(
                    self.stream,
                    self.specs,
                    self.providers,
                    self.workers,
                    self.cache_bytes,
                    self.folder,
                    self._tick,
                )
            else:
                self.local = ShardRunner(
                    self.stream,
                    self.specs,
                    self.providers,
                    self.cache_bytes,
                    self.folder,
                    tick=self._tick,
                )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _tick(self, samples: int) -> None:
        self.done += 1
        self.bar.advance(samples)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def run(self, step: Step) -> StepResult:
        self.total = len(self.stream) * step.index[1]
        self.bar.step(step, len(self.stream))
        if self.pool is not None:
            return _merge(self.pool.run(step))
        assert self.local is not None
        return self.local.run(step)

    @property
    def notes(self) -> list[str]:
        if self.pool is not None:
            return self.pool.notes
        return self.local.notes if self.local is not None else []

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        try:
            self.bar.progress.stop()
            if self.pool is not None:
                self.pool.close(clean=kind is None)
            if self.local is not None:
                self.local.close()
        finally:
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)


def recalibrate_onnx(
    model: ir.Model,
    stream: BatchStream,
    *,
    mode: str = "sequential",
    workers: int = 1,
    provider: str = "auto",
    cache: bool = True,
    cache_mb: float = DEFAULT_CACHE_MB,
    where: str | None = None,
    progress: bool | Progress_ | None = True,
) -> tuple[list[Entry], list[str]]:
    """Recalibrate the BatchNorms of ``model`` in place over ``stream``; entries and notes.

    Args:
        model: The model (its statistics change in place).
        stream: The batches (see :func:`normfuse.runtime.inputs.open_batches`).
        mode: ``"sequential"`` (level by level) or ``"batch"`` (one pass, batch statistics).
        workers: Processes, each with an onnxruntime session on its shard of the batches.
        provider: ``auto`` (CUDA when it loads), ``cuda`` or ``cpu``.
        cache: Sequential mode: keep each level's frontier for the next level.
        cache_mb: The memory the cache may take (MiB, all workers together); beyond it the
            batches go to a temporary folder that is removed at the end.
        where: Only BatchNorm nodes whose name matches this glob.
        progress: A bar on a terminal (``True``), nothing (``False``), or a callable
            ``progress(done, total)``.

    Raises:
        InputError: Bad options or data; a worker's failure (its message).
    """
    if mode not in ("sequential", "batch"):
        raise InputError(f"mode {mode!r} is not known", "use 'sequential' or 'batch'")
    if workers < 1:
        raise InputError(f"--workers {workers} runs nothing", "give --workers 1 or more")
    if not math.isfinite(cache_mb) or cache_mb < 0:
        raise InputError(f"--cache-mb {cache_mb} is not a size", "give 0 or more MiB")
    if len(stream) == 0:
        raise InputError("recalibrate got no batches", "pass an .npz file or a folder of them")
    specs = input_specs(model)
    stream = stream.bind([s.name for s in specs])
    providers, label = select_provider(provider)
    workers = min(workers, len(stream))
    callback = progress if callable(progress) else None
    executor = _Executor(
        stream,
        specs,
        providers,
        workers,
        int(cache_mb * 2**20),
        spill=cache and mode == "sequential",
        show=progress is not False and progress is not None,
        callback=callback,
    )
    with executor:
        if mode == "batch":
            entries = recalibrate_batch_mode(model, execute=executor.run, where=where)
        else:
            entries = recalibrate_model(model, execute=executor.run, where=where, cache=cache)
        notes = list(executor.notes)
    head = f"{len(stream)} batch(es), {stream.samples} sample(s) on {label}"
    if workers > 1:
        head += f", {workers} worker processes merged exactly"
    return entries, [head, *notes]
