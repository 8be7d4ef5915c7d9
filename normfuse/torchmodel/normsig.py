"""What a norm module computes, read from its ``forward``, never from its name or base class.

A module is treated as an inference norm only when its computation is one:

* torch's own BatchNorm forward (``_BatchNorm`` subclasses that keep it) and normfuse's
  :class:`~normfuse.torchmodel.layers.FrozenBatchNorm`: a per-channel affine from the running
  statistics, nothing after it;
* any other module whose ``forward``, traced alone with ``torch.fx`` (its children kept as
  calls), is: reads of metadata (``x.ndim``, ``x.shape``, ``_assert``) that feed nothing, then a
  per-channel affine of the input whose factors come only from the module's own tensors
  (``F.batch_norm`` in eval with its running statistics, or ``x * scale + shift`` as
  FrozenBatchNorm look-alikes write it), then its own children called once each, one after the
  other (timm's ``BatchNormAct2d``: ``drop`` then ``act``). The affine is measured by running
  that part in float64 on probes and checked on a random probe.

Such a module is a :class:`NormSignature`: the affine folds, and the children (the *tail*) stay,
in their order, as the module that replaces it. Anything else that looks like a norm (a
``_BatchNorm`` subclass, a "BatchNorm" class name) is refused with the reason.

Imports: torch, numpy, :mod:`normfuse.core` and :mod:`normfuse.torchmodel.layers`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import operator
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfuse.core.algebra import Affine
from normfuse.torchmodel.layers import FrozenBatchNorm

__all__ = ["NormSignature", "is_meta", "looks_like_norm", "norm_signature", "tail_module"]

logger = logging.getLogger(__name__)

_META_ATTRS = frozenset({"ndim", "shape", "dtype", "device", "layout", "is_cuda"})
_META_METHODS = frozenset({"size", "dim", "numel", "type", "is_contiguous"})
_ASSERTS = {torch._assert}
#: ATen reads of a tensor's metadata (torch.export writes ``sym_size.int`` where a size is
#: dynamic, a plain int where it is static).
_META_FUNCS = {
    op
    for name, overload in (
        ("sym_size", "int"),
        ("sym_numel", "default"),
        ("sym_stride", "int"),
        ("size", "int"),
        ("dim", "default"),
    )
    if (op := getattr(getattr(torch.ops.aten, name, None), overload, None)) is not None
}
_ELEMENTWISE = {
    operator.mul: "mul",
    operator.add: "add",
    operator.sub: "sub",
    operator.truediv: "div",
    torch.mul: "mul",
    torch.add: "add",
    torch.sub: "sub",
    torch.div: "div",
}
_ELEMENTWISE_METHODS = {"mul": "mul", "add": "add", "sub": "sub", "div": "div"}
_BN_FUNCS = {F.batch_norm, torch.batch_norm}


@dataclasses.dataclass
class NormSignature:
    """An inference norm as computed: its per-channel affine and what runs after it.

    Attributes:
        affine: ``y = x * scale + shift`` on axis 1 (float64).
        tail: The module's children that run after the affine, in call order.
        how: How it was recognised, for reports.
    """

    affine: Affine
    tail: list[tuple[str, nn.Module]]
    how: str


def looks_like_norm(module: nn.Module) -> bool:
    """A module that a name or base-class test would call a BatchNorm."""
    name = type(module).__name__
    return isinstance(module, _BatchNorm) or "BatchNorm" in name


def _buffers_affine(module: nn.Module) -> Affine | None:
    mean = getattr(module, "running_mean", None)
    var = getattr(module, "running_var", None)
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        return None

    def f64(t: Any, fill: float) -> np.ndarray:
        if not isinstance(t, torch.Tensor):
            return np.full(mean.numel(), fill)
        return t.detach().to(torch.float64).cpu().numpy().reshape(-1)

    return Affine.from_batchnorm(
        f64(getattr(module, "weight", None), 1.0),
        f64(getattr(module, "bias", None), 0.0),
        f64(mean, 0.0),
        f64(var, 1.0),
        float(getattr(module, "eps", 1e-5)),
    )


def norm_signature(module: nn.Module) -> NormSignature | str | None:
    """What ``module`` computes as a norm (module docstring).

    Returns:
        The signature; a reason string when it looks like a norm but its forward is not one
        that folds; ``None`` when it is no norm at all.
    """
    if isinstance(module, FrozenBatchNorm) or (
        isinstance(module, _BatchNorm)
        and type(module).forward in _PLAIN_BN_FORWARDS
        and not list(module.children())
    ):
        affine = _buffers_affine(module)
        if affine is None:
            return "it keeps no running statistics (track_running_stats=False)"
        return NormSignature(affine, [], "BatchNorm")
    if not looks_like_norm(module):
        return None
    if module.training:
        return "in training mode: normalises with batch statistics"
    try:
        return _traced_signature(module)
    except Exception as exc:  # forward not traceable alone
        text = str(exc).strip().splitlines()
        return (
            f"its forward ({type(module).__name__}.forward) could not be read "
            f"({text[0][:100] if text else type(exc).__name__}), so it is not known to be a norm"
        )


_PLAIN_BN_FORWARDS = {nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward}


class _LeafChildren(fx.Tracer):
    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self._children = {id(m) for m in root.children()}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self._children or super().is_leaf_module(m, qualname)


def is_meta(node: fx.Node) -> bool:
    """A read of a tensor's metadata (rank, shape, dtype, device) or an assertion on it."""
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        return node.args[1] in _META_ATTRS
    if node.op == "call_method" and node.target in _META_METHODS:
        return True
    return node.op == "call_function" and (node.target in _ASSERTS or node.target in _META_FUNCS)


