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
import re
import stat
from collections.abc import Callable
from pathlib import Path

from cvmfs_inject import scratch
from cvmfs_inject.errors import InputError
from cvmfs_inject.pack.extract import ExtractResult
from cvmfs_inject.pack.options import STAGING_PREFIX
from cvmfs_inject.paths import (
    enclosing_layout,
    missing_directories,
    remove_if_empty,
    remove_tree,
)

_LEGACY_STAGING = re.compile(re.escape(STAGING_PREFIX) + "[a-z0-9_]{8}")


def check_target(target: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise InputError(f"{target}: exists and is not a directory")
    layout = enclosing_layout(target)
    if layout is not None:
        raise InputError(f"{target}: is inside the OCI layout {layout}; unpack outside of "
                         "layouts")
    if target.is_dir():
        _remove_stale_staging(target)
        if not force and any(target.iterdir()):  # a running unpack's staging counts too
            raise InputError(f"{target}: directory is not empty; use --force to unpack "
                             "into it")


def _remove_stale_staging(target: Path) -> None:
    """What killed unpacks left in `target`: their staging directories (named with their
    pid by `scratch`, or, from older versions, without one)."""
    scratch.sweep(target)
    for stale in target.glob(STAGING_PREFIX + "*"):
        if _LEGACY_STAGING.fullmatch(stale.name):
            remove_tree(stale)


def extract_into(fill: Callable[[str], ExtractResult], target: Path, *, force: bool
                 ) -> ExtractResult:
    """Extract into `target` what `fill` extracts (and verifies) into a staging
    directory: one layer, or a stack of them applied in order."""
    check_target(target, force)
    made = missing_directories(target)
    target.mkdir(parents=True, exist_ok=True)
    # named with its pid, so that the next unpack removes it if this one is killed, and
    # never the staging directory of another one still running
    staging = scratch.make_directory("unpack", target, before=".")
    try:
        result = fill(staging)
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
        # this command's staging goes, and the directories it made if nothing else is in
        # them (another `unpack --force` may be filling the same new target)
        remove_tree(Path(staging))
        remove_if_empty(made)
        raise


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
