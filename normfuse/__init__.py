"""normfuse: exact folding, swapping and checking of normalization layers.

Public API::

    import normfuse
    folded, report = normfuse.fold("model.onnx")     # parity-checked on onnxruntime
    normfuse.save(folded, "model.folded.onnx")
    normfuse.inspect("model.onnx").render()          # what would fold, and why not
    normfuse.check("a.onnx", "b.onnx")               # parity of any two models

PyTorch (torch imported only when a torch model is passed)::

    folded, report = normfuse.fold(model.eval(), example_inputs=x)   # keeps the class
    gn_model, report = normfuse.swap(model, to="groupnorm")
    normfuse.recalibrate(model, loader, num_batches=100)
    normfuse.export(model.eval(), (x,), "model.onnx")                # fold + ORT parity

torch is optional: nothing here imports it.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from normfuse.core.errors import (
    InputError,
    NormfuseError,
    OutputExistsError,
    ParityError,
    ProviderError,
    StrictError,
)

if TYPE_CHECKING:  # the names below are imported on first use (the CLI starts faster)
    from normfuse.api import (
        check,
        export,
        fold,
        insert,
        inspect,
        load,
        lower_norms,
        raise_norms,
        recalibrate,
        save,
        swap,
    )
    from normfuse.core.algebra import Affine, LinearWeights, absorb_after, absorb_before
    from normfuse.core.report import Entry, OutputParity, ParityResult, Report

_LAZY = {
    **dict.fromkeys(
        (
            "check",
            "export",
            "fold",
            "insert",
            "inspect",
            "load",
            "lower_norms",
            "raise_norms",
            "recalibrate",
            "save",
            "swap",
        ),
        "normfuse.api",
    ),
    **dict.fromkeys(
        ("Affine", "LinearWeights", "absorb_after", "absorb_before"), "normfuse.core.algebra"
    ),
    **dict.fromkeys(("Entry", "OutputParity", "ParityResult", "Report"), "normfuse.core.report"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'normfuse' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Affine",
    "Entry",
    "InputError",
    "LinearWeights",
    "NormfuseError",
    "OutputExistsError",
    "OutputParity",
    "ParityError",
    "ParityResult",
    "ProviderError",
    "Report",
    "StrictError",
    "absorb_after",
    "absorb_before",
    "check",
    "export",
    "fold",
    "insert",
    "inspect",
    "load",
    "lower_norms",
    "raise_norms",
    "recalibrate",
    "save",
    "swap",
]

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
