"""pack.offload and pack.writes: the file-system half of an extraction in a forked child,
and the directory times shared with a helper (pack.directories)."""

from __future__ import annotations

import gzip
import io
import os
import signal
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import EPOCH, tree_snapshot

from cvmfs_inject.errors import InputError
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.pack import directories as directories_module
from cvmfs_inject.pack import extract as extract_module
from cvmfs_inject.pack import forking, writes
from cvmfs_inject.pack.directories import DirectoryTable
from cvmfs_inject.pack.extract import decompressed, extract
from cvmfs_inject.pack.offload import Applier
from cvmfs_inject.pack.writes import Writes


def _layer(members: list[tuple[str, str, bytes | str, int]]) -> bytes:
    """A tar of (name, kind, data or link target, mode) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for i, (name, kind, payload, mode) in enumerate(members):
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = mode, EPOCH - i
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(payload)
            if kind == "file":
                assert isinstance(payload, bytes)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
            else:
                archive.addfile(info)
    return buf.getvalue()


def _writes(target: Path) -> Writes:
    return Writes(os.open(target, os.O_RDONLY | os.O_DIRECTORY), b"cvmfs/", 0o755, False)


def _children() -> set[int]:
    """This process's children, reaped or not (other tests' fixtures may have some)."""
    pids: set[int] = set()
    for listing in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        pids.update(int(pid) for pid in listing.read_text().split())
    return pids


@pytest.fixture(autouse=True)
def no_child_left() -> Iterator[None]:
    """Every child a test forks is reaped by the time it ends."""
    before = _children()
    yield
    assert _children() <= before


def test_the_child_applies_operations_in_another_process(tmp_path: Path) -> None:
    with Applier(_writes(tmp_path), fork=True) as applier:
        assert applier.forked
        applier.send([(writes.DIRECTORY, b"d", 0o755, EPOCH, None),
                      (writes.FILE, b"d/f", 0o640, EPOCH, None, b"data"),
                      (writes.HARDLINK, b"d/g", b"d/f", b"cvmfs/d/f", None),
                      (writes.SYMLINK, b"s", b"d/f", EPOCH, None)])
        applier.finish()
    assert (tmp_path / "d" / "g").read_bytes() == b"data"
    assert os.stat(tmp_path / "d" / "g").st_nlink == 2
    assert os.stat(tmp_path / "d").st_mtime == EPOCH
    assert os.readlink(tmp_path / "s") == "d/f"


def test_when_the_system_cannot_fork_the_operations_are_applied_here(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    with Applier(_writes(tmp_path), fork=True) as applier:
        assert not applier.forked
        applier.send([(writes.FILE, b"f", 0o640, EPOCH, None, b"data")])
        applier.finish()
    assert (tmp_path / "f").read_bytes() == b"data"


def test_a_child_that_was_killed_is_an_input_error(tmp_path: Path) -> None:
    with Applier(_writes(tmp_path), fork=True) as applier:
        os.kill(applier._pid, signal.SIGKILL)
        with pytest.raises(InputError, match="ended without a word"):
            for _ in range(64):  # the pipe takes a batch or two before it breaks
                applier.send([(writes.FILE, b"f", 0o644, EPOCH, None, bytes(1 << 16))])
            applier.finish()


def test_the_childs_error_reaches_this_process(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with Applier(_writes(tmp_path), fork=True) as applier, \
            pytest.raises(InputError, match="'cvmfs/d' would replace a directory"):
        applier.send([(writes.FILE, b"d", 0o644, EPOCH, None, b"x")])
        applier.finish()


def test_leaving_with_an_error_stops_the_child(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), Applier(_writes(tmp_path), fork=True) as applier:
        applier.send([(writes.FILE, b"f", 0o644, EPOCH, None, b"x")])
        raise KeyboardInterrupt


@pytest.mark.parametrize("forked", [True, False], ids=["forked", "in-process"])
def test_an_earlier_members_error_comes_before_a_later_one_found_by_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forked: bool) -> None:
    """The child finds the first (on disk), this process the second (by its name): the
    first is the one reported, as in one process."""
    monkeypatch.setattr(extract_module, "writes_apart", lambda: forked)
    layer = _layer([("cvmfs/link", "symlink", "/tmp", 0o777),
                    ("cvmfs/link/f", "file", b"x", 0o644),
                    ("cvmfs/../escape", "file", b"x", 0o644)])
    with pytest.raises(InputError, match="written through a symlink"):
        extract(io.BytesIO(layer), str(tmp_path), "/cvmfs")


@pytest.mark.parametrize("forked", [True, False], ids=["forked", "in-process"])
def test_a_big_file_goes_over_in_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        forked: bool) -> None:
    monkeypatch.setattr(extract_module, "writes_apart", lambda: forked)
    big = os.urandom(3 * extract_module.BATCH_BYTES + 5)
    layer = _layer([("cvmfs/small", "file", b"s", 0o600), ("cvmfs/big", "file", big, 0o640),
                    ("cvmfs/d/", "dir", b"", 0o750), ("cvmfs/d/after", "file", b"a", 0o644),
                    ("cvmfs/s", "symlink", "d/after", 0o777)])
    result = extract(decompressed(io.BytesIO(gzip.compress(layer, mtime=0)),
                                  MediaType.OCI_LAYER_GZIP), str(tmp_path), "/cvmfs")
    assert result.entries == 5
    assert (tmp_path / "big").read_bytes() == big
    assert os.stat(tmp_path / "big").st_mtime == EPOCH - 1
    assert os.stat(tmp_path / "d").st_mode & 0o777 == 0o750
    assert (tmp_path / "s").read_bytes() == b"a"


def test_the_inflating_threads_start_at_the_first_read() -> None:
    """So that extract can fork between opening the stream and reading it."""
    before = threading.active_count()
    stream = decompressed(io.BytesIO(gzip.compress(b"x" * 10, mtime=0)),
                          MediaType.OCI_LAYER_GZIP, diff_id=None)
    assert threading.active_count() == before
    assert stream.read(100) == b"x" * 10
    stream.close()


def _nested_layer() -> bytes:
    members: list[tuple[str, str, bytes | str, int]] = [("cvmfs/", "dir", b"", 0o751)]
    for top in range(6):
        members.append((f"cvmfs/t{top}/", "dir", b"", 0o555 if top == 2 else 0o750))
        for sub in range(4):
            members.append((f"cvmfs/t{top}/s{sub}/", "dir", b"", 0o500 if sub == 1 else 0o755))
            members.append((f"cvmfs/t{top}/s{sub}/f", "file", b"x", 0o644))
    return _layer(members)


def test_directory_times_shared_with_a_helper_are_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Modes that take the owner's rights (0555, 0500) come after every time is set."""
    monkeypatch.setattr(extract_module, "writes_apart", lambda: False)
    alone = tmp_path / "alone"
    alone.mkdir()
    extract(io.BytesIO(_nested_layer()), str(alone), "/cvmfs")
    monkeypatch.setattr(extract_module, "writes_apart", lambda: True)
    monkeypatch.setattr(directories_module, "SHARED_FROM", 2)
    shared = tmp_path / "shared"
    shared.mkdir()
    result = extract(io.BytesIO(_nested_layer()), str(shared), "/cvmfs")
    assert result.has_root and result.entries == 54
    assert tree_snapshot(shared) == tree_snapshot(alone)
    assert os.stat(shared / "t2").st_mode & 0o777 == 0o555
    assert os.stat(shared / "t0" / "s0").st_mtime == EPOCH - 2


