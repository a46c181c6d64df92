"""Typed views of OCI and Docker v2s2 documents, pure and I/O free.

Every parsed document keeps the exact bytes it came from, because digests are taken over
bytes, never over re-serialised JSON. Edits work on a copy of the parsed dict so fields we
do not know (annotations, vendor keys, `container_config`, ...) survive untouched; only the
edited document is re-serialised, with `canonical_json`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cvmfs_inject.errors import InputError
from cvmfs_inject.oci.digest import digest_problem, sha256_digest, verify_problem
from cvmfs_inject.oci.jsondoc import parse_json
from cvmfs_inject.oci.media import MediaType

REF_NAME = "org.opencontainers.image.ref.name"
_T = TypeVar("_T")


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor; `extra` holds every field beyond the three we act on."""

    media_type: str
    digest: str
    size: int
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, doc: Any, where: str, *, verifiable: bool = True) -> Descriptor:
        """Parse a descriptor. Its digest must be one we can verify, since callers read what
        it names; `validate` passes ``verifiable=False`` to accept any digest the spec
        allows and reports the content it cannot verify itself."""
        if not isinstance(doc, dict):
            raise InputError(f"{where}: descriptor is not a JSON object")
        try:
            media_type, digest, size = doc["mediaType"], doc["digest"], doc["size"]
        except KeyError as exc:
            raise InputError(f"{where}: descriptor lacks {exc.args[0]!r}") from None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InputError(f"{where}: descriptor size {size!r} is not a non-negative integer")
        if not isinstance(media_type, str):
            raise InputError(f"{where}: descriptor mediaType is not a string")
        problem = verify_problem(digest) if verifiable else digest_problem(digest)
        if problem is not None:
            raise InputError(f"{where}: {problem}")
        extra = {k: copy.deepcopy(v) for k, v in doc.items()
                 if k not in ("mediaType", "digest", "size")}
        return cls(media_type, digest, size, extra)

    def to_dict(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size,
                **copy.deepcopy(self.extra)}

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.extra.get("annotations") or {})

    @property
    def platform(self) -> dict[str, Any] | None:
        return self.extra.get("platform")

    @property
    def ref_name(self) -> str | None:
        return self.annotations.get(REF_NAME)

    def replace(self, **changes: Any) -> Descriptor:
        values = {"media_type": self.media_type, "digest": self.digest, "size": self.size,
                  "extra": copy.deepcopy(self.extra)}
        values.update(changes)
        return Descriptor(**values)

    def with_annotations(self, annotations: dict[str, str]) -> Descriptor:
        extra = copy.deepcopy(self.extra)
        if annotations:
            extra["annotations"] = dict(annotations)
        else:
            extra.pop("annotations", None)
        return self.replace(extra=extra)


def platform_string(platform: dict[str, Any] | None) -> str:
    if not platform:
        return "unknown"
    text = f"{platform.get('os', '?')}/{platform.get('architecture', '?')}"
    if platform.get("variant"):
        text += f"/{platform['variant']}"
    return text


def platform_matches(platform: dict[str, Any] | None, wanted: str) -> bool:
    """`wanted` is OS/ARCH[/VARIANT] as docker and skopeo write it, or several of them
    separated by commas (any may match)."""
    return any(_platform_is(platform, one) for one in wanted.split(","))


def _platform_is(platform: dict[str, Any] | None, wanted: str) -> bool:
    parts = wanted.split("/")
    if not platform or len(parts) not in (2, 3):
        return False
    if platform.get("os") != parts[0] or platform.get("architecture") != parts[1]:
        return False
    return len(parts) == 2 or platform.get("variant") == parts[2]


@dataclass(frozen=True)
class Document:
    """A JSON document with the bytes it was read from."""

    raw: bytes
    doc: dict[str, Any]

    @property
    def digest(self) -> str:
        return sha256_digest(self.raw)

    @property
    def size(self) -> int:
        return len(self.raw)

    def edit(self) -> dict[str, Any]:
        """A deep copy to change; the original stays as read."""
        return copy.deepcopy(self.doc)


