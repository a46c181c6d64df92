"""validate: every problem of a layout, of an image wherever it lives, or of one document.

Unlike the rest of the tool, validation does not stop at the first problem: it walks
everything reachable (the one descriptor walk, over any source) and collects every
finding, so a user sees the whole damage at once. Every blob is read through the source's
verified reader, so a layer that does not match its digest is a finding too.

A document may name content by any digest the spec's grammar allows; content whose
algorithm we cannot compute (not sha256 or sha512) is not read, and is one finding: "cannot
verify", since the claim that every blob matches its descriptor cannot be made for it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvmfs_inject.errors import CvmfsInjectError
from cvmfs_inject.image import backends
from cvmfs_inject.image.access import Access
from cvmfs_inject.image.layout import LayoutSource
from cvmfs_inject.image.source import ImageSource
from cvmfs_inject.layout.blobs import READ_CHUNK
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.digest import verify_problem
from cvmfs_inject.oci.jsondoc import parse_json
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.oci.model import REF_NAME, Descriptor
from cvmfs_inject.oci.refs import ImageRef
from cvmfs_inject.oci.schema import Problem, check_descriptor, check_document
from cvmfs_inject.oci.walk import DescriptorPath, walk
from cvmfs_inject.pack.inflate import is_tar_layer, tar_digests


@dataclass(frozen=True)
class _ManifestShape:
    where: str
    config: Descriptor | None
    layers: list[str | None]  # each layer's digest, as the manifest lists them


class _Checker:
    """The walk's `expand` for validation: read and check one node, record what is wrong,
    and name as children only the descriptors that are sound enough to follow."""

    def __init__(self, source: ImageSource, packed: Mapping[str, str] | None = None) -> None:
        self.source = source
        # layers this command packed (digest -> diff_id, hashed while packing): their blob
        # is still read and checked, their tar stream is not hashed again
        self.packed = packed or {}
        self.problems: list[Problem] = []
        self.configs: dict[str, dict[str, Any]] = {}  # sound configs by digest, read once
        self.manifests: list[_ManifestShape] = []
        self.layer_digests: set[str] = set()  # blobs some manifest names as a layer
        # a layer's digest -> its tar stream's digests by algorithm, and the algorithms
        # the configs read so far want for it (a config is read before its layers)
        self.tar_digests: dict[str, dict[str, str]] = {}
        self.wanted: dict[str, set[str]] = {}
        self.config_layers: dict[str, list[list[str | None]]] = {}  # per manifest naming it
        self.layers_read: dict[str, Descriptor] = {}  # to hash again in a late algorithm
        self.reached: set[str] = set()  # every digest the walk came to

    def __call__(self, path: DescriptorPath) -> list[Descriptor]:
        desc = path.descriptor
        data = self._read(desc)
        if data is None:
            return []
        where = self.source.where(desc)
        kind = ("index" if MediaType.is_index(desc.media_type) else
                "manifest" if MediaType.is_manifest(desc.media_type) else "config")
        found = check_document(data, kind, media_type=desc.media_type, where=where)
        self.problems.extend(found)
        if found:
            return []
        doc = json.loads(data)
        if kind == "index":
            return self.descriptors(doc["manifests"], f"{where} manifests")
        if kind == "manifest":
            return self._manifest(doc, where)
        self.configs[desc.digest] = doc
        for layers in self.config_layers.get(desc.digest, []):
            for layer, diff_id in zip(layers, doc["rootfs"]["diff_ids"], strict=False):
                if layer is not None and verify_problem(diff_id) is None:
                    self.wanted.setdefault(layer, set()).add(diff_id.partition(":")[0])
        return []

    def _read(self, desc: Descriptor) -> bytes | None:
        """A document's bytes; a layer is read through (checked), giving None. Content named
        by a digest we cannot verify is not read: that is the one problem reported."""
        where = self.source.where(desc)
        self.reached.add(desc.digest)
        unverifiable = verify_problem(desc.digest)
        if unverifiable is not None:
            self.problems.append(Problem(where, unverifiable))
            return None
        try:
            if MediaType.is_document(desc.media_type):
                return self.source.document(desc)
            layer = desc.digest in self.layer_digests and is_tar_layer(desc.media_type)
            packed = self.packed.get(desc.digest) if layer else None  # its diff_id
            if layer:
                self.layers_read[desc.digest] = desc
            with self.source.open_blob(desc) as blob:
                if layer and packed is None:
                    self.tar_digests[desc.digest] = tar_digests(
                        blob, desc.media_type, self.wanted.get(desc.digest, {"sha256"}))
                else:
                    while blob.read(READ_CHUNK):
                        pass
            if packed is not None:  # its blob read through: the diff_id packing hashed
                self.tar_digests[desc.digest] = {packed.partition(":")[0]: packed}
        except CvmfsInjectError as exc:
            self.problems.append(Problem(where, str(exc).removeprefix(f"{where}: ")))
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
            return Descriptor.from_dict(raw, where, verifiable=False)
        except CvmfsInjectError as exc:
            self.problems.append(Problem(where, str(exc).removeprefix(f"{where}: ")))
            return None

    def descriptors(self, raws: list[Any], where: str) -> list[Descriptor]:
        found = [self.descriptor(raw, f"{where}[{i}]") for i, raw in enumerate(raws)]
        return [desc for desc in found if desc is not None]

    def _manifest(self, doc: dict[str, Any], where: str) -> list[Descriptor]:
        """A manifest's config and layers. An OCI config of another media type (an artifact's)
        is arbitrary data to the spec, read through like a layer; a Docker manifest's schema
        already requires the Docker config type."""
        config = self.descriptor(doc["config"], f"{where} config")
        layers = self.descriptors(doc["layers"], f"{where} layers")
        self.layer_digests.update(layer.digest for layer in layers)
        digests = [raw.get("digest") if isinstance(raw, dict) else None
                   for raw in doc["layers"]]
        self.manifests.append(_ManifestShape(where, config, digests))
        if config is not None:
            self.config_layers.setdefault(config.digest, []).append(digests)
        return [config, *layers] if config is not None else layers

    def diff_ids(self) -> None:
        """After the walk: each manifest's layers and its config's diff_ids agree, in
        number and, for each layer read, in content (a diff_id is the digest of the
        layer's tar stream)."""
        self._hash_late_algorithms()
        for shape in self.manifests:
            doc = self.configs.get(shape.config.digest) if shape.config else None
            if doc is None:
                continue  # the config itself is broken: already reported
            diff_ids = doc["rootfs"]["diff_ids"]
            if len(diff_ids) != len(shape.layers):
                self.problems.append(Problem(shape.where, f"manifest has {len(shape.layers)} "
                                             f"layers but its config has {len(diff_ids)} "
                                             "diff_ids"))
                continue
            for i, (digest, diff_id) in enumerate(zip(shape.layers, diff_ids, strict=True)):
                unverifiable = verify_problem(diff_id)
                if unverifiable is not None and digest in self.tar_digests:
                    self.problems.append(Problem(f"{shape.where} layers[{i}]",
                                                 f"rootfs.diff_ids[{i}]: {unverifiable}"))
                    continue
                # hashed with the algorithms its configs wanted when it was read
                found = self.tar_digests.get(digest or "", {}).get(diff_id.partition(":")[0])
                if found is not None and found != diff_id:
                    self.problems.append(Problem(
                        f"{shape.where} layers[{i}]", f"its tar stream is {found}, not the "
                        f"diff_id {diff_id} that the config gives it (rootfs.diff_ids[{i}])"))


    def _hash_late_algorithms(self) -> None:
        """A layer is hashed when the walk first reads it, in the algorithms the configs
        read by then name; one another config (read later) names in another algorithm is
        read and hashed again for it."""
        late: dict[str, set[str]] = {}
        for shape in self.manifests:
            doc = self.configs.get(shape.config.digest) if shape.config else None
            for digest, diff_id in zip(shape.layers, doc["rootfs"]["diff_ids"] if doc else [],
                                       strict=False):
                algorithm = diff_id.partition(":")[0]
                hashed = self.tar_digests.get(digest or "")  # None: unread, or unreadable
                if (hashed is not None and verify_problem(diff_id) is None
                        and algorithm not in hashed):
                    late.setdefault(digest, set()).add(algorithm)
        for digest, algorithms in late.items():
            desc = self.layers_read[digest]
            try:
                with self.source.open_blob(desc) as blob:
                    self.tar_digests.setdefault(digest, {}).update(
                        tar_digests(blob, desc.media_type, algorithms))
            except CvmfsInjectError as exc:
                self.problems.append(Problem(self.source.where(desc), str(exc)))


def _walked(checker: _Checker, roots: list[Descriptor]) -> list[Problem]:
    walk(roots, checker)
    checker.diff_ids()
    return checker.problems


def validate_layout(layout: Layout) -> list[Problem]:
    """Every problem of a whole layout: its two files, everything index.json reaches, then
    the blobs nothing reaches (the layout spec: every file under blobs/ is named by the
    digest of its content, referenced or not)."""
    files = {"layout": layout.root / "oci-layout", "index": layout.root / "index.json"}
    raw = {kind: path.read_bytes() for kind, path in files.items()}
    problems = [problem for kind, path in files.items()
                for problem in check_document(raw[kind], kind, where=str(path))]
    if problems:
        return problems
    source = LayoutSource(layout, ImageRef("oci", str(layout.root)))
    checker = _Checker(source)
    index = json.loads(raw["index"])
    problems = _walked(checker, checker.descriptors(index["manifests"],
                                                    f"{layout.root}/index.json manifests"))
    return problems + _unreached_blobs(layout, checker.reached)


def _unreached_blobs(layout: Layout, reached: set[str]) -> list[Problem]:
    """What lies under blobs/ that the walk did not read: each must be a regular file whose
    name is the digest of its content (an algorithm we cannot compute: "cannot verify")."""
    problems: list[Problem] = []
    for algorithm_dir in sorted((layout.root / "blobs").iterdir()):
        where = str(algorithm_dir)
        if algorithm_dir.is_symlink():  # its reached blobs were read through it; no more
            continue
        if not algorithm_dir.is_dir():
            problems.append(Problem(where, "not a directory of blobs"))
            continue
        for blob in sorted(algorithm_dir.iterdir()):
            digest = f"{algorithm_dir.name}:{blob.name}"
            if digest in reached:
                continue
            problem = verify_problem(digest)
            if problem is None and not blob.is_file():
                problem = "not a blob (not a regular file)"
            elif problem is None:
                problem = _content_problem(blob, digest)
            if problem is not None:
                problems.append(Problem(str(blob), problem))
    return problems


def _content_problem(blob: Path, digest: str) -> str | None:
    algorithm, _, encoded = digest.partition(":")
    hasher = hashlib.new(algorithm)
    with blob.open("rb") as f:
        while chunk := f.read(READ_CHUNK):
            hasher.update(chunk)
    if hasher.hexdigest() != encoded:
        return f"content does not match its name: its digest is {algorithm}:{hasher.hexdigest()}"
    return None


def validate_ref(ref: ImageRef, access: Access, *, packed: Mapping[str, str] | None = None
                 ) -> list[Problem]:
    """A layout (every tag), or one image: a layout tag, a registry image (read over the
    registry API, every blob downloaded and checked), or an archive. `packed`: the layers
    the calling command packed itself (digest -> diff_id), not decompressed again."""
    if ref.transport == "oci":
        layout = Layout.open(ref.path, access.layout_wait)
        with layout.lock(exclusive=False):
            if ref.tag is None:
                return validate_layout(layout)
            found = _validate_tag(layout, ref, packed)
            if found is not None:
                return found
    with backends.reading(ref, access, all_platforms=True) as source:
        return _walked(_Checker(source, packed), [source.top()])


def _validate_tag(layout: Layout, ref: ImageRef, packed: Mapping[str, str] | None
                  ) -> list[Problem] | None:
    """One tag of a layout: its own entry of index.json, checked as a descriptor (its
    `data`, its digest's form), then everything it reaches. The other entries are other
    images': what is wrong there (content we cannot verify, say) is not this image's
    (`validate LAYOUT` reports it). None: no entry has the tag (the caller says so)."""
    where = f"{layout.root}/index.json"
    entries = parse_json(layout.index_bytes(), where).get("manifests")
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        annotations = entry.get("annotations") if isinstance(entry, dict) else None
        if isinstance(annotations, dict) and annotations.get(REF_NAME) == ref.tag:
            checker = _Checker(LayoutSource(layout, ref), packed)
            root = checker.descriptor(entry, f"{where} manifests[{i}]")
            return _walked(checker, [] if root is None else [root])
    return None


def validate_document(data: bytes, kind: str | None, where: str) -> list[Problem]:
    """One JSON document; its kind is detected from its fields when not given."""
    return check_document(data, kind, where=where)
