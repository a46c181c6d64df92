"""gc: delete the blobs a layout's index.json no longer reaches, and leftover temp files."""

from __future__ import annotations

from cvmfs_inject.errors import UsageError
from cvmfs_inject.layout.gc import GcResult, collect
from cvmfs_inject.layout.lock import LockWait
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.refs import ImageRef


def gc(ref: ImageRef, dry_run: bool = False, wait: LockWait | None = None) -> GcResult:
    """Under the exclusive use lock: gc waits until every command using the layout has
    finished, so a blob a writer has written but not yet tagged is never taken for garbage
    (the way umoci and containerd keep gc off a writer's blobs with a lock or a lease)."""
    if ref.transport != "oci" or ref.tag:
        raise UsageError(f"gc takes a layout directory, not {ref}")
    layout = Layout.open(ref.path, wait)
    layout.refuse_symlinks()  # a dry run says what gc would do: refuse these too
    with layout.lock(exclusive=True):
        return collect(layout, dry_run)
