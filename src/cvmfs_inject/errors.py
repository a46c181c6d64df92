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


def os_error_line(exc: OSError) -> str:
    """What the file system refused, as one line: the path it names, and why."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"
