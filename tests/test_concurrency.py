"""Concurrent commands on one layout, as `make -j` runs them: writers wait instead of
failing, pack and write blobs side by side, commit their tags one at a time on the
index.json of the moment, and gc never takes an in-flight blob. Real processes throughout.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cvmfs_inject.commands.pull import _new_or_existing_layout
from cvmfs_inject.demo.sample import build_sample_image
from cvmfs_inject.errors import InputError
from cvmfs_inject.layout.blobs import BlobWriter
from cvmfs_inject.layout.lock import LockWait
from cvmfs_inject.layout.store import Layout
from cvmfs_inject.pack.options import PackOptions
from cvmfs_inject.pack.packer import pack

EPOCH = "1700000000"
LOCKED = 7


def cvmfs_inject(*args: object) -> list[str]:
    return [sys.executable, "-m", "cvmfs_inject", *map(str, args)]


def env() -> dict[str, str]:
    return {**os.environ, "SOURCE_DATE_EPOCH": EPOCH}


def make_tree(root: Path, seed: int, mib: int = 12) -> Path:
    """A tree of its own (content differs by seed), big enough to take a while to pack."""
    for i in range(4):
        path = root / f"repo{seed}" / f"f{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(mib << 18))
    return root


def diff_id_of(tree: Path, tmp_path: Path) -> str:
    scratch = Layout.create(tmp_path / f"diff-{tree.name}")
    with BlobWriter(scratch.tmp_dir, scratch.blob_path) as writer:
        return pack(tree, writer, PackOptions(source_date_epoch=int(EPOCH))).diff_id


def injected_diff_id(layout: Path, tag: str) -> str:
    out = subprocess.run(cvmfs_inject("inspect", "--json", f"{layout}:{tag}"), check=True,
                         capture_output=True, env=env()).stdout
    (image,) = json.loads(out)["images"]
    return str(image["injected"]["diff_id"])


def wait_until_writing(layout: Path) -> None:
    """Until some writer has a blob under way in the layout's temp area."""
    deadline = time.monotonic() + 60
    while not list((layout / ".cvmfs-inject-tmp").glob("blob-*")):
        assert time.monotonic() < deadline, "no writer started writing"
        time.sleep(0.01)


