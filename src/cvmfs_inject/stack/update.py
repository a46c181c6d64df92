"""One update of a stack: decide what the new stack is, and pack the layers it needs.

The stack is an LSM tree. An update normally appends a delta holding what changed since
the stack's last state. When that would make more than `max_layers` layers, or the deltas
together would outgrow `compact_ratio` of the base, the deltas are merged into one (the
diff of the tree against the base alone); when even that merged delta outgrows the ratio,
a fresh base is packed and the stack is one layer again. Every decision depends on the
tree and the indexes only, so the same sequence of trees gives the same layers anywhere.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from cvmfs_inject.image.edit import LABEL_MOUNT, LABEL_PREFIX, NewLayer, Stack
from cvmfs_inject.image.source import Image, ImageSource
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.pack.inflate import decompressed
from cvmfs_inject.pack.options import PackOptions, Progress, Warn
from cvmfs_inject.pack.packer import PackResult, pack
from cvmfs_inject.stack.cache import IndexCache, default_state_dir
from cvmfs_inject.stack.diff import Delta, PendingScan, Scan, diff, unsure_below
from cvmfs_inject.stack.index import DIR, LayerIndex, index_of_layer, union
from cvmfs_inject.stack.options import StackOptions
from cvmfs_inject.stack.plan import Plan


@dataclass
class StackUpdate:
    """The new stack: the first `keep` layers of the old one, then `layers`."""

    action: str  # base, delta, merged, rebased, unchanged
    keep: int = 0
    layers: list[NewLayer] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    added: int = 0
    changed: int = 0
    removed: int = 0
    downloaded: int = 0  # layer bytes read to rebuild indexes missing from the cache
    packed: PackResult | None = None

    @property
    def count(self) -> int:
        return self.keep + len(self.layers)

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "layers": self.count, "added": self.added,
                "changed": self.changed, "removed": self.removed,
                "compacted": self.action in ("merged", "rebased"),
                "downloaded": self.downloaded}


@contextlib.contextmanager
def cycle_collection_paused() -> Iterator[None]:
    """For a stack update: its scan and indexes are a few tuples per entry of the tree,
    none in a reference cycle, which the cyclic collector would walk again and again as
    they grow (0.14 s of a 1.6 s update of an 81k-entry tree). The region also packs the
    layers and may read a layer back for its index; what garbage in cycles all that
    leaves is small (48-120 objects on that tree: a base, a delta, a cold cache) and is
    collected once the collector is back on. Reference counting frees the rest."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class StackUpdater:
    """Updates the stacks of the images of one command, from one scan of the tree."""

    def __init__(self, source: ImageSource, store: Layout, scan: PendingScan,
                 options: PackOptions, stack_options: StackOptions,
                 progress: Progress | None = None, warn: Warn | None = None) -> None:
        self.source, self.store, self._scan = source, store, scan
        self.options, self.stack_options = options, stack_options
        self.cache = IndexCache(stack_options.state_dir or default_state_dir())
        self.progress, self.warn = progress, warn
        self._done: dict[tuple[str, ...], StackUpdate] = {}
        self._unwritable = False  # told once

    @property
    def scan(self) -> Scan:
        """The tree's scan, finished when first needed: after the stack's indexes are
        loaded, which its helpers' walk overlaps."""
        return self._scan.result()

    def update(self, image: Image, stack: Stack) -> StackUpdate:
        """The update of this image's stack (images with the same stack share it)."""
        key = tuple(stack.diff_ids)
        if key not in self._done:
            self._done[key] = self._update(image, stack)
        return self._done[key]

    def _update(self, image: Image, stack: Stack) -> StackUpdate:
        ratio, limit = self.stack_options.compact_ratio, self.stack_options.max_layers
        labelled = image.config.labels.get(LABEL_MOUNT)
        if not stack.diff_ids or limit == 1 or labelled not in (None, self.options.mount_point):
            return self._rebase("base" if not stack.diff_ids else "rebased")
        update = StackUpdate("unchanged")
        indexes = [self._index(image, stack, i, update) for i in range(len(stack.diff_ids))]
        # sized before the diff waits for the scan: meanwhile the helpers walk
        base_bytes = indexes[0].tar_bytes()
        deltas_bytes = sum(index.tar_bytes() for index in indexes[1:])
        stack_tree = union(indexes)
        self._scan.result(against=stack_tree)  # a no-op when an image before finished it
        delta = self._diff(stack_tree, update)
        if delta.empty and len(indexes) <= limit:
            update.keep = len(indexes)
            return update
        if (not delta.empty and len(indexes) < limit
                and deltas_bytes + delta.tar_bytes <= ratio * base_bytes):
            update.action, update.keep = "delta", len(indexes)
            self._pack(delta, update, f"delta {len(indexes)}")
            return update
        merged = self._diff(union(indexes[:1]), update, unsure_below(delta, indexes[1:]))
        if merged.tar_bytes > ratio * base_bytes:
            rebased = self._rebase("rebased")
            rebased.downloaded = update.downloaded
            return rebased
        update.action, update.keep = "merged", 1
        if not merged.empty:
            self._pack(merged, update, "deltas merged")
        return update

    def _diff(self, old: dict[bytes, Any], update: StackUpdate,
              only: set[bytes] | None = None) -> Delta:
        epoch = self.options.source_date_epoch
        delta = diff(old, self.scan, checksum=self.stack_options.checksum, epoch=epoch,
                     only=only)
        update.added, update.changed, update.removed = delta.added, delta.changed, delta.removed
        return delta

    def _rebase(self, action: str) -> StackUpdate:
        update = StackUpdate(action)
        update.added = sum(node.kind != DIR for node in self.scan.nodes.values())
        self._pack(None, update, "base")
        return update

    def _pack(self, delta: Delta | None, update: StackUpdate, role: str) -> None:
        options = self.options
        plan = Plan(self.scan, delta, options.mount_point)
        digests: dict[str, str] = {}
        with self.store.writer() as writer:
            packed = pack(Path(self.scan.root), writer, options, self.progress, self.warn,
                          plan=plan, digests=digests)
            layer = NewLayer(packed.diff_id, writer.peek_digest(), writer.size,
                             options.compression, options.mount_point)
            writer.commit()
        packed.entries, packed.hardlinks = plan.entries + 1, plan.hardlinks
        # also after `--max-layers 1` compacted a stack: the next stacked update of it
        # then finds the index instead of reading the layer again
        self._cached(plan.index(packed.diff_id, digests))
        update.layers.append(layer)
        update.packed = packed
        counts = f"+{update.added} ~{update.changed} -{update.removed}"
        update.comments.append(f"cvmfs-inject: {options.mount_point} {role} "
                               f"({counts} files) layer {layer.diff_id}")

    def _index(self, image: Image, stack: Stack, i: int, update: StackUpdate) -> LayerIndex:
        """A layer's index from the cache, else rebuilt by reading the layer."""
        diff_id, mount = stack.diff_ids[i], self.options.mount_point
        index = self.cache.get(diff_id, mount)
        if index is not None:
            return index
        desc = image.manifest.layers[stack.position + i]
        if self.warn:
            why = ("its file there is damaged or unreadable" if self.cache.holds_file(diff_id)
                   else "a first run here, or a cleared cache")
            self.warn(f"no index of layer {diff_id} in {self.cache.directory} ({why}): "
                      f"reading the layer once to make it ({desc.size:,} B)")
        with self.source.open_blob(desc) as blob:
            stream = decompressed(cast(IO[bytes], blob), desc.media_type, diff_id,
                                  desc.digest)
            try:
                index = index_of_layer(stream, mount, diff_id, only_mount_point=any(
                    label.startswith(LABEL_PREFIX) for label in image.config.labels))
            finally:
                if stream is not blob:
                    stream.close()
        update.downloaded += desc.size
        self._cached(index)
        return index

    def _cached(self, index: LayerIndex) -> None:
        """Put an index into the cache; say so once when the cache cannot be written (each
        update would then read the stack's layers again)."""
        failed = self.cache.put(index)
        if failed and self.warn and not self._unwritable:
            self._unwritable = True
            self.warn(f"cannot save tree indexes in {self.cache.directory} ({failed}): the "
                      "next update reads the stack's layers again; see --state")

