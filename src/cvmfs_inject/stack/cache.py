"""The local cache of tree indexes (`--state DIR`), one file per layer, named by its diff_id.

A cache is a convenience, never a source of truth: a file that is missing, unreadable,
truncated or damaged (the CRC and lengths of `stack.indexfile`), of another format or
naming another layer is treated as absent, and the index is rebuilt from the layer. Files
are written temp + fsync + rename, so concurrent commands each leave a whole file (the same
layer gives the same index, apart from the host times recorded by the command that packed
it). Files of formats 3 and 4 (gzip'd JSON, `<diff_id>.json.gz`) written by earlier
versions are still read: rebuilding a packed index from its layer would lose the host
times that keep the quick check from reading files.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import stat
import zlib
from pathlib import Path

from cvmfs_inject import scratch
from cvmfs_inject.stack import indexfile
from cvmfs_inject.stack.index import LayerIndex

_FORMAT_4 = "cvmfs-inject tree index 4"
# Format 3 differs only in indexes rebuilt from a layer: they ignored a whiteout of the
# mount point (or of a directory above it) in a layer another tool made. Indexes made by
# packing never hold one, and they have a host mtime on every file: those are still read,
# so that no stack has to be read back for its index.
_PACKED_FORMAT_3 = "cvmfs-inject tree index 3"
STATE_ENV = "XDG_CACHE_HOME"
# what a cache file may inflate to: its size times a ratio real indexes stay well under
_INFLATE_FLOOR, _INFLATE_RATIO = 16 << 20, 64
_SUFFIX, _JSON_SUFFIX = ".index", ".json.gz"  # format 5, and formats 3 and 4


def default_state_dir() -> Path:
    """$XDG_CACHE_HOME/cvmfs-inject (~/.cache/cvmfs-inject when it is not set)."""
    base = os.environ.get(STATE_ENV) or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cvmfs-inject"


class IndexCache:
    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "index"

    def _path(self, diff_id: str, suffix: str = _SUFFIX) -> Path:
        return self.directory / (diff_id.replace(":", "-") + suffix)

    def get(self, diff_id: str, mount_point: str) -> LayerIndex | None:
        """The cached index of a layer, or None when there is no good one."""
        try:
            fd, info = _opened(self._path(diff_id))
            with os.fdopen(fd, "rb") as f:
                return indexfile.read(f, info.st_size, diff_id, mount_point)
        except (OSError, ValueError, RecursionError):
            index = self._get_json(diff_id, mount_point)
        if index is not None:  # written again in format 5, which loads three times faster
            self.put(index)
        return index

    def _get_json(self, diff_id: str, mount_point: str) -> LayerIndex | None:
        """An index in a file of format 3 or 4."""
        try:
            doc = json.loads(_read_gzip(self._path(diff_id, _JSON_SUFFIX)))
        except (OSError, EOFError, ValueError, zlib.error, RecursionError):
            return None
        if not (isinstance(doc, dict) and doc.get("format") in (_FORMAT_4, _PACKED_FORMAT_3)
                and doc.get("diff_id") == diff_id and doc.get("mount_point") == mount_point):
            return None
        try:
            index = indexfile.from_json(doc)
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        if doc["format"] == _PACKED_FORMAT_3 and not any(
                node.mtime_ns for node in index.nodes.values()):
            return None  # rebuilt from a layer, or no file to tell
        return index

    def holds_file(self, diff_id: str) -> bool:
        """Whether there is a file for the layer, good or not (`get` says None for both):
        a damaged one is worth telling apart from none. A directory we may not look into
        may hold one: that is not a first run."""
        for suffix in (_SUFFIX, _JSON_SUFFIX):
            try:
                os.lstat(self._path(diff_id, suffix))
            except PermissionError:
                return True
            except OSError:
                continue
            return True
        return False

    def put(self, index: LayerIndex) -> str | None:
        """Store an index atomically. A cache that cannot be written costs time later, so
        failing to write it is not an error: the reason is returned, to be told (None:
        stored, or an index this format cannot hold, which is rebuilt when needed)."""
        try:
            data = indexfile.encode(index)
        except (OverflowError, UnicodeEncodeError):
            return None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # named so that the next write removes what a killed command left (`scratch`)
            fd, tmp = scratch.make_file("index", self.directory, before=".", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self._path(index.diff_id))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:  # a rename's error is the target's (the temp file is ours)
            return f"{exc.filename2 or exc.filename or self.directory}: {exc.strerror or exc}"
        return None


def _opened(path: Path) -> tuple[int, os.stat_result]:
    """A cache file opened for reading; ValueError for anything but a regular file (a FIFO
    would block, a symlink leads elsewhere)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ValueError("not a regular file")
    return fd, info


def _read_gzip(path: Path) -> bytes:
    """A gzip'd cache file's content; ValueError for one that inflates past what an index
    can be (a gzip bomb: an index compresses about 10:1, gzip can reach 1000:1)."""
    fd, info = _opened(path)
    with os.fdopen(fd, "rb") as raw:
        limit = _INFLATE_FLOOR + _INFLATE_RATIO * info.st_size
        with gzip.GzipFile(fileobj=raw, mode="rb") as f:
            data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError("inflates too far")
    return data
