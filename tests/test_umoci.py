"""A second, independent reader: umoci unpacks what we wrote and sees the same /cvmfs tree.

umoci 0.4.7 (the Debian package) reads gzip and uncompressed layers only: it refuses a
`tar+zstd` layer as "blob is not correct mediatype", so zstd output is not checked here
(test_inject.py checks it with our own unpack). umoci also refuses a multi-platform index
as ambiguous and Docker v2s2 manifests as "not implemented", so every image here is a
single-platform OCI image. `--rootless` keeps modes, mtimes
(files, directories and symlinks), symlink targets and hard links, so the comparison is the
full `tree_snapshot`, mtimes included.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from helpers import assert_same_tree, make_nasty_tree
from readers import umoci_unpack

from cvmfs_inject.demo.sample import build_sample_image


@pytest.mark.parametrize("compress", ["gzip", "none"])
def test_umoci_sees_the_injected_tree(cli, tmp_path, compress):
    layout = tmp_path / "layout"
    build_sample_image(layout, "base", layers=3)
    tree = make_nasty_tree(tmp_path / "tree")
    result = cli("inject", "--compress", compress, f"{layout}:base", tree)
    assert result.code == 0, result.err
    rootfs = umoci_unpack(layout, "base", tmp_path / "bundle")
    assert_same_tree(tree, rootfs / "cvmfs")
    # the base layers are still there underneath
    assert (rootfs / "etc" / "os-release").read_bytes().startswith(b'NAME="cvmfs-inject')
    assert (rootfs / "opt" / "app" / "bin" / "run.sh").is_file()


@pytest.mark.parametrize("compress", ["gzip", "none"])
def test_our_unpack_gives_what_umoci_unpack_gives(cli, tmp_path, compress):
    """Two extractors of one image agree entry by entry: modes, mtimes (directories too),
    symlinks, hard-link groups, odd names, the mount point's own mode."""
    layout = tmp_path / "layout"
    build_sample_image(layout, "base")
    tree = make_nasty_tree(tmp_path / "tree")
    os.chmod(tree / "atlas.cern.ch" / "odd", 0o750)
    assert cli("inject", "--compress", compress, f"{layout}:base", tree).code == 0
    rootfs = umoci_unpack(layout, "base", tmp_path / "bundle")
    result = cli("unpack", f"{layout}:base", tmp_path / "ours")
    assert result.code == 0, result.err
    assert_same_tree(rootfs / "cvmfs", tmp_path / "ours")


def test_umoci_sees_a_replaced_layer_not_both(cli, tmp_path):
    layout = tmp_path / "layout"
    build_sample_image(layout, "base")
    tree = make_nasty_tree(tmp_path / "tree")
    assert cli("inject", f"{layout}:base", tree).code == 0
    (tree / "atlas.cern.ch" / "odd" / "with space.txt").unlink()
    (tree / "added.txt").write_bytes(b"added\n")
    os.utime(tree, (1_700_000_000, 1_700_000_000))
    assert cli("inject", f"{layout}:base", tree).code == 0
    rootfs = umoci_unpack(layout, "base", tmp_path / "bundle")
    assert_same_tree(tree, rootfs / "cvmfs")


def test_umoci_reads_an_image_after_init(cli, tmp_path):
    layout = tmp_path / "layout"
    build_sample_image(layout, "base")
    result = cli("init", f"{layout}:base")
    assert result.code == 0, result.err
    rootfs = umoci_unpack(layout, "base", tmp_path / "bundle")
    mount = rootfs / "cvmfs"
    assert mount.is_dir() and not mount.is_symlink()
    assert list(mount.iterdir()) == []
    assert os.stat(mount).st_mode & 0o7777 == 0o755
    assert (rootfs / "etc" / "hostname").read_bytes() == b"sample\n"
    listing = subprocess.run(["umoci", "ls", "--layout", str(layout)], capture_output=True,
                             text=True, check=False)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.split() == ["base"]
