"""A registry-direct client (OCI distribution spec) for pushes skopeo cannot express.

Why this exists next to `transport.py` (the skopeo wrapper): to put one new /cvmfs layer
into an image we only need to upload that layer, cross-mount the unchanged ones and PUT a new
manifest. skopeo copies whole images; talking to the registry directly lets us do exactly the
few requests needed, stream multi-GB layers from disk without holding them in memory, and
keep Docker v2s2 manifests Docker (skopeo would convert them when asked to change anything).

Built on oras-py (`oras.provider.Registry`), which provides:

* the `requests.Session` (with cookies disabled: Harbor and friends treat cookies as a
  browser and start CSRF dances) and its TLS `verify` setting,
* the auth backends: `oras.auth.utils.parse_auth_header` parses a
  ``WWW-Authenticate: Bearer realm=...,service=...,scope=...`` challenge and
  `oras.auth.TokenAuth` fetches the token from the realm (``request_anonymous_token``, or
  ``request_token`` with the basic credentials); `oras.auth.BasicAuth` makes the
  ``Authorization: Basic`` header,
* `oras.utils.append_url_params` to add ``?digest=`` to an upload location that already
  carries the registry's own state parameters.

Added here, on top of that session, because oras-py lacks it or does it in a way that cannot
work for us (each place is marked "oras-py gap" below):

* our own request loop instead of `Registry.do_request`: its retry decorator sleeps 3, 5,
  11, 29, 83 s on *any* exception (also on a plain authentication failure) and replays
  request bodies that a streamed upload has already consumed; it answers a ``Basic``
  challenge by asking the *realm string* for a bearer token; it has no timeouts. Ours
  answers a challenge once, keeps one bearer token per repository scope, and only replays
  bodies it can re-create;
* blob mount (``POST ...?mount=&from=``) including cancelling the upload session a registry
  opens when it refuses to mount;
* streaming uploads: oras-py's `put_upload` does ``fd.read()`` (whole file in memory) and
  `chunked_upload` reads each chunk into memory; here the file is handed to requests as a
  length-aware file window that is read in 16 KiB blocks, and ``OCI-Chunk-Min-Length`` and
  the ``Range`` answers are honoured;
* Docker v2s2 manifests as first class: PUT with the document's own media type (oras-py
  always sends the OCI type and validates against its artifact schema);
* HEAD of blobs that reports errors instead of "not 200 means absent", and streaming,
  digest-verified blob downloads;
* URL building: `oras.container.Container` parses ``my.team/app`` as registry ``my.team``, so
  repositories are validated and joined into URLs here;
* credential lookup the way skopeo/podman do it (`load_credentials`); oras-py only reads
  ``~/.docker/config.json`` and silently ignores a missing credential helper.

Secrets: passwords and tokens live only in request headers and in the oras auth objects.
They never appear in log records, exception messages or reprs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urljoin, urlsplit

import oras.auth
import oras.auth.utils
import oras.provider
import oras.utils
import requests
import requests.utils
import urllib3.exceptions

from cvmfs_inject.errors import (
    CvmfsInjectError,
    InputError,
    IntegrityError,
    NotFoundError,
    ToolError,
    UsageError,
)
from cvmfs_inject.oci import names
from cvmfs_inject.oci.digest import check_digest, digest_of, sha256_digest
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.registry.credentials import (
    DOCKER_HUB,
    DOCKER_HUB_API,
    Credentials,
    canonical_host,
)

__all__ = ["MANIFEST_ACCEPT", "RegistryClient"]

log = logging.getLogger(__name__)

#: Everything we can read; sent as Accept so a registry does not down-convert to schema 1.
MANIFEST_ACCEPT: tuple[str, ...] = (
    MediaType.OCI_MANIFEST,
    MediaType.OCI_INDEX,
    MediaType.DOCKER_MANIFEST,
    MediaType.DOCKER_LIST,
)


MAX_MANIFEST_SIZE = 4 << 20  # distribution's own limit; protects us from a runaway body
MAX_SMALL_BLOB = 64 << 20  # get_blob is for configs; bigger blobs must be streamed
CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 300.0  # a final PUT may wait while the registry hashes a big blob
RETRY_BACKOFF = 0.5  # seconds before the 1st retry, doubled each time
DOWNLOAD_CHUNK = 1 << 20
_BLOCK = 64 << 10

_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")
_SSL = re.compile(r"\[SSL(?:: [A-Z_]+)?\] ([^'\"(]+)")


# -- request bodies --------------------------------------------------------------------------


class _Window:
    """A length-aware request body read in small blocks (requests sends `len` as
    Content-Length and pulls `read`); subclasses say where the bytes come from."""

    def __init__(self, length: int) -> None:
        self._left = self._length = length

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        while block := self.read(_BLOCK):
            yield block

    def read(self, n: int | None = -1) -> bytes:
        if self._left <= 0:
            return b""
        n = self._left if n is None or n < 0 or n > self._left else n
        data = self._next(n)
        self._left -= len(data)
        return data

    def _next(self, n: int) -> bytes:
        raise NotImplementedError


class _FileWindow(_Window):
    """Bytes [offset, offset+length) of an open file as a requests body (oras-py gap).

    requests sends an object with ``__len__`` and ``read`` with a Content-Length header and
    urllib3 pulls it in small blocks, so no chunk is ever held in memory as a whole. Every
    byte also goes through `hasher`, so the local digest is known without a second read.
    """

    def __init__(self, f: IO[bytes], offset: int, length: int, hasher: Any) -> None:
        super().__init__(length)
        f.seek(offset)
        self._f, self._hasher = f, hasher

    def _next(self, n: int) -> bytes:
        data = self._f.read(n)
        if not data:
            raise IntegrityError(f"{getattr(self._f, 'name', 'file')} shrank while it was "
                                 "being uploaded")
        self._hasher.update(data)
        return data


class _StreamWindow(_Window):
    """The next `length` bytes of a chunk iterator as a requests body (for copy_blob_from).

    Hands out at most the requested block per read (slicing one source chunk, not copying
    the rest of it), so memory stays at one download chunk whatever the blob size.
    """

    def __init__(self, source: _StreamSource, length: int) -> None:
        super().__init__(length)
        self._source = source

    def _next(self, n: int) -> bytes:
        return self._source.take(n)


class _Reporting:
    """A file whose reads are reported (bytes sent), for an upload progress bar."""

    def __init__(self, f: IO[bytes], progress: Callable[[int], None]) -> None:
        self._f, self._progress = f, progress
        self.name = getattr(f, "name", "file")

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._progress(len(data))
        return data


class _FileSource:
    """Upload source backed by a file: every window can be re-read, so requests can be replayed."""

    replayable = True

    def __init__(self, f: IO[bytes], algorithm: str) -> None:
        self._f, self._algorithm = f, algorithm
        self._hasher = hashlib.new(algorithm)
        self._pending: Any = None

    def body(self, offset: int, length: int) -> Callable[[], _FileWindow]:
        def make() -> _FileWindow:
            # Hash on a copy: a replayed request must not feed the same bytes twice.
            self._pending = self._hasher.copy()
            return _FileWindow(self._f, offset, length, self._pending)

        return make

    def commit(self) -> None:
        if self._pending is not None:
            self._hasher, self._pending = self._pending, None

    def digest(self) -> str:
        return f"{self._algorithm}:{self._hasher.hexdigest()}"


class _StreamSource:
    """Upload source backed by another registry's download: read once, never replayable."""

    replayable = False

    def __init__(self, chunks: Iterator[bytes], name: str) -> None:
        self._chunks, self._name = chunks, name
        self._buf, self._pos = b"", 0

    def take(self, n: int) -> bytes:
        while self._pos >= len(self._buf):  # skip empty chunks: b"" would end the body
            try:
                self._buf, self._pos = next(self._chunks), 0
            except StopIteration:
                raise IntegrityError(f"{self._name} ended before its declared size") from None
        data = self._buf[self._pos:self._pos + n]
        self._pos += len(data)
        return data

    def body(self, offset: int, length: int) -> _StreamWindow:
        return _StreamWindow(self, length)

    def commit(self) -> None:
        pass

    def digest(self) -> None:
        """Drain the source so its own end-of-stream verification runs (None: not hashed here)."""
        if self._pos < len(self._buf):
            raise IntegrityError(f"{self._name} is longer than its declared size")
        for extra in self._chunks:
            if extra:
                raise IntegrityError(f"{self._name} is longer than its declared size")
        return None


