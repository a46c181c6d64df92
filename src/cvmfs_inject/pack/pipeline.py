"""The compressing half of the packer: a worker thread that hashes the tar stream
(diff_id), compresses it and feeds the blob writer, which hashes what it is given (digest).

`hashlib`, `isal` and `zstandard` release the GIL, so the walk (main thread) and this
worker use two cores. The chunks are a fixed set of buffers going round between the two.
"""

from __future__ import annotations

import functools
import hashlib
import queue
import threading
from typing import Protocol

import zstandard
from isal import isal_zlib

from cvmfs_inject.pack import libc
from cvmfs_inject.pack.options import CHUNK, PackOptions

QUEUE_DEPTH = 8
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 256 << 10


class Sink(Protocol):
    """Where compressed bytes go (a store BlobWriter); it hashes what it is given.

    `write` must be done with `data` when it returns: the packer reuses its buffers.
    """

    def write(self, data: bytes | memoryview) -> None: ...


class Compressor:
    def __init__(self, compression: str, level: int) -> None:
        self._obj: object | None
        if compression == "gzip":
            self._obj = isal_zlib.compressobj(level, isal_zlib.DEFLATED, 16 + 15)
        elif compression == "zstd":
            # Single-threaded on purpose: measured on 2 cores, zstd's own workers were no
            # faster here (the walk already uses the other core) and cost 17-30 MiB more RSS.
            self._obj = zstandard.ZstdCompressor(level=level, write_checksum=True).compressobj()
        else:
            self._obj = None

    def compress(self, data: memoryview) -> bytes | memoryview:
        return data if self._obj is None else self._obj.compress(data)  # type: ignore[attr-defined]

    def flush(self) -> bytes:
        return b"" if self._obj is None else self._obj.flush()  # type: ignore[attr-defined]


class Pipeline:
    """A worker thread that hashes the tar stream (diff_id), compresses it and feeds the
    sink, which hashes the compressed bytes (digest). While its queue is full the producer
    plans ahead (`pack.lookahead`) instead of waiting.

    The chunks are a fixed set of CHUNK-sized buffers going round between the two threads:
    fresh buffers for every chunk cost a page fault per 4 KiB and an munmap per chunk,
    about a fifth of the CPU time of an inject, and memory stays bounded by the set.
    """

    def __init__(self, sink: Sink, options: PackOptions) -> None:
        self._queue: queue.Queue[tuple[bytearray, int] | None] = queue.Queue(QUEUE_DEPTH)
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._buffers = 0
        self._sink = sink
        self._compressor = Compressor(options.compression, options.level or 0)
        self._diff = hashlib.sha256()
        self._error: BaseException | None = None
        # Set by the worker when it has stopped for good. Waited on instead of join():
        # on Python 3.11 a join() interrupted by Ctrl-C marks the thread stopped while it
        # still runs, and it would go on writing into a sink being aborted.
        self._stopped = threading.Event()
        self._cancelled = False  # then the worker only drains the queue
        self.size = 0
        self._thread = threading.Thread(target=self._run, name="cvmfs-inject-compress",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._work()
        finally:
            self._stopped.set()

    def _work(self) -> None:
        item: tuple[bytearray, int] | None = None
        try:
            while (item := self._queue.get()) is not None:
                buffer, length = item
                if self._cancelled:
                    self._free.put(buffer)
                    continue
                with memoryview(buffer) as whole, whole[:length] as data:
                    self._diff.update(data)
                    out = self._compressor.compress(data)
                    if out:
                        self._sink.write(out)
                    del out  # a memoryview of the chunk ("none"): release it before `with` ends
                self._free.put(buffer)
            if self._cancelled:
                return
            tail = self._compressor.flush()
            if tail:
                self._sink.write(tail)
        except BaseException as exc:  # handed to the producer, re-raised there
            self._error = exc
            if item is not None:  # unblock the producer until its end marker arrives
                self._free.put(item[0])
                while (item := self._queue.get()) is not None:
                    self._free.put(item[0])

    def take(self) -> bytearray:
        """An empty chunk: a returned one, else a new one while fewer than the queue, the
        worker and the producer can hold exist (so waiting for one cannot deadlock)."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            if self._buffers < QUEUE_DEPTH + 2:
                self._buffers += 1
                return bytearray(CHUNK)
        return self._free.get()

    def full(self) -> bool:
        return self._queue.full()

    def idle(self) -> bool:
        """The worker has nothing queued: it waits for the producer."""
        return self._queue.empty()

    def put(self, chunk: bytearray, length: int) -> None:
        if self._error is not None:
            raise self._error
        self.size += length
        self._queue.put((chunk, length))

    def finish(self) -> str:
        self._queue.put(None)
        self._stopped.wait()
        if self._error is not None:
            raise self._error
        return "sha256:" + self._diff.hexdigest()

    def cancel(self) -> None:
        """Stop the worker without writing more; return when it will not touch the sink."""
        self._cancelled = True
        if not self._stopped.is_set():
            self._queue.put(None)
        self._stopped.wait()


@functools.cache
def steady_malloc() -> None:
    """Keep big transient blocks out of the heap, so memory stays flat whatever the tree.

    glibc raises its mmap threshold after a large block is freed, after which blocks of
    several hundred KiB (the compressor's output for each chunk) come from the heaps of
    the two threads and fragment them: peak RSS then grew with the tree (131 MiB for a
    2 GB tree). A fixed threshold keeps them in mmap, returned to the system on free.
    Elsewhere than glibc this is a no-op.
    """
    mallopt = libc.function("mallopt")
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
