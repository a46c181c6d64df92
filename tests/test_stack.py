"""/cvmfs as a stack of layers (`--max-layers`): the union every reader sees is the tree.

Each change kind is one update (a delta) of a base, and three readers apply the stack:
our `unpack`, `umoci unpack` and podman (pull, then `image mount`: overlayfs, as a
container sees it). The comparison is the full `tree_snapshot`: types, modes, mtimes,
contents, link targets and hard-link groups. SOURCE_DATE_EPOCH is unset here, so the
mtimes are the tree's own.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from helpers import assert_same_tree, dead_pid, dir_bytes, unique_repo
from readers import podman_rootfs, umoci_unpack

from cvmfs_inject import scratch
from cvmfs_inject.demo.sample import build_sample_image
from cvmfs_inject.stack.cache import IndexCache

PAST = 1_600_000_000


def build_tree(root: Path) -> Path:
    """A small shrinkwrap-shaped tree: a content farm hard-linked into releases, symlinks,
    an empty directory, deep paths, odd names; every time distinct and in the past."""
    files = {
        ".data/aa/c1": b"shared content one\n",
        ".data/bb/c2": b"shared content two, a little longer\n",
        "rel/a/sub/deep/file.txt": b"deep file\n",
        "rel/a/name with spaces é.txt": b"odd name\n",
        "rel/b/only-b.txt": b"only in b\n",
        "rel/c/data.bin": bytes(range(256)) * 40,
        "top.txt": b"at the top\n",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for name in ("rel/a/x.py", "rel/b/x.py"):
        os.link(root / ".data/aa/c1", root / name)
    os.link(root / ".data/bb/c2", root / "rel/c/y.py")
    (root / "rel/empty").mkdir()
    (root / "latest").symlink_to("rel")
    (root / "rel/a/run").symlink_to("sub/deep/file.txt")
    (root / "rel/c/data.bin").chmod(0o600)
    stamp(root)
    return root


def stamp(root: Path, at: int = PAST) -> None:
    """Give every entry its own time (deepest first, so directories keep theirs)."""
    paths = sorted(root.rglob("*"), key=lambda p: (-len(p.parts), str(p)))
    for i, path in enumerate([*paths, root]):
        os.utime(path, (at + i, at + i), follow_symlinks=False)


def touch(path: Path) -> None:
    """A change a second later than anything before (the quick check compares times)."""
    later = max(os.lstat(path).st_mtime, PAST + 10_000) + 1
    os.utime(path, (later, later), follow_symlinks=False)


def _content(root: Path) -> None:
    (root / "rel/a/sub/deep/file.txt").write_bytes(b"DEEP FILE\n")  # same size


def _mode(root: Path) -> None:
    (root / "top.txt").chmod(0o600)


def _mtime(root: Path) -> None:
    touch(root / "top.txt")


def _add(root: Path) -> None:
    (root / "rel/b/new.txt").write_bytes(b"new\n")


def _remove(root: Path) -> None:
    (root / "rel/b/only-b.txt").unlink()


def _remove_tree(root: Path) -> None:
    shutil.rmtree(root / "rel/a/sub")
    (root / "rel/a/run").unlink()


def _dir_to_symlink(root: Path) -> None:
    shutil.rmtree(root / "rel/b")
    (root / "rel/b").symlink_to("a")


def _symlink_to_dir(root: Path) -> None:
    (root / "latest").unlink()
    (root / "latest").mkdir()
    (root / "latest/readme").write_bytes(b"now a directory\n")


def _file_to_dir(root: Path) -> None:
    (root / "top.txt").unlink()
    (root / "top.txt").mkdir()
    (root / "top.txt/inner").write_bytes(b"inner\n")


def _dir_to_file(root: Path) -> None:
    shutil.rmtree(root / "rel/c")
    (root / "rel/c").write_bytes(b"was a directory\n")


def _group_gains_a_name(root: Path) -> None:
    os.link(root / ".data/aa/c1", root / "rel/c/x.py")


def _group_loses_a_name(root: Path) -> None:
    (root / "rel/b/x.py").unlink()


def _group_left_with_one_name(root: Path) -> None:
    """The group keeps one name in the tree, and a link outside it: a group of none."""
    os.link(root / ".data/bb/c2", root.parent / f"{root.name}-outside-c2")
    (root / "rel/c/y.py").unlink()


def _group_content(root: Path) -> None:
    (root / ".data/aa/c1").write_bytes(b"shared content ONE, rewritten in place\n")


def _new_release(root: Path) -> None:
    release = root / "rel/d"
    (release / "lib").mkdir(parents=True)
    os.link(root / ".data/bb/c2", release / "lib/y.py")
    os.link(root / ".data/aa/c1", release / "x.py")
    (release / "fresh.txt").write_bytes(b"fresh\n")


def _empty_dir_removed(root: Path) -> None:
    (root / "rel/empty").rmdir()


CHANGES: dict[str, Callable[[Path], None]] = {
    "content": _content, "mode": _mode, "mtime": _mtime, "add": _add, "remove": _remove,
    "remove-tree": _remove_tree, "dir-to-symlink": _dir_to_symlink,
    "symlink-to-dir": _symlink_to_dir, "file-to-dir": _file_to_dir,
    "dir-to-file": _dir_to_file, "group-gains-a-name": _group_gains_a_name,
    "group-loses-a-name": _group_loses_a_name, "group-content": _group_content,
    "group-left-with-one-name": _group_left_with_one_name,
    "new-release": _new_release, "empty-dir-removed": _empty_dir_removed,
}


def _change(root: Path, name: str) -> None:
    """Apply a change a second after the tree's times, as a later export would."""
    CHANGES[name](root)
    later = PAST + 20_000
    for path in [root, *root.rglob("*")]:
        st = os.lstat(path)
        if st.st_mtime > later:  # touched by the change just now: bring it to `later`
            os.utime(path, (later, later), follow_symlinks=False)


def inject(cli, ref: str, tree: Path, state: Path, *args: object) -> dict:
    result = cli("--json", "inject", ref, tree, "--state", state, *args)
    assert result.code == 0, result.err
    return json.loads(result.out)


@pytest.fixture
def stacked(cli, tmp_path):
    """A layout whose tag s1 holds the base layer of build_tree, ready for an update."""
    layout, state = tmp_path / "layout", tmp_path / "state"
    build_sample_image(layout, "v1")
    tree = build_tree(tmp_path / "tree")
    report = inject(cli, f"{layout}:v1", tree, state, "--max-layers", "4", "--tag", "s1")
    assert report["stack"]["action"] == "base"
    return layout, tree, state


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_every_change_kind_gives_the_tree_in_every_reader(cli, tmp_path, stacked, change):
    layout, tree, state = stacked
    _change(tree, change)
    report = inject(cli, f"{layout}:s1", tree, state, "--max-layers", "4", "--tag", "s2")
    assert report["stack"]["action"] == "delta" and report["stack"]["layers"] == 2
    result = cli("unpack", f"{layout}:s2", tmp_path / "ours")
    assert result.code == 0, result.err
    assert_same_tree(tree, tmp_path / "ours")
    assert_same_tree(tree, umoci_unpack(layout, "s2", tmp_path / "bundle") / "cvmfs")
    with podman_rootfs(layout, "s2", tmp_path / "podman") as rootfs:
        assert_same_tree(tree, rootfs / "cvmfs")
        assert (rootfs / "etc/os-release").is_file()  # the base image is still underneath


