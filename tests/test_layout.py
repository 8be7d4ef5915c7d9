"""The package layout stays true: imports run one way, no cycles, no private names across modules.

    core  <-  onnxgraph  <-  runtime  <-  torchmodel  <-  api  <-  cli

A module may import its own package and the packages to its left; the core imports no other
normfuse package and neither onnx, onnx_ir, onnxruntime nor torch; the ONNX side never imports
torch or onnxruntime; nothing below the API imports the API, the CLI or the top-level package.
Every import counts, also those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "normfuse"

ORDER = ["core", "onnxgraph", "runtime", "torchmodel", "api", "cli", "entry"]
FORBIDDEN_THIRD_PARTY = {
    "core": {"onnx", "onnx_ir", "onnxruntime", "torch", "onnxscript"},
    "onnxgraph": {"torch", "onnxruntime"},
    "runtime": {"torch"},
}
MAX_LINES = 800


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # "normfuse" itself has no layer


def _imports(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [a.name for a in node.names]
            out.append((base, names, node.lineno))
            # ``from normfuse.core import algebra`` imports the module normfuse.core.algebra
            for name in names:
                if f"{base}.{name}" in MODULES:
                    out.append((f"{base}.{name}", [], node.lineno))
    return out


def _normfuse_target(name: str) -> str | None:
    """The normfuse module an import names (a package, a module, or a name inside one)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_every_subpackage_says_what_it_holds_and_may_import():
    for layer in ORDER[:4]:
        init = PACKAGE / layer / "__init__.py"
        assert init.exists(), f"normfuse/{layer} has no __init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "May import" in doc, f"normfuse/{layer}/__init__.py: say what it may import"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_one_way(module):
    layer = _layer(module)
    if layer is None or module == "normfuse.__main__":
        return  # the top-level package re-exports the API; __main__ runs the CLI
    rank = ORDER.index(layer)
    wrong = []
    for target, names, line in _imports(MODULES[module], module):
        top = target.split(".")[0]
        if top in FORBIDDEN_THIRD_PARTY.get(layer, ()):
            wrong.append(f"line {line}: {layer} must not import {top}")
        if top != "normfuse":
            continue
        dest = _normfuse_target(target)
        dest_layer = _layer(dest) if dest else None
        if dest_layer is None:  # the top-level package re-exports the API: the API's rank
            if rank <= ORDER.index("api"):
                wrong.append(f"line {line}: imports the top-level package normfuse")
        elif ORDER.index(dest_layer) > rank:
            wrong.append(f"line {line}: {layer} imports {dest} ({dest_layer} is above it)")
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        if private and dest != module:
            wrong.append(f"line {line}: private name(s) {private} from {dest}")
    assert not wrong, f"{module}:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        deps = set()
        for target, _, _ in _imports(path, module):
            dest = _normfuse_target(target) if target.startswith("normfuse") else None
            if dest and dest != module and dest != "normfuse":
                deps.add(dest)
        graph[module] = deps
    # package __init__ modules that only document import nothing; follow module edges
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state and module != "normfuse":
            visit(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_readable(module):
    path = MODULES[module]
    text = path.read_text()
    lines = text.count("\n")
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert doc, f"{module} has no docstring"
    assert lines <= MAX_LINES or "Size:" in doc, (
        f"{module} has {lines} lines; split it or say why in its docstring ('Size: ...')"
    )


def test_public_api_is_unchanged():
    import normfuse

    for name in (
        "fold",
        "check",
        "swap",
        "insert",
        "inspect",
        "raise_norms",
        "lower_norms",
        "recalibrate",
        "export",
        "load",
        "save",
        "Report",
        "Entry",
        "NormfuseError",
        "InputError",
        "OutputExistsError",
        "ParityError",
        "ProviderError",
        "StrictError",
        "Affine",
    ):
        assert name in normfuse.__all__ and hasattr(normfuse, name), name
