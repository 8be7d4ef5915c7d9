"""Finding linear-norm pairs in a ``torch.fx`` graph: which calls are Conv/ConvTranspose/Linear
(modules, ``F.*`` and ATen ops), which are inference BatchNorm (modules, FrozenBatchNorm
look-alikes, ``F.batch_norm`` and ATen ops with constant statistics), and whether a norm sits
directly after or before a linear op with nothing else reading the tensor between them (the
plan for modules called from several places is :mod:`normfuse.torchmodel.plan`).

Imports: torch, numpy, :mod:`normfuse.core` and :mod:`normfuse.torchmodel.layers`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfuse.core.algebra import Affine, LinearKind
from normfuse.torchmodel.layout import (
    cat_dim,
    is_cat,
    lands_on_channels,
    permutation,
    shape_of,
    shape_only_use,
    skip_passthrough,
    structural_reason,
    via_note,
    view_input,
)
from normfuse.torchmodel.modules import hidden_behaviour
from normfuse.torchmodel.normsig import NormSignature, is_meta, looks_like_norm, norm_signature

__all__ = [
    "BN_TARGETS",
    "FUNC_BN",
    "FUNC_LINEAR",
    "GUESSED_SHAPES",
    "KNOWN_FORWARDS",
    "Linear",
    "Norm",
    "Pair",
    "as_linear",
    "as_norm",
    "call_args",
    "const_tensor",
    "dense_checked",
    "describe_node",
    "get_attr",
    "inert",
    "is_bn_module",
    "is_linear_module",
    "is_named_container",
    "is_padded",
    "label_of",
    "match_pair",
    "norm_affine",
    "plain_forward",
    "rank_of",
    "source_name",
    "trace_module",
    "users_of",
    "weights_only",
]

logger = logging.getLogger(__name__)


_aten = torch.ops.aten


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


_CONVT_ARGS = (
    "input",
    "weight",
    "bias",
    "stride",
    "padding",
    "output_padding",
    "groups",
    "dilation",
)


_CONVOLUTION_ARGS = (
    "input",
    "weight",
    "bias",
    "stride",
    "padding",
    "dilation",
    "transposed",
    "output_padding",
    "groups",
)


_LINEAR_ARGS = ("input", "weight", "bias")


FUNC_LINEAR: dict[Any, tuple[str, tuple[str, ...]]] = {
    F.linear: ("dense", _LINEAR_ARGS),
    _aten.linear.default: ("dense", _LINEAR_ARGS),
    # ExportedProgram.run_decompositions() writes every conv and transposed conv as this
    _aten.convolution.default: ("convolution", _CONVOLUTION_ARGS),
}


_f: Any
for _f in (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d):
    FUNC_LINEAR[_f] = ("conv", _CONV_ARGS)
for _f in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
    FUNC_LINEAR[_f] = ("conv_transpose", _CONVT_ARGS)
for _n in ("conv1d", "conv2d", "conv3d"):
    for _o in ("default", "padding"):
        if hasattr(getattr(_aten, _n), _o):
            FUNC_LINEAR[getattr(getattr(_aten, _n), _o)] = ("conv", _CONV_ARGS)
for _n in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
    for _o in ("default", "input"):
        if hasattr(getattr(_aten, _n), _o):
            FUNC_LINEAR[getattr(getattr(_aten, _n), _o)] = ("conv_transpose", _CONVT_ARGS)


_F_BN_ARGS = (
    "input",
    "running_mean",
    "running_var",
    "weight",
    "bias",
    "training",
    "momentum",
    "eps",
)


_ATEN_BN_ARGS = (
    "input",
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "training",
    "momentum",
    "eps",
    "cudnn_enabled",
)


_LEGIT_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps")


FUNC_BN: dict[Any, tuple[str, ...]] = {
    F.batch_norm: _F_BN_ARGS,
    torch.batch_norm: _ATEN_BN_ARGS,
    _aten.batch_norm.default: _ATEN_BN_ARGS,
    _aten._native_batch_norm_legit_no_training.default: _LEGIT_ARGS,
}


KNOWN_FORWARDS = {
    cls.forward
    for cls in (
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
        nn.Linear,
        _BatchNorm,
        nn.SyncBatchNorm,
    )
}


def plain_forward(m: nn.Module) -> bool:
    """A Conv/Linear/BatchNorm whose computation is torch's own (subclasses that keep forward)."""
    if type(m).forward not in KNOWN_FORWARDS:
        return False
    if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(
        m, nn.modules.conv._ConvTransposeNd
    ):
        base = next(c for c in type(m).__mro__ if c.__module__ == "torch.nn.modules.conv")
        if type(m)._conv_forward is not base._conv_forward:  # type: ignore[attr-defined]
            return False
    return not (isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params())


