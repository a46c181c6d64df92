"""push: copy a layout image out to a registry or an archive, through skopeo.

Archives appear atomically (a temp file beside them, renamed when skopeo succeeded); a
Docker v2s2 destination is refused up front when a layer cannot be Docker; an image still
as it was pulled goes back with its original bytes (`layout.original`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from cvmfs_inject import scratch
from cvmfs_inject.commands import original
from cvmfs_inject.errors import UsageError
from cvmfs_inject.image.access import Access
from cvmfs_inject.layout.annotations import SOURCE_FORMAT, unchanged_original
from cvmfs_inject.layout.archive import DeltaArchive, image_blobs, write_delta
from cvmfs_inject.layout.gc import check_present, check_sizes
from cvmfs_inject.layout.store import OCI_LAYOUT_VERSION, Layout
from cvmfs_inject.oci.jsondoc import canonical_json
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.oci.model import Descriptor
from cvmfs_inject.oci.refs import ImageRef
from cvmfs_inject.oci.walk import reading, walk
from cvmfs_inject.paths import enclosing_layout

FORMATS = ("oci", "v2s2", "keep")


def check_format(fmt: str, dest: ImageRef) -> None:
    """Refuse a format the destination cannot hold, before any work."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: use oci, v2s2 or keep")
    if dest.transport == "oci-archive" and fmt == "v2s2":
        raise UsageError(f"--format v2s2 into {dest}: an oci-archive holds OCI manifests "
                         "(skopeo cannot find a Docker one in it by its tag); use "
                         "docker-archive: for a Docker image")
    if dest.transport == "docker-archive" and fmt == "oci":
        raise UsageError(f"--format oci into {dest}: a docker-archive holds Docker v2s2 "
                         "manifests; use oci-archive: for an OCI image")


def _skopeo_format(fmt: str, desc: Descriptor, dest: ImageRef) -> str | None:
    """skopeo's --format for `fmt`. An oci-archive holds OCI manifests: skopeo finds an
    image in one by its tag only when the manifest is OCI, so `keep` writes OCI there."""
    check_format(fmt, dest)
    if dest.transport == "oci-archive":
        return None
    if fmt == "keep":
        kept = desc.annotations.get(SOURCE_FORMAT)
        return "v2s2" if kept == "v2s2" else None
    return fmt


def push(src: ImageRef, dest: ImageRef, access: Access, *, manifest_format: str = "keep"
         ) -> str:
    """Copy a layout image out to a registry or an archive; archives appear atomically.

    Returns the digest of the manifest as written at the destination (it differs from the
    layout's when the format is converted), as skopeo reports it.
    """
    if src.transport != "oci":
        raise UsageError(f"push reads a local layout; {src} is not oci:DIR[:TAG]")
    if dest.transport == "oci":
        raise UsageError(f"push to another layout: use a docker://, docker-archive: or "
                         f"oci-archive: destination, not {dest}")
    layout = Layout.open(src.path, access.layout_wait)
    skopeo = access.skopeo(src, dest)
    with layout.lock(exclusive=False), scratch.temporary_directory("push") as directory:
        digestfile = Path(directory) / "digest"
        desc = layout.resolve(src.tag)
        fmt = _skopeo_format(manifest_format, desc, dest)
        is_index = MediaType.is_index(desc.media_type)
        if is_index and dest.transport == "docker-archive":
            raise UsageError(f"{src} is a multi-platform index; docker-archive holds one image: "
                             "push one platform by its own tag, or use oci-archive:")
        # what skopeo copies (not a manifest's subject), walked once: present, and of what types
        expand = reading(lambda d: layout.read_blob(d.digest, d.size), layout.where,
                         subject=False)
        reached = [path.descriptor for path in walk([desc], expand)]
        check_sizes(layout, {d.digest: d.size for d in reached})
        if fmt == "v2s2" or dest.transport == "docker-archive":
            _check_docker_layers(reached, src, dest)
        if manifest_format == "keep" and dest.is_registry and unchanged_original(desc):
            with original.view(layout, desc) as source:
                skopeo.copy(source, dest, preserve_digests=True, digestfile=digestfile)
        else:
            keep = _keeps_format(fmt, reached, dest)
            with _skopeo_view(layout, src, desc) as source:
                if dest.transport == "docker":
                    skopeo.copy(source, dest, all_images=is_index, manifest_format=fmt,
                                preserve_digests=keep, digestfile=digestfile)
                else:
                    with _archive_target(dest) as tmp_dest:
                        skopeo.copy(source, tmp_dest, all_images=is_index,
                                    manifest_format=fmt, preserve_digests=keep,
                                    digestfile=digestfile)
        pushed = digestfile.read_text().strip() if digestfile.exists() else ""
        return pushed or desc.digest


