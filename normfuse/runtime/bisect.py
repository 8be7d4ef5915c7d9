"""The first tensor where two models disagree: every intermediate tensor the two models share by
name is exposed as an output, both run once, and the first in topological order that fails
the parity rule is named.

Imports: onnx, numpy, :mod:`normfuse.core` and the runtime package.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from normfuse.core.report import Divergence
from normfuse.core.verdict import compare_outputs
from normfuse.runtime.inputs import tolerance_for
from normfuse.runtime.sessions import (
    ModelSource,
    ort_module,
    run_session,
    session_options,
    with_options,
)

__all__ = ["expose_all", "find_divergence"]

logger = logging.getLogger(__name__)


def expose_all(source: ModelSource) -> tuple[bytes, Path | None, list[tuple[str, str, str]]]:
    """The model with every node output made a graph output, and those tensors in order."""
    folder = Path(source).parent if isinstance(source, (str, os.PathLike)) else None
    proto = (
        onnx.load(str(source), load_external_data=False)
        if folder is not None
        else onnx.load_from_string(source)  # type: ignore[arg-type]
    )
    existing = {o.name for o in proto.graph.output}
    order = []
    for i, node in enumerate(proto.graph.node):
        for out in node.output:
            if out and out not in existing:
                proto.graph.output.append(onnx.ValueInfoProto(name=out))
                existing.add(out)
                order.append((out, node.name or f"#{i}", node.op_type))
    return proto.SerializeToString(), folder, order


def find_divergence(
    reference: ModelSource,
    candidate: ModelSource,
    providers: list[str],
    opt_level: str,
    feeds: dict[str, np.ndarray],
    atol: Mapping[str, float] | float | None,
    rtol: Mapping[str, float] | float | None,
    defaults: Mapping[str, tuple[float, float]],
) -> Divergence | None:
    ref_bytes, ref_folder, order = expose_all(reference)
    cand_bytes, cand_folder, cand_order = expose_all(candidate)
    ort = ort_module()
    ref_sess = ort.InferenceSession(
        ref_bytes, session_options(opt_level, ref_folder), providers=with_options(providers)
    )
    cand_sess = ort.InferenceSession(
        cand_bytes, session_options(opt_level, cand_folder), providers=with_options(providers)
    )
    cand_names = {name for name, _, _ in cand_order} | {o.name for o in cand_sess.get_outputs()}
    ref_names = {o.name for o in ref_sess.get_outputs()}
    common = [(n, node, op) for n, node, op in order if n in cand_names and n in ref_names]
    for o in ref_sess.get_outputs():  # graph outputs come last in topological terms
        if o.name not in {n for n, _, _ in common} and o.name in cand_names:
            common.append((o.name, "(graph output)", ""))
    wanted = [n for n, _, _ in common]
    ref_vals = run_session(ref_sess, wanted, feeds, "reference")
    cand_vals = run_session(cand_sess, wanted, feeds, "rewritten")
    for (name, node, op), r, c in zip(common, ref_vals, cand_vals, strict=True):
        if not isinstance(r, np.ndarray) or not isinstance(c, np.ndarray):
            continue
        result = compare_outputs(
            name, r, c, tolerance_for(atol, name), tolerance_for(rtol, name), defaults
        )
        if not result.passed:
            return Divergence(
                tensor=name,
                node=node,
                op_type=op,
                max_abs=result.max_abs,
                max_rel=result.max_rel,
                compared=len(common),
            )
    return None
