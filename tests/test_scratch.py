"""What a killed command leaves outside a layout (SIGKILL runs no cleanup) is removed by the
next command that makes a temporary name in the same directory; nothing else is."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import make_nasty_tree

from cvmfs_inject import scratch
from cvmfs_inject.demo.sample import build_sample_image


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def test_sweep_removes_only_what_dead_processes_of_this_host_left(tmp_path: Path) -> None:
    host = scratch._host()
    dead, alive = _dead_pid(), os.getpid()
    names = {
        f"cvmfs-inject-run-{host}-{dead}-abc": True,  # a killed run's layout: goes
        f".out.tar.cvmfs-inject-archive-{host}-{dead}-xyz.tmp": True,  # a killed push's
        f"cvmfs-inject-run-{host}-{alive}-abc": False,  # a running command's
        f"cvmfs-inject-run-00000000-{dead}-abc": False,  # another host's (shared file system)
        "cvmfs-inject-run-abc": False,  # not one of our names
        "unrelated": False,
    }
    for name in names:
        path = tmp_path / name
        if name.endswith(".tmp"):
            path.write_bytes(b"half an archive")
        else:
            (path / "layout").mkdir(parents=True)
    scratch.sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        name for name, goes in names.items() if not goes)


def test_a_killed_push_leaves_a_temp_file_the_next_push_removes(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    build_sample_image(layout, "v1")
    tree = make_nasty_tree(tmp_path / "tree")
    (tree / "random").write_bytes(os.urandom(32 << 20))
    command = [sys.executable, "-m", "cvmfs_inject"]
    subprocess.run([*command, "inject", "-q", "--compress", "none", f"{layout}:v1", str(tree)],
                   check=True)
    out = tmp_path / "out"
    out.mkdir()
    push = [*command, "push", "-q", f"{layout}:v1", f"oci-archive:{out}/image.tar"]
    proc = subprocess.Popen(push)
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:  # until skopeo is writing
        if any(_size(path) > 0 for path in out.iterdir()):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = [p.name for p in out.iterdir()]
    assert left and all(name.endswith(".tmp") for name in left), left
    subprocess.run(push, check=True)
    assert [p.name for p in out.iterdir()] == ["image.tar"]
    big_files = Path(os.environ.get("TMPDIR") or "/var/tmp")  # skopeo's --tmpdir is there
    assert not [p.name for p in big_files.iterdir() if _left_by_the_dead(p.name)]


def _left_by_the_dead(name: str) -> bool:
    match = re.search(r"cvmfs-inject-[a-z]+-[0-9a-f]{8}-(\d+)-", name)
    return match is not None and not Path(f"/proc/{match.group(1)}").exists()
