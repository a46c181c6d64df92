"""The image model over a local OCI layout: a source that reads it, a sink that writes it."""

from __future__ import annotations

from collections.abc import Callable

from cvmfs_inject.errors import IntegrityError, UsageError
from cvmfs_inject.image.source import ImageSource
from cvmfs_inject.layout.annotations import forget_originals, unchanged_original
from cvmfs_inject.layout.blobs import READ_CHUNK, VerifiedReader
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.model import REF_NAME, Descriptor
from cvmfs_inject.oci.refs import ImageRef, check_tag


class LayoutSource:
    """An image in a layout, named by a tag (or the layout's only image)."""

    def __init__(self, layout: Layout, ref: ImageRef) -> None:
        self.layout = layout
        self.ref = ref

    def top(self) -> Descriptor:
        return self.layout.resolve(self.ref.tag)

    def document(self, desc: Descriptor) -> bytes:
        return self.layout.read_blob(desc.digest, desc.size)

    def open_blob(self, desc: Descriptor) -> VerifiedReader:
        return self.layout.open_blob(desc.digest, desc.size)

    def where(self, desc: Descriptor) -> str:
        return self.layout.where(desc)

    def tags(self) -> list[str]:
        return self.layout.tags()


class LayoutSink:
    """Writes an image into a layout: blobs straight into `blobs/`, the tag into index.json.

    New content is written into the layout itself (it is the sink's `store`), so publishing
    an edit of an image of the same layout only checks that each blob is there.
    """

    def __init__(self, layout: Layout, ref: ImageRef) -> None:
        if not ref.tag:
            raise UsageError(f"{ref}: name the tag to write, as DIR:TAG")
        check_tag(ref.tag, registry=False)
        self.layout = layout
        self.ref = ref
        self.tag = ref.tag

    @property
    def store(self) -> Layout:
        return self.layout

    def prepare_check(self) -> None:
        """Nothing to load: `check` reads nothing."""

    def check(self, documents: list[Descriptor], read: Callable[[Descriptor], bytes]) -> None:
        """A layout takes any document (nothing is read); `validate` is the place to judge
        them."""

    def put_blob(self, desc: Descriptor, source: ImageSource) -> None:
        """Copy a blob in from another source; an image of this layout has its blobs here
        already (or, like foreign layers skopeo does not copy, never had them: no matter)."""
        if isinstance(source, LayoutSource) and source.layout is self.layout:
            return
        path = self.layout.blob_path(desc.digest)
        if path.is_file():
            actual = path.stat().st_size
            if actual == desc.size:
                return
            raise IntegrityError(f"{path}: blob has {actual} bytes, its descriptor says "
                                 f"{desc.size}")
        with source.open_blob(desc) as blob, self.layout.writer() as writer:
            while chunk := blob.read(READ_CHUNK):
                writer.write(chunk)
            if writer.peek_digest() != desc.digest:  # a sha512 blob: the store names sha256
                raise IntegrityError(f"{source.where(desc)}: cannot store a {desc.digest} "
                                     "blob in a layout that names blobs by sha256")
            writer.commit()

    def put_manifest(self, desc: Descriptor, raw: bytes) -> None:
        if not self.layout.has_blob(desc.digest):
            self.layout.put_bytes(raw, desc.media_type)

    def current(self) -> LayoutSource | None:
        if self.tag not in self.layout.tags():
            return None
        return LayoutSource(self.layout, self.ref)

    def holds(self, desc: Descriptor) -> bool:
        return any(d.ref_name == self.tag and d.digest == desc.digest
                   for d in self.layout.read_index().manifests)

    def set_tag(self, desc: Descriptor, raw: bytes) -> None:
        """Point the tag at `desc`, keeping its annotations; the originals kept beside a
        pulled image (`commands.original`) stay named only while the tag names that image.
        A tag that already names exactly this is not written again."""
        self.put_manifest(desc, raw)  # the top document itself, when it came from elsewhere
        annotations = desc.annotations
        if not unchanged_original(desc):
            annotations = forget_originals(annotations)
        entry = desc.with_annotations({**annotations, REF_NAME: self.tag})
        current = [d.to_dict() for d in self.layout.read_index().manifests
                   if d.ref_name == self.tag]
        if current == [entry.to_dict()]:
            return
        self.layout.set_tag(self.tag, entry)
