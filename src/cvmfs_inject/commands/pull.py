"""pull: copy an image into a local layout, through skopeo, without letting it write there.

skopeo copies into a staging layout on the same filesystem; every blob is verified and
renamed in, and `index.json` is replaced last. A failed or killed pull leaves the layout
exactly as it was (and a layout it had to create is removed again).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cvmfs_inject.commands import original
from cvmfs_inject.errors import CvmfsInjectError, InputError, UsageError
from cvmfs_inject.image.access import Access
from cvmfs_inject.image.layout import LayoutSource
from cvmfs_inject.image.source import check_platform, read_image
from cvmfs_inject.layout.annotations import SOURCE_FORMAT
from cvmfs_inject.layout.archive import delta_base, import_delta
from cvmfs_inject.layout.lock import LockWait
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.oci import names
from cvmfs_inject.oci.jsondoc import parse_json
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.oci.model import Descriptor
from cvmfs_inject.oci.refs import ImageRef
from cvmfs_inject.paths import empty_directory, missing_directories, remove_if_empty
from cvmfs_inject.skopeo.command import Skopeo


@dataclass(frozen=True)
class PullResult:
    tag: str
    descriptor: Descriptor


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
def _new_or_existing_layout(path: str, wait: LockWait) -> Iterator[Layout]:
    """Create the layout if needed, and undo exactly that if the command that made it fails
    (unless another command has started using it meanwhile: then it stays, empty)."""
    target = Path(path).absolute()
    if (target / "oci-layout").exists():
        yield Layout.open(target, wait)
        return
    made = missing_directories(target)
    layout = Layout.create(path, wait)
    try:
        yield layout
    except BaseException:
        if layout.created:
            _undo_creation(layout, made)
        raise


def _undo_creation(layout: Layout, made: list[Path]) -> None:
    """Empty the layout this command created, unless another command uses it by now or an
    image got in: then it stays. The directories this command made go if they are empty;
    a directory that was there (empty) stays, empty again."""
    alone = Layout(layout.root, LockWait(timeout=0))
    with contextlib.suppress(CvmfsInjectError), alone.lock(exclusive=True):
        if alone.read_index().manifests:
            return
        empty_directory(layout.root)
    remove_if_empty(made)


def pull(src: ImageRef, dest: ImageRef, access: Access, *, all_images: bool = False,
         platform: str | None = None, known_format: str | None = None) -> PullResult:
    """Copy `src` into the layout named by `dest` (created if needed).

    `known_format` spares a second registry request when the caller already asked.
    """
    if dest.transport != "oci":
        raise UsageError(f"pull writes a local layout; {dest} is not oci:DIR[:TAG]")
    if all_images and platform:
        raise UsageError("--all and --platform exclude each other")
    if platform and "," in platform:
        raise UsageError(f"--platform {platform}: pull takes one platform (or --all)")
    tag = dest.tag or default_tag(src)
    if not names.REF_NAME.match(tag):  # a registry tag (v1__amd64) that a layout cannot hold
        raise UsageError(f"{src}: its tag {tag!r} is not a valid layout tag (an OCI "
                         f"reference name): name one, as {dest.path}:TAG")
    if src.transport == "oci":  # our own message, listing the tags, before skopeo's
        Layout.open(src.path, access.layout_wait).resolve(src.tag)
    elif src.transport != "docker" and not os.path.isfile(src.path):
        raise InputError(f"{src.path}: no such archive file")
    if src.transport == "oci-archive" and delta_base(Path(src.path)) is not None:
        return _pull_delta(src, dest, tag, access, platform)
    skopeo = access.skopeo(src)
    fmt, raw = (known_format, None) if known_format else source_manifest(src, skopeo)
    with _new_or_existing_layout(dest.path, access.layout_wait) as layout, layout.writing(), \
            layout.staging() as stage:
        skopeo.copy(src, ImageRef("oci", stage, "pull"), all_images=all_images,
                    platform=platform)
        staged = Layout.open(stage)
        desc = staged.resolve("pull")
        if platform and MediaType.is_manifest(desc.media_type):
            # skopeo copies a single-platform image whatever --override-arch says
            staged_ref = ImageRef("oci", stage, "pull")
            check_platform(read_image(LayoutSource(staged, staged_ref), desc), [platform], src)
        for algorithm_dir in (Path(stage) / "blobs").iterdir():
            for blob in algorithm_dir.iterdir():
                layout.import_blob(blob, f"{algorithm_dir.name}:{blob.name}")
        annotations = {k: v for k, v in desc.annotations.items()}
        annotations[SOURCE_FORMAT] = fmt
        if raw is not None and fmt == "v2s2" and not all_images and not platform:
            annotations.update(original.keep(layout, src, skopeo, desc, raw))
        layout.set_tag(tag, desc.with_annotations(annotations))
    return PullResult(tag, desc)


def _pull_delta(src: ImageRef, dest: ImageRef, tag: str, access: Access,
                platform: str | None) -> PullResult:
    """A delta archive (`push --since`): ours to read, whole, completed from the layout."""
    if platform:
        raise UsageError(f"{src} is a delta archive, which is pulled whole: drop --platform")
    with _new_or_existing_layout(dest.path, access.layout_wait) as layout, layout.writing(), \
            layout.staging() as stage:
        desc = import_delta(Path(src.path), layout, src.tag, Path(stage))
        layout.set_tag(tag, desc)
    return PullResult(tag, desc)
