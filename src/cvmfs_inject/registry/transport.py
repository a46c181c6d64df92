"""The HTTP plumbing of the registry client (ggcr's `remote/transport`): one session per
registry host with its TLS settings, authentication on challenge, the request loop, and
the mapping of network trouble and error answers to our errors.

Built on a `requests.Session` with cookies disabled (Harbor and friends treat a client
that keeps cookies as a browser and start CSRF dances); challenges and token requests are
`registry.auth`'s (timeouts and a bounded answer).

The request loop answers a challenge once, keeps one bearer token per repository scope,
replays only bodies it can re-create, and leaves retrying whole uploads to the pusher. (It
was built on oras-py once, whose `Registry.do_request` sleeps 3, 5, 11, 29, 83 s on *any*
exception, replays bodies a streamed upload has consumed, asks a ``Basic`` challenge's
realm string for a bearer token and has no timeouts: none of that is wanted, and what
oras-py still gave, a session and a challenge parser, cost 50 ms of import on every
registry command, jsonschema's with it, which only a sink checking documents needs.)

Secrets: passwords and tokens live only in request headers and in the Authenticator.
They never appear in log records, exception messages or reprs.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import weakref
from http.cookiejar import DefaultCookiePolicy
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import requests.utils

from cvmfs_inject import scratch
from cvmfs_inject.errors import CvmfsInjectError, InputError, NotFoundError, ToolError, UsageError
from cvmfs_inject.oci import names
from cvmfs_inject.oci.digest import check_digest
from cvmfs_inject.registry.auth import Authenticator
from cvmfs_inject.registry.credentials import (
    DOCKER_HUB,
    DOCKER_HUB_API,
    Credentials,
    canonical_host,
)
from cvmfs_inject.registry.errors import (
    Transient,
    Unreachable,
    registry_error,
    short_reason,
    tls_error,
)

CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 300.0  # a final PUT may wait while the registry hashes a big blob


def split_digest(digest: str) -> tuple[str, str]:
    algorithm, _, encoded = check_digest(digest).partition(":")
    return algorithm, encoded


def _cert_pair(cert_dir: Path) -> tuple[str, str] | None:
    """The client certificate in a containers-certs.d dir: ``NAME.cert`` with ``NAME.key``."""
    certs = sorted(cert_dir.glob("*.cert"))
    keys = sorted(cert_dir.glob("*.key"))
    for key in keys:
        if not key.with_suffix(".cert").is_file():
            raise InputError(f"cert dir {cert_dir}: {key.name} has no matching "
                             f"{key.with_suffix('.cert').name}")
    for cert in certs:
        if not cert.with_suffix(".key").is_file():
            raise InputError(f"cert dir {cert_dir}: client certificate {cert.name} has no "
                             f"matching {cert.with_suffix('.key').name}")
    return (str(certs[0]), str(certs[0].with_suffix(".key"))) if certs else None


def _ca_bundle(cas: list[Path]) -> str:
    """One PEM file with the default CAs plus ours: requests' ``verify=`` takes a single path.

    The defaults stay in (like skopeo adds --cert-dir CAs to the system pool) so a cert dir
    for a private CA does not break a registry that redirects blobs to a public CDN.
    """
    base = (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            or requests.utils.DEFAULT_CA_BUNDLE_PATH)  # what requests itself would trust
    parts: list[bytes] = []
    for path in [Path(base), *cas]:
        try:
            parts.append(path.read_bytes().rstrip(b"\n") + b"\n")
        except OSError as exc:
            if path in cas:
                raise InputError(f"cannot read CA certificate {path}: "
                                 f"{exc.strerror or exc}") from None
    fd, name = scratch.make_file("ca", tempfile.gettempdir(), suffix=".pem")
    with os.fdopen(fd, "wb") as out:
        out.write(b"".join(parts))
    return name


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class Transport:
    """One registry host: its session, TLS settings, credentials and tokens.

    Authentication happens lazily on the first 401, per repository scope for bearer tokens,
    and is reused afterwards.
    """

    def __init__(self, registry: str, *, tls_verify: bool, cert_dir: Path | None,
                 ca_file: Path | None, credentials: Credentials | None) -> None:
        """Configure; no network traffic happens until the first request.

        `tls_verify=False` means plain http (what skopeo --tls-verify=false amounts to on a
        local registry), not "https without checking": no certificate is ever ignored.
        `cert_dir` is a containers-certs.d directory: CA ``*.crt`` files and an optional
        client ``NAME.cert``/``NAME.key`` pair.
        """
        registry = registry.strip().rstrip("/")
        if not registry or not names.HOST.match(registry):
            raise UsageError(f"invalid registry host {registry!r}: expected HOST[:PORT]")
        self.registry = registry
        self._credentials = credentials
        api_host = DOCKER_HUB_API if canonical_host(registry) == DOCKER_HUB else registry
        self._scheme = "https" if tls_verify else "http"
        self.base_url = f"{self._scheme}://{api_host}"
        self._netloc = api_host.lower()

        verify: bool | str = True
        cert: tuple[str, str] | None = None
        self._bundle: str | None = None
        if tls_verify:
            cas: list[Path] = []
            if cert_dir is not None:
                cert_dir = Path(cert_dir)
                if not cert_dir.is_dir():
                    raise InputError(f"cert dir {cert_dir} does not exist or is not a directory")
                cas += sorted(cert_dir.glob("*.crt"))
                cert = _cert_pair(cert_dir)
            if ca_file is not None:
                if not Path(ca_file).is_file():
                    raise InputError(f"CA file {ca_file} does not exist")
                cas.append(Path(ca_file))
            if cas:
                self._bundle = verify = _ca_bundle(cas)
                self._cleanup = weakref.finalize(self, _unlink_quietly, self._bundle)

        self.session = requests.Session()
        self.session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
        # Also passed on every request: a session-level verify loses against
        # REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE in the environment (requests' merge order).
        self._verify, self._cert = verify, cert
        self.session.verify = verify
        self.session.cert = cert
        self.session.headers["User-Agent"] = "cvmfs-inject"
        self.auth = Authenticator(registry, self.session, credentials, tls_verify, verify,
                                  cert)
        self._timeout = (CONNECT_TIMEOUT, READ_TIMEOUT)

    def close(self) -> None:
        """Close pooled connections and delete the temporary CA bundle."""
        self.session.close()
        if self._bundle is not None:
            self._cleanup()

    @property
    def user(self) -> str | None:
        return self._credentials.username if self._credentials else None

    def repo(self, repo: str) -> str:
        if not isinstance(repo, str) or not names.REPOSITORY.match(repo):
            raise UsageError(f"invalid repository {repo!r}: expected lowercase path "
                             "components like 'team/app'")
        return repo

    def reference(self, reference: str) -> str:
        if isinstance(reference, str) and ":" in reference:
            return check_digest(reference)
        if not isinstance(reference, str) or not names.TAG.match(reference):
            raise UsageError(f"invalid tag {reference!r}")
        return reference

    def request(self, method: str, url: str, *, repo: str,
                headers: dict[str, str] | None = None, body: Any = None,
                stream: bool = False) -> requests.Response:
        """Send one request, answering an auth challenge once; map transport errors.

        `body` is None, bytes, a zero-argument factory (a fresh body per attempt, so the
        request can be replayed after a challenge) or a one-shot object. Any status other
        than an unanswerable 401/403 is returned for the caller to judge.
        """
        full = url if url.startswith(("http://", "https://")) else self.base_url + url
        same_host = urlsplit(full).netloc.lower() == self._netloc
        replayable = body is None or isinstance(body, bytes) or callable(body)
        answered = False
        while True:
            sent = self.auth.header(repo) if same_host else None
            hdrs = dict(headers or {})
            if sent:
                hdrs["Authorization"] = sent
            data = body() if callable(body) else body
            try:
                resp = self.session.request(method, full, data=data, headers=hdrs,
                                            stream=stream, timeout=self._timeout,
                                            verify=self._verify, cert=self._cert)
            except requests.exceptions.SSLError as exc:
                raise tls_error(self.registry, exc) from None
            except (requests.ConnectionError, requests.Timeout) as exc:
                reason = f"registry unreachable: {short_reason(exc)}"
                raise Unreachable(f"{self.registry}: {reason}", reason) from None
            except requests.RequestException as exc:
                reason = f"request failed: {short_reason(exc)}"
                raise Transient(f"{self.registry}: {reason}", reason) from None
            if resp.status_code not in (401, 403) or not same_host:
                return resp
            resp.close()
            if answered or not self.auth.answer(resp, repo, sent):
                raise self.auth.failed(resp.status_code, repo)
            answered = True
            if not replayable:
                # A token expired under a streamed body: restart the upload with the new one.
                reason = "authorization expired during the upload"
                raise Transient(f"{self.registry}: {reason}", reason)

    def fail(self, resp: requests.Response, what: str, *, not_found: str | None = None,
             transient_404: bool = False) -> CvmfsInjectError:
        """The error for an unexpected status: 404 → NotFoundError, 5xx → retryable."""
        try:
            detail = registry_error(resp)
        finally:
            resp.close()
        if resp.status_code == 404 and not_found is not None:
            return NotFoundError(f"{self.registry}: {not_found} ({detail})")
        if resp.status_code >= 500 or (resp.status_code == 404 and transient_404):
            reason = f"{what}: {detail}"
            return Transient(f"{self.registry}: {reason}", reason)
        return ToolError(f"{self.registry}: {what}: {detail}")

    @staticmethod
    def location(resp: requests.Response) -> str:
        location = resp.headers.get("Location")
        if not location:
            raise ToolError(f"{urlsplit(resp.url).netloc}: upload answer has no Location")
        return urljoin(resp.url, location)

    def blob_path(self, repo: str, digest: str) -> str:
        return f"/v2/{self.repo(repo)}/blobs/{check_digest(digest)}"
