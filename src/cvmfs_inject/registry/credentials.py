"""Registry credentials, found the way skopeo, podman and docker find them.

Order: an explicit auth file; else REGISTRY_AUTH_FILE; else $XDG_RUNTIME_DIR/containers/
auth.json, ~/.config/containers/auth.json, then $DOCKER_CONFIG/config.json or
~/.docker/config.json. In a file, `credHelpers[host]`, then `auths` (`auth` or
`username`/`password`), then `credsStore`; helpers run as `docker-credential-NAME get`.
Passwords never reach a log record, an exception message, a repr or a command line.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvmfs_inject.errors import InputError, ToolError, UsageError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_SERVER_URL = "https://index.docker.io/v1/"  # docker's key for Hub credentials
_HELPER_TIMEOUT = 60.0


@dataclass(frozen=True)
class Credentials:
    """A registry user and password; the password is left out of repr() so logs stay clean."""

    username: str
    password: str = field(repr=False)


def canonical_host(registry: str) -> str:
    """docker.io under all the names docker has used for it; other hosts as given."""
    host = registry.lower()
    if host in ("index.docker.io", DOCKER_HUB_API, DOCKER_HUB):
        return DOCKER_HUB
    return registry


def _key_host(key: str) -> str | None:
    """The registry an auth-file key refers to, or None for a repository-scoped key.

    Keys are ``host``, legacy docker URLs (``https://index.docker.io/v1/``) or, for
    containers-auth.json, ``host/namespace`` (credentials for one repository tree only,
    which a host-wide lookup must not use).
    """
    rest = key
    for scheme in ("https://", "http://"):
        if rest.startswith(scheme):
            rest = rest[len(scheme):].split("/", 1)[0]
            break
    else:
        if "/" in rest.rstrip("/"):
            return None
        rest = rest.rstrip("/")
    return canonical_host(rest)


def _auth_files(authfile: Path | None) -> list[Path]:
    """Candidate auth files in skopeo/podman's order (see `load_credentials`)."""
    if authfile is not None:
        return [Path(authfile)]
    files: list[Path] = []
    env_file = os.environ.get("REGISTRY_AUTH_FILE")
    if env_file:
        files.append(Path(env_file))
    else:
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        if runtime:
            files.append(Path(runtime) / "containers" / "auth.json")
        files.append(Path.home() / ".config" / "containers" / "auth.json")
    docker_dir = os.environ.get("DOCKER_CONFIG")
    files.append((Path(docker_dir) if docker_dir else Path.home() / ".docker") / "config.json")
    return files


def _read_auth_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read auth file {path}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        # The position only: the text around it may be a secret.
        raise InputError(f"auth file {path}: invalid JSON at line {exc.lineno} "
                         f"column {exc.colno}") from None
    if not isinstance(doc, dict):
        raise InputError(f"auth file {path}: expected a JSON object")
    return doc


def _lookup(table: Any, host: str) -> tuple[str, Any] | None:
    """The entry for `host` in an ``auths``/``credHelpers`` table: exact keys first."""
    if not isinstance(table, dict):
        return None
    exact = [host, f"https://{host}", f"http://{host}"]
    if host == DOCKER_HUB:
        exact.append(DOCKER_HUB_SERVER_URL)
    for key in exact:
        if key in table:
            return key, table[key]
    for key, value in table.items():
        if isinstance(key, str) and _key_host(key) == host:
            return key, value
    return None


def _from_auth_entry(entry: Any, path: Path, key: str) -> Credentials | None:
    """Credentials from an ``auths`` entry: base64 ``auth`` or ``username``/``password``."""
    if not isinstance(entry, dict):
        return None
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise InputError(f"auth file {path}: the 'auth' value for {key!r} is not "
                             "base64 of user:password") from None
        user, sep, password = decoded.partition(":")
        if not sep or not user:
            raise InputError(f"auth file {path}: the 'auth' value for {key!r} is not "
                             "base64 of user:password")
        return Credentials(user, password)
    user, password = entry.get("username"), entry.get("password")
    if isinstance(user, str) and user and isinstance(password, str):
        return Credentials(user, password)
    return None


def _helper_server(host: str) -> str:
    return DOCKER_HUB_SERVER_URL if host == DOCKER_HUB else host


def _from_helper(name: Any, host: str, path: Path) -> Credentials | None:
    """Ask ``docker-credential-NAME get`` (the docker credential-helper protocol).

    The server URL goes on stdin and the answer is ``{"Username", "Secret"}`` on stdout.
    A helper that reports "credentials not found" means no credentials, not an error.
    """
    if not isinstance(name, str) or not name or "/" in name:
        raise InputError(f"auth file {path}: credential helper name {name!r} is invalid")
    program = f"docker-credential-{name}"
    exe = shutil.which(program)
    if exe is None:
        raise ToolError(f"credential helper {program} (configured in {path} for {host}) is "
                        "not installed or not on PATH")
    server = _helper_server(host)
    try:
        proc = subprocess.run([exe, "get"], input=server.encode(), capture_output=True,
                              timeout=_HELPER_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise ToolError(f"credential helper {program} did not answer within "
                        f"{_HELPER_TIMEOUT:.0f}s for {server}", [program, "get"]) from None
    except OSError as exc:
        raise ToolError(f"cannot run credential helper {program}: {exc.strerror or exc}",
                        [program, "get"]) from None
    if proc.returncode != 0:
        # On failure helpers print a message, never the secret; keep only its first line.
        said = (proc.stderr or proc.stdout).decode(errors="replace").strip()
        if "credentials not found" in said.lower():
            return None
        first = said.splitlines()[0][:200] if said else "no output"
        raise ToolError(f"credential helper {program} failed for {server} "
                        f"(exit {proc.returncode}): {first}", [program, "get"],
                        proc.returncode, proc.stderr.decode(errors="replace"))
    try:
        answer = json.loads(proc.stdout)
        user, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        raise ToolError(f"credential helper {program} gave no Username/Secret JSON for "
                        f"{server}", [program, "get"]) from None
    if not isinstance(user, str) or not isinstance(secret, str) or not secret:
        return None
    return Credentials(user, secret)


def load_credentials(registry: str, authfile: Path | None = None) -> Credentials | None:
    """Find credentials for `registry` where skopeo and podman would, so one login serves all.

    Files: `authfile` if given (only that one; it must exist). Otherwise the first file,
    in this order, that has an entry for the registry: ``$REGISTRY_AUTH_FILE`` (replaces the
    next two), ``$XDG_RUNTIME_DIR/containers/auth.json``, ``~/.config/containers/auth.json``,
    ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``.

    In a file: ``credHelpers[host]`` wins, then the ``auths`` entry (``auth`` = base64
    "user:password", or ``username``/``password``), then ``credsStore``. Keys may be the
    host, ``https://host``/``http://host`` or, for docker.io, ``https://index.docker.io/v1/``.
    Returns None when nothing is configured (anonymous access). Raises InputError for an
    unreadable or malformed file and ToolError when a configured helper is missing or fails;
    no message carries a secret.
    """
    host = canonical_host(registry)
    if authfile is not None and not Path(authfile).is_file():
        raise InputError(f"auth file {authfile} does not exist")
    for path in _auth_files(authfile):
        if authfile is None and not path.is_file():
            continue
        doc = _read_auth_file(path)
        helper = _lookup(doc.get("credHelpers"), host)
        if helper is not None:
            creds = _from_helper(helper[1], host, path)
            if creds is not None:
                return creds
        entry = _lookup(doc.get("auths"), host)
        if entry is not None:
            creds = _from_auth_entry(entry[1], path, entry[0])
            if creds is not None:
                return creds
        store = doc.get("credsStore")
        if store:
            creds = _from_helper(store, host, path)
            if creds is not None:
                return creds
    return None


def read_credentials_stdin() -> Credentials:
    """Credentials for ``--creds-stdin``: ``USERNAME:PASSWORD`` on the first line of stdin.

    Reading stdin keeps the password out of argv (visible in ``ps``) and shell history.
    Only the line ending is stripped; spaces and colons may be part of a password.
    """
    line = sys.stdin.readline().rstrip("\r\n")
    username, sep, password = line.partition(":")
    if not sep or not username or not password:
        raise UsageError("--creds-stdin expects USERNAME:PASSWORD on the first line of stdin")
    return Credentials(username, password)
