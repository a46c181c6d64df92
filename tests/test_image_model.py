"""The image model as a library: any source published into any sink, the sink contract
(blobs, then manifests, then the tag; idempotent; nothing written from a bad blob), and the
choice of backends from references.

Layouts and a real docker-registry; the results are judged from outside (bytes on disk,
`skopeo inspect --raw`, the registry's access log, `validate`).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from helpers import dir_bytes, sha256, unique_repo

from cvmfs_inject.commands.validate import validate_layout
from cvmfs_inject.demo.sample import build_sample_image
from cvmfs_inject.errors import InputError, IntegrityError, UsageError
from cvmfs_inject.image import backends
from cvmfs_inject.image.access import Access
from cvmfs_inject.image.layout import LayoutSink, LayoutSource
from cvmfs_inject.image.remote import RegistrySink, RemoteSource
from cvmfs_inject.image.sink import publish
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.refs import ImageRef, parse_ref
from cvmfs_inject.registry.client import RegistryClient
from cvmfs_inject.skopeo.command import RegistryOptions


def sample(tmp_path: Path, name: str = "a", **kwargs: object) -> tuple[Layout, LayoutSource]:
    path = tmp_path / name
    build_sample_image(path, "v1", platforms=("amd64", "arm64"), **kwargs)  # type: ignore[arg-type]
    layout = Layout.open(path)
    return layout, LayoutSource(layout, ImageRef("oci", str(path), "v1"))


def blobs(layout: Layout) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (layout.root / "blobs" / "sha256").iterdir()}


def test_a_layout_image_published_into_another_layout(tmp_path: Path) -> None:
    layout, source = sample(tmp_path)
    other = Layout.create(tmp_path / "b")
    sink = LayoutSink(other, ImageRef("oci", str(other.root), "copy"))
    top = source.top()
    publish(sink, source, top)
    assert other.resolve("copy").digest == top.digest
    assert blobs(other) == blobs(layout)
    assert validate_layout(other) == []
    before = dir_bytes(other.root)
    mtime = (other.root / "index.json").stat().st_mtime_ns
    publish(sink, source, top)  # everything is there: nothing is written again
    assert dir_bytes(other.root) == before
    assert (other.root / "index.json").stat().st_mtime_ns == mtime


def test_a_corrupted_blob_is_not_published(tmp_path: Path) -> None:
    layout, source = sample(tmp_path)
    top = source.top()
    manifest = json.loads(layout.read_blob(*_first_manifest(layout, top)))
    layer = manifest["layers"][0]
    path = layout.blob_path(layer["digest"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    other = Layout.create(tmp_path / "b")
    with pytest.raises(IntegrityError, match="does not match digest"):
        publish(LayoutSink(other, ImageRef("oci", str(other.root), "copy")), source, top)
    assert not other.has_blob(layer["digest"])
    assert other.read_index().manifests == []
    assert not other.tmp_dir.exists() or not any(other.tmp_dir.iterdir())


def test_a_blob_of_the_wrong_size_in_the_sink_is_an_integrity_error(tmp_path: Path) -> None:
    layout, source = sample(tmp_path)
    top = source.top()
    other = Layout.create(tmp_path / "b")
    config = json.loads(layout.read_blob(*_first_manifest(layout, top)))["config"]
    truncated = other.blob_path(config["digest"])
    truncated.parent.mkdir(parents=True, exist_ok=True)
    truncated.write_bytes(b"{}")
    with pytest.raises(IntegrityError, match="its descriptor says"):
        publish(LayoutSink(other, ImageRef("oci", str(other.root), "copy")), source, top)
    assert other.read_index().manifests == []


def test_a_layout_sink_needs_a_tag(tmp_path: Path) -> None:
    layout = Layout.create(tmp_path / "b")
    with pytest.raises(UsageError, match="name the tag"):
        LayoutSink(layout, ImageRef("oci", str(layout.root)))


def _first_manifest(layout: Layout, top) -> tuple[str, int]:
    index = json.loads(layout.read_blob(top.digest, top.size))
    first = index["manifests"][0]
    return first["digest"], first["size"]


# -- registries --------------------------------------------------------------------------------
@pytest.mark.registry
def test_a_layout_image_published_into_a_registry_and_back(registry, tmp_path: Path) -> None:
    """Layout -> registry streams every blob from the source (no skopeo); registry ->
    layout downloads them, verified. The digests survive both ways."""
    layout, source = sample(tmp_path)
    top = source.top()
    repo = unique_repo("model", "publish")
    ref = ImageRef("docker", f"{registry.host}/{repo}", "v1")
    start = len(registry.requests())
    with RegistryClient(registry.host, tls_verify=False) as client, \
            tempfile.TemporaryDirectory() as scratch:
        publish(RegistrySink(client, ref, Layout.create(Path(scratch) / "s")), source, top)
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", str(ref)],
                         capture_output=True, check=True).stdout
    assert sha256(raw) == top.digest
    log = _settled(registry, start)
    manifest_puts = [i for i, (m, p) in enumerate(log) if m == "PUT" and "/manifests/" in p]
    blob_puts = [i for i, (m, p) in enumerate(log) if m == "PUT" and "/blobs/uploads/" in p]
    assert blob_puts and max(blob_puts) < min(manifest_puts)
    assert log[manifest_puts[-1]] == ("PUT", f"/v2/{repo}/manifests/v1")  # the tag last

    back = Layout.create(tmp_path / "back")
    with RegistryClient(registry.host, tls_verify=False) as client:
        remote = RemoteSource(client, ref)
        publish(LayoutSink(back, ImageRef("oci", str(back.root), "v1")), remote, remote.top())
    assert back.resolve("v1").digest == top.digest
    assert blobs(back) == blobs(layout)


def _settled(registry, start: int) -> list[tuple[str, str]]:
    """The access log after `start`, once the registry has written every line."""
    previous: list[tuple[str, str]] = []
    for _ in range(50):
        log = registry.requests()[start:]
        if log and log == previous:
            return log
        previous = log
        time.sleep(0.05)
    return previous


@pytest.mark.registry
def test_validate_reads_a_registry_image_over_the_registry_api(cli, registry,
                                                               tmp_path: Path) -> None:
    """Docker v2s2 documents are checked as v2s2, every layer is downloaded and checked,
    and a layer corrupted in the registry's storage is a finding named by its digest.
    (Only a layer of this test's own is corrupted: the registry's storage is shared.)"""
    path = tmp_path / "v2s2"
    build_sample_image(path, "v1", docker=True)
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "unique").write_bytes(os.urandom(4096))
    assert cli("inject", f"{path}:v1", tmp_path / "tree").code == 0
    url = f"docker://{registry.host}/{unique_repo('model', 'validate')}:v1"
    assert cli("push", "--no-tls-verify", "--format", "v2s2", f"{path}:v1", url).code == 0
    start = len(registry.requests())
    result = cli("validate", "--no-tls-verify", url)
    assert result.code == 0, result.err
    manifest = json.loads(subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", url], capture_output=True,
        check=True).stdout)
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    fetched = {p.rsplit("/", 1)[1] for m, p in _settled(registry, start)
               if m == "GET" and "/blobs/" in p}
    assert {layer["digest"] for layer in manifest["layers"]} <= fetched

    layer = manifest["layers"][-1]["digest"]
    stored = (registry.root / "storage/docker/registry/v2/blobs/sha256" / layer[7:9]
              / layer[7:] / "data")
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 1
    stored.write_bytes(bytes(data))
    result = cli("validate", "--no-tls-verify", url)
    assert result.code == 1
    assert f"{url}@{layer}" in result.err and "corrupted" in result.err


# -- choosing backends ---------------------------------------------------------------------------
def test_archives_are_not_edited_in_place(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="use `run` for archives"), backends.editing(
            parse_ref(f"docker-archive:{tmp_path}/x.tar"), Access()):
        pass


def test_dest_is_for_registry_images(tmp_path: Path) -> None:
    build_sample_image(tmp_path / "a", "v1")
    with pytest.raises(UsageError, match="--dest is for registry images"), backends.editing(
            parse_ref(f"{tmp_path}/a:v1"), Access(), dest=parse_ref("docker://h.io/r:1")):
        pass


def test_a_missing_archive_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such archive file"), backends.reading(
            parse_ref(f"oci-archive:{tmp_path}/missing.tar"), Access()):
        pass


def test_a_layout_without_a_tag_to_edit_is_usage_error(tmp_path: Path) -> None:
    layout, _ = sample(tmp_path)
    entry = layout.read_index().manifests[0]
    doc = layout.read_index().edit()
    doc["manifests"] = [entry.with_annotations({}).to_dict()]
    layout.write_index(doc)
    with pytest.raises(UsageError, match=r"no tag in index\.json"), backends.editing(
            parse_ref(str(layout.root)), Access()):
        pass


@pytest.mark.parametrize(("ref", "kind"), [("oci:{tmp}/a:v1", LayoutSource),
                                           ("docker://127.0.0.1:1/r:v1", RemoteSource)])
def test_references_choose_their_backend(tmp_path: Path, ref: str, kind: type) -> None:
    build_sample_image(tmp_path / "a", "v1")
    access = Access(RegistryOptions(tls_verify=False))
    with backends.reading(parse_ref(ref.format(tmp=tmp_path)), access) as source:
        assert isinstance(source, kind)


def test_stdin_credentials_are_read_only_when_a_registry_needs_them(
        cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local inject with --creds-stdin (a Makefile that passes it everywhere) does not
    read stdin: here an empty stdin would be a usage error."""
    build_sample_image(tmp_path / "a", "v1")
    (tmp_path / "tree").mkdir()
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    result = cli("--creds-stdin", "inject", f"{tmp_path}/a:v1", tmp_path / "tree")
    assert result.code == 0, result.err
