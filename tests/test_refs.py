"""parse_ref: every accepted form, its skopeo spelling, and every rejection."""

from __future__ import annotations

import pytest

from cvmfs_inject.errors import UsageError
from cvmfs_inject.oci.refs import ImageRef, parse_layout_ref, parse_ref

D256 = "sha256:" + "0123456789abcdef" * 4
D512 = "sha512:" + "0123456789abcdef" * 8

# text, transport, path, tag, digest, skopeo()
ACCEPTED = [
    pytest.param("docker://host:5000/a/b:t", "docker", "host:5000/a/b", "t", None,
                 "docker://host:5000/a/b:t", id="docker-host-port-tag"),
    pytest.param(f"docker://host/a@{D256}", "docker", "host/a", None, D256,
                 f"docker://host/a@{D256}", id="docker-digest"),
    pytest.param(f"docker://reg.example.com/a@{D512}", "docker", "reg.example.com/a", None,
                 D512, f"docker://reg.example.com/a@{D512}", id="docker-sha512"),
    pytest.param("docker://ubuntu", "docker", "ubuntu", "latest", None,
                 "docker://ubuntu:latest", id="docker-bare-name"),
    pytest.param("docker://ubuntu:22.04", "docker", "ubuntu", "22.04", None,
                 "docker://ubuntu:22.04", id="docker-name-tag"),
    pytest.param("docker://localhost:5000/x/y-z__w.v", "docker", "localhost:5000/x/y-z__w.v",
                 "latest", None, "docker://localhost:5000/x/y-z__w.v:latest",
                 id="docker-separators"),
    pytest.param("docker://ubuntu:" + "T" * 128, "docker", "ubuntu", "T" * 128, None,
                 "docker://ubuntu:" + "T" * 128, id="docker-tag-128-chars"),
    pytest.param("oci:dir", "oci", "dir", None, None, "oci:dir", id="oci-dir"),
    pytest.param("oci:dir:tag", "oci", "dir", "tag", None, "oci:dir:tag", id="oci-dir-tag"),
    pytest.param("oci:/abs/dir:v1.0-rc_1", "oci", "/abs/dir", "v1.0-rc_1", None,
                 "oci:/abs/dir:v1.0-rc_1", id="oci-abs-dir-tag"),
    pytest.param("oci-archive:f.tar:tag", "oci-archive", "f.tar", "tag", None,
                 "oci-archive:f.tar:tag", id="oci-archive-tag"),
    pytest.param("oci-archive:f.tar", "oci-archive", "f.tar", None, None,
                 "oci-archive:f.tar", id="oci-archive"),
    pytest.param("docker-archive:f.tar:name:tag", "docker-archive", "f.tar", "name:tag", None,
                 "docker-archive:f.tar:name:tag", id="docker-archive-name-tag"),
    pytest.param("docker-archive:f.tar", "docker-archive", "f.tar", None, None,
                 "docker-archive:f.tar", id="docker-archive"),
    pytest.param("dir", "oci", "dir", None, None, "oci:dir", id="bare-dir"),
    pytest.param("dir:tag", "oci", "dir", "tag", None, "oci:dir:tag", id="bare-dir-tag"),
    pytest.param("./rel/dir:v1", "oci", "./rel/dir", "v1", None, "oci:./rel/dir:v1",
                 id="bare-relative-dir-tag"),
]


@pytest.mark.parametrize(("text", "transport", "path", "tag", "digest", "skopeo"), ACCEPTED)
def test_accepted(text: str, transport: str, path: str, tag: str | None, digest: str | None,
                  skopeo: str) -> None:
    ref = parse_ref(text)
    assert ref == ImageRef(transport, path, tag, digest)
    assert ref.skopeo() == skopeo
    assert str(ref) == skopeo
    assert ref.is_registry == (transport == "docker")
    # the skopeo spelling parses back to the same reference (a fixed point)
    assert parse_ref(ref.skopeo()).skopeo() == skopeo


@pytest.mark.parametrize(("text", "registry", "repository"), [
    pytest.param("docker://ubuntu", "docker.io", "library/ubuntu", id="official-image"),
    pytest.param("docker://user/app:1", "docker.io", "user/app", id="user-repo"),
    pytest.param("docker://host/a", "docker.io", "host/a", id="dotless-first-is-repo"),
    pytest.param("docker://host:5000/a/b:t", "host:5000", "a/b", id="host-port"),
    pytest.param("docker://localhost/x", "localhost", "x", id="localhost"),
    pytest.param("docker://ghcr.io/org/img", "ghcr.io", "org/img", id="dotted-host"),
    pytest.param("docker://docker.io/library/ubuntu", "docker.io", "library/ubuntu",
                 id="explicit-docker-io"),
])
def test_registry_and_repository(text: str, registry: str, repository: str) -> None:
    ref = parse_ref(text)
    assert (ref.registry, ref.repository) == (registry, repository)


