"""Inputs for parity runs: generated from the graph's input types with a seed (floats from a
standard normal distribution, integers in ``[0, 8)``, booleans at random; a dynamic batch
dimension becomes 1, other dynamic dimensions need ``shapes``), or read from ``.npz`` files;
and the parsing of ``--shape`` and tolerance options.

Imports: numpy and :mod:`normfuse.core`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from normfuse.core.errors import InputError
from normfuse.runtime.sessions import ORT_TYPES, first_line

__all__ = ["generate_inputs", "load_inputs", "parse_shape", "parse_tolerances", "tolerance_for"]

logger = logging.getLogger(__name__)


def parse_shape(text: str) -> tuple[str, list[int]]:
    """``name=1x3x224x224`` -> ``("name", [1, 3, 224, 224])``."""
    name, sep, dims = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, [int(d) for d in dims.lower().split("x")]
    except ValueError:
        raise InputError(
            f"cannot read the shape '{text}'", "write it as name=1x3x224x224"
        ) from None


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
        try:
            with np.load(f, allow_pickle=False) as data:
                batches.append({k: data[k] for k in data.files})
        except (OSError, ValueError) as exc:
            raise InputError(
                f"cannot read inputs from {f} ({first_line(exc)})", "save them with numpy.savez"
            ) from None
    return batches


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
    rng = np.random.default_rng(seed)
    shapes = dict(shapes or {})
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
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[inp.name] = rng.integers(0, 8, shape).astype(dtype)
    return feeds
