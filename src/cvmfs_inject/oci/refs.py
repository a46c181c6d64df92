"""Image references in skopeo's words, parsed into values before anything touches disk or network.

Supported: ``docker://HOST/REPO[:TAG|@DIGEST]``, ``oci:DIR[:TAG]``, ``oci-archive:FILE[:TAG]``,
``docker-archive:FILE[:REF]``; a bare path means ``oci:``. Like skopeo, the path of the
local transports ends at the first colon, so a directory name cannot contain one.
"""

from __future__ import annotations

from dataclasses import dataclass

from cvmfs_inject.errors import UsageError
from cvmfs_inject.oci import names
from cvmfs_inject.oci.digest import VALID as VALID_DIGEST

TRANSPORTS = ("docker", "oci", "oci-archive", "docker-archive")

FORMS = (
    "docker://HOST/REPO[:TAG|@DIGEST], oci:DIR[:TAG], oci-archive:FILE[:TAG], "
    "docker-archive:FILE[:REF] or a layout directory DIR[:TAG]"
)

DEFAULT_REGISTRY = "docker.io"


@dataclass(frozen=True)
class ImageRef:
    """A parsed reference; `tag` is the tag/ref name, `digest` only for docker://."""

    transport: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def is_registry(self) -> bool:
        return self.transport == "docker"

    @property
    def registry(self) -> str:
        """Registry host of a docker:// reference (docker.io for a bare name, as docker does)."""
        return split_host(self.path)[0] or DEFAULT_REGISTRY

    @property
    def repository(self) -> str:
        host, repository = split_host(self.path)
        return repository if host or "/" in repository else f"library/{repository}"

    def with_tag(self, tag: str | None) -> ImageRef:
        return ImageRef(self.transport, self.path, tag, None)

    def skopeo(self) -> str:
        """The same reference as skopeo expects it on its command line."""
        if self.transport == "docker":
            suffix = f"@{self.digest}" if self.digest else f":{self.tag or 'latest'}"
            return f"docker://{self.path}{suffix}"
        return f"{self.transport}:{self.path}" + (f":{self.tag}" if self.tag else "")

    def __str__(self) -> str:
        return self.skopeo()


def split_host(name: str) -> tuple[str, str]:
    """("host[:port]", "repo/path") as docker reads a name: the first component is a host
    when more follow and it has a dot or a port, or is localhost; else ("", name)."""
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return "", name


def _bad(text: str, why: str) -> UsageError:
    return UsageError(f"invalid image reference {text!r}: {why}; expected {FORMS}")


def _parse_docker(text: str, rest: str) -> ImageRef:
    if not rest.startswith("//"):
        raise _bad(text, "docker references start with docker://")
    name = rest[2:]
    digest = None
    if "@" in name:
        name, digest = name.split("@", 1)
        if not VALID_DIGEST.match(digest):
            raise _bad(text, f"digest {digest!r} is not sha256:<64 hex> or sha512:<128 hex>")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        if not names.TAG.match(tag):
            raise _bad(text, f"tag {tag!r} is not a valid tag")
    if not name:
        raise _bad(text, "missing repository")
    host, repository = split_host(name)
    if host and not names.HOST.match(host):
        raise _bad(text, f"registry host {host!r} is not valid")
    if not names.REPOSITORY.match(repository):
        raise _bad(text, f"repository {repository!r} must be lowercase path components")
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef("docker", name, tag, digest)


def _parse_local(text: str, transport: str, rest: str) -> ImageRef:
    path, sep, tag = rest.partition(":")
    if not path:
        raise _bad(text, f"{transport}: needs a path")
    if not sep:
        return ImageRef(transport, path, None)
    if not tag:
        raise _bad(text, "empty tag after ':'")
    if transport == "docker-archive":
        _check_archive_reference(text, tag)
        return ImageRef(transport, path, tag)
    if not names.REF_NAME.match(tag):
        raise _bad(text, f"tag {tag!r} is not a valid OCI reference name")
    return ImageRef(transport, path, tag)


def _check_archive_reference(text: str, reference: str) -> None:
    """docker-archive's REF is NAME[:TAG] (a docker reference) or @INDEX, as skopeo reads it."""
    if reference.startswith("@"):
        if not reference[1:].isdigit():
            raise _bad(text, f"archive index {reference!r} must be @ and a number")
        return
    name, tag = reference, None
    if ":" in reference.rsplit("/", 1)[-1]:
        name, tag = reference.rsplit(":", 1)
    if tag is not None and not names.TAG.match(tag):
        raise _bad(text, f"tag {tag!r} is not a valid tag")
    host, repository = split_host(name)
    if (host and not names.HOST.match(host)) or not names.REPOSITORY.match(repository):
        raise _bad(text, f"archive reference {name!r} must be lowercase path components, "
                         "like hep/el9:2024")


def parse_ref(text: str) -> ImageRef:
    """Parse a reference; raise UsageError naming the accepted forms when it is malformed."""
    if not text:
        raise _bad(text, "empty reference")
    head, sep, rest = text.partition(":")
    if sep and head == "docker":
        return _parse_docker(text, rest)
    if sep and head in TRANSPORTS:
        return _parse_local(text, head, rest)
    if "://" in text:
        raise _bad(text, f"unknown transport {head!r}")
    return _parse_local(text, "oci", text)


def check_tag(tag: str, *, registry: bool) -> str:
    """A tag given on its own (`--tag NEW`), checked before anything is written: a registry
    tag, or a layout's `org.opencontainers.image.ref.name` (so `../../evil` is refused)."""
    if registry and not names.TAG.match(tag):
        raise UsageError(f"tag {tag!r} is not a valid registry tag: up to 128 of letters, "
                         "digits, '_', '.' and '-', not starting with '.' or '-'")
    if not registry and not names.REF_NAME.match(tag):
        raise UsageError(f"tag {tag!r} is not a valid OCI reference name: letters and "
                         "digits, joined by single '-', '.', '_', ':', '@', '+' or '/'")
    return tag


def parse_layout_ref(text: str) -> ImageRef:
    """A reference that must name a local OCI layout (commands that edit in place)."""
    ref = parse_ref(text)
    if ref.transport != "oci":
        raise UsageError(f"{text!r} is not a local layout; expected oci:DIR[:TAG] or DIR[:TAG]")
    return ref
