"""What the packer is told (PackOptions) and the few things it fixes for everyone: the
compressions and their levels, and the size of the pieces the tar stream is cut into."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from cvmfs_inject.errors import UsageError

# The compressor is fed the tar stream in pieces of exactly this size (the last excepted):
# ISA-L's deflate output depends on where its input is cut, so the cut must not move.
CHUNK = 1 << 20
COMPRESSIONS = ("gzip", "zstd", "none")
# unpack extracts into a hidden directory of this name inside DIR; one left by a killed
# unpack is never packed
STAGING_PREFIX = ".cvmfs-inject-unpack-"
# ISA-L offers levels 0-3; 1 measured best for speed at a ratio close to gzip -6. zstd 1
# runs at ISA-L's speed with a better ratio (bench/results).
DEFAULT_LEVELS = {"gzip": 1, "zstd": 1, "none": 0}
LEVEL_RANGES = {"gzip": range(0, 4), "zstd": range(1, 23), "none": range(0, 1)}

# progress(tar bytes, files) since the previous call
Progress = Callable[[int, int], None]
Warn = Callable[[str], None]


@dataclass
class PackOptions:
    mount_point: str = "/cvmfs"
    compression: str = "gzip"
    level: int | None = None
    excludes: tuple[str, ...] = ()
    keep_owner: bool = False
    source_date_epoch: int | None = None

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise UsageError(f"unknown compression {self.compression!r}: use gzip, zstd or none")
        if self.level is None:
            self.level = DEFAULT_LEVELS[self.compression]
        if self.level not in LEVEL_RANGES[self.compression]:
            span = LEVEL_RANGES[self.compression]
            raise UsageError(f"--level {self.level} is out of range for {self.compression} "
                             f"({span.start}..{span.stop - 1})")
        self.mount_point = normalise_mount_point(self.mount_point)

    def clamp(self, mtime: float) -> int:
        """An mtime as packed: whole seconds, not before 1970, not after SOURCE_DATE_EPOCH."""
        seconds = max(0, int(mtime))
        epoch = self.source_date_epoch
        return seconds if epoch is None or seconds < epoch else epoch


def normalise_mount_point(path: str) -> str:
    """`/cvmfs` for `/cvmfs/`; refused: relative paths, `.`/`..`, a `.wh.` name (a layer
    holding it would be a whiteout deleting the base image's directory) and control
    characters (the label is printed on one line)."""
    parts = [p for p in path.split("/") if p]
    if not path.startswith("/") or not parts or any(p in (".", "..") for p in parts):
        raise UsageError(f"--path {path!r} must be an absolute directory below /, like /cvmfs")
    if any(p.startswith(".wh.") for p in parts):
        raise UsageError(f"--path {path!r}: a name starting with '.wh.' is a layer whiteout; "
                         "it would delete that directory of the base image")
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise UsageError(f"--path {path!r}: control characters are not allowed")
    return "/" + "/".join(parts)


def source_date_epoch() -> int | None:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None or value == "":
        return None
    try:
        epoch = int(value)
    except ValueError:
        raise UsageError(f"SOURCE_DATE_EPOCH={value!r} is not an integer") from None
    if epoch < 0:
        raise UsageError(f"SOURCE_DATE_EPOCH={value!r} is negative")
    return epoch
