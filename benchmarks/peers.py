"""Run one folding tool on one model file, file in -> file out, in a fresh process.

Usage: ``python benchmarks/peers.py TOOL IN OUT [--external]`` (``--external``: the model has
external data; outputs are written with external data too, as a user must above 2 GiB). Prints one JSON line: ``seconds`` (load,
rewrite, save; imports excluded), ``peak_rss`` (VmHWM) and ``baseline_rss`` (bytes; the baseline is
taken after the tool's imports, so ``peak_rss - baseline_rss`` is what the work itself used),
or ``error``.

Tools (each as its users run it, without a parity check):

* ``floor``: ``onnx.load`` + ``onnx.save``, the I/O floor.
* ``normfuse``: ``normfuse`` load, fold, atomic save, the command's internal path (lazy load).
* ``api-path``: ``normfuse.fold(path, check=False)`` then ``normfuse.save`` (issue 20).
* ``api-load``: ``normfuse.load(path)`` -> ``normfuse.fold(model, check=False)`` -> ``save``.
* ``api-proto``: ``normfuse.fold(ModelProto, check=False)`` -> ModelProto, the call alone timed
  (the caller holds a ModelProto and gets one back; reading and writing it is not timed, its
  memory is counted).
* ``api-bytes``: ``normfuse.fold(bytes, check=False)`` -> bytes, the call alone timed.
* ``cli-check``: the command end to end with its default parity check, start-up included
  (a child process; ``phases`` gives its load/fold/check/save from ``--json``, and
  ``one session per model``: building and running one onnxruntime session for the original and
  one for the folded file, timed right after in this process: issue 20's bound on the check).
* ``onnxsim``: ``onnxsim.simplify`` (constant folding, shape inference, its BN fusion).
* ``onnxslim``: ``onnxslim.slim``.
* ``onnxoptimizer``: ``onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])``.
* ``onnxscript``: the onnxscript rewriter with its BatchNorm rules (conv, conv-transpose, gemm).
* ``ort-basic``: onnxruntime's offline optimizer at ``ORT_ENABLE_BASIC``, writing the optimized
  model.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from pathlib import Path

API_TOOLS = ["api-path", "api-load", "api-proto", "api-bytes", "cli-check"]
TOOLS = [
    "floor",
    "normfuse",
    *API_TOOLS,
    "onnxsim",
    "onnxslim",
    "onnxoptimizer",
    "onnxscript",
    "ort-basic",
]


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _one_session(path: str | Path) -> float:
    """Seconds to build an onnxruntime session from ``path`` (``ORT_DISABLE_ALL``, CPU, as the
    check's) and run it once on seeded inputs."""
    import onnxruntime as ort

    from normfuse.runtime.inputs import generate_inputs

    start = time.perf_counter()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    session.run(None, generate_inputs(session))
    return time.perf_counter() - start


def _rss_peak() -> int:
    """VmHWM: the peak RSS of this address space (ru_maxrss would carry the parent's across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux: ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _children_peak() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def _prepare(tool: str, external: bool):
    """Import the tool and return a function that folds IN into OUT.

    With ``external``, outputs are written with external data (``OUT.data``), as a user of each
    tool must for a model above 2 GiB.
    """
    import onnx

    def save(model, dst):
        if external:
            onnx.save(model, dst, save_as_external_data=True, location=f"{Path(dst).name}.data")
        else:
            onnx.save(model, dst)

    if tool == "floor":
        return lambda src, dst: save(onnx.load(src), dst)
    if tool == "normfuse":
        from normfuse.core.report import Report
        from normfuse.onnxgraph import io as onnx_io
        from normfuse.onnxgraph.fold import FoldOptions, run_fold

        def run(src, dst):
            loaded = onnx_io.load(src, lazy=True)  # as the CLI does
            run_fold(loaded.model, Report(), FoldOptions(), None, loaded.take_proto())
            onnx_io.save(loaded.model, dst, force=True)

        return run
    if tool.startswith("api-"):
        # imports excluded, as for every tool: the lazy package would import these on first use
        import normfuse
        import normfuse.api
        import normfuse.onnxgraph.fold
        import normfuse.onnxgraph.io

        def run(src, dst):
            if tool == "api-path":
                folded, _ = normfuse.fold(str(src), check=False)
                normfuse.save(folded, dst, force=True)
            elif tool == "api-load":
                folded, _ = normfuse.fold(normfuse.load(src), check=False)
                normfuse.save(folded, dst, force=True)
            elif external:  # in-memory forms hold the whole model: not for >2 GB files
                raise RuntimeError("in-memory forms are not run on external-data models")
            else:  # in memory in, in memory out: the fold call alone is timed
                data = onnx.load(src) if tool == "api-proto" else Path(src).read_bytes()
                _reset_peak()  # the call's own memory: the caller's input is the baseline
                baseline = _rss_now()
                start = time.perf_counter()
                folded, _ = normfuse.fold(data, check=False)
                seconds = time.perf_counter() - start
                peak = _rss_peak()
                if tool == "api-proto":
                    onnx.save(folded, dst)
                else:
                    Path(dst).write_bytes(folded)
                return {"seconds": seconds, "peak_rss": peak, "baseline_rss": baseline}
            return None

        return run
    if tool == "cli-check":
        import os
        import subprocess

        def run(src, dst):
            report = Path(dst).with_suffix(".json")
            cmd = [sys.executable, "-m", "normfuse", "fold", str(src), "-o", str(dst), "--force"]
            subprocess.run(
                [*cmd, "--json", str(report)], check=True, stdout=subprocess.DEVNULL, env=os.environ
            )
            timings = json.loads(report.read_text()).get("timings", {})
            report.unlink()
            peak = _children_peak()
            # issue 20's bound on the check: one session per model, built from its file and run
            timings["one session per model"] = _one_session(src) + _one_session(dst)
            return {"phases": timings, "child_peak_rss": peak}

        return run
    if tool == "onnxsim":
        import onnxsim

        def run(src, dst):
            model, _ = onnxsim.simplify(onnx.load(src))
            save(model, dst)

        return run
    if tool == "onnxslim":
        import onnxslim

        return lambda src, dst: save(onnxslim.slim(onnx.load(src)), dst)
    if tool == "onnxoptimizer":
        import onnxoptimizer

        return lambda src, dst: onnx.save(
            onnxoptimizer.optimize(onnx.load(src), ["fuse_bn_into_conv"]), dst
        )
    if tool == "onnxscript":
        import onnx_ir as ir
        from onnxscript import rewriter
        from onnxscript.rewriter.rules.common import (
            fuse_batchnorm_into_conv_rule,
            fuse_batchnorm_into_conv_transpose_rule,
            fuse_batchnorm_into_gemm_rule,
        )

        rules = [
            fuse_batchnorm_into_conv_rule,
            fuse_batchnorm_into_conv_transpose_rule,
            fuse_batchnorm_into_gemm_rule,
        ]

        def run(src, dst):
            model = ir.load(src)
            model = rewriter.rewrite(model, pattern_rewrite_rules=rules)
            ir.save(model, dst, external_data=f"{Path(dst).name}.data" if external else None)

        return run
    if tool == "ort-basic":
        import onnxruntime as ort

        ort.set_default_logger_severity(3)

        def run(src, dst):
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            so.optimized_model_filepath = str(dst)
            so.log_severity_level = 3
            if external:
                so.add_session_config_entry(
                    "session.optimized_model_external_initializers_file_name",
                    f"{Path(dst).name}.data",
                )
            ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])

        return run
    raise SystemExit(f"unknown tool {tool}; known: {', '.join(TOOLS)}")


def main() -> None:
    tool, src, dst = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    try:
        fn = _prepare(tool, "--external" in sys.argv[4:])
        baseline = _rss_now()
        start = time.perf_counter()
        extra = fn(src, dst)
        seconds = time.perf_counter() - start
        peak = _rss_peak()
        result = {"seconds": seconds, "peak_rss": peak, "baseline_rss": baseline}
        if isinstance(extra, dict) and "phases" in extra:  # cli-check: the child's figures
            result["phases"] = extra["phases"]
            result["peak_rss"], result["baseline_rss"] = extra["child_peak_rss"], 0
        elif isinstance(extra, dict):  # in-memory forms: the call alone
            result.update(extra)
        print(json.dumps(result))
    except Exception as exc:  # a peer failing is a result, not a crash of the benchmark
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        print(json.dumps({"error": last[:300]}))


if __name__ == "__main__":
    main()
