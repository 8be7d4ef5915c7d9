"""Fold inference-mode BatchNorm into Conv/ConvTranspose/Linear in PyTorch models.

Inputs: an ``nn.Module``, a ``torch.fx.GraphModule`` or a ``torch.export.ExportedProgram``. The
maths is :mod:`normfuse.algebra` (float64, one rounding into the weight's dtype):

* BatchNorm after a linear op: ``W' = W * s`` on the output channels, ``b' = b * s + t`` with
  ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``.
* BatchNorm before a Linear, or before a conv that pads no input with zeros:
  ``W' = W * s`` on the input channels, ``b' = b + sum(W * t)``.

How candidates are found: the model is traced with ``torch.fx`` (Conv/Linear/BatchNorm modules
kept as calls, subclasses included when they do not override ``forward``; torchvision-style
FrozenBatchNorm too), so every call site of every module is known:

* A module called from several places is folded once when every call is followed by the same
  BatchNorm; otherwise a GraphModule gets a folded clone for the folded call, and a plain
  ``nn.Module`` (whose ``forward`` code cannot change) keeps it and reports why.
* For an ``nn.Module`` the result keeps its class: folded BatchNorms become ``nn.Identity`` and
  the linear modules get the new weights. Functional ``F.batch_norm`` with constant statistics
  folds in GraphModules and ExportedPrograms (their graph can change), not in ``forward`` code.
* When tracing fails (data-dependent control flow), pairs that ``nn.Sequential`` order proves
  adjacent still fold, and the report says so.

Every BatchNorm found becomes one report entry: applied (into which op, after or before), or
skipped with the reason (training mode, ``track_running_stats=False``, conv output used
elsewhere, zero padding, shape mismatch, ...).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import operator
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfuse.algebra import Affine, LinearKind, LinearWeights, absorb_after, absorb_before
from normfuse.errors import InputError, ParityError
from normfuse.fx_swap import module_stats, replace_modules
from normfuse.parity import compare_outputs
from normfuse.report import Entry, ModelStats, OutputParity, ParityResult, Report
from normfuse.torch_layers import is_frozen_batchnorm

__all__ = ["TORCH_TOLERANCES", "compare_torch_outputs", "fold_torch"]

logger = logging.getLogger(__name__)

TORCH_TOLERANCES: dict[str, tuple[float, float]] = {
    "float": (0.0, 1e-5),
    "float32": (0.0, 1e-5),
    "double": (0.0, 1e-12),
    "float64": (0.0, 1e-12),
    "float16": (0.0, 4e-3),
    "bfloat16": (0.0, 3e-2),
}
"""``(atol, rtol)`` per output dtype for the folded-vs-original check (rule of
:func:`normfuse.parity.compare_outputs`: ``|a - b| <= atol + rtol * max|ref|``)."""

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
_FUNC_LINEAR: dict[Any, tuple[str, tuple[str, ...]]] = {
    F.linear: ("dense", _LINEAR_ARGS),
    _aten.linear.default: ("dense", _LINEAR_ARGS),
}
_f: Any
for _f in (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d):
    _FUNC_LINEAR[_f] = ("conv", _CONV_ARGS)
for _f in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
    _FUNC_LINEAR[_f] = ("conv_transpose", _CONVT_ARGS)
for _n in ("conv1d", "conv2d", "conv3d"):
    for _o in ("default", "padding"):
        if hasattr(getattr(_aten, _n), _o):
            _FUNC_LINEAR[getattr(getattr(_aten, _n), _o)] = ("conv", _CONV_ARGS)
for _n in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
    for _o in ("default", "input"):
        if hasattr(getattr(_aten, _n), _o):
            _FUNC_LINEAR[getattr(getattr(_aten, _n), _o)] = ("conv_transpose", _CONVT_ARGS)
_FUNC_LINEAR[_aten.convolution.default] = ("convolution", _CONVOLUTION_ARGS)

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
_FUNC_BN: dict[Any, tuple[str, ...]] = {
    F.batch_norm: _F_BN_ARGS,
    torch.batch_norm: _ATEN_BN_ARGS,
    _aten.batch_norm.default: _ATEN_BN_ARGS,
    _aten._native_batch_norm_legit_no_training.default: _LEGIT_ARGS,
}

_KNOWN_FORWARDS = {
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


def _plain(m: nn.Module) -> bool:
    """A Conv/Linear/BatchNorm whose computation is torch's own (subclasses that keep forward)."""
    if type(m).forward not in _KNOWN_FORWARDS:
        return False
    if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(
        m, nn.modules.conv._ConvTransposeNd
    ):
        base = next(c for c in type(m).__mro__ if c.__module__ == "torch.nn.modules.conv")
        if type(m)._conv_forward is not base._conv_forward:  # type: ignore[attr-defined]
            return False
    return not (isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params())


