"""Round trips through real skopeo and a real docker-registry: digests survive, formats are kept.

Every test builds its images with `build_sample_image` into tmp_path and uses its own
repository names on the session registries, so tests do not depend on each other.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import dir_bytes, sha256, unique_repo

from cvmfs_inject.demo.sample import build_sample_image
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.jsondoc import canonical_json
from cvmfs_inject.oci.media import MediaType

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
SOURCE_FORMAT = "io.cvmfs-inject.source-format"
REF_NAME = "org.opencontainers.image.ref.name"


# -- helpers ------------------------------------------------------------------------------


def repo(prefix: str) -> str:
    return unique_repo("e2e", prefix)


def skopeo_raw(ref: str, *flags: str, config: bool = False) -> bytes:
    """`skopeo inspect --raw` (the registry's bytes, not our reading of them)."""
    argv = ["skopeo", "inspect", "--raw", *(["--config"] if config else []), *flags, ref]
    proc = subprocess.run(argv, capture_output=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def plain_raw(registry: Any, repository: str, config: bool = False) -> bytes:
    return skopeo_raw(registry.url(repository), "--tls-verify=false", config=config)


def index_entries(layout: Path) -> list[dict[str, Any]]:
    return json.loads((layout / "index.json").read_bytes())["manifests"]


def entry(layout: Path, tag: str) -> dict[str, Any]:
    found = [e for e in index_entries(layout)
             if (e.get("annotations") or {}).get(REF_NAME) == tag]
    assert len(found) == 1, f"tag {tag!r} in {index_entries(layout)}"
    return found[0]


def blob(layout: Path, digest: str) -> bytes:
    algorithm, encoded = digest.split(":", 1)
    data = (layout / "blobs" / algorithm / encoded).read_bytes()
    assert sha256(data) == digest
    return data


def doc(layout: Path, digest: str) -> dict[str, Any]:
    return json.loads(blob(layout, digest))


def ok(result: Any) -> Any:
    assert result.code == 0, f"exit {result.code}\nstdout: {result.out}\nstderr: {result.err}"
    assert "Traceback" not in result.err
    return result


# -- registry round trips -----------------------------------------------------------------


@pytest.mark.registry
def test_oci_image_round_trip_keeps_manifest_digest(cli, registry, tmp_path):
    layout = tmp_path / "src"
    top = build_sample_image(layout, "v1", platforms=("amd64",))
    assert top.media_type == OCI_MANIFEST
    first, second = repo("oci"), repo("oci-again")

    ok(cli("push", "--no-tls-verify", f"{layout}:v1", f"docker://{registry.host}/{first}:1"))
    raw = plain_raw(registry, f"{first}:1")
    assert sha256(raw) == top.digest
    assert json.loads(raw)["mediaType"] == OCI_MANIFEST

    back = tmp_path / "back"
    res = ok(cli("pull", "--no-tls-verify", f"docker://{registry.host}/{first}:1", back))
    assert top.digest in res.out
    pulled = entry(back, "1")  # default tag: the source's tag
    assert pulled["digest"] == top.digest
    assert pulled["mediaType"] == OCI_MANIFEST
    assert pulled["annotations"][SOURCE_FORMAT] == "oci"
    assert blob(back, top.digest) == blob(layout, top.digest)
    ok(cli("validate", back))

    ok(cli("push", "--no-tls-verify", f"{back}:1", f"docker://{registry.host}/{second}:2"))
    assert sha256(plain_raw(registry, f"{second}:2")) == top.digest


@pytest.mark.registry
def test_index_round_trip_keeps_index_digest(cli, registry, tmp_path):
    layout = tmp_path / "src"
    top = build_sample_image(layout, "multi", platforms=("amd64", "arm64"))
    assert top.media_type == OCI_INDEX
    first, second = repo("index"), repo("index-again")

    ok(cli("push", "--no-tls-verify", f"{layout}:multi", f"docker://{registry.host}/{first}:m"))
    raw = plain_raw(registry, f"{first}:m")
    assert sha256(raw) == top.digest
    children = json.loads(raw)["manifests"]
    assert sorted(c["platform"]["architecture"] for c in children) == ["amd64", "arm64"]
    for child in children:  # every platform's manifest reached the registry unchanged
        by_digest = plain_raw(registry, f"{first}@{child['digest']}")
        assert by_digest == blob(layout, child["digest"])

    back = tmp_path / "back"
    ok(cli("pull", "--no-tls-verify", "--all", f"docker://{registry.host}/{first}:m",
           f"{back}:all"))
    pulled = entry(back, "all")
    assert pulled["digest"] == top.digest
    assert pulled["mediaType"] == OCI_INDEX
    for child in children:
        assert blob(back, child["digest"]) == blob(layout, child["digest"])
    ok(cli("validate", back))

    ok(cli("push", "--no-tls-verify", f"{back}:all", f"docker://{registry.host}/{second}:m"))
    assert sha256(plain_raw(registry, f"{second}:m")) == top.digest


@pytest.mark.registry
def test_pull_one_platform_of_an_index(cli, registry, tmp_path):
    layout = tmp_path / "src"
    top = build_sample_image(layout, "multi", platforms=("amd64", "arm64"))
    name = repo("platform")
    ok(cli("push", "--no-tls-verify", f"{layout}:multi", f"docker://{registry.host}/{name}:m"))
    arm = next(m for m in doc(layout, top.digest)["manifests"]
               if m["platform"]["architecture"] == "arm64")

    back = tmp_path / "arm"
    ok(cli("pull", "--no-tls-verify", "--platform", "linux/arm64",
           f"docker://{registry.host}/{name}:m", f"{back}:arm"))
    assert len(index_entries(back)) == 1
    pulled = entry(back, "arm")
    assert pulled["mediaType"] == OCI_MANIFEST
    assert pulled["digest"] == arm["digest"]
    manifest = doc(back, pulled["digest"])
    config = doc(back, manifest["config"]["digest"])
    assert config["architecture"] == "arm64"
    assert config["os"] == "linux"
    ok(cli("validate", back))


@pytest.mark.registry
def test_pull_of_another_platform_than_a_single_image_has_is_refused(cli, registry, tmp_path):
    """skopeo copies a single-platform image whatever --override-arch says: pull checks
    the platform itself (exit 4), and the layout is left as it was."""
    layout = tmp_path / "src"
    build_sample_image(layout, "one")
    name = repo("oneplatform")
    ok(cli("push", "--no-tls-verify", f"{layout}:one", f"docker://{registry.host}/{name}:1"))
    back = tmp_path / "back"
    ok(cli("pull", "--no-tls-verify", f"docker://{registry.host}/{name}:1", f"{back}:amd"))
    before = dir_bytes(back)
    result = cli("pull", "--no-tls-verify", "--platform", "linux/arm64",
                 f"docker://{registry.host}/{name}:1", f"{back}:arm")
    assert result.code == 4, result.err
    assert "the image is linux/amd64, not linux/arm64" in result.err
    assert dir_bytes(back) == before
    ok(cli("pull", "--no-tls-verify", "--platform", "linux/amd64",
           f"docker://{registry.host}/{name}:1", f"{back}:amd2"))
    assert entry(back, "amd2")["digest"] == entry(back, "amd")["digest"]


def test_a_config_without_a_variant_matches_any_variant_of_its_architecture(cli, tmp_path):
    """Many arm64 configs name no variant where an index entry would say v8: pull and
    inject of linux/arm64/v8 take such a single image; another architecture is refused."""
    layout = tmp_path / "src"
    build_sample_image(layout, "arm", platforms=("arm64",))
    ok(cli("pull", "--platform", "linux/arm64/v8", f"oci:{layout}:arm", f"{tmp_path}/back:a"))
    tree = tmp_path / "tree"
    tree.mkdir()
    ok(cli("inject", "--platform", "linux/arm64/v8", f"{tmp_path}/back:a", tree))
    assert cli("pull", "--platform", "linux/amd64", f"oci:{layout}:arm",
               f"{tmp_path}/back:b").code == 4


@pytest.mark.registry
def test_push_docker_typed_sample_as_v2s2(cli, registry, tmp_path):
    """A layout whose index.json entry is a Docker v2s2 manifest can be pushed by its tag."""
    layout = tmp_path / "docker"
    top = build_sample_image(layout, "v1", docker=True, platforms=("amd64",))
    assert top.media_type == DOCKER_MANIFEST
    name = repo("v2s2-direct")
    ok(cli("push", "--no-tls-verify", "--format", "v2s2", f"{layout}:v1",
           f"docker://{registry.host}/{name}:1"))
    raw = plain_raw(registry, f"{name}:1")
    assert json.loads(raw)["mediaType"] == DOCKER_MANIFEST
    original = doc(layout, top.digest)
    assert json.loads(raw)["config"]["digest"] == original["config"]["digest"]


@pytest.mark.registry
def test_v2s2_round_trip_keeps_format_config_and_layers(cli, registry, tmp_path):
    layout = tmp_path / "docker"
    top = build_sample_image(layout, "v1", docker=True, platforms=("amd64",))
    original = doc(layout, top.digest)
    assert original["mediaType"] == DOCKER_MANIFEST
    first, second = repo("v2s2"), repo("v2s2-keep")
    # Seed the registry with the sample's own v2s2 manifest through skopeo directly (no tag:
    # skopeo 1.9 only looks tags up among OCI-typed index entries), so this round trip does
    # not depend on `push` of a Docker-typed layout entry (tested separately above).
    seed = subprocess.run(
        ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--format", "v2s2",
         f"oci:{layout}", f"docker://{registry.host}/{first}:1"],
        capture_output=True, text=True, check=False, timeout=60)
    assert seed.returncode == 0, seed.stderr
    raw = plain_raw(registry, f"{first}:1")
    assert json.loads(raw)["mediaType"] == DOCKER_MANIFEST
    assert sha256(raw) == top.digest

    back = tmp_path / "back"
    ok(cli("pull", "--no-tls-verify", f"docker://{registry.host}/{first}:1", f"{back}:d"))
    pulled = entry(back, "d")
    assert pulled["annotations"][SOURCE_FORMAT] == "v2s2"
    ok(cli("validate", back))

    ok(cli("push", "--no-tls-verify", "--format", "keep", f"{back}:d",
           f"docker://{registry.host}/{second}:1"))
    again = json.loads(plain_raw(registry, f"{second}:1"))
    assert again["mediaType"] == DOCKER_MANIFEST
    assert [layer["digest"] for layer in again["layers"]] == \
        [layer["digest"] for layer in original["layers"]]
    # The layout holds the converted OCI image, and the original v2s2 manifest and config
    # beside it: an unchanged image goes back byte for byte (module `original`).
    assert again["config"]["digest"] == original["config"]["digest"]
    assert sha256(plain_raw(registry, f"{second}:1")) == top.digest
    assert sha256(plain_raw(registry, f"{second}:1", config=True)) == \
        original["config"]["digest"]
    # gc keeps the originals, and after an inject the image is converted as any other
    ok(cli("gc", back))
    ok(cli("push", "--no-tls-verify", f"{back}:d", f"docker://{registry.host}/{second}:2"))
    assert sha256(plain_raw(registry, f"{second}:2")) == top.digest
    tree = tmp_path / "tree"
    (tree / "sft.cern.ch").mkdir(parents=True)
    (tree / "sft.cern.ch" / "f").write_text("x")
    ok(cli("inject", f"{back}:d", tree))
    assert "io.cvmfs-inject.source-manifest" not in entry(back, "d")["annotations"]
    ok(cli("push", "--no-tls-verify", f"{back}:d", f"docker://{registry.host}/{second}:3"))
    injected = json.loads(plain_raw(registry, f"{second}:3"))
    assert injected["mediaType"] == DOCKER_MANIFEST
    assert [layer["digest"] for layer in injected["layers"][:-1]] == \
        [layer["digest"] for layer in original["layers"]]


@pytest.mark.registry
def test_push_format_v2s2_of_oci_image_then_keep(cli, registry, tmp_path):
    layout = tmp_path / "oci"
    top = build_sample_image(layout, "v1", platforms=("amd64",))
    original = doc(layout, top.digest)
    first, second = repo("to-v2s2"), repo("to-v2s2-keep")
    ok(cli("push", "--no-tls-verify", "--format", "v2s2", f"{layout}:v1",
           f"docker://{registry.host}/{first}:1"))
    converted = json.loads(plain_raw(registry, f"{first}:1"))
    assert converted["mediaType"] == DOCKER_MANIFEST
    assert converted["config"]["digest"] == original["config"]["digest"]

    back = tmp_path / "back"
    ok(cli("pull", "--no-tls-verify", f"docker://{registry.host}/{first}:1", f"{back}:x"))
    assert entry(back, "x")["annotations"][SOURCE_FORMAT] == "v2s2"
    ok(cli("push", "--no-tls-verify", f"{back}:x", f"docker://{registry.host}/{second}:1"))
    kept = json.loads(plain_raw(registry, f"{second}:1"))
    assert kept["mediaType"] == DOCKER_MANIFEST
    assert [layer["digest"] for layer in kept["layers"]] == \
        [layer["digest"] for layer in original["layers"]]
    # the same config content (its digest is checked in the v2s2 round trip test above)
    assert json.loads(plain_raw(registry, f"{second}:1", config=True)) == \
        doc(layout, original["config"]["digest"])

    # --format oci overrides the kept format
    third = repo("back-to-oci")
    ok(cli("push", "--no-tls-verify", "--format", "oci", f"{back}:x",
           f"docker://{registry.host}/{third}:1"))
    as_oci = json.loads(plain_raw(registry, f"{third}:1"))
    assert as_oci["mediaType"] == OCI_MANIFEST
    assert [layer["digest"] for layer in as_oci["layers"]] == \
        [layer["digest"] for layer in original["layers"]]


# -- archives -----------------------------------------------------------------------------


def test_docker_archive_out_and_in(cli, tmp_path):
    layout = tmp_path / "src"
    top = build_sample_image(layout, "v1", platforms=("amd64",))
    original = doc(layout, top.digest)
    archive = tmp_path / "image.tar"

    ok(cli("push", f"{layout}:v1", f"docker-archive:{archive}:sample/base:1.0"))
    assert archive.is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    raw = skopeo_raw(f"docker-archive:{archive}")
    assert json.loads(raw)["mediaType"] == DOCKER_MANIFEST

    back = tmp_path / "back"
    res = ok(cli("pull", f"docker-archive:{archive}:sample/base:1.0", f"{back}:in"))
    assert "in" in res.out
    pulled = entry(back, "in")
    assert pulled["annotations"][SOURCE_FORMAT] == "v2s2"
    manifest = doc(back, pulled["digest"])
    # same config content and the same layers (uncompressed in the archive: compare diff_ids;
    # the config digest itself is checked in the v2s2 round trip test)
    config = doc(back, manifest["config"]["digest"])
    assert config == doc(layout, original["config"]["digest"])
    assert len(manifest["layers"]) == len(original["layers"])
    ok(cli("validate", back))
    ok(cli("validate", f"{back}:in"))


def test_oci_archive_out_and_in(cli, tmp_path):
    layout = tmp_path / "src"
    top = build_sample_image(layout, "v1", platforms=("amd64",))
    archive = tmp_path / "image.oci.tar"

    ok(cli("push", f"{layout}:v1", f"oci-archive:{archive}:arch"))
    assert archive.is_file()
    assert sha256(skopeo_raw(f"oci-archive:{archive}:arch")) == top.digest

    back = tmp_path / "back"
    ok(cli("pull", f"oci-archive:{archive}:arch", back))
    pulled = entry(back, "arch")  # default tag: the archive's tag
    assert pulled["digest"] == top.digest
    assert pulled["annotations"][SOURCE_FORMAT] == "oci"
    ok(cli("validate", back))


def test_index_to_oci_archive_and_back(cli, tmp_path):
    layout = tmp_path / "src"
    top = build_sample_image(layout, "multi", platforms=("amd64", "arm64"))
    archive = tmp_path / "multi.tar"
    ok(cli("push", f"{layout}:multi", f"oci-archive:{archive}:multi"))
    back = tmp_path / "back"
    ok(cli("pull", "--all", f"oci-archive:{archive}:multi", f"{back}:m"))
    assert entry(back, "m")["digest"] == top.digest
    ok(cli("validate", back))


def test_push_replaces_existing_archive_atomically(cli, tmp_path):
    layout = tmp_path / "src"
    build_sample_image(layout, "v1", platforms=("amd64",))
    for transport, suffix in (("docker-archive", "sample/x:1"), ("oci-archive", "x")):
        archive = tmp_path / f"{transport}.tar"
        archive.write_bytes(b"an older archive\n" * 100)
        inode = archive.stat().st_ino
        ok(cli("push", f"{layout}:v1", f"{transport}:{archive}:{suffix}"))
        # a new file renamed over the old one, not the old one rewritten in place
        assert archive.stat().st_ino != inode
        assert b"an older archive" not in archive.read_bytes()[:4096]
        skopeo_raw(f"{transport}:{archive}")
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_push_leaves_existing_archive_untouched(cli, tmp_path):
    layout = tmp_path / "src"
    build_sample_image(layout, "multi", platforms=("amd64", "arm64"))
    archive = tmp_path / "keep.tar"
    archive.write_bytes(b"precious bytes " * 1000)
    before_archive = archive.read_bytes()
    before_layout = dir_bytes(layout)

    res = cli("push", f"{layout}:multi", f"docker-archive:{archive}:sample/multi:1")
    assert res.code == 2
    assert res.err.startswith("cvmfs-inject: error:")
    assert "index" in res.err
    assert archive.read_bytes() == before_archive
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tar", "src"]
    assert dir_bytes(layout) == before_layout

    # a failure inside skopeo, half-way through writing (a layer blob is missing), also
    # leaves the archive and no temp file
    broken = tmp_path / "broken"
    top = build_sample_image(broken, "v1", platforms=("amd64",))
    last_layer = doc(broken, top.digest)["layers"][-1]["digest"]
    (broken / "blobs" / "sha256" / last_layer.split(":", 1)[1]).unlink()
    for transport, suffix in (("oci-archive", "x"), ("docker-archive", "sample/x:1")):
        res = cli("push", f"{broken}:v1", f"{transport}:{archive}:{suffix}")
        assert res.code != 0
        assert last_layer in res.err
        assert archive.read_bytes() == before_archive
        assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "keep.tar", "src"]


