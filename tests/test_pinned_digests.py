"""Pinned digests: the same inputs give the same tar stream and the same documents, release
after release and through any redesign of the code that writes them.

Only what our own code decides is pinned: the tar stream (diff_id, and the layer digest with
`--compress none`), and the configs, which hold diff_ids, labels and history. gzip and zstd
bytes come from ISA-L and libzstd, whose output may differ by CPU family or library version,
so manifests and indexes (which name the sample's gzip base layers) are checked for their
exact bytes against what the test builds itself instead. A config digest changes with the
tool's version (it is in a label and the history): the pins are for version 0.1.0, and the
test writes the running version into a pinned config's bytes before comparing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cvmfs_inject import __version__
from cvmfs_inject.demo.sample import build_sample_image, build_sample_tree
from cvmfs_inject.oci.jsondoc import canonical_json
from cvmfs_inject.oci.model import REF_NAME

SAMPLE_TREE_DIFF_ID = "sha256:39f52a879d71533a56a954335a150935164e6c90fc1bbd6238854807ceebf849"
INJECTED_CONFIGS = {
    "amd64": "sha256:16e3d93106744bf575e3c9351ce062ecf23e8d17a97f65415587e7cba0868d7e",
    "arm64": "sha256:e55fd1839f1e9b9702b72cfea4fbbdd8335a6d1cfbba1d01948c984386cef303",
}
BASE_DIFF_IDS = {
    "amd64": ["sha256:6250e4aa7baaa2f8e1c9bf4ff3d67621f3bdbb0eb76dd6c7eee4e6dd12f7ad12",
              "sha256:b21617ad8d06f222e2b5948954c4b5e3386fc0b8cd87875bfa3cb5fb9ac50445"],
    "arm64": ["sha256:6250e4aa7baaa2f8e1c9bf4ff3d67621f3bdbb0eb76dd6c7eee4e6dd12f7ad12",
              "sha256:0a994baf11583d40c00d7cbd86aef72794388306a695e96e3be1fe57705dc4cb"],
}
PINNED_VERSION = "0.1.0"


@pytest.fixture
def umask_022() -> Iterator[None]:
    """File modes go into the tar headers: build the sample tree under a known umask."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def tagged(layout: Path, tag: str) -> dict[str, Any]:
    entries = json.loads((layout / "index.json").read_bytes())["manifests"]
    (entry,) = [e for e in entries if e["annotations"][REF_NAME] == tag]
    return entry


def pinned_config(raw: bytes) -> str:
    """The digest the config would have at the pinned version (the version is in a label
    and in the history's created_by)."""
    config = json.loads(raw)
    config["config"]["Labels"]["io.cvmfs-inject.version"] = PINNED_VERSION
    for entry in config["history"]:
        entry["created_by"] = entry["created_by"].replace(f"cvmfs-inject {__version__} ",
                                                          f"cvmfs-inject {PINNED_VERSION} ")
    return "sha256:" + hashlib.sha256(canonical_json(config)).hexdigest()


def test_injected_index_is_byte_for_byte_what_it_was(cli, epoch, umask_022, tmp_path):
    layout, tree = tmp_path / "layout", build_sample_tree(tmp_path / "tree")
    build_sample_image(layout, "v1", platforms=("amd64", "arm64"))
    base_index = json.loads(blob(layout, tagged(layout, "v1")["digest"]))
    base_manifests = {m["platform"]["architecture"]: json.loads(blob(layout, m["digest"]))
                      for m in base_index["manifests"]}

    result = cli("--json", "inject", f"{layout}:v1", tree, "--compress", "none",
                 "--exclude", ".provenance")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["layer"]["diff_id"] == SAMPLE_TREE_DIFF_ID
    assert report["layer"]["digest"] == SAMPLE_TREE_DIFF_ID  # uncompressed: the tar itself

    index_raw = blob(layout, tagged(layout, "v1")["digest"])
    index = json.loads(index_raw)
    expected_index = json.loads(json.dumps(base_index))
    for entry, (arch, base_manifest) in zip(index["manifests"], base_manifests.items(),
                                            strict=True):
        manifest_raw = blob(layout, entry["digest"])
        manifest = json.loads(manifest_raw)
        config_raw = blob(layout, manifest["config"]["digest"])
        assert pinned_config(config_raw) == INJECTED_CONFIGS[arch]
        config = json.loads(config_raw)
        assert config["rootfs"]["diff_ids"] == [*BASE_DIFF_IDS[arch], SAMPLE_TREE_DIFF_ID]
        expected = {**base_manifest,
                    "config": {**base_manifest["config"], "digest": manifest["config"]["digest"],
                               "size": len(config_raw)},
                    "layers": [*base_manifest["layers"], {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": SAMPLE_TREE_DIFF_ID, "size": report["layer"]["size"]}]}
        assert manifest_raw == canonical_json(expected)
        (slot,) = [m for m in expected_index["manifests"]
                   if m["platform"]["architecture"] == arch]
        slot.update(digest=entry["digest"], size=len(manifest_raw))
    assert index_raw == canonical_json(expected_index)
