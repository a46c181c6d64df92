"""The OCI image layout as a content-addressed store.

Every write goes through a temporary file inside the layout, is fsynced and then renamed
into place, so a killed process leaves either the old state or the new one, never a torn
file. `index.json` is the single commit point: blobs are written first, the index last.
Every read of a blob is checked against the digest and size that name it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cvmfs_inject.errors import InputError, IntegrityError, LockedError, NotFoundError
from cvmfs_inject.oci.digest import check_digest
from cvmfs_inject.oci.jsondoc import canonical_json, parse_json
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.oci.model import REF_NAME, Descriptor, ImageConfig, Index, Manifest

OCI_LAYOUT_VERSION = "1.0.0"
TMP_NAME = ".cvmfs-inject-tmp"
CHUNK = 1 << 20
_EMPTY_INDEX = canonical_json({"schemaVersion": 2, "mediaType": MediaType.OCI_INDEX,
                               "manifests": []})
FLUSH_AFTER = 16 << 20  # blobs this large are written back while they are produced
FLUSH_INTERVAL = 0.25
# JSON documents are read whole; anything larger than this is not a manifest or config.
MAX_DOCUMENT = 64 << 20


def _fsync_dir(path: Path) -> None:
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
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


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

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        layout.tmp_dir.mkdir(exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix="blob-", dir=layout.tmp_dir)
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
        target = self._layout.blob_path(self.digest)
        # Replacing an existing blob (same digest) costs one rename and repairs a damaged copy.
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._tmp, target)
        _fsync_dir(target.parent)
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


@dataclass(frozen=True)
class GcResult:
    removed: list[tuple[str, int]]
    kept: int
    # (path under the temp area, size): what killed commands left behind
    temp_removed: list[tuple[str, int]] = field(default_factory=list)

    @property
    def bytes_removed(self) -> int:
        return sum(size for _, size in self.removed) + sum(s for _, s in self.temp_removed)


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
    """An OCI image layout directory. Open with `Layout.open` or `Layout.create`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path) -> Layout:
        path = Path(root)
        marker = path / "oci-layout"
        if not path.is_dir():
            hint = ""
            first = str(root).split("/", 1)[0]
            if "/" in str(root) and ("." in first or ":" in first):
                hint = f"; for a registry image write docker://{root}"
            raise InputError(f"{path}: no such layout directory{hint}")
        if not marker.is_file():
            raise InputError(f"{path}: not an OCI layout (no oci-layout file)")
        doc = parse_json(marker.read_bytes(), str(marker))
        if doc.get("imageLayoutVersion") != OCI_LAYOUT_VERSION:
            raise InputError(f"{marker}: unsupported imageLayoutVersion "
                             f"{doc.get('imageLayoutVersion')!r} (expected {OCI_LAYOUT_VERSION})")
        if not (path / "index.json").is_file():
            raise InputError(f"{path}: not an OCI layout (no index.json)")
        return cls(path)

    @classmethod
    def create(cls, root: str | Path) -> Layout:
        """Open the layout at `root`, creating an empty one if the directory is absent or empty."""
        path = Path(root)
        if (path / "oci-layout").exists():
            return cls.open(path)
        if path.exists() and (not path.is_dir() or not _interrupted_creation(path)):
            raise InputError(f"{path}: exists and is not an OCI layout; choose another path")
        path.mkdir(parents=True, exist_ok=True)
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        atomic_write(path / "index.json", _EMPTY_INDEX)
        atomic_write(path / "oci-layout",
                     canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION}))
        return cls(path)

    @property
    def tmp_dir(self) -> Path:
        return self.root / TMP_NAME

    # -- locking ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, exclusive: bool = True) -> Iterator[None]:
        """flock on the layout directory itself: writers exclusive, readers shared.

        Locking the directory (not a lock file) means a read or a failed command leaves no
        trace in the layout.
        """
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise InputError(f"{self.root}: cannot open layout: {exc.strerror}") from None
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockedError(f"{self.root}: layout is in use by another cvmfs-inject "
                                  "process; try again when it has finished") from None
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def writing(self) -> Iterator[Layout]:
        """The exclusive lock for a writing command; temp files are gone when it ends.

        Every writer holds this lock, so whatever is in the temp area when it is taken
        was left by a killed process and can go.
        """
        with self.lock(exclusive=True):
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            try:
                yield self
            finally:
                shutil.rmtree(self.tmp_dir, ignore_errors=True)

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

    def verify_blob(self, digest: str, size: int) -> None:
        with self.open_blob(digest, size) as reader:
            while reader.read(CHUNK):
                pass

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    def put_bytes(self, data: bytes, media_type: str) -> Descriptor:
        with self.writer() as writer:
            writer.write(data)
            return writer.commit().replace(media_type=media_type)

    def import_blob(self, source: Path, digest: str) -> None:
        """Move a file from a staging area in the same layout, checking its digest on the way."""
        path = self.blob_path(digest)
        with source.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            reader = VerifiedReader(handle, digest, size, str(source))
            while reader.read(CHUNK):
                pass
            reader.close()
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with source.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(source, path)
        _fsync_dir(path.parent)

    # -- typed documents -------------------------------------------------------------------
    def read_manifest(self, desc: Descriptor) -> Manifest:
        return Manifest.parse(self.read_blob(desc.digest, desc.size), self._where(desc),
                              desc.media_type)

    def read_index_blob(self, desc: Descriptor) -> Index:
        return Index.parse(self.read_blob(desc.digest, desc.size), self._where(desc),
                           desc.media_type)

    def read_config(self, desc: Descriptor) -> ImageConfig:
        return ImageConfig.parse(self.read_blob(desc.digest, desc.size), self._where(desc))

    def _where(self, desc: Descriptor) -> str:
        return f"{self.root}/blobs/{desc.digest.replace(':', '/', 1)}"

    # -- index.json ------------------------------------------------------------------------
    def read_index(self) -> Index:
        path = self.root / "index.json"
        return Index.parse(path.read_bytes(), str(path))

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
        doc = self.read_index().edit()
        annotations = {**desc.annotations, REF_NAME: tag}
        entry = desc.with_annotations(annotations).to_dict()
        kept = [d for d in doc["manifests"]
                if (d.get("annotations") or {}).get(REF_NAME) != tag]
        doc["manifests"] = [*kept, entry]
        self.write_index(doc)

    # -- garbage collection ----------------------------------------------------------------
    def reachable(self, roots: list[Descriptor] | None = None) -> dict[str, int]:
        """Digest → size of every blob reachable from `roots` (default: all of index.json)
        through indexes, manifests, configs and layers; documents are read verified."""
        from cvmfs_inject.layout.original import KEPT_ORIGINALS

        seen: dict[str, int] = {}
        stack = list(self.read_index().manifests if roots is None else roots)
        for desc in stack:  # original bytes kept beside an image (module `original`)
            for key in KEPT_ORIGINALS:
                digest = desc.annotations.get(key)
                if digest and self.has_blob(digest):
                    seen[digest] = self.blob_path(digest).stat().st_size
        while stack:
            desc = stack.pop()
            if desc.digest in seen:
                continue
            seen[desc.digest] = desc.size
            if MediaType.is_index(desc.media_type):
                stack.extend(self.read_index_blob(desc).manifests)
            elif MediaType.is_manifest(desc.media_type):
                manifest = self.read_manifest(desc)
                stack.append(manifest.config)
                stack.extend(manifest.layers)
                if isinstance(manifest.doc.get("subject"), dict):
                    stack.append(Descriptor.from_dict(manifest.doc["subject"], "subject"))
        return seen

    def check_present(self, desc: Descriptor) -> None:
        """Every blob `desc` reaches exists with its declared size (layers are not hashed:
        whoever reads them checks their digest)."""
        for digest, size in self.reachable([desc]).items():
            path = self.blob_path(digest)
            try:
                actual = path.stat().st_size
            except FileNotFoundError:
                raise NotFoundError(f"{self.root}: missing blob {digest}") from None
            if actual != size:
                raise IntegrityError(f"{path}: blob has {actual} bytes, its descriptor says "
                                     f"{size}")

    def gc(self, dry_run: bool = False) -> GcResult:
        """Delete unreachable blobs and leftover temp files. The caller holds the lock."""
        keep = self.reachable()
        removed: list[tuple[str, int]] = []
        for algorithm_dir in sorted((self.root / "blobs").iterdir()):
            if not algorithm_dir.is_dir():
                continue
            for blob in sorted(algorithm_dir.iterdir()):
                digest = f"{algorithm_dir.name}:{blob.name}"
                if digest in keep:
                    continue
                removed.append((digest, blob.stat().st_size))
                if not dry_run:
                    blob.unlink()
        temp_removed = []
        if self.tmp_dir.exists():
            temp_removed = [(str(path.relative_to(self.root)), path.lstat().st_size)
                            for path in sorted(self.tmp_dir.rglob("*")) if path.is_file()]
            if not dry_run:
                shutil.rmtree(self.tmp_dir)
        return GcResult(removed, len(keep), temp_removed)

    def staging(self) -> tempfile.TemporaryDirectory[str]:
        """A scratch directory on the layout's filesystem, so staged blobs can be renamed in."""
        self.tmp_dir.mkdir(exist_ok=True)
        return tempfile.TemporaryDirectory(prefix="stage-", dir=self.tmp_dir)

