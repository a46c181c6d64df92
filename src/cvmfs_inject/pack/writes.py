"""The file-system half of an extraction: operations in stream order, applied under the
target's descriptor.

`pack.extract` reads the tar stream and decides, from names alone, what each member asks
for; what depends on what is already on disk happens here: a member's parent is checked
(or made), an existing entry is replaced by tar's rules, a hard link's source must be a
regular file this extraction made (or one checked with lstat), whiteouts remove what lower
layers put where they say, and directories get their modes and times at the end, deepest
first. Everything that is checked on disk is checked in the order the stream gives it, so
the operations can be applied in another process (`pack.offload`) without a check racing
a write.

An operation is a tuple whose first item says what it is (the constants below): what
crosses a pipe is marshalled, so there are no objects, only bytes and numbers. A member's
name in messages is `prefix + rel` (a directory's with its slash), unless the operation
carries the name as the stream gave it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from typing import Any

from cvmfs_inject.errors import InputError
from cvmfs_inject.pack.directories import MADE_WITH_MODE, DirectoryTable
from cvmfs_inject.pack.tarstream import show_name
from cvmfs_inject.pack.whiteouts import OPAQUE, children, hidden_paths, remove

# (DIRECTORY, rel, mode, mtime, name): a directory member (rel b"" is the mount point's
# mode and time); (FILE, rel, mode, mtime, name, data): a whole file; (FILE_START, ...) the
# same with the first piece of a file whose data comes in (DATA, piece) operations and ends
# with (FILE_END, mtime); (SYMLINK, rel, target, mtime, name); (HARDLINK, rel, source,
# source as the stream names it, name), or with source None and the message refusing it;
# (WHITEOUT, rel, name): rel is OPAQUE for the mount point's opaque whiteout. `name` is
# None where it is `prefix + rel` (see `Writes._shown`).
DIRECTORY, FILE, FILE_START, DATA, FILE_END, SYMLINK, HARDLINK, WHITEOUT = range(8)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Deeper trees are refused: nothing real is, and removing one (a failed unpack cleans up)
# would exceed Python's recursion limit in shutil.rmtree.
MAX_DEPTH = 512


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


class Writes:
    """Applies extraction operations under the descriptor `root` (see the module's
    docstring). `apply` takes them in batches; `finish` gives the directories their modes
    and times once the stream has been read and checked."""

    def __init__(self, root: int, prefix: bytes, implicit_mode: int, whiteouts: bool) -> None:
        self.root, self.prefix, self.whiteouts = root, prefix, whiteouts
        self.directories = DirectoryTable(root, implicit_mode)
        # hashes of the names of the regular files made so far (Python's bytes hash is
        # keyed per process): a hard link to one of them needs no lstat to be safe
        self.regular: set[int] = set()
        # with whiteouts: hashes of every name this layer made. A whiteout hides only what
        # the layers below put there (the OCI changeset rules, as containerd applies them),
        # never what its own layer made before it in the stream.
        self.made: set[int] = set()
        self._fd = -1  # the file whose data comes in pieces
        # a lower layer's mode for the mount point may be 0555: writable meanwhile
        self._lower = os.fstat(root) if whiteouts else None
        self._has_root = False
        if self._lower is not None:
            os.chmod(root, 0o700)

    def apply(self, operations: Iterable[tuple[Any, ...]]) -> None:
        directories, mark = self.directories, self.whiteouts
        for op in operations:
            kind = op[0]
            if kind == DATA:
                piece = op[1]
                while piece:
                    piece = piece[os.write(self._fd, piece):]
                continue
            if kind == FILE_END:
                self._close(op[1])
                continue
            rel = op[1]
            if kind == WHITEOUT:
                self.whiteout(rel, op[2])
                continue
            if rel:
                if rel.rpartition(b"/")[0] not in directories.known:  # the usual case first
                    directories.parent_of(rel, op[4] or self._shown(kind, rel))
            elif kind == DIRECTORY:
                directories.attributes(b"", op[2], op[3])
                self._has_root = True
                continue
            if kind in (FILE, FILE_START):
                self.file(op)
            elif kind == DIRECTORY:
                self.directory(rel, op[2], op[3])
            elif kind == SYMLINK:
                self.symlink(op)
            else:
                self.hardlink(op)
            if mark:
                self.mark_made(rel)

    def _shown(self, kind: int, rel: bytes) -> bytes:
        """A member's name as the stream gave it, when the operation does not carry it."""
        return self.prefix + rel + b"/" if kind == DIRECTORY else self.prefix + rel

    def finish(self, share: bool = False) -> None:
        """The directories' modes and times, deepest first (`share`: with a forked helper,
        see `DirectoryTable.apply`); the mount point's as a lower layer left it, unless
        this layer names it."""
        self.directories.apply(share)
        lower = self._lower
        if lower is not None and not self._has_root:
            os.chmod(self.root, stat.S_IMODE(lower.st_mode))
            os.utime(self.root, ns=(lower.st_atime_ns, lower.st_mtime_ns))

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

    def file(self, op: tuple[Any, ...]) -> None:
        _, rel, mode, mtime, name, data = op
        root = self.root
        try:
            fd = os.open(rel, _CREATE, mode, dir_fd=root)
        except FileExistsError:
            fds: list[int] = []
            _replace(lambda: fds.append(os.open(rel, _CREATE, mode, dir_fd=root)), rel, root,
                     name or self.prefix + rel, self.drop_lower_directory)
            fd = fds[0]
        self.regular.add(hash(rel))
        self._fd = fd
        while data:
            data = data[os.write(fd, data):]
        if op[0] == FILE:
            self._close(mtime)

    def _close(self, mtime: float) -> None:
        fd, self._fd = self._fd, -1
        try:
            os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the file left open by a stream that ended (or failed) inside it."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def directory(self, rel: bytes, mode: int, mtime: float) -> None:
        """Made with its final mode when its owner may write and enter it (the umask is 0);
        else 0700 until the end, so that what the layer puts in it can be made."""
        root = self.root
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
        self.directories.attributes(rel, MADE_WITH_MODE if final else mode, mtime)

    def symlink(self, op: tuple[Any, ...]) -> None:
        _, rel, target, mtime, name = op
        root = self.root
        self.regular.discard(hash(rel))
        _replace(lambda: os.symlink(target, rel, dir_fd=root), rel, root,
                 name or self.prefix + rel, self.drop_lower_directory)
        os.utime(rel, (mtime, mtime), dir_fd=root, follow_symlinks=False)

    def hardlink(self, op: tuple[Any, ...]) -> None:
        _, rel, source, shown_source, name = op
        root, member = self.root, name or self.prefix + rel
        if source is None:  # refused by its name (`pack.extract`), once its parent is fine
            raise InputError(shown_source)
        if hash(source) not in self.regular:  # not a file this extraction made: say why
            try:
                self.directories.parent_of(source, member)
                st = os.lstat(source, dir_fd=root)
            except FileNotFoundError:
                raise InputError(f"hard link {show_name(member)} points at "
                                 f"{show_name(shown_source)}, which is not in the layer "
                                 "before it") from None
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"hard link {show_name(member)} points at a non-regular "
                                 "file")
        try:
            os.link(source, rel, src_dir_fd=root, dst_dir_fd=root, follow_symlinks=False)
        except FileExistsError:
            _replace(lambda: os.link(source, rel, src_dir_fd=root, dst_dir_fd=root,
                                     follow_symlinks=False), rel, root, member,
                     self.drop_lower_directory)


__all__ = ["DATA", "DIRECTORY", "FILE", "FILE_END", "FILE_START", "HARDLINK", "MAX_DEPTH",
           "OPAQUE", "SYMLINK", "WHITEOUT", "Writes"]
