"""The tree as `pack.fanout` shares it out: a skeleton and units, and the walks of a unit.

The *skeleton* is the top of the tree (`SKELETON_DEPTH` levels), walked by the process that
starts the helpers; the content of each directory at that depth is a *unit*, walked whole
by whoever claimed it. Each walk here is the plain walk (`TreeWalker.stats_of`) started at
a unit, and gives the records (`record`) and notes of that part exactly as one walk of the
whole tree gives them; no processes here, only walking.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from typing import Any

from cvmfs_inject.pack.headers import TarHeaders
from cvmfs_inject.pack.inbox import Batch, Record
from cvmfs_inject.pack.options import PackOptions, Warn
from cvmfs_inject.pack.walker import TreeWalker

# (path, name, descriptor of its directory, tar name, lstat) -> the entry's record
RecordOf = Callable[[str, str, int, bytes, os.stat_result], Record]

SKELETON_DEPTH = 2  # a shrinkwrap tree: /cvmfs/<repository>/<top directory>, .data/<00..ff>
# the skeleton holds its records until the helpers are forked: past this many entries (a
# wide top directory) the walk is the plain one, which holds none
MAX_SKELETON = 10000


class Units:
    """Walks of the tree at `root` (packed under `mount`): whole, its skeleton, or a unit;
    `names` are the units' paths below `root`, known once the skeleton was walked."""

    def __init__(self, options: PackOptions, root: str, mount: bytes, record: RecordOf,
                 note: Warn) -> None:
        self._options, self._root, self._mount = options, root, mount
        self._record, self._note = record, note
        self.names: list[str] = []

    def whole(self) -> Iterator[Record]:
        """The plain walk of the whole tree."""
        walker = TreeWalker(self._options, TarHeaders(), self._note)
        record = self._record
        for entry in walker.stats_of(self._root, self._mount):
            yield record(*entry)

    def skeleton(self) -> list[Record | str | list[Any]] | None:
        """The top of the tree: its records, the notes made (str), and for each unit
        [unit number, record of its directory]; None when it is too wide to hold
        (`MAX_SKELETON`)."""
        items: list[Record | str | list[Any]] = []
        walker = TreeWalker(self._options, TarHeaders(), items.append)
        record, skip = self._record, len(self._root) + 1
        for entry in walker.stats_of(self._root, self._mount, depth=SKELETON_DEPTH):
            if len(items) >= MAX_SKELETON:
                return None
            path, st = entry[0], entry[4]
            rel = path[skip:]
            if stat.S_ISDIR(st.st_mode) and rel.count("/") == SKELETON_DEPTH - 1:
                items.append([len(self.names), record(*entry)])
                self.names.append(rel)
            else:
                items.append(record(*entry))
        return items

    def batches(self, unit: int, size: int) -> Iterator[tuple[Batch, bool]]:
        """The unit walked in this process, in batches of `size` records (0: one batch),
        the last one flagged True. A batch is sent when the entry after it is found, so the
        notes made before that entry end the batch."""
        records: list[Record] = []
        notes: list[tuple[int, str]] = []
        walker = TreeWalker(self._options, TarHeaders(),
                            lambda message: notes.append((len(records), message)))
        record, last = self._record, None
        for entry in walker.stats_of(self._root, self._mount, start=self.names[unit]):
            if len(records) == size and size:
                yield (records, notes, last), False
                records, notes = [], []
            records.append(record(*entry))
            last = entry[0]
        yield (records, notes, last), True

    def streamed(self, unit: int, head: Record | None, after: str | None
                 ) -> Iterator[Record]:
        """The unit walked in this process as it is needed: its directory's record `head`
        once the directory is listed (None: given out already), then its records. `after`:
        the path of the last entry a helper's batches gave out (with the notes up to the
        entry after it); the walk goes on past it in walk order (names sorted directory by
        directory), so a tree that changed meanwhile never yields a name twice."""
        past = after is None

        def note(message: str) -> None:
            if past:
                self._note(message)

        walker = TreeWalker(self._options, TarHeaders(), note)
        record = self._record
        entries = walker.stats_of(self._root, self._mount, start=self.names[unit])
        if head is not None:
            yield head
        if after is not None:
            given = after.split("/")
            for entry in entries:
                if entry[0].split("/") > given:
                    past = True
                    yield record(*entry)
                    break
        for entry in entries:
            yield record(*entry)
