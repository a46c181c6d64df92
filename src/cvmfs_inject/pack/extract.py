"""Safe extraction of the injected layer's mount-point content into a directory.

A layer is untrusted input. Only members under the mount point are written, with the
mount-point prefix removed; absolute names, `..` components, device nodes and any write
through or onto a symlink are refused, and hard links may only point at regular files
already extracted inside the target. Permissions (without setuid, setgid and sticky bits)
and mtimes are restored, directories last.

Fast because every member costs few system calls and little Python: names stay bytes,
every path is opened relative to one descriptor of the target (the kernel resolves it; we
never re-check a path component by component), and a path's parent is checked only when
it is not a directory this extraction made (`pack.directories`): a directory it made is never
replaced by a symlink, so the kernel cannot be led outside through it. Files are created
with their final mode (the umask is 0 meanwhile), written from the stream's own buffers,
stamped with `futimens` and closed.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from cvmfs_inject.errors import InputError
from cvmfs_inject.layout.blobs import READ_CHUNK
from cvmfs_inject.pack.directories import MADE_WITH_MODE, DirectoryTable
from cvmfs_inject.pack.inflate import decompressed
from cvmfs_inject.pack.tarstream import (
    DIRECTORY,
    HARDLINK,
    REGULAR,
    SYMLINK,
    Member,
    TarStream,
    show_name,
)
from cvmfs_inject.pack.whiteouts import OPAQUE, children, hidden_paths, hides_mount_point, remove

# rwx for owner, group and others: setuid, setgid and sticky bits are dropped. CernVM-FS is
# mounted nosuid, and a root-owned setuid file unpacked into a work directory would be a
# privilege escalation.
PERMISSIONS = 0o777
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Deeper trees are refused: nothing real is, and removing one (a failed unpack cleans up)
# would exceed Python's recursion limit in shutil.rmtree.
MAX_DEPTH = 512

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


def _replace(make: Callable[[], object], rel: bytes, root: int, member: bytes,
             drop_directory: Callable[[bytes], bool] | None = None) -> None:
    """Tar semantics: a later member replaces an earlier one, never following a symlink;
    an existing directory is not replaced, unless `drop_directory` removes it (True)."""
    try:
        make()
    except FileExistsError:
        if stat.S_ISDIR(os.lstat(rel, dir_fd=root).st_mode):
            if drop_directory is None or not drop_directory(rel):
                raise InputError(f"cannot extract layer: layer member {show_name(member)} would "
                                 "replace a directory") from None
        else:
            os.unlink(rel, dir_fd=root)
        make()


class _Extraction:
    def __init__(self, stream: TarStream, root: int, prefix: bytes, umask: int,
                 warn: Callable[[str], None] | None, whiteouts: bool) -> None:
        self.stream, self.root, self.prefix = stream, root, prefix
        self.whiteouts = whiteouts
        self.directories = DirectoryTable(root, 0o755 & ~umask)
        # hashes of the names of the regular files made so far (Python's bytes hash is
        # keyed per process): a hard link to one of them needs no lstat to be safe
        self.regular: set[int] = set()
        # with whiteouts: hashes of every name this layer made. A whiteout hides only what
        # the layers below put there (the OCI changeset rules, as containerd applies them),
        # never what its own layer made before it in the stream.
        self.made: set[int] = set()
        self.result = ExtractResult()
        self.warn = warn

    def skip(self, name: bytes, why: str) -> None:
        shown = os.fsdecode(name)
        self.result.skipped.append(f"{shown}: {why}")
        if self.warn:
            self.warn(f"{shown}: skipped ({why})")

    def run(self) -> None:
        prefix, top = self.prefix, self.prefix.rstrip(b"/")
        directories = self.directories
        for member in self.stream.members():
            name = member.name
            while name.startswith(b"./"):
                name = name[2:]
            name = name.rstrip(b"/")
            if name == top:
                if member.type != DIRECTORY:  # its mode would become the target's
                    self.skip(member.name, "the mount point itself is not a directory in "
                                           "the layer")
                    continue
                directories.attributes(b"", member.mode & PERMISSIONS, int(member.mtime))
                self.result.has_root = True
                continue
            if not name.startswith(prefix):
                if self.whiteouts and hides_mount_point(name, top):
                    self.whiteout(OPAQUE, member.name)
                continue
            rel = relative(name, prefix, member.name)
            if rel.count(b"/") >= MAX_DEPTH:
                raise InputError(f"layer member {show_name(member.name)} is more than {MAX_DEPTH} "
                                 "directories deep")
            if b".wh." in rel and posixpath.basename(rel).startswith(b".wh."):
                if self.whiteouts:
                    self.whiteout(rel, member.name)
                else:
                    self.skip(member.name, "whiteout entries are not extracted")
                continue
            kind = member.type
            if kind not in REGULAR and kind not in (DIRECTORY, SYMLINK, HARDLINK):
                self.skip(member.name, "device nodes, fifos and other special files are "
                                       "refused")
                continue
            directories.parent_of(rel, member.name)
            if kind in REGULAR:
                self.file(rel, member)
            elif kind == DIRECTORY:
                self.directory(rel, member)
            elif kind == SYMLINK:
                self.symlink(rel, member)
            else:
                self.hardlink(rel, member)
            if self.whiteouts:
                self.mark_made(rel)
            self.result.entries += 1

    def whiteout(self, rel: bytes, member: bytes) -> None:
        """Hide what the layers below put where the whiteout says (`pack.whiteouts`)."""
        for path in hidden_paths(rel, member, self.root):
            self.hide(path, 0)

    def hide(self, path: bytes, depth: int) -> None:
        """Remove `path` unless this layer made it: a whiteout hides only lower layers'
        entries (OCI changeset rules). A directory this layer made stays with what this
        layer put in it, and loses what lower layers did, as the index's union has it.
        What this extraction recorded below a removed directory is void from then on."""
        if hash(path) not in self.made:
            removed = remove(path, self.root, MAX_DEPTH)
            if removed == "directory":
                self.directories.removed(path)
                self.regular.clear()  # names below it were made: a link must check again
            elif removed:
                self.regular.discard(hash(path))
            return
        if depth > MAX_DEPTH:
            raise InputError(f"cannot apply a whiteout to {show_name(path)}: more than "
                             f"{MAX_DEPTH} levels deep")
        # gone, a file, or a symlink this layer made: nothing below it to hide
        for child in children(path, self.root) or []:
            self.hide(child, depth + 1)

    def mark_made(self, rel: bytes) -> None:
        """`rel` and the directories on its way (made for it, or named by it) are this
        layer's: a path in `made` has all its ancestors there too."""
        made, path = self.made, rel
        while path and hash(path) not in made:
            made.add(hash(path))
            path = path.rpartition(b"/")[0]

    def drop_lower_directory(self, path: bytes) -> bool:
        """In a layer above others, a non-directory replaces a lower layer's directory
        whole (as overlay shows it, and the stack index's union has it); never one this
        layer made, and never in a single layer (tar keeps the directory: refused)."""
        if not self.whiteouts or hash(path) in self.made:
            return False
        remove(path, self.root, MAX_DEPTH)
        self.directories.removed(path)
        self.regular.clear()
        return True

    def file(self, rel: bytes, member: Member) -> None:
        root, mode = self.root, member.mode & PERMISSIONS
        try:
            fd = os.open(rel, _CREATE, mode, dir_fd=root)
        except FileExistsError:
            fds: list[int] = []
            _replace(lambda: fds.append(os.open(rel, _CREATE, mode, dir_fd=root)), rel, root,
                     member.name, self.drop_lower_directory)
            fd = fds[0]
        self.regular.add(hash(rel))
        try:
            for piece in self.stream.data():
                while piece:
                    piece = piece[os.write(fd, piece):]
            os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)

    def directory(self, rel: bytes, member: Member) -> None:
        """Made with its final mode when its owner may write and enter it (the umask is 0);
        else 0700 until the end, so that what the layer puts in it can be made."""
        root, mode = self.root, member.mode & PERMISSIONS
        final = mode & 0o700 == 0o700
        self.regular.discard(hash(rel))
        try:
            os.mkdir(rel, mode if final else 0o700, dir_fd=root)
        except FileExistsError:
            final = False  # an existing directory takes its mode at the end
            if not stat.S_ISDIR(os.lstat(rel, dir_fd=root).st_mode):
                os.unlink(rel, dir_fd=root)
                os.mkdir(rel, 0o700, dir_fd=root)
            else:  # a lower layer's, maybe read-only by now
                os.chmod(rel, 0o700, dir_fd=root)
        self.directories.attributes(rel, MADE_WITH_MODE if final else mode, int(member.mtime))

    def symlink(self, rel: bytes, member: Member) -> None:
        root = self.root
        self.regular.discard(hash(rel))
        _replace(lambda: os.symlink(member.linkname, rel, dir_fd=root), rel, root, member.name,
                 self.drop_lower_directory)
        os.utime(rel, (member.mtime, member.mtime), dir_fd=root, follow_symlinks=False)

    def hardlink(self, rel: bytes, member: Member) -> None:
        link = member.linkname
        while link.startswith(b"./"):
            link = link[2:]
        if not link.startswith(self.prefix):
            raise InputError(f"hard link {show_name(member.name)} points outside "
                             f"{os.fsdecode(self.prefix.rstrip(b'/'))}: "
                             f"{show_name(member.linkname)}")
        source = relative(link, self.prefix, member.name)
        root = self.root
        if hash(source) not in self.regular:  # not a file this extraction made: say why
            try:
                self.directories.parent_of(source, member.name)
                st = os.lstat(source, dir_fd=root)
            except FileNotFoundError:
                raise InputError(f"hard link {show_name(member.name)} points at "
                                 f"{show_name(member.linkname)}, which is not in the layer "
                                 "before it") from None
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"hard link {show_name(member.name)} points at a non-regular "
                                 "file")
        try:
            os.link(source, rel, src_dir_fd=root, dst_dir_fd=root, follow_symlinks=False)
        except FileExistsError:
            _replace(lambda: os.link(source, rel, src_dir_fd=root, dst_dir_fd=root,
                                     follow_symlinks=False), rel, root, member.name,
                     self.drop_lower_directory)


