"""An extraction's file-system operations applied in a forked process, beside the one that
reads the stream.

Why: extracting a tree of a million small entries is about half system calls (10 s of
mkdir, open, write, link and utime on the bench's 1M-entry tree) and half Python (reading
headers, checking names); one process does them one after the other. Here the reading
process parses and checks, and hands operations in batches to a child that only applies
them (`pack.writes`): both cores work.

The child is a fork, made before the stream's inflating threads start; it reads frames
(kind, length, marshalled batch) from a pipe, in order, so every check on disk still
happens in stream order. When it fails, it writes the error into a second pipe and exits;
the reading process sees the pipe close on its next batch and raises that error. `finish`
has the child set the directories' modes and times, and waits for its answer; `settle`
waits for it to have applied everything sent (an error of an earlier member comes before
one the reader found later). Leaving the context any other way kills and reaps it. Where
forking is unsafe (other threads alive) or useless (one CPU), the same `Writes` runs here.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import signal
import struct
from typing import Any, NoReturn

from cvmfs_inject.errors import InputError
from cvmfs_inject.pack.forking import die_with_parent, reap, widen
from cvmfs_inject.pack.writes import Writes

_FRAME = struct.Struct("<Bq")  # kind, length of the marshalled batch that follows
_OPERATIONS, _FINISH, _SETTLE = 0, 1, 2
_READ = 1 << 20


class Applier:
    """Where an extraction's operations go: a forked child applying them (`forked`), or
    `writes` itself. A context manager: leaving it with an error stops the child."""

    def __init__(self, writes: Writes, fork: bool) -> None:
        self._writes = writes
        self._forked = False
        self._pid = 0  # the child, until it is reaped
        self._into = self._answers = -1
        if fork:
            self._fork()

    @property
    def forked(self) -> bool:
        return self._forked

    def __enter__(self) -> Applier:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _fork(self) -> None:
        """Fork the child; when the system cannot (no processes or memory left), the
        operations are applied here instead."""
        operations, self._into = os.pipe()
        self._answers, answer = os.pipe()
        widen(self._into)
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            for fd in (operations, self._into, self._answers, answer):
                os.close(fd)
            self._into = self._answers = -1
            return
        if pid == 0:
            os.close(self._into)
            os.close(self._answers)
            self._child(operations, answer, parent)
        self._forked, self._pid = True, pid
        os.close(operations)
        os.close(answer)

    def send(self, operations: list[tuple[Any, ...]]) -> None:
        if not self._forked:
            self._writes.apply(operations)
        elif self._pid:  # else the child stopped, and its error is being raised
            self._frame(_OPERATIONS, marshal.dumps(operations))

    def settle(self) -> None:
        """Raise the error of an operation sent so far, if one failed."""
        if self._pid:
            self._frame(_SETTLE)
            self._answer()

    def finish(self) -> None:
        """The directories' modes and times (`Writes.finish`), once all is applied."""
        if not self._forked:
            self._writes.finish()
            return
        if not self._pid:
            raise InputError("cannot extract layer: the process writing its files stopped")
        self._frame(_FINISH)
        self._answer()

    def close(self) -> None:
        """Stop the child if it still runs (killed: what it made is the caller's to
        remove), and close what this side holds."""
        for fd in (self._into, self._answers):
            if fd >= 0:
                os.close(fd)
        self._into = self._answers = -1
        if not self._forked:
            self._writes.close()
        if not self._pid:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, signal.SIGKILL)
        reap(self._pid)
        self._pid = 0

    def _frame(self, kind: int, payload: bytes = b"") -> None:
        """Header and payload in one system call, without joining them (a copy)."""
        parts = [memoryview(_FRAME.pack(kind, len(payload))), memoryview(payload)]
        try:
            while parts:
                written = os.writev(self._into, parts)
                while parts and written >= len(parts[0]):
                    written -= len(parts.pop(0))
                if parts:
                    parts[0] = parts[0][written:]
        except BrokenPipeError:  # the child stopped: its answer says why
            self._answer()

    def _answer(self) -> None:
        """The child's answer to `_FINISH` or `_SETTLE`, or the error it stopped with."""
        head = _read_exactly(self._answers, _FRAME.size)
        if len(head) < _FRAME.size:
            status = reap(self._pid)
            self._pid = 0
            raise InputError("cannot extract layer: the process writing its files ended "
                             f"without a word (wait status {status})")
        kind, message = marshal.loads(_read_exactly(self._answers, _FRAME.unpack(head)[1]))
        if kind == "settled":
            return
        reap(self._pid)  # finished, or stopped by an error: the child exits
        self._pid = 0
        if kind == "input":
            raise InputError(message)
        if kind == "os":
            raise InputError(f"cannot extract layer: {message}")
        if kind == "bug":
            raise RuntimeError(f"the process writing the layer's files failed: {message}")

    def _child(self, operations: int, answer: int, parent: int) -> NoReturn:
        """The child's life: apply batches until told to finish, answer, exit without
        unwinding into the caller's code."""
        code, reply = 0, ("finished", "")
        try:
            die_with_parent(parent)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it
            source = os.fdopen(operations, "rb", buffering=_READ)
            while True:
                head = source.read(_FRAME.size)
                if len(head) < _FRAME.size:
                    os._exit(1)  # the reading process went away
                kind, length = _FRAME.unpack(head)
                if kind == _OPERATIONS:
                    self._writes.apply(marshal.loads(source.read(length)))
                elif kind == _SETTLE:
                    _send_answer(answer, ("settled", ""))
                else:
                    self._writes.finish(share=True)  # this process has no other thread
                    break
        except InputError as exc:
            reply = ("input", str(exc))
        except OSError as exc:
            reply = ("os", str(exc))
        except BaseException as exc:  # a bug: said, never unwound into the caller
            code, reply = 1, ("bug", f"{type(exc).__name__}: {exc}")
        try:
            _send_answer(answer, reply)
        finally:
            os._exit(code)


def _send_answer(fd: int, answer: tuple[str, str]) -> None:
    payload = marshal.dumps(answer)
    view = memoryview(_FRAME.pack(0, len(payload)) + payload)
    while view:
        view = view[os.write(fd, view):]


def _read_exactly(fd: int, size: int) -> bytes:
    """`size` bytes, or fewer if the pipe closed first."""
    chunks, left = [], size
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