def _const_nodes(graph: fx.Graph, x: fx.Node) -> set[fx.Node]:
    """Nodes that depend on the module's tensors and constants only (not on ``x``)."""
    data_of_x: set[fx.Node] = {x}
    for node in graph.nodes:
        if node is x:
            continue
        if any(a in data_of_x for a in node.all_input_nodes) and not is_meta(node):
            data_of_x.add(node)
    return {n for n in graph.nodes if n not in data_of_x and n.op != "output"}


@contextlib.contextmanager
def _sync_bn_in_eval(module: nn.Module) -> Iterator[None]:
    """``SyncBatchNorm.forward`` in eval mode is ``_BatchNorm.forward`` (it syncs only batch
    statistics in training) behind two input checks that torch.fx cannot trace
    (``input.dim() < 2``, ``input.size(1) == 0``): read a subclass (timm's SyncBatchNormAct)
    through the latter."""
    if not isinstance(module, nn.SyncBatchNorm) or module.training:
        yield
        return
    cls: Any = nn.SyncBatchNorm
    saved = cls.forward, cls._check_input_dim
    cls.forward = _BatchNorm.forward
    cls._check_input_dim = lambda self, x: None  # raises on rank < 2: an input check only
    try:
        yield
    finally:
        cls.forward, cls._check_input_dim = saved


