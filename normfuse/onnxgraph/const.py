"""Resolve a graph value to a constant array, or say why it is not one.

Parameters of BatchNorm and of linear ops arrive in several forms:

* initializers (the usual case), possibly from an outer graph when the node is in a subgraph;
* ``Constant`` nodes, and ``Identity`` nodes in front of either (the legacy PyTorch exporter
  deduplicates equal tensors behind ``Identity``);
* constant subexpressions: the dynamo exporter with ``optimize=False`` writes a missing conv
  bias as ``Expand(CastLike(0, x), Expand(Shape(W, end=1), [1]))``, where ``x`` is a runtime
  tensor but only its element type is used.

Graph inputs are overridable at run time, so a value that is a graph input is never treated as a
constant (except in IR version < 4 models, where every initializer had to be listed as an input).

The evaluator covers the ops that appear on the weight side of exported models, in numpy.
Anything else is "not constant" with its reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

__all__ = [
    "LARGE_BYTES",
    "SHAPE_READERS",
    "ConstantResolver",
    "FileArray",
    "NotConstant",
    "OpenFiles",
    "all_equal_to",
    "read_tensor",
    "reads_shape_only",
]

logger = logging.getLogger(__name__)

_MAX_DEPTH = 64

#: Arrays at least this large are dropped from the cache after each chain, and file-backed
#: weights at least this large are folded lazily (computed while the model is written).
LARGE_BYTES = 1 << 20


class FileArray:
    """The shape and dtype of a large file-backed tensor; its values are read only on demand.

    numpy reads it through ``__array__``; code that needs only the geometry (most folds after a
    linear op) never touches the file.
    """

    def __init__(self, tensor: ir.ExternalTensor) -> None:
        self.tensor = tensor
        self.shape = tuple(int(d) for d in tensor.shape.numpy())
        self.dtype = np.dtype(tensor.dtype.numpy())
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape))
        self.nbytes = self.size * self.dtype.itemsize

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = read_tensor(self.tensor)
        return array if dtype is None else array.astype(dtype)


class OpenFiles:
    """Files read from many times (the tensors of one model), each opened once until closed."""

    def __init__(self) -> None:
        self._files: dict[str, Any] = {}

    def fd(self, path: str | os.PathLike) -> int:
        key = os.fspath(path)
        f = self._files.get(key)
        if f is None:
            f = self._files[key] = open(key, "rb")  # noqa: SIM115 - closed by close()
        return f.fileno()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def read_tensor(tensor: ir.TensorProtocol, files: OpenFiles | None = None) -> np.ndarray:
    """The tensor's values; a file-backed tensor is read into fresh memory, not memory-mapped.

    Mapped pages of a large model would stay resident (and count as the process's memory)
    until the map is closed; a plain read leaves only the page cache behind. ``files`` keeps
    the data files open between reads.
    """
    if isinstance(tensor, ir.ExternalTensor):
        dtype = tensor.dtype.numpy()
        if dtype.itemsize and tensor.dtype.bitwidth == dtype.itemsize * 8:
            shape = tensor.shape.numpy()
            count = int(np.prod(shape))
            own = files is None
            opened = OpenFiles() if files is None else files
            array = np.empty(count, dtype=dtype)
            view = array.view(np.uint8).data
            try:
                fd, offset, done = opened.fd(tensor.path), tensor.offset or 0, 0
                while done < len(view):  # one read returns at most ~2 GiB
                    n = os.preadv(fd, [view[done:]], offset + done)
                    if n == 0:
                        break
                    done += n
            finally:
                if own:
                    opened.close()
            got = done // max(dtype.itemsize, 1)
            if got != count:
                raise NotConstant(f"the external data of '{tensor.name}' is shorter than its shape")
            return array.reshape(shape)
    if type(tensor) is ir.serde.TensorProtoTensor:
        proto = tensor.raw
        dtype = _RAW_DTYPES.get(proto.data_type)
        if (
            dtype is not None
            and proto.HasField("raw_data")
            and proto.data_location != onnx.TensorProto.EXTERNAL
        ):  # what TensorProtoTensor.numpy returns for whole-byte types, without its dispatch
            return np.frombuffer(proto.raw_data, dtype=dtype).reshape(proto.dims)
    return tensor.numpy()


def _raw_dtypes() -> dict[int, np.dtype]:
    """data_type -> the little-endian numpy dtype of its raw bytes, for whole-byte types."""
    found = {}
    for t in ir.DataType:
        try:
            if t.bitwidth in (8, 16, 32, 64, 128) and t != ir.DataType.STRING:
                found[int(t)] = t.numpy().newbyteorder("<")
        except (TypeError, ValueError, KeyError):  # no bit width or no numpy type
            continue
    return found


_RAW_DTYPES = _raw_dtypes()


#: Ops that read only the shape or element type of their input at these positions: one table
#: for the fold (a reader of this kind is no data use), constant resolution (``CastLike`` of a
#: constant is one) and the check (:mod:`normfuse.runtime.noise`).
SHAPE_READERS: dict[str, frozenset[int]] = {
    "Shape": frozenset({0}),
    "Size": frozenset({0}),
    "CastLike": frozenset({1}),
}


def reads_shape_only(node: ir.Node, idx: int) -> bool:
    """Whether ``node`` reads only the shape or element type of its input ``idx`` (``Shape``,
    ``Size``, the target of ``CastLike``): the legacy exporter's ``reshape_as`` reads a
    Linear's output through a ``Shape`` beside the norm that follows it (LeViT)."""
    return node.domain in ("", "ai.onnx") and idx in SHAPE_READERS.get(node.op_type, ())


def all_equal_to(c: np.ndarray, value: float) -> bool:
    """Whether every element of ``c`` equals ``value`` (-0.0 equals 0; NaN nothing). A small
    array is compared as Python numbers: two numpy reductions per node were a tenth of the
    fold of a graph of 100k per-channel constants."""
    if c.size <= 64:
        return set(c.reshape(-1).tolist()) <= {value}
    return bool(np.all(c == value))


class NotConstant(Exception):
    """The value is not a compile-time constant; ``str(exc)`` says why."""


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _axes(node: ir.Node, inputs: list[np.ndarray | None], opset: int, since: int) -> list[int]:
    if opset >= since:
        return [int(v) for v in inputs[1]] if len(inputs) > 1 and inputs[1] is not None else []
    return [int(v) for v in _attr(node, "axes", [])]


def _constant_node(node: ir.Node) -> np.ndarray:
    for name, attr in node.attributes.items():
        v = attr.value
        if name == "value":
            return v.numpy()
        if name == "value_float":
            return np.array(v, dtype=np.float32)
        if name == "value_floats":
            return np.array(list(v), dtype=np.float32)
        if name == "value_int":
            return np.array(v, dtype=np.int64)
        if name == "value_ints":
            return np.array(list(v), dtype=np.int64)
    raise NotConstant(f"Constant node '{node.name}' has no value normfuse can read")


def _slice(data: np.ndarray, starts, ends, axes, steps) -> np.ndarray:
    index = [slice(None)] * data.ndim
    axes = list(range(len(starts))) if axes is None else list(axes)
    steps = [1] * len(starts) if steps is None else list(steps)
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        index[int(a)] = slice(int(s), int(e), int(st))
    return data[tuple(index)]


class ConstantResolver:
    """Resolve values to numpy arrays with a cache; one resolver per model and opset.

    Args:
        opset: The default-domain opset version of the graph the values live in.
        ir_version: The model's IR version (before 4, initializers are listed as inputs).
        keep_open: Keep data files open between reads; the owner calls :meth:`close`.
    """

    def __init__(self, opset: int, ir_version: int = 10, keep_open: bool = False) -> None:
        self.opset = opset
        self.ir_version = ir_version
        self._cache: dict[int, np.ndarray | NotConstant] = {}
        self._large: list[int] = []  # keys of cached arrays of at least LARGE_BYTES
        # id -> (value, could it be constant): the value is kept so that its id is not reused
        self._maybe: dict[int, tuple[ir.Value, bool]] = {}
        self.files = OpenFiles() if keep_open else None

    def close(self) -> None:
        """Close the data files kept open (``keep_open``); they reopen if read again."""
        if self.files is not None:
            self.files.close()

    def is_overridable_input(self, value: ir.Value) -> bool:
        """True when the value is a graph input that a caller may feed at run time."""
        if not value.is_graph_input():
            return False
        return not (self.ir_version < 4 and value.const_value is not None)

    def try_resolve(self, value: ir.Value | None) -> np.ndarray | None:
        """The array, or ``None`` when the value is not constant."""
        if not self.may_be_constant(value):
            return None  # most values of a graph: no exception raised through the producers
        try:
            return self.resolve(value)
        except NotConstant:
            return None

    def may_be_constant(self, value: ir.Value | None, depth: int = 0) -> bool:
        """False when ``value`` is certainly not a compile-time constant (a structural test:
        no tensor is read); True means that :meth:`resolve` may succeed."""
        if value is None:
            return False
        key = id(value)
        hit = self._cache.get(key)
        if hit is not None:
            return not isinstance(hit, NotConstant)
        known = self._maybe.get(key)
        if known is not None and known[0] is value:
            return known[1]
        if self.is_overridable_input(value):
            result = False
        elif value.const_value is not None:
            result = True
        else:
            node = value.producer()
            if (
                node is None
                or node.domain not in ("", "ai.onnx")
                or node.op_type not in _EVALUATORS
                or len(node.outputs) != 1
            ):
                result = False
            elif node.op_type in ("Shape", "Constant") or depth > _MAX_DEPTH:
                result = True  # Shape reads only the shape of its input
            else:  # a shape or type read (CastLike's target: the dynamo exporter's attention
                # scale Sqrt(CastLike(Constant, q)), q a run-time tensor) needs no constant
                result = all(
                    self.may_be_constant(v, depth + 1)
                    for i, v in enumerate(node.inputs)
                    if v is not None and not reads_shape_only(node, i)
                )
        self._maybe[key] = (value, result)
        return result

    def resolve(self, value: ir.Value | None, depth: int = 0) -> np.ndarray:
        """The constant array behind ``value``.

        Raises:
            NotConstant: With the reason, when it is not a compile-time constant.
        """
        if value is None:
            raise NotConstant("the input is missing")
        key = id(value)
        hit = self._cache.get(key)
        if hit is None:
            try:
                hit = self._resolve(value, depth)
            except NotConstant as exc:
                hit = exc
            self._cache[key] = hit
            if isinstance(hit, np.ndarray) and hit.nbytes >= LARGE_BYTES:
                self._large.append(key)
        if isinstance(hit, NotConstant):
            raise hit.with_traceback(None)  # a cached reason raised again keeps no old frames
        return hit

    def forget(self, value: ir.Value) -> None:
        """Drop a cached result (after the value's tensor was replaced)."""
        self._cache.pop(id(value), None)
        self._maybe.pop(id(value), None)

    def forget_failures(self) -> None:
        """Drop the cached "not constant" results (after shapes were set: a ``Shape`` of a
        value that now has a static one resolves). Resolved arrays stay: setting a missing
        shape changes none of them."""
        failed = [key for key, hit in self._cache.items() if isinstance(hit, NotConstant)]
        for key in failed:
            del self._cache[key]

    def resolve_weight(self, value: ir.Value | None) -> np.ndarray | FileArray:
        """Like :meth:`resolve`, but a large file-backed tensor comes back as a :class:`FileArray`."""
        tensor = value.const_value if value is not None else None
        if (
            value is not None
            and isinstance(tensor, ir.ExternalTensor)
            and tensor.nbytes >= LARGE_BYTES
            and not self.is_overridable_input(value)
            and tensor.dtype.bitwidth == np.dtype(tensor.dtype.numpy()).itemsize * 8
        ):
            return FileArray(tensor)
        return self.resolve(value)

    def drop_large(self) -> None:
        """Forget cached arrays of at least :data:`LARGE_BYTES`, to bound memory on big models."""
        for key in self._large:
            self._cache.pop(key, None)
        self._large.clear()

    def _resolve(self, value: ir.Value, depth: int) -> np.ndarray:
        name = value.name or "<unnamed>"
        if self.is_overridable_input(value):
            raise NotConstant(
                f"'{name}' is a graph input, so it can be overridden at run time and is not "
                "baked into weights"
            )
        if value.const_value is not None:
            try:
                return read_tensor(value.const_value, self.files)
            except (ValueError, TypeError, OSError) as exc:  # bytes that do not fit dtype/shape
                raise NotConstant(f"the tensor '{name}' is malformed ({exc})") from None
        node = value.producer()
        if node is None:
            raise NotConstant(f"'{name}' is computed at run time")
        if depth > _MAX_DEPTH:
            raise NotConstant(f"'{name}' comes from a constant expression too deep to evaluate")
        if node.domain not in ("", "ai.onnx"):
            raise NotConstant(f"'{name}' comes from {node.domain}::{node.op_type}")
        evaluator = _EVALUATORS.get(node.op_type)
        if evaluator is None:
            raise NotConstant(f"'{name}' comes from {node.op_type} '{node.name}' at run time")
        try:
            result = evaluator(self, node, depth + 1)
        except NotConstant:
            raise
        except (
            ValueError,
            TypeError,
            IndexError,
            KeyError,
            ArithmeticError,
            AssertionError,
            AttributeError,
        ) as exc:
            raise NotConstant(
                f"'{name}' comes from {node.op_type} '{node.name}', which cannot be evaluated ({exc})"
            ) from None
        outputs = list(node.outputs)
        if len(outputs) != 1:
            raise NotConstant(f"'{name}' comes from a multi-output {node.op_type}")
        return np.asarray(result)

    def _inputs(self, node: ir.Node, depth: int) -> list[np.ndarray | None]:
        return [None if v is None else self.resolve(v, depth) for v in node.inputs]


#: Ops whose output has the element type of their first input.
_SAME_TYPE_OPS = frozenset(
    {
        "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand",
        "Slice", "Gather", "Concat", "Split", "Tile", "Pad", "Dropout",
        "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sqrt", "Relu", "Sigmoid", "Tanh",
        "BatchNormalization", "InstanceNormalization", "LayerNormalization",
        "GroupNormalization", "RMSNormalization", "MaxPool", "AveragePool",
        "GlobalAveragePool", "Conv", "ConvTranspose", "MatMul", "Gemm", "Softmax",
    }
)  # fmt: skip


def _dtype_of(value: ir.Value) -> np.dtype:
    """The element type of ``value``, also where shape inference left it unset: found through
    the ops that keep their first input's (the dynamo exporter's ``CastLike(gamma, x)`` after
    a Reshape)."""
    found: ir.Value | None = value
    for _ in range(64):
        if found is None or found.dtype is not None:
            break
        node = found.producer()
        if node is None or node.op_type not in _SAME_TYPE_OPS or node.domain not in ("", "ai.onnx"):
            found = None
        else:
            found = node.inputs[0] if node.inputs else None
    if found is None or found.dtype is None:
        raise NotConstant(f"the element type of '{value.name}' is unknown")
    return found.dtype.numpy()


def _ev_identity(r: ConstantResolver, node: ir.Node, depth: int) -> np.ndarray:
    return r.resolve(node.inputs[0], depth)


def _ev_cast(r: ConstantResolver, node: ir.Node, depth: int) -> np.ndarray:
    to = ir.DataType(int(_attr(node, "to")))
    return r.resolve(node.inputs[0], depth).astype(to.numpy())


def _ev_castlike(r: ConstantResolver, node: ir.Node, depth: int) -> np.ndarray:
    like = node.inputs[1]
    assert like is not None
    return r.resolve(node.inputs[0], depth).astype(_dtype_of(like))


def _ev_shape(r: ConstantResolver, node: ir.Node, depth: int) -> np.ndarray:
    src = node.inputs[0]
    assert src is not None
    if src.const_value is not None and not r.is_overridable_input(src):
        dims = [int(d) for d in src.const_value.shape.numpy()]  # no need to read the values
    elif (arr := r.try_resolve(src)) is not None:
        dims = list(arr.shape)
    elif src.shape is not None and src.shape.is_static():
        dims = [int(d) for d in src.shape.numpy()]
    else:
        raise NotConstant(f"the shape of '{src.name}' is only known at run time")
    start = int(_attr(node, "start", 0))
    end = _attr(node, "end", None)
    return np.array(dims[start : None if end is None else int(end)], dtype=np.int64)


def _ev_expand(r: ConstantResolver, node: ir.Node, depth: int) -> np.ndarray:
    data, shape = r._inputs(node, depth)
    assert data is not None and shape is not None
    target = np.broadcast_shapes(data.shape, tuple(int(s) for s in shape))
    return np.broadcast_to(data, target).copy()


def _ev_reshape(r: ConstantResolver, node: ir.Node, depth: int) -> np.ndarray:
    data, shape = r._inputs(node, depth)
    assert data is not None and shape is not None
    dims = [int(s) for s in shape]
    if not int(_attr(node, "allowzero", 0)):
        dims = [data.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return data.reshape(dims)


def _ev_unsqueeze(r: ConstantResolver, node: ir.Node, depth: int) -> np.ndarray:
    inputs = r._inputs(node, depth)
    data = inputs[0]
    assert data is not None
    axes = _axes(node, inputs, r.opset, 13)
    rank = data.ndim + len(axes)
    out = data
    for a in sorted(a % rank for a in axes):
        out = np.expand_dims(out, a)
    return out


def _ev_squeeze(r: ConstantResolver, node: ir.Node, depth: int) -> np.ndarray:
    inputs = r._inputs(node, depth)
    data = inputs[0]
    assert data is not None
    axes = _axes(node, inputs, r.opset, 13)
    return np.squeeze(data, axis=tuple(a % data.ndim for a in axes) if axes else None)


def _ev_transpose(r: ConstantResolver, node: ir.Node, depth: int) -> np.ndarray:
    data = r.resolve(node.inputs[0], depth)
    perm = _attr(node, "perm", None)
    return np.transpose(data, None if perm is None else [int(p) for p in perm])


def _ev_concat(r: ConstantResolver, node: ir.Node, depth: int) -> np.ndarray:
    parts = [p for p in r._inputs(node, depth) if p is not None]
    return np.concatenate(parts, axis=int(_attr(node, "axis", 0)))


def _ev_constant_of_shape(r: ConstantResolver, node: ir.Node, depth: int) -> np.ndarray:
    shape = r.resolve(node.inputs[0], depth)
    value = _attr(node, "value", None)
    fill = np.zeros(1, dtype=np.float32) if value is None else value.numpy().reshape(-1)
    return np.full([int(s) for s in shape], fill[0], dtype=fill.dtype)


def _ev_gather(r: ConstantResolver, node: ir.Node, depth: int) -> np.ndarray:
    data, idx = r._inputs(node, depth)
    assert data is not None and idx is not None
    return np.take(data, idx.astype(np.int64), axis=int(_attr(node, "axis", 0)))


def _ev_slice(r: ConstantResolver, node: ir.Node, depth: int) -> np.ndarray:
    inputs = r._inputs(node, depth)
    data = inputs[0]
    assert data is not None
    if r.opset < 10:
        return _slice(data, _attr(node, "starts"), _attr(node, "ends"), _attr(node, "axes"), None)
    get = lambda i: inputs[i] if len(inputs) > i else None  # noqa: E731
    return _slice(data, get(1), get(2), get(3), get(4))


#: Range evaluates to at most this many values (the ranges exporters write are axis lists).
_RANGE_MAX = 1 << 16


def _ev_range(r: ConstantResolver, node: ir.Node, depth: int) -> np.ndarray:
    """``Range(start, limit, delta)``: the dynamo exporter's axes (GroupNorm's affine reshaped
    with ``Unsqueeze(gamma, Range(1, rank - 1, 1))``)."""
    start, limit, delta = (np.asarray(a).reshape(()) for a in r._inputs(node, depth))
    if delta == 0:
        raise ValueError("Range with delta 0")
    count = max(int(np.ceil((limit - start) / delta)), 0)
    if count > _RANGE_MAX:
        raise ValueError(f"Range of {count} values")
    return (start + delta * np.arange(count)).astype(start.dtype)


def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]):
    def ev(r: ConstantResolver, node: ir.Node, depth: int) -> np.ndarray:
        a, b = r._inputs(node, depth)
        assert a is not None and b is not None
        out = fn(a, b)
        return out.astype(np.result_type(a.dtype, b.dtype)) if a.dtype == b.dtype else out

    return ev


