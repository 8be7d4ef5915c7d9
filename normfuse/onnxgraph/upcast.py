"""A low-precision model computed in float32: every float16/bfloat16 tensor upcast exactly.

float16 and bfloat16 values are exact in float32, so the upcast model computes the function the
low-precision weights define, without the rounding of every activation to 16 bits. Comparing an
original and a rewritten model that way isolates what the rewrite changed (one rounding of each
rewritten weight) from the runtime noise of 16-bit arithmetic, which on deep networks is larger
than any exact fold's effect (the parity rule in :mod:`normfuse.core.verdict`).

What changes: the element type of every float16/bfloat16 value (inputs, outputs, intermediate
values, initializers), tensor attributes (``Constant``, ``ConstantOfShape``), and element-type
attributes that name float16/bfloat16 (``Cast``'s ``to``, ``dtype`` of ``EyeLike``/random ops).
Subgraphs and model-local functions included. Nothing else moves: node order, names, opsets.

Imports: numpy, onnx_ir and :mod:`normfuse.core`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir

__all__ = ["LOW_PRECISION", "low_precision_types", "upcast_model"]

logger = logging.getLogger(__name__)

LOW_PRECISION = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
_TYPE_ATTRS = frozenset({"to", "dtype"})

#: ``perturb(name, values)``: the float32 values to write for the low-precision initializer
#: ``name`` (``values`` is its exact float32 upcast), or ``None`` to keep them.
Perturb = Callable[[str, np.ndarray], np.ndarray | None]


def _functions_and_graphs(model: ir.Model) -> list[ir.Graph | ir.Function]:
    found: list[ir.Graph | ir.Function] = list(model.graphs())
    for function in model.functions.values():
        found.append(function)
        for node in ir.traversal.RecursiveGraphIterator(function):
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    found.append(attr.value)
                elif attr.type == ir.AttributeType.GRAPHS:
                    found.extend(attr.value)
    return found


def low_precision_types(model: ir.Model) -> set[ir.DataType]:
    """The 16-bit float types among the model's values and initializers."""
    seen: set[ir.DataType] = set()
    for graph in _functions_and_graphs(model):
        values = list(graph.inputs) + list(graph.outputs)
        if isinstance(graph, ir.Graph):
            values += list(graph.initializers.values())
        for node in graph:
            values += list(node.outputs)
        for v in values:
            if v is not None and v.dtype in LOW_PRECISION:
                seen.add(v.dtype)
    return seen


def _to_float32(tensor: ir.TensorProtocol) -> ir.Tensor:
    array = tensor.numpy()
    return ir.Tensor(np.asarray(array, dtype=np.float32), name=tensor.name)


def upcast_model(model: ir.Model, perturb: Perturb | None = None) -> int:
    """Upcast ``model`` in place; returns how many values changed type.

    Args:
        model: The model, changed in place.
        perturb: Optional: replaces the upcast values of chosen initializers (used to measure how
            much one rounding of those weights moves the outputs).
    """
    changed = 0
    for graph in _functions_and_graphs(model):
        values: list[ir.Value] = list(graph.inputs) + list(graph.outputs)
        if isinstance(graph, ir.Graph):
            for init in graph.initializers.values():
                tensor = init.const_value
                if tensor is not None and tensor.dtype in LOW_PRECISION:
                    up = np.asarray(tensor.numpy(), dtype=np.float32)
                    if perturb is not None and init.name is not None:
                        moved = perturb(init.name, up)
                        up = up if moved is None else moved
                    init.const_value = ir.Tensor(up, name=tensor.name)
                values.append(init)
        for node in graph:
            values.extend(node.outputs)
            for name, attr in list(node.attributes.items()):
                if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                    if attr.value.dtype in LOW_PRECISION:
                        node.attributes[name] = ir.AttrTensor(name, _to_float32(attr.value))
                elif (
                    attr.type == ir.AttributeType.INT
                    and name in _TYPE_ATTRS
                    and attr.value in (ir.DataType.FLOAT16.value, ir.DataType.BFLOAT16.value)
                ):
                    node.attributes[name] = ir.AttrInt64(name, ir.DataType.FLOAT.value)
        seen: set[int] = set()
        for v in values:
            if v is None or id(v) in seen:
                continue
            seen.add(id(v))
            if v.dtype in LOW_PRECISION:
                v.dtype = ir.DataType.FLOAT
                changed += 1
    return changed


def rounding_perturbation(dtypes: dict[str, ir.DataType], rng: np.random.Generator) -> Perturb:
    """A :data:`Perturb` that moves each named initializer by a random fraction in [-1/2, 1/2) of
    one unit in the last place of its own 16-bit type: an independent rounding of that weight."""

    def perturb(name: str, values: np.ndarray) -> np.ndarray | None:
        dtype = dtypes.get(name)
        if dtype is None:
            return None
        low = values.astype(ml_dtypes.bfloat16 if dtype == ir.DataType.BFLOAT16 else np.float16)
        # in float32, in place: a 16-bit value and a fraction of its spacing need 13 fewer bits
        # than float32 has, so the sum is as exact as the random fraction is
        moved = rng.random(values.shape, dtype=np.float32)
        moved -= np.float32(0.5)
        moved *= _ulp(low)
        moved += values
        return moved

    return perturb


def _ulp(values: np.ndarray) -> np.ndarray:
    """The spacing of a 16-bit float type at each value (bfloat16 has no ``np.spacing``)."""
    if values.dtype == np.float16:
        # 2 ** (e - 25) for the exponent field e (subnormals and zero: 1), built as float32 bits:
        # what np.abs(np.spacing(v)) gives for every finite float16, in a few integer passes
        exponent = np.maximum((values.view(np.uint16) >> 10) & 0x1F, 1).astype(np.int32)
        exponent += 127 - 25
        exponent <<= 23
        return exponent.view(np.float32)
    v = np.abs(values.astype(np.float32))
    exponent = np.floor(np.log2(np.maximum(v, np.float32(2.0**-126))))
    return np.exp2(exponent - 7).astype(np.float32)
