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

from cvmfs_inject.errors import InputError
from cvmfs_inject.pack import fanout
from cvmfs_inject.pack.fanout import FannedWalk
from cvmfs_inject.pack.options import PackOptions
from cvmfs_inject.stack.diff import PendingScan
from helpers import make_nasty_tree


@pytest.fixture(autouse=True)
def two_cpus(monkeypatch):
    """Helpers are forked on a one-CPU machine too, so that these tests test them."""
    monkeypatch.setattr(fanout, "_cpus", lambda: 2)


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


@pytest.mark.parametrize("seed", range(6))
def test_records_and_notes_are_those_of_one_walk(tmp_path, seed):
    root = random_tree(tmp_path / "tree", seed)
    options = PackOptions(excludes=("node1*", "atlas.cern.ch/odd/", "b*/a*"))
    records, notes, helpers = fanned(root, options, min_units=1)
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


def test_a_unit_that_failed_in_a_helper_is_walked_again_here(tmp_path, monkeypatch):
    root = random_tree(tmp_path / "tree", 4)
    options = PackOptions()
    parent, real = os.getpid(), FannedWalk._walk_unit

    def failing_in_helpers(self, unit):
        if os.getpid() != parent:
            raise OSError("helper trouble")
        return real(self, unit)

    monkeypatch.setattr(FannedWalk, "_walk_unit", failing_in_helpers)
    records, notes, helpers = fanned(root, options, min_units=1)
    assert helpers >= 1
    assert (records, notes) == plain(root, options)


def test_an_error_comes_after_the_records_and_notes_before_it(tmp_path, monkeypatch):
    """A unit that fails everywhere raises where one walk would: every record and note of
    the units before it are out, none after."""
    root = random_tree(tmp_path / "tree", 5)
    options = PackOptions()
    walk = FannedWalk(options, str(root), b"", record, lambda _: None, min_units=1)
    walk.start()
    walk.close()
    failing = walk._units[len(walk._units) // 2]
    real = FannedWalk._walk_unit

    def failing_unit(self, unit):
        if self._units[unit] == failing:
            raise InputError(f"{failing}: cannot read directory: broken")
        return real(self, unit)

    monkeypatch.setattr(FannedWalk, "_walk_unit", failing_unit)
    expected: list[tuple | str] = []  # records and notes as they come
    expected.extend(FannedWalk(options, str(root), b"", record, expected.append))
    got: list[tuple | str] = []
    with FannedWalk(options, str(root), b"", record, got.append, min_units=1) as walk:
        walk.start()
        with pytest.raises(InputError, match="broken"):
            for item in walk:
                got.append(item)
    cut = expected.index(next(item for item in expected
                              if isinstance(item, tuple) and item[0] == f"{root}/{failing}"))
    assert got == expected[:cut + 1]
    assert any(isinstance(item, str) for item in got)


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
