"""Validate a layout (or one tag of it) as a whole: documents, descriptors and every blob.

Unlike the rest of the tool, validation does not stop at the first problem: it walks
everything reachable and collects every finding, so a user sees the whole damage at once.
"""

from __future__ import annotations

import json
from pathlib import Path

from cvmfs_inject.errors import CvmfsInjectError
from cvmfs_inject.image.refs import ImageRef
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.oci.model import Descriptor
from cvmfs_inject.oci.schema import Problem, check_descriptor, check_document

_CONFIG_FOR = {MediaType.DOCKER_MANIFEST: MediaType.DOCKER_CONFIG,
               MediaType.OCI_MANIFEST: MediaType.OCI_CONFIG}


class _Walker:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.problems: list[Problem] = []
        self.checked: set[str] = set()
        self.configs: dict[str, dict] = {}  # valid configs by digest, read once

    def where(self, digest: str) -> str:
        return f"{self.layout.root}/blobs/{digest.replace(':', '/', 1)}"

    def _blob(self, desc: Descriptor) -> bytes | None:
        """Check that the blob exists and matches; return its bytes when it is a document."""
        try:
            if MediaType.is_index(desc.media_type) or MediaType.is_manifest(desc.media_type) \
                    or desc.media_type in MediaType.CONFIGS:
                return self.layout.read_blob(desc.digest, desc.size)
            self.layout.verify_blob(desc.digest, desc.size)
        except CvmfsInjectError as exc:
            where = self.where(desc.digest)
            message = str(exc).removeprefix(f"{where}: ")
            self.problems.append(Problem(where, message))
        return None

    def descriptor(self, raw: object, where: str) -> Descriptor | None:
        if not isinstance(raw, dict):
            self.problems.append(Problem(where, "descriptor is not a JSON object"))
            return None
        found = check_descriptor(raw, where)
        self.problems.extend(found)
        if found:
            return None
        try:
            return Descriptor.from_dict(raw, where)
        except CvmfsInjectError as exc:
            self.problems.append(Problem(where, str(exc)))
            return None

    def walk(self, desc: Descriptor) -> None:
        if desc.digest in self.checked:
            return
        self.checked.add(desc.digest)
        data = self._blob(desc)
        if data is None:
            return
        where = self.where(desc.digest)
        kind = ("index" if MediaType.is_index(desc.media_type) else
                "manifest" if MediaType.is_manifest(desc.media_type) else "config")
        found = check_document(data, kind, media_type=desc.media_type, where=where)
        self.problems.extend(found)
        if found:
            return
        doc = json.loads(data)
        if kind == "index":
            for i, raw in enumerate(doc["manifests"]):
                child = self.descriptor(raw, f"{where} manifests[{i}]")
                if child is not None:
                    self.walk(child)
        elif kind == "manifest":
            self.manifest(desc, doc, where)
        else:
            self.configs[desc.digest] = doc

    def manifest(self, desc: Descriptor, doc: dict, where: str) -> None:
        config = self.descriptor(doc["config"], f"{where} config")
        manifest_type = doc.get("mediaType") or desc.media_type
        expected = _CONFIG_FOR.get(manifest_type)
        if config is not None and expected and config.media_type != expected:
            self.problems.append(Problem(f"{where} config", f"media type {config.media_type} "
                                         f"does not belong in a {manifest_type} manifest"))
        layers = [self.descriptor(raw, f"{where} layers[{i}]")
                  for i, raw in enumerate(doc["layers"])]
        if config is not None:
            self.walk(config)
            self._diff_ids(config, len(layers), where)
        for layer in layers:
            if layer is not None and layer.digest not in self.checked:
                self.checked.add(layer.digest)
                self._blob(layer)

    def _diff_ids(self, config: Descriptor, layer_count: int, where: str) -> None:
        doc = self.configs.get(config.digest)
        if doc is None:
            return  # the config itself is broken: already reported
        diff_ids = doc["rootfs"]["diff_ids"]
        if len(diff_ids) != layer_count:
            self.problems.append(Problem(where, f"manifest has {layer_count} layers but its "
                                         f"config has {len(diff_ids)} diff_ids"))


def validate_layout(ref: ImageRef) -> list[Problem]:
    """Every problem in the layout (all tags) or in the image one tag names."""
    layout = Layout.open(ref.path)
    walker = _Walker(layout)
    with layout.lock(exclusive=False):
        if ref.tag is None:
            for name, kind in (("oci-layout", "layout"), ("index.json", "index")):
                path = Path(layout.root) / name
                walker.problems.extend(check_document(path.read_bytes(), kind, where=str(path)))
            if walker.problems:
                return walker.problems
            index = json.loads((Path(layout.root) / "index.json").read_bytes())
            for i, raw in enumerate(index["manifests"]):
                desc = walker.descriptor(raw, f"{layout.root}/index.json manifests[{i}]")
                if desc is not None:
                    walker.walk(desc)
        else:
            walker.walk(layout.resolve(ref.tag))
    return walker.problems


__all__ = ["validate_layout"]
