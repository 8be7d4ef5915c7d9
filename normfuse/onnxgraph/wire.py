"""The ONNX protobuf wire format, read and written directly where onnx_ir's round trip is the
cost: a lazy *self-backed* load (large initializers stay in the model file and are read through
memory maps) and a streaming save (untouched graph fields copied as bytes, tensors written one
after the other, large ones straight from their source file).

Imports: onnx, onnx_ir, numpy, :mod:`normfuse.core` and :mod:`normfuse.onnxgraph.const`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import mmap
import os
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from normfuse.core.algebra import threads
from normfuse.core.errors import InputError
from normfuse.onnxgraph.const import OpenFiles
from normfuse.onnxgraph.protos import quiet, value_info_as_read

__all__ = [
    "LAZY_MIN_BYTES",
    "SELF_BACKED_KEY",
    "TWO_GIB",
    "check_model_prefix",
    "default_mode",
    "light_proto",
    "load_buffer_backed",
    "load_self_backed",
    "root_cause",
    "short_error",
    "write_streaming",
]

logger = logging.getLogger(__name__)


TWO_GIB = 2**31


#: In-memory flag on tensors (``tensor.meta``) that are views into the model file itself.
SELF_BACKED_KEY = "normfuse.self_backed"


#: Initializers at least this large are read lazily from the model file by ``load(lazy=True)``.
LAZY_MIN_BYTES = 1024


def _read_varint(buf: Any, pos: int) -> tuple[int, int]:
    byte = buf[pos]
    if byte < 0x80:  # one byte: most tags, small lengths
        return byte, pos + 1
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise DecodeError("varint too long")


def _fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(number, wire_type, field_start, value_start, value_end)`` for each field in a message."""
    pos = start
    while pos < end:
        key = buf[pos]  # one-byte varints (most tags and lengths) read inline
        key, p = (key, pos + 1) if key < 0x80 else _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:  # no message has a field 0: a file of zero bytes stops here at once
            raise DecodeError("protobuf field number 0")
        if wire == 0:
            value_end = _read_varint(buf, p)[1]
        elif wire == 1:
            value_end = p + 8
        elif wire == 2:
            length = buf[p]
            length, p = (length, p + 1) if length < 0x80 else _read_varint(buf, p)
            value_end = p + length
        elif wire == 5:
            value_end = p + 4
        else:
            raise DecodeError(f"unsupported protobuf wire type {wire}")
        if value_end > end:
            raise DecodeError("truncated protobuf message")
        yield number, wire, pos, p, value_end
        pos = value_end


def _externalize(
    buf: Any, start: int, end: int, location: str, *, plain_only: bool = False
) -> bytes | None:
    """A TensorProto whose large raw_data stays in the file: an external-data reference to it.
    ``plain_only``: only tensors of whole-byte elements numpy can view (else ``None``).

    Written in the wire format directly: the tensor's other fields as they are, then the
    ``external_data`` entries and ``data_location = EXTERNAL`` (a later scalar field wins).

    Raises:
        InputError: The raw_data holds another number of bytes than the dims and type need
            (a later read would take the next tensor's bytes).
    """
    raw: tuple[int, int] | None = None
    rest = bytearray()
    kept = start  # fields from here on are copied as they are
    dims: list[int] = []
    dtype = 0
    name = b""
    for number, wire, fstart, vstart, vend in _fields(buf, start, end):
        if number == _TENSOR_RAW_DATA and wire == 2 and vend - vstart >= LAZY_MIN_BYTES:
            raw = (vstart, vend - vstart)
            rest += buf[kept:fstart]
            kept = vend
        elif number == _TENSOR_DIMS and wire == 0:
            dims.append(_signed(_read_varint(buf, vstart)[0]))
        elif number == _TENSOR_DIMS and wire == 2:
            p = vstart
            while p < vend:
                value, p = _read_varint(buf, p)
                dims.append(_signed(value))
        elif number == _TENSOR_DATA_TYPE and wire == 0:
            dtype = _read_varint(buf, vstart)[0]
        elif number == _TENSOR_NAME and wire == 2:
            name = bytes(buf[vstart:vend])
    if raw is None:
        return None
    _check_raw_size(name.decode(errors="replace"), dims, dtype, raw[1])
    if plain_only and not _viewable(dtype):
        return None
    rest += buf[kept:end]
    rest += _external_reference(location, raw[0], raw[1])
    return bytes(rest)


