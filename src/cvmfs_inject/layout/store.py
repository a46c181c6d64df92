"""The OCI image layout as a content-addressed store.

Every write goes through a temporary file inside the layout, is fsynced and then renamed
into place, so a killed process leaves either the old state or the new one, never a torn
file. `index.json` is the single commit point: blobs are written first, the index last.
Every read of a blob is checked against the digest and size that name it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from cvmfs_inject.errors import InputError, NotFoundError
from cvmfs_inject.layout.blobs import (
    READ_CHUNK,
    BlobWriter,
    VerifiedReader,
    atomic_write,
    file_mode,
    fsync_dir,
    refuse_directory,
    refuse_symlink,
)
from cvmfs_inject.layout.lock import LockWait, acquire, flocked, opened, try_lock
from cvmfs_inject.oci import names
from cvmfs_inject.oci.digest import check_digest
from cvmfs_inject.oci.jsondoc import MAX_DOCUMENT, canonical_json, parse_json
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.oci.model import REF_NAME, Descriptor, Index
from cvmfs_inject.oci.refs import split_host

OCI_LAYOUT_VERSION = "1.0.0"
TMP_NAME = ".cvmfs-inject-tmp"
_EMPTY_INDEX = canonical_json({"schemaVersion": 2, "mediaType": MediaType.OCI_INDEX,
                               "manifests": []})


def _interrupted_creation(path: Path) -> bool:
    """Empty, or exactly what a `create` killed before writing `oci-layout` leaves: empty
    blob folders and our own empty index. Anything else is not ours to take over."""
    for entry in path.iterdir():
        if entry.name not in ("blobs", "index.json", TMP_NAME) and not (
                entry.name.startswith(".index.json.")):
            return False
    index = path / "index.json"
    if index.exists() and index.read_bytes() != _EMPTY_INDEX:
        return False
    blobs = path / "blobs"
    return not blobs.is_dir() or not any(f.is_file() for f in blobs.rglob("*"))


class Layout:
    """An OCI image layout directory. Open with `Layout.open` or `Layout.create`.

    `wait` says how long its commands wait for the layout's locks (`layout.lock`).
    """

    def __init__(self, root: Path, wait: LockWait | None = None) -> None:
        self.root = root
        self.wait = wait or LockWait()
        self.created = False  # this object made the layout on disk (`create`)

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path, wait: LockWait | None = None) -> Layout:
        path = Path(root)
        marker = path / "oci-layout"
        if not path.is_dir():
            host = split_host(str(root))[0]
            hint = f"; for a registry image write docker://{root}" if names.HOST.match(
                host) else ""
            raise InputError(f"{path}: no such layout directory{hint}")
        if not marker.is_file():
            raise InputError(f"{path}: not an OCI layout (no oci-layout file)")
        doc = parse_json(marker.read_bytes(), str(marker))
        if doc.get("imageLayoutVersion") != OCI_LAYOUT_VERSION:
            raise InputError(f"{marker}: unsupported imageLayoutVersion "
                             f"{doc.get('imageLayoutVersion')!r} (expected {OCI_LAYOUT_VERSION})")
        if not (path / "index.json").is_file():
            raise InputError(f"{path}: not an OCI layout (no index.json)")
        return cls(path, wait)

    @classmethod
    def create(cls, root: str | Path, wait: LockWait | None = None) -> Layout:
        """Open the layout at `root`, creating an empty one if the directory is absent or
        empty. Creation holds the layout exclusively, so concurrent creators of one path
        (`make -j` with a fresh cache) make it once and then share it."""
        path = Path(root)
        if (path / "oci-layout").exists():
            return cls.open(path, wait)
        if path.exists() and not path.is_dir():
            raise InputError(f"{path}: exists and is not an OCI layout; choose another path")
        path.mkdir(parents=True, exist_ok=True)
        layout = cls(path, wait)
        with flocked(path, exclusive=True, wait=layout.wait, what="layout"):
            if (path / "oci-layout").exists():
                return cls.open(path, wait)
            if not _interrupted_creation(path):
                raise InputError(f"{path}: exists and is not an OCI layout; choose another "
                                 "path")
            layout.refuse_symlinks()
            (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            atomic_write(path / "index.json", _EMPTY_INDEX)
            atomic_write(path / "oci-layout",
                         canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION}))
            layout.created = True
        return layout

    @property
    def tmp_dir(self) -> Path:
        return self.root / TMP_NAME

    # -- locking (see layout.lock) ------------------------------------------------------------
    def lock(self, *, exclusive: bool) -> AbstractContextManager[int]:
        """The use lock: shared by readers and writers, exclusive for gc."""
        return flocked(self.root, exclusive=exclusive, wait=self.wait, what="layout")

    @contextlib.contextmanager
    def writing(self) -> Iterator[Layout]:
        """The use lock of a writing command; many writers share it (their temp files have
        names of their own, and the tag change commits under the index lock).

        When nobody else uses the layout, the temp area goes, before (what killed commands
        left) and after (this command's empty temp directory). Whether anybody else does
        is asked before taking the shared lock and after the work: a failed flock upgrade
        drops the lock held, so it is never tried while the lock matters.
        """
        self.refuse_symlinks()
        with opened(self.root, "layout") as fd:
            if try_lock(fd, exclusive=True):
                shutil.rmtree(self.tmp_dir, ignore_errors=True)
            acquire(fd, exclusive=False, wait=self.wait, path=self.root, what="layout")
            if not (self.root / "oci-layout").is_file():  # a failed creator undid it
                raise InputError(f"{self.root}: the layout was removed by another command "
                                 "while this one waited; run it again")
            try:
                yield self
            finally:
                if try_lock(fd, exclusive=True):
                    shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def refuse_symlinks(self) -> None:
        """A writer never writes through a symlink inside the layout (it could land outside
        of it): `blobs/`, its algorithm directories, `index.json`, `oci-layout` and the temp
        area must be what they seem. Readers follow symlinks as they like."""
        blobs = self.root / "blobs"
        candidates = [blobs, self.root / "index.json", self.root / "oci-layout", self.tmp_dir]
        if blobs.is_dir() and not blobs.is_symlink():
            candidates += sorted(blobs.iterdir())
        for path in candidates:
            if path.is_symlink():
                raise InputError(f"{path}: is a symlink; cvmfs-inject does not write through "
                                 "symlinks inside a layout (make it a real directory or file)")

    # -- blobs -----------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        algorithm, encoded = check_digest(digest).split(":", 1)
        return self.root / "blobs" / algorithm / encoded

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def open_blob(self, digest: str, size: int) -> VerifiedReader:
        path = self.blob_path(digest)
        where = str(path.relative_to(self.root))
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise NotFoundError(f"{self.root}: missing blob {digest}") from None
        return VerifiedReader(handle, digest, size, f"{self.root}/{where}")

    def read_blob(self, digest: str, size: int) -> bytes:
        if size > MAX_DOCUMENT:
            raise InputError(f"{self.root}: blob {digest} is {size} bytes, too large for a "
                             "JSON document")
        with self.open_blob(digest, size) as reader:
            return reader.readall()

    def writer(self) -> BlobWriter:
        return BlobWriter(self.tmp_dir, self.blob_path)

    def put_bytes(self, data: bytes, media_type: str) -> Descriptor:
        with self.writer() as writer:
            writer.write(data)
            return writer.commit().replace(media_type=media_type)

    def import_blob(self, source: Path, digest: str) -> None:
        """Move a file from a staging area in the same layout, checking its digest on the way.
        It replaces a copy already there (a rename: a damaged copy is repaired, and a
        reader of the old one keeps reading it); a blob that is a symlink stays."""
        path = self.blob_path(digest)
        refuse_directory(path)
        with source.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            reader = VerifiedReader(handle, digest, size, str(source))
            while reader.read(READ_CHUNK):
                pass
            reader.close()
        if path.is_symlink():
            if path.exists():  # a symlink blob is never replaced; a dangling one is refused
                return
            refuse_symlink(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with source.open("rb") as handle:
            os.fchmod(handle.fileno(), file_mode())  # skopeo writes its blobs 0600
            os.fsync(handle.fileno())
        os.replace(source, path)
        fsync_dir(path.parent)

    def where(self, desc: Descriptor) -> str:
        """Where a blob lives, for messages."""
        return f"{self.root}/blobs/{desc.digest.replace(':', '/', 1)}"

    # -- index.json ------------------------------------------------------------------------
    def read_index(self) -> Index:
        return Index.parse(self.index_bytes(), str(self.root / "index.json"))

    def index_bytes(self) -> bytes:
        """index.json as it is (`validate` of one tag reads only that tag's entry)."""
        path = self.root / "index.json"
        if path.stat().st_size > MAX_DOCUMENT:  # as for every other document
            raise InputError(f"{path}: {path.stat().st_size} bytes, too large for a JSON "
                             "document")
        return path.read_bytes()

    def write_index(self, doc: dict[str, Any]) -> None:
        self.tmp_dir.mkdir(exist_ok=True)
        atomic_write(self.root / "index.json", canonical_json(doc), self.tmp_dir)

    def tags(self) -> list[str]:
        return [d.ref_name for d in self.read_index().manifests if d.ref_name]

    def resolve(self, tag: str | None) -> Descriptor:
        """The descriptor a tag names; without a tag, the layout's only image."""
        entries = self.read_index().manifests
        if tag is None:
            if len(entries) == 1:
                return entries[0]
            if not entries:
                raise NotFoundError(f"{self.root}: layout holds no image")
            raise NotFoundError(f"{self.root}: layout holds {len(entries)} images; name one of "
                                f"the tags: {', '.join(self.tags()) or '(none)'}")
        for desc in entries:
            if desc.ref_name == tag:
                return desc
        raise NotFoundError(f"{self.root}: tag {tag!r} not found; tags: "
                            f"{', '.join(self.tags()) or '(none)'}")

    def set_tag(self, tag: str, desc: Descriptor) -> None:
        """Point `tag` at `desc` in index.json (one atomic write); other entries stay."""
        entry = desc.with_annotations({**desc.annotations, REF_NAME: tag}).to_dict()
        self._edit_index(tag, entry)

    def remove_tag(self, tag: str) -> None:
        """Drop `tag` from index.json (its blobs stay until gc)."""
        self._edit_index(tag, None)

    def _edit_index(self, tag: str, entry: dict[str, Any] | None) -> None:
        """Under the index lock, on the index.json of now: what other writers committed
        since this command started is kept; only `tag`'s entry changes."""
        with flocked(self.root / "oci-layout", exclusive=True, wait=self.wait,
                     what="layout index"):
            doc = self.read_index().edit()
            kept = [d for d in doc["manifests"]
                    if (d.get("annotations") or {}).get(REF_NAME) != tag]
            doc["manifests"] = [*kept, entry] if entry is not None else kept
            self.write_index(doc)

    def staging(self) -> tempfile.TemporaryDirectory[str]:
        """A scratch directory on the layout's filesystem, so staged blobs can be renamed in."""
        self.tmp_dir.mkdir(exist_ok=True)
        return tempfile.TemporaryDirectory(prefix="stage-", dir=self.tmp_dir)

