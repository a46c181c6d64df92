"""skopeo's failures in our words: the one line of its stderr that matters, as our error type."""

from __future__ import annotations

import re

from cvmfs_inject.errors import IntegrityError, NotFoundError, ToolError

_MSG = re.compile(r'msg="((?:[^"\\]|\\.)*)"')


def key_error_line(stderr: str) -> str:
    """The one line of skopeo's stderr that says what went wrong."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if "level=fatal" in line or "level=error" in line:
            match = _MSG.search(line)
            if match:
                return match.group(1).replace('\\"', '"')
            return line
    for line in reversed(lines):
        if line.lower().startswith(("error", "fatal")):
            return line
    return lines[-1] if lines else "no error output"


# 401 as a status, not inside a port or an address (127.0.0.1:40177 is no 401)
_STATUS_401 = re.compile(r"(?<![\d.:])401(?![\d.:])")


def classify(message: str, argv: list[str], returncode: int, stderr: str) -> Exception:
    """Turn skopeo's message into our error types: not-found vs auth vs network vs other."""
    lower = message.lower()
    if "digest did not match" in lower or "checksum mismatch" in lower:
        return IntegrityError(f"skopeo: {message} (a blob of the source is corrupted; run "
                              "`cvmfs-inject validate` on it)")
    if "no image found in manifest list" in lower:
        return NotFoundError(f"skopeo: {message} (see the platforms with `cvmfs-inject "
                             "inspect`)")
    if any(s in lower for s in ("manifest unknown", "name unknown", "not found",
                                "no such file or directory", "no descriptor found",
                                "does not exist")):
        return NotFoundError(f"skopeo: {message}")
    if ("unauthorized" in lower or "authentication required" in lower
            or _STATUS_401.search(lower)):
        return ToolError(f"skopeo: authentication failed: {message} (check --authfile or "
                         "the registry credentials)", argv, returncode, stderr)
    if "connection refused" in lower or "no such host" in lower or "i/o timeout" in lower:
        return ToolError(f"skopeo: registry unreachable: {message}", argv, returncode, stderr)
    if "x509" in lower or "certificate" in lower:
        return ToolError(f"skopeo: TLS verification failed: {message} (use --cert-dir with the "
                         "registry's CA, or --no-tls-verify for plain http)", argv, returncode,
                         stderr)
    if "server gave http response to https client" in lower:
        return ToolError(f"skopeo: {message} (the registry speaks plain http: use "
                         "--no-tls-verify)", argv, returncode, stderr)
    return ToolError(f"skopeo: {message}", argv, returncode, stderr)
