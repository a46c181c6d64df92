"""The directories an extraction knows to be real, and the mode and time each directory
member asks for, applied at the end, deepest first (`pack.extract`)."""

from __future__ import annotations

import os
import stat
from array import array
from collections.abc import Callable

from cvmfs_inject.errors import InputError
from cvmfs_inject.pack.forking import die_with_parent, fork_with_pipe, reap
from cvmfs_inject.pack.tarstream import show_name

_KNOWN_DIRECTORIES = 1 << 16  # the cache of made directories is cleared past this size
MADE_WITH_MODE = 0xFFFF  # a directory made with its final mode: only its time is left to set
_SUPERSEDED = 0xFFFE  # a later member of the same directory gives its mode and time (tar's rule)
SHARED_FROM = 20000  # directories from which a helper sets half of their times


class DirectoryTable:
    """The directories below the target that are known to be real (made by this
    extraction, or checked with lstat one component at a time), and the mode and time each
    directory member asks for, applied at the end, deepest first.

    The mode/time table is packed into arrays: a row holds the directory's name below its
    parent's row (or its whole path when the parent has no row in reach), so a million
    directories take about 30 bytes each. The known directories are a bounded cache of
    path -> row (-1: no row): forgetting one costs an lstat later, or a longer name in the
    table, never safety.
    """

    def __init__(self, root: int, implicit_mode: int) -> None:
        self.root = root
        self.implicit_mode = implicit_mode
        self.known: dict[bytes, int] = {b"": -1}
        self._names = bytearray()
        self._ends = array("Q")
        self._parents = array("q")
        self._modes = array("H")
        self._times = array("d")
        # per row, which process sets it when the work is shared (`apply`): by the hash of
        # its path, so the rows of a path given twice are set by one, in their order
        self._halves = bytearray()
        self._restricting = False  # a row's mode takes rights from the owner
        self._removed: list[tuple[bytes, int]] = []  # (directory, rows before it went)

    def parent_of(self, rel: bytes, member: bytes) -> None:
        """Make sure the parent of `rel` is a real directory inside the target, making the
        missing ones (mode 0755 less the umask, as tar does for directories it must add)."""
        parent = rel.rpartition(b"/")[0]
        if parent in self.known:
            return
        path = b""
        for part in parent.split(b"/"):
            path = path + b"/" + part if path else part
            if path in self.known:
                continue
            try:
                os.mkdir(path, self.implicit_mode, dir_fd=self.root)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(path, dir_fd=self.root).st_mode):
                    raise InputError(f"layer member {show_name(member)} would be written through a "
                                     "symlink or non-directory") from None
            self.remember(path)

    def remember(self, path: bytes, row: int = -1) -> None:
        if len(self.known) > _KNOWN_DIRECTORIES:
            self.known = {b"": -1}
        self.known[path] = row

    def attributes(self, rel: bytes, mode: int, mtime: float) -> None:
        """Record a directory's time (and its mode, unless `MADE_WITH_MODE`); it is known
        from now on. An earlier member of the same directory is superseded, as tar's last
        member wins (when the earlier one has left the bounded cache, the first wins)."""
        earlier = self.known.get(rel, -1)
        if earlier >= 0:
            self._modes[earlier] = _SUPERSEDED
        parent, _, name = rel.rpartition(b"/")
        parent_row = self.known.get(parent, -1) if rel else -1
        self._names += name if parent_row >= 0 else rel
        self._ends.append(len(self._names))
        self._parents.append(parent_row)
        self._modes.append(mode)
        self._times.append(mtime)
        self._halves.append(hash(rel) & 1)
        if mode != MADE_WITH_MODE and mode & 0o700 != 0o700:
            self._restricting = True
        self.remember(rel, len(self._modes) - 1)

    def _path(self, row: int, paths: dict[int, bytes]) -> bytes:
        """A row's path: its name below its ancestors' (the nearest found in `paths`)."""
        names, ends, parents = self._names, self._ends, self._parents
        chain = []
        while row >= 0 and row not in paths:
            chain.append(row)
            row = parents[row]
        path = paths[row] if row >= 0 else None
        for row in reversed(chain):
            name = bytes(names[ends[row - 1] if row else 0:ends[row]])
            path = name if path is None else (path + b"/" + name if path else name)
            paths[row] = path
        assert path is not None
        return path

    def removed(self, path: bytes) -> None:
        """A whiteout removed the directory `path`: the rows recorded so far for it and
        below it are void (their paths may now lead through a symlink made later)."""
        self._removed.append((path, len(self._modes)))
        self.known = {b"": -1}

    def _void(self, row: int, path: bytes) -> bool:
        return any(row < before and (path == gone or path.startswith(gone + b"/"))
                   for gone, before in self._removed)

    def apply(self, share: bool = False) -> None:
        """Every directory's mode and time, deepest first (tar's delayed attributes).

        With `share` (this process has no other thread), a forked helper sets the rows of
        one half (`_halves`) meanwhile: on a million directories this is a 2 s tail that
        nothing else overlaps. Not when a mode takes rights from a directory's owner: the
        other process could be locked out below it, so the order of one process holds."""
        rows = len(self._modes)
        if not share or rows < SHARED_FROM or self._restricting:
            self._set(None)
            return
        try:
            helper = _fork(lambda: self._set(0))
        except OSError:  # no process left to fork: all of it here
            self._set(None)
            return
        try:
            self._set(1)
        finally:
            problem = _reap(helper)
        if problem:
            raise OSError(problem)

    def _set(self, half: int | None) -> None:
        """The rows of `half` (None: all), last row first."""
        modes, times, halves, root = self._modes, self._times, self._halves, self.root
        paths: dict[int, bytes] = {}
        for i in range(len(modes) - 1, -1, -1):
            mode = modes[i]
            if mode == _SUPERSEDED or (half is not None and halves[i] != half):
                continue
            if len(paths) > _KNOWN_DIRECTORIES:
                paths = {}
            path = self._path(i, paths)
            if self._removed and self._void(i, path):
                continue
            rel = path or b"."
            if mode != MADE_WITH_MODE:
                os.chmod(rel, mode, dir_fd=root)
            os.utime(rel, (times[i], times[i]), dir_fd=root)


def _fork(work: Callable[[], None]) -> tuple[int, int]:
    """(pid, pipe) of a child doing `work`; it writes what went wrong into the pipe."""
    parent = os.getpid()
    pid, pipe = fork_with_pipe()
    if pid == 0:
        code = 0
        try:
            die_with_parent(parent)
            work()
        except BaseException as exc:  # said through the pipe, never unwound into the caller
            code = 1
            os.write(pipe, str(exc).encode()[:4096] or b"failed")
        os._exit(code)
    return pid, pipe


def _reap(helper: tuple[int, int]) -> str:
    """What went wrong in a helper of `_fork` ("" when nothing did)."""
    pid, reader = helper
    try:
        said = os.read(reader, 4096)
    finally:
        os.close(reader)
    status = reap(pid)
    if status and not said:
        return f"a process setting directory times ended with wait status {status}"
    return said.decode(errors="replace")
