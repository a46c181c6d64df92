"""The read side of the image model: a source resolves a reference to its per-platform images
and opens blobs verified, whatever the backend.

A backend implements only a small core (ggcr's `partial` cores): the descriptor its
reference names, the bytes of a document, a verified stream of a blob, and where a blob is
for messages. Everything else (parsing, an index's entries as platforms) is generic, so
`inspect`, `validate`, `inject` and `unpack` see the same shapes wherever the image lives.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Protocol

from cvmfs_inject.errors import NotFoundError, UsageError
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.oci.model import (
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    platform_matches,
    platform_string,
)
from cvmfs_inject.oci.refs import ImageRef


class ImageSource(Protocol):
    """What a backend (a layout, a registry) implements to be read."""

    @property
    def ref(self) -> ImageRef:
        """The reference this source reads (with the tag it resolved, for a layout)."""
        ...

    def top(self) -> Descriptor:
        """The descriptor the reference names: a manifest or an index."""
        ...

    def document(self, desc: Descriptor) -> bytes:
        """The bytes of an index, manifest or config, checked against size and digest."""
        ...

    def open_blob(self, desc: Descriptor) -> io.RawIOBase:
        """A stream of a blob that raises IntegrityError at its end if the bytes read do
        not match the descriptor's size and digest; close it when done."""
        ...

    def where(self, desc: Descriptor) -> str:
        """Where the blob is, for messages."""
        ...

    def tags(self) -> list[str] | None:
        """The tags beside this image, where the backend can list them cheaply."""
        ...


@dataclass(frozen=True)
class Image:
    """One platform's image: the descriptor naming its manifest, the manifest, the config."""

    descriptor: Descriptor
    manifest: Manifest
    config: ImageConfig

    @property
    def platform(self) -> str:
        platform = self.descriptor.platform
        if platform:
            return platform_string(platform)
        doc = self.config.doc
        return platform_string({"os": doc.get("os"), "architecture": doc.get("architecture"),
                                "variant": doc.get("variant")})

    def config_platform(self) -> dict[str, str]:
        doc = self.config.doc
        return {key: doc[key] for key in ("os", "architecture", "variant") if doc.get(key)}


@dataclass(frozen=True)
class Resolved:
    """What a reference names: its top descriptor, the index (if it is one), its images."""

    top: Descriptor
    index: Index | None
    images: list[Image]


def read_manifest(source: ImageSource, desc: Descriptor) -> Manifest:
    return Manifest.parse(source.document(desc), source.where(desc), desc.media_type)


def read_index(source: ImageSource, desc: Descriptor) -> Index:
    return Index.parse(source.document(desc), source.where(desc), desc.media_type)


def read_config(source: ImageSource, manifest: Manifest) -> ImageConfig:
    config = manifest.config
    return ImageConfig.parse(source.document(config), source.where(config))


def read_image(source: ImageSource, desc: Descriptor) -> Image:
    manifest = read_manifest(source, desc)
    return Image(desc, manifest, read_config(source, manifest))


def is_image_entry(desc: Descriptor) -> bool:
    """Index entries that are runnable images (not attestations or other artifacts)."""
    platform = desc.platform or {}
    return MediaType.is_manifest(desc.media_type) and platform.get("os") != "unknown"


def check_platform(image: Image, wanted_platforms: list[str], name: ImageRef) -> None:
    """A single image asked for platforms: each one must be its own, as each must be in
    an index (NotFoundError). A config without a variant matches any variant of its
    architecture: many arm64 configs name none where their index entry says v8."""
    own = image.config_platform()
    for wanted in wanted_platforms:
        if not own.get("variant"):
            wanted = "/".join(wanted.split("/")[:2])
        if not platform_matches(own, wanted):
            raise NotFoundError(f"{name}: the image is {image.platform}, not {wanted} (it "
                                "is not an index of platforms)")


def resolve(source: ImageSource, platform: str | None = None) -> Resolved:
    """The top descriptor and its images, restricted to `platform` (OS/ARCH[/VARIANT])."""
    top = source.top()
    wanted_platforms = platform.split(",") if platform else []
    if MediaType.is_manifest(top.media_type):
        image = read_image(source, top)
        check_platform(image, wanted_platforms, source.ref)
        return Resolved(top, None, [image])
    if not MediaType.is_index(top.media_type):
        raise UsageError(f"{top.digest}: media type {top.media_type} is not an image or index")
    index = read_index(source, top)
    if any(MediaType.is_index(desc.media_type) for desc in index.manifests):
        raise UsageError(f"{top.digest}: nested indexes are not supported")
    entries = [desc for desc in index.manifests if is_image_entry(desc)]
    for wanted in wanted_platforms:
        if not any(platform_matches(desc.platform, wanted) for desc in entries):
            available = ", ".join(platform_string(d.platform) for d in index.manifests)
            raise NotFoundError(f"{source.ref}: no image for platform {wanted} in the index "
                                f"(it has: {available or 'none'})")
    images = [read_image(source, desc) for desc in entries
              if not platform or platform_matches(desc.platform, platform)]
    if not images:
        raise NotFoundError("the index has no image (only attestations or other artifacts)")
    return Resolved(top, index, images)
