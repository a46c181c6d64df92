"""Tree indexes: what each /cvmfs layer holds, so an update can be diffed without
downloading the layers.

A layer's index has one `Node` per entry below the mount point (the mount point itself is
the empty path): its type, mode, owner, size, packed mtime, link target, hard-link group
(the group's first name, which tar's links point at) and content sha256; whiteouts are
nodes too. The union of a stack's indexes, applied as a runtime applies the layers, is the
tree the image shows at the mount point (`union`).

Indexes made while packing also hold each entry's exact mtime in nanoseconds as the host
saw it, which makes the quick check exact even when SOURCE_DATE_EPOCH clamps the packed
times; an index rebuilt from a layer has the packed time only (`mtime_ns` 0).
"""

from __future__ import annotations

import bisect
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import IO, NamedTuple

from cvmfs_inject.errors import InputError
from cvmfs_inject.layout.blobs import READ_CHUNK
from cvmfs_inject.pack.extract import relative as _relative
from cvmfs_inject.pack.tarstream import (
    DIRECTORY,
    HARDLINK,
    REGULAR,
    SYMLINK,
    Member,
    TarStream,
)
from cvmfs_inject.pack.whiteouts import OPAQUE as OPAQUE_NAME
from cvmfs_inject.pack.whiteouts import WHITEOUT as WHITEOUT_PREFIX
from cvmfs_inject.pack.whiteouts import hides_mount_point

FILE, DIR, LINK, WHITEOUT = "f", "d", "l", "w"


class Node(NamedTuple):
    """One entry of a layer (or of a tree), as packed."""

    kind: str  # FILE, DIR, LINK (symlink) or WHITEOUT (at the path it hides)
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int  # as packed (clamped to SOURCE_DATE_EPOCH)
    target: bytes = b""  # symlink target
    group: bytes = b""  # first name of the hard-link group (b"" when not in one)
    digest: str = ""  # sha256 hex of a file's content ("" when not known)
    mtime_ns: int = 0  # the host's exact mtime when the index was made by packing (0: unknown)

    def same_entry(self, other: Node) -> bool:
        """Equal as an image shows them: everything but the content and the host time."""
        return self[:8] == other[:8]


@dataclass
class LayerIndex:
    """The entries one layer holds, in tar order, by path below the mount point."""

    diff_id: str
    mount_point: str
    nodes: dict[bytes, Node] = field(default_factory=dict)
    # directories whose lower content this layer hides (`.wh..wh..opq`, or a whiteout and
    # a directory of the same name in one layer)
    opaque: set[bytes] = field(default_factory=set)

    def tar_bytes(self) -> int:
        """What the layer's tar costs, about: a header per entry and each content once."""
        return estimate(self.nodes.items())


def estimate(nodes: Iterable[tuple[bytes, Node]]) -> int:
    """About the tar size of these entries: a header each, each content once."""
    total = 0
    for path, node in nodes:
        total += 512
        if node.kind == FILE and (not node.group or node.group == path):
            total += node.size + 511 & ~511
    return total


def union(layers: Iterable[LayerIndex]) -> dict[bytes, Node]:
    """The tree the stack shows: each layer's whiteouts hide what lies below them, a
    non-directory hides a lower directory's content, and its entries then replace the
    lower ones (the OCI image spec's changeset rules)."""
    tree: dict[bytes, Node] = {}
    for layer in layers:
        if not tree:  # nothing below to hide: the layer's entries less its whiteouts
            tree = dict(layer.nodes)
            if WHITEOUT in map(itemgetter(0), tree.values()):
                tree = {path: node for path, node in tree.items() if node.kind != WHITEOUT}
            continue
        gone: list[bytes] = []  # lower paths that go, and all below them
        emptied = list(layer.opaque)  # lower directories whose content goes
        for path, node in layer.nodes.items():
            if node.kind == DIR:
                continue
            lower = tree.get(path)
            if lower is None:
                continue
            if node.kind == WHITEOUT:
                gone.append(path)
            elif lower.kind == DIR:
                emptied.append(path)
        if gone or emptied:
            _remove(tree, gone, emptied)
        for path, node in layer.nodes.items():
            if node.kind != WHITEOUT:
                tree[path] = node
    return tree


def _remove(tree: dict[bytes, Node], gone: list[bytes], emptied: list[bytes]) -> None:
    """Remove `gone` paths and everything below them and below `emptied` ones: a path's
    descendants are the keys after it in sorted order that start with it and a slash."""
    keys = sorted(tree)
    for path in gone:
        del tree[path]
    for path in [*gone, *emptied]:
        prefix = path + b"/" if path else b""
        i = bisect.bisect_left(keys, prefix)
        while i < len(keys) and keys[i].startswith(prefix):
            if keys[i]:  # the mount point itself stays
                tree.pop(keys[i], None)
            i += 1


