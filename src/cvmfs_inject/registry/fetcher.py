"""Reading from a registry (ggcr's `remote` fetcher): manifests as raw bytes, blobs small
(configs, in memory) or streamed, every one checked against its digest and size.

HEAD of a blob reports errors (oras-py reads any answer but 200 as "absent"), and
downloads stream in chunks and are verified at their end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator

import requests
import urllib3.exceptions

from cvmfs_inject.errors import InputError, IntegrityError
from cvmfs_inject.oci.digest import digest_of, sha256_digest
from cvmfs_inject.oci.jsondoc import MAX_DOCUMENT
from cvmfs_inject.oci.media import MediaType
from cvmfs_inject.registry.errors import Transient, short_reason
from cvmfs_inject.registry.transport import Transport, split_digest

#: Everything we can read; sent as Accept so a registry does not down-convert to schema 1.
MANIFEST_ACCEPT: tuple[str, ...] = (
    MediaType.OCI_MANIFEST,
    MediaType.OCI_INDEX,
    MediaType.DOCKER_MANIFEST,
    MediaType.DOCKER_LIST,
)
MAX_MANIFEST_SIZE = 4 << 20  # distribution's own limit; protects us from a runaway body
DOWNLOAD_CHUNK = 1 << 20


class Fetcher:
    """The reading half of `RegistryClient`."""

    transport: Transport

    @property
    def registry(self) -> str:
        return self.transport.registry

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str]:
        """Fetch a manifest or index as raw bytes (digests are over bytes, never re-encoded).

        Returns (raw, media type, sha256 digest). A digest reference is verified against the
        bytes (InputError on mismatch); 404 is NotFoundError naming repo:reference.
        """
        repo, reference = self.transport.repo(repo), self.transport.reference(reference)
        name = f"{repo}@{reference}" if ":" in reference else f"{repo}:{reference}"
        resp = self.transport.request("GET", f"/v2/{repo}/manifests/{reference}", repo=repo,
                                      headers={"Accept": ", ".join(MANIFEST_ACCEPT)}, stream=True)
        if resp.status_code != 200:
            raise self.transport.fail(resp, f"get manifest {name}",
                                      not_found=f"manifest {name} not found")
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
            algorithm, _ = split_digest(reference)
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
            reason = f"reading {what} failed: {short_reason(exc)}"
            raise Transient(f"{self.registry}: {reason}", reason) from None
        return b"".join(parts)

    def has_blob(self, repo: str, digest: str) -> bool:
        """HEAD the blob: True if the repository has it (errors are errors, not "absent")."""
        return self._blob_size(repo, digest) is not None

    def _blob_size(self, repo: str, digest: str) -> int | None:
        """HEAD the blob: its size (-1 when the registry does not say), None if absent."""
        resp = self.transport.request("HEAD", self.transport.blob_path(repo, digest), repo=repo)
        resp.close()
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise self.transport.fail(resp, f"check blob {digest} in {repo}")
        try:
            return int(resp.headers.get("Content-Length", "-1"))
        except ValueError:
            return -1

    def _open(self, repo: str, digest: str) -> requests.Response:
        resp = self.transport.request("GET", self.transport.blob_path(repo, digest), repo=repo,
                                      stream=True)
        if resp.status_code != 200:
            raise self.transport.fail(resp, f"get blob {digest} from {repo}",
                                      not_found=f"blob {digest} not found in {repo}")
        return resp

    def _verified(self, resp: requests.Response, repo: str, digest: str,
                  size: int | None) -> Iterator[bytes]:
        """Yield the body as is (no content decoding), then check size and digest."""
        algorithm, _ = split_digest(digest)
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
            reason = f"download of {digest} interrupted: {short_reason(exc)}"
            raise Transient(f"{self.registry}: {reason}", reason) from None
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
        limit = size if size is not None else MAX_DOCUMENT
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

    def open_blob(self, repo: str, digest: str, size: int | None = None) -> Iterator[bytes]:
        """Stream a blob in chunks; IntegrityError after the last chunk if it is corrupted
        (or, when `size` is given, as soon as it is longer than that).

        The request is made now (so a missing blob raises here, not on first iteration);
        the connection is released when the iterator is exhausted or closed.
        """
        resp = self._open(repo, digest)
        return self._verified(resp, repo, digest, size)