def _unary(fn: Callable[[np.ndarray], np.ndarray]):
    def ev(r: ConstantResolver, node: ir.Node, depth: int) -> np.ndarray:
        a = r.resolve(node.inputs[0], depth)
        return fn(a).astype(a.dtype)

    return ev


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if np.issubdtype(a.dtype, np.integer):
        return np.trunc(a / b).astype(a.dtype)
    return a / b


_EVALUATORS: dict[str, Callable[[ConstantResolver, ir.Node, int], np.ndarray]] = {
    "Constant": lambda r, node, depth: _constant_node(node),
    "Identity": _ev_identity,
    "Cast": _ev_cast,
    "CastLike": _ev_castlike,
    "Shape": _ev_shape,
    "Expand": _ev_expand,
    "Reshape": _ev_reshape,
    "Unsqueeze": _ev_unsqueeze,
    "Squeeze": _ev_squeeze,
    "Transpose": _ev_transpose,
    "Concat": _ev_concat,
    "ConstantOfShape": _ev_constant_of_shape,
    "Gather": _ev_gather,
    "Slice": _ev_slice,
    "Range": _ev_range,
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": _binary(_div),
    "Pow": _binary(np.power),
    "Neg": _unary(np.negative),
    "Sqrt": _unary(np.sqrt),
    "Reciprocal": _unary(np.reciprocal),
    "Abs": _unary(np.abs),
}
