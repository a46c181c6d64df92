"""Tar headers written by hand, fast and reproducibly: ustar fields packed directly, PAX
records only where a name, link target, size, owner or time needs them."""

from __future__ import annotations

from zlib import adler32

BLOCK = 512
MAX_OCTAL_SIZE = 0o77777777777
MAX_OCTAL_ID = 0o7777777
ZEROS = bytes(BLOCK)
TYPE_FILE, TYPE_HARDLINK, TYPE_SYMLINK, TYPE_DIR, TYPE_PAX = b"0", b"1", b"2", b"5", b"x"

# Everything after the link name: magic "ustar\0", version "00", empty uname/gname/dev/prefix.
_TAIL = b"ustar\x0000" + b"\0" * 247
_CHECKSUM_BASE = sum(_TAIL) + 8 * ord(" ")


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class TarHeaders:
    """Builds ustar headers fast: the mode/owner and mtime fields repeat across a tree, so
    their octal text and checksum contribution are computed once and cached."""

    def __init__(self) -> None:
        self._owner: dict[tuple[int, int, int], tuple[bytes, int]] = {}
        self._mtime: dict[int, tuple[bytes, int]] = {}

    def __call__(self, name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
                 typeflag: bytes, linkname: bytes = b"") -> bytes:
        pax = b""
        if len(name) > 100 or not name.isascii():
            pax += _pax_record(b"path", name)
            name = name.decode("ascii", "replace").encode("ascii", "replace")[:100]
        if linkname and (len(linkname) > 100 or not linkname.isascii()):
            pax += _pax_record(b"linkpath", linkname)
            linkname = linkname.decode("ascii", "replace").encode("ascii", "replace")[:100]
        if size > MAX_OCTAL_SIZE:
            pax += _pax_record(b"size", str(size).encode())
            size = 0
        if uid > MAX_OCTAL_ID or gid > MAX_OCTAL_ID:
            pax += _pax_record(b"uid", str(uid).encode()) + _pax_record(b"gid", str(gid).encode())
            uid, gid = min(uid, MAX_OCTAL_ID), min(gid, MAX_OCTAL_ID)
        if mtime > MAX_OCTAL_SIZE:
            pax += _pax_record(b"mtime", str(mtime).encode())
            mtime = MAX_OCTAL_SIZE
        owner = self._owner.get((mode, uid, gid))
        if owner is None:
            text = b"%07o\0%07o\0%07o\0" % (mode, uid, gid)
            owner = self._owner[(mode, uid, gid)] = (text, sum(text))
        stamp = self._mtime.get(mtime)
        if stamp is None:
            if len(self._mtime) > 4096:  # unclamped host mtimes are mostly distinct: bound it
                self._mtime.clear()
            text = b"%011o\0" % mtime
            stamp = self._mtime[mtime] = (text, sum(text))
        size_text = b"%011o\0" % size
        # byte sums in C: adler32's low half is 1 + the sum mod 65521, and 100 bytes (a
        # name) or 12 (a number) cannot sum to that much, so it is the sum exactly
        checksum = (_CHECKSUM_BASE + owner[1] + stamp[1] + typeflag[0] - 3
                    + (adler32(name) & 0xFFFF) + (adler32(size_text) & 0xFFFF)
                    + (adler32(linkname) & 0xFFFF))
        block = b"".join((name.ljust(100, b"\0"), owner[0], size_text, stamp[0],
                          b"%06o\0 " % checksum, typeflag, linkname.ljust(100, b"\0"),
                          _TAIL))
        if not pax:
            return block
        if not _is_utf8(pax):
            pax = _pax_record(b"hdrcharset", b"BINARY") + pax
        return (self(b"././@PaxHeader", 0o644, 0, 0, len(pax), 0, TYPE_PAX)
                + pax + bytes(-len(pax) % BLOCK) + block)
