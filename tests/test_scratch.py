"""What a killed command leaves outside a layout (SIGKILL runs no cleanup) is removed by the
next command that makes a temporary name in the same directory; nothing else is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import dead_pid, make_nasty_tree

from cvmfs_inject import scratch
from cvmfs_inject.demo.sample import build_sample_image


def test_sweep_removes_only_what_dead_processes_of_this_id_space_left(tmp_path: Path) -> None:
    space = scratch._id_space()
    dead, alive = dead_pid(), os.getpid()
    names = {
        f"cvmfs-inject-run-{space}-{dead}-abcd_123": True,  # a killed run's layout: goes
        f".out.tar.cvmfs-inject-archive-{space}-{dead}-xyz12345.tmp": True,  # a killed push's
        f"cvmfs-inject-run-{space}-{alive}-abcd_123": False,  # a running command's
        f"cvmfs-inject-run-00000000-{dead}-abcd_123": False,  # another machine's or container's
        f"my-cvmfs-inject-run-{space}-{dead}-abcd_123": False,  # a name we never make
        f"cvmfs-inject-run-{space}-{dead}-abcd_123.tar": False,
        f"cvmfs-inject-run-{space}-2147483648-abcd_123": False,  # no pid at all
        f"cvmfs-inject-run-{space}-{'9' * 30}-abcd_123": False,
        f".cvmfs-inject-unpack-{space}-{dead}-abcd_123": True,  # a killed unpack's staging
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


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _killed_while_writing(push: list[str], out: Path) -> bool:
    """Run `push` and SIGKILL it while skopeo writes the archive; False if it finished."""
    proc = subprocess.Popen(push)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if any(_size(path) > 0 for path in out.iterdir()):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.wait()
    for path in out.iterdir():
        path.unlink()
    return False


def test_a_killed_push_leaves_a_temp_file_the_next_push_removes(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    build_sample_image(layout, "v1")
    tree = make_nasty_tree(tmp_path / "tree")
    (tree / "random").write_bytes(os.urandom(96 << 20))
    command = [sys.executable, "-m", "cvmfs_inject"]
    subprocess.run([*command, "inject", "-q", "--compress", "none", f"{layout}:v1", str(tree)],
                   check=True)
    out = tmp_path / "out"
    out.mkdir()
    push = [*command, "push", "-q", f"{layout}:v1", f"oci-archive:{out}/image.tar"]
    assert any(_killed_while_writing(push, out) for _ in range(3)), "never caught it writing"
    left = [p.name for p in out.iterdir()]
    assert left and all(name.endswith(".tmp") for name in left), left
    subprocess.run(push, check=True)
    assert [p.name for p in out.iterdir()] == ["image.tar"]
    big_files = Path(os.environ.get("TMPDIR") or "/var/tmp")  # skopeo's --tmpdir is there
    assert not [p.name for p in big_files.iterdir() if _ours_and_dead(p)]


def _ours_and_dead(path: Path) -> bool:
    """A name of this id space and user whose process is gone (what sweep removes)."""
    match = scratch._NAME.fullmatch(path.name)
    return (match is not None and match.group(1) == scratch._id_space()
            and path.lstat().st_uid == os.geteuid()
            and not Path(f"/proc/{match.group(2)}").exists())