def _traced_signature(module: nn.Module) -> NormSignature | str:
    traced = copy.deepcopy(module)  # tracing stores computed tensors on the module it traces
    with _sync_bn_in_eval(traced):
        graph = _LeafChildren(traced).trace(traced)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return "its forward takes more than one input"
    x = placeholders[0]
    consts = _const_nodes(graph, x)
    children = dict(module.named_children())
    path: list[fx.Node] = []
    current = x
    while True:
        users = [u for u in current.users if not is_meta(u)]
        if len(users) != 1:
            return f"its forward uses an intermediate value {len(users)} times"
        node = users[0]
        if node.op == "output":
            break
        path.append(node)
        current = node
    # the affine part, then the children
    k = 0
    while k < len(path) and path[k].op != "call_module":
        node = path[k]
        others = [a for a in node.all_input_nodes if a is not (path[k - 1] if k else x)]
        if not all(a in consts for a in others):
            return f"step '{node.name}' of its forward mixes the input with another input"
        if not _affine_step(node):
            return f"its forward computes '{node.name}' ({node.target}), not a per-channel affine"
        k += 1
    if k == 0:
        return "its forward does not start with a per-channel affine"
    tail: list[tuple[str, nn.Module]] = []
    for node in path[k:]:
        if node.op != "call_module" or str(node.target) not in children:
            return f"after the norm its forward computes '{node.name}', not one of its modules"
        if len(node.args) != 1 or node.kwargs:
            return f"its module '{node.target}' takes more than the norm's output"
        if any(name == str(node.target) for name, _ in tail):
            return f"its module '{node.target}' runs twice"
        tail.append((str(node.target), children[str(node.target)]))
    affine = _measure(module, graph, path[k - 1])
    if isinstance(affine, str):
        return affine
    what = " + ".join([type(module).__name__ + " norm", *(n for n, _ in tail)])
    return NormSignature(affine, tail, what)


def _affine_step(node: fx.Node) -> bool:
    if node.op == "call_function":
        if node.target in _BN_FUNCS:
            training = node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False)
            return training is False
        return node.target in _ELEMENTWISE
    if node.op == "call_method":
        return node.target in _ELEMENTWISE_METHODS
    return False


def _channels(module: nn.Module) -> int | None:
    for name in ("running_mean", "weight", "bias", "running_var"):
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor) and t.ndim == 1:
            return int(t.numel())
    n = getattr(module, "num_features", None)
    return int(n) if isinstance(n, int) else None


def _measure(module: nn.Module, graph: fx.Graph, last: fx.Node) -> Affine | str:
    """The affine the norm part computes, from float64 probes (zeros, ones, random)."""
    channels = _channels(module)
    if channels is None:
        return "its channel count is unknown"
    # traced again in float64: torch.fx computes what depends on buffers only (timm's
    # FrozenBatchNormAct2d: w * (rv + eps).rsqrt()) while tracing, in the module's dtype
    probe_module = copy.deepcopy(module).to(torch.float64).eval()
    with _sync_bn_in_eval(probe_module):
        graph64 = _LeafChildren(probe_module).trace(probe_module)
    nodes, nodes64 = list(graph.nodes), list(graph64.nodes)
    if len(nodes) != len(nodes64) or [n.op for n in nodes] != [n.op for n in nodes64]:
        return "its forward traces differently in float64"
    graph, last = graph64, nodes64[nodes.index(last)]
    part = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "output":
            break
        env[node] = part.node_copy(node, lambda n: env[n])
        if node is last:
            break
    part.output(env[last])
    gm = fx.GraphModule(probe_module, part)
    for rank in (4, 2, 3, 5):
        shape = (1, channels) + (1,) * (rank - 2)
        try:
            with torch.no_grad():
                t = gm(torch.zeros(shape, dtype=torch.float64))
                s = gm(torch.ones(shape, dtype=torch.float64)) - t
        except Exception:
            continue
        if tuple(t.shape) != shape:
            return "its norm part changes the shape of its input"
        scale = s.reshape(-1).numpy().copy()
        shift = t.reshape(-1).numpy().copy()
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn((3, channels) + (5,) * (rank - 2), generator=gen, dtype=torch.float64)
        with torch.no_grad():
            got = gm(probe)
        view = (1, channels) + (1,) * (rank - 2)
        want = probe * torch.from_numpy(scale).reshape(view) + torch.from_numpy(shift).reshape(view)
        err = float((got - want).abs().max())
        if not err <= 1e-9 * max(1.0, float(want.abs().max())):
            return "its norm part is not a per-channel affine of the input"
        return Affine(scale, shift, axis=1)
    return "its norm part does not run on a probe of its channels"


def tail_module(tail: list[tuple[str, nn.Module]]) -> nn.Module:
    """What replaces a folded norm: ``nn.Identity`` or its tail, children under their names."""
    if not tail:
        return nn.Identity()
    return nn.Sequential(OrderedDict(tail))
