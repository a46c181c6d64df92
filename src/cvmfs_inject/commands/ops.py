"""Library functions behind pull, push, inspect and gc: each takes parsed values, returns data.

`pull` never lets skopeo write into the target layout: skopeo copies into a staging layout on
the same filesystem, every blob is verified and renamed in, and `index.json` is replaced last.
A failed or killed pull leaves the layout exactly as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvmfs_inject.errors import InputError, UsageError
from cvmfs_inject.image.edit import injected_position
from cvmfs_inject.image.refs import ImageRef
from cvmfs_inject.image.source import ImageSource, LayoutSource, load_images
from cvmfs_inject.layout import gc as layout_gc
from cvmfs_inject.layout import original
from cvmfs_inject.layout.annotations import SOURCE_FORMAT
from cvmfs_inject.layout.gc import GcResult, check_present
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci.jsondoc import canonical_json, parse_json
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.oci.model import Descriptor
from cvmfs_inject.skopeo.command import Skopeo

FORMATS = ("oci", "v2s2", "keep")


def source_manifest(ref: ImageRef, skopeo: Skopeo) -> tuple[str, bytes | None]:
    """`v2s2` or `oci` (what the source speaks, so `push --format keep` can give it back),
    and a registry source's manifest bytes."""
    if ref.transport == "docker-archive":
        return "v2s2", None
    if ref.transport == "docker":
        raw = skopeo.inspect_raw(ref)
        doc = parse_json(raw, str(ref))
        return ("v2s2" if MediaType.is_docker(str(doc.get("mediaType", ""))) else "oci"), raw
    return "oci", None


def source_format(ref: ImageRef, skopeo: Skopeo) -> str:
    return source_manifest(ref, skopeo)[0]


def default_tag(src: ImageRef) -> str:
    if src.transport == "docker" and src.tag:
        return src.tag
    if src.transport in ("oci", "oci-archive") and src.tag:
        return src.tag
    return "latest"


@contextlib.contextmanager
def _new_or_existing_layout(path: str) -> Iterator[Layout]:
    """Create the layout if needed, and undo exactly that if the command that made it fails."""
    target = Path(path).absolute()
    if (target / "oci-layout").exists():
        yield Layout.open(target)
        return
    first_missing = None
    probe = target
    while not os.path.lexists(probe):
        first_missing, probe = probe, probe.parent
    layout = Layout.create(path)
    try:
        yield layout
    except BaseException:
        if first_missing is not None:
            shutil.rmtree(first_missing, ignore_errors=True)
        else:  # it was an empty directory: leave it empty again
            for child in target.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink()
        raise


def pull(src: ImageRef, dest: ImageRef, skopeo: Skopeo, *, all_images: bool = False,
         platform: str | None = None, known_format: str | None = None
         ) -> tuple[str, Descriptor]:
    """Copy `src` into the layout named by `dest`; returns (tag, descriptor).

    `known_format` spares a second registry request when the caller already asked.
    """
    if dest.transport != "oci":
        raise UsageError(f"pull writes a local layout; {dest} is not oci:DIR[:TAG]")
    if all_images and platform:
        raise UsageError("--all and --platform exclude each other")
    tag = dest.tag or default_tag(src)
    if src.transport == "oci":  # our own message, listing the tags, before skopeo's
        Layout.open(src.path).resolve(src.tag)
    elif src.transport != "docker" and not os.path.isfile(src.path):
        raise InputError(f"{src.path}: no such archive file")
    fmt, raw = (known_format, None) if known_format else source_manifest(src, skopeo)
    with _new_or_existing_layout(dest.path) as layout, layout.writing(), \
            layout.staging() as stage:
        skopeo.copy(src, ImageRef("oci", stage, "pull"), all_images=all_images,
                    platform=platform)
        staged = Layout.open(stage)
        desc = staged.resolve("pull")
        for algorithm_dir in (Path(stage) / "blobs").iterdir():
            for blob in algorithm_dir.iterdir():
                layout.import_blob(blob, f"{algorithm_dir.name}:{blob.name}")
        annotations = {k: v for k, v in desc.annotations.items()}
        annotations[SOURCE_FORMAT] = fmt
        if raw is not None and fmt == "v2s2" and not all_images and not platform:
            annotations.update(original.keep(layout, src, skopeo, desc, raw))
        layout.set_tag(tag, desc.with_annotations(annotations))
    return tag, desc


def _skopeo_format(fmt: str, desc: Descriptor) -> str | None:
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: use oci, v2s2 or keep")
    if fmt == "keep":
        kept = desc.annotations.get(SOURCE_FORMAT)
        return "v2s2" if kept == "v2s2" else None
    return fmt


def push(src: ImageRef, dest: ImageRef, skopeo: Skopeo, *, manifest_format: str = "keep"
         ) -> str:
    """Copy a layout image out to a registry or an archive; archives appear atomically.

    Returns the digest of the manifest as written at the destination (it differs from the
    layout's when the format is converted), as skopeo reports it.
    """
    if src.transport != "oci":
        raise UsageError(f"push reads a local layout; {src} is not oci:DIR[:TAG]")
    if dest.transport == "oci":
        raise UsageError(f"push to another layout: use a docker://, docker-archive: or "
                         f"oci-archive: destination, not {dest}")
    layout = Layout.open(src.path)
    with layout.lock(exclusive=False), tempfile.TemporaryDirectory() as scratch:
        digestfile = Path(scratch) / "digest"
        desc = layout.resolve(src.tag)
        fmt = _skopeo_format(manifest_format, desc)
        is_index = MediaType.is_index(desc.media_type)
        if is_index and dest.transport == "docker-archive":
            raise UsageError(f"{src} is a multi-platform index; docker-archive holds one image: "
                             "push one platform by its own tag, or use oci-archive:")
        check_present(layout, desc)
        if fmt == "v2s2" or dest.transport == "docker-archive":
            _check_docker_layers(layout, desc, src)
        if manifest_format == "keep" and dest.is_registry and original.unchanged_original(desc):
            with original.view(layout, desc) as source:
                skopeo.copy(source, dest, preserve_digests=True, digestfile=digestfile)
        else:
            with _skopeo_view(layout, src, desc) as source:
                if dest.transport == "docker":
                    skopeo.copy(source, dest, all_images=is_index, manifest_format=fmt,
                                digestfile=digestfile)
                else:
                    with _archive_target(dest) as tmp_dest:
                        skopeo.copy(source, tmp_dest, all_images=is_index,
                                    manifest_format=fmt, digestfile=digestfile)
        pushed = digestfile.read_text().strip() if digestfile.exists() else ""
        return pushed or desc.digest