def extract(fileobj: IO[bytes], target_dir: str, mount_point: str,
            warn: Callable[[str], None] | None = None, *, whiteouts: bool = False
            ) -> ExtractResult:
    """Write the members under `mount_point` from the tar stream `fileobj` into target_dir
    (which must exist; the directories in it are this extraction's own, or a lower
    layer's: with `whiteouts`, the layer's whiteouts remove what they hide)."""
    prefix = os.fsencode(mount_point.strip("/")) + b"/"
    root = os.open(target_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    umask = os.umask(0)  # files get their mode at creation: no chmod a file
    try:
        stream = TarStream(fileobj.read, READ_CHUNK)
        extraction = _Extraction(stream, root, prefix, umask, warn, whiteouts)
        lower = os.fstat(root) if whiteouts else None
        try:
            if lower is not None:  # a lower layer's mode for the mount point may be 0555
                os.chmod(root, 0o700)
            extraction.run()
            # Read past the end-of-archive marker to the end of the stream: only there are
            # the gzip CRC and length, the zstd checksum and the blob's digest checked.
            # Content in stored (incompressible) blocks can be corrupt in a valid tar.
            stream.drain()
            extraction.directories.apply()
            if lower is not None and not extraction.result.has_root:
                os.chmod(root, stat.S_IMODE(lower.st_mode))
                os.utime(root, ns=(lower.st_atime_ns, lower.st_mtime_ns))
        except OSError as exc:
            raise InputError(f"cannot extract layer: {exc}") from None
        return extraction.result
    finally:
        os.umask(umask)
        os.close(root)
