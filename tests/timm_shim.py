"""Import ``timm`` on the CPU torch of this project, or get ``None``.

timm imports torchvision. The torchvision wheel that matches torch 2.13 on PyPI registers
operators for a CUDA build and fails on import with ``operator torchvision::nms does not
exist``. The two modules that register them (``torchvision._meta_registrations`` and
``torchvision._autograd_registrations``) are not needed to build timm's models; putting empty
stand-ins for them in ``sys.modules`` before the first import lets timm load.

timm is not a dependency of normfuse: install it with a constraint that keeps torch as it is
(a bare ``pip install timm`` replaces the CPU torch by a CUDA build)::

    echo "torch==2.13.0" > /tmp/c.txt
    python -m pip install -c /tmp/c.txt timm
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__all__ = ["import_timm"]

_STUBS = ("torchvision._meta_registrations", "torchvision._autograd_registrations")
_cached: list[Any] = []


def import_timm() -> Any:
    """The ``timm`` module, or ``None`` when it is not installed or does not import."""
    if _cached:
        return _cached[0]
    timm: Any = None
    try:
        importlib.import_module("torch")
    except Exception:
        _cached.append(None)
        return None
    if "torchvision" not in sys.modules:
        for name in _STUBS:
            sys.modules.setdefault(name, types.ModuleType(name))
    try:
        timm = importlib.import_module("timm")
    except Exception:  # not installed, or torchvision still fails: the timm cases skip
        timm = None
    _cached.append(timm)
    return timm