def test_a_delta_holds_only_what_changed(cli, tmp_path, stacked):
    layout, tree, state = stacked
    _change(tree, "content")
    report = inject(cli, f"{layout}:s1", tree, state, "--max-layers", "4", "--tag", "s2")
    stack = report["stack"]
    assert (stack["added"], stack["changed"], stack["removed"]) == (0, 1, 0)
    # the file and its directories, up to the mount point: nothing else
    assert report["stats"]["files"] == 1 and report["stats"]["entries"] == 6
    assert report["layer"]["size"] < 400


def test_an_unchanged_tree_writes_nothing(cli, tmp_path, stacked):
    layout, tree, state = stacked
    _change(tree, "add")
    inject(cli, f"{layout}:s1", tree, state, "--max-layers", "4", "--tag", "s2")
    before = dir_bytes(layout)
    report = inject(cli, f"{layout}:s2", tree, state, "--max-layers", "4")
    assert report["status"] == "unchanged" and report["stack"]["action"] == "unchanged"
    assert dir_bytes(layout) == before


def test_the_first_stacked_inject_is_todays_single_layer(cli, tmp_path, epoch):
    layout = tmp_path / "layout"
    build_sample_image(layout, "v1")
    tree = build_tree(tmp_path / "tree")
    single = inject(cli, f"{layout}:v1", tree, tmp_path / "state", "--tag", "single")
    stacked = inject(cli, f"{layout}:v1", tree, tmp_path / "state", "--tag", "stacked",
                     "--max-layers", "3")
    assert stacked["digest"] == single["digest"]
    assert stacked["layer"] == single["layer"]


def _updates(cli, tmp_path: Path, name: str, *args: object, cache: bool = True
             ) -> list[dict]:
    """Five updates of one change each, with `args`; the reports. Without `cache`, every
    update starts from an empty state directory (a fresh CI runner)."""
    layout, state = tmp_path / name / "layout", tmp_path / name / "state"
    build_sample_image(layout, "v1")
    tree = build_tree(tmp_path / name / "tree")
    reports = [inject(cli, f"{layout}:v1", tree, state, *args)]
    for change in ("content", "add", "new-release", "remove", "dir-to-symlink"):
        _change(tree, change)
        if not cache:
            shutil.rmtree(state)
        reports.append(inject(cli, f"{layout}:v1", tree, state, *args))
        result = cli("unpack", f"{layout}:v1", tmp_path / name / f"out-{change}")
        assert result.code == 0, result.err
        assert_same_tree(tree, tmp_path / name / f"out-{change}")
    return reports


def test_the_stack_stays_within_max_layers_by_merging_deltas(cli, tmp_path):
    reports = _updates(cli, tmp_path, "a", "--max-layers", "3", "--compact-ratio", "10")
    actions = [report["stack"]["action"] for report in reports]
    assert actions == ["base", "delta", "delta", "merged", "delta", "merged"]
    assert [report["stack"]["layers"] for report in reports] == [1, 2, 3, 2, 3, 2]


def test_deltas_that_outgrow_the_ratio_give_a_fresh_base(cli, tmp_path):
    reports = _updates(cli, tmp_path, "a", "--max-layers", "3", "--compact-ratio", "0.01")
    assert {report["stack"]["action"] for report in reports[1:]} == {"rebased"}
    assert all(report["stack"]["layers"] == 1 for report in reports)


def test_the_same_updates_give_the_same_digests_with_or_without_the_cache(cli, tmp_path,
                                                                          epoch):
    first = _updates(cli, tmp_path, "a", "--max-layers", "3")
    again = _updates(cli, tmp_path, "b", "--max-layers", "3", cache=False)
    assert [r["digest"] for r in first] == [r["digest"] for r in again]
    assert all(r["stack"]["downloaded"] > 0 for r in again[1:])


def test_a_missing_or_corrupt_cache_is_rebuilt_from_the_layers(cli, tmp_path, stacked):
    layout, tree, state = stacked
    _change(tree, "add")
    inject(cli, f"{layout}:s1", tree, state, "--max-layers", "4", "--tag", "s2")
    _change(tree, "remove")
    expected = inject(cli, f"{layout}:s2", tree, state, "--max-layers", "4", "--tag", "s3")
    indexes = sorted((state / "index").iterdir())
    assert len(indexes) == 3
    indexes[0].write_bytes(indexes[0].read_bytes()[:-20])  # truncated
    indexes[1].unlink()
    report = inject(cli, f"{layout}:s2", tree, state, "--max-layers", "4", "--tag", "s4")
    assert report["stack"]["downloaded"] > 0
    assert report["layer"] == expected["layer"]


def test_the_cache_tells_a_damaged_file_from_none_and_an_unwritable_cache(cli, tmp_path,
                                                                          stacked):
    """A damaged index file is told as such, not as a first run; a cache that cannot be
    written is told once (each update would read the layers again); the temp file a
    killed command left is removed by the next write, that of a running one kept."""
    layout, tree, state = stacked
    _change(tree, "add")
    inject(cli, f"{layout}:s1", tree, state, "--max-layers", "4", "--tag", "s2")
    base, top = (state / "index").iterdir()
    base.write_bytes(base.read_bytes()[:-20])
    top.unlink()
    space = scratch._id_space()
    stale = state / f"index/.cvmfs-inject-index-{space}-{dead_pid()}-abcd1234.tmp"
    fresh = state / f"index/.cvmfs-inject-index-{space}-{os.getpid()}-abcd1234.tmp"
    for path in (stale, fresh):
        path.write_bytes(b"partial")

    def warnings(change: str, tag: str, new_tag: str, state_dir: Path) -> list[str]:
        _change(tree, change)
        result = cli("inject", f"{layout}:{tag}", tree, "--state", state_dir,
                     "--max-layers", "4", "--tag", new_tag)
        assert result.code == 0, result.err
        return result.err.splitlines()

    told = warnings("remove", "s2", "s3", state)
    damaged = [line for line in told if "damaged or unreadable" in line]
    assert len(damaged) == sum("a first run here" in line for line in told) == 1
    assert base.name[7:-6] in damaged[0]
    assert not stale.exists() and fresh.exists()
    unwritable = tmp_path / "a-file"
    unwritable.write_bytes(b"")
    told = warnings("content", "s3", "s4", unwritable)
    unsaved = [line for line in told if "cannot save tree indexes" in line]
    assert len(unsaved) == 1 and str(unwritable) in unsaved[0]
    assert sum("reading the layer once" in line for line in told) == 3  # none could be kept


