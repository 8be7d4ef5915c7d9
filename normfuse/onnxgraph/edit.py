"""Graph editing shared by the ONNX rewrites (swap, insert, raise, lower): an editor that adds
constants and nodes with fresh names and puts new values in place of old ones, name and
opset helpers, and the norm op set.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from normfuse.onnxgraph.const import ConstantResolver
from normfuse.onnxgraph.graph import containers, node_name, rank_of

__all__ = [
    "ANY_NORM_OPS",
    "BN",
    "FUSED_MIN_OPSET",
    "NP_TYPES",
    "Editor",
    "all_graphs",
    "all_names",
    "attr_value",
    "batchnorm_not_inference",
    "fresh_name",
    "functions_note",
    "identity_variance",
    "model_resolver",
    "np_dtype_of",
    "opset_of",
    "read_batchnorm",
]

logger = logging.getLogger(__name__)


FUSED_MIN_OPSET = {"LayerNormalization": 17, "GroupNormalization": 21, "RMSNormalization": 23}
"""The opset each fused norm op (in its current form) needs."""

ANY_NORM_OPS = frozenset(
    {
        "BatchNormalization",
        "InstanceNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "RMSNormalization",
        "LpNormalization",
        "MeanVarianceNormalization",
    }
)

NP_TYPES = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.DOUBLE: np.float64,
    ir.DataType.FLOAT16: np.float16,
}


def opset_of(model: ir.Model) -> int:
    """The model's default-domain opset."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def identity_variance(eps: float, dtype: Any = np.float32) -> np.ndarray:
    """A variance ``v`` in ``dtype`` with ``v + eps == 1`` exactly in that dtype (so that
    ``x / sqrt(v + eps)`` is ``x``): ``1 - eps`` or one of its neighbours."""
    dt = np.dtype(dtype)
    one, e = dt.type(1.0), dt.type(eps)
    v = dt.type(1.0 - float(eps))
    for _ in range(8):
        total = dt.type(v + e)
        if total == one:
            return np.asarray(v, dtype=dt)
        v = np.nextafter(v, dt.type(-np.inf) if total > one else dt.type(np.inf), dtype=dt)
    return np.asarray(dt.type(1.0 - float(eps)), dtype=dt)


class Editor:
    """Emits nodes and initializers into one graph, before an anchor node."""

    def __init__(self, graph: ir.Graph, names: set[str], opset: int) -> None:
        self.graph = graph
        self.names = names
        self.opset = opset
        self.created: list[ir.Node] = []

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=self.fresh(base), const_value=ir.tensor(np.array(array, order="C")))
        value.type = ir.TensorType(value.const_value.dtype)  # type: ignore[union-attr]
        value.shape = ir.Shape(array.shape)
        self.graph.register_initializer(value)
        return value

    def op(
        self,
        anchor: ir.Node | None,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        attributes: dict[str, Any] | None = None,
        base: str = "",
    ) -> ir.Value:
        """Add one node before ``anchor`` (at the end when ``None``); returns its output."""
        prefix = base or (node_name(anchor) if anchor is not None else "normfuse")
        name = self.fresh(f"{prefix}_{op_type}")
        node = ir.Node(
            "",
            op_type,
            inputs,
            ir.convenience.convert_attributes(attributes or {}),
            name=name,
        )
        node.outputs[0].name = self.fresh(name)
        if anchor is None:
            self.graph.append(node)
        else:
            self.graph.insert_before(anchor, node)
        self.created.append(node)
        return node.outputs[0]

    def take_over(self, old: ir.Value, new: ir.Value) -> None:
        """``new`` replaces ``old`` everywhere, graph outputs included, and takes its name."""
        if old.is_graph_output() and (new.is_graph_input() or new.producer() is None):
            new = self.op(old.producer(), "Identity", [new])  # an input keeps its own name
        outputs = self.graph.outputs
        for i, v in enumerate(outputs):
            if v is old:
                outputs[i] = new
        ir.convenience.replace_all_uses_with(old, new)
        name = old.name
        old.name = self.fresh(f"{name}_replaced")
        new.name = name
        new.type = old.type
        new.shape = old.shape

    def remove(self, nodes: Iterable[ir.Node]) -> None:
        nodes = list(nodes)
        inputs = [v for n in nodes for v in n.inputs if v is not None]
        self.graph.remove(nodes, safe=True)
        for v in inputs:  # parameters nothing reads any more
            if (
                v.name is not None
                and v.name in self.graph.initializers
                and self.graph.initializers[v.name] is v
                and not list(v.uses())
                and not v.is_graph_output()
                and not v.is_graph_input()
            ):
                del self.graph.initializers[v.name]
            elif v.producer() is not None and not list(v.uses()) and not v.is_graph_output():
                producer = v.producer()
                if (
                    producer is not None
                    and producer.graph is self.graph  # not removed already
                    and producer.op_type in ("Constant", "Shape")
                    and all(
                        not list(o.uses()) and not o.is_graph_output() for o in producer.outputs
                    )
                ):
                    self.remove([producer])


