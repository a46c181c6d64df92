"""Memory a command is done with, left to the end of the process when that end is os._exit.

The console script ends the process itself (`entry._end`), which gives its memory back
whole. A stacked update is done with a few tuples per entry of the tree (its scan, the
stack's indexes and their union) before it commits and publishes: freeing them one by one
took 25-35 ms of an update of the 81,000-entry bench tree, and the cyclic collector's next
pass would walk them first. In the console script the first such leftovers are kept
instead, out of the collector's sight (`gc.freeze`): those of an `inject` or a `run`, or of
the first image of a batch to end (the others' are freed as usual, so a batch holds at
most one update's leftovers). The freeze takes every object alive then, other threads'
too: garbage in cycles among them is left to the exit as well. Anywhere else (the library
in a longer-lived process) nothing is kept.
"""

from __future__ import annotations

import gc
import threading

_kept: list[object] = []
_keeping = False
_lock = threading.Lock()


def keep_until_exit() -> None:
    """The process ends with os._exit: keep the first leftovers (the console script says
    so before the command runs)."""
    global _keeping
    _keeping = True


def done_with(*objects: object) -> None:
    """Nothing needs `objects` any more. The first ones are kept to the exit when that is
    os._exit, with every object alive now moved out of the cyclic collector's passes;
    else they are freed as the caller's references go."""
    global _keeping
    with _lock:  # a batch's images end in threads: one of them keeps
        keep, _keeping = _keeping, False
    if keep:
        _kept.extend(objects)
        gc.freeze()