def test_parallel_writers_and_gc_all_succeed_and_lose_nothing(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    build_sample_image(layout, "base")
    trees = {f"t{i}": make_tree(tmp_path / f"tree{i}", i) for i in range(6)}
    same = [make_tree(tmp_path / "same-a", 10), make_tree(tmp_path / "same-b", 11)]
    procs = [(f"inject {tag}", subprocess.Popen(
        cvmfs_inject("-q", "inject", f"{layout}:base", tree, "--tag", tag), env=env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)) for tag, tree in trees.items()]
    procs += [(f"inject same {i}", subprocess.Popen(
        cvmfs_inject("-q", "inject", f"{layout}:base", tree, "--tag", "same"), env=env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)) for i, tree in enumerate(same)]
    wait_until_writing(layout)  # gc must wait for the writers, not take their blobs
    procs.append(("gc", subprocess.Popen(cvmfs_inject("-q", "gc", layout), env=env(),
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    for name, proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}: {err.decode()}"
    for tag, tree in trees.items():
        assert injected_diff_id(layout, tag) == diff_id_of(tree, tmp_path), tag
    assert injected_diff_id(layout, "same") in {diff_id_of(t, tmp_path) for t in same}
    tags = Layout.open(layout).tags()
    assert sorted(tags) == sorted(["base", "same", *trees])
    check = subprocess.run(cvmfs_inject("validate", layout), capture_output=True, env=env())
    assert check.returncode == 0, check.stderr.decode()


def test_parallel_runs_on_one_new_cache_each_push_their_own_tree(tmp_path: Path) -> None:
    """`make -j` with `run --layout cache`, no cache yet and the same source (so the same
    default tag): the creators meet, and no run pushes another's image."""
    source = tmp_path / "source"
    build_sample_image(source, "v1")
    cache = tmp_path / "cache"
    trees = [make_tree(tmp_path / f"tree{i}", i, mib=2) for i in range(3)]
    procs = [subprocess.Popen(
        cvmfs_inject("-q", "run", "--layout", cache, f"oci:{source}:v1", tree,
                     f"oci-archive:{tmp_path}/out{i}.tar:x"),
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i, tree in enumerate(trees)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    assert Layout.open(cache).tags() == ["v1"]  # the runs' own tags are gone
    for i in range(len(trees)):
        out = tmp_path / f"unpacked{i}"
        subprocess.run(cvmfs_inject("-q", "unpack", f"oci-archive:{tmp_path}/out{i}.tar:x",
                                    out), check=True, env=env())
        assert sorted(p.name for p in out.iterdir()) == [f"repo{i}"]


@pytest.fixture
def held(tmp_path: Path):
    """A layout whose use lock this test process holds exclusively, like a running gc."""
    path = tmp_path / "layout"
    build_sample_image(path, "v1")
    (tmp_path / "tree").mkdir()
    layout = Layout.open(path)
    lock = layout.lock(exclusive=True)
    lock.__enter__()
    try:
        yield path, tmp_path / "tree", lock
    finally:
        lock.__exit__(None, None, None)


def test_lock_timeout_zero_fails_at_once(held) -> None:
    layout, tree, _ = held
    started = time.monotonic()
    proc = subprocess.run(cvmfs_inject("--lock-timeout", "0", "inject", f"{layout}:v1", tree),
                          capture_output=True, env=env())
    assert proc.returncode == LOCKED
    assert time.monotonic() - started < 10
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and f"pid {os.getpid()}" in err and "in use" in err


def test_a_writer_waits_for_the_lock_then_succeeds(held) -> None:
    layout, tree, lock = held
    proc = subprocess.Popen(cvmfs_inject("-q", "inject", f"{layout}:v1", tree), env=env(),
                            stderr=subprocess.PIPE)
    time.sleep(1.0)
    assert proc.poll() is None, "the writer did not wait"
    lock.__exit__(None, None, None)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert err == b""  # not a terminal: no waiting message


def test_a_wait_that_runs_out_is_exit_7(held) -> None:
    layout, tree, _ = held
    proc = subprocess.run(cvmfs_inject("--lock-timeout", "0.5", "inject", f"{layout}:v1",
                                       tree), capture_output=True, env=env())
    assert proc.returncode == LOCKED
    assert "still in use after 0.5 s" in proc.stderr.decode()


def test_waiting_is_said_once_on_a_terminal(held) -> None:
    layout, tree, lock = held
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(cvmfs_inject("inject", f"{layout}:v1", tree), env=env(),
                            stdout=subprocess.DEVNULL, stderr=secondary)
    os.close(secondary)
    seen = b""
    deadline = time.monotonic() + 30
    while b"waiting for" not in seen and time.monotonic() < deadline:
        if select.select([primary], [], [], 0.5)[0]:
            seen += os.read(primary, 4096)
    lock.__exit__(None, None, None)
    assert proc.wait(timeout=60) == 0
    with_rest = seen
    while select.select([primary], [], [], 0.2)[0]:
        try:
            chunk = os.read(primary, 4096)
        except OSError:
            break
        if not chunk:
            break
        with_rest += chunk
    os.close(primary)
    text = with_rest.decode(errors="replace")
    assert text.count("waiting for") == 1, text
    assert f"pid {os.getpid()}" in text and "--lock-timeout" in text


def test_a_failed_creator_takes_nothing_another_command_made_beside_it(tmp_path: Path) -> None:
    """pull A into cache/a and pull B into cache/b, no cache/ yet: A made cache/, B's
    layout appears beside A's, then A fails. A undoes its own layout only."""
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError), _new_or_existing_layout(str(cache / "a"), LockWait()):
        build_sample_image(cache / "b", "v1")  # B, while A works
        raise RuntimeError("A fails")
    assert not (cache / "a").exists()
    assert Layout.open(cache / "b").tags() == ["v1"]


def test_a_writer_whose_layout_was_undone_meanwhile_says_so(tmp_path: Path) -> None:
    build_sample_image(tmp_path / "layout", "v1")
    layout = Layout.open(tmp_path / "layout")
    (tmp_path / "layout" / "oci-layout").unlink()  # a failed creator emptied it
    with pytest.raises(InputError, match="removed by another command"), layout.writing():
        pass