def _is_linear_module(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd | nn.Linear) and _plain(m)


def _is_bn_module(m: nn.Module) -> bool:
    return (isinstance(m, _BatchNorm) and _plain(m)) or is_frozen_batchnorm(m)


class _Tracer(fx.Tracer):
    """Keeps Conv/Linear/BatchNorm (and FrozenBatchNorm look-alikes) as module calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _is_linear_module(m) or _is_bn_module(m):
            return True
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear | _BatchNorm):
            return False  # a subclass with its own forward: trace into it
        return super().is_leaf_module(m, module_qualified_name)


def _trace(module: nn.Module) -> fx.GraphModule:
    graph = _Tracer().trace(module)
    return fx.GraphModule(module, graph, type(module).__name__)


def _get_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _args(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    out = dict(zip(names, node.args, strict=False))
    out.update(node.kwargs)
    return out


def _const_tensor(gm: fx.GraphModule, value: Any) -> tuple[torch.Tensor | None, bool]:
    """``(tensor, ok)``: the tensor behind a get_attr node, ``(None, True)`` for ``None``."""
    if value is None:
        return None, True
    if isinstance(value, fx.Node) and value.op == "get_attr":
        t = _get_attr(gm, str(value.target))
        if isinstance(t, torch.Tensor):
            return t, True
    return None, False


def _rank(node: Any) -> int | None:
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dim()
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return len(shape) if shape is not None else None


def _source_name(node: fx.Node) -> str:
    """The module path a node came from (torch.export keeps it), else the node's name."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return str(path)
    return node.name


def _label(node: fx.Node) -> str:
    return f"'{_source_name(node)}'"


@dataclasses.dataclass
class _Linear:
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
        return f"{self.op_type} {_label(self.node)}"

    def channels(self, side: str) -> int:
        w = self.weight
        if self.kind == "conv":
            return int(w.shape[0]) if side == "out" else int(w.shape[1]) * self.groups
        if self.kind == "conv_transpose":
            return int(w.shape[1]) * self.groups if side == "out" else int(w.shape[0])
        return int(w.shape[0]) if side == "out" else int(w.shape[1])


def _padded(padding: Any, kernel: tuple[int, ...]) -> bool:
    if isinstance(padding, str):
        return padding != "valid" and any(k > 1 for k in kernel)
    if isinstance(padding, int):
        return padding != 0
    return any(int(p) != 0 for p in padding)


def _as_linear(gm: fx.GraphModule, node: Any) -> _Linear | None:
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module":
        m: Any = gm.get_submodule(str(node.target))
        if not _is_linear_module(m):
            return None
        if isinstance(m, nn.Linear):
            return _Linear(node, "dense", 1, False, str(node.target), m, m.weight, m.bias, "Linear")
        transposed = bool(m.transposed)
        kernel = tuple(m.weight.shape[2:])
        zero_padded = m.padding_mode == "zeros" and _padded(m.padding, kernel)
        kind: LinearKind = "conv_transpose" if transposed else "conv"
        return _Linear(
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
    if node.op != "call_function" or node.target not in _FUNC_LINEAR:
        return None
    flavour, names = _FUNC_LINEAR[node.target]
    a = _args(node, names)
    weight, ok_w = _const_tensor(gm, a.get("weight"))
    bias, ok_b = _const_tensor(gm, a.get("bias"))
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
        kind == "conv" and _padded(padding, tuple(weight.shape[2:]))
    )
    owner = str(a["weight"].target)
    op_type = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    return _Linear(node, kind, groups, zero_padded, owner, None, weight, bias, op_type)


@dataclasses.dataclass
class _Norm:
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


