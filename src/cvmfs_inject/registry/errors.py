"""Registry failures in our words: network trouble worth retrying, error answers as one
line (the spec's ``{"errors": [...]}`` body), TLS trouble with what to do about it."""

from __future__ import annotations

import json
import re

import requests
import urllib3.exceptions

from cvmfs_inject.errors import ToolError

_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")
_SSL = re.compile(r"\[SSL(?:: [A-Z_]+)?\] ([^'\"(]+)")


class Transient(ToolError):
    """A failure worth retrying the whole upload for: network trouble or a 5xx.

    A ToolError, so callers that do not retry report it like any registry failure.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class Unreachable(Transient):
    """No connection at all: do not spend more requests (like cancelling an upload) on it."""


def short_reason(exc: BaseException) -> str:
    """The useful part of a requests/urllib3 error (`Connection refused`, not the pool repr)."""
    text = str(exc)
    for pattern in (_SSL, _ERRNO):
        match = pattern.search(text)
        if match:
            return match.group(1).strip()
    for marker in ("RemoteDisconnected", "Connection aborted", "Read timed out",
                   "Connection broken", "timed out"):
        if marker in text:
            return marker.replace("RemoteDisconnected", "connection closed by the registry")
    return text[:200]


def registry_error(resp: requests.Response) -> str:
    """``HTTP 400 DIGEST_INVALID: ...`` from the spec's ``{"errors":[{code,message}]}`` body."""
    head = f"HTTP {resp.status_code}"
    try:
        body = next(resp.iter_content(64 << 10), b"")
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
        body = b""
    try:
        errors = json.loads(body).get("errors") or []
        parts = [f"{e.get('code', '?')}: {e.get('message', '')}".rstrip(": ") + _detail(e)
                 for e in errors if isinstance(e, dict)]
    except (ValueError, AttributeError):
        parts = []
    if parts:
        return f"{head} {'; '.join(parts)}"
    text = body[:200].decode(errors="replace").strip()
    # Go's TLS server answers plain http with a bare 400 (no body for HEAD); a registry's
    # own answers always carry Docker-Distribution-API-Version.
    if resp.url.startswith("http://") and resp.status_code == 400 and (
            "http request to an https server" in text.lower()
            or "Docker-Distribution-API-Version" not in resp.headers):
        return f"{head} (the registry probably speaks https: drop --no-tls-verify)"
    return f"{head} {resp.reason or ''}".rstrip()


def _detail(error: dict[str, object]) -> str:
    """An error's detail when it is a short string, as the blob a MANIFEST_BLOB_UNKNOWN
    names (other details, of any JSON shape, are left out of a one-line message)."""
    detail = error.get("detail")
    if isinstance(detail, str) and 0 < len(detail) <= 100 and detail.isprintable():
        return f" ({detail})"
    return ""


def tls_error(registry: str, exc: BaseException) -> ToolError:
    reason = short_reason(exc)
    if "wrong version number" in str(exc).lower():  # OpenSSL read an http answer
        return ToolError(f"{registry}: the registry speaks plain http, not https "
                         f"({reason}): use --no-tls-verify")
    return ToolError(f"{registry}: TLS verification failed: {reason} "
                     "(pass --cert-dir with the registry's CA *.crt, or --no-tls-verify "
                     "for a plain-http registry)")