def test_the_cache_names_what_is_in_the_way(cli, tmp_path, stacked):
    """A directory where an index file goes is named as the obstacle (not the temp file
    renamed onto it); an index directory this user may not read is no first run."""
    layout, tree, state = stacked
    (index_file,) = (state / "index").iterdir()
    index_file.unlink()
    index_file.mkdir()
    _change(tree, "add")
    result = cli("inject", f"{layout}:s1", tree, "--state", state, "--max-layers", "4",
                 "--tag", "s2")
    assert result.code == 0, result.err
    assert "damaged or unreadable" in result.err
    assert f"cannot save tree indexes in {state / 'index'} ({index_file}: Is a directory)" \
        in result.err

    shutil.rmtree(state / "index")
    inject(cli, f"{layout}:s1", tree, state, "--max-layers", "4", "--tag", "s2")
    (state / "index").chmod(0)
    _change(tree, "content")
    unprivileged = (["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
                    if os.geteuid() == 0 else [])
    try:
        result = subprocess.run(
            [*unprivileged, Path(sys.executable).parent / "cvmfs-inject", "inject",
             f"{layout}:s2", tree, "--state", state, "--max-layers", "4", "--tag", "s3"],
            capture_output=True, text=True, check=False)
    finally:
        (state / "index").chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert "damaged or unreadable" in result.stderr and "a first run" not in result.stderr


def _gzip_bomb(path: Path, inflated: int) -> None:
    """A small gzip file of `inflated` zero bytes (about 1000:1)."""
    with gzip.open(path, "wb", compresslevel=9) as f:
        zeros = bytes(1 << 20)
        for _ in range(inflated >> 20):
            f.write(zeros)


def test_hostile_cache_files_are_treated_as_absent(cli, tmp_path, stacked):
    """A FIFO (would block a reader), a gzip bomb in the old format's place (would fill
    memory), a file past the size an index can have (sparse: would fill memory) and a
    symlink in place of cache files: each is ignored and its index rebuilt from the
    layer."""
    layout, tree, state = stacked
    _change(tree, "add")
    inject(cli, f"{layout}:s1", tree, state, "--max-layers", "4", "--tag", "s2")
    _change(tree, "remove")
    expected = inject(cli, f"{layout}:s2", tree, state, "--max-layers", "4", "--tag", "s3")
    fifo, bomb, link = sorted((state / "index").iterdir())
    os.replace(link, tmp_path / "elsewhere.index")
    link.symlink_to(tmp_path / "elsewhere.index")
    fifo.unlink()
    os.mkfifo(fifo)
    os.truncate(bomb, 8 << 30)  # sparse: what its header says no longer fits its size
    _gzip_bomb(bomb.with_suffix(".json.gz"), 512 << 20)
    assert bomb.with_suffix(".json.gz").stat().st_size < 1 << 20
    report = inject(cli, f"{layout}:s2", tree, state, "--max-layers", "4", "--tag", "s4")
    assert report["stack"]["downloaded"] > 0
    assert report["layer"] == expected["layer"]


def test_max_layers_1_compacts_a_stack_back_to_one_layer(cli, tmp_path, stacked):
    layout, tree, state = stacked
    _change(tree, "add")
    inject(cli, f"{layout}:s1", tree, state, "--max-layers", "4", "--tag", "s2")
    report = inject(cli, f"{layout}:s2", tree, state, "--tag", "one")
    assert report["stack"]["action"] == "rebased" and report["stack"]["layers"] == 1
    result = cli("--json", "inspect", f"{layout}:one")
    labels = json.loads(result.out)["images"][0]["labels"]
    assert "io.cvmfs-inject.stack" not in labels
    result = cli("unpack", f"{layout}:one", tmp_path / "out")
    assert result.code == 0, result.err
    assert_same_tree(tree, tmp_path / "out")
    assert_same_tree(tree, umoci_unpack(layout, "one", tmp_path / "bundle") / "cvmfs")
    _change(tree, "content")  # stacking again on the compacted layer: its index is cached
    report = inject(cli, f"{layout}:one", tree, state, "--max-layers", "4", "--tag", "two")
    assert report["stack"]["action"] == "delta" and report["stack"]["downloaded"] == 0


def _rewritten(layout: Path, tag: str, new_tag: str, edit: Callable[[dict], None],
               top: bytes | None = None) -> None:
    """Tag `new_tag` as `tag` with its config changed by `edit(config document)` and, with
    `top` (a tar), that layer gzip'd above the others, as a hand, another tool (`umoci
    insert`, a build FROM it) or a hostile party could."""
    from cvmfs_inject.layout.store import Layout
    from cvmfs_inject.oci.jsondoc import canonical_json
    from cvmfs_inject.oci.model import ImageConfig, Manifest

    store = Layout.open(layout)
    desc = store.resolve(tag)
    manifest = Manifest.parse(store.read_blob(desc.digest, desc.size), "m")
    config = ImageConfig.parse(store.read_blob(manifest.config.digest, manifest.config.size), "c")
    doc = config.edit()
    edit(doc)
    new_config = store.put_bytes(canonical_json(doc), manifest.config.media_type)
    mdoc = manifest.edit()
    mdoc["config"] = {**mdoc["config"], "digest": new_config.digest, "size": new_config.size}
    if top is not None:
        layer = store.put_bytes(gzip.compress(top, mtime=0),
                                "application/vnd.oci.image.layer.v1.tar+gzip")
        mdoc["layers"].append(layer.to_dict())
    store.set_tag(new_tag, store.put_bytes(canonical_json(mdoc), manifest.media_type))
    shutil.rmtree(store.tmp_dir)  # our own writes' scratch space, which a command tidies


def _relabelled(layout: Path, tag: str, new_tag: str,
                edit: Callable[[dict, list[str]], None]) -> None:
    """Tag `new_tag` as `tag` with its config's labels changed by `edit(labels, diff_ids)`."""
    _rewritten(layout, tag, new_tag,
               lambda doc: edit(doc["config"]["Labels"], doc["rootfs"]["diff_ids"]))


def test_a_stack_label_that_does_not_match_the_layers_is_refused(cli, tmp_path, stacked):
    layout, tree, state = stacked
    _change(tree, "add")
    inject(cli, f"{layout}:s1", tree, state, "--max-layers", "4", "--tag", "s2")

    def reverse(labels: dict, _: list[str]) -> None:
        stack = labels["io.cvmfs-inject.stack"].split(",")
        labels["io.cvmfs-inject.stack"] = ",".join(reversed(stack))

    _relabelled(layout, "s2", "bad", reverse)
    before = dir_bytes(layout)
    for args in (["inject", f"{layout}:bad", tree, "--max-layers", "4", "--state", state],
                 ["unpack", f"{layout}:bad", tmp_path / "out"]):
        result = cli(*args)
        assert result.code == 3, result.err
        assert "io.cvmfs-inject.stack" in result.err and result.err.count("\n") == 1
    assert dir_bytes(layout) == before


def test_labels_naming_a_base_image_layer_as_the_stack_are_refused(cli, tmp_path,
                                                                   stacked):
    """Labels edited to name a layer of the base image (not /cvmfs content) as the stack's
    base: its index, rebuilt by reading it, shows what it is, and the update is refused
    rather than replacing that layer with the tree (a layer of the base image lost)."""
    layout, tree, _ = stacked

    def claim_the_base_image(labels: dict, diff_ids: list[str]) -> None:
        labels["io.cvmfs-inject.stack"] = ",".join(diff_ids[:2])
        labels["cvmfs_injection_tar"] = diff_ids[0]
        labels["io.cvmfs-inject.tree-digest"] = diff_ids[1]

    _relabelled(layout, "s1", "bad", claim_the_base_image)
    _change(tree, "add")
    before = dir_bytes(layout)
    result = cli("inject", f"{layout}:bad", tree, "--max-layers", "4", "--state",
                 tmp_path / "fresh-state", "--tag", "out")
    assert result.code == 3, result.err
    error = result.err.splitlines()[-1]  # after the warning that it reads the layer
    assert error.startswith("cvmfs-inject: error: layer ") and "'etc/', outside /cvmfs" in error
    assert dir_bytes(layout) == before


def _blob_traffic(registry, start: int) -> tuple[set[str], set[str]]:
    """Digests of the blobs uploaded (completed upload PUTs) and downloaded (GETs) since
    request number `start`."""
    uploaded, downloaded = set(), set()
    for method, uri in registry.requests(query=True)[start:]:
        path, _, query = uri.partition("?")
        if method == "PUT" and "/blobs/uploads/" in path:
            uploaded.update(parse_qs(query).get("digest", []))
        elif method == "GET" and "/blobs/" in path:
            downloaded.add(path.rsplit("/", 1)[1])
    return uploaded, downloaded


def test_registry_direct_updates_move_only_the_new_layer(cli, registry, tmp_path):
    layout = tmp_path / "layout"
    build_sample_image(layout, "v1")
    url = f"docker://{registry.host}/{unique_repo('stack', 'direct')}:v1"
    assert cli("push", "--no-tls-verify", f"{layout}:v1", url).code == 0
    tree, state = build_tree(tmp_path / "tree"), tmp_path / "state"
    inject(cli, url, tree, state, "--no-tls-verify", "--max-layers", "3")
    _change(tree, "new-release")
    start = len(registry.requests())
    report = inject(cli, url, tree, state, "--no-tls-verify", "--max-layers", "3")
    uploaded, downloaded = _blob_traffic(registry, start)
    inspected = json.loads(cli("--json", "inspect", "--no-tls-verify", url).out)["images"][0]
    config = inspected["config"]["digest"]
    assert report["stack"]["action"] == "delta"
    assert uploaded == {report["layer"]["digest"], config}
    assert not downloaded & {layer["digest"] for layer in inspected["layers"]}  # configs only
    asked = {uri.rsplit("/", 1)[1] for method, uri in registry.requests()[start:]
             if method == "HEAD" and "/blobs/" in uri}
    assert asked == uploaded  # the layers the image read from this repository lists: none
    assert report["written"] < report["layer"]["size"] + 4096  # the layer and documents
    result = cli("unpack", "--no-tls-verify", url, tmp_path / "out")
    assert result.code == 0, result.err
    assert_same_tree(tree, tmp_path / "out")

    # a fresh runner (no cache) reads the stack's layers, never the base image's
    _change(tree, "remove")
    stack_layers = {layer["digest"]: layer["size"] for layer in inspected["layers"]
                    if layer["diff_id"] in inspected["labels"]["io.cvmfs-inject.stack"]}
    start = len(registry.requests())
    report = inject(cli, url, tree, tmp_path / "fresh", "--no-tls-verify", "--max-layers", "3")
    _, downloaded = _blob_traffic(registry, start)
    assert report["stack"]["downloaded"] == sum(stack_layers.values())
    assert downloaded - {config} == set(stack_layers)


def test_the_report_says_uploaded_only_for_what_a_registry_took(cli, registry, tmp_path):
    """Registry-direct, the count is what the registry took; into a layout, or through the
    working layout of `run` (to an archive, rewritten whole by skopeo), what was written."""
    layout = tmp_path / "layout"
    build_sample_image(layout, "v1")
    url = f"docker://{registry.host}/{unique_repo('stack', 'words')}:v1"
    assert cli("push", "--no-tls-verify", f"{layout}:v1", url).code == 0
    tree = build_tree(tmp_path / "tree")
    archive = f"oci-archive:{tmp_path / 'out.tar'}"
    for ref in (url, f"{layout}:v1"):
        result = cli("inject", ref, tree, "--no-tls-verify", "--max-layers", "3",
                     "--state", tmp_path / "state")
        assert result.code == 0, result.err
    words = []
    for change, args in (("add", ["inject", url, tree, "--no-tls-verify"]),
                         ("content", ["inject", f"{layout}:v1", tree]),
                         ("mode", ["run", url, tree, archive, "--no-tls-verify"])):
        _change(tree, change)
        result = cli(*args, "--max-layers", "3", "--state", tmp_path / "state")
        assert result.code == 0, result.err
        line = next(line for line in result.out.splitlines() if line.startswith("stack: "))
        words.append(line.rsplit(" B ", 1)[1])
    assert words == ["uploaded", "written", "written"]


def test_a_layer_the_registry_lost_is_named_when_the_update_is_refused(cli, registry,
                                                                       tmp_path):
    """An update in the repository it read the image from does not ask for the layers
    that image lists; were one gone (a registry's storage damaged), the registry refuses
    the manifest: one line names the layer, and the tag stays."""
    layout = tmp_path / "layout"
    build_sample_image(layout, "v1")
    repo = unique_repo("stack", "lost")
    url = f"docker://{registry.host}/{repo}:v1"
    assert cli("push", "--no-tls-verify", f"{layout}:v1", url).code == 0
    tree, state = build_tree(tmp_path / "tree"), tmp_path / "state"
    inject(cli, url, tree, state, "--no-tls-verify", "--max-layers", "3")
    before = json.loads(cli("--json", "inspect", "--no-tls-verify", url).out)
    lost = before["images"][0]["layers"][0]["digest"]
    shutil.rmtree(registry.root / "storage/docker/registry/v2/repositories" / repo
                  / "_layers/sha256" / lost.split(":")[1])
    _change(tree, "add")
    result = cli("inject", url, tree, "--state", state, "--no-tls-verify", "--max-layers", "3")
    assert result.code == 6 and result.err.count("\n") == 1
    assert "MANIFEST_BLOB_UNKNOWN" in result.err and lost in result.err
    after = json.loads(cli("--json", "inspect", "--no-tls-verify", url).out)
    assert after["digest"] == before["digest"]


def test_the_union_of_indexes_follows_the_changeset_rules():
    from cvmfs_inject.stack.index import DIR, FILE, LINK, WHITEOUT, LayerIndex, Node, union

    def layer(nodes: dict[bytes, str], opaque: set[bytes] = frozenset()) -> LayerIndex:
        return LayerIndex("sha256:x", "/cvmfs", {p: Node(k, 0o755, 0, 0, 0, 0)
                                                 for p, k in nodes.items()}, set(opaque))

    base = layer({b"": DIR, b"a": DIR, b"a/f": FILE, b"a/s": DIR, b"a/s/g": FILE,
                  b"b": DIR, b"b/h": FILE, b"c": FILE, b"o": DIR, b"o/x": FILE, b"ab": FILE})
    delta = layer({b"": DIR, b"a": DIR, b"a/s": WHITEOUT, b"b": LINK, b"c": DIR,
                   b"c/new": FILE, b"o": DIR, b"o/y": FILE, b"gone": WHITEOUT}, {b"o"})
    tree = union([base, delta])
    assert sorted(tree) == [b"", b"a", b"a/f", b"ab", b"b", b"c", b"c/new", b"o", b"o/y"]
    assert tree[b"b"].kind == LINK and tree[b"c"].kind == DIR


def test_checksum_finds_a_change_that_kept_size_and_time(cli, tmp_path, stacked):
    layout, tree, state = stacked
    path = tree / "rel/a/sub/deep/file.txt"
    st = os.lstat(path)
    path.write_bytes(b"DEEP FILE\n")  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same time
    quick = inject(cli, f"{layout}:s1", tree, state, "--max-layers", "4", "--tag", "quick")
    assert quick["status"] == "unchanged"
    checked = inject(cli, f"{layout}:s1", tree, state, "--max-layers", "4", "--tag", "sum",
                     "--checksum")
    assert checked["stack"]["changed"] == 1
    assert cli("unpack", f"{layout}:sum", tmp_path / "out").code == 0
    assert (tmp_path / "out/rel/a/sub/deep/file.txt").read_bytes() == b"DEEP FILE\n"


def test_concurrent_stacked_injects_share_the_cache_safely(tmp_path, stacked):
    layout, tree, state = stacked
    trees = []
    for i, change in enumerate(("add", "remove", "new-release")):
        copy = tmp_path / f"tree{i}"
        shutil.copytree(tree, copy, symlinks=True)
        _change(copy, change)
        trees.append(copy)
    cli_path = Path(sys.executable).parent / "cvmfs-inject"
    processes = [subprocess.Popen([cli_path, "inject", f"{layout}:s1", copy, "--max-layers",
                                   "4", "--state", state, "--tag", f"c{i}", "-q"],
                                  stderr=subprocess.PIPE)
                 for i, copy in enumerate(trees)]
    for process in processes:
        assert process.wait(timeout=120) == 0, process.stderr.read()
    for i, copy in enumerate(trees):
        out = tmp_path / f"out{i}"
        result = subprocess.run([cli_path, "unpack", f"{layout}:c{i}", out],
                                capture_output=True, check=False)
        assert result.returncode == 0, result.stderr
        assert_same_tree(copy, out)


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0,
                    reason="needs root and setpriv to drop the capability to override modes")