def test_bare_docker_name_means_docker_hub_latest() -> None:
    ref = parse_ref("docker://ubuntu")
    assert f"{ref.registry}/{ref.repository}:{ref.tag}" == "docker.io/library/ubuntu:latest"


def test_with_tag_drops_digest() -> None:
    ref = parse_ref(f"docker://host/a@{D256}").with_tag("v2")
    assert (ref.tag, ref.digest) == ("v2", None)
    assert ref.skopeo() == "docker://host/a:v2"


REJECTED = [
    pytest.param("docker://Ubuntu", "lowercase", id="uppercase-repo"),
    pytest.param("docker://host.io/Org/app", "lowercase", id="uppercase-repo-component"),
    pytest.param("docker://ubuntu:bad!tag", "tag", id="bad-tag-chars"),
    pytest.param("docker://ubuntu:.dot", "tag", id="tag-leading-dot"),
    pytest.param("docker://ubuntu:" + "t" * 129, "tag", id="tag-129-chars"),
    pytest.param("docker://ubuntu:", "tag", id="docker-empty-tag"),
    pytest.param("docker://ubuntu@sha256:abc", "digest", id="short-digest"),
    pytest.param("docker://ubuntu@sha256:" + "A" * 64, "digest", id="uppercase-digest"),
    pytest.param("docker://ubuntu@md5:" + "a" * 32, "digest", id="unknown-algorithm"),
    pytest.param("docker://ubuntu@", "digest", id="empty-digest"),
    pytest.param("docker://", "repository", id="docker-empty"),
    pytest.param("docker://bad_host.x/a", "host", id="bad-host"),
    pytest.param("docker://a//b", "lowercase", id="empty-path-component"),
    pytest.param("", "empty", id="empty"),
    pytest.param("foo://x", "foo", id="unknown-transport"),
    pytest.param("docker:/x", "docker://", id="docker-single-slash"),
    pytest.param("docker:x", "docker://", id="docker-no-slash"),
    pytest.param("oci:", "path", id="oci-no-path"),
    pytest.param("oci::tag", "path", id="oci-empty-path-with-tag"),
    pytest.param("oci-archive:", "path", id="oci-archive-no-path"),
    pytest.param("oci:dir:", "empty tag", id="oci-empty-tag"),
    pytest.param("dir:", "empty tag", id="bare-dir-empty-tag"),
    pytest.param("docker-archive:f.tar:", "empty tag", id="docker-archive-empty-ref"),
    pytest.param("oci:dir:bad tag", "tag", id="oci-tag-space"),
    pytest.param("oci:dir:-lead", "tag", id="oci-tag-leading-dash"),
    pytest.param("docker://ubuntu:v1\n", "tag", id="tag-trailing-newline"),
    pytest.param("oci:dir:v1\n", "tag", id="oci-tag-trailing-newline"),
    pytest.param("docker://ubuntu@sha256:" + "a" * 64 + "\n", "digest",
                 id="digest-trailing-newline"),
]


@pytest.mark.parametrize(("text", "why"), REJECTED)
def test_rejected(text: str, why: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_ref(text)
    message = str(info.value)
    assert why in message
    assert repr(text) in message
    for form in ("docker://HOST/REPO[:TAG|@DIGEST]", "oci:DIR[:TAG]", "oci-archive:FILE[:TAG]",
                 "docker-archive:FILE[:REF]", "DIR[:TAG]"):
        assert form in message
    assert info.value.exit_code == 2


@pytest.mark.parametrize(("text", "ok"), [
    pytest.param("oci:dir:t", True, id="oci"),
    pytest.param("dir", True, id="bare"),
    pytest.param("docker://ubuntu", False, id="docker"),
    pytest.param("oci-archive:f.tar", False, id="oci-archive"),
    pytest.param("docker-archive:f.tar", False, id="docker-archive"),
])
def test_parse_layout_ref(text: str, ok: bool) -> None:
    if ok:
        assert parse_layout_ref(text).transport == "oci"
    else:
        with pytest.raises(UsageError, match="not a local layout"):
            parse_layout_ref(text)


@pytest.mark.parametrize("text", [
    "docker-archive:x.tar:hep/el9:2024",
    "docker-archive:x.tar:@0",
    "docker-archive:x.tar:localhost:5000/a/b:1",
    "docker-archive:x.tar:el9",
])
def test_docker_archive_references_accepted(text: str) -> None:
    assert parse_ref(text).skopeo() == text


@pytest.mark.parametrize(("text", "why"), [
    ("docker-archive:x.tar:Bad/Ref:x", "lowercase path components"),
    ("docker-archive:x.tar:@x", "must be @ and a number"),
    ("docker-archive:x.tar:hep/el9:bad tag", "not a valid tag"),
])
def test_docker_archive_references_refused(text: str, why: str) -> None:
    with pytest.raises(UsageError, match=why):
        parse_ref(text)
