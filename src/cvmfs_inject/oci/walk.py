"""One walk over the descriptor graph (umoci's `casext.Walk` and `DescriptorPath`).

gc, validate, publishing an image, the Docker-layer check and resolving a reference to its
images all need "every descriptor reachable from here, once". They differ only in how a node
is read and which children it has, so that is what they pass in: `expand`. The walk itself
knows no storage; `document_children` is the standard reading of index and manifest bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.oci.model import Descriptor, Index, Manifest


@dataclass(frozen=True)
class DescriptorPath:
    """The descriptors from a walk's root down to one descriptor, the root first."""

    descriptors: tuple[Descriptor, ...]

    @property
    def descriptor(self) -> Descriptor:
        return self.descriptors[-1]

    @property
    def parent(self) -> Descriptor | None:
        return self.descriptors[-2] if len(self.descriptors) > 1 else None

    def child(self, desc: Descriptor) -> DescriptorPath:
        return DescriptorPath((*self.descriptors, desc))


# Read and check one node; return its children ([]: go no deeper). It may raise to stop.
Expand = Callable[[DescriptorPath], Iterable[Descriptor]]


def walk(roots: Iterable[Descriptor], expand: Expand) -> list[DescriptorPath]:
    """Every descriptor reachable from `roots`, each digest once, children before parents.

    `expand` is called once per digest, when the walk first reaches it (pre-order), so
    checks run in document order. The result is in post-order, siblings in document order:
    each path comes after every path below it, which is the order to write an image bottom
    up (blobs, then the manifests naming them, then the index). The walk keeps its own
    stack, so a deep (hostile) graph cannot exhaust Python's recursion limit.
    """
    seen: set[str] = set()
    order: list[DescriptorPath] = []
    for root in roots:
        if root.digest in seen:
            continue
        seen.add(root.digest)
        start = DescriptorPath((root,))
        stack: list[tuple[DescriptorPath, Iterator[Descriptor]]] = [
            (start, iter(tuple(expand(start))))]
        while stack:
            path, children = stack[-1]
            for child in children:
                if child.digest not in seen:
                    seen.add(child.digest)
                    below = path.child(child)
                    stack.append((below, iter(tuple(expand(below)))))
                    break
            else:
                stack.pop()
                order.append(path)
    return order


def document_children(desc: Descriptor, raw: bytes, where: str, *,
                      subject: bool = True) -> list[Descriptor]:
    """The descriptors an index or manifest names (with the manifest's `subject` when
    asked: gc keeps what a referrer points at, publishing an image does not copy it)."""
    if MediaType.is_index(desc.media_type):
        return Index.parse(raw, where, desc.media_type).manifests
    if MediaType.is_manifest(desc.media_type):
        manifest = Manifest.parse(raw, where, desc.media_type)
        found = [manifest.config, *manifest.layers]
        if subject and isinstance(manifest.doc.get("subject"), dict):
            found.append(Descriptor.from_dict(manifest.doc["subject"], f"{where} subject"))
        return found
    return []


def reading(read: Callable[[Descriptor], bytes], where: Callable[[Descriptor], str], *,
            subject: bool = True) -> Expand:
    """The standard `expand`: read index and manifest documents, name their children."""

    def expand(path: DescriptorPath) -> list[Descriptor]:
        desc = path.descriptor
        if not (MediaType.is_index(desc.media_type) or MediaType.is_manifest(desc.media_type)):
            return []
        return document_children(desc, read(desc), where(desc), subject=subject)

    return expand
