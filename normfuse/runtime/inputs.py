"""Inputs for parity runs: generated from the graph's input types with a seed (floats from a
standard normal distribution, integers in ``[0, 8)``, booleans at random; a dynamic batch
dimension becomes 1, other dynamic dimensions need ``shapes``), or read from ``.npz`` files;
and the parsing of ``--shape`` and tolerance options.

Imports: numpy and :mod:`normfuse.core`.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from normfuse.core.errors import InputError
from normfuse.runtime.sessions import ORT_TYPES, first_line

__all__ = [
    "MAX_ELEMENTS",
    "check_finite",
    "check_runs",
    "check_seed",
    "generate_inputs",
    "load_inputs",
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
    note = "save them with numpy.savez (plain arrays, no objects)"
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path} is not an .npz file (not a zip archive)", note)
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise InputError(f"{path} holds {info.filename!r}, which is not an array", note)
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                    else:
                        raise InputError(f"{path} member {info.filename!r} is npy {version}", note)
                    header = member.tell()
                if dtype.hasobject:
                    raise InputError(f"{path} member {info.filename!r} holds Python objects", note)
                need = math.prod(shape) * dtype.itemsize
                if need != info.file_size - header:
                    raise InputError(
                        f"{path} member {info.filename!r} claims shape {shape} ({need} bytes) "
                        f"but holds {info.file_size - header} bytes",
                        note,
                    )
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"cannot read inputs from {path} ({first_line(exc)})", note) from None


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
                        f"give its shape with --shape {inp.name}=1x3x224x224",
                    )
        if any(d < 0 for d in shape) or math.prod(shape) > MAX_ELEMENTS:
            raise InputError(
                f"input '{inp.name}' would have the shape {shape}",
                f"give its shape with --shape {inp.name}=1x3x224x224",
            )
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[inp.name] = rng.integers(0, 8, shape).astype(dtype)
    return feeds
