"""Load and save ONNX models in every form users hold them, safely.

Inputs: a path (external data read lazily through memory maps), ``bytes``, ``onnx.ModelProto``,
``onnx_ir.Model`` and ``torch.onnx.ONNXProgram`` (recognised without importing torch).

Saving keeps the IR version, opset imports, producer, metadata and doc strings, because the
model goes through onnx_ir unchanged apart from the rewrite. Writes are atomic: the model is
written to a temporary file in the target folder and renamed into place. A model that had
external data, or that exceeds 2 GiB, is written with external data next to the output
(``<output name>.data``).

The wire-format work (lazy self-backed load, streaming save) is in :mod:`normfuse.onnxgraph.wire`.

Imports: onnx, onnx_ir, :mod:`normfuse.core` and the onnxgraph package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from normfuse.core.errors import InputError, OutputExistsError
from normfuse.core.gcpause import gc_paused
from normfuse.onnxgraph import handover
from normfuse.onnxgraph.graph import may_hold_subgraphs, proto_nbytes
from normfuse.onnxgraph.protos import (
    VALUE_INFO_KEY,
    to_proto,
    value_info_as_read,
    value_info_names,
)
from normfuse.onnxgraph.wire import (
    SELF_BACKED_KEY,
    TWO_GIB,
    check_model_prefix,
    default_mode,
    load_buffer_backed,
    load_self_backed,
    root_cause,
    short_error,
    write_streaming,
)

__all__ = [
    "EXTERNAL_DATA_KEY",
    "INPUT_FILES_KEY",
    "Loaded",
    "check_destination",
    "check_unchanged",
    "copy_model",
    "file_identity",
    "file_kind",
    "file_state",
    "has_external_data",
    "load",
    "reads_lazily",
    "save",
    "to_kind",
    "unwrap",
]

logger = logging.getLogger(__name__)


#: In-memory flag (``ir.Model.meta``, never serialized): the model was read with external data.
EXTERNAL_DATA_KEY = "normfuse.external_data"


#: In-memory flag (``ir.Model.meta``): the identities ``(st_dev, st_ino)`` of every file the
#: model was read from (the model file and its external data). :func:`save` never removes
#: them unless told the caller replaces its own input (``discard``).
INPUT_FILES_KEY = "normfuse.input_files"

#: In-memory record (``ir.Model.meta``) of the files the model reads tensors from lazily (a
#: self-backed model file, external data files): resolved path -> (device, inode, size,
#: mtime in ns) when read. :func:`check_unchanged` compares them before the tensors are used.
SOURCE_STATE_KEY = "normfuse.source_state"

#: Suffixes onnx reads as text; other files must start like a serialized ModelProto.
_TEXT_SUFFIXES = frozenset({".txt", ".onnxtxt", ".textproto", ".pbtxt", ".json", ".onnxjson"})


def file_identity(path: str | os.PathLike, *, follow: bool = True) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of a file (of the link itself with ``follow=False``), or ``None``."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_destination(
    path: str | os.PathLike, *, force: bool, option: str = "force=True", what: str = "output"
) -> None:
    """Refuse a destination that may not be replaced, before any work is done.

    A missing path whose folder exists is fine. A regular file needs ``force``; a symbolic
    link (dangling or not) needs ``force`` too, and is replaced itself, never its target;
    anything else (directory, FIFO, device, socket) is refused even with ``force``.

    Raises:
        OutputExistsError: The file or link exists and ``force`` is false.
        InputError: The destination is not a regular file, or its folder is missing.
    """
    out = Path(path)
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        st = None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot use {out} as the {what} ({exc})") from None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            if not force:
                raise OutputExistsError(
                    f"the {what} {out} is a symbolic link", f"pass {option} to replace the link"
                )
        elif not stat.S_ISREG(st.st_mode):
            raise InputError(
                f"the {what} {out} is {file_kind(st.st_mode)}, not a regular file",
                "name a regular file",
            )
        elif not force:
            raise OutputExistsError(f"{out} exists", f"pass {option} to replace it")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"the {what} folder {folder} does not exist", "create it first")


@dataclasses.dataclass
class Loaded:
    """A model read into onnx_ir, plus what is needed to give it back in the caller's form.

    Attributes:
        model: The model in onnx_ir form (owned by normfuse: safe to modify).
        kind: ``path``, ``bytes``, ``proto``, ``ir`` or ``onnx_program``.
        path: The file it came from, for ``path`` inputs.
        original: The caller's object, for ``onnx_program``.
        proto: The ModelProto the model was deserialized from (tensor bytes of a lazy load
            left out), while nothing has changed the model: :meth:`take_proto` hands it over
            once, to the rewrite that follows the load at once (shape inference copies its
            fields instead of serializing the graph again).
    """

    model: ir.Model
    kind: str
    path: Path | None = None
    original: Any = None
    proto: onnx.ModelProto | None = dataclasses.field(default=None, repr=False)

    def take_proto(self) -> onnx.ModelProto | None:
        """The source ModelProto, once; ``None`` afterwards (the model may change from then on)."""
        proto, self.proto = self.proto, None
        return proto


def _is_onnx_program(obj: object) -> bool:
    return type(obj).__name__ == "ONNXProgram" and hasattr(obj, "model")


def load(source: object, *, copy: bool = True, lazy: bool = False) -> Loaded:
    """Read a model from any supported form (the garbage collector paused meanwhile).

    Args:
        source: A path, bytes, ``onnx.ModelProto``, ``onnx_ir.Model`` or ``ONNXProgram``.
        copy: For ``onnx_ir.Model`` and ``ONNXProgram`` inputs, work on a copy so the caller's
            object is left as it was.
        lazy: For a path: do not read tensor bytes into memory; large initializers become
            views into the file (memory maps), and :func:`save` copies the untouched ones
            file to file. The file must stay in place until the model is saved.

    Raises:
        InputError: The source is missing, not a file, not ONNX, or of an unknown type.
    """
    with gc_paused():
        return _load(source, copy, lazy)


def _load(source: object, copy: bool, lazy: bool) -> Loaded:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise InputError(f"no such file: {path}") from None
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {path} ({exc})") from None
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"{path} is a directory, not an ONNX file")
        if not stat.S_ISREG(st.st_mode):
            raise InputError(
                f"{path} is {file_kind(st.st_mode)}, not a regular file",
                "give the path of an .onnx file",
            )
        if path.suffix.lower() not in _TEXT_SUFFIXES:
            check_model_prefix(path)
        try:
            backed = _try_self_backed(path) if lazy else None
            if backed is not None:
                model, proto = backed
            else:  # what ir.load does, keeping the ModelProto
                proto = onnx.load(path, load_external_data=False)
                model = ir.serde.deserialize_model(proto)  # base folders: set below
        except ir.serde.SerdeError as exc:  # a RuntimeError: it goes first
            raise InputError(
                f"{path} is not a readable ONNX model ({short_error(root_cause(exc))})"
            ) from None
        except UnicodeDecodeError:
            raise InputError(
                f"{path} is not a readable ONNX model (text that is not UTF-8)"
            ) from None
        except (DecodeError, onnx.onnx_cpp2py_export.checker.ValidationError, RuntimeError) as exc:
            raise InputError(f"{path} is not a readable ONNX model ({short_error(exc)})") from None
        graphs = _graphs(model)
        tensors = _tensors(model, graphs)
        _check_has_graph(model, str(path), tensors)
        _check_structure(model, str(path))
        external = False
        for _, tensor, initializer in tensors:  # every tensor of every graph, attributes too
            if isinstance(tensor, ir.ExternalTensor):
                tensor.base_dir = path.parent  # where relative locations start
                external = external or (initializer and not tensor.meta.get(SELF_BACKED_KEY))
        if external:
            _check_external_data(model, path.parent)
            model.meta[EXTERNAL_DATA_KEY] = True
        sources = _sources(model, graphs)
        model.meta[INPUT_FILES_KEY] = frozenset(
            {(st.st_dev, st.st_ino)} | {i for i in map(file_identity, sources) if i}
        )
        state = {str(path.resolve()): _state(st)} if backed is not None else {}
        for source_path in sources:
            with contextlib.suppress(OSError):
                state.setdefault(str(source_path), _state(os.stat(source_path)))
        model.meta[SOURCE_STATE_KEY] = state
        model.meta[VALUE_INFO_KEY] = value_info_names(proto)
        return Loaded(model, "path", path=path, proto=proto)
    if isinstance(source, (bytes, bytearray, memoryview)):
        backed = None
        if isinstance(source, bytes):  # immutable: its large tensors are viewed, not copied
            with contextlib.suppress(DecodeError, IndexError, ValueError):
                backed = load_buffer_backed(source)
        if backed is not None:
            model, proto = backed
        else:
            proto = onnx.ModelProto()
            try:
                proto.ParseFromString(bytes(source))
            except DecodeError as exc:
                raise InputError(f"the bytes are not an ONNX model ({short_error(exc)})") from None
            model = ir.from_proto(proto)
        _check_has_graph(model, "bytes")
        _check_structure(model, "bytes")
        model.meta[VALUE_INFO_KEY] = value_info_names(proto)
        return Loaded(model, "bytes", proto=proto)
    if isinstance(source, onnx.ModelProto):
        model = ir.from_proto(source)
        _check_has_graph(model, "ModelProto")
        _check_structure(model, "ModelProto")
        model.meta[VALUE_INFO_KEY] = value_info_names(source)
        return Loaded(model, "proto", proto=source)
    if isinstance(source, ir.Model):
        check_unchanged(source)
        taken = handover.take(source) if copy else None
        if taken is not None:  # from normfuse.load, never looked into: no copy to make
            model, proto = taken
            return Loaded(model, "ir", path=handover.path_of(source), original=source, proto=proto)
        model = copy_model(source) if copy else source
        return Loaded(model, "ir", original=source, proto=handover.proto_if_unchanged(source))
    if _is_onnx_program(source):
        inner = source.model  # type: ignore[attr-defined]
        model = copy_model(inner) if copy else inner
        return Loaded(model, "onnx_program", original=source)
    raise InputError(
        f"cannot read a model from {type(source).__name__}",
        "pass a path, bytes, onnx.ModelProto, onnx_ir.Model or torch.onnx.ONNXProgram",
    )


def copy_model(model: ir.Model) -> ir.Model:
    """A private copy: every graph, node and value new, the tensors shared (``Model.clone``;
    normfuse never writes into a tensor, it replaces them), with the original's in-memory flags
    (external data, input files, the file a self-backed model reads). External tensors keep
    reading from where the original's do."""
    copied = model.clone()
    for key in (
        EXTERNAL_DATA_KEY,
        INPUT_FILES_KEY,
        SELF_BACKED_KEY,
        SOURCE_STATE_KEY,
        VALUE_INFO_KEY,
    ):
        if key in model.meta:
            copied.meta[key] = model.meta[key]
    return copied