def _affine(
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


def _as_norm(gm: fx.GraphModule, node: fx.Node) -> _Norm | None:
    if node.op == "call_module":
        m: Any = gm.get_submodule(str(node.target))
        if not _is_bn_module(m) or not node.args:
            return None
        rm = getattr(m, "running_mean", None)
        rv = getattr(m, "running_var", None)
        channels = int(rm.numel()) if isinstance(rm, torch.Tensor) else int(m.num_features)
        norm = _Norm(
            node,
            [node],
            node.args[0],
            str(node.target),
            type(m).__name__,
            str(node.target),
            channels,
        )
        if not is_frozen_batchnorm(m) and m.training:
            norm.reason = "in training mode: normalises with batch statistics"
            norm.fix = "call model.eval() first"
        elif not isinstance(rm, torch.Tensor) or not isinstance(rv, torch.Tensor):
            norm.reason = "track_running_stats=False: uses batch statistics even in eval"
        else:
            w = getattr(m, "weight", None)
            b = getattr(m, "bias", None)
            norm.affine = _affine(w, b, rm, rv, float(m.eps))
        return norm
    if node.op != "call_function" or node.target not in _FUNC_BN:
        return None
    a = _args(node, _FUNC_BN[node.target])
    out, erase = node, [node]
    if node.target is _aten._native_batch_norm_legit_no_training.default:
        users = list(node.users)
        if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
            return None
        out, erase = users[0], [users[0], node]
    norm = _Norm(out, erase, a.get("input"), _source_name(node), "batch_norm", None, 0)
    tensors = {
        k: _const_tensor(gm, a.get(k)) for k in ("weight", "bias", "running_mean", "running_var")
    }
    rm, rv = tensors["running_mean"][0], tensors["running_var"][0]
    if a.get("training", False) is not False:
        norm.reason = "training=True (or not a constant): batch statistics"
    elif rm is None or rv is None or not all(ok for _, ok in tensors.values()):
        norm.reason = "statistics or affine are not constant attributes"
    else:
        norm.channels = int(rm.numel())
        eps = a.get("eps", 1e-5)
        if not isinstance(eps, float | int):
            norm.reason = "eps is not a constant"
        else:
            norm.affine = _affine(tensors["weight"][0], tensors["bias"][0], rm, rv, float(eps))
    return norm


@dataclasses.dataclass
class _Pair:
    norm: _Norm
    lin: _Linear
    direction: str  # "after" (norm follows lin) or "before"
    warnings: list[str] = dataclasses.field(default_factory=list)


def _users(node: fx.Node) -> list[fx.Node]:
    return list(node.users)


def _describe_node(node: Any) -> str:
    if not isinstance(node, fx.Node):
        return "a constant"
    if node.op == "placeholder":
        return f"model input '{node.target}'"
    if node.op == "call_module":
        return f"module '{node.target}'"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{target} '{node.name}'"


def _dense_checked(pair: _Pair, activation: fx.Node) -> _Pair | tuple[str, str | None]:
    """A BatchNorm acts on axis 1, a Linear on the last: they line up only on ``(N, C)`` data."""
    if pair.lin.kind != "dense":
        return pair
    rank = _rank(activation)
    if rank is None:
        pair.warnings.append("(N, C) activations assumed (pass example_inputs to verify)")
    elif rank != 2:
        return (
            f"{'follows' if pair.direction == 'after' else 'precedes'} {pair.lin.label} on "
            f"data of rank {rank}: the norm acts on axis 1, Linear on the last",
            None,
        )
    return pair


def _match(gm: fx.GraphModule, norm: _Norm) -> _Pair | tuple[str, str | None]:
    """The fold for ``norm``, or ``(reason, fix)``."""
    assert norm.affine is not None
    lin = _as_linear(gm, norm.input)
    if lin is not None:
        others = [u for u in _users(lin.node) if u is not norm.erase[-1]]
        if others:
            return (
                f"{lin.label} output also feeds {', '.join(_describe_node(u) for u in others)}",
                None,
            )
        if lin.channels("out") != norm.channels:
            return (
                f"{lin.label} has {lin.channels('out')} output channels, the norm {norm.channels}",
                None,
            )
        return _dense_checked(_Pair(norm, lin, "after"), lin.node)
    users = _users(norm.node)
    if len(users) == 1:
        lin = _as_linear(gm, users[0])
        if lin is not None and lin.node.args and lin.node.args[0] is norm.node:
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
            return _dense_checked(_Pair(norm, lin, "before"), norm.node)
    after = ", ".join(_describe_node(u) for u in users) or "nothing"
    return (
        f"follows {_describe_node(norm.input)} and feeds {after}: no Conv/Linear to fold into",
        None,
    )


def _sites(gm: fx.GraphModule, owner: str, is_module: bool) -> list[fx.Node]:
    if is_module:
        return [n for n in gm.graph.nodes if n.op == "call_module" and n.target == owner]
    return [u for n in gm.graph.nodes if n.op == "get_attr" and n.target == owner for u in n.users]


def _same_affine(a: _Norm, b: _Norm) -> bool:
    if a.module_target is not None and a.module_target == b.module_target:
        return True
    if a.affine is None or b.affine is None:
        return False
    return bool(
        np.array_equal(a.affine.scale, b.affine.scale)
        and np.array_equal(a.affine.shift, b.affine.shift)
    )


def _weights_shared(gm: fx.GraphModule, lin: _Linear) -> bool:
    """True when the op's weight/bias tensor is also held by another module (tied weights)."""
    if lin.module is None:
        return False
    mine = {id(p) for p in (lin.weight, lin.bias) if p is not None}
    for m in gm.modules():
        if m is lin.module:
            continue
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            if id(t) in mine:
                return True
    return False


@dataclasses.dataclass
class _Plan:
    accepted: list[_Pair]
    clones: set[int]  # ids of pairs whose linear op gets a private copy
    refused: dict[int, tuple[str, str | None]]  # id(norm) -> reason


def _plan(gm: fx.GraphModule, pairs: list[_Pair], graph_mode: bool) -> _Plan:
    refused: dict[int, tuple[str, str | None]] = {}
    fix = "fold torch.fx.symbolic_trace(model) instead: in a GraphModule normfuse can clone it"
    while True:
        live = [p for p in pairs if id(p.norm) not in refused]
        by_site: dict[fx.Node, list[_Pair]] = {}
        for p in live:
            by_site.setdefault(p.lin.node, []).append(p)
        clones: set[int] = set()
        changed = False
        for ps in by_site.values():  # one fold per op and round; the rest wait
            for p in ps[1:]:
                refused[id(p.norm)] = ("waits for another fold into the same op", None)
                changed = True
        live = [p for p in live if id(p.norm) not in refused]
        owners: dict[str, list[_Pair]] = {}
        for p in live:
            owners.setdefault(p.lin.owner, []).append(p)
        for owner, ps in owners.items():
            lin = ps[0].lin
            sites = _sites(gm, owner, lin.module is not None)
            folded_sites = {p.lin.node for p in ps}
            consistent = (
                set(sites) == folded_sites
                and len({p.direction for p in ps}) == 1
                and all(_same_affine(ps[0].norm, p.norm) for p in ps)
                and not _weights_shared(gm, lin)
                and (lin.bias is None or lin.module is not None or _bias_private(gm, lin))
            )
            if consistent:
                continue
            if graph_mode:
                clones.update(id(p) for p in ps)
                continue
            others = [s for s in sites if s not in folded_sites]
            where = (
                f"also called elsewhere (fx node {', '.join(repr(s.name) for s in others)}) "
                "without this norm"
                if others
                else "shared (tied weights or several differing folds)"
            )
            for p in ps:
                refused[id(p.norm)] = (f"{lin.label} is {where}", fix)
            changed = True
        if not graph_mode:
            for p in [p for p in live if id(p.norm) not in refused]:
                reason = _surgery_refusal(gm, p, live, refused)
                if reason is not None:
                    refused[id(p.norm)] = (reason, fix)
                    changed = True
        if not changed:
            accepted = [p for p in pairs if id(p.norm) not in refused]
            return _Plan(accepted, clones, refused)


def _bias_private(gm: fx.GraphModule, lin: _Linear) -> bool:
    bias_node = _args(lin.node, ("input", "weight", "bias")).get("bias")
    if not isinstance(bias_node, fx.Node):
        return True
    return set(_sites(gm, str(bias_node.target), False)) <= set(_sites(gm, lin.owner, False))


def _surgery_refusal(
    gm: fx.GraphModule, p: _Pair, live: list[_Pair], refused: dict[int, tuple[str, str | None]]
) -> str | None:
    """Why an ``nn.Module`` cannot take this fold by replacing modules, or ``None``."""
    if p.norm.module_target is None:
        return "functional batch_norm in forward(): code cannot be changed without a graph"
    if p.lin.module is None:
        return f"{p.lin.label} is a functional op in forward(): its weights are not a module's"
    calls = [
        n for n in gm.graph.nodes if n.op == "call_module" and n.target == p.norm.module_target
    ]
    folding = {q.norm.node for q in live if id(q.norm) not in refused}
    missing = [n for n in calls if n not in folding]
    if missing:
        return (
            f"module '{p.norm.module_target}' is also called at "
            f"{', '.join(_describe_node(n.args[0]) for n in missing)} where it does not fold"
        )
    return None


def _fold_pair(gm: fx.GraphModule, pair: _Pair, clone: bool, counter: list[int]) -> str | None:
    """Apply one fold; returns a reason when the result would not be finite."""
    lin, norm = pair.lin, pair.norm
    assert norm.affine is not None
    w = lin.weight.detach()
    lw = LinearWeights(
        lin.kind,
        w.to(torch.float64).cpu().numpy(),
        lin.bias.detach().to(torch.float64).cpu().numpy() if lin.bias is not None else None,
        lin.groups,
        dtype=np.dtype(np.float64),
    )
    folded = (absorb_after if pair.direction == "after" else absorb_before)(lw, norm.affine)
    assert folded.weight is not None
    bias_dtype = lin.bias.dtype if lin.bias is not None else w.dtype
    new_w = torch.from_numpy(folded.weight).to(device=w.device, dtype=w.dtype)
    new_b = torch.from_numpy(folded.bias64).to(device=w.device, dtype=bias_dtype)
    if (
        not (torch.isfinite(new_w).all() and torch.isfinite(new_b).all())
        and torch.isfinite(w).all()
    ):
        return f"the folded weights overflow {str(w.dtype).replace('torch.', '')}"
    if clone:
        counter[0] += 1
        _make_private(gm, lin, counter[0])
    _write(gm, lin, new_w, new_b)
    _detach_norm(gm, pair)
    return None


def _unique(gm: fx.GraphModule, base: str) -> str:
    name, k = base, 1
    while hasattr(gm, name):
        k += 1
        name = f"{base}_{k}"
    return name


def _make_private(gm: fx.GraphModule, lin: _Linear, k: int) -> None:
    """Give this call of the op its own copy of the weights."""
    if lin.module is not None:
        copy_: Any = copy.deepcopy(lin.module)
        name = _unique(gm, f"{lin.owner.replace('.', '_')}_folded")
        gm.add_submodule(name, copy_)
        lin.node.target = name
        lin.module, lin.owner = copy_, name
        lin.weight, lin.bias = copy_.weight, copy_.bias
        return
    for arg in ("weight", "bias"):
        t = getattr(lin, arg)
        if t is None:
            continue
        name = _unique(gm, f"_normfuse_{arg}_{k}")
        gm.register_buffer(name, t.detach().clone())
        _set_arg(gm, lin, arg, name)
        setattr(lin, arg, getattr(gm, name))
    lin.owner = f"_normfuse_weight_{k}"


def _set_arg(gm: fx.GraphModule, lin: _Linear, arg: str, target: str) -> None:
    with gm.graph.inserting_before(lin.node):
        getter = gm.graph.get_attr(target)
    index = 1 if arg == "weight" else 2
    if arg in lin.node.kwargs:
        lin.node.update_kwarg(arg, getter)
    elif len(lin.node.args) > index:
        lin.node.update_arg(index, getter)
    else:
        lin.node.args = (*lin.node.args, getter)


def _write(gm: fx.GraphModule, lin: _Linear, w: torch.Tensor, b: torch.Tensor) -> None:
    with torch.no_grad():
        lin.weight.copy_(w)
        if lin.bias is not None:
            lin.bias.copy_(b)
            return
        if lin.module is not None:
            lin.module.bias = nn.Parameter(b, requires_grad=lin.weight.requires_grad)
            lin.bias = lin.module.bias
            return
        parent_name, _, _ = lin.owner.rpartition(".")
        parent = gm.get_submodule(parent_name) if parent_name else None
        if parent is not None and getattr(parent, "bias", None) is None:
            # beside its weight, as a module's bias would be ("conv1.bias")
            parent.register_parameter(
                "bias", nn.Parameter(b, requires_grad=lin.weight.requires_grad)
            )
            name = f"{parent_name}.bias"
        else:
            name = _unique(gm, "_normfuse_bias")
            gm.register_buffer(name, b)
        _set_arg(gm, lin, "bias", name)
        lin.bias = _get_attr(gm, name)


def _fold_graph(gm: fx.GraphModule, graph_mode: bool) -> tuple[list[Entry], set[str]]:
    """Fold all it can in ``gm``; returns the entries and the norm module targets folded away."""
    entries: dict[str, Entry] = {}
    folded_modules: set[str] = set()
    counter = [0]
    for _ in range(16):  # chains (BN after BN) fold one link per round
        norms = [n for n in (_as_norm(gm, node) for node in list(gm.graph.nodes)) if n is not None]
        pairs: list[_Pair] = []
        for norm in norms:
            entry = entries.setdefault(
                norm.erase[-1].name, Entry(norm.name, norm.op_type, "skipped")
            )
            if norm.affine is None:
                entry.reason, entry.fix = norm.reason, norm.fix
                continue
            found = _match(gm, norm)
            if isinstance(found, _Pair):
                pairs.append(found)
            else:
                entry.reason, entry.fix = found
        plan = _plan(gm, pairs, graph_mode)
        applied = 0
        done_owners: set[str] = set()
        for pair in plan.accepted:
            entry = entries[pair.norm.erase[-1].name]
            clone = id(pair) in plan.clones
            target = f"{pair.lin.label}"
            if clone or pair.lin.owner not in done_owners:
                reason = _fold_pair(gm, pair, clone, counter)
                if reason is not None:
                    entry.reason = reason
                    continue
                done_owners.add(pair.lin.owner)
            else:  # the op's weights already took this norm at another call
                _detach_norm(gm, pair)
            entry.status, entry.target, entry.direction = "applied", target, pair.direction
            entry.reason = entry.fix = None
            entry.warnings = list(pair.warnings)
            if clone:
                entry.warnings.append(
                    f"folded into a copy of it ({pair.lin.owner}): it is also called unfolded"
                )
            if pair.norm.module_target is not None:
                folded_modules.add(pair.norm.module_target)
            applied += 1
        for pair in pairs:
            if id(pair.norm) in plan.refused:
                entry = entries[pair.norm.erase[-1].name]
                entry.reason, entry.fix = plan.refused[id(pair.norm)]
        if not applied:
            break
    gm.graph.lint()
    return list(entries.values()), folded_modules


def _detach_norm(gm: fx.GraphModule, pair: _Pair) -> None:
    norm, lin = pair.norm, pair.lin
    if pair.direction == "after":
        norm.node.replace_all_uses_with(lin.node)
    else:
        lin.node.replace_input_with(norm.node, norm.input)
    for n in norm.erase:
        if not n.users:
            gm.graph.erase_node(n)


def _drop_unused(gm: fx.GraphModule, targets: set[str]) -> None:
    """Remove the folded norms' modules and tensors that nothing uses any more."""
    attrs = set()
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            attrs.add(str(node.target))
            gm.graph.erase_node(node)
    used = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for t in sorted(targets - used):
        gm.delete_submodule(t)
    referenced = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for target in sorted(attrs - referenced):
        parent_name, _, leaf = target.rpartition(".")
        try:
            parent = gm.get_submodule(parent_name)
        except AttributeError:
            continue
        parent._parameters.pop(leaf, None)
        parent._buffers.pop(leaf, None)
        prefix = f"{parent_name}." if parent_name else ""
        rest = {n for n, _ in parent.named_buffers(recurse=False)} | {
            n for n, _ in parent.named_parameters(recurse=False)
        }
        if (
            parent_name
            and rest <= {"num_batches_tracked"}
            and not any(r.startswith(prefix) for r in referenced)
        ):
            parent._buffers.pop("num_batches_tracked", None)
    gm.recompile()


def _sequential_graph(root: nn.Module) -> fx.GraphModule | None:
    """One graph of every plain ``nn.Sequential`` in ``root``: each chain of children, in order.

    Modules are named by their first qualified name, so a module inside several Sequentials
    shows as several calls of one target. Calls made outside Sequentials are not visible.
    """
    canonical = {id(m): n for n, m in root.named_modules()}
    seqs = [m for _, m in root.named_modules() if type(m) is nn.Sequential and len(m) >= 2]
    if not seqs:
        return None
    graph = fx.Graph()
    holder = nn.Module()
    xs = [graph.placeholder(f"in_{i}") for i in range(len(seqs))]
    ends = []
    for seq, x in zip(seqs, xs, strict=True):
        for child in seq.children():
            qual = canonical[id(child)]
            _install(holder, qual, child)
            x = graph.call_module(qual, (x,))
        ends.append(x)
    graph.output(tuple(ends))
    return fx.GraphModule(holder, graph)


def _install(holder: nn.Module, qual: str, module: nn.Module) -> None:
    parts = qual.split(".")
    parent = holder
    for p in parts[:-1]:
        if p not in parent._modules:
            parent._modules[p] = nn.Module()
        parent = parent._modules[p]  # type: ignore[assignment]
    parent._modules[parts[-1]] = module


def _compare(
    reference: Any, candidate: Any, inputs: Any, tolerances: Mapping[str, tuple[float, float]]
) -> list[OutputParity]:
    from normfuse.fx_swap import _call, _eval_mode

    with torch.no_grad(), _eval_mode(reference), _eval_mode(candidate):
        ref = _call(reference, inputs)
        out = _call(candidate, inputs)
    return compare_torch_outputs(ref, out, tolerances)


def compare_torch_outputs(
    ref: Any, out: Any, tolerances: Mapping[str, tuple[float, float]] = TORCH_TOLERANCES
) -> list[OutputParity]:
    """Compare the tensors of two (nested) outputs pairwise."""
    from normfuse.fx_swap import _tensors

    refs, outs = _tensors(ref), _tensors(out)
    if len(refs) != len(outs):
        raise ParityError(f"the models return {len(refs)} and {len(outs)} tensors")
    results = []
    for i, (r, t) in enumerate(zip(refs, outs, strict=True)):
        dtype = str(r.dtype).replace("torch.", "")
        atol, rtol = tolerances.get(dtype, (0.0, 0.0))
        res = compare_outputs(
            f"output {i}",
            r.detach().to(torch.float64).cpu().numpy(),
            t.detach().to(torch.float64).cpu().numpy(),
            atol,
            rtol,
        )
        res.dtype = dtype
        results.append(res)
    return results


def _example_args(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple | list):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _shape_prop(gm: fx.GraphModule, example_inputs: Any) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    args, kwargs = _example_args(example_inputs)
    if kwargs:
        placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        args = args + tuple(kwargs[p] for p in placeholders[len(args) :] if p in kwargs)
    from normfuse.fx_swap import _eval_mode

    with torch.no_grad(), _eval_mode(gm):
        ShapeProp(gm).propagate(*args)


def fold_torch(
    model: Any,
    *,
    example_inputs: Any = None,
    check: bool = True,
    inplace: bool = False,
    strict: bool = False,
    tolerances: Mapping[str, tuple[float, float]] = TORCH_TOLERANCES,
) -> tuple[Any, Report]:
    """Fold BatchNorm into neighbouring Conv/ConvTranspose/Linear ops of a PyTorch model.

    Args:
        model: ``nn.Module`` (the result keeps its class), ``torch.fx.GraphModule`` (a
            GraphModule again; modules called from several places can be cloned) or
            ``torch.export.ExportedProgram`` (exported again after folding).
        example_inputs: A tensor, tuple of positional inputs or dict of keyword inputs. Used to
            verify shapes (Linear + BatchNorm1d needs ``(N, C)`` activations) and to check the
            folded model against the original (``check``). ExportedPrograms carry their own.
        check: Compare outputs on ``example_inputs`` and raise :class:`ParityError` beyond
            ``tolerances`` (default: 1e-5 of the output's largest magnitude for float32).
        inplace: Change ``model`` itself (``nn.Module``/``GraphModule`` only).
        strict: Raise :class:`normfuse.api.StrictError` when some candidate was skipped.
        tolerances: ``{dtype: (atol, rtol)}`` for the check.

    Returns:
        ``(folded_model, report)``.
    """
    report = Report(action="fold", framework="torch")
    t0 = time.perf_counter()
    folded: Any
    reference: Any
    if isinstance(model, torch.export.ExportedProgram):
        folded, reference, example_inputs = _fold_exported(model, example_inputs, report)
    elif isinstance(model, nn.Module):
        reference = model
        folded = _fold_module(model, example_inputs, inplace, report)
        if inplace and check and example_inputs is not None:
            report.notes.append("inplace=True: the original is gone, parity not checked")
            check = False
    else:
        raise InputError(
            f"cannot fold a {type(model).__name__}",
            "pass an nn.Module, a torch.fx.GraphModule or a torch.export.ExportedProgram",
        )
    report.timings["fold"] = time.perf_counter() - t0
    if check and example_inputs is not None:
        t1 = time.perf_counter()
        from normfuse.fx_swap import _move

        inputs = _move(example_inputs, folded) if isinstance(folded, nn.Module) else example_inputs
        ref_mod = (
            reference.module() if isinstance(reference, torch.export.ExportedProgram) else reference
        )
        out_mod = folded.module() if isinstance(folded, torch.export.ExportedProgram) else folded
        outputs = _compare(ref_mod, out_mod, inputs, tolerances)
        report.parity = ParityResult(
            "PyTorch", outputs, notes=["reference: the original module, eval mode"]
        )
        report.timings["check"] = time.perf_counter() - t1
        from normfuse.api import raise_for_parity

        raise_for_parity(report)
    elif check:
        report.notes.append("no example_inputs: outputs not compared (pass example_inputs=...)")
    if strict:
        from normfuse.api import raise_for_strict

        raise_for_strict(report)
    return folded, report


def _fold_module(model: nn.Module, example_inputs: Any, inplace: bool, report: Report) -> nn.Module:
    root = model if inplace else copy.deepcopy(model)
    report.before = module_stats(root)
    if isinstance(root, fx.GraphModule):
        if example_inputs is not None:
            _shape_prop(root, example_inputs)
        entries, folded = _fold_graph(root, graph_mode=True)
        _drop_unused(root, folded)
        report.entries.extend(entries)
        report.after = module_stats(root)
        return root
    try:
        gm = _trace(root)
        traced = True
    except Exception as exc:  # data-dependent control flow, unsupported ops, ...
        text = str(exc).strip().splitlines()
        report.notes.append(
            f"torch.fx could not trace {type(root).__name__} ({text[0] if text else type(exc).__name__}); "
            "folded only pairs that nn.Sequential order proves adjacent"
        )
        seq = _sequential_graph(root)
        if seq is None:
            report.after = module_stats(root)
            return root
        gm, traced = seq, False
    if traced and example_inputs is not None:
        try:
            _shape_prop(gm, example_inputs)
        except Exception as exc:
            report.notes.append(
                f"shapes not propagated: {str(exc).splitlines()[0] if str(exc) else exc}"
            )
    entries, folded = _fold_graph(gm, graph_mode=False)
    names = {n: m for n, m in gm.named_modules()}
    counts: dict[int, int] = {}
    for _, m in root.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    identity: dict[int, nn.Module] = {}
    for target in folded:
        m = names[target]
        identity[id(m)] = nn.Identity()
    report.entries.extend(entries)
    root = replace_modules(root, identity)
    if not traced:
        for e in report.entries:
            if e.status == "applied":
                e.warnings.append("adjacent in nn.Sequential; calls from elsewhere are not visible")
    report.after = module_stats(root)
    return root


def _fold_exported(
    ep: torch.export.ExportedProgram, example_inputs: Any, report: Report
) -> tuple[torch.export.ExportedProgram, torch.export.ExportedProgram, Any]:
    with warnings.catch_warnings():  # torch's own pytree deprecation noise on deepcopy
        warnings.simplefilter("ignore", FutureWarning)
        gm: Any = copy.deepcopy(ep.module())  # its tensors are ep's own: fold a private copy
    report.before = _ep_stats(ep)
    if example_inputs is None and ep.example_inputs is not None:
        args, kwargs = ep.example_inputs
        example_inputs = kwargs if kwargs and not args else args
    if example_inputs is None:
        raise InputError(
            "the ExportedProgram carries no example inputs",
            "pass example_inputs=... (needed to export the folded program again)",
        )
    entries, folded = _fold_graph(gm, graph_mode=True)
    _drop_unused(gm, folded)
    report.entries.extend(entries)
    args, kwargs = _example_args(example_inputs)
    dynamic = _dynamic_shapes(ep, args, kwargs)
    try:
        new = torch.export.export(gm, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        if dynamic is None:
            raise
        report.notes.append(
            f"re-export with dynamic shapes failed ({str(exc).splitlines()[0]}); static shapes used"
        )
        new = torch.export.export(gm, args, kwargs, strict=False)
    report.after = _ep_stats(new)
    return new, ep, example_inputs


def _dynamic_shapes(
    ep: torch.export.ExportedProgram, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The dynamic dimensions of ``ep``'s user inputs, as ``Dim.DYNAMIC`` specs (or ``None``)."""
    from torch.export.graph_signature import InputKind

    user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    specs: list[dict[int, Any] | None] = []
    any_dynamic = False
    for name in user:
        val = nodes[name].meta.get("val") if name in nodes else None
        if not isinstance(val, torch.Tensor):
            specs.append(None)
            continue
        dims = {
            i: torch.export.Dim.DYNAMIC for i, d in enumerate(val.shape) if not isinstance(d, int)
        }
        any_dynamic |= bool(dims)
        specs.append(dims or None)
    if not any_dynamic or kwargs or len(specs) != len(args):
        return None
    return tuple(specs)


_BN_TARGETS = set(_FUNC_BN)


def _ep_stats(ep: torch.export.ExportedProgram) -> ModelStats:
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    return ModelStats(
        nodes=len(calls),
        norm_nodes=sum(1 for n in calls if n.target in _BN_TARGETS),
        batchnorm_nodes=sum(1 for n in calls if n.target in _BN_TARGETS),
        param_bytes=sum(t.numel() * t.element_size() for t in ep.state_dict.values()),
    )
