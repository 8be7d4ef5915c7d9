"""How a model from :func:`normfuse.load` reaches the next rewrite without a copy.

A rewrite never changes the caller's model: it works on a private one. Two things save the
work of making that private model again when the caller passes in a model it just loaded:

* :class:`LoadedModel`: ``normfuse.load(path)`` gives an ``onnx_ir.Model`` whose graph stays
  private until the caller first looks at it (``model.graph``, ``model.functions``, printing,
  saving, anything that reaches a node). A rewrite of a model nobody looked into takes that
  graph as its own, as the command takes the one it read: no copy. The caller's model then
  reads its graph again from the same file when first looked at (the file must stay unchanged
  until then, as for every lazily read model; a change is refused). Once looked at, it is a
  plain model and a rewrite copies it.
* :func:`remember`: the ModelProto a model was read from, kept while the model is
  unchanged, so that shape inference copies its fields instead of serializing the graph again.

Imports: onnx, onnx_ir.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

__all__ = ["LoadedModel", "fingerprint", "path_of", "proto_if_unchanged", "remember", "take"]

#: The slots of ``ir.Model`` that hold the graph and the model-local functions.
_GRAPH = ir.Model.__dict__["graph"]
_FUNCTIONS = ir.Model.__dict__["_functions"]
#: The model's own fields besides graph, functions and the two dictionaries.
_FIELDS = (
    "ir_version",
    "producer_name",
    "producer_version",
    "domain",
    "model_version",
    "doc_string",
    "device_configurations",
)

#: The slots ``ir.Model.__init__`` sets to ``None`` (created on first use).
_EMPTY = ("_metadata", "_metadata_props")

#: Models -> (the ModelProto they were read from, their fingerprint then). A model the caller
#: has not changed since (same nodes, wiring, attributes, inputs and initializers, no
#: subgraphs or functions) hands its proto to the next rewrite as a fresh load does; any change
#: and it is not used. Entries go with their models.
_READ_FROM: weakref.WeakKeyDictionary[ir.Model, tuple[onnx.ModelProto, Any]] = (
    weakref.WeakKeyDictionary()
)


class LoadedModel(ir.Model):
    """An ``onnx_ir.Model`` from :func:`normfuse.load` whose graph is handed to the first
    rewrite when the caller has not looked at it (see the module's text).

    It is an ``onnx_ir.Model`` in every respect; the graph is read on first use. Its fields
    (``ir_version``, ``producer_name``, ``metadata_props``, ``meta``, ...) are its own from the
    start, so changes to them reach the rewrite and nothing the rewrite does reaches them.
    """

    __slots__ = ()

    def __init__(
        self,
        model: ir.Model,
        reload: Callable[[ir.Model], ir.Model],
        path: Path | None = None,
    ) -> None:
        """``model``: the model as read (private); ``reload``: reads it again for this model
        (refusing a changed file); ``path``: the file it was read from."""
        # no ir.Model.__init__: the graph stays with ``model`` until first asked for
        state = self.__dict__
        state["_nf_inner"] = model
        state["_nf_reload"] = reload
        state["_nf_path"] = path
        for name in _FIELDS:
            setattr(self, name, getattr(model, name))
        for slot in _EMPTY:  # what ir.Model.__init__ would set: None until first used
            ir.Model.__dict__[slot].__set__(self, None)
        self.metadata_props.update(model.metadata_props)
        self.meta.update(model.meta)

    def _nf_open(self) -> None:
        """Give this model its graph: the private one, or the file's again once handed over."""
        state = self.__dict__
        if "_nf_opened" in state:
            return
        inner = state.pop("_nf_inner", None)
        if inner is None:  # a rewrite took the first graph: read the file again
            inner = state["_nf_reload"](self)
        _GRAPH.__set__(self, _GRAPH.__get__(inner))
        _FUNCTIONS.__set__(self, _FUNCTIONS.__get__(inner))
        state["_nf_opened"] = True
        known = _READ_FROM.get(inner)
        if known is not None and known[1] is not None:  # same graph objects: same fingerprint
            _READ_FROM[self] = (known[0], fingerprint(self))

    @property  # type: ignore[override]
    def graph(self) -> ir.Graph:
        self._nf_open()
        return _GRAPH.__get__(self)

    @graph.setter
    def graph(self, value: ir.Graph) -> None:
        self._nf_open()
        _GRAPH.__set__(self, value)

    @property
    def _functions(self) -> dict[Any, ir.Function]:
        self._nf_open()
        return _FUNCTIONS.__get__(self)

    @_functions.setter
    def _functions(self, value: dict[Any, ir.Function]) -> None:
        self._nf_open()
        _FUNCTIONS.__set__(self, value)


def take(model: ir.Model) -> tuple[ir.Model, onnx.ModelProto | None] | None:
    """The private model of a :class:`LoadedModel` nobody has looked into, with the caller's
    fields, and its source proto while it is as read; ``None`` for any other model. The
    caller's model reads its graph from the file again when next looked at."""
    if type(model) is not LoadedModel:
        return None
    inner = model.__dict__.pop("_nf_inner", None)
    if inner is None:
        return None
    for name in _FIELDS:
        setattr(inner, name, getattr(model, name))
    inner.metadata_props.clear()
    inner.metadata_props.update(model.metadata_props)
    inner.meta.clear()
    inner.meta.update(model.meta)
    return inner, proto_if_unchanged(inner)


def path_of(model: ir.Model) -> Path | None:
    """The file a :class:`LoadedModel` was read from (``None`` for other models)."""
    return model.__dict__.get("_nf_path") if type(model) is LoadedModel else None


def fingerprint(model: ir.Model) -> Any:
    """What shape inference reads of the main graph, as identities and names; ``None`` when
    the model has functions or subgraphs (their insides are not covered)."""
    graph = model.graph
    if model.functions:
        return None
    nodes = []
    for node in graph:
        attrs = []
        for name, attr in node.attributes.items():
            if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                return None
            attrs.append((name, id(attr)))
        nodes.append(
            (
                id(node),
                node.domain,
                node.op_type,
                tuple(v.name if v is not None else None for v in node.inputs),
                tuple(v.name for v in node.outputs),
                tuple(attrs),
            )
        )
    inputs = tuple((v.name, id(v.type), id(v.shape), str(v.shape)) for v in graph.inputs)
    inits = tuple((k, id(v.const_value)) for k, v in graph.initializers.items())
    return (model.ir_version, tuple(model.opset_imports.items()), tuple(nodes), inputs, inits)


def remember(model: ir.Model, proto: onnx.ModelProto | None) -> None:
    """Keep the ModelProto ``model`` was read from for a later rewrite of it, valid while the
    model stays as it is now."""
    if proto is not None:
        _READ_FROM[model] = (proto, fingerprint(model))


def proto_if_unchanged(model: ir.Model) -> onnx.ModelProto | None:
    """The ModelProto ``model`` was read from, when the model is unchanged since."""
    known = _READ_FROM.get(model)
    if known is None or known[1] is None or fingerprint(model) != known[1]:
        return None
    return known[0]
