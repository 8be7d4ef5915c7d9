"""The Python API's forms beside the command's own path, in one process (issue 20).

Usage::

    python benchmarks/api_inprocess.py [--families resnet,densenet,mobilenet_v2,efficientnet]
                                       [--repeat 7]

``benchmarks/compare.py --api`` runs each form in a process of its own, as a user's script
would; runs of 40-200 ms spread there by about ±10%. This runs the forms one after the other in
one process on the same files (the exports of ``compare.py``: both exporters and an fp16 export
of each family), ``--repeat`` rounds, and prints each form's median time over the command's
internal path (``io.load(lazy)`` → fold → ``io.save``), measured in the same run:

* ``load``: ``normfuse.load(path)`` → ``normfuse.fold(model, check=False)`` → ``normfuse.save``;
* ``proto``: ``normfuse.fold(ModelProto, check=False)`` → ModelProto (the call);
* ``bytes``: ``normfuse.fold(bytes, check=False)`` → bytes (the call).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="resnet,densenet,mobilenet_v2,efficientnet")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    import onnx

    import normfuse
    from benchmarks.compare import build_models
    from normfuse.core.report import Report
    from normfuse.onnxgraph import io as onnx_io
    from normfuse.onnxgraph.fold import FoldOptions, run_fold

    with tempfile.TemporaryDirectory(prefix="normfuse-api-") as tmp:
        work = Path(tmp)
        out = work / "out.onnx"
        items = build_models(work, False, args.families.split(","))

        def command(src: Path, proto: onnx.ModelProto, data: bytes) -> None:
            loaded = onnx_io.load(src, lazy=True)
            run_fold(loaded.model, Report(), FoldOptions(), None, loaded.take_proto())
            onnx_io.save(loaded.model, out, force=True)

        def load(src: Path, proto: onnx.ModelProto, data: bytes) -> None:
            folded, _ = normfuse.fold(normfuse.load(src), check=False)
            normfuse.save(folded, out, force=True)

        def from_proto(src: Path, proto: onnx.ModelProto, data: bytes) -> None:
            normfuse.fold(proto, check=False)

        def from_bytes(src: Path, proto: onnx.ModelProto, data: bytes) -> None:
            normfuse.fold(data, check=False)

        forms = {"command": command, "load": load, "proto": from_proto, "bytes": from_bytes}
        print(f"{'model':<28} {'command':>9}  " + "  ".join(f"{f:>14}" for f in list(forms)[1:]))
        for item in items:
            src = item["path"]
            proto, data = onnx.load(src), src.read_bytes()
            times: dict[str, list[float]] = {f: [] for f in forms}
            for _ in range(args.repeat):
                for name, form in forms.items():
                    gc.collect()
                    start = time.perf_counter()
                    form(src, proto, data)
                    times[name].append(time.perf_counter() - start)
            med = {f: statistics.median(t) for f, t in times.items()}
            cells = "  ".join(
                f"{med[f] * 1000:6.0f} ms {med[f] / med['command']:4.2f}x" for f in list(forms)[1:]
            )
            print(f"{item['model']:<28} {med['command'] * 1000:6.0f} ms  {cells}", flush=True)


if __name__ == "__main__":
    main()
