"""batch: one tree into many images. Each tree is packed once per set of pack options, the
images are done in parallel (registry to registry directly, archives through a working
layout), and each new blob goes up once per registry (`registry.ledger`: the other
repositories mount it). One failing image does not stop the others; each gets a result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvmfs_inject import scratch
from cvmfs_inject.batch.packs import Prepacked, pack_once
from cvmfs_inject.batch.plan import Job, Plan
from cvmfs_inject.commands.inject import InjectReport
from cvmfs_inject.commands.run import run_ref
from cvmfs_inject.errors import failure
from cvmfs_inject.image.access import Access
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.pack.options import Progress, Warn
from cvmfs_inject.paths import refuse_overlap

# progress for packing a tree: a context giving the packer's callback (or None)
Packing = Callable[[Path], AbstractContextManager[Progress | None]]


def default_jobs() -> int:
    """Images at once: they mostly wait on registries and skopeo, so twice the cores, at
    most 8 (each holds a connection pool and, through a layout, a skopeo process)."""
    return max(1, min(8, 2 * (os.cpu_count() or 1)))


@dataclass
class ImageResult:
    number: int
    source: str
    destination: str
    platforms: str
    status: str  # updated, unchanged, failed; planned with --dry-run
    digest: str | None = None
    uploaded: int | None = None  # bytes sent registry-direct; None when skopeo pushed
    error: str | None = None
    exit_code: int = 0

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class BatchReport:
    plan: str
    packed: list[str] = field(default_factory=list)  # diff_ids of the layers packed
    images: list[ImageResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[ImageResult]:
        return [image for image in self.images if image.status == "failed"]

    def to_json(self) -> dict[str, Any]:
        return {"plan": self.plan, "packed": self.packed,
                "images": [image.to_json() for image in self.images],
                "failed": len(self.failed), "seconds": self.seconds}


def batch(plan: Plan, jobs: list[Job], access: Access, *, workers: int,
          cache: str | None = None, dry_run: bool = False, packing: Packing | None = None,
          warn: Warn | None = None, on_result: Callable[[ImageResult], None] | None = None
          ) -> BatchReport:
    """Do `jobs` (the plan's, or a shard of them); a result for every one."""
    started = time.monotonic()
    report = BatchReport(str(plan.path))
    if dry_run:
        report.images = [_result(job, "planned") for job in jobs]
        return report
    if any(job.src.is_registry or job.dest.is_registry for job in jobs):
        access.credentials()  # read stdin now, once, before the images run in threads
    with _packing_area(cache, access) as area:
        packs, failures = _pack_all(jobs, Layout.create(area / "packs"), packing, warn)
        report.packed = [prepacked.layer.diff_id for prepacked in packs.values()]
        results = dict(failures)
        for result in results.values():
            if on_result:
                on_result(result)
        runnable = [job for job in jobs if job.number not in results]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batch") as pool:
            futures = {pool.submit(_do, job, packs.get(job.pack_key), access, cache,
                                   warn): job for job in runnable}
            try:
                for future in as_completed(futures):
                    result = future.result()
                    results[result.number] = result
                    if on_result:
                        on_result(result)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    report.images = [results[job.number] for job in jobs]
    report.seconds = round(time.monotonic() - started, 3)
    return report


@contextlib.contextmanager
def _packing_area(cache: str | None, access: Access) -> Iterator[Path]:
    """Where the packed layers wait: inside the layout cache's temp area when there is one
    (so they are hard-linked into it, not copied, and nothing lands beside it), held under
    the cache's use lock so no other command clears that area meanwhile; else in $TMPDIR."""
    with contextlib.ExitStack() as stack:
        parent = None
        if cache is not None:
            layout = stack.enter_context(Layout.create(cache, access.layout_wait).writing())
            layout.tmp_dir.mkdir(exist_ok=True)
            parent = layout.tmp_dir
        directory = scratch.make_directory("batch", parent)
        try:
            yield Path(directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def _pack_all(jobs: list[Job], store: Layout, packing: Packing | None, warn: Warn | None
              ) -> tuple[dict[tuple[object, ...], Prepacked], dict[int, ImageResult]]:
    """Each tree once per set of pack options (stacked images pack their own deltas);
    a tree that cannot be packed fails its images, not the batch."""
    packs: dict[tuple[object, ...], Prepacked] = {}
    failures: dict[int, ImageResult] = {}
    for job in jobs:
        key = job.pack_key
        if job.stack.max_layers > 1 or key in packs:
            continue
        try:
            refuse_overlap(job.tree, store.root)
            with packing(job.tree) if packing else contextlib.nullcontext() as progress:
                packs[key] = pack_once(job.tree, job.options, store, progress, warn)
        except Exception as exc:  # every failure becomes its images' result
            for other in jobs:
                if other.pack_key == key and other.stack.max_layers == 1:
                    failures[other.number] = _failed(other, exc)
    return packs, failures


def _do(job: Job, prepacked: Prepacked | None, access: Access, cache: str | None,
        warn: Warn | None) -> ImageResult:
    """One image; every error becomes its result."""
    direct = job.src.is_registry and job.dest.is_registry and job.manifest_format == "keep"
    options = job.options
    if prepacked is not None and options.source_date_epoch is None:
        # the images' time is the tree's newest mtime (which clamps nothing): the same
        # plan on the same tree and bases gives the same digests, so a re-run does nothing
        options = dataclasses.replace(options, source_date_epoch=prepacked.packed.newest)
    try:
        report = run_ref(job.src, job.tree, job.dest, access, options,
                         cache=None if direct else cache, platform=job.platform,
                         manifest_format=job.manifest_format, via_layout=not direct,
                         stack_options=job.stack, prepacked=prepacked, warn=warn)
    except Exception as exc:  # one image's failure must not stop the others
        return _failed(job, exc)
    return _done(job, report, direct)


def _failed(job: Job, exc: Exception) -> ImageResult:
    """`job`'s result for a failure, worded as the CLI would report it for one image."""
    message, code = failure(exc)
    return _result(job, "failed", error=message, exit_code=code)


def _done(job: Job, report: InjectReport, direct: bool) -> ImageResult:
    status = "unchanged" if report.status == "unchanged" else "updated"
    uploaded = (report.written or 0) if direct and status == "updated" else (
        0 if status == "unchanged" else None)
    return _result(job, status, digest=report.pushed_digest or report.digest,
                   uploaded=uploaded)


def _result(job: Job, status: str, **fields: Any) -> ImageResult:
    return ImageResult(job.number, str(job.src), str(job.dest),
                       ", ".join(job.platforms) or "all", status, **fields)
