"""The registry-direct client: the OCI distribution API for what skopeo cannot express.

To put one new /cvmfs layer into an image we only need to upload that layer, mount or
reference the unchanged ones and PUT new manifests. skopeo copies whole images; talking to
the registry directly does exactly the few requests needed, streams multi-GB layers from
disk without holding them in memory, and keeps Docker v2s2 manifests Docker (skopeo would
convert them when asked to change anything).

The client is split as go-containerregistry splits `remote`: `transport` (session, TLS,
auth on challenge, the request loop), `errors`, `fetcher` (reads), `pusher` (writes,
mounts, uploads with retries) and `bodies` (streamed upload bodies). Credentials are
found the way skopeo and podman find them (`credentials`); oras-py only reads
``~/.docker/config.json`` and silently ignores a missing credential helper.
"""

from __future__ import annotations

from pathlib import Path

import requests

from cvmfs_inject.errors import UsageError
from cvmfs_inject.registry.credentials import Credentials
from cvmfs_inject.registry.pusher import Pusher
from cvmfs_inject.registry.transport import Transport

__all__ = ["RegistryClient"]


class RegistryClient(Pusher):
    """One registry host, spoken to directly over the OCI distribution API.

    Use as a context manager (or call `close`) to drop the connection pool and the
    temporary CA bundle early.
    """

    def __init__(self, registry: str, *, tls_verify: bool = True, cert_dir: Path | None = None,
                 ca_file: Path | None = None, credentials: Credentials | None = None,
                 chunk_size: int = 16 << 20, monolithic_limit: int = 32 << 20,
                 retries: int = 3) -> None:
        """Configure; no network traffic happens until the first call.

        `tls_verify=False` means plain http, never "https without checking". `cert_dir` is
        a containers-certs.d directory (CA ``*.crt``, client ``NAME.cert``/``NAME.key``).
        Files up to `monolithic_limit` are uploaded in one PUT, larger ones in chunks of
        `chunk_size`; `retries` is how many times a failed upload is started over.
        """
        if chunk_size < 1 or monolithic_limit < 0 or retries < 0:
            raise UsageError("chunk_size must be >= 1, monolithic_limit and retries >= 0")
        self.transport = Transport(registry, tls_verify=tls_verify, cert_dir=cert_dir,
                                   ca_file=ca_file, credentials=credentials)
        self.chunk_size = chunk_size
        self.monolithic_limit = monolithic_limit
        self.retries = retries

    def __repr__(self) -> str:
        return (f"RegistryClient({self.registry!r}, url={self.transport.base_url!r}, "
                f"user={self.transport.user!r})")

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close pooled connections and delete the temporary CA bundle."""
        self.transport.close()

    @property
    def session(self) -> requests.Session:
        """The underlying requests session, e.g. to mount adapters or hooks."""
        return self.transport.session
