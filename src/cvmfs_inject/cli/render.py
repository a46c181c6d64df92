"""Everything the CLI prints, in one place: stdout for results, stderr for the rest.

`--json` keeps stdout for one JSON document; progress bars appear only when stderr is a
terminal and `--quiet` is off, so pipes and CI logs never see control characters.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvmfs_inject import PROG
from cvmfs_inject.pack.headers import BLOCK

if TYPE_CHECKING:
    from cvmfs_inject.commands.batch import BatchReport, ImageResult
    from cvmfs_inject.commands.inject import InjectReport
    from cvmfs_inject.commands.inspect import InspectReport



def estimate_tar_size(tree: Path) -> tuple[int, int]:
    """A cheap pre-scan for the progress bar's totals: tar bytes (headers plus padded file
    sizes) and regular files."""
    total = files = 0
    seen: set[tuple[int, int]] = set()
    stack = [str(tree)]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    st = entry.stat(follow_symlinks=False)
                    total += BLOCK
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(entry.path)
                    elif stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                        files += 1
                        if st.st_nlink > 1:
                            seen.add((st.st_dev, st.st_ino))
                        total += -(-st.st_size // BLOCK) * BLOCK
        except OSError:
            continue
    return total, files


def _bar() -> Any:
    """A transient rich progress display on stderr; rich is imported only when a bar is
    shown: most runs (CI, Makefiles) never need it."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(TextColumn("{task.description:9}"), BarColumn(), DownloadColumn(),
                    TextColumn("{task.fields[detail]}"), TransferSpeedColumn(),
                    TimeRemainingColumn(),
                    console=Console(stderr=True, highlight=False, soft_wrap=True),
                    transient=True)


class StdoutClosed(Exception):
    """The reader of our stdout went away (`inspect | head`)."""


def _to_stdout(text: str) -> None:
    try:
        print(text, file=sys.stdout, flush=True)
    except BrokenPipeError:
        raise StdoutClosed from None


# control characters (C0, DEL, C1) as escapes: a message is one line, and a registry's
# or a file name's bytes never drive the terminal
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def one_line(message: str) -> str:
    """`message` as one line of printable text (`\\n`, `\\x1b` for what is not)."""
    return _CONTROL.sub(lambda m: _ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}"),
                        message)


