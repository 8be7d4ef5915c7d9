"""``raise``: decomposed norms (:mod:`normfuse.onnxgraph.patterns`) become LayerNormalization-17,
RMSNormalization-23 and GroupNormalization-21 (or -18 plus Mul/Add). The opset is raised only up
to ``target_opset``, by onnx's version converter, and said in the report; otherwise the match is
skipped with the reason.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from normfuse.core.report import Entry
from normfuse.onnxgraph.const import ConstantResolver
from normfuse.onnxgraph.downgrade import convert_opset
from normfuse.onnxgraph.edit import Editor, all_names, model_resolver, np_dtype_of, opset_of
from normfuse.onnxgraph.emit import emit_groupnorm
from normfuse.onnxgraph.patterns import (
    Decomposed,
    channel_count,
    decomposed_label,
    find_decomposed,
    normalized_shape,
)
from normfuse.onnxgraph.shapes import InferredShapes

__all__ = ["raise_model"]

logger = logging.getLogger(__name__)


def raise_model(
    model: ir.Model, *, target_opset: int | None = None, dry_run: bool = False
) -> tuple[ir.Model, list[Entry], list[str]]:
    """Write fused ops for decomposed norms; returns ``(model, entries, notes)``.

    The model is changed in place unless its opset must be raised (then a converted copy is
    returned).
    """
    notes: list[str] = []
    opset = opset_of(model)
    # ranks the converter did not write (tf2onnx), for matching only: taken back at the end
    inferred = InferredShapes(model, opset)
    try:
        return _raise_model(model, target_opset, dry_run, notes)
    finally:
        inferred.restore(model)


def _raise_model(
    model: ir.Model, target_opset: int | None, dry_run: bool, notes: list[str]
) -> tuple[ir.Model, list[Entry], list[str]]:
    matches = find_decomposed(model)
    opset = opset_of(model)
    limit = max(opset, target_opset or opset)
    goals = [_goal(m, limit) for _, _, m in matches]
    want = max([g for g in goals if g is not None], default=opset)
    if dry_run:
        opset = max(opset, want)
    elif want > opset:
        model = convert_opset(model, want)
        notes.append(f"opset raised from {opset} to {want} (within --target-opset {target_opset})")
        opset = want
        matches = find_decomposed(model)
    names = all_names(model)
    consts = model_resolver(model)
    entries: list[Entry] = []
    replaced: dict[int, ir.Value] = {}  # outputs of earlier rewrites -> their new values
    for graph, label, dec in matches:
        entry = Entry(
            decomposed_label(dec),
            f"{dec.kind} (decomposed, {len(dec.nodes)} nodes)",
            "skipped",
            graph=label.rstrip("/"),
        )
        entries.append(entry)
        needs = dec.needs
        if needs > opset:
            entry.reason = f"{dec.op} needs opset {needs}; the model has {opset}"
            entry.fix = f"pass --target-opset {needs} to raise the model's opset"
            continue
        while id(dec.x) in replaced:  # a norm that reads an already raised one
            dec = dataclasses.replace(dec, x=replaced[id(dec.x)])
        reason = _raise_one(Editor(graph, names, opset), dec, consts, entry, dry_run, replaced)
        if reason is not None:
            entry.reason = reason
            continue
        entry.status = "raisable" if dry_run else "applied"
        entry.exact = True
    return model, entries, notes


def _goal(dec: Decomposed, limit: int) -> int | None:
    """The opset this match needs, if ``limit`` allows it."""
    return dec.needs if dec.needs <= limit else None


def _raise_one(
    ed: Editor,
    dec: Decomposed,
    consts: ConstantResolver,
    entry: Entry,
    dry_run: bool,
    replaced: dict[int, ir.Value],
) -> str | None:
    x = dec.x
    dtype = np_dtype_of(x)
    if dtype is None:
        return "its input type is unknown or not float/double/float16"
    anchor = dec.nodes[-1]
    if dec.kind == "GroupNorm":  # needs opset 21 (checked by the caller)
        c = channel_count(x)
        if dec.rank is None or c is None:
            return "the rank or channel count of its input is unknown"
        gamma = dec.scale if dec.scale is not None else np.ones(c)
        beta = dec.bias if dec.bias is not None else np.zeros(c)
        if dec.group_affine is not None:  # a per-group affine inside: per channel, then ours
            per = c // dec.groups
            gamma, beta = (
                np.repeat(dec.group_affine[0], per) * gamma,
                np.repeat(dec.group_affine[1], per) * gamma + beta,
            )
        entry.target = f"GroupNormalization-21 ({dec.groups} groups)"
        if dry_run:
            return None
        y = emit_groupnorm(ed, anchor, x, dec.groups, dec.eps, gamma, beta, dec.rank, dtype)
    else:
        normalized = normalized_shape(x, dec.axes)
        scale, bias = dec.scale, dec.bias
        for arr in (scale, bias):
            if arr is not None and normalized is None and arr.size != 1:
                return "the normalised dimensions are not static, so gamma/beta cannot be checked"
            if arr is not None and normalized is not None:
                try:
                    np.broadcast_to(arr, normalized)
                except ValueError:
                    return f"gamma/beta of shape {arr.shape} do not match the normalised shape {normalized}"
                lead = arr.ndim - len(normalized)
                if lead > 0 and any(s != 1 for s in arr.shape[:lead]):
                    return "gamma/beta vary along axes that are not normalised"
        if normalized is None:
            return "the normalised dimensions are not static"
        full = tuple(normalized)
        s = np.broadcast_to(scale if scale is not None else np.ones(()), full).astype(dtype)
        b = np.broadcast_to(bias, full).astype(dtype) if bias is not None else None
        entry.target = f"{dec.op} (axis {dec.axes[0]}, epsilon {dec.eps:g})"
        if dry_run:
            return None
        inputs = [x, ed.const(f"{decomposed_label(dec)}_scale", s)]
        if dec.kind == "LayerNorm" and b is not None:
            inputs.append(ed.const(f"{decomposed_label(dec)}_bias", b))
        y = ed.op(
            anchor,
            dec.op,
            inputs,
            {"axis": dec.axes[0], "epsilon": dec.eps},
            base=decomposed_label(dec),
        )
    ed.take_over(dec.out, y)
    replaced[id(dec.out)] = y
    ed.remove(reversed(dec.nodes))
    return None