def _viewable(dtype: int) -> bool:
    try:
        t = ir.DataType(dtype)
        return t in _RAW_OK and t.bitwidth == t.numpy().itemsize * 8
    except (ValueError, TypeError):
        return False


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _check_raw_size(name: str, dims: list[int], dtype: int, nbytes: int) -> None:
    """Refuse raw_data whose byte count is not what ``dims`` of ``dtype`` need."""
    try:
        itemsize = ir.DataType(dtype).itemsize
    except (ValueError, TypeError):
        raise InputError(
            f"tensor '{name}' has raw_data of element type {dtype}, which has no fixed size",
            "the file is corrupt",
        ) from None
    if any(d < 0 for d in dims):
        raise InputError(f"tensor '{name}' has a negative dimension {dims}", "the file is corrupt")
    elements = 1
    for d in dims:
        elements *= d
    need = math.ceil(elements * itemsize)
    if need != nbytes:
        raise InputError(
            f"tensor '{name}' is malformed: its raw_data holds {nbytes} bytes, its dims "
            f"{dims} need {need}",
            "the file is truncated or corrupt; export the model again",
        )


#: Field numbers of ModelProto and the wire type each one has (a message's first fields tell
#: whether a file is a ModelProto at all).
_MODEL_WIRE = {
    f.number: 0 if f.type in (f.TYPE_INT64, f.TYPE_INT32, f.TYPE_UINT64, f.TYPE_ENUM) else 2
    for f in onnx.ModelProto.DESCRIPTOR.fields
}


#: At most this many top-level fields are walked to judge a file (a real model has a few dozen).
_PREFIX_FIELDS = 100_000


def check_model_prefix(path: Path) -> None:
    """Refuse at once a file that is not a serialized ModelProto (bounded time and memory).

    The top-level fields are walked over a memory map (length-delimited ones, such as the
    graph, are skipped, not read): each must be a field of ModelProto with its wire type and lie
    within the file. A zip archive (a PyTorch ``.pt``/``.pt2`` file) is named as such.

    Raises:
        InputError: The file is empty, a zip archive, or not a ModelProto.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise InputError(f"{path} is empty: it holds no graph", "give an ONNX model file")
        head = f.read(4)
        if head.startswith(b"PK\x03\x04"):
            raise InputError(
                f"{path} is not a readable ONNX model (a zip archive: a PyTorch .pt/.pt2 file?)",
                "fold a torch.export archive with `normfuse fold MODEL.pt2 -o MODEL.onnx` (which "
                "exports it to ONNX), or export the module with normfuse.export; a state dict "
                "holds no graph",
            )
        if head.lstrip()[:1] in (b"<", b"{", b"#"):  # text (HTML, JSON, scripts): not protobuf
            raise InputError(
                f"{path} is not a readable ONNX model (a text file)",
                "give a file written by onnx.save or an exporter",
            )
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                for i, (number, wire, *_) in enumerate(_fields(buf, 0, size)):
                    if _MODEL_WIRE.get(number) != wire:
                        raise DecodeError(f"field {number} of wire type {wire}")
                    if i >= _PREFIX_FIELDS:
                        raise DecodeError("too many top-level fields")
            except (DecodeError, IndexError) as exc:
                raise InputError(
                    f"{path} is not a readable ONNX model (not a ModelProto: {exc})",
                    "give a file written by onnx.save or an exporter",
                ) from None


def load_self_backed(path: Path) -> tuple[ir.Model, onnx.ModelProto] | None:
    """Parse ``path`` without its large initializer bytes, which become views into the file.

    The protobuf wire format is scanned over a memory map: every field is copied as it is but
    the main graph's initializers, whose ``raw_data`` is replaced by an external-data reference
    (location: the model file itself, at the byte offset of that data). Returns ``None`` when
    nothing is large enough to be worth it, or the file already uses external data. The
    parsed (light) ModelProto comes with the model.
    """
    proto = light_proto(path)
    if proto is None:
        return None
    model = ir.serde.deserialize_model(proto)  # load() sets the tensors' base folder
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value.meta[SELF_BACKED_KEY] = True
    model.meta[SELF_BACKED_KEY] = str(path)
    return model, proto


def light_proto(path: Path) -> onnx.ModelProto | None:
    """The ModelProto at ``path`` without its large initializer bytes: the main graph's
    ``raw_data`` of :data:`LAZY_MIN_BYTES` or more become external-data references to the file
    itself (location: its name, at the data's byte offset; raw byte counts checked against the
    dims). ``None`` when no initializer is large enough, or the file already uses external data.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            model_bytes = _scan(buf, size, path.name, plain_only=False)
    if model_bytes is None:
        return None
    proto = onnx.ModelProto()
    proto.ParseFromString(bytes(model_bytes))
    return proto


