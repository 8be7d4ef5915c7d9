"""Folds through layout ops and what to say when a norm cannot fold for structural reasons.

* :func:`through_layout`: a BatchNorm1d whose input is a Linear's output flattened or reshaped
  to ``(M, C)`` (LeViT's ``bn(lin(x).flatten(0, 1)).reshape_as(x)``) folds into the Linear when
  the shapes (``ShapeProp`` on the example inputs: ``tensor_meta``; torch.export: ``val``) show
  that the Linear's last axis, its output features, lands on axis 1 of the norm's input: a
  row-major flatten/reshape/view that keeps the last axis as it is and merges the others.
  Reads of the Linear's output for its shape only (``reshape_as(y, lin_out)``) are no data use.
* :func:`structural_reason`: the reason for a norm that has no Conv/Linear beside it, naming what
  would be needed: branch merging (structural re-parameterisation) for a BN on a branch that is
  summed with others (RepVGG, MobileOne/FastViT identity branches, pre-activation blocks), or
  splitting per concatenated input for a BN after a channel concat (DenseNet, DPN).

Imports: torch, :mod:`normfuse.torchmodel.normsig`.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
from torch import fx

from normfuse.torchmodel.modules import hidden_behaviour
from normfuse.torchmodel.normsig import is_meta

__all__ = [
    "SHAPE_ONLY_SECOND",
    "attr_reads",
    "cat_dim",
    "is_cat",
    "passthrough",
    "permutation",
    "repeating_pad",
    "shape_of",
    "shape_only_use",
    "skip_passthrough",
    "structural_reason",
    "via_note",
    "view_input",
]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten

_VIEW_METHODS = frozenset({"flatten", "reshape", "view"})
_VIEW_FUNCS: set[Any] = {torch.flatten, torch.reshape}
for _name, _overloads in (
    ("flatten", ("using_ints",)),
    ("view", ("default",)),
    ("reshape", ("default",)),
    ("_unsafe_view", ("default",)),
):
    for _o in _overloads:
        _op = getattr(getattr(_aten, _name, None), _o, None)
        if _op is not None:
            _VIEW_FUNCS.add(_op)

SHAPE_ONLY_SECOND: set[Any] = {
    _aten.reshape_as.default,
    _aten.view_as.default,
    _aten.expand_as.default,
}
"""Ops whose second argument is read for its shape only."""
_SHAPE_ONLY_METHODS = frozenset({"reshape_as", "view_as", "expand_as"})

_CAT: set[Any] = {torch.cat, torch.concat, torch.concatenate, _aten.cat.default}
_ADD: set[Any] = {operator.add, operator.iadd, torch.add, _aten.add.Tensor, _aten.add_.Tensor}


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The static shape the example run gave ``node``, else ``None``."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    shape = getattr(val, "shape", None)
    if shape is None:
        shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):  # symbolic sizes
        return None


def shape_only_use(user: fx.Node, node: fx.Node) -> bool:
    """``user`` reads ``node`` for metadata only (rank, shape, dtype, or ``y.reshape_as(node)``)."""
    if is_meta(user):
        return True
    second = (user.op == "call_method" and user.target in _SHAPE_ONLY_METHODS) or (
        user.op == "call_function" and user.target in SHAPE_ONLY_SECOND
    )
    if second and len(user.args) == 2 and user.args[1] is node and user.args[0] is not node:
        return not user.kwargs
    return False


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCS


def view_input(node: Any) -> tuple[fx.Node, str] | None:
    """``(source, what)`` when ``node`` is a flatten/reshape/view of ``source``."""
    if not isinstance(node, fx.Node) or not _is_view(node) or not node.args:
        return None
    src = node.args[0]
    if not isinstance(src, fx.Node):
        return None
    what = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    return src, what.split(".")[0] or "view"


_PERMUTE_METHODS = frozenset({"transpose", "permute", "swapaxes", "swapdims"})
_PERMUTE_FUNCS: set[Any] = {
    torch.transpose,
    torch.permute,
    torch.swapaxes,
    _aten.transpose.int,
    _aten.permute.default,
}


def permutation(node: Any) -> list[int] | None:
    """For a transpose/permute call whose input shape is known: where each output axis comes
    from (``out[i] = in[perm[i]]``); ``None`` for other nodes."""
    if not isinstance(node, fx.Node) or not node.args or node.kwargs:
        return None
    if node.op == "call_method":
        if node.target not in _PERMUTE_METHODS:
            return None
    elif node.op != "call_function" or node.target not in _PERMUTE_FUNCS:
        return None
    shape = shape_of(node.args[0])
    dims = node.args[1:]
    if shape is None or not dims:
        return None
    rank = len(shape)
    if len(dims) == 1 and isinstance(dims[0], list | tuple):
        dims = tuple(dims[0])
    if not all(isinstance(d, int) and -rank <= d < rank for d in dims):
        return None
    dims = tuple(d % rank for d in dims)
    target = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if str(target).split(".")[0] == "permute":
        return list(dims) if sorted(dims) == list(range(rank)) else None
    if len(dims) != 2:
        return None
    perm = list(range(rank))
    perm[dims[0]], perm[dims[1]] = perm[dims[1]], perm[dims[0]]
    return perm


def lands_on_channels(src: fx.Node, view: fx.Node, channels: int) -> str | None:
    """``None`` when the view maps ``src``'s last axis (of ``channels``) to axis 1 of a rank-2
    result one to one, else the reason."""
    before, after = shape_of(src), shape_of(view)
    if before is None or after is None:
        return (
            "the shapes are unknown (pass example_inputs), so the channel axis cannot be followed"
        )
    if len(after) != 2:
        return f"the norm's input has shape {after}, not (M, C)"
    if not before or before[-1] != channels:
        return (
            f"the Linear's output has shape {before}: its last axis is not its {channels} features"
        )
    if after[1] != channels:
        return (
            f"the {view.name} turns the Linear's output {before} into {after}: its {channels} "
            f"features do not land on the norm's channel axis one to one"
        )
    m = 1
    for d in before[:-1]:
        m *= d
    if after[0] != m:
        return f"the {view.name} turns {before} into {after}, not into (M, {channels})"
    return None


_DROPOUT_FUNCS: set[Any] = {_aten.dropout.default, torch.dropout}


def attr_reads(gm: fx.GraphModule, owner: str) -> list[fx.Node]:
    """The ``get_attr`` nodes in use that read a tensor of module ``owner`` directly (forward()
    reading ``self.conv.weight`` beside calling ``self.conv``)."""
    return [
        n
        for n in gm.graph.nodes
        if n.op == "get_attr" and str(n.target).startswith(f"{owner}.") and n.users
    ]


def passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` returns its input unchanged: ``nn.Identity``, an eval-mode dropout module, or a
    dropout call with ``train=False``."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if hidden_behaviour(m) is not None:
            return False  # its hooks change what it returns
        if type(m) is torch.nn.Identity:
            return len(node.args) == 1 and not node.kwargs
        drop = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d)
        return type(m) in drop and not m.training and len(node.args) == 1 and not node.kwargs
    if node.op == "call_function" and node.target in _DROPOUT_FUNCS:
        train = node.kwargs.get("train", node.args[2] if len(node.args) > 2 else None)
        return train is False
    return False


_PAD_FUNCS: set[Any] = {_aten.pad.default, torch.nn.functional.pad}
_REPEATING_PAD_FUNCS: set[Any] = {
    getattr(_aten, f"{kind}_pad{d}d").default
    for kind in ("reflection", "replication")
    for d in (1, 2, 3)
}


def repeating_pad(node: fx.Node) -> bool:
    """A padding call that only repeats values (reflect, replicate, circular) and leaves the
    batch and channel axes alone: a per-channel affine before it is the same after it
    (``Conv2d(padding_mode="reflect")`` as torch.export writes it: ``aten.pad`` then a conv
    without padding)."""
    if node.op != "call_function":
        return False
    if node.target in _PAD_FUNCS:
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        if mode not in ("reflect", "replicate", "circular"):
            return False
        pad = node.kwargs.get("pad", node.args[1] if len(node.args) > 1 else None)
    elif node.target in _REPEATING_PAD_FUNCS:
        pad = node.kwargs.get("padding", node.args[1] if len(node.args) > 1 else None)
    else:
        return False
    shape = shape_of(node.args[0]) if node.args else None
    if shape is None or not isinstance(pad, list | tuple):
        return False
    if not all(isinstance(p, int) for p in pad) or len(pad) % 2:
        return False
    return len(pad) // 2 <= len(shape) - 2  # counted from the last axis


def via_note(node: fx.Node, describe: Any) -> str:
    """``node``, one of the ops a norm folds across (:func:`skip_passthrough`), for a warning."""
    return describe(node) + (
        " (repeats its values)" if repeating_pad(node) else " (its input in eval)"
    )


def skip_passthrough(
    gm: fx.GraphModule, node: fx.Node, *, pads: bool = False
) -> tuple[fx.Node, list[fx.Node]]:
    """The first node after ``node``'s chain of single-use pass-through ops (and, with
    ``pads``, padding calls that repeat values: :func:`repeating_pad`), and that chain."""
    via: list[fx.Node] = []
    while passthrough(gm, node) or (pads and repeating_pad(node)):
        users = [u for u in node.users if not is_meta(u)]
        if len(users) != 1:
            break
        via.append(node)
        node = users[0]
    return node, via


def is_cat(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in _CAT


def cat_dim(node: fx.Node) -> Any:
    if "dim" in node.kwargs:
        return node.kwargs["dim"]
    return node.args[1] if len(node.args) > 1 else 0


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("add", "add_", "__add__")
    return node.op == "call_function" and node.target in _ADD


def structural_reason(norm_input: Any, users: list[fx.Node], describe: Any) -> str | None:
    """What would be needed to fold a norm that has no Conv/Linear beside it, or ``None``."""
    if is_cat(norm_input):
        parts = norm_input.args[0] if norm_input.args else []
        n = len(parts) if isinstance(parts, list | tuple) else "several"
        dim = cat_dim(norm_input)
        shape = shape_of(norm_input)
        channel = dim == 1 or (shape is not None and isinstance(dim, int) and dim == 1 - len(shape))
        if channel:
            return (
                f"follows {describe(norm_input)} of {n} inputs: BN after a channel concat: would "
                "need splitting per concatenated input (each producer taking its slice of the "
                "affine), which is not done here"
            )
        return (
            f"follows {describe(norm_input)} of {n} inputs along dim {dim}, not the channels: "
            "no Conv/Linear to fold into"
        )
    if isinstance(norm_input, fx.Node):
        branches = [u for u in norm_input.users if not is_meta(u)]
        if len(branches) > 1 and any(_is_add(u) for u in users):
            return (
                f"is one of {len(branches)} branches on {describe(norm_input)} that are summed: "
                "needs branch merging (structural re-parameterisation, as RepVGG/MobileOne "
                "reparameterize) to fold into the parallel conv"
            )
    return None
