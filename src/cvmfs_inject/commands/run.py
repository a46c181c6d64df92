"""run: the one call a Makefile makes. pull, inject, validate, push; or, registry to
registry, the same edit registry-direct."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from cvmfs_inject import scratch
from cvmfs_inject.commands.inject import InjectReport, inject, inject_ref, scan_ahead
from cvmfs_inject.commands.pull import default_tag, pull, source_format
from cvmfs_inject.commands.push import archive_path, check_format, push
from cvmfs_inject.commands.validate import validate_ref
from cvmfs_inject.errors import UsageError, ValidationFailed
from cvmfs_inject.image import backends
from cvmfs_inject.image.access import Access
from cvmfs_inject.layout.archive import delta_note, same_archive
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci import names
from cvmfs_inject.oci.refs import ImageRef, check_tag
from cvmfs_inject.pack.options import PackOptions, Progress, Warn
from cvmfs_inject.pack.packer import check_tree
from cvmfs_inject.paths import refuse_overlap
from cvmfs_inject.stack.options import StackOptions

if TYPE_CHECKING:
    from cvmfs_inject.batch.packs import Prepacked
    from cvmfs_inject.image.remote import UploadProgress


def run_ref(src: ImageRef, tree: Path, dest: ImageRef, access: Access, options: PackOptions,
            *, cache: str | None = None, new_tag: str | None = None,
            platform: str | None = None, manifest_format: str = "keep",
            via_layout: bool = False, stack_options: StackOptions | None = None,
            prepacked: Prepacked | None = None, progress: Progress | None = None,
            warn: Warn | None = None, upload_progress: UploadProgress | None = None
            ) -> InjectReport:
    """Registry to registry without a layout (`cache`) or `via_layout`: registry-direct,
    keeping each manifest's format. Otherwise through a layout (`run`)."""
    if src.is_registry and dest.is_registry and not via_layout and cache is None:
        if manifest_format != "keep":
            raise UsageError("--format converts through a layout: add --via-layout")
        check_tree(tree)
        with scan_ahead(tree, options, stack_options, warn) as scanning, \
                backends.editing(src, access, dest=dest,
                                 upload_progress=upload_progress) as (source, sink):
            return inject(source, sink, tree, options, platform=platform,
                          stack_options=stack_options, prepacked=prepacked,
                          progress=progress, warn=warn, scanning=scanning)
    return run(src, tree, dest, access, options, cache=cache, new_tag=new_tag,
               platform=platform, manifest_format=manifest_format,
               stack_options=stack_options, prepacked=prepacked, progress=progress, warn=warn)


def run(src: ImageRef, tree: Path | None, dest: ImageRef, access: Access,
        options: PackOptions, *, cache: str | None = None, new_tag: str | None = None,
        platform: str | None = None, manifest_format: str = "keep",
        stack_options: StackOptions | None = None, prepacked: Prepacked | None = None,
        progress: Progress | None = None, warn: Warn | None = None,
        init_only: bool = False) -> InjectReport:
    """pull -> inject -> validate -> push, through a working layout.

    The working layout is CACHE when given (kept, so later runs reuse its blobs), else a
    temporary directory removed at the end. Nothing is pushed unless validation passed.
    """
    if dest.transport == "oci":
        raise UsageError(f"run pushes to a registry or an archive, not to {dest}: use `pull` "
                         "and `inject` to edit a layout")
    if new_tag is not None:
        check_tag(new_tag, registry=False)  # the working layout's tag
    if tree is not None:
        check_tree(tree)
        if cache is not None:
            refuse_overlap(tree, Path(cache))
    if src.transport == "oci-archive" and cache is None:
        note = delta_note(Path(src.path))
        if note is not None:  # completed from the working layout: a temporary one is empty
            raise UsageError(f"{note}: give --layout CACHE, a layout that holds that image")
    check_format(manifest_format, dest)
    if not dest.is_registry:
        archive_path(dest)  # refused before any work: a directory, a layout's file
    fmt = source_format(src, access.skopeo(src))
    pushed_as_docker = dest.transport == "docker-archive" or (
        dest.transport != "oci-archive"
        and (manifest_format == "v2s2" or (manifest_format == "keep" and fmt == "v2s2")))
    if pushed_as_docker and options.compression != "gzip":
        raise UsageError(f"--compress {options.compression} cannot go into a Docker v2s2 image "
                         f"(Docker layers are gzip only) and {dest} will be Docker v2s2: use "
                         "--compress gzip, or --format oci with a registry or oci-archive: "
                         "destination")
    final = new_tag if new_tag is not None else default_tag(src)
    if not names.REF_NAME.match(final):  # a registry tag a layout cannot hold: the cache's
        final = "latest"  # tag is this run's own business
    with contextlib.ExitStack() as stack:
        if cache is None:
            working_dir = stack.enter_context(scratch.temporary_directory("run"))
            cache = os.path.join(working_dir, "layout")
        # A tag of its own in the cache: parallel runs (make -j) sharing the cache, even
        # with the same source, never see each other's images. The result takes the final
        # tag when it has been pushed.
        working = ImageRef("oci", cache, f"{final}.run-{os.getpid()}-{secrets.token_hex(4)}")
        pulled = pull(src, working, access, all_images=True, known_format=fmt)
        layout = Layout.open(cache, access.layout_wait)
        stack.callback(layout.remove_tag, pulled.tag)
        report = inject_ref(working, tree, options, access, platform=platform,
                            stack_options=stack_options, prepacked=prepacked,
                            progress=progress, warn=warn, init_only=init_only)
        report.reference = str(working.with_tag(final))
        layer = report.layer
        packed = {layer.digest: layer.diff_id} if layer is not None and layer.digest else {}
        problems = validate_ref(working, access, packed=packed)
        if problems:
            raise ValidationFailed(f"{working}: the injected image does not validate: "
                                   f"{problems[0]} ({len(problems)} problem(s))")
        report.destination = str(dest)
        if dest.is_registry or not os.path.exists(dest.path):
            report.pushed_digest = push(working, dest, access, manifest_format=manifest_format)
        elif _push_archive_if_changed(working, dest, access, manifest_format, report):
            report.status = "unchanged"  # the archive there holds this image already
        layout.set_tag(final, layout.resolve(working.tag))
        return report


def _push_archive_if_changed(working: ImageRef, dest: ImageRef, access: Access,
                             manifest_format: str, report: InjectReport) -> bool:
    """Write the archive beside the existing one; keep the old file (and say so: True)
    when it holds the same image, so an unchanged image leaves the file as it was."""
    directory, name = os.path.split(archive_path(dest))
    fd, tmp = scratch.make_file("archive", directory, before=f".{name}.", suffix=".new")
    os.close(fd)
    try:
        fresh = ImageRef(dest.transport, tmp, dest.tag)
        report.pushed_digest = push(working, fresh, access, manifest_format=manifest_format)
        if same_archive(dest.transport, tmp, dest.path):
            return True
        os.replace(tmp, dest.path)
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
