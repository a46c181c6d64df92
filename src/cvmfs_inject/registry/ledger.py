"""Where this process has put blobs, so a blob goes up once per registry.

`batch` writes the same new layer into many repositories, in parallel. The first image to
need a blob on a registry uploads it; the others wait for that upload (one lock per
registry and blob) and then mount it from that repository, a cross-repository mount the
registry does without moving the bytes. A mount the registry refuses falls back to an
upload, so the ledger can only save work, never lose a blob.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class BlobLedger:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._where: dict[tuple[str, str], str] = {}

    @contextmanager
    def claim(self, registry: str, digest: str) -> Iterator[str | None]:
        """Hold the blob's lock; yield a repository of `registry` that has it, or None."""
        key = (registry, digest)
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            yield self._where.get(key)

    def record(self, registry: str, digest: str, repository: str) -> None:
        with self._lock:
            self._where[(registry, digest)] = repository
