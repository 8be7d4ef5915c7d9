"""The ONNX side, on onnx_ir: reading and writing models, and every rewrite of their graphs.

* I/O: :mod:`~normfuse.onnxgraph.io` (load every form, atomic save),
  :mod:`~normfuse.onnxgraph.wire` (lazy self-backed load, streaming save),
  :mod:`~normfuse.onnxgraph.const` (constant resolution, lazy tensor reads).
* fold: :mod:`~normfuse.onnxgraph.fold` (decisions and report entries) over
  :mod:`~normfuse.onnxgraph.chains` (finding chains), :mod:`~normfuse.onnxgraph.linear` (reading
  linear ops), :mod:`~normfuse.onnxgraph.affines` (building affines) and
  :mod:`~normfuse.onnxgraph.writer` (applying them to the graph); shared graph helpers in
  :mod:`~normfuse.onnxgraph.graph`.
* the other rewrites: :mod:`~normfuse.onnxgraph.swap`, :mod:`~normfuse.onnxgraph.insert`,
  :mod:`~normfuse.onnxgraph.raise_norms` (with the matchers of
  :mod:`~normfuse.onnxgraph.patterns`), :mod:`~normfuse.onnxgraph.lower_norms`,
  :mod:`~normfuse.onnxgraph.downgrade`, :mod:`~normfuse.onnxgraph.recalibrate`; node writing
  in :mod:`~normfuse.onnxgraph.edit` and :mod:`~normfuse.onnxgraph.emit`.

The name says what it holds without shadowing the ``onnx`` package.

May import: onnx, onnx_ir, numpy and :mod:`normfuse.core`. Never torch, onnxruntime,
:mod:`normfuse.runtime`, :mod:`normfuse.torchmodel`, the API or the CLI.
"""
