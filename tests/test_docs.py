"""Every example in README.md and docs/*.md runs as written.

Fenced blocks tagged ``console`` (``$ command`` lines, each followed by the output it shows),
``bash`` and ``python`` run in order, per file, in one temporary folder that holds a copy of
``models/`` (as a reader's checkout does); the working tree is never written. Shown output is
compared where it is deterministic: each shown line must match an output line, in order, with
measured figures (``2.83e-07``, ``41 ms``) free and ``...`` standing for the rest of the line.
A block that shows ``FAILED`` expects exit code 1. Blocks tagged ``text`` (or untagged) are
prose, not run; a ``bash`` block that sets up the checkout (``.ci/setup``) is what CI itself
runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"console", "bash", "python"}
_FENCE = re.compile(r"^```(\w*)\s*$")
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:e[-+]?\d+)?(?![\w.])")


def _blocks(path: Path) -> list[tuple[str, str, int]]:
    """(language, text, first line) of every fenced block."""
    out, lang, start, body = [], None, 0, []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        m = _FENCE.match(line.strip()) if line.lstrip().startswith("```") else None
        if m and lang is None:
            lang, start, body = m.group(1) or "text", i, []
        elif line.strip() == "```" and lang is not None:
            out.append((lang, "\n".join(body), start))
            lang = None
        elif lang is not None:
            body.append(line)
    return out


def _cases() -> list[object]:
    cases = []
    for path in FILES:
        blocks = [b for b in _blocks(path) if b[0] in RUN]
        if blocks:
            cases.append(pytest.param(path, blocks, id=str(path.relative_to(ROOT))))
    return cases


def _pattern(shown: str) -> re.Pattern[str]:
    """A shown output line as a pattern: figures free, ``...`` any text, ms timings free."""
    shown = re.sub(r"\s+#\s.*$", "", shown.rstrip())  # a comment added to the shown output
    shown = re.sub(r"\d+ ms\b", "\0", shown)
    out = []
    for part in shown.split("..."):
        pieces, last = [], 0
        for m in _NUMBER.finditer(part):
            pieces.append(re.escape(part[last : m.start()]))
            text = m.group(0)
            # counts (small integers) stay literal; measured figures are free
            pieces.append(re.escape(text) if re.fullmatch(r"\d{1,3}", text) else r"[-+0-9.e]+")
            last = m.end()
        pieces.append(re.escape(part[last:]))
        out.append("".join(pieces))
    return re.compile(".*".join(out).replace("\0", r"\d+ ms"))


def _env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(work)
    env["COLUMNS"] = "200"
    env.pop("NORMFUSE_THREADS", None)
    return env


def _check_shown(command: str, shown: list[str], result: subprocess.CompletedProcess) -> None:
    lines = (result.stdout + result.stderr).splitlines()
    k = 0
    for want in shown:
        if not want.strip():
            continue
        pattern = _pattern(want.strip())
        while k < len(lines) and not pattern.match(lines[k].strip()):
            k += 1
        assert k < len(lines), (
            f"`{command}` did not print a line like\n  {want}\nit printed:\n"
            + "\n".join(lines[-40:])
        )
        k += 1


def _run_console(text: str, work: Path, where: str) -> None:
    commands: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        elif commands:
            commands[-1][1].append(line)
    assert commands, f"{where}: a console block without a $ command"
    for command, shown in commands:
        cmd = re.sub(r"\s+#\s.*$", "", command)
        result = subprocess.run(
            ["bash", "-c", cmd],
            cwd=work,
            env=_env(work),
            capture_output=True,
            text=True,
            timeout=600,
        )
        want = 1 if any(s.startswith("FAILED") for s in shown) else 0
        assert result.returncode == want, (
            f"{where}: `{command}` exited {result.returncode}, expected {want}\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
        _check_shown(command, shown, result)


def _run(lang: str, text: str, work: Path, where: str) -> None:
    if lang == "console":
        _run_console(text, work, where)
        return
    if lang == "bash" and ".ci/setup" in text:
        return  # the set-up is CI's own command
    args = ["bash", "-e", "-c", text] if lang == "bash" else [sys.executable, "-c", text]
    result = subprocess.run(
        args, cwd=work, env=_env(work), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (
        f"{where}: the {lang} block failed (exit {result.returncode})\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )


@pytest.mark.parametrize(("path", "blocks"), _cases())
def test_examples_run_as_written(path, blocks, tmp_path):
    work = tmp_path / "checkout"
    work.mkdir()
    shutil.copytree(ROOT / "models", work / "models")
    for lang, text, line in blocks:
        _run(lang, text, work, f"{path.name}:{line}")


def test_every_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