def _four_directories(tmp_path: Path) -> DirectoryTable:
    """A table of the directories a, b, c and d made in `tmp_path`."""
    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    table = DirectoryTable(root, 0o755)
    for name in (b"a", b"b", b"c", b"d"):
        os.mkdir(name, dir_fd=root)
        table.attributes(name, 0o755, EPOCH)
    return table


def test_a_helper_setting_directory_times_says_what_went_wrong(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(directories_module, "SHARED_FROM", 2)
    table = _four_directories(tmp_path)
    os.rmdir(tmp_path / "a")  # in either half: the helper's problem, or this process's
    with pytest.raises(OSError, match="No such file or directory"):
        table.apply(share=True)
    assert os.stat(tmp_path / "d").st_mtime == EPOCH  # this process's half was done


def _descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_descriptor_is_left_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extract_module, "writes_apart", lambda: True)
    good = _layer([("cvmfs/f", "file", b"x", 0o644)])
    bad = _layer([("cvmfs/d/", "dir", b"", 0o755), ("cvmfs/d", "file", b"x", 0o644)])
    before = _descriptors()
    for i in range(5):
        (tmp_path / f"good{i}").mkdir()
        extract(io.BytesIO(good), str(tmp_path / f"good{i}"), "/cvmfs")
        (tmp_path / f"bad{i}").mkdir()
        with pytest.raises(InputError, match="would replace a directory"):
            extract(io.BytesIO(bad), str(tmp_path / f"bad{i}"), "/cvmfs")
    assert _descriptors() == before


