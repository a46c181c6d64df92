"""The packer: tar format (checked by python tarfile and GNU tar), determinism, options."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import zstandard
from helpers import EPOCH, make_nasty_tree, tree_snapshot

from cvmfs_inject.errors import InputError, UsageError
from cvmfs_inject.pack import lookahead, pipeline, walker
from cvmfs_inject.pack.options import CHUNK, PackOptions, normalise_mount_point, source_date_epoch
from cvmfs_inject.pack.packer import PackResult, pack

GNU_TAR = shutil.which("tar")
SHRINKWRAP = Path(__file__).resolve().parents[2] / "shared/tools/make_shrinkwrap_tree.py"
needs_gnu_tar = pytest.mark.skipif(GNU_TAR is None, reason="GNU tar is not installed")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.writes = 0

    def write(self, data: bytes | memoryview) -> None:
        self.data += data
        self.writes += 1


def pack_bytes(tree: Path | None, warn: list[str] | None = None,
               **options: object) -> tuple[bytes, PackResult]:
    sink = Sink()
    result = pack(tree, sink, PackOptions(**options),  # type: ignore[arg-type]
                  warn=warn.append if warn is not None else None)
    return bytes(sink.data), result


def raw_tar(tree: Path | None, **options: object) -> bytes:
    return pack_bytes(tree, compression="none", **options)[0]


def members(tar: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        return archive.getmembers()


def by_name(tar: bytes) -> dict[str, tarfile.TarInfo]:
    return {m.name: m for m in members(tar)}


def decompress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.decompress(data)
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    return data


def gnu_extract(tar: bytes, tmp: Path, name: str = "out", tolerated: str = "") -> Path:
    archive = tmp / f"{name}.tar"
    archive.write_bytes(tar)
    out = tmp / name
    out.mkdir()
    proc = subprocess.run([GNU_TAR, "--numeric-owner", "-xf", str(archive), "-C", str(out)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    noise = [line for line in proc.stderr.splitlines() if not (tolerated and tolerated in line)]
    assert noise == []
    return out


def gnu_list(tar: bytes, tmp: Path) -> list[str]:
    archive = tmp / "list.tar"
    archive.write_bytes(tar)
    proc = subprocess.run([GNU_TAR, "-tvf", str(archive)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return proc.stdout.splitlines()


def sorted_walk(root: Path) -> list[str]:
    """The expected member order: depth first, siblings in byte order of their names."""
    order = []

    def visit(directory: Path, prefix: str) -> None:
        for name in sorted(os.listdir(directory), key=os.fsencode):
            path = directory / name
            order.append(prefix + name)
            if path.is_dir() and not path.is_symlink():
                visit(path, prefix + name + "/")

    visit(root, "")
    return order


@pytest.fixture
def nasty(tmp_path: Path) -> Path:
    return make_nasty_tree(tmp_path / "src")


def small_tree(root: Path) -> Path:
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "a.txt").write_bytes(b"a\n")
    (root / "dir" / "sub" / "b.bin").write_bytes(b"\0" * 700)
    (root / "top").write_bytes(b"top\n")
    os.symlink("dir/a.txt", root / "link")
    for path in (*root.rglob("*"), root):
        os.utime(path, (EPOCH, EPOCH), follow_symlinks=False)
    return root


# -- format: python tarfile and GNU tar ----------------------------------------------------------
def test_python_tarfile_reads_the_nasty_tree(nasty: Path) -> None:
    tar = raw_tar(nasty)
    found = by_name(tar)
    expected = {"cvmfs", *(f"cvmfs/{rel}" for rel in sorted_walk(nasty))}
    assert set(found) == expected
    snap = tree_snapshot(nasty)
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        for member in archive:
            if member.name == "cvmfs":
                assert member.isdir()
                continue
            entry = snap[member.name[len("cvmfs/"):]]
            assert member.mtime == entry["mtime"]
            if entry["type"] == "symlink":
                assert member.issym() and member.linkname == entry["target"]
            elif entry["type"] == "dir":
                assert member.isdir() and member.mode == entry["mode"]
            elif member.islnk():
                assert member.linkname == "cvmfs/" + entry["link_group"]
            else:
                assert member.isreg() and member.mode == entry["mode"]
                data = archive.extractfile(member).read()  # type: ignore[union-attr]
                assert hashlib.sha256(data).hexdigest() == entry["sha256"]


@needs_gnu_tar
def test_gnu_tar_lists_and_extracts_identically(nasty: Path, tmp_path: Path) -> None:
    tar = raw_tar(nasty)
    listing = gnu_list(tar, tmp_path)
    assert len(listing) == len(members(tar))
    assert listing[0].split()[-1] == "cvmfs/"
    out = gnu_extract(tar, tmp_path)
    assert sorted(os.listdir(out)) == ["cvmfs"]
    assert tree_snapshot(out / "cvmfs") == tree_snapshot(nasty)
    root = os.stat(out / "cvmfs")
    assert (stat.S_IMODE(root.st_mode), int(root.st_mtime)) == (
        stat.S_IMODE(os.stat(nasty).st_mode), EPOCH)


@needs_gnu_tar
@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_layer_decompresses_to_the_raw_tar(nasty: Path, compression: str) -> None:
    data, result = pack_bytes(nasty, compression=compression)
    tar = raw_tar(nasty)
    if compression == "gzip":
        proc = subprocess.run(["gzip", "-dc"], input=data, capture_output=True, check=False)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == tar
    assert decompress(data, compression) == tar
    assert result.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert result.tar_size == len(tar)


def test_entries_sorted_depth_first_by_bytes(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    # '-' < '/' < '0' < 'A' < '_' < 'a' < non-ASCII: a full-path sort would differ
    for name in ("a", "a-b", "a.c", "B", "_x", "é", "Z", "0"):
        (root / name).mkdir()
        (root / name / "f").write_bytes(name.encode())
    (root / "a" / "z").write_bytes(b"")
    (root / "a" / "Y").write_bytes(b"")
    names = [m.name for m in members(raw_tar(root))]
    assert names == ["cvmfs", *(f"cvmfs/{rel}" for rel in sorted_walk(root))]
    assert names.index("cvmfs/a/z") < names.index("cvmfs/a-b")


def test_owner_is_zero_with_empty_names(nasty: Path) -> None:
    for member in members(raw_tar(nasty)):
        assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", ""), member.name
        assert "atime" not in member.pax_headers and "ctime" not in member.pax_headers


@needs_root
@pytest.mark.parametrize(("uid", "gid"), [
    pytest.param(1234, 5678, id="small"),
    pytest.param(0o7777777, 0o7777777, id="largest-7-digit-octal"),
    pytest.param(2**21 + 5, 2**21 + 7, id="needs-8-octal-digits"),
    pytest.param(1_234_567_890, 1_234_567_891, id="ad-mapped-uid"),
])
def test_keep_owner_keeps_ids(tmp_path: Path, uid: int, gid: int) -> None:
    root = small_tree(tmp_path / "src")
    os.chown(root / "top", uid, gid)
    os.chown(root / "dir", uid, gid)
    tar = raw_tar(root, keep_owner=True)
    misaligned = len(tar) % 512
    assert misaligned == 0, "tar stream is not a whole number of 512-byte blocks"
    found = by_name(tar)
    assert set(found) == {"cvmfs", *(f"cvmfs/{rel}" for rel in sorted_walk(root))}
    assert (found["cvmfs/top"].uid, found["cvmfs/top"].gid) == (uid, gid)
    assert (found["cvmfs/dir"].uid, found["cvmfs/dir"].gid) == (uid, gid)
    assert found["cvmfs/top"].uname == ""
    assert found["cvmfs/dir/a.txt"].uid == os.lstat(root / "dir" / "a.txt").st_uid
    assert (found["cvmfs"].uid, found["cvmfs"].gid) == (0, 0)
    without = by_name(raw_tar(root))
    assert (without["cvmfs/top"].uid, without["cvmfs/top"].gid) == (0, 0)


@pytest.mark.parametrize("mtime", [
    pytest.param(0o77777777777, id="largest-11-digit-octal"),
    pytest.param(0o77777777777 + 1, id="year-2242"),
    pytest.param(253402300799, id="year-9999"),
])
def test_far_future_mtime_is_stored(tmp_path: Path, mtime: int) -> None:
    root = small_tree(tmp_path / "src")
    os.utime(root / "top", (mtime, mtime))
    mtime = int(os.stat(root / "top").st_mtime)  # the filesystem may clamp (ext4: year 2446)
    tar = raw_tar(root)
    misaligned = len(tar) % 512
    assert misaligned == 0, "tar stream is not a whole number of 512-byte blocks"
    found = by_name(tar)
    assert set(found) == {"cvmfs", *(f"cvmfs/{rel}" for rel in sorted_walk(root))}
    assert found["cvmfs/top"].mtime == mtime
    # with SOURCE_DATE_EPOCH the far-future time is clamped and the archive is fine anyway
    assert by_name(raw_tar(root, source_date_epoch=EPOCH))["cvmfs/top"].mtime == EPOCH


# name lengths around the 100-byte ustar field, for files, directories and link targets
@pytest.mark.parametrize("length", [98, 99, 100, 101, 155, 200, 255])
def test_long_names_boundaries(tmp_path: Path, length: int) -> None:
    root = tmp_path / "src"
    root.mkdir()
    stem = length - len("cvmfs/")  # member name length == length
    file_name = "f" * stem
    (root / file_name).write_bytes(b"data")
    dir_name = "d" * (stem - 1)  # with its trailing '/' the dir member is `length` long
    (root / dir_name).mkdir()
    os.symlink("t" * length, root / "s")
    os.link(root / file_name, root / "hard")
    tar = raw_tar(root)
    found = by_name(tar)
    assert found[f"cvmfs/{file_name}"].isreg()
    assert found[f"cvmfs/{dir_name}"].isdir()
    assert found["cvmfs/s"].linkname == "t" * length
    assert found["cvmfs/hard"].islnk()
    assert found["cvmfs/hard"].linkname == f"cvmfs/{file_name}"
    uses_pax = "path" in found[f"cvmfs/{file_name}"].pax_headers
    assert uses_pax == (length > 100)


def test_pax_for_long_and_unicode_names(nasty: Path, tmp_path: Path) -> None:
    found = by_name(raw_tar(nasty))
    long_name = "cvmfs/atlas.cern.ch/odd/" + "x" * 200
    unicode_name = "cvmfs/atlas.cern.ch/odd/ünïcödé-名前.txt"
    assert found[long_name].pax_headers["path"] == long_name
    assert found[unicode_name].pax_headers["path"] == unicode_name
    deep = [n for n in found if n.endswith("bottom.txt")]
    assert len(deep) == 1 and deep[0].count("/") == 43
    assert found["cvmfs/atlas.cern.ch/odd/with space.txt"].pax_headers == {}


@needs_gnu_tar
def test_non_utf8_names(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    bad = os.fsdecode(b"latin1-\xe9t\xe9")
    (root / bad).write_bytes(b"bytes name")
    os.symlink(os.fsdecode(b"target-\xff"), root / "link")
    os.utime(root, (EPOCH, EPOCH))
    for path in root.iterdir():
        os.utime(path, (EPOCH, EPOCH), follow_symlinks=False)
    tar = raw_tar(root)
    found = by_name(tar)
    assert found["cvmfs/" + bad].pax_headers["hdrcharset"] == "BINARY"
    assert found["cvmfs/link"].linkname == os.fsdecode(b"target-\xff")
    # GNU tar 1.34 does not know the POSIX 'hdrcharset' keyword (it warns) but keeps the bytes
    out = gnu_extract(tar, tmp_path, tolerated="hdrcharset")
    assert tree_snapshot(out / "cvmfs") == tree_snapshot(root)


def test_hard_links_stored_once(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "b").mkdir(parents=True)
    payload = os.urandom(100_000)
    (root / "b" / "first").write_bytes(payload)
    for name in ("a-link", "b/second", "c-link"):
        os.link(root / "b" / "first", root / name)
    tar = raw_tar(root)
    found = by_name(tar)
    # walk order: a-link comes first, so it carries the content
    assert found["cvmfs/a-link"].isreg() and found["cvmfs/a-link"].size == len(payload)
    for name in ("cvmfs/b/first", "cvmfs/b/second", "cvmfs/c-link"):
        assert found[name].type == tarfile.LNKTYPE
        assert found[name].linkname == "cvmfs/a-link"
        assert found[name].size == 0
    assert len(tar) < 2 * len(payload)
    _, result = pack_bytes(root, compression="none")
    assert (result.files, result.hardlinks) == (1, 3)


def test_nasty_tree_hard_link_farm_content_stored_once(nasty: Path) -> None:
    tar = raw_tar(nasty)
    distinct = sum(p.stat().st_size for p in (nasty / ".data").rglob("content-*"))
    stored = sum(m.size for m in members(tar) if m.isreg())
    odd = sum(p.stat().st_size for p in (nasty / "atlas.cern.ch").rglob("*")
              if p.is_file() and not p.is_symlink())
    assert stored == distinct + odd + len(b"provenance\n")


def test_symlinks_verbatim(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    targets = {"abs": "/cvmfs/sft.cern.ch/lcg", "rel": "../x/./y", "dangling": "no-such",
               "up": "..", "dot": ".", "spaces": "a b\tc", "unicode": "ü/名"}
    for name, target in targets.items():
        os.symlink(target, root / name)
    found = by_name(raw_tar(root))
    for name, target in targets.items():
        member = found[f"cvmfs/{name}"]
        assert member.type == tarfile.SYMTYPE and member.linkname == target
        assert member.size == 0


def test_fifo_skipped_with_warning(tmp_path: Path) -> None:
    root = small_tree(tmp_path / "src")
    os.mkfifo(root / "dir" / "fifo")
    seen: list[str] = []
    tar, result = pack_bytes(root, warn=seen, compression="none")
    assert "cvmfs/dir/fifo" not in by_name(tar)
    assert len(seen) == 1 and "fifo" in seen[0] and "skipped" in seen[0]
    assert result.warnings == seen
    assert result.entries == len(members(tar))


def test_unreadable_file_is_input_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: a chmod 000 file is still readable")
    root = small_tree(tmp_path / "src")
    secret = root / "dir" / "secret"
    secret.write_bytes(b"x")
    secret.chmod(0)
    with pytest.raises(InputError, match="secret"):
        pack_bytes(root)


def test_unreadable_directory_is_input_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: a chmod 000 directory is still readable")
    root = small_tree(tmp_path / "src")
    (root / "dir" / "sub").chmod(0)
    try:
        with pytest.raises(InputError, match="sub"):
            pack_bytes(root)
    finally:
        (root / "dir" / "sub").chmod(0o755)


@pytest.mark.parametrize("victim", ["file", "directory"])
def test_open_failure_is_input_error_naming_the_path(tmp_path: Path, victim: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Works as root too: the failing open/listdir is simulated."""
    root = small_tree(tmp_path / "src")
    bad = root / "dir" / ("secret" if victim == "file" else "sub")
    if victim == "file":
        bad.write_bytes(b"x")
    real_open, real_listdir, real_scandir = os.open, os.listdir, os.scandir

    def deny(path: object) -> None:
        """By path, or by name relative to a directory descriptor, as the walk opens them."""
        if isinstance(path, int):
            return
        name = os.fspath(path)  # type: ignore[arg-type]
        if name == str(bad) or name == bad.name:
            raise PermissionError(13, "Permission denied", name)

    def fake_open(path: object, *args: object, **kwargs: object) -> int:
        deny(path)
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    def fake_listdir(path: object = ".") -> list[str]:
        deny(path)
        return real_listdir(path)  # type: ignore[arg-type]

    def fake_scandir(path: object = ".") -> object:
        deny(path)
        return real_scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "listdir", fake_listdir)
    monkeypatch.setattr(os, "scandir", fake_scandir)
    with pytest.raises(InputError, match=str(bad)) as info:
        pack_bytes(root)
    assert "Permission denied" in str(info.value)


