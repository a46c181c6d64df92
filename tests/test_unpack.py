"""unpack's one path: the layer is extracted into a staging directory inside the target and
moved into place only after its digest checked out, so a bad layer changes nothing, and
--force into an existing directory behaves as tar would (without ever following a
symlink), from a layout and from a registry alike.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from helpers import EPOCH, dead_pid, dir_bytes, tree_snapshot, unique_repo
from test_unreadable import NOBODY, _run_unprivileged

# loaded here, before a child drops to nobody, who may not read the Python under /root
import cvmfs_inject.commands.unpack  # noqa: F401
from cvmfs_inject.demo.sample import build_sample_image
from cvmfs_inject.layout.store import Layout

INTEGRITY, INPUT = 5, 3


def injected(cli, tmp_path: Path, files: dict[str, bytes], root_mode: int = 0o755) -> Path:
    """A sample layout with `files` injected at /cvmfs; the tree's root has `root_mode`."""
    layout = tmp_path / "layout"
    build_sample_image(layout, "v1")
    tree = tmp_path / "tree"
    for rel, content in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(content)
    tree.chmod(root_mode)
    os.utime(tree, (EPOCH, EPOCH))
    result = cli("inject", f"{layout}:v1", tree)
    assert result.code == 0, result.err
    return layout