def inert(tail: list[tuple[str, nn.Module]]) -> bool:
    """A norm's own modules after the norm that change nothing: ``nn.Identity`` without hooks
    (timm's ``BatchNormAct2d(apply_act=False)`` without drop)."""
    return all(type(m) is nn.Identity and hidden_behaviour(m) is None for _, m in tail)


def is_linear_module(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.modules.conv._ConvNd | nn.Linear)
        and plain_forward(m)
        and hidden_behaviour(m) is None
    )


def is_bn_module(m: nn.Module) -> bool:
    """A module whose forward is an inference norm (perhaps followed by its own children, as
    timm's BatchNormAct2d), or one that looks like a norm and is refused with a reason: it is
    kept as one call, and gets a report entry either way.

    A module named like a norm whose forward is none but that holds Conv/Linear/norm modules of
    its own is a container (:func:`is_named_container`): it is traced into, so that the pairs
    inside it are seen."""
    if isinstance(m, _BatchNorm) and plain_forward(m):
        return True
    return looks_like_norm(m) and not is_named_container(m)


def is_named_container(m: nn.Module) -> bool:
    """A module whose class name says "BatchNorm" but whose forward is no norm, calling linear
    or norm modules it holds: transformers' ``FastSpeech2ConformerBatchNormConvLayer`` and
    ``SpeechT5BatchNormConvLayer`` (conv, BatchNorm1d, tanh, dropout), PatchTST's
    ``PatchTSTBatchNorm`` (a BatchNorm1d between two transposes). As one opaque call it would
    hide those pairs behind the reason that its forward is not a norm."""
    inner = [
        c
        for c in m.modules()
        if c is not m
        and (isinstance(c, nn.modules.conv._ConvNd | nn.Linear | _BatchNorm) or looks_like_norm(c))
    ]
    return bool(inner) and not isinstance(norm_signature(m), NormSignature)


class _Tracer(fx.Tracer):
    """Keeps Conv/Linear/BatchNorm (and FrozenBatchNorm look-alikes) as module calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_linear_module(m) or is_bn_module(m):
            return True
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear) and hidden_behaviour(m):
            return True  # one opaque call: tracing into it would leave its hooks behind
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear | _BatchNorm):
            return False  # a subclass with its own forward: trace into it
        return super().is_leaf_module(m, module_qualified_name)


def trace_module(module: nn.Module) -> fx.GraphModule:
    graph = _Tracer().trace(module)
    return fx.GraphModule(module, graph, type(module).__name__)


def get_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def call_args(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    out = dict(zip(names, node.args, strict=False))
    out.update(node.kwargs)
    return out


def const_tensor(gm: fx.GraphModule, value: Any) -> tuple[torch.Tensor | None, bool]:
    """``(tensor, ok)``: the tensor behind a get_attr node, ``(None, True)`` for ``None``."""
    if value is None:
        return None, True
    if isinstance(value, fx.Node) and value.op == "get_attr":
        t = get_attr(gm, str(value.target))
        if isinstance(t, torch.Tensor):
            return t, True
    return None, False


def rank_of(node: Any) -> int | None:
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dim()
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return len(shape) if shape is not None else None


def source_name(node: fx.Node) -> str:
    """The module path a node came from (torch.export keeps it), else the node's name."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return str(path)
    return node.name


def label_of(node: fx.Node) -> str:
    return f"'{source_name(node)}'"


