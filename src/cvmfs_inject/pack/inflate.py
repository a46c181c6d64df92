"""Decompressing a layer in a thread of its own, so extraction reads, hashes, inflates and
writes files at the same time.

A worker thread reads the compressed blob (through its verifier, which hashes what it
reads), inflates it (ISA-L for gzip, libzstd for zstd; both release the GIL) and queues
the tar stream in chunks; the extracting thread reads them. Every gzip member's CRC and
length and every zstd frame's checksum are checked; a stream that ends inside a member or
frame is an error. A bounded queue keeps memory at a few chunks whatever the layer size.
"""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Callable
from typing import IO, Any

import zstandard
from isal import igzip_lib, isal_zlib

from cvmfs_inject.errors import InputError
from cvmfs_inject.layout.blobs import READ_CHUNK
from cvmfs_inject.oci.media import MediaType

QUEUE_DEPTH = 8
_END = b""


def _inflater(media_type: str) -> Callable[[], Any] | None:
    """A factory of decompressor objects for one gzip member or zstd frame; None: a tar."""
    if media_type.endswith("+zstd") or media_type.endswith(".zstd"):
        return lambda: zstandard.ZstdDecompressor().decompressobj(write_size=READ_CHUNK)
    if media_type.endswith("gzip"):
        return lambda: isal_zlib.decompressobj(16 + isal_zlib.MAX_WBITS)
    if media_type in (MediaType.OCI_LAYER, MediaType.DOCKER_LAYER):
        return None
    raise InputError(f"unsupported layer media type {media_type}")


class InflatingReader(io.RawIOBase):
    """The tar stream of a compressed blob, inflated by a worker thread.

    `read(n)` returns at most `n` bytes of the next chunk the worker produced, so a
    consumer that reads large sizes gets the worker's chunks without a copy.
    """

    def __init__(self, blob: IO[bytes], new_decompressor: Callable[[], Any]) -> None:
        super().__init__()
        self._blob = blob
        self._new = new_decompressor
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(QUEUE_DEPTH)
        self._chunk, self._offset = b"", 0
        self._done = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="cvmfs-inject-inflate",
                                        daemon=True)
        self._thread.start()

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        chunk, offset = self._chunk, self._offset
        if offset == len(chunk):
            if self._done:
                return b""
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            if not item:
                self._done = True
                return b""
            chunk, offset = self._chunk, self._offset = item, 0
        end = len(chunk) if size is None or size < 0 else min(offset + size, len(chunk))
        self._offset = end
        if offset == 0 and end == len(chunk):
            return chunk  # the whole chunk: no copy
        return chunk[offset:end]

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def _put(self, item: bytes | BaseException) -> bool:
        """Queue an item unless the consumer has gone; False when it has."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            decompressor = self._new()
            pending = b""
            while True:
                data = pending or self._blob.read(READ_CHUNK)
                pending = b""
                if not data:
                    if decompressor is not None:
                        raise InputError("layer is truncated: its compressed stream ends "
                                         "inside a gzip member or zstd frame")
                    break
                if decompressor is None:  # a member or frame ended: another may follow
                    data = data.lstrip(b"\0")  # gzip files may be padded with zeros
                    if not data:
                        continue
                    decompressor = self._new()
                out = decompressor.decompress(data)
                if out and not self._put(out):
                    return
                if decompressor.eof:
                    pending, decompressor = decompressor.unused_data, None
            self._put(_END)
        except (igzip_lib.IsalError, zstandard.ZstdError, OSError, EOFError) as exc:
            self._put(InputError(f"cannot extract layer: {exc}"))
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    def close(self) -> None:
        """Stop the worker (it may be blocked on a full queue); the blob stays open, so its
        owner can still read it to the end (and have its digest checked)."""
        self._stop.set()
        self._thread.join()
        super().close()


def decompressed(reader: IO[bytes], media_type: str) -> IO[bytes]:
    """The tar stream of a layer blob of `media_type`, read from `reader`."""
    new = _inflater(media_type)
    if new is None:
        return reader
    return InflatingReader(reader, new)  # type: ignore[return-value]