@pytest.mark.parametrize("kind", ["missing", "file", "symlink-to-file"])
def test_bad_dir_is_input_error(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "dir"
    if kind == "file":
        target.write_bytes(b"x")
    elif kind == "symlink-to-file":
        (tmp_path / "f").write_bytes(b"x")
        os.symlink(tmp_path / "f", target)
    sink = Sink()
    with pytest.raises(InputError, match=str(target)):
        pack(target, sink, PackOptions())


def test_tree_none_packs_only_the_mount_point(tmp_path: Path) -> None:
    tar = raw_tar(None, mount_point="/opt/cvmfs", source_date_epoch=EPOCH)
    (only,) = members(tar)
    assert (only.name, only.isdir(), only.mode, only.mtime) == ("opt/cvmfs", True, 0o755, EPOCH)
    assert raw_tar(None) == raw_tar(None)


def test_mount_point_prefixes_every_member(tmp_path: Path) -> None:
    root = small_tree(tmp_path / "src")
    names = [m.name for m in members(raw_tar(root, mount_point="/opt/cvmfs/"))]
    assert names[0] == "opt/cvmfs"
    assert all(n == "opt/cvmfs" or n.startswith("opt/cvmfs/") for n in names)


# -- reproducibility -----------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_pack_twice_identical(nasty: Path, tmp_path: Path, compression: str) -> None:
    first, r1 = pack_bytes(nasty, compression=compression)
    second, r2 = pack_bytes(nasty, compression=compression)
    assert first == second
    assert r1.diff_id == r2.diff_id
    # a copy elsewhere (other inodes, other creation order) packs to the same bytes too
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(nasty), str(copy)], check=True)
    third, r3 = pack_bytes(copy, compression=compression)
    assert third == first
    assert r3.diff_id == r1.diff_id