@dataclasses.dataclass
class Linear:
    node: fx.Node
    kind: LinearKind
    groups: int
    zero_padded: bool
    owner: str  # module target, or weight attribute target
    module: nn.Module | None
    weight: torch.Tensor
    bias: torch.Tensor | None
    op_type: str

    @property
    def label(self) -> str:
        return f"{self.op_type} {label_of(self.node)}"

    def channels(self, side: str) -> int:
        w = self.weight
        if self.kind == "conv":
            return int(w.shape[0]) if side == "out" else int(w.shape[1]) * self.groups
        if self.kind == "conv_transpose":
            return int(w.shape[1]) * self.groups if side == "out" else int(w.shape[0])
        return int(w.shape[0]) if side == "out" else int(w.shape[1])


def is_padded(padding: Any, kernel: tuple[int, ...]) -> bool:
    if isinstance(padding, str):
        return padding != "valid" and any(k > 1 for k in kernel)
    if isinstance(padding, int):
        return padding != 0
    return any(int(p) != 0 for p in padding)


def as_linear(gm: fx.GraphModule, node: Any) -> Linear | None:
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module":
        m: Any = gm.get_submodule(str(node.target))
        if not is_linear_module(m):
            return None
        if isinstance(m, nn.Linear):
            return Linear(node, "dense", 1, False, str(node.target), m, m.weight, m.bias, "Linear")
        transposed = bool(m.transposed)
        kernel = tuple(m.weight.shape[2:])
        zero_padded = m.padding_mode == "zeros" and is_padded(m.padding, kernel)
        kind: LinearKind = "conv_transpose" if transposed else "conv"
        return Linear(
            node,
            kind,
            int(m.groups),
            zero_padded or transposed,
            str(node.target),
            m,
            m.weight,
            m.bias,
            type(m).__name__,
        )
    if node.op != "call_function" or node.target not in FUNC_LINEAR:
        return None
    flavour, names = FUNC_LINEAR[node.target]
    a = call_args(node, names)
    weight, ok_w = const_tensor(gm, a.get("weight"))
    bias, ok_b = const_tensor(gm, a.get("bias"))
    if weight is None or not ok_w or not ok_b or not weight.is_floating_point():
        return None
    if flavour == "convolution":
        flavour = "conv_transpose" if a.get("transposed") else "conv"
    groups = a.get("groups", 1)
    padding = a.get("padding", 0)
    if not isinstance(groups, int) or isinstance(padding, fx.Node):
        return None
    kind = flavour  # type: ignore[assignment]
    zero_padded = kind == "conv_transpose" or (
        kind == "conv" and is_padded(padding, tuple(weight.shape[2:]))
    )
    owner = str(a["weight"].target)
    op_type = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    return Linear(node, kind, groups, zero_padded, owner, None, weight, bias, op_type)


@dataclasses.dataclass
class Norm:
    node: fx.Node  # the normalised tensor
    erase: list[fx.Node]
    input: Any
    name: str
    op_type: str
    module_target: str | None
    channels: int
    affine: Affine | None = None
    reason: str | None = None
    fix: str | None = None
    tail: list[tuple[str, nn.Module]] = dataclasses.field(default_factory=list)


def norm_affine(
    w: torch.Tensor | None,
    b: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
) -> Affine:
    def f64(t: torch.Tensor | None, fill: float) -> np.ndarray:
        if t is None:
            return np.full(mean.numel(), fill)
        return t.detach().to(torch.float64).cpu().numpy()

    return Affine.from_batchnorm(f64(w, 1.0), f64(b, 0.0), f64(mean, 0.0), f64(var, 1.0), eps)