# -- TLS + basic auth ---------------------------------------------------------------------


@pytest.mark.registry
def test_secure_registry_options_after_subcommand(cli, secure_registry, tmp_path):
    reg = secure_registry
    layout = tmp_path / "src"
    top = build_sample_image(layout, "v1", platforms=("amd64",))
    name = repo("secure-after")
    opts = ["--cert-dir", reg.cert_dir, "--authfile", reg.authfile]

    ok(cli("push", *opts, f"{layout}:v1", f"docker://{reg.host}/{name}:1"))
    assert sha256(skopeo_raw(reg.url(f"{name}:1"), *reg.tls_flags(""))) == top.digest

    back = tmp_path / "back"
    ok(cli("pull", *opts, f"docker://{reg.host}/{name}:1", back))
    assert entry(back, "1")["digest"] == top.digest

    res = ok(cli("inspect", *opts, "--json", f"docker://{reg.host}/{name}:1"))
    report = json.loads(res.out)
    assert report["digest"] == top.digest
    layers = report["images"][0]["layers"]
    config = doc(layout, doc(layout, top.digest)["config"]["digest"])
    assert [layer["diff_id"] for layer in layers] == config["rootfs"]["diff_ids"]
    assert all(layer["diff_id"].startswith("sha256:") for layer in layers)