def header_heavy_tree(root: Path) -> Path:
    """Over 2 MiB of headers among file contents: planning ahead moves chunk boundaries."""
    root.mkdir()
    for d in range(40):
        sub = root / f"d{d:02d}"
        sub.mkdir()
        body = hashlib.sha256(str(d).encode()).digest() * 700
        (sub / "data").write_bytes(body)
        for n in range(60):
            os.link(sub / "data", sub / f"link-{n:02d}")
            (sub / f"dir-{n:02d}").mkdir()
    return root


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_bytes_do_not_depend_on_thread_timing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              compression: str) -> None:
    """The producer plans ahead while the compressor's queue is full, which moves where its
    chunks would be cut; ISA-L's output depends on those cuts, so chunks must be fixed."""
    tree = header_heavy_tree(tmp_path / "src")
    calm, calm_result = pack_bytes(tree, compression=compression)
    busy_patterns = [itertools.repeat(True), itertools.cycle([True, False, False]),
                     itertools.cycle([False, True, True, True, False])]
    for pattern in busy_patterns:
        monkeypatch.setattr(pipeline.Pipeline, "full", lambda self, p=pattern: next(p))
        busy, busy_result = pack_bytes(tree, compression=compression)
        assert busy_result.diff_id == calm_result.diff_id
        assert busy == calm


