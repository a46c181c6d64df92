"""The file of a cached tree index (format 5): a header line, then the index in columns;
and the documents of formats 3 and 4 that earlier versions wrote (`from_json`).

Why this shape: an update loads its stack's indexes on its critical path, and the base's
holds every entry of the tree. Format 4 (gzip'd JSON columns) took 0.14 s for the 81,000
entries of the bench tree: 39 ms to inflate, 46 ms of JSON, 56 ms to make the rows. Here
text columns are split at NUL (no name, target or digest holds one) and number columns are
machine arrays, both in C, and only the rows are made in Python: about 0.05 s. The file
is not compressed (about 140 bytes an entry). The header says how long each column is:
the file must be exactly that long, so nothing else is read (a damaged length, a sparse
file of gigabytes), and the CRC32 of the columns makes any other damage a miss, as gzip's
CRC did; what the header holds besides is checked against the request and the columns.

    b"cvmfs-inject tree index 5\\n"
    one JSON line: diff_id, mount_point, count, lengths (of each column), crc (CRC32 of
        all columns)
    the columns: paths, kinds (one ASCII letter each), targets, groups, digests, opaque
        directories (text, NUL-joined); modes, uids, gids, sizes, mtimes, mtimes_ns
        (int64, little-endian)
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from array import array
from itertools import repeat
from typing import BinaryIO, cast

from cvmfs_inject.stack.index import DIR, FILE, LINK, WHITEOUT, LayerIndex, Node

MAGIC = b"cvmfs-inject tree index 5\n"
MAX_HEADER = 1 << 16
_TEXT = 6  # paths, kinds, targets, groups, digests, opaque; the number columns follow
_NUMBERS = ("mode", "uid", "gid", "size", "mtime", "mtime_ns")
_KINDS = frozenset((FILE, DIR, LINK, WHITEOUT))
_INT64 = 8


def encode(index: LayerIndex) -> bytes:
    """The file of an index; OverflowError for a number past int64 (a foreign layer's
    header can hold one), UnicodeEncodeError for a digest that is not hex (an index of
    an older format, made by hand): such an index is not cached."""
    nodes = list(index.nodes.values())
    columns = [b"\0".join(index.nodes), "".join(node.kind for node in nodes).encode("ascii"),
               b"\0".join(node.target for node in nodes),
               b"\0".join(node.group for node in nodes),
               "\0".join(node.digest for node in nodes).encode("ascii"),
               b"\0".join(sorted(index.opaque))]
    for name in _NUMBERS:
        numbers = array("q", [getattr(node, name) for node in nodes])
        if sys.byteorder != "little":
            numbers.byteswap()
        columns.append(numbers.tobytes())
    body = b"".join(columns)
    header = {"diff_id": index.diff_id, "mount_point": index.mount_point, "count": len(nodes),
              "lengths": [len(column) for column in columns], "crc": zlib.crc32(body)}
    return MAGIC + json.dumps(header, separators=(",", ":")).encode() + b"\n" + body


def read(f: BinaryIO, size: int, diff_id: str, mount_point: str) -> LayerIndex:
    """The index in the open file `f` of `size` bytes, if it is whole and of this layer;
    ValueError otherwise."""
    start = f.read(len(MAGIC))
    line = f.readline(MAX_HEADER)
    if start != MAGIC or not line.endswith(b"\n"):
        raise ValueError("not format 5")
    header = json.loads(line)
    if not (isinstance(header, dict) and header.get("diff_id") == diff_id
            and header.get("mount_point") == mount_point):
        raise ValueError("another layer")
    count, lengths = header.get("count"), header.get("lengths")
    if not (type(count) is int and count >= 0 and isinstance(lengths, list)
            and len(lengths) == _TEXT + len(_NUMBERS)
            and all(type(n) is int and n >= 0 for n in lengths)
            and all(n == _INT64 * count for n in lengths[_TEXT:])
            and (count or not any(lengths[:_TEXT - 1]))
            and len(MAGIC) + len(line) + sum(lengths) == size):
        raise ValueError("header")
    body = f.read(size - len(MAGIC) - len(line))
    if len(body) != sum(lengths) or header.get("crc") != zlib.crc32(body):
        raise ValueError("columns")
    view, columns, offset = memoryview(body), [], 0
    for length in lengths:
        columns.append(view[offset:offset + length])
        offset += length
    numbers = []
    for column in columns[_TEXT:]:
        values = array("q")
        values.frombytes(column)
        if sys.byteorder != "little":
            values.byteswap()
        numbers.append(values.tolist())
    paths, kinds, targets, groups, digests, opaque = map(bytes, columns[:_TEXT])
    return _index(diff_id, mount_point, count, paths, kinds.decode("ascii"), targets, groups,
                  digests.decode("ascii"), numbers,
                  set(opaque.split(b"\0")) if opaque else set())


def from_json(doc: dict[str, object]) -> LayerIndex:
    """The index a document of format 3 or 4 holds (gzip'd JSON of columns: one string
    per text column, names joined by NUL, one list per number column); ValueError or
    TypeError when it is not whole."""
    count, opaque = doc["count"], doc["opaque"]
    if not isinstance(count, int):
        raise TypeError("count")
    texts = [doc[name] for name in ("paths", "kinds", "targets", "groups", "digests")]
    if not all(isinstance(text, str) for text in texts):
        raise TypeError("text columns")
    numbers = [doc[name] for name in ("modes", "uids", "gids", "sizes", "mtimes", "mtimes_ns")]
    for column in numbers:
        if not (isinstance(column, list) and len(column) == count
                and set(map(type, column)) <= {int}):
            raise ValueError("numbers")
    if not (isinstance(opaque, list) and all(isinstance(path, str) for path in opaque)):
        raise ValueError("opaque")
    paths, kinds, targets, groups, digests = cast(list[str], texts)
    return _index(str(doc["diff_id"]), str(doc["mount_point"]), count, _encoded(paths), kinds,
                  _encoded(targets), _encoded(groups), digests, cast(list[list[int]], numbers),
                  {os.fsencode(path) for path in opaque})


def _encoded(names: str) -> bytes:
    return names.encode("utf-8", "surrogateescape")


def _index(diff_id: str, mount_point: str, count: int, paths: bytes, kinds: str,
           targets: bytes, groups: bytes, digests: str, numbers: list[list[int]],
           opaque: set[bytes]) -> LayerIndex:
    """An index from its columns, each checked to hold `count` entries: names NUL-joined,
    a letter per kind, the number columns in `Node`'s order."""
    if len(kinds) != count or not set(kinds) <= _KINDS:
        raise ValueError("kinds")
    digest_list = digests.split("\0") if count else []
    if len(digest_list) != count:
        raise ValueError("digests")
    modes, uids, gids, sizes, mtimes, mtimes_ns = numbers
    rows = zip(kinds, modes, uids, gids, sizes, mtimes, _split(targets, count),
               _split(groups, count), digest_list, mtimes_ns, strict=True)
    nodes = dict(zip(_split(paths, count), map(tuple.__new__, repeat(Node), rows),
                     strict=True))
    if len(nodes) != count:
        raise ValueError("a path twice")
    return LayerIndex(diff_id, mount_point, nodes, opaque)


def _split(column: bytes, count: int) -> list[bytes]:
    names = column.split(b"\0") if count else []
    if len(names) != count:
        raise ValueError("column length")
    return names
