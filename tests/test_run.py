"""`run`: pull → inject → validate → push, against a real docker-registry and real archives.

Every pushed image is pulled back with our own `pull`, validated and unpacked, and the tree
must come back exactly. Registry tests use the session `registry` fixture (plain http,
hence `--no-tls-verify`); each test uses its own repository names.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_same_tree, make_nasty_tree

from cvmfs_inject.demo.sample import build_sample_image
from cvmfs_inject.oci.media import MediaType

NO_TLS = "--no-tls-verify"



def raw_manifest(ref: str) -> dict[str, Any]:
    done = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", ref],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def image_config(ref: str) -> dict[str, Any]:
    done = subprocess.run(["skopeo", "inspect", "--raw", "--config", "--tls-verify=false", ref],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def check_pulled(cli, src: str, tree: Path, tmp_path: Path, name: str) -> Path:
    """Pull `src` into a fresh layout, validate it and check its unpack equals `tree`."""
    layout = tmp_path / f"pulled-{name}"
    result = cli("pull", NO_TLS, src, f"{layout}:back")
    assert result.code == 0, result.err
    result = cli("validate", layout)
    assert result.code == 0, result.err + result.out
    out = tmp_path / f"unpacked-{name}"
    result = cli("unpack", f"{layout}:back", out)
    assert result.code == 0, result.err
    assert_same_tree(tree, out)
    return layout


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_nasty_tree(tmp_path / "tree")


def push_sample(cli, tmp_path: Path, dest: str, *, fmt: str = "keep") -> None:
    """Push the OCI sample. (skopeo 1.9.3 cannot read the Docker-typed sample layout: its
    oci: transport skips index.json entries whose mediaType is not OCI, so v2s2 sources are
    made with `push --format v2s2`, and docker-archive is v2s2 by nature.)"""
    layout = tmp_path / "sample"
    build_sample_image(layout, "base")
    result = cli("push", NO_TLS, "--format", fmt, f"{layout}:base", dest)
    assert result.code == 0, result.err


# -- registry on both ends -------------------------------------------------------------------
@pytest.mark.registry
def test_run_registry_to_registry(cli, registry, tree, tmp_path):
    src, dest = registry.url("run/base:1"), registry.url("run/app:cvmfs")
    push_sample(cli, tmp_path, src)
    before = raw_manifest(src)
    result = cli("run", NO_TLS, src, tree, dest)
    assert result.code == 0, result.err
    assert "pushed" in result.out
    assert raw_manifest(src) == before  # the source tag is not touched
    manifest = raw_manifest(dest)
    assert manifest["mediaType"] == MediaType.OCI_MANIFEST
    assert len(manifest["layers"]) == len(before["layers"]) + 1
    assert manifest["layers"][:-1] == before["layers"]
    labels = image_config(dest)["config"]["Labels"]
    assert labels["cvmfs_injection_gz"] == manifest["layers"][-1]["digest"]
    check_pulled(cli, dest, tree, tmp_path, "registry")
    # unpack straight from the registry as well
    out = tmp_path / "direct"
    result = cli("unpack", NO_TLS, dest, out)
    assert result.code == 0, result.err
    assert_same_tree(tree, out)


@pytest.mark.registry
def test_run_with_cache_layout_keeps_and_reuses_it(cli, registry, tree, tmp_path, epoch):
    src, dest = registry.url("cache/base:1"), registry.url("cache/app:cvmfs")
    push_sample(cli, tmp_path, src)
    cache = tmp_path / "cache"
    result = cli("run", NO_TLS, "--layout", cache, src, tree, dest)
    assert result.code == 0, result.err
    assert (cache / "index.json").is_file()
    assert cli("validate", cache).code == 0
    first = raw_manifest(dest)
    blobs = set(os.listdir(cache / "blobs" / "sha256"))

    # the site workflow: the injected image is the next run's source
    result = cli("run", NO_TLS, "--layout", cache, dest, tree, dest)
    assert result.code == 0, result.err
    assert "unchanged" in result.out
    assert raw_manifest(dest) == first
    assert blobs <= set(os.listdir(cache / "blobs" / "sha256"))

    # the same command again gives the same image (SOURCE_DATE_EPOCH is set)
    result = cli("run", NO_TLS, "--layout", cache, src, tree, dest)
    assert result.code == 0, result.err
    assert raw_manifest(dest) == first
    check_pulled(cli, dest, tree, tmp_path, "cache")


@pytest.mark.registry
def test_run_keeps_docker_v2s2(cli, registry, tree, tmp_path):
    src, dest = registry.url("v2s2/base:1"), registry.url("v2s2/app:cvmfs")
    push_sample(cli, tmp_path, src, fmt="v2s2")
    assert raw_manifest(src)["mediaType"] == MediaType.DOCKER_MANIFEST
    result = cli("run", NO_TLS, src, tree, dest)
    assert result.code == 0, result.err
    manifest = raw_manifest(dest)
    assert manifest["mediaType"] == MediaType.DOCKER_MANIFEST
    assert {layer["mediaType"] for layer in manifest["layers"]} == \
        {MediaType.DOCKER_LAYER_GZIP}
    assert manifest["config"]["mediaType"] == MediaType.DOCKER_CONFIG
    check_pulled(cli, dest, tree, tmp_path, "v2s2")


# -- archives on both ends -------------------------------------------------------------------
def test_run_docker_archive_to_docker_archive(cli, tree, tmp_path):
    src_tar, dest_tar = tmp_path / "in.tar", tmp_path / "out.tar"
    push_sample(cli, tmp_path, f"docker-archive:{src_tar}:sample/base:1")
    before = src_tar.read_bytes()
    result = cli("run", f"docker-archive:{src_tar}", tree,
                 f"docker-archive:{dest_tar}:site/app:cvmfs")
    assert result.code == 0, result.err
    assert src_tar.read_bytes() == before
    with tarfile.open(dest_tar) as archive:
        member = archive.extractfile("manifest.json")
        assert member is not None
        (entry,) = json.loads(member.read())
    assert [t.removeprefix("docker.io/") for t in entry["RepoTags"]] == ["site/app:cvmfs"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tar.")]
    check_pulled(cli, f"docker-archive:{dest_tar}", tree, tmp_path, "docker-archive")


def test_run_oci_archive_to_oci_archive(cli, tree, tmp_path):
    src_tar, dest_tar = tmp_path / "in.tar", tmp_path / "out.tar"
    push_sample(cli, tmp_path, f"oci-archive:{src_tar}:base")
    result = cli("run", f"oci-archive:{src_tar}:base", tree, f"oci-archive:{dest_tar}:out")
    assert result.code == 0, result.err
    layout = check_pulled(cli, f"oci-archive:{dest_tar}:out", tree, tmp_path, "oci-archive")
    index = json.loads((layout / "index.json").read_bytes())
    (entry,) = index["manifests"]
    assert entry["mediaType"] == MediaType.OCI_MANIFEST


def test_run_zstd_into_a_docker_destination_is_refused_up_front(cli, tree, tmp_path):
    src_tar, dest_tar = tmp_path / "in.tar", tmp_path / "out.tar"
    push_sample(cli, tmp_path, f"docker-archive:{src_tar}:sample/base:1")
    result = cli("run", "--compress", "zstd", f"docker-archive:{src_tar}", tree,
                 f"docker-archive:{dest_tar}:site/app:cvmfs")
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cvmfs-inject: error: ")
    assert "zstd" in lines[0]
    assert not dest_tar.exists()


def test_run_does_not_push_an_image_whose_base_layer_lies_about_its_diff_id(cli, tmp_path):
    """run validates before it pushes: its own new layer is not decompressed again (it was
    hashed while packing), a base layer still is, and a false diff_id stops the push."""
    from cvmfs_inject.layout.store import Layout
    from cvmfs_inject.oci.jsondoc import canonical_json
    from cvmfs_inject.oci.model import ImageConfig, Manifest

    layout = tmp_path / "sample"
    build_sample_image(layout, "base")
    store = Layout.open(layout)
    top = store.resolve("base")
    manifest = Manifest.parse(store.read_blob(top.digest, top.size), "m")
    config = ImageConfig.parse(store.read_blob(manifest.config.digest, manifest.config.size),
                               "c")
    doc = config.edit()
    doc["rootfs"]["diff_ids"][0] = "sha256:" + "cd" * 32
    new_config = store.put_bytes(canonical_json(doc), manifest.config.media_type)
    mdoc = manifest.edit()
    mdoc["config"] = {**mdoc["config"], "digest": new_config.digest, "size": new_config.size}
    with store.writing():
        store.set_tag("lie", store.put_bytes(canonical_json(mdoc), manifest.media_type))
    assert cli("push", f"{layout}:lie", f"oci-archive:{tmp_path}/in.tar").code == 0
    tree = tmp_path / "tree"
    tree.mkdir()
    result = cli("run", f"oci-archive:{tmp_path}/in.tar", tree, f"oci-archive:{tmp_path}/out.tar")
    assert result.code == 1, result.err
    assert "does not validate" in result.err and "diff_id" in result.err
    assert not (tmp_path / "out.tar").exists()
