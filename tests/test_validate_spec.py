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
