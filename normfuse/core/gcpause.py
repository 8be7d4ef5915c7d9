"""Pausing Python's cyclic garbage collector while a graph is built, walked or written.

Reading a 200k-node model creates millions of objects in one go; each allocation burst makes
the collector walk every live object again, and on such graphs the collector took a third of
the load and half of the save (issue 16, item 10). Nothing normfuse builds while paused is
garbage in a cycle worth collecting early, and the state is given back on leaving, also on an
error, so callers' settings are untouched. On leaving, what exists joins the oldest
generation (``gc.freeze()`` then ``gc.unfreeze()``): otherwise the first young collection after
the pause walks every object the block made (0.6 s after each load, fold and save of a
200k-node graph; the command paid it three times). Objects that the rewrite leaves behind in
cycles are collected by the next full collection.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["gc_paused"]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Disable the cyclic collector inside the block (nesting-safe), restore it after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            # what the block made joins the oldest generation (freeze, then unfreeze, moves
            # every tracked object there): the first young collection after the pause walked
            # all of it, 0.6 s after each load, fold and save of a 200k-node graph
            gc.freeze()
            gc.unfreeze()
            gc.enable()
