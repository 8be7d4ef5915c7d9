"""Inputs for parity runs: generated from the graph's input types with a seed (floats from a
standard normal distribution, integers in ``[0, 8)``, booleans at random; a dynamic batch
dimension becomes 1, other dynamic dimensions need ``shapes``), or read from ``.npz`` files;
and the parsing of ``--shape`` and tolerance options.

Imports: numpy and :mod:`normfuse.core`.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from normfuse.core.errors import InputError
from normfuse.runtime.sessions import ORT_TYPES, first_line

__all__ = [
    "MAX_ELEMENTS",
    "BatchRef",
    "BatchStream",
    "check_finite",
    "check_runs",
    "check_seed",
    "generate_inputs",
    "load_inputs",
    "memory_batches",
    "npy_shape",
    "npz_shapes",
    "open_batches",
    "parse_shape",
    "parse_tolerances",
    "tolerance_for",
]

#: The largest input normfuse generates or reads (elements of one array): 2**31.
MAX_ELEMENTS = 2**31


def check_seed(seed: int) -> int:
    """Refuse a seed numpy cannot take (negative).

    Raises:
        InputError: ``seed`` is negative.
    """
    if seed < 0:
        raise InputError(f"--seed {seed} is negative", "give a seed of 0 or more")
    return seed


def check_runs(runs: int) -> int:
    """Refuse a number of check batches below one.

    Raises:
        InputError: ``runs`` is below 1.
    """
    if runs < 1:
        raise InputError(f"--runs {runs} compares nothing", "give --runs 1 or more")
    return runs


def check_finite(batches: Sequence[Mapping[str, np.ndarray]], where: str) -> None:
    """Refuse batches whose floating-point arrays hold NaN or infinity, naming the batch.

    Raises:
        InputError: Some array is not finite.
    """
    for i, batch in enumerate(batches):
        for name, array in batch.items():
            if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
                raise InputError(
                    f"input '{name}' of batch {i} in {where} holds NaN or infinity",
                    "give finite data",
                )


logger = logging.getLogger(__name__)


def parse_shape(text: str) -> tuple[str, list[int]]:
    """``name=1x3x224x224`` -> ``("name", [1, 3, 224, 224])``."""
    name, sep, dims = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        shape = [int(d) for d in dims.lower().split("x")]
    except ValueError:
        raise InputError(
            f"cannot read the shape '{text}'", "write it as name=1x3x224x224"
        ) from None
    if any(d <= 0 for d in shape):
        raise InputError(
            f"the shape '{text}' has a dimension below 1", "give every dimension as 1 or more"
        )
    if math.prod(shape) > MAX_ELEMENTS:
        raise InputError(
            f"the shape '{text}' has {math.prod(shape)} elements, more than normfuse generates "
            f"({MAX_ELEMENTS})",
            "give a smaller shape",
        )
    return name, shape


def load_inputs(path: str | os.PathLike) -> list[dict[str, np.ndarray]]:
    """Batches from an ``.npz`` file (one batch) or a folder of ``.npz`` files (one each, sorted)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.npz"))
        if not files:
            raise InputError(f"the folder {p} holds no .npz files")
    elif p.is_file():
        files = [p]
    else:
        raise InputError(f"no such inputs file or folder: {p}")
    batches = []
    for f in files:
        _check_npz(f)
        try:
            with np.load(f, allow_pickle=False) as data:
                batches.append({k: data[k] for k in data.files})
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, MemoryError) as exc:
            raise InputError(
                f"cannot read inputs from {f} ({first_line(exc)})", "save them with numpy.savez"
            ) from None
    return batches


def _check_npz(path: Path) -> None:
    """Refuse, before numpy reads anything, what is not an npz of plain arrays whose headers
    agree with their stored sizes (a header may claim any shape)."""
    npz_shapes(path)


_NOTE_NPZ = "save them with numpy.savez (plain arrays, no objects)"
_NOTE_NPY = "save it with numpy.save (a plain array, no objects)"


