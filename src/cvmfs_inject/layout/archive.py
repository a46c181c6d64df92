"""Delta archives: an OCI archive that leaves out the blobs the receiving layout already has.

An air-gapped site that holds image OLD gets image NEW as a tarball. Most of NEW's bytes are
layers OLD has too (the base image, unchanged /cvmfs layers), so `push --since` writes every
document (indexes, manifests, configs) but only the blobs OLD does not have. The archive is
an ordinary `oci-archive` (a tar of an OCI layout, as skopeo writes one) whose index.json
names what it was cut against (`layout.annotations.DELTA_SINCE*`).

skopeo cannot read an archive with blobs missing, so the import is ours: every member is
checked (names, types, digests) into a staging area inside the layout, the image is walked
with each blob taken from the archive or, verified, from the layout, and only when nothing
is missing are the blobs moved in and the tag set. An archive the layout cannot complete
changes nothing.
"""

from __future__ import annotations

import filecmp
import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cvmfs_inject.errors import InputError, IntegrityError, NotFoundError
from cvmfs_inject.layout.annotations import DELTA_SINCE, DELTA_SINCE_NAME, SOURCE_FORMAT
from cvmfs_inject.layout.blobs import READ_CHUNK
from cvmfs_inject.layout.store import OCI_LAYOUT_VERSION, Layout
from cvmfs_inject.oci.digest import check_digest
from cvmfs_inject.oci.jsondoc import MAX_DOCUMENT, canonical_json, parse_json
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.oci.model import REF_NAME, Descriptor, Index
from cvmfs_inject.oci.walk import DescriptorPath, document_children, walk

_DIRECTORIES = ("blobs", "blobs/sha256")
MAX_MEMBERS = 100_000  # an image has tens of blobs; a hostile archive could list millions


@dataclass(frozen=True)
class DeltaArchive:
    """What `write_delta` put in the archive and what it left to the receiving side."""

    written: int  # blobs in the archive
    written_bytes: int
    omitted: int  # blobs left out: the old image has them
    omitted_bytes: int


def image_blobs(layout: Layout, desc: Descriptor) -> tuple[list[Descriptor], set[str]]:
    """Every blob of the image (post-order) and the digests of its documents: indexes,
    manifests and the configs they name."""
    documents: set[str] = set()

    def expand(path: DescriptorPath) -> list[Descriptor]:
        node = path.descriptor
        if not _names_children(node):
            return []
        documents.add(node.digest)
        children = document_children(node, layout.read_blob(node.digest, node.size),
                                     layout.where(node), subject=False)
        if MediaType.is_manifest(node.media_type):
            documents.add(children[0].digest)  # the config
        return children

    return [path.descriptor for path in walk([desc], expand)], documents


def _names_children(desc: Descriptor) -> bool:
    return MediaType.is_index(desc.media_type) or MediaType.is_manifest(desc.media_type)


def write_delta(layout: Layout, desc: Descriptor, ref_name: str | None, since: Descriptor,
                since_name: str, old: set[str], target: Path) -> DeltaArchive:
    """Write `desc` as an OCI archive at `target` (a new file the caller renames into
    place) without the non-document blobs in `old`, the blobs of the image `since`."""
    blobs, documents = image_blobs(layout, desc)
    keep = [d for d in blobs if d.digest in documents or d.digest not in old]
    carried = {k: v for k, v in desc.annotations.items() if k == SOURCE_FORMAT}
    if ref_name:
        carried[REF_NAME] = ref_name
    entry = desc.with_annotations(carried).to_dict()
    index = canonical_json({"schemaVersion": 2, "mediaType": MediaType.OCI_INDEX,
                            "manifests": [entry],
                            "annotations": {DELTA_SINCE: since.digest,
                                            DELTA_SINCE_NAME: since_name}})
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "oci-layout", canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION}))
        _add(tar, "index.json", index)
        for name in (*_DIRECTORIES, *sorted({f"blobs/{d.digest.split(':')[0]}"
                                             for d in keep} - set(_DIRECTORIES))):
            tar.addfile(_info(name, 0, tarfile.DIRTYPE))
        for blob in keep:  # the walk gives each digest once
            with layout.open_blob(blob.digest, blob.size) as reader:
                tar.addfile(_info(f"blobs/{blob.digest.replace(':', '/', 1)}", blob.size),
                            reader)
    kept = {d.digest for d in keep}
    omitted = [d for d in blobs if d.digest not in kept]
    return DeltaArchive(len(keep), sum(d.size for d in keep), len(omitted),
                        sum(d.size for d in omitted))


