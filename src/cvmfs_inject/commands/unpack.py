"""unpack (the original tool's `prepare`): write the injected layer's content into a directory.

One path for every backend: the layer is opened from the source as a verified stream (a
layout's blob, or a registry download), read once, and extracted into a staging directory
that becomes the target's content only after the stream's digest checked out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from cvmfs_inject.errors import InputError
from cvmfs_inject.image import backends
from cvmfs_inject.image.access import Access
from cvmfs_inject.image.edit import LABEL_MOUNT, stack_of
from cvmfs_inject.image.source import ImageSource, resolve
from cvmfs_inject.layout.blobs import READ_CHUNK
from cvmfs_inject.oci.digest import verify_problem
from cvmfs_inject.oci.model import Descriptor
from cvmfs_inject.oci.refs import ImageRef
from cvmfs_inject.pack.extract import ExtractResult, extract
from cvmfs_inject.pack.inflate import decompressed
from cvmfs_inject.pack.options import Warn
from cvmfs_inject.pack.staging import check_target, extract_into


@dataclass(frozen=True)
class UnpackReport:
    status: str  # unpacked, or empty (the image has no injected layer yet)
    target: str
    diff_id: str | None = None
    entries: int = 0
    skipped: list[str] = field(default_factory=list)
    layers: int = 1  # the layers applied: more than one for a stack

    def to_json(self) -> dict[str, Any]:
        if self.status == "empty":
            return {"status": "empty", "target": self.target,
                    "note": "the image has no injected layer yet"}
        found = {"status": self.status, "target": self.target, "diff_id": self.diff_id,
                 "entries": self.entries, "skipped": self.skipped}
        if self.layers > 1:
            found["layers"] = self.layers
        return found


def unpack(source: ImageSource, target: Path, *, force: bool = False,
           platform: str | None = None, mount_point: str | None = None,
           warn: Warn | None = None) -> UnpackReport:
    """Extract the injected layer (the union of a stack's layers) of the (first selected)
    image of `source` into `target`."""
    image = resolve(source, platform).images[0]
    stack = stack_of(image.manifest, image.config, f"{source.ref} ({image.platform})")
    check_target(target, force)  # before a layer is downloaded
    if not stack.diff_ids:
        target.mkdir(parents=True, exist_ok=True)
        return UnpackReport("empty", str(target))
    for diff_id in stack.diff_ids:  # each is checked against the layer as it is read
        problem = verify_problem(diff_id)
        if problem is not None:
            raise InputError(f"{source.ref} ({image.platform}): diff_id {problem}")
    layers = image.manifest.layers[stack.position:stack.position + len(stack.diff_ids)]
    mount = mount_point or image.config.labels.get(LABEL_MOUNT) or "/cvmfs"

    def fill(staging: str) -> ExtractResult:
        result = ExtractResult()
        for i, layer in enumerate(layers):  # applied in order, as a runtime does
            done = _extract_layer(source, layer, stack.diff_ids[i], staging, mount, i > 0,
                                  warn)
            result.entries += done.entries
            result.skipped += done.skipped
            result.has_root = result.has_root or done.has_root
        return result

    result = extract_into(fill, target, force=force)
    return UnpackReport("unpacked", str(target), stack.diff_ids[-1], result.entries,
                        result.skipped, len(layers))


def _extract_layer(source: ImageSource, layer: Descriptor, diff_id: str, staging: str,
                   mount: str, whiteouts: bool, warn: Warn | None) -> ExtractResult:
    """One layer into `staging`; its blob checked against its digest, its tar stream
    against its diff_id (both before the staging directory is moved into place)."""
    with source.open_blob(layer) as blob:
        stream = decompressed(cast(IO[bytes], blob), layer.media_type, diff_id, layer.digest)
        try:
            return extract(stream, staging, mount, warn, whiteouts=whiteouts)
        except InputError:
            # A corrupted blob can break the stream before its end is reached; the rest is
            # read through the blob's verifier so the root cause is reported (exit 5).
            if stream is not blob:
                stream.close()  # the inflating thread stops reading first
            while blob.read(READ_CHUNK):
                pass
            raise
        finally:
            if stream is not blob:
                stream.close()


def unpack_ref(ref: ImageRef, target: Path, access: Access, *, force: bool = False,
               platform: str | None = None, mount_point: str | None = None,
               via_layout: bool = False, warn: Warn | None = None) -> UnpackReport:
    """`unpack` of any reference; a registry image is read registry-direct (only the
    injected layer is downloaded) unless `via_layout` copies the whole image first."""
    with backends.reading(ref, access, platform=platform, via_layout=via_layout) as source:
        return unpack(source, target, force=force, platform=platform,
                      mount_point=mount_point, warn=warn)
