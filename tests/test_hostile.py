"""Hostile input: cross-document disagreements and wrongly typed fields in configs,
manifests and index entries; every command answers with one line and a documented exit
code (never a traceback), and a command that fails changes nothing.

The images are built here from the sample, then broken by hand the way another tool (or
an attacker) could break them; each broken image goes through every command that reads
images, from a layout and registry-direct.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import dir_bytes, unique_repo

from cvmfs_inject.demo.sample import build_sample_image
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.jsondoc import canonical_json
from cvmfs_inject.oci.model import REF_NAME

DOCUMENTED = {0, 1, 2, 3, 4, 5, 6, 7, 8}
LABEL_TAR = "cvmfs_injection_tar"
Edit = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return edit


def _drop_last_diff_id(config: dict[str, Any]) -> None:
    config["rootfs"]["diff_ids"].pop(0)


def _extra_diff_id_labelled(config: dict[str, Any]) -> None:
    extra = "sha256:" + "e" * 64
    config["rootfs"]["diff_ids"].append(extra)
    config["config"]["Labels"][LABEL_TAR] = extra


def _label_first_of_two_layers(config: dict[str, Any]) -> None:
    """The label names a diff_id that is there, at a position the manifest has no layer for
    (two diff_ids, one layer)."""
    diff_ids = config["rootfs"]["diff_ids"]
    config["rootfs"]["diff_ids"] = diff_ids + diff_ids[-1:]
    config["config"]["Labels"][LABEL_TAR] = diff_ids[-1]


CONFIG_EDITS: dict[str, Edit] = {
    "diff-ids-fewer-than-layers": _drop_last_diff_id,
    "label-names-diff-id-without-layer": _extra_diff_id_labelled,
    "label-names-position-beyond-layers": _label_first_of_two_layers,
    "labels-list": _set("config/Labels", ["a", "b"]),
    "labels-string": _set("config/Labels", "x"),
    "label-value-number": _set(f"config/Labels/{LABEL_TAR}", 5),
    "config-string": _set("config", "x"),
    "config-list": _set("config", [1]),
    "rootfs-list": _set("rootfs", []),
    "diff-ids-string": _set("rootfs/diff_ids", "sha256:x"),
    "diff-ids-numbers": _set("rootfs/diff_ids", [1, 2, 3]),
    "history-object": _set("history", {"a": 1}),
    "history-strings": _set("history", ["x", 1]),
    "architecture-number": _set("architecture", 5),
    "os-null": _set("os", None),
}
MANIFEST_EDITS: dict[str, Edit] = {
    "layer-number": _set("layers/0", 5),
    "layer-empty-object": _set("layers/0", {}),
    "layer-size-string": _set("layers/0/size", "12"),
    "layer-digest-bad": _set("layers/0/digest", "sha256:xyz"),
    "layers-object": _set("layers", {"a": 1}),
    "config-descriptor-string": _set("config", "x"),
    "config-media-type-number": _set("config/mediaType", 5),
    "media-type-index": _set("mediaType", "application/vnd.oci.image.index.v1+json"),
}
ENTRY_EDITS: dict[str, Edit] = {
    "platform-string": _set("platform", "linux/amd64"),
    "platform-list": _set("platform", ["linux"]),
    "annotations-list": _set("annotations", ["x"]),
    "annotation-value-number": _set("annotations", {"org.example": 5}),
    "size-negative": _set("size", -1),
}


def broken_image(tmp_path: Path, part: str, edit: Edit) -> Path:
    """A two-platform sample index with an injected layer, with one document broken."""
    layout = tmp_path / "layout"
    build_sample_image(layout, "v1", platforms=("amd64", "arm64"), layers=1)
    store = Layout.open(layout)
    with store.writing():  # so that no temp area is left: a failed command changes nothing
        top = store.resolve("v1")
        index = json.loads(store.read_blob(top.digest, top.size))
        entry = index["manifests"][0]
        manifest = json.loads(store.read_blob(entry["digest"], entry["size"]))
        config = json.loads(store.read_blob(manifest["config"]["digest"],
                                            manifest["config"]["size"]))
        config.setdefault("config", {}).setdefault("Labels", {})[LABEL_TAR] = (
            config["rootfs"]["diff_ids"][-1])
        if part == "config":
            edit(config)
        new_config = store.put_bytes(canonical_json(config), manifest["config"]["mediaType"])
        manifest["config"] = {**manifest["config"], "digest": new_config.digest,
                              "size": new_config.size}
        if part == "manifest":
            edit(manifest)
        new_manifest = store.put_bytes(canonical_json(manifest), entry["mediaType"])
        entry.update(digest=new_manifest.digest, size=new_manifest.size)
        if part == "entry":
            edit(entry)
        new_index = store.put_bytes(canonical_json(index), top.media_type)
        doc = store.read_index().edit()
        doc["manifests"] = [{**new_index.to_dict(), "annotations": {REF_NAME: "v1"}}]
        store.write_index(doc)
    return layout


CASES = [pytest.param(part, edit, id=f"{part}-{name}")
         for part, edits in (("config", CONFIG_EDITS), ("manifest", MANIFEST_EDITS),
                             ("entry", ENTRY_EDITS))
         for name, edit in edits.items()]


def one_line_or_success(result: Any, command: str) -> None:
    assert "Traceback" not in result.err, f"{command}: {result.err}"
    assert result.code in DOCUMENTED, f"{command}: exit {result.code}: {result.err}"
    if result.code not in (0, 1):
        lines = result.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cvmfs-inject: error:"), (
            f"{command}: {result.err}")


@pytest.mark.parametrize(("part", "edit"), CASES)
def test_broken_images_get_one_line_from_every_command(cli, tmp_path: Path, part: str,
                                                       edit: Edit) -> None:
    layout = broken_image(tmp_path, part, edit)
    tree = tmp_path / "tree"
    (tree / "repo").mkdir(parents=True)
    (tree / "repo" / "file").write_bytes(b"content\n")
    commands = {
        "inspect": ["inspect", f"{layout}:v1"],
        "validate": ["validate", layout],
        "unpack": ["unpack", f"{layout}:v1", tmp_path / "out"],
        "init": ["init", f"{layout}:v1", "--tag", "prepared"],
        "inject": ["inject", f"{layout}:v1", tree, "--tag", "injected"],
    }
    for command, args in commands.items():
        before = dir_bytes(layout)
        result = cli(*args)
        one_line_or_success(result, command)
        if command == "validate":
            assert result.code == 1, f"validate found nothing wrong: {result.err}"
        if result.code != 0:
            assert dir_bytes(layout) == before, f"{command} changed the layout"
            assert not (tmp_path / "out").exists()


def test_a_tag_that_is_not_a_string_in_index_json(cli, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    build_sample_image(layout, "v1")
    doc = json.loads((layout / "index.json").read_bytes())
    doc["manifests"][0]["annotations"][REF_NAME] = 5
    (layout / "index.json").write_bytes(canonical_json(doc))
    for args in (["inspect", f"{layout}:v1"], ["inspect", layout], ["validate", layout]):
        one_line_or_success(result := cli(*args), args[0])
        assert result.code in (1, 3), result.err


@pytest.mark.registry
@pytest.mark.parametrize("name", ["diff-ids-fewer-than-layers",
                                  "label-names-position-beyond-layers", "labels-list",
                                  "config-string", "history-strings"])
def test_broken_configs_registry_direct(cli, registry, tmp_path: Path, name: str) -> None:
    """A registry stores any config blob: registry-direct commands face the same configs."""
    layout = broken_image(tmp_path, "config", CONFIG_EDITS[name])
    url = f"docker://{registry.host}/{unique_repo('hostile', name)}:v1"
    assert cli("push", "--no-tls-verify", f"{layout}:v1", url).code == 0
    tree = tmp_path / "tree"
    (tree / "repo").mkdir(parents=True)
    for args in (["inspect", url], ["validate", url], ["unpack", url, tmp_path / "out"],
                 ["init", url, "--tag", "prepared"], ["inject", url, tree, "--tag", "new"]):
        one_line_or_success(cli("--no-tls-verify", *args), args[0])


@pytest.mark.parametrize("tag", ["../../evil", "a b", "-lead", "x/../y", "", "v1\n", "a/", "é"])
def test_bad_tags_are_usage_errors_before_anything_is_written(cli, tmp_path: Path,
                                                              tag: str) -> None:
    layout = tmp_path / "layout"
    build_sample_image(layout, "v1")
    tree = tmp_path / "tree"
    (tree / "repo").mkdir(parents=True)
    before, around = dir_bytes(layout), sorted(p.name for p in tmp_path.iterdir())
    for args in (["inject", f"{layout}:v1", tree, f"--tag={tag}"],
                 ["init", f"{layout}:v1", f"--tag={tag}"],
                 ["run", "--layout", tmp_path / "cache", f"--tag={tag}", f"oci:{layout}:v1", tree,
                  f"oci-archive:{tmp_path}/out.tar"],
                 ["inject", "docker://127.0.0.1:1/r:v1", tree, f"--tag={tag}"]):
        result = cli(*args)
        assert result.code == 2, f"{args[0]} --tag {tag!r}: {result.err}"
        assert result.err.count("\n") == 1 and "tag" in result.err
    assert dir_bytes(layout) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == around


def _symlink_out(layout: Path, outside: Path, part: str) -> Path:
    """Move `part` of the layout out and put a symlink in its place; returns the link."""
    if part == "blob":
        store = Layout.open(layout)
        top = store.resolve("v1")
        config = json.loads(store.read_blob(top.digest, top.size))["config"]["digest"]
        part = f"blobs/sha256/{config[7:]}"
    link = layout / part
    if part == ".cvmfs-inject-tmp":
        (outside / "tmp").mkdir()
        link.symlink_to(outside / "tmp")
        return link
    target = outside / part.replace("/", "-")
    link.rename(target)
    link.symlink_to(target)
    return link


def _state(layout: Path, outside: Path) -> tuple[Any, ...]:
    entries = sorted((str(p.relative_to(layout)), os.readlink(p) if p.is_symlink() else "")
                     for p in layout.rglob("*"))
    return entries, dir_bytes(outside)


@pytest.mark.parametrize("part", ["blobs", "blobs/sha256", "index.json", "oci-layout", "blob",
                                  ".cvmfs-inject-tmp"])
def test_symlinks_inside_a_layout_are_read_never_written_through(cli, tmp_path: Path,
                                                                 part: str) -> None:
    layout, outside = tmp_path / "layout", tmp_path / "outside"
    build_sample_image(layout, "v1")
    outside.mkdir()
    link = _symlink_out(layout, outside, part)
    tree = tmp_path / "tree"
    (tree / "repo").mkdir(parents=True)
    for args in (["inspect", f"{layout}:v1"], ["validate", layout],
                 ["unpack", f"{layout}:v1", tmp_path / "out"],
                 ["push", f"{layout}:v1", f"oci-archive:{tmp_path}/out.tar"]):
        result = cli(*args)
        assert result.code == 0, f"{args[0]}: {result.err}"
    writers = (["inject", f"{layout}:v1", tree, "--tag", "new"],
               ["init", f"{layout}:v1", "--tag", "prepared"],
               ["pull", f"oci-archive:{tmp_path}/out.tar", f"{layout}:pulled"], ["gc", layout])
    for args in writers:
        before = _state(layout, outside)
        result = cli(*args)
        if part == "blob":  # only that blob may not be replaced; the rest is writable
            assert result.code == 0, f"{args[0]}: {result.err}"
            assert link.is_symlink() and dir_bytes(outside) == before[1]
            continue
        assert result.code == 3, f"{args[0]}: {result.err}"
        assert result.err.count("\n") == 1 and f"{link}: is a symlink" in result.err
        assert _state(layout, outside) == before


@pytest.mark.parametrize("command", ["inspect", "validate", "unpack"])
def test_an_index_nested_too_deeply_is_one_line(cli, tmp_path: Path, command: str) -> None:
    """JSON nested deeper than Python's recursion: exit 3, not an internal error."""
    layout = tmp_path / "deep"
    build_sample_image(layout, "v1")
    (layout / "index.json").write_bytes(b'{"manifests": ' + b"[" * 100_000 + b"]" * 100_000
                                        + b"}")
    argv = [command, f"{layout}:v1"] + ([tmp_path / "out"] if command == "unpack" else [])
    result = cli(*argv)
    assert result.code == 3, result.err
    assert len(result.err.strip().splitlines()) == 1 and "nested too deeply" in result.err