def index_of_layer(stream: IO[bytes], mount_point: str, diff_id: str, *,
                   only_mount_point: bool = False) -> LayerIndex:
    """Read a layer's tar stream into its index: every member below the mount point,
    whiteouts included, each file's content hashed on the way; names are held to
    extraction's rules. The stream is read to its end, where `pack.inflate.decompressed`
    (given `diff_id`) raises if it is not that digest: an image whose layer is not what its
    config says must not put a wrong index into the cache. With `only_mount_point` (labels
    of ours name the layer), a layer holding content outside the mount point (but the
    directories above it, as `tar -C DIR .` gives them, and whiteouts, which hide nothing
    of the stack there) is refused: the labels name as a layer of the stack, which an
    update replaces whole, a layer of the base image. The original injector's label alone
    names the layer its users put `tar -C DIR .` of any DIR in, replaced as that tool
    replaces it: only what lies below the mount point is indexed."""
    prefix = os.fsencode(mount_point.strip("/")) + b"/"
    top = prefix.rstrip(b"/")
    above = {b"", b"."} | {top[:i] for i in range(len(top)) if top[i:i + 1] == b"/"}
    tar = TarStream(stream.read, READ_CHUNK)
    index = LayerIndex(diff_id, mount_point)
    for member in tar.members():
        name = member.name
        while name.startswith(b"./"):
            name = name[2:]
        name = name.rstrip(b"/")
        if name == top:
            _add(index, b"", member, tar, prefix)
        elif name.startswith(prefix):
            _add(index, _relative(name, prefix, member.name), member, tar, prefix)
        elif hides_mount_point(name, top):
            index.opaque.add(b"")
        elif only_mount_point and not ((name in above and member.type == DIRECTORY)
                                       or name.rpartition(b"/")[2].startswith(WHITEOUT_PREFIX)):
            raise InputError(f"layer {diff_id} holds {os.fsdecode(member.name)!r}, outside "
                             f"{mount_point}: the image's labels name it as a layer of "
                             f"{mount_point}, which it is not (were they edited?)")
    tar.drain()
    while stream.read(READ_CHUNK):
        pass
    for path, node in list(index.nodes.items()):
        if node.group == path:
            continue
        if node.group:  # the first name of a group is in it too
            first = index.nodes[node.group]
            index.nodes[node.group] = first._replace(group=node.group)
    return index


def _add(index: LayerIndex, rel: bytes, member: Member, tar: TarStream, prefix: bytes) -> None:
    nodes = index.nodes
    mode, mtime = member.mode & 0o7777, int(member.mtime)
    uid, gid = member.owner()
    parent, _, base = rel.rpartition(b"/")
    if base == OPAQUE_NAME:
        index.opaque.add(parent)
    elif base.startswith(WHITEOUT_PREFIX):
        name = base[len(WHITEOUT_PREFIX):]
        if name in (b"", b".", b".."):
            raise InputError(f"layer member {os.fsdecode(member.name)!r} is not a valid "
                             "whiteout")
        hidden = (parent + b"/" if parent else b"") + name
        earlier = nodes.get(hidden)
        if earlier is None:
            nodes[hidden] = Node(WHITEOUT, 0, 0, 0, 0, 0)
        elif earlier.kind == DIR:  # an entry of the same layer is not hidden by it
            index.opaque.add(hidden)
    elif member.type in REGULAR:
        sha = hashlib.sha256()
        for piece in tar.data():
            sha.update(piece)
        nodes[rel] = Node(FILE, mode, uid, gid, member.size, mtime, digest=sha.hexdigest())
    elif member.type == DIRECTORY:
        earlier = nodes.get(rel)
        if earlier is not None and earlier.kind == WHITEOUT:
            index.opaque.add(rel)
        nodes[rel] = Node(DIR, mode, uid, gid, 0, mtime)
    elif member.type == SYMLINK:
        nodes[rel] = Node(LINK, mode, uid, gid, 0, mtime, target=member.linkname)
    elif member.type == HARDLINK:
        link = member.linkname
        while link.startswith(b"./"):
            link = link[2:]
        first = _relative(link, prefix, member.name) if link.startswith(prefix) else link
        source = nodes.get(first)
        if source is None or source.kind != FILE:
            raise InputError(f"hard link {os.fsdecode(member.name)!r} points at a file that "
                             "is not in the layer before it")
        nodes[rel] = source._replace(mode=mode, uid=uid, gid=gid, mtime=mtime, group=first)
