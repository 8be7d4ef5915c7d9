"""onnx_ir's serialization as normfuse uses it: quiet, and initializers written with the
``value_info`` the input had.

Imports: onnx, onnx_ir.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import onnx
import onnx_ir as ir

__all__ = ["VALUE_INFO_KEY", "quiet", "to_proto", "value_info_as_read", "value_info_names"]


#: In-memory record (``ir.Model.meta``, never serialized): the names the main graph of the file
#: read gave a ``value_info`` entry. :func:`write_streaming` writes one for an initializer only
#: when the file had it (onnx_ir writes one for every initializer: on a graph of 100k small
#: initializers that made the output a quarter larger than the input, with nothing new in it).
VALUE_INFO_KEY = "normfuse.value_info_names"


def value_info_names(proto: onnx.ModelProto) -> frozenset[str]:
    """The names of the main graph's ``value_info`` entries (see :data:`VALUE_INFO_KEY`)."""
    return frozenset(info.name for info in proto.graph.value_info)


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """Silence the loggers ``names`` (and their children) inside the block: onnx_ir's warnings
    about conditions normfuse handles would reach a library caller's stderr, with tracebacks."""
    loggers = [logging.getLogger(n) for n in names]
    was = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, disabled in zip(loggers, was, strict=True):
            lg.disabled = disabled


def to_proto(model: Any) -> onnx.ModelProto:
    """``onnx_ir.to_proto`` without its warning per value that has a shape but no type (shapes
    normfuse infers for a rewrite are not types; onnx_ir skips them)."""
    with quiet("onnx_ir.serde"):
        return ir.to_proto(model)


@contextlib.contextmanager
def value_info_as_read(model: ir.Model) -> Iterator[None]:
    """Inside the block, onnx_ir serializes the main graph's initializers with a ``value_info``
    entry only where the model read had one (:data:`VALUE_INFO_KEY`; a model without that
    record is left as it is): the others that are not graph inputs and carry no doc string or
    metadata (their type and shape are their tensor's) have type and shape taken off for the
    block, and given back after it, also on an error."""
    had = model.meta.get(VALUE_INFO_KEY)
    untyped = [
        (v, v.type, v.shape)
        for v in (model.graph.initializers.values() if had is not None else ())
        if v.name not in had
        and not v.is_graph_input()
        and not v.doc_string
        and not v.metadata_props
        and (v.type is not None or v.shape is not None)
    ]
    try:
        for v, _, _ in untyped:
            v.type = None
            v.shape = None
        yield
    finally:
        for v, type_, shape in untyped:
            v.type = type_
            v.shape = shape
