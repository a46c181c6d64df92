"""Files and directories of a layout follow the umask, as skopeo's and umoci's do: a layout
shared by a group, served by a web server or read by another user's podman is readable."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_inject.demo.sample import build_sample_image, build_sample_tree


@pytest.fixture(params=[0o022, 0o002], ids=["umask-022", "umask-002"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode)
            for p in [root, *root.rglob("*")]}


def test_every_file_and_directory_follows_the_umask(cli, umask: int, tmp_path: Path) -> None:
    source = tmp_path / "source"
    build_sample_image(source, "v1")
    layout = tmp_path / "layout"
    # skopeo writes the pulled blobs (0600 by itself), then init, inject and gc write ours
    assert cli("pull", f"{source}:v1", f"{layout}:v1").code == 0
    assert cli("init", f"{layout}:v1", "--tag", "prepared").code == 0
    assert cli("inject", f"{layout}:prepared", build_sample_tree(tmp_path / "tree")).code == 0
    assert cli("gc", layout).code == 0
    found = modes(layout)
    assert not any(name.startswith(".cvmfs-inject-tmp") for name in found)
    expected = {name: 0o777 & ~umask if (layout / name).is_dir() else 0o666 & ~umask
                for name in found if name != "."}
    assert {name: mode for name, mode in found.items() if name != "."} == expected
    assert len([n for n in found if n.startswith("blobs/sha256/")]) >= 6
