"""A scan (and a delta) as the packer's entries, and the index of the layer they make.

A full layer made from a scan is byte for byte the layer a walk of the tree gives (the
same entries, order and headers: `tests/test_stack.py` holds them equal). A delta holds
the entries of `Delta.emit` in the same order; the whiteouts of a directory come right
after its own entry, before its other children, so that a runtime applying the layer in
order never removes what the layer itself adds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from cvmfs_inject.pack.headers import TYPE_DIR, TYPE_FILE, TYPE_HARDLINK, TYPE_SYMLINK, TarHeaders
from cvmfs_inject.pack.walker import Entry
from cvmfs_inject.pack.whiteouts import WHITEOUT as WHITEOUT_PREFIX
from cvmfs_inject.stack.diff import Delta, Scan
from cvmfs_inject.stack.index import DIR, FILE, WHITEOUT, LayerIndex, Node


class Plan:
    """The entries below the mount point of a full layer (`delta` None) or of a delta."""

    def __init__(self, scan: Scan, delta: Delta | None, mount_point: str) -> None:
        self.scan = scan
        self.delta = delta
        self.mount_point = mount_point
        self.prefix = os.fsencode(mount_point.strip("/")) + b"/"
        self.entries = self.hardlinks = 0
        self._order: list[bytes] | None = None  # a delta's paths, sorted once

    def _nodes(self) -> Iterator[tuple[bytes, Node]]:
        """The entries the layer holds, in the scan's (tar) order: a delta's are found by
        sorting its few paths by their components as the walk sorts them (depth first,
        names sorted), not by a pass over the whole scan."""
        nodes = self.scan.nodes
        if self.delta is None:
            return iter(nodes.items())
        if self._order is None:
            self._order = sorted(self.delta.emit, key=_components)
        return ((rel, nodes[rel]) for rel in self._order)

    def __call__(self, headers: TarHeaders) -> Iterator[Entry]:
        prefix, scan = self.prefix, self.scan
        yield from self._whiteouts(headers, b"")
        for rel, node in self._nodes():
            if not rel:
                continue
            self.entries += 1
            name = prefix + rel
            if node.kind == FILE:
                if node.group and node.group != rel:
                    self.hardlinks += 1
                    yield (headers(name, node.mode, node.uid, node.gid, 0, node.mtime,
                                   TYPE_HARDLINK, prefix + node.group), None, 0)
                else:
                    yield (headers(name, node.mode, node.uid, node.gid, node.size, node.mtime,
                                   TYPE_FILE), scan.path(rel), node.size)
            elif node.kind == DIR:
                yield (headers(name + b"/", node.mode, node.uid, node.gid, 0, node.mtime,
                               TYPE_DIR), None, 0)
                yield from self._whiteouts(headers, rel)
            else:
                yield (headers(name, node.mode, node.uid, node.gid, 0, node.mtime,
                               TYPE_SYMLINK, node.target), None, 0)

    def _whiteouts(self, headers: TarHeaders, directory: bytes) -> Iterator[Entry]:
        if self.delta is None:
            return
        names = self.delta.whiteouts.get(directory, ())
        base = self.prefix + directory + b"/" if directory else self.prefix
        for name in names:
            self.entries += 1
            yield headers(base + WHITEOUT_PREFIX + name, 0, 0, 0, 0, 0, TYPE_FILE), None, 0

    def index(self, diff_id: str, digests: dict[str, str]) -> LayerIndex:
        """The index of the packed layer; `digests` are the contents the packer hashed."""
        scan, delta = self.scan, self.delta
        index = LayerIndex(diff_id, self.mount_point)
        nodes = index.nodes
        for rel, node in self._nodes():
            if node.kind == FILE and not node.digest:
                first = node.group or rel
                digest = digests.get(scan.path(first), "")
                node = node._replace(digest=digest)
            nodes[rel] = node
        if delta is not None:
            for directory, names in delta.whiteouts.items():
                for name in names:
                    path = directory + b"/" + name if directory else name
                    if path not in nodes:  # replaced in this layer: the entry says enough
                        nodes[path] = Node(WHITEOUT, 0, 0, 0, 0, 0)
                    elif nodes[path].kind == DIR:
                        index.opaque.add(path)
        return index


def _components(path: bytes) -> list[str]:
    """What the walk sorts a directory's names by: strings (`os.listdir`), in which a
    byte that is not UTF-8 becomes a surrogate, U+DC80-U+DCFF, after every other name
    (a byte sort would put it before a name of two-byte UTF-8, as \x80 < \xc3)."""
    return os.fsdecode(path).split("/")