@pytest.mark.registry
def test_secure_registry_options_before_subcommand(cli, secure_registry, tmp_path):
    reg = secure_registry
    layout = tmp_path / "src"
    top = build_sample_image(layout, "v1", platforms=("amd64", "arm64"))
    name = repo("secure-before")
    opts = ["--authfile", reg.authfile, "--cert-dir", reg.cert_dir]

    ok(cli(*opts, "push", f"{layout}:v1", f"docker://{reg.host}/{name}:1"))
    back = tmp_path / "back"
    ok(cli(*opts, "pull", "--all", f"docker://{reg.host}/{name}:1", f"{back}:b"))
    assert entry(back, "b")["digest"] == top.digest
    res = ok(cli(*opts, "--json", "inspect", f"docker://{reg.host}/{name}:1"))
    report = json.loads(res.out)
    assert sorted(image["platform"] for image in report["images"]) == \
        ["linux/amd64", "linux/arm64"]
    assert all(layer["diff_id"] for image in report["images"] for layer in image["layers"])


@pytest.mark.registry
def test_registry_auth_file_env(cli, secure_registry, tmp_path, monkeypatch):
    reg = secure_registry
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(reg.authfile))
    layout = tmp_path / "src"
    top = build_sample_image(layout, "v1", platforms=("amd64",))
    name = repo("secure-env")
    ok(cli("push", "--cert-dir", reg.cert_dir, f"{layout}:v1", f"docker://{reg.host}/{name}:1"))
    back = tmp_path / "back"
    ok(cli("pull", "--cert-dir", reg.cert_dir, f"docker://{reg.host}/{name}:1", back))
    assert entry(back, "1")["digest"] == top.digest


