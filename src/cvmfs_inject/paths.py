"""The directories a command creates on its way to a path, and undoing exactly that.

A failed `pull` into a new layout, or `unpack` into a new directory, leaves nothing behind.
Undoing never removes a directory above the one the command works in unless it is empty:
another command may have put something beside ours meanwhile (`make -j`), and that is
not ours to take.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from cvmfs_inject.errors import InputError


def missing_directories(path: Path) -> list[Path]:
    """The directories from `path` up that do not exist yet, innermost first."""
    missing = []
    path = path.absolute()
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    return missing


def remove_if_empty(directories: list[Path]) -> None:
    """rmdir each directory, innermost first, stopping at the first that is not empty."""
    for directory in directories:
        try:
            os.rmdir(directory)
        except FileNotFoundError:
            continue
        except OSError:
            return


def remove_tree(path: Path) -> None:
    """Remove what this command wrote at `path`, read-only directories of a layer too."""

    def writable_and_retry(function: Callable[[str], object], name: str, _: object) -> None:
        os.chmod(os.path.dirname(name), 0o700)
        function(name)

    if not os.path.lexists(path):
        return
    if not path.is_dir() or path.is_symlink():
        path.unlink()
    elif sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=writable_and_retry)
    else:
        shutil.rmtree(path, onerror=writable_and_retry)


def empty_directory(directory: Path) -> None:
    """Remove what is in `directory` (this command put it there), keeping the directory."""
    for child in list(directory.iterdir()):
        remove_tree(child)


def enclosing_layout(path: Path) -> Path | None:
    """The OCI layout that `path` is or lies inside (a directory holding `oci-layout`), where
    it really is: writing there as if it were a plain file or directory would break it."""
    real = path.resolve()
    for directory in (real, *real.parents):
        if (directory / "oci-layout").is_file():
            return directory
    return None


def refuse_overlap(tree: Path, layout: Path) -> None:
    """A tree injected into a layout may neither be it, lie inside it, nor hold it: the pack
    would read the layout's blobs, and the blobs this command is writing."""
    real_tree, real_layout = tree.resolve(), layout.resolve()
    if real_tree.is_relative_to(real_layout) or real_layout.is_relative_to(real_tree):
        raise InputError(f"{tree}: the tree and the layout {layout} overlap; keep the tree "
                         "outside the layout and the layout outside the tree")
