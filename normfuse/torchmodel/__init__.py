"""The PyTorch side: rewrites of ``nn.Module``, ``torch.fx.GraphModule`` and
``torch.export.ExportedProgram`` (torch is imported only here).

* fold: :mod:`~normfuse.torchmodel.fold` (entry, check) over :mod:`~normfuse.torchmodel.pairs`
  (finding linear-norm pairs in an fx graph) and :mod:`~normfuse.torchmodel.surgery` (writing
  the folds).
* :mod:`~normfuse.torchmodel.swap`, :mod:`~normfuse.torchmodel.insert`,
  :mod:`~normfuse.torchmodel.recalibrate`; shared module helpers in
  :mod:`~normfuse.torchmodel.modules`; normfuse's own norm layers and the factories of each norm
  kind in :mod:`~normfuse.torchmodel.layers`.
* :mod:`~normfuse.torchmodel.export`: export to ONNX, fold, and prove parity against PyTorch;
  ``.pt2`` archives.

The name says what it holds without shadowing the ``torch`` package.

May import: torch, numpy, :mod:`normfuse.core`, :mod:`normfuse.onnxgraph` and
:mod:`normfuse.runtime` (export checks on onnxruntime). Never the API or the CLI.
"""
