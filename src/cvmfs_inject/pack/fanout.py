"""A walk of a tree shared between this process and forked helpers, its records in tar order.

Why: a walk costs an lstat and a share of a getdents per entry, in the kernel, plus the
Python around them, and one walk uses one core. On the bench's 20k tree (81k entries) the
scan of a stack update took about half of the update, and on a tree of a million entries
the walk was more than half of the packer's main thread.

How: this process first walks the top of the tree itself, the *skeleton*; the content of
each directory at its depth is a *unit* (`pack.units`, which holds the walks). Units are claimed
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
import os
import signal
from collections.abc import Callable, Generator, Iterator
from typing import Any, NoReturn, cast

from cvmfs_inject.pack.forking import fork_is_safe, fork_with_pipe, reap, usable_cpus
from cvmfs_inject.pack.inbox import END, FAILED, MORE, Batch, Inbox, Record, send
from cvmfs_inject.pack.options import PackOptions, Warn
from cvmfs_inject.pack.units import RecordOf, Units

MIN_UNITS = 4  # fewer units than this: the walk is short, a fork is not worth it
MAX_UNITS = 16384  # the tickets fit in the 64 KiB a pipe holds on Linux
MAX_HELPERS = 3
BATCH = 4096  # records a helper sends at a time: a huge unit is never held whole
_TICKET = 4


def _ticket_pipe(units: int) -> int | None:
    """The read end of a pipe holding every unit's ticket, or None when they do not fit
    (a pipe may hold less than 64 KiB: pipe-user-pages-soft)."""
    tickets = b"".join(i.to_bytes(_TICKET, "little") for i in range(units))
    read, write = os.pipe()
    os.set_blocking(write, False)
    try:
        written = os.write(write, tickets)
    except BlockingIOError:
        written = 0
    finally:
        os.close(write)
    if written < len(tickets):
        os.close(read)
        return None
    return read


def _fork_helpers(count: int, life: Callable[[int], NoReturn], inherited: list[int]
                  ) -> tuple[list[int], list[int]]:
    """(pids, read ends of their pipes) of up to `count` helpers, each living `life` with
    the write end of its own pipe, after closing `inherited` and the other helpers'
    pipes; fewer when the system refuses a fork (this process walks what they do not)."""
    pids: list[int] = []
    pipes: list[int] = []
    for _ in range(count):
        try:
            pid, pipe = fork_with_pipe()
        except OSError:
            break
        if pid == 0:
            for fd in [*pipes, *inherited]:
                os.close(fd)
            life(pipe)
        pids.append(pid)
        pipes.append(pipe)
    return pids, pipes


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
        self._walks = Units(options, root, mount, record, note)
        self._note, self._min_units = note, min_units
        self._ahead = ahead
        self._gate = -1  # with `gated`: the helpers wait for a byte each here (`release`)
        self._gated = gated
        # records, notes, and [unit, record of its directory]; None: one plain walk
        self._skeleton: list[Record | str | list[Any]] | None = None
        self._tickets = -1
        self._helpers: list[int] = []
        # units this process claimed, and their walks begun ahead, in batches (None: not yet)
        self._mine: dict[int, Iterator[tuple[Batch, bool]] | None] = {}
        self._inbox = Inbox(ahead)

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
        helpers = min(usable_cpus() - 1, MAX_HELPERS)
        if self._ahead is not None:  # while the caller waits for one helper's unit, the
            helpers = min(helpers, 1)  # batches of others would pass the bound
        if helpers < 1 or not fork_is_safe():
            return
        try:
            skeleton = self._walks.skeleton()
        except Exception:  # the plain walk raises it again, in its place
            return
        units = len(self._walks.names)
        if skeleton is None or not self._min_units <= units <= MAX_UNITS:
            return
        read = _ticket_pipe(units)
        if read is None:
            return
        self._tickets, self._skeleton = read, skeleton
        gate = -1
        if self._gated:
            gate, self._gate = os.pipe()
        self._helpers, pipes = _fork_helpers(helpers, lambda into: self._helper(into, gate),
                                             [self._gate] if self._gate >= 0 else [])
        if gate >= 0:
            os.close(gate)
        self._inbox.start(pipes)

    def __iter__(self) -> Iterator[Record]:
        if self._skeleton is None:
            yield from self._walks.whole()
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
        for pid in self._helpers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in self._helpers:
            reap(pid)
        self._helpers = []
        self._inbox.close()
        for walk in self._mine.values():
            if walk is not None:
                cast(Generator, walk).close()  # its descriptors
        self._mine.clear()
        if self._tickets >= 0:
            os.close(self._tickets)
            self._tickets = -1

    def _unit(self, unit: int, head: Record) -> Iterator[Record]:
        """The records of the unit's directory and of all below it: as one walk gives
        them, a failure to list the directory comes before its record."""
        note, after, first = self._note, None, True
        while True:
            frame = self._next_frame(unit)
            if frame is None or frame[1] is None:  # walked here (again, if a helper failed)
                yield from self._walks.streamed(unit, head if first else None, after)
                return
            if first:
                yield head
                first = False
            kind, (records, notes, last) = frame
            done = 0
            for before, message in notes:  # each note where one walk makes it
                yield from records[done:before]
                done = before
                note(message)
            yield from records[done:] if done else records
            after = last or after
            if kind == END:
                return

    def _next_frame(self, unit: int) -> tuple[int, Batch | None] | None:
        """The unit's next batch (kind, batch; None if its walk failed), or None: this
        process walks the unit, streaming. While it waits for a helper's unit, it claims
        the next unit for itself and walks it ahead: whole without a bound, else batch by
        batch while the batches held stay within it."""
        inbox = self._inbox
        if unit in self._mine:
            frame = inbox.take(unit)
            walk = self._mine[unit]
            if frame is not None or walk is None:
                if walk is None:
                    del self._mine[unit]
                return frame
            return self._step(unit, walk)
        while True:
            frame = inbox.take(unit)
            if frame is not None:
                return frame
            claimed = self._claim()
            if claimed == unit:
                return None
            if claimed is not None:
                self._mine[claimed] = None
            if self._walk_ahead():
                continue
            if not inbox.wait(unit):  # its helper is gone without it
                return None

    def _walk_ahead(self) -> bool:
        """A batch of the first unit this process claimed, walked now and kept for its
        turn; False when there is none or no room."""
        inbox = self._inbox
        for unit, walk in self._mine.items():
            if self._ahead is None:  # whole
                walk = self._walks.batches(unit, 0)
            elif not inbox.room():
                return False
            elif walk is None:
                walk = self._mine[unit] = self._walks.batches(unit, BATCH)
            kind, batch = self._step(unit, walk)
            inbox.put(unit, kind, batch)
            return True
        return False

    def _step(self, unit: int, walk: Iterator[tuple[Batch, bool]]
              ) -> tuple[int, Batch | None]:
        """The next batch of a walk of this process (the unit is no longer its own once the
        last came, or the walk failed: the failure is raised again at its turn)."""
        try:
            batch, last = next(walk)
        except Exception:
            del self._mine[unit]
            return END, None
        if last:
            del self._mine[unit]
        return (END if last else MORE), batch

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
                    for batch, last in self._walks.batches(unit, BATCH):
                        send(into, unit, END if last else MORE, batch)
                except Exception:  # this process's caller walks it again
                    send(into, unit, FAILED)
        except BaseException:  # a helper never returns into the caller
            code = 1
        os._exit(code)
