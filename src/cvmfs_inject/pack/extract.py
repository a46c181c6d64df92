"""Safe extraction of the injected layer's mount-point content into a directory.

A layer is untrusted input. Only members under the mount point are written, with the
mount-point prefix removed; absolute names, `..` components, device nodes and any write
through or onto a symlink are refused, and hard links may only point at regular files
already extracted inside the target. Permissions (without setuid, setgid and sticky bits)
and mtimes are restored, directories last.
"""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

import zstandard
from isal import igzip, igzip_lib

from cvmfs_inject.errors import InputError
from cvmfs_inject.layout.blobs import READ_CHUNK
from cvmfs_inject.oci.media import MediaType

# rwx for owner, group and others: setuid, setgid and sticky bits are dropped. CernVM-FS is
# mounted nosuid, and a root-owned setuid file unpacked into a work directory would be a
# privilege escalation.
PERMISSIONS = 0o777


@dataclass
class ExtractResult:
    entries: int = 0
    skipped: list[str] = field(default_factory=list)
    has_root: bool = False  # the layer has an entry for the mount point itself


def decompressed(reader: IO[bytes], media_type: str) -> IO[bytes]:
    if media_type.endswith("+zstd") or media_type.endswith(".zstd"):
        return zstandard.ZstdDecompressor().stream_reader(reader)  # type: ignore[return-value]
    if media_type.endswith("gzip"):
        return igzip.IGzipFile(fileobj=reader, mode="rb")  # type: ignore[return-value]
    if media_type in (MediaType.OCI_LAYER, "application/vnd.docker.image.rootfs.diff.tar"):
        return reader
    raise InputError(f"unsupported layer media type {media_type}")


def _strip_dot(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


class _Target:
    """The extraction root, with the checks that keep every write inside it."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)

    def path_for(self, rel: str) -> str:
        if rel.startswith("/") or any(part == ".." for part in rel.split("/")):
            raise InputError(f"layer member {rel!r} escapes the target directory")
        path = os.path.join(self.root, rel)
        self._check_parents(path)
        return path

    def _check_parents(self, path: str) -> None:
        """Every existing parent must be a real directory inside the root (no symlinks)."""
        parent = os.path.dirname(path)
        missing = []
        while parent != self.root:
            try:
                st = os.lstat(parent)
            except FileNotFoundError:
                missing.append(parent)
                parent = os.path.dirname(parent)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise InputError(f"layer member {path[len(self.root) + 1:]!r} would be written "
                                 "through a symlink or non-directory")
            parent = os.path.dirname(parent)
        for directory in reversed(missing):
            os.mkdir(directory, 0o755)

    @staticmethod
    def clear(path: str) -> None:
        """Tar semantics: a later entry replaces an earlier one; never follow a symlink."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            return
        os.unlink(path)


def extract(fileobj: IO[bytes], target_dir: str, mount_point: str,
            warn: Callable[[str], None] | None = None) -> ExtractResult:
    """Write the members under `mount_point` from the tar stream `fileobj` into target_dir."""
    prefix = mount_point.strip("/") + "/"
    target = _Target(target_dir)
    result = ExtractResult()
    directories: list[tuple[str, int, int]] = []

    def skip(name: str, why: str) -> None:
        result.skipped.append(f"{name}: {why}")
        if warn:
            warn(f"{name}: skipped ({why})")

    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as archive:
            for member in archive:
                name = _strip_dot(member.name).rstrip("/")
                if name == prefix.rstrip("/"):
                    directories.append((target.root, member.mode & PERMISSIONS,
                                        int(member.mtime)))
                    result.has_root = True
                    continue
                if not name.startswith(prefix):
                    continue
                rel = posixpath.normpath(name[len(prefix):])
                if rel.startswith("../") or rel == ".." or rel.startswith("/"):
                    raise InputError(f"layer member {member.name!r} escapes the target directory")
                if posixpath.basename(rel).startswith(".wh."):
                    skip(member.name, "whiteout entries are not extracted")
                    continue
                path = target.path_for(rel)
                mode = member.mode & PERMISSIONS
                if member.isdir():
                    _Target.clear(path)
                    if not os.path.isdir(path):
                        os.mkdir(path, 0o700)
                    directories.append((path, mode, int(member.mtime)))
                elif member.isreg():
                    _Target.clear(path)
                    source = archive.extractfile(member)
                    assert source is not None
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                    with os.fdopen(fd, "wb") as out:
                        while data := source.read(READ_CHUNK):
                            out.write(data)
                    os.chmod(path, mode)
                    os.utime(path, (member.mtime, member.mtime))
                elif member.issym():
                    _Target.clear(path)
                    os.symlink(member.linkname, path)
                    os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
                elif member.islnk():
                    link = _strip_dot(member.linkname)
                    if not link.startswith(prefix):
                        raise InputError(f"hard link {member.name!r} points outside "
                                         f"{mount_point}: {member.linkname!r}")
                    source_path = target.path_for(posixpath.normpath(link[len(prefix):]))
                    try:
                        st = os.lstat(source_path)
                    except FileNotFoundError:
                        raise InputError(f"hard link {member.name!r} points at "
                                         f"{member.linkname!r}, which is not in the layer "
                                         "before it") from None
                    if not stat.S_ISREG(st.st_mode):
                        raise InputError(f"hard link {member.name!r} points at a non-regular file")
                    _Target.clear(path)
                    os.link(source_path, path, follow_symlinks=False)
                else:
                    skip(member.name, "device nodes, fifos and other special files are refused")
                    continue
                result.entries += 1
        # Read past the end-of-archive marker to the end of the stream: only there are the
        # gzip CRC and length, the zstd checksum and the blob's digest checked. Content in
        # stored (incompressible) blocks can be corrupted without breaking the tar.
        while fileobj.read(READ_CHUNK):
            pass
    except tarfile.TarError as exc:
        raise InputError(f"layer is not a valid tar stream: {exc}") from None
    except (OSError, EOFError, zstandard.ZstdError, igzip_lib.IsalError) as exc:
        raise InputError(f"cannot extract layer: {exc}") from None
    for path, mode, mtime in reversed(directories):
        os.chmod(path, mode)
        os.utime(path, (mtime, mtime))
    return result