def _read_header(member: Any, where: str, note: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from an npy header (numpy bounds the header's size, 10,000 bytes)."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise InputError(f"{where} is npy {version}", note)
    if dtype.hasobject:
        raise InputError(f"{where} holds Python objects", note)
    return tuple(shape), dtype


def npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every array of an ``.npz``, from the headers alone, after checking that it
    is a zip of plain arrays whose headers agree with their stored sizes.

    Raises:
        InputError: Anything else (objects, a header that claims more than is stored, ...).
    """
    note = _NOTE_NPZ
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path} is not an .npz file (not a zip archive)", note)
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise InputError(f"{path} holds {info.filename!r}, which is not an array", note)
                with archive.open(info) as member:
                    where = f"{path} member {info.filename!r}"
                    shape, dtype = _read_header(member, where, note)
                    header = member.tell()
                need = math.prod(shape) * dtype.itemsize
                if need != info.file_size - header:
                    raise InputError(
                        f"{where} claims shape {shape} ({need} bytes) "
                        f"but holds {info.file_size - header} bytes",
                        note,
                    )
                shapes[info.filename[: -len(".npy")]] = shape
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"cannot read inputs from {path} ({first_line(exc)})", note) from None
    return shapes


def npy_shape(path: Path) -> tuple[int, ...]:
    """The shape of an ``.npy`` array from its header, checked against the file's size.

    Raises:
        InputError: Not a plain npy array, or a header that claims more than is stored.
    """
    try:
        with open(path, "rb") as f:
            shape, dtype = _read_header(f, str(path), _NOTE_NPY)
            header = f.tell()
            stored = os.fstat(f.fileno()).st_size - header
    except InputError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"cannot read inputs from {path} ({first_line(exc)})", _NOTE_NPY) from None
    need = math.prod(shape) * dtype.itemsize
    if need != stored:
        raise InputError(
            f"{path} claims shape {shape} ({need} bytes) but holds {stored} bytes", _NOTE_NPY
        )
    return shape


def parse_tolerances(values: Sequence[str], option: str) -> float | dict[str, float] | None:
    """``["1e-4"]`` -> 1e-4; ``["logits=1e-4", "1e-5"]`` -> per output, with ``*`` for the rest."""
    if not values:
        return None
    result: dict[str, float] = {}
    for text in values:
        name, sep, number = text.rpartition("=")
        try:
            value = float(number)
        except ValueError:
            raise InputError(
                f"cannot read {option} '{text}'", f"write {option} 1e-4 or {option} name=1e-4"
            ) from None
        if not math.isfinite(value) or value < 0:
            raise InputError(
                f"{option} '{text}' is not a finite number of 0 or more",
                f"write {option} 1e-4 or {option} name=1e-4",
            )
        result[name if sep else "*"] = value
    return result["*"] if list(result) == ["*"] else result


def tolerance_for(spec: Mapping[str, float] | float | None, name: str) -> float | None:
    if isinstance(spec, Mapping):
        return spec.get(name, spec.get("*"))
    return spec


def _example_shape(dims: Sequence[Any]) -> str:
    """A ``--shape`` value of the input's rank: its fixed dimensions as they are, the batch 1,
    other dynamic ones 16 (``input_ids [batch, seq]``: ``1x16``, not an image's shape); a
    dimension the exporter declared a multiple (``32*h``: a detector's stride) the smallest
    multiple at least that."""
    out = []
    for axis, d in enumerate(dims):
        if isinstance(d, int) and d >= 0:
            out.append(str(d))
            continue
        want = 1 if axis == 0 else 16
        step = _multiple_of(d)
        out.append(str(step * max(1, -(-want // step))))
    return "x".join(out) or "1"


def _multiple_of(dim: Any) -> int:
    """``k`` for a symbolic dimension written ``k*s`` or ``s*k`` (torch.export's ``32*h``), 1
    for any other."""
    match = re.fullmatch(r"\s*(?:(\d+)\s*\*\s*\w+|\w+\s*\*\s*(\d+))\s*", str(dim))
    if match is None:
        return 1
    return max(int(match.group(1) or match.group(2)), 1)


def generate_inputs(
    session: Any,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    notes: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded random inputs for every input of an onnxruntime session."""
    rng = np.random.default_rng(check_seed(seed))
    shapes = dict(shapes or {})
    known = [i.name for i in session.get_inputs()]
    unknown = sorted(set(shapes) - set(known))
    if unknown:
        raise InputError(
            f"unknown input {', '.join(unknown)} in --shape", f"the inputs are {', '.join(known)}"
        )
    feeds: dict[str, np.ndarray] = {}
    for inp in session.get_inputs():
        dtype = ORT_TYPES.get(inp.type)
        if dtype is None and inp.type == "tensor(bfloat16)":
            raise InputError(
                f"input '{inp.name}' is bfloat16, which onnxruntime cannot feed from numpy"
            )
        if dtype is None:
            raise InputError(
                f"input '{inp.name}' has type {inp.type}, which normfuse cannot generate"
            )
        if inp.name in shapes:
            shape = list(shapes[inp.name])
        else:
            shape = []
            for axis, dim in enumerate(inp.shape):
                if isinstance(dim, int) and dim >= 0:
                    shape.append(dim)
                elif axis == 0:
                    shape.append(1)
                    if notes is not None:
                        notes.append(f"input '{inp.name}': dynamic batch dimension set to 1")
                else:
                    raise InputError(
                        f"input '{inp.name}' has the dynamic dimension '{dim}' at axis {axis}",
                        f"give its shape with --shape {inp.name}={_example_shape(inp.shape)}",
                    )
        if any(d < 0 for d in shape) or math.prod(shape) > MAX_ELEMENTS:
            raise InputError(
                f"input '{inp.name}' would have the shape {shape}",
                f"give its shape with --shape {inp.name}={_example_shape(inp.shape)}",
            )
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[inp.name] = rng.integers(0, 8, shape).astype(dtype)
    return feeds


# ------------------------------------------------------------------ streamed batches (recalibrate)


@dataclasses.dataclass(frozen=True)
class BatchRef:
    """One batch of a :class:`BatchStream`: where it is and how many samples it gives.

    Attributes:
        index: Its position in the whole data (names it in messages; sharding keeps it).
        source: A file (``.npz`` keyed by input name, ``.npy`` for a one-input model) or an
            index into the stream's in-memory batches.
        size: Its samples (the leading dimension of its first array with one), if any.
        take: Cut to this many samples (``--samples``), else ``None``.
    """

    index: int
    source: str | int
    size: int | None
    take: int | None = None


class BatchStream:
    """Batches read one at a time, as often as asked (each pass reads the files again).

    Every file's headers are checked when the stream is opened (plain arrays, sizes that agree
    with the bytes stored, no pickles); a batch is read with ``allow_pickle=False`` when its
    turn comes, cut to its ``take``, and refused if a float array holds NaN or infinity. The
    stream pickles (paths and counts; in-memory batches travel with it), so a worker process
    can read its own shard.
    """

    def __init__(
        self,
        refs: Sequence[BatchRef],
        where: str,
        memory: Sequence[Mapping[str, np.ndarray]] | None = None,
        single: str | None = None,
    ) -> None:
        self.refs = list(refs)
        self.where = where
        self.memory = memory
        self.single = single  # the input an .npy array feeds

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def samples(self) -> int:
        """Samples over all batches (those of unknown size count 0)."""
        return sum((r.take if r.take is not None else r.size) or 0 for r in self.refs)

    @property
    def has_npy(self) -> bool:
        return any(isinstance(r.source, str) and r.source.endswith(".npy") for r in self.refs)

    def _derive(self, refs: Sequence[BatchRef]) -> BatchStream:
        memory = self.memory
        if memory is not None:  # only the batches the refs name travel with a shard
            keep = {int(r.source) for r in refs}
            memory = [b if i in keep else {} for i, b in enumerate(memory)]
        return BatchStream(refs, self.where, memory, self.single)

    def limit(self, batches: int | None = None, samples: int | None = None) -> BatchStream:
        """The first ``batches`` batches, then the first ``samples`` samples (the last batch cut).

        Raises:
            InputError: A bound below 1, or ``samples`` on batches without a batch dimension.
        """
        refs = self.refs
        for option, value in (("--batches", batches), ("--samples", samples)):
            if value is not None and value < 1:
                raise InputError(f"{option} {value} uses no data", f"give {option} 1 or more")
        if batches is not None:
            refs = refs[:batches]
        if samples is not None:
            cut: list[BatchRef] = []
            seen = 0
            for r in refs:
                if seen >= samples:
                    break
                if r.size is None:
                    raise InputError(
                        f"batch {r.index} ({self.name(r)}) has no batch dimension to count "
                        "--samples over",
                        "use --batches",
                    )
                take = min(r.size, samples - seen)
                cut.append(dataclasses.replace(r, take=take if take < r.size else None))
                seen += take
            refs = cut
        return self._derive(refs)

    def shard(self, k: int, n: int) -> BatchStream:
        """Batches ``k, k + n, k + 2n, ...`` (by position): worker ``k`` of ``n``."""
        return self._derive(self.refs[k::n])

    def bind(self, inputs: Sequence[str]) -> BatchStream:
        """Name the input that ``.npy`` batches feed: the model must take exactly one.

        Raises:
            InputError: ``.npy`` batches for a model with several inputs.
        """
        if not self.has_npy:
            return self
        if len(inputs) != 1:
            raise InputError(
                f".npy batches feed a one-input model; this one takes {', '.join(inputs)}",
                "save each batch as an .npz keyed by input name (numpy.savez)",
            )
        return BatchStream(self.refs, self.where, self.memory, inputs[0])

    def name(self, ref: BatchRef) -> str:
        return ref.source if isinstance(ref.source, str) else f"{self.where}[{ref.source}]"

    def read(self, ref: BatchRef) -> dict[str, np.ndarray]:
        """One batch, cut and checked.

        Raises:
            InputError: It cannot be read, or holds NaN or infinity.
        """
        source = ref.source
        if isinstance(source, str):
            try:
                if source.endswith(".npy"):
                    batch = {self.single or "": np.load(source, allow_pickle=False)}
                else:
                    with np.load(source, allow_pickle=False) as data:
                        batch = {k: data[k] for k in data.files}
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, MemoryError) as exc:
                raise InputError(
                    f"cannot read batch {ref.index} from {source} ({first_line(exc)})",
                    "save it with numpy.savez or numpy.save",
                ) from None
        else:
            assert self.memory is not None
            batch = {k: np.asarray(v) for k, v in self.memory[source].items()}
        if ref.take is not None:
            batch = {
                k: v[: ref.take] if v.ndim and v.shape[0] == ref.size else v
                for k, v in batch.items()
            }
        for key, array in batch.items():
            if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
                raise InputError(
                    f"input '{key or self.single}' of batch {ref.index} ({self.name(ref)}) holds "
                    "NaN or infinity",
                    "give finite data",
                )
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for ref in self.refs:
            yield self.read(ref)


def _leading(shapes: Sequence[tuple[int, ...]]) -> int | None:
    return next((int(s[0]) for s in shapes if len(s) >= 1), None)


def open_batches(spec: str | os.PathLike[str], option: str = "--data") -> BatchStream:
    """A :class:`BatchStream` over a folder (its ``.npz`` files, else its ``.npy`` files, in
    name order), one ``.npz``/``.npy`` file, or a glob pattern (``calib/*.npz``,
    ``data/**/*.npz``); every file's headers are checked here, nothing else is read.

    Raises:
        InputError: Nothing matches, or a file is not a plain ``.npz``/``.npy``.
    """
    text = os.fspath(spec)
    p = Path(text)
    if p.is_dir():
        files = sorted(p.glob("*.npz")) or sorted(p.glob("*.npy"))
        if not files:
            raise InputError(f"the folder {p} holds no .npz or .npy files", _NOTE_NPZ)
    elif p.is_file():
        files = [p]
    elif glob.has_magic(text):
        files = [Path(f) for f in sorted(glob.glob(text, recursive=True)) if Path(f).is_file()]
        if not files:
            raise InputError(f"{option} {text} matches no file", "check the pattern")
    else:
        raise InputError(f"no such file, folder or pattern: {option} {text}")
    refs = []
    for i, f in enumerate(files):
        if f.suffix == ".npy":
            size = _leading([npy_shape(f)])
        elif f.suffix == ".npz" or p.is_file():
            size = _leading(list(npz_shapes(f).values()))
        else:
            raise InputError(f"{f} is neither an .npz nor an .npy file", "narrow the pattern")
        refs.append(BatchRef(i, str(f), size))
    return BatchStream(refs, f"{option} {text}")


def memory_batches(batches: Sequence[Mapping[str, np.ndarray]]) -> BatchStream:
    """A :class:`BatchStream` over batches already in memory (``{input name: array}``)."""
    refs = []
    for i, b in enumerate(batches):
        if not isinstance(b, Mapping):
            raise InputError(
                f"batch {i} is a {type(b).__name__}, not a mapping of input name to array",
                "give {'x': array} per batch, a path or a list of them",
            )
        refs.append(BatchRef(i, i, _leading([np.shape(v) for v in b.values()])))
    return BatchStream(refs, "the data", batches)
