"""inject and init: pack a tree and put it into every selected image, over any source and sink.

One algorithm whatever the backends (pypa/installer's `install(source, destination)`):
resolve the images, refuse what cannot work before any work, pack the layer into the sink's
store, edit the documents (pure), commit them bottom-up, and publish: blobs, manifests, the
tag last. Layout and registry-direct injection therefore give the same bytes.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvmfs_inject import __version__
from cvmfs_inject.image import backends
from cvmfs_inject.image.access import Access
from cvmfs_inject.image.commit import commit
from cvmfs_inject.image.edit import (
    EditResult,
    NewLayer,
    Stack,
    check_layer_count,
    edit_image,
    edit_stack,
    labelled_position,
    layer_media_type,
    stack_of,
)
from cvmfs_inject.image.sink import ImageSink, publish
from cvmfs_inject.image.source import Image, ImageSource, Resolved, resolve
from cvmfs_inject.leftover import done_with
from cvmfs_inject.oci.model import Descriptor
from cvmfs_inject.oci.refs import ImageRef
from cvmfs_inject.pack.options import PackOptions, Progress, Warn
from cvmfs_inject.pack.packer import PackResult, pack
from cvmfs_inject.paths import refuse_overlap
from cvmfs_inject.stack.continuation import continue_at
from cvmfs_inject.stack.diff import PendingScan
from cvmfs_inject.stack.options import StackOptions
from cvmfs_inject.stack.update import StackUpdate, StackUpdater, cycle_collection_paused

if TYPE_CHECKING:  # the registry modules load only for registry refs
    from cvmfs_inject.batch.packs import Prepacked
    from cvmfs_inject.image.remote import UploadProgress


@dataclass(frozen=True)
class LayerReport:
    """The injected layer; an unchanged image reports only its diff_id."""

    diff_id: str
    digest: str | None = None
    size: int | None = None
    compression: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class ImageReport:
    """What happened to one platform's image."""

    platform: str
    status: str
    manifest: str
    edit: EditResult | None = None
    stack: StackUpdate | None = None  # this platform's stack update, for a stacked inject

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"platform": self.platform, "status": self.status,
                                 "manifest": self.manifest}
        if self.edit is not None:
            found.update(position=self.edit.position, replaced=self.edit.old_diff_id)
        if self.stack is not None:
            found["stack"] = self.stack.to_json()
        return found


@dataclass(frozen=True)
class PackStats:
    entries: int
    files: int
    hardlinks: int
    tar_size: int
    seconds: float


@dataclass
class InjectReport:
    status: str  # injected, prepared, unchanged, already-prepared
    reference: str
    digest: str | None = None
    layer: LayerReport | None = None
    images: list[ImageReport] = field(default_factory=list)
    stats: PackStats | None = None
    warnings: list[str] = field(default_factory=list)
    destination: str | None = None  # where a registry image (or `run`) wrote the result
    pushed_digest: str | None = None  # the manifest digest there (the format may differ)
    stack: StackUpdate | None = None  # with --max-layers 2 or more, or on a stacked image
    written: int | None = None  # bytes of new blobs and documents the sink took

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"status": self.status, "reference": self.reference,
                                 "digest": self.digest}
        if self.layer is not None:
            found["layer"] = self.layer.to_json()
        found["images"] = [image.to_json() for image in self.images]
        if self.stats is not None:
            found["stats"] = dict(self.stats.__dict__)
        if self.stack is not None:
            found["stack"] = self.stack.to_json()
        found.update(warnings=self.warnings, destination=self.destination,
                     pushed_digest=self.pushed_digest, written=self.written)
        return {k: v for k, v in found.items() if v not in (None, [], {})}


def inject(source: ImageSource, sink: ImageSink, tree: Path | None, options: PackOptions, *,
           platform: str | None = None, init_only: bool = False,
           stack_options: StackOptions | None = None, prepacked: Prepacked | None = None,
           progress: Progress | None = None, warn: Warn | None = None,
           scanning: PendingScan | None = None) -> InjectReport:
    """Pack `tree` (None: the empty mount point, what `init` adds) into the images of
    `source` and write the result to `sink`. `prepacked`: the layer of `tree` with these
    options, packed already (`batch` packs a tree once for all its images). `scanning`:
    the tree's scan for a stacked update, begun by the caller (`scan_ahead`)."""
    if tree is not None:  # the layout written, or a registry sink's scratch store
        refuse_overlap(tree, sink.store.root)
    stack_options = stack_options or StackOptions()
    with contextlib.ExitStack() as scope:
        if scanning is None:
            scanning = scope.enter_context(scan_ahead(tree, options, stack_options, warn,
                                                      init_only=init_only))
        return _inject(source, sink, tree, options, platform, init_only, stack_options,
                       prepacked, progress, warn, scanning)


