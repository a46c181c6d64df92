"""Reading a tar stream fast: headers parsed straight from large chunks, names kept as bytes.

Python's tarfile costs about 40 µs a member (it builds a TarInfo through many small reads
and keeps every member in a list); a shrinkwrap layer has tens of thousands to millions of
members. This reader takes the stream in the chunks it comes in (1 MiB from the inflater),
parses a header with one struct call, checks its checksum with zlib's C adler32 instead of
a Python sum, and hands member data out as memoryviews of the chunk, without copies. It
understands what tarfile does for layers: ustar with prefix, PAX (path, linkpath, size,
mtime; global headers too), GNU long names and links, base-256 numbers, V7 directories
written as regular files with a trailing slash.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cvmfs_inject.errors import InputError

BLOCK = 512
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")
_ZERO = bytes(BLOCK)
REGULAR = frozenset((b"0", b"\0", b"7"))
HARDLINK, SYMLINK, DIRECTORY = b"1", b"2", b"5"
_LINKS = frozenset((HARDLINK, SYMLINK))
_PAX, _PAX_GLOBAL, _GNU_NAME, _GNU_LINK = b"x", b"g", b"L", b"K"
_EXTENSIONS = frozenset((_PAX, _PAX_GLOBAL, _GNU_NAME, _GNU_LINK))
# An extended header (PAX records, a GNU long name) is held in memory whole: 1 MiB at most,
# as Go's archive/tar allows, so one header cannot make extraction hold the whole stream.
MAX_EXTENSION = 1 << 20
_MAX_TIME = float(1 << 40)  # seconds either side of 1970: 35,000 years, within any time_t
# tarfile's SUPPORTED_TYPES: members of other types are skipped with their data
_KNOWN = frozenset((b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"L", b"K", b"S"))


def show_name(name: bytes) -> str:
    """A member name for messages: decoded as the file system would, quoted."""
    return repr(os.fsdecode(name))


@dataclass(slots=True)
class Member:
    name: bytes
    type: bytes  # one byte, as in the header
    mode: int
    mtime: float
    size: int  # bytes of data that follow the header (regular files only)
    linkname: bytes
    owner_fields: bytes = b""  # the header's uid and gid fields, parsed only when asked
    ids: tuple[int, int] | None = None  # uid and gid from PAX records

    def owner(self) -> tuple[int, int]:
        """(uid, gid): extraction ignores owners, so they are parsed only on request."""
        if self.ids is not None:
            return self.ids
        return _number(self.owner_fields[:8]), _number(self.owner_fields[8:])


def _text(field: bytes) -> bytes:
    return field.partition(b"\0")[0]


def _number(field: bytes) -> int:
    """An octal field, or GNU base-256 (first byte 0x80 or 0xff).

    The first try reads the common shape (digits, then NULs or spaces) in one C call;
    anything else takes the general path, which gives the same value or the same error."""
    try:
        return int(field.rstrip(b"\0"), 8)
    except ValueError:
        pass
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (256 ** (len(field) - 1)) if field[0] == 0xFF else value
    try:
        return int(field.partition(b"\0")[0].strip() or b"0", 8)
    except ValueError:
        raise InputError(f"layer is not a valid tar stream: invalid number {field!r} "
                         "in a header") from None


def _byte_sum(block: bytes) -> int:
    """sum(block) for 512 bytes, in C: adler32's first half is 1 + the sum mod 65521, and
    256 bytes cannot sum to more than 65280, so each half is exact."""
    return ((zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2)


def _checksum_ok(block: bytes) -> bool:
    stored = block[148:156]
    unsigned = _byte_sum(block) - sum(stored) + 8 * 32
    try:
        expected = int(stored.partition(b"\0")[0].strip() or b"-1", 8)
    except ValueError:
        return False
    if expected == unsigned:
        return True
    signed = unsigned - 256 * sum(1 for byte in block[:148] + block[156:] if byte > 127)
    return expected == signed


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """`LENGTH KEY=VALUE\\n` records; values stay bytes (hdrcharset does not matter then)."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise InputError("layer is not a valid tar stream: invalid PAX header") from None
        record = data[space + 1:pos + length - 1]
        if length < 5 or not data[pos + length - 1:pos + length] == b"\n" or b"=" not in record:
            raise InputError("layer is not a valid tar stream: invalid PAX header")
        key, _, value = record.partition(b"=")
        records[key] = value
        pos += length
    return records