def test_the_childs_error_is_not_replaced_while_more_is_sent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child stops at the second member; this process is still sending batches, and
    the one it was building goes nowhere: the error raised is the child's."""
    monkeypatch.setattr(extract_module, "writes_apart", lambda: True)
    members: list[tuple[str, str, bytes | str, int]] = [
        ("cvmfs/d/", "dir", b"", 0o755), ("cvmfs/d", "file", b"x", 0o644)]
    members += [(f"cvmfs/f{i}", "file", b"y", 0o644) for i in range(30000)]
    with pytest.raises(InputError, match="'cvmfs/d' would replace a directory"):
        extract(io.BytesIO(_layer(members)), str(tmp_path), "/cvmfs")


@pytest.mark.parametrize("second_mode", [0o750, 0o555])
def test_a_directory_given_twice_far_apart_gets_the_same_attributes_when_shared(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, second_mode: int) -> None:
    """Its first member's row has left the bounded cache when the second comes, so both
    rows stay (the first is applied last, and wins); the process that sets a row's
    attributes is chosen by its path, so both rows are set by one, in order. A mode that
    takes the owner's rights keeps the whole table in one process."""
    monkeypatch.setattr(directories_module, "_KNOWN_DIRECTORIES", 4)
    monkeypatch.setattr(directories_module, "SHARED_FROM", 2)
    members: list[tuple[str, str, bytes | str, int]] = [("cvmfs/x/", "dir", b"", 0o755)]
    members += [(f"cvmfs/d{i}/", "dir", b"", 0o755) for i in range(40)]
    members += [("cvmfs/x/", "dir", b"", second_mode)]
    layer = _layer(members)
    trees = {}
    for forked in (False, True):
        monkeypatch.setattr(extract_module, "writes_apart", lambda forked=forked: forked)
        target = tmp_path / str(forked)
        target.mkdir()
        extract(io.BytesIO(layer), str(target), "/cvmfs")
        trees[forked] = tree_snapshot(target)
    assert trees[True] == trees[False]
    assert trees[True]["x"]["mtime"] == EPOCH  # the first member's