def test_planning_ahead_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the queue always full the producer plans as far as it may: the memory it holds
    stays within the bound (plus the one run or file that crosses it), and nothing is lost."""
    tree = header_heavy_tree(tmp_path / "src")
    calm, _ = pack_bytes(tree, compression="none")
    bound = 16 << 10
    monkeypatch.setattr(lookahead, "LOOKAHEAD_BYTES", bound)
    monkeypatch.setattr(lookahead, "RUN_BYTES", 4 << 10)
    monkeypatch.setattr(pipeline.Pipeline, "full", lambda self: True)
    held: list[int] = []
    close_run = lookahead.Lookahead._close_run

    def watched_close_run(self: lookahead.Lookahead) -> None:
        close_run(self)
        held.append(self.held)

    monkeypatch.setattr(lookahead.Lookahead, "_close_run", watched_close_run)
    busy, _ = pack_bytes(tree, compression="none")
    assert busy == calm
    assert max(held) >= bound, "the bound was never reached: the test tree is too small"
    slack = (4 << 10) + lookahead.PLANNED_FILE_BYTES + 4096  # a run, or a file and its path
    assert max(held) <= bound + slack, f"held {max(held)} bytes"


@pytest.mark.parametrize(("compression", "level"), [("gzip", 0), ("gzip", 3), ("zstd", 1),
                                                     ("zstd", 19)])
def test_levels_change_bytes_not_diff_id(nasty: Path, compression: str, level: int) -> None:
    data, result = pack_bytes(nasty, compression=compression, level=level)
    _, default = pack_bytes(nasty, compression=compression)
    assert result.diff_id == default.diff_id
    assert decompress(data, compression) == raw_tar(nasty)


def test_gzip_header_has_no_name_and_zero_mtime(nasty: Path) -> None:
    data, _ = pack_bytes(nasty, compression="gzip")
    assert data[:3] == b"\x1f\x8b\x08"
    flags = data[3]
    assert flags & 0x08 == 0, "FNAME set"
    assert flags & 0x10 == 0, "FCOMMENT set"
    assert data[4:8] == b"\0\0\0\0", "gzip MTIME is not 0"


def test_zstd_frame_magic(nasty: Path) -> None:
    data, _ = pack_bytes(nasty, compression="zstd")
    assert data[:4] == b"\x28\xb5\x2f\xfd"


def test_source_date_epoch_clamps(tmp_path: Path) -> None:
    root = small_tree(tmp_path / "src")
    old, new = EPOCH - 1000, EPOCH + 1000
    os.utime(root / "top", (old, old))
    os.utime(root / "dir" / "a.txt", (new, new))
    os.utime(root / "link", (new, new), follow_symlinks=False)
    os.utime(root / "dir", (new, new))
    os.utime(root, (new, new))
    found = by_name(raw_tar(root, source_date_epoch=EPOCH))
    assert found["cvmfs/top"].mtime == old
    assert found["cvmfs/dir/a.txt"].mtime == EPOCH
    assert found["cvmfs/link"].mtime == EPOCH
    assert found["cvmfs/dir"].mtime == EPOCH
    assert found["cvmfs"].mtime == EPOCH
    assert found["cvmfs/dir/sub"].mtime == EPOCH  # == epoch stays epoch
    host = by_name(raw_tar(root))
    assert (host["cvmfs/top"].mtime, host["cvmfs/dir/a.txt"].mtime) == (old, new)
    assert (host["cvmfs/link"].mtime, host["cvmfs"].mtime) == (new, new)


def test_touching_files_after_the_epoch_does_not_change_bytes(nasty: Path) -> None:
    before, _ = pack_bytes(nasty, source_date_epoch=EPOCH)
    for path in [*nasty.rglob("*"), nasty]:
        os.utime(path, (EPOCH + 5000, EPOCH + 5000), follow_symlinks=False)
    after, _ = pack_bytes(nasty, source_date_epoch=EPOCH)
    assert before == after
    assert pack_bytes(nasty)[0] != before


@pytest.mark.parametrize(("value", "expected"), [
    pytest.param(None, None, id="unset"),
    pytest.param("", None, id="empty"),
    pytest.param("0", 0, id="zero"),
    pytest.param("1700000000", 1700000000, id="number"),
])
def test_source_date_epoch_env(monkeypatch: pytest.MonkeyPatch, value: str | None,
                               expected: int | None) -> None:
    if value is None:
        monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    else:
        monkeypatch.setenv("SOURCE_DATE_EPOCH", value)
    assert source_date_epoch() == expected


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "1e9"])
def test_source_date_epoch_env_rejected(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", value)
    with pytest.raises(UsageError, match="SOURCE_DATE_EPOCH"):
        source_date_epoch()


# -- excludes ------------------------------------------------------------------------------------
def exclude_tree(root: Path) -> Path:
    for rel in ("a/.provenance/info", ".provenance/info", "sft.cern.ch/lcg/top.txt",
                "sft.cern.ch/lcg/releases/deep.txt", "sft.cern.ch/other/x.txt",
                "other/sft.cern.ch/lcg/y.txt", "blob.bin", "a/b/c.bin", "a/data/in-dir",
                "b/data", "keep.txt"):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rel.encode())
    return root


EXCLUDES = [
    pytest.param((".provenance",), {".provenance", ".provenance/info", "a/.provenance",
                                    "a/.provenance/info"}, id="basename-dir-everywhere"),
    pytest.param(("*.bin",), {"blob.bin", "a/b/c.bin"}, id="fnmatch-basename"),
    pytest.param(("data/",), {"a/data", "a/data/in-dir"}, id="trailing-slash-dirs-only"),
    pytest.param(("data",), {"a/data", "a/data/in-dir", "b/data"}, id="no-slash-files-and-dirs"),
    pytest.param(("sft.cern.ch/lcg/top.txt",), {"sft.cern.ch/lcg/top.txt"},
                 id="anchored-exact"),
    pytest.param(("/keep.txt",), {"keep.txt"}, id="leading-slash-anchored"),
    pytest.param(("sft.cern.ch/lcg",), {"sft.cern.ch/lcg", "sft.cern.ch/lcg/top.txt",
                                        "sft.cern.ch/lcg/releases",
                                        "sft.cern.ch/lcg/releases/deep.txt"},
                 id="anchored-dir-subtree"),
    pytest.param(("b?ob.bin", "[k]eep.*"), {"blob.bin", "keep.txt"}, id="question-and-class"),
    pytest.param(("nothing-matches",), set(), id="no-match"),
]


@pytest.mark.parametrize(("patterns", "gone"), EXCLUDES)
def test_exclude(tmp_path: Path, patterns: tuple[str, ...], gone: set[str]) -> None:
    root = exclude_tree(tmp_path / "src")
    everything = set(sorted_walk(root))
    names = {m.name[len("cvmfs/"):] for m in members(raw_tar(root, excludes=patterns))
             if m.name != "cvmfs"}
    assert names == everything - gone


def test_exclude_anchored_star_does_not_cross_slash(tmp_path: Path) -> None:
    """gitignore semantics (the Excluder docstring): '*' does not match '/'."""
    root = exclude_tree(tmp_path / "src")
    names = {m.name[len("cvmfs/"):] for m in
             members(raw_tar(root, excludes=("sft.cern.ch/lcg/*.txt",)))}
    assert "sft.cern.ch/lcg/top.txt" not in names
    assert "other/sft.cern.ch/lcg/y.txt" in names
    assert "sft.cern.ch/lcg/releases/deep.txt" in names


@pytest.mark.parametrize("pattern", ["", "/", "//"])
def test_empty_exclude_rejected(tmp_path: Path, pattern: str) -> None:
    with pytest.raises(UsageError, match="exclude"):
        pack_bytes(small_tree(tmp_path / "src"), excludes=(pattern,))


@needs_gnu_tar
def test_excluded_first_hard_link_moves_content_to_next(nasty: Path, tmp_path: Path) -> None:
    tar = raw_tar(nasty, excludes=(".data/",))
    found = by_name(tar)
    assert not any(n.startswith("cvmfs/.data") for n in found)
    first = found["cvmfs/sft.cern.ch/lcg/releases/copy-0.bin"]
    assert first.isreg() and first.size > 0
    later = found["cvmfs/sft.cern.ch/lcg/releases/file-0.txt"]
    assert later.islnk() and later.linkname == first.name
    out = gnu_extract(tar, tmp_path)
    expected = {k: v for k, v in tree_snapshot(nasty).items() if not k.startswith(".data")}
    got = tree_snapshot(out / "cvmfs")
    # link groups are named by their first member, which moved: compare contents and groups
    assert set(got) == set(expected)
    for rel, entry in expected.items():
        if entry["type"] == "file":
            assert got[rel]["sha256"] == entry["sha256"]
            assert got[rel]["mode"] == entry["mode"]
    groups = {}
    for rel, entry in got.items():
        if entry["type"] == "file":
            groups.setdefault(entry["link_group"], set()).add(rel)
    assert {"sft.cern.ch/lcg/releases/copy-0.bin",
            "sft.cern.ch/lcg/releases/file-0.txt"} in groups.values()


# -- option validation ---------------------------------------------------------------------------
@pytest.mark.parametrize(("compression", "level", "ok"), [
    pytest.param("gzip", 0, True, id="gzip-0"),
    pytest.param("gzip", 3, True, id="gzip-3"),
    pytest.param("gzip", 4, False, id="gzip-4"),
    pytest.param("gzip", -1, False, id="gzip-minus-1"),
    pytest.param("gzip", 9, False, id="gzip-9"),
    pytest.param("zstd", 1, True, id="zstd-1"),
    pytest.param("zstd", 22, True, id="zstd-22"),
    pytest.param("zstd", 0, False, id="zstd-0"),
    pytest.param("zstd", 23, False, id="zstd-23"),
    pytest.param("none", 0, True, id="none-0"),
    pytest.param("none", 1, False, id="none-1"),
    pytest.param("bzip2", None, False, id="unknown-compression"),
])
def test_level_validation(compression: str, level: int | None, ok: bool) -> None:
    if ok:
        assert PackOptions(compression=compression, level=level).level == level
    else:
        with pytest.raises(UsageError):
            PackOptions(compression=compression, level=level)


@pytest.mark.parametrize(("compression", "level"), [("gzip", 1), ("zstd", 1), ("none", 0)])
def test_default_levels(compression: str, level: int) -> None:
    assert PackOptions(compression=compression).level == level


@pytest.mark.parametrize(("given", "expected"), [
    pytest.param("/cvmfs", "/cvmfs", id="plain"),
    pytest.param("/opt/cvmfs/", "/opt/cvmfs", id="trailing-slash"),
    pytest.param("//opt//cvmfs", "/opt/cvmfs", id="double-slashes"),
    pytest.param("cvmfs", None, id="relative"),
    pytest.param("/", None, id="root"),
    pytest.param("", None, id="empty"),
    pytest.param("/a/../b", None, id="dotdot"),
    pytest.param("/a/./b", None, id="dot"),
    pytest.param("/..", None, id="only-dotdot"),
    pytest.param("/.wh.etc", None, id="whiteout"),
    pytest.param("/usr/.wh..wh..opq", None, id="opaque-whiteout"),
    pytest.param("/a\nb", None, id="newline"),
])
def test_mount_point_validation(given: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(UsageError, match="--path"):
            normalise_mount_point(given)
        with pytest.raises(UsageError):
            PackOptions(mount_point=given)
    else:
        assert normalise_mount_point(given) == expected
        assert PackOptions(mount_point=given).mount_point == expected


# -- sizes and chunk boundaries ------------------------------------------------------------------
READ_SIZE = 4 << 20  # a large read, several chunks
SIZES = [0, 1, 511, 512, 513, CHUNK - 512, CHUNK - 1, CHUNK, CHUNK + 1, 3 << 20, READ_SIZE,
         READ_SIZE + 1, 2 * READ_SIZE + 7]


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_file_sizes_around_chunk_boundaries(tmp_path: Path, compression: str) -> None:
    root = tmp_path / "src"
    root.mkdir()
    contents = {}
    for i, size in enumerate(SIZES):
        # position-dependent content so a reordered or dropped chunk is noticed
        block = hashlib.sha256(str(i).encode()).digest() * 2
        data = (block * (size // 64 + 1))[:size]
        if size > 100:
            data = data[:-100] + os.urandom(100)
        name = f"{i:02d}-size-{size}"
        (root / name).write_bytes(data)
        contents[f"cvmfs/{name}"] = data
    data, result = pack_bytes(root, compression=compression)
    tar = decompress(data, compression)
    assert len(tar) == result.tar_size and len(tar) % 512 == 0
    assert result.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        got = {m.name: archive.extractfile(m).read()  # type: ignore[union-attr]
               for m in archive if m.isreg()}
    assert got == contents


@pytest.mark.parametrize("size", [CHUNK - 1024 - 1, CHUNK - 1024, CHUNK - 1024 + 1])
def test_buffer_exactly_full_after_header(tmp_path: Path, size: int) -> None:
    """Root header (512) + file header (512) + data hits CHUNK exactly, then more files."""
    root = tmp_path / "src"
    root.mkdir()
    (root / "a").write_bytes(b"a" * size)
    (root / "b").write_bytes(b"b" * 3)
    (root / "c").write_bytes(os.urandom(CHUNK + 5))
    found = {}
    with tarfile.open(fileobj=io.BytesIO(raw_tar(root)), mode="r:") as archive:
        for m in archive:
            if m.isreg():
                found[m.name] = archive.extractfile(m).read()  # type: ignore[union-attr]
    assert found == {f"cvmfs/{n}": (root / n).read_bytes() for n in "abc"}


def test_progress_reports_every_byte_and_file(nasty: Path) -> None:
    seen: list[tuple[int, int]] = []
    sink = Sink()
    result = pack(nasty, sink, PackOptions(compression="gzip"),
                  progress=lambda tar_bytes, files: seen.append((tar_bytes, files)))
    assert sum(b for b, _ in seen) == result.tar_size
    assert sum(f for _, f in seen) == result.files


class BrokenSink:
    """Fails on its `fail_on`-th write (1 = the first)."""

    def __init__(self, fail_on: int) -> None:
        self.fail_on = fail_on
        self.writes = 0

    def write(self, data: bytes | memoryview) -> None:
        self.writes += 1
        if self.writes >= self.fail_on:
            raise OSError(28, "No space left on device")


def pack_with_deadline(tree: Path, sink: object, options: PackOptions,
                       seconds: float = 5) -> BaseException | None:
    """Run pack in a thread so a deadlock fails the test instead of hanging the suite."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            pack(tree, sink, options)  # type: ignore[arg-type]
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"pack() did not return within {seconds}s (deadlock)"
    return outcome[0]


