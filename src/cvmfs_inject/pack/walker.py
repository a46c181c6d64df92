"""The walk: a directory tree in tar order, as (header, file to copy, size) entries.

Depth first with names sorted (code-point order is UTF-8 byte order, so the stream is the
same on every host), one lstat per entry, an explicit stack in one loop (no generator per
directory): per-entry Python work is what bounds the packer's speed on shrinkwrap trees.
"""

from __future__ import annotations

import fnmatch
import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from cvmfs_inject.errors import InputError, UsageError
from cvmfs_inject.pack.headers import TYPE_DIR, TYPE_FILE, TYPE_HARDLINK, TYPE_SYMLINK, TarHeaders
from cvmfs_inject.pack.options import STAGING_PREFIX, PackOptions

# (header bytes, path of the content to copy or None, content size), in tar order
Entry = tuple[bytes, str | None, int]


class Excluder:
    """gitignore-like patterns: no '/' → match any basename; with '/' → anchored at DIR;
    a trailing '/' → directories only. fnmatch wildcards (`*`, `?`, `[...]`)."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self._rules: list[tuple[str, bool, bool]] = []
        for raw in patterns:
            if not raw or raw.strip("/") == "":
                raise UsageError(f"--exclude {raw!r} is empty")
            dir_only = raw.endswith("/")
            pattern = raw.rstrip("/")
            anchored = "/" in pattern
            self._rules.append((pattern.lstrip("/"), anchored, dir_only))

    def __bool__(self) -> bool:
        return bool(self._rules)

    def excluded(self, rel: str, is_dir: bool) -> bool:
        parts = rel.split("/")
        for pattern, anchored, dir_only in self._rules:
            if dir_only and not is_dir:
                continue
            if anchored:
                # gitignore: wildcards never match '/', so compare component by component
                pattern_parts = pattern.split("/")
                if len(pattern_parts) == len(parts) and all(
                        fnmatch.fnmatchcase(part, pat) for part, pat in zip(parts, pattern_parts,
                                                                            strict=True)):
                    return True
            elif fnmatch.fnmatchcase(parts[-1], pattern):
                return True
        return False


class TreeWalker:
    """Walks a tree (`stats_of`) and makes the packer's entries of it (`entries_from`),
    counting what it emitted."""

    def __init__(self, options: PackOptions, headers: TarHeaders,
                 note: Callable[[str], None]) -> None:
        self.options = options
        self.headers = headers
        self.note = note
        self.entries = self.hardlinks = 0
        self.newest = 0  # the latest mtime packed (as clamped)

    def record_of(self) -> Callable[[str, str, int, bytes, os.stat_result], tuple[Any, ...]]:
        """What `entries_from` needs of an entry, made where it was walked (`pack.fanout`):
        (tar name, path, tar type, permissions, uid, gid, size, packed mtime, inode key of
        a multiply-linked file else 0, link target). A closure: it runs once an entry."""
        keep_owner, clamp = self.options.keep_owner, self.options.clamp
        s_isreg, s_isdir, s_imode = stat.S_ISREG, stat.S_ISDIR, stat.S_IMODE
        readlink, fsencode = os.readlink, os.fsencode

        def record(path: str, name: str, fd: int, tar_name: bytes, st: os.stat_result
                   ) -> tuple[Any, ...]:
            mode = st.st_mode
            uid, gid = (st.st_uid, st.st_gid) if keep_owner else (0, 0)
            if s_isreg(mode):
                return (tar_name, path, TYPE_FILE, s_imode(mode), uid, gid, st.st_size,
                        clamp(st.st_mtime), st.st_dev << 64 | st.st_ino if st.st_nlink > 1
                        else 0, b"")
            if s_isdir(mode):
                return (tar_name, path, TYPE_DIR, s_imode(mode), uid, gid, 0,
                        clamp(st.st_mtime), 0, b"")
            return (tar_name, path, TYPE_SYMLINK, s_imode(mode), uid, gid, 0,
                    clamp(st.st_mtime), 0, fsencode(readlink(name, dir_fd=fd)))

        return record

    def entries_from(self, records: Iterable[tuple[Any, ...]]) -> Iterator[Entry]:
        """(header bytes, path of the content to copy or None, content size) in tar order,
        from the walk's records (`record_of`); the later names of an inode become hard links
        to its first, so this runs in walk order, in one process."""
        headers, first_names = self.headers, FirstNames()
        entries = hardlinks = 0
        newest = self.newest
        try:
            for tar_name, path, kind, perms, uid, gid, size, mtime, inode, target in records:
                entries += 1
                if mtime > newest:
                    newest = mtime
                if kind == TYPE_FILE:
                    if inode:
                        first = first_names.get_or_add(inode, tar_name)
                        if first is not None:
                            hardlinks += 1
                            yield (headers(tar_name, perms, uid, gid, 0, mtime, TYPE_HARDLINK,
                                           first), None, 0)
                            continue
                    yield headers(tar_name, perms, uid, gid, size, mtime, TYPE_FILE), path, size
                elif kind == TYPE_DIR:
                    yield headers(tar_name + b"/", perms, uid, gid, 0, mtime, TYPE_DIR), None, 0
                else:
                    yield (headers(tar_name, perms, uid, gid, 0, mtime, TYPE_SYMLINK, target),
                           None, 0)
        finally:
            self.entries += entries
            self.hardlinks += hardlinks
            self.newest = newest

    def stats_of(self, root: str, mount: bytes, start: str = "", depth: int = 0
                 ) -> Iterator[tuple[str, str, int, bytes, os.stat_result]]:
        """(path, name, descriptor of its directory, tar name, lstat) of every entry to pack
        (regular files, directories, symlinks), in tar order: the one place that decides
        what a tree holds, for the packer and for `stack.scan` alike. A directory's
        children follow it; its descriptor stays open while they are yielded.

        `start`: walk only what is below this directory of the tree (a relative path,
        entered one name at a time, never through a symlink). `depth` (0: no limit): a
        directory that many levels below `start` is yielded but not entered. `pack.fanout`
        splits a walk into such pieces. The starting directory is opened and listed by
        this call, as one walk lists a directory before it yields its entry: a failure
        there comes before the caller gives out the directory's own entry."""
        excluder = Excluder(self.options.excludes)
        encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
        fd = _opened(root, root, None)
        directory, prefix, rel_prefix = root + "/", mount + b"/", ""
        for part in start.split("/") if start else ():
            try:
                child = _opened(directory + part, part, fd)
            finally:
                os.close(fd)
            fd = child
            directory, rel_prefix = directory + part + "/", rel_prefix + part + "/"
            prefix += part.encode(encoding, errors) + b"/"
        try:
            names = iter(_listing(fd, directory[:-1] if start else root))
        except BaseException:
            os.close(fd)
            raise
        return self._stats([(directory, fd, prefix, rel_prefix, names)], depth,
                           excluder.excluded if excluder else None)

    def _stats(self, stack: list[tuple[str, int, bytes, str, Iterator[str]]], depth: int,
               excluded: Callable[[str, bool], bool] | None
               ) -> Iterator[tuple[str, str, int, bytes, os.stat_result]]:
        note = self.note
        lstat = os.lstat
        encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
        s_isreg, s_isdir, s_islnk = stat.S_ISREG, stat.S_ISDIR, stat.S_ISLNK
        # each stack item: (directory path, its descriptor, its tar name prefix, its path
        # below the tree, iterator over its sorted names). Entries are looked up relative
        # to their directory's descriptor: the kernel resolves one name, not the whole path
        # (on a million-entry tree of deep paths that halved the time of each lstat).
        # The names of one directory are taken in an inner loop, left for a subdirectory
        # and resumed after it: per-entry Python work is what bounds the walk.
        try:
            while stack:
                directory, fd, prefix, rel_prefix, names = stack[-1]
                for name in names:
                    try:
                        st = lstat(name, dir_fd=fd)
                    except OSError as exc:
                        raise InputError(f"{directory}{name}: cannot stat: {exc.strerror}"
                                         ) from None
                    mode = st.st_mode
                    if excluded and excluded(rel_prefix + name, s_isdir(mode)):
                        continue
                    if name.startswith(".wh."):
                        note(f"{directory}{name}: skipped (a '.wh.' name is a layer whiteout; "
                             "it would delete files of the base image)")
                        continue
                    if not rel_prefix and name.startswith(STAGING_PREFIX):
                        note(f"{directory}{name}: skipped (left by an interrupted unpack)")
                        continue
                    tar_name = prefix + name.encode(encoding, errors)
                    if s_isdir(mode):
                        path = directory + name
                        if depth and len(stack) >= depth:  # yielded, not entered
                            yield path, name, fd, tar_name, st
                            continue
                        child = _opened(path, name, fd)
                        stack.append((path + "/", child, tar_name + b"/",
                                      rel_prefix + name + "/", iter(_listing(child, path))))
                        yield path, name, fd, tar_name, st
                        break
                    if not (s_isreg(mode) or s_islnk(mode)):
                        note(f"{directory}{name}: skipped (sockets, fifos and device nodes "
                             "are not packed)")
                        continue
                    yield directory + name, name, fd, tar_name, st
                else:
                    stack.pop()
                    os.close(fd)
        finally:
            for item in stack:
                os.close(item[1])

