"""The frontend-free core: what both the ONNX and the PyTorch side build on.

* :mod:`~normfuse.core.algebra`: the per-channel :class:`Affine`, linear-op weight geometry and
  the two exact moves (``absorb_after``, ``absorb_before``), float64 inside, one rounding.
* :mod:`~normfuse.core.norms`: the table of norm kinds ``swap`` and ``insert`` write.
* :mod:`~normfuse.core.report`: report entries, model statistics, parity results.
* :mod:`~normfuse.core.verdict`: the parity rule (tolerances, ``compare_outputs``) and what a
  failure or a strict skip raises.
* :mod:`~normfuse.core.errors`: the errors normfuse raises on purpose.
* :mod:`~normfuse.core.gcpause`: the garbage collector paused while big graphs are built.

May import: numpy, ml_dtypes, rich (reports). Never onnx_ir, onnxruntime, torch, nor any other
normfuse package.
"""
