"""Writing folds into a ``torch.fx`` graph: new weights and biases (private copies where a weight
is shared), the norm call removed, unused attributes dropped; and the fallback for modules
torch.fx cannot trace (pairs that ``nn.Sequential`` order proves adjacent).

Imports: torch, :mod:`normfuse.core` and the torchmodel package.
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from normfuse.core.algebra import Affine, LinearWeights, absorb_after, absorb_before
from normfuse.core.report import Entry
from normfuse.torchmodel.affinechain import ChainFinder, erase_dead_constants
from normfuse.torchmodel.normsig import is_meta, tail_module
from normfuse.torchmodel.pairs import (
    Linear,
    Pair,
    as_norm,
    describe_node,
    get_attr,
    match_pair,
)
from normfuse.torchmodel.plan import plan_pairs

__all__ = [
    "detach_norm",
    "drop_unused",
    "fold_graph",
    "fold_pair",
    "install_module",
    "sequential_graph",
]

logger = logging.getLogger(__name__)


def fold_pair(gm: fx.GraphModule, pair: Pair, clone: bool, counter: list[int]) -> str | None:
    """Apply one fold; returns a reason when the result would not be finite."""
    norm = pair.norm
    assert norm.affine is not None
    affines = (
        norm.affine.split([lin.channels("out") for lin in pair.linears])
        if pair.parts
        else [norm.affine]
    )
    written = []
    for lin, affine in zip(pair.linears, affines, strict=True):
        new = _folded(lin, affine, pair.direction)
        if isinstance(new, str):
            return new
        written.append((lin, *new))
    for lin, new_w, new_b in written:
        if clone:
            counter[0] += 1
            _make_private(gm, lin, counter[0])
        _write(gm, lin, new_w, new_b)
    detach_norm(gm, pair)
    return None


def _folded(lin: Linear, affine: Affine, direction: str) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The weight and bias of ``lin`` with ``affine`` folded in, or why they would not be finite."""
    w = lin.weight.detach()
    lw = LinearWeights(
        lin.kind,
        w.to(torch.float64).cpu().numpy(),
        lin.bias.detach().to(torch.float64).cpu().numpy() if lin.bias is not None else None,
        lin.groups,
        dtype=np.dtype(np.float64),
    )
    folded = (absorb_after if direction == "after" else absorb_before)(lw, affine)
    assert folded.weight is not None
    bias_dtype = lin.bias.dtype if lin.bias is not None else w.dtype
    new_w = torch.from_numpy(folded.weight).to(device=w.device, dtype=w.dtype)
    new_b = torch.from_numpy(folded.bias64).to(device=w.device, dtype=bias_dtype)
    if (
        not (torch.isfinite(new_w).all() and torch.isfinite(new_b).all())
        and torch.isfinite(w).all()
    ):
        return f"the folded weights overflow {str(w.dtype).replace('torch.', '')}"
    return new_w, new_b


def _unique(gm: fx.GraphModule, base: str) -> str:
    name, k = base, 1
    while hasattr(gm, name):
        k += 1
        name = f"{base}_{k}"
    return name


def _make_private(gm: fx.GraphModule, lin: Linear, k: int) -> None:
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


def _set_arg(gm: fx.GraphModule, lin: Linear, arg: str, target: str) -> None:
    with gm.graph.inserting_before(lin.node):
        getter = gm.graph.get_attr(target)
    index = 1 if arg == "weight" else 2
    if arg in lin.node.kwargs:
        lin.node.update_kwarg(arg, getter)
    elif len(lin.node.args) > index:
        lin.node.update_arg(index, getter)
    else:
        lin.node.args = (*lin.node.args, getter)


def _write(gm: fx.GraphModule, lin: Linear, w: torch.Tensor, b: torch.Tensor) -> None:
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
        lin.bias = get_attr(gm, name)


