"""Write edited images bottom-up (umoci's `mutate.Commit`): each new config, then the
manifest naming it, then the index naming the manifests; the new top descriptor results.

Everything goes into a store and nothing is tagged: making the result visible is the sink's
last step (`image.sink.publish`). Unchanged documents are not rewritten, so their bytes, and
the digests naming them, stay exactly as they were.
"""

from __future__ import annotations

from cvmfs_inject.image.edit import EditResult, with_config
from cvmfs_inject.image.source import Resolved
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.jsondoc import canonical_json
from cvmfs_inject.oci.model import Descriptor, Index


def commit(store: Layout, resolved: Resolved, edits: dict[str, EditResult | None]
           ) -> tuple[Descriptor, dict[str, Descriptor]]:
    """Write every edit; return the new top and, by old manifest digest, the new manifests.

    `edits` maps the digest of each image's manifest to its edit, or None to keep it.
    """
    replaced: dict[str, Descriptor] = {}
    for image in resolved.images:
        edit = edits.get(image.descriptor.digest)
        if edit is None:
            continue
        config = store.put_bytes(canonical_json(edit.config), image.manifest.config.media_type)
        manifest = store.put_bytes(canonical_json(with_config(edit.manifest, config)),
                                   image.manifest.media_type)
        replaced[image.descriptor.digest] = image.descriptor.replace(
            digest=manifest.digest, size=manifest.size)
    top = resolved.top
    if resolved.index is None:
        new = replaced.get(top.digest, top)
        return top.replace(digest=new.digest, size=new.size), replaced
    return _rewrite_index(store, top, resolved.index, replaced), replaced


def _rewrite_index(store: Layout, top: Descriptor, index: Index,
                   replaced: dict[str, Descriptor]) -> Descriptor:
    """The index with its replaced children, written; the top descriptor pointing at it."""
    if not replaced:
        return top
    doc = index.edit()
    for entry in doc["manifests"]:
        new = replaced.get(entry.get("digest"))
        if new is not None:
            entry["digest"], entry["size"] = new.digest, new.size
    desc = store.put_bytes(canonical_json(doc), index.media_type)
    return top.replace(digest=desc.digest, size=desc.size)
