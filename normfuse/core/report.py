"""The report of a rewrite: one entry per candidate, model statistics, parity results.

Every structural match a rule finds becomes exactly one :class:`Entry`: ``applied`` (with the op
it was folded into) or ``skipped`` (with a reason a person understands and, where there is one,
the fix). The report renders as a rich table and serialises to a dict for ``--json``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, Literal

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

__all__ = ["Divergence", "Entry", "ModelStats", "OutputParity", "ParityResult", "Report"]

logger = logging.getLogger(__name__)

Status = Literal["applied", "foldable", "raisable", "skipped"]


@dataclasses.dataclass
class Entry:
    """What happened to one candidate node.

    Attributes:
        node: The node's name (or ``<op_type>:<output>`` when it has none).
        op_type: Its op type.
        status: ``applied`` or ``skipped``.
        graph: Where the node lives: ``""`` for the main graph, else a path such as
            ``If 'cond'/then_branch`` or ``function 'pkg.Block'``.
        target: The op it was folded into (``Conv 'conv1'``), when applied.
        direction: ``after`` (folded into the producer) or ``before`` (into the consumers).
        reason: Why it was skipped.
        fix: How the user could make it fold, when there is a way.
        warnings: Things worth knowing about an applied fold.
        exact: For swaps and insertions: whether the change keeps the model's function
            exactly (``None`` for folds, which always do).
    """

    node: str
    op_type: str
    status: Status
    graph: str = ""
    target: str | None = None
    direction: str | None = None
    reason: str | None = None
    fix: str | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    exact: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ModelStats:
    """Size figures of a model, all graphs and functions included."""

    nodes: int = 0
    norm_nodes: int = 0
    batchnorm_nodes: int = 0
    param_bytes: int = 0
    ops: dict[str, int] = dataclasses.field(default_factory=dict)

    def changed_ops(self, after: ModelStats, limit: int = 3) -> list[tuple[str, int, int]]:
        """The op types whose count differs in ``after``, norms first, at most ``limit``."""
        names = sorted(
            set(self.ops) | set(after.ops),
            key=lambda n: (
                n != "BatchNormalization",
                "Normalization" not in n,
                -abs(self.ops.get(n, 0) - after.ops.get(n, 0)),
                n,  # ties by name: the same line on every run (a set's order is not)
            ),
        )
        out = [(n, self.ops.get(n, 0), after.ops.get(n, 0)) for n in names]
        return [c for c in out if c[1] != c[2]][:limit]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class OutputParity:
    """The comparison of one output of two models.

    The pass rule, elementwise: ``|test - ref| <= atol + rtol * max|ref|``: the relative part is
    measured against the reference's largest magnitude, so zeros in the reference neither give
    NaN nor demand an exact match.

    Attributes:
        name: The output name.
        dtype: Its element type.
        max_abs: Largest absolute difference.
        max_rel: ``max_abs / max|ref|`` (``max_abs`` when the reference is all zeros).
        mean_abs: Mean absolute difference.
        cosine: Cosine similarity of the flattened outputs.
        nonfinite_mismatch: Elements where exactly one side is NaN/Inf, or they differ in kind.
        atol: Absolute tolerance used.
        rtol: Relative tolerance used (times ``max|ref|``).
        passed: Whether the output passed.
        min_rtol: The smallest ``rtol`` that would have passed with this ``atol`` (``None`` if
            no ``rtol`` would, e.g. for NaN mismatches).
    """

    name: str
    dtype: str
    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float
    nonfinite_mismatch: int
    atol: float
    rtol: float
    passed: bool
    min_rtol: float | None

    def line(self) -> str:
        """``PASSED | logits | max_abs=... max_rel=... (atol=..., rtol=...)``."""
        verdict = "PASSED" if self.passed else "FAILED"
        text = (
            f"{verdict} | {self.name} | max_abs={self.max_abs:.3g} max_rel={self.max_rel:.3g} "
            f"mean_abs={self.mean_abs:.3g} cos={self.cosine:.9f} "
            f"(atol={self.atol:g}, rtol={self.rtol:g})"
        )
        if self.nonfinite_mismatch:
            text += f" nan/inf mismatches={self.nonfinite_mismatch}"
        if not self.passed and self.min_rtol is not None:
            text += f"; would pass with rtol>={self.min_rtol:.3g}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Divergence:
    """The first tensor, in topological order, where two models disagree beyond tolerance."""

    tensor: str
    node: str
    op_type: str
    max_abs: float
    max_rel: float
    compared: int

    def line(self) -> str:
        """``first divergence: tensor 'x' from Conv 'conv3' (max_abs=..., max_rel=...)``."""
        source = f"{self.op_type} '{self.node}'" if self.op_type else self.node
        return (
            f"first divergence: tensor '{self.tensor}' from {source} "
            f"(max_abs={self.max_abs:.3g}, max_rel={self.max_rel:.3g}; {self.compared} tensors compared)"
        )


@dataclasses.dataclass
class ParityResult:
    """Parity of two models on the same inputs: one :class:`OutputParity` per output.

    Attributes:
        provider: ``CPU`` or ``CUDA``.
        outputs: The worst result per output over all batches.
        runs: Number of batches.
        seed: Seed of the generated inputs.
        notes: Facts about the run (IR lowered, batch dimension set to 1, ...).
        divergence: With bisect, the first intermediate tensor that differs.
        cross_check: With cross-check, the reference on CPU vs on CUDA, per output.
        informational: The rewrite was meant to change the function: differences are
            reported (``DIFFERS``), not failures.
        judgement: How pass/fail was decided when not at the models' own precision (16-bit
            models are judged with their tensors upcast to float32).
        runtime: Then, per output, the rewritten vs the original at their own precision
            (reported, not judged).
        noise: Then, per output, the original at its own precision vs its exact function.
    """

    provider: str
    outputs: list[OutputParity]
    runs: int = 1
    seed: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    divergence: Divergence | None = None
    cross_check: list[OutputParity] | None = None
    informational: bool = False
    judgement: str | None = None
    runtime: list[OutputParity] | None = None
    noise: list[OutputParity] | None = None

    def output_line(self, o: OutputParity) -> str:
        """One output's line; ``DIFFERS`` instead of ``FAILED`` when a change was intended."""
        line = o.line()
        if self.informational and not o.passed:
            line = "DIFFERS" + line[len("FAILED") :]
        return line

    def lines(self) -> list[str]:
        """The human-readable result, one line each."""
        out = [self.output_line(o) for o in self.outputs]
        if self.judgement is not None:
            out.append(f"  ({self.judgement})")
        for run, own in zip(self.runtime or [], self.noise or [], strict=False):
            out.append(
                f"  {run.name} at {run.dtype}: rewritten vs original max_rel={run.max_rel:.3g}; "
                f"the original's own {run.dtype} noise max_rel={own.max_rel:.3g} (reported, not judged)"
            )
        if self.divergence is not None:
            out.append(self.divergence.line())
        if self.cross_check is not None:
            out += [f"CPU vs CUDA, reference model: {o.line()}" for o in self.cross_check]
        return out

    @property
    def passed(self) -> bool:
        """True when every output passed."""
        return all(o.passed for o in self.outputs)

    @property
    def max_rel(self) -> float:
        """The worst relative error over all outputs."""
        return max((o.max_rel for o in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "provider": self.provider,
            "passed": self.passed,
            "runs": self.runs,
            "seed": self.seed,
            "notes": list(self.notes),
            "outputs": [o.to_dict() for o in self.outputs],
            "divergence": dataclasses.asdict(self.divergence) if self.divergence else None,
            "informational": self.informational,
            "judgement": self.judgement,
            "runtime": [o.to_dict() for o in self.runtime] if self.runtime is not None else None,
            "noise": [o.to_dict() for o in self.noise] if self.noise is not None else None,
            "cross_check": [o.to_dict() for o in self.cross_check]
            if self.cross_check is not None
            else None,
        }


@dataclasses.dataclass
class Report:
    """Everything one rewrite did and measured.

    Attributes:
        action: ``fold`` or ``inspect``.
        entries: One per candidate node.
        before: Model figures before the rewrite.
        after: Model figures after it.
        timings: Seconds per phase (``load``, ``fold``, ``save``, ``check``).
        parity: The parity check, when it ran.
        notes: Other facts worth a line (IR version lowered for the check, ...).
        framework: ``onnx`` or ``torch``: what the entries name (nodes or modules).
        undo: For in-place actions that can be undone (``recalibrate`` on PyTorch), what puts
            the model back as it was; see :meth:`restore`.
    """

    action: str = "fold"
    entries: list[Entry] = dataclasses.field(default_factory=list)
    before: ModelStats = dataclasses.field(default_factory=ModelStats)
    after: ModelStats = dataclasses.field(default_factory=ModelStats)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    parity: ParityResult | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    framework: str = "onnx"
    undo: Callable[[], None] | None = dataclasses.field(default=None, repr=False, compare=False)

    def restore(self) -> None:
        """Undo the in-place change this report describes (``with report: ...`` undoes on exit)."""
        if self.undo is None:
            raise ValueError(f"a {self.action} report has nothing to restore")
        self.undo()

    def __enter__(self) -> Report:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    @property
    def applied(self) -> list[Entry]:
        """The entries that were folded (or would fold, for ``inspect``)."""
        return [e for e in self.entries if e.status in ("applied", "foldable", "raisable")]

    @property
    def skipped(self) -> list[Entry]:
        """The entries that were left, with reasons."""
        return [e for e in self.entries if e.status == "skipped"]

    @property
    def warnings(self) -> list[str]:
        """All warnings, each prefixed with its node."""
        return [f"{e.node}: {w}" for e in self.entries for w in e.warnings]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole report."""
        return {
            "action": self.action,
            "applied": sum(e.status == "applied" for e in self.entries),
            "foldable": sum(e.status == "foldable" for e in self.entries),
            "raisable": sum(e.status == "raisable" for e in self.entries),
            "skipped": len(self.skipped),
            "entries": [e.to_dict() for e in self.entries],
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "timings": dict(self.timings),
            "parity": self.parity.to_dict() if self.parity else None,
            "notes": list(self.notes),
            "framework": self.framework,
        }

    def summary(self) -> str:
        """One line: what was done, the op counts before and after, the timings."""
        return self._summary_text().plain

    def __str__(self) -> str:
        """The summary line, warnings, notes and parity lines, as plain text (``print(report)``)."""
        lines = [self.summary()]
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"note: {n}" for n in self.notes]
        for e in self.skipped:
            where = f"{e.graph}/" if e.graph else ""
            why = f": {e.reason}" if e.reason else ""
            lines.append(f"skipped {where}{e.node} ({e.op_type}){why}")
        if self.parity is not None:
            lines.append(f"parity on {self.parity.provider}:")
            lines += self.parity.lines()
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"<Report {self.action}: {len(self.applied)} applied, {len(self.skipped)} skipped"
            + (
                ""
                if self.parity is None
                else f", parity {'passed' if self.parity.passed else 'FAILED'}"
            )
            + ">"
        )

    def render(self, console: Console | None = None, *, verbose: bool = False) -> None:
        """Print the report as tables.

        Args:
            console: Where to print; a new stdout console by default.
            verbose: List applied entries too (skipped ones are always listed).
        """
        console = console or Console()
        console.print(self._renderable(verbose=verbose, plain=not console.is_terminal))

    def _summary_text(self) -> Text:
        b, a = self.before, self.after
        summary = Text()
        verb = _VERBS.get(self.action, self.action)
        summary.append(f"{len(self.applied)} {verb}, {len(self.skipped)} skipped", style="bold")
        if self.action != "inspect":
            nodes, bn = (
                ("modules", "BatchNorm")
                if self.framework == "torch"
                else (
                    "nodes",
                    "BatchNormalization",
                )
            )
            changed = b.changed_ops(a)
            if changed and not (b.batchnorm_nodes != a.batchnorm_nodes and self.action == "fold"):
                counts = ", ".join(f"{op} {x} -> {y}" for op, x, y in changed)
            elif b.ops and not changed and b.batchnorm_nodes == a.batchnorm_nodes == 0:
                counts = "no op changed"
            else:
                counts = f"{bn} {b.batchnorm_nodes} -> {a.batchnorm_nodes}"
            summary.append(
                f" | {nodes} {b.nodes} -> {a.nodes}, {counts}, parameters "
                f"{_human_bytes(b.param_bytes)} -> {_human_bytes(a.param_bytes)}"
            )
        if self.timings:
            summary.append(
                " | " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in self.timings.items())
            )
        return summary

    def _renderable(self, *, verbose: bool, plain: bool = False) -> Group:
        """The entries (all with ``verbose`` or for inspect, else the skipped ones), then the
        summary, notes and parity. ``plain``: one line per entry instead of a table, so that
        piped output never wraps a name mid-word."""
        parts: list[Any] = []
        shown = self.entries if verbose or self.action == "inspect" else self.skipped
        if shown and plain:
            for e in shown:
                where = f"{e.graph}: " if e.graph else ""
                parts.append(Text(f"{e.status} {where}{e.node} ({e.op_type}): {_detail(e)}"))
        elif shown:
            table = Table(title=None, show_lines=False, expand=False)
            table.add_column("node", overflow="fold")
            table.add_column("op")
            table.add_column("status")
            table.add_column("into / reason", overflow="fold")
            for e in shown:
                style = "green" if e.status == "applied" else "yellow"
                where = f"{e.graph}: " if e.graph else ""
                table.add_row(where + e.node, e.op_type, Text(e.status, style=style), _detail(e))
            parts.append(table)
        summary = self._summary_text()
        parts.append(summary)
        for w in self.warnings:
            parts.append(Text(f"warning: {w}", style="yellow"))
        for n in self.notes:
            parts.append(Text(f"note: {n}", style="dim"))
        if self.parity is not None:
            parts.append(Text(f"parity on {self.parity.provider}:", style="bold"))
            for line in self.parity.lines():
                if line.startswith("  "):
                    style = "dim"
                elif line.startswith(("FAILED", "first divergence")):
                    style = "red"
                else:
                    style = "yellow" if line.startswith("DIFFERS") else "green"
                parts.append(Text(line, style=style))
            for n in self.parity.notes:
                parts.append(Text(f"note: {n}", style="dim"))
        return Group(*parts)


_VERBS = {
    "fold": "folded",
    "inspect": "foldable",
    "swap": "swapped",
    "insert": "inserted",
    "recalibrate": "recalibrated",
    "raise": "raised",
    "lower": "lowered",
    "export": "folded",
}


def _detail(e: Entry) -> str:
    if e.status in ("applied", "foldable", "raisable"):
        detail = f"{e.target} ({e.direction})" if e.direction else str(e.target)
        if e.exact is not None:
            detail += " — exact" if e.exact else " — changes the function"
        if e.warnings:
            detail += " — warning: " + "; ".join(e.warnings)
        return detail
    detail = e.reason or ""
    if e.fix:
        detail += f". Fix: {e.fix}"
    return detail


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
