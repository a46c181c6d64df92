"""One exception hierarchy, so the CLI can map every failure to one line and one exit code.

Library code raises these with a message a user can act on (what, where, what to do);
it never prints. Exit codes are part of the interface documented in the README.
"""

from __future__ import annotations

INTERNAL_ERROR = 70  # sysexits' EX_SOFTWARE: not the input, a bug of ours
SIGPIPE_EXIT = 141  # 128 + SIGPIPE: the reader of stdout left, as a shell reports it


class CvmfsInjectError(Exception):
    """Base of every error the tool reports to a user."""

    exit_code = 1


class UsageError(CvmfsInjectError):
    """A malformed reference or option combination: the command line must change."""

    exit_code = 2


class InputError(CvmfsInjectError):
    """Bad input data: invalid JSON, schema violation, missing or unreadable file or directory."""

    exit_code = 3


class NotFoundError(CvmfsInjectError):
    """A tag, blob, platform or labelled layer that the command needs does not exist."""

    exit_code = 4


class IntegrityError(CvmfsInjectError):
    """Stored content does not match its digest or size: the layout is corrupted."""

    exit_code = 5


class ToolError(CvmfsInjectError):
    """An external tool or a registry failed (skopeo error, 401, unreachable host)."""

    exit_code = 6

    def __init__(self, message: str, argv: list[str] | None = None, returncode: int | None = None,
                 stderr: str = "") -> None:
        super().__init__(message)
        self.argv = argv or []
        self.returncode = returncode
        self.stderr = stderr


class LockedError(CvmfsInjectError):
    """Another writer holds the layout lock."""

    exit_code = 7


class MissingDependencyError(CvmfsInjectError):
    """A required program (skopeo, umoci) is not installed."""

    exit_code = 8


class BatchFailed(CvmfsInjectError):
    """`batch`: some images failed (each said why in the table); the others are done."""

    exit_code = 9


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, a CI cancel, systemd), raised like Ctrl-C so the same clean-up
    runs: temp blobs removed, skopeo killed, the layout left as it was."""


class ValidationFailed(CvmfsInjectError):
    """`validate` found problems; each was already reported, this only carries the exit code."""

    exit_code = 1


def failure(exc: Exception) -> tuple[str, int]:
    """The one line and the exit code a failure is reported with (by the CLI, and by
    `batch` for each image): our errors as they are, the file system's refusal with the
    path it names, a nesting too deep to read as bad input, anything else as a bug."""
    if isinstance(exc, CvmfsInjectError):
        return str(exc), exc.exit_code
    if isinstance(exc, OSError):  # permissions, a full disk, ...
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}", InputError.exit_code
    if isinstance(exc, RecursionError):  # a document or tree nested deeper than any real one
        return ("the input is nested too deeply to read (a broken or hostile document)",
                InputError.exit_code)
    return (f"internal error: {type(exc).__name__}: {exc} (a bug in cvmfs-inject; run again "
            "with --debug for the traceback and report it)", INTERNAL_ERROR)