def _graphs(model: ir.Model) -> list[ir.Graph]:
    """``model.graphs()`` (the main graph and its subgraphs); without onnx_ir's recursive walk
    when no node holds a subgraph, which on big graphs cost ~18 µs a node per call."""
    for node in model.graph:
        if may_hold_subgraphs(node) and any(
            a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for a in node.attributes.values()
        ):
            return list(model.graphs())
    return [model.graph]


def _state(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def file_state(path: str | os.PathLike) -> tuple[int, int, int, int] | None:
    """A file's (device, inode, size, mtime in ns), or ``None`` when it cannot be read."""
    try:
        return _state(os.stat(path))
    except OSError:
        return None


def check_unchanged(model: ir.Model) -> None:
    """Refuse a model whose lazily read files changed since it was read (their tensors would
    be read from different bytes).

    Raises:
        InputError: A file is gone, replaced or modified.
    """
    for name, state in model.meta.get(SOURCE_STATE_KEY, {}).items():
        now = file_state(name)
        if now != state:
            what = "was removed" if now is None else "changed"
            raise InputError(
                f"{name} {what} since the model was read from it, and the model reads tensors "
                "from that file",
                "load the model again and redo the rewrite; keep the file unchanged until the "
                "model is saved (docs/python.md: lazy loading)",
            )


def _try_self_backed(path: Path) -> tuple[ir.Model, onnx.ModelProto] | None:
    """The self-backed model, or ``None`` so that the normal loader reads (and judges) the file."""
    try:
        return load_self_backed(path)
    except (DecodeError, IndexError, ValueError, OSError):
        return None


def _check_external_data(model: ir.Model, base: Path) -> None:
    """Refuse, before anything is read, external data outside ``base``, missing or too short."""
    root = base.resolve()
    sizes: dict[str, int | None] = {}  # location -> file size (None: missing), each looked up once
    for graph in _graphs(model):
        for value in graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, ir.ExternalTensor):
                continue
            location = os.fspath(tensor.location)
            if any(ord(ch) < 0x20 or ch == "\x7f" for ch in location):
                raise InputError(
                    f"tensor '{value.name}' names the external data file {location!r}, "
                    "with control characters",
                    "the model is corrupt or hostile; refusing to read it",
                )
            if location not in sizes:
                target = (root / location).resolve()
                if os.path.isabs(location) or not target.is_relative_to(root):
                    raise InputError(
                        f"tensor '{value.name}' points outside the model's folder ({location})",
                        "external data must lie in the model's folder; refusing to read it",
                    )
                sizes[location] = target.stat().st_size if target.is_file() else None
                if sizes[location] is None and target.exists():
                    raise InputError(
                        f"the external data file '{location}' of tensor '{value.name}' is "
                        f"{file_kind(target.stat().st_mode)}, not a regular file"
                    )
            size = sizes[location]
            if size is None:
                raise InputError(
                    f"the external data file '{location}' of tensor '{value.name}' is missing",
                    f"put it next to the model in {base}",
                )
            end = (tensor.offset or 0) + (
                tensor.length if tensor.length is not None else tensor.nbytes
            )
            if size < end:
                raise InputError(
                    f"the external data file '{location}' is shorter than tensor '{value.name}' needs "
                    f"({size} < {end} bytes)",
                    "the file is truncated or belongs to another model",
                )


