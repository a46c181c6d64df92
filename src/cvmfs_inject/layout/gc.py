"""What a layout's index.json reaches, and garbage collection of the rest.

Functions over the store contract (umoci's `casext.GC`), using the one descriptor walk.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field

from cvmfs_inject.errors import IntegrityError, NotFoundError
from cvmfs_inject.layout.annotations import KEPT_ORIGINALS
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.model import Descriptor
from cvmfs_inject.oci.walk import reading, walk


@dataclass(frozen=True)
class GcResult:
    removed: list[tuple[str, int]]
    kept: int
    # (path under the temp area, size): what killed commands left behind
    temp_removed: list[tuple[str, int]] = field(default_factory=list)

    @property
    def bytes_removed(self) -> int:
        return sum(size for _, size in self.removed) + sum(s for _, s in self.temp_removed)


def reachable(layout: Layout, roots: list[Descriptor] | None = None) -> dict[str, int]:
    """Digest -> size of every blob reachable from `roots` (default: all of index.json)
    through indexes, manifests (and their subjects), configs and layers, plus the original
    documents kept beside an image (`layout.original`); documents are read verified."""
    roots = layout.read_index().manifests if roots is None else roots
    seen: dict[str, int] = {}
    for desc in roots:
        for key in KEPT_ORIGINALS:
            digest = desc.annotations.get(key)
            if digest and layout.has_blob(digest):
                seen[digest] = layout.blob_path(digest).stat().st_size
    expand = reading(lambda d: layout.read_blob(d.digest, d.size), layout.where)
    for path in walk(roots, expand):
        seen.setdefault(path.descriptor.digest, path.descriptor.size)
    return seen


def check_present(layout: Layout, desc: Descriptor) -> None:
    """Every blob `desc` reaches exists with its declared size (layers are not hashed:
    whoever reads them checks their digest)."""
    check_sizes(layout, reachable(layout, [desc]))


def check_sizes(layout: Layout, sizes: Mapping[str, int]) -> None:
    """Every blob of `sizes` (digest -> size) exists with that size."""
    for digest, size in sizes.items():
        path = layout.blob_path(digest)
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"{layout.root}: missing blob {digest}") from None
        if actual != size:
            raise IntegrityError(f"{path}: blob has {actual} bytes, its descriptor says "
                                 f"{size}")


def collect(layout: Layout, dry_run: bool = False) -> GcResult:
    """Delete unreachable blobs and leftover temp files. The caller holds the lock."""
    keep = reachable(layout)
    removed: list[tuple[str, int]] = []
    for algorithm_dir in sorted((layout.root / "blobs").iterdir()):
        if not algorithm_dir.is_dir():
            continue
        for blob in sorted(algorithm_dir.iterdir()):
            digest = f"{algorithm_dir.name}:{blob.name}"
            if digest in keep or (blob.is_dir() and not blob.is_symlink()):
                continue  # a directory is no blob: `validate` reports it, gc leaves it
            removed.append((digest, blob.lstat().st_size))
            if not dry_run:
                blob.unlink()
    temp_removed = []
    if layout.tmp_dir.exists():
        temp_removed = [(str(path.relative_to(layout.root)), path.lstat().st_size)
                        for path in sorted(layout.tmp_dir.rglob("*")) if path.is_file()]
        if not dry_run:
            shutil.rmtree(layout.tmp_dir)
    return GcResult(removed, len(keep), temp_removed)