def attr_value(node: ir.Node, name: str, default: Any) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def all_graphs(model: ir.Model) -> Iterator[tuple[ir.Graph, str]]:
    for container, label in containers(model):
        if isinstance(container, ir.Graph):
            yield container, label


def all_names(model: ir.Model) -> set[str]:
    names: set[str] = set()
    for container, _ in containers(model):
        names.update(v.name for v in container.inputs if v.name)
        if isinstance(container, ir.Graph):
            names.update(container.initializers)
        for node in container:
            if node.name:
                names.add(node.name)
            names.update(o.name for o in node.outputs if o.name)
    return names


def model_resolver(model: ir.Model) -> ConstantResolver:
    return ConstantResolver(opset_of(model), model.ir_version)


def functions_note(model: ir.Model, what: str) -> str | None:
    """A note when norm nodes sit in model-local functions, which these rewrites leave."""
    hits = sum(1 for f in model.functions.values() for n in f if n.op_type in ANY_NORM_OPS)
    if hits:
        return f"{hits} norm node(s) inside model-local functions were left: {what} works on graphs"
    return None


def fresh_name(names: set[str], base: str) -> str:
    name, k = base, 1
    while name in names:
        k += 1
        name = f"{base}_{k}"
    names.add(name)
    return name


@dataclasses.dataclass
class BN:
    node: ir.Node
    x: ir.Value
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float
    rank: int | None
    dtype: Any

    @property
    def channels(self) -> int:
        return int(self.mean.size)


def batchnorm_not_inference(node: ir.Node, opset: int) -> str | None:
    """Why a BatchNormalization node is not a per-channel map with running statistics, or
    ``None``: ``training_mode=1`` (opset 14+), ``is_test=0`` (opsets 1 and 6, where it is the
    default), ``spatial=0`` (opsets 7 and 8: statistics per activation)."""
    version = node.version or opset
    if attr_value(node, "training_mode", 0):
        return "training_mode=1: normalises with batch statistics"
    if version < 7 and not attr_value(node, "is_test", 0):
        return "is_test=0: BatchNormalization-1/6 then normalises with batch statistics"
    if version < 9 and attr_value(node, "spatial", 1) == 0:
        return "spatial=0: statistics per activation, not per channel"
    return None


def read_batchnorm(node: ir.Node, consts: ConstantResolver) -> BN | str:
    why = batchnorm_not_inference(node, consts.opset)
    if why is not None:
        return why
    if any(list(o.uses()) or o.is_graph_output() for o in node.outputs[1:]):
        return "its running-statistics outputs are used (a training graph)"
    x = node.inputs[0]
    if x is None:
        return "no input"
    values = [consts.try_resolve(v) for v in node.inputs[1:5]]
    if any(v is None for v in values) or len(values) < 4:
        return "scale, bias, mean or variance is not a constant"
    gamma, beta, mean, var = (np.asarray(v, np.float64).reshape(-1) for v in values)
    dtype = np_dtype_of(x)
    if dtype is None:
        return "its input type is unknown or not float/double/float16"
    return BN(
        node, x, gamma, beta, mean, var, float(attr_value(node, "epsilon", 1e-5)), rank_of(x), dtype
    )


def np_dtype_of(value: ir.Value) -> Any:
    if value.type is None or value.type.dtype not in NP_TYPES:
        return None
    return NP_TYPES[value.type.dtype]
