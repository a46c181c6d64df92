"""The command line: parse argv (`cli.parser`), call one library function per command
(`cli.handlers`), render the result (`cli.render`).

All failures arrive as `CvmfsInjectError` subclasses and are turned into one line on
stderr and the documented exit code here, in one place.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

from cvmfs_inject.cli.handlers import COMMANDS
from cvmfs_inject.cli.parser import build_parser
from cvmfs_inject.cli.render import Reporter, StdoutClosed
from cvmfs_inject.errors import SIGPIPE_EXIT, Terminated, ValidationFailed, failure


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _silence_stdout() -> None:
    """After the reader of stdout left: point it at /dev/null, so that Python's own flush
    at exit does not fail again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # not a file: tests capture stdout
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Reporter(quiet=bool(args.quiet), json_mode=bool(args.json))
    try:
        with _sigterm_as_interrupt():
            result = COMMANDS[args.command](args, out)
            if args.json:
                out.emit(result)
    except StdoutClosed:  # `inspect | head`: end quietly, as a program killed by SIGPIPE
        _silence_stdout()
        return SIGPIPE_EXIT
    except Exception as exc:  # one line and an exit code; --debug shows the traceback
        if args.debug:
            raise
        if isinstance(exc, ValidationFailed) and args.json:
            return exc.exit_code  # the problems are in the JSON document already
        message, code = failure(exc)
        out.fatal(message)
        return code
    except Terminated:
        out.fatal("terminated")
        return 143
    except KeyboardInterrupt:
        out.fatal("interrupted")
        return 130
    return 0

