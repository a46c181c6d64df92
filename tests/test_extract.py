"""extract(): round trips with the packer, and hostile layers built by hand with tarfile."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import signal
import stat
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from helpers import EPOCH, dir_bytes, make_nasty_tree, tree_snapshot

from cvmfs_inject.errors import InputError
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.pack import directories as directories_module
from cvmfs_inject.pack import extract as extract_module
from cvmfs_inject.pack.extract import ExtractResult, decompressed, extract
from cvmfs_inject.pack.options import PackOptions
from cvmfs_inject.pack.packer import pack
from cvmfs_inject.stack.index import index_of_layer, union

MEDIA = {"none": MediaType.OCI_LAYER, "gzip": MediaType.OCI_LAYER_GZIP,
         "zstd": MediaType.OCI_LAYER_ZSTD}


# -- building layers by hand -----------------------------------------------------------------
@dataclass
class E:
    """One tar member: kind is file, dir, symlink, hardlink, chr, blk or fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    link: str = ""
    mode: int = 0o644
    mtime: int = EPOCH


TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
         "hardlink": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
         "fifo": tarfile.FIFOTYPE}


def build(entries: list[E], compression: str = "none") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = TYPES[entry.kind]
            info.mode = entry.mode
            info.mtime = entry.mtime
            info.linkname = entry.link
            if entry.kind in ("chr", "blk"):
                info.devmajor, info.devminor = 1, 3
            if entry.kind == "file":
                info.size = len(entry.data)
                archive.addfile(info, io.BytesIO(entry.data))
            else:
                archive.addfile(info)
    raw = buf.getvalue()
    if compression == "gzip":
        return gzip.compress(raw, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


@dataclass
class Scene:
    """A scratch area: `target` to extract into, `outside` holding a victim file."""

    base: Path
    target: Path
    outside: Path

    def outside_state(self) -> dict[str, str]:
        return {k: v for k, v in dir_bytes(self.base).items()
                if not (k == "target/" or k.startswith("target/"))}


@pytest.fixture(autouse=True, params=["forked", "in-process"])
def applier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: the file-system half in a forked child (`pack.offload`), and in
    this process (where forking is unsafe)."""
    monkeypatch.setattr(extract_module, "writes_apart", lambda: request.param == "forked")
    return str(request.param)


@pytest.fixture
def scene(tmp_path: Path) -> Scene:
    base = tmp_path / "base"
    target, outside = base / "target", base / "outside"
    target.mkdir(parents=True)
    outside.mkdir()
    (outside / "victim").write_bytes(b"original")
    return Scene(base, target, outside)


def run(scene: Scene, layer: bytes, compression: str = "none", mount: str = "/cvmfs",
        warnings: list[str] | None = None) -> ExtractResult:
    reader = decompressed(io.BytesIO(layer), MEDIA[compression])
    return extract(reader, str(scene.target), mount,
                   warn=warnings.append if warnings is not None else None)


def pack_layer(tree: Path, compression: str, mount: str = "/cvmfs") -> bytes:
    class Sink:
        data = bytearray()

        def write(self, data: bytes | memoryview) -> None:
            self.data += data

    sink = Sink()
    sink.data = bytearray()
    pack(tree, sink, PackOptions(compression=compression, mount_point=mount))
    return bytes(sink.data)


# -- round trip ------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_round_trip_nasty_tree(tmp_path: Path, scene: Scene, compression: str) -> None:
    src = make_nasty_tree(tmp_path / "src")
    os.chmod(src / "atlas.cern.ch" / "empty-dir", 0o700)
    os.utime(src / "atlas.cern.ch" / "empty-dir", (EPOCH - 7, EPOCH - 7))
    (src / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "setuid", 0o4750)
    os.utime(src / "setuid", (EPOCH - 99, EPOCH - 99))
    os.chmod(src, 0o750)
    os.utime(src, (EPOCH - 3, EPOCH - 3))
    warnings: list[str] = []
    result = run(scene, pack_layer(src, compression), compression, warnings=warnings)
    assert warnings == [] and result.skipped == []
    expected = tree_snapshot(src)
    expected["setuid"]["mode"] = 0o750  # unpack drops setuid, setgid and sticky bits
    assert tree_snapshot(scene.target) == expected
    root = os.stat(scene.target)
    assert (stat.S_IMODE(root.st_mode), int(root.st_mtime)) == (0o750, EPOCH - 3)
    assert result.entries == len(tree_snapshot(src))
    # hard links really share an inode
    a = os.stat(scene.target / ".data" / "00" / "content-0")
    b = os.stat(scene.target / "sft.cern.ch" / "lcg" / "releases" / "file-0.txt")
    assert (a.st_ino, a.st_nlink) == (b.st_ino, 3)


@pytest.mark.parametrize("cache_size", [1, 3])
def test_directory_times_and_modes_hold_when_the_caches_forget(
        tmp_path: Path, scene: Scene, monkeypatch: pytest.MonkeyPatch, cache_size: int) -> None:
    """The known-directory cache and the table's path cache are bounded; with bounds this
    small they are cleared all the time, and every directory still gets its mode and time."""
    monkeypatch.setattr(directories_module, "_KNOWN_DIRECTORIES", cache_size)
    src = make_nasty_tree(tmp_path / "src")
    directories = sorted(p for p in src.rglob("*") if p.is_dir() and not p.is_symlink())
    for i, deep in enumerate(reversed(directories)):  # deepest first: 0o500 locks them
        os.chmod(deep, (0o750, 0o755, 0o555, 0o500)[i % 4])  # made final, or chmod at the end
        os.utime(deep, (EPOCH - i, EPOCH - i))
    os.chmod(src, 0o705)
    os.utime(src, (EPOCH - 3, EPOCH - 3))
    try:
        run(scene, pack_layer(src, "none"))
        assert tree_snapshot(scene.target) == tree_snapshot(src)
        root = os.stat(scene.target)
        assert (stat.S_IMODE(root.st_mode), int(root.st_mtime)) == (0o705, EPOCH - 3)
    finally:
        for tree in (src, scene.target):  # let pytest remove them
            for deep in [tree, *(p for p in tree.rglob("*") if p.is_dir()
                                 and not p.is_symlink())]:
                os.chmod(deep, 0o755)


def test_setuid_setgid_and_sticky_bits_are_dropped(tmp_path: Path, scene: Scene) -> None:
    """CernVM-FS is mounted nosuid; an unpacked root-owned setuid file would not be."""
    src = tmp_path / "src"
    (src / "group-dir").mkdir(parents=True)
    (src / "shared-tmp").mkdir()
    for name, mode in (("setuid", 0o4755), ("setgid", 0o2711), ("both", 0o6700)):
        (src / name).write_bytes(b"#!/bin/sh\n")
        os.chmod(src / name, mode)
    os.link(src / "setuid", src / "setuid-link")
    os.chmod(src / "group-dir", 0o2775)
    os.chmod(src / "shared-tmp", 0o1777)
    os.chmod(src, 0o4755)
    run(scene, pack_layer(src, "gzip"), "gzip")
    modes = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in scene.target.iterdir()}
    assert modes == {"setuid": 0o755, "setuid-link": 0o755, "setgid": 0o711, "both": 0o700,
                     "group-dir": 0o775, "shared-tmp": 0o777}
    assert stat.S_IMODE(scene.target.stat().st_mode) == 0o755


def test_round_trip_other_mount_point(tmp_path: Path, scene: Scene) -> None:
    src = make_nasty_tree(tmp_path / "src", files=4)
    layer = pack_layer(src, "gzip", mount="/opt/sw/cvmfs")
    run(scene, layer, "gzip", mount="/opt/sw/cvmfs/")
    assert tree_snapshot(scene.target) == tree_snapshot(src)
    # the same layer read with the default mount point extracts nothing
    other = scene.base / "other"
    other.mkdir()
    result = extract(decompressed(io.BytesIO(layer), MEDIA["gzip"]), str(other), "/cvmfs")
    assert (result.entries, os.listdir(other)) == (0, [])


def test_dot_slash_prefix_and_root_entry(scene: Scene) -> None:
    layer = build([E("./cvmfs/", "dir", mode=0o711, mtime=EPOCH - 1),
                   E("./cvmfs/a", data=b"a", mode=0o600, mtime=EPOCH - 2),
                   E("cvmfs/d/", "dir", mode=0o705, mtime=EPOCH - 4),
                   E("cvmfs/d/b", data=b"b", mtime=EPOCH - 5)])
    run(scene, layer)
    assert (scene.target / "a").read_bytes() == b"a"
    assert stat.S_IMODE(os.stat(scene.target / "a").st_mode) == 0o600
    assert int(os.stat(scene.target / "a").st_mtime) == EPOCH - 2
    assert stat.S_IMODE(os.stat(scene.target).st_mode) == 0o711
    assert int(os.stat(scene.target).st_mtime) == EPOCH - 1
    assert stat.S_IMODE(os.stat(scene.target / "d").st_mode) == 0o705
    assert int(os.stat(scene.target / "d").st_mtime) == EPOCH - 4


@pytest.mark.parametrize("root", [E("cvmfs", "symlink", link="/etc", mode=0o777),
                                  E("cvmfs", data=b"x", mode=0o666)], ids=["symlink", "file"])
def test_a_mount_point_that_is_not_a_directory_leaves_the_target_alone(
        scene: Scene, root: E) -> None:
    before = os.stat(scene.target)
    result = run(scene, build([root, E("cvmfs/a", data=b"a")]))
    after = os.stat(scene.target)
    assert stat.S_IMODE(after.st_mode) == stat.S_IMODE(before.st_mode)
    assert (scene.target / "a").read_bytes() == b"a"
    assert any("mount point itself" in why for why in result.skipped)


def test_the_last_member_of_a_directory_gives_its_mode_and_time(scene: Scene) -> None:
    """As tar: a directory that appears twice ends with the later member's attributes."""
    run(scene, build([E("cvmfs/d/", "dir", mode=0o755, mtime=EPOCH - 1),
                      E("cvmfs/d/f", data=b"f"),
                      E("cvmfs/d/", "dir", mode=0o500, mtime=EPOCH - 2),
                      E("cvmfs/", "dir", mode=0o700, mtime=EPOCH - 3),
                      E("cvmfs/", "dir", mode=0o750, mtime=EPOCH - 4)]))
    d = os.stat(scene.target / "d")
    assert (stat.S_IMODE(d.st_mode), int(d.st_mtime)) == (0o500, EPOCH - 2)
    root = os.stat(scene.target)
    assert (stat.S_IMODE(root.st_mode), int(root.st_mtime)) == (0o750, EPOCH - 4)


def test_missing_parent_directories_are_created(scene: Scene) -> None:
    run(scene, build([E("cvmfs/x/y/z/file", data=b"deep")]))
    assert (scene.target / "x" / "y" / "z" / "file").read_bytes() == b"deep"


# -- hostile layers: must raise and write nothing outside the target --------------------------
OUTSIDE = "@OUTSIDE@"  # replaced by the scene's real outside directory (see _materialise)


def refused_cases(outside: str = OUTSIDE) -> list:
    return [
        pytest.param([E("cvmfs/../../escape", data=b"x")], id="dotdot-escape"),
        pytest.param([E("cvmfs/a/../../x", data=b"x")], id="dotdot-inside-then-out"),
        # after a name whose parent was checked: "/x" has the same parent, "" (a shortcut)
        pytest.param([E("cvmfs/ok", data=b"x"), E("cvmfs//cvmfs-inject-escape", data=b"x")],
                     id="absolute-after-top-level-name"),
        pytest.param([E("cvmfs/a/ok", data=b"x"), E("cvmfs/a/..", data=b"x")],
                     id="dotdot-after-name-in-same-directory"),
        pytest.param([E("cvmfs/../outside/victim", data=b"pwned")], id="dotdot-onto-victim"),
        pytest.param([E("cvmfs/link", "symlink", link=outside),
                      E("cvmfs/link/pwned", data=b"x")], id="file-through-abs-symlink"),
        pytest.param([E("cvmfs/link", "symlink", link=outside),
                      E("cvmfs/link/victim", data=b"pwned")], id="overwrite-through-symlink"),
        pytest.param([E("cvmfs/link", "symlink", link="../outside"),
                      E("cvmfs/link/pwned", data=b"x")], id="file-through-rel-symlink"),
        pytest.param([E("cvmfs/link", "symlink", link=outside),
                      E("cvmfs/link/sub/", "dir")], id="dir-through-symlink"),
        pytest.param([E("cvmfs/link", "symlink", link=outside),
                      E("cvmfs/link/s", "symlink", link="/etc")], id="symlink-through-symlink"),
        pytest.param([E("cvmfs/d/", "dir"), E("cvmfs/s", "symlink", link="d"),
                      E("cvmfs/s/f", data=b"x")], id="file-through-inside-dir-symlink"),
        pytest.param([E("cvmfs/f", data=b"file"), E("cvmfs/f/x", data=b"x")],
                     id="file-through-regular-file"),
        pytest.param([E("cvmfs/h", "hardlink", link="../etc/passwd")], id="hardlink-dotdot"),
        pytest.param([E("cvmfs/h", "hardlink", link="/etc/passwd")], id="hardlink-absolute"),
        pytest.param([E("cvmfs/h", "hardlink", link="etc/passwd")],
                     id="hardlink-outside-mount"),
        pytest.param([E("cvmfs/h", "hardlink", link="cvmfs/../../outside/victim")],
                     id="hardlink-dotdot-via-prefix"),
        pytest.param([E("cvmfs/dl", "symlink", link=outside),
                      E("cvmfs/h", "hardlink", link="cvmfs/dl/victim")],
                     id="hardlink-through-symlink-to-victim"),
        pytest.param([E("cvmfs/sym", "symlink", link=f"{outside}/victim"),
                      E("cvmfs/h", "hardlink", link="cvmfs/sym")], id="hardlink-to-symlink"),
        pytest.param([E("cvmfs/d/", "dir"), E("cvmfs/h", "hardlink", link="cvmfs/d")],
                     id="hardlink-to-directory"),
        pytest.param([E("cvmfs/h", "hardlink", link="cvmfs/later"),
                      E("cvmfs/later", data=b"x")], id="hardlink-before-target"),
        pytest.param([E("cvmfs/d/", "dir"), E("cvmfs/d", "symlink", link=outside),
                      E("cvmfs/d/pwned", data=b"x")], id="dir-replaced-by-symlink"),
    ]


def _materialise(entries: list[E], scene: Scene) -> list[E]:
    out = []
    for entry in entries:
        link = entry.link.replace(OUTSIDE, str(scene.outside))
        out.append(E(entry.name, entry.kind, entry.data, link, entry.mode, entry.mtime))
    return out


@pytest.mark.parametrize("compression", ["none", "gzip"])
@pytest.mark.parametrize("entries", refused_cases())
def test_hostile_layer_refused(scene: Scene, entries: list[E], compression: str) -> None:
    before = scene.outside_state()
    layer = build(_materialise(entries, scene), compression)
    with pytest.raises(InputError):
        run(scene, layer, compression)
    assert scene.outside_state() == before
    assert os.listdir(scene.outside) == ["victim"]
    assert (scene.outside / "victim").read_bytes() == b"original"
    assert os.stat(scene.outside / "victim").st_nlink == 1
    assert not (scene.base.parent / "escape").exists()


# -- members outside the mount prefix are ignored ----------------------------------------------
@pytest.mark.parametrize("name", [
    pytest.param("etc/passwd", id="relative-outside-prefix"),
    pytest.param("cvmfsX/file", id="prefix-lookalike"),
    pytest.param("cvmfs.x", id="prefix-without-slash"),
    pytest.param("/UNIQUE/x", id="absolute"),
    pytest.param("/cvmfs/UNIQUE", id="absolute-under-mount"),
    pytest.param("../UNIQUE", id="dotdot-top-level"),
    pytest.param("UNIQUE", id="top-level-file"),
])
def test_members_outside_prefix_ignored(scene: Scene, name: str) -> None:
    unique = f"cvmfs-inject-test-{uuid.uuid4().hex}"
    name = name.replace("UNIQUE", unique)
    before = scene.outside_state()
    layer = build([E("cvmfs/", "dir", mode=0o755), E(name, data=b"pwned"),
                   E("cvmfs/kept", data=b"kept")])
    result = run(scene, layer)
    assert os.listdir(scene.target) == ["kept"]
    assert result.entries == 1
    assert scene.outside_state() == before
    assert not os.path.lexists(f"/{unique}")
    assert not os.path.lexists(f"/cvmfs/{unique}")
    assert not os.path.lexists(scene.base.parent / unique)


# -- special files are skipped with a warning --------------------------------------------------
@pytest.mark.parametrize(("entry", "why"), [
    pytest.param(E("cvmfs/dev/null", "chr", mode=0o666), "device", id="char-device"),
    pytest.param(E("cvmfs/dev/sda", "blk", mode=0o660), "device", id="block-device"),
    pytest.param(E("cvmfs/fifo", "fifo"), "fifo", id="fifo"),
    pytest.param(E("cvmfs/.wh.gone", data=b""), "whiteout", id="whiteout-file"),
    pytest.param(E("cvmfs/sub/.wh..wh..opq", data=b""), "whiteout", id="opaque-whiteout"),
])
def test_special_members_skipped(scene: Scene, entry: E, why: str) -> None:
    warnings: list[str] = []
    layer = build([E("cvmfs/sub/", "dir", mode=0o755), entry, E("cvmfs/after", data=b"ok")])
    result = run(scene, layer, warnings=warnings)
    assert not os.path.lexists(scene.target / entry.name[len("cvmfs/"):])
    assert (scene.target / "after").read_bytes() == b"ok"
    assert len(warnings) == 1 and entry.name in warnings[0] and why in warnings[0]
    assert len(result.skipped) == 1 and entry.name in result.skipped[0]
    assert result.entries == 2


# -- later members replace earlier ones, never through a link -----------------------------------
def test_file_replaces_symlink_without_following_it(scene: Scene) -> None:
    victim = scene.outside / "victim"
    layer = build([E("cvmfs/link", "symlink", link=str(victim)),
                   E("cvmfs/link", data=b"new content", mode=0o640)])
    run(scene, layer)
    assert not (scene.target / "link").is_symlink()
    assert (scene.target / "link").read_bytes() == b"new content"
    assert victim.read_bytes() == b"original"
    assert int(os.stat(victim).st_mtime) != EPOCH


def test_directory_replaces_symlink(scene: Scene) -> None:
    layer = build([E("cvmfs/link", "symlink", link=str(scene.outside)),
                   E("cvmfs/link/", "dir", mode=0o700),
                   E("cvmfs/link/f", data=b"inside")])
    run(scene, layer)
    assert (scene.target / "link").is_dir() and not (scene.target / "link").is_symlink()
    assert (scene.target / "link" / "f").read_bytes() == b"inside"
    assert os.listdir(scene.outside) == ["victim"]


@pytest.mark.parametrize("second", [
    pytest.param(E("cvmfs/x", data=b"two"), id="file-replaces-file"),
    pytest.param(E("cvmfs/x", "symlink", link="elsewhere"), id="symlink-replaces-file"),
    pytest.param(E("cvmfs/x", "hardlink", link="cvmfs/other"), id="hardlink-replaces-file"),
])
def test_later_member_replaces_earlier(scene: Scene, second: E) -> None:
    layer = build([E("cvmfs/other", data=b"other"), E("cvmfs/x", data=b"one"), second])
    run(scene, layer)
    path = scene.target / "x"
    if second.kind == "symlink":
        assert os.readlink(path) == "elsewhere"
    elif second.kind == "hardlink":
        assert os.stat(path).st_ino == os.stat(scene.target / "other").st_ino
    else:
        assert path.read_bytes() == b"two"


def test_symlink_replacing_symlink_is_not_followed(scene: Scene) -> None:
    layer = build([E("cvmfs/l", "symlink", link=str(scene.outside)),
                   E("cvmfs/l", "symlink", link="new-target")])
    run(scene, layer)
    assert os.readlink(scene.target / "l") == "new-target"
    assert os.listdir(scene.outside) == ["victim"]


def test_hard_link_inside_mount_works(scene: Scene) -> None:
    layer = build([E("cvmfs/a/f", data=b"shared", mode=0o755),
                   E("cvmfs/b/g", "hardlink", link="cvmfs/a/f"),
                   E("cvmfs/c", "hardlink", link="./cvmfs/a/f")])
    run(scene, layer)
    inodes = {os.stat(scene.target / p).st_ino for p in ("a/f", "b/g", "c")}
    assert len(inodes) == 1
    assert os.stat(scene.target / "c").st_nlink == 3


def test_symlinks_created_verbatim_not_followed(scene: Scene) -> None:
    layer = build([E("cvmfs/abs", "symlink", link=str(scene.outside / "victim"), mtime=EPOCH - 9),
                   E("cvmfs/dangling", "symlink", link="nowhere"),
                   E("cvmfs/up", "symlink", link="../../..")])
    run(scene, layer)
    assert os.readlink(scene.target / "abs") == str(scene.outside / "victim")
    assert os.readlink(scene.target / "dangling") == "nowhere"
    assert os.readlink(scene.target / "up") == "../../.."
    assert int(os.lstat(scene.target / "abs").st_mtime) == EPOCH - 9
    assert int(os.stat(scene.outside / "victim").st_mtime) != EPOCH - 9


# -- broken streams --------------------------------------------------------------------------
def sample_tar() -> bytes:
    return build([E("cvmfs/", "dir")] + [E(f"cvmfs/f{i:02d}", data=os.urandom(5000))
                                         for i in range(20)])


def corrupt(kind: str) -> tuple[bytes, str]:
    raw = sample_tar()
    gz = gzip.compress(raw, mtime=0)
    mid = len(gz) // 2
    if kind == "gzip-bad-magic":
        return b"not gzip at all" * 10, "gzip"
    if kind == "gzip-flipped-byte-mid-stream":
        return gz[:mid] + bytes([gz[mid] ^ 0xFF]) + gz[mid + 1:], "gzip"
    if kind == "gzip-flipped-byte-in-stored-content":
        # level 0: stored blocks, the tar bytes verbatim after a 10-byte gzip header and a
        # 5-byte block header; raw offset 2000 is inside f00's content, so the tar stays
        # valid and only the CRC at the end of the stream can tell. Padding after the tar
        # (as GNU tar's records add) keeps a reader that stops at the end-of-archive
        # marker from reaching the CRC by chance.
        stored = bytearray(gzip.compress(raw + bytes(256 << 10), compresslevel=0, mtime=0))
        stored[10 + 5 + 2000] ^= 0x01
        return bytes(stored), "gzip"
    if kind == "gzip-garbage-deflate-block":
        return gz[:10] + b"\xff" * 20 + gz[30:], "gzip"
    if kind == "gzip-truncated":
        return gz[:mid], "gzip"
    if kind == "gzip-bad-crc":
        return gz[:-8] + b"\0\0\0\0" + gz[-4:], "gzip"
    if kind == "gzip-bad-length":
        return gz[:-4] + b"\0\0\0\0", "gzip"
    if kind == "zstd-truncated":
        z = zstandard.ZstdCompressor().compress(raw)
        return z[: len(z) // 2], "zstd"
    if kind == "zstd-bad-magic":
        return b"\0" * 100, "zstd"
    if kind == "tar-truncated-mid-data":
        return raw[:512 * 3 + 100], "none"
    if kind == "tar-garbage":
        return b"garbage!" * 200, "none"
    if kind == "tar-empty":
        return b"", "none"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", [
    "gzip-bad-magic", "gzip-flipped-byte-mid-stream", "gzip-flipped-byte-in-stored-content",
    "gzip-garbage-deflate-block",
    "gzip-truncated", "gzip-bad-crc", "gzip-bad-length", "zstd-truncated", "zstd-bad-magic",
    "tar-truncated-mid-data", "tar-garbage", "tar-empty",
])
def test_broken_stream_is_input_error(scene: Scene, kind: str) -> None:
    data, compression = corrupt(kind)
    with pytest.raises(InputError):
        run(scene, data, compression)


