"""Delta archives across the air gap: `push --since` leaves out the layers the old image has;
`pull` of such an archive completes the image from the layout, or changes nothing."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from helpers import EPOCH, dir_bytes

from cvmfs_inject.demo.sample import build_sample_image
from cvmfs_inject.layout.gc import reachable
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.jsondoc import canonical_json
from cvmfs_inject.oci.media import MediaType

USAGE, INPUT, NOT_FOUND, INTEGRITY = 2, 3, 4, 5


def _tree(root: Path, content: bytes) -> Path:
    (root / "repo").mkdir(parents=True)
    (root / "repo" / "data").write_bytes(content)
    os.utime(root, (EPOCH, EPOCH))
    return root


@pytest.fixture
def two_images(cli, tmp_path: Path) -> Path:
    """A layout with the sample index (two platforms), injected twice: tags old and new."""
    layout = tmp_path / "site"
    build_sample_image(layout, "base", platforms=("amd64", "arm64"))
    for tag, content in (("old", b"release 1\n"), ("new", b"release 2\n" * 4096)):
        tree = _tree(tmp_path / f"tree-{tag}", content)
        assert cli("inject", f"{layout}:base", tree, "--tag", tag).code == 0
    return layout


def _delta(cli, layout: Path, archive: Path, ref: str = ":new") -> Path:
    """`push LAYOUT:new oci-archive:ARCHIVE[:new] --since LAYOUT:old`."""
    result = cli("push", f"{layout}:new", f"oci-archive:{archive}{ref}", "--since",
                 f"{layout}:old")
    assert result.code == 0, result.err
    return archive


def _holding_old(layout: Path, path: Path) -> Path:
    """An air-gapped layout that holds the old image (copied by skopeo, not by us)."""
    subprocess.run(["skopeo", "copy", "--all", f"oci:{layout}:old", f"oci:{path}:old"],
                   check=True, capture_output=True)
    return path


def _one_layer_image(path: Path, tag: str) -> None:
    """An image that shares no blob with the sample: one layer of its own."""
    store = Layout.create(path)
    with store.writing():
        layer = store.put_bytes(gzip.compress(os.urandom(64)), MediaType.OCI_LAYER_GZIP)
        config = store.put_bytes(canonical_json({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]}}),
            MediaType.OCI_CONFIG)
        manifest = store.put_bytes(canonical_json({
            "schemaVersion": 2, "mediaType": MediaType.OCI_MANIFEST,
            "config": config.to_dict(), "layers": [layer.to_dict()]}), MediaType.OCI_MANIFEST)
        store.set_tag(tag, manifest)


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}  # type: ignore[union-attr]


def _blob_names(members: dict[str, bytes]) -> set[str]:
    return {"sha256:" + name.rsplit("/", 1)[1] for name in members if name.startswith("blobs/")}


def _layout_state(layout: Path) -> dict[str, str]:
    return dir_bytes(layout) if layout.exists() else {}


def test_a_delta_archive_holds_the_documents_and_only_new_layers(cli, two_images: Path,
                                                                  tmp_path: Path) -> None:
    archive = tmp_path / "new.tar"
    result = cli("--json", "push", f"{two_images}:new", f"oci-archive:{archive}:new",
                 "--since", f"{two_images}:old")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    store = Layout.open(two_images)
    new, old = reachable(store, [store.resolve("new")]), reachable(store, [store.resolve("old")])
    members = _members(archive)
    assert _blob_names(members) == {d for d in new if d not in old or _is_document(store, d)}
    assert report["blobsWritten"] == len(_blob_names(members))
    assert report["blobsOmitted"] == len(new) - report["blobsWritten"] > 0
    index = json.loads(members["index.json"])
    assert index["manifests"][0]["digest"] == store.resolve("new").digest
    assert index["annotations"]["io.cvmfs-inject.delta.since"] == store.resolve("old").digest
    again = _delta(cli, two_images, tmp_path / "again.tar")
    assert again.read_bytes() == archive.read_bytes()  # reproducible


def _is_document(store: Layout, digest: str) -> bool:
    data = store.blob_path(digest).read_bytes()
    return data.startswith(b"{")


def test_a_delta_archive_completes_the_image_in_a_layout_that_holds_the_old_one(
        cli, two_images: Path, tmp_path: Path) -> None:
    archive = _delta(cli, two_images, tmp_path / "new.tar")
    remote = _holding_old(two_images, tmp_path / "airgapped")
    result = cli("pull", f"oci-archive:{archive}:new", f"{remote}:new")
    assert result.code == 0, result.err
    assert Layout.open(remote).resolve("new").digest == Layout.open(two_images).resolve(
        "new").digest
    assert cli("validate", remote).code == 0
    for where in (two_images, remote):
        assert cli("unpack", f"{where}:new", tmp_path / f"out-{where.name}").code == 0
    assert dir_bytes(tmp_path / "out-site") == dir_bytes(tmp_path / "out-airgapped")


def test_a_layout_without_the_old_image_is_told_which_image_and_left_unchanged(
        cli, two_images: Path, tmp_path: Path) -> None:
    archive = _delta(cli, two_images, tmp_path / "new.tar", ref="")
    fresh = tmp_path / "fresh"
    result = cli("pull", f"oci-archive:{archive}", fresh)
    assert result.code == NOT_FOUND
    assert len(result.err.strip().splitlines()) == 1
    assert "blob(s)" in result.err and "tagged old" in result.err
    assert str(two_images) not in result.err  # the sending side's paths stay there
    assert not fresh.exists()  # the layout this pull would have made is gone again
    other = tmp_path / "other"
    build_sample_image(other, "unrelated", platforms=("arm64",))
    before = _layout_state(other)
    assert cli("pull", f"oci-archive:{archive}", f"{other}:new").code == NOT_FOUND
    assert _layout_state(other) == before


def _rewrite(archive: Path, out: Path, change) -> None:
    """Copy `archive` to `out`, passing each member through `change(info, data)`."""
    with tarfile.open(archive) as src, tarfile.open(out, "w") as dst:
        for member in src:
            data = src.extractfile(member).read() if member.isreg() else b""  # type: ignore[union-attr]
            for info, payload in change(member, data):
                dst.addfile(info, io.BytesIO(payload) if info.isreg() else None)


def test_a_corrupted_or_hostile_delta_archive_changes_nothing(cli, two_images: Path,
                                                              tmp_path: Path) -> None:
    archive = _delta(cli, two_images, tmp_path / "new.tar")
    remote = _holding_old(two_images, tmp_path / "airgapped")
    before = _layout_state(remote)

    def flip(info, data):
        if info.name.startswith("blobs/sha256/") and info.size > 1000:
            data = bytes([data[0] ^ 1]) + data[1:]
        yield info, data

    def escape(info, data):
        yield info, data
        if info.name == "index.json":
            evil = tarfile.TarInfo("../escaped")
            evil.size = 3
            yield evil, b"bad"

    def symlink(info, data):
        if info.name == "oci-layout":
            link = tarfile.TarInfo("blobs/sha256/" + "0" * 64)
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            yield link, b""
        yield info, data

    def twice(info, data):
        yield info, data
        if info.name == "index.json":
            yield info, data

    def claims(info, data):  # an entry that names a layer, and claims kept originals
        if info.name == "index.json":
            doc = json.loads(data)
            store = Layout.open(two_images)
            top = json.loads(store.read_blob(doc["manifests"][0]["digest"],
                                             doc["manifests"][0]["size"]))
            first = top["manifests"][0]
            layer = json.loads(store.read_blob(first["digest"], first["size"]))["layers"][-1]
            doc["manifests"][0] = {**layer, "annotations": {
                "org.opencontainers.image.ref.name": "new",
                "io.cvmfs-inject.source-of": layer["digest"]}}
            data = json.dumps(doc).encode()
            info.size = len(data)
        yield info, data

    changes = ((flip, INTEGRITY), (escape, INPUT), (symlink, INPUT), (twice, INPUT),
               (claims, INPUT))
    for change, code in changes:
        bad = tmp_path / f"{change.__name__}.tar"
        _rewrite(archive, bad, change)
        result = cli("pull", f"oci-archive:{bad}:new", f"{remote}:new")
        assert result.code == code, (change.__name__, result.err)
        assert len(result.err.strip().splitlines()) == 1 and str(bad) in result.err
        assert _layout_state(remote) == before
    assert not (tmp_path / "escaped").exists()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(archive.read_bytes()[:3000])  # inside the documents: no marker at the end
    result = cli("pull", f"oci-archive:{cut}:new", f"{remote}:new")
    assert result.code == INPUT and "truncated" in result.err, result.err
    assert _layout_state(remote) == before


def test_a_compressed_or_retarred_delta_archive_is_read_too(cli, two_images: Path,
                                                           tmp_path: Path) -> None:
    archive = _delta(cli, two_images, tmp_path / "new.tar")
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "-xf", archive, "-C", unpacked], check=True)
    retarred = tmp_path / "retarred.tar.gz"
    subprocess.run(["tar", "-czf", retarred, "-C", unpacked, "."], check=True)
    for variant in (archive, retarred):
        remote = _holding_old(two_images, tmp_path / f"airgapped-{variant.name}")
        result = cli("pull", f"oci-archive:{variant}:new", f"{remote}:new")
        assert result.code == 0, result.err
        entry = Layout.open(remote).resolve("new")
        assert entry.digest == Layout.open(two_images).resolve("new").digest
        assert entry.annotations == {"org.opencontainers.image.ref.name": "new",
                                     "io.cvmfs-inject.source-format": "oci"}


@pytest.mark.parametrize(("dest", "extra"), [
    ("docker://127.0.0.1:1/x:y", []),
    ("docker-archive:{tmp}/d.tar", []),
    ("oci-archive:{tmp}/o.tar", ["--format", "v2s2"]),
])
def test_since_needs_an_oci_archive_written_as_it_is(cli, two_images: Path, tmp_path: Path,
                                                     dest: str, extra: list[str]) -> None:
    result = cli("push", f"{two_images}:new", dest.format(tmp=tmp_path), "--since",
                 f"{two_images}:old", *extra)
    assert result.code == USAGE, result.err
    assert not list(tmp_path.glob("*.tar"))


def test_a_delta_against_an_unrelated_image_is_a_full_archive_skopeo_reads(
        cli, two_images: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    _one_layer_image(other, "unrelated")
    archive = tmp_path / "full.tar"
    result = cli("--json", "push", f"{two_images}:new", f"oci-archive:{archive}:new",
                 "--since", f"{other}:unrelated")
    assert result.code == 0, result.err
    assert json.loads(result.out)["blobsOmitted"] == 0
    copy = tmp_path / "copy"
    subprocess.run(["skopeo", "copy", "--all", f"oci-archive:{archive}:new", f"oci:{copy}:new"],
                   check=True, capture_output=True)
    assert Layout.open(copy).resolve("new").digest == Layout.open(two_images).resolve(
        "new").digest


def test_a_delta_archive_is_refused_where_skopeo_would_read_it(cli, two_images: Path,
                                                               tmp_path: Path) -> None:
    archive = _delta(cli, two_images, tmp_path / "new.tar")
    for argv in (("validate", f"oci-archive:{archive}:new"),
                 ("inspect", f"oci-archive:{archive}:new"),
                 ("unpack", f"oci-archive:{archive}:new", tmp_path / "out")):
        result = cli(*argv)
        assert result.code == USAGE, result.err
        assert "delta archive" in result.err and "tagged old" in result.err
    assert not (tmp_path / "out").exists()


def test_the_source_format_crosses_the_air_gap(cli, tmp_path: Path) -> None:
    """An image pulled as v2s2 goes back out as v2s2 (`push --format keep`) on both sides."""
    layout = tmp_path / "site"
    build_sample_image(layout, "base")
    for tag, content in (("old", b"1\n"), ("new", b"2\n")):
        assert cli("inject", f"{layout}:base", _tree(tmp_path / tag, content), "--tag",
                   tag).code == 0
    store = Layout.open(layout)
    store.set_tag("new", store.resolve("new").with_annotations(
        {**store.resolve("new").annotations, "io.cvmfs-inject.source-format": "v2s2"}))
    archive = _delta(cli, layout, tmp_path / "new.tar")
    remote = _holding_old(layout, tmp_path / "airgapped")
    assert cli("pull", f"oci-archive:{archive}:new", f"{remote}:new").code == 0
    kept = Layout.open(remote).resolve("new").annotations
    assert kept["io.cvmfs-inject.source-format"] == "v2s2"


def test_run_reads_a_delta_archive_through_a_cache_that_holds_the_old_image(
        cli, two_images: Path, tmp_path: Path) -> None:
    archive = _delta(cli, two_images, tmp_path / "new.tar")
    cache = _holding_old(two_images, tmp_path / "cache")
    tree = _tree(tmp_path / "tree-3", b"release 3\n")
    result = cli("run", f"oci-archive:{archive}:new", tree, f"oci-archive:{tmp_path}/out.tar",
                 "--layout", cache)
    assert result.code == 0, result.err
    alone = cli("run", f"oci-archive:{archive}:new", tree, f"oci-archive:{tmp_path}/out2.tar")
    assert alone.code == USAGE and "--layout" in alone.err, alone.err
    assert not (tmp_path / "out2.tar").exists()


def test_an_archive_with_too_many_members_is_refused(cli, two_images: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from cvmfs_inject.layout import archive as archive_module

    monkeypatch.setattr(archive_module, "MAX_MEMBERS", 3)
    archive = _delta(cli, two_images, tmp_path / "new.tar")
    remote = _holding_old(two_images, tmp_path / "airgapped")
    before = _layout_state(remote)
    result = cli("pull", f"oci-archive:{archive}:new", f"{remote}:new")
    assert result.code == INPUT and "members" in result.err, result.err
    assert _layout_state(remote) == before


def test_looking_for_a_delta_reads_a_bounded_number_of_members(tmp_path, monkeypatch):
    """Telling a delta archive from a full one reads at most MAX_MEMBERS members (a gzip of
    millions of empty members must not fill memory): past that, it is not ours to judge."""
    from cvmfs_inject.layout import archive as archive_module

    monkeypatch.setattr(archive_module, "MAX_MEMBERS", 50)
    index = canonical_json({"schemaVersion": 2, "manifests": [],
                            "annotations": {archive_module.DELTA_SINCE: "sha256:" + "a" * 64,
                                            archive_module.DELTA_SINCE_NAME: "old"}})

    def archive(path: Path, padding: int) -> Path:
        with tarfile.open(path, "w") as tar:
            for i in range(padding):
                tar.addfile(tarfile.TarInfo(f"pad{i}"), io.BytesIO(b""))
            info = tarfile.TarInfo("index.json")
            info.size = len(index)
            tar.addfile(info, io.BytesIO(index))
        return path

    assert archive_module.delta_base(archive(tmp_path / "near.tar", 40)) == (
        "sha256:" + "a" * 64, "old")
    assert archive_module.delta_base(archive(tmp_path / "far.tar", 60)) is None
