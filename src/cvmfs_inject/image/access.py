"""How a command reaches images: registries, for the registry client and skopeo alike, and
layouts.

One value carries what a user says about registries (TLS, CA, auth file, credentials on
stdin) and turns it into a registry client or a skopeo wrapper, and how long to wait for a
layout another command is using. Credentials from stdin are
read once, when a command first needs them, so a command that needs no registry never
waits on stdin.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cvmfs_inject.layout.lock import LockWait
from cvmfs_inject.oci.refs import ImageRef
from cvmfs_inject.registry.ledger import BlobLedger
from cvmfs_inject.skopeo.auth import credentials_authfile
from cvmfs_inject.skopeo.command import RegistryOptions, Skopeo

if TYPE_CHECKING:  # the registry client (requests) loads only for registry refs
    from cvmfs_inject.registry.client import RegistryClient
    from cvmfs_inject.registry.credentials import Credentials


class Access:
    """How a command reaches images: registries (TLS, CA, auth file, credentials on stdin,
    skopeo's progress bars) and layouts (how long to wait for their locks)."""

    def __init__(self, options: RegistryOptions | None = None, *, ca_file: Path | None = None,
                 read_credentials: Callable[[], Credentials] | None = None,
                 show_progress: bool = False, layout_wait: LockWait | None = None) -> None:
        self.options = options or RegistryOptions()
        self.ca_file = ca_file
        self.show_progress = show_progress
        self.layout_wait = layout_wait or LockWait()
        self._read_credentials = read_credentials
        self._credentials: Credentials | None = None
        self._authfiles: dict[tuple[str, ...], int] = {}
        self._authfiles_lock = threading.Lock()  # `batch` asks from several threads
        # where this command's uploads went: a blob goes up once per registry (`batch`)
        self.ledger = BlobLedger()

    def credentials(self) -> Credentials | None:
        """The credentials given on stdin, if any (read on the first call)."""
        if self._read_credentials is not None and self._credentials is None:
            self._credentials = self._read_credentials()
        return self._credentials

    def client(self, ref: ImageRef) -> RegistryClient:
        from cvmfs_inject.registry.client import RegistryClient
        from cvmfs_inject.registry.credentials import load_credentials

        credentials = self.credentials() or load_credentials(ref.registry,
                                                             self.options.authfile)
        return RegistryClient(ref.registry, tls_verify=self.options.tls_verify,
                              cert_dir=self.options.cert_dir, ca_file=self.ca_file,
                              credentials=credentials)

    def skopeo(self, *refs: ImageRef) -> Skopeo:
        """skopeo for a command on `refs`; stdin credentials reach it in a private auth file
        for the registries among them (one file for each set of them), never on its command
        line. Without a registry among `refs`, stdin is not read."""
        options = self.options
        hosts = tuple(sorted({ref.registry for ref in refs if ref.is_registry}))
        credentials = self.credentials() if hosts else None
        if credentials is not None:
            with self._authfiles_lock:
                if hosts not in self._authfiles:
                    self._authfiles[hosts] = credentials_authfile(credentials, list(hosts))
            options = RegistryOptions.with_authfile_fd(options, self._authfiles[hosts])
        return Skopeo(options, show_progress=self.show_progress)