@pytest.mark.registry
def test_no_password_on_any_command_line(cli, secure_registry, tmp_path, monkeypatch):
    reg = secure_registry
    assert reg.auth is not None
    user, password = reg.auth
    secrets = {password, base64.b64encode(f"{user}:{password}".encode()).decode(),
               base64.b64encode(password.encode()).decode().rstrip("=")}
    seen: list[list[str]] = []
    real_run = subprocess.run

    def recording_run(*args: Any, **kwargs: Any) -> Any:
        argv = args[0] if args else kwargs["args"]
        seen.append([str(a) for a in ([argv] if isinstance(argv, str | bytes) else argv)])
        return real_run(*args, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording_run)
    layout = tmp_path / "src"
    build_sample_image(layout, "v1", platforms=("amd64",))
    name = repo("secret")
    opts = ["--cert-dir", reg.cert_dir, "--authfile", reg.authfile]
    ok(cli("push", *opts, f"{layout}:v1", f"docker://{reg.host}/{name}:1"))
    ok(cli("pull", *opts, f"docker://{reg.host}/{name}:1", tmp_path / "back"))
    ok(cli("inspect", *opts, f"docker://{reg.host}/{name}:1"))
    monkeypatch.undo()

    assert any("skopeo" in os.path.basename(arg) for argv in seen for arg in argv), seen
    for argv in seen:
        line = " ".join(argv)
        for secret in secrets:
            assert secret not in line, f"credential on a command line: {argv[0]} ..."


