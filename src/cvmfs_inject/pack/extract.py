"""Safe extraction of the injected layer's mount-point content into a directory.

A layer is untrusted input. Only members under the mount point are written, with the
mount-point prefix removed; absolute names, `..` components, device nodes and any write
through or onto a symlink are refused, and hard links may only point at regular files
already extracted inside the target. Permissions (without setuid, setgid and sticky bits)
and mtimes are restored, directories last.

This module is the reading half: it parses the stream (`pack.tarstream`), decides what it
can from names alone (the prefix, `..`, depth, whiteout names, special files, a hard
link's source) and hands each member over as an operation to `pack.writes`, which does
what depends on the disk, in stream order. The writes run in a forked child when that is
safe (`pack.offload`): on a tree of a million entries the Python of the reading and the
system calls of the writing are about even, and each gets a core.

Fast also because every member costs little Python: names stay bytes, a name right below
the last checked parent needs no normalisation, and file data goes over as the stream's
own buffers.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from cvmfs_inject.errors import InputError
from cvmfs_inject.layout.blobs import READ_CHUNK
from cvmfs_inject.pack import libc, tarstream, writes
from cvmfs_inject.pack.forking import fork_is_safe, usable_cpus
from cvmfs_inject.pack.inflate import decompressed
from cvmfs_inject.pack.offload import Applier
from cvmfs_inject.pack.tarstream import REGULAR, Member, TarStream, show_name
from cvmfs_inject.pack.whiteouts import OPAQUE, hides_mount_point
from cvmfs_inject.pack.writes import MAX_DEPTH, Writes

# rwx for owner, group and others: setuid, setgid and sticky bits are dropped. CernVM-FS is
# mounted nosuid, and a root-owned setuid file unpacked into a work directory would be a
# privilege escalation.
PERMISSIONS = 0o777
# operations handed over at a time: at most this many, or this many bytes of file data
BATCH, BATCH_BYTES = 4096, 1 << 20
_ODD_COMPONENTS = (b"", b".", b"..")
# Every this many bytes of file data, freed memory goes back to the system: the stream's
# 1 MiB chunks come from the heap once glibc's mmap threshold has risen past them, and the
# heap kept what big files left (67 MiB peak on a 2 GB tree, 39 MiB with the threshold
# fixed, which made unpack 30 % slower).
TRIM_BYTES = 16 << 20


_MALLOC_TRIM = libc.function("malloc_trim")

__all__ = ["PERMISSIONS", "ExtractResult", "decompressed", "extract"]  # decompressed: tests


@dataclass
class ExtractResult:
    entries: int = 0
    skipped: list[str] = field(default_factory=list)
    has_root: bool = False  # the layer has an entry for the mount point itself


def relative(name: bytes, prefix: bytes, member: bytes) -> bytes:
    """The member's path below the mount point, normalised; refused if it leaves it."""
    rel = name[len(prefix):]
    if (rel.startswith((b"/", b"./", b"../")) or b"//" in rel or b"/./" in rel
            or b"/../" in rel or rel.endswith((b"/.", b"/..")) or rel in (b".", b"..")):
        rel = posixpath.normpath(rel)
        if rel.startswith((b"/", b"../")) or rel in (b"..", b"."):
            raise InputError(f"layer member {show_name(member)} escapes the target directory")
    return rel


