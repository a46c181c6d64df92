"""The local cache of tree indexes (`--state DIR`), one file per layer, named by its diff_id.

A cache is a convenience, never a source of truth: a file that is missing, unreadable,
truncated (gzip's CRC and length), of another format or naming another layer is treated as
absent, and the index is rebuilt from the layer. Files are written temp + fsync + rename,
so concurrent commands each leave a whole file (the same layer gives the same index,
apart from the host times recorded by the command that packed it).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
import zlib
from pathlib import Path

from cvmfs_inject.stack.index import LayerIndex, from_records, records

FORMAT = "cvmfs-inject tree index 1"
STATE_ENV = "XDG_CACHE_HOME"


def default_state_dir() -> Path:
    """$XDG_CACHE_HOME/cvmfs-inject (~/.cache/cvmfs-inject when it is not set)."""
    base = os.environ.get(STATE_ENV) or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cvmfs-inject"


class IndexCache:
    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "index"

    def _path(self, diff_id: str) -> Path:
        return self.directory / (diff_id.replace(":", "-") + ".json.gz")

    def get(self, diff_id: str, mount_point: str) -> LayerIndex | None:
        """The cached index of a layer, or None when there is no good one."""
        try:
            with gzip.open(self._path(diff_id), "rb") as f:
                doc = json.loads(f.read())
        except (OSError, EOFError, ValueError, zlib.error):
            return None
        if not (isinstance(doc, dict) and doc.get("format") == FORMAT
                and doc.get("diff_id") == diff_id and doc.get("mount_point") == mount_point
                and isinstance(doc.get("entries"), list) and isinstance(doc.get("opaque"), list)):
            return None
        try:
            return from_records(diff_id, mount_point, doc["entries"], doc["opaque"])
        except (TypeError, ValueError):
            return None

    def put(self, index: LayerIndex) -> None:
        """Store an index atomically; a cache that cannot be written costs time later,
        so failing to write it is not an error."""
        doc = {"format": FORMAT, "diff_id": index.diff_id, "mount_point": index.mount_point,
               "entries": list(records(index)),
               "opaque": sorted(os.fsdecode(path) for path in index.opaque)}
        data = gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), 1, mtime=0)
        with contextlib.suppress(OSError):
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.directory)
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
