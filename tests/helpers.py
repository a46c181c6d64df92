"""Test helpers: our own nasty tree builder and snapshots to compare trees and layouts.

The suite must not depend on ../shared, so the shrinkwrap-shaped tree with awkward names
is built here; `make_shrinkwrap_tree.py` is only an extra cross-check where present.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import uuid
from pathlib import Path
from typing import Any

EPOCH = 1_700_000_000


def unique_repo(area: str, prefix: str) -> str:
    """A repository name no other test (or earlier run on the session registry) uses."""
    return f"{area}/{prefix}-{uuid.uuid4().hex[:10]}"


def dead_pid() -> int:
    """The pid of a process that has ended (what a killed command's temp names carry)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def sha256(data: bytes) -> str:
    """Computed here, not with the code under test, so a bug there cannot hide."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_nasty_tree(root: Path, *, files: int = 20) -> Path:
    """A hard-link farm over .data/, symlinks, empty dirs, exec bits and hostile names."""
    data = root / ".data"
    for i in range(files):
        blob = data / f"{i:02x}" / f"content-{i}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes((f"file {i}\n" * (i * 37 + 1)).encode() + os.urandom(i * 11))
        if i % 3 == 0:
            blob.chmod(0o755)
    repo = root / "sft.cern.ch" / "lcg" / "releases"
    repo.mkdir(parents=True)
    for i in range(files):
        os.link(data / f"{i:02x}" / f"content-{i}", repo / f"file-{i}.txt")
        if i % 4 == 0:
            os.link(data / f"{i:02x}" / f"content-{i}", repo / f"copy-{i}.bin")
    odd = root / "atlas.cern.ch" / "odd"
    odd.mkdir(parents=True)
    names = ["with space.txt", "ünïcödé-名前.txt", "x" * 200, "tab\tname", "quote'\"name",
             "star*?[x]", "-leading-dash", ".hidden"]
    for name in names:
        (odd / name).write_bytes(name.encode() + b"\n")
    deep = root / "atlas.cern.ch" / "deep"
    path = deep
    for level in range(40):
        path = path / f"level{level:02d}"
    path.mkdir(parents=True)
    (path / "bottom.txt").write_bytes(b"40 levels down\n")
    (root / "atlas.cern.ch" / "empty-dir").mkdir()
    (odd / "readonly.txt").write_bytes(b"read only\n")
    (odd / "readonly.txt").chmod(0o444)
    os.symlink("../../sft.cern.ch/lcg/releases/file-1.txt", odd / "relative-link")
    os.symlink("/cvmfs/sft.cern.ch/lcg", odd / "absolute-link")
    os.symlink("does-not-exist", odd / "dangling-link")
    os.symlink("..", odd / "self-up")
    (root / ".provenance").mkdir()
    (root / ".provenance" / "info").write_bytes(b"provenance\n")
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (EPOCH, EPOCH), follow_symlinks=False)
    os.utime(root, (EPOCH, EPOCH))
    return root


def tree_snapshot(root: Path) -> dict[str, Any]:
    """Every entry's type, mode, mtime, content digest or link target, and hard-link group."""
    snap: dict[str, Any] = {}
    inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            entry: dict[str, Any] = {"mode": stat.S_IMODE(st.st_mode), "mtime": int(st.st_mtime)}
            if stat.S_ISLNK(st.st_mode):
                entry.update(type="symlink", target=os.readlink(path))
                del entry["mode"]
            elif stat.S_ISDIR(st.st_mode):
                entry["type"] = "dir"
            else:
                with open(path, "rb") as handle:
                    digest = hashlib.sha256(handle.read()).hexdigest()
                key = (st.st_dev, st.st_ino)
                entry.update(type="file", sha256=digest,
                             link_group=inodes.setdefault(key, rel))
            snap[rel] = entry
    return snap


def dir_bytes(root: Path) -> dict[str, str]:
    """Every file under root (layout or not) with the digest of its bytes: 'nothing changed'."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as handle:
                result[os.path.relpath(path, root)] = hashlib.sha256(handle.read()).hexdigest()
        for name in dirnames:
            result[os.path.relpath(os.path.join(dirpath, name), root) + "/"] = "dir"
    return result


def assert_same_tree(expected_root: Path, actual_root: Path) -> None:
    """Same entries, types, modes, mtimes, contents, link targets and hard-link groups."""
    expected, actual = tree_snapshot(expected_root), tree_snapshot(actual_root)
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    differ = sorted(k for k in set(expected) & set(actual) if expected[k] != actual[k])
    assert not (missing or extra or differ), (
        f"missing {missing[:5]}, extra {extra[:5]}, differ "
        f"{[(k, expected[k], actual[k]) for k in differ[:5]]}")
    assert os.stat(actual_root).st_mode & 0o7777 == os.stat(expected_root).st_mode & 0o7777
