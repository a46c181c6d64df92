"""inspect: what is in an image (tags, platforms, layers with diff_ids, labels, history),
read through the image model wherever the image lives. No layer is downloaded."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cvmfs_inject.errors import CvmfsInjectError
from cvmfs_inject.image import backends
from cvmfs_inject.image.access import Access
from cvmfs_inject.image.edit import LABEL_STACK, labelled_position, stack_of
from cvmfs_inject.image.source import Image, ImageSource, resolve
from cvmfs_inject.oci.refs import ImageRef


@dataclass(frozen=True)
class LayerInfo:
    media_type: str
    size: int
    digest: str
    diff_id: str | None


@dataclass(frozen=True)
class StackLayer:
    """One layer of a stack: its position, role (base, delta N) and what its history
    entry says it holds (files added, changed, removed)."""

    position: int
    role: str
    comment: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ImageInfo:
    image: Image
    layers: list[LayerInfo]
    injected: tuple[int, str] | None  # position and diff_id of the injected layer
    stack: list[StackLayer] = field(default_factory=list)  # a stack of two layers or more

    def to_json(self) -> dict[str, Any]:
        desc, manifest, config = self.image.descriptor, self.image.manifest, self.image.config
        return {
            "platform": self.image.platform,
            "manifest": {"mediaType": manifest.media_type, "digest": desc.digest,
                         "size": desc.size},
            "config": {"mediaType": manifest.config.media_type,
                       "digest": manifest.config.digest, "size": manifest.config.size,
                       "created": config.doc.get("created")},
            "layers": [{"mediaType": layer.media_type, "size": layer.size,
                        "digest": layer.digest, "diff_id": layer.diff_id}
                       for layer in self.layers],
            "labels": config.labels,
            "history": config.history,
            "injected": None if self.injected is None else {
                "position": self.injected[0], "diff_id": self.injected[1]},
            **({"stack": [layer.to_json() for layer in self.stack]} if self.stack else {}),
        }


@dataclass(frozen=True)
class InspectReport:
    reference: str
    media_type: str
    digest: str
    size: int
    tags: list[str] | None  # a layout's tags; a registry's are not listed
    annotations: dict[str, str]
    images: list[ImageInfo]
    index_entries: int | None  # entries of the index, when the reference names one

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"reference": self.reference, "mediaType": self.media_type,
                                 "digest": self.digest, "size": self.size}
        if self.tags is not None:
            found.update(tags=self.tags, annotations=self.annotations)
        found["images"] = [image.to_json() for image in self.images]
        if self.index_entries is not None:
            found["index"] = {"manifests": self.index_entries}
        return found


def inspect(source: ImageSource, platform: str | None = None) -> InspectReport:
    resolved = resolve(source, platform)
    top = resolved.top
    return InspectReport(
        str(source.ref), top.media_type, top.digest, top.size, source.tags(), top.annotations,
        [_describe(image) for image in resolved.images],
        None if resolved.index is None else len(resolved.index.manifests))


def _describe(image: Image) -> ImageInfo:
    diff_ids = image.config.diff_ids
    layers = [LayerInfo(layer.media_type, layer.size, layer.digest,
                        diff_ids[i] if i < len(diff_ids) else None)
              for i, layer in enumerate(image.manifest.layers)]
    position, diff_id = labelled_position(image.config, image.descriptor.digest)
    return ImageInfo(image, layers, None if position is None else (position, diff_id or ""),
                     _stack(image))


def _stack(image: Image) -> list[StackLayer]:
    """The stack's layers with their history comments; none for one layer, or for labels
    that do not match the layers (inspect shows them; the other commands refuse them)."""
    if LABEL_STACK not in image.config.labels:
        return []
    try:
        stack = stack_of(image.manifest, image.config, image.descriptor.digest)
    except CvmfsInjectError:
        return []
    history = image.config.history
    slots = [entry for entry in history if not entry.get("empty_layer")]
    aligned = len(slots) == len(image.config.diff_ids)
    return [StackLayer(stack.position + i, "base" if i == 0 else f"delta {i}",
                       str(slots[stack.position + i].get("comment", "")) if aligned else "")
            for i in range(len(stack.diff_ids))]


def inspect_ref(ref: ImageRef, access: Access, platform: str | None = None) -> InspectReport:
    """A layout image, a registry image (manifests and configs only), or an archive (read
    through skopeo's copy of it into a temporary layout, every platform, as `validate`
    does: a docker-archive is seen as the OCI image it converts to)."""
    archive = ref.transport not in ("oci", "docker")
    with backends.reading(ref, access, all_platforms=archive) as source:
        report = inspect(source, platform)
    if archive:  # the temporary layout's name and tags are not the archive's
        report = dataclasses.replace(report, reference=str(ref), tags=None)
    return report
