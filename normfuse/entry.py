"""The ``normfuse`` command's entry point: keeps sympy out of the start-up path.

onnx_ir imports sympy when it is imported (for symbolic dimensions), about half of the
command's start-up on a quiet machine, while no fold, check or rewrite of a model with plain
named dimensions touches it. Before the command line is imported, ``sympy`` is registered as a
module that imports the real sympy on first real use (an attribute other than the five
functions onnx_ir only stores at import, or a submodule); from then on it is the real module.
Library users (``import normfuse``) get ordinary imports: only the command does this.

Imports: nothing of normfuse before the command line.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import Any

__all__ = ["main"]

#: sympy functions onnx_ir only stores in a table when it is imported.
_STORED_ONLY = frozenset({"Max", "Min", "floor", "sqrt", "Mod"})


class _Deferred:
    """A sympy function not looked up yet: looked up, and called, when called."""

    def __init__(self, module: _LazySympy, name: str) -> None:
        self._module = module
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._module.load(), self._name)(*args, **kwargs)


class _LazySympy(types.ModuleType):
    def load(self) -> types.ModuleType:
        real = sys.modules.get("sympy")
        if real is self or real is None:
            del sys.modules["sympy"]
            try:
                real = importlib.import_module("sympy")
            except BaseException:
                sys.modules["sympy"] = self
                raise
        self.__dict__.update({k: v for k, v in real.__dict__.items() if k != "__name__"})
        return real

    def __getattr__(self, name: str) -> Any:
        if name in _STORED_ONLY and "__path__" not in self.__dict__:
            return _Deferred(self, name)
        return getattr(self.load(), name)


def defer_sympy() -> None:
    """Register the deferred sympy, unless sympy is imported already or not installed."""
    if "sympy" in sys.modules or importlib.util.find_spec("sympy") is None:
        return
    sys.modules["sympy"] = _LazySympy("sympy")


def main() -> None:
    """Run the command line, then leave without tearing down what it built.

    Freeing a 200k-node graph object by object takes seconds (a fifth of a big fold) after the
    output is written and the result printed; the command has closed its files and removed its
    temporary ones by then, so the process ends at once (``os._exit``) with the command's exit
    status, once standard output, standard error and logging are flushed. An unexpected
    exception still propagates as usual.
    """
    defer_sympy()
    from normfuse.cli import main as cli_main
    from normfuse.core.gcpause import promote_on_leaving

    promote_on_leaving(True)  # one rewrite, then the process ends: no young walks of the graph

    try:
        cli_main()
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:  # a message: Python would print it and exit with 1
            print(exc.code, file=sys.stderr)
            code = 1
    _leave(code)


def _leave(code: int) -> None:
    import logging

    try:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
        code = code or 1
    os._exit(code)
