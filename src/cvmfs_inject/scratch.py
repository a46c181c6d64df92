"""Our temporary files and directories outside a layout, named so that a later command can
remove what a killed one left behind.

SIGKILL runs no cleanup: a killed `run` leaves its working layout in $TMPDIR, a killed
`push` its half-written archive beside the target. Each such name carries a key of the
process id space of its maker (this boot of this machine, this pid namespace) and its
process id (`cvmfs-inject-run-1a2b3c4d-4242-XXXXXXXX`); before making one in a directory, a
command removes the names there whose process, in the same id space, is gone, when they
belong to its user. A name from another machine or boot (a shared file system) or another
pid namespace (containers sharing a volume) is never touched: there a pid says nothing.
A reused pid keeps a leftover a while longer, never the reverse.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import tempfile
from pathlib import Path

from cvmfs_inject.paths import remove_tree

PREFIX = "cvmfs-inject-"
# exactly the names made here: [.TARGET.]PREFIX KIND-KEY-PID-RANDOM[.SUFFIX], RANDOM being
# tempfile's 8 characters
SUFFIXES = ("", ".pem", ".tmp", ".new")
_NAME = re.compile(r"(?:\.|\..+\.)?" + PREFIX + r"[a-z]+-([0-9a-f]{8})-(\d+)-[a-z0-9_]{8}"
                   r"(?:" + "|".join(re.escape(suffix) for suffix in SUFFIXES) + ")")


@functools.cache
def _id_space() -> str:
    """A key of the space process ids are unique in: this boot of this machine and this
    pid namespace."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc: nothing is ever swept (a key no one else has)
        return os.urandom(4).hex()
    return hashlib.sha256(f"{boot}:{namespace}".encode()).hexdigest()[:8]


def _prefix(kind: str) -> str:
    return f"{PREFIX}{kind}-{_id_space()}-{os.getpid()}-"


_MAX_PID = 1 << 22  # the kernel's pid_max limit: a larger "pid" is no process's


def _gone(pid: int) -> bool:
    if not 0 < pid <= _MAX_PID:
        return False  # no process of ours wrote that name: leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def sweep(directory: str | Path) -> None:
    """Remove what killed commands of this id space and user left in `directory`."""
    space, uid = _id_space(), os.geteuid()
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            match = _NAME.fullmatch(entry.name)
            if match is None or match.group(1) != space:
                continue
            with contextlib.suppress(OSError):
                if (entry.stat(follow_symlinks=False).st_uid != uid
                        or not _gone(int(match.group(2)))):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    remove_tree(Path(entry.path))  # read-only directories of a layer too
                else:
                    os.unlink(entry.path)


def temporary_directory(kind: str, parent: str | Path | None = None
                        ) -> tempfile.TemporaryDirectory[str]:
    """A directory removed when the context ends (or by a later command if we are killed)."""
    parent = parent or tempfile.gettempdir()
    sweep(parent)
    return tempfile.TemporaryDirectory(prefix=_prefix(kind), dir=parent)


def make_directory(kind: str, parent: str | Path | None = None, *, before: str = "") -> str:
    """mkdtemp, named as `temporary_directory` names (`before` starts the name, "." for a
    hidden one); the caller removes it."""
    parent = parent or tempfile.gettempdir()
    sweep(parent)
    return tempfile.mkdtemp(prefix=before + _prefix(kind), dir=parent)


def make_file(kind: str, directory: str | Path, *, before: str = "", suffix: str = ""
              ) -> tuple[int, str]:
    """mkstemp in `directory` (`before` starts the name, e.g. "." + the target's name;
    `suffix` one of SUFFIXES, so that `sweep` knows the name)."""
    if suffix not in SUFFIXES:
        raise ValueError(f"temporary file suffix {suffix!r} is not one of {SUFFIXES}")
    sweep(directory)
    return tempfile.mkstemp(prefix=before + _prefix(kind), suffix=suffix, dir=directory)