def _check_docker_layers(layout: Layout, desc: Descriptor, src: ImageRef) -> None:
    """Docker v2s2 carries gzip layers only: say so before skopeo fails half-way."""
    manifests = ([d for d in layout.read_index_blob(desc).manifests
                  if MediaType.is_manifest(d.media_type)]
                 if MediaType.is_index(desc.media_type) else [desc])
    for manifest_desc in manifests:
        for layer in layout.read_manifest(manifest_desc).layers:
            if layer.media_type in (MediaType.OCI_LAYER_ZSTD, MediaType.OCI_LAYER):
                raise UsageError(f"{src} has {layer.media_type} layers, which a Docker v2s2 "
                                 "image cannot carry: push with --format oci (to a registry or "
                                 "oci-archive:), or inject with --compress gzip")


@contextlib.contextmanager
def _skopeo_view(layout: Layout, src: ImageRef, desc: Descriptor) -> Iterator[ImageRef]:
    """The reference skopeo should read.

    skopeo 1.9 looks a tag up only among index.json entries with OCI media types, so an
    image whose entry has a Docker media type is shown to it as the single, untagged entry
    of a throw-away layout that shares the blobs directory.
    """
    if not MediaType.is_docker(desc.media_type):
        yield ImageRef("oci", src.path, src.tag or desc.ref_name)
        return
    with tempfile.TemporaryDirectory(prefix="cvmfs-inject-view-") as view:
        root = Path(view)
        (root / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
        entry = desc.with_annotations({}).to_dict()
        (root / "index.json").write_bytes(canonical_json(
            {"schemaVersion": 2, "mediaType": MediaType.OCI_INDEX, "manifests": [entry]}))
        (root / "blobs").symlink_to((layout.root / "blobs").absolute())
        yield ImageRef("oci", view, None)


@contextlib.contextmanager
def _archive_target(dest: ImageRef) -> Iterator[ImageRef]:
    """A temp file beside the archive, renamed over it only when skopeo succeeded."""
    target = Path(dest.path).resolve()
    if target.is_dir():
        raise UsageError(f"{dest.path}: is a directory; name the archive file to write")
    if not target.parent.is_dir():
        raise UsageError(f"{target.parent}: no such directory for the archive")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.unlink(tmp)  # skopeo creates the file itself
    try:
        yield ImageRef(dest.transport, tmp, dest.tag)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def inspect(ref: ImageRef, remote: ImageSource | None = None,
            platform: str | None = None) -> dict[str, Any]:
    """A JSON-ready description: tags, platforms, layers with diff_ids, labels, history.

    `remote` is the registry source for a docker:// reference (the caller builds it with
    its credentials); a layout reference is opened here.
    """
    layout = None
    if ref.transport == "oci":
        layout = Layout.open(ref.path)
        source: ImageSource = LayoutSource(layout, ref.tag)
    elif ref.transport == "docker" and remote is not None:
        source = remote
    else:
        raise UsageError(f"{ref}: inspect reads a layout or a registry; pull an archive first")
    top = source.top()
    index, images = load_images(source, top, platform)
    report: dict[str, Any] = {
        "reference": str(ref),
        "mediaType": top.media_type,
        "digest": top.digest,
        "size": top.size,
    }
    if layout is not None:
        report["tags"] = layout.tags()
        report["annotations"] = top.annotations
    report["images"] = [_describe(image.descriptor, image) for image in images]
    if index is not None:
        report["index"] = {"manifests": len(index.manifests)}
    return report


def _describe(desc: Descriptor, image: Any) -> dict[str, Any]:
    config = image.config
    diff_ids = config.diff_ids
    layers = []
    for position, layer in enumerate(image.manifest.layers):
        layers.append({"mediaType": layer.media_type, "size": layer.size, "digest": layer.digest,
                       "diff_id": diff_ids[position] if position < len(diff_ids) else None})
    position, diff_id = injected_position(config, desc.digest)
    return {
        "platform": image.platform,
        "manifest": {"mediaType": image.manifest.media_type, "digest": desc.digest,
                     "size": desc.size},
        "config": {"mediaType": image.manifest.config.media_type,
                   "digest": image.manifest.config.digest, "size": image.manifest.config.size,
                   "created": config.doc.get("created")},
        "layers": layers,
        "labels": config.labels,
        "history": config.history,
        "injected": None if position is None else {"position": position, "diff_id": diff_id},
    }


@dataclass(frozen=True)
class GcReport:
    layout: str
    result: GcResult
    dry_run: bool


def gc(ref: ImageRef, dry_run: bool = False) -> GcReport:
    if ref.transport != "oci" or ref.tag:
        raise UsageError(f"gc takes a layout directory, not {ref}")
    layout = Layout.open(ref.path)
    guard = layout.lock() if dry_run else layout.writing()
    with guard:
        return GcReport(ref.path, layout_gc.collect(layout, dry_run), dry_run)
