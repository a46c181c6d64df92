"""The `cvmfs-inject` console script.

The CLI and its libraries take a few tenths of a second to import. They are imported here,
inside the interrupt handling, as the command line is parsed, so a Ctrl-C during start-up
ends like one later on: one line and exit code 130, not a traceback.

The script ends the process itself once the command returned (`_end`): by then every
command has closed and synced what it wrote, and Python's own teardown would free each of
the command's objects one by one and collect cycles once more over all of them: 50-60 ms
after a stacked update of the bench tree (a tuple per entry of the tree and of its
index), more than the update's upload took.
"""

import atexit
import contextlib
import os
import sys
from typing import NoReturn


def main() -> int:
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:  # started with it closed (`>&-`): write nowhere
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 (until the end)
    try:
        from cvmfs_inject.cli import main as cli_main
        from cvmfs_inject.leftover import keep_until_exit

        keep_until_exit()
        code = cli_main()  # a Ctrl-C while it builds its parser arrives here too
    except KeyboardInterrupt:
        print("cvmfs-inject: error: interrupted", file=sys.stderr)
        return 130
    _end(code)


def _end(code: int) -> NoReturn:
    """Exit with `code` after what Python's exit does that matters: the exit functions
    (temporary files a finalizer removes) and the flush of stdout and stderr."""
    from cvmfs_inject.errors import SIGPIPE_EXIT

    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left after the command's last write
        code = SIGPIPE_EXIT
    except (OSError, ValueError):
        code = code or 120  # what Python's exit gives when its flush fails
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code)