def _tensors(model: ir.Model, graphs: list[ir.Graph] | None = None) -> list[tuple[str, Any, bool]]:
    """``(label, tensor, is_initializer)`` for every initializer and tensor attribute (of
    ``graphs``, the model's :func:`_graphs`, when the caller has them)."""
    found: list[tuple[str, Any, bool]] = []
    for graph in _graphs(model) if graphs is None else graphs:
        found += [(v.name or "", v.const_value, True) for v in graph.initializers.values()]
        for node in graph:
            if not node.attributes:
                continue
            for a in node.attributes.values():
                if a.is_ref():
                    continue
                if a.type == ir.AttributeType.TENSOR:
                    found.append((f"{node.op_type} '{node.name}'.{a.name}", a.value, False))
                elif a.type == ir.AttributeType.TENSORS:
                    found += [
                        (f"{node.op_type} '{node.name}'.{a.name}[{i}]", t, False)
                        for i, t in enumerate(a.value)
                    ]
    return found


def _check_has_graph(
    model: ir.Model, where: str, tensors: list[tuple[str, Any, bool]] | None = None
) -> None:
    """Refuse a model without a graph, and tensors whose type or shape cannot be decoded."""
    if len(model.graph) == 0 and not model.graph.outputs:
        raise InputError(f"{where} holds no graph (empty or not an ONNX model)")
    for name, tensor, _ in _tensors(model) if tensors is None else tensors:
        if tensor is None or _plain_and_whole(tensor):
            continue
        try:
            if tensor.dtype == ir.DataType.UNDEFINED:
                raise ValueError("its element type is undefined")
            tensor.shape  # noqa: B018 - decoding the shape is the check
            _check_byte_count(tensor)
        except (ValueError, TypeError) as exc:
            raise InputError(
                f"tensor {name!r} in {where} is malformed ({short_error(exc)})"
            ) from None