def load_buffer_backed(data: bytes) -> tuple[ir.Model, onnx.ModelProto] | None:
    """Parse serialized model ``data`` with its large initializers as read-only numpy views
    into ``data`` (no copy of the weights), like :func:`load_self_backed` does for a file.

    Only tensors whose elements are whole bytes are viewed (others are parsed as usual);
    ``None`` when nothing is large enough to be worth it.
    """
    view = memoryview(data)
    location = f"normfuse-in-memory-{uuid.uuid4().hex}"  # no location of the model's own
    model_bytes = _scan(view, len(view), location, plain_only=True)
    if model_bytes is None:
        return None
    proto = onnx.ModelProto()
    proto.ParseFromString(bytes(model_bytes))
    model = ir.serde.deserialize_model(proto)
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and tensor.location == location:
            dtype = tensor.dtype.numpy()
            count = (tensor.length or 0) // dtype.itemsize
            array = np.frombuffer(data, dtype=dtype, count=count, offset=tensor.offset or 0)
            dims = [int(d) for d in tensor.shape.numpy()]
            value.const_value = ir.Tensor(array.reshape(dims), name=tensor.name)
    return model, proto


def _scan(buf: Any, size: int, location: str, *, plain_only: bool) -> bytearray | None:
    """The model's bytes with the main graph's large raw_data replaced by references to
    ``location`` at their offsets in ``buf``; ``None`` when there is none."""
    model_bytes = bytearray()
    found = False
    for number, wire, fstart, vstart, vend in _fields(buf, 0, size):
        if number != _MODEL_GRAPH or wire != 2:
            model_bytes += buf[fstart:vend]
            continue
        graph = bytearray()
        kept = vstart  # runs of fields that stay as they are are copied at once
        for gnum, gwire, gstart, gvstart, gvend in _fields(buf, vstart, vend):
            if gnum != _GRAPH_INITIALIZER or gwire != 2 or gvend - gvstart < LAZY_MIN_BYTES:
                continue  # a tensor smaller than that holds no raw_data that large
            tensor = _externalize(buf, gvstart, gvend, location, plain_only=plain_only)
            if tensor is not None:
                graph += buf[kept:gstart]
                graph += _field(_GRAPH_INITIALIZER, len(tensor)) + tensor
                kept = gvend
                found = True
        graph += buf[kept:vend]
        model_bytes += _field(_MODEL_GRAPH, len(graph)) + graph
    return model_bytes if found else None


def root_cause(exc: BaseException) -> BaseException:
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


_MODEL_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number


_GRAPH_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number


_TENSOR_RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


_TENSOR_EXTERNAL_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["external_data"].number


_TENSOR_DIMS = onnx.TensorProto.DESCRIPTOR.fields_by_name["dims"].number


_TENSOR_DATA_TYPE = onnx.TensorProto.DESCRIPTOR.fields_by_name["data_type"].number


_TENSOR_NAME = onnx.TensorProto.DESCRIPTOR.fields_by_name["name"].number


_TENSOR_DOC_STRING = onnx.TensorProto.DESCRIPTOR.fields_by_name["doc_string"].number


_TENSOR_METADATA_PROPS = onnx.TensorProto.DESCRIPTOR.fields_by_name["metadata_props"].number


_TENSOR_DATA_LOCATION = onnx.TensorProto.DESCRIPTOR.fields_by_name["data_location"].number


_RAW_OK = frozenset(
    {
        ir.DataType.FLOAT,
        ir.DataType.FLOAT16,
        ir.DataType.BFLOAT16,
        ir.DataType.DOUBLE,
        ir.DataType.INT8,
        ir.DataType.INT16,
        ir.DataType.INT32,
        ir.DataType.INT64,
        ir.DataType.UINT8,
        ir.DataType.UINT16,
        ir.DataType.UINT32,
        ir.DataType.UINT64,
        ir.DataType.BOOL,
    }
)


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return _ONE_BYTE[n]
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_ONE_BYTE = [bytes((n,)) for n in range(0x80)]


