"""Decompressing a layer in a thread of its own, so extraction reads, hashes, inflates and
writes files at the same time.

A worker thread reads the compressed blob (through its verifier, which hashes what it
reads), inflates it (ISA-L for gzip, libzstd for zstd; both release the GIL) and queues
the tar stream in chunks; the extracting thread reads them. Every gzip member's CRC and
length and every zstd frame's checksum are checked; a stream that ends inside a member or
frame is an error. Given the layer's diff_id, the worker also hashes the tar stream and
ends it with an IntegrityError when it is not that digest (what the config says the layer
is: umoci and containerd check it too). A bounded queue keeps memory at a few chunks
whatever the layer size.
"""

from __future__ import annotations

import hashlib
import io
import queue
import threading
from collections.abc import Iterable
from typing import IO, Any

import zstandard
from isal import igzip_lib, isal_zlib

from cvmfs_inject.errors import InputError, IntegrityError
from cvmfs_inject.layout.blobs import READ_CHUNK
from cvmfs_inject.oci.digest import verify_problem
from cvmfs_inject.oci.media import MediaType

QUEUE_DEPTH = 8
_END = b""


def is_tar_layer(media_type: str) -> bool:
    """A layer type we can read the tar stream of (plain, gzip or zstd)."""
    try:
        _kind(media_type)
    except InputError:
        return False
    return True


def tar_digests(reader: IO[bytes], media_type: str, algorithms: Iterable[str]
                ) -> dict[str, str]:
    """The digests (ALGORITHM:HEX by algorithm) of a layer blob's tar stream, what its
    diff_id must be, reading the blob to its end, so that its own digest is checked too."""
    stream = decompressed(reader, media_type)
    hashes = [hashlib.new(algorithm) for algorithm in sorted(set(algorithms))]
    try:
        while chunk := stream.read(READ_CHUNK):
            for one in hashes:
                one.update(chunk)
    finally:
        if stream is not reader:
            stream.close()
    while reader.read(READ_CHUNK):
        pass
    return {one.name: f"{one.name}:{one.hexdigest()}" for one in hashes}


def _kind(media_type: str) -> str | None:
    """gzip, zstd, or None for a tar as it is."""
    if media_type.endswith("+zstd") or media_type.endswith(".zstd"):
        return "zstd"
    if media_type.endswith("gzip"):
        return "gzip"
    if media_type in (MediaType.OCI_LAYER, MediaType.DOCKER_LAYER):
        return None
    raise InputError(f"unsupported layer media type {media_type}")