def test_children_reaped_by_the_system_are_fine(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A command started with SIGCHLD ignored has its children reaped for it: waitpid
    then finds none."""
    monkeypatch.setattr(extract_module, "writes_apart", lambda: True)
    monkeypatch.setattr(directories_module, "SHARED_FROM", 2)
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        (tmp_path / "good").mkdir()
        extract(io.BytesIO(_nested_layer()), str(tmp_path / "good"), "/cvmfs")
        (tmp_path / "bad").mkdir()
        bad = _layer([("cvmfs/d/", "dir", b"", 0o755), ("cvmfs/d", "file", b"x", 0o644)])
        with pytest.raises(InputError, match="would replace a directory"):
            extract(io.BytesIO(bad), str(tmp_path / "bad"), "/cvmfs")
    finally:
        signal.signal(signal.SIGCHLD, previous)
    assert os.stat(tmp_path / "good" / "t2").st_mode & 0o777 == 0o555


def test_directory_times_without_a_helper_when_the_system_cannot_fork(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(directories_module, "SHARED_FROM", 2)
    table = _four_directories(tmp_path)

    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    table.apply(share=True)
    assert all(os.stat(tmp_path / name).st_mtime == EPOCH for name in "abcd")


def _resend_layer(big_first: bool) -> bytes:
    members: list[tuple[str, str, bytes | str, int]] = []
    if big_first:
        members.append(("cvmfs/big", "file", bytes(extract_module.BATCH_BYTES + 10), 0o644))
    members += [("cvmfs/a", "file", b"x", 0o644), ("cvmfs/a/", "dir", b"", 0o755),
                ("cvmfs/l", "symlink", "/tmp", 0o777), ("cvmfs/l/x", "file", b"x", 0o644)]
    return _layer(members)


@pytest.mark.parametrize("big_first", [False, True], ids=["small", "after-a-big-file"])
@pytest.mark.parametrize("forked", [True, False], ids=["forked", "in-process"])
def test_a_batch_that_failed_is_not_sent_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                forked: bool, big_first: bool) -> None:
    monkeypatch.setattr(extract_module, "writes_apart", lambda: forked)
    with pytest.raises(InputError, match="'cvmfs/l/x' would be written through a symlink"):
        extract(io.BytesIO(_resend_layer(big_first)), str(tmp_path), "/cvmfs")


@pytest.mark.parametrize("size", [100, 3 * (1 << 20)], ids=["small", "big"])
@pytest.mark.parametrize("forked", [True, False], ids=["forked", "in-process"])
def test_a_refused_member_cut_off_is_refused_not_truncated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forked: bool, size: int) -> None:
    """As in one process: the member's parent is checked before its data is read."""
    monkeypatch.setattr(extract_module, "writes_apart", lambda: forked)
    layer = _layer([("cvmfs/l", "symlink", "/tmp", 0o777),
                    ("cvmfs/l/x", "file", b"z" * size, 0o644)])
    cut = layer[:layer.index(b"z" * 64) + size // 2]  # inside the data of cvmfs/l/x
    with pytest.raises(InputError, match="'cvmfs/l/x' would be written through a symlink"):
        extract(io.BytesIO(cut), str(tmp_path), "/cvmfs")


def test_a_writing_child_dies_with_its_parent() -> None:
    """So a command killed with SIGKILL leaves nothing writing into its staging directory
    while the next command sweeps it."""
    reader, writer = os.pipe()
    parent = os.fork()
    if parent == 0:
        me = os.getpid()
        child = os.fork()
        if child == 0:
            forking.die_with_parent(me)
            time.sleep(30)
            os._exit(0)
        os.write(writer, str(child).encode())
        os._exit(0)
    os.close(writer)
    child = int(os.read(reader, 32))
    os.close(reader)
    os.waitpid(parent, 0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)
    pytest.fail(f"process {child} outlived its parent")


def test_freed_memory_goes_back_every_few_mebibytes_of_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc keeps freed 1 MiB chunks in its heap: without the trims, unpack's peak RSS
    grew with the size of the files (67 MiB on a 2 GB tree, 47 MiB with them)."""
    calls: list[int] = []
    monkeypatch.setattr(extract_module, "_MALLOC_TRIM", calls.append)
    monkeypatch.setattr(extract_module, "TRIM_BYTES", 1 << 20)
    members: list[tuple[str, str, bytes | str, int]] = [
        (f"cvmfs/f{i}", "file", bytes(1 << 19), 0o644) for i in range(8)]
    extract(io.BytesIO(_layer(members)), str(tmp_path), "/cvmfs")
    assert len(calls) >= 3
