"""Our temporary files and directories outside a layout, named so that a later command can
remove what a killed one left behind.

SIGKILL runs no cleanup: a killed `run` leaves its working layout in $TMPDIR, a killed
`push` its half-written archive beside the target. Each such name carries the host and the
process id of its maker (`cvmfs-inject-run-1a2b3c4d-4242-XXXXXXXX`); before making one in
a directory, a command removes the names there of processes of this host that are gone,
when they belong to its user. Names of other hosts (a directory on a shared file system)
and of live processes are never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

PREFIX = "cvmfs-inject-"
_NAME = re.compile(PREFIX + r"[a-z]+-([0-9a-f]{8})-(\d+)-")


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _prefix(kind: str) -> str:
    return f"{PREFIX}{kind}-{_host()}-{os.getpid()}-"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def sweep(directory: str | Path) -> None:
    """Remove what killed commands of this host and user left in `directory`."""
    host, uid = _host(), os.geteuid()
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            match = _NAME.search(entry.name)
            if match is None or match.group(1) != host or not _gone(int(match.group(2))):
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)


def temporary_directory(kind: str, parent: str | Path | None = None
                        ) -> tempfile.TemporaryDirectory[str]:
    """A directory removed when the context ends (or by a later command if we are killed)."""
    parent = parent or tempfile.gettempdir()
    sweep(parent)
    return tempfile.TemporaryDirectory(prefix=_prefix(kind), dir=parent)


def make_directory(kind: str, parent: str | Path | None = None) -> str:
    """mkdtemp, named as `temporary_directory` names; the caller removes it."""
    parent = parent or tempfile.gettempdir()
    sweep(parent)
    return tempfile.mkdtemp(prefix=_prefix(kind), dir=parent)


def make_file(kind: str, directory: str | Path, *, before: str = "", suffix: str = ""
              ) -> tuple[int, str]:
    """mkstemp in `directory` (`before` starts the name, e.g. "." + the target's name)."""
    sweep(directory)
    return tempfile.mkstemp(prefix=before + _prefix(kind), suffix=suffix, dir=directory)
