"""The file of a cached tree index (format 5): a header line, then the index in columns.

Why this shape: an update loads its stack's indexes on its critical path, and the base's
holds every entry of the tree. Format 4 (gzip'd JSON columns) took 0.14 s for the 81,000
entries of the bench tree: 39 ms to inflate, 46 ms of JSON, 56 ms to make the rows. Here
text columns are split at NUL (no name, target or digest holds one) and number columns are
machine arrays, both in C, and only the rows are made in Python: about 0.05 s. The file
is not compressed (about 140 bytes an entry); the header's CRC32 of the columns and their
lengths make a damaged or truncated file a miss, as gzip's CRC did.

    b"cvmfs-inject tree index 5\\n"
    one JSON line: diff_id, mount_point, count, opaque (paths), lengths (of each column),
        crc (CRC32 of all columns)
    the columns: paths, kinds (one ASCII letter each), targets, groups, digests (text,
        NUL-joined); modes, uids, gids, sizes, mtimes, mtimes_ns (int64, little-endian)
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from array import array
from itertools import repeat

from cvmfs_inject.stack.index import DIR, FILE, LINK, WHITEOUT, LayerIndex, Node

MAGIC = b"cvmfs-inject tree index 5\n"
_TEXT = 5  # paths, kinds, targets, groups, digests; the number columns follow
_NUMBERS = ("mode", "uid", "gid", "size", "mtime", "mtime_ns")
_KINDS = frozenset((FILE, DIR, LINK, WHITEOUT))
_INT64 = 8


def encode(index: LayerIndex) -> bytes:
    """The file of an index; OverflowError for a number past int64 (a foreign layer's
    header can hold one: such an index is not cached)."""
    nodes = list(index.nodes.values())
    columns = [b"\0".join(index.nodes), "".join(node.kind for node in nodes).encode("ascii"),
               b"\0".join(node.target for node in nodes),
               b"\0".join(node.group for node in nodes),
               "\0".join(node.digest for node in nodes).encode("ascii")]
    for name in _NUMBERS:
        numbers = array("q", [getattr(node, name) for node in nodes])
        if sys.byteorder != "little":
            numbers.byteswap()
        columns.append(numbers.tobytes())
    body = b"".join(columns)
    header = {"diff_id": index.diff_id, "mount_point": index.mount_point, "count": len(nodes),
              "opaque": [os.fsdecode(path) for path in sorted(index.opaque)],
              "lengths": [len(column) for column in columns], "crc": zlib.crc32(body)}
    return MAGIC + json.dumps(header, separators=(",", ":")).encode() + b"\n" + body


def decode(data: bytes, diff_id: str, mount_point: str) -> LayerIndex:
    """The index a file holds, if it is whole and of this layer; ValueError otherwise."""
    if not data.startswith(MAGIC):
        raise ValueError("not format 5")
    end = data.index(b"\n", len(MAGIC))
    header = json.loads(data[len(MAGIC):end])
    if not (isinstance(header, dict) and header.get("diff_id") == diff_id
            and header.get("mount_point") == mount_point):
        raise ValueError("another layer")
    count, lengths, opaque = header.get("count"), header.get("lengths"), header.get("opaque")
    body = memoryview(data)[end + 1:]
    if not (type(count) is int and count >= 0 and isinstance(lengths, list)
            and len(lengths) == _TEXT + len(_NUMBERS)
            and all(type(n) is int and n >= 0 for n in lengths) and sum(lengths) == len(body)
            and all(n == _INT64 * count for n in lengths[_TEXT:])
            and isinstance(opaque, list) and all(isinstance(path, str) for path in opaque)
            and header.get("crc") == zlib.crc32(body)):
        raise ValueError("header")
    columns, offset = [], 0
    for length in lengths:
        columns.append(body[offset:offset + length])
        offset += length
    paths, targets, groups = (_split(columns[i], count) for i in (0, 2, 3))
    kinds = bytes(columns[1]).decode("ascii")
    if len(kinds) != count or not set(kinds) <= _KINDS:
        raise ValueError("kinds")
    digests = bytes(columns[4]).decode("ascii").split("\0") if count else []
    if len(digests) != count:
        raise ValueError("digests")
    numbers = []
    for column in columns[_TEXT:]:
        values = array("q")
        values.frombytes(column)
        if sys.byteorder != "little":
            values.byteswap()
        numbers.append(values.tolist())
    modes, uids, gids, sizes, mtimes, mtimes_ns = numbers
    rows = zip(kinds, modes, uids, gids, sizes, mtimes, targets, groups, digests, mtimes_ns,
               strict=True)
    return LayerIndex(diff_id, mount_point,
                      dict(zip(paths, map(tuple.__new__, repeat(Node), rows), strict=True)),
                      {os.fsencode(path) for path in opaque})


def _split(column: memoryview, count: int) -> list[bytes]:
    names = bytes(column).split(b"\0") if count else []
    if len(names) != count:
        raise ValueError("column length")
    return names
