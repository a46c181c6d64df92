"""Layout: create/open, blobs (dedupe, abort, verified reads), tags, locking, gc."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from helpers import dir_bytes

from cvmfs_inject.errors import (
    CvmfsInjectError,
    InputError,
    IntegrityError,
    LockedError,
    NotFoundError,
)
from cvmfs_inject.layout.gc import collect, reachable
from cvmfs_inject.layout.lock import LockWait
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.digest import sha256_digest
from cvmfs_inject.oci.jsondoc import canonical_json
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.oci.model import REF_NAME, Descriptor, Manifest


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout.create(tmp_path / "layout")


def blob_files(layout: Layout) -> set[str]:
    return {f"sha256:{p.name}" for p in (layout.root / "blobs" / "sha256").iterdir()}


def tmp_files(layout: Layout) -> list[str]:
    """Every file under the layout that is not a blob, index.json or oci-layout."""
    found = []
    for dirpath, _dirs, files in os.walk(layout.root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), layout.root)
            if rel in ("index.json", "oci-layout") or rel.startswith("blobs/"):
                continue
            found.append(rel)
    return found


def put_image(layout: Layout, layers: list[bytes], label: str) -> Descriptor:
    """Store layers, a config and a manifest; return the manifest descriptor (untagged)."""
    layer_descs = [layout.put_bytes(data, MediaType.OCI_LAYER) for data in layers]
    config = layout.put_bytes(canonical_json({
        "architecture": "amd64", "os": "linux", "config": {"Labels": {"x": label}},
        "rootfs": {"type": "layers", "diff_ids": [d.digest for d in layer_descs]},
    }), MediaType.OCI_CONFIG)
    manifest = layout.put_bytes(canonical_json({
        "schemaVersion": 2, "mediaType": MediaType.OCI_MANIFEST,
        "config": config.to_dict(), "layers": [d.to_dict() for d in layer_descs],
    }), MediaType.OCI_MANIFEST)
    return manifest


# -- create / open ---------------------------------------------------------------------------
def test_create_makes_an_empty_layout_and_open_reads_it(tmp_path: Path) -> None:
    root = tmp_path / "new" / "layout"
    Layout.create(root)
    assert json.loads((root / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((root / "index.json").read_bytes())
    assert index == {"schemaVersion": 2, "mediaType": MediaType.OCI_INDEX, "manifests": []}
    assert (root / "blobs" / "sha256").is_dir()
    assert Layout.open(root).read_index().manifests == []
    assert tmp_files(Layout(root)) == []


def test_create_in_existing_empty_dir(tmp_path: Path) -> None:
    Layout.create(tmp_path)
    assert (tmp_path / "oci-layout").is_file()


def test_create_over_existing_layout_keeps_it(layout: Layout) -> None:
    manifest = put_image(layout, [b"layer"], "a")
    layout.set_tag("t", manifest)
    before = dir_bytes(layout.root)
    again = Layout.create(layout.root)
    assert again.resolve("t").digest == manifest.digest
    assert dir_bytes(layout.root) == before


@pytest.mark.parametrize("content", [
    pytest.param({"file.txt": b"x"}, id="file"),
    pytest.param({"sub/": b""}, id="subdir"),
    pytest.param({"index.json": b"{}"}, id="index-without-marker"),
])
def test_create_refuses_non_empty_non_layout(tmp_path: Path, content: dict[str, bytes]) -> None:
    root = tmp_path / "dir"
    root.mkdir()
    for name, data in content.items():
        if name.endswith("/"):
            (root / name).mkdir()
        else:
            (root / name).write_bytes(data)
    before = dir_bytes(root)
    with pytest.raises(InputError, match="not an OCI layout"):
        Layout.create(root)
    assert dir_bytes(root) == before


def test_create_refuses_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"x")
    with pytest.raises(InputError):
        Layout.create(target)
    assert target.read_bytes() == b"x"


@pytest.mark.parametrize(("files", "error", "match"), [
    pytest.param({}, InputError, "no oci-layout", id="empty-dir"),
    pytest.param({"index.json": b'{"schemaVersion":2,"manifests":[]}'}, InputError,
                 "no oci-layout", id="no-marker"),
    pytest.param({"oci-layout": b'{"imageLayoutVersion":"2.0.0"}', "index.json": b"{}"},
                 InputError, "imageLayoutVersion", id="wrong-version"),
    pytest.param({"oci-layout": b"{}", "index.json": b"{}"}, InputError,
                 "imageLayoutVersion", id="missing-version"),
    pytest.param({"oci-layout": b"not json", "index.json": b"{}"}, InputError,
                 "invalid JSON", id="marker-not-json"),
    pytest.param({"oci-layout": b'{"imageLayoutVersion":"1.0.0"}'}, InputError,
                 "no index.json", id="no-index"),
])
def test_open_rejects(tmp_path: Path, files: dict[str, bytes], error: type[Exception],
                      match: str) -> None:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(error, match=match):
        Layout.open(tmp_path)


def test_open_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such layout directory"):
        Layout.open(tmp_path / "absent")


def test_open_missing_directory_that_looks_like_a_registry_suggests_docker() -> None:
    with pytest.raises(InputError, match=r"docker://registry\.example\.org/hep/el9"):
        Layout.open("registry.example.org/hep/el9")


# -- blobs -----------------------------------------------------------------------------------
def test_put_bytes_dedupes(layout: Layout) -> None:
    first = layout.put_bytes(b"same content", MediaType.OCI_CONFIG)
    second = layout.put_bytes(b"same content", MediaType.OCI_LAYER)
    assert first.digest == second.digest == sha256_digest(b"same content")
    assert (first.size, first.media_type) == (12, MediaType.OCI_CONFIG)
    assert second.media_type == MediaType.OCI_LAYER
    assert blob_files(layout) == {first.digest}
    assert layout.blob_path(first.digest).read_bytes() == b"same content"
    assert tmp_files(layout) == []


def test_put_bytes_repairs_a_truncated_existing_blob(layout: Layout) -> None:
    desc = layout.put_bytes(b"0123456789", MediaType.OCI_LAYER)
    layout.blob_path(desc.digest).write_bytes(b"01234")
    layout.put_bytes(b"0123456789", MediaType.OCI_LAYER)
    assert layout.read_blob(desc.digest, desc.size) == b"0123456789"


@pytest.mark.parametrize("how", ["abort", "exception"])
def test_writer_abort_leaves_no_temp_files(layout: Layout, how: str) -> None:
    if how == "abort":
        writer = layout.writer()
        writer.write(b"partial")
        writer.abort()
    else:
        with pytest.raises(RuntimeError), layout.writer() as writer:
            writer.write(b"partial")
            raise RuntimeError("boom")
    assert tmp_files(layout) == []
    assert blob_files(layout) == set()


def test_writer_without_commit_cleans_up_on_exit(layout: Layout) -> None:
    with layout.writer() as writer:
        writer.write(b"never committed")
    assert tmp_files(layout) == []
    assert blob_files(layout) == set()


def test_writer_streams_and_commits(layout: Layout) -> None:
    with layout.writer() as writer:
        for piece in (b"a" * 1000, memoryview(b"b" * 5000), b""):
            writer.write(piece)
        assert writer.peek_digest() == sha256_digest(b"a" * 1000 + b"b" * 5000)
        desc = writer.commit()
    assert (desc.digest, desc.size) == (sha256_digest(b"a" * 1000 + b"b" * 5000), 6000)
    assert tmp_files(layout) == []


class ShortWrites:
    """A file whose writes take at most 1000 bytes, as a nearly full disk may."""

    def __init__(self, file: Any) -> None:
        self.file = file

    def write(self, data: memoryview) -> int:
        return self.file.write(data[:1000])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def test_writer_completes_short_writes(layout: Layout) -> None:
    data = os.urandom(10_000)
    with layout.writer() as writer:
        writer._file = ShortWrites(writer._file)  # type: ignore[assignment]
        writer.write(data)
        desc = writer.commit()
    assert layout.blob_path(desc.digest).read_bytes() == data


BLOB = b"the quick brown fox jumps over the lazy dog\n" * 100


@pytest.mark.parametrize(("stored", "declared_size", "match"), [
    pytest.param(BLOB[:-1], len(BLOB), "bytes, its descriptor says", id="shorter-file"),
    pytest.param(BLOB + b"x", len(BLOB), "larger than its size", id="longer-file"),
    pytest.param(BLOB[:100] + b"X" + BLOB[101:], len(BLOB), "does not match digest",
                 id="flipped-byte"),
    pytest.param(BLOB, len(BLOB) - 1, "larger than its size", id="descriptor-size-smaller"),
    pytest.param(BLOB, len(BLOB) + 1, "bytes, its descriptor says", id="descriptor-size-larger"),
    pytest.param(b"", len(BLOB), "bytes, its descriptor says", id="empty-file"),
])
@pytest.mark.parametrize("reader", ["read_blob", "read-small-chunks"])
def test_verified_reader_detects_corruption(layout: Layout, stored: bytes, declared_size: int,
                                            match: str, reader: str) -> None:
    desc = layout.put_bytes(BLOB, MediaType.OCI_LAYER)
    path = layout.blob_path(desc.digest)
    path.write_bytes(stored)
    with pytest.raises(IntegrityError, match=match) as info:
        if reader == "read_blob":
            layout.read_blob(desc.digest, declared_size)
        else:
            with layout.open_blob(desc.digest, declared_size) as handle:
                while handle.read(7):
                    pass
    assert desc.digest.split(":")[1] in str(info.value)


@pytest.mark.parametrize("size", [0, 1, 4096, (1 << 20) + 3])
def test_verified_reader_accepts_intact_blob(layout: Layout, size: int) -> None:
    data = os.urandom(size)
    desc = layout.put_bytes(data, MediaType.OCI_LAYER)
    assert layout.read_blob(desc.digest, size) == data
    with layout.open_blob(desc.digest, size) as handle:
        chunks = []
        while piece := handle.read(999):
            chunks.append(piece)
    assert b"".join(chunks) == data


def test_missing_blob_is_not_found(layout: Layout) -> None:
    digest = sha256_digest(b"absent")
    with pytest.raises(NotFoundError, match=digest):
        layout.open_blob(digest, 6)
    with pytest.raises(NotFoundError):
        layout.read_blob(digest, 6)
    assert not layout.has_blob(digest)


@pytest.mark.parametrize("digest", ["sha256:abc", "md5:" + "a" * 32, "sha256:" + "A" * 64,
                                    "sha256:../../../etc/passwd"])
def test_blob_path_rejects_bad_digests(layout: Layout, digest: str) -> None:
    with pytest.raises(InputError):
        layout.blob_path(digest)


def test_import_blob_checks_digest(layout: Layout) -> None:
    staging_dir = layout.tmp_dir
    staging_dir.mkdir(exist_ok=True)
    good = staging_dir / "good"
    good.write_bytes(b"good")
    layout.import_blob(good, sha256_digest(b"good"))
    assert layout.read_blob(sha256_digest(b"good"), 4) == b"good"
    assert not good.exists()
    bad = staging_dir / "bad"
    bad.write_bytes(b"bad!")
    with pytest.raises(IntegrityError):
        layout.import_blob(bad, sha256_digest(b"other"))
    assert not layout.has_blob(sha256_digest(b"other"))


def test_a_directory_where_a_blob_belongs_is_refused_not_replaced(layout: Layout) -> None:
    """One line naming the directory (not an OSError's errno text), before any reading, by
    an import and by a writer alike; the directory and the staged file stay."""
    layout.tmp_dir.mkdir(exist_ok=True)
    staged = layout.tmp_dir / "staged"
    staged.write_bytes(b"blob")
    where = layout.blob_path(sha256_digest(b"blob"))
    (where / "inside").mkdir(parents=True)
    with pytest.raises(InputError, match="a directory where a blob belongs"):
        layout.import_blob(staged, sha256_digest(b"blob"))
    with pytest.raises(InputError, match="a directory where a blob belongs"), \
            layout.writer() as writer:
        writer.write(b"blob")
        writer.commit()
    assert (where / "inside").is_dir() and staged.read_bytes() == b"blob"


# -- tags ------------------------------------------------------------------------------------
def test_resolve(layout: Layout) -> None:
    with pytest.raises(NotFoundError, match="no image"):
        layout.resolve(None)
    one = put_image(layout, [b"one"], "one")
    layout.set_tag("v1", one)
    assert layout.resolve(None).digest == one.digest
    assert layout.resolve("v1").digest == one.digest
    two = put_image(layout, [b"two"], "two")
    layout.set_tag("v2", two)
    with pytest.raises(NotFoundError, match="2 images") as info:
        layout.resolve(None)
    assert "v1" in str(info.value) and "v2" in str(info.value)
    with pytest.raises(NotFoundError, match="'nope' not found") as info:
        layout.resolve("nope")
    assert "tags: v1, v2" in str(info.value)


def test_set_tag_replaces_only_that_tag_and_keeps_other_entries(layout: Layout) -> None:
    one = put_image(layout, [b"one"], "one")
    two = put_image(layout, [b"two"], "two")
    layout.set_tag("a", one)
    layout.set_tag("b", one)
    # an untagged entry and one with foreign annotations/fields must survive untouched
    doc = layout.read_index().edit()
    untagged = {**two.to_dict(), "platform": {"os": "linux", "architecture": "arm64"}}
    foreign = {**one.to_dict(), "annotations": {REF_NAME: "c", "vendor.key": "keep"},
               "x-extra": [1, 2]}
    doc["manifests"] += [untagged, foreign]
    doc["annotations"] = {"index.level": "kept"}
    layout.write_index(doc)

    layout.set_tag("a", two.replace(extra={"annotations": {"mine": "yes"}}))

    after = json.loads((layout.root / "index.json").read_bytes())
    assert after["annotations"] == {"index.level": "kept"}
    by_tag = {(m.get("annotations") or {}).get(REF_NAME): m for m in after["manifests"]}
    assert set(by_tag) == {"a", "b", "c", None}
    assert by_tag["a"]["digest"] == two.digest
    assert by_tag["a"]["annotations"] == {REF_NAME: "a", "mine": "yes"}
    assert by_tag["b"]["digest"] == one.digest
    assert by_tag["c"] == foreign
    assert by_tag[None] == untagged
    assert len(after["manifests"]) == 4
    assert layout.tags().count("a") == 1


def test_write_index_is_atomic_and_canonical(layout: Layout) -> None:
    doc = {"schemaVersion": 2, "mediaType": MediaType.OCI_INDEX, "manifests": [],
           "annotations": {"z": "ü", "a": "1"}}
    layout.write_index(doc)
    raw = (layout.root / "index.json").read_bytes()
    assert raw == canonical_json(doc)
    assert raw == json.dumps(doc, sort_keys=True, separators=(",", ":"),
                             ensure_ascii=False).encode()
    assert "ü".encode() in raw
    assert tmp_files(layout) == []


def test_write_index_failure_keeps_old_index(layout: Layout,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    before = (layout.root / "index.json").read_bytes()
    with pytest.raises(TypeError):
        layout.write_index({"manifests": [object()]})

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        layout.write_index({"schemaVersion": 2, "mediaType": MediaType.OCI_INDEX,
                            "manifests": []})
    monkeypatch.undo()
    assert (layout.root / "index.json").read_bytes() == before
    assert tmp_files(layout) == []


# -- locking ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("first", "second", "locked"), [
    pytest.param(True, True, True, id="exclusive-exclusive"),
    pytest.param(True, False, True, id="exclusive-shared"),
    pytest.param(False, True, True, id="shared-exclusive"),
    pytest.param(False, False, False, id="shared-shared"),
])
def test_lock_modes(layout: Layout, first: bool, second: bool, locked: bool) -> None:
    other = Layout.open(layout.root, LockWait(timeout=0))
    with layout.lock(exclusive=first):
        if locked:
            with pytest.raises(LockedError, match="in use"), other.lock(exclusive=second):
                pass
        else:
            with other.lock(exclusive=second):
                pass
    # released: the second lock is free now
    with other.lock(exclusive=second):
        pass


def test_lock_is_released_after_an_exception(layout: Layout) -> None:
    with pytest.raises(RuntimeError), layout.lock(exclusive=True):
        raise RuntimeError
    with Layout.open(layout.root, LockWait(timeout=0)).lock(exclusive=True):
        pass


def test_lock_leaves_no_trace(layout: Layout) -> None:
    before = dir_bytes(layout.root)
    with layout.lock(exclusive=True):
        pass
    with layout.lock(exclusive=False):
        pass
    assert dir_bytes(layout.root) == before


def test_lock_on_missing_layout_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError), Layout(tmp_path / "gone").lock(exclusive=False):
        pass


def test_writing_cleans_temp_dir(layout: Layout) -> None:
    stale = layout.tmp_dir / "blob-stale"
    layout.tmp_dir.mkdir(exist_ok=True)
    stale.write_bytes(b"left by a killed process")
    with layout.writing() as inner:
        assert inner is layout
        assert not stale.exists()
        # writers share the layout; gc (exclusive) must wait for them
        with Layout.open(layout.root, LockWait(timeout=0)).writing():
            pass
        with pytest.raises(LockedError), Layout.open(layout.root, LockWait(timeout=0)).lock(
                exclusive=True):
            pass
        with layout.writer() as writer:
            writer.write(b"uncommitted")
            assert list(layout.tmp_dir.iterdir())
    assert not layout.tmp_dir.exists()
    assert tmp_files(layout) == []


def test_writing_cleans_temp_dir_after_error(layout: Layout) -> None:
    with pytest.raises(RuntimeError), layout.writing(), layout.staging() as stage:
        (Path(stage) / "x").write_bytes(b"x")
        raise RuntimeError
    assert not layout.tmp_dir.exists()


# -- gc --------------------------------------------------------------------------------------
def shared_layer_layout(layout: Layout) -> dict[str, Descriptor]:
    shared, only_a, only_b = b"shared layer", b"only in a", b"only in b"
    a = put_image(layout, [shared, only_a], "a")
    b = put_image(layout, [shared, only_b], "b")
    layout.set_tag("a", a)
    layout.set_tag("b", b)
    return {"a": a, "b": b}


def image_blobs(layout: Layout, manifest: Descriptor) -> set[str]:
    parsed = Manifest.parse(layout.read_blob(manifest.digest, manifest.size), "manifest")
    return {manifest.digest, parsed.config.digest, *(d.digest for d in parsed.layers)}


def test_gc_removes_only_unreachable_blobs(layout: Layout) -> None:
    images = shared_layer_layout(layout)
    keep_a, keep_b = image_blobs(layout, images["a"]), image_blobs(layout, images["b"])
    stray = layout.put_bytes(b"stray", MediaType.OCI_LAYER)
    assert set(reachable(layout)) == keep_a | keep_b
    result = collect(layout)
    assert [d for d, _ in result.removed] == [stray.digest]
    assert result.bytes_removed == 5
    assert blob_files(layout) == keep_a | keep_b

    # retag b onto a: b's manifest, config and own layer go; the shared layer stays
    layout.set_tag("b", images["a"])
    result = collect(layout)
    assert {d for d, _ in result.removed} == keep_b - keep_a
    assert sha256_digest(b"shared layer") in blob_files(layout)
    assert blob_files(layout) == keep_a
    assert result.kept == len(keep_a)
    assert layout.resolve("b").digest == images["a"].digest
    for digest in keep_a:
        assert layout.read_blob(digest, layout.blob_path(digest).stat().st_size)


def test_gc_follows_nested_index(layout: Layout) -> None:
    images = shared_layer_layout(layout)
    nested = layout.put_bytes(canonical_json({
        "schemaVersion": 2, "mediaType": MediaType.OCI_INDEX,
        "manifests": [images["a"].to_dict(), images["b"].to_dict()],
    }), MediaType.OCI_INDEX)
    layout.write_index({"schemaVersion": 2, "mediaType": MediaType.OCI_INDEX,
                        "manifests": [nested.with_annotations({REF_NAME: "multi"}).to_dict()]})
    expected = {nested.digest} | image_blobs(layout, images["a"]) | image_blobs(layout,
                                                                                images["b"])
    assert set(reachable(layout)) == expected
    assert collect(layout).removed == []
    assert blob_files(layout) == expected


def test_gc_dry_run_deletes_nothing(layout: Layout) -> None:
    images = shared_layer_layout(layout)
    layout.set_tag("b", images["a"])
    layout.tmp_dir.mkdir(exist_ok=True)
    (layout.tmp_dir / "leftover").write_bytes(b"x")
    before = dir_bytes(layout.root)
    result = collect(layout, dry_run=True)
    assert {d for d, _ in result.removed} == (image_blobs(layout, images["b"])
                                              - image_blobs(layout, images["a"]))
    assert dir_bytes(layout.root) == before
    assert result.temp_removed == [(".cvmfs-inject-tmp/leftover", 1)]
    # the real run removes the same set and the temp area, and counts its bytes
    real = collect(layout)
    assert (real.removed, real.temp_removed) == (result.removed, result.temp_removed)
    assert real.bytes_removed == sum(size for _, size in result.removed) + 1
    assert not layout.tmp_dir.exists()


def test_gc_refuses_when_a_manifest_is_missing(layout: Layout) -> None:
    images = shared_layer_layout(layout)
    layout.put_bytes(b"stray", MediaType.OCI_LAYER)
    layout.blob_path(images["b"].digest).unlink()
    before = dir_bytes(layout.root)
    with pytest.raises(NotFoundError, match=images["b"].digest):
        collect(layout)
    assert dir_bytes(layout.root) == before


def test_gc_refuses_when_a_manifest_is_corrupted(layout: Layout) -> None:
    images = shared_layer_layout(layout)
    layout.put_bytes(b"stray", MediaType.OCI_LAYER)
    path = layout.blob_path(images["a"].digest)
    path.write_bytes(path.read_bytes().replace(b"schemaVersion", b"schemaVersioN"))
    before = dir_bytes(layout.root)
    with pytest.raises(CvmfsInjectError):
        collect(layout)
    assert dir_bytes(layout.root) == before


def test_gc_keeps_missing_layer_reference_without_failing(layout: Layout) -> None:
    """A missing layer blob is only a name in the keep set: gc must not crash on it."""
    images = shared_layer_layout(layout)
    layout.blob_path(sha256_digest(b"only in a")).unlink()
    result = collect(layout)
    assert result.removed == []
    assert sha256_digest(b"only in a") in reachable(layout)
    assert images["a"].digest in blob_files(layout)


def test_create_finishes_a_creation_that_was_killed(tmp_path: Path) -> None:
    """A pull killed between index.json and oci-layout must not leave an unusable folder."""
    root = tmp_path / "layout"
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "index.json").write_bytes(
        b'{"manifests":[],"mediaType":"application/vnd.oci.image.index.v1+json",'
        b'"schemaVersion":2}')
    layout = Layout.create(root)
    assert (root / "oci-layout").is_file()
    assert layout.read_index().manifests == []


def test_create_refuses_a_folder_with_blobs_but_no_oci_layout(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "blobs" / "sha256" / ("a" * 64)).write_bytes(b"data")
    with pytest.raises(InputError, match="not an OCI layout"):
        Layout.create(root)