_Source = _FileSource | _StreamSource


# -- errors ----------------------------------------------------------------------------------


class _Transient(ToolError):
    """A failure worth retrying the whole upload for: network trouble or a 5xx.

    A ToolError, so callers that do not retry report it like any registry failure.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Unreachable(_Transient):
    """No connection at all: do not spend more requests (like cancelling an upload) on it."""


def _short_reason(exc: BaseException) -> str:
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


def _registry_error(resp: requests.Response) -> str:
    """``HTTP 400 DIGEST_INVALID: ...`` from the spec's ``{"errors":[{code,message}]}`` body."""
    head = f"HTTP {resp.status_code}"
    try:
        body = next(resp.iter_content(64 << 10), b"")
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
        body = b""
    try:
        errors = json.loads(body).get("errors") or []
        parts = [f"{e.get('code', '?')}: {e.get('message', '')}".rstrip(": ")
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


# -- the client ------------------------------------------------------------------------------


def _split_digest(digest: str) -> tuple[str, str]:
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
    fd, name = tempfile.mkstemp(prefix="cvmfs-inject-ca-", suffix=".pem")
    with os.fdopen(fd, "wb") as out:
        out.write(b"".join(parts))
    return name


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class RegistryClient:
    """One registry host, spoken to directly over the OCI distribution API.

    Authentication happens lazily on the first 401, per repository scope for bearer tokens,
    and is reused afterwards. Use as a context manager (or call `close`) to drop the
    connection pool and the temporary CA bundle early.
    """

    def __init__(self, registry: str, *, tls_verify: bool = True, cert_dir: Path | None = None,
                 ca_file: Path | None = None, credentials: Credentials | None = None,
                 chunk_size: int = 16 << 20, monolithic_limit: int = 32 << 20,
                 retries: int = 3) -> None:
        """Configure; no network traffic happens until the first call.

        `tls_verify=False` means plain http (what skopeo --tls-verify=false amounts to on a
        local registry), not "https without checking": no certificate is ever ignored.
        `cert_dir` is a containers-certs.d directory: CA ``*.crt`` files and an optional
        client ``NAME.cert``/``NAME.key`` pair. `retries` is how many times a failed upload
        is started over (0: never).
        """
        registry = registry.strip().rstrip("/")
        if not registry or not names.HOST.match(registry):
            raise UsageError(f"invalid registry host {registry!r}: expected HOST[:PORT]")
        if chunk_size < 1 or monolithic_limit < 0 or retries < 0:
            raise UsageError("chunk_size must be >= 1, monolithic_limit and retries >= 0")
        self.registry = registry
        self.chunk_size = chunk_size
        self.monolithic_limit = monolithic_limit
        self.retries = retries
        self._credentials = credentials
        api_host = DOCKER_HUB_API if canonical_host(registry) == DOCKER_HUB else registry
        self._scheme = "https" if tls_verify else "http"
        self._base = f"{self._scheme}://{api_host}"
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

        # oras-py provides the session (cookies off), TLS verify wiring and the token flow.
        self._oras = oras.provider.Registry(hostname=api_host, insecure=not tls_verify,
                                            tls_verify=verify, auth_backend="token")
        self._session: requests.Session = self._oras.session
        # Also passed on every request: a session-level verify loses against
        # REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE in the environment (requests' merge order).
        self._verify, self._cert = verify, cert
        self._session.verify = verify
        self._session.cert = cert
        self._session.headers["User-Agent"] = "cvmfs-inject"
        self._token_auth: Any = self._oras.auth
        self._basic_header: str | None = None
        if credentials is not None:
            # TokenAuth sends these to the token server; BasicAuth builds the Basic header.
            self._token_auth.set_basic_auth(credentials.username, credentials.password)
            basic = oras.auth.get_auth_backend("basic", self._session, not tls_verify,
                                               tls_verify=verify)
            basic.set_basic_auth(credentials.username, credentials.password)
            self._basic_header = basic.get_auth_header()["Authorization"]
        self._use_basic = False
        self._tokens: dict[str, str] = {}
        self._timeout = (CONNECT_TIMEOUT, READ_TIMEOUT)

    def __repr__(self) -> str:
        user = self._credentials.username if self._credentials else None
        return f"RegistryClient({self.registry!r}, url={self._base!r}, user={user!r})"

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close pooled connections and delete the temporary CA bundle."""
        self._session.close()
        if self._bundle is not None:
            self._cleanup()

    @property
    def session(self) -> requests.Session:
        """The underlying requests session (oras-py's), e.g. to mount adapters or hooks."""
        return self._session

    # -- plumbing ------------------------------------------------------------------------

    def _repo(self, repo: str) -> str:
        if not isinstance(repo, str) or not names.REPOSITORY.match(repo):
            raise UsageError(f"invalid repository {repo!r}: expected lowercase path "
                             "components like 'team/app'")
        return repo

    def _reference(self, reference: str) -> str:
        if isinstance(reference, str) and ":" in reference:
            return check_digest(reference)
        if not isinstance(reference, str) or not names.TAG.match(reference):
            raise UsageError(f"invalid tag {reference!r}")
        return reference

    def _auth_header(self, repo: str) -> str | None:
        if self._use_basic:
            return self._basic_header
        return self._tokens.get(repo)

    def _authenticate(self, resp: requests.Response, repo: str, sent: str | None) -> bool:
        """Answer a 401/403 challenge; True when there is a new header worth retrying with.

        oras-py gap: its TokenAuth would answer a ``Basic`` challenge by fetching a token
        from the realm string; we route Basic to the Basic header and only Bearer to oras.
        """
        challenge = resp.headers.get("WWW-Authenticate", "")
        scheme = challenge.split(" ", 1)[0].lower()
        if scheme == "basic":
            if self._basic_header is None or sent == self._basic_header:
                return False
            self._use_basic = True
            return True
        if scheme != "bearer":
            return False
        # oras-py's token requests, called directly rather than through its
        # authenticate_request, which logs an error to stderr on every refused token.
        parsed = oras.auth.utils.parse_auth_header(challenge)
        if not parsed.realm:
            return False
        try:
            if self._credentials is None:
                token = self._token_auth.request_anonymous_token(parsed)
            else:
                token = self._token_auth.request_token(parsed)
        except requests.exceptions.SSLError as exc:
            raise self._tls_error(exc) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise ToolError(f"{self.registry}: token server {parsed.realm} unreachable: "
                            f"{_short_reason(exc)}") from None
        except (ValueError, requests.RequestException):
            raise ToolError(f"{self.registry}: the token server gave an invalid answer for "
                            f"{repo}") from None
        if not token or not isinstance(token, str):
            return False
        header = f"Bearer {token}"
        if header == sent:
            return False
        self._tokens[repo] = header
        return True

    def _auth_failed(self, status: int, repo: str) -> ToolError:
        hint = "" if self._credentials else " (no credentials were found for this registry)"
        return ToolError(f"{self.registry}: authentication failed ({status}) for {repo}; "
                         f"check --authfile / credentials{hint}")

    def _tls_error(self, exc: BaseException) -> ToolError:
        return ToolError(f"{self.registry}: TLS verification failed: {_short_reason(exc)} "
                         "(pass --cert-dir with the registry's CA *.crt, or --no-tls-verify "
                         "for a plain-http registry)")

    def _request(self, method: str, url: str, *, repo: str,
                 headers: dict[str, str] | None = None, body: Any = None,
                 stream: bool = False) -> requests.Response:
        """Send one request, answering an auth challenge once; map transport errors.

        `body` is None, bytes, a zero-argument factory (a fresh body per attempt, so the
        request can be replayed after a challenge) or a one-shot object. Any status other
        than an unanswerable 401/403 is returned for the caller to judge.
        """
        full = url if url.startswith(("http://", "https://")) else self._base + url
        same_host = urlsplit(full).netloc.lower() == self._netloc
        replayable = body is None or isinstance(body, bytes) or callable(body)
        answered = False
        while True:
            sent = self._auth_header(repo) if same_host else None
            hdrs = dict(headers or {})
            if sent:
                hdrs["Authorization"] = sent
            data = body() if callable(body) else body
            try:
                resp = self._session.request(method, full, data=data, headers=hdrs,
                                             stream=stream, timeout=self._timeout,
                                             verify=self._verify, cert=self._cert)
            except requests.exceptions.SSLError as exc:
                raise self._tls_error(exc) from None
            except (requests.ConnectionError, requests.Timeout) as exc:
                reason = f"registry unreachable: {_short_reason(exc)}"
                raise _Unreachable(f"{self.registry}: {reason}", reason) from None
            except requests.RequestException as exc:
                reason = f"request failed: {_short_reason(exc)}"
                raise _Transient(f"{self.registry}: {reason}", reason) from None
            if resp.status_code not in (401, 403) or not same_host:
                return resp
            resp.close()
            if answered or not self._authenticate(resp, repo, sent):
                raise self._auth_failed(resp.status_code, repo)
            answered = True
            if not replayable:
                # A token expired under a streamed body: restart the upload with the new one.
                reason = "authorization expired during the upload"
                raise _Transient(f"{self.registry}: {reason}", reason)

    def _fail(self, resp: requests.Response, what: str, *, not_found: str | None = None,
              transient_404: bool = False) -> CvmfsInjectError:
        """The error for an unexpected status: 404 → NotFoundError, 5xx → retryable."""
        try:
            detail = _registry_error(resp)
        finally:
            resp.close()
        if resp.status_code == 404 and not_found is not None:
            return NotFoundError(f"{self.registry}: {not_found} ({detail})")
        if resp.status_code >= 500 or (resp.status_code == 404 and transient_404):
            reason = f"{what}: {detail}"
            return _Transient(f"{self.registry}: {reason}", reason)
        return ToolError(f"{self.registry}: {what}: {detail}")

    @staticmethod
    def _location(resp: requests.Response) -> str:
        location = resp.headers.get("Location")
        if not location:
            raise ToolError(f"{urlsplit(resp.url).netloc}: upload answer has no Location")
        return urljoin(resp.url, location)

    def _blob_path(self, repo: str, digest: str) -> str:
        return f"/v2/{self._repo(repo)}/blobs/{check_digest(digest)}"

    # -- manifests -----------------------------------------------------------------------

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str]:
        """Fetch a manifest or index as raw bytes (digests are over bytes, never re-encoded).

        Returns (raw, media type, sha256 digest). A digest reference is verified against the
        bytes (InputError on mismatch); 404 is NotFoundError naming repo:reference.
        """
        repo, reference = self._repo(repo), self._reference(reference)
        name = f"{repo}@{reference}" if ":" in reference else f"{repo}:{reference}"
        resp = self._request("GET", f"/v2/{repo}/manifests/{reference}", repo=repo,
                             headers={"Accept": ", ".join(MANIFEST_ACCEPT)}, stream=True)
        if resp.status_code != 200:
            raise self._fail(resp, f"get manifest {name}", not_found=f"manifest {name} not found")
        try:
            raw = self._read_capped(resp, MAX_MANIFEST_SIZE, f"manifest {name}")
        finally:
            resp.close()
        media_type = resp.headers.get("Content-Type", "").split(";", 1)[0].strip()
        if media_type not in MANIFEST_ACCEPT:
            # Some registries answer application/json; the document says what it is.
            try:
                declared = json.loads(raw).get("mediaType")
            except (ValueError, AttributeError):
                declared = None
            media_type = declared if isinstance(declared, str) and declared else media_type
        digest = sha256_digest(raw)
        if ":" in reference:
            algorithm, _ = _split_digest(reference)
            if digest_of(raw, algorithm) != reference:
                raise InputError(f"{self.registry}: manifest {name} has digest "
                                 f"{digest_of(raw, algorithm)}, not the one requested")
        header = resp.headers.get("Docker-Content-Digest", "")
        if header.startswith("sha256:") and header != digest:
            raise IntegrityError(f"{self.registry}: manifest {name}: registry says {header}, "
                                 f"the bytes received hash to {digest}")
        return raw, media_type, digest

    def _read_capped(self, resp: requests.Response, limit: int, what: str) -> bytes:
        parts: list[bytes] = []
        total = 0
        try:
            for chunk in resp.iter_content(DOWNLOAD_CHUNK):
                total += len(chunk)
                if total > limit:
                    raise InputError(f"{self.registry}: {what} is larger than {limit} bytes")
                parts.append(chunk)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            reason = f"reading {what} failed: {_short_reason(exc)}"
            raise _Transient(f"{self.registry}: {reason}", reason) from None
        return b"".join(parts)

    def put_manifest(self, repo: str, reference: str, raw: bytes, media_type: str) -> str:
        """PUT a manifest as the given bytes and media type; return its sha256 digest.

        The media type is sent as is: a Docker v2s2 manifest stays Docker, OCI stays OCI.
        A digest reference must match the bytes; a registry that reports a different
        Docker-Content-Digest is an IntegrityError.
        """
        repo, reference = self._repo(repo), self._reference(reference)
        if not media_type:
            raise UsageError("put_manifest needs the manifest's media type")
        try:
            declared = json.loads(raw).get("mediaType")
        except (ValueError, AttributeError):
            raise InputError(f"manifest for {repo}:{reference} is not a JSON object") from None
        if declared is not None and declared != media_type:
            raise InputError(f"manifest for {repo}:{reference} declares mediaType {declared!r} "
                             f"but is being pushed as {media_type!r}")
        digest = sha256_digest(raw)
        if ":" in reference:
            algorithm, _ = _split_digest(reference)
            if digest_of(raw, algorithm) != reference:
                raise InputError(f"manifest bytes do not match the digest reference {reference}")
        name = f"{repo}@{reference}" if ":" in reference else f"{repo}:{reference}"
        resp = self._request("PUT", f"/v2/{repo}/manifests/{reference}", repo=repo,
                             headers={"Content-Type": media_type}, body=bytes(raw))
        if resp.status_code not in (200, 201, 202):
            raise self._fail(resp, f"push manifest {name}")
        resp.close()
        header = resp.headers.get("Docker-Content-Digest", "")
        if header.startswith("sha256:") and header != digest:
            raise IntegrityError(f"{self.registry}: stored manifest {name} as {header}, "
                                 f"expected {digest}")
        return digest

    # -- blobs: download -----------------------------------------------------------------

    def has_blob(self, repo: str, digest: str) -> bool:
        """HEAD the blob: True if the repository has it (errors are errors, not "absent")."""
        resp = self._request("HEAD", self._blob_path(repo, digest), repo=repo)
        resp.close()
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise self._fail(resp, f"check blob {digest} in {repo}")

    def _blob_size(self, repo: str, digest: str) -> int | None:
        resp = self._request("HEAD", self._blob_path(repo, digest), repo=repo)
        resp.close()
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise self._fail(resp, f"check blob {digest} in {repo}")
        try:
            return int(resp.headers.get("Content-Length", "-1"))
        except ValueError:
            return -1

    def _open(self, repo: str, digest: str) -> requests.Response:
        resp = self._request("GET", self._blob_path(repo, digest), repo=repo, stream=True)
        if resp.status_code != 200:
            raise self._fail(resp, f"get blob {digest} from {repo}",
                             not_found=f"blob {digest} not found in {repo}")
        return resp

    def _verified(self, resp: requests.Response, repo: str, digest: str,
                  size: int | None) -> Iterator[bytes]:
        """Yield the body as is (no content decoding), then check size and digest."""
        algorithm, _ = _split_digest(digest)
        hasher = hashlib.new(algorithm)
        total = 0
        what = f"blob {digest} from {repo}"
        try:
            for chunk in resp.raw.stream(DOWNLOAD_CHUNK, decode_content=False):
                total += len(chunk)
                if size is not None and total > size:
                    raise IntegrityError(f"{self.registry}: {what} is larger than the expected "
                                         f"{size} bytes")
                hasher.update(chunk)
                yield chunk
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            reason = f"download of {digest} interrupted: {_short_reason(exc)}"
            raise _Transient(f"{self.registry}: {reason}", reason) from None
        finally:
            resp.close()
        if size is not None and total != size:
            raise IntegrityError(f"{self.registry}: {what} has {total} bytes, expected {size}")
        actual = f"{algorithm}:{hasher.hexdigest()}"
        if actual != digest:
            raise IntegrityError(f"{self.registry}: {what} is corrupted: its content hashes "
                                 f"to {actual}")

    def get_blob(self, repo: str, digest: str, size: int | None = None) -> bytes:
        """A small blob (config) in memory, verified against digest and, if given, size."""
        resp = self._open(repo, digest)
        limit = size if size is not None else MAX_SMALL_BLOB
        length = resp.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            resp.close()
            if size is not None:
                raise IntegrityError(f"{self.registry}: blob {digest} in {repo} has "
                                     f"{length} bytes, expected {size}")
            raise InputError(f"{self.registry}: blob {digest} is too large to read into "
                             "memory; stream it with open_blob")
        parts: list[bytes] = []
        total = 0
        with contextlib.closing(self._verified(resp, repo, digest, size)) as chunks:
            for chunk in chunks:
                total += len(chunk)
                if total > limit:  # no Content-Length (chunked answer): enforce the cap
                    raise InputError(f"{self.registry}: blob {digest} is too large to read "
                                     "into memory; stream it with open_blob")
                parts.append(chunk)
        return b"".join(parts)

    def open_blob(self, repo: str, digest: str) -> Iterator[bytes]:
        """Stream a blob in chunks; IntegrityError after the last chunk if it is corrupted.

        The request is made now (so a missing blob raises here, not on first iteration);
        the connection is released when the iterator is exhausted or closed.
        """
        resp = self._open(repo, digest)
        return self._verified(resp, repo, digest, None)

    # -- blobs: upload -------------------------------------------------------------------

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Cross-repository mount (oras-py gap): True when the registry linked the blob.

        A registry that cannot or will not mount opens an upload session instead (202);
        that session is cancelled so no dangling upload is left behind.
        """
        repo, from_repo = self._repo(repo), self._repo(from_repo)
        check_digest(digest)
        resp = self._request(
            "POST", f"/v2/{repo}/blobs/uploads/?mount={quote(digest, safe=':')}"
                    f"&from={quote(from_repo, safe='/')}", repo=repo)
        resp.close()
        if resp.status_code == 201:
            return True
        if resp.status_code == 202:
            self._cancel_upload(self._location(resp), repo)
            return False
        raise self._fail(resp, f"mount {digest} from {from_repo} into {repo}")

    def _cancel_upload(self, location: str, repo: str) -> None:
        """Best effort DELETE of an upload session; the registry purges leftovers anyway."""
        try:
            resp = self._request("DELETE", location, repo=repo)
            resp.close()
            if resp.status_code not in (200, 202, 204, 404):
                log.debug("%s: cancelling upload answered %s", self.registry, resp.status_code)
        except CvmfsInjectError as exc:
            log.debug("%s: cancelling upload failed: %s", self.registry, exc)

    def push_blob(self, repo: str, path: Path, digest: str, size: int,
                  progress: Callable[[int], None] | None = None) -> None:
        """Upload a file as a blob unless the repository has it already.

        Files up to `monolithic_limit` go in one streamed PUT, larger ones as PATCH chunks
        of `chunk_size` (or the registry's OCI-Chunk-Min-Length); neither ever reads the
        file into memory. Network errors and 5xx restart the upload from a new session up
        to `retries` times. The result is checked with a HEAD.
        """
        repo, path = self._repo(repo), Path(path)
        algorithm, _ = _split_digest(digest)
        try:
            actual = path.stat().st_size
        except OSError as exc:
            raise InputError(f"cannot read blob file {path}: {exc.strerror or exc}") from None
        if actual != size:
            raise IntegrityError(f"{path} has {actual} bytes, but blob {digest} should have "
                                 f"{size}")
        if self.has_blob(repo, digest):
            return

        def attempt() -> None:
            try:
                f = path.open("rb")
            except OSError as exc:
                raise InputError(f"cannot read blob file {path}: "
                                 f"{exc.strerror or exc}") from None
            with f:
                reader: IO[bytes] = f if progress is None else _Reporting(f, progress)
                self._upload(repo, digest, size, _FileSource(reader, algorithm), str(path))

        self._with_retries(repo, digest, attempt)
        self._check_uploaded(repo, digest, size)

    def copy_blob_from(self, source: RegistryClient, source_repo: str, repo: str, digest: str,
                       size: int) -> None:
        """Stream a blob from another registry into this one, one chunk in memory at most.

        Skipped when the blob is here already; on the same registry a mount is tried first.
        A failed transfer restarts with a fresh download and upload session.
        """
        repo = self._repo(repo)
        check_digest(digest)
        if size < 0:
            raise UsageError(f"invalid blob size {size}")
        if self.has_blob(repo, digest):
            return
        if (source.registry == self.registry and source_repo != repo
                and self.mount_blob(repo, digest, source_repo)):
            return

        def attempt() -> None:
            chunks = source.open_blob(source_repo, digest)
            name = f"{source.registry}/{source_repo}@{digest}"
            try:
                self._upload(repo, digest, size, _StreamSource(chunks, name), name)
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()

        self._with_retries(repo, digest, attempt)
        self._check_uploaded(repo, digest, size)

    def _with_retries(self, repo: str, digest: str, attempt: Callable[[], None]) -> None:
        tries = self.retries + 1
        for n in range(tries):
            try:
                if n and self.has_blob(repo, digest):
                    return  # the previous attempt finished after all (its answer got lost)
                attempt()
                return
            except _Transient as exc:
                log.debug("%s: upload of %s, attempt %d/%d: %s", self.registry, digest,
                          n + 1, tries, exc.reason)
                if n + 1 == tries:
                    times = f" (after {tries} attempts)" if tries > 1 else ""
                    raise ToolError(f"{self.registry}: upload of {digest} to {repo} failed: "
                                    f"{exc.reason}{times}") from None
                time.sleep(RETRY_BACKOFF * 2**n)

    def _upload(self, repo: str, digest: str, size: int, source: _Source, name: str) -> None:
        """One upload session: POST, then a PUT or PATCHes + PUT (oras-py gap: streaming)."""
        resp = self._request("POST", f"/v2/{repo}/blobs/uploads/", repo=repo)
        if resp.status_code != 202:
            raise self._fail(resp, f"start upload of {digest} to {repo}")
        resp.close()
        location = self._location(resp)
        octets = {"Content-Type": "application/octet-stream"}
        try:
            if size <= self.monolithic_limit:
                url = oras.utils.append_url_params(location, {"digest": digest})
                resp = self._request("PUT", url, repo=repo, headers=octets,
                                     body=source.body(0, size) if size else b"")
                if resp.status_code == 400 and "DIGEST_INVALID" in _peek(resp):
                    raise IntegrityError(f"{name} does not match {digest}: the registry "
                                         "computed a different digest")
                if resp.status_code not in (201, 204):
                    raise self._fail(resp, f"upload of {digest} to {repo}", transient_404=True)
                resp.close()
                source.commit()
                return
            min_chunk = resp.headers.get("OCI-Chunk-Min-Length", "")
            chunk = max(self.chunk_size, int(min_chunk) if min_chunk.isdigit() else 0)
            offset = 0
            while offset < size:
                n = min(chunk, size - offset)
                resp = self._request(
                    "PATCH", location, repo=repo, body=source.body(offset, n),
                    headers={**octets, "Content-Range": f"{offset}-{offset + n - 1}"})
                if resp.status_code != 202:
                    raise self._fail(resp, f"upload of {digest} to {repo} at byte {offset}",
                                     transient_404=True)
                resp.close()
                source.commit()
                got = resp.headers.get("Range", "")
                if got and got != f"0-{offset + n - 1}":
                    reason = (f"registry has {got} of {digest} after bytes "
                              f"0-{offset + n - 1} were sent")
                    raise _Transient(f"{self.registry}: {reason}", reason)
                location = self._location(resp)
                offset += n
            local = source.digest()
            if local is not None and local != digest:
                raise IntegrityError(f"{name} does not match {digest}: its content hashes "
                                     f"to {local}")
            url = oras.utils.append_url_params(location, {"digest": digest})
            resp = self._request("PUT", url, repo=repo, headers=octets)
            if resp.status_code not in (201, 204):
                raise self._fail(resp, f"finish upload of {digest} to {repo}",
                                 transient_404=True)
            resp.close()
        except _Unreachable:
            raise
        except CvmfsInjectError:
            self._cancel_upload(location, repo)
            raise

    def _check_uploaded(self, repo: str, digest: str, size: int) -> None:
        """Trust but verify: the blob must now be there with the expected size."""
        found = self._blob_size(repo, digest)
        if found is None:
            raise ToolError(f"{self.registry}: blob {digest} is missing from {repo} right "
                            "after its upload succeeded")
        if found >= 0 and found != size:
            raise ToolError(f"{self.registry}: blob {digest} in {repo} has {found} bytes "
                            f"after upload, expected {size}")


def _peek(resp: requests.Response) -> str:
    """The start of a (small, error) body as text, for matching an error code."""
    try:
        return resp.content[:4096].decode(errors="replace")
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
        return ""