def scan_ahead(tree: Path | None, options: PackOptions, stack_options: StackOptions | None,
               warn: Warn | None, *, init_only: bool = False
               ) -> contextlib.AbstractContextManager[PendingScan | None]:
    """A stacked update scans the tree: begun first, its helpers walk while the registry
    client is imported, the image resolved and the stack's indexes loaded. It only reads
    the tree: what `inject` refuses (a tree holding the layout) is refused before any
    write all the same."""
    if tree is None or init_only or stack_options is None or stack_options.max_layers < 2:
        return contextlib.nullcontext()
    return PendingScan(tree, options, warn)


def _inject(source: ImageSource, sink: ImageSink, tree: Path | None, options: PackOptions,
            platform: str | None, init_only: bool, stack_options: StackOptions,
            prepacked: Prepacked | None, progress: Progress | None, warn: Warn | None,
            scanning: PendingScan | None) -> InjectReport:
    resolved = resolve(source, platform)
    reference = str(sink.ref)
    if tree is not None and stack_options.max_layers > 1 and sink.ref != source.ref:
        continued = continue_at(sink, resolved, platform)
        if continued is not None:  # DEST is this base with a stack: the stack goes on there
            source, resolved = continued
    stacks: dict[str, Stack] = {}
    for image in resolved.images:  # refuse before any work: bad labels, zstd into Docker
        where = f"{reference} ({image.platform})"
        labelled_position(image.config, where)
        check_layer_count(image.manifest, image.config, where)
        layer_media_type(image.manifest, options.compression)
        stacks[image.descriptor.digest] = stack_of(image.manifest, image.config, where)
    if init_only and all(_prepared(image) for image in resolved.images):
        return _unchanged(source, sink, resolved, InjectReport(
            "already-prepared", reference, resolved.top.digest))
    if tree is not None and not init_only and (
            stack_options.max_layers > 1 or any(len(s.diff_ids) > 1 for s in stacks.values())):
        with contextlib.ExitStack() as scope:
            pending = scanning or scope.enter_context(PendingScan(tree, options, warn))
            return _inject_stack(source, sink, pending, options, resolved, stacks,
                                 stack_options, progress, warn)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if prepacked is None:
            writer = stack.enter_context(sink.store.writer())
            packed = pack(tree, writer, options, progress=progress, warn=warn)
            layer = NewLayer(packed.diff_id, writer.peek_digest(), writer.size,
                             options.compression, options.mount_point)
        else:
            packed, layer = prepacked.packed, prepacked.layer
        edits = _edit_all(resolved.images, layer, options, init_only, reference)
        if not any(edits.values()):
            return _unchanged(source, sink, resolved, InjectReport(
                "unchanged", reference, resolved.top.digest, LayerReport(layer.diff_id),
                warnings=packed.warnings))
        if prepacked is None:
            writer.commit()
        else:
            prepacked.place(sink.store)
    new_top, replaced = commit(sink.store, resolved, edits)
    if sink.ref != source.ref and sink.holds(new_top):  # the destination has it already
        return _published(InjectReport(
            "unchanged", reference, new_top.digest, LayerReport(layer.diff_id),
            warnings=packed.warnings), sink)
    publish(sink, source, new_top)
    return _published(InjectReport(
        "prepared" if init_only else "injected", reference, new_top.digest,
        LayerReport(layer.diff_id, layer.digest, layer.size, layer.compression),
        [_image_report(image, edits, replaced) for image in resolved.images],
        _stats(packed, started), packed.warnings,
        written=_written(sink, [layer], resolved, edits, replaced, new_top)), sink)


def _stack_updates(updater: StackUpdater, resolved: Resolved, stacks: dict[str, Stack]
                   ) -> dict[str, StackUpdate]:
    """Each image's stack update, by manifest digest (platforms may differ)."""
    return {image.descriptor.digest: updater.update(image, stacks[image.descriptor.digest])
            for image in resolved.images}


def _inject_stack(source: ImageSource, sink: ImageSink, scan: PendingScan,
                  options: PackOptions, resolved: Resolved, stacks: dict[str, Stack],
                  stack_options: StackOptions, progress: Progress | None, warn: Warn | None
                  ) -> InjectReport:
    """`inject` with the mount point's content kept as a stack of layers (`stack.update`)."""
    started = time.monotonic()
    reference = str(sink.ref)
    notes = scan.notes
    created_by = f"cvmfs-inject {__version__} inject --path {options.mount_point}"
    edits: dict[str, EditResult | None] = {}
    sink.prepare_check()
    with cycle_collection_paused():  # what the updates are done with goes inside it too
        updater = StackUpdater(source, sink.store, scan, options, stack_options, progress,
                               warn)
        updates = _stack_updates(updater, resolved, stacks)
        done_with(updater, scan.release())
        del updater
    for image in resolved.images:
        stack, where = stacks[image.descriptor.digest], f"{reference} ({image.platform})"
        update = updates[image.descriptor.digest]
        if update.action == "unchanged":
            edits[image.descriptor.digest] = None
        elif update.count == 1 and update.layers and len(stack.diff_ids) <= 1:
            edits[image.descriptor.digest] = edit_image(  # a single layer: as without a stack
                image.manifest, image.config, update.layers[0], created_by=created_by,
                epoch=options.source_date_epoch, where=where)
        else:
            edits[image.descriptor.digest] = edit_stack(
                image.manifest, image.config, stack, update.keep, update.layers,
                update.comments, created_by=created_by, epoch=options.source_date_epoch,
                where=where)
    # the report's stack: the first image that changed (all of them, when they share it)
    update = next((u for u in updates.values() if u.action != "unchanged"),
                  next(iter(updates.values())))
    if not any(edits.values()):
        report = InjectReport("unchanged", reference, resolved.top.digest,
                              warnings=notes, stack=update)
        return _unchanged(source, sink, resolved, report)
    new_top, replaced = commit(sink.store, resolved, edits)
    publish(sink, source, new_top)
    layer = update.layers[-1] if update.layers else None
    written = _written(sink, [new for u in updates.values() for new in u.layers], resolved,
                       edits, replaced, new_top)
    images = [_image_report(image, edits, replaced) for image in resolved.images]
    for image, image_report in zip(resolved.images, images, strict=True):
        image_report.stack = updates[image.descriptor.digest]
    report = InjectReport(
        "injected", reference, new_top.digest,
        None if layer is None else LayerReport(layer.diff_id, layer.digest, layer.size,
                                               layer.compression),
        images, None if update.packed is None else _stats(update.packed, started), notes,
        stack=update, written=written)
    return _published(report, sink)