class _Reading:
    """The reading half of an extraction: members checked by their names alone (what is on
    disk is `pack.writes`' business), turned into operations, handed over in batches."""

    def __init__(self, stream: TarStream, prefix: bytes, applier: Applier,
                 warn: Callable[[str], None] | None, whiteouts: bool) -> None:
        self.stream, self.prefix, self.applier = stream, prefix, applier
        self.warn, self.whiteouts = warn, whiteouts
        self.result = ExtractResult()
        self.operations: list[tuple[Any, ...]] = []
        self.data_bytes = self.since_trim = 0

    def skip(self, name: bytes, why: str) -> None:
        shown = os.fsdecode(name)
        self.result.skipped.append(f"{shown}: {why}")
        if self.warn:
            self.warn(f"{shown}: skipped ({why})")

    def hand_over(self) -> None:
        """Send the operations so far (applied, or marshalled, before `send` returns: the
        list is emptied for the next batch)."""
        if self.operations:
            try:
                self.applier.send(self.operations)
            finally:  # sent, or failed where it failed: never sent again
                self.operations.clear()
        self.since_trim += self.data_bytes
        if self.since_trim >= TRIM_BYTES and _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)
            self.since_trim = 0
        self.data_bytes = 0

    def run(self) -> None:
        prefix, top, whiteouts = self.prefix, self.prefix.rstrip(b"/"), self.whiteouts
        add, skip = self.operations.append, len(prefix)
        # the parent of the last name `relative` checked: a name right below it whose last
        # component is neither empty, "." nor ".." needs no check (most names of a stream;
        # "/x" has the parent "" too, but a slash)
        checked: bytes | None = None
        directory, symlink, hardlink = tarstream.DIRECTORY, tarstream.SYMLINK, tarstream.HARDLINK
        for member in self.stream.members():
            name = member.name
            while name.startswith(b"./"):
                name = name[2:]
            name = name.rstrip(b"/")
            if name == top:
                if member.type != directory:  # its mode would become the target's
                    self.skip(member.name, "the mount point itself is not a directory in "
                                           "the layer")
                    continue
                add((writes.DIRECTORY, b"", member.mode & PERMISSIONS, int(member.mtime),
                     None))
                self.result.has_root = True
                continue
            if not name.startswith(prefix):
                if whiteouts and hides_mount_point(name, top):
                    add((writes.WHITEOUT, OPAQUE, member.name))
                continue
            rel = name[skip:]
            parent, slash, last = rel.rpartition(b"/")
            if parent != checked or (slash and not parent) or last in _ODD_COMPONENTS:
                rel = relative(name, prefix, member.name)
                checked = rel.rpartition(b"/")[0]
            if rel.count(b"/") >= MAX_DEPTH:
                raise InputError(f"layer member {show_name(member.name)} is more than {MAX_DEPTH} "
                                 "directories deep")
            if b".wh." in rel and posixpath.basename(rel).startswith(b".wh."):
                if whiteouts:
                    add((writes.WHITEOUT, rel, member.name))
                else:
                    self.skip(member.name, "whiteout entries are not extracted")
                continue
            kind = member.type
            if kind in REGULAR:
                self.file(rel, member)
            elif kind == directory:
                shown = None if member.name == prefix + rel + b"/" else member.name
                add((writes.DIRECTORY, rel, member.mode & PERMISSIONS, int(member.mtime),
                     shown))
            elif kind == symlink:
                add((writes.SYMLINK, rel, member.linkname, member.mtime,
                     None if member.name == prefix + rel else member.name))
            elif kind == hardlink:
                add(self.hardlink(rel, member))
            else:
                self.skip(member.name, "device nodes, fifos and other special files are "
                                       "refused")
                continue
            self.result.entries += 1
            if len(self.operations) >= BATCH or self.data_bytes >= BATCH_BYTES:
                self.hand_over()
        self.hand_over()

    def file(self, rel: bytes, member: Member) -> None:
        """A file's data goes with it when it is small; a big one's in pieces, each handed
        over as it comes (memory stays bounded whatever the file's size)."""
        shown = None if member.name == self.prefix + rel else member.name
        mode, mtime = member.mode & PERMISSIONS, member.mtime
        if member.size <= BATCH_BYTES:
            try:
                pieces = list(self.stream.data())
            except InputError:  # cut off: the member's own refusal, if any, comes first
                self.operations.append((writes.FILE_START, rel, mode, mtime, shown, b""))
                raise
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            self.operations.append((writes.FILE, rel, mode, mtime, shown, data))
            self.data_bytes += len(data)
            return
        first = True
        pieces = self.stream.data()
        while True:
            try:
                piece = next(pieces)
            except StopIteration:
                break
            except InputError:  # cut off: the member's own refusal, if any, comes first
                if first:
                    self.operations.append((writes.FILE_START, rel, mode, mtime, shown, b""))
                raise
            if first:
                self.operations.append((writes.FILE_START, rel, mode, mtime, shown, piece))
                first = False
            else:
                self.operations.append((writes.DATA, piece))
            self.data_bytes += len(piece)
            if self.data_bytes >= BATCH_BYTES:
                self.hand_over()
        self.operations.append((writes.FILE_END, mtime))

    def hardlink(self, rel: bytes, member: Member) -> tuple[Any, ...]:
        """A hard link whose source is refused by its name alone still goes over, with the
        refusal as its source's message: its own parent is checked first, as it would be
        in one process."""
        shown = None if member.name == self.prefix + rel else member.name
        link = member.linkname
        while link.startswith(b"./"):
            link = link[2:]
        if not link.startswith(self.prefix):
            return (writes.HARDLINK, rel, None,
                    f"hard link {show_name(member.name)} points outside "
                    f"{os.fsdecode(self.prefix.rstrip(b'/'))}: {show_name(member.linkname)}",
                    shown)
        try:
            source = relative(link, self.prefix, member.name)
        except InputError as exc:
            return (writes.HARDLINK, rel, None, str(exc), shown)
        return (writes.HARDLINK, rel, source, member.linkname, shown)


def writes_apart() -> bool:
    """Whether the writes run in a forked child (`pack.offload`): forking is safe, and
    there is a CPU for each half."""
    return fork_is_safe() and usable_cpus() > 1


def extract(fileobj: IO[bytes], target_dir: str, mount_point: str,
            warn: Callable[[str], None] | None = None, *, whiteouts: bool = False
            ) -> ExtractResult:
    """Write the members under `mount_point` from the tar stream `fileobj` into target_dir
    (which must exist; the directories in it are this extraction's own, or a lower
    layer's: with `whiteouts`, the layer's whiteouts remove what they hide).

    The file system's half runs in a forked child when that is safe (`pack.offload`):
    the stream's threads (`pack.inflate`) start at its first read, after the fork."""
    prefix = os.fsencode(mount_point.strip("/")) + b"/"
    root = os.open(target_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    umask = os.umask(0)  # files get their mode at creation: no chmod a file
    try:
        try:
            with Applier(Writes(root, prefix, 0o755 & ~umask, whiteouts),
                         writes_apart()) as applier:
                reading = _Reading(TarStream(fileobj.read, READ_CHUNK), prefix, applier, warn,
                                   whiteouts)
                try:
                    reading.run()
                    # Read past the end-of-archive marker to the end of the stream: only
                    # there are the gzip CRC and length, the zstd checksum and the blob's
                    # digest checked. Stored (incompressible) blocks can be corrupt in a
                    # valid tar.
                    reading.stream.drain()
                except Exception:
                    reading.hand_over()  # an earlier member's error comes first
                    applier.settle()
                    raise
                applier.finish()
        except OSError as exc:
            raise InputError(f"cannot extract layer: {exc}") from None
        return reading.result
    finally:
        os.umask(umask)
        os.close(root)
