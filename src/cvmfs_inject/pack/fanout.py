"""A walk of a tree shared between this process and forked helpers, its records in tar order.

Why: a walk costs an lstat and a share of a getdents per entry, in the kernel, plus the
Python around them, and one walk uses one core. On the bench's 20k tree (81k entries) the
scan of a stack update took about half of the update, and on a tree of a million entries
the walk was more than half of the packer's main thread.

How: this process first walks the top of the tree itself (`SKELETON_DEPTH` levels), the
*skeleton*. The content of each directory at that depth is a *unit*. Units are claimed
through tickets (their numbers, 4 bytes each, written into a pipe before the fork: a read
of 4 bytes takes exactly one), by the helpers from the start and by this process once its
caller asks for records. The record of each entry (`record`, a tuple of bytes, ints and
floats) is made where the entry was walked; a helper sends a unit's records in batches,
with the notes the walk made, with marshal through its own pipe, drained by a thread of
this process (which, with a bound, stops draining while the caller is behind). Records are
yielded in tar order, the skeleton's and each unit's in its place: exactly what one walk
gives.

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
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, cast

from cvmfs_inject.pack.headers import TarHeaders
from cvmfs_inject.pack.options import PackOptions, Warn
from cvmfs_inject.pack.walker import TreeWalker

Record = tuple[Any, ...]
# (path, name, descriptor of its directory, tar name, lstat) -> the entry's record
RecordOf = Callable[[str, str, int, bytes, os.stat_result], Record]
# records, and the notes the walk made among them (each after how many of the records)
Batch = tuple[list[Record], list[tuple[int, str]]]

SKELETON_DEPTH = 2  # a shrinkwrap tree: /cvmfs/<repository>/<top directory>, .data/<00..ff>
MIN_UNITS = 4  # fewer units than this: the walk is short, a fork is not worth it
MAX_UNITS = 16384  # the tickets fit in the 64 KiB a pipe holds on Linux
MAX_HELPERS = 3
BATCH = 4096  # records a helper sends at a time: a huge unit is never held whole
_TICKET = 4
_FRAME = struct.Struct("<iBq")  # unit number, kind, length of the marshalled Batch
_MORE, _END, _FAILED = 0, 1, 2  # a unit's batch, its last batch, its walk failed
_READ = 1 << 20


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class FannedWalk:
    """The records of a walk of `root` (`TreeWalker.stats_of`), walked by this process and
    by helpers started with `start`. Iterate once; `close` (or the context manager) stops
    the helpers, whether or not the iteration ended.

    `ahead=None`: while this process waits for a helper's unit it walks later units, each
    kept whole (a scan keeps every record anyway). `ahead=N` bytes: the helpers' batches
    held here stay near N, and this process walks only the unit it needs, streaming, so
    memory stays bounded whatever a unit's size (the packer)."""

    def __init__(self, options: PackOptions, root: str, mount: bytes, record: RecordOf,
                 note: Warn, *, min_units: int = MIN_UNITS, ahead: int | None = None,
                 gated: bool = False) -> None:
        self._options, self._root, self._mount = options, root, mount
        self._record, self._note, self._min_units = record, note, min_units
        self._ahead = ahead
        self._gate = -1  # with `gated`: the helpers wait for a byte each here (`release`)
        self._gated = gated
        # records, notes, and [unit, record of its directory]; None: one plain walk
        self._skeleton: list[Record | str | list[Any]] | None = None
        self._units: list[str] = []
        self._tickets = -1
        self._helpers: list[int] = []
        self._mine: set[int] = set()  # units this process claimed, to walk at their turn
        # per unit, the batches come: (kind, bytes held, batch or None if it failed)
        self._frames: dict[int, deque[tuple[int, int, Batch | None]]] = {}
        self._held = 0
        self._waiting = self._closing = False
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
        gate = -1
        if self._gated:
            gate, self._gate = os.pipe()
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
                if self._gate >= 0:
                    os.close(self._gate)
                self._helper(into, gate)
            os.close(into)
            self._helpers.append(pid)
            pipes.append(out)
        if gate >= 0:
            os.close(gate)
        self._open_pipes = len(pipes)
        self._drain = threading.Thread(target=self._drain_pipes, args=(pipes,),
                                       name="cvmfs-inject-walk", daemon=True)
        self._drain.start()

    def __iter__(self) -> Iterator[Record]:
        if self._skeleton is None:
            walker = TreeWalker(self._options, TarHeaders(), self._note)
            record = self._record
            for entry in walker.stats_of(self._root, self._mount):
                yield record(*entry)
            return
        note = self._note
        for item in self._skeleton:
            if type(item) is tuple:
                yield item
            elif type(item) is str:
                note(item)
            else:
                unit, head = cast(list, item)
                yield from self._unit(unit, head)

    def release(self) -> None:
        """Let gated helpers begin: until then this process walks every unit itself, at
        its turn (the packer releases them when its walk, not the compressor, holds it
        up: on a tree of large files a helper would only take CPU from the compressor)."""
        if self._gate >= 0:
            with contextlib.suppress(OSError):
                os.write(self._gate, bytes(len(self._helpers)))
            os.close(self._gate)
            self._gate = -1

    def close(self) -> None:
        if self._gate >= 0:  # never released: the helpers read the end and leave
            os.close(self._gate)
            self._gate = -1
        with self._changed:
            self._closing = True
            self._changed.notify_all()
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

    def _walk_skeleton(self) -> list[Record | str | list[Any]]:
        items: list[Record | str | list[Any]] = []
        walker = TreeWalker(self._options, TarHeaders(), items.append)
        record, skip = self._record, len(self._root) + 1
        for entry in walker.stats_of(self._root, self._mount, depth=SKELETON_DEPTH):
            path, st = entry[0], entry[4]
            rel = path[skip:]
            if stat.S_ISDIR(st.st_mode) and rel.count("/") == SKELETON_DEPTH - 1:
                items.append([len(self._units), record(*entry)])
                self._units.append(rel)
            else:
                items.append(record(*entry))
        return items

    def _batches(self, unit: int, size: int) -> Iterator[tuple[Batch, bool]]:
        """The unit walked in this process, in batches of `size` records (0: one batch),
        the last one flagged True; a note goes with the batch of the record after it."""
        records: list[Record] = []
        notes: list[tuple[int, str]] = []
        walker = TreeWalker(self._options, TarHeaders(),
                            lambda message: notes.append((len(records), message)))
        record = self._record
        for entry in walker.stats_of(self._root, self._mount, start=self._units[unit]):
            if len(records) == size and size:
                yield (records, notes), False
                records, notes = [], []
            records.append(record(*entry))
        yield (records, notes), True

    def _walk_here(self, unit: int, head: Record | None, given: int) -> Iterator[Record]:
        """The unit walked in this process as it is needed: its directory's record `head`
        once the directory is listed (None: given out already), and its records but the
        first `given` (with the notes among them: given out by a helper's batches)."""
        count = 0

        def note(message: str) -> None:
            if count >= given:
                self._note(message)

        walker = TreeWalker(self._options, TarHeaders(), note)
        record = self._record
        entries = walker.stats_of(self._root, self._mount, start=self._units[unit])
        if head is not None:
            yield head
        for entry in entries:
            if count >= given:
                yield record(*entry)
            count += 1

    def _unit(self, unit: int, head: Record) -> Iterator[Record]:
        """The records of the unit's directory and of all below it: as one walk gives
        them, a failure to list the directory comes before its record."""
        note, given, first = self._note, 0, True
        while True:
            frame = self._next_frame(unit)
            if frame is None or frame[1] is None:  # walked here (again, if a helper failed)
                yield from self._walk_here(unit, head if first else None, given)
                return
            if first:
                yield head
                first = False
            kind, (records, notes) = frame
            done = 0
            for before, message in notes:  # each note where one walk makes it
                yield from records[done:before]
                done = before
                note(message)
            yield from records[done:] if done else records
            given += len(records)
            if kind == _END:
                return

    def _next_frame(self, unit: int) -> tuple[int, Batch | None] | None:
        """The unit's next batch from a helper (kind, batch; None if it failed), or None:
        this process walks the unit. Meanwhile, with `ahead=None`, later units are claimed
        and walked whole here (a failure kept for its turn)."""
        changed, frames = self._changed, self._frames
        if unit in self._mine:
            self._mine.discard(unit)
            return None
        while True:
            with changed:
                queue = frames.get(unit)
                if queue:
                    kind, held, batch = queue.popleft()
                    self._held -= held
                    changed.notify_all()
                    return kind, batch
            claimed = self._claim()
            if claimed == unit:
                return None
            if claimed is not None and self._ahead is not None:
                self._mine.add(claimed)  # walked at its turn, not held ahead
            elif claimed is not None:
                try:
                    whole: Batch | None = next(self._batches(claimed, 0))[0]
                except Exception:  # raised again at its turn
                    whole = None
                with changed:
                    frames[claimed] = deque([(_END, 0, whole)])
                continue
            with changed:
                self._waiting = True
                changed.notify_all()
                changed.wait_for(lambda: frames.get(unit) or not self._open_pipes)
                self._waiting = False
                if not frames.get(unit):  # its helper is gone without it
                    return None

    def _claim(self) -> int | None:
        ticket = os.read(self._tickets, _TICKET)
        return int.from_bytes(ticket, "little") if ticket else None

    def _helper(self, into: int, gate: int) -> NoReturn:
        """A helper's life: wait for the gate if any, claim units, send their records,
        exit without unwinding."""
        code = 0
        try:
            if gate >= 0 and not os.read(gate, 1):
                os._exit(0)  # the walk ended (or failed) before it needed helpers
            while (unit := self._claim()) is not None:
                try:
                    for batch, last in self._batches(unit, BATCH):
                        payload = marshal.dumps(batch)
                        self._send(into, _FRAME.pack(unit, _END if last else _MORE,
                                                     len(payload)) + payload)
                except Exception:  # this process's caller walks it again
                    self._send(into, _FRAME.pack(unit, _FAILED, 0))
        except BaseException:  # a helper never returns into the caller
            code = 1
        os._exit(code)

    @staticmethod
    def _send(into: int, frame: bytes) -> None:
        view = memoryview(frame)
        while view:
            view = view[os.write(into, view):]

    def _drain_pipes(self, pipes: list[int]) -> None:
        """The thread that takes the helpers' frames as they come; with `ahead`, it stops
        taking them while that much is held and the caller is not waiting (the helpers
        then wait on their full pipes)."""
        selector = selectors.DefaultSelector()
        buffers: dict[int, bytearray] = {}
        for fd in pipes:
            selector.register(fd, selectors.EVENT_READ)
            buffers[fd] = bytearray()
        ahead = self._ahead
        try:
            while buffers:
                if ahead is not None:
                    with self._changed:
                        self._changed.wait_for(lambda: self._held < ahead or self._waiting
                                               or self._closing)
                for key, _ in selector.select():
                    fd = int(key.fd)
                    chunk = os.read(fd, _READ)
                    if chunk:
                        self._take_frames(buffers[fd], chunk)
                        continue
                    selector.unregister(fd)
                    os.close(fd)
                    del buffers[fd]
                    with self._changed:
                        self._open_pipes -= 1
                        self._changed.notify_all()
        finally:
            for fd in buffers:
                selector.unregister(fd)
                os.close(fd)
            with self._changed:
                self._open_pipes = 0
                self._changed.notify_all()
            selector.close()

    def _take_frames(self, buffer: bytearray, chunk: bytes) -> None:
        buffer += chunk
        arrived: list[tuple[int, int, int, Batch | None]] = []
        start = 0
        while len(buffer) - start >= _FRAME.size:
            unit, kind, length = _FRAME.unpack_from(buffer, start)
            end = start + _FRAME.size + length
            if len(buffer) < end:
                break
            batch = None if kind == _FAILED else marshal.loads(buffer[start + _FRAME.size:end])
            arrived.append((unit, kind, length, batch))
            start = end
        del buffer[:start]
        if arrived:
            with self._changed:
                for unit, kind, length, batch in arrived:
                    self._frames.setdefault(unit, deque()).append((kind, length, batch))
                    self._held += length
                self._changed.notify_all()
