"""The image model over a registry (the OCI distribution API): a source and a sink.

The source reads manifests and configs only; a layer is downloaded when a command opens it
(unpack, validate). The sink uploads new blobs from its scratch store, makes the others
present by mounting them (same registry) or streaming them across (another registry),
never by downloading them first, and writes the manifests last, the tag after all.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from cvmfs_inject.errors import InputError, NotFoundError, ValidationFailed
from cvmfs_inject.image.source import ImageSource
from cvmfs_inject.layout.blobs import READ_CHUNK
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.oci.model import Descriptor
from cvmfs_inject.oci.refs import ImageRef
from cvmfs_inject.oci.schema import check_document, preload
from cvmfs_inject.registry.client import RegistryClient
from cvmfs_inject.registry.ledger import BlobLedger

# upload_progress(total bytes) -> a context yielding a callback(bytes sent), or None
UploadProgress = Callable[[int], AbstractContextManager[Callable[[int], None] | None]]


@contextmanager
def no_progress(total: int) -> Iterator[None]:
    yield None


class ChunkReader(io.RawIOBase):
    """A file object over a verified chunk iterator of a blob of `size` bytes.

    The client checks size and digest after the last chunk; the reader asks for that
    check as soon as it holds the last byte, so, like a layout's reader, it raises before
    a consumer has seen the end of a corrupted blob.
    """

    def __init__(self, chunks: Iterator[bytes], size: int) -> None:
        super().__init__()
        self._chunks = chunks
        self._size = size
        self._seen = 0
        self._buffer = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._buffer:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._buffer = memoryview(chunk)
            self._seen += len(chunk)
            if self._seen == self._size:
                next(self._chunks, None)  # the client's end-of-blob check
        count = min(len(buffer), len(self._buffer))
        buffer[:count] = self._buffer[:count]
        self._buffer = self._buffer[count:]
        return count

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        super().close()


class RemoteSource:
    """An image in a registry: manifests by digest, configs and layers as blobs."""

    def __init__(self, client: RegistryClient, ref: ImageRef) -> None:
        self.client = client
        self.ref = ref
        self._documents: dict[str, bytes] = {}

    def top(self) -> Descriptor:
        reference = self.ref.digest or self.ref.tag or "latest"
        raw, media_type, digest = self.client.get_manifest(self.ref.repository, reference)
        if not (MediaType.is_index(media_type) or MediaType.is_manifest(media_type)):
            media_type = _sniff(raw, media_type)
        self._documents[digest] = raw
        return Descriptor(media_type, digest, len(raw))

    def document(self, desc: Descriptor) -> bytes:
        if not (MediaType.is_index(desc.media_type) or MediaType.is_manifest(desc.media_type)):
            return self.client.get_blob(self.ref.repository, desc.digest, desc.size)
        raw = self._documents.get(desc.digest)
        if raw is None:
            raw, _, _ = self.client.get_manifest(self.ref.repository, desc.digest)
            self._documents[desc.digest] = raw
        if len(raw) != desc.size:
            raise InputError(f"{self.ref}: manifest {desc.digest} has {len(raw)} bytes, "
                             f"its descriptor says {desc.size}")
        return raw

    def open_blob(self, desc: Descriptor) -> ChunkReader:
        chunks = self.client.open_blob(self.ref.repository, desc.digest, desc.size)
        return ChunkReader(chunks, desc.size)

    def where(self, desc: Descriptor) -> str:
        return f"{self.ref}@{desc.digest}"

    def tags(self) -> None:
        return None


def _sniff(raw: bytes, media_type: str) -> str:
    """Registries may answer with a generic Content-Type; the document's shape decides."""
    try:
        doc = json.loads(raw)
    except ValueError:
        raise InputError(f"registry returned a non-JSON manifest ({media_type})") from None
    declared = doc.get("mediaType") if isinstance(doc, dict) else None
    if isinstance(declared, str) and (MediaType.is_index(declared)
                                      or MediaType.is_manifest(declared)):
        return declared
    if isinstance(doc, dict) and "manifests" in doc:
        return MediaType.OCI_INDEX
    return MediaType.OCI_MANIFEST


class RegistrySink:
    """Writes an image into a registry repository; new blobs wait in a local scratch store.

    New documents are checked against our schemas before anything is uploaded: a registry
    is shared, and a bad manifest there is somebody else's problem at once.
    """

    def __init__(self, client: RegistryClient, ref: ImageRef, store: Layout,
                 upload_progress: UploadProgress = no_progress,
                 ledger: BlobLedger | None = None) -> None:
        self.client = client
        self.ref = ref
        self.store = store
        self._ledger = ledger or BlobLedger()
        self._upload_progress = upload_progress
        self._present: set[str] = set()
        self.uploaded = 0  # bytes of new blobs and of manifests sent

    def prepare_check(self) -> None:
        preload()

    def check(self, documents: list[Descriptor], read: Callable[[Descriptor], bytes]) -> None:
        problems = []
        for desc in documents:
            raw = read(desc)
            kind = ("index" if MediaType.is_index(desc.media_type) else
                    "manifest" if MediaType.is_manifest(desc.media_type) else "config")
            problems += check_document(raw, kind, media_type=desc.media_type,
                                       where=f"new {kind} {desc.digest}")
        if problems:
            raise ValidationFailed(f"{self.ref}: the injected image does not validate: "
                                   f"{problems[0]} ({len(problems)} problem(s))")

    def put_blob(self, desc: Descriptor, source: ImageSource) -> None:
        if desc.digest in self._present:
            return
        repo = self.ref.repository
        if self.store.has_blob(desc.digest):  # new: uploaded unless the registry has it
            registry = self.ref.registry
            with self._ledger.claim(registry, desc.digest) as holder:
                if not (holder and holder != repo
                        and self.client.mount_blob(repo, desc.digest, holder)):
                    with self._upload_progress(desc.size) as progress:
                        if self.client.push_blob(repo, self.store.blob_path(desc.digest),
                                                 desc.digest, desc.size, progress=progress):
                            self.uploaded += desc.size
                self._ledger.record(registry, desc.digest, repo)
        elif isinstance(source, RemoteSource):  # present, else mounted or streamed across
            self.client.copy_blob_from(source.client, source.ref.repository, repo,
                                       desc.digest, desc.size)
        else:
            self.client.push_stream(repo, lambda: _chunks(source, desc), desc.digest,
                                    desc.size, source.where(desc))
        self._present.add(desc.digest)

    def put_manifest(self, desc: Descriptor, raw: bytes) -> None:
        self.client.put_manifest(self.ref.repository, desc.digest, raw, desc.media_type)
        self.uploaded += len(raw)

    def current(self) -> RemoteSource | None:
        source = RemoteSource(self.client, self.ref)
        try:
            source.top()
        except NotFoundError:
            return None
        return source

    def holds(self, desc: Descriptor) -> bool:
        try:
            _, _, digest = self.client.get_manifest(self.ref.repository, self.ref.tag or "latest")
        except NotFoundError:
            return False
        return digest == desc.digest

    def set_tag(self, desc: Descriptor, raw: bytes) -> None:
        self.uploaded += len(raw)
        self.client.put_manifest(self.ref.repository, self.ref.tag or "latest", raw,
                                 desc.media_type)


def _chunks(source: ImageSource, desc: Descriptor) -> Iterator[bytes]:
    with source.open_blob(desc) as blob:
        while chunk := blob.read(READ_CHUNK):
            yield chunk
