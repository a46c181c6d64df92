"""The packer: a directory -> a reproducible tar -> diff_id -> compressed blob, in one pass.

Speed and determinism drive the design. The tree is walked once (`pack.walker`), by this
process and forked helpers (`pack.fanout`, whose records come in walk order), headers
are written by hand (`pack.headers`), and file contents are read straight into a fixed set
of 1 MiB chunk buffers that a worker thread hashes and compresses (`pack.pipeline`); while
the worker is busy, the walk goes on ahead (`pack.lookahead`). Memory is bounded by the
buffers, the plan-ahead bound and the walk's (`WALK_AHEAD`), whatever the tree size, apart
from the hard-link table and the name lists of the directories being walked.

The same tree and options give the same tar bytes (diff_id) on any host, and the same
compressed bytes under any thread timing and core count: entries in sorted order, owner
0:0 with empty names, mtimes clamped to SOURCE_DATE_EPOCH when it is set, no atime/ctime,
a gzip header without name or mtime, a fixed level, and the stream cut into fixed 1 MiB
pieces for the compressor. (ISA-L's deflate code differs by CPU family, so gzip bytes
may differ between, say, x86-64 and aarch64.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_inject.errors import InputError
from cvmfs_inject.pack.fanout import FannedWalk
from cvmfs_inject.pack.headers import BLOCK, TYPE_DIR, ZEROS, TarHeaders
from cvmfs_inject.pack.lookahead import Lookahead
from cvmfs_inject.pack.options import CHUNK, PackOptions, Progress, Warn
from cvmfs_inject.pack.pipeline import Pipeline, Sink, steady_malloc
from cvmfs_inject.pack.walker import Entry, TreeWalker

# the walk's records held ahead of the packer (marshalled bytes; a record is about 200)
WALK_AHEAD = 2 << 20
# the walk's helpers begin once this many chunks found the compressor waiting for one
WALK_BOUND_CHUNKS = 16


@dataclass
class PackResult:
    diff_id: str
    tar_size: int
    entries: int = 0
    files: int = 0
    hardlinks: int = 0
    warnings: list[str] = field(default_factory=list)
    newest: int = 0  # the latest mtime in the layer, as packed


class _ChunkFiller:
    """Fills the pipeline's chunks with the tar stream, in walk order.

    Small files are read whole into the chunk being built (`os.readv`, no bytes object
    per read); every chunk but the last is exactly CHUNK bytes.
    """

    def __init__(self, pipeline: Pipeline, walker: TreeWalker,
                 progress: Progress | None) -> None:
        self.pipeline = pipeline
        self.walker = walker
        self.progress = progress
        self._reported_files = 0
        self.chunk = pipeline.take()
        self.view = memoryview(self.chunk)
        self.pos = 0
        self.files = 0
        self.lookahead: Lookahead | None = None
        self.digests: dict[str, str] | None = None  # content sha256 by path, when asked
        self.release_walk: Callable[[], None] | None = None  # FannedWalk.release
        self._idle_handovers = 0  # chunks handed to a compressor that was waiting for one

    def emit(self, data: bytes | bytearray) -> None:
        pos = self.pos
        end = pos + len(data)
        if end < CHUNK:
            self.view[pos:end] = data
            self.pos = end
            return
        with memoryview(data) as source:
            start = 0
            while start < len(source):
                count = min(CHUNK - self.pos, len(source) - start)
                self.view[self.pos:self.pos + count] = source[start:start + count]
                self.pos += count
                start += count
                if self.pos == CHUNK:
                    self._put()

    def _put(self) -> None:
        """Hand the chunk over and take an empty one; while the worker's queue is full,
        walk ahead instead of waiting. Every chunk but the last is exactly CHUNK bytes, so
        the compressor sees the stream cut at fixed offsets whatever the timing: ISA-L's
        output depends on where its input is cut, and the blob's digest must depend on the
        tar bytes alone."""
        lookahead = self.lookahead
        if lookahead is not None and lookahead.wants_more() and self.pipeline.full():
            lookahead.fill(self.pipeline.full)
        self._hand_over()
        self.chunk = self.pipeline.take()
        self.view = memoryview(self.chunk)
        self.pos = 0

    def _hand_over(self) -> None:
        if self.release_walk is not None and self.pipeline.idle():
            self._idle_handovers += 1
            if self._idle_handovers == WALK_BOUND_CHUNKS:  # the walk holds the packer up
                self.release_walk()
                self.release_walk = None
        self.pipeline.put(self.chunk, self.pos)
        if self.progress is not None:
            self.progress(self.pos, self.files - self._reported_files)
            self._reported_files = self.files

    def finish(self) -> None:
        self.emit(bytes(2 * BLOCK))
        if self.pos:
            self._hand_over()

    def root(self, tree: Path | None, mount: bytes) -> None:
        """The mount point's own entry: the tree root's mode and time (or 0755 at the epoch
        for `init`, which packs no tree)."""
        if tree is None:
            mtime, mode = self.walker.options.source_date_epoch or 0, 0o755
        else:
            st = check_tree(tree)
            mtime, mode = self.walker.options.clamp(st.st_mtime), stat.S_IMODE(st.st_mode)
            self.walker.newest = max(self.walker.newest, mtime)
        self.emit(self.walker.headers(mount + b"/", mode, 0, 0, 0, mtime, TYPE_DIR))

    def tree(self, plan: Iterator[Entry]) -> None:
        """Emit every entry in walk order, planned ahead or not."""
        lookahead = self.lookahead = Lookahead(plan)
        items = lookahead.items
        emit = self.emit
        while True:
            if items:
                planned = items.popleft()
                if isinstance(planned, bytes):
                    emit(lookahead.headers(planned))
                elif isinstance(planned, InputError):
                    raise planned
                else:
                    path, size = planned
                    lookahead.file(path)
                    self.copy_file(path, size)
                    self.files += 1
                continue
            item = next(plan, None)
            if item is None:
                break
            header, content, size = item
            emit(header)
            if content is not None:
                self.copy_file(content, size)
                self.files += 1

    def copy_file(self, path: str, size: int) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise InputError(f"{path}: cannot read: {exc.strerror}") from None
        sha = None if self.digests is None else hashlib.sha256()
        try:
            remaining = size
            while remaining:  # read straight into the chunk: no bytes object per read
                pos = self.pos
                try:
                    count = os.readv(fd, (self.view[pos:pos + min(remaining, CHUNK - pos)],))
                except OSError as exc:
                    raise InputError(f"{path}: cannot read: {exc.strerror}") from None
                if sha is not None:
                    sha.update(self.view[pos:pos + count])
                if not count:
                    raise InputError(f"{path}: file shrank while it was packed; pack a tree "
                                     "that is not being written to")
                remaining -= count
                self.pos = pos + count
                if self.pos == CHUNK:
                    self._put()
            if os.read(fd, 1):
                raise InputError(f"{path}: file grew while it was packed; pack a tree that "
                                 "is not being written to")
        finally:
            os.close(fd)
        if sha is not None:
            self.digests[path] = sha.hexdigest()  # type: ignore[index]
        padding = -size % BLOCK
        if padding:
            self.emit(ZEROS[:padding])


def pack(tree: Path | None, sink: Sink, options: PackOptions,
         progress: Progress | None = None, warn: Warn | None = None, *,
         plan: Callable[[TarHeaders], Iterator[Entry]] | None = None,
         digests: dict[str, str] | None = None) -> PackResult:
    """Write the layer for `tree` (the content of the mount point) into `sink`.

    `tree=None` packs the mount-point directory alone (what `init` appends). `plan` gives
    the entries below the mount point instead of a walk of the tree (a stack's delta);
    `digests`, when given, receives the sha256 of every file's content by its path.
    """
    warnings: list[str] = []

    def note(message: str) -> None:
        warnings.append(message)
        if warn:
            warn(message)

    steady_malloc()
    mount = options.mount_point.strip("/").encode()
    walker = TreeWalker(options, TarHeaders(), note)
    with contextlib.ExitStack() as scope:
        walk = None
        if plan is None and tree is not None:  # helpers forked before the pipeline's threads
            walk = scope.enter_context(FannedWalk(options, str(tree).rstrip("/") or "/", mount,
                                                  walker.record_of(), note,
                                                  ahead=WALK_AHEAD,
                                                  gated=True))
            walk.start()
        pipeline = Pipeline(sink, options)
        try:
            filler = _ChunkFiller(pipeline, walker, progress)
            filler.digests = digests
            filler.release_walk = walk.release if walk is not None else None
            filler.root(tree, mount)
            if plan is not None:
                filler.tree(plan(walker.headers))
            elif walk is not None:
                filler.tree(walker.entries_from(walk))
            filler.finish()
            diff_id = pipeline.finish()
        except BaseException:
            pipeline.cancel()
            raise
    return PackResult(diff_id, pipeline.size, walker.entries + 1, filler.files,
                      walker.hardlinks, warnings, walker.newest)


def check_tree(tree: Path) -> os.stat_result:
    """The tree's stat; an InputError a user can act on when it is not a directory."""
    try:
        st = os.stat(tree)
    except FileNotFoundError:
        raise InputError(f"{tree}: no such directory") from None
    except OSError as exc:
        raise InputError(f"{tree}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InputError(f"{tree}: not a directory (DIR is the content of the mount point)")
    return st

