"""Finding chains: maximal runs of affine nodes where each node's output feeds only the next.

Imports: onnx_ir, :mod:`normfuse.onnxgraph.const`, :mod:`normfuse.onnxgraph.graph`,
:mod:`normfuse.onnxgraph.linear` and :mod:`normfuse.onnxgraph.affines`.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from normfuse.onnxgraph.affines import Link
from normfuse.onnxgraph.const import ConstantResolver
from normfuse.onnxgraph.graph import (
    ELEMENTWISE_OPS,
    KNOWN_OPSET,
    NORM_OPS,
    NORM_TAIL_OPS,
    Container,
    exclusive,
)
from normfuse.onnxgraph.linear import LinearReader

__all__ = ["ChainFinder"]

logger = logging.getLogger(__name__)

#: The op types :meth:`ChainFinder._link` can make a link of (or report as too new).
_CANDIDATE_OPS = NORM_OPS | ELEMENTWISE_OPS


class ChainFinder:
    """Finds the chains of one graph or function.

    Attributes:
        too_new: Nodes skipped because the opset is newer than normfuse knows.
    """

    def __init__(
        self,
        container: Container,
        consts: ConstantResolver,
        reader: LinearReader,
        opset: int,
        norm_affine: bool,
    ) -> None:
        self.container = container
        self.consts = consts
        self.reader = reader
        self.opset = opset
        self.norm_affine = norm_affine
        self.too_new: list[ir.Node] = []

    # ----------------------------------------------------------------- finding chains
    def _link(self, node: ir.Node) -> Link | None:
        if node.domain not in ("", "ai.onnx") or not node.outputs:
            return None
        if self.opset > KNOWN_OPSET and node.op_type in NORM_OPS | ELEMENTWISE_OPS:
            self.too_new.append(node)
            return None
        op = node.op_type
        if op == "BatchNormalization" and node.inputs and node.inputs[0] is not None:
            return Link(node, 0, "bn")
        if op in NORM_TAIL_OPS and self.norm_affine and len(node.inputs) >= 2:
            return Link(node, 0, "norm")
        if op in ELEMENTWISE_OPS and len(node.inputs) == 2 and None not in node.inputs:
            const = [self.consts.try_resolve(v) is not None for v in node.inputs]
            if const == [False, True]:
                return Link(node, 0, "elementwise")
            if const == [True, False] and op != "Div":
                if op == "Add" and self.reader.is_matmul_bias(node, 1):
                    return None
                return Link(node, 1, "elementwise")
            if const == [False, True] and op == "Add" and self.reader.is_matmul_bias(node, 0):
                return None
        return None

    def chains(self) -> list[list[Link]]:
        """The maximal chains of affine nodes, in graph order."""
        links: dict[int, Link] = {}
        order: list[Link] = []
        for node in self.container:
            if node.op_type not in _CANDIDATE_OPS:
                continue  # most nodes of a big graph: no per-node work beyond this test
            link = self._link(node)
            if link is not None and not (
                link.kind == "elementwise" and self.reader.is_matmul_bias(node, link.data_index)
            ):
                links[id(node)] = link
                order.append(link)
        nxt: dict[int, Link] = {}
        has_prev: set[int] = set()
        for link in order:
            if link.kind == "norm":
                continue
            prev = link.data.producer()
            if prev is not None and id(prev) in links and exclusive(link.data, link.node):
                nxt[id(prev)] = link
                has_prev.add(id(link.node))
        result = []
        for link in order:
            if id(link.node) in has_prev:
                continue
            chain = [link]
            while id(chain[-1].node) in nxt:
                chain.append(nxt[id(chain[-1].node)])
            result.append(chain)
        return result