def fold_graph(
    gm: fx.GraphModule, graph_mode: bool, veto: Callable[[Pair], str | None] | None = None
) -> tuple[list[Entry], set[str]]:
    """Fold all it can in ``gm``; returns the entries and the norm module targets folded away.
    ``veto(pair)`` may refuse a pair with a reason before it is planned."""
    entries: dict[str, Entry] = {}
    folded_modules: set[str] = set()
    counter = [0]
    constants: set[fx.Node] = set()
    for _ in range(16):  # chains (BN after BN) fold one link per round
        norms = [n for n in (as_norm(gm, node) for node in list(gm.graph.nodes)) if n is not None]
        pairs: list[Pair] = []
        for norm in norms:
            entry = entries.setdefault(
                norm.erase[-1].name, Entry(norm.name, norm.op_type, "skipped")
            )
            if norm.affine is None:
                entry.reason, entry.fix = norm.reason, norm.fix
                continue
            found = match_pair(gm, norm)
            if isinstance(found, Pair):
                pairs.append(found)
            else:
                entry.reason, entry.fix = found
        if graph_mode:  # frozen BN written out as mul/add: only a graph's code can change
            finder = ChainFinder(gm)
            for chain in finder.find():
                norm = chain.norm if isinstance(chain, Pair) else chain[0]
                entry = entries.setdefault(
                    norm.erase[-1].name, Entry(norm.name, norm.op_type, "skipped")
                )
                if isinstance(chain, Pair):
                    pairs.append(chain)
                else:
                    entry.reason, entry.fix = chain[1], None
            constants |= finder.constant_nodes
        if veto is not None:
            kept = []
            for pair in pairs:
                refusal = veto(pair)
                if refusal is None:
                    kept.append(pair)
                else:
                    entries[pair.norm.erase[-1].name].reason = refusal
            pairs = kept
        plan = plan_pairs(gm, pairs, graph_mode)
        applied = 0
        done_owners: set[str] = set()
        for pair in plan.accepted:
            entry = entries[pair.norm.erase[-1].name]
            clone = id(pair) in plan.clones
            target = f"{pair.lin.label}"
            if pair.parts:
                target = (
                    f"{', '.join(lin.label for lin in pair.linears)}, each its channels of "
                    f"{describe_node(pair.norm.input)}"
                )
            if clone or pair.lin.owner not in done_owners:
                reason = fold_pair(gm, pair, clone, counter)
                if reason is not None:
                    entry.reason = reason
                    continue
                done_owners.add(pair.lin.owner)
            else:  # the op's weights already took this norm at another call
                detach_norm(gm, pair)
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
    erase_dead_constants(gm, constants)
    gm.graph.lint()
    return list(entries.values()), folded_modules


#: Per graph: the folded norm nodes whose uses went to their input, and that input.
_REPLACED: weakref.WeakKeyDictionary[fx.Graph, dict[fx.Node, fx.Node]] = weakref.WeakKeyDictionary()


def detach_norm(gm: fx.GraphModule, pair: Pair) -> None:
    """Take the folded norm out of the graph; a norm whose forward runs its own modules after
    the norm (BatchNormAct2d: drop, act) leaves those, called where it was."""
    norm, lin = pair.norm, pair.lin
    if norm.tail and pair.direction == "after" and norm.module_target is not None:
        target = _unique(gm, norm.module_target.replace(".", "_") + "_tail")
        gm.add_submodule(target, tail_module(norm.tail))
        norm.node.target = target  # the old module is dropped or replaced by its caller
        return
    # the input as it is now: a norm folded before this one may have been its input (Linear ->
    # BN -> BN -> Linear: the first folds after into the first Linear, the second before into
    # the next one, and reads the first Linear's output now)
    redirects = _REPLACED.setdefault(gm.graph, {})
    source = norm.input
    while source in redirects:
        source = redirects[source]
    if pair.direction == "after":  # its input: the op's output, or a view of it
        norm.node.replace_all_uses_with(source)
        redirects[norm.node] = source
    elif lin.node.args and lin.node.args[0] is norm.node:
        lin.node.replace_input_with(norm.node, source)
        for user in list(norm.node.users):  # x.shape, x.dtype: the norm's input has the same
            if is_meta(user):
                user.replace_input_with(norm.node, source)
    else:  # through eval-mode dropout ops, the norm's only data use
        norm.node.replace_all_uses_with(source)
        redirects[norm.node] = source
    for n in norm.erase:
        if not n.users:
            gm.graph.erase_node(n)


def drop_unused(gm: fx.GraphModule, targets: set[str]) -> None:
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


def sequential_graph(root: nn.Module) -> fx.GraphModule | None:
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
            install_module(holder, qual, child)
            x = graph.call_module(qual, (x,))
        ends.append(x)
    graph.output(tuple(ends))
    return fx.GraphModule(holder, graph)


def install_module(holder: nn.Module, qual: str, module: nn.Module) -> None:
    parts = qual.split(".")
    parent = holder
    for p in parts[:-1]:
        if p not in parent._modules:
            parent._modules[p] = nn.Module()
        parent = parent._modules[p]  # type: ignore[assignment]
    parent._modules[parts[-1]] = module
