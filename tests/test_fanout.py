"""The walk shared with forked helpers (pack.fanout): the records, notes and errors of one
plain walk, whatever the helpers do."""

from __future__ import annotations

import os
import random
import signal
import stat
import threading
from pathlib import Path

import pytest
from helpers import make_nasty_tree

from cvmfs_inject.errors import InputError
from cvmfs_inject.pack import fanout, units, walker
from cvmfs_inject.pack.fanout import FannedWalk
from cvmfs_inject.pack.options import PackOptions
from cvmfs_inject.stack.diff import PendingScan


@pytest.fixture(autouse=True)
def two_cpus(monkeypatch):
    """Helpers are forked on a one-CPU machine too, so that these tests test them."""
    monkeypatch.setattr(fanout, "usable_cpus", lambda: 2)


def record(path: str, name: str, fd: int, tar_name: bytes, st: os.stat_result) -> tuple:
    link = os.readlink(name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else ""
    return (path, tar_name, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, link)


def random_tree(root: Path, seed: int) -> Path:
    """Directories of every depth, files and links beside them, things the walk skips."""
    rng = random.Random(seed)
    make_nasty_tree(root, files=12)
    directories = [root]
    for i in range(rng.randrange(40, 120)):
        parent = rng.choice(directories)
        kind = rng.random()
        name = rng.choice(["a", "b", "é", ".wh.x", "-z", "node"]) + str(i)
        if kind < 0.4:
            (parent / name).mkdir()
            directories.append(parent / name)
        elif kind < 0.8:
            (parent / name).write_bytes(bytes(rng.randrange(50)))
        elif kind < 0.9:
            os.symlink(rng.choice(["..", "a0", "/etc"]), parent / name)
        else:
            os.mkfifo(parent / name)
    os.mkdir(os.fsencode(root) + b"/bad-\xff-name")
    (root / "bad-\udcff-name" / "inside").write_bytes(b"x")
    (root / ".cvmfs-inject-unpack-1").mkdir()
    return root


def plain(root: Path, options: PackOptions) -> tuple[list[tuple], list[str]]:
    notes: list[str] = []
    walk = FannedWalk(options, str(root), b"", record, notes.append)
    return list(walk), notes


def fanned(root: Path, options: PackOptions, **kwargs) -> tuple[list[tuple], list[str], int]:
    notes: list[str] = []
    with FannedWalk(options, str(root), b"", record, notes.append, **kwargs) as walk:
        walk.start()
        return list(walk), notes, walk.helpers


@pytest.mark.parametrize(("seed", "ahead", "batch"),
                         [(0, None, 4096), (1, None, 2), (2, 1 << 20, 4096), (3, 1, 2),
                          (4, 1, 1), (5, 100, 3)])
def test_records_and_notes_are_those_of_one_walk(tmp_path, monkeypatch, seed, ahead, batch):
    """Whole units walked ahead (a scan), or units in batches under a bound (the packer)."""
    monkeypatch.setattr(fanout, "BATCH", batch)
    root = random_tree(tmp_path / "tree", seed)
    options = PackOptions(excludes=("node1*", "atlas.cern.ch/odd/", "b*/a*"))
    records, notes, helpers = fanned(root, options, min_units=1, ahead=ahead)
    assert helpers >= 1
    assert (records, notes) == plain(root, options)
    assert any("skipped" in note for note in notes)


def test_the_scan_of_a_stack_update_is_the_same(tmp_path, monkeypatch):
    root = random_tree(tmp_path / "tree", 7)
    options = PackOptions()
    with PendingScan(root, options) as pending:
        assert pending._walk.helpers >= 1
        fanned_scan = pending.result()
    monkeypatch.setattr(fanout, "MAX_HELPERS", 0)
    with PendingScan(root, options) as pending:
        assert pending._walk.helpers == 0
        plain_scan = pending.result()
    assert list(fanned_scan.nodes.items()) == list(plain_scan.nodes.items())
    assert pending.notes and fanned_scan.root == plain_scan.root


def test_units_of_killed_helpers_are_walked_here(tmp_path):
    root = random_tree(tmp_path / "tree", 3)
    options = PackOptions()
    notes: list[str] = []
    with FannedWalk(options, str(root), b"", record, notes.append, min_units=1) as walk:
        walk.start()
        assert walk.helpers >= 1
        for pid in walk._helpers:
            os.kill(pid, signal.SIGKILL)
        records = list(walk)
    assert (records, notes) == plain(root, options)


@pytest.mark.parametrize("ahead", [None, 1])
def test_a_unit_that_failed_in_a_helper_is_walked_again_here(tmp_path, monkeypatch, ahead):
    """Also after some of its batches were given out (BATCH 3): the walk here goes on
    from there."""
    root = random_tree(tmp_path / "tree", 4)
    options = PackOptions()
    parent, real = os.getpid(), walker._listing
    monkeypatch.setattr(fanout, "BATCH", 3)

    def failing_in_helpers(fd, path):
        if os.getpid() != parent and path.endswith("releases"):
            raise InputError(f"{path}: cannot read directory: helper trouble")
        return real(fd, path)

    monkeypatch.setattr(walker, "_listing", failing_in_helpers)
    records, notes, helpers = fanned(root, options, min_units=1, ahead=ahead)
    assert helpers >= 1
    assert (records, notes) == plain(root, options)


@pytest.mark.parametrize("ahead", [None, 1 << 20])
def test_an_error_comes_after_the_records_and_notes_before_it(tmp_path, monkeypatch, ahead):
    """A directory that cannot be read, in a helper's unit or in this process's, fails
    where one walk fails: every record and note before it out, none after."""
    root = random_tree(tmp_path / "tree", 5)
    options = PackOptions()
    real = walker._listing

    def failing(fd, path):
        if path.endswith("/lcg"):
            raise InputError(f"{path}: cannot read directory: broken")
        return real(fd, path)

    monkeypatch.setattr(walker, "_listing", failing)
    monkeypatch.setattr(fanout, "BATCH", 2)
    expected: list[tuple | str] = []  # records and notes as they come
    with pytest.raises(InputError, match="broken"):
        expected.extend(FannedWalk(options, str(root), b"", record, expected.append))
    for _ in range(3):  # the helpers' timing varies
        got: list[tuple | str] = []
        with FannedWalk(options, str(root), b"", record, got.append, min_units=1,
                        ahead=ahead) as walk:
            walk.start()
            assert walk.helpers >= 1
            with pytest.raises(InputError, match="broken"):
                for item in walk:
                    got.append(item)
        assert got == expected
    assert any(isinstance(item, str) for item in got)


@pytest.mark.parametrize("release_after", [None, 0, 7, 40])
def test_gated_helpers_begin_when_released(tmp_path, release_after):
    """Until `release`, this process walks every unit; helpers never released leave."""
    root = random_tree(tmp_path / "tree", 9)
    options = PackOptions()
    records: list[tuple] = []
    notes: list[str] = []
    with FannedWalk(options, str(root), b"", record, notes.append, min_units=1, ahead=1,
                    gated=True) as walk:
        walk.start()
        pids = list(walk._helpers)
        assert pids
        for item in walk:
            if len(records) == release_after:
                walk.release()
            records.append(item)
    assert (records, notes) == plain(root, options)
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_close_reaps_the_helpers_of_an_unfinished_walk(tmp_path):
    root = random_tree(tmp_path / "tree", 1)
    walk = FannedWalk(PackOptions(), str(root), b"", record, lambda _: None, min_units=1)
    walk.start()
    pids = list(walk._helpers)
    assert pids
    next(iter(walk))
    walk.close()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_no_helpers_beside_other_threads_or_past_the_ticket_limit(tmp_path, monkeypatch):
    """fork() copies one thread of many (a lock another holds stays held in the helper);
    more units than tickets fit in a pipe would block the fork's caller."""
    root = random_tree(tmp_path / "tree", 2)
    options = PackOptions()
    expected = plain(root, options)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        records, notes, helpers = fanned(root, options, min_units=1)
    finally:
        stop.set()
        other.join()
    assert helpers == 0 and (records, notes) == expected
    monkeypatch.setattr(fanout, "MAX_UNITS", 2)
    records, notes, helpers = fanned(root, options, min_units=1)
    assert helpers == 0 and (records, notes) == expected


class _Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes | memoryview) -> None:
        self.data += data


