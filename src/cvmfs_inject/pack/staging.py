"""Extraction into a staging directory, moved into place only once the layer checked out.

A layer's digest (and its gzip CRC or zstd checksum) can only be checked at the end of
its stream, and extracting while streaming means reading it once. So the layer is
extracted into a hidden directory inside the target; only when the whole stream has been
read and verified are its entries renamed into the target (cheap: same filesystem, no
data copied). On any failure the staging directory goes, and so does the target if this
command created it: a corrupted layer leaves nothing behind, and an existing target (with
--force) is left as it was. Nothing is ever written outside the target.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from cvmfs_inject.errors import InputError
from cvmfs_inject.pack.extract import ExtractResult, extract

STAGING_PREFIX = ".cvmfs-inject-unpack-"


def check_target(target: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise InputError(f"{target}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise InputError(f"{target}: directory is not empty; use --force to unpack into it")


def extract_into(stream: IO[bytes], target: Path, mount_point: str, *, force: bool,
                 warn: Callable[[str], None] | None = None) -> ExtractResult:
    """Extract the tar `stream` (whose reader verifies it at its end) into `target`."""
    check_target(target, force)
    created = _first_missing(target.absolute())
    target.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target)
    try:
        result = extract(stream, staging, mount_point, warn)
        _conflicts(staging, str(target))
        root = os.lstat(staging)
        os.chmod(staging, 0o700)  # the layer's mode for the root may forbid moving out
        _merge(staging, str(target))
        os.rmdir(staging)
        if result.has_root:  # the layer named the mount point itself: its mode and time
            os.chmod(target, stat.S_IMODE(root.st_mode))
            os.utime(target, ns=(root.st_atime_ns, root.st_mtime_ns))
        return result
    except BaseException:
        _remove(created if created is not None else Path(staging))
        raise


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of `path` that does not exist yet, or None."""
    missing = None
    while not os.path.lexists(path):
        missing, path = path, path.parent
    return missing


def _conflicts(staged: str, target: str) -> None:
    """Refuse before moving anything where a directory of the target would have to make
    way for a file of the layer (tar would fail half-way there)."""
    for name in os.listdir(staged):
        here = os.path.join(target, name)
        try:
            existing = os.lstat(here)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(existing.st_mode):
            continue
        if not stat.S_ISDIR(os.lstat(os.path.join(staged, name)).st_mode):
            raise InputError(f"{here}: is a directory, and the layer has a file there; "
                             "remove it or unpack into an empty directory")
        _conflicts(os.path.join(staged, name), here)


def _merge(staged: str, target: str) -> None:
    """Move every entry of `staged` into `target`: a new name is renamed in whole, a
    directory on both sides is merged and takes the layer's mode and time, anything else
    in the target is replaced (symlinks included, never followed)."""
    for name in sorted(os.listdir(staged)):
        source, here = os.path.join(staged, name), os.path.join(target, name)
        moved = os.lstat(source)
        try:
            existing = os.lstat(here)
        except FileNotFoundError:
            existing = None
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            os.chmod(source, 0o700)
            _merge(source, here)
            os.rmdir(source)
            os.chmod(here, stat.S_IMODE(moved.st_mode))
        else:
            if existing is not None and stat.S_ISDIR(moved.st_mode):
                os.unlink(here)  # a file or symlink where the layer has a directory
            os.rename(source, here)
            if not stat.S_ISDIR(moved.st_mode):
                continue
        # a moved or merged directory keeps the layer's time (some filesystems touch it)
        os.utime(here, ns=(moved.st_atime_ns, moved.st_mtime_ns))


def _remove(path: Path) -> None:
    """Remove what this command wrote, read-only directories of the layer included."""

    def writable_and_retry(function: Callable[..., object], name: str, _: object) -> None:
        os.chmod(os.path.dirname(name), 0o700)
        function(name)

    if not os.path.lexists(path):
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=writable_and_retry)
    else:
        shutil.rmtree(path, onerror=writable_and_retry)