# -- inspect and gc on a layout -----------------------------------------------------------


def test_inspect_layout_human_and_json(cli, tmp_path):
    layout = tmp_path / "src"
    top = build_sample_image(layout, "v1", platforms=("amd64",))
    manifest = doc(layout, top.digest)
    config = doc(layout, manifest["config"]["digest"])
    before = dir_bytes(layout)

    res = ok(cli("inspect", f"{layout}:v1"))
    assert top.digest in res.out
    assert "tags: v1" in res.out
    assert "linux/amd64" in res.out
    for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        assert layer["digest"] in res.out
        assert diff_id in res.out
    assert "label org.example.sample=yes" in res.out

    res = ok(cli("inspect", "--json", layout))
    report = json.loads(res.out)
    assert report["digest"] == top.digest
    assert report["tags"] == ["v1"]
    image = report["images"][0]
    assert image["platform"] == "linux/amd64"
    assert image["config"]["digest"] == manifest["config"]["digest"]
    assert [layer["digest"] for layer in image["layers"]] == \
        [layer["digest"] for layer in manifest["layers"]]
    assert [layer["diff_id"] for layer in image["layers"]] == config["rootfs"]["diff_ids"]
    assert image["labels"] == {"org.example.sample": "yes"}
    assert image["injected"] is None
    assert dir_bytes(layout) == before