def _header(name: bytes, kind: bytes, size_field: bytes) -> bytes:
    """One ustar header with a size field as given (and a checksum that matches)."""
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = b"0000644\0"
    block[124:136] = size_field.ljust(12, b"\0")
    block[136:148] = b"00000000000\0"
    block[156:157] = kind
    block[257:263] = b"ustar\0"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _pax(records: bytes) -> bytes:
    return _header(b"pax", b"x", b"%011o" % len(records)) + records.ljust(512, b"\0")


@pytest.mark.parametrize("layer", [
    _header(b"cvmfs/x", b"x", b"-0001000") + bytes(1024),  # a PAX header that points back
    _header(b"cvmfs/f", b"0", b"-0001000") + bytes(1024),  # a file whose data points back
    _pax(b"13 size=-512\n") + _header(b"cvmfs/f", b"0", b"0") + bytes(1024),
    _header(b"cvmfs/x", b"x", b"%011o" % (64 << 20)) + bytes(1024),  # 64 MiB of "records"
    _pax(b"14 path=a\0b/c\n") + _header(b"cvmfs/f", b"0", b"0") + bytes(1024),
    _pax(b"13 mtime=nan\n") + _header(b"cvmfs/f", b"0", b"0") + bytes(1024),
    _pax(b"15 mtime=1e300\n") + _header(b"cvmfs/f", b"0", b"0") + bytes(1024),
], ids=["pax-header", "regular-file", "pax-size-record", "huge-pax-header", "nul-in-path",
        "nan-mtime", "huge-mtime"])
