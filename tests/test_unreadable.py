"""An unreadable file in DIR is an error naming it, and the layout is left as it was.

CI runs as root, which reads any file whatever its mode, so as root the command runs in a
forked child that has dropped to an unprivileged uid: the check runs for real either way.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from helpers import dir_bytes

import cvmfs_inject.commands.inject  # noqa: F401 - loaded before a child drops to nobody
from cvmfs_inject.cli import main
from cvmfs_inject.demo.sample import build_sample_image, build_sample_tree

NOBODY = 65534


def _run_unprivileged(argv: list[str], stderr_path: Path) -> int:
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 99
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            sys.stderr = open(stderr_path, "w")  # noqa: SIM115
            sys.stdout = sys.stderr
            code = main(argv)
            sys.stderr.flush()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _inject_refused_as_nobody(work: Path, layout: Path, tree: Path) -> str:
    """`inject LAYOUT:v1 TREE` as nobody: exit 3, one error line (returned), layout as it was."""
    before = dir_bytes(layout)
    stderr_path = work / "stderr"
    code = _run_unprivileged(["inject", f"{layout}:v1", str(tree)], stderr_path)
    message = stderr_path.read_text()
    assert code == 3, message
    assert message.count("\n") == 1 and message.startswith("cvmfs-inject: error:")
    assert dir_bytes(layout) == before
    return message


def test_unreadable_file_is_named_and_layout_unchanged() -> None:
    work = Path(tempfile.mkdtemp(prefix="cvmfs-inject-unreadable-"))
    try:
        work.chmod(0o755)
        layout = work / "layout"
        build_sample_image(layout, "v1")
        tree = build_sample_tree(work / "tree")
        secret = tree / "sft.cern.ch" / "secret.key"
        secret.write_bytes(b"not for you\n")
        secret.chmod(0o000)
        for path in [work, *work.rglob("*")]:
            if os.geteuid() == 0:
                os.lchown(path, NOBODY, NOBODY)
        message = _inject_refused_as_nobody(work, layout, tree)
        assert str(secret) in message and "cannot read" in message
    finally:
        shutil.rmtree(work)


def test_a_layout_the_user_may_not_write_is_one_line() -> None:
    """The file system's refusal (here: a root-owned layout, written as nobody) is one line
    naming the path, exit 3, and the layout is left as it was."""
    work = Path(tempfile.mkdtemp(prefix="cvmfs-inject-readonly-"))
    try:
        work.chmod(0o755)
        layout = work / "layout"
        build_sample_image(layout, "v1")
        tree = build_sample_tree(work / "tree")
        for path in [work, tree, *tree.rglob("*")]:
            if os.geteuid() == 0:
                os.lchown(path, NOBODY, NOBODY)
        if os.geteuid() != 0:
            for path in [layout, *layout.rglob("*")]:
                path.chmod(path.stat().st_mode & ~0o222)
        message = _inject_refused_as_nobody(work, layout, tree)
        assert str(layout) in message and "Permission denied" in message
    finally:
        shutil.rmtree(work)