def as_norm(gm: fx.GraphModule, node: fx.Node) -> Norm | None:
    if node.op == "call_module":
        m: Any = gm.get_submodule(str(node.target))
        if not is_bn_module(m) or not node.args:
            return None
        rm = getattr(m, "running_mean", None)
        rv = getattr(m, "running_var", None)
        channels = (
            int(rm.numel())
            if isinstance(rm, torch.Tensor)
            else int(getattr(m, "num_features", 0) or 0)
        )
        norm = Norm(
            node,
            [node],
            node.args[0],
            str(node.target),
            type(m).__name__,
            str(node.target),
            channels,
        )
        sig = norm_signature(m)
        hidden = hidden_behaviour(m)
        if hidden is not None:
            norm.reason = hidden
            norm.fix = "remove the hooks or parametrizations before folding"
        elif m.training and (isinstance(m, _BatchNorm) or isinstance(sig, str)):
            norm.reason = "in training mode: normalises with batch statistics"
            norm.fix = "call model.eval() first"
        elif isinstance(m, _BatchNorm) and (
            not isinstance(rm, torch.Tensor) or not isinstance(rv, torch.Tensor)
        ):
            norm.reason = "track_running_stats=False: uses batch statistics even in eval"
        elif isinstance(sig, NormSignature):
            norm.affine = sig.affine
            norm.tail = [] if inert(sig.tail) else sig.tail
        else:
            norm.reason = sig or "its forward is not a norm normfuse can read"
        return norm
    if node.op != "call_function" or node.target not in FUNC_BN:
        return None
    a = call_args(node, FUNC_BN[node.target])
    out, erase = node, [node]
    if node.target is _aten._native_batch_norm_legit_no_training.default:
        users = list(node.users)
        if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
            return None
        out, erase = users[0], [users[0], node]
    norm = Norm(out, erase, a.get("input"), source_name(node), "batch_norm", None, 0)
    tensors = {
        k: const_tensor(gm, a.get(k)) for k in ("weight", "bias", "running_mean", "running_var")
    }
    rm, rv = tensors["running_mean"][0], tensors["running_var"][0]
    if weights_only(a.get("input")):
        norm.reason = (
            "it normalises a tensor computed from the model's own weights, not activations "
            "(weight standardization, as BiT's WeightStandardizedConv2d): no norm to fold"
        )
    elif a.get("training", False) is not False:
        norm.reason = "training=True (or not a constant): batch statistics"
    elif rm is None or rv is None or not all(ok for _, ok in tensors.values()):
        norm.reason = "statistics or affine are not constant attributes"
    else:
        norm.channels = int(rm.numel())
        eps = a.get("eps", 1e-5)
        if not isinstance(eps, float | int):
            norm.reason = "eps is not a constant"
        else:
            norm.affine = norm_affine(tensors["weight"][0], tensors["bias"][0], rm, rv, float(eps))
    return norm


def weights_only(node: Any) -> bool:
    """True when ``node`` is computed from the module's own tensors (``get_attr``) and
    constants alone, no model input: a transform of weights, not of the data."""
    if not isinstance(node, fx.Node):
        return False
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return False
        todo.extend(n.all_input_nodes)
    return True


@dataclasses.dataclass
class Pair:
    norm: Norm
    lin: Linear
    direction: str  # "after" (norm follows lin) or "before"
    warnings: list[str] = dataclasses.field(default_factory=list)
    #: After a channel concat of convs (timm MixNet): the convs after ``lin``, in the concat's
    #: order; each takes its channels of the norm's affine.
    parts: list[Linear] = dataclasses.field(default_factory=list)

    @property
    def linears(self) -> list[Linear]:
        return [self.lin, *self.parts]


def users_of(node: fx.Node) -> list[fx.Node]:
    return list(node.users)


def describe_node(node: Any) -> str:
    if not isinstance(node, fx.Node):
        return "a constant"
    if node.op == "placeholder":
        return f"model input '{node.target}'"
    if node.op == "call_module":
        owner = node.graph.owning_module
        hidden = hidden_behaviour(owner.get_submodule(str(node.target))) if owner else None
        return f"module '{node.target}'" + (f" ({hidden})" if hidden else "")
    target = getattr(node.target, "__name__", str(node.target))
    return f"{target} '{node.name}'"


#: Set while the shapes come from an input normfuse generated (no example inputs): they show
#: what the model accepts, not the rank of the data it is made for.
GUESSED_SHAPES: contextvars.ContextVar[bool] = contextvars.ContextVar("guessed", default=False)


