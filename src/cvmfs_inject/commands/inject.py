"""init, inject, unpack and run on a local layout: resolve, pack, edit, then commit bottom-up.

The order of writes is what makes a killed inject harmless: the layer blob, then each
config, each manifest, the index blob, and `index.json` last, all under the layout lock.
Until `index.json` is replaced, nothing that a reader can reach has changed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cvmfs_inject import __version__
from cvmfs_inject.commands.ops import default_tag, pull, push, source_format
from cvmfs_inject.errors import InputError, UsageError, ValidationFailed
from cvmfs_inject.image.edit import (
    LABEL_MOUNT,
    NewLayer,
    edit_image,
    injected_position,
    layer_media_type,
    with_config,
)
from cvmfs_inject.image.refs import ImageRef
from cvmfs_inject.image.source import Image, ImageSource, LayoutSource, load_images
from cvmfs_inject.layout import original
from cvmfs_inject.layout.blobs import READ_CHUNK
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.jsondoc import canonical_json
from cvmfs_inject.oci.model import Descriptor
from cvmfs_inject.pack.extract import decompressed, extract
from cvmfs_inject.pack.options import PackOptions, Progress
from cvmfs_inject.pack.packer import pack
from cvmfs_inject.skopeo.command import Skopeo

Warn = Callable[[str], None]


@dataclass
class InjectReport:
    status: str
    reference: str
    digest: str | None = None
    layer: dict[str, Any] | None = None
    images: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    destination: str | None = None  # where `run` pushed the result
    pushed_digest: str | None = None  # the manifest digest there (format may differ)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, [], {})}


def _layout_tag(ref: ImageRef, top: Descriptor) -> str:
    tag = ref.tag or top.ref_name
    if not tag:
        raise UsageError(f"{ref}: the image has no tag in index.json; name one as DIR:TAG")
    return tag


@dataclass
class Outcome:
    """What `apply` did: the report, and (when something changed) the new top descriptor."""

    report: InjectReport
    new_top: Descriptor | None
    images: list[Image]


def apply(store: Layout, source: ImageSource, top: Descriptor, tree: Path | None,
          options: PackOptions, *, reference: str, platform: str | None = None,
          init_only: bool = False, progress: Progress | None = None,
          warn: Warn | None = None) -> Outcome:
    """Pack `tree`, edit every selected image of `top`, write the new blobs into `store`.

    The images are read from `source` (the same layout, or a registry); `store` receives the
    layer, configs, manifests and index, never a tag: the caller publishes the result. This
    is the one path both local and registry-direct injection take, so both give the same
    bytes for the same input.
    """
    index, images = load_images(source, top, platform)
    for image in images:  # refuse before any work: bad labels, zstd into Docker
        injected_position(image.config, f"{reference} ({image.platform})")
        layer_media_type(image.manifest, options.compression)
    if init_only and all(injected_position(i.config, "")[0] is not None for i in images):
        return Outcome(InjectReport("already-prepared", reference, top.digest), None, images)
    started = time.monotonic()
    with store.writer() as writer:
        packed = pack(tree, writer, options, progress=progress, warn=warn)
        layer = NewLayer(packed.diff_id, writer.peek_digest(), writer.size,
                         options.compression, options.mount_point)
        edits = _edit_all(images, layer, options, init_only, reference)
        if not any(edits.values()):
            return Outcome(InjectReport("unchanged", reference, top.digest,
                                        {"diff_id": layer.diff_id}, warnings=packed.warnings),
                           None, images)
        writer.commit()
    report = InjectReport("prepared" if init_only else "injected", reference,
                          layer={"diff_id": layer.diff_id, "digest": layer.digest,
                                 "size": layer.size, "compression": layer.compression},
                          warnings=packed.warnings)
    new_descs = _commit_images(store, images, edits, report)
    new_top = (_commit_index(store, top, index, new_descs) if index
               else new_descs[top.digest])
    report.digest = new_top.digest
    report.stats = {"entries": packed.entries, "files": packed.files,
                    "hardlinks": packed.hardlinks, "tar_size": packed.tar_size,
                    "seconds": round(time.monotonic() - started, 3)}
    return Outcome(report, new_top, images)


def inject(ref: ImageRef, tree: Path | None, options: PackOptions, *, new_tag: str | None = None,
           platform: str | None = None, init_only: bool = False,
           progress: Progress | None = None, warn: Warn | None = None) -> InjectReport:
    """Pack `tree` (None: the empty mount point) and swap it into the layout image at `ref`."""
    if ref.transport != "oci":
        raise UsageError(f"{ref}: inject edits a local layout (oci:DIR[:TAG]) or a registry "
                         "image (docker://); use `run` for archives")
    layout = Layout.open(ref.path)
    with layout.writing():
        top = layout.resolve(ref.tag)
        tag = new_tag or _layout_tag(ref, top)
        outcome = apply(layout, LayoutSource(layout, ref.tag), top, tree, options,
                        reference=f"oci:{ref.path}:{tag}", platform=platform,
                        init_only=init_only, progress=progress, warn=warn)
        if outcome.new_top is None:
            _tag_unchanged(layout, tag, top)
        else:  # a changed image: its pulled original no longer applies
            new_top = outcome.new_top
            layout.set_tag(tag, new_top.with_annotations(original.forget(new_top.annotations)))
        return outcome.report


def _tag_unchanged(layout: Layout, tag: str, top: Descriptor) -> None:
    """With --tag NEW, an unchanged image still gets the new name; otherwise write nothing."""
    if top.ref_name != tag:
        layout.set_tag(tag, top)


def _edit_all(images: list[Image], layer: NewLayer, options: PackOptions, init_only: bool,
              reference: str) -> dict[str, Any]:
    verb = "init" if init_only else "inject"
    created_by = f"cvmfs-inject {__version__} {verb} --path {options.mount_point}"
    edits = {}
    for image in images:
        if init_only and injected_position(image.config, "")[0] is not None:
            edits[image.descriptor.digest] = None
            continue
        edits[image.descriptor.digest] = edit_image(
            image.manifest, image.config, layer, created_by=created_by,
            epoch=options.source_date_epoch, where=f"{reference} ({image.platform})")
    return edits


def _commit_images(layout: Layout, images: list[Image], edits: dict[str, Any],
                   report: InjectReport) -> dict[str, Descriptor]:
    new_descs: dict[str, Descriptor] = {}
    for image in images:
        edit = edits[image.descriptor.digest]
        if edit is None:
            report.images.append({"platform": image.platform, "status": "unchanged",
                                  "manifest": image.descriptor.digest})
            continue
        config_desc = layout.put_bytes(canonical_json(edit.config),
                                       image.manifest.config.media_type)
        manifest_doc = with_config(edit.manifest, config_desc)
        manifest_desc = layout.put_bytes(canonical_json(manifest_doc), image.manifest.media_type)
        new_descs[image.descriptor.digest] = image.descriptor.replace(
            digest=manifest_desc.digest, size=manifest_desc.size)
        report.images.append({"platform": image.platform, "status": "injected",
                              "manifest": manifest_desc.digest, "position": edit.position,
                              "replaced": edit.old_diff_id})
    return new_descs


def _commit_index(layout: Layout, top: Descriptor, index: Any,
                  new_descs: dict[str, Descriptor]) -> Descriptor:
    doc = index.edit()
    for entry in doc["manifests"]:
        replacement = new_descs.get(entry.get("digest"))
        if replacement is not None:
            entry["digest"], entry["size"] = replacement.digest, replacement.size
    desc = layout.put_bytes(canonical_json(doc), index.media_type)
    return top.replace(digest=desc.digest, size=desc.size)


# -- unpack ----------------------------------------------------------------------------------
def check_target(target: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise InputError(f"{target}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise InputError(f"{target}: directory is not empty; use --force to unpack into it")


def unpack_layout(ref: ImageRef, target: Path, *, force: bool = False,
                  platform: str | None = None, mount_point: str | None = None,
                  warn: Warn | None = None) -> dict[str, Any]:
    layout = Layout.open(ref.path)
    with layout.lock(exclusive=False):
        top = layout.resolve(ref.tag)
        _, images = load_images(LayoutSource(layout, ref.tag), top, platform)

        @contextmanager
        def verified_first(layer: Descriptor) -> Iterator[IO[bytes]]:
            """Check the whole blob against its digest before a byte is written out."""
            with layout.open_blob(layer.digest, layer.size) as reader:
                while reader.read(READ_CHUNK):
                    pass
            with layout.open_blob(layer.digest, layer.size) as reader:
                yield reader

        return extract_injected(images[0], target, str(ref), force=force,
                                mount_point=mount_point, warn=warn, open_layer=verified_first)


def extract_injected(image: Image, target: Path, where: str, *, force: bool,
                     mount_point: str | None, warn: Warn | None,
                     open_layer: Callable[[Descriptor], ContextManager[IO[bytes]]]
                     ) -> dict[str, Any]:
    """Extract the injected layer of `image` (read through `open_layer`, which checks the
    blob's digest before yielding it) into `target`."""
    position, diff_id = injected_position(image.config, f"{where} ({image.platform})")
    check_target(target, force)
    if position is None:
        target.mkdir(parents=True, exist_ok=True)
        return {"status": "empty", "target": str(target),
                "note": "the image has no injected layer yet"}
    layer = image.manifest.layers[position]
    mount = mount_point or image.config.labels.get(LABEL_MOUNT) or "/cvmfs"
    with open_layer(layer) as blob:
        target.mkdir(parents=True, exist_ok=True)
        result = extract(decompressed(blob, layer.media_type), str(target), mount, warn)
    return {"status": "unpacked", "target": str(target), "diff_id": diff_id,
            "entries": result.entries, "skipped": result.skipped}


def unpack(ref: ImageRef, target: Path, skopeo: Skopeo, *, force: bool = False,
           platform: str | None = None, mount_point: str | None = None,
           warn: Warn | None = None) -> dict[str, Any]:
    """Unpack from a layout, or pull a registry/archive image into a temporary layout first."""
    options = {"force": force, "platform": platform, "mount_point": mount_point, "warn": warn}
    if ref.transport == "oci":
        return unpack_layout(ref, target, **options)
    with tempfile.TemporaryDirectory(prefix="cvmfs-inject-unpack-") as scratch:
        layout_ref = ImageRef("oci", os.path.join(scratch, "layout"), "unpack")
        pull(ref, layout_ref, skopeo, platform=platform)
        return unpack_layout(layout_ref, target, **options)



# -- run -------------------------------------------------------------------------------------
def run(src: ImageRef, tree: Path | None, dest: ImageRef, skopeo: Skopeo, options: PackOptions, *,
        cache: str | None = None, new_tag: str | None = None, platform: str | None = None,
        manifest_format: str = "keep", progress: Progress | None = None,
        warn: Warn | None = None, init_only: bool = False) -> InjectReport:
    """pull → inject → validate → push, the one call a Makefile makes.

    The working layout is CACHE when given (kept, so later runs reuse its blobs), else a
    temporary directory removed at the end. Nothing is pushed unless validation passed.
    """
    if dest.transport == "oci":
        raise UsageError(f"run pushes to a registry or an archive, not to {dest}: use `pull` "
                         "and `inject` to edit a layout")
    from cvmfs_inject.commands.validate import validate_layout  # jsonschema only when it is needed

    if tree is not None:
        check_tree_dir(tree)
    fmt = source_format(src, skopeo)
    pushed_as_docker = (dest.transport == "docker-archive" or manifest_format == "v2s2"
                        or (manifest_format == "keep" and fmt == "v2s2"))
    if pushed_as_docker and options.compression != "gzip":
        raise UsageError(f"--compress {options.compression} cannot go into a Docker v2s2 image "
                         f"(Docker layers are gzip only) and {dest} will be Docker v2s2: use "
                         "--compress gzip, or --format oci with a registry or oci-archive: "
                         "destination")
    with contextlib.ExitStack() as stack:
        if cache is None:
            cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="cvmfs-inject-run-"))
            cache = os.path.join(cache, "layout")
        tag, _ = pull(src, ImageRef("oci", cache, new_tag or default_tag(src)), skopeo,
                      all_images=True, known_format=fmt)
        working = ImageRef("oci", cache, tag)
        report = inject(working, tree, options, platform=platform, progress=progress,
                        warn=warn, init_only=init_only)
        problems = validate_layout(working)
        if problems:
            raise ValidationFailed(f"{working}: the injected image does not validate: "
                                   f"{problems[0]} ({len(problems)} problem(s))")
        report.destination = str(dest)
        report.pushed_digest = push(working, dest, skopeo, manifest_format=manifest_format)
        return report


def check_tree_dir(tree: Path) -> None:
    if not tree.exists():
        raise InputError(f"{tree}: no such directory")
    if not tree.is_dir():
        raise InputError(f"{tree}: not a directory (DIR is the content of the mount point)")
