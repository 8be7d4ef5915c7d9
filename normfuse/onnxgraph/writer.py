"""Writing folds into the graph: new weights and biases, removed nodes, names kept.

A rewrite replaces a linear op's weight in place when nothing else reads it (else a fresh
initializer, copy on write), removes the folded nodes and whatever became dead, and gives the
tensor that now carries the chain's result the name of the chain's last output.

Imports: numpy, onnx_ir, :mod:`normfuse.core`, :mod:`normfuse.onnxgraph.const`,
:mod:`normfuse.onnxgraph.graph`, :mod:`normfuse.onnxgraph.linear` and
:mod:`normfuse.onnxgraph.affines`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from normfuse.core import algebra
from normfuse.core.errors import InputError
from normfuse.onnxgraph.affines import Link
from normfuse.onnxgraph.const import LARGE_BYTES, ConstantResolver, read_tensor, reads_shape_only
from normfuse.onnxgraph.graph import Container, exclusive, node_name, take_over
from normfuse.onnxgraph.linear import Linear, LinearReader, bias_shape

__all__ = ["GraphWriter", "deferrable"]

logger = logging.getLogger(__name__)


def deferrable(lin: Linear) -> bool:
    """Fold this weight lazily, when it is written: it is large, used as stored (no Gemm
    alpha), and read again as it is now (:func:`_stable`). A model is then never held with all
    its folded weights at once beside the copy it is written to."""
    source = lin.node.inputs[1].const_value if lin.node.inputs[1] is not None else None
    return (
        source is not None
        and _stable(source)
        and source.nbytes >= LARGE_BYTES
        and lin.weights.weight.dtype == lin.weights.out_dtype
    )


def _stable(source: ir.TensorProtocol) -> bool:
    """Whether a tensor reads the same when the fold is written as now: a file (checked
    unchanged before every later use, docs/python.md), a parsed TensorProto (shared with the
    result as the untouched tensors are), or a view of immutable ``bytes``."""
    if isinstance(source, (ir.ExternalTensor, ir.serde.TensorProtoTensor)):
        return True
    if not isinstance(source, ir.Tensor):
        return False
    base: Any = source.raw
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, bytes)


class GraphWriter:
    """Applies folded weights to one graph or function."""

    def __init__(
        self,
        container: Container,
        names: set[str],
        consts: ConstantResolver,
        reader: LinearReader,
        ir_version: int,
        is_main: bool,
    ) -> None:
        self.container = container
        self.names = names
        self.consts = consts
        self.reader = reader
        self.ir_version = ir_version
        self.is_main = is_main
        self._wanted_names: list[tuple[ir.Value, str]] = []

    def write_after(
        self,
        lin: Linear,
        links: list[Link],
        folded: algebra.Folded,
        path_end: ir.Value | None = None,
    ) -> None:
        """The chain ``links`` folded into its producer ``lin``: write it, remove the chain.

        With ``path_end`` (the last tensor of the layout ops between ``lin`` and the chain, which
        stay), that tensor takes the chain's output's readers and name."""
        node = lin.node
        self.set_input(node, 1, self.weight_data(lin, folded))
        new_out = lin.out
        if node.op_type in ("Conv", "ConvTranspose"):
            self.set_input(node, 2, folded.bias, role="bias")
        elif node.op_type == "Gemm":
            self.set_input(node, 2, folded.bias, role="bias")
            _set_float_attr(node, "alpha", 1.0)
            _set_float_attr(node, "beta", 1.0)
        elif lin.bias_node is not None:
            add = lin.bias_node
            idx = 1 if add.inputs[0] is node.outputs[0] else 0
            self.set_input(add, idx, folded.bias.reshape(bias_shape(lin, folded.bias)), role="bias")
        elif np.any(folded.bias64 != 0):
            new_out = self.insert_bias(node, folded.bias)
        self._replace_chain(links, path_end if path_end is not None else new_out)

    def _replace_chain(self, links: list[Link], new_out: ir.Value) -> None:
        """Remove the chain ``links``: ``new_out`` takes its output's readers, name and type."""
        tail = links[-1].out
        name = tail.name
        tail.replace_all_uses_with(new_out, replace_graph_outputs=True)
        removed_inputs = [v for link in links for v in link.node.inputs if v is not None]
        _retarget_type_reads(links, new_out)
        self.container.remove([link.node for link in links], safe=True)
        tail_type, tail_shape = tail.type, tail.shape
        tail.name = None
        new_out.name = name
        new_out.type = tail_type or new_out.type
        new_out.shape = tail_shape or new_out.shape
        for v in removed_inputs:
            self.prune(v)
        self.restore_names()

    def write_into_parts(
        self,
        parts: list[Linear],
        links: list[Link],
        foldeds: list[algebra.Folded],
        concat: ir.Node,
    ) -> None:
        """The chain ``links`` after a channel Concat of ``parts`` folded into them, each its
        slice (:mod:`normfuse.onnxgraph.concat`): write the parts, remove the chain. The
        Concat's output takes the chain's output's readers and name; each part's output a new
        name (it carries other values than the tensor of its old name)."""
        for lin, folded in zip(parts, foldeds, strict=True):
            self.set_input(lin.node, 1, self.weight_data(lin, folded))
            self.set_input(lin.node, 2, folded.bias, role="bias")
            lin.out.name = self.fresh(f"{lin.out.name or node_name(lin.node)}_scaled")
        self._replace_chain(links, concat.outputs[0])

    def write_before(
        self,
        links: list[Link],
        targets: list[tuple[Linear, int]],
        foldeds: list[algebra.Folded],
        path_head: ir.Node | None = None,
    ) -> None:
        """The chain ``links`` folded into its consumers ``targets`` (linear op, input index).

        With ``path_head`` (the first of the layout ops between the chain and the consumers,
        which stay), that node reads what the chain read and the consumers keep their input."""
        head = links[0]
        if head.kind == "norm":
            source = head.out
            self.neutralise_norm(head.node)
            removed = links[1:]
        else:
            source = head.data
            removed = links
        for (found, idx), folded in zip(targets, foldeds, strict=True):
            node = found.node
            self.set_input(node, 1, self.weight_data(found, folded))
            if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
                self.set_input(node, 2, folded.bias, role="bias")
                if node.op_type == "Gemm":
                    _set_float_attr(node, "alpha", 1.0)
                    _set_float_attr(node, "beta", 1.0)
            elif found.bias_node is not None:
                add = found.bias_node
                bidx = 1 if add.inputs[0] is node.outputs[0] else 0
                self.set_input(
                    add, bidx, folded.bias.reshape(bias_shape(found, folded.bias)), role="bias"
                )
            elif np.any(folded.bias64 != 0):
                self.insert_bias(node, folded.bias)
            if path_head is None:
                node.replace_input_with(idx, source)
        if path_head is not None:
            path_head.replace_input_with(0, source)
        if removed:
            removed_inputs = [v for link in removed for v in link.node.inputs if v is not None]
            _retarget_type_reads(removed, source)
            self.container.remove([link.node for link in removed], safe=True)
            for v in removed_inputs:
                self.prune(v)
        self.restore_names()

    def bypass(self, node: ir.Node, data: ir.Value) -> None:
        """Remove ``node``, which computes its input ``data`` unchanged: its readers read ``data``."""
        out = node.outputs[0]
        out.replace_all_uses_with(data)
        inputs = [v for v in node.inputs if v is not None and v is not data]
        self.container.remove(node, safe=True)
        for v in inputs:
            self.prune(v)
        self.reader.clear()

    def weight_data(self, lin: Linear, folded: algebra.Folded) -> np.ndarray | ir.LazyTensor:
        """The folded weight, or a tensor that computes it from the stored one when it is
        written (:func:`deferrable`)."""
        if folded.weight is not None:
            return folded.weight
        weight = lin.node.inputs[1]
        source = weight.const_value if weight is not None else None
        factor, dtype = folded.factor, folded.dtype
        assert source is not None and factor is not None and dtype is not None

        label = lin.label

        def compute() -> ir.Tensor:
            values = read_tensor(source)  # a fresh array, unless the tensor had to map it
            own = values.flags.writeable and values.dtype == dtype
            result = algebra.scale_weight(values, factor, dtype, in_place=own)
            # an element that is not finite overflowed unless it was stored so (the stored
            # weight is read again when the product overwrote it; this path is the rare one)
            if not algebra.all_finite(result) and algebra.overflowed(
                read_tensor(source) if own else values, result
            ):
                raise InputError(
                    f"the folded weight of {label} overflows {dtype}; nothing was written",
                    "check the BatchNorm statistics of that layer",
                )
            return ir.Tensor(result)

        return ir.LazyTensor(
            compute, dtype=ir.DataType.from_numpy(dtype), shape=ir.Shape(source.shape.numpy())
        )

    def neutralise_norm(self, node: ir.Node) -> None:
        gamma = self.consts.resolve(node.inputs[1])
        self.set_input(node, 1, np.ones_like(gamma))
        if (
            len(node.inputs) > 2
            and node.inputs[2] is not None
            and node.op_type != "RMSNormalization"
        ):
            beta = self.consts.resolve(node.inputs[2])
            self.set_input(node, 2, np.zeros_like(beta), role="bias")

    def fresh(self, base: str) -> str:
        name = base
        i = 1
        while name in self.names:
            name = f"{base}_{i}"
            i += 1
        self.names.add(name)
        return name

    def set_input(
        self, node: ir.Node, index: int, array: np.ndarray | ir.LazyTensor, role: str = "weight"
    ) -> None:
        """Give ``node`` a new constant input, in place when nothing else uses the old one."""
        self.reader.clear()
        old = node.inputs[index] if index < len(node.inputs) else None
        shape = tuple(array.shape.numpy()) if isinstance(array, ir.LazyTensor) else array.shape
        if (
            old is not None
            and old.is_initializer()
            and not self.consts.is_overridable_input(old)
            and not old.is_graph_output()
            and exclusive(old, node)
        ):
            old.const_value = _as_tensor(array, old.name)
            if old.shape is not None and tuple(old.shape) != shape:
                old.shape = ir.Shape(shape)
            self.consts.forget(old)
            return
        base = f"{old.name}_folded" if old is not None and old.name else f"{node_name(node)}_{role}"
        value = self.new_const(self.fresh(base), array, before=node)
        if old is not None and old.name:
            self._wanted_names.append((value, old.name))
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        node.replace_input_with(index, value)
        if old is not None:
            self.prune(old)

    def new_const(self, name: str, array: np.ndarray | ir.LazyTensor, before: ir.Node) -> ir.Value:
        tensor = _as_tensor(array, name)
        shape = tuple(tensor.shape.numpy())
        if isinstance(self.container, ir.Graph):
            # typed like onnx_ir types initializers on load, so a second fold changes nothing
            value = ir.Value(
                name=name,
                const_value=tensor,
                type=ir.TensorType(tensor.dtype),
                shape=ir.Shape(shape),
            )
            self.container.register_initializer(value)
            if self.ir_version < 4 and self.is_main:
                self.container.inputs.append(value)
            return value
        const = ir.Node(
            "", "Constant", [], [ir.AttrTensor("value", tensor)], name=self.fresh(f"{name}_const")
        )
        const.outputs[0].name = name
        const.outputs[0].shape = ir.Shape(shape)
        const.outputs[0].type = ir.TensorType(tensor.dtype)
        self.container.insert_before(before, const)
        return const.outputs[0]

    def insert_bias(self, node: ir.Node, bias: np.ndarray) -> ir.Value:
        """Add ``bias`` after ``node``'s output; the sum takes over the output's name and uses."""
        self.reader.clear()
        out = node.outputs[0]
        const = self.new_const(self.fresh(f"{node_name(node)}_bias"), bias, before=node)
        add = ir.Node("", "Add", [out, const], name=self.fresh(f"{node_name(node)}_bias_add"))
        take_over(out, add.outputs[0], {id(add)}, self.fresh(f"{out.name}_matmul"))
        self.container.insert_after(node, add)
        return add.outputs[0]

    def prune(self, value: ir.Value) -> None:
        """Remove what became dead: unused initializers and constant-producing nodes."""
        stack = [value]
        while stack:
            v = stack.pop()
            if v is None or list(v.uses()) or v.is_graph_output():
                continue
            if v.is_graph_input():
                if self.ir_version < 4 and v.is_initializer() and v.graph is not None:
                    v.graph.inputs.remove(v)  # IR < 4 lists every initializer as an input
                else:
                    continue
            if v.is_initializer():
                graph = v.graph
                if graph is not None and v.name is not None and v.name in graph.initializers:
                    del graph.initializers[v.name]  # (pop goes through the generic mapping)
                    self.names.discard(v.name)
                self.consts.forget(v)
                continue
            producer = v.producer()
            if producer is None or producer.graph is None:
                continue
            if any(list(o.uses()) or o.is_graph_output() for o in producer.outputs):
                continue
            inputs = [i for i in producer.inputs if i is not None]
            producer.graph.remove(producer, safe=True)
            self.names.difference_update(o.name for o in producer.outputs if o.name)
            stack.extend(inputs)

    def restore_names(self) -> None:
        """Give new tensors back the names of the tensors they replaced, once those are gone."""
        for value, wanted in self._wanted_names:
            if wanted not in self.names and value.name != wanted:
                self.names.discard(value.name or "")
                value.name = wanted
                self.names.add(wanted)
        self._wanted_names.clear()


def _as_tensor(data: np.ndarray | ir.LazyTensor, name: str | None) -> ir.TensorProtocol:
    if isinstance(data, ir.LazyTensor):
        data.name = name
        return data
    return ir.Tensor(data, name=name)


def _retarget_type_reads(links: list[Link], source: ir.Value) -> None:
    """Point what reads only the shape or element type of a removed link's output (``CastLike``'s
    target: the dynamo exporter casts GroupNorm's beta like the output of its gamma's Mul) at
    ``source``, which has both (:func:`normfuse.onnxgraph.graph.exclusive` lets a chain form
    past such reads)."""
    removed = {id(link.node) for link in links}
    for link in links:
        for out in link.node.outputs:
            for use in list(out.uses()):
                node = use.node
                if id(node) not in removed and reads_shape_only(node, use.idx):
                    node.replace_input_with(use.idx, source)


def _set_float_attr(node: ir.Node, name: str, value: float) -> None:
    current = node.attributes.get(name)
    if current is not None and float(current.value) != value:
        node.attributes[name] = ir.AttrFloat32(name, value)