class FirstNames:
    """The first tar name of every multiply-linked inode: what later links point to.

    It grows with the number of hard-linked files (the other part of the packer's memory
    that grows is the name lists of the directories being walked), so it is kept compact:
    an int key and an int value per inode, the names packed in one bytearray.
    A dict of (dev, ino) tuples to bytes took about 300 bytes an inode; this takes about
    110 plus the name (34,000 hard-linked inodes: 10 MiB before, 5 MiB now).
    """

    def __init__(self) -> None:
        self._where: dict[int, int] = {}  # dev << 64 | ino -> offset << 32 | length
        self._names = bytearray()

    def get_or_add(self, key: int, name: bytes) -> bytes | None:
        """The first name of the inode `key` (st_dev << 64 | st_ino), or None: `name` is
        its first, from now on."""
        where = self._where.get(key)
        if where is not None:
            offset, length = where >> 32, where & 0xFFFFFFFF
            return bytes(self._names[offset:offset + length])
        self._where[key] = len(self._names) << 32 | len(name)
        self._names += name
        return None


def _opened(path: str, name: str, parent: int | None) -> int:
    """A descriptor of a directory to walk, opened relative to its parent's (never through
    a symlink: the walk saw a directory there)."""
    try:
        if parent is None:
            return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=parent)
    except OSError as exc:
        raise InputError(f"{path}: cannot read directory: {exc.strerror}") from None


def _listing(fd: int, path: str) -> list[str]:
    """Directory entries sorted by name; code-point order equals UTF-8 byte order."""
    try:
        names = os.listdir(fd)
    except OSError as exc:
        raise InputError(f"{path}: cannot read directory: {exc.strerror}") from None
    names.sort()
    return names