@pytest.mark.parametrize("keep_owner", [False, True])
def test_the_packer_writes_the_same_bytes_with_helpers(tmp_path, monkeypatch, keep_owner):
    """The layer, and what the packer reports of it, do not depend on the helpers (small
    batches and bound: units cross many batches)."""
    from cvmfs_inject.pack import packer

    root = random_tree(tmp_path / "tree", 8)
    forked: list[int] = []
    real_start = FannedWalk.start

    def start(self):
        real_start(self)
        forked.append(self.helpers)
        self.release()  # as when the walk holds the packer up from the start

    monkeypatch.setattr(FannedWalk, "start", start)
    monkeypatch.setattr(fanout, "BATCH", 5)
    monkeypatch.setattr(packer, "WALK_AHEAD", 1)
    results = []
    for helpers in (3, 0):
        monkeypatch.setattr(fanout, "MAX_HELPERS", helpers)
        sink, warnings = _Sink(), []
        result = packer.pack(root, sink, PackOptions(compression="none", keep_owner=keep_owner),
                             warn=warnings.append)
        results.append((bytes(sink.data), result, warnings))
    assert forked[0] >= 1 and forked[1] == 0
    assert results[0] == results[1]
    assert results[0][1].hardlinks and results[0][1].warnings


def _small_units(root: Path) -> Path:
    for unit in "abcd":
        (root / "top" / unit).mkdir(parents=True)
    for name in ("f0", "f1", "f3"):
        (root / "top/a" / name).write_bytes(b"")
    os.mkfifo(root / "top/a/f2fifo")
    return root