def test_a_stack_over_read_only_directories_unpacks_without_privileges(cli, tmp_path,
                                                                       stacked):
    """What an unprivileged user meets: a read-only mount point and a read-only
    directory in the base, written into and removed by a delta."""
    layout, tree, state = stacked
    (tree / "rel/a/sub/deep").chmod(0o555)
    tree.chmod(0o555)
    inject(cli, f"{layout}:s1", tree, state, "--max-layers", "4", "--tag", "ro")
    tree.chmod(0o755)
    (tree / "rel/a/sub/deep").chmod(0o755)
    shutil.rmtree(tree / "rel/a/sub")
    (tree / "rel/a/run").unlink()
    (tree / "added-at-the-top").write_bytes(b"new\n")
    tree.chmod(0o555)
    inject(cli, f"{layout}:ro", tree, state, "--max-layers", "4", "--tag", "ro2")
    out = tmp_path / "out"
    result = subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--",
         Path(sys.executable).parent / "cvmfs-inject", "unpack", f"{layout}:ro2", out],
        capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert_same_tree(tree, out)
    tree.chmod(0o755)
    out.chmod(0o755)


def test_a_cold_cache_sees_mode_bits_and_changes_within_a_second(cli, tmp_path, stacked):
    layout, tree, state = stacked
    special = tree / "rel/b/only-b.txt"
    special.chmod(0o4755)
    (tree / "rel/empty").chmod(0o1777)
    report = inject(cli, f"{layout}:s1", tree, state, "--max-layers", "4", "--tag", "s2")
    assert report["stack"]["action"] == "delta"
    special.chmod(0o755)  # back: only the layer (read again, no cache) can tell
    report = inject(cli, f"{layout}:s2", tree, tmp_path / "cold1", "--max-layers", "4",
                    "--tag", "s3")
    assert report["stack"]["action"] == "delta" and report["stack"]["changed"] == 1
    # a rewrite of the same size within the second the layer recorded
    st = os.lstat(special)
    special.write_bytes(b"ONLY IN B\n")
    os.utime(special, ns=(st.st_atime_ns, st.st_mtime_ns // 10**9 * 10**9 + 900_000_000))
    report = inject(cli, f"{layout}:s3", tree, tmp_path / "cold2", "--max-layers", "4",
                    "--tag", "s4")
    assert report["stack"]["changed"] == 1
    assert cli("unpack", f"{layout}:s4", tmp_path / "out").code == 0
    (tree / "rel/empty").chmod(0o777)  # unpack drops the sticky bit (README)
    assert_same_tree(tree, tmp_path / "out")


def test_a_layer_that_is_not_its_diff_id_is_refused_not_indexed(cli, tmp_path):
    from cvmfs_inject.layout.store import Layout
    from cvmfs_inject.oci.jsondoc import canonical_json
    from cvmfs_inject.oci.model import Manifest

    layout = tmp_path / "layout"
    build_sample_image(layout, "v1")
    tree, other = build_tree(tmp_path / "tree"), build_tree(tmp_path / "other")
    (other / "extra").write_bytes(b"not in tree\n")
    assert cli("inject", f"{layout}:v1", tree, "--tag", "good").code == 0
    assert cli("inject", f"{layout}:v1", other, "--tag", "other").code == 0
    store = Layout.open(layout)
    good, bad = (Manifest.parse(store.read_blob(d.digest, d.size), "m")
                 for d in (store.resolve("good"), store.resolve("other")))
    doc = good.edit()
    doc["layers"][-1] = bad.edit()["layers"][-1]  # the config still names good's diff_id
    store.set_tag("evil", store.put_bytes(canonical_json(doc), good.media_type))
    shutil.rmtree(store.tmp_dir)
    before = dir_bytes(layout)
    result = cli("inject", f"{layout}:evil", tree, "--max-layers", "4", "--state",
                 tmp_path / "state")
    assert result.code == 5, result.err
    error = result.err.strip().splitlines()[-1]  # after the note that it reads the layer
    assert error.startswith("cvmfs-inject: error:") and "diff_id" in error
    assert dir_bytes(layout) == before
    assert not [path for path in (tmp_path / "state").rglob("*") if not path.is_dir()]


def test_run_from_the_base_goes_on_with_the_stack_at_the_destination(cli, registry,
                                                                      tmp_path):
    """The nightly Makefile rule: `run BASE DIR DEST --max-layers N` adds a delta to DEST
    while BASE is the base DEST was made from; a new BASE starts a new stack."""
    layout = tmp_path / "layout"
    build_sample_image(layout, "v1")
    area = unique_repo("stack", "run")
    base, dest = f"docker://{registry.host}/{area}/base:v1", \
        f"docker://{registry.host}/{area}/dest:cvmfs"
    assert cli("push", "--no-tls-verify", f"{layout}:v1", base).code == 0
    tree, state = build_tree(tmp_path / "tree"), tmp_path / "state"

    def run() -> dict:
        result = cli("--json", "--no-tls-verify", "run", base, tree, dest, "--max-layers",
                     "3", "--state", state)
        assert result.code == 0, result.err
        return json.loads(result.out)

    actions = [run()["stack"]["action"]]
    for change in ("add", "remove"):
        _change(tree, change)
        actions.append(run()["stack"]["action"])
    again = run()
    assert actions == ["base", "delta", "delta"] and again["status"] == "unchanged"
    assert cli("--no-tls-verify", "unpack", dest, tmp_path / "out").code == 0
    assert_same_tree(tree, tmp_path / "out")
    build_sample_image(tmp_path / "new-base", "v1", layers=3)  # the base moved on
    assert cli("push", "--no-tls-verify", f"{tmp_path / 'new-base'}:v1", base).code == 0
    assert run()["stack"]["action"] == "base"


def _layer_on_top(layout: Path, tag: str, files: dict[str, bytes]) -> None:
    """Tag `tag` again with a layer of `files` on top, as another tool would add one."""
    import io
    import tarfile

    from cvmfs_inject.oci.digest import sha256_digest

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, PAST
            tar.addfile(info, io.BytesIO(data))

    def above(doc: dict) -> None:
        doc["rootfs"]["diff_ids"].append(sha256_digest(raw.getvalue()))
        doc["history"] = [*doc.get("history", []), {"created_by": "another tool"}]

    _rewritten(layout, tag, tag, above, top=raw.getvalue())


def test_a_destination_with_a_layer_above_its_stack_gets_a_new_stack(cli, tmp_path, stacked):
    """The stack goes on at DEST only while DEST is BASE with the stack on top: a layer
    another tool put above it, which can hide what the stack holds, makes DEST BASE with
    a new stack again, so that every reader's /cvmfs is the tree."""
    layout, tree, state = stacked
    _layer_on_top(layout, "s1", {"cvmfs/rel/b/only-b.txt": b"not from the tree\n"})
    _change(tree, "add")
    report = inject(cli, f"{layout}:v1", tree, state, "--max-layers", "4", "--tag", "s1")
    assert report["stack"]["action"] == "base" and report["stack"]["layers"] == 1
    assert_same_tree(tree, umoci_unpack(layout, "s1", tmp_path / "bundle") / "cvmfs")
    _change(tree, "remove")  # and the new stack goes on from there
    report = inject(cli, f"{layout}:v1", tree, state, "--max-layers", "4", "--tag", "s1")
    assert report["stack"]["action"] == "delta" and report["stack"]["layers"] == 2
    assert_same_tree(tree, umoci_unpack(layout, "s1", tmp_path / "bundle2") / "cvmfs")


def test_a_stacked_update_scans_with_helpers_and_reports_each_skip_once(cli, tmp_path,
                                                                       stacked, monkeypatch):
    """The scan begins before the image is resolved, with a forked helper (pack.fanout);
    what it skipped is reported once, in the order of the walk, and the union is the tree."""
    import threading

    from cvmfs_inject.pack import fanout

    layout, tree, state = stacked
    os.mkfifo(tree / "rel/b/pipe")
    (tree / "rel/a/.wh.hidden").write_bytes(b"")
    _change(tree, "add")
    helpers: list[int] = []
    real_start = fanout.FannedWalk.start

    def start(self):
        real_start(self)
        helpers.append(self.helpers)

    monkeypatch.setattr(fanout, "usable_cpus", lambda: 2)
    monkeypatch.setattr(fanout.FannedWalk, "start", start)
    assert threading.active_count() == 1  # else no helper is forked (fanout.start)
    result = cli("--json", "inject", f"{layout}:s1", tree, "--state", state, "--max-layers",
                 "4", "--tag", "s2")
    assert result.code == 0, result.err
    assert helpers and helpers[0] >= 1
    warnings = json.loads(result.out)["warnings"]
    assert [w.split(": ")[0] for w in warnings] == [f"{tree}/rel/a/.wh.hidden",
                                                     f"{tree}/rel/b/pipe"]
    assert all(result.err.count(w) == 1 for w in warnings)
    for skipped in (tree / "rel/b/pipe", tree / "rel/a/.wh.hidden"):  # the tree as packed
        parent = skipped.parent.stat()
        skipped.unlink()
        os.utime(skipped.parent, ns=(parent.st_atime_ns, parent.st_mtime_ns))
    assert cli("unpack", f"{layout}:s2", tmp_path / "out").code == 0
    assert_same_tree(tree, tmp_path / "out")


def test_the_cycle_collector_is_paused_only_while_stacks_are_decided(cli, stacked,
                                                                     monkeypatch):
    """Paused for a stacked inject's scan and update (tuples in no cycle); back on
    afterwards, also after a failure, and left off when the caller had it off."""
    import gc

    from cvmfs_inject.stack.diff import PendingScan
    from cvmfs_inject.stack.update import cycle_collection_paused

    layout, tree, state = stacked
    seen: list[bool] = []
    real_result = PendingScan.result

    def result(self, against=None):
        seen.append(gc.isenabled())
        return real_result(self, against)

    monkeypatch.setattr(PendingScan, "result", result)
    _change(tree, "add")
    inject(cli, f"{layout}:s1", tree, state, "--max-layers", "4", "--tag", "s2")
    assert seen and not any(seen) and gc.isenabled()
    with pytest.raises(RuntimeError), cycle_collection_paused():
        raise RuntimeError
    assert gc.isenabled()
    gc.disable()
    try:
        with cycle_collection_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_scan_is_freed_before_the_cycle_collector_is_back_on(cli, stacked,
                                                                monkeypatch):
    """Its nodes (and the stack's tree it was checked against) are freed while the
    collector is paused, not walked by its first pass afterwards (20-45 ms on the bench
    tree): by the time the image is committed, nothing holds the scan."""
    import weakref

    import cvmfs_inject.commands.inject as inject_module
    from cvmfs_inject.stack.diff import PendingScan

    layout, tree, state = stacked
    scans: list[weakref.ref] = []
    alive_at_commit: list[bool] = []
    real_finish, real_commit = PendingScan._finish, inject_module.commit

    def finish(self, against):
        scan = real_finish(self, against)
        scans.append(weakref.ref(scan))
        return scan

    def commit(*args, **kwargs):
        alive_at_commit.append(scans[0]() is not None)
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(PendingScan, "_finish", finish)
    monkeypatch.setattr(inject_module, "commit", commit)
    _change(tree, "add")
    inject(cli, f"{layout}:s1", tree, state, "--max-layers", "4", "--tag", "s2")
    assert len(scans) == 1 and alive_at_commit == [False]


def test_format_3_cache_files_are_read_only_when_made_by_packing(tmp_path):
    """Format 3 rebuilt indexes from layers ignoring a whiteout of the mount point: such a
    file (no host mtime on any file) is a miss; one made by packing is still read."""
    from cvmfs_inject.stack.cache import IndexCache
    from cvmfs_inject.stack.index import DIR, FILE, LayerIndex

    cache = IndexCache(tmp_path)
    diff_id = "sha256:" + "a" * 64
    migrated = tmp_path / "index" / f"{diff_id.replace(':', '-')}.index"

    def stored(mtime_ns: int, format_name: str) -> LayerIndex | None:
        """A file as versions before format 5 wrote it: gzip'd JSON columns."""
        doc = {"format": format_name, "diff_id": diff_id, "mount_point": "/cvmfs", "count": 2,
               "opaque": [], "paths": "\0f", "kinds": DIR + FILE, "targets": "\0",
               "groups": "\0", "digests": "\0", "modes": [0o755, 0o644], "uids": [0, 0],
               "gids": [0, 0], "sizes": [0, 1], "mtimes": [1, 1], "mtimes_ns": [0, mtime_ns]}
        (tmp_path / "index").mkdir(exist_ok=True)
        migrated.unlink(missing_ok=True)
        (tmp_path / "index" / f"{diff_id.replace(':', '-')}.json.gz").write_bytes(
            gzip.compress(json.dumps(doc).encode()))
        return cache.get(diff_id, "/cvmfs")

    assert stored(1_000_000_123, "cvmfs-inject tree index 3") is not None
    assert migrated.exists()  # written again as format 5
    assert stored(0, "cvmfs-inject tree index 3") is None
    assert stored(0, "cvmfs-inject tree index 4") is not None
    assert stored(1, "cvmfs-inject tree index 2") is None


def test_an_index_file_reads_back_whole_and_a_damaged_one_is_a_miss(tmp_path):
    """Format 5 keeps every field of every node (odd bytes in names, large numbers, opaque
    directories); a flipped byte, a cut, or another layer's or mount point's file is a miss."""
    from cvmfs_inject.stack.index import DIR, FILE, LINK, WHITEOUT, LayerIndex, Node

    diff_id = "sha256:" + "b" * 64
    nodes = {b"": Node(DIR, 0o755, 0, 0, 0, 1),
             b"d\xff\xfe name": Node(DIR, 0o1777, 7, 8, 0, -5),
             b"d\xff\xfe name/f": Node(FILE, 0o4755, 2**32 - 2, 3, 2**40, 2**33, b"",
                                     b"d\xff\xfe name/f", "c" * 64, 2**62),
             b"d\xff\xfe name/g": Node(FILE, 0o644, 0, 0, 2**40, 2**33, b"",
                                     b"d\xff\xfe name/f", "c" * 64, 1),
             b"l": Node(LINK, 0o777, 0, 0, 0, 3, b"../\x80x"),
             b"gone": Node(WHITEOUT, 0, 0, 0, 0, 0)}
    index = LayerIndex(diff_id, "/cvmfs", nodes, {b"d\xff\xfe name"})
    cache = IndexCache(tmp_path)
    cache.put(index)
    assert cache.get(diff_id, "/cvmfs") == index
    assert cache.get(diff_id, "/other") is None
    path = next((tmp_path / "index").iterdir())
    data = path.read_bytes()
    path.rename(path.with_name("sha256-" + "c" * 64 + ".index"))
    assert cache.get("sha256:" + "c" * 64, "/cvmfs") is None  # it names another layer
    for damaged in (data[:-1], data[:-9] + bytes([data[-9] ^ 1]) + data[-8:], data + b"x"):
        path.write_bytes(damaged)
        assert cache.get(diff_id, "/cvmfs") is None
    header_end = data.index(b"\n", len(b"cvmfs-inject tree index 5\n")) + 1
    for at in range(header_end):  # the header's every bit: a miss, or the same index
        for bit in range(8):
            path.write_bytes(data[:at] + bytes([data[at] ^ 1 << bit]) + data[at + 1:])
            assert cache.get(diff_id, "/cvmfs") in (None, index), (at, bit)
    body = bytearray(data[header_end:])  # a path twice, with a CRC that fits
    at = body.index(b"d\xff\xfe name/g")
    body[at:at + len(b"d\xff\xfe name/g")] = b"d\xff\xfe name/f"
    header = json.loads(data[len(b"cvmfs-inject tree index 5\n"):header_end])
    assert cache.get(diff_id, "/cvmfs") is None
    header["crc"] = zlib.crc32(body)
    path.write_bytes(data[:len(b"cvmfs-inject tree index 5\n")] + json.dumps(header).encode()
                     + b"\n" + bytes(body))
    assert cache.get(diff_id, "/cvmfs") is None
    cache.put(LayerIndex(diff_id, "/cvmfs", {b"": Node(DIR, 0o755, 0, 0, 0, 2**64)}))
    assert cache.get(diff_id, "/cvmfs") is None  # past int64: not cached (the damaged stays)


def test_a_stacked_update_runs_under_a_memory_limit(tmp_path, stacked):
    """HPC nodes often cap address space (`ulimit -v`): reading a cache file sets aside
    only what the file holds, and an update runs under 2 GiB."""
    import resource

    layout, tree, state = stacked
    _change(tree, "add")

    def capped() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    done = subprocess.run([sys.executable, "-m", "cvmfs_inject", "--json", "inject",
                           f"{layout}:s1", str(tree), "--state", str(state), "--max-layers",
                           "4", "--tag", "s2"], capture_output=True, text=True, check=False,
                          preexec_fn=capped)
    assert done.returncode == 0, done.stderr
    stack = json.loads(done.stdout)["stack"]
    assert (stack["action"], stack["downloaded"]) == ("delta", 0)


def test_a_delta_holds_its_entries_in_the_walk_order(tmp_path):
    """A delta sorts its paths as the walk does: names as strings, a byte that is not
    UTF-8 (a surrogate) after two-byte UTF-8, '-' and '.' before '/'. A hard link must
    come after its target (GNU tar and our unpack refuse it otherwise)."""
    from cvmfs_inject.pack.options import PackOptions
    from cvmfs_inject.stack.diff import diff, scan
    from cvmfs_inject.stack.index import DIR, Node
    from cvmfs_inject.stack.plan import Plan

    root = tmp_path / "tree"
    for name in (b"d", b"d/a", b"d/a/b", b"d/a-b", b"d/a.b", b"d/ a", b"d/z" * 3):
        os.makedirs(os.path.join(bytes(root), name), exist_ok=True)
    for name in (b"d/\xc3\xa9", b"d/a/b/f", b"d/a-b/f", b"d/\xe2\x82\xac"):
        with open(os.path.join(bytes(root), name), "wb") as f:
            f.write(name)
    os.link(os.path.join(bytes(root), b"d/\xc3\xa9"), os.path.join(bytes(root), b"d/\x80"))
    os.link(os.path.join(bytes(root), b"d/\xc3\xa9"), os.path.join(bytes(root), b"d/a/\xff"))
    scanned = scan(root, PackOptions())
    everything = diff({b"": Node(DIR, 0, 0, 0, 0, 0)}, scanned)
    assert len(everything.emit) == len(scanned.nodes)
    delta = [header for header, _, _ in Plan(scanned, everything, "/cvmfs")(_tar_headers())]
    whole = [header for header, _, _ in Plan(scanned, None, "/cvmfs")(_tar_headers())]
    assert delta == whole  # the headers (PAX records with the names), in order


def _tar_headers():
    from cvmfs_inject.pack.headers import TarHeaders

    return TarHeaders()


@pytest.mark.parametrize("changes", [
    ("content", "add", "new-release", "remove", "dir-to-symlink"),
    ("group-gains-a-name", "remove-tree", "file-to-dir", "group-loses-a-name", "mode"),
    ("symlink-to-dir", "group-content", "dir-to-file", "empty-dir-removed", "mtime"),
])
def test_a_merge_diffs_only_what_may_differ_from_the_base(cli, tmp_path, changes):
    """The diff of a merge (the tree against the base alone) looks only at the paths the
    diff against the whole stack was unsure of and the deltas' paths: it gives what the
    diff of every path gives, after each change of a stack growing past its deltas."""
    from cvmfs_inject.pack.options import PackOptions
    from cvmfs_inject.stack.diff import diff, scan, unsure_below
    from cvmfs_inject.stack.index import union

    layout, state = tmp_path / "layout", tmp_path / "state"
    build_sample_image(layout, "v1")
    tree = build_tree(tmp_path / "tree")
    inject(cli, f"{layout}:v1", tree, state, "--max-layers", "9", "--compact-ratio", "10")
    for change in changes:
        _change(tree, change)
        labels = json.loads(cli("--json", "inspect", f"{layout}:v1").out)["images"][0]["labels"]
        stack = labels.get("io.cvmfs-inject.stack", labels["cvmfs_injection_tar"]).split(",")
        indexes = [IndexCache(state).get(diff_id, "/cvmfs") for diff_id in stack]
        scanned = scan(tree, PackOptions())
        against_stack = diff(union(indexes), scanned)
        every = diff(union(indexes[:1]), scanned)
        only = diff(union(indexes[:1]), scanned, only=unsure_below(against_stack, indexes[1:]))
        assert (only.emit, only.whiteouts, only.added, only.changed, only.removed) == (
            every.emit, every.whiteouts, every.added, every.changed, every.removed)
        assert len(only.unsure) <= len(every.unsure)
        inject(cli, f"{layout}:v1", tree, state, "--max-layers", "9", "--compact-ratio", "10")


@pytest.mark.parametrize("changes", [
    ("content", "add", "new-release", "remove", "dir-to-symlink"),
    ("group-gains-a-name", "remove-tree", "file-to-dir", "group-loses-a-name", "mode"),
    ("symlink-to-dir", "group-content", "dir-to-file", "empty-dir-removed", "mtime"),
    ("group-left-with-one-name", "content"),
])
def test_a_scan_checked_as_it_comes_gives_the_diff_of_every_path(cli, tmp_path, changes):
    """The entries a scan quick-checks against the stack's tree while it is finished are
    the only ones the diff then looks at: it gives what the diff of every path gives. A
    file whose other link is outside the tree (a group of one name, known only at the
    end of the scan) is checked again then, also one that was in a group of two (found by
    a review: it passed with the group it seemed to have)."""
    from cvmfs_inject.pack.options import PackOptions
    from cvmfs_inject.stack.diff import PendingScan, diff, scan
    from cvmfs_inject.stack.index import union

    layout, state = tmp_path / "layout", tmp_path / "state"
    build_sample_image(layout, "v1")
    tree = build_tree(tmp_path / "tree")
    lone = "rel/a/name with spaces é.txt"  # no change touches it
    os.link(tree / lone, tmp_path / "outside")  # two links, one of them in the tree
    stamp(tree)
    inject(cli, f"{layout}:v1", tree, state, "--max-layers", "9", "--compact-ratio", "10")
    looked = 0
    for change in changes:
        _change(tree, change)
        labels = json.loads(cli("--json", "inspect", f"{layout}:v1").out)["images"][0]["labels"]
        stack = labels.get("io.cvmfs-inject.stack", labels["cvmfs_injection_tar"]).split(",")
        stack_tree = union(IndexCache(state).get(diff_id, "/cvmfs") for diff_id in stack)
        with PendingScan(tree, PackOptions()) as pending:
            checked = pending.result(against=stack_tree)
        assert checked.checked is not None and checked.checked[0] is stack_tree
        unsure = checked.checked[1]
        assert checked.nodes[lone.encode()].group == b"" and lone.encode() not in unsure
        assert len(unsure) < len(checked.nodes)
        every, only = diff(stack_tree, scan(tree, PackOptions())), diff(stack_tree, checked)
        assert (only.emit, only.whiteouts, only.added, only.changed, only.removed) == (
            every.emit, every.whiteouts, every.added, every.changed, every.removed)
        assert set(only.unsure) == set(every.unsure) <= set(unsure)
        trusting = diff(stack_tree, dataclasses.replace(checked, checked=(stack_tree, {})))
        assert not trusting.unsure  # it looked at none of them
        looked += len(every.unsure)
        inject(cli, f"{layout}:v1", tree, state, "--max-layers", "9", "--compact-ratio", "10")
    assert looked


def test_a_delta_that_is_byte_for_byte_the_base_keeps_the_image_updatable(cli, tmp_path):
    """Every file's mtime loses its fraction of a second (a tree extracted again from a
    ustar archive): the delta holds every entry, headers unchanged, so it is the base's
    very layer and the stack names one diff_id twice. The next updates find the stack."""
    layout, state, tree = tmp_path / "layout", tmp_path / "state", tmp_path / "tree"
    build_sample_image(layout, "v1")
    deltas = ("--max-layers", "4", "--compact-ratio", "10")  # never re-packed as a base
    for name in ("a/f", "a/b/g", "c/h"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(name.encode())
    for path in [tree, *tree.rglob("*")]:
        os.utime(path, ns=(PAST * 10**9 + 500_000_000,) * 2)
    base = inject(cli, f"{layout}:v1", tree, state, *deltas, "--tag", "s1")
    for path in [tree, *tree.rglob("*")]:
        os.utime(path, ns=(PAST * 10**9,) * 2)
    again = inject(cli, f"{layout}:s1", tree, state, *deltas, "--tag", "s2")
    assert again["stack"]["action"] == "delta"
    assert again["layer"]["diff_id"] == base["layer"]["diff_id"]
    (tree / "c/new").write_bytes(b"new")
    later = inject(cli, f"{layout}:s2", tree, state, *deltas, "--tag", "s3")
    assert later["stack"]["action"] == "delta" and later["stack"]["layers"] == 3
    result = cli("unpack", f"{layout}:s3", tmp_path / "out")
    assert result.code == 0, result.err
    assert_same_tree(tree, tmp_path / "out")