@pytest.mark.parametrize(("compression", "fail_on", "big"), [
    pytest.param("none", 1, True, id="first-write-while-streaming"),
    pytest.param("none", 3, True, id="later-write-while-streaming"),
    pytest.param("gzip", 1, False, id="gzip-first-write-is-the-final-flush"),
    pytest.param("zstd", 1, False, id="zstd-first-write-is-the-final-flush"),
])
def test_sink_error_propagates(tmp_path: Path, compression: str, fail_on: int,
                               big: bool) -> None:
    root = small_tree(tmp_path / "src")
    if big:
        (root / "big").write_bytes(os.urandom(12 * CHUNK))
    error = pack_with_deadline(root, BrokenSink(fail_on), PackOptions(compression=compression))
    assert isinstance(error, OSError) and "No space" in str(error)


class SlowSink(Sink):
    """Counts the writes it has started; each takes a while, so chunks queue up."""

    def __init__(self) -> None:
        super().__init__()
        self.started = 0

    def write(self, data: bytes | memoryview) -> None:
        self.started += 1
        time.sleep(0.02)
        super().write(data)


def test_interrupt_stops_writes_at_once(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """After an interrupt the worker must not go on writing the queued chunks into a sink
    that is being aborted."""
    root = tmp_path / "src"
    root.mkdir()
    (root / "big").write_bytes(os.urandom(24 * CHUNK))
    sink = SlowSink()
    workers: list[threading.Thread] = []
    writes_when_cancelled: list[int] = []
    cancel = pipeline.Pipeline.cancel

    def watched_cancel(self: pipeline.Pipeline) -> None:
        workers.append(self._thread)
        writes_when_cancelled.append(sink.started)
        cancel(self)

    def progress(tar_bytes: int, files: int) -> None:
        if sink.writes >= 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Pipeline, "cancel", watched_cancel)
    with pytest.raises(KeyboardInterrupt):
        pack(root, sink, PackOptions(compression="none"), progress=progress)
    assert writes_when_cancelled, "cancel() was never called"
    workers[0].join(timeout=10)
    assert not workers[0].is_alive()
    # the worker may be just past its check of the cancel flag: one write, not the queue
    assert sink.started - writes_when_cancelled[0] <= 1, "queued chunks written after cancel"


