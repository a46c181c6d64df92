"""Choosing the backends from the references: library code, so commands and tests share it.

A layout is read and written in place (under its lock); a registry image is read and
written over the registry API (registry-direct); an archive, or a registry image when the
user asks for the layout path, is first copied by skopeo into a temporary layout.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from cvmfs_inject import scratch
from cvmfs_inject.errors import InputError, UsageError
from cvmfs_inject.image.access import Access
from cvmfs_inject.image.layout import LayoutSink, LayoutSource
from cvmfs_inject.image.sink import ImageSink
from cvmfs_inject.image.source import ImageSource
from cvmfs_inject.layout.archive import delta_note
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.refs import ImageRef, check_tag

if TYPE_CHECKING:  # the registry modules (requests) load only for registry refs
    from cvmfs_inject.image.remote import UploadProgress


@contextmanager
def reading(ref: ImageRef, access: Access, *, platform: str | None = None,
            all_platforms: bool = False, via_layout: bool = False) -> Iterator[ImageSource]:
    """A source for any reference; blobs are checked as they are read.

    A copy into a temporary layout holds every platform of an index with `all_platforms`,
    else `platform` or, without one, the host's (skopeo's choice)."""
    if ref.transport == "oci":
        layout = Layout.open(ref.path, access.layout_wait)
        with layout.lock(exclusive=False):
            yield LayoutSource(layout, ref)
    elif ref.is_registry and not via_layout:
        from cvmfs_inject.image.remote import RemoteSource

        with access.client(ref) as client:
            yield RemoteSource(client, ref)
    else:
        if not ref.is_registry and not os.path.isfile(ref.path):
            raise InputError(f"{ref.path}: no such archive file")
        if ref.transport == "oci-archive":
            _refuse_delta(Path(ref.path))
        with scratch.temporary_directory("copy") as directory:
            copy = ImageRef("oci", os.path.join(directory, "layout"), "copy")
            access.skopeo(ref).copy(ref, copy, all_images=all_platforms, platform=platform)
            yield LayoutSource(Layout.open(copy.path), copy)


def _refuse_delta(archive: Path) -> None:
    """skopeo cannot read a delta archive (`push --since`): it lacks the old image's blobs."""
    note = delta_note(archive)
    if note is not None:
        raise UsageError(f"{note}: pull it into a layout that holds that image, and use the "
                         "layout")


def destination(src: ImageRef, dest: ImageRef | None, new_tag: str | None) -> ImageRef:
    """Where a registry-direct edit of `src` goes: `dest`, `src` under `new_tag`, or `src`."""
    if dest is not None:
        if not dest.is_registry:
            raise UsageError(f"--dest {dest}: registry-direct mode writes to docker://; use "
                             "`run` for archives")
        if new_tag is not None:
            raise UsageError("--tag and --dest exclude each other: put the tag in --dest")
        if dest.digest:
            raise UsageError(f"--dest {dest}: name a tag, not a digest")
        return dest
    if new_tag is not None:
        return ImageRef("docker", src.path, check_tag(new_tag, registry=True))
    if src.digest:
        raise UsageError(f"{src} names a digest: give --tag or --dest for the result")
    return src


@contextmanager
def editing(ref: ImageRef, access: Access, *, dest: ImageRef | None = None,
            new_tag: str | None = None, upload_progress: UploadProgress | None = None
            ) -> Iterator[tuple[ImageSource, ImageSink]]:
    """The source an edit reads and the sink it writes: the same layout (under its writer
    lock), or a registry image and its destination (with a scratch store for new blobs)."""
    if ref.transport == "oci":
        if new_tag is not None:
            check_tag(new_tag, registry=False)
        if dest is not None:
            raise UsageError("--dest is for registry images; for a layout use --tag")
        layout = Layout.open(ref.path, access.layout_wait)
        with layout.writing():
            tag = ref.tag or layout.resolve(None).ref_name
            if not tag:
                raise UsageError(f"{ref}: the image has no tag in index.json; name one as "
                                 "DIR:TAG")
            yield (LayoutSource(layout, ref.with_tag(tag)),
                   LayoutSink(layout, ref.with_tag(new_tag or tag)))
    elif ref.is_registry:
        from cvmfs_inject.image.remote import RegistrySink, RemoteSource, no_progress

        target = destination(ref, dest, new_tag)
        with contextlib.ExitStack() as stack:
            src_client = stack.enter_context(access.client(ref))
            dest_client = (src_client if target.registry == ref.registry
                           else stack.enter_context(access.client(target)))
            directory = stack.enter_context(scratch.temporary_directory("direct"))
            store = Layout.create(Path(directory) / "layout")
            yield (RemoteSource(src_client, ref),
                   RegistrySink(dest_client, target, store, upload_progress or no_progress,
                                access.ledger))
    else:
        raise UsageError(f"{ref}: inject edits a local layout (oci:DIR[:TAG]) or a registry "
                         "image (docker://); use `run` for archives")