def dense_checked(pair: Pair, activation: fx.Node) -> Pair | tuple[str, str | None]:
    """A BatchNorm acts on axis 1, a Linear on the last: they line up only on ``(N, C)`` data,
    which the shapes of the caller's example inputs must show (a BatchNorm1d also takes
    ``(N, C, L)``, and a Linear before or after it then acts on L's other side)."""
    if pair.lin.kind != "dense":
        return pair
    rank = None if GUESSED_SHAPES.get() else rank_of(activation)
    side = "follows" if pair.direction == "after" else "precedes"
    if rank is None:
        return (
            f"{side} {pair.lin.label} on data of unknown rank: the norm acts on axis 1, Linear "
            "on the last, which line up only on (N, C) data",
            "pass example_inputs (a batch of the data the model is made for) to show the rank",
        )
    if rank != 2:
        return (
            f"{side} {pair.lin.label} on data of rank {rank}: the norm acts on axis 1, Linear "
            "on the last",
            None,
        )
    return pair


def match_pair(gm: fx.GraphModule, norm: Norm) -> Pair | tuple[str, str | None]:
    """The fold for ``norm``, or ``(reason, fix)``."""
    assert norm.affine is not None
    lin = as_linear(gm, norm.input)
    if lin is None:
        through = _through_view(gm, norm)
        if through is not None:
            return through
        before = _match_before(gm, norm)  # one op to change, where there is one
        split = _after_concat(gm, norm) if not isinstance(before, Pair) else None
        return split if split is not None else before
    # reads of the shape, rank, dtype or device are no data use: the fold keeps them
    others = [u for u in users_of(lin.node) if u is not norm.erase[-1] and not is_meta(u)]
    if others:
        why = f"{lin.label} output also feeds {', '.join(describe_node(u) for u in others)}"
    elif lin.channels("out") != norm.channels:
        why = f"{lin.label} has {lin.channels('out')} output channels, the norm {norm.channels}"
    else:
        return dense_checked(Pair(norm, lin, "after"), lin.node)
    # the op after it, as the ONNX side does (maxvit: a conv read by a pool and a BN)
    found = _match_before(gm, norm)
    if isinstance(found, Pair):
        return found
    return f"{why}; {found[0]}", found[1]


def _after_concat(gm: fx.GraphModule, norm: Norm) -> Pair | None:
    """The fold of a norm after a channel concat of convs, each read there alone (timm MixNet's
    ``MixedConv2d``): each conv takes its channels of the affine; ``None`` when the norm's
    input is not such a concat (the other matchers then say why)."""
    cat = norm.input
    if not is_cat(cat) or not cat.args or not isinstance(cat.args[0], list | tuple):
        return None
    dim, shape = cat_dim(cat), shape_of(cat)
    if not (dim == 1 or (shape is not None and isinstance(dim, int) and dim == 1 - len(shape))):
        return None
    if [u for u in users_of(cat) if not is_meta(u)] != [norm.erase[-1]]:
        return None
    parts: list[Linear] = []
    for node in cat.args[0]:
        lin = as_linear(gm, node)
        if lin is None or lin.kind == "dense" or any(p.node is node for p in parts):
            return None
        if [u for u in users_of(node) if not is_meta(u)] != [cat]:
            return None
        parts.append(lin)
    if len(parts) < 2 or sum(p.channels("out") for p in parts) != norm.channels:
        return None
    return Pair(norm, parts[0], "after", parts=parts[1:])


def _match_before(gm: fx.GraphModule, norm: Norm) -> Pair | tuple[str, str | None]:
    """The fold of ``norm`` into the Conv/Linear that reads it, or ``(reason, fix)``."""
    assert norm.affine is not None
    users = [u for u in users_of(norm.node) if not is_meta(u)]
    ends = [skip_passthrough(gm, u, pads=True) for u in users]
    found = _into_next(gm, norm, users, ends)
    if isinstance(found, Pair):
        return found  # also after a channel concat (inception_next: cat -> BN -> 1x1 conv)
    structural = structural_reason(norm.input, [e for e, _ in ends], describe_node)
    return (structural, None) if structural is not None else found