@pytest.mark.parametrize("busy", [False, True], ids=["calm", "planning-ahead"])
def test_first_error_in_walk_order_whatever_the_timing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, busy: bool) -> None:
    """An error met while planning ahead is raised only when the walk reaches it, so the
    error reported is the first in walk order, not the first the planner saw."""
    root = tmp_path / "src"
    root.mkdir()
    (root / "a").write_bytes(os.urandom(3 * CHUNK))
    (root / "b").write_bytes(b"b")
    (root / "c").mkdir()
    real_open, real_listing = os.open, walker._listing

    def failing_open(path: str, flags: int, *args: object, **kwargs: object) -> int:
        if str(path).endswith("/src/b"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    def failing_listing(fd: int, path: str) -> list[str]:
        if path.endswith("/src/c"):
            raise InputError(f"{path}: cannot read directory: Permission denied")
        return real_listing(fd, path)

    monkeypatch.setattr(os, "open", failing_open)
    monkeypatch.setattr(walker, "_listing", failing_listing)
    monkeypatch.setattr(pipeline.Pipeline, "full", lambda self: busy)
    with pytest.raises(InputError, match=r"/src/b: cannot read: Permission denied"):
        pack_bytes(root, compression="gzip")


# -- cross-check with the shared shrinkwrap generator --------------------------------------------
@needs_gnu_tar
@pytest.mark.skipif(not SHRINKWRAP.is_file(), reason=f"{SHRINKWRAP} is absent")
def test_shrinkwrap_tree_round_trips_through_gnu_tar(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(SHRINKWRAP), str(tmp_path / "gen"), "--files", "300",
                    "--mib", "4", "--nasty"], check=True, capture_output=True)
    tree = tmp_path / "gen" / "cvmfs"
    tar = raw_tar(tree)
    out = gnu_extract(tar, tmp_path)
    assert tree_snapshot(out / "cvmfs") == tree_snapshot(tree)
    data, result = pack_bytes(tree, compression="gzip")
    assert pack_bytes(tree, compression="gzip")[0] == data
    assert gzip.decompress(data) == tar
    assert result.hardlinks > 0
