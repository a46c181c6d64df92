"""Writing to a registry (ggcr's `remote` pusher): manifests by tag or digest, blobs
uploaded from a file or streamed from another registry, and cross-repository mounts.

What a generic client (oras-py) lacks and this does: blob mount (``POST
...?mount=&from=``), cancelling the upload session a registry opens when it refuses to
mount; streaming uploads (oras-py reads whole files or chunks into memory) that honour
``OCI-Chunk-Min-Length`` and the ``Range`` answers; Docker v2s2 manifests PUT with their
own media type (oras-py always sends the OCI type). A failed upload is started over from
a new session a few times.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO
from urllib.parse import quote

from cvmfs_inject.errors import InputError, IntegrityError, ToolError, UsageError
from cvmfs_inject.oci.digest import check_digest, digest_of, sha256_digest
from cvmfs_inject.registry.bodies import FileSource, Reporting, Source, StreamSource
from cvmfs_inject.registry.errors import Transient
from cvmfs_inject.registry.fetcher import Fetcher
from cvmfs_inject.registry.transport import split_digest
from cvmfs_inject.registry.upload import cancel, upload

log = logging.getLogger(__name__)
RETRY_BACKOFF = 0.5  # seconds before the 1st retry, doubled each time


class Pusher(Fetcher):
    """The writing half of `RegistryClient` (it reads too: HEAD before upload, and the
    source side of a copy)."""

    chunk_size: int
    monolithic_limit: int
    retries: int

    def put_manifest(self, repo: str, reference: str, raw: bytes, media_type: str) -> str:
        """PUT a manifest as the given bytes and media type; return its sha256 digest.

        The media type is sent as is: a Docker v2s2 manifest stays Docker, OCI stays OCI.
        A digest reference must match the bytes; a registry that reports a different
        Docker-Content-Digest is an IntegrityError.
        """
        repo, reference = self.transport.repo(repo), self.transport.reference(reference)
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
            algorithm, _ = split_digest(reference)
            if digest_of(raw, algorithm) != reference:
                raise InputError(f"manifest bytes do not match the digest reference {reference}")
        name = f"{repo}@{reference}" if ":" in reference else f"{repo}:{reference}"
        resp = self.transport.request("PUT", f"/v2/{repo}/manifests/{reference}", repo=repo,
                                      headers={"Content-Type": media_type}, body=bytes(raw))
        if resp.status_code not in (200, 201, 202):
            raise self.transport.fail(resp, f"push manifest {name}")
        resp.close()
        header = resp.headers.get("Docker-Content-Digest", "")
        if header.startswith("sha256:") and header != digest:
            raise IntegrityError(f"{self.registry}: stored manifest {name} as {header}, "
                                 f"expected {digest}")
        return digest

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Cross-repository mount: True when the registry linked the blob.

        A registry that cannot or will not mount opens an upload session instead (202);
        that session is cancelled so no dangling upload is left behind.
        """
        repo, from_repo = self.transport.repo(repo), self.transport.repo(from_repo)
        check_digest(digest)
        resp = self.transport.request(
            "POST", f"/v2/{repo}/blobs/uploads/?mount={quote(digest, safe=':')}"
                    f"&from={quote(from_repo, safe='/')}", repo=repo)
        resp.close()
        if resp.status_code == 201:
            return True
        if resp.status_code == 202:
            cancel(self.transport, self.transport.location(resp), repo)
            return False
        raise self.transport.fail(resp, f"mount {digest} from {from_repo} into {repo}")

    def push_blob(self, repo: str, path: Path, digest: str, size: int,
                  progress: Callable[[int], None] | None = None) -> bool:
        """Upload a file as a blob unless the repository has it already (then False).

        Files up to `monolithic_limit` go in one streamed PUT, larger ones as PATCH chunks
        of `chunk_size` (or the registry's OCI-Chunk-Min-Length); neither ever reads the
        file into memory. Network errors and 5xx restart the upload from a new session up
        to `retries` times. The result is checked with a HEAD.
        """
        repo, path = self.transport.repo(repo), Path(path)
        algorithm, _ = split_digest(digest)
        try:
            actual = path.stat().st_size
        except OSError as exc:
            raise InputError(f"cannot read blob file {path}: {exc.strerror or exc}") from None
        if actual != size:
            raise IntegrityError(f"{path} has {actual} bytes, but blob {digest} should have "
                                 f"{size}")
        if self.has_blob(repo, digest):
            return False

        def attempt() -> None:
            try:
                f = path.open("rb")
            except OSError as exc:
                raise InputError(f"cannot read blob file {path}: "
                                 f"{exc.strerror or exc}") from None
            with f:
                reader: IO[bytes] = f if progress is None else Reporting(f, progress)
                self._upload(repo, digest, size, FileSource(reader, algorithm), str(path))

        self._with_retries(repo, digest, attempt)
        self._check_uploaded(repo, digest, size)
        return True

    def copy_blob_from(self, source: Fetcher, source_repo: str, repo: str, digest: str,
                       size: int) -> None:
        """Stream a blob from another registry into this one, one chunk in memory at most.

        Skipped when the blob is here already: without asking when the source is this
        very repository (it lists the blob; were it gone, a manifest naming it is refused
        and the error names it), else after a HEAD; on the same registry a mount is tried
        first. A failed transfer restarts with a fresh download and upload session.
        """
        repo = self._check_target(repo, digest, size)
        this_repository = (source.registry, source_repo) == (self.registry, repo)
        if this_repository or self.has_blob(repo, digest):
            return
        if (source.registry == self.registry and source_repo != repo
                and self.mount_blob(repo, digest, source_repo)):
            return
        self._stream(repo, lambda: source.open_blob(source_repo, digest), digest, size,
                     f"{source.registry}/{source_repo}@{digest}")

    def push_stream(self, repo: str, open_chunks: Callable[[], Iterator[bytes]], digest: str,
                    size: int, name: str) -> None:
        """Upload a blob read from a stream (`open_chunks` opens it anew for each attempt)
        unless the repository has it already; `name` says where it comes from."""
        repo = self._check_target(repo, digest, size)
        if not self.has_blob(repo, digest):
            self._stream(repo, open_chunks, digest, size, name)

    def _check_target(self, repo: str, digest: str, size: int) -> str:
        check_digest(digest)
        if size < 0:
            raise UsageError(f"invalid blob size {size}")
        return self.transport.repo(repo)

    def _stream(self, repo: str, open_chunks: Callable[[], Iterator[bytes]], digest: str,
                size: int, name: str) -> None:
        def attempt() -> None:
            chunks = open_chunks()
            try:
                self._upload(repo, digest, size, StreamSource(chunks, name), name)
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
            except Transient as exc:
                log.debug("%s: upload of %s, attempt %d/%d: %s", self.registry, digest,
                          n + 1, tries, exc.reason)
                if n + 1 == tries:
                    times = f" (after {tries} attempts)" if tries > 1 else ""
                    raise ToolError(f"{self.registry}: upload of {digest} to {repo} failed: "
                                    f"{exc.reason}{times}") from None
                time.sleep(RETRY_BACKOFF * 2**n)

    def _upload(self, repo: str, digest: str, size: int, source: Source, name: str) -> None:
        upload(self.transport, repo, digest, size, source, name,
               monolithic_limit=self.monolithic_limit, chunk_size=self.chunk_size)

    def _check_uploaded(self, repo: str, digest: str, size: int) -> None:
        """Trust but verify: the blob must now be there with the expected size."""
        found = self._blob_size(repo, digest)
        if found is None:
            raise ToolError(f"{self.registry}: blob {digest} is missing from {repo} right "
                            "after its upload succeeded")
        if found >= 0 and found != size:
            raise ToolError(f"{self.registry}: blob {digest} in {repo} has {found} bytes "
                            f"after upload, expected {size}")
