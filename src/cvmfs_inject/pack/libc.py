"""The C library calls the pack layer makes through ctypes, from one handle: glibc's
memory tuning (`mallopt`, `malloc_trim`) and Linux's `prctl`. Each is None where the C
library lacks it (musl has no malloc_trim; other systems no prctl): callers then do
without, as the docstrings where they are used say."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any


@functools.cache
def _handle() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def function(name: str) -> Callable[..., Any] | None:
    """The C library's function `name`, or None."""
    handle = _handle()
    return getattr(handle, name, None) if handle is not None else None
