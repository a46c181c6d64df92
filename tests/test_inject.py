"""inject / init / unpack on local layouts, end to end through the CLI.

Every test drives the real command line in-process (the `cli` fixture) on layouts built by
`build_sample_image`, and checks the result by reading the layout back: trees round-trip
exactly, the injected layer is replaced in place, edits are reproducible and a failed or
killed command leaves the layout byte-for-byte as it was.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_same_tree, dir_bytes, make_nasty_tree, tree_snapshot

from cvmfs_inject.commands.validate import validate_layout
from cvmfs_inject.demo.sample import build_sample_image
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.digest import sha256_digest
from cvmfs_inject.oci.jsondoc import canonical_json
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.oci.model import REF_NAME

SHRINKWRAP_TOOL = Path(__file__).resolve().parents[2] / "shared/tools/make_shrinkwrap_tree.py"
LABEL_TAR = "cvmfs_injection_tar"
LABEL_GZ = "cvmfs_injection_gz"
ERROR_PREFIX = "cvmfs-inject: error: "


# -- helpers ---------------------------------------------------------------------------------
def read_json(layout: Path, digest: str) -> dict[str, Any]:
    return json.loads((layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes())


def index_entry(layout: Path, tag: str) -> dict[str, Any]:
    """The raw index.json entry naming `tag`."""
    doc = json.loads((layout / "index.json").read_bytes())
    found = [m for m in doc["manifests"] if (m.get("annotations") or {}).get(REF_NAME) == tag]
    assert len(found) == 1, f"tag {tag} appears {len(found)} times in index.json"
    return found[0]


def images(layout: Path, tag: str) -> dict[str, tuple[str, dict[str, Any], dict[str, Any]]]:
    """platform arch -> (manifest digest, manifest, config) for the image `tag` names."""
    entry = index_entry(layout, tag)
    if MediaType.is_index(entry["mediaType"]):
        descs = read_json(layout, entry["digest"])["manifests"]
    else:
        descs = [entry]
    result = {}
    for desc in descs:
        manifest = read_json(layout, desc["digest"])
        config = read_json(layout, manifest["config"]["digest"])
        result[config["architecture"]] = (desc["digest"], manifest, config)
    return result


def image(layout: Path, tag: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    (only,) = images(layout, tag).values()
    return only


def labels(config: dict[str, Any]) -> dict[str, str]:
    return (config.get("config") or {}).get("Labels") or {}


def layer_history(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [h for h in config.get("history") or [] if not h.get("empty_layer")]


@contextlib.contextmanager
def hand_edit(path: Path) -> Iterator[Layout]:
    """The layout under its writer lock, so no temp area is left behind by our own edits."""
    layout = Layout.open(path)
    with layout.writing():
        yield layout


def rewrite_image(layout_path: Path, tag: str, edit_config: Any = None,
                  edit_manifest: Any = None) -> None:
    """Edit the config and/or manifest of a single-image tag by hand, as another tool would."""
    with hand_edit(layout_path) as layout:
        top = layout.resolve(tag)
        manifest = json.loads(layout.read_blob(top.digest, top.size))
        config = read_json(layout_path, manifest["config"]["digest"])
        if edit_config is not None:
            edit_config(config)
            desc = layout.put_bytes(canonical_json(config), manifest["config"]["mediaType"])
            manifest["config"] = {**manifest["config"], "digest": desc.digest,
                                  "size": desc.size}
        if edit_manifest is not None:
            edit_manifest(manifest)
        desc = layout.put_bytes(canonical_json(manifest), top.media_type)
        layout.set_tag(tag, top.replace(digest=desc.digest, size=desc.size))


def assert_one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    return lines[0]



@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "layout"
    build_sample_image(path, "base")
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_nasty_tree(tmp_path / "tree")


# -- round trip ------------------------------------------------------------------------------
def test_nasty_tree_round_trips_through_inject_and_unpack(cli, base, tree, tmp_path):
    snap = tree_snapshot(tree)
    # the tree really holds what the round trip must preserve
    assert any(len(Path(k).name) == 200 for k in snap)
    assert any(k.count("/") >= 40 for k in snap)
    assert any(" " in k for k in snap) and any(not k.isascii() for k in snap)
    assert any(v["type"] == "symlink" for v in snap.values())
    groups = [v["link_group"] for v in snap.values() if v["type"] == "file"]
    assert len(groups) > len(set(groups))

    result = cli("inject", f"{base}:base", tree)
    assert result.code == 0, result.err
    out = tmp_path / "out"
    result = cli("unpack", f"{base}:base", out)
    assert result.code == 0, result.err
    assert_same_tree(tree, out)
    assert cli("validate", base).code == 0


def test_shrinkwrap_tool_tree_round_trips(cli, base, tmp_path):
    if not SHRINKWRAP_TOOL.is_file():
        pytest.skip(f"cross-check only: {SHRINKWRAP_TOOL} is absent")
    out_root = tmp_path / "sw"
    subprocess.run([sys.executable, str(SHRINKWRAP_TOOL), str(out_root), "--files", "200",
                    "--mib", "2", "--seed", "5", "--nasty"], check=True,
                   capture_output=True)
    tree = out_root / "cvmfs"
    assert cli("inject", f"{base}:base", tree).code == 0
    out = tmp_path / "out"
    result = cli("unpack", f"{base}:base", out)
    assert result.code == 0, result.err
    assert_same_tree(tree, out)


# -- reproducibility and no-op ---------------------------------------------------------------
@pytest.mark.parametrize("platforms", [("amd64",), ("amd64", "arm64")], ids=["single", "index"])
def test_inject_is_reproducible_across_layouts(cli, epoch, tree, tmp_path, platforms):
    # the second tree is a copy elsewhere: other inode numbers, other on-disk order
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(tree), str(copy)], check=True)
    assert tree_snapshot(copy) == tree_snapshot(tree)
    results = []
    for name, source in (("one", tree), ("two", copy)):
        path = tmp_path / name
        build_sample_image(path, "base", platforms=platforms)
        result = cli("inject", f"{path}:base", source)
        assert result.code == 0, result.err
        imgs = images(path, "base")
        results.append({
            "entry": index_entry(path, "base")["digest"],
            "manifests": {arch: digest for arch, (digest, _, _) in imgs.items()},
            "layers": {arch: m["layers"][-1]["digest"] for arch, (_, m, _) in imgs.items()},
            "configs": {arch: m["config"]["digest"] for arch, (_, m, _) in imgs.items()},
        })
    assert results[0] == results[1]


def test_second_inject_of_same_tree_is_unchanged(cli, base, tree):
    assert cli("inject", f"{base}:base", tree).code == 0
    before = dir_bytes(base)
    result = cli("inject", f"{base}:base", tree)
    assert result.code == 0, result.err
    assert "unchanged" in result.out
    assert dir_bytes(base) == before


def test_init_twice_is_a_no_op(cli, base):
    result = cli("init", f"{base}:base")
    assert result.code == 0, result.err
    _, manifest, config = image(base, "base")
    assert len(manifest["layers"]) == 3
    assert labels(config)[LABEL_TAR] == config["rootfs"]["diff_ids"][-1]
    before = dir_bytes(base)
    result = cli("init", f"{base}:base")
    assert result.code == 0, result.err
    assert "already prepared" in result.out
    assert dir_bytes(base) == before


def test_init_again_into_the_same_new_tag_says_unchanged_and_writes_nothing(cli, base):
    first = cli("init", "--tag", "prepared", f"{base}:base")
    assert first.code == 0, first.err
    assert "prepared with an empty /cvmfs layer" in first.out
    before = dir_bytes(base)
    again = cli("init", "--tag", "prepared", f"{base}:base")
    assert again.code == 0, again.err
    assert ":prepared: unchanged (" in again.out and ": prepared with" not in again.out
    assert dir_bytes(base) == before


def test_init_twice_on_multi_platform_index(cli, tmp_path):
    path = tmp_path / "multi"
    build_sample_image(path, "base", platforms=("amd64", "arm64"))
    assert cli("init", f"{path}:base").code == 0
    before = dir_bytes(path)
    result = cli("init", f"{path}:base")
    assert result.code == 0 and "already prepared" in result.out
    assert dir_bytes(path) == before
    assert all(len(m["layers"]) == 3 for _, m, _ in images(path, "base").values())


# -- the update cycle ------------------------------------------------------------------------
def test_update_cycle_replaces_the_layer_in_place(cli, base, tmp_path):
    _, base_manifest, _ = image(base, "base")
    base_layers = [layer["digest"] for layer in base_manifest["layers"]]

    assert cli("init", f"{base}:base").code == 0
    _, manifest, config = image(base, "base")
    assert len(manifest["layers"]) == len(base_layers) + 1
    init_diff_id = config["rootfs"]["diff_ids"][-1]

    work = tmp_path / "work"
    result = cli("unpack", f"{base}:base", work)
    assert result.code == 0, result.err
    assert work.is_dir() and not any(work.iterdir())

    make_nasty_tree(work)
    result = cli("inject", f"{base}:base", work)
    assert result.code == 0, result.err
    first_diff_id = check_injected(base, base_layers, old_diff_id=init_diff_id)

    again = tmp_path / "again"
    assert cli("unpack", f"{base}:base", again).code == 0
    assert_same_tree(work, again)

    (again / "sft.cern.ch" / "lcg" / "releases" / "file-3.txt").unlink()
    (again / "atlas.cern.ch" / "odd" / "with space.txt").write_bytes(b"changed\n")
    (again / "new-repo.cern.ch").mkdir()
    (again / "new-repo.cern.ch" / "added").write_bytes(b"new\n")
    result = cli("inject", f"{base}:base", again)
    assert result.code == 0, result.err
    check_injected(base, base_layers, old_diff_id=first_diff_id)

    final = tmp_path / "final"
    assert cli("unpack", f"{base}:base", final).code == 0
    assert_same_tree(again, final)
    assert cli("validate", base).code == 0


def check_injected(layout: Path, base_layers: list[str], old_diff_id: str) -> str:
    _, manifest, config = image(layout, "base")
    layers = manifest["layers"]
    diff_ids = config["rootfs"]["diff_ids"]
    assert len(layers) == len(diff_ids) == len(base_layers) + 1
    assert [layer["digest"] for layer in layers[:-1]] == base_layers
    new_diff_id = diff_ids[-1]
    assert new_diff_id != old_diff_id
    assert old_diff_id not in diff_ids
    found = labels(config)
    assert found[LABEL_TAR] == new_diff_id
    assert found[LABEL_GZ] == layers[-1]["digest"]
    assert found["io.cvmfs-inject.mount-point"] == "/cvmfs"
    assert "io.cvmfs-inject.version" in found
    assert found["org.example.sample"] == "yes"
    assert any(old_diff_id in json.dumps(h) and new_diff_id in json.dumps(h)
               for h in config["history"]), config["history"]
    assert len(layer_history(config)) == len(layers)
    return new_diff_id


# -- an image made by the original CernVM-FS injector ----------------------------------------
def legacy_layer(level: int, stray: bool = False) -> tuple[bytes, bytes]:
    """(tar, gzip) of what `tar -C DIR -cf - .` gives for DIR/cvmfs/legacy.txt (and, with
    `stray`, DIR/tmp/stray: the original injector packs whatever DIR holds)."""
    raw = io.BytesIO()
    entries = [("./", None), ("./cvmfs/", None), ("./cvmfs/legacy.txt", b"old\n")]
    if stray:
        entries += [("./tmp/", None), ("./tmp/stray", b"stray\n")]
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_600_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                archive.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                archive.addfile(info, io.BytesIO(data))
    tar = raw.getvalue()
    return tar, gzip.compress(tar, compresslevel=level, mtime=0)


def make_legacy_image(path: Path, stray: bool = False) -> tuple[list[str], str, str]:
    """A Docker v2s2 sample plus a layer, labels and history as docker_injector.py writes."""
    build_sample_image(path, "base", docker=True)
    tar, gz = legacy_layer(level=6, stray=stray)
    with hand_edit(path) as layout:
        layer = layout.put_bytes(gz, MediaType.DOCKER_LAYER_GZIP)
    diff_id = sha256_digest(tar)
    _, manifest, _ = image(path, "base")
    base_layers = [layer_["digest"] for layer_ in manifest["layers"]]

    def edit_config(config: dict[str, Any]) -> None:
        config["rootfs"]["diff_ids"].append(diff_id)
        config["history"].append({"created": "2021-01-01T00:00:00Z",
                                  "created_by": f"/bin/sh -c #(nop) ADD file:{diff_id} in / ",
                                  "author": "cvmfs_shrinkwrap"})
        config["config"]["Labels"].update({LABEL_TAR: diff_id, LABEL_GZ: layer.digest})
        config["container_config"] = {"Labels": {LABEL_TAR: diff_id, LABEL_GZ: layer.digest}}

    rewrite_image(path, "base", edit_config,
                  lambda m: m["layers"].append(layer.to_dict()))
    assert cli_free_validate(path)
    return base_layers, diff_id, layer.digest


def cli_free_validate(path: Path) -> bool:
    return validate_layout(Layout.open(path)) == []


def recompress_legacy_layer(path: Path, old_digest: str) -> str:
    """Re-gzip the legacy layer at another level: same diff_id, new digest; manifest only."""
    _, gz = legacy_layer(level=1)
    with hand_edit(path) as layout:
        layer = layout.put_bytes(gz, MediaType.DOCKER_LAYER_GZIP)
    assert layer.digest != old_digest

    def edit_manifest(manifest: dict[str, Any]) -> None:
        assert manifest["layers"][-1]["digest"] == old_digest
        manifest["layers"][-1] = layer.to_dict()

    rewrite_image(path, "base", edit_manifest=edit_manifest)
    layout.blob_path(old_digest).unlink()  # the gz label now names a blob nobody has
    return layer.digest


@pytest.mark.parametrize("recompressed", [False, True], ids=["as-written", "recompressed"])
def test_image_from_original_injector_is_updated_in_place(cli, tmp_path, tree, recompressed):
    path = tmp_path / "legacy"
    base_layers, legacy_diff_id, legacy_digest = make_legacy_image(path)
    if recompressed:
        recompress_legacy_layer(path, legacy_digest)
        _, _, config = image(path, "base")
        assert not Layout.open(path).has_blob(labels(config)[LABEL_GZ])

    # what `prepare` did: the legacy layer unpacks
    prepared = tmp_path / "prepared"
    result = cli("unpack", f"{path}:base", prepared)
    assert result.code == 0, result.err
    assert (prepared / "legacy.txt").read_bytes() == b"old\n"

    result = cli("inject", f"{path}:base", tree)
    assert result.code == 0, result.err
    _, manifest, config = image(path, "base")
    assert manifest["mediaType"] == MediaType.DOCKER_MANIFEST
    assert len(manifest["layers"]) == len(base_layers) + 1
    assert [layer["digest"] for layer in manifest["layers"][:-1]] == base_layers
    assert manifest["layers"][-1]["mediaType"] == MediaType.DOCKER_LAYER_GZIP
    new_diff_id = config["rootfs"]["diff_ids"][-1]
    assert legacy_diff_id not in config["rootfs"]["diff_ids"]
    assert labels(config)[LABEL_TAR] == new_diff_id
    assert labels(config)[LABEL_GZ] == manifest["layers"][-1]["digest"]
    assert any(legacy_diff_id in json.dumps(h) and new_diff_id in json.dumps(h)
               for h in config["history"])
    assert len(layer_history(config)) == len(manifest["layers"])
    out = tmp_path / "out"
    assert cli("unpack", f"{path}:base", out).code == 0
    assert_same_tree(tree, out)
    assert cli("validate", path).code == 0


@pytest.mark.parametrize("mount", ["/cvmfs", "/opt/cvmfs"])
def test_a_stack_takes_over_an_original_injector_layer_that_holds_more(cli, tmp_path, tree,
                                                                      mount):
    """The original injector's label alone names a layer its users filled with `tar -C DIR
    .` of any DIR: a stacked inject replaces it as that tool and a single-layer inject do,
    whatever else it holds (only labels of ours must name a layer of the mount point)."""
    path = tmp_path / "legacy"
    make_legacy_image(path, stray=True)
    result = cli("--json", "inject", f"{path}:base", tree, "--path", mount, "--max-layers",
                 "3", "--state", tmp_path / "state")
    assert result.code == 0, result.err
    assert json.loads(result.out)["stack"]["action"] == "rebased"
    out = tmp_path / "out"
    assert cli("unpack", f"{path}:base", out).code == 0
    assert_same_tree(tree, out)


# -- config shapes the original injector chokes on -------------------------------------------
def _drop(key: str):
    def edit(config: dict[str, Any]) -> None:
        config["config"].pop(key)
    return edit


def _labels_value(value: Any):
    def edit(config: dict[str, Any]) -> None:
        config["config"]["Labels"] = value
    return edit


def _config_null(config: dict[str, Any]) -> None:
    config["config"] = None


def _config_absent(config: dict[str, Any]) -> None:
    del config["config"]


def _no_history(config: dict[str, Any]) -> None:
    del config["history"]


def _container_config(config: dict[str, Any]) -> None:
    config["container_config"] = {"Cmd": ["/bin/sh", "-c", "#(nop) ENV x"],
                                  "Labels": {"org.example.old": "kept"}}


def _container_config_null(config: dict[str, Any]) -> None:
    config["container_config"] = None


def _empty_layers(config: dict[str, Any]) -> None:
    entry = {"created": "2023-11-14T22:13:20Z", "created_by": "ENV x", "empty_layer": True}
    config["history"] = [dict(entry), *config["history"], dict(entry), dict(entry)]


def _non_ascii(config: dict[str, Any]) -> None:
    config["config"]["Labels"]["org.example.ünïcode"] = "välue 名前 ✓ \u2028"
    config["config"]["Env"].append("GREETING=grüß dich 🌍")
    config["author"] = "Zoë Ñúñez"


CONFIG_CASES = {
    "no-labels": _drop("Labels"),
    "labels-null": _labels_value(None),
    "config-null": _config_null,
    "config-absent": _config_absent,
    "no-history": _no_history,
    "container-config": _container_config,
    "container-config-null": _container_config_null,
    "empty-layer-history": _empty_layers,
    "non-ascii": _non_ascii,
}


@pytest.mark.parametrize("docker", [False, True], ids=["oci", "v2s2"])
@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_unusual_configs_inject_and_validate(cli, tmp_path, tree, case, docker):
    path = tmp_path / "layout"
    build_sample_image(path, "base", docker=docker)
    rewrite_image(path, "base", CONFIG_CASES[case])
    _, _, before = image(path, "base")

    for round_ in range(2):  # append, then replace in place
        if round_:
            (tree / "round-two").write_bytes(b"second round\n")
        result = cli("inject", f"{path}:base", tree)
        assert result.code == 0, result.err
        result = cli("validate", path)
        assert result.code == 0, result.err + result.out
        _, manifest, config = image(path, "base")
        assert len(manifest["layers"]) == len(before["rootfs"]["diff_ids"]) + 1
        assert labels(config)[LABEL_TAR] == config["rootfs"]["diff_ids"][-1]
        if isinstance(before.get("history"), list):
            assert len(layer_history(config)) == len(manifest["layers"])
        for key in ("container_config", "author"):
            if key in before:
                assert config[key] == before[key]
        for key, value in labels(before).items():
            assert labels(config)[key] == value
        if isinstance(before.get("config"), dict) and "Env" in before["config"]:
            assert config["config"]["Env"] == before["config"]["Env"]
        out = tmp_path / f"out{round_}"
        assert cli("unpack", f"{path}:base", out).code == 0
        assert_same_tree(tree, out)


# -- multi-platform --------------------------------------------------------------------------
def multi_layout(path: Path) -> dict[str, Any]:
    """A two-platform OCI index with an annotation and an unknown key added by hand."""
    build_sample_image(path, "base", platforms=("amd64", "arm64"))
    with hand_edit(path) as layout:
        top = layout.resolve("base")
        doc = json.loads(layout.read_blob(top.digest, top.size))
        doc["annotations"] = {"org.example.index": "kept"}
        doc["x-extra"] = {"anything": [1, 2, 3]}
        desc = layout.put_bytes(canonical_json(doc), top.media_type)
        layout.set_tag("base", top.replace(digest=desc.digest, size=desc.size))
    return doc


def test_multi_platform_index_gets_one_shared_layer(cli, tmp_path, tree):
    path = tmp_path / "multi"
    original = multi_layout(path)
    before = images(path, "base")
    result = cli("inject", f"{path}:base", tree)
    assert result.code == 0, result.err
    entry = index_entry(path, "base")
    doc = read_json(path, entry["digest"])
    assert doc["annotations"] == original["annotations"]
    assert doc["x-extra"] == original["x-extra"]
    assert [m["platform"] for m in doc["manifests"]] == \
        [m["platform"] for m in original["manifests"]]
    after = images(path, "base")
    assert set(after) == {"amd64", "arm64"}
    injected = {m["layers"][-1]["digest"] for _, m, _ in after.values()}
    assert len(injected) == 1
    for arch, (digest, manifest, _) in after.items():
        assert digest != before[arch][0]
        assert len(manifest["layers"]) == len(before[arch][1]["layers"]) + 1
    assert cli("validate", path).code == 0


def test_platform_option_injects_only_that_platform(cli, tmp_path, tree):
    path = tmp_path / "multi"
    original = multi_layout(path)
    before = images(path, "base")
    result = cli("inject", "--platform", "linux/arm64", f"{path}:base", tree)
    assert result.code == 0, result.err
    doc = read_json(path, index_entry(path, "base")["digest"])
    assert doc["annotations"] == original["annotations"]
    assert doc["x-extra"] == original["x-extra"]
    after = images(path, "base")
    assert after["amd64"][0] == before["amd64"][0]
    assert doc["manifests"][0] == original["manifests"][0]
    assert after["arm64"][0] != before["arm64"][0]
    assert LABEL_TAR in labels(after["arm64"][2])
    assert LABEL_TAR not in labels(after["amd64"][2])
    assert cli("validate", path).code == 0


def test_every_platform_asked_of_a_single_image_must_be_its_own(cli, base, tree):
    before = dir_bytes(base)
    result = cli("inject", "--platform", "linux/amd64,linux/arm64", f"{base}:base", tree)
    assert result.code == 4, result.err
    assert "not linux/arm64" in result.err
    assert dir_bytes(base) == before


# -- tags and garbage ------------------------------------------------------------------------
def test_new_tag_leaves_the_old_tag_alone(cli, base, tree):
    old_entry = index_entry(base, "base")
    old_digest, old_manifest, _ = image(base, "base")
    result = cli("inject", "--tag", "injected", f"{base}:base", tree)
    assert result.code == 0, result.err
    assert index_entry(base, "base") == old_entry
    new_digest, manifest, config = image(base, "injected")
    assert new_digest != old_digest
    assert labels(config)[LABEL_TAR] == config["rootfs"]["diff_ids"][-1]
    assert len(manifest["layers"]) == len(old_manifest["layers"]) + 1
    layout = Layout.open(base)
    assert layout.has_blob(old_digest) and layout.has_blob(old_manifest["config"]["digest"])
    assert cli("validate", base).code == 0


def test_new_tag_is_written_even_when_the_tree_is_unchanged(cli, base, tree):
    assert cli("inject", f"{base}:base", tree).code == 0
    injected = index_entry(base, "base")
    result = cli("inject", "--tag", "copy", f"{base}:base", tree)
    assert result.code == 0, result.err
    assert index_entry(base, "base") == injected
    assert index_entry(base, "copy")["digest"] == injected["digest"]


def test_init_new_tag_is_written_even_when_already_prepared(cli, base):
    assert cli("init", f"{base}:base").code == 0
    prepared = index_entry(base, "base")
    result = cli("init", "--tag", "fresh", f"{base}:base")
    assert result.code == 0, result.err
    assert index_entry(base, "base") == prepared
    assert index_entry(base, "fresh")["digest"] == prepared["digest"]


def test_replaced_blobs_stay_until_gc(cli, base, tree):
    assert cli("inject", f"{base}:base", tree).code == 0
    first_digest, first_manifest, _ = image(base, "base")
    first_layer = first_manifest["layers"][-1]["digest"]
    (tree / "more").write_bytes(b"more\n")
    assert cli("inject", f"{base}:base", tree).code == 0
    layout = Layout.open(base)
    assert layout.has_blob(first_layer) and layout.has_blob(first_digest)
    result = cli("gc", base)
    assert result.code == 0, result.err
    assert not layout.has_blob(first_layer) and not layout.has_blob(first_digest)
    assert cli("validate", base).code == 0


# -- compression -----------------------------------------------------------------------------
@pytest.mark.parametrize(("compress", "media_type"), [
    ("gzip", MediaType.OCI_LAYER_GZIP), ("zstd", MediaType.OCI_LAYER_ZSTD),
    ("none", MediaType.OCI_LAYER)])
def test_compression_media_types_on_oci(cli, base, tree, tmp_path, compress, media_type):
    result = cli("inject", "--compress", compress, f"{base}:base", tree)
    assert result.code == 0, result.err
    _, manifest, _ = image(base, "base")
    assert manifest["layers"][-1]["mediaType"] == media_type
    assert cli("validate", base).code == 0
    out = tmp_path / "out"
    assert cli("unpack", f"{base}:base", out).code == 0
    assert_same_tree(tree, out)


def test_zstd_into_docker_image_is_refused(cli, tmp_path, tree):
    path = tmp_path / "docker"
    build_sample_image(path, "base", docker=True)
    before = dir_bytes(path)
    result = cli("inject", "--compress", "zstd", f"{path}:base", tree)
    assert result.code == 2
    line = assert_one_error_line(result.err)
    assert "zstd" in line and "Docker" in line
    assert dir_bytes(path) == before


# -- bad input -------------------------------------------------------------------------------
def test_missing_dir(cli, base, tmp_path):
    before = dir_bytes(base)
    result = cli("inject", f"{base}:base", tmp_path / "nope")
    assert result.code == 3
    assert "no such directory" in assert_one_error_line(result.err)
    assert dir_bytes(base) == before


def test_dir_is_a_file(cli, base, tmp_path):
    target = tmp_path / "file"
    target.write_bytes(b"x")
    before = dir_bytes(base)
    result = cli("inject", f"{base}:base", target)
    assert result.code == 3
    assert "not a directory" in assert_one_error_line(result.err)
    assert dir_bytes(base) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(cli, base, tree):
    secret = tree / "secret"
    secret.write_bytes(b"no\n")
    secret.chmod(0)
    before = dir_bytes(base)
    result = cli("inject", f"{base}:base", tree)
    assert result.code == 3
    line = assert_one_error_line(result.err)
    assert "secret" in line and "cannot read" in line
    assert dir_bytes(base) == before


def test_label_naming_a_missing_layer(cli, base, tree):
    assert cli("inject", f"{base}:base", tree).code == 0
    bogus = "sha256:" + "ab" * 32
    rewrite_image(base, "base", lambda c: c["config"]["Labels"].update({LABEL_TAR: bogus}))
    before = dir_bytes(base)
    (tree / "changed").write_bytes(b"x")
    result = cli("inject", f"{base}:base", tree)
    assert result.code == 4
    line = assert_one_error_line(result.err)
    assert bogus in line and "not in" in line
    assert dir_bytes(base) == before


def test_tag_not_found(cli, base, tree):
    before = dir_bytes(base)
    result = cli("inject", f"{base}:nosuchtag", tree)
    assert result.code == 4
    assert "nosuchtag" in assert_one_error_line(result.err)
    assert dir_bytes(base) == before


# -- a killed inject -------------------------------------------------------------------------
def test_killed_inject_leaves_the_image_intact(cli, base, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    chunk = os.urandom(8 << 20)
    for i in range(20):  # 160 MiB: incompressible, so packing takes well over a second
        (big / f"blob-{i:02d}").write_bytes(chunk[i:] + chunk[:i])
    old_entry = index_entry(base, "base")
    tmp_area = base / ".cvmfs-inject-tmp"
    proc = subprocess.Popen([sys.executable, "-m", "cvmfs_inject", "inject", f"{base}:base",
                             str(big)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            if tmp_area.is_dir() and any(p.stat().st_size > (1 << 20)
                                         for p in tmp_area.iterdir() if p.is_file()):
                break
            time.sleep(0.01)
        time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (
        f"inject ended on its own ({proc.returncode}) before it could be killed: "
        f"{proc.stderr.read().decode() if proc.stderr else ''}")
    if proc.stderr:
        proc.stderr.close()
    result = cli("validate", base)
    assert result.code == 0, result.err
    assert index_entry(base, "base") == old_entry
    result = cli("inject", f"{base}:base", big)
    assert result.code == 0, result.err
    assert not tmp_area.exists()
    assert index_entry(base, "base")["digest"] != old_entry["digest"]
    assert cli("validate", base).code == 0


@pytest.mark.parametrize(("signum", "code", "word"), [
    pytest.param(signal.SIGINT, 130, "interrupted", id="ctrl-c"),
    pytest.param(signal.SIGTERM, 143, "terminated", id="sigterm"),
])
def test_interrupted_inject_cleans_up_and_says_so(cli, base, tmp_path, signum, code, word):
    """Ctrl-C and SIGTERM (timeout, a CI cancel) end with one line and their exit code,
    remove the half-written blob and leave the image as it was."""
    tree = tmp_path / "tree"
    tree.mkdir()
    words = b"lib bin etc share root geant4 muon calo track".split()
    rng = random.Random(5)
    (tree / "text").write_bytes(b" ".join(rng.choice(words) for _ in range(2_000_000)))
    old_entry = index_entry(base, "base")
    tmp_area = base / ".cvmfs-inject-tmp"
    # zstd level 19 on 12 MB of text takes seconds: time to interrupt it mid-pack. SIGINT
    # as a terminal sends it: a test run started in the background of a script inherits it
    # ignored, and Python then keeps ignoring it.
    proc = subprocess.Popen([sys.executable, "-m", "cvmfs_inject", "inject", f"{base}:base",
                             str(tree), "--compress", "zstd", "--level", "19"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            if tmp_area.is_dir() and any(p.is_file() for p in tmp_area.iterdir()):
                break
            time.sleep(0.01)
        time.sleep(0.3)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == code, err
    assert err == f"cvmfs-inject: error: {word}\n"
    assert not tmp_area.exists() or not any(tmp_area.iterdir())
    assert index_entry(base, "base") == old_entry
    assert cli("validate", base).code == 0