def _info(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    """A member with fixed owner and time, so the same image gives the same archive."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_info(name, len(data)), io.BytesIO(data))


@dataclass(frozen=True)
class _Staged:
    """The archive's members, checked: index.json and the blobs staged under their digests."""

    index: Index
    blobs: dict[str, Path]


def same_archive(transport: str, new: str, old: str) -> bool:
    """Whether two archives hold the same image. skopeo writes a docker-archive byte for
    byte the same for the same image; an oci-archive's tar headers carry the time it was
    written, so there the images named by index.json are compared."""
    if transport == "docker-archive":
        return filecmp.cmp(new, old, shallow=False)
    return _index_entries(new) == _index_entries(old) is not None


def _index_entries(archive: str) -> list[Any] | None:
    """The entries of an oci-archive's index.json, or None when it has none we can read."""
    index = _archive_index(archive)
    return None if index is None else list(index.doc["manifests"])


def _archive_index(archive: str | Path) -> Index | None:
    """An oci-archive's index.json, or None when it has none we can read: found in at most
    MAX_MEMBERS members, none of them kept (tarfile would keep each one it read)."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            for count, member in enumerate(tar):
                if count > MAX_MEMBERS:
                    return None
                tar.members.clear()
                if _member_name(member) == "index.json" and member.isreg():
                    raw = _read_small(tar, member, f"{archive}: index.json")
                    return Index.parse(raw, f"{archive}: index.json")
    except (tarfile.TarError, OSError, EOFError, InputError):
        return None
    return None


def delta_base(archive: Path) -> tuple[str, str] | None:
    """(digest, tag) of the image a delta archive was cut against; None for a full one
    (or one we cannot read: not ours to judge, skopeo reads it and says what is wrong)."""
    index = _archive_index(archive)
    return None if index is None else _base_of(index)


def delta_note(archive: Path) -> str | None:
    """For a delta archive, what a command that cannot read one says first; else None."""
    base = delta_base(archive)
    if base is None:
        return None
    return (f"{archive}: a delta archive, without the blobs of the image tagged "
            f"{base[1] or '?'} ({base[0]})")


def _base_of(index: Index) -> tuple[str, str] | None:
    annotations = index.doc.get("annotations") or {}
    if isinstance(annotations, dict) and DELTA_SINCE in annotations:
        return str(annotations[DELTA_SINCE]), str(annotations.get(DELTA_SINCE_NAME, ""))
    return None


def import_delta(archive: Path, layout: Layout, tag: str | None, stage: Path) -> Descriptor:
    """Bring the image `tag` of a delta archive into `layout` (the caller holds its write
    lock and sets the tag); raise, with the layout unchanged, when blobs are missing.

    Of the annotations on the archive's entry only the source format is taken over (so
    `push --format keep` gives the same format on both sides); the kept originals describe
    blobs of the sending layout, and an archive must not make the tag claim them here.
    """
    staged = _stage_members(archive, stage)
    desc = _pick(staged.index, tag, archive)
    if not _names_children(desc):
        raise InputError(f"{archive}: the entry {desc.digest} is a {desc.media_type}, not an "
                         "image manifest or index")
    missing: list[Descriptor] = []

    def present(node: Descriptor) -> bool:
        path = staged.blobs.get(node.digest)
        if path is not None:
            if path.stat().st_size != node.size:
                raise InputError(f"{archive}: blob {node.digest} has {path.stat().st_size} "
                                 f"bytes, its descriptor says {node.size}")
            return True
        if layout.has_blob(node.digest):
            with layout.open_blob(node.digest, node.size) as reader:  # read it, verified
                while reader.read(READ_CHUNK):
                    pass
            return True
        if _names_children(node):  # a delta archive always carries its documents
            raise InputError(f"{archive}: incomplete archive: the {node.media_type} "
                             f"{node.digest} is neither in it nor in {layout.root}")
        missing.append(node)
        return False

    def expand(path: DescriptorPath) -> list[Descriptor]:
        node = path.descriptor
        if not present(node) or not _names_children(node):
            return []
        if node.size > MAX_DOCUMENT:
            raise InputError(f"{archive}: {node.digest} is {node.size} bytes, too large for "
                             "a JSON document")
        source = staged.blobs.get(node.digest)
        raw = (source.read_bytes() if source is not None
               else layout.read_blob(node.digest, node.size))
        return document_children(node, raw, f"{archive}: {node.digest}", subject=False)

    reached = walk([desc], expand)
    if missing:
        since, name = _base_of(staged.index) or ("", "")  # the index read above
        raise NotFoundError(
            f"{archive}: {len(missing)} blob(s) ({sum(d.size for d in missing):,} B) are in "
            f"neither this delta archive nor {layout.root}; they come from the image that "
            f"was tagged {name or '?'} where the archive was made ({since}): bring that "
            f"image into {layout.root} first")
    for path in reached:
        source = staged.blobs.get(path.descriptor.digest)
        if source is not None:
            layout.import_blob(source, path.descriptor.digest)
    source_format = desc.annotations.get(SOURCE_FORMAT)
    return desc.with_annotations({SOURCE_FORMAT: source_format if source_format in (
        "oci", "v2s2") else "oci"})


def _pick(index: Index, tag: str | None, archive: Path) -> Descriptor:
    entries = index.manifests
    if tag is None and len(entries) == 1:
        return entries[0]
    for desc in entries:
        if tag is not None and desc.ref_name == tag:
            return desc
    names = ", ".join(d.ref_name for d in entries if d.ref_name) or "(none)"
    wanted = f"no image tagged {tag!r}" if tag else f"{len(entries)} images"
    raise NotFoundError(f"{archive}: {wanted}; tags: {names}")


def _member_name(member: tarfile.TarInfo) -> str:
    return member.name.removeprefix("./").rstrip("/")


def _stage_members(archive: Path, stage: Path) -> _Staged:
    """Check every member (an OCI layout's files only, regular files and directories, each
    name once) and stage the blobs, each hashed against its name on the way."""
    index: Index | None = None
    blobs: dict[str, Path] = {}
    seen: set[str] = set()
    try:
        with tarfile.open(archive, "r:*") as tar:
            for count, member in enumerate(tar):
                if count > MAX_MEMBERS:
                    raise InputError(f"{archive}: more than {MAX_MEMBERS} members; not an OCI "
                                     "archive of one image")
                tar.members.clear()  # tarfile keeps every member read; this loop needs none
                name = _member_name(member)
                where = f"{archive}: member {member.name!r}"
                parts = name.split("/")
                if member.isdir() and (name in ("", ".") or (parts[0] == "blobs"
                                                             and len(parts) <= 2)):
                    continue
                if not member.isreg():
                    raise InputError(f"{where}: not a regular file or a blobs/ directory")
                if name in seen:
                    raise InputError(f"{where}: appears twice")
                seen.add(name)
                if name == "oci-layout":
                    doc = parse_json(_read_small(tar, member, where), where)
                    if doc.get("imageLayoutVersion") != OCI_LAYOUT_VERSION:
                        raise InputError(f"{where}: unsupported imageLayoutVersion")
                elif name == "index.json":
                    index = Index.parse(_read_small(tar, member, where), where)
                elif parts[0] == "blobs" and len(parts) == 3:
                    digest = _member_digest(parts, where)
                    blobs[digest] = _stage_blob(tar, member, digest, stage, where)
                else:
                    raise InputError(f"{where}: not part of an OCI layout")
            _check_end(tar, archive)
    except (tarfile.TarError, EOFError) as error:
        raise InputError(f"{archive}: not a readable OCI archive ({error})") from None
    except OSError as error:
        raise InputError(f"{archive}: cannot be read ({error.strerror or error})") from None
    if index is None:
        raise InputError(f"{archive}: no index.json; not an OCI archive")
    return _Staged(index, blobs)


def _check_end(tar: tarfile.TarFile, archive: Path) -> None:
    """tarfile takes a damaged or cut header for the end of the archive; a whole archive
    ends with two zero blocks, so a cut one is told apart from a short one."""
    assert tar.fileobj is not None
    tar.fileobj.seek(tar.offset)
    end = tar.fileobj.read(2 * tarfile.BLOCKSIZE)
    if end != bytes(2 * tarfile.BLOCKSIZE):
        raise InputError(f"{archive}: truncated or damaged after byte {tar.offset} (no "
                         "end-of-archive marker); carry the archive across again")


def _member_digest(parts: list[str], where: str) -> str:
    try:
        return check_digest(f"{parts[1]}:{parts[2]}")
    except InputError as error:
        raise InputError(f"{where}: not a blob name ({error})") from None


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> bytes:
    if member.size > MAX_DOCUMENT:
        raise InputError(f"{where}: {member.size} bytes, too large for a JSON document")
    handle = tar.extractfile(member)
    assert handle is not None  # a regular file
    return handle.read()


def _stage_blob(tar: tarfile.TarFile, member: tarfile.TarInfo, digest: str, stage: Path,
                where: str) -> Path:
    algorithm, encoded = digest.split(":", 1)
    hasher = hashlib.new(algorithm)
    target = stage / f"{algorithm}-{encoded}"
    source: IO[bytes] | None = tar.extractfile(member)
    assert source is not None  # a regular file
    with target.open("wb") as out:
        while chunk := source.read(READ_CHUNK):
            hasher.update(chunk)
            try:
                out.write(chunk)
            except OSError as error:
                raise InputError(f"{stage}: cannot stage a blob of {where} "
                                 f"({error.strerror or error})") from None
    if hasher.hexdigest() != encoded:
        raise IntegrityError(f"{where}: content does not match its name (corrupted archive)")
    return target