def _hand_over(to: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    """Put `item` on a bounded queue, waiting while it is full; False once `stop` is set
    (the consumer has gone and will never take it)."""
    while not stop.is_set():
        try:
            to.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


class InflatingReader(io.RawIOBase):
    """The tar stream of a compressed blob, inflated by a worker thread.

    `read(n)` returns at most `n` bytes of the next chunk the worker produced, so a
    consumer that reads large sizes gets the worker's chunks without a copy.
    """

    def __init__(self, blob: IO[bytes], kind: str, diff_id: str | None = None) -> None:
        super().__init__()
        self._blob = blob
        self._kind = kind
        self._diff_id = diff_id
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(QUEUE_DEPTH)
        self._chunk, self._offset = b"", 0
        self._done = False
        self._stop = threading.Event()
        # a diff_id we cannot compute (not sha256 or sha512) is not checked here
        self._sha = (_BackgroundHash(diff_id.partition(":")[0], self._stop)
                     if diff_id is not None and verify_problem(diff_id) is None else None)
        self._thread = threading.Thread(target=self._work, name="cvmfs-inject-inflate",
                                        daemon=True)

    def _start(self) -> None:
        """The threads start at the first read, not before: a caller may fork a process
        between opening the stream and reading it (`pack.offload`), which is only safe
        while this process has one thread."""
        if self._sha is not None:
            self._sha.start()
        self._thread.start()

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        chunk, offset = self._chunk, self._offset
        if offset == len(chunk):
            if self._done:
                return b""
            if self._thread.ident is None:
                self._start()
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
        """Queue an item unless the consumer has gone; False when it has. Tar data goes
        to the diff_id's hash too."""
        if self._sha is not None and isinstance(item, bytes) and not self._sha.update(item):
            return False
        return _hand_over(self._queue, item, self._stop)

    def _work(self) -> None:
        try:
            if self._kind == "gzip":
                self._gunzip()
            else:
                self._unzstd()
            if self._sha is not None and not self._stop.is_set():
                found = self._sha.digest()
                if found != self._diff_id:
                    raise IntegrityError(f"layer {self._diff_id}: its content hashes to "
                                         f"{found}, not to the diff_id the config gives it")
            self._put(_END)
        except (igzip_lib.IsalError, zstandard.ZstdError, OSError, EOFError) as exc:
            self._put(InputError(f"cannot extract layer: {exc}"))
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    def _gunzip(self) -> None:
        """Every member in turn (zero padding between them is skipped, as gzip does); each
        call gives at most one chunk, so a small layer that inflates hugely (a "bomb")
        still comes out in chunks."""
        member = None
        data = b""
        while True:
            if not data:
                data = self._blob.read(READ_CHUNK)
                if not data:
                    if member is not None:
                        raise InputError("layer is truncated: its gzip stream ends inside a "
                                         "member")
                    return
            if member is None:
                data = data.lstrip(b"\0")
                if not data:
                    continue
                member = isal_zlib.decompressobj(16 + isal_zlib.MAX_WBITS)
            out = member.decompress(data, READ_CHUNK)
            if out and not self._put(out):
                return
            if member.eof:
                data, member = member.unused_data, None
            else:
                data = member.unconsumed_tail

    def _unzstd(self) -> None:
        """Every frame in turn, in chunks of bounded size (libzstd checks each frame's
        checksum); the blob is read to its end, where its digest is checked."""
        reader = zstandard.ZstdDecompressor().stream_reader(
            self._blob, read_size=READ_CHUNK, read_across_frames=True, closefd=False)
        while out := reader.read(READ_CHUNK):
            if not self._put(out):
                return
        while self._blob.read(READ_CHUNK):
            raise InputError("layer has data after its last zstd frame")

    def close(self) -> None:
        """Stop the worker (it may be blocked on a full queue); the blob stays open, so its
        owner can still read it to the end (and have its digest checked)."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()
        super().close()


class _BackgroundHash:
    """A hash fed in a thread of its own: the inflating thread hands it each chunk (no
    copy) and goes on. hashlib lets go of the GIL, and so do the inflaters: on big files
    the inflating thread is what the extraction waits for."""

    def __init__(self, algorithm: str, stop: threading.Event) -> None:
        self._hash = hashlib.new(algorithm)
        self._stop = stop
        self._queue: queue.Queue[bytes] = queue.Queue(QUEUE_DEPTH)
        self._thread = threading.Thread(target=self._work, name="cvmfs-inject-hash",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                chunk = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if not chunk:
                return
            self._hash.update(chunk)

    def update(self, chunk: bytes) -> bool:
        """Hand over a chunk; False when the consumer has gone."""
        return _hand_over(self._queue, chunk, self._stop)

    def digest(self) -> str:
        """ALGORITHM:HEX of all chunks, once the thread has hashed them."""
        self.update(_END)
        self._thread.join()
        return f"{self._hash.name}:{self._hash.hexdigest()}"


def decompressed(reader: IO[bytes], media_type: str, diff_id: str | None = None,
                 digest: str | None = None) -> IO[bytes]:
    """The tar stream of a layer blob of `media_type`, read from `reader`; with `diff_id`,
    checked to be that digest (an uncompressed layer's is its blob `digest`, when both use
    one algorithm)."""
    kind = _kind(media_type)
    if kind is None:
        if (diff_id is not None and digest is not None and diff_id != digest
                and diff_id.partition(":")[0] == digest.partition(":")[0]):
            raise IntegrityError(f"layer {digest} is uncompressed, so its diff_id must be "
                                 f"its digest; the config gives {diff_id}")
        return reader
    return InflatingReader(reader, kind, diff_id)  # type: ignore[return-value]
