"""One read model over a local layout and a remote registry: resolve a reference to its images.

A source implements only the core (the top descriptor, a manifest or index by descriptor,
a config by descriptor); walking an index into per-platform images is generic, so
`inspect`, `validate`, `inject` and `unpack` see the same shapes wherever the image lives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cvmfs_inject.errors import NotFoundError, UsageError
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.oci.model import (
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    platform_matches,
    platform_string,
)


class ImageSource(Protocol):
    def top(self) -> Descriptor: ...
    def manifest(self, desc: Descriptor) -> Manifest: ...
    def index(self, desc: Descriptor) -> Index: ...
    def config(self, manifest_desc: Descriptor, manifest: Manifest) -> ImageConfig: ...


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


class LayoutSource:
    def __init__(self, layout: Layout, tag: str | None) -> None:
        self.layout = layout
        self.tag = tag

    def top(self) -> Descriptor:
        return self.layout.resolve(self.tag)

    def manifest(self, desc: Descriptor) -> Manifest:
        return self.layout.read_manifest(desc)

    def index(self, desc: Descriptor) -> Index:
        return self.layout.read_index_blob(desc)

    def config(self, manifest_desc: Descriptor, manifest: Manifest) -> ImageConfig:
        return self.layout.read_config(manifest.config)


def is_image_entry(desc: Descriptor) -> bool:
    """Index entries that are runnable images (not attestations or other artifacts)."""
    platform = desc.platform or {}
    return MediaType.is_manifest(desc.media_type) and platform.get("os") != "unknown"


def load_images(source: ImageSource, top: Descriptor, platform: str | None = None
                ) -> tuple[Index | None, list[Image]]:
    """The index (if the top is one) and its images, restricted to `platform` when given."""
    if MediaType.is_manifest(top.media_type):
        manifest = source.manifest(top)
        image = Image(top, manifest, source.config(top, manifest))
        if platform and not platform_matches(_config_platform(image), platform):
            raise NotFoundError(f"image is {image.platform}, not {platform}")
        return None, [image]
    if not MediaType.is_index(top.media_type):
        raise UsageError(f"{top.digest}: media type {top.media_type} is not an image or index")
    index = source.index(top)
    images = []
    for desc in index.manifests:
        if MediaType.is_index(desc.media_type):
            raise UsageError(f"{top.digest}: nested indexes are not supported")
        if not is_image_entry(desc):
            continue
        if platform and not platform_matches(desc.platform, platform):
            continue
        manifest = source.manifest(desc)
        images.append(Image(desc, manifest, source.config(desc, manifest)))
    if not images:
        available = ", ".join(platform_string(d.platform) for d in index.manifests)
        raise NotFoundError(f"no image for platform {platform} in the index "
                            f"(it has: {available or 'none'})")
    return index, images


def _config_platform(image: Image) -> dict[str, str]:
    doc = image.config.doc
    return {k: v for k, v in (("os", doc.get("os")), ("architecture", doc.get("architecture")),
                              ("variant", doc.get("variant"))) if v}
