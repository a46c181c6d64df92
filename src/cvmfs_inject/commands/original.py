"""Keep a Docker v2s2 image's own manifest and config, so an unchanged image goes back out
byte for byte.

A layout holds OCI manifests, so `pull` lets skopeo convert a v2s2 image, and skopeo
re-serialises the config on the way (fields Docker writes and OCI does not know are
lost, and the digests change). When the layers are the same blobs either way, the original
manifest and config are stored beside the converted image and named by annotations on
its index.json entry; `push --format keep` of the image, still unchanged, then hands skopeo
those original bytes (through a `dir:` view) with `--preserve-digests`. Once the image is
injected the annotations are dropped: a changed image is converted like any other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from cvmfs_inject import scratch
from cvmfs_inject.errors import CvmfsInjectError
from cvmfs_inject.layout.annotations import (
    SOURCE_CONFIG,
    SOURCE_MANIFEST,
    SOURCE_OF,
)
from cvmfs_inject.layout.gc import check_present
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.digest import sha256_digest
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.oci.model import Descriptor, Manifest
from cvmfs_inject.oci.refs import ImageRef
from cvmfs_inject.skopeo.command import Skopeo


def keep(layout: Layout, src: ImageRef, skopeo: Skopeo, converted: Descriptor,
         manifest_raw: bytes) -> dict[str, str]:
    """Store the original manifest and config; the annotations that name them, or {}."""
    try:
        manifest = Manifest.parse(manifest_raw, str(src))
    except CvmfsInjectError:
        return {}
    if manifest.media_type != MediaType.DOCKER_MANIFEST:
        return {}
    if not all(layout.has_blob(layer.digest) for layer in manifest.layers):
        return {}  # skopeo changed the layers (e.g. recompressed): nothing to keep
    config_raw = skopeo.inspect_raw(src, config=True)
    if sha256_digest(config_raw) != manifest.config.digest:
        return {}
    stored_manifest = layout.put_bytes(manifest_raw, MediaType.DOCKER_MANIFEST)
    stored_config = layout.put_bytes(config_raw, MediaType.DOCKER_CONFIG)
    return {SOURCE_MANIFEST: stored_manifest.digest, SOURCE_CONFIG: stored_config.digest,
            SOURCE_OF: converted.digest}


@contextlib.contextmanager
def view(layout: Layout, desc: Descriptor) -> Iterator[ImageRef]:
    """A skopeo `dir:` image of the original bytes; its blobs link into the layout."""
    annotations = desc.annotations
    manifest_digest = annotations[SOURCE_MANIFEST]
    raw = layout.read_blob(manifest_digest, layout.blob_path(manifest_digest).stat().st_size)
    manifest = Manifest.parse(raw, manifest_digest, MediaType.DOCKER_MANIFEST)
    check_present(layout, Descriptor(MediaType.DOCKER_MANIFEST, manifest_digest, len(raw)))
    with scratch.temporary_directory("original") as directory:
        root = Path(directory)
        (root / "version").write_text("Directory Transport Version: 1.1\n")
        (root / "manifest.json").write_bytes(raw)
        for blob in [manifest.config, *manifest.layers]:
            (root / blob.digest.split(":", 1)[1]).symlink_to(
                layout.blob_path(blob.digest).absolute())
        yield ImageRef("dir", directory)
