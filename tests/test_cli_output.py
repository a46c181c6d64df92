"""What the CLI prints: --json is one JSON document on stdout, --quiet prints nothing,
and the human summary of inject reports size, ratio, time and throughput."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cvmfs_inject.demo.sample import build_sample_image, build_sample_tree


def test_inject_json_is_one_document_on_stdout(cli, tmp_path: Path) -> None:
    build_sample_image(tmp_path / "l", "v1")
    tree = build_sample_tree(tmp_path / "tree")
    result = cli("inject", "--json", f"{tmp_path / 'l'}:v1", tree)
    assert result.code == 0
    report = json.loads(result.out)
    assert report["status"] == "injected"
    assert report["layer"]["diff_id"].startswith("sha256:")
    assert report["stats"]["files"] > 0
    assert result.err == ""  # --json: no human lines anywhere, stdout is the document


def test_quiet_prints_nothing(cli, tmp_path: Path) -> None:
    build_sample_image(tmp_path / "l", "v1")
    tree = build_sample_tree(tmp_path / "tree")
    result = cli("inject", "-q", f"{tmp_path / 'l'}:v1", tree)
    assert (result.code, result.out, result.err) == (0, "", "")


def test_human_summary_reports_size_ratio_time_and_rate(cli, tmp_path: Path) -> None:
    build_sample_image(tmp_path / "l", "v1")
    tree = build_sample_tree(tmp_path / "tree")
    result = cli("inject", f"{tmp_path / 'l'}:v1", tree)
    summary = result.out.splitlines()[-1]
    assert summary.startswith("layer sha256:")
    for piece in (" B gzip (", "% of ", " s, ", " MB/s; image sha256:"):
        assert piece in summary


def test_console_script_and_module_run(tmp_path: Path) -> None:
    """`python -m cvmfs_inject` and the installed `cvmfs-inject` script are the same CLI."""
    script = Path(sys.executable).parent / "cvmfs-inject"
    for argv in ([sys.executable, "-m", "cvmfs_inject", "--version"], [str(script), "--version"]):
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        assert done.stdout.startswith("cvmfs-inject ")


def test_validate_without_json_prints_no_json(cli, tmp_path: Path) -> None:
    bad = tmp_path / "manifest.json"
    bad.write_text('{"schemaVersion": 2, "layers": []}')
    result = cli("validate", "--kind", "manifest", bad)
    assert result.code == 1
    assert result.out == ""
    assert "config" in result.err


def test_warns_when_dir_is_the_parent_of_the_mount_point(cli, tmp_path: Path) -> None:
    build_sample_image(tmp_path / "l", "v1")
    build_sample_tree(tmp_path / "srv" / "cvmfs")
    result = cli("inject", f"{tmp_path / 'l'}:v1", tmp_path / "srv")
    assert result.code == 0
    assert "did you mean" in result.err and str(tmp_path / "srv" / "cvmfs") in result.err


def test_pull_of_a_missing_archive_is_an_input_error(cli, tmp_path: Path) -> None:
    result = cli("pull", f"docker-archive:{tmp_path / 'missing.tar'}", tmp_path / "l")
    assert result.code == 3
    assert "no such archive file" in result.err
    assert not (tmp_path / "l").exists()


def test_interrupt_while_loading_the_cli_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C during the imports (a few tenths of a second) ends like one later on."""
    import builtins

    from cvmfs_inject import entry

    real_import = builtins.__import__

    def interrupted_import(name: str, *args: object, **kwargs: object) -> object:
        if name == "cvmfs_inject.cli":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    assert entry.main() == 130
    assert capsys.readouterr().err == "cvmfs-inject: error: interrupted\n"


def test_interrupt_while_parsing_the_command_line_is_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The parser is built before the command's own interrupt handling begins."""
    from cvmfs_inject import entry

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("cvmfs_inject.cli.build_parser", interrupted)
    assert entry.main() == 130
    assert capsys.readouterr().err == "cvmfs-inject: error: interrupted\n"


@pytest.mark.parametrize("json_mode", [False, True])
def test_a_reader_that_leaves_early_ends_the_command_quietly(tmp_path: Path,
                                                            json_mode: bool) -> None:
    """`inspect | head`: like a program killed by SIGPIPE, exit 141 and no error line."""
    build_sample_image(tmp_path / "l", "v1")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    argv = [sys.executable, "-m", "cvmfs_inject", *(["--json"] if json_mode else []),
            "inspect", f"{tmp_path / 'l'}:v1"]
    done = subprocess.run(argv, stdout=write, stderr=subprocess.PIPE, text=True, check=False)
    os.close(write)
    assert (done.returncode, done.stderr) == (141, "")


def test_the_script_ends_after_exit_functions_and_flushing(tmp_path: Path) -> None:
    """`entry._end` skips Python's teardown, not what it must do: the exit functions run
    (a finalizer's temporary file goes), buffered output is written, the code is kept."""
    marker = tmp_path / "ran"
    code = ("import atexit, pathlib, sys; from cvmfs_inject import entry; "
            f"atexit.register(pathlib.Path({str(marker)!r}).touch); "
            "print('buffered', end=''); sys.stderr.write('err'); entry._end(3)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert (done.returncode, done.stdout, done.stderr) == (3, "buffered", "err")
    assert marker.exists()
    gone = ("import sys; from cvmfs_inject import entry\n"
            "class Gone:\n"
            "    def flush(self):\n"
            "        raise BrokenPipeError\n"
            "sys.stdout = Gone()\n"
            "entry._end(0)\n")
    reader_gone = subprocess.run([sys.executable, "-c", gone], capture_output=True, text=True,
                                 check=False)
    assert (reader_gone.returncode, reader_gone.stderr) == (141, "")  # as SIGPIPE would


def test_the_script_keeps_one_command_s_leftovers_to_its_exit(monkeypatch) -> None:
    """In the console script (which ends with os._exit) the first leftovers are kept,
    frozen out of the collector's passes, and freed by the exit; later ones (a batch's next
    images) are freed at once, as they are everywhere outside the script."""
    import gc
    import weakref

    from cvmfs_inject import leftover

    class Nodes:
        pass

    monkeypatch.setattr(leftover, "_kept", [])
    monkeypatch.setattr(leftover, "_keeping", False)
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    frozen: list[bool] = []
    outside = Nodes()
    seen_outside = weakref.ref(outside)
    leftover.done_with(outside)
    del outside
    assert seen_outside() is None and not frozen
    leftover.keep_until_exit()
    first, second = Nodes(), Nodes()
    seen_first, seen_second = weakref.ref(first), weakref.ref(second)
    leftover.done_with(first)
    leftover.done_with(second)
    del first, second
    assert seen_first() is not None and seen_second() is None and frozen == [True]


@pytest.mark.parametrize("closed", [1, 2])
def test_the_script_runs_with_stdout_or_stderr_closed(tmp_path: Path, closed: int) -> None:
    """Started with fd 1 or 2 closed (`>&-`), Python has no sys.stdout or sys.stderr: the
    command still ends with its own exit code, not a traceback."""
    build_sample_image(tmp_path / "l", "v1")
    done = subprocess.run([sys.executable, "-m", "cvmfs_inject", "inspect",
                           f"{tmp_path / 'l'}:v1"], capture_output=True, check=False,
                          preexec_fn=lambda: os.close(closed))
    assert done.returncode == 0, done.stderr