def _written(sink: ImageSink, layers: list[NewLayer], resolved: Resolved,
             edits: dict[str, EditResult | None], replaced: dict[str, Descriptor],
             new_top: Descriptor) -> int:
    """Bytes the sink took: what a registry sink counted as sent, else the new layers
    and documents written into the layout."""
    uploaded = getattr(sink, "uploaded", None)
    if uploaded is not None:
        return int(uploaded)
    written = sum({layer.digest: layer.size for layer in layers}.values()) + sum(
        desc.size + edit.manifest["config"]["size"] for digest, desc in replaced.items()
        if (edit := edits[digest]) is not None)
    return written + (new_top.size if resolved.index is not None else 0)


def _prepared(image: Image) -> bool:
    return labelled_position(image.config, "")[0] is not None


def _unchanged(source: ImageSource, sink: ImageSink, resolved: Resolved,
               report: InjectReport) -> InjectReport:
    """Nothing to edit: the image goes to the sink as it is, unless that is where it is."""
    if sink.ref == source.ref:
        return report
    publish(sink, source, resolved.top)
    return _published(report, sink)


def _published(report: InjectReport, sink: ImageSink) -> InjectReport:
    if sink.ref.is_registry:
        report.destination, report.pushed_digest = str(sink.ref), report.digest
    return report


def _edit_all(images: list[Image], layer: NewLayer, options: PackOptions, init_only: bool,
              reference: str) -> dict[str, EditResult | None]:
    verb = "init" if init_only else "inject"
    created_by = f"cvmfs-inject {__version__} {verb} --path {options.mount_point}"
    edits: dict[str, EditResult | None] = {}
    for image in images:
        if init_only and _prepared(image):
            edits[image.descriptor.digest] = None
            continue
        edits[image.descriptor.digest] = edit_image(
            image.manifest, image.config, layer, created_by=created_by,
            epoch=options.source_date_epoch, where=f"{reference} ({image.platform})")
    return edits


def _image_report(image: Image, edits: dict[str, EditResult | None],
                  replaced: dict[str, Any]) -> ImageReport:
    edit = edits[image.descriptor.digest]
    if edit is None:
        return ImageReport(image.platform, "unchanged", image.descriptor.digest)
    return ImageReport(image.platform, "injected", replaced[image.descriptor.digest].digest,
                       edit)


def _stats(packed: PackResult, started: float) -> PackStats:
    return PackStats(packed.entries, packed.files, packed.hardlinks, packed.tar_size,
                     round(time.monotonic() - started, 3))


def inject_ref(ref: ImageRef, tree: Path | None, options: PackOptions, access: Access, *,
               dest: ImageRef | None = None, new_tag: str | None = None,
               platform: str | None = None, via_layout: bool = False, init_only: bool = False,
               stack_options: StackOptions | None = None, prepacked: Prepacked | None = None,
               progress: Progress | None = None, warn: Warn | None = None,
               upload_progress: UploadProgress | None = None) -> InjectReport:
    """`inject`/`init` on a reference: a layout in place, a registry image registry-direct,
    or (`via_layout`) pulled into a temporary layout, edited and pushed back."""
    if ref.is_registry and via_layout:
        from cvmfs_inject.commands.run import run

        target = backends.destination(ref, dest, new_tag)
        return run(ref, tree, target, access, options, platform=platform,
                   stack_options=stack_options, prepacked=prepacked, progress=progress,
                   warn=warn, init_only=init_only)
    with scan_ahead(tree, options, stack_options, warn, init_only=init_only) as scanning, \
            backends.editing(ref, access, dest=dest, new_tag=new_tag,
                             upload_progress=upload_progress) as (source, sink):
        return inject(source, sink, tree, options, platform=platform, init_only=init_only,
                      stack_options=stack_options, prepacked=prepacked, progress=progress,
                      warn=warn, scanning=scanning)