def push_delta(src: ImageRef, dest: ImageRef, since: ImageRef, access: Access
               ) -> tuple[Descriptor, DeltaArchive]:
    """Write a delta archive: `src` as an oci-archive without the layers `since` has
    (`layout.archive`); it appears atomically, like every archive we write."""
    if src.transport != "oci" or since.transport != "oci":
        raise UsageError(f"push --since compares two local layout images; {src} and {since} "
                         "must both be oci:DIR[:TAG]")
    if dest.transport != "oci-archive":
        raise UsageError(f"push --since writes a delta archive: the destination must be "
                         f"oci-archive:FILE[:TAG], not {dest}")
    layout = Layout.open(src.path, access.layout_wait)
    old_layout = Layout.open(since.path, access.layout_wait)
    with layout.lock(exclusive=False), contextlib.ExitStack() as stack:
        if old_layout.root.resolve() != layout.root.resolve():
            stack.enter_context(old_layout.lock(exclusive=False))
        desc = layout.resolve(src.tag)
        old_desc = old_layout.resolve(since.tag)
        check_present(layout, desc)
        old = {d.digest for d in image_blobs(old_layout, old_desc)[0]}
        with _archive_target(dest) as tmp_dest:  # the old image by its tag: no local paths
            delta = write_delta(layout, desc, dest.tag, old_desc, old_desc.ref_name or "", old,
                                Path(tmp_dest.path))
    return desc, delta


def _keeps_format(fmt: str | None, reached: list[Descriptor], dest: ImageRef) -> bool:
    """Whether the image goes out with every manifest in its own format, so that skopeo
    must keep every digest (`--preserve-digests`). Without it skopeo compresses an
    uncompressed layer, and may put in a blob it knows with the same content (a gzip one
    for our zstd layer, from its blob cache or the registry), changing the image it was
    given. A docker-archive stores its layers uncompressed: digests change there; so they
    do where a manifest is converted (skopeo would then keep the unconverted one)."""
    if dest.transport == "docker-archive":
        return False
    family = "oci" if dest.transport == "oci-archive" else fmt
    if family is None:  # skopeo keeps each manifest's own format
        return True
    return all(MediaType.is_docker(d.media_type) == (family == "v2s2") for d in reached
               if MediaType.is_manifest(d.media_type) or MediaType.is_index(d.media_type))


def _check_docker_layers(reached: list[Descriptor], src: ImageRef, dest: ImageRef) -> None:
    """Docker v2s2 carries gzip layers, and a docker-archive uncompressed ones (skopeo
    decompresses gzip there) but not zstd: say so before skopeo fails half-way."""
    archive = dest.transport == "docker-archive"
    refused = {MediaType.OCI_LAYER_ZSTD} if archive else {MediaType.OCI_LAYER_ZSTD,
                                                          MediaType.OCI_LAYER}
    found = sorted({d.media_type for d in reached} & refused)
    if found:
        remedy = ("inject with --compress gzip or none, or push to oci-archive:" if archive
                  else "push with --format oci (to a registry or oci-archive:), or inject "
                       "with --compress gzip")
        raise UsageError(f"{src} has {' and '.join(found)} layers, which a Docker v2s2 "
                         f"image cannot carry: {remedy}")


@contextlib.contextmanager
def _skopeo_view(layout: Layout, src: ImageRef, desc: Descriptor) -> Iterator[ImageRef]:
    """The reference skopeo should read.

    skopeo 1.9 looks a tag up only among index.json entries with OCI media types, so an
    image whose entry has a Docker media type is shown to it as the single, untagged entry
    of a throw-away layout that shares the blobs directory.
    """
    if not MediaType.is_docker(desc.media_type):
        yield ImageRef("oci", src.path, src.tag or desc.ref_name)
        return
    with scratch.temporary_directory("view") as view:
        root = Path(view)
        layout_file = {"imageLayoutVersion": OCI_LAYOUT_VERSION}
        (root / "oci-layout").write_bytes(canonical_json(layout_file))
        entry = desc.with_annotations({}).to_dict()
        (root / "index.json").write_bytes(canonical_json(
            {"schemaVersion": 2, "mediaType": MediaType.OCI_INDEX, "manifests": [entry]}))
        (root / "blobs").symlink_to((layout.root / "blobs").absolute())
        yield ImageRef("oci", view, None)


def archive_path(dest: ImageRef) -> Path:
    """The file an archive destination names, refused (UsageError) when writing it would
    not be writing an archive: a directory, a missing directory, or a place inside an OCI
    layout (`docker-archive:LAYOUT/index.json` would replace the layout's index)."""
    target = Path(dest.path).resolve()
    if target.is_dir():
        raise UsageError(f"{dest.path}: is a directory; name the archive file to write")
    if not target.parent.is_dir():
        raise UsageError(f"{target.parent}: no such directory for the archive")
    if target.exists() and not target.is_file():
        raise UsageError(f"{dest.path}: exists and is not a regular file; name the archive "
                         "file to write")
    layout = enclosing_layout(target)
    if layout is not None:
        raise UsageError(f"{dest.path}: is inside the OCI layout {layout}; write archives "
                         "outside of layouts")
    return target


@contextlib.contextmanager
def _archive_target(dest: ImageRef) -> Iterator[ImageRef]:
    """A temp file beside the archive, renamed over it only when skopeo succeeded."""
    target = archive_path(dest)
    fd, tmp = scratch.make_file("archive", target.parent, before=f".{target.name}.",
                                suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)  # skopeo creates the file itself
    try:
        yield ImageRef(dest.transport, tmp, dest.tag)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
