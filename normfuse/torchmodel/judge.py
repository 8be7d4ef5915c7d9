"""Judging a rewrite of a PyTorch model where its own error is visible: the rule of
:mod:`normfuse.core.verdict`, as :mod:`normfuse.runtime.judge` applies it on onnxruntime.

1. Both models run in float64 (parameters, buffers and float inputs upcast exactly). There the
   only difference an exact fold makes is one rounding of each folded weight to its dtype.
2. How much such a rounding moves the outputs is measured on this model: the folded model again,
   each folded tensor moved by an independent random rounding (a uniform fraction of one unit in
   the last place of its dtype), twice. The tolerance is ``max(floor, u, 3 * the larger effect)``
   with ``u`` the unit roundoff of the folded weights' dtype.
3. Besides the outputs, the output of every leaf module that both models call and that the fold
   left as it was (activations, pooling, unfolded layers; not the folded linear modules or the
   norms), and of every norm folded into the op before it (its output is that op's now), is
   judged the same way, per tensor and per channel: pooling and later layers can average a
   wrongly folded channel below the rounding noise of the outputs.
4. The difference at the models' own precision is reported beside it, not judged: a deep
   float32 network differs from itself by more than an exact fold changes it (summation order).

When the float64 run is not possible (a module that fixes its dtype, an ExportedProgram with
float32 constants), the outputs are judged at their own precision with the dtype's tolerance
and a note says so.

Imports: torch, numpy, :mod:`normfuse.core` and :mod:`normfuse.torchmodel.modules`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from normfuse.core.report import OutputParity
from normfuse.core.verdict import (
    CHANNEL_FLOOR_FACTOR,
    INNER_NOISE_FACTOR,
    NOISE_FACTOR,
    channel_failure,
    compare_outputs,
    noise_floor,
)
from normfuse.torchmodel.modules import call_module, eval_mode, is_norm, tensors_of

__all__ = ["judge_float64", "to_float64"]

logger = logging.getLogger(__name__)

_UNIT = {
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        **dict(module.named_parameters(remove_duplicate=False)),
        **dict(module.named_buffers(remove_duplicate=False)),
    }


def _changed(reference: nn.Module, candidate: nn.Module) -> dict[str, torch.dtype]:
    """The candidate's floating tensors that are new or differ from the reference's."""
    ref = _state(reference)
    out: dict[str, torch.dtype] = {}
    for name, t in _state(candidate).items():
        if not t.is_floating_point():
            continue
        old = ref.get(name)
        if old is None or old.shape != t.shape or old.dtype != t.dtype or not torch.equal(old, t):
            out[name] = t.dtype
    return out


def to_float64(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(torch.float64) if inputs.is_floating_point() else inputs
    if isinstance(inputs, Mapping):
        return {k: to_float64(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(to_float64(v) for v in inputs)
    return inputs


def _moved(candidate: nn.Module, changed: dict[str, torch.dtype], seed: int) -> nn.Module:
    """A float64 copy of ``candidate`` whose changed tensors carry an independent rounding."""
    gen = torch.Generator().manual_seed(seed)
    dtypes = dict(changed)
    moved = copy.deepcopy(candidate)
    with torch.no_grad():
        for name, t in _state(moved).items():
            dtype = dtypes.get(name)
            if dtype is None or not t.is_floating_point():
                continue
            low = t.detach().to(dtype)
            ulp = _ulp(low)
            noise = (torch.rand(t.shape, generator=gen, dtype=torch.float64) - 0.5) * ulp
            t.copy_(t.to(torch.float64) + noise)
    return moved


def _ulp(t: torch.Tensor) -> torch.Tensor:
    info = torch.finfo(t.dtype)
    mag = t.abs().to(torch.float64).clamp_min(info.tiny)
    exponent = torch.floor(torch.log2(mag))
    return torch.exp2(exponent - (info.bits - _exponent_bits(t.dtype) - 1))


def _exponent_bits(dtype: torch.dtype) -> int:
    return {torch.float16: 5, torch.bfloat16: 8, torch.float32: 8, torch.float64: 11}[dtype]


def _run64(
    module: nn.Module, inputs: Any, watch: set[str] | None = None
) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]]]:
    """The outputs, and the outputs of the watched modules per call."""
    seen: dict[str, list[np.ndarray]] = {}
    handles = []
    for name, sub in module.named_modules():
        if watch is not None and name in watch:

            def hook(_m: nn.Module, _a: Any, out: Any, name: str = name) -> None:
                if isinstance(out, torch.Tensor) and out.is_floating_point():
                    seen.setdefault(name, []).append(out.detach().to(torch.float64).cpu().numpy())

            handles.append(sub.register_forward_hook(hook))
    try:
        with torch.no_grad(), eval_mode(module):
            out = call_module(module, inputs)
    finally:
        for h in handles:
            h.remove()
    return [t.detach().to(torch.float64).cpu().numpy() for t in tensors_of(out)], seen


def _watchable(
    reference: nn.Module, candidate: nn.Module, changed: set[str], same: set[str]
) -> set[str]:
    """Leaf modules of both models that the fold left as they were (not those that return their
    input: identities, eval dropout), and the modules in ``same`` (norms folded into the op
    before them: their output is the folded op's)."""
    ref = dict(reference.named_modules())
    owners = {n.rpartition(".")[0] for n in changed}
    out = {n for n in same if n in ref and n in dict(candidate.named_modules())}
    for name, sub in candidate.named_modules():
        if not name or list(sub.children()) or name in owners or name not in ref:
            continue
        if is_norm(sub) or is_norm(ref[name]) or isinstance(sub, nn.Identity):
            continue
        if isinstance(sub, nn.modules.dropout._DropoutNd) and not sub.training:
            continue  # returns its input, watched where it comes from; a fold across it moves it
        if type(ref[name]) is not type(sub):
            continue
        out.add(name)
    return out


def judge_float64(
    reference: nn.Module,
    candidate: nn.Module,
    inputs: Any,
    floor: tuple[float, float],
    notes: list[str],
    seed: int = 0,
    same: set[str] | None = None,
) -> tuple[list[OutputParity], list[OutputParity], str] | None:
    """Judge ``candidate`` against ``reference`` in float64 (module docstring).

    Returns:
        One result per output tensor, the inner module outputs that failed, and a line saying
        how they were judged; ``None`` (with a note) when the models cannot run in float64.
    """
    changed = _changed(reference, candidate)
    # one rounding to the weights' dtype is the rewrite's resolution, also where it happened to
    # give back the stored value (an identity BN folds to the same float32 weight)
    dtypes = {t.dtype for t in _state(candidate).values() if t.is_floating_point()}
    unit = max((_UNIT.get(d, 0.0) for d in dtypes | set(changed.values())), default=0.0)
    # a single channel: at least CHANNEL_FLOOR_FACTOR x the weights' type floor, as on the ONNX
    # side (one re-rounding of a channel holding few values can move it by almost nothing)
    floors = [noise_floor(str(d).removeprefix("torch.")) for d in dtypes | set(changed.values())]
    channel = CHANNEL_FLOOR_FACTOR * max((f for f in floors if f is not None), default=0.0)
    try:
        ref64 = copy.deepcopy(reference).to(torch.float64)
        cand64 = copy.deepcopy(candidate).to(torch.float64)
        moved = [_moved(cand64, changed, seed + k) for k in range(2)]
        x = to_float64(inputs)
        watch = _watchable(ref64, cand64, set(changed), same or set())
        ref_out, ref_in = _run64(ref64, x, watch)
        cand_out, cand_in = _run64(cand64, x, watch)
        moved_runs = [_run64(m, x, watch) for m in moved]
        moved_out = [m[0] for m in moved_runs]
    except Exception as exc:  # dtype fixed inside forward, float32 constants, ...
        text = str(exc).strip().splitlines()
        notes.append(
            "the models do not run in float64 "
            f"({text[0][:120] if text else type(exc).__name__}); judged at their own precision"
        )
        return None
    if len(ref_out) != len(cand_out):
        return None
    results = []
    for i, (r, c) in enumerate(zip(ref_out, cand_out, strict=True)):
        effect = max(
            compare_outputs("", c, m[i], 0.0, 0.0).max_rel for m in moved_out if len(m) > i
        )
        rtol = max(floor[1], unit, NOISE_FACTOR * effect)
        res = compare_outputs(f"output {i}", r, c, floor[0], rtol)
        res.dtype = "float64"
        results.append(res)
    compared = 0
    inner: list[OutputParity] = []
    for name in sorted(watch):
        calls = zip(
            ref_in.get(name, []),
            cand_in.get(name, []),
            *[m[1].get(name, []) for m in moved_runs],
            strict=False,
        )
        counts = {len(ref_in.get(name, [])), len(cand_in.get(name, []))}
        counts |= {len(m[1].get(name, [])) for m in moved_runs}
        if len(counts) != 1:
            continue  # called a different number of times (a clone took some calls)
        for r, c, *ms in calls:
            if r.shape != c.shape or len(ms) < 2:
                continue
            compared += 1
            effect = max(compare_outputs("", c, m, 0.0, 0.0).max_rel for m in ms)
            rtol = max(floor[1], unit, INNER_NOISE_FACTOR * effect)
            res = compare_outputs(f"module '{name}' (inside the model)", r, c, floor[0], rtol)
            if not res.passed:
                res.dtype = "float64"
                inner.append(res)
                break
            found = channel_failure(name, r, c, (ms[0], ms[1]), max(floor[1], unit, channel))
            if found is not None:
                found.name = f"module '{name}' {found.name.split(' ', 2)[-1]} (inside the model)"
                inner.append(found)
                break
    label = (
        "judged in float64 with both models' tensors upcast exactly; tolerance "
        f"max(rtol {max(floor[1], unit):.3g}, {NOISE_FACTOR:g}x what re-rounding the "
        f"{len(changed)} folded tensor(s) moves each tensor); {compared} module output(s) "
        f"compared besides the outputs, each channel at least rtol {max(floor[1], unit, channel):.3g}"
    )
    return results, inner, label