def _field(number: int, length: int) -> bytes:
    """Tag and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


@dataclasses.dataclass(frozen=True)
class _FileRange:
    """Bytes to copy file to file: ``length`` bytes of ``path`` from ``offset``."""

    path: str
    offset: int
    length: int

    @property
    def nbytes(self) -> int:
        return self.length


@dataclasses.dataclass(frozen=True)
class _Deferred:
    """A tensor computed only when its bytes are written (one at a time, then dropped)."""

    tensor: Any

    @property
    def nbytes(self) -> int:
        return int(self.tensor.nbytes)

    def compute(self) -> np.ndarray:
        array = self.tensor.numpy()
        if not array.flags.c_contiguous:
            array = np.array(array, order="C")
        if array.nbytes != self.nbytes:
            raise ValueError(
                f"tensor '{self.tensor.name}' produced {array.nbytes} bytes, not {self.nbytes}"
            )
        return array


class _Ahead:
    """Computes the deferred tensors in a thread, one ahead of the writer: while one is
    written, the next is read and computed (at most two are in memory at a time)."""

    def __init__(self, pieces: list[_Deferred]) -> None:
        self._index = {id(p): i for i, p in enumerate(pieces)}
        self._pieces = pieces
        ahead = len(pieces) > 1 and threads() > 1
        self._pool = ThreadPoolExecutor(1, "normfuse-write") if ahead else None
        self._futures: dict[int, Future[np.ndarray]] = {}
        self._submit(0)

    def _submit(self, i: int) -> None:
        if self._pool is not None and i < len(self._pieces) and i not in self._futures:
            self._futures[i] = self._pool.submit(self._pieces[i].compute)

    def write(self, piece: _Deferred, out: Any) -> None:
        i = self._index[id(piece)]
        self._submit(i)
        self._submit(i + 1)
        future = self._futures.pop(i, None)
        array = future.result() if future is not None else piece.compute()
        out.write(array.reshape(-1).view(np.uint8).data)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


#: Ranges below this are read and written through the output's buffer; larger ones are copied
#: file to file in the kernel (copy_file_range), which needs the buffer flushed first.
_KERNEL_COPY_MIN = 1 << 20


def _copy_range(src: _FileRange, out: Any, sources: OpenFiles) -> None:
    fd_in = sources.fd(src.path)
    offset, left = src.offset, src.length
    if left >= _KERNEL_COPY_MIN:
        out.flush()
        try:
            while left:
                n = os.copy_file_range(fd_in, out.fileno(), left, offset)
                if n == 0:
                    raise OSError(f"{src.path} ended early")
                offset += n
                left -= n
        except (AttributeError, OSError):  # no copy_file_range here, or across filesystems
            pass
    while left:
        chunk = os.pread(fd_in, min(left, 1 << 24), offset)
        if not chunk:
            raise OSError(f"{src.path} ended early") from None
        out.write(chunk)
        offset += len(chunk)
        left -= len(chunk)


_Data = bytes | memoryview | _FileRange | _Deferred


def default_mode() -> int:
    """The permissions a newly created file gets (0666 less the umask); mkstemp makes 0600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _string_field(number: int, text: str) -> bytes:
    data = text.encode()
    return _field(number, len(data)) + data


def _entries(number: int, pairs: Iterable[tuple[str, str]]) -> bytes:
    """Repeated StringStringEntryProto (key = 1, value = 2) fields."""
    out = bytearray()
    for key, value in pairs:
        entry = _string_field(1, key) + _string_field(2, value)
        out += _field(number, len(entry)) + entry
    return bytes(out)


def _external_reference(location: str, offset: int, length: int) -> bytes:
    """TensorProto fields that point at ``length`` bytes of ``location`` from ``offset``: the
    ``external_data`` entries and ``data_location = EXTERNAL`` (appended, they win over earlier
    values)."""
    entries = (("location", location), ("offset", str(offset)), ("length", str(length)))
    return (
        _entries(_TENSOR_EXTERNAL_DATA, entries)
        + _varint(_TENSOR_DATA_LOCATION << 3)
        + _varint(onnx.TensorProto.EXTERNAL)
    )


def _header(name: str, tensor: Any) -> bytes:
    """The TensorProto of ``tensor`` without its data, in the wire format."""
    out = bytearray()
    # a tensor read from a TensorProto: its dims as they are there (its shape is built anew)
    dims = tensor.raw.dims if type(tensor) is ir.serde.TensorProtoTensor else tensor.shape.numpy()
    for dim in dims:  # repeated int64, not packed (proto2)
        out += _DIM_TAG + _varint(int(dim) & 0xFFFF_FFFF_FFFF_FFFF)
    out += _varint(_TENSOR_DATA_TYPE << 3) + _varint(tensor.dtype.value)
    out += _string_field(_TENSOR_NAME, name)
    if tensor.doc_string:
        out += _string_field(_TENSOR_DOC_STRING, tensor.doc_string)
    out += _entries(_TENSOR_METADATA_PROPS, tensor.metadata_props.items())
    return bytes(out)