def test_inspect_layout_index_platform(cli, tmp_path):
    layout = tmp_path / "src"
    build_sample_image(layout, "multi", platforms=("amd64", "arm64"))
    report = json.loads(ok(cli("inspect", "--json", f"{layout}:multi")).out)
    assert sorted(i["platform"] for i in report["images"]) == ["linux/amd64", "linux/arm64"]
    assert report["index"] == {"manifests": 2}
    report = json.loads(ok(cli("inspect", "--json", "--platform", "linux/arm64",
                               f"{layout}:multi")).out)
    assert [i["platform"] for i in report["images"]] == ["linux/arm64"]


def test_pull_repairs_a_damaged_blob_the_layout_already_had(cli, tmp_path):
    """The copy skopeo fetched (and we verified) replaces a damaged one already there, so
    pulling again repairs a layout instead of tagging a broken image."""
    source = tmp_path / "src"
    top = build_sample_image(source, "v1")
    back = tmp_path / "back"
    ok(cli("pull", f"oci:{source}:v1", f"{back}:a"))
    layer = doc(back, top.digest)["layers"][0]["digest"]
    damaged = back / "blobs" / "sha256" / layer.split(":")[1]
    damaged.write_bytes(b"garbage")
    assert cli("validate", back).code == 1
    ok(cli("pull", f"oci:{source}:v1", f"{back}:b"))
    ok(cli("validate", back))


def test_inspect_reads_archives_as_validate_does(cli, tmp_path):
    """An oci-archive keeps its digests and every platform; a docker-archive is shown as
    the OCI image skopeo converts it to. The temporary copy's name and tags never show."""
    layout = tmp_path / "src"
    top = build_sample_image(layout, "multi", platforms=("amd64", "arm64"))
    ok(cli("push", f"{layout}:multi", f"oci-archive:{tmp_path}/multi.tar"))
    report = json.loads(ok(cli("inspect", "--json", f"oci-archive:{tmp_path}/multi.tar")).out)
    assert report["reference"] == f"oci-archive:{tmp_path}/multi.tar"
    assert report["digest"] == top.digest and "tags" not in report
    assert sorted(i["platform"] for i in report["images"]) == ["linux/amd64", "linux/arm64"]
    build_sample_image(tmp_path / "one", "v1")
    ok(cli("push", f"{tmp_path}/one:v1", f"docker-archive:{tmp_path}/one.tar:a/b:c"))
    result = ok(cli("inspect", f"docker-archive:{tmp_path}/one.tar"))
    assert result.out.startswith(f"docker-archive:{tmp_path}/one.tar ")
    assert "cvmfs-inject-copy" not in result.out and "tags" not in result.out


