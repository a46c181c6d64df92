"""What changed: a scan of DIR against the tree a stack shows, as the entries of a delta.

The scan lstats every entry (the packer's own walk, so it sees exactly what a full pack
would); nothing is read unless the quick check cannot decide. The quick check is rsync's
and git's: type, mode, owner, size, packed mtime, link target and hard-link group, and
the exact host mtime where the index has it. With `checksum`, files equal by those are
read and compared by content. A hard-link group never spans layers: when any of its names
changed, was added or left, every name of the group goes into the delta, the content once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_inject.errors import CvmfsInjectError, InputError
from cvmfs_inject.pack.fanout import FannedWalk
from cvmfs_inject.pack.inbox import Record
from cvmfs_inject.pack.options import CHUNK, PackOptions, Warn
from cvmfs_inject.pack.packer import check_tree
from cvmfs_inject.pack.units import RecordOf
from cvmfs_inject.stack.index import DIR, FILE, LINK, LayerIndex, Node, estimate


@dataclass
class Scan:
    """The tree as it would be packed: a node per entry, in tar order; and the names of
    each hard-link group (two names or more), by the group's first name. `checked`: the
    tree the scan's entries were quick-checked against as they came, and the paths that
    did not pass (`PendingScan.result`)."""

    root: str
    nodes: dict[bytes, Node]
    groups: dict[bytes, list[bytes]] = field(default_factory=dict)
    checked: tuple[dict[bytes, Node], dict[bytes, None]] | None = None

    def path(self, rel: bytes) -> str:
        return self.root + "/" + os.fsdecode(rel) if rel else self.root


class PendingScan:
    """A scan begun early: its helpers (`pack.fanout`) walk the tree while the command
    resolves the image and loads the stack's indexes; `result()` finishes it. Leaving the
    context stops the helpers. A tree that cannot be scanned fails in `result()`, where a
    scan begun late would have: the command's other errors keep their order. The top of
    the tree is read when the scan begins, the rest while it goes on: like any walk, it
    needs a tree that nothing writes to meanwhile (a directory removed in between fails
    the scan)."""

    def __init__(self, tree: Path, options: PackOptions, warn: Warn | None = None) -> None:
        self._tree, self._options = tree, options
        self._scan: Scan | None = None
        self._released = False
        self.notes: list[str] = []  # what the scan skipped, as `warn` was told

        def note(message: str) -> None:
            self.notes.append(message)
            if warn:
                warn(message)

        self._walk = FannedWalk(options, str(tree).rstrip("/") or "/", b"",
                                _record_of(options), note)
        with contextlib.suppress(OSError, CvmfsInjectError):  # result() says it
            check_tree(tree)
            self._walk.start()

    def __enter__(self) -> PendingScan:
        return self

    def __exit__(self, *_: object) -> None:
        self._walk.close()

    def result(self, against: dict[bytes, Node] | None = None) -> Scan:
        """lstat every entry the packer would pack (same exclusions, same skips). With
        `against` (given when the scan is first finished), each entry is quick-checked
        against that tree as it comes, while the helpers still walk, and `diff` of that
        tree then looks only at the entries that did not pass (`Scan.checked`)."""
        if self._released:
            raise RuntimeError("the scan was released")
        if self._scan is None:
            self._scan = self._finish(against)
        return self._scan

    def release(self) -> Scan | None:
        """Give up the scan once the updates are decided, while the cyclic collector is
        still paused (`stack.update.cycle_collection_paused`): its nodes, and the stack's
        tree they were checked against, are then freed there (or left to the exit:
        `leftover`), not first walked by the collector's next pass (20-45 ms on an
        81,000-entry tree)."""
        scan, self._scan, self._released = self._scan, None, True
        return scan

    def _finish(self, against: dict[bytes, Node] | None) -> Scan:
        tree, options = self._tree, self._options
        st = check_tree(tree)
        root = str(tree).rstrip("/") or "/"
        nodes: dict[bytes, Node] = {b"": Node(DIR, stat.S_IMODE(st.st_mode), 0, 0, 0,
                                              options.clamp(st.st_mtime))}
        names_of: dict[int, list[bytes]] = {}  # a multiply-linked inode's names, in order
        new = tuple.__new__  # a Node per entry: skip NamedTuple's Python-level __new__
        unsure: dict[bytes, None] = {}  # in scan order, as a full diff meets them
        before_of = (against or {}).get
        if against is not None and not _passes(before_of(b""), nodes[b""]):
            unsure[b""] = None
        try:
            for rel, kind, perms, uid, gid, size, mtime, link, inode, mtime_ns in self._walk:
                if inode:
                    names = names_of.get(inode)
                    if names is None:
                        group = rel
                        names_of[inode] = [rel]
                    else:
                        group = names[0]
                        names.append(rel)
                else:
                    group = b""
                node = nodes[rel] = new(Node, (kind, perms, uid, gid, size, mtime, link,
                                               group, "", mtime_ns))
                if against is not None and not _passes(before_of(rel), node):
                    unsure[rel] = None
        finally:
            self._walk.close()
        groups: dict[bytes, list[bytes]] = {}
        for names in names_of.values():
            if len(names) > 1:
                groups[names[0]] = names
            else:  # a group of one name (its other links are outside DIR) is none
                rel = names[0]
                nodes[rel] = nodes[rel]._replace(group=b"")
                if against is not None:  # checked with the group it seemed to have
                    if _passes(before_of(rel), nodes[rel]):
                        unsure.pop(rel, None)
                    else:  # a group that kept only this name in DIR
                        unsure[rel] = None
        return Scan(root, nodes, groups, None if against is None else (against, unsure))


def _passes(before: Node | None, node: Node) -> bool:
    """The quick check: equal as packed and, for a file, at the same exact host time."""
    return before is not None and before[:8] == node[:8] and (
        node.kind != FILE or bool(before.mtime_ns and before.mtime_ns == node.mtime_ns))


def _record_of(options: PackOptions) -> RecordOf:
    """An entry's node fields, made where the entry was walked: (path below the tree, kind,
    permissions, uid, gid, size, packed mtime, link target, inode key of a multiply-linked
    file (else 0), exact mtime in ns (files only))."""
    keep_owner, clamp = options.keep_owner, options.clamp
    s_isreg, s_isdir, s_imode = stat.S_ISREG, stat.S_ISDIR, stat.S_IMODE

    def record(_: str, name: str, fd: int, tar_name: bytes, st: os.stat_result) -> Record:
        mode = st.st_mode
        uid, gid = (st.st_uid, st.st_gid) if keep_owner else (0, 0)
        if s_isreg(mode):
            inode = st.st_dev << 64 | st.st_ino if st.st_nlink > 1 else 0
            return (tar_name[1:], FILE, s_imode(mode), uid, gid, st.st_size,
                    clamp(st.st_mtime), b"", inode, st.st_mtime_ns)
        if s_isdir(mode):
            return tar_name[1:], DIR, s_imode(mode), uid, gid, 0, clamp(st.st_mtime), b"", 0, 0
        return (tar_name[1:], LINK, s_imode(mode), uid, gid, 0, clamp(st.st_mtime),
                os.fsencode(os.readlink(name, dir_fd=fd)), 0, 0)

    return record


def scan(tree: Path, options: PackOptions, warn: Warn | None = None) -> Scan:
    """lstat every entry the packer would pack (same exclusions, same skips)."""
    with PendingScan(tree, options, warn) as pending:
        return pending.result()


@dataclass
class Delta:
    """The entries a delta holds: `emit` paths of the scan (in its order) and whiteouts by
    parent directory; what changed, counted in non-directory entries."""

    emit: set[bytes] = field(default_factory=set)
    whiteouts: dict[bytes, list[bytes]] = field(default_factory=dict)
    added: int = 0
    changed: int = 0
    removed: int = 0
    tar_bytes: int = 0
    touched: int = 0  # entries changed, added or whited out, directories included
    unsure: list[bytes] = field(default_factory=list)  # paths the quick check did not pass

    @property
    def empty(self) -> bool:
        return not self.touched


def file_digest(path: str) -> str:
    sha = hashlib.sha256()
    try:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(CHUNK):
                sha.update(chunk)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    return sha.hexdigest()


def diff(old: dict[bytes, Node], new: Scan, *, checksum: bool = False,
         epoch: int | None = None, only: Iterable[bytes] | None = None) -> Delta:
    """The delta that turns the tree `old` (a union of indexes) into the scanned tree.

    `only`: the scanned paths that may differ from `old`, the others being known to pass
    the quick check (a merge diffs against the base the tree a first diff compared with
    the whole stack: only the paths that one found unsure, or that a delta holds, can
    differ; `Delta.unsure`). Digests of files read on the way are put into the scan's
    nodes, for their index."""
    delta = Delta()
    nodes = new.nodes
    if only is None and not checksum and new.checked is not None and new.checked[0] is old:
        only = new.checked[1]  # every other entry passed the quick check as it was scanned
    marked: set[bytes] = set()
    gone: set[bytes] = set()  # paths to white out
    left: set[bytes] = set()  # the groups removed paths belonged to
    quick = not checksum
    unsure = delta.unsure
    scanned = nodes.items() if only is None else (
        (path, nodes[path]) for path in only if path in nodes)
    for path, node in scanned:
        before = old.get(path)
        if quick and _passes(before, node):  # what `_same` says of most entries, at once
            continue
        unsure.append(path)
        if before is None:
            delta.added += node.kind != DIR
            marked.add(path)
        elif before.kind != node.kind:
            delta.changed += 1
            marked.add(path)
            gone.add(path)  # the old entry goes first: a directory's content with it
        elif not _same(before, node, path, new, checksum, epoch):
            delta.changed += node.kind != DIR
            marked.add(path)
    for path in old.keys() - nodes.keys():
        before = old[path]
        delta.removed += before.kind != DIR
        if before.group:
            left.add(before.group)
        parent = path.rpartition(b"/")[0]
        now, then = nodes.get(parent), old.get(parent)
        if now is not None and now.kind == DIR and then is not None and then.kind == DIR:
            gone.add(path)  # else an ancestor's whiteout or replacement hides it
    _whole_groups(old, new, marked, left)
    emit = delta.emit
    for path in marked | gone | {b""}:
        if path in marked:
            emit.add(path)
        parent = path
        while parent:
            parent = parent.rpartition(b"/")[0]
            if parent in emit:
                break
            emit.add(parent)
    for path in sorted(gone):
        parent, _, name = path.rpartition(b"/")
        delta.whiteouts.setdefault(parent, []).append(name)
    delta.touched = len(marked | gone)
    delta.tar_bytes = estimate((path, nodes[path]) for path in emit) + 512 * len(gone)
    return delta


def unsure_below(delta: Delta, deltas: list[LayerIndex]) -> set[bytes]:
    """The paths where the tree `delta` was diffed to may differ from the stack without
    its `deltas` (its base): where it differed from the whole stack, or where a delta
    holds an entry (every other path of the stack is the base's node itself, or hidden by
    a delta and then absent from the stack, so unsure already)."""
    return set(delta.unsure).union(*(index.nodes.keys() for index in deltas))


def _same(before: Node, node: Node, path: bytes, new: Scan, checksum: bool,
          epoch: int | None) -> bool:
    if not before.same_entry(node):
        return False
    if node.kind != FILE:
        return True
    if checksum or (not before.mtime_ns and (
            (epoch is not None and before.mtime >= epoch) or node.mtime_ns % 1_000_000_000)):
        # compare contents: asked to, or the index (rebuilt from the layer: whole seconds)
        # cannot tell, because the time was clamped or the file's has a fraction of a
        # second that the layer does not keep
        if not before.digest:
            return False
        digest = file_digest(new.path(path))
        new.nodes[path] = node._replace(digest=digest)
        return digest == before.digest
    return not before.mtime_ns or before.mtime_ns == node.mtime_ns


def _whole_groups(old: dict[bytes, Node], new: Scan, marked: set[bytes],
                  left: set[bytes]) -> None:
    """Mark every name of a hard-link group one of whose names is marked, or whose
    membership changed. Every change of membership marks a name or removes one: a name
    that joined a group, moved to another or left one for no group fails the quick check
    (its group is part of it), and a removed name's old group is in `left`. So the groups
    to take whole are those of the marked names, before and now, and `left`: no count of
    the old groups' names (a pass over the whole union, 10-20 ms of each diff)."""
    nodes = new.nodes
    changed = set(left)
    for path in marked:
        if group := nodes[path].group:
            changed.add(group)
        before = old.get(path)
        if before is not None and before.group:
            changed.add(before.group)
    groups = new.groups
    for group in changed:
        if names := groups.get(group):
            marked.update(names)
