"""The write side of the image model: a sink takes blobs first, then child manifests, then
the tag, atomically and last (umoci's `cas.Engine` contract, written on an image).

New content (a packed layer, edited configs and manifests) is first written into the
sink's local `store`: the layout itself, or a scratch layout for a registry. `publish` then
makes the sink hold a whole image, in the only order that keeps every reader safe: each
blob present before a manifest names it, each manifest before the index or tag naming it,
and the tag last, so until the tag moves nothing a reader can reach has changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from cvmfs_inject.image.source import ImageSource
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.oci.model import Descriptor
from cvmfs_inject.oci.refs import ImageRef
from cvmfs_inject.oci.walk import reading, walk


class ImageSink(Protocol):
    """What a backend (a layout, a registry) implements to be written.

    Every method but `set_tag` is idempotent: writing what is there already is a no-op,
    so a command that failed half-way can simply be run again.
    """

    @property
    def ref(self) -> ImageRef:
        """Where the image goes: the reference whose tag `set_tag` moves."""
        ...

    @property
    def store(self) -> Layout:
        """The local store new blobs and documents are written into before `publish`."""
        ...

    def prepare_check(self) -> None:
        """Load now what `check` needs, while the caller's other work runs (a stacked
        update calls it while its scan's helper walks)."""
        ...

    def check(self, documents: list[Descriptor], read: Callable[[Descriptor], bytes]) -> None:
        """Refuse new documents (`read` gives their bytes) this sink must not take (raise),
        before anything is written."""
        ...

    def put_blob(self, desc: Descriptor, source: ImageSource) -> None:
        """Make a blob present: from `store` when it is new, else from `source`."""
        ...

    def put_manifest(self, desc: Descriptor, raw: bytes) -> None:
        """Store a child manifest (or index) by digest, without tagging it."""
        ...

    def set_tag(self, desc: Descriptor, raw: bytes) -> None:
        """Point the reference's tag at `desc` (whose bytes are `raw`), atomically."""
        ...

    def holds(self, desc: Descriptor) -> bool:
        """Whether the reference's tag names `desc` already (then there is nothing to do)."""
        ...

    def current(self) -> ImageSource | None:
        """A source of the image the reference's tag names now; None when there is none."""
        ...


def publish(sink: ImageSink, source: ImageSource, top: Descriptor) -> None:
    """Make `sink` hold the image `top`: blobs first, then child manifests, then the tag.

    The image's documents are read from the sink's store where it has them (what an edit
    wrote) and from `source` otherwise. Base layers are never read: a sink that already
    has a blob skips it, and a registry sink mounts or streams the rest.
    """
    store = sink.store

    def read(desc: Descriptor) -> bytes:
        if store.has_blob(desc.digest):
            return store.read_blob(desc.digest, desc.size)
        return source.document(desc)

    def where(desc: Descriptor) -> str:
        return store.where(desc) if store.has_blob(desc.digest) else source.where(desc)

    order = [path.descriptor for path in walk([top], reading(read, where, subject=False))]
    is_manifest = [MediaType.is_index(d.media_type) or MediaType.is_manifest(d.media_type)
                   for d in order]
    blobs = [d for d, manifest in zip(order, is_manifest, strict=True) if not manifest]
    manifests = [d for d, manifest in zip(order, is_manifest, strict=True) if manifest]
    sink.check([d for d in order
                if MediaType.is_document(d.media_type) and store.has_blob(d.digest)], read)
    for desc in blobs:
        sink.put_blob(desc, source)
    for desc in manifests[:-1]:
        sink.put_manifest(desc, read(desc))
    sink.set_tag(top, read(top))
