"""Waiting for a layout's locks, and saying for whom.

A layout has two locks, both `flock`s on files it has anyway (no lock file, so a failed or
killed command leaves no trace, and the kernel releases a lock with its holder):

- the *use* lock, on the layout directory: shared by every command that reads or writes
  the layout, so many writers pack and write blobs at the same time; exclusive for `gc`
  (it must not take a blob some writer has written but not yet tagged for garbage) and
  while a layout is being created;
- the *index* lock, on the `oci-layout` file: exclusive, held only while a writer
  re-reads `index.json`, applies its own tag change to what is there now and replaces it.

A command waits for a lock up to its timeout (`--lock-timeout`, default 10 minutes; 0
fails at once with exit 7, as before), and says once, on a terminal, that it waits and
for which process (read from /proc/locks: flock records no owner anywhere else).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cvmfs_inject.errors import InputError, LockedError

DEFAULT_LOCK_TIMEOUT = 600.0
_POLL_FIRST, _POLL_MAX = 0.02, 0.25  # seconds between tries, doubling up to the max


@dataclass(frozen=True)
class LockWait:
    """How long a command waits for a lock, and whom it tells that it waits."""

    timeout: float = DEFAULT_LOCK_TIMEOUT
    notify: Callable[[str], None] | None = None


@contextlib.contextmanager
def opened(path: Path, what: str) -> Iterator[int]:
    """An fd of `path` (a directory or a file) to lock; closing it releases the lock."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise InputError(f"{path}: cannot open {what}: {exc.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def flocked(path: Path, *, exclusive: bool, wait: LockWait, what: str) -> Iterator[int]:
    """Hold a flock on `path` for the block; yields the fd."""
    with opened(path, what) as fd:
        acquire(fd, exclusive=exclusive, wait=wait, path=path, what=what)
        yield fd


def acquire(fd: int, *, exclusive: bool, wait: LockWait, path: Path, what: str) -> None:
    """Take the lock on `fd`, waiting as `wait` says; LockedError when time is up."""
    if try_lock(fd, exclusive=exclusive):
        return
    if wait.timeout <= 0:
        raise LockedError(f"{path}: {what} is in use by {holders(path)}; try again when it "
                          "has finished, or give --lock-timeout SECONDS to wait")
    if wait.notify is not None:
        wait.notify(f"{path}: waiting for {holders(path)} to finish (up to "
                    f"{wait.timeout:g} s, --lock-timeout)")
    deadline = time.monotonic() + wait.timeout
    pause = _POLL_FIRST
    while not try_lock(fd, exclusive=exclusive):
        left = deadline - time.monotonic()
        if left <= 0:
            raise LockedError(f"{path}: {what} still in use after {wait.timeout:g} s, by "
                              f"{holders(path)}; try again later or raise --lock-timeout")
        time.sleep(min(pause, left))
        pause = min(pause * 2, _POLL_MAX)


def try_lock(fd: int, *, exclusive: bool) -> bool:
    """Take the lock if it is free now. Beware: on Linux a failed attempt to change the
    lock an fd holds (shared to exclusive) drops the lock it held."""
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    try:
        fcntl.flock(fd, mode)
    except BlockingIOError:
        return False
    return True


def holders(path: Path) -> str:
    """Who holds a flock on `path`, as a person reads it: "pid 123 (cvmfs-inject gc x)"."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return "another cvmfs-inject command"
    pids = []
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue  # POSIX locks, and "->" lines of processes that wait
        major, minor, inode = fields[5].split(":")
        if ((int(major, 16), int(minor, 16), int(inode))
                == (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)):
            pid = int(fields[4])
            if pid != os.getpid() and pid not in pids:
                pids.append(pid)
    if not pids:
        return "another cvmfs-inject command"
    return ", ".join(f"pid {pid} ({_command(pid)})" for pid in pids[:3])


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return "gone"
    words = [a.decode(errors="replace") for a in argv if a]
    if len(words) > 2 and os.path.basename(words[0]).startswith("python"):
        # `python -m cvmfs_inject ...`, or a console script run by its interpreter
        words = [words[2], *words[3:]] if words[1] == "-m" else words[1:]
    if not words:
        return "?"
    text = " ".join([os.path.basename(words[0]).replace("_", "-"), *words[1:]])
    return text if len(text) <= 80 else text[:79] + "…"
