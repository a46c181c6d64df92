"""Whiteouts of a layer applied to what the layers below it extracted: `.wh.NAME` removes
NAME, `.wh..wh..opq` empties its directory (the OCI image spec's changeset rules).

Nothing is done through a symlink: every component of the whiteout's directory is checked
with lstat, and a removed tree is opened one directory at a time without following. It
works for an unprivileged user too: each directory is made writable through its own
descriptor before it is emptied.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat

from cvmfs_inject.errors import InputError
from cvmfs_inject.pack.tarstream import show_name

WHITEOUT, OPAQUE = b".wh.", b".wh..wh..opq"


def hidden_paths(rel: bytes, member: bytes, root: int) -> list[bytes]:
    """The paths below `root` that the whiteout `rel` hides (none when its directory is
    missing); an invalid whiteout, or one whose directory is a symlink, is refused."""
    parent, _, name = rel.rpartition(b"/")
    hidden = name[len(WHITEOUT):]
    if hidden in (b"", b".", b".."):
        raise InputError(f"layer member {show_name(member)} is not a valid whiteout")
    if not _real_directory(parent, member, root):
        return []
    if hidden != OPAQUE[len(WHITEOUT):]:
        return [parent + b"/" + hidden if parent else hidden]
    return children(parent, root) or []


def hides_mount_point(name: bytes, top: bytes) -> bool:
    """Whether the member `name` (outside the mount point `top`, both without a leading
    "./" or a trailing "/") is a whiteout of the mount point or of a directory above it,
    or an opaque whiteout of such a directory: the layers below then lose all they put in
    the mount point, as a runtime applies them (after cleaning the name as it does)."""
    parent, _, base = posixpath.normpath(b"/" + name).lstrip(b"/").rpartition(b"/")
    if not base.startswith(WHITEOUT) or not (not parent or top.startswith(parent + b"/")):
        return False
    if base == OPAQUE:
        return True
    hidden = (parent + b"/" if parent else b"") + base[len(WHITEOUT):]
    return top == hidden or top.startswith(hidden + b"/")


def children(path: bytes, root: int) -> list[bytes] | None:
    """The paths of what the directory `path` below `root` holds, opened without following
    a symlink; None when there is no directory there (gone, a file, a symlink)."""
    try:
        fd = os.open(path or b".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=root)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise
    try:
        names = [os.fsencode(child) for child in os.listdir(fd)]
    finally:
        os.close(fd)
    return [path + b"/" + name if path else name for name in names]


def remove(path: bytes, root: int, max_depth: int) -> str | None:
    """Remove `path` below `root`: "directory" or "file" for what went, None if nothing
    was there."""
    try:
        st = os.lstat(path, dir_fd=root)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        _remove_tree(path, root, 0, max_depth)
        return "directory"
    os.unlink(path, dir_fd=root)
    return "file"


def _real_directory(path: bytes, member: bytes, root: int) -> bool:
    """Whether `path` is a directory (False: missing), checked a component at a time."""
    if not path:
        return True
    walked = b""
    for part in path.split(b"/"):
        walked = walked + b"/" + part if walked else part
        try:
            st = os.lstat(walked, dir_fd=root)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            raise InputError(f"layer member {show_name(member)} would act through a symlink "
                             "or non-directory")
    return True


def _remove_tree(name: bytes, parent: int, depth: int, max_depth: int) -> None:
    if depth > max_depth:
        raise InputError(f"cannot remove {show_name(name)}: more than {max_depth} levels deep")
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=parent)
    try:
        os.chmod(fd, 0o700)
        for child in os.listdir(fd):
            if stat.S_ISDIR(os.lstat(child, dir_fd=fd).st_mode):
                _remove_tree(os.fsencode(child), fd, depth + 1, max_depth)
            else:
                os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent)