def test_gc_dry_run_then_gc_after_retag(cli, tmp_path):
    layout = tmp_path / "src"
    old = build_sample_image(layout, "v1", platforms=("amd64",), layers=3)
    old_manifest = doc(layout, old.digest)
    old_blobs = {old.digest, old_manifest["config"]["digest"],
                 *(layer["digest"] for layer in old_manifest["layers"])}

    # nothing unreachable yet
    res = ok(cli("gc", "--dry-run", layout))
    assert "would remove 0 blobs, 0 B" in res.out

    # re-tag v1 to a one-layer image: the old manifest, config and two layers fall off
    new = build_sample_image(layout, "v1", platforms=("amd64",), layers=1)
    assert new.digest != old.digest
    new_manifest = doc(layout, new.digest)
    new_blobs = {new.digest, new_manifest["config"]["digest"],
                 *(layer["digest"] for layer in new_manifest["layers"])}
    garbage = old_blobs - new_blobs
    assert len(garbage) == 4
    sizes = {d: len(blob(layout, d)) for d in garbage}

    before = dir_bytes(layout)
    res = ok(cli("gc", "--dry-run", layout))
    assert dir_bytes(layout) == before
    for digest in garbage:
        assert f"would remove {digest} ({sizes[digest]:,} B)" in res.out
    assert f"would remove {len(garbage)} blobs, {sum(sizes.values()):,} B" in res.out

    res = ok(cli("--json", "gc", layout))
    report = json.loads(res.out)
    assert report["dry_run"] is False
    assert {r["digest"] for r in report["removed"]} == garbage
    assert report["bytes_removed"] == sum(sizes.values())
    assert report["kept"] == len(new_blobs)
    remaining = {f"sha256:{p.name}" for p in (layout / "blobs" / "sha256").iterdir()}
    assert remaining == new_blobs
    ok(cli("validate", layout))
    ok(cli("inspect", f"{layout}:v1"))

    after = dir_bytes(layout)
    res = ok(cli("gc", layout))
    assert "removed 0 blobs, 0 B" in res.out
    assert dir_bytes(layout) == after


@pytest.mark.registry
def test_push_reports_the_digest_written_at_the_destination(cli, registry, tmp_path):
    layout = tmp_path / "oci"
    build_sample_image(layout, "v1", platforms=("amd64",))
    name = f"{repo('converted')}:1"
    result = cli("push", "--json", "--no-tls-verify", "--format", "v2s2", f"{layout}:v1",
                 registry.url(name))
    assert result.code == 0, result.err
    assert json.loads(result.out)["digest"] == sha256(plain_raw(registry, name))


@pytest.mark.registry
def test_zstd_image_pushed_back_as_v2s2_is_refused_up_front(cli, registry, tmp_path):
    layout = tmp_path / "oci"
    build_sample_image(layout, "v1", platforms=("amd64",))
    name = repo("v2s2-zstd")
    url = registry.url(f"{name}:1")
    ok(cli("push", "--no-tls-verify", "--format", "v2s2", f"{layout}:v1", url))
    back = tmp_path / "back"
    ok(cli("pull", "--no-tls-verify", url, f"{back}:d"))
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("x")
    ok(cli("inject", f"{back}:d", tree, "--compress", "zstd"))
    result = cli("push", "--no-tls-verify", f"{back}:d", registry.url(f"{name}:2"))
    assert result.code == 2
    assert "--format oci" in result.err and result.err.count("\n") == 1


def test_an_oci_archive_of_a_docker_origin_image_is_oci_and_found_by_its_tag(cli, tmp_path):
    from cvmfs_inject.demo.sample import build_sample_image

    build_sample_image(tmp_path / "docker", "v1", docker=True)
    assert cli("push", f"{tmp_path / 'docker'}:v1",
               f"docker-archive:{tmp_path}/d.tar:hep/el9:v1").code == 0
    assert cli("pull", f"docker-archive:{tmp_path}/d.tar", f"{tmp_path / 'work'}:a1").code == 0
    result = cli("push", f"{tmp_path / 'work'}:a1", f"oci-archive:{tmp_path}/a1.tar:a1")
    assert result.code == 0, result.err
    result = cli("pull", f"oci-archive:{tmp_path}/a1.tar:a1", f"{tmp_path / 'site'}:a1")
    assert result.code == 0, result.err
    refused = cli("push", "--format", "v2s2", f"{tmp_path / 'work'}:a1",
                  f"oci-archive:{tmp_path}/v2.tar:a1")
    assert refused.code == 2 and "docker-archive" in refused.err
    assert not (tmp_path / "v2.tar").exists()


