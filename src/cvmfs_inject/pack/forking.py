"""When a command may fork a helper process (`pack.fanout`, `pack.offload`).

A fork copies only the thread that calls it: a lock another thread held at that moment
stays locked in the child for good. So helpers are forked only while the command has one
thread, and only when there is another CPU for them to use.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading

from cvmfs_inject.pack import libc

_PR_SET_PDEATHSIG = 1
# a pipe's buffer between a helper and its parent, when the system allows it
# (pipe-max-size, 1 MiB by default)
PIPE_BYTES = 1 << 20


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which a batch system may limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def fork_is_safe() -> bool:
    """The system forks, and this process has no other thread."""
    return hasattr(os, "fork") and threading.active_count() == 1


def fork_with_pipe() -> tuple[int, int]:
    """Fork a child that sends to this process through a pipe of its own: (0, write end)
    in the child, (its pid, read end) here, the other end closed on each side. OSError,
    with both ends closed, when the system refuses the fork."""
    reader, writer = os.pipe()
    widen(writer)
    try:
        pid = os.fork()
    except OSError:
        os.close(reader)
        os.close(writer)
        raise
    if pid == 0:
        os.close(reader)
        return 0, writer
    os.close(writer)
    return pid, reader


def widen(pipe: int) -> None:
    """Give a pipe `PIPE_BYTES` of buffer where the system allows it (the default 64 KiB
    works too): its writer then waits less often for a reader that may be busy, as a
    parent whose thread takes a helper's records only when it gets the GIL."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(pipe, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def reap(pid: int) -> int:
    """Wait for the child `pid` to end; its wait status (0 when the system reaped it
    already: a command started with SIGCHLD ignored has its children reaped for it)."""
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return 0


def die_with_parent(parent: int) -> None:
    """In a forked child that writes: be killed when `parent` (the pid that forked it,
    taken before the fork) dies, on Linux. A command killed with SIGKILL then leaves no
    child writing into its staging directory while the next command sweeps it. Without
    prctl, the child still stops at the end of its pipe."""
    prctl = libc.function("prctl")
    if prctl is None:
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the call
        os._exit(1)
