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
from cvmfs_inject.errors import (
    INTERNAL_ERROR,
    SIGPIPE_EXIT,
    CvmfsInjectError,
    InputError,
    Terminated,
    ValidationFailed,
    os_error_line,
)


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
    except CvmfsInjectError as exc:
        if args.debug:
            raise
        if not isinstance(exc, ValidationFailed) or not args.json:
            out.fatal(str(exc))
        return exc.exit_code
    except OSError as exc:  # the file system said no: permissions, a full disk, ...
        if args.debug:
            raise
        out.fatal(os_error_line(exc))
        return InputError.exit_code
    except RecursionError:  # a document or tree nested deeper than any real one
        if args.debug:
            raise
        out.fatal("the input is nested too deeply to read (a broken or hostile document)")
        return InputError.exit_code
    except Exception as exc:  # a bug: still one line, and --debug shows where
        if args.debug:
            raise
        out.fatal(f"internal error: {type(exc).__name__}: {exc} (a bug in cvmfs-inject; run "
                  "again with --debug for the traceback and report it)")
        return INTERNAL_ERROR
    except Terminated:
        out.fatal("terminated")
        return 143
    except KeyboardInterrupt:
        out.fatal("interrupted")
        return 130
    return 0

