"""The onnxruntime side: sessions and providers, inputs, parity runs, bisection, latency.

* :mod:`~normfuse.runtime.sessions`: provider choice (CUDA when it really loads), sessions at a
  given optimisation level, feeds checked against the session's inputs.
* :mod:`~normfuse.runtime.inputs`: seeded inputs from the graph's types, ``.npz`` inputs, the
  parsing of ``--shape`` and tolerance options.
* :mod:`~normfuse.runtime.parity`: two models run on the same inputs and judged by
  :mod:`normfuse.core.verdict`, float32/float64 against the models' own noise
  (:mod:`~normfuse.runtime.noise`), 16-bit ones upcast (:mod:`~normfuse.runtime.judge`);
  :mod:`~normfuse.runtime.bisect` names the first diverging tensor.
* :mod:`~normfuse.runtime.bench`: interleaved latency measurement.

May import: onnxruntime (lazily), onnx, numpy, :mod:`normfuse.core` and
:mod:`normfuse.onnxgraph`. Never torch, :mod:`normfuse.torchmodel`, the API or the CLI.
"""