def _plain_and_whole(tensor: Any) -> bool:
    """True for a tensor read from a TensorProto whose raw bytes are exactly what its
    non-negative dims and known element type need: what the checks of :func:`_check_has_graph`
    pass, decided from the proto's fields (on big graphs, most tensors; others take the checks)."""
    need = proto_nbytes(tensor)
    if need is None:
        return False
    proto = tensor.raw
    return (
        proto.HasField("raw_data")
        and min(proto.dims, default=0) >= 0
        and len(proto.raw_data) == need
    )


def _check_byte_count(tensor: Any) -> None:
    """Refuse a tensor whose stored bytes are not what its dims and type need."""
    need = tensor.nbytes
    if isinstance(tensor, ir.serde.TensorProtoTensor):
        proto = tensor.raw
        if proto.HasField("raw_data") and len(proto.raw_data) != need:
            raise ValueError(
                f"its raw_data holds {len(proto.raw_data)} bytes, its dims need {need}"
            )
    elif isinstance(tensor, ir.ExternalTensor) and tensor.length not in (None, need):
        raise ValueError(f"its external data holds {tensor.length} bytes, its dims need {need}")


def _check_structure(model: ir.Model, where: str) -> None:
    """Refuse what is not a graph: undefined inputs, cycles, names defined twice."""

    def walk(graph: ir.Graph, outer: set[int]) -> None:
        defined = (
            set(outer)
            | {id(v) for v in graph.inputs}
            | {id(v) for v in graph.initializers.values()}
        )
        names: set[str] = {v.name for v in graph.inputs if v.name}
        outputs = [v.name for v in graph.outputs]
        if len(set(outputs)) != len(outputs):
            dup = next(n for n in outputs if outputs.count(n) > 1)
            raise InputError(f"{where}: graph output '{dup}' is listed twice")
        add_defined, add_name = defined.add, names.add  # a few million calls on big graphs
        for node in graph:
            for v in node.inputs:
                if v is not None and id(v) not in defined:
                    what = (
                        "is produced later (a cycle, or nodes out of order)"
                        if v.producer() is not None
                        else "is never defined"
                    )
                    raise InputError(
                        f"{where}: input '{v.name}' of {node.op_type} '{node.name}' {what}"
                    )
            for attr in node.attributes.values() if may_hold_subgraphs(node) else ():
                subgraphs = (
                    [attr.value]
                    if attr.type == ir.AttributeType.GRAPH
                    else (list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
                )
                for sub in subgraphs:
                    walk(sub, defined)
            for out in node.outputs:
                name = out.name
                if name:
                    if name in names:
                        raise InputError(f"{where}: tensor '{name}' is produced twice")
                    add_name(name)
                add_defined(id(out))

    walk(model.graph, set())


def to_kind(loaded: Loaded, model: ir.Model) -> Any:
    """Give ``model`` back in the form the caller passed in (a path gives an onnx_ir.Model)."""
    if loaded.kind == "proto":
        with value_info_as_read(model):
            return to_proto(model)
    if loaded.kind == "bytes":  # written as save writes a file: no ModelProto copy between
        out = io.BytesIO()
        write_streaming(model, out)
        return out.getvalue()
    if loaded.kind == "onnx_program":
        cls = type(loaded.original)
        return cls(model, getattr(loaded.original, "exported_program", None))
    return model


def unwrap(model: object) -> ir.Model:
    """The onnx_ir model inside any supported object (no copy where possible)."""
    return load(model, copy=False).model


def has_external_data(model: ir.Model, graphs: list[ir.Graph] | None = None) -> bool:
    """True when some initializer of the model (of ``graphs``, its :func:`_graphs`) lives in
    an external file."""
    for graph in _graphs(model) if graphs is None else graphs:
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and not tensor.meta.get(SELF_BACKED_KEY):
                return True
    return False


def reads_lazily(model: ir.Model) -> bool:
    """True when some tensor of the model is still read from a file (self-backed included)."""
    return any(
        isinstance(value.const_value, ir.ExternalTensor)
        for graph in _graphs(model)
        for value in graph.initializers.values()
    )


def _total_bytes(model: ir.Model, graphs: list[ir.Graph]) -> int:
    tensors = [v.const_value for g in graphs for v in g.initializers.values()]
    return sum(
        n if (n := proto_nbytes(t)) is not None else t.nbytes for t in tensors if t is not None
    )


def _data_names(out_name: str) -> list[str]:
    """Names the output's data file may take, first free one wins: ``<out>.data``, then
    ``<out>.N.data`` (see :func:`normfuse.onnxgraph.wire.write_streaming`, which takes the name
    atomically, never replacing a file: the input's data, the data the old output still points
    at, or a concurrent run's)."""
    return [f"{out_name}.data"] + [f"{out_name}.{n}.data" for n in range(1, 1000)]


def _our_data_files(out: Path) -> dict[Path, tuple[int, int]]:
    """Data files of the current ``out`` that follow normfuse's naming (candidates for removal),
    with the identity each has now."""
    if not out.is_file() or out.is_symlink():
        return {}
    ours = {out.parent / f"{out.name}.data"} | set(out.parent.glob(f"{out.name}.*.data"))
    ours = {p for p in ours if p.is_file() and not p.is_symlink()}
    if not ours:
        return {}
    try:
        old = onnx.load(str(out), load_external_data=False)
    except Exception:
        return {}
    referenced = {
        out.parent / entry.value
        for t in old.graph.initializer
        for entry in t.external_data
        if entry.key == "location"
    }
    found = {p: file_identity(p, follow=False) for p in ours & referenced}
    return {p: i for p, i in found.items() if i is not None}


def _sources(model: ir.Model, graphs: list[ir.Graph]) -> set[Path]:
    paths = {
        os.fspath(v.const_value.path)
        for g in graphs
        for v in g.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    }
    return {Path(p).resolve() for p in paths}  # each file once: resolving stats every folder


def save(
    model: object,
    path: str | os.PathLike,
    *,
    force: bool = False,
    external_data: bool | None = None,
    protect: os.PathLike | str | None = None,
    verify: Callable[[Path], None] | None = None,
    discard: bool = False,
) -> Path:
    """Write a model atomically, crash-consistent with its external data.

    The model goes to a temporary file in the target folder; external data goes to a file name
    this run creates exclusively (``<output>.data``, or ``<output>.N.data`` while that exists);
    the model is verified, then renamed into place, and only then is the data file of the
    replaced output removed, unless a file this run read (compared by identity, not by name)
    is that file. A process killed at any moment leaves the old output with its data, or the new
    one with its own, never a mix (at worst a hidden temporary file or an unreferenced data
    file remains).

    Args:
        model: Any supported model object.
        path: The output file.
        force: Replace an existing file.
        external_data: ``True`` to write tensors to a data file next to the output, ``False``
            to embed them, ``None`` to do so when the model had external data or exceeds 2 GiB.
        protect: A path that must not be written (the input, unless in-place was asked).
        verify: Called with the complete temporary file before it is renamed into place;
            if it raises, nothing is renamed and the new files are removed.
        discard: The caller replaces its own input and will not use ``model`` afterwards, so
            data files it read may be removed when they belonged to the replaced output (an
            in-place fold). Without it, no file the model was read from is ever removed.

    Returns:
        The path written.

    Raises:
        OutputExistsError: The output exists (or is a symbolic link) and ``force`` is false,
            or it is ``protect``.
        InputError: The output folder does not exist, the output is not a regular file, or
            writing failed (disk full, no permission): nothing was written.
    """
    ir_model = unwrap(model)
    check_unchanged(ir_model)
    out = Path(path)
    here = file_identity(out)
    if protect is not None and here is not None and here == file_identity(protect):
        raise OutputExistsError(
            f"the output {out} is the input", "write to another path, or replace it in place"
        )
    check_destination(out, force=force)
    folder = out.parent if str(out.parent) else Path(".")
    graphs = _graphs(ir_model)  # one walk of a big graph, not one per question below
    if external_data is None:
        external_data = (
            bool(ir_model.meta.get(EXTERNAL_DATA_KEY))
            or has_external_data(ir_model, graphs)
            or _total_bytes(ir_model, graphs) > TWO_GIB
        )
    data_name: str | None = None
    tmp: Path | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        tmp = Path(tmp_name)
        with gc_paused():
            data_name = write_streaming(
                ir_model, tmp, external_data=_data_names(out.name) if external_data else None
            )
        os.chmod(tmp, default_mode())
        if verify is not None:
            verify(tmp)
        keep = set() if discard else set(ir_model.meta.get(INPUT_FILES_KEY, ()))
        if not discard:
            keep |= {i for i in map(file_identity, _sources(ir_model, graphs)) if i is not None}
        with _folder_lock(folder):  # concurrent runs writing this output switch one at a time
            stale = _our_data_files(out)  # the data of the output this rename replaces
            os.replace(tmp, out)  # the switch: before it the old output stands, after it the new
            tmp = None
            for old, identity in stale.items():
                if old.name == data_name or identity in keep:
                    continue  # an input of this run reads it: never removed
                if file_identity(old, follow=False) == identity:  # still the replaced one's
                    with contextlib.suppress(OSError):
                        old.unlink()
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if data_name is not None:  # this run's own data file, which no output names
            with contextlib.suppress(OSError):
                (folder / data_name).unlink()
        if isinstance(exc, OSError):
            raise _write_error(exc, out, folder) from None
        raise
    logger.info("wrote %s", out)
    return out


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) on the output folder itself (no lock file), held
    while a run reads which data the current output uses, replaces the output, and removes
    that data: two runs writing one output never remove each other's data or leave it behind."""
    try:
        import fcntl
    except ImportError:  # no flock here: the switch stays atomic, clean-up is best effort
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_error(exc: OSError, out: Path, folder: Path) -> InputError:
    """An OSError while writing, as one line naming the output and what to do."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        note = f"free space on the disk of {folder}, then run again"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        note = f"write to a folder you may write to, not {folder}"
    else:
        note = "check the output folder and the disk"
    return InputError(f"cannot write {out}: {reason}; nothing was written", note)
