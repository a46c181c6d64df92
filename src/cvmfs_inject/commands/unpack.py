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
from cvmfs_inject.image.edit import LABEL_MOUNT, injected_position
from cvmfs_inject.image.source import ImageSource, resolve
from cvmfs_inject.layout.blobs import READ_CHUNK
from cvmfs_inject.oci.refs import ImageRef
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

    def to_json(self) -> dict[str, Any]:
        if self.status == "empty":
            return {"status": "empty", "target": self.target,
                    "note": "the image has no injected layer yet"}
        return {"status": self.status, "target": self.target, "diff_id": self.diff_id,
                "entries": self.entries, "skipped": self.skipped}


def unpack(source: ImageSource, target: Path, *, force: bool = False,
           platform: str | None = None, mount_point: str | None = None,
           warn: Warn | None = None) -> UnpackReport:
    """Extract the injected layer of the (first selected) image of `source` into `target`."""
    image = resolve(source, platform).images[0]
    position, diff_id = injected_position(image.manifest, image.config,
                                          f"{source.ref} ({image.platform})")
    check_target(target, force)  # before a layer is downloaded
    if position is None:
        target.mkdir(parents=True, exist_ok=True)
        return UnpackReport("empty", str(target))
    layer = image.manifest.layers[position]
    mount = mount_point or image.config.labels.get(LABEL_MOUNT) or "/cvmfs"
    with source.open_blob(layer) as blob:
        stream = decompressed(cast(IO[bytes], blob), layer.media_type)
        try:
            result = extract_into(stream, target, mount, force=force, warn=warn)
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
    return UnpackReport("unpacked", str(target), diff_id, result.entries, result.skipped)


def unpack_ref(ref: ImageRef, target: Path, access: Access, *, force: bool = False,
               platform: str | None = None, mount_point: str | None = None,
               via_layout: bool = False, warn: Warn | None = None) -> UnpackReport:
    """`unpack` of any reference; a registry image is read registry-direct (only the
    injected layer is downloaded) unless `via_layout` copies the whole image first."""
    with backends.reading(ref, access, platform=platform, via_layout=via_layout) as source:
        return unpack(source, target, force=force, platform=platform,
                      mount_point=mount_point, warn=warn)
