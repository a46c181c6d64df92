"""Credentials for skopeo without a command line: a private auth file."""

from __future__ import annotations

import atexit
import base64
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cvmfs_inject.registry.credentials import Credentials


def credentials_authfile(credentials: Credentials, hosts: list[str]) -> Path:
    """A private auth file for `--creds-stdin`, so skopeo gets the secret from a file, never
    from its argv. It lives in a 0700 temp directory removed when the process exits."""
    directory = Path(tempfile.mkdtemp(prefix="cvmfs-inject-auth-"))
    atexit.register(shutil.rmtree, directory, True)
    token = base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
    path = directory / "auth.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"auths": {host: {"auth": token} for host in hosts}}, handle)
    return path
