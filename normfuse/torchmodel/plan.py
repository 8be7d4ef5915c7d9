"""The plan for a set of linear-norm pairs: one fold per op and round, modules called from
several places or with tied weights cloned (graphs) or refused (modules), and what an
``nn.Module`` cannot take by replacing modules.

Imports: torch, numpy and :mod:`normfuse.torchmodel.pairs`/:mod:`normfuse.torchmodel.layout`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from torch import fx

from normfuse.torchmodel.layout import attr_reads
from normfuse.torchmodel.pairs import Linear, Norm, Pair, call_args, describe_node

__all__ = ["Plan", "call_sites", "plan_pairs"]


def call_sites(gm: fx.GraphModule, owner: str, is_module: bool) -> list[fx.Node]:
    if is_module:
        return [n for n in gm.graph.nodes if n.op == "call_module" and n.target == owner]
    return [u for n in gm.graph.nodes if n.op == "get_attr" and n.target == owner for u in n.users]


def same_affine(a: Norm, b: Norm) -> bool:
    if a.module_target is not None and a.module_target == b.module_target:
        return True
    if a.affine is None or b.affine is None:
        return False
    return bool(
        np.array_equal(a.affine.scale, b.affine.scale)
        and np.array_equal(a.affine.shift, b.affine.shift)
    )


def weights_shared(gm: fx.GraphModule, lin: Linear) -> bool:
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
class Plan:
    accepted: list[Pair]
    clones: set[int]  # ids of pairs whose linear op gets a private copy
    refused: dict[int, tuple[str, str | None]]  # id(norm) -> reason


def plan_pairs(gm: fx.GraphModule, pairs: list[Pair], graph_mode: bool) -> Plan:
    refused: dict[int, tuple[str, str | None]] = {}
    fix = "fold torch.fx.symbolic_trace(model) instead: in a GraphModule normfuse can clone it"
    while True:
        live = [p for p in pairs if id(p.norm) not in refused]
        by_site: dict[fx.Node, list[Pair]] = {}
        for p in live:
            for lin in p.linears:
                by_site.setdefault(lin.node, []).append(p)
        clones: set[int] = set()
        changed = False
        for ps in by_site.values():  # one fold per op and round; the rest wait
            for p in ps[1:]:
                refused[id(p.norm)] = ("waits for another fold into the same op", None)
                changed = True
        live = [p for p in live if id(p.norm) not in refused]
        for p in (p for p in live if p.parts):  # a concat's convs: each called there alone
            why = next((w for lin in p.linears if (w := _alone(gm, lin, graph_mode))), None)
            if why is not None:
                refused[id(p.norm)] = (why, None)
                changed = True
        live = [p for p in live if id(p.norm) not in refused]
        owners: dict[str, list[Pair]] = {}
        for p in live:
            owners.setdefault(p.lin.owner, []).append(p)
        for owner, ps in owners.items():
            lin = ps[0].lin
            sites = call_sites(gm, owner, lin.module is not None)
            folded_sites = {p.lin.node for p in ps}
            consistent = (
                set(sites) == folded_sites
                and len({p.direction for p in ps}) == 1
                and all(same_affine(ps[0].norm, p.norm) for p in ps)
                and not weights_shared(gm, lin)
                and (lin.bias is None or lin.module is not None or bias_private(gm, lin))
                and not (graph_mode and lin.module is not None and attr_reads(gm, owner))
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
                reason = surgery_refusal(gm, p, live, refused)
                if reason is not None:
                    refused[id(p.norm)] = (reason, fix)
                    changed = True
        if not changed:
            accepted = [p for p in pairs if id(p.norm) not in refused]
            return Plan(accepted, clones, refused)


def _alone(gm: fx.GraphModule, lin: Linear, graph_mode: bool) -> str | None:
    """Why the fold of one of a concat's convs would reach beyond that call, or ``None``."""
    if lin.module is None and not graph_mode:
        return f"{lin.label} is a functional op in forward(): its weights are not a module's"
    sites = call_sites(gm, lin.owner, lin.module is not None)
    if sites != [lin.node]:
        return (
            f"{lin.label} is also called elsewhere: a split across the concat needs each conv alone"
        )
    if weights_shared(gm, lin) or not (
        lin.bias is None or lin.module is not None or bias_private(gm, lin)
    ):
        return f"{lin.label} shares its weights: a split across the concat needs each conv alone"
    if attr_reads(gm, lin.owner) and (graph_mode or lin.module is not None):
        return f"forward() also reads the weights of {lin.label}, which the fold would change"
    return None


def bias_private(gm: fx.GraphModule, lin: Linear) -> bool:
    bias_node = call_args(lin.node, ("input", "weight", "bias")).get("bias")
    if not isinstance(bias_node, fx.Node):
        return True
    return set(call_sites(gm, str(bias_node.target), False)) <= set(
        call_sites(gm, lin.owner, False)
    )


def surgery_refusal(
    gm: fx.GraphModule, p: Pair, live: list[Pair], refused: dict[int, tuple[str, str | None]]
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
            f"{', '.join(describe_node(n.args[0]) for n in missing)} where it does not fold"
        )
    for owner in (p.norm.module_target, p.lin.owner):  # both modules here
        read = attr_reads(gm, owner)
        if read:  # the fold rescales the linear's tensors and removes the norm's
            return (
                f"forward() also reads {', '.join(repr(str(n.target)) for n in read)} itself, "
                "which the fold would change"
            )
    return None