def test_hostile_headers_are_input_errors(scene: Scene, layer: bytes) -> None:
    """A negative size would move the reader backwards to the same header, forever; a huge
    extended header would be held in memory whole."""
    def stuck(signum: int, frame: object) -> None:
        raise AssertionError("extraction is looping")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(20)
    try:
        with pytest.raises(InputError, match="not a valid tar stream"):
            run(scene, layer, "none")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_tree_deeper_than_512_directories_is_refused(scene: Scene) -> None:
    """Nothing real is that deep, and cleaning one up would exceed Python's recursion."""
    deep = "cvmfs/" + "d/" * 600 + "f"
    with pytest.raises(InputError, match="directories deep"):
        run(scene, build([E(deep, data=b"x")]))


def member_offsets(raw: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as archive:
        return [m.offset for m in archive.getmembers()]


TRUNCATION_LIMITATION = (
    "known limitation, shared with GNU tar, python tarfile and Go's archive/tar: a tar cut at "
    "a header boundary reads as complete; the blob digest check in the store is what catches "
    "a truncated layer")


@pytest.mark.parametrize("cut", [
    pytest.param("at-member-boundary", id="at-member-boundary"),
    pytest.param("mid-header", id="mid-header"),
    pytest.param("after-pax-header", id="after-pax-header"),
])
def test_truncated_tar_without_end_marker_is_input_error(scene: Scene, cut: str,
                                                        request: pytest.FixtureRequest) -> None:
    """A tar cut short (no end-of-archive blocks) must not pass for a complete layer."""
    if cut == "at-member-boundary":
        request.applymarker(pytest.mark.xfail(reason=TRUNCATION_LIMITATION))
    raw = build([E("cvmfs/", "dir")]
                + [E(f"cvmfs/{'long-' * 30}{i:02d}", data=os.urandom(700)) for i in range(10)])
    offsets = member_offsets(raw)
    boundary = offsets[5]  # start of member 5's PAX header block
    length = {"at-member-boundary": boundary, "mid-header": boundary + 100,
              "after-pax-header": boundary + 1024 + 100}[cut]
    with pytest.raises(InputError):
        run(scene, raw[:length])


@pytest.mark.parametrize("media_type", ["application/vnd.oci.image.layer.v1.tar+bzip2",
                                        "application/json", ""])
def test_decompressed_rejects_unknown_media_type(media_type: str) -> None:
    with pytest.raises(InputError, match="media type"):
        decompressed(io.BytesIO(b""), media_type)


@pytest.mark.parametrize("media_type", [MediaType.OCI_LAYER_GZIP, MediaType.DOCKER_LAYER_GZIP,
                                        MediaType.OCI_LAYER_NONDIST_GZIP,
                                        MediaType.OCI_LAYER_ZSTD, MediaType.OCI_LAYER,
                                        "application/vnd.docker.image.rootfs.diff.tar"])
def test_decompressed_known_media_types(scene: Scene, media_type: str) -> None:
    raw = build([E("cvmfs/f", data=b"payload")])
    if media_type.endswith("gzip"):
        data = gzip.compress(raw)
    elif media_type.endswith("zstd"):
        data = zstandard.ZstdCompressor().compress(raw)
    else:
        data = raw
    extract(decompressed(io.BytesIO(data), media_type), str(scene.target), "/cvmfs")
    assert (scene.target / "f").read_bytes() == b"payload"


# -- whiteouts: an upper layer of a stack applied over a lower one ---------------------------
def upper(scene: Scene, entries: list[E]) -> ExtractResult:
    return extract(io.BytesIO(build(entries)), str(scene.target), "/cvmfs", whiteouts=True)


def test_whiteouts_remove_what_the_lower_layer_put_there(scene: Scene) -> None:
    run(scene, build([E("cvmfs/", "dir", mode=0o755), E("cvmfs/d/", "dir", mode=0o555),
                      E("cvmfs/d/a", data=b"a"), E("cvmfs/d/sub/", "dir"),
                      E("cvmfs/d/sub/b", data=b"b"), E("cvmfs/keep", data=b"k"),
                      E("cvmfs/o/", "dir"), E("cvmfs/o/gone", data=b"g")]))
    upper(scene, [E("cvmfs/d/", "dir", mode=0o555), E("cvmfs/d/.wh.a"), E("cvmfs/d/.wh.sub"),
                  E("cvmfs/d/new", data=b"n"), E("cvmfs/o/", "dir"),
                  E("cvmfs/o/.wh..wh..opq"), E("cvmfs/o/fresh", data=b"f")])
    snap = tree_snapshot(scene.target)
    assert sorted(snap) == ["d", "d/new", "keep", "o", "o/fresh"]
    assert snap["d"]["mode"] == 0o555  # read-only below, and written into above


def test_whiteouts_are_skipped_in_a_single_layer_unpack(scene: Scene) -> None:
    warnings: list[str] = []
    run(scene, build([E("cvmfs/a", data=b"a"), E("cvmfs/.wh.a")]), warnings=warnings)
    assert (scene.target / "a").read_bytes() == b"a"
    assert any("whiteout" in warning for warning in warnings)


@pytest.mark.parametrize("name", ["cvmfs/link/.wh.victim", "cvmfs/link/.wh..wh..opq",
                                  "cvmfs/.wh..", "cvmfs/.wh.", "cvmfs/d/.wh..."])
def test_hostile_whiteouts_remove_nothing_outside(scene: Scene, name: str) -> None:
    run(scene, build([E("cvmfs/link", "symlink", link=str(scene.outside)),
                      E("cvmfs/d/", "dir"), E("cvmfs/d/f", data=b"f")]))
    before = scene.outside_state()
    with pytest.raises(InputError):
        upper(scene, [E(name)])
    assert scene.outside_state() == before
    assert (scene.target / "d" / "f").exists()


@pytest.mark.parametrize("link", ["outside", "outside/victim"])
def test_a_whiteout_then_a_symlink_cannot_redirect_what_came_before(scene: Scene,
                                                                    link: str) -> None:
    """A lower layer's directory and file, whited out and the directory replaced by a
    symlink out of the target: a hard link to the file that was in it must not reach
    through the symlink; and a layer that fills a directory and then makes a symlink of
    it is refused."""
    run(scene, build([E("cvmfs/", "dir"), E("cvmfs/a/", "dir", mode=0o666),
                      E("cvmfs/a/victim", data=b"x")]))
    (scene.outside / "victim").chmod(0o600)
    before = scene.outside_state(), os.stat(scene.outside / "victim").st_mode
    layer = [E("cvmfs/", "dir"), E("cvmfs/.wh.a"),
             E("cvmfs/a", "symlink", link=str(scene.base / link))]
    with pytest.raises(InputError):
        upper(scene, [*layer, E("cvmfs/stolen", "hardlink", link="cvmfs/a/victim")])
    assert (scene.outside_state(), os.stat(scene.outside / "victim").st_mode) == before
    assert os.stat(scene.outside / "victim").st_nlink == 1
    with pytest.raises(InputError, match="replace a directory"):
        upper(scene, [E("cvmfs/", "dir"), E("cvmfs/b/victim", data=b"x"), E("cvmfs/.wh.b"),
                      E("cvmfs/b", "symlink", link=str(scene.base / link))])
    assert (scene.outside_state(), os.stat(scene.outside / "victim").st_mode) == before


def test_a_whiteout_keeps_what_its_own_layer_made(scene: Scene) -> None:
    """Whiteouts hide only the layers below (OCI changeset rules), wherever they come in
    the stream: what this layer made earlier stays, and a directory it made loses only the
    lower layers' content below it (as the stack index's union has it); a directory made
    and then replaced by a symlink is refused, not followed."""
    lower = build([E("cvmfs/", "dir"), E("cvmfs/d/", "dir"), E("cvmfs/d/-old", data=b"o"),
                   E("cvmfs/d/x", data=b"lower"), E("cvmfs/d/s/", "dir"),
                   E("cvmfs/d/s/lower", data=b"l"), E("cvmfs/b/", "dir"),
                   E("cvmfs/b/old", data=b"o"), E("cvmfs/keep", data=b"k")])
    above = build([E("cvmfs/", "dir"), E("cvmfs/d/", "dir"), E("cvmfs/d/-new", data=b"n"),
                   E("cvmfs/d/s/", "dir"), E("cvmfs/d/s/upper", data=b"u"),
                   E("cvmfs/d/.wh..wh..opq"), E("cvmfs/d/x", data=b"upper"),
                   E("cvmfs/d/.wh.x"), E("cvmfs/b/", "dir"), E("cvmfs/b/new", data=b"n"),
                   E("cvmfs/.wh.b")])
    run(scene, lower)
    extract(io.BytesIO(above), str(scene.target), "/cvmfs", whiteouts=True)
    expected = ["b", "b/new", "d", "d/-new", "d/s", "d/s/upper", "d/x", "keep"]
    assert sorted(tree_snapshot(scene.target)) == expected
    indexes = [index_of_layer(io.BytesIO(raw), "/cvmfs", "sha256:" + hashlib.sha256(raw)
                              .hexdigest()) for raw in (lower, above)]
    assert sorted(os.fsdecode(path) for path in union(indexes) if path) == expected
    assert (scene.target / "d" / "x").read_bytes() == b"upper"
    before = scene.outside_state()
    with pytest.raises(InputError, match="replace a directory"):
        upper(scene, [E("cvmfs/", "dir"), E("cvmfs/c/", "dir"), E("cvmfs/.wh.c"),
                      E("cvmfs/c", "symlink", link=str(scene.outside))])
    assert scene.outside_state() == before


def test_a_whiteout_keeps_what_its_layer_put_below_a_directory_it_did_not_name(
        scene: Scene) -> None:
    """The directories a layer's members need are its own too: a whiteout of one later in
    that layer removes what the lower layers put in it, not this layer's entries."""
    run(scene, build([E("cvmfs/", "dir"), E("cvmfs/d/", "dir"), E("cvmfs/d/old", data=b"o"),
                      E("cvmfs/d/s/", "dir"), E("cvmfs/d/s/lower", data=b"l")]))
    upper(scene, [E("cvmfs/", "dir"), E("cvmfs/d/s/new", data=b"n"), E("cvmfs/.wh.d")])
    assert sorted(tree_snapshot(scene.target)) == ["d", "d/s", "d/s/new"]


def test_a_non_directory_above_replaces_a_lower_directory_whole(scene: Scene) -> None:
    """Without a whiteout, a file or symlink in a layer above hides a lower directory and
    all below it (as overlay shows it, and the stack index's union has it); within one
    layer a directory is still never replaced."""
    lower = build([E("cvmfs/", "dir"), E("cvmfs/d/", "dir"), E("cvmfs/d/x", data=b"x"),
                   E("cvmfs/e/", "dir", mode=0o555), E("cvmfs/e/y", data=b"y"),
                   E("cvmfs/keep", data=b"k")])
    above = build([E("cvmfs/", "dir"), E("cvmfs/d", data=b"now a file"),
                   E("cvmfs/e", "symlink", link="keep")])
    run(scene, lower)
    extract(io.BytesIO(above), str(scene.target), "/cvmfs", whiteouts=True)
    assert (scene.target / "d").read_bytes() == b"now a file"
    assert os.readlink(scene.target / "e") == "keep"
    expected = ["d", "e", "keep"]
    assert sorted(tree_snapshot(scene.target)) == expected
    indexes = [index_of_layer(io.BytesIO(raw), "/cvmfs", "sha256:" + hashlib.sha256(raw)
                              .hexdigest()) for raw in (lower, above)]
    assert sorted(os.fsdecode(path) for path in union(indexes) if path) == expected
    with pytest.raises(InputError, match="replace a directory"):
        upper(scene, [E("cvmfs/", "dir"), E("cvmfs/n/", "dir"), E("cvmfs/n", data=b"f")])


def test_a_whiteout_in_a_missing_directory_makes_nothing(scene: Scene) -> None:
    run(scene, build([E("cvmfs/", "dir"), E("cvmfs/f", data=b"f")]))
    upper(scene, [E("cvmfs/", "dir"), E("cvmfs/nowhere/.wh.x")])
    assert sorted(tree_snapshot(scene.target)) == ["f"]


@pytest.mark.parametrize(("mount", "name", "hides"), [
    ("cvmfs", ".wh.cvmfs", True), ("cvmfs", "./.wh.cvmfs", True),
    ("cvmfs", ".wh..wh..opq", True), ("cvmfs", ".wh.cvmfsX", False),
    ("cvmfs", "other/.wh.cvmfs", False), ("cvmfs", "cvmfsX/.wh..wh..opq", False),
    ("cvmfs/sw", ".wh.cvmfs", True), ("cvmfs/sw", "cvmfs/.wh.sw", True),
    ("cvmfs/sw", "cvmfs//.wh.sw", True), ("cvmfs/sw", "cvmfs/.wh..wh..opq", True),
    ("cvmfs/sw", "cvmfs/.wh.swX", False), ("cvmfs/sw", "cvmfs/swX/.wh..wh..opq", False)])
def test_a_whiteout_of_the_mount_point_hides_all_the_lower_layers_put_there(
        scene: Scene, mount: str, name: str, hides: bool) -> None:
    """A runtime applying the upper layer removes the mount point (with a directory above
    it, or what an opaque whiteout there empties) before the layer's own entries: unpack
    and the stack index's union keep only what the upper layer makes, as they do for any
    whiteout."""
    lower = build([E(f"{mount}/", "dir"), E(f"{mount}/d/", "dir"),
                   E(f"{mount}/d/x", data=b"x"), E(f"{mount}/keep", data=b"k")])
    above = build([E(name), E(f"{mount}/", "dir"), E(f"{mount}/new", data=b"n")])
    run(scene, lower, mount="/" + mount)
    extract(io.BytesIO(above), str(scene.target), "/" + mount, whiteouts=True)
    expected = ["new"] if hides else ["d", "d/x", "keep", "new"]
    assert sorted(tree_snapshot(scene.target)) == expected
    indexes = [index_of_layer(io.BytesIO(raw), "/" + mount, "sha256:" + hashlib.sha256(raw)
                              .hexdigest()) for raw in (lower, above)]
    assert sorted(os.fsdecode(path) for path in union(indexes) if path) == expected
