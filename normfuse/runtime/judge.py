"""Judging a rewrite where its own error is visible, against the models' own noise.

A deep network in 16-bit floats differs from its own exact function by more than an exact fold
changes it (fp16 ResNet-50: about 1e-2 relative), so comparing the original and the folded model
at 16-bit precision cannot tell an exact fold from a wrong one. The rule
(:mod:`normfuse.core.verdict`), for float16/bfloat16 models (:func:`judge_upcast`):

1. Both models run with every 16-bit tensor upcast exactly to float32
   (:mod:`normfuse.onnxgraph.upcast`), on the same inputs. There the only difference an exact
   rewrite makes is one rounding of each rewritten weight to its 16-bit type.
2. How much such a rounding moves each tensor is measured on this model: the rewritten model's
   session again (its rewritten weights overridable), those weights moved by an independent
   random rounding (a uniform fraction of one unit in the last place), twice with different
   seeds. The tolerance is ``max(floor, u, 3 * the larger effect)``, ``u`` the 16-bit type's
   unit roundoff (one rounding cannot be judged finer than that).
3. Every tensor the two models share by name with the same meaning (:func:`inner_tensors`) is
   judged, not only the outputs: at the output of a wrongly folded layer its error stands out,
   where pooling and later layers can average it below the rounding noise of the outputs (one
   channel 1% off in a ResNet block moves the logits less than rounding the folded weights
   does, but that block's output by 3x more).
4. The 16-bit runtime difference (original vs rewritten, both at 16 bits) is reported beside the
   original's own noise (the original at 16 bits vs its exact float32 function), not judged.

float32/float64 models cannot be run wider on onnxruntime (no float64 Conv): they are judged at
their own precision against their own noise (:mod:`normfuse.runtime.noise`).

Imports: numpy, onnx, onnx_ir, :mod:`normfuse.core`, :mod:`normfuse.onnxgraph` and the runtime
package.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from normfuse.core.errors import NormfuseError
from normfuse.core.report import OutputParity
from normfuse.core.verdict import (
    INNER_NOISE_FACTOR,
    NOISE_FACTOR,
    PairStats,
    channel_result,
    compare_outputs,
    pair_stats,
)
from normfuse.onnxgraph.protos import to_proto
from normfuse.onnxgraph.upcast import (
    LOW_PRECISION,
    low_precision_types,
    rounding_perturbation,
    upcast_model,
)
from normfuse.runtime.sessions import ModelSource, make_session, run_session

__all__ = [
    "UpcastJudgement",
    "judge_upcast",
    "low_precision",
]

logger = logging.getLogger(__name__)

_INLINE_LIMIT = 1 << 30
_UNIT = {
    ir.DataType.FLOAT16: 2.0**-11,
    ir.DataType.BFLOAT16: 2.0**-8,
}  # larger upcast models go to a temporary file with external data


def _load(source: ModelSource) -> ir.Model:
    if isinstance(source, (str, os.PathLike)):
        return ir.load(str(source))
    return ir.from_proto(onnx.load_from_string(bytes(source)))


def low_precision(source: ModelSource) -> bool:
    """Whether the model has float16/bfloat16 values (read without the tensor bytes)."""
    if isinstance(source, (str, os.PathLike)):
        proto = onnx.load(str(source), load_external_data=False)
    else:
        proto = onnx.load_from_string(bytes(source))
    return bool(low_precision_types(ir.from_proto(proto)))


@dataclasses.dataclass
class UpcastJudgement:
    """What the upcast runs found, per output name."""

    judged: dict[str, OutputParity]
    noise: dict[str, OutputParity]
    rounding: dict[str, float]
    weights: int
    label: str
    tensors: int = 0
    failed_tensors: list[OutputParity] = dataclasses.field(default_factory=list)


def _changed_low_weights(reference: ir.Model, candidate: ir.Model) -> dict[str, ir.DataType]:
    """The candidate's 16-bit initializers that are new or differ from the reference's."""
    ref = {
        name: v.const_value
        for g in reference.graphs()
        for name, v in g.initializers.items()
        if v.const_value is not None
    }
    changed: dict[str, ir.DataType] = {}
    for g in candidate.graphs():
        for name, v in g.initializers.items():
            t = v.const_value
            if t is None or t.dtype not in LOW_PRECISION:
                continue
            old = ref.get(name)
            if old is None or old.dtype != t.dtype or old.tobytes() != t.tobytes():
                changed[name] = t.dtype
    return changed


def _node_outputs(model: ir.Model) -> dict[str, ir.Value]:
    return {
        v.name: v
        for node in model.graph
        for v in node.outputs
        if v.name and v.dtype in (None, ir.DataType.FLOAT, ir.DataType.DOUBLE)
    }


def _expose(model: ir.Model, names: list[str]) -> None:
    values = _node_outputs(model)
    present = {v.name for v in model.graph.outputs}
    for name in names:
        if name not in present:
            model.graph.outputs.append(values[name])


def _serialize(model: ir.Model, folder: Path, name: str) -> ModelSource:
    size = sum(
        v.const_value.nbytes
        for g in model.graphs()
        for v in g.initializers.values()
        if v.const_value is not None
    )
    if size < _INLINE_LIMIT:
        # a tensor still in the model's external data file would be looked up beside the
        # working directory once the model is bytes: read it in (as the upcast ones are)
        for g in model.graphs():
            for v in g.initializers.values():
                if isinstance(v.const_value, ir.ExternalTensor):
                    v.const_value = ir.Tensor(v.const_value.numpy(), name=v.const_value.name)
        return to_proto(model).SerializeToString()
    path = folder / f"{name}.onnx"
    ir.save(model, path, external_data=f"{name}.onnx.data")
    return str(path)


def _rerounded(
    weights: Mapping[str, np.ndarray], dtypes: Mapping[str, ir.DataType], seed: int
) -> dict[str, np.ndarray]:
    """The upcast ``weights`` each moved by an independent rounding to its 16-bit type."""
    perturb = rounding_perturbation(dict(dtypes), np.random.default_rng(seed))
    moved = {}
    for name, values in weights.items():
        out = perturb(name, values)
        moved[name] = values if out is None else out
    return moved


def _rel(stats: PairStats) -> float:
    return stats.max_abs / stats.scale if stats.scale > 0 else stats.max_abs


def _upcast_failures(
    floats: Sequence[tuple[str, Any, Any]],
    apart: Mapping[str, PairStats | None],
    effect: Mapping[str, float],
    channel: Mapping[str, float],
    rounding: Mapping[str, float],
    floor: tuple[float, float],
    outputs: Collection[str],
) -> tuple[dict[str, OutputParity], bool]:
    """What fails in one upcast batch at the noise measured so far: the channels beyond
    ``INNER_NOISE_FACTOR`` x their re-rounding noise and the inner tensors beyond that factor x
    their tensor's, and whether an output is beyond ``NOISE_FACTOR`` x its own (outputs are
    judged for good over all batches by the caller; here only to tell whether another
    re-rounding is needed)."""
    failed: dict[str, OutputParity] = {}
    output_fails = False
    for name, r, c in floats:
        stats = apart[name]
        if stats is None:  # the shapes differ
            if name in outputs:
                output_fails = True
            else:
                result = compare_outputs(name, np.asarray(r), np.asarray(c), 0.0, 0.0)
                result.name = f"tensor '{name}' (inside the model)"
                failed[name] = result
            continue
        rtol = max(floor[1], INNER_NOISE_FACTOR * channel[name])
        hit = channel_result(name, str(np.asarray(c).dtype), stats.channel, rtol)
        if hit is not None:
            failed[name] = hit
            continue
        if name in outputs:
            rtol = max(floor[1], NOISE_FACTOR * max(rounding.get(name, 0.0), effect[name]))
        else:
            rtol = max(floor[1], INNER_NOISE_FACTOR * effect[name])
        if stats.nonfinite_mismatch == 0 and stats.max_abs <= floor[0] + rtol * stats.scale:
            continue
        if name in outputs:
            output_fails = True
            continue
        result = compare_outputs(name, np.asarray(r), np.asarray(c), floor[0], rtol)
        result.name = f"tensor '{name}' (inside the model)"
        failed[name] = result
    return failed, output_fails


def judge_upcast(
    reference: ModelSource,
    candidate: ModelSource,
    providers: list[str],
    opt_level: str,
    names: list[str],
    batches: Sequence[Mapping[str, np.ndarray]],
    native_reference: Sequence[Sequence[Any]],
    floor: tuple[float, float],
    seed: int,
    notes: list[str],
    inner: Sequence[str] | None = None,
) -> UpcastJudgement | None:
    """Judge ``candidate`` against ``reference`` with 16-bit tensors upcast (module docstring).

    Args:
        reference, candidate: The two models.
        providers, opt_level: As for the native runs.
        names: Output names.
        batches: The native inputs (16-bit inputs are upcast exactly).
        native_reference: The reference's native outputs per batch (for the noise figure).
        floor: ``(atol, rtol)`` below which no tolerance goes.
        seed: Seed of the rounding perturbation.
        notes: Where facts about the run go.
        inner: The inner tensors to compare (:func:`inner_tensors`); all shared names when
            ``None``.

    Returns:
        The judgement, or ``None`` (with a note) when the upcast models cannot run here.
    """
    ref_model, cand_model = _load(reference), _load(candidate)
    changed = _changed_low_weights(ref_model, cand_model)
    low_types = low_precision_types(ref_model) | low_precision_types(cand_model)
    kinds = sorted({t.name.lower() for t in low_types})
    upcast_model(ref_model)
    upcast_model(cand_model)
    # the rewritten weights become overridable: the one session also runs them re-rounded
    up_weights: dict[str, np.ndarray] = {}
    for name in changed:
        value = cand_model.graph.initializers.get(name)
        if value is not None and value.const_value is not None:
            up_weights[name] = value.const_value.numpy()
            if value not in cand_model.graph.inputs:
                cand_model.graph.inputs.append(value)
    if up_weights and cand_model.ir_version < 4:
        cand_model.ir_version = 4  # onnxruntime overrides no initializer before IR 4
    unit = max((_UNIT[t] for t in low_types | set(changed.values())), default=0.0)
    floor = (floor[0], max(floor[1], unit))
    outputs = set(names)
    cand_values = _node_outputs(cand_model)
    chosen = set(inner) if inner is not None else set(cand_values)
    shared = [
        n for n in _node_outputs(ref_model) if n in cand_values and n in chosen and n not in outputs
    ]
    for m in (ref_model, cand_model):
        _expose(m, shared)
    wanted = names + shared
    with tempfile.TemporaryDirectory(prefix="normfuse-upcast-") as tmp:
        try:
            sessions = [
                make_session(_serialize(m, Path(tmp), n), providers, opt_level, notes, f"the {n}")
                for m, n in ((ref_model, "upcast reference"), (cand_model, "upcast rewritten"))
            ]
        except NormfuseError as exc:
            notes.append(
                f"the models with {'/'.join(kinds)} upcast to float32 do not run here "
                f"({exc.message}); judged at their own precision"
            )
            return None
        del ref_model, cand_model
        judged: dict[str, OutputParity] = {}
        noise: dict[str, OutputParity] = {}
        rounding: dict[str, float] = {n: 0.0 for n in names}
        failed: dict[str, OutputParity] = {}
        runs = []
        for feeds, native in zip(batches, native_reference, strict=True):
            up_feeds = {
                k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in feeds.items()
            }
            ref_all = run_session(sessions[0], wanted, up_feeds, "upcast reference")
            cand_all = run_session(sessions[1], wanted, up_feeds, "upcast rewritten")
            floats = [
                (name, r, c)
                for name, r, c in zip(wanted, ref_all, cand_all, strict=True)
                if np.issubdtype(np.asarray(r).dtype, np.floating)
            ]
            apart = {
                name: pair_stats(r, c, cosine=False) if np.shape(r) == np.shape(c) else None
                for name, r, c in floats
            }
            effect = dict.fromkeys(apart, 0.0)
            channel = dict.fromkeys(apart, 0.0)
            # two independent re-roundings, the larger effect counts; the second runs only where
            # the first's leaves something failing (a larger tolerance passes all it passed)
            for k in range(2):
                moved = run_session(
                    sessions[1],
                    wanted,
                    {**up_feeds, **_rerounded(up_weights, changed, seed + 1000 * k)},
                    "re-rounded",
                )
                moved_by = dict(zip(wanted, moved, strict=True))
                del moved
                for name, _, c in floats:
                    m = moved_by[name]
                    if apart[name] is None or np.shape(c) != np.shape(m):
                        effect[name] = float("inf")
                        continue
                    shift = pair_stats(c, m, cosine=False)
                    effect[name] = max(effect[name], _rel(shift))
                    channel[name] = max(channel[name], shift.channel[0])
                del moved_by
                found, output_fails = _upcast_failures(
                    floats, apart, effect, channel, rounding, floor, outputs
                )
                if not found and not output_fails:
                    break
            for name in effect:
                rounding[name] = max(rounding.get(name, 0.0), effect[name])
            for name, result in found.items():
                failed.setdefault(name, result)
            k = len(names)
            runs.append((ref_all[:k], cand_all[:k], native))
            del ref_all, cand_all, floats, apart
        for ref_out, cand_out, native in runs:
            for name, r, c, n in zip(names, ref_out, cand_out, native, strict=True):
                rtol = max(floor[1], NOISE_FACTOR * rounding[name])
                result = compare_outputs(name, np.asarray(r), np.asarray(c), floor[0], rtol)
                if name not in judged or result.max_rel > judged[name].max_rel:
                    judged[name] = result
                own = compare_outputs(name, np.asarray(r), np.asarray(n, dtype=np.float32), 0, 0)
                if name not in noise or own.max_rel > noise[name].max_rel:
                    noise[name] = own
    label = (
        f"judged in float32 with the {'/'.join(kinds)} tensors of both models upcast exactly; "
        f"tolerance max(rtol {floor[1]:.3g}, {NOISE_FACTOR:g}x what re-rounding the "
        f"{len(changed)} rewritten {'/'.join(kinds)} weight(s) moves each tensor); "
        f"{len(shared)} inner tensors compared besides the outputs"
    )
    return UpcastJudgement(
        judged, noise, rounding, len(changed), label, len(shared), list(failed.values())
    )


# --- float32/float64 models: judged at their own precision, against their own noise ----------