_DIM_TAG = _varint(_TENSOR_DIMS << 3)


def _tensor_parts(name: str, tensor: Any) -> tuple[bytes, _Data] | None:
    """A tensor as (its TensorProto without data, its raw bytes), or None for onnx_ir to serialize.

    File-backed tensors are copied file to file, deferred ones are computed when written, and
    numpy-backed ones (the folded weights) are written from their buffer without a copy.
    """
    if tensor.dtype not in _RAW_OK or sys.byteorder != "little":
        return None
    if isinstance(tensor, ir.ExternalTensor):
        data = _FileRange(
            os.fspath(tensor.path), tensor.offset or 0, tensor.length or tensor.nbytes
        )
        return _header(name, tensor), data
    if isinstance(tensor, ir.LazyTensor):
        return _header(name, tensor), _Deferred(tensor)
    if isinstance(tensor, ir.Tensor):
        array = tensor.numpy()
        if not array.flags.c_contiguous:
            array = np.array(array, order="C")  # ascontiguousarray would make 0-d arrays 1-d
        return _header(name, tensor), array.reshape(-1).view(np.uint8).data
    if isinstance(tensor, ir.serde.TensorProtoTensor):
        return _header(name, tensor), tensor.tobytes()
    return None


def _as_read(name: str, tensor: Any, limit: int | None) -> bytes | None:
    """The TensorProto a small tensor was read from, as it was (the same bytes the fields would
    be written as, without decoding them), when it still has its name and raw bytes below
    ``limit`` (those at or above go to the data file); ``None`` otherwise."""
    if type(tensor) is not ir.serde.TensorProtoTensor:
        return None
    proto = tensor.raw
    if proto.name != name or not proto.HasField("raw_data"):
        return None
    if limit is not None and len(proto.raw_data) >= limit:
        return None
    return proto.SerializeToString()


def _write_data(piece: _Data, out: Any, sources: OpenFiles, ahead: _Ahead) -> None:
    if isinstance(piece, _FileRange):
        _copy_range(piece, out, sources)
    elif isinstance(piece, _Deferred):
        ahead.write(piece, out)
    else:
        out.write(piece)


def _nbytes(piece: _Data) -> int:
    return len(piece) if isinstance(piece, bytes) else piece.nbytes


def _claim_name(tmp: Path, folder: Path, names: Sequence[str]) -> str:
    """Give the complete file ``tmp`` the first of ``names`` that no file has, atomically and
    without replacing any file (``link`` fails on an existing name; where hard links are not
    supported, the name is created with ``O_EXCL`` and then replaced by ``tmp``)."""
    for name in names:
        target = folder / name
        try:
            os.link(tmp, target)
        except FileExistsError:
            continue
        except OSError:  # no hard links on this file system
            try:
                os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                continue
            os.replace(tmp, target)
            return name
        with contextlib.suppress(OSError):
            tmp.unlink()
        return name
    with contextlib.suppress(OSError):
        tmp.unlink()
    raise InputError(f"too many data files named like {names[0]} in {folder}", "remove stale ones")