def _children_named(pid: int, name: str) -> list[int]:
    """Processes whose parent is `pid` and whose command is `name`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat_line[stat_line.index("(") + 1:stat_line.rindex(")")]
        ppid = int(stat_line[stat_line.rindex(")") + 2:].split()[1])
        if ppid == pid and comm == name:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.registry
def test_a_killed_push_takes_its_skopeo_with_it(registry, tmp_path):
    """SIGKILL of `push` kills the skopeo it started (setpriv --pdeathsig): no orphan goes on
    to upload and set the tag after the command is gone."""
    layout = tmp_path / "big"
    build_sample_image(layout, "v1")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "random").write_bytes(os.urandom(48 << 20))
    done = subprocess.run([sys.executable, "-m", "cvmfs_inject", "inject", "-q",
                           "--compress", "none", f"{layout}:v1", str(tree)], check=False)
    assert done.returncode == 0
    name = repo("killed")
    proc = subprocess.Popen([sys.executable, "-m", "cvmfs_inject", "push", "-q",
                             "--no-tls-verify", f"{layout}:v1",
                             f"docker://{registry.host}/{name}:x"], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    children: list[int] = []
    while not children and proc.poll() is None and time.monotonic() < deadline:
        children = _children_named(proc.pid, "skopeo")
    assert children, "skopeo never started"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in children)
    time.sleep(1)
    assert subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                           f"docker://{registry.host}/{name}:x"], capture_output=True,
                          check=False).returncode != 0


@pytest.mark.registry
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_push_keeps_the_image_it_is_given(cli, registry, tmp_path, compression):
    """An uncompressed or zstd layer goes out as it is, manifest digest and all: skopeo
    compresses an uncompressed layer, and swaps in a blob of the same content it knows
    (a gzip one for a zstd layer, from its blob cache or the registry), unless told to
    keep the digests."""
    layout = tmp_path / "oci"
    build_sample_image(layout, "v1", platforms=("amd64",))
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"x" * 100_000)
    ok(cli("inject", f"{layout}:v1", tree, "--compress", compression, "--tag", "in"))
    digest = entry(layout, "in")["digest"]
    name = f"{repo('kept-' + compression)}:1"
    result = ok(cli("push", "--json", "--no-tls-verify", f"{layout}:in", registry.url(name)))
    assert json.loads(result.out)["digest"] == digest == sha256(plain_raw(registry, name))
    archive = tmp_path / "image.oci.tar"
    ok(cli("push", f"{layout}:in", f"oci-archive:{archive}:in"))
    assert sha256(skopeo_raw(f"oci-archive:{archive}:in")) == digest


def test_an_uncompressed_layer_goes_into_a_docker_archive(cli, tmp_path):
    """A docker-archive stores its layers uncompressed (skopeo decompresses gzip ones), so
    an uncompressed OCI layer fits; zstd still does not."""
    layout = tmp_path / "oci"
    build_sample_image(layout, "v1", platforms=("amd64",))
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"content\n")
    ok(cli("inject", f"{layout}:v1", tree, "--compress", "none", "--tag", "none"))
    ok(cli("inject", f"{layout}:v1", tree, "--compress", "zstd", "--tag", "zstd"))
    archive = tmp_path / "image.tar"
    ok(cli("push", f"{layout}:none", f"docker-archive:{archive}:sample/none:1"))
    back = tmp_path / "back"
    ok(cli("unpack", f"docker-archive:{archive}:sample/none:1", back))
    assert (back / "f").read_bytes() == b"content\n"
    result = cli("push", f"{layout}:zstd", f"docker-archive:{tmp_path / 'z.tar'}:sample/z:1")
    assert result.code == 2 and "zstd" in result.err and not (tmp_path / "z.tar").exists()


@pytest.mark.registry
def test_format_oci_converts_every_manifest_of_an_index(cli, registry, tmp_path):
    """An OCI index holding a Docker manifest (as another tool may write a layout): with
    `--format oci` its manifest goes out converted, not kept with its digest; and into an
    oci-archive too, which holds OCI manifests."""
    layout = tmp_path / "mixed"
    build_sample_image(layout, "dock", docker=True, platforms=("amd64",))
    store = Layout.open(layout)
    with store.writing():
        child = store.resolve("dock").with_annotations({}).replace(
            extra={"platform": {"architecture": "amd64", "os": "linux"}})
        index = {"schemaVersion": 2, "mediaType": MediaType.OCI_INDEX,
                 "manifests": [child.to_dict()]}
        top = store.put_bytes(canonical_json(index), MediaType.OCI_INDEX)
        store.set_tag("mixed", top.with_annotations({REF_NAME: "mixed"}))
    name = f"{repo('mixed')}:1"
    ok(cli("push", "--no-tls-verify", "--format", "oci", f"{layout}:mixed",
           registry.url(name)))
    pushed = json.loads(plain_raw(registry, name))
    assert [m["mediaType"] for m in pushed["manifests"]] == [OCI_MANIFEST]
    archive = tmp_path / "mixed.oci.tar"
    ok(cli("push", f"{layout}:mixed", f"oci-archive:{archive}:mixed"))
    kept = json.loads(skopeo_raw(f"oci-archive:{archive}:mixed"))
    assert [m["mediaType"] for m in kept["manifests"]] == [OCI_MANIFEST]


def test_format_oci_into_a_docker_archive_is_refused_up_front(cli, tmp_path):
    layout = tmp_path / "oci"
    build_sample_image(layout, "v1", platforms=("amd64",))
    archive = tmp_path / "image.tar"
    result = cli("push", "--format", "oci", f"{layout}:v1", f"docker-archive:{archive}:a/b:1")
    assert result.code == 2 and "oci-archive" in result.err and result.err.count("\n") == 1
    assert not archive.exists()
