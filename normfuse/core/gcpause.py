"""Pausing Python's cyclic garbage collector while a graph is built, walked or written.

Reading a 200k-node model creates millions of objects in one go; each allocation burst makes
the collector walk every live object again, and on such graphs the collector took a third of
the load and half of the save (issue 16, item 10). Nothing normfuse builds while paused is
garbage in a cycle worth collecting early, and the state is given back on leaving, also on an
error, so callers' settings are untouched. Objects that the rewrite leaves behind in cycles are
collected by the next automatic collection after the pause, which walks every object the block
made (0.6 s after each load, fold and save of a 200k-node graph). The command, whose process
ends after one rewrite, skips that walk: on leaving a pause, what exists joins the oldest
generation (``gc.freeze()`` then ``gc.unfreeze()``; :func:`promote_on_leaving`).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["gc_paused", "promote_on_leaving"]

#: Set by the command (:func:`promote_on_leaving`), whose process ends after one run.
_PROMOTE = False


def promote_on_leaving(enabled: bool) -> None:
    """Whether leaving a pause hands every object to the oldest generation (see the module's
    docstring): for a process that ends after one rewrite (the command), not for a library
    caller, whose discarded graphs would then wait for a full collection that seldom comes
    (12 folds of a 200k-node graph in a loop: 4.8 GB instead of 2.7 GB)."""
    global _PROMOTE
    _PROMOTE = enabled


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Disable the cyclic collector inside the block (nesting-safe), restore it after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            if _PROMOTE:  # freeze, then unfreeze, moves every tracked object to the oldest
                gc.freeze()  # generation: the next young collection does not walk what the
                gc.unfreeze()  # block made (0.6 s after each load, fold and save of 200k nodes)
            gc.enable()