def _into_next(
    gm: fx.GraphModule, norm: Norm, users: list[fx.Node], ends: list[tuple[fx.Node, list]]
) -> Pair | tuple[str, str | None]:
    assert norm.affine is not None
    if norm.tail:
        names = ", ".join(n for n, _ in norm.tail)
        return (
            f"follows {describe_node(norm.input)}, not a Conv/Linear; its forward runs {names} "
            "after the norm, so it cannot fold into what follows",
            None,
        )
    if len(users) == 1:
        nxt, via = ends[0]
        lin = as_linear(gm, nxt)
        moved = _channels_last(gm, nxt) if lin is None else None
        if moved is not None:  # BN1d -> transpose(1, 2) -> Linear: channels become features
            via, nxt, lin = [*via, nxt], moved.node, moved
        # ops and modules that return their input (eval dropout, nn.Identity, no hooks) and
        # have no other reader: what they pass on changes, which nothing else sees
        feeds = via[-1] if via else norm.node
        if lin is not None and lin.node.args and lin.node.args[0] is feeds:
            if lin.channels("in") != norm.channels:
                return (
                    f"{lin.label} has {lin.channels('in')} input channels, the norm {norm.channels}",
                    None,
                )
            if lin.zero_padded and norm.affine.has_shift:
                what = (
                    "is transposed" if lin.kind == "conv_transpose" else "pads its input with zeros"
                )
                return (
                    f"precedes {lin.label}, which {what}: folding would change the borders",
                    None,
                )
            pair = Pair(norm, lin, "before")
            if via:
                pair.warnings.append(
                    "through " + ", ".join(via_note(v, describe_node) for v in via)
                )
            return pair if moved is not None else dense_checked(pair, norm.node)
    after = ", ".join(describe_node(u) for u in users) or "nothing"
    return (
        f"follows {describe_node(norm.input)} and feeds {after}: no Conv/Linear to fold into",
        None,
    )


def _channels_last(gm: fx.GraphModule, node: fx.Node) -> Linear | None:
    """The Linear that reads ``node`` alone, when ``node`` moves axis 1 (a norm's channels)
    to the last axis (the Linear's features)."""
    perm = permutation(node)
    users = [u for u in users_of(node) if not is_meta(u)]
    if perm is None or perm[-1] != 1 or len(users) != 1:
        return None
    lin = as_linear(gm, users[0])
    if lin is None or lin.kind != "dense" or not lin.node.args or lin.node.args[0] is not node:
        return None
    return lin


def _through_view(gm: fx.GraphModule, norm: Norm) -> Pair | tuple[str, str | None] | None:
    """A norm on a Linear's output flattened to ``(M, C)`` or transposed so that its features
    are axis 1 (:mod:`normfuse.torchmodel.layout`): the fold, the reason it cannot be, or
    ``None`` when the norm's input is no such view."""
    found = view_input(norm.input)
    perm = permutation(norm.input) if found is None else None
    if perm is not None:
        assert isinstance(norm.input, fx.Node)
        found = norm.input.args[0], str(getattr(norm.input.target, "__name__", norm.input.target))
    if found is None or not isinstance(found[0], fx.Node):
        return None
    src, what = found
    lin = as_linear(gm, src)
    if lin is None or lin.kind != "dense":
        return None
    view = norm.input
    assert isinstance(view, fx.Node)
    others = [u for u in users_of(view) if u is not norm.erase[-1] and not is_meta(u)]
    others += [u for u in users_of(lin.node) if u is not view and not shape_only_use(u, lin.node)]
    if others:
        return (
            f"follows {what} of {lin.label}, whose values also feed "
            f"{', '.join(describe_node(u) for u in others)}",
            None,
        )
    if lin.channels("out") != norm.channels:
        return (
            f"follows {what} of {lin.label} with {lin.channels('out')} features, the norm has "
            f"{norm.channels} channels",
            None,
        )
    if perm is None:
        reason = lands_on_channels(src, view, norm.channels)
    elif perm[1] != len(perm) - 1:
        reason = f"the {view.name} puts axis {perm[1]} of its output on the norm's channel axis"
    else:
        reason = None
    if reason is not None:
        return f"follows {what} of {lin.label}: {reason}", None
    pair = Pair(norm, lin, "after")
    pair.warnings.append(f"through {what} '{view.name}': the Linear's features are its channels")
    return pair


BN_TARGETS = set(FUNC_BN)