def write_streaming(
    model: ir.Model,
    path: str | os.PathLike | BinaryIO,
    *,
    external_data: str | Sequence[str] | None = None,
    size_threshold: int = 1024,
) -> str | None:
    """Write ``model`` without building a copy of its tensors.

    onnx_ir serializes everything but the main graph's initializers; those are then appended to
    the graph message as length-delimited fields (protobuf parsing does not depend on field
    order): tensors read from the input, untouched, keep their bytes (re-emitted, or copied
    file to file when they live in a file), folded weights are written from their numpy buffers,
    and deferred ones are computed one at a time while they are written. The model is
    unchanged afterwards.

    Args:
        model: The model.
        path: The ONNX file to write.
        external_data: A file name next to ``path``, or a list of names to take the first
            free one of: tensors of at least ``size_threshold`` bytes go there. They are
            written to a hidden temporary file, which then takes the name atomically without
            replacing any file (a concurrent writer or an existing file makes it take the next
            name), before the model, which refers to that name, is written.
        size_threshold: See ``external_data``.

    Returns:
        The name of the data file written, or ``None`` when no tensor went to one.
    """
    names = [external_data] if isinstance(external_data, str) else list(external_data or [])
    values = [v for v in model.graph.initializers.values() if v.const_value is not None]
    tensors = [v.const_value for v in values]
    try:
        for v in values:
            v.const_value = None
        # onnx_ir would warn once per detached initializer
        with value_info_as_read(model), quiet("onnx_ir.serde"):
            proto = ir.serde.serialize_model(model)
    except ir.serde.SerdeError as exc:
        root = root_cause(exc)
        what = (
            "text that is not UTF-8" if isinstance(root, UnicodeDecodeError) else short_error(root)
        )
        raise InputError(
            f"the model cannot be written: {what}", "the input model is malformed"
        ) from None
    finally:
        for v, t in zip(values, tensors, strict=True):
            v.const_value = t
    graph_bytes = proto.graph.SerializeToString()
    proto.ClearField("graph")
    head = proto.SerializeToString()
    folder = Path(path).parent if not hasattr(path, "write") else Path(".")
    entries: list[tuple[bytes, list[_Data], int]] = []
    refs: list[
        tuple[int, bytes, int, int]
    ] = []  # (entry, header, offset, size) of data-file tensors
    used: str | None = None
    data_file = None
    data_tmp: Path | None = None
    offset = 0
    sources = OpenFiles()
    limit = size_threshold if names else None
    kept = [_as_read(v.name or "", t, limit) for v, t in zip(values, tensors, strict=True)]
    parted = [
        _tensor_parts(v.name or "", t) if k is None else None
        for v, t, k in zip(values, tensors, kept, strict=True)
    ]
    ahead = _Ahead([p[1] for p in parted if p is not None and isinstance(p[1], _Deferred)])
    try:
        for v, t, parts, as_read in zip(values, tensors, parted, kept, strict=True):
            name = v.name or ""
            assert t is not None  # only initializers with values were collected
            if as_read is not None:
                pieces: list[_Data] = [as_read]
            elif parts is None:
                t.name = name
                pieces = [ir.serde.serialize_tensor(t).SerializeToString()]
            else:
                header, data = parts
                size = _nbytes(data)
                if names and size >= size_threshold:
                    if data_file is None:
                        fd, tmp_name = tempfile.mkstemp(
                            prefix=f".{names[0]}.", suffix=".tmp", dir=folder
                        )
                        data_tmp = Path(tmp_name)
                        data_file = os.fdopen(fd, "wb")
                    _write_data(data, data_file, sources, ahead)
                    refs.append((len(entries), header, offset, size))
                    pieces = []  # the reference, once the data file has its name
                    offset += size
                else:
                    pieces = [header, _field(_TENSOR_RAW_DATA, size), data]
            size = sum(_nbytes(p) for p in pieces)
            entries.append((_field(_GRAPH_INITIALIZER, size), pieces, size))
        if data_file is not None:
            data_file.close()
            data_file = None
            os.chmod(data_tmp, default_mode())  # type: ignore[arg-type]
            used = _claim_name(data_tmp, folder, names)  # type: ignore[arg-type]
            data_tmp = None
            for i, header, at, size in refs:
                piece = header + _external_reference(used, at, size)
                entries[i] = (_field(_GRAPH_INITIALIZER, len(piece)), [piece], len(piece))
        graph_len = len(graph_bytes) + sum(len(tag) + size for tag, _, size in entries)
        if graph_len + len(head) > TWO_GIB - 1:
            raise InputError(
                "the model is above protobuf's 2 GiB limit without external data",
                "pass --external-data",
            )
        with open(path, "wb") if not hasattr(path, "write") else contextlib.nullcontext(path) as f:
            f.write(head)
            f.write(_field(_MODEL_GRAPH, graph_len))
            f.write(graph_bytes)
            for tag, pieces, _ in entries:
                f.write(tag)
                for piece in pieces:
                    _write_data(piece, f, sources, ahead)
        return used
    except BaseException:
        if used is not None:  # this call's own data file: the model that names it is not there
            with contextlib.suppress(OSError):
                (folder / used).unlink()
        raise
    finally:
        ahead.close()
        sources.close()
        if data_file is not None:
            data_file.close()
        if data_tmp is not None:
            with contextlib.suppress(OSError):
                data_tmp.unlink()
