"""Upload bodies: windows of a file, or of another registry's download, that requests
streams in small blocks (oras-py's uploads read whole files or chunks into memory).

A file source can re-create any window, so a request can be replayed after an auth
challenge; a stream source is read once. Both hash what they send, so the digest of a
chunked upload is known without reading the data twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import IO, Any

from cvmfs_inject.errors import IntegrityError

BLOCK = 64 << 10  # what urllib3 pulls from a body at a time


class Window:
    """A length-aware request body read in small blocks (requests sends `len` as
    Content-Length and pulls `read`); subclasses say where the bytes come from."""

    def __init__(self, length: int) -> None:
        self._left = self._length = length

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        while block := self.read(BLOCK):
            yield block

    def read(self, n: int | None = -1) -> bytes:
        if self._left <= 0:
            return b""
        n = self._left if n is None or n < 0 or n > self._left else n
        data = self._next(n)
        self._left -= len(data)
        return data

    def _next(self, n: int) -> bytes:
        raise NotImplementedError


class FileWindow(Window):
    """Bytes [offset, offset+length) of an open file as a requests body.

    requests sends an object with ``__len__`` and ``read`` with a Content-Length header and
    urllib3 pulls it in small blocks, so no chunk is ever held in memory as a whole. Every
    byte also goes through `hasher`, so the local digest is known without a second read.
    """

    def __init__(self, f: IO[bytes], offset: int, length: int, hasher: Any) -> None:
        super().__init__(length)
        f.seek(offset)
        self._f, self._hasher = f, hasher

    def _next(self, n: int) -> bytes:
        data = self._f.read(n)
        if not data:
            raise IntegrityError(f"{getattr(self._f, 'name', 'file')} shrank while it was "
                                 "being uploaded")
        self._hasher.update(data)
        return data


class StreamWindow(Window):
    """The next `length` bytes of a chunk iterator as a requests body (for copy_blob_from).

    Hands out at most the requested block per read (slicing one source chunk, not copying
    the rest of it), so memory stays at one download chunk whatever the blob size.
    """

    def __init__(self, source: StreamSource, length: int) -> None:
        super().__init__(length)
        self._source = source

    def _next(self, n: int) -> bytes:
        return self._source.take(n)


class Reporting:
    """A file whose reads are reported (bytes sent), for an upload progress bar."""

    def __init__(self, f: IO[bytes], progress: Callable[[int], None]) -> None:
        self._f, self._progress = f, progress
        self.name = getattr(f, "name", "file")

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._progress(len(data))
        return data


class FileSource:
    """Upload source backed by a file: every window can be re-read, so requests can be replayed."""

    replayable = True

    def __init__(self, f: IO[bytes], algorithm: str) -> None:
        self._f, self._algorithm = f, algorithm
        self._hasher = hashlib.new(algorithm)
        self._pending: Any = None

    def body(self, offset: int, length: int) -> Callable[[], FileWindow]:
        def make() -> FileWindow:
            # Hash on a copy: a replayed request must not feed the same bytes twice.
            self._pending = self._hasher.copy()
            return FileWindow(self._f, offset, length, self._pending)

        return make

    def commit(self) -> None:
        if self._pending is not None:
            self._hasher, self._pending = self._pending, None

    def digest(self) -> str:
        return f"{self._algorithm}:{self._hasher.hexdigest()}"


class StreamSource:
    """Upload source backed by another registry's download: read once, never replayable."""

    replayable = False

    def __init__(self, chunks: Iterator[bytes], name: str) -> None:
        self._chunks, self._name = chunks, name
        self._buf, self._pos = b"", 0

    def take(self, n: int) -> bytes:
        while self._pos >= len(self._buf):  # skip empty chunks: b"" would end the body
            try:
                self._buf, self._pos = next(self._chunks), 0
            except StopIteration:
                raise IntegrityError(f"{self._name} ended before its declared size") from None
        data = self._buf[self._pos:self._pos + n]
        self._pos += len(data)
        return data

    def body(self, offset: int, length: int) -> StreamWindow:
        return StreamWindow(self, length)

    def commit(self) -> None:
        pass

    def digest(self) -> None:
        """Drain the source so its own end-of-stream verification runs (None: not hashed here)."""
        if self._pos < len(self._buf):
            raise IntegrityError(f"{self._name} is longer than its declared size")
        for extra in self._chunks:
            if extra:
                raise IntegrityError(f"{self._name} is longer than its declared size")
        return None


Source = FileSource | StreamSource
