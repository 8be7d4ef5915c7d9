"""The comparison's target verdicts (benchmarks/compare.py) say "missed" when a target is missed."""

from __future__ import annotations

from benchmarks.compare import targets


def _row(model: str, tool: str, **kw: object) -> dict:
    row = {
        "model": model,
        "tool": tool,
        "kind": "family",
        "size_mb": 0.1,
        "bn_before": 4,
        "bn_after": 0,
        "nodes_after": 10,
        "seconds": 0.01,
        "ratio": 5.0,
        "work_rss_mb": 1.0,
        "checker": True,
        "max_rel": 1e-7,
    }
    row.update(kw)
    return row


TOOLS = ["normfuse", "onnxsim", "ort-basic"]


def _rows(**normfuse: object) -> list[dict]:
    rows = []
    for model in ("a", "b"):
        rows.append(_row(model, "normfuse", **(normfuse if model == "b" else {})))
        rows += [_row(model, t, bn_after=2) for t in TOOLS[1:]]
    big = {"kind": "family", "size_mb": 100.0, "ratio": 0.4, "seconds": 0.4, "work_rss_mb": 30.0}
    rows.append(_row("big", "normfuse", **big))
    rows += [_row("big", t, **(big | {"seconds": 0.8, "ratio": 0.8})) for t in TOOLS[1:]]
    return rows


def test_all_met_except_the_all_model_median() -> None:
    lines = targets(_rows(), TOOLS, None)
    text = "\n".join(lines)
    assert "fewer on 2" in text
    assert sum("**missed**" in line for line in lines) == 1
    assert "all models" in next(line for line in lines if "**missed**" in line)


def test_more_bn_than_a_peer_is_missed() -> None:
    lines = targets(_rows(bn_after=3), TOOLS, None)
    coverage = next(line for line in lines if line.startswith("| coverage"))
    assert "more on 1/3" in coverage and "**missed**" in coverage


def test_fp32_error_above_bound_is_missed() -> None:
    lines = targets(_rows(max_rel=3e-5), TOOLS, None)
    exact = next(line for line in lines if line.startswith("| exactness"))
    assert "3.0e-05" in exact and "**missed**" in exact


def test_fp16_mean_over_seeds_decides() -> None:
    def run(n: float, s: float) -> dict:
        return {"fp32": {"normfuse": n, "onnxsim": s, "ort-basic": 1.0}}

    fp16 = {"tools": TOOLS, "results": {"x": [run(1e-4, 3e-4), run(3e-4, 2e-4)]}}
    line = next(line for line in targets(_rows(), TOOLS, fp16) if line.startswith("| fp16 error"))
    assert "lowest on 1/1" in line and line.endswith("| met |")
    fp16["results"]["x"].append(run(9e-4, 1e-4))
    line = next(line for line in targets(_rows(), TOOLS, fp16) if line.startswith("| fp16 error"))
    assert "not on x" in line and "**missed**" in line


def test_the_check_beyond_one_session_per_model_is_missed() -> None:
    from benchmarks.compare import api_targets

    def rows(check: float) -> list[dict]:
        phases = {"load": 0.1, "fold": 0.1, "check": check, "save": 0.1}
        return [
            _row("m", "normfuse"),
            _row("m", "cli-check", phases=phases | {"one session per model": 0.5}),
        ]

    def verdict(check: float) -> str:
        lines = api_targets(rows(check))
        return next(line for line in lines if "one session per model (build" in line)

    assert "0.80× median" in verdict(0.4) and verdict(0.4).endswith("| met |")
    assert "1.60×" in verdict(0.8) and "**missed**" in verdict(0.8)
