"""Credentials for skopeo without a command line: a private auth file held in memory."""

from __future__ import annotations

import base64
import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cvmfs_inject.registry.credentials import Credentials


def credentials_authfile(credentials: Credentials, hosts: list[str]) -> int:
    """A private auth file for `--creds-stdin`, so skopeo gets the secret from a file, never
    from its argv: an anonymous memory file (memfd) that skopeo inherits and opens as
    /dev/fd/N. It has no name on any file system, so a killed command leaves no password on
    disk. Returns its descriptor (close-on-exec apart from the skopeo runs that pass it)."""
    token = base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
    document = json.dumps({"auths": {host: {"auth": token} for host in hosts}}).encode()
    fd = os.memfd_create("cvmfs-inject-auth", os.MFD_CLOEXEC)
    view = memoryview(document)
    while view:
        view = view[os.write(fd, view):]
    return fd