def corrupt_injected_layer(layout: Path) -> str:
    store = Layout.open(layout)
    top = store.resolve("v1")
    layer = json.loads(store.read_blob(top.digest, top.size))["layers"][-1]
    path = store.blob_path(layer["digest"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    return str(layer["digest"])


def test_a_corrupted_layer_leaves_an_existing_target_as_it_was(cli, tmp_path: Path) -> None:
    layout = injected(cli, tmp_path, {"repo/big": os.urandom(2 << 20)})
    digest = corrupt_injected_layer(layout)
    target = tmp_path / "out"
    (target / "repo").mkdir(parents=True)
    (target / "repo" / "big").write_bytes(b"the previous version\n")
    (target / "mine").write_bytes(b"kept\n")
    before = dir_bytes(target)
    result = cli("unpack", "--force", f"{layout}:v1", target)
    assert result.code == INTEGRITY and digest[7:] in result.err
    assert dir_bytes(target) == before  # no staging directory left behind either


def claim_another_diff_id(layout: Path, tag: str, fake: str = "sha256:" + "ab" * 32) -> str:
    """Give the injected layer another diff_id in the config (labels too), as a broken or
    lying image would: the blob still matches its digest. Tags the result `lie`."""
    from cvmfs_inject.oci.jsondoc import canonical_json
    from cvmfs_inject.oci.model import ImageConfig, Manifest

    store = Layout.open(layout)
    top = store.resolve(tag)
    manifest = Manifest.parse(store.read_blob(top.digest, top.size), "m")
    config = ImageConfig.parse(store.read_blob(manifest.config.digest, manifest.config.size),
                               "c")
    doc = config.edit()
    doc["rootfs"]["diff_ids"][-1] = fake
    for label in ("cvmfs_injection_tar", "io.cvmfs-inject.tree-digest"):
        doc["config"]["Labels"][label] = fake
    new_config = store.put_bytes(canonical_json(doc), manifest.config.media_type)
    mdoc = manifest.edit()
    mdoc["config"] = {**mdoc["config"], "digest": new_config.digest, "size": new_config.size}
    store.set_tag("lie", store.put_bytes(canonical_json(mdoc), manifest.media_type))
    return fake


@pytest.mark.parametrize("compress", ["gzip", "zstd", "none"])
def test_a_layer_whose_content_is_not_its_diff_id_leaves_no_target(cli, tmp_path: Path,
                                                                   compress: str) -> None:
    """The blob matches its digest but not the diff_id the config (and label) give it:
    unpack fails with exit 5 (as umoci and containerd refuse it) and leaves nothing behind;
    validate reports it."""
    layout = tmp_path / "layout"
    build_sample_image(layout, "v1")
    tree = tmp_path / "tree"
    (tree / "repo").mkdir(parents=True)
    (tree / "repo" / "f").write_bytes(os.urandom(1 << 20))
    assert cli("inject", "--compress", compress, f"{layout}:v1", tree).code == 0
    fake = claim_another_diff_id(layout, "v1")
    result = cli("unpack", f"{layout}:lie", tmp_path / "out")
    assert result.code == INTEGRITY, result.err
    assert fake in result.err and result.err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    assert cli("unpack", f"{layout}:v1", tmp_path / "good").code == 0
    checked = cli("validate", f"{layout}:lie")
    assert checked.code == 1, checked.err
    assert f"not the diff_id {fake}" in checked.err and "rootfs.diff_ids[2]" in checked.err
    assert cli("validate", f"{layout}:v1").code == 0


def test_a_corruption_that_breaks_the_stream_early_is_still_an_integrity_error(
        cli, tmp_path: Path) -> None:
    """A corrupted gzip header breaks the stream at its first bytes, long before the end
    of the blob where its digest is checked: the rest is read through the verifier, so the
    report is the corrupted blob (exit 5), not a broken layer (exit 3)."""
    layout = injected(cli, tmp_path, {"repo/big": os.urandom(4 << 20)})
    store = Layout.open(layout)
    top = store.resolve("v1")
    layer = json.loads(store.read_blob(top.digest, top.size))["layers"][-1]
    path = store.blob_path(layer["digest"])
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF  # the gzip magic
    path.write_bytes(bytes(data))
    result = cli("unpack", f"{layout}:v1", tmp_path / "out")
    assert result.code == INTEGRITY, result.err
    assert "does not match digest" in result.err
    assert not (tmp_path / "out").exists()


def test_a_failed_unpack_removes_the_directories_it_created(cli, tmp_path: Path) -> None:
    layout = injected(cli, tmp_path, {"repo/big": os.urandom(2 << 20)})
    corrupt_injected_layer(layout)
    result = cli("unpack", f"{layout}:v1", tmp_path / "new" / "nested" / "out")
    assert result.code == INTEGRITY
    assert not (tmp_path / "new").exists()


def test_force_merges_replaces_and_keeps_like_tar(cli, tmp_path: Path) -> None:
    layout = injected(cli, tmp_path, {"repo/a.txt": b"new a\n", "repo/sub/b.txt": b"b\n",
                                      "top.txt": b"top\n"})
    target = tmp_path / "out"
    (target / "repo").mkdir(parents=True)
    (target / "repo" / "a.txt").write_bytes(b"old a\n")
    (target / "repo" / "only-mine.txt").write_bytes(b"mine\n")
    (target / "top.txt").symlink_to("/etc/hostname")
    result = cli("unpack", "--force", f"{layout}:v1", target)
    assert result.code == 0, result.err
    assert (target / "repo" / "a.txt").read_bytes() == b"new a\n"
    assert (target / "repo" / "only-mine.txt").read_bytes() == b"mine\n"
    assert (target / "repo" / "sub" / "b.txt").read_bytes() == b"b\n"
    assert not (target / "top.txt").is_symlink() and (target / "top.txt").read_bytes() == b"top\n"
    # a merged directory takes the layer's mode and time, as tar gives an existing one
    assert (target / "repo").stat().st_mtime_ns // 10**9 == int(
        (tmp_path / "tree" / "repo").stat().st_mtime)
    assert [p.name for p in target.iterdir() if p.name.startswith(".cvmfs-inject")] == []


def test_force_replaces_a_symlink_by_a_directory_without_following_it(cli,
                                                                      tmp_path: Path) -> None:
    layout = injected(cli, tmp_path, {"sft.cern.ch/lib.so": b"library\n"})
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "out"
    target.mkdir()
    (target / "sft.cern.ch").symlink_to(outside)
    result = cli("unpack", "--force", f"{layout}:v1", target)
    assert result.code == 0, result.err
    assert not (target / "sft.cern.ch").is_symlink()
    assert (target / "sft.cern.ch" / "lib.so").read_bytes() == b"library\n"
    assert list(outside.iterdir()) == []


def test_a_directory_where_the_layer_has_a_file_is_refused_before_anything_moves(
        cli, tmp_path: Path) -> None:
    layout = injected(cli, tmp_path, {"a/first.txt": b"1\n", "b": b"a file\n"})
    target = tmp_path / "out"
    (target / "b").mkdir(parents=True)
    (target / "b" / "mine.txt").write_bytes(b"mine\n")
    before = dir_bytes(target)
    result = cli("unpack", "--force", f"{layout}:v1", target)
    assert result.code == INPUT
    assert f"{target}/b: is a directory" in result.err
    assert dir_bytes(target) == before


def test_the_mount_points_mode_and_time_go_to_the_target(cli, tmp_path: Path) -> None:
    layout = injected(cli, tmp_path, {"x/y.txt": b"y\n"}, root_mode=0o750)
    target = tmp_path / "out"
    assert cli("unpack", f"{layout}:v1", target).code == 0
    st = target.stat()
    assert stat.S_IMODE(st.st_mode) == 0o750 and int(st.st_mtime) == EPOCH
    assert tree_snapshot(target)["x/y.txt"]["sha256"]


def test_a_read_only_mount_point_unpacks_for_an_unprivileged_user(cli) -> None:
    """The layer's root is r-x only: the entries must still be moved out of staging. As
    root the command runs in a child that dropped to an unprivileged uid."""
    work = Path(tempfile.mkdtemp(prefix="cvmfs-inject-unpack-"))
    try:
        work.chmod(0o755)
        layout = injected(cli, work, {"x/y.txt": b"y\n"}, root_mode=0o555)
        if os.geteuid() == 0:
            for path in [work, *work.rglob("*")]:
                os.lchown(path, NOBODY, NOBODY)
        code = _run_unprivileged(["unpack", f"{layout}:v1", str(work / "out")], work / "err")
        assert code == 0, (work / "err").read_text()
        assert (work / "out" / "x" / "y.txt").read_bytes() == b"y\n"
        assert stat.S_IMODE((work / "out").stat().st_mode) == 0o555
    finally:
        shutil.rmtree(work)


@pytest.mark.registry
def test_a_corrupted_layer_in_a_registry_leaves_no_target(cli, registry, tmp_path: Path) -> None:
    layout = injected(cli, tmp_path, {"repo/big": os.urandom(2 << 20)})
    url = f"docker://{registry.host}/{unique_repo('unpack', 'corrupt')}:v1"
    assert cli("push", "--no-tls-verify", f"{layout}:v1", url).code == 0
    digest = corrupt_injected_layer(layout)  # the same bytes are in the registry's storage
    stored = (registry.root / "storage/docker/registry/v2/blobs/sha256" / digest[7:9]
              / digest[7:] / "data")
    stored.write_bytes((layout / "blobs" / "sha256" / digest[7:]).read_bytes())
    target = tmp_path / "out"
    result = cli("unpack", "--no-tls-verify", url, target)
    assert result.code == INTEGRITY, result.err
    assert not target.exists()


@pytest.mark.parametrize("where", [".", "blobs/sha256/out", "sub"])
def test_unpack_never_writes_into_a_layout(cli, tmp_path: Path, where: str) -> None:
    """A layout (or a directory inside one) is not a place to unpack to, --force or not:
    the layer's files would replace index.json or land among the blobs."""
    layout = injected(cli, tmp_path, {"index.json": b'{"schemaVersion":2,"manifests":[]}'})
    (layout / "sub").mkdir()
    before = dir_bytes(layout)
    for force in ((), ("--force",)):
        result = cli("unpack", *force, f"{layout}:v1", layout / where)
        assert result.code == INPUT, result.err
        assert "is inside the OCI layout" in result.err
    assert dir_bytes(layout) == before
    assert cli("inspect", f"{layout}:v1").code == 0


def test_a_tree_and_its_layout_may_not_overlap(cli, tmp_path: Path) -> None:
    layout = injected(cli, tmp_path, {"f": b"f"})
    before = dir_bytes(layout)
    for tree in (layout, layout / "blobs", tmp_path):
        result = cli("inject", f"{layout}:v1", tree, "--tag", "self")
        assert result.code == INPUT, result.err
        assert "overlap" in result.err
    assert dir_bytes(layout) == before


def test_what_a_killed_unpack_left_goes_and_a_running_ones_stays(cli, tmp_path: Path) -> None:
    """A killed unpack leaves its staging directory inside the target (read-only
    directories of the layer included): the next unpack removes it and does not count it;
    the staging directory of an unpack still running is left alone, and makes the target
    non-empty (two unpacks into one new target are not merged unless --force says so)."""
    from cvmfs_inject import scratch

    layout = injected(cli, tmp_path, {"repo/f": b"f"})
    target = tmp_path / "out"
    space = scratch._id_space()
    killed = target / f".cvmfs-inject-unpack-{space}-{dead_pid()}-abcd_123"
    running = target / f".cvmfs-inject-unpack-{space}-{os.getpid()}-efgh_456"
    (killed / "repo" / "ro").mkdir(parents=True)
    (killed / "repo" / "ro" / "half").write_bytes(b"half")
    (killed / "repo" / "ro").chmod(0o555)
    result = cli("unpack", f"{layout}:v1", target)
    assert result.code == 0, result.err
    assert sorted(p.name for p in target.iterdir()) == ["repo"]
    shutil.rmtree(target)
    running.mkdir(parents=True)
    result = cli("unpack", f"{layout}:v1", target)
    assert result.code == INPUT and "not empty" in result.err, result.err
    result = cli("unpack", "--force", f"{layout}:v1", target)
    assert result.code == 0, result.err
    assert sorted(p.name for p in target.iterdir()) == [running.name, "repo"]
    assert (target / "repo" / "f").read_bytes() == b"f"


@pytest.mark.parametrize(("fake", "unpacked", "checked", "says"), [
    ("sha512:" + "ab" * 64, INTEGRITY, 1, "the diff_id"),
    ("md5:" + "ab" * 16, INPUT, 1, "cannot verify"),
    ("sha256:" + "AB" * 32, INPUT, 1, "lowercase"),
])
def test_diff_ids_of_other_algorithms_are_checked_or_refused(cli, tmp_path: Path, fake: str,
                                                              unpacked: int, checked: int,
                                                              says: str) -> None:
    """A sha512 diff_id is hashed with sha512 (by unpack and validate alike); one we cannot
    compute or that is malformed is refused before anything is read (exit 3)."""
    layout = injected(cli, tmp_path, {"repo/f": b"f"})
    claim_another_diff_id(layout, "v1", fake)
    result = cli("unpack", f"{layout}:lie", tmp_path / "out")
    assert result.code == unpacked, result.err
    assert says in result.err and result.err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    report = cli("validate", f"{layout}:lie")
    assert report.code == checked and says in report.err, report.err
    # the whole layout: the layer is first read for v1 (sha256), then hashed again for lie
    whole = cli("validate", layout)
    assert whole.code == checked and says in whole.err, whole.err
