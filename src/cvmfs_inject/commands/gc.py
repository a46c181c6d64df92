"""gc: delete the blobs a layout's index.json no longer reaches, and leftover temp files."""

from __future__ import annotations

from dataclasses import dataclass

from cvmfs_inject.errors import UsageError
from cvmfs_inject.image.refs import ImageRef
from cvmfs_inject.layout.gc import GcResult, collect
from cvmfs_inject.layout.store import Layout


@dataclass(frozen=True)
class GcReport:
    layout: str
    result: GcResult
    dry_run: bool


def gc(ref: ImageRef, dry_run: bool = False) -> GcReport:
    """Under the writer lock, so no other command's new blobs are taken for garbage."""
    if ref.transport != "oci" or ref.tag:
        raise UsageError(f"gc takes a layout directory, not {ref}")
    layout = Layout.open(ref.path)
    guard = layout.lock() if dry_run else layout.writing()
    with guard:
        return GcReport(ref.path, collect(layout, dry_run), dry_run)