class Reporter:
    def __init__(self, quiet: bool = False, json_mode: bool = False) -> None:
        self.quiet = quiet
        self.json_mode = json_mode
        self._active: Any = None  # the rich Progress on screen, if any

    def line(self, message: str) -> None:
        """A human result line on stdout; none under --quiet or --json (which prints one
        JSON document instead). Warnings and errors still go to stderr."""
        if self.quiet or self.json_mode:
            return
        _to_stdout(message)

    human = line

    def warn(self, message: str) -> None:
        if not self.quiet:
            print(f"{PROG}: warning: {one_line(message)}", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        """Something the user should know while the command goes on (on stderr)."""
        print(f"{PROG}: {one_line(message)}", file=sys.stderr, flush=True)

    def error_line(self, message: str) -> None:
        print(one_line(message), file=sys.stderr, flush=True)

    def fatal(self, message: str) -> None:
        print(f"{PROG}: error: {one_line(message)}", file=sys.stderr, flush=True)

    def emit(self, result: Any) -> None:
        _to_stdout(json.dumps(result, indent=2, ensure_ascii=False, default=str))

    @contextlib.contextmanager
    def packing(self, tree: Path) -> Iterator[Callable[[int, int], None] | None]:
        if self.quiet or not sys.stderr.isatty() or not tree.is_dir():
            yield None
            return
        total_bytes, total_files = estimate_tar_size(tree)
        progress = _bar()
        task = progress.add_task("packing", total=total_bytes,
                                 detail=f"0/{total_files:,} files")
        done_files = 0

        def advance(tar_bytes: int, files: int) -> None:
            nonlocal done_files
            done_files += files
            progress.update(task, advance=tar_bytes,
                            detail=f"{done_files:,}/{total_files:,} files")

        with progress:
            self._active = progress
            try:
                yield advance
            finally:
                self._active = None

    @contextlib.contextmanager
    def uploading(self, total: int) -> Iterator[Callable[[int], None] | None]:
        """A bar for a registry-direct upload, on a terminal only."""
        if self.quiet or not sys.stderr.isatty() or total < (1 << 20):
            yield None
            return
        if self._active is not None:  # one live display at a time: add a line to it
            active = self._active
            task_id = active.add_task("uploading", total=total, detail="")
            try:
                yield lambda sent: active.advance(task_id, sent)
            finally:
                active.remove_task(task_id)
            return
        progress = _bar()
        task = progress.add_task("uploading", total=total, detail="")
        with progress:
            yield lambda sent: progress.advance(task, sent)

    def inject_summary(self, report: InjectReport) -> None:
        layer, stats, stack = report.layer, report.stats, report.stack
        if report.status == "unchanged" and stack is not None:
            self.line(f"{report.reference}: unchanged (the image's stack of {stack.count} "
                      "layer(s) already holds this tree)")
            return
        if report.status == "unchanged" and layer is not None:
            self.line(f"{report.reference}: unchanged (the image already holds this tree, "
                      f"{layer.diff_id})")
            return
        if stack is not None:
            # counted as uploaded by a registry sink; `run` through a layout counts what it
            # wrote there (skopeo pushes the image on, whole for an archive)
            moved = "uploaded" if report.destination == report.reference else "written"
            self.line(f"stack: {stack.action}, {stack.count} layer(s); files +{stack.added} "
                      f"~{stack.changed} -{stack.removed}; {report.written or 0:,} B {moved}"
                      + (f"; {stack.downloaded:,} B of layers read to rebuild indexes"
                         if stack.downloaded else ""))
        if layer is None or layer.size is None or stats is None:
            return
        tar_size = stats.tar_size
        seconds = max(stats.seconds, 1e-6)
        ratio = layer.size / tar_size if tar_size else 0.0
        self.line(f"{report.reference}: injected {layer.diff_id}")
        rate = tar_size / seconds / 1e6
        files = f"{stats.files:,} file{'' if stats.files == 1 else 's'}"
        self.line(f"layer {layer.digest}: {layer.size:,} B {layer.compression} "
                  f"({ratio:.1%} of {tar_size:,} B tar, {files}) in "
                  f"{seconds:.2f} s, {rate:.{0 if rate >= 10 else 1}f} MB/s; "
                  f"image {report.digest}")


    def batch_line(self, result: ImageResult) -> None:
        """One line per image as it finishes, on a terminal (the table follows at the end)."""
        if sys.stderr.isatty() and not self.quiet and result.status != "planned":
            self.note(f"[{result.number}] {result.destination}: {result.status}"
                      + (f": {result.error}" if result.error else ""))

    def batch_table(self, report: BatchReport) -> None:
        rows = [("#", "image", "platforms", "result", "digest", "uploaded")]
        for r in report.images:
            outcome = r.status if r.error is None else f"failed: {one_line(r.error)}"
            uploaded = "-" if r.uploaded is None else f"{r.uploaded:,} B"
            rows.append((str(r.number), f"{r.source} -> {r.destination}", r.platforms,
                         outcome, (r.digest or "-")[:19], uploaded))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            self.line("  ".join(cell.ljust(width) for cell, width in zip(row, widths,
                                                                         strict=False))
                      + "  " + row[-1])
        if report.packed:
            self.line(f"packed {len(report.packed)} layer(s) once for "
                      f"{len(report.images)} image(s) in {report.seconds:.2f} s")


def format_inspect(report: InspectReport) -> str:
    """`inspect` for a person: one fact a line."""
    lines = [f"{report.reference}  {report.media_type}", f"  digest {report.digest}"]
    if report.tags is not None:
        tags = ", ".join(report.tags) or "(none)"
        lines.append(f"  tags: {tags} (every tag of the layout, as skopeo's RepoTags)")
    for info in report.images:
        image, config = info.image, info.image.config
        lines.append(f"  image {image.platform}  manifest {image.descriptor.digest}")
        lines.append(f"    config {image.manifest.config.digest}  created "
                     f"{config.doc.get('created')}")
        roles = {layer.position: layer for layer in info.stack}
        for i, layer in enumerate(info.layers):
            mark = "  <- injected" if info.injected and info.injected[0] == i else ""
            if i in roles:
                mark = f"  <- stack {roles[i].role}"
            lines.append(f"    layer {i}: {layer.media_type} {layer.size:,} B "
                         f"{layer.digest}{mark}")
            lines.append(f"             diff_id {layer.diff_id}")
            if i in roles and roles[i].comment:
                lines.append(f"             {roles[i].comment}")
        for key, value in sorted(config.labels.items()):
            lines.append(f"    label {key}={value}")
        for entry in config.history:
            created_by = str(entry.get("created_by", ""))[:100]
            empty = " (empty)" if entry.get("empty_layer") else ""
            lines.append(f"    history {entry.get('created', '')} {created_by}{empty}")
    return "\n".join(lines)