def test_an_index_json_over_the_document_limit_is_one_line(cli, tmp_path: Path) -> None:
    """index.json is held to the 64 MiB limit of every other document (it was read whole)."""
    layout = tmp_path / "big"
    build_sample_image(layout, "v1")
    index = layout / "index.json"
    index.write_bytes(index.read_bytes() + b" " * (64 << 20))
    result = cli("inspect", f"{layout}:v1")
    assert result.code == 3 and "too large" in result.err, result.err


def test_an_unpaired_surrogate_in_a_document_is_refused_before_any_write(cli, tmp_path: Path
                                                                        ) -> None:
    """`"\\udcff"` in index.json parses in Python but is no text (it could not be written
    back): validate reports it, writers refuse it (exit 3) with nothing written."""
    layout = tmp_path / "odd"
    build_sample_image(layout, "v1")
    index = json.loads((layout / "index.json").read_bytes())
    index["annotations"] = {"org.example.note": "SURROGATE"}
    (layout / "index.json").write_bytes(json.dumps(index).replace("SURROGATE", "\\udcff")
                                        .encode())
    tree = tmp_path / "tree"
    (tree / "repo").mkdir(parents=True)
    checked = cli("validate", layout)
    assert checked.code == 1 and "unpaired UTF-16 surrogate" in checked.err, checked.err
    before = dir_bytes(layout)
    result = cli("inject", f"{layout}:v1", tree, "--tag", "new")
    assert result.code == 3, result.err
    assert result.err.count("\n") == 1 and "surrogate" in result.err
    assert dir_bytes(layout) == before