class TarStream:
    """The members of a tar stream read through `read(n)` (which may return fewer bytes).

    Iterate `members()`; for a regular file read its data with `data()` before asking for
    the next member (what is not read is skipped).
    """

    def __init__(self, read: Callable[[int], bytes], chunk: int) -> None:
        self._read, self._chunk = read, chunk
        self._buf, self._pos = b"", 0
        self._left = self._padding = 0  # the current member's data not yet read, its padding
        self.ended = False

    def _fill(self, count: int) -> bool:
        """At least `count` bytes buffered from `_pos`; False at the end of the stream."""
        while len(self._buf) - self._pos < count:
            more = self._read(max(self._chunk, count))
            if not more:
                return False
            self._buf = self._buf[self._pos:] + more if self._pos < len(self._buf) else more
            self._pos = 0
        return True

    def _take(self, count: int) -> bytes:
        if not self._fill(count):
            raise InputError("layer is truncated: the tar stream ends inside a member")
        start = self._pos
        self._pos += count
        return self._buf[start:self._pos]

    def _skip(self, count: int) -> None:
        while count:
            if not self._fill(1):
                raise InputError("layer is truncated: the tar stream ends inside a member")
            step = min(count, len(self._buf) - self._pos)
            self._pos += step
            count -= step

    def data(self) -> Iterator[memoryview]:
        """The current member's data, in pieces; its padding is skipped afterwards."""
        while self._left:
            if not self._fill(1):
                raise InputError("layer is truncated: the tar stream ends inside a member")
            end = min(len(self._buf), self._pos + self._left)
            piece = memoryview(self._buf)[self._pos:end]
            self._left -= end - self._pos
            self._pos = end
            yield piece
        self._skip(self._padding)
        self._padding = 0

    def members(self) -> Iterator[Member]:
        global_pax: dict[bytes, bytes] = {}
        local: dict[bytes, bytes] = {}
        first = True
        while True:
            if self._left or self._padding:
                self._skip(self._left + self._padding)
                self._left = self._padding = 0
            if not self._fill(BLOCK):
                if first:
                    raise InputError("layer is not a valid tar stream: empty file")
                if local or self._pos < len(self._buf):
                    raise InputError("layer is truncated: the tar stream ends inside a "
                                     "header")
                return  # no end-of-archive blocks: accepted, as tarfile and Go accept it
            block = self._take(BLOCK)
            if block == _ZERO:
                if first:
                    raise InputError("layer is not a valid tar stream: empty header")
                self.ended = True
                return
            first = False
            if not _checksum_ok(block):
                raise InputError("layer is not a valid tar stream: bad checksum in a header")
            (name, mode, uid, gid, size, mtime, _, kind, linkname, magic, _, _, _, _,
             prefix) = _HEADER.unpack(block)
            name, size = _text(name), _number(size)
            if size < 0:  # it would move the reader backwards, over and over
                raise InputError("layer is not a valid tar stream: negative size in a header")
            if kind in _EXTENSIONS:
                if size > MAX_EXTENSION:
                    raise InputError(f"layer is not a valid tar stream: an extended header of "
                                     f"{size} bytes (at most {MAX_EXTENSION} are read)")
                payload = self._take(size)
                self._skip(-size % BLOCK)
                if kind == _PAX:
                    local.update(_pax_records(payload))
                elif kind == _PAX_GLOBAL:
                    global_pax.update(_pax_records(payload))
                else:
                    local[b"path" if kind == _GNU_NAME else b"linkpath"] = _text(payload)
                continue
            prefix = _text(prefix)
            if prefix and magic[:6] == b"ustar\0":
                name = prefix + b"/" + name
            member = Member(name, kind, _number(mode), _number(mtime), size,
                            _text(linkname) if kind in _LINKS else b"", uid + gid)
            pax = {**global_pax, **local} if global_pax else local
            if pax:
                _apply(member, pax)
                local = {}
            if b"\0" in member.name or b"\0" in member.linkname:
                raise InputError("layer is not a valid tar stream: a NUL byte in a name")
            if not -_MAX_TIME < member.mtime < _MAX_TIME:  # also NaN
                raise InputError(f"layer is not a valid tar stream: mtime {member.mtime} is "
                                 "out of range")
            if kind == b"\0" and member.name.endswith(b"/"):
                member.type = DIRECTORY
            if member.type in REGULAR or member.type not in _KNOWN:
                self._left, self._padding = member.size, -member.size % BLOCK
            yield member

    def drain(self) -> None:
        """Read to the end of the stream: only there are a gzip CRC, a zstd checksum and the
        blob's digest checked (content in stored blocks can be corrupt in a valid tar)."""
        self._pos = len(self._buf)
        while self._read(self._chunk):
            pass


def _apply(member: Member, pax: dict[bytes, bytes]) -> None:
    try:
        if b"path" in pax:
            member.name = pax[b"path"]
        if b"linkpath" in pax:
            member.linkname = pax[b"linkpath"]
        if b"size" in pax:
            member.size = int(pax[b"size"])
            if member.size < 0:
                raise ValueError(member.size)
        if b"mtime" in pax:
            member.mtime = float(pax[b"mtime"])
        if b"uid" in pax or b"gid" in pax:
            uid, gid = member.owner()
            member.ids = (int(pax.get(b"uid", uid)), int(pax.get(b"gid", gid)))
    except ValueError:
        raise InputError("layer is not a valid tar stream: invalid PAX value") from None
