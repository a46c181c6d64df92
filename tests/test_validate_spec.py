"""validate over a layout, where the spec allows more than the tool can verify.

A document may name content by any digest the spec's grammar allows; validate accepts the
document and reports the content it cannot verify (one "cannot verify" problem each, so the
exit status still says not everything was checked). Artifacts, whose config is not an image
config, validate as the spec's own examples are valid.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from cvmfs_inject.commands.validate import validate_layout
from cvmfs_inject.demo.sample import build_sample_image
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.jsondoc import canonical_json
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.oci.model import Descriptor

SHA384 = "sha384:" + hashlib.sha384(b"a layer nobody here can hash").hexdigest()
MULTIHASH = "multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8"
EMPTY = "application/vnd.oci.empty.v1+json"


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    path = tmp_path / "layout"
    build_sample_image(path, "v1", platforms=("amd64",))
    return path


def manifest_of(path: Path, tag: str) -> tuple[Descriptor, dict[str, Any]]:
    store = Layout.open(path)
    top = store.resolve(tag)
    return top, json.loads(store.read_blob(top.digest, top.size))


def put_manifest(path: Path, tag: str, manifest: dict[str, Any]) -> Descriptor:
    store = Layout.open(path)
    with store.writing():
        desc = store.put_bytes(canonical_json(manifest), MediaType.OCI_MANIFEST)
        store.set_tag(tag, desc)
    return desc


def test_unregistered_layer_digest_is_one_cannot_verify_problem(cli, layout: Path) -> None:
    _, manifest = manifest_of(layout, "v1")
    manifest["layers"][0]["digest"] = SHA384
    desc = put_manifest(layout, "v1", manifest)

    problems = validate_layout(Layout.open(layout))
    assert [str(p) for p in problems] == [
        f"{layout}/blobs/sha384/{SHA384[7:]}: cannot verify {SHA384}: unsupported digest "
        "algorithm 'sha384' (only sha256 and sha512 can be verified)"]

    res = cli("validate", layout)
    assert res.code == 1 and "cannot verify sha384:" in res.err
    blob = layout / "blobs" / "sha256" / desc.digest[7:]
    assert cli("validate", "--kind", "manifest", blob).code == 0  # the document is valid


def test_unregistered_index_entry_does_not_hide_the_rest(layout: Path) -> None:
    """An index.json entry by multihash is reported; the other image is still checked."""
    _, manifest = manifest_of(layout, "v1")
    (layout / "blobs" / "sha256" / manifest["layers"][1]["digest"][7:]).write_bytes(b"broken")
    index_path = layout / "index.json"
    index = json.loads(index_path.read_bytes())
    index["manifests"].insert(0, {"mediaType": MediaType.OCI_MANIFEST, "digest": MULTIHASH,
                                  "size": 512})
    index_path.write_bytes(canonical_json(index))

    messages = [p.message for p in validate_layout(Layout.open(layout))]
    assert len(messages) == 2, messages
    assert messages[0].startswith(f"cannot verify {MULTIHASH}: unsupported digest algorithm "
                                  "'multihash+base58'")
    assert messages[1].startswith("blob has 6 bytes, its descriptor says")


def test_artifact_manifest_validates(layout: Path) -> None:
    """manifest.md's artifact without a config: the empty descriptor as config, an
    artifactType, a subject; its blobs are arbitrary data, not image configs or layers."""
    store = Layout.open(layout)
    top, _ = manifest_of(layout, "v1")
    with store.writing():
        config = store.put_bytes(b"{}", EMPTY)
        sbom = store.put_bytes(b'{"spdxVersion": "SPDX-2.3"}', "application/spdx+json")
    artifact = {
        "schemaVersion": 2, "mediaType": MediaType.OCI_MANIFEST,
        "artifactType": "application/spdx+json",
        "config": config.to_dict() | {"data": "e30="},
        "layers": [sbom.to_dict()],
        "subject": top.replace(extra={}).to_dict(),
    }
    put_manifest(layout, "v1-sbom", artifact)
    assert validate_layout(Layout.open(layout)) == []


def test_files_under_blobs_that_nothing_reaches_are_checked_too(cli, layout: Path) -> None:
    """image-layout.md: the content of blobs/<alg>/<encoded> MUST match its digest, for
    every blob, referenced or not; what is not a blob at all is a problem too. gc leaves
    a directory where a blob should be (and removes the rest it does not reach)."""
    blobs = layout / "blobs"
    liar = hashlib.sha256(b"something else").hexdigest()
    (blobs / "sha256" / liar).write_bytes(b"garbage")
    (blobs / "sha256" / "NOTHEX").write_bytes(b"x")
    (blobs / "sha256" / ("b" * 64)).mkdir()
    (blobs / "md5").mkdir()
    (blobs / "md5" / "x").write_bytes(b"x")
    honest = hashlib.sha256(b"an unreferenced blob").hexdigest()
    (blobs / "sha256" / honest).write_bytes(b"an unreferenced blob")
    problems = sorted(str(p) for p in validate_layout(Layout.open(layout)))
    assert problems == sorted([
        f"{blobs}/md5/x: cannot verify md5:x: unsupported digest algorithm 'md5' (only sha256 "
        "and sha512 can be verified)",
        f"{blobs}/sha256/NOTHEX: invalid digest 'sha256:NOTHEX': sha256 needs 64 lowercase "
        "hex characters",
        f"{blobs}/sha256/{'b' * 64}: not a blob (not a regular file)",
        f"{blobs}/sha256/{liar}: content does not match its name: its digest is "
        f"sha256:{hashlib.sha256(b'garbage').hexdigest()}"])
    assert cli("validate", layout).code == 1
    assert cli("validate", f"{layout}:v1").code == 0  # one image: only what it reaches
    assert cli("gc", layout).code == 0
    assert sorted(p.name for p in (blobs / "sha256").iterdir()
                  if p.is_dir()) == ["b" * 64]
    assert not (blobs / "sha256" / honest).exists()


def test_a_symlinked_algorithm_directory_is_neither_listed_nor_collected(cli, layout: Path,
                                                                       tmp_path: Path) -> None:
    """blobs/sha512 -> a directory elsewhere: validate does not judge the files there (they
    are not the layout's), and gc, dry run or not, refuses the layout as it writes one."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("mine")
    (layout / "blobs" / "sha512").symlink_to(elsewhere)
    assert validate_layout(Layout.open(layout)) == []
    for args in (["gc", "--dry-run", layout], ["gc", layout]):
        result = cli(*args)
        assert result.code == 3 and "is a symlink" in result.err, result.err
        assert "notes.txt" not in result.out
    assert (elsewhere / "notes.txt").read_text() == "mine"


def _with_index_entries(path: Path, edit: Any) -> None:
    index_path = path / "index.json"
    index = json.loads(index_path.read_bytes())
    edit(index["manifests"])
    index_path.write_bytes(canonical_json(index))


def test_a_tag_is_validated_whatever_the_other_entries_hold(cli, layout: Path) -> None:
    """Another entry of index.json (content we cannot verify, a malformed descriptor) is
    another image's: `validate LAYOUT:TAG` checks the tag's own entry and what it reaches."""
    _with_index_entries(layout, lambda entries: entries.extend([
        {"mediaType": MediaType.OCI_MANIFEST, "digest": MULTIHASH, "size": 512},
        {"mediaType": MediaType.OCI_MANIFEST, "digest": "sha256:ABC", "size": -1}]))
    res = cli("validate", f"{layout}:v1")
    assert res.code == 0, res.err
    assert res.out == f"{layout}:v1: valid\n"
    assert cli("validate", layout).code == 1


def test_a_tags_own_entry_is_checked_as_a_descriptor(cli, layout: Path) -> None:
    def bad_data(entries: list[dict[str, Any]]) -> None:
        entries[0]["data"] = "bm90IHRoZSBtYW5pZmVzdA=="  # "not the manifest"

    _with_index_entries(layout, bad_data)
    res = cli("validate", f"{layout}:v1")
    assert res.code == 1, res.err
    problems = res.err.splitlines()[:-1]
    place = f"{layout}/index.json manifests[0]: "
    assert problems and all(p.startswith(place) for p in problems), problems
    assert f"{place}data decodes to 16 bytes but size is " in res.err

    def negative_size(entries: list[dict[str, Any]]) -> None:
        del entries[0]["data"]
        entries[0]["size"] = -1

    _with_index_entries(layout, negative_size)
    res = cli("validate", f"{layout}:v1")
    assert res.code == 1, res.err
    assert res.err.count("manifests[0]") == 1, res.err  # the place is said once
