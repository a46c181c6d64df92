"""One upload session of the distribution API, streamed: POST, then one
PUT, or PATCHes of a chunk each and a final PUT, honouring OCI-Chunk-Min-Length and the
Range answers. The bodies stream from a file or another download (`registry.bodies`).
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests
import urllib3.exceptions

from cvmfs_inject.errors import CvmfsInjectError, IntegrityError
from cvmfs_inject.registry.bodies import Source
from cvmfs_inject.registry.errors import Transient, Unreachable
from cvmfs_inject.registry.transport import Transport

log = logging.getLogger(__name__)


def with_digest(location: str, digest: str) -> str:
    """The upload's location with ``digest=`` in its query, beside what the registry put
    there (its upload state)."""
    parts = urlsplit(location)
    query = [(key, value) for key, value in parse_qsl(parts.query, keep_blank_values=True)
             if key != "digest"]
    return urlunsplit(parts._replace(query=urlencode([*query, ("digest", digest)])))


def upload(transport: Transport, repo: str, digest: str, size: int, source: Source,
           name: str, *, monolithic_limit: int, chunk_size: int) -> None:
    """One upload session: POST, then a PUT or PATCHes + PUT."""
    resp = transport.request("POST", f"/v2/{repo}/blobs/uploads/", repo=repo)
    if resp.status_code != 202:
        raise transport.fail(resp, f"start upload of {digest} to {repo}")
    resp.close()
    location = transport.location(resp)
    octets = {"Content-Type": "application/octet-stream"}
    try:
        if size <= monolithic_limit:
            url = with_digest(location, digest)
            resp = transport.request("PUT", url, repo=repo, headers=octets,
                                     body=source.body(0, size) if size else b"")
            if resp.status_code == 400 and "DIGEST_INVALID" in _peek(resp):
                raise IntegrityError(f"{name} does not match {digest}: the registry "
                                     "computed a different digest")
            if resp.status_code not in (201, 204):
                raise transport.fail(resp, f"upload of {digest} to {repo}",
                                     transient_404=True)
            resp.close()
            source.commit()
            return
        min_chunk = resp.headers.get("OCI-Chunk-Min-Length", "")
        chunk = max(chunk_size, int(min_chunk) if min_chunk.isdigit() else 0)
        offset = 0
        while offset < size:
            n = min(chunk, size - offset)
            resp = transport.request(
                "PATCH", location, repo=repo, body=source.body(offset, n),
                headers={**octets, "Content-Range": f"{offset}-{offset + n - 1}"})
            if resp.status_code != 202:
                raise transport.fail(
                    resp, f"upload of {digest} to {repo} at byte {offset}",
                    transient_404=True)
            resp.close()
            source.commit()
            got = resp.headers.get("Range", "")
            if got and got != f"0-{offset + n - 1}":
                reason = (f"registry has {got} of {digest} after bytes "
                          f"0-{offset + n - 1} were sent")
                raise Transient(f"{transport.registry}: {reason}", reason)
            location = transport.location(resp)
            offset += n
        local = source.digest()
        if local is not None and local != digest:
            raise IntegrityError(f"{name} does not match {digest}: its content hashes "
                                 f"to {local}")
        url = with_digest(location, digest)
        resp = transport.request("PUT", url, repo=repo, headers=octets)
        if resp.status_code not in (201, 204):
            raise transport.fail(resp, f"finish upload of {digest} to {repo}",
                                 transient_404=True)
        resp.close()
    except Unreachable:
        raise
    except CvmfsInjectError:
        cancel(transport, location, repo)
        raise



def cancel(transport: Transport, location: str, repo: str) -> None:
    """Best effort DELETE of an upload session; the registry purges leftovers anyway."""
    try:
        resp = transport.request("DELETE", location, repo=repo)
        resp.close()
        if resp.status_code not in (200, 202, 204, 404):
            log.debug("%s: cancelling upload answered %s", transport.registry, resp.status_code)
    except CvmfsInjectError as exc:
        log.debug("%s: cancelling upload failed: %s", transport.registry, exc)



def _peek(resp: requests.Response) -> str:
    """The start of a (small, error) body as text, for matching an error code."""
    try:
        return resp.content[:4096].decode(errors="replace")
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
        return ""