@pytest.mark.parametrize("ahead", [None, 1])
def test_a_walk_again_goes_on_past_what_a_helper_gave_out(tmp_path, monkeypatch, ahead):
    """The helper fails on f3 after a batch (f0, f1) and the note of the fifo before f3
    went out: the walk here gives that note once, and, the tree having changed (a name
    before f3 added), never a name twice."""
    root = _small_units(tmp_path / "tree")
    monkeypatch.setattr(fanout, "BATCH", 2)
    parent = os.getpid()

    def failing(path, name, fd, tar_name, st):
        if os.getpid() != parent and name == "f3":
            (root / "top/a/e-new").write_bytes(b"")
            raise FileNotFoundError("the walk in the helper failed")
        return record(path, name, fd, tar_name, st)

    notes: list[str] = []
    with FannedWalk(PackOptions(), str(root), b"", failing, notes.append, min_units=1,
                    ahead=ahead) as walk:
        walk.start()
        assert walk.helpers >= 1
        records = list(walk)
    names = [item[1] for item in records]
    assert len(names) == len(set(names))
    assert b"/top/a/f3" in names and b"/top/a/e-new" not in names
    assert notes == [f"{root}/top/a/f2fifo: skipped (sockets, fifos and device nodes are "
                     "not packed)"]


def test_the_plain_walk_for_a_wide_top_or_a_small_ticket_pipe(tmp_path, monkeypatch):
    """A skeleton past MAX_SKELETON entries is not held; tickets that do not fit in the
    pipe (a user over pipe-user-pages-soft gets 4 KiB pipes) would block the fork's caller."""
    import fcntl

    root = random_tree(tmp_path / "tree", 6)
    options = PackOptions()
    expected = plain(root, options)
    monkeypatch.setattr(units, "MAX_SKELETON", 5)
    assert fanned(root, options, min_units=1) == (*expected, 0)
    monkeypatch.setattr(units, "MAX_SKELETON", 10000)
    real_pipe = os.pipe

    def small_pipe():
        read, write = real_pipe()
        fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)
        return read, write

    monkeypatch.setattr(fanout, "_TICKET", 4)
    monkeypatch.setattr(os, "pipe", small_pipe)
    monkeypatch.setattr(fanout, "MAX_UNITS", 1 << 20)
    big = tmp_path / "big"
    for i in range(1100):
        (big / "top" / f"u{i:04}").mkdir(parents=True)
    assert fanned(big, options, min_units=1) == (*plain(big, options), 0)


def test_with_a_bound_this_process_claims_one_unit_ahead_at_most(tmp_path, monkeypatch):
    """Waiting for a helper's unit, this process claims the next one for itself and
    waits: claiming on and on took every ticket from the helper."""
    root = tmp_path / "tree"
    for unit in range(60):
        for name in range(30):
            (root / "top" / f"u{unit:02}" / f"f{name}").mkdir(parents=True)
    most: list[int] = []
    real = FannedWalk._next_frame

    def next_frame(self, unit):
        found = real(self, unit)
        most.append(len(self._mine))
        return found

    monkeypatch.setattr(FannedWalk, "_next_frame", next_frame)
    records, notes, helpers = fanned(root, PackOptions(), min_units=1, ahead=1 << 20)
    assert helpers == 1 and max(most) <= 1
    assert (records, notes) == plain(root, PackOptions())


def test_a_helper_s_pipe_holds_a_mebibyte_where_the_system_allows_it() -> None:
    """A helper writes its records without waiting for a parent busy walking its own
    units (with the default 64 KiB the helper of a scan waited; the scan of the bench tree
    with a busy parent took 0.74 s, 0.67 s with this)."""
    import fcntl

    from cvmfs_inject.pack.forking import PIPE_BYTES, fork_with_pipe, reap

    pid, pipe = fork_with_pipe()
    if pid == 0:
        os._exit(0)
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            allowed = int(f.read())
        expected = PIPE_BYTES if allowed >= PIPE_BYTES or os.geteuid() == 0 else 65536
        assert fcntl.fcntl(pipe, fcntl.F_GETPIPE_SZ) == expected
    finally:
        os.close(pipe)
        reap(pid)
