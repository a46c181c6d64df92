"""What the walk's helpers send (`pack.fanout`): frames of marshalled batches of records
through one pipe per helper, and the `Inbox` that a thread of the walking process fills
from those pipes, unit by unit, under a bound.

A frame is (unit number, kind, length) and the marshalled batch: records, the notes made
among them, and the path of the last entry. The thread takes frames as they come, so that
a helper never waits for the walk's consumer; with a bound (`ahead`) it stops taking them
while that many bytes wait and the consumer is not waiting for a unit (the helper then
waits on its full pipe).
"""

from __future__ import annotations

import marshal
import os
import selectors
import struct
import threading
from collections import deque
from typing import Any

Record = tuple[Any, ...]
# records, the notes the walk made among them (each after how many of the records), and
# the path of the last entry (where a walk of the unit again goes on from)
Batch = tuple[list[Record], list[tuple[int, str]], str | None]
MORE, END, FAILED = 0, 1, 2  # a unit's batch, its last batch, its walk failed
_FRAME = struct.Struct("<iBq")  # unit number, kind, length of the marshalled batch
_READ = 1 << 20
RECORD_BYTES = 200  # about what a marshalled record takes


def send(into: int, unit: int, kind: int, batch: Batch | None = None) -> None:
    """A helper's frame, written whole (a write to a pipe may be short)."""
    payload = b"" if batch is None else marshal.dumps(batch)
    view = memoryview(_FRAME.pack(unit, kind, len(payload)) + payload)
    while view:
        view = view[os.write(into, view):]


class Inbox:
    """The batches that came, per unit, in order; `take` one, or `wait` for one."""

    def __init__(self, ahead: int | None) -> None:
        self._ahead = ahead
        self._frames: dict[int, deque[tuple[int, int, Batch | None]]] = {}
        self._held = 0  # bytes of frames taken from the pipes and not yet from here
        self._waiting = self._closing = False
        self._open_pipes = 0
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def start(self, pipes: list[int]) -> None:
        """Drain these pipes (the inbox owns them from now on) in a thread."""
        self._open_pipes = len(pipes)
        self._thread = threading.Thread(target=self._drain, args=(pipes,),
                                        name="cvmfs-inject-walk", daemon=True)
        self._thread.start()

    def take(self, unit: int) -> tuple[int, Batch | None] | None:
        """The unit's next frame (kind, batch; None: its walk failed), if one came."""
        with self._changed:
            queue = self._frames.get(unit)
            if not queue:
                return None
            kind, held, batch = queue.popleft()
            self._held -= held
            self._changed.notify_all()
            return kind, batch

    def put(self, unit: int, kind: int, batch: Batch | None) -> None:
        """A batch walked in this process ahead of its turn (None: the walk failed); it
        counts against the bound as records of about RECORD_BYTES."""
        held = 0 if batch is None else len(batch[0]) * RECORD_BYTES
        with self._changed:
            self._frames.setdefault(unit, deque()).append((kind, held, batch))
            self._held += held

    def room(self) -> bool:
        """Less than the bound is held."""
        return self._ahead is None or self._held < self._ahead

    def wait(self, unit: int) -> bool:
        """Wait for a frame of the unit; False if none will come (the pipes are closed)."""
        with self._changed:
            self._waiting = True
            self._changed.notify_all()
            self._changed.wait_for(lambda: self._frames.get(unit) or not self._open_pipes)
            self._waiting = False
            return bool(self._frames.get(unit))

    def close(self) -> None:
        """After the helpers are gone: the thread reads the ends of their pipes and stops."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _drain(self, pipes: list[int]) -> None:
        selector = selectors.DefaultSelector()
        buffers: dict[int, bytearray] = {}
        for fd in pipes:
            selector.register(fd, selectors.EVENT_READ)
            buffers[fd] = bytearray()
        ahead, changed = self._ahead, self._changed
        try:
            while buffers:
                if ahead is not None:
                    with changed:
                        changed.wait_for(lambda: self._held < ahead or self._waiting
                                         or self._closing)
                for key, _ in selector.select():
                    fd = int(key.fd)
                    chunk = os.read(fd, _READ)
                    if chunk:
                        self._frames_in(buffers[fd], chunk)
                        continue
                    selector.unregister(fd)
                    os.close(fd)
                    del buffers[fd]
                    with changed:
                        self._open_pipes -= 1
                        changed.notify_all()
        finally:
            for fd in buffers:
                selector.unregister(fd)
                os.close(fd)
            with changed:
                self._open_pipes = 0
                changed.notify_all()
            selector.close()

    def _frames_in(self, buffer: bytearray, chunk: bytes) -> None:
        buffer += chunk
        arrived: list[tuple[int, int, int, Batch | None]] = []
        start = 0
        while len(buffer) - start >= _FRAME.size:
            unit, kind, length = _FRAME.unpack_from(buffer, start)
            end = start + _FRAME.size + length
            if len(buffer) < end:
                break
            batch = None if kind == FAILED else marshal.loads(buffer[start + _FRAME.size:end])
            arrived.append((unit, kind, length, batch))
            start = end
        del buffer[:start]
        if arrived:
            with self._changed:
                for unit, kind, length, batch in arrived:
                    self._frames.setdefault(unit, deque()).append((kind, length, batch))
                    self._held += length
                self._changed.notify_all()
