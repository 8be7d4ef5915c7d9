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

import logging

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
from normfuse.core.errors import (
    InputError,
    NormfuseError,
    OutputExistsError,
    ParityError,
    ProviderError,
    StrictError,
)
from normfuse.core.report import Entry, OutputParity, ParityResult, Report

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