def _parse_typed(raw: bytes, where: str, media_type: str | None, default: str,
                 accepted: frozenset[str], key: str, noun: str) -> tuple[dict[str, Any], str]:
    """A manifest's or index's JSON and media type (its own, else the descriptor's, else
    the OCI one), refused when the type is not `accepted` or the `key` list is missing."""
    doc = parse_json(raw, where)
    declared = doc.get("mediaType") or media_type or default
    if not isinstance(declared, str) or declared not in accepted:
        raise InputError(f"{where}: media type {declared!r} is not {noun}")
    if not isinstance(doc.get(key), list):
        kind = noun.rsplit(" ", 1)[-1]
        raise InputError(f"{where}: {kind} has no '{key}' list")
    return doc, declared


def _checked(where: str, read: Callable[[], _T]) -> _T:
    """The descriptors of a document, each checked now: a bad one is refused when the
    document is read, before a command has written anything."""
    try:
        return read()
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class Manifest(Document):
    media_type: str = MediaType.OCI_MANIFEST

    @classmethod
    def parse(cls, raw: bytes, where: str, media_type: str | None = None) -> Manifest:
        doc, declared = _parse_typed(raw, where, media_type, MediaType.OCI_MANIFEST,
                                     MediaType.MANIFESTS, "layers", "an image manifest")
        manifest = cls(raw, doc, declared)
        _checked(where, lambda: (manifest.config, manifest.layers))
        return manifest

    @property
    def is_docker(self) -> bool:
        return MediaType.is_docker(self.media_type)

    @property
    def config(self) -> Descriptor:
        return Descriptor.from_dict(self.doc.get("config"), "manifest config")

    @property
    def layers(self) -> list[Descriptor]:
        return [Descriptor.from_dict(d, f"manifest layers[{i}]")
                for i, d in enumerate(self.doc["layers"])]


@dataclass(frozen=True)
class Index(Document):
    media_type: str = MediaType.OCI_INDEX

    @classmethod
    def parse(cls, raw: bytes, where: str, media_type: str | None = None) -> Index:
        doc, declared = _parse_typed(raw, where, media_type, MediaType.OCI_INDEX,
                                     MediaType.INDEXES, "manifests", "an image index")
        index = cls(raw, doc, declared)
        for entry in _checked(where, lambda: index.manifests):
            if not isinstance(entry.extra.get("platform", {}), dict):
                raise InputError(f"{where}: {entry.digest}: platform is not a JSON object")
            annotations = entry.extra.get("annotations", {})
            if not (isinstance(annotations, dict)
                    and all(isinstance(v, str) for v in annotations.values())):
                raise InputError(f"{where}: {entry.digest}: annotations are not an object of "
                                 "strings")
        return index

    @property
    def manifests(self) -> list[Descriptor]:
        return [Descriptor.from_dict(d, f"manifests[{i}]")
                for i, d in enumerate(self.doc["manifests"])]


@dataclass(frozen=True)
class ImageConfig(Document):
    @classmethod
    def parse(cls, raw: bytes, where: str) -> ImageConfig:
        doc = parse_json(raw, where)
        rootfs = doc.get("rootfs")
        if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
            raise InputError(f"{where}: image config has no rootfs.diff_ids list")
        if not all(isinstance(d, str) for d in rootfs["diff_ids"]):
            raise InputError(f"{where}: rootfs.diff_ids holds something else than digests")
        container = doc.get("config")
        if container is not None and not isinstance(container, dict):
            raise InputError(f"{where}: config is not a JSON object")
        labels = (container or {}).get("Labels")
        if labels is not None and not (isinstance(labels, dict) and all(
                isinstance(v, str) for v in labels.values())):
            raise InputError(f"{where}: config.Labels is not an object of strings")
        history = doc.get("history")
        if history is not None and not (isinstance(history, list) and all(
                isinstance(entry, dict) for entry in history)):
            raise InputError(f"{where}: history is not a list of objects")
        return cls(raw, doc)

    @property
    def diff_ids(self) -> list[str]:
        return list(self.doc["rootfs"]["diff_ids"])

    @property
    def labels(self) -> dict[str, str]:
        return dict((self.doc.get("config") or {}).get("Labels") or {})

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self.doc.get("history") or [])
