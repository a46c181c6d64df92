"""Blob I/O that is safe against crashes and checks itself.

New content goes to a temporary file inside the store, is hashed while it is written,
fsynced and renamed to its digest (ggcr's `writeBlob`, umoci's `PutBlob`). Every read is
checked against the size and digest that name the blob, at EOF (umoci's verified reader).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from cvmfs_inject.errors import InputError, IntegrityError
from cvmfs_inject.oci.model import Descriptor

READ_CHUNK = 1 << 20  # how much a verified read takes at a time
FLUSH_AFTER = 16 << 20  # blobs this large are written back while they are produced
FLUSH_INTERVAL = 0.25


def file_mode() -> int:
    """The mode a new file gets under this process's umask (0644 under 022), as skopeo's
    and umoci's layouts have it: a layout shared by a group, served by a web server or
    read by another user's podman must be readable. Temp files start as 0600 (mkstemp)
    and get this mode before they are renamed into place."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read without changing it (Linux 4.7+), so that no other thread
    can create a file under a wrong mask meanwhile; elsewhere set and put back."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def refuse_symlink(path: Path) -> None:
    """A blob name that is a symlink is not replaced: the layout stays as it is."""
    if path.is_symlink():
        raise InputError(f"{path}: is a symlink; cvmfs-inject does not replace symlinks "
                         "inside a layout (make it a real file)")


def refuse_directory(path: Path) -> None:
    """A directory where a blob belongs is not replaced either: `validate` reports it and
    `gc` leaves it, for the user to look at."""
    if path.is_dir() and not path.is_symlink():
        raise InputError(f"{path}: a directory where a blob belongs: remove it, then try "
                         "again")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write `data` to `path` via temp file + fsync + rename (+ fsync of the directory)."""
    directory = tmp_dir or path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


class VerifiedReader(io.RawIOBase):
    """A blob reader that fails at EOF (or on overrun) if size or digest differ from the name."""

    def __init__(self, handle: BinaryIO, digest: str, size: int, where: str) -> None:
        super().__init__()
        algorithm, self._expected_hex = digest.split(":", 1)
        self._hash = hashlib.new(algorithm)
        self._handle = handle
        self._size = size
        self._seen = 0
        self._where = where
        self._digest = digest
        self._checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        # read one byte beyond the declared size so an overlong blob is noticed
        limit = min(len(view), self._size - self._seen + 1)
        count = self._handle.readinto(view[:limit]) if limit > 0 else 0
        if count:
            self._seen += count
            if self._seen > self._size:
                raise IntegrityError(f"{self._where}: blob is larger than its size {self._size}")
            self._hash.update(view[:count])
        if not count or self._seen == self._size:
            self._check_end()
        return count

    def _check_end(self) -> None:
        if self._checked:
            return
        if self._seen != self._size:
            raise IntegrityError(
                f"{self._where}: blob has {self._seen} bytes, its descriptor says {self._size}")
        if self._handle.read(1):
            raise IntegrityError(f"{self._where}: blob is larger than its size {self._size}")
        if self._hash.hexdigest() != self._expected_hex:
            raise IntegrityError(
                f"{self._where}: content does not match digest {self._digest} (corrupted blob)")
        self._checked = True

    def close(self) -> None:
        self._handle.close()
        super().close()


class BlobWriter:
    """Streams a new blob into the layout's temp area, hashing as it goes; `commit` publishes.

    Writing the temp file and hashing in one pass means a blob is never read back to name it.
    """

    def __init__(self, tmp_dir: Path, blob_path: Callable[[str], Path]) -> None:
        self._blob_path = blob_path
        tmp_dir.mkdir(exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix="blob-", dir=tmp_dir)
        os.fchmod(fd, file_mode())
        self._file = os.fdopen(fd, "wb", buffering=0)
        self._hash = hashlib.sha256()
        self.size = 0
        self.digest: str | None = None
        self._flusher: threading.Thread | None = None
        self._stop_flushing = threading.Event()

    def write(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        view = memoryview(data)
        while view:  # an unbuffered write may be short (a full disk, a signal)
            view = view[self._file.write(view):]
        self.size += len(data)
        if self._flusher is None and self.size >= FLUSH_AFTER:
            self._flusher = threading.Thread(target=self._flush_while_writing,
                                             name="cvmfs-inject-flush", daemon=True)
            self._flusher.start()

    def _flush_while_writing(self) -> None:
        """Write a large blob back to disk while it is produced, so the fsync in `commit`
        finds little left to do (it was 0.5 s of a 4 s inject for a 300 MB layer)."""
        fd = self._file.fileno()
        while not self._stop_flushing.wait(FLUSH_INTERVAL):
            try:
                os.fdatasync(fd)
            except OSError:
                return  # commit's own fsync reports a real problem

    def _stop_flusher(self) -> None:
        self._stop_flushing.set()
        if self._flusher is not None:
            self._flusher.join()

    def peek_digest(self) -> str:
        """The digest of what was written so far, before deciding to publish it."""
        return "sha256:" + self._hash.hexdigest()

    def commit(self) -> Descriptor:
        self._stop_flusher()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.digest = "sha256:" + self._hash.hexdigest()
        target = self._blob_path(self.digest)
        refuse_symlink(target)
        refuse_directory(target)
        # Replacing an existing blob (same digest) costs one rename and repairs a damaged copy.
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._tmp, target)
        fsync_dir(target.parent)
        return Descriptor("application/octet-stream", self.digest, self.size)

    def abort(self) -> None:
        self._stop_flusher()
        if not self._file.closed:
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None or self.digest is None:
            self.abort()


