"""A walk of a tree shared between this process and forked helpers, its records in tar order.

Why: a walk costs an lstat and a share of a getdents per entry, in the kernel, plus the
Python around them, and one walk uses one core. On the bench's 20k tree (81k entries) the
scan of a stack update took about half of the update; two walkers take it in half the time.

How: this process first walks the top of the tree itself (`SKELETON_DEPTH` levels), the
*skeleton*. The content of each directory at that depth is a *unit*. Units are claimed
through tickets (their numbers, 4 bytes each, written into a pipe before the fork: a read
of 4 bytes takes exactly one), by the helpers from the start and by this process once its
caller asks for records. The record of each entry (`record`, a tuple of bytes, ints and
floats) is made where the entry was walked; a helper sends a unit's records, and the notes
the walk made, with marshal through its own pipe, drained by a thread of this process so
that a helper never waits for the caller. Records are yielded in tar order, the skeleton's
and each unit's in its place: exactly what one walk gives.

What goes wrong stays as in one walk: a unit whose walk failed in a helper (an error, or a
helper killed) is walked again in this process, which raises the error, after the same
notes, at the same place as a single walk would. A helper is a fork; it runs only the walk
and leaves with `os._exit`; `close` kills and reaps it. Where forking is unsafe or not worth
it (other threads running, one CPU, too few or too many units) the walk is the plain one.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import selectors
import signal
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from cvmfs_inject.pack.headers import TarHeaders
from cvmfs_inject.pack.options import PackOptions, Warn
from cvmfs_inject.pack.walker import TreeWalker

Record = tuple[Any, ...]
# (path, name, descriptor of its directory, tar name, lstat) -> the entry's record
RecordOf = Callable[[str, str, int, bytes, os.stat_result], Record]
# a unit's records, and the notes its walk made (each after how many of the records)
Unit = tuple[list[Record], list[tuple[int, str]]]

SKELETON_DEPTH = 2  # a shrinkwrap tree: /cvmfs/<repository>/<top directory>, .data/<00..ff>
MIN_UNITS = 4  # fewer units than this: the walk is short, a fork is not worth it
MAX_UNITS = 16384  # the tickets fit in the 64 KiB a pipe holds on Linux
MAX_HELPERS = 3
_TICKET = 4
_FRAME = struct.Struct("<iq")  # unit number, length of the marshalled Unit (-1: failed)
_READ = 1 << 20


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class FannedWalk:
    """The records of a walk of `root` (`TreeWalker.stats_of`), walked by this process and
    by helpers started with `start`. Iterate once; `close` (or the context manager) stops
    the helpers, whether or not the iteration ended."""

    def __init__(self, options: PackOptions, root: str, mount: bytes, record: RecordOf,
                 note: Warn, *, min_units: int = MIN_UNITS) -> None:
        self._options, self._root, self._mount = options, root, mount
        self._record, self._note, self._min_units = record, note, min_units
        self._skeleton: list[Record | int | str] | None = None  # None: one plain walk
        self._units: list[str] = []
        self._tickets = -1
        self._helpers: list[int] = []
        self._done: dict[int, Unit | None] = {}  # None: failed in a helper, walk it here
        self._open_pipes = 0
        self._changed = threading.Condition()
        self._drain: threading.Thread | None = None

    @property
    def helpers(self) -> int:
        return len(self._helpers)

    def __enter__(self) -> FannedWalk:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def start(self) -> None:
        """Walk the skeleton and fork the helpers, which begin at once. Any failure here
        leaves the plain walk, which meets the same failure in its place."""
        helpers = min(_cpus() - 1, MAX_HELPERS)
        if helpers < 1 or threading.active_count() > 1 or not hasattr(os, "fork"):
            return
        try:
            skeleton = self._walk_skeleton()
        except Exception:  # the plain walk raises it again, in its place
            return
        if not self._min_units <= len(self._units) <= MAX_UNITS:
            return
        read, write = os.pipe()
        try:
            os.write(write, b"".join(i.to_bytes(_TICKET, "little")
                                     for i in range(len(self._units))))
        finally:
            os.close(write)
        self._tickets, self._skeleton = read, skeleton
        pipes: list[int] = []
        for _ in range(helpers):
            out, into = os.pipe()
            try:
                pid = os.fork()
            except OSError:  # no helper, or fewer: this process walks what they do not
                os.close(out)
                os.close(into)
                break
            if pid == 0:
                os.close(out)
                for fd in pipes:
                    os.close(fd)
                self._helper(into)
            os.close(into)
            self._helpers.append(pid)
            pipes.append(out)
        self._open_pipes = len(pipes)
        self._drain = threading.Thread(target=self._drain_pipes, args=(pipes,),
                                       name="cvmfs-inject-walk", daemon=True)
        self._drain.start()

    def __iter__(self) -> Iterator[Record]:
        record = self._record
        if self._skeleton is None:
            for entry in TreeWalker(self._options, TarHeaders(), self._note).stats_of(self._root,
                                                                                self._mount):
                yield record(*entry)
            return
        note = self._note
        for item in self._skeleton:
            if type(item) is tuple:
                yield item
            elif type(item) is str:
                note(item)
            else:
                assert isinstance(item, int)
                records, notes = self._unit(item)
                done = 0
                for before, message in notes:  # each note where one walk makes it
                    yield from records[done:before]
                    done = before
                    note(message)
                yield from records[done:] if done else records

    def close(self) -> None:
        for pid in self._helpers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in self._helpers:
            os.waitpid(pid, 0)
        self._helpers = []
        if self._drain is not None:
            self._drain.join()
            self._drain = None
        if self._tickets >= 0:
            os.close(self._tickets)
            self._tickets = -1

    def _walk_skeleton(self) -> list[Record | int | str]:
        items: list[Record | int | str] = []
        walker = TreeWalker(self._options, TarHeaders(), items.append)
        record, skip = self._record, len(self._root) + 1
        for entry in walker.stats_of(self._root, self._mount, depth=SKELETON_DEPTH):
            items.append(record(*entry))
            path, st = entry[0], entry[4]
            rel = path[skip:]
            if stat.S_ISDIR(st.st_mode) and rel.count("/") == SKELETON_DEPTH - 1:
                items.append(len(self._units))
                self._units.append(rel)
        return items

    def _walk_unit(self, unit: int) -> Unit:
        records: list[Record] = []
        notes: list[tuple[int, str]] = []
        walker = TreeWalker(self._options, TarHeaders(),
                            lambda message: notes.append((len(records), message)))
        record, keep = self._record, records.append
        for entry in walker.stats_of(self._root, self._mount, start=self._units[unit]):
            keep(record(*entry))
        return records, notes

    def _claim(self) -> int | None:
        ticket = os.read(self._tickets, _TICKET)
        return int.from_bytes(ticket, "little") if ticket else None

    def _unit(self, unit: int) -> Unit:
        """The unit's records: a helper's, or walked here; meanwhile, units further on are
        claimed and walked here (their failures kept for their turn)."""
        done, changed = self._done, self._changed
        while True:
            with changed:
                if unit in done:
                    found = done.pop(unit)
                    if found is not None:
                        return found
                    break
            claimed = self._claim()
            if claimed == unit:
                break
            if claimed is not None:
                try:
                    result: Unit | None = self._walk_unit(claimed)
                except Exception:  # raised again at its turn
                    result = None
                with changed:
                    done[claimed] = result
                continue
            with changed:
                changed.wait_for(lambda: unit in done or not self._open_pipes)
                if unit not in done:  # its helper is gone without it
                    break
        return self._walk_unit(unit)

    def _helper(self, into: int) -> NoReturn:
        """A helper's life: claim units, send their records, exit without unwinding."""
        code = 0
        try:
            while (unit := self._claim()) is not None:
                try:
                    payload = marshal.dumps(self._walk_unit(unit))
                    frame = _FRAME.pack(unit, len(payload)) + payload
                except Exception:  # the caller walks it again
                    frame = _FRAME.pack(unit, -1)
                view = memoryview(frame)
                while view:
                    view = view[os.write(into, view):]
        except BaseException:  # a helper never returns into the caller
            code = 1
        os._exit(code)

    def _drain_pipes(self, pipes: list[int]) -> None:
        """The thread that takes the helpers' frames as they come."""
        selector = selectors.DefaultSelector()
        buffers: dict[int, bytearray] = {}
        for fd in pipes:
            selector.register(fd, selectors.EVENT_READ)
            buffers[fd] = bytearray()
        try:
            while buffers:
                for key, _ in selector.select():
                    fd = int(key.fd)
                    chunk = os.read(fd, _READ)
                    if not chunk:
                        selector.unregister(fd)
                        os.close(fd)
                        del buffers[fd]
                        with self._changed:
                            self._open_pipes -= 1
                            self._changed.notify_all()
                        continue
                    self._frames(buffers[fd], chunk)
        finally:
            for fd in buffers:
                selector.unregister(fd)
                os.close(fd)
            with self._changed:
                self._open_pipes = 0
                self._changed.notify_all()
            selector.close()

    def _frames(self, buffer: bytearray, chunk: bytes) -> None:
        buffer += chunk
        arrived: dict[int, Unit | None] = {}
        start = 0
        while len(buffer) - start >= _FRAME.size:
            unit, length = _FRAME.unpack_from(buffer, start)
            if length < 0:
                arrived[unit] = None
                start += _FRAME.size
                continue
            end = start + _FRAME.size + length
            if len(buffer) < end:
                break
            arrived[unit] = marshal.loads(buffer[start + _FRAME.size:end])
            start = end
        del buffer[:start]
        if arrived:
            with self._changed:
                self._done.update(arrived)
                self._changed.notify_all()
