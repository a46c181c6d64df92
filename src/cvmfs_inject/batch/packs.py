"""Packing once for many images: the layer of a tree, packed into a store of its own, and
put into each image's store by a hard link (a copy across file systems)."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from cvmfs_inject.image.edit import NewLayer
from cvmfs_inject.layout.blobs import READ_CHUNK, fsync_dir
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.pack.options import PackOptions, Progress, Warn
from cvmfs_inject.pack.packer import PackResult, pack


@dataclass(frozen=True)
class Prepacked:
    """A packed layer waiting in `store`, for every image that takes it."""

    layer: NewLayer
    packed: PackResult
    store: Layout

    def place(self, store: Layout) -> None:
        """Make the layer's blob present in `store`: hard-linked under a temporary name and
        renamed over any copy there (so a damaged one is repaired), as a blob write is;
        copied, hashed on the way, when `store` is on another file system."""
        digest = self.layer.digest
        source, target = self.store.blob_path(digest), store.blob_path(digest)
        if target.is_symlink():
            return
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(source.stat(), target.stat()):
                return  # this very file (a rename of one link over another does nothing)
        target.parent.mkdir(parents=True, exist_ok=True)
        store.tmp_dir.mkdir(exist_ok=True)
        temporary = store.tmp_dir / f"place-{os.getpid()}-{threading.get_ident()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)  # a killed command's, of the same pid
        try:
            os.link(source, temporary)
        except OSError as exc:  # another file system, or one without (more) hard links
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP,
                                 errno.ENOTSUP):
                raise
            with source.open("rb") as blob, store.writer() as writer:
                while chunk := blob.read(READ_CHUNK):
                    writer.write(chunk)
                writer.commit()
            return
        try:
            os.replace(temporary, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        fsync_dir(target.parent)


def pack_once(tree: Path, options: PackOptions, store: Layout,
              progress: Progress | None = None, warn: Warn | None = None) -> Prepacked:
    """Pack `tree` into `store`; the layer every image with these options takes."""
    with store.writer() as writer:
        packed = pack(tree, writer, options, progress=progress, warn=warn)
        layer = NewLayer(packed.diff_id, writer.peek_digest(), writer.size,
                         options.compression, options.mount_point)
        writer.commit()
    return Prepacked(layer, packed, store)
