"""Load and save ONNX models in every form users hold them, safely.

Inputs: a path (external data read lazily through memory maps), ``bytes``, ``onnx.ModelProto``,
``onnx_ir.Model`` and ``torch.onnx.ONNXProgram`` (recognised without importing torch).

Saving keeps the IR version, opset imports, producer, metadata and doc strings, because the
model goes through onnx_ir unchanged apart from the rewrite. Writes are atomic: the model is
written to a temporary file in the target folder and renamed into place. A model that had
external data, or that exceeds 2 GiB, is written with external data next to the output
(``<output name>.data``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from normfuse.errors import InputError, OutputExistsError

__all__ = ["Loaded", "has_external_data", "load", "save", "to_kind", "unwrap"]

logger = logging.getLogger(__name__)

_TWO_GIB = 2**31

#: In-memory flag (``ir.Model.meta``, never serialized): the model was read with external data.
EXTERNAL_DATA_KEY = "normfuse.external_data"


@dataclasses.dataclass
class Loaded:
    """A model read into onnx_ir, plus what is needed to give it back in the caller's form.

    Attributes:
        model: The model in onnx_ir form (owned by normfuse: safe to modify).
        kind: ``path``, ``bytes``, ``proto``, ``ir`` or ``onnx_program``.
        path: The file it came from, for ``path`` inputs.
        original: The caller's object, for ``onnx_program``.
    """

    model: ir.Model
    kind: str
    path: Path | None = None
    original: Any = None


def _is_onnx_program(obj: object) -> bool:
    return type(obj).__name__ == "ONNXProgram" and hasattr(obj, "model")


def load(source: object, *, copy: bool = True) -> Loaded:
    """Read a model from any supported form.

    Args:
        source: A path, bytes, ``onnx.ModelProto``, ``onnx_ir.Model`` or ``ONNXProgram``.
        copy: For ``onnx_ir.Model`` and ``ONNXProgram`` inputs, work on a copy so the caller's
            object is left as it was.

    Raises:
        InputError: The source is missing, not a file, not ONNX, or of an unknown type.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise InputError(f"no such file: {path}")
        if path.is_dir():
            raise InputError(f"{path} is a directory, not an ONNX file")
        try:
            model = ir.load(path)
        except (DecodeError, onnx.onnx_cpp2py_export.checker.ValidationError, RuntimeError) as exc:
            raise InputError(f"{path} is not a readable ONNX model ({_short(exc)})") from None
        except UnicodeDecodeError:
            raise InputError(f"{path} is not a readable ONNX model") from None
        _check_has_graph(model, str(path))
        if has_external_data(model):
            model.meta[EXTERNAL_DATA_KEY] = True
        return Loaded(model, "path", path=path)
    if isinstance(source, (bytes, bytearray, memoryview)):
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(bytes(source))
        except DecodeError as exc:
            raise InputError(f"the bytes are not an ONNX model ({_short(exc)})") from None
        model = ir.from_proto(proto)
        _check_has_graph(model, "bytes")
        return Loaded(model, "bytes")
    if isinstance(source, onnx.ModelProto):
        model = ir.from_proto(source)
        _check_has_graph(model, "ModelProto")
        return Loaded(model, "proto")
    if isinstance(source, ir.Model):
        model = ir.from_proto(ir.to_proto(source)) if copy else source
        return Loaded(model, "ir", original=source)
    if _is_onnx_program(source):
        inner = source.model  # type: ignore[attr-defined]
        model = ir.from_proto(ir.to_proto(inner)) if copy else inner
        return Loaded(model, "onnx_program", original=source)
    raise InputError(
        f"cannot read a model from {type(source).__name__}",
        "pass a path, bytes, onnx.ModelProto, onnx_ir.Model or torch.onnx.ONNXProgram",
    )


def _check_has_graph(model: ir.Model, where: str) -> None:
    if len(model.graph) == 0 and not model.graph.outputs:
        raise InputError(f"{where} holds no graph (empty or not an ONNX model)")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def to_kind(loaded: Loaded, model: ir.Model) -> Any:
    """Give ``model`` back in the form the caller passed in (a path gives an onnx_ir.Model)."""
    if loaded.kind == "proto":
        return ir.to_proto(model)
    if loaded.kind == "bytes":
        return ir.to_proto(model).SerializeToString()
    if loaded.kind == "onnx_program":
        cls = type(loaded.original)
        return cls(model, getattr(loaded.original, "exported_program", None))
    return model


def unwrap(model: object) -> ir.Model:
    """The onnx_ir model inside any supported object (no copy where possible)."""
    return load(model, copy=False).model


def has_external_data(model: ir.Model) -> bool:
    """True when some initializer of the model lives in an external file."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                return True
    return False


def _total_bytes(model: ir.Model) -> int:
    return sum(
        v.const_value.nbytes
        for g in model.graphs()
        for v in g.initializers.values()
        if v.const_value is not None
    )


def save(
    model: object,
    path: str | os.PathLike,
    *,
    force: bool = False,
    external_data: bool | None = None,
    protect: os.PathLike | str | None = None,
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """Write a model atomically.

    Args:
        model: Any supported model object.
        path: The output file.
        force: Replace an existing file.
        external_data: ``True`` to write tensors to ``<name>.data`` next to the output,
            ``False`` to embed them, ``None`` to do so when the model had external data or
            exceeds 2 GiB.
        protect: A path that must not be written (the input, unless in-place was asked).
        verify: Called with the complete temporary file before it is renamed into place;
            if it raises, nothing is renamed and the temporary file is removed.

    Returns:
        The path written.

    Raises:
        OutputExistsError: The output exists and ``force`` is false, or it is ``protect``.
        InputError: The output folder does not exist.
    """
    ir_model = unwrap(model)
    out = Path(path)
    if protect is not None and out.exists() and os.path.samefile(out, protect):
        raise OutputExistsError(
            f"the output {out} is the input", "pass --in-place to overwrite the input"
        )
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists", "pass --force to replace it")
    if out.is_dir():
        raise InputError(f"the output {out} is a directory")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"the output folder {folder} does not exist")
    if external_data is None:
        external_data = (
            bool(ir_model.meta.get(EXTERNAL_DATA_KEY))
            or has_external_data(ir_model)
            or _total_bytes(ir_model) > _TWO_GIB
        )
    data_path = folder / f"{out.name}.data"
    data_existed = data_path.exists()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if external_data:
            ir.save(ir_model, tmp, external_data=f"{out.name}.data")
        else:
            ir.save(ir_model, tmp)
        if verify is not None:
            verify(tmp)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if external_data and not data_existed:
            with contextlib.suppress(OSError):
                data_path.unlink()
        raise
    logger.info("wrote %s", out)
    return out
